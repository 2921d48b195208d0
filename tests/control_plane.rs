//! The control plane always knows what Envoy runs. The control plane here keeps, per stream,
//! what istiod's `ShouldRespond` keeps for ECDS: the nonce sent, the nonce acked, the last
//! error and the watched names (names of a NACK are ignored; an empty nonce is a new watch;
//! a stale nonce is ignored). Registry and module-server request counts come from their logs.

mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use support::registry::sha256_hex;
use support::res::{ecds_remote, local_filename, module, open_tec, Remote};
use support::xds::{ack, ecds_resp, sotw_ecds, CpSotw};
use support::{Agent, ControlPlane, Layout, ModuleServer, Registry};

/// istiod's view of one proxy's ECDS watch (`/debug/syncz`).
#[derive(Debug, Default)]
struct Syncz {
    sent: String,
    acked: Option<String>,
    last_error: Option<String>,
    names: Vec<String>,
    /// Requests that asked for a (re)push: a new watch, or an ACK that changed the names.
    wants_push: bool,
}

impl Syncz {
    /// One request from the agent, as istiod's `ShouldRespond` takes it.
    fn take(&mut self, r: &DiscoveryRequest) {
        if let Some(e) = &r.error_detail {
            self.last_error = Some(e.message.clone());
            return;
        }
        if r.response_nonce.is_empty() {
            // INIT: a fresh watch of these names, answered with a push.
            *self = Syncz {
                sent: self.sent.clone(),
                names: r.resource_names.clone(),
                wants_push: true,
                ..Default::default()
            };
            return;
        }
        if r.response_nonce != self.sent {
            return; // stale
        }
        self.acked = Some(r.response_nonce.clone());
        self.last_error = None;
        self.wants_push = r.resource_names != self.names;
        self.names = r.resource_names.clone();
    }

    fn push(&mut self, nonce: &str) {
        self.sent = nonce.to_owned();
        self.wants_push = false;
    }
}

/// Every request the agent sends within `d`, taken into `z`.
async fn drain(up: &mut CpSotw, z: &mut Syncz, d: Duration) -> Vec<DiscoveryRequest> {
    let mut got = vec![];
    while let Some(r) = up.try_recv(d).await {
        z.take(&r);
        got.push(r);
    }
    got
}

fn agent_args(cp: &ControlPlane) -> support::agent::AgentBuilder {
    Agent::builder(&cp.url()).args(["--retry-max-backoff", "1s", "--http-max-attempts", "1"])
}

/// Item 1: after self-healing, the control plane's record says Envoy accepted the resource.
#[tokio::test]
async fn after_healing_the_control_plane_sees_the_nacked_nonce_acked() {
    let srv = ModuleServer::start().await;
    let mut cp = ControlPlane::start().await;
    let agent = agent_args(&cp).start().await;
    let names = ["extensions.istio.io/wasmplugin/ns.late"];
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &names).await;
    let mut z = Syncz {
        names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    z.push("n1");
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            names[0],
            &srv.url("late.wasm"),
            &Remote::default(),
        )],
    ));
    let standin = envoy.recv().await;
    assert!(open_tec(&standin.resources[0]).1.type_url.ends_with("RBAC"));
    envoy.send(ack(&names, "v1", "n1"));
    drain(&mut up, &mut z, Duration::from_millis(300)).await;
    assert!(z.last_error.is_some() && z.acked.is_none(), "{z:?}");

    // The module appears; the agent delivers it without a push and Envoy accepts it.
    let w = module("late");
    srv.put("late.wasm", w.clone());
    let healed = envoy.recv().await;
    assert!(healed.nonce.starts_with("ecds-agent/"));
    assert_eq!(
        sha256_hex(&std::fs::read(local_filename(&healed.resources[0])).unwrap()),
        sha256_hex(&w)
    );
    envoy.send(ack(&names, "v1", &healed.nonce));
    drain(&mut up, &mut z, Duration::from_millis(500)).await;
    assert_eq!(z.acked.as_deref(), Some("n1"), "{z:?}");
    assert_eq!(z.last_error, None, "{z:?}");
}

/// Item 2: a subscription change while the latest nonce stands NACKed never turns that nonce
/// into an ACK; the new names still reach the control plane, which pushes them.
#[tokio::test]
async fn a_subscription_change_never_acks_a_nacked_nonce() {
    let srv = ModuleServer::start().await;
    srv.put("b.wasm", module("sub-b"));
    let mut cp = ControlPlane::start().await;
    let agent = agent_args(&cp).start().await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    let mut z = Syncz {
        names: vec!["a".into()],
        ..Default::default()
    };
    let bad = ecds_remote("a", &srv.url("missing.wasm"), &Remote::default());
    z.push("n1");
    up.send(ecds_resp("v1", "n1", vec![bad.clone()]));
    envoy.recv().await;
    // Envoy, holding the stand-in, now also subscribes to "b".
    envoy.send(ack(&["a", "b"], "v1", "n1"));
    let got = drain(&mut up, &mut z, Duration::from_millis(500)).await;
    assert!(
        got.iter()
            .all(|r| r.response_nonce != "n1" || r.error_detail.is_some()),
        "n1 was ACKed: {got:?}"
    );
    assert_eq!(z.acked, None, "{z:?}");
    assert_eq!(
        z.names,
        ["a", "b"],
        "the new names reached the control plane"
    );
    assert!(z.wants_push, "{z:?}");
    // istiod pushes the watched names: "a" still fails, "b" is delivered.
    z.push("n2");
    up.send(ecds_resp(
        "v2",
        "n2",
        vec![
            bad,
            ecds_remote("b", &srv.url("b.wasm"), &Remote::default()),
        ],
    ));
    let got = envoy.recv().await;
    assert_eq!(got.resources.len(), 2);
    local_filename(&got.resources[1]);
    envoy.send(ack(&["a", "b"], "v2", "n2"));
    drain(&mut up, &mut z, Duration::from_millis(500)).await;
    assert_eq!(z.acked, None, "{z:?}");
    assert!(z.last_error.is_some(), "{z:?}");
}

/// Items 5 and 6: a resource Envoy unsubscribes from (a deleted WasmPlugin: istiod sends no
/// removal) loses its pin, so the module expires, and its retry stops; a fixed plugin is no
/// longer shown as failing.
#[tokio::test]
async fn an_unsubscribed_resource_is_unpinned_and_a_fixed_one_is_not_shown_failing() {
    let srv = ModuleServer::start().await;
    let w = module("deleted");
    srv.put("m.wasm", w.clone());
    let mut cp = ControlPlane::start().await;
    let agent = agent_args(&cp)
        .args(["--module-expiry", "2s", "--purge-interval", "1s"])
        .start()
        .await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["p", "q"]).await;
    let wrong = Remote {
        sha256: "0".repeat(64),
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![
            ecds_remote("p", &srv.url("m.wasm"), &Remote::default()),
            ecds_remote("q", &srv.url("m.wasm"), &wrong),
        ],
    ));
    let got = envoy.recv().await;
    let path = local_filename(&got.resources[0]);
    envoy.send(ack(&["p", "q"], "v1", "n1"));
    let (_, body) = agent.get("/debug/wasm").await;
    assert!(body.contains("\"q\""), "q's failure is shown: {body}");

    // q is fixed (same URL, no sha256): delivered, and its failure is gone at once.
    up.send(ecds_resp(
        "v2",
        "n2",
        vec![
            ecds_remote("p", &srv.url("m.wasm"), &Remote::default()),
            ecds_remote("q", &srv.url("m.wasm"), &Remote::default()),
        ],
    ));
    envoy.recv().await;
    envoy.send(ack(&["p", "q"], "v2", "n2"));
    let (_, body) = agent.get("/debug/wasm").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["failures"], serde_json::json!({}), "{body}");

    // The plugins are deleted: Envoy unsubscribes. The module leaves the cache after expiry.
    envoy.send(ack(&[], "v2", "n2"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&path).exists() {
        assert!(
            Instant::now() < deadline,
            "still pinned after unsubscribe:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = agent.get("/debug/wasm").await;
    assert!(!body.contains("\"p (stream"), "{body}");
}

/// Items 3 and 4: a permanently bad resource (wrong sha256 on an unchanged OCI image) pulls
/// the blob once; rechecks look at the manifest only, at the recheck interval; they stop when
/// Envoy unsubscribes.
#[tokio::test]
async fn a_permanently_bad_resource_costs_a_manifest_per_recheck_and_no_blob() {
    let reg = Registry::plain().await;
    reg.push("bad/sha", "v1", &module("bad-sha"), Layout::Docker)
        .await;
    let mut cp = ControlPlane::start().await;
    let agent = agent_args(&cp)
        .args(["--insecure-registries", &reg.addr])
        .args(["--permanent-recheck-interval", "2s"])
        .start()
        .await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["bad"]).await;
    let wrong = Remote {
        sha256: "1".repeat(64),
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("bad", &reg.url("bad/sha:v1"), &wrong)],
    ));
    assert!(up.recv().await.error_detail.is_some());
    envoy.recv().await;
    let (m0, b0) = (reg.manifest_gets("bad/sha"), reg.blob_gets("bad/sha"));
    assert_eq!(b0, 1, "one download to learn the module's sha256");
    tokio::time::sleep(Duration::from_millis(7000)).await;
    let (m1, b1) = (reg.manifest_gets("bad/sha"), reg.blob_gets("bad/sha"));
    assert_eq!(b1, 1, "rechecks pull no blob:\n{}", agent.log_text());
    // 2 s ± 20 % over 7 s: 2 to 4 rechecks, one manifest GET each (not 1 s doubling).
    assert!(
        (2..=4).contains(&(m1 - m0)),
        "{} manifest GETs in 7 s:\n{}",
        m1 - m0,
        agent.log_text()
    );
    // Envoy drops the resource: the rechecks stop.
    envoy.send(ack(&[], "v1", "n1"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m2 = reg.manifest_gets("bad/sha");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(reg.manifest_gets("bad/sha"), m2, "{}", agent.log_text());
}

/// Item 8: a token file is read again for every new upstream stream.
#[tokio::test]
async fn the_token_file_is_read_for_every_new_stream() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "first-token\n").unwrap();
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .args(["--upstream-token-file", token.to_str().unwrap()])
        .start()
        .await;
    let (_e1, up1) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    assert_eq!(
        up1.metadata.get("authorization").unwrap(),
        "Bearer first-token"
    );
    std::fs::write(&token, "second-token").unwrap();
    let (_e2, up2) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    assert_eq!(
        up2.metadata.get("authorization").unwrap(),
        "Bearer second-token"
    );
    assert!(!agent.log_text().contains("second-token"));
}

/// The closing note's figure, by hand (`cargo test --features demo --test control_plane --
/// --ignored --nocapture`): registry requests over `MEASURE_SECS` (default 70) of a permanently
/// bad resource (wrong sha256 on an unchanged image) with the default recheck interval.
#[tokio::test]
#[ignore]
async fn measure_registry_requests_of_a_bad_resource_with_defaults() {
    let secs: u64 = std::env::var("MEASURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(70);
    let reg = Registry::plain().await;
    reg.push("bad/m", "v1", &module("measure"), Layout::Docker)
        .await;
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .args(["--insecure-registries", &reg.addr])
        .start()
        .await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["bad"]).await;
    let wrong = Remote {
        sha256: "1".repeat(64),
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("bad", &reg.url("bad/m:v1"), &wrong)],
    ));
    envoy.recv().await;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let log = reg.log_text();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    println!(
        "over {secs} s: {} blob GETs, {} manifest GETs, {} requests in all",
        reg.blob_gets("bad/m"),
        reg.manifest_gets("bad/m"),
        count("\"GET /v2/") + count("\"HEAD /v2/")
    );
}
