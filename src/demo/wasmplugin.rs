//! The `WasmPlugin` custom resource (extensions.istio.io/v1alpha1), and Istio 1.30+'s
//! `TrafficExtension` (the module under `spec.wasm`), and how istiod turns either into an ECDS
//! resource: the same fields, env hints and failure policy the agent consumes in production.
//! Names: `extensions.istio.io/wasmplugin/<ns>.<name>` (1.26–1.29) for a WasmPlugin,
//! `extensions.istio.io/trafficextension/<ns>.<name>` for a TrafficExtension (1.30+ translates
//! a WasmPlugin into one named `<name>~istio-translated-wasmplugin`).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, http_uri, AsyncDataSource, DataSource, HttpUri,
    RemoteDataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm as NetworkWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::google::protobuf::{Any, Duration, StringValue};
use prost::{Message, Name};
use serde::Deserialize;

use crate::ecds::env::{PULL_POLICY, PULL_SECRET, RESOURCE_VERSION};

#[derive(Debug, Clone, Deserialize)]
pub struct WasmPlugin {
    /// `WasmPlugin` or `TrafficExtension`.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

fn default_kind() -> String {
    "WasmPlugin".into()
}

/// A TrafficExtension: the module's fields under `spec.wasm`, the rest beside it.
#[derive(Debug, Clone, Deserialize)]
struct TrafficExtension {
    metadata: Metadata,
    spec: TrafficSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrafficSpec {
    #[serde(default)]
    phase: String,
    #[serde(default)]
    fail_strategy: String,
    wasm: Spec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
}

fn default_ns() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub url: String,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub image_pull_policy: String,
    #[serde(default)]
    pub image_pull_secret: String,
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(default)]
    pub plugin_name: String,
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub fail_strategy: String,
    #[serde(default)]
    pub vm_config: Option<VmEnv>,
    #[serde(default, rename = "type")]
    pub plugin_type: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct VmEnv {
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value_from: String,
    #[serde(default)]
    pub value: String,
}

impl WasmPlugin {
    /// A WasmPlugin, or a TrafficExtension (by its `kind`).
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let v: serde_yaml::Value =
            serde_yaml::from_str(yaml).map_err(|e| format!("invalid WasmPlugin YAML: {e}"))?;
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("WasmPlugin")
            .to_owned();
        let p = match kind.as_str() {
            "WasmPlugin" => serde_yaml::from_value::<WasmPlugin>(v)
                .map_err(|e| format!("invalid WasmPlugin YAML: {e}"))?,
            "TrafficExtension" => {
                let t: TrafficExtension = serde_yaml::from_value(v)
                    .map_err(|e| format!("invalid TrafficExtension YAML: {e}"))?;
                let mut spec = t.spec.wasm;
                if spec.phase.is_empty() {
                    spec.phase = t.spec.phase;
                }
                if spec.fail_strategy.is_empty() {
                    spec.fail_strategy = t.spec.fail_strategy;
                }
                WasmPlugin {
                    kind,
                    metadata: t.metadata,
                    spec,
                }
            }
            other => {
                return Err(format!(
                    "kind {other:?} is neither WasmPlugin nor TrafficExtension"
                ))
            }
        };
        if p.spec.url.trim().is_empty() {
            return Err(if p.kind == "TrafficExtension" {
                "TrafficExtension spec.wasm.url is required".into()
            } else {
                "WasmPlugin spec.url is required".into()
            });
        }
        Ok(p)
    }

    /// `<namespace>.<name>`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.metadata.namespace, self.metadata.name)
    }

    /// The ECDS resource name istiod uses: 1.26–1.29 for a WasmPlugin, 1.30+ for a
    /// TrafficExtension.
    pub fn resource_name(&self) -> String {
        if self.kind == "TrafficExtension" {
            format!(
                "extensions.istio.io/trafficextension/{}",
                self.qualified_name()
            )
        } else {
            format!("extensions.istio.io/wasmplugin/{}", self.qualified_name())
        }
    }

    pub fn is_network(&self) -> bool {
        self.spec.plugin_type.eq_ignore_ascii_case("NETWORK")
    }

    /// The module URL as istiod normalises it: no scheme means `oci://`.
    pub fn url(&self) -> String {
        let u = self.spec.url.trim();
        if u.contains("://") {
            u.to_owned()
        } else {
            format!("oci://{u}")
        }
    }

    /// The ECDS resource (a `TypedExtensionConfig` Any), built the way istiod builds it.
    /// `pull_secret` is the `.dockerconfigjson` content of the referenced Secret, if found.
    pub fn to_ecds(&self, resource_version: &str, pull_secret: Option<&str>) -> Any {
        let url = self.url();
        let code = match url.strip_prefix("file://") {
            Some(path) => async_data_source::Specifier::Local(DataSource {
                specifier: Some(data_source::Specifier::Filename(path.to_owned())),
                ..Default::default()
            }),
            None => async_data_source::Specifier::Remote(RemoteDataSource {
                http_uri: Some(HttpUri {
                    uri: url.clone(),
                    timeout: Some(Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                }),
                sha256: self.spec.sha256.clone(),
                retry_policy: None,
            }),
        };
        let mut key_values: BTreeMap<String, String> = BTreeMap::new();
        let mut host_env_keys = Vec::new();
        for e in self.spec.vm_config.iter().flat_map(|v| v.env.iter()) {
            if e.value_from.eq_ignore_ascii_case("HOST") {
                host_env_keys.push(e.name.clone());
            } else {
                key_values.insert(e.name.clone(), e.value.clone());
            }
        }
        key_values.insert(RESOURCE_VERSION.into(), resource_version.into());
        if matches!(
            self.spec.image_pull_policy.as_str(),
            "IfNotPresent" | "Always"
        ) {
            key_values.insert(PULL_POLICY.into(), self.spec.image_pull_policy.clone());
        }
        if !self.spec.image_pull_secret.is_empty() {
            key_values.insert(
                PULL_SECRET.into(),
                pull_secret.unwrap_or_default().to_owned(),
            );
        }
        let failure_policy = match self.spec.fail_strategy.as_str() {
            "FAIL_OPEN" => FailurePolicy::FailOpen,
            "FAIL_RELOAD" => FailurePolicy::FailReload,
            _ => FailurePolicy::FailClosed,
        };
        let configuration = self
            .spec
            .plugin_config
            .as_ref()
            .filter(|c| !c.is_null() && c.as_object().is_none_or(|o| !o.is_empty()))
            .map(|c| Any {
                type_url: StringValue::type_url(),
                value: StringValue {
                    value: c.to_string(),
                }
                .encode_to_vec(),
            });
        let config = PluginConfig {
            name: self.qualified_name(),
            root_id: self.spec.plugin_name.clone(),
            configuration,
            failure_policy: failure_policy as i32,
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                runtime: "envoy.wasm.runtime.v8".into(),
                code: Some(AsyncDataSource {
                    specifier: Some(code),
                }),
                environment_variables: Some(EnvironmentVariables {
                    host_env_keys,
                    key_values: key_values.into_iter().collect(),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let typed = if self.is_network() {
            Any {
                type_url: NetworkWasm::type_url(),
                value: NetworkWasm {
                    config: Some(config),
                }
                .encode_to_vec(),
            }
        } else {
            Any {
                type_url: HttpWasm::type_url(),
                value: HttpWasm {
                    config: Some(config),
                }
                .encode_to_vec(),
            }
        };
        Any {
            type_url: TypedExtensionConfig::type_url(),
            value: TypedExtensionConfig {
                name: self.resource_name(),
                typed_config: Some(typed),
            }
            .encode_to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: basic-auth
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  url: oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0
  phase: AUTHN
  pluginConfig:
    basic_auth_rules:
      - prefix: "/productpage"
        request_methods: ["GET", "POST"]
        credentials: ["ok:test", "YWRtaW4zOmFkbWluMw=="]
"#;

    #[test]
    fn a_traffic_extension_is_read_like_its_wasmplugin() {
        let read = |f: &str| {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            WasmPlugin::parse(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let te = read("testdata/trafficextension.yaml");
        let wp = read("testdata/wasmplugin.yaml");
        assert_eq!(
            te.resource_name(),
            "extensions.istio.io/trafficextension/istio-system.basic-auth~istio-translated-wasmplugin"
        );
        assert_eq!(
            wp.resource_name(),
            "extensions.istio.io/wasmplugin/istio-system.basic-auth"
        );
        assert_eq!((te.url(), te.spec.phase.as_str()), (wp.url(), "AUTHN"));
        assert_eq!(te.spec.plugin_config, wp.spec.plugin_config);
        assert!(
            WasmPlugin::parse("kind: Gateway\nmetadata: {name: x}\nspec: {}\n")
                .unwrap_err()
                .contains("neither")
        );
    }

    #[test]
    fn seed_becomes_istiod_shaped_ecds() {
        let p = WasmPlugin::parse(SEED).unwrap();
        let any = p.to_ecds("42", None);
        let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            tec.name,
            "extensions.istio.io/wasmplugin/istio-system.basic-auth"
        );
        let w = HttpWasm::decode(tec.typed_config.unwrap().value.as_slice()).unwrap();
        let c = w.config.unwrap();
        assert_eq!(c.name, "istio-system.basic-auth");
        assert_eq!(c.failure_policy, FailurePolicy::FailClosed as i32);
        let cfg = StringValue::decode(c.configuration.unwrap().value.as_slice()).unwrap();
        assert!(cfg.value.contains("YWRtaW4zOmFkbWluMw=="));
        let Some(plugin_config::Vm::VmConfig(vm)) = c.vm else {
            panic!()
        };
        let env = vm.environment_variables.unwrap().key_values;
        assert_eq!(env[RESOURCE_VERSION], "42");
        let Some(async_data_source::Specifier::Remote(r)) = vm.code.unwrap().specifier else {
            panic!()
        };
        assert_eq!(r.http_uri.unwrap().timeout.unwrap().seconds, 30);
    }
}
