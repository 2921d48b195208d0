//! Builders for xDS resources and Wasm modules used across tests.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, http_uri, AsyncDataSource, DataSource, HttpUri,
    RemoteDataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm as NetworkWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, StringValue};
use prost::{Message, Name};

pub const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

pub fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// A small valid core Wasm module, distinct per `tag`.
pub fn module(tag: &str) -> Vec<u8> {
    wat::parse_str(format!(
        "(module (memory (export \"memory\") 1) (func (export \"proxy_abi_version_0_2_1\")) (func (export \"tag_{tag}\") (result i32) i32.const 7))"
    ))
    .unwrap()
}

pub fn listener(name: &str) -> Any {
    any(&Listener {
        name: name.into(),
        ..Default::default()
    })
}

pub fn cluster(name: &str) -> Any {
    any(&Cluster {
        name: name.into(),
        ..Default::default()
    })
}

/// Options of a remote Wasm ECDS resource.
#[derive(Clone, Default)]
pub struct Remote {
    pub sha256: String,
    pub env: Vec<(String, String)>,
    pub fail_open: bool,
    pub network: bool,
    pub timeout_secs: i64,
    /// The `http_uri` cluster; empty: `_` (as istiod sends: nobody fetches through it).
    pub cluster: String,
}

pub fn plugin_config(name: &str, url: &str, o: &Remote) -> PluginConfig {
    let env = (!o.env.is_empty()).then(|| EnvironmentVariables {
        host_env_keys: vec![],
        key_values: o.env.iter().cloned().collect::<HashMap<_, _>>(),
    });
    PluginConfig {
        name: name.into(),
        root_id: "root".into(),
        failure_policy: if o.fail_open {
            FailurePolicy::FailOpen
        } else {
            FailurePolicy::FailClosed
        } as i32,
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                    http_uri: Some(HttpUri {
                        uri: url.into(),
                        timeout: Some(PbDuration {
                            seconds: if o.timeout_secs > 0 {
                                o.timeout_secs
                            } else {
                                10
                            },
                            nanos: 0,
                        }),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                            if o.cluster.is_empty() {
                                "_"
                            } else {
                                &o.cluster
                            }
                            .into(),
                        )),
                    }),
                    sha256: o.sha256.clone(),
                    retry_policy: None,
                })),
            }),
            environment_variables: env,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn tec(name: &str, typed_config: Any) -> Any {
    any(&TypedExtensionConfig {
        name: name.into(),
        typed_config: Some(typed_config),
    })
}

/// An ECDS resource: HTTP (or network) Wasm filter with remote code.
pub fn ecds_remote(name: &str, url: &str, o: &Remote) -> Any {
    let config = Some(plugin_config(name, url, o));
    let typed = if o.network {
        any(&NetworkWasm { config })
    } else {
        any(&HttpWasm { config })
    };
    tec(name, typed)
}

/// An ECDS resource with local code (passes through).
pub fn ecds_local(name: &str, path: &str) -> Any {
    ecds_local_env(name, path, &[])
}

/// Local code plus environment variables (as istiod sends for `file://` WasmPlugins).
pub fn ecds_local_env(name: &str, path: &str, env: &[(&str, &str)]) -> Any {
    let environment_variables = (!env.is_empty()).then(|| EnvironmentVariables {
        host_env_keys: vec![],
        key_values: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    });
    let config = Some(PluginConfig {
        name: name.into(),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(path.into())),
                    ..Default::default()
                })),
            }),
            environment_variables,
            ..Default::default()
        })),
        ..Default::default()
    });
    tec(name, any(&HttpWasm { config }))
}

/// Decodes an ECDS resource back: (name, typed_config).
pub fn open_tec(a: &Any) -> (String, Any) {
    assert_eq!(a.type_url, ECDS);
    let t = TypedExtensionConfig::decode(a.value.as_slice()).unwrap();
    (t.name, t.typed_config.unwrap())
}

/// The PluginConfig of a delivered HTTP or network Wasm resource.
pub fn delivered_plugin(a: &Any) -> PluginConfig {
    let (_, tc) = open_tec(a);
    match tc.type_url.as_str() {
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm" => {
            HttpWasm::decode(tc.value.as_slice())
                .unwrap()
                .config
                .unwrap()
        }
        "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm" => {
            NetworkWasm::decode(tc.value.as_slice())
                .unwrap()
                .config
                .unwrap()
        }
        other => panic!("not a Wasm filter: {other}"),
    }
}

/// The local filename of a delivered Wasm resource (panics if the code is not local).
pub fn local_filename(a: &Any) -> String {
    let p = delivered_plugin(a);
    let Some(plugin_config::Vm::VmConfig(vm)) = p.vm else {
        panic!("no vm")
    };
    match vm.code.and_then(|c| c.specifier) {
        Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(f)),
            ..
        })) => f,
        other => panic!("code is not a local file: {other:?}"),
    }
}

/// The basic-auth plugin (`basic_auth_root`) as `filter`, its code fetched from `url` through
/// Envoy's `modules` cluster (the agent ignores the cluster), guarding GETs under `prefix` with
/// `ok:test`.
pub fn basic_auth_plugin(
    filter: &str,
    url: &str,
    sha256: &str,
    timeout_secs: i64,
    prefix: &str,
) -> PluginConfig {
    let rules = serde_json::json!({"basic_auth_rules": [{
        "prefix": prefix, "request_methods": ["GET"], "credentials": ["ok:test"]}]});
    let remote = Remote {
        sha256: sha256.into(),
        timeout_secs,
        cluster: "modules".into(),
        ..Default::default()
    };
    let mut pc = plugin_config(filter, url, &remote);
    pc.root_id = "basic_auth_root".into();
    pc.configuration = Some(Any {
        type_url: StringValue::type_url(),
        value: StringValue {
            value: rules.to_string(),
        }
        .encode_to_vec(),
    });
    pc
}
