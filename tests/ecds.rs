//! ECDS conversion through the real binary: test control plane ↔ agent ↔ test Envoy client over
//! real gRPC, modules from a real registry and a real HTTP server.

mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use prost::Message;
use support::registry::{pki, pull_secret, sha256_hex, PASS, USER};
use support::res::{
    self, any, delivered_plugin, ecds_local, ecds_remote, local_filename, module, open_tec, Remote,
    CDS, ECDS,
};
use support::xds::{ack, connect_tcp, ecds_resp, open_delta, sotw_ecds};
use support::{Agent, ControlPlane, Layout, ModuleServer, Registry, Route};

const SECRET_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
const POLICY_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
const VERSION_ENV: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";

async fn agent(cp: &ControlPlane, extra: &[&str]) -> Agent {
    Agent::builder(&cp.url())
        .args([
            "--fetch-ca",
            pki().ca.to_str().unwrap(),
            "--retry-max-backoff",
            "2s",
        ])
        .args(extra.iter().copied())
        .start()
        .await
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn vm_env(a: &Any) -> Option<std::collections::HashMap<String, String>> {
    let Some(plugin_config::Vm::VmConfig(vm)) = delivered_plugin(a).vm else {
        panic!()
    };
    vm.environment_variables.map(|e| e.key_values)
}

/// (stat prefix, deny?) of an HTTP or network RBAC stand-in.
fn standin(a: &Any) -> (String, bool) {
    let (_, tc) = open_tec(a);
    match tc.type_url.as_str() {
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC" => {
            let r = HttpRbac::decode(tc.value.as_slice()).unwrap();
            (r.rules_stat_prefix, r.rules.is_some())
        }
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC" => {
            let r = NetworkRbac::decode(tc.value.as_slice()).unwrap();
            (r.stat_prefix, r.rules.is_some())
        }
        other => panic!("not a stand-in: {other}"),
    }
}

fn file_sha(path: &str) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

#[tokio::test]
async fn http_and_oci_remote_become_verified_local_files_and_secrets_are_stripped() {
    let srv = ModuleServer::start().await;
    let reg = Registry::secure().await;
    let (hw, ow) = (module("http-mod"), module("oci-mod"));
    srv.put("filter.wasm", hw.clone());
    reg.push("wasm/auth", "1.12.0", &ow, Layout::Docker).await;
    let secret = String::from_utf8(pull_secret(&reg.addr, USER, PASS)).unwrap();

    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let names = [
        "extensions.istio.io/wasmplugin/ns.http",
        "extensions.istio.io/wasmplugin/ns.oci",
    ];
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &names).await;

    let http = ecds_remote(
        names[0],
        &srv.url("filter.wasm"),
        &Remote {
            sha256: sha256_hex(&hw),
            env: env(&[("USER_VAR", "keep"), (VERSION_ENV, "7")]),
            ..Default::default()
        },
    );
    let oci = ecds_remote(
        names[1],
        &reg.url("wasm/auth:1.12.0"),
        &Remote {
            env: env(&[
                (SECRET_ENV, &secret),
                (POLICY_ENV, "IfNotPresent"),
                (VERSION_ENV, "7"),
                ("ISTIO_META_USER_VAR", "goes, as in Istio"),
                ("OTHER", "stays"),
            ]),
            ..Default::default()
        },
    );
    up.send(ecds_resp("v1", "n1", vec![http.clone(), oci.clone()]));
    let got = envoy.recv().await;
    assert_eq!(
        (
            got.version_info.as_str(),
            got.nonce.as_str(),
            got.resources.len()
        ),
        ("v1", "n1", 2)
    );

    let f0 = local_filename(&got.resources[0]);
    let f1 = local_filename(&got.resources[1]);
    assert!(f0.starts_with('/') && f1.starts_with('/'), "absolute paths");
    assert_eq!(
        (file_sha(&f0), file_sha(&f1)),
        (sha256_hex(&hw), sha256_hex(&ow))
    );
    assert_eq!(open_tec(&got.resources[0]).0, names[0]);
    assert_eq!(open_tec(&got.resources[1]).0, names[1]);
    // Everything but the code is kept; the hints are gone, user variables stay.
    let p = delivered_plugin(&got.resources[0]);
    assert_eq!((p.name.as_str(), p.root_id.as_str()), (names[0], "root"));
    assert_eq!(
        vm_env(&got.resources[0]).unwrap(),
        [("USER_VAR".to_string(), "keep".to_string())].into()
    );
    // Every ISTIO_META_* key is stripped (Istio's pkg/wasm/convert.go), other keys stay.
    let e1 = vm_env(&got.resources[1]).unwrap();
    assert_eq!(e1, [("OTHER".to_string(), "stays".to_string())].into());
    assert!(
        !format!("{:?}", got.resources[1]).contains(PASS),
        "pull secret never reaches Envoy"
    );

    // Envoy's ACK is the one reply upstream.
    let a = ack(&names, "v1", "n1");
    envoy.send(a.clone());
    assert_eq!(up.recv().await, a);
    let text = agent.metrics().await;
    assert_eq!(
        support::metric_value(
            &text,
            "istio_agent_wasm_config_conversion_count",
            "result=\"success\""
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        support::metric_value(
            &text,
            "istio_agent_wasm_remote_fetch_count",
            "result=\"success\""
        ),
        2.0
    );
    assert_eq!(
        support::metric_value(&text, "istio_agent_wasm_cache_entries", ""),
        2.0
    );
    assert!(
        text.contains("istio_agent_wasm_config_conversion_duration_bucket{le=\"16384\"}"),
        "ms buckets"
    );
    assert!(!agent.log_text().contains(PASS), "secret never logged");

    // /debug/wasm ties module ↔ URL ↔ resource.
    let (_, debug) = agent.get("/debug/wasm").await;
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    let m = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["sha256"] == sha256_hex(&ow))
        .unwrap();
    assert!(m["urls"][0].as_str().unwrap().contains("wasm/auth:1.12.0"));
    assert!(m["used_by"][0].as_str().unwrap().contains(names[1]), "{m}");
    assert!(m["oci_digests"][0].as_str().unwrap().starts_with("sha256:"));
}

fn struct_of(j: serde_json::Value) -> Struct {
    fn v(j: serde_json::Value) -> Value {
        use serde_json::Value as J;
        Value {
            kind: Some(match j {
                J::Null => Kind::NullValue(0),
                J::Bool(b) => Kind::BoolValue(b),
                J::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
                J::String(s) => Kind::StringValue(s),
                J::Array(a) => Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
                    values: a.into_iter().map(v).collect(),
                }),
                J::Object(o) => Kind::StructValue(Struct {
                    fields: o.into_iter().map(|(k, x)| (k, v(x))).collect(),
                }),
            }),
        }
    }
    match v(j).kind {
        Some(Kind::StructValue(s)) => s,
        _ => unreachable!(),
    }
}

fn typed_struct(outer: &str, inner: &str, url: &str) -> Any {
    // Same wire format for udpa.type.v1 and xds.type.v3 TypedStruct: type_url=1, value=2.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Ts {
        #[prost(string, tag = "1")]
        type_url: String,
        #[prost(message, optional, tag = "2")]
        value: Option<Struct>,
    }
    let value = struct_of(serde_json::json!({"config": {
        "name": "ts", "root_id": "r",
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"k\":1}"},
        "vm_config": {"runtime": "envoy.wasm.runtime.v8",
            "code": {"remote": {"http_uri": {"uri": url, "cluster": "_", "timeout": "10s"}}},
            "environment_variables": {"key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "3"}}}}}));
    Any {
        type_url: outer.into(),
        value: Ts {
            type_url: inner.into(),
            value: Some(value),
        }
        .encode_to_vec(),
    }
}

#[tokio::test]
async fn delta_typed_struct_forms_and_network_wasm_keep_envelopes() {
    let srv = ModuleServer::start().await;
    let w = module("delta");
    srv.put("d.wasm", w.clone());
    let url = srv.url("d.wasm");
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        resource_names_subscribe: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    });
    let mut up = cp.next_delta().await;
    up.recv().await;

    let http = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
    let resources = vec![
        (
            "a",
            res::tec(
                "a",
                typed_struct("type.googleapis.com/udpa.type.v1.TypedStruct", http, &url),
            ),
        ),
        (
            "b",
            res::tec(
                "b",
                typed_struct("type.googleapis.com/xds.type.v3.TypedStruct", http, &url),
            ),
        ),
        (
            "c",
            ecds_remote(
                "c",
                &url,
                &Remote {
                    network: true,
                    ..Default::default()
                },
            ),
        ),
    ];
    let resp = DeltaDiscoveryResponse {
        system_version_info: "sys1".into(),
        type_url: ECDS.into(),
        nonce: "d1".into(),
        removed_resources: vec!["old".into()],
        resources: resources
            .into_iter()
            .map(|(n, a)| Resource {
                name: n.into(),
                version: format!("ver-{n}"),
                aliases: vec![format!("alias-{n}")],
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    up.send(resp);
    let got = envoy.recv().await;
    assert_eq!(
        (got.nonce.as_str(), got.system_version_info.as_str()),
        ("d1", "sys1")
    );
    assert_eq!(got.removed_resources, vec!["old".to_string()]);
    for (r, n) in got.resources.iter().zip(["a", "b", "c"]) {
        assert_eq!(
            (r.name.as_str(), r.version.clone(), r.aliases.clone()),
            (n, format!("ver-{n}"), vec![format!("alias-{n}")])
        );
        let a = r.resource.as_ref().unwrap();
        assert_eq!(file_sha(&local_filename(a)), sha256_hex(&w));
        let (_, tc) = open_tec(a);
        let want = if n == "c" {
            "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
        } else {
            http
        };
        assert_eq!(
            tc.type_url, want,
            "{n} re-encoded as the native typed message"
        );
    }
    let p = delivered_plugin(got.resources[0].resource.as_ref().unwrap());
    assert_eq!(p.root_id, "r");
    assert_eq!(
        p.configuration.unwrap().type_url,
        "type.googleapis.com/google.protobuf.StringValue"
    );
    assert!(
        vm_env(got.resources[0].resource.as_ref().unwrap()).is_none(),
        "env block dropped when empty"
    );
    assert_eq!(srv.hits("d.wasm"), 1, "three resources, one download");
}

#[tokio::test]
async fn one_of_three_fails_two_delivered_one_stand_in_one_nack_no_duplicate_reply() {
    let srv = ModuleServer::start().await;
    srv.put("good1.wasm", module("g1"));
    srv.put("good2.wasm", module("g2"));
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let names = ["good1", "bad", "good2"];
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &names).await;
    let good1 = || ecds_remote("good1", &srv.url("good1.wasm"), &Remote::default());

    // A first, fully good version that Envoy accepts.
    up.send(ecds_resp("v1", "n1", vec![good1()]));
    envoy.recv().await;
    envoy.send(ack(&names, "v1", "n1"));
    assert_eq!(up.recv().await.response_nonce, "n1");

    let bad_url = srv.url("missing/plugin.wasm");
    up.send(ecds_resp(
        "v2",
        "n2",
        vec![
            ecds_remote("good1", &srv.url("good1.wasm"), &Remote::default()),
            ecds_remote("bad", &bad_url, &Remote::default()),
            ecds_remote(
                "good2",
                &srv.url("good2.wasm"),
                &Remote {
                    fail_open: true,
                    ..Default::default()
                },
            ),
        ],
    ));
    let nack = up.recv().await;
    assert_eq!(
        (
            nack.response_nonce.as_str(),
            nack.type_url.as_str(),
            nack.version_info.as_str()
        ),
        ("n2", ECDS, "v1")
    );
    assert_eq!(
        nack.resource_names,
        names.map(String::from).to_vec(),
        "subscription repeated"
    );
    let detail = nack.error_detail.expect("error_detail");
    assert_eq!(detail.code, 13);
    assert!(
        detail.message.contains("\"bad\"")
            && detail.message.contains(&bad_url)
            && detail.message.contains("404"),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("good1") && !detail.message.contains("good2"));

    let got = envoy.recv().await;
    assert_eq!((got.nonce.as_str(), got.resources.len()), ("n2", 3));
    local_filename(&got.resources[0]);
    assert_eq!(open_tec(&got.resources[1]).0, "bad");
    assert_eq!(
        standin(&got.resources[1]),
        ("wasm-default-deny".into(), true),
        "fail-closed: deny-all"
    );
    local_filename(&got.resources[2]);

    // Envoy ACKs n2 too; the control plane must not see a second reply for n2.
    envoy.send(ack(&names, "v2", "n2"));
    assert!(
        up.try_recv(Duration::from_millis(1500)).await.is_none(),
        "no duplicate reply for n2"
    );
    // Later traffic still flows.
    up.send(ecds_resp("v3", "n3", vec![good1()]));
    envoy.recv().await;
    envoy.send(ack(&names, "v3", "n3"));
    assert_eq!(up.recv().await.response_nonce, "n3");

    let text = agent.metrics().await;
    assert_eq!(
        support::metric_value(&text, "ecds_agent_nacks_sent", "reason=\"fetch_failure\""),
        1.0,
        "{text}"
    );
    assert_eq!(
        support::metric_value(
            &text,
            "istio_agent_wasm_config_conversion_count",
            "result=\"fetch_failure\""
        ),
        1.0
    );
    assert!(
        support::metric_value(
            &text,
            "istio_agent_wasm_remote_fetch_count",
            "result=\"download_failure\""
        ) >= 1.0
    );
}

#[tokio::test]
async fn fail_open_gives_allow_all_for_http_and_network() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["h", "n", "nd"]).await;
    let bad = "http://127.0.0.1:1/none.wasm";
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![
            ecds_remote(
                "h",
                bad,
                &Remote {
                    fail_open: true,
                    timeout_secs: 2,
                    ..Default::default()
                },
            ),
            ecds_remote(
                "n",
                bad,
                &Remote {
                    fail_open: true,
                    network: true,
                    timeout_secs: 2,
                    ..Default::default()
                },
            ),
            ecds_remote(
                "nd",
                bad,
                &Remote {
                    network: true,
                    timeout_secs: 2,
                    ..Default::default()
                },
            ),
        ],
    ));
    let got = envoy.recv().await;
    assert_eq!(
        standin(&got.resources[0]),
        ("wasm-default-allow".into(), false)
    );
    assert_eq!(
        standin(&got.resources[1]),
        ("wasm-default-allow".into(), false)
    );
    assert_eq!(
        standin(&got.resources[2]),
        ("wasm-default-deny".into(), true)
    );
}

#[tokio::test]
async fn malformed_resources_are_nacked_and_good_ones_still_delivered() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["ok"]).await;
    let http = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![
            res::listener("not-a-tec"),
            res::tec(
                "garbage",
                Any {
                    type_url: http.into(),
                    value: vec![0xff, 0xff, 0xff],
                },
            ),
            res::tec(
                "nocode",
                any(&envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm::default()),
            ),
            any(&TypedExtensionConfig {
                name: "untyped".into(),
                typed_config: None,
            }),
            ecds_local("ok", "/opt/filters/local.wasm"),
        ],
    ));
    let nack = up.recv().await;
    let msg = nack.error_detail.unwrap().message;
    for needle in [
        "4 of 5",
        "\"garbage\"",
        "\"nocode\"",
        "\"untyped\"",
        "not a TypedExtensionConfig",
    ] {
        assert!(msg.contains(needle), "{needle} in {msg}");
    }
    let got = envoy.recv().await;
    assert_eq!(got.resources.len(), 1);
    assert_eq!(
        got.resources[0],
        ecds_local("ok", "/opt/filters/local.wasm"),
        "local code passes through unchanged"
    );
    envoy.send(ack(&["ok"], "v1", "n1"));
    assert!(
        up.try_recv(Duration::from_millis(800)).await.is_none(),
        "one reply per nonce"
    );
    let text = agent.metrics().await;
    assert_eq!(
        support::metric_value(
            &text,
            "istio_agent_wasm_config_conversion_count",
            "result=\"unmarshal_failure\""
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        support::metric_value(
            &text,
            "istio_agent_wasm_config_conversion_count",
            "result=\"no_remote_load\""
        ),
        1.0
    );
    assert_eq!(
        support::metric_value(
            &text,
            "ecds_agent_nacks_sent",
            "reason=\"unmarshal_failure\""
        ),
        1.0
    );
}

#[tokio::test]
async fn registry_down_then_up_heals_without_a_new_push_sotw() {
    let mut reg = Registry::plain().await;
    let w = module("heal");
    reg.push("wasm/heal", "v1", &w, Layout::Artifact).await;
    reg.stop();
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--insecure-registries", &reg.addr.clone()]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["heal"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            "heal",
            &reg.url("wasm/heal:v1"),
            &Remote {
                timeout_secs: 3,
                ..Default::default()
            },
        )],
    ));
    let nack = up.recv().await;
    assert_eq!(nack.response_nonce, "n1");
    let got = envoy.recv().await;
    assert_eq!(standin(&got.resources[0]).0, "wasm-default-deny");
    envoy.send(ack(&["heal"], "v1", "n1"));

    // /debug/wasm shows the failure and when the next retry runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, debug) = agent.get("/debug/wasm").await;
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    let f = v["failures"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .expect("a failure entry")
        .clone();
    assert!(f["error"].as_str().unwrap().contains("wasm/heal"), "{f}");
    assert!(f["next_retry"].as_u64().is_some(), "{f}");

    reg.restart().await;
    let started = Instant::now();
    let healed = envoy.recv().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        healed.nonce.starts_with("ecds-agent/"),
        "agent-originated: {}",
        healed.nonce
    );
    assert_eq!(
        (healed.version_info.as_str(), healed.type_url.as_str()),
        ("v1", ECDS)
    );
    assert_eq!(
        file_sha(&local_filename(&healed.resources[0])),
        sha256_hex(&w)
    );
    envoy.send(ack(&["heal"], "v1", &healed.nonce));
    // Envoy runs what the agent NACKed: the control plane hears an ACK of n1 (istiod clears
    // the rejection), and never an agent nonce.
    let acked = up.recv().await;
    assert_eq!(
        (
            acked.response_nonce.as_str(),
            acked.version_info.as_str(),
            acked.error_detail.is_none()
        ),
        ("n1", "v1", true)
    );
    assert!(up.try_recv(Duration::from_millis(500)).await.is_none());
    assert_eq!(
        agent.metric("ecds_agent_wasm_heal_deliveries", "").await,
        1.0
    );
}

#[tokio::test]
async fn registry_down_then_up_heals_without_a_new_push_delta() {
    let srv = ModuleServer::start().await;
    let w = module("heal-delta");
    srv.set(
        "later.wasm",
        Route {
            body: w.clone(),
            fail_first: 6,
            fail_status: 503,
            ..Default::default()
        },
    );
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .args(["--retry-max-backoff", "1s", "--http-max-attempts", "1"])
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        resource_names_subscribe: vec!["hd".into()],
        ..Default::default()
    });
    let mut up = cp.next_delta().await;
    up.recv().await;
    up.send(DeltaDiscoveryResponse {
        type_url: ECDS.into(),
        nonce: "d1".into(),
        resources: vec![Resource {
            name: "hd".into(),
            version: "rv9".into(),
            resource: Some(ecds_remote(
                "hd",
                &srv.url("later.wasm"),
                &Remote::default(),
            )),
            ..Default::default()
        }],
        ..Default::default()
    });
    let nack = up.recv().await;
    assert_eq!(nack.response_nonce, "d1");
    assert_eq!(nack.error_detail.unwrap().code, 13);
    let first = envoy.recv().await;
    assert_eq!(
        standin(first.resources[0].resource.as_ref().unwrap()).0,
        "wasm-default-deny"
    );
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        response_nonce: "d1".into(),
        ..Default::default()
    });
    let healed = envoy.recv().await;
    assert!(healed.nonce.starts_with("ecds-agent/"));
    assert_eq!(
        (
            healed.resources[0].name.as_str(),
            healed.resources[0].version.as_str()
        ),
        ("hd", "rv9")
    );
    assert_eq!(
        file_sha(&local_filename(
            healed.resources[0].resource.as_ref().unwrap()
        )),
        sha256_hex(&w)
    );
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        response_nonce: healed.nonce.clone(),
        ..Default::default()
    });
    // The ACK of the healing delivery is the ACK of d1; agent nonces never go upstream.
    let acked = up.recv().await;
    assert_eq!(acked.response_nonce, "d1");
    assert!(acked.error_detail.is_none());
    assert!(up.try_recv(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn a_newer_push_supersedes_the_background_retry() {
    let srv = ModuleServer::start().await;
    let (w_old, w_new) = (module("old"), module("new"));
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["p"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("p", &srv.url("old.wasm"), &Remote::default())],
    ));
    assert_eq!(
        standin(&envoy.recv().await.resources[0]).0,
        "wasm-default-deny"
    );
    srv.put("new.wasm", w_new.clone());
    up.send(ecds_resp(
        "v2",
        "n2",
        vec![ecds_remote("p", &srv.url("new.wasm"), &Remote::default())],
    ));
    let got = envoy.recv().await;
    assert_eq!(
        file_sha(&local_filename(&got.resources[0])),
        sha256_hex(&w_new)
    );
    // The old module appearing now must not overwrite the newer config.
    srv.put("old.wasm", w_old);
    assert!(
        envoy.try_recv(Duration::from_secs(4)).await.is_none(),
        "superseded retry delivered nothing"
    );
}

#[tokio::test]
async fn nack_only_mode_delivers_nothing_for_the_failed_resource() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--fetch-failure", "nack-only"]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["x"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            "x",
            "http://127.0.0.1:1/x.wasm",
            &Remote {
                timeout_secs: 2,
                ..Default::default()
            },
        )],
    ));
    let nack = up.recv().await;
    assert_eq!(nack.response_nonce, "n1");
    assert!(
        envoy.try_recv(Duration::from_millis(800)).await.is_none(),
        "no stand-in in nack-only mode"
    );
}

#[tokio::test]
async fn other_types_are_not_held_behind_a_slow_conversion_and_ecds_order_is_kept() {
    let srv = ModuleServer::start().await;
    srv.set(
        "slow.wasm",
        Route {
            body: module("slow"),
            delay: Duration::from_secs(2),
            ..Default::default()
        },
    );
    srv.put("fast.wasm", module("fast"));
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["s", "f"]).await;
    up.send(ecds_resp(
        "v1",
        "e1",
        vec![ecds_remote("s", &srv.url("slow.wasm"), &Remote::default())],
    ));
    up.send(ecds_resp(
        "v2",
        "e2",
        vec![ecds_remote("f", &srv.url("fast.wasm"), &Remote::default())],
    ));
    up.send(DiscoveryResponse {
        type_url: CDS.into(),
        nonce: "c1".into(),
        resources: vec![res::cluster("c")],
        ..Default::default()
    });

    // While the download runs, the admin port answers promptly.
    let t = Instant::now();
    let (code, _) = agent.get("/healthz/ready").await;
    assert_eq!(code, 200);
    agent.get("/stats/prometheus").await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "admin blocked: {:?}",
        t.elapsed()
    );

    let order: Vec<String> = vec![
        envoy.recv().await.nonce,
        envoy.recv().await.nonce,
        envoy.recv().await.nonce,
    ];
    assert_eq!(
        order,
        ["c1", "e1", "e2"],
        "CDS first; ECDS in the order sent"
    );
}

#[tokio::test]
async fn conversion_disabled_passes_ecds_through_untouched() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--wasm-conversion", "false"]).await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["x"]).await;
    let resp = ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            "x",
            "oci://example.invalid/x:1",
            &Remote::default(),
        )],
    );
    up.send(resp.clone());
    assert_eq!(envoy.recv().await.encode_to_vec(), resp.encode_to_vec());
}

#[tokio::test]
async fn restarted_agent_converts_from_cache_with_no_network() {
    let mut reg = Registry::plain().await;
    let w = module("restart");
    reg.push("wasm/r", "v1", &w, Layout::OciImage).await;
    let cache = tempfile::tempdir().unwrap();
    let url = reg.url("wasm/r:v1");
    let mut cp = ControlPlane::start().await;
    // The first agent fills the cache; the second runs with the registry stopped.
    let mut last: Option<Agent> = None;
    for run in 0..2 {
        if run == 1 {
            drop(last.take());
            reg.stop();
        }
        let agent = Agent::builder(&cp.url())
            .cache_dir(cache.path())
            .args(["--insecure-registries", &reg.addr.clone()])
            .start()
            .await;
        let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["r"]).await;
        up.send(ecds_resp(
            "v1",
            "n1",
            vec![ecds_remote("r", &url, &Remote::default())],
        ));
        let path = local_filename(&envoy.recv().await.resources[0]);
        assert_eq!(file_sha(&path), sha256_hex(&w), "run {run}");
        last = Some(agent);
    }
    let agent = last.expect("second agent");
    assert_eq!(
        agent
            .metric("istio_agent_wasm_cache_lookup_count", "hit=\"true\"")
            .await,
        1.0
    );
    assert_eq!(
        agent
            .metric("istio_agent_wasm_remote_fetch_count", "result=\"success\"")
            .await,
        0.0
    );
}

#[tokio::test]
async fn sigterm_during_a_download_exits_promptly() {
    let srv = ModuleServer::start().await;
    srv.set(
        "stuck.wasm",
        Route {
            body: module("stuck"),
            delay: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let mut cp = ControlPlane::start().await;
    // A long grace: exiting fast proves the agent waits for its streams, not for the grace timer.
    let mut agent = agent(&cp, &["--shutdown-grace", "10s"]).await;
    let (_envoy, up) = sotw_ecds(&agent, &mut cp, &["stuck"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            "stuck",
            &srv.url("stuck.wasm"),
            &Remote {
                timeout_secs: 60,
                ..Default::default()
            },
        )],
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(srv.hits("stuck.wasm"), 1, "download in progress");
    let (status, took) = agent.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn local_code_keeps_its_file_but_loses_the_pull_secret() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["file", "plain"]).await;
    let with_hints = res::ecds_local_env(
        "file",
        "/opt/wasm/f.wasm",
        &[
            (SECRET_ENV, "{\"auths\":{}}"),
            (VERSION_ENV, "4"),
            ("USER_VAR", "keep"),
        ],
    );
    let plain = ecds_local("plain", "/opt/wasm/p.wasm");
    up.send(ecds_resp("v1", "n1", vec![with_hints, plain.clone()]));
    let got = envoy.recv().await;
    assert_eq!(local_filename(&got.resources[0]), "/opt/wasm/f.wasm");
    assert_eq!(
        vm_env(&got.resources[0]).unwrap(),
        [("USER_VAR".to_string(), "keep".to_string())].into()
    );
    assert_eq!(got.resources[1], plain, "nothing to strip: byte-for-byte");
    assert_eq!(
        agent
            .metric(
                "istio_agent_wasm_config_conversion_count",
                "result=\"no_remote_load\""
            )
            .await,
        2.0
    );
}

/// Large responses that are not ECDS are relayed as they arrive (cut-through); a large ECDS
/// response must still be read whole and converted. Here the ECDS response is ~300 KiB (a big
/// plugin environment), over the relay threshold, and also a large CDS response passes on the
/// same stream before and after it.
#[tokio::test]
async fn a_large_ecds_response_is_still_converted_between_relayed_ones() {
    let srv = ModuleServer::start().await;
    let w = module("large-ecds");
    srv.put("big.wasm", w.clone());
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let name = "extensions.istio.io/wasmplugin/ns.big";
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &[name]).await;
    let big_value = "v".repeat(300 << 10);
    let cds = |nonce: &str| DiscoveryResponse {
        type_url: CDS.into(),
        nonce: nonce.into(),
        resources: (0..2000)
            .map(|i| res::cluster(&format!("c{i}-{}", "x".repeat(200))))
            .collect(),
        ..Default::default()
    };

    up.send(cds("cds1"));
    let got = envoy.recv().await;
    assert_eq!((got.nonce.as_str(), got.resources.len()), ("cds1", 2000));
    assert!(
        got.encode_to_vec().len() > 400 << 10,
        "large enough to be relayed"
    );

    let remote = ecds_remote(
        name,
        &srv.url("big.wasm"),
        &Remote {
            sha256: sha256_hex(&w),
            env: env(&[("BIG", &big_value)]),
            ..Default::default()
        },
    );
    let resp = ecds_resp("v1", "e1", vec![remote]);
    assert!(resp.encoded_len() > 300 << 10);
    up.send(resp);
    up.send(cds("cds2"));
    // The CDS response does not wait for the ECDS conversion: either may come first.
    let mut two = [envoy.recv().await, envoy.recv().await];
    two.sort_by(|a, b| a.nonce.cmp(&b.nonce));
    let [cds2, got] = two;
    assert_eq!((cds2.nonce.as_str(), cds2.resources.len()), ("cds2", 2000));
    assert_eq!((got.type_url.as_str(), got.nonce.as_str()), (ECDS, "e1"));
    let f = local_filename(&got.resources[0]);
    assert_eq!(file_sha(&f), sha256_hex(&w));
    assert_eq!(vm_env(&got.resources[0]).unwrap()["BIG"], big_value);
}
