//! xDS protocol correctness through the real binary, against values and peers the agent did
//! not write: absurd durations, TTL heartbeats, subscription changes during a conversion,
//! Envoy's own NACKs, reconnects to a control plane that honours resource versions, message
//! caps, superseded pushes, stream caps, accept failures and rotated certificates.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use support::res::{cluster, ecds_remote, local_filename, module, open_tec, Remote, CDS, ECDS};
use support::xds::{ack, connect_tcp, ecds_resp, open_delta, open_sotw, sotw_ecds};
use support::{free_port, Agent, ControlPlane, ModuleServer, Route};

const RESOURCE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";
const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

async fn agent(cp: &ControlPlane, extra: &[&str]) -> Agent {
    Agent::builder(&cp.url())
        .args(["--retry-max-backoff", "2s"])
        .args(extra.iter().copied())
        .start()
        .await
}

fn nack(names: &[&str], version: &str, nonce: &str, why: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: why.into(),
            details: vec![],
        }),
        ..ack(names, version, nonce)
    }
}

fn names(r: &DiscoveryRequest) -> Vec<&str> {
    r.resource_names.iter().map(String::as_str).collect()
}

fn ttl(seconds: i64) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos: 0 })
}

#[tokio::test]
async fn an_absurd_http_uri_timeout_is_clamped_not_a_panic() {
    let srv = ModuleServer::start().await;
    srv.put("m.wasm", module("absurd"));
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    let o = Remote {
        timeout_secs: i64::MAX,
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("a", &srv.url("m.wasm"), &o)],
    ));
    let got = envoy.recv().await;
    assert!(local_filename(&got.resources[0]).ends_with(".wasm"));
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn an_absurd_flag_duration_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(support::agent::BIN)
        .args([
            "fetch",
            "http://127.0.0.1:1/m.wasm",
            "--timeout",
            "300000000000y",
        ])
        .arg("--cache-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--timeout") && err.contains("too long"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn delta_ttl_heartbeats_pass_untouched_and_ttl_resources_convert() {
    let srv = ModuleServer::start().await;
    srv.put("t.wasm", module("ttl-delta"));
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        resource_names_subscribe: vec!["hb".into(), "t".into()],
        ..Default::default()
    });
    let mut up = cp.next_delta().await;
    up.recv().await;
    let heartbeat = Resource {
        name: "hb".into(),
        version: "v7".into(),
        ttl: ttl(30),
        ..Default::default()
    };
    let with_body = Resource {
        name: "t".into(),
        version: "v8".into(),
        ttl: ttl(30),
        resource: Some(ecds_remote("t", &srv.url("t.wasm"), &Remote::default())),
        ..Default::default()
    };
    up.send(DeltaDiscoveryResponse {
        type_url: ECDS.into(),
        nonce: "d1".into(),
        system_version_info: "s1".into(),
        resources: vec![heartbeat.clone(), with_body],
        ..Default::default()
    });
    let got = envoy.recv().await;
    assert_eq!(got.resources[0], heartbeat, "heartbeat untouched");
    let t = &got.resources[1];
    assert_eq!(
        (t.name.as_str(), t.version.as_str(), t.ttl),
        ("t", "v8", ttl(30))
    );
    assert!(local_filename(t.resource.as_ref().unwrap()).ends_with(".wasm"));
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        response_nonce: "d1".into(),
        ..Default::default()
    });
    let reply = up.recv().await;
    assert_eq!(reply.response_nonce, "d1");
    assert!(reply.error_detail.is_none(), "no NACK: {reply:?}");
}

#[tokio::test]
async fn sotw_ttl_wrappers_pass_when_empty_and_convert_with_their_ttl() {
    let srv = ModuleServer::start().await;
    srv.put("t.wasm", module("ttl-sotw"));
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["hb", "t"]).await;
    let wrap = |r: Resource| Any {
        type_url: RESOURCE.into(),
        value: r.encode_to_vec(),
    };
    let heartbeat = wrap(Resource {
        name: "hb".into(),
        version: "v1".into(),
        ttl: ttl(20),
        ..Default::default()
    });
    let with_body = wrap(Resource {
        name: "t".into(),
        version: "v1".into(),
        ttl: ttl(20),
        resource: Some(ecds_remote("t", &srv.url("t.wasm"), &Remote::default())),
        ..Default::default()
    });
    up.send(ecds_resp("v1", "n1", vec![heartbeat.clone(), with_body]));
    let got = envoy.recv().await;
    assert_eq!(got.resources[0], heartbeat, "heartbeat untouched");
    assert_eq!(got.resources[1].type_url, RESOURCE);
    let t = Resource::decode(got.resources[1].value.as_slice()).unwrap();
    assert_eq!((t.name.as_str(), t.ttl), ("t", ttl(20)));
    assert!(local_filename(t.resource.as_ref().unwrap()).ends_with(".wasm"));
    envoy.send(ack(&["hb", "t"], "v1", "n1"));
    let reply = up.recv().await;
    assert_eq!(reply.response_nonce, "n1");
    assert!(reply.error_detail.is_none(), "no NACK: {reply:?}");
}

/// A module server with `good.wasm` and the same module at `stalled`, answered after `delay`.
async fn good_and_stalled(tag: &str, stalled: &str, delay: Duration) -> ModuleServer {
    let srv = ModuleServer::start().await;
    let w = module(tag);
    srv.put("good.wasm", w.clone());
    srv.set(
        stalled,
        Route {
            body: w,
            delay,
            ..Default::default()
        },
    );
    srv
}

#[tokio::test]
async fn a_sotw_subscription_change_during_a_failing_conversion_reaches_upstream() {
    let srv = good_and_stalled("sub", "slow.wasm", Duration::from_secs(60)).await;
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    up.send(ecds_resp(
        "v0",
        "n0",
        vec![ecds_remote("a", &srv.url("good.wasm"), &Remote::default())],
    ));
    envoy.recv().await;
    envoy.send(ack(&["a"], "v0", "n0"));
    assert_eq!(up.recv().await.response_nonce, "n0");

    // n1 converts slowly and then fails; meanwhile Envoy (still at n0) subscribes to "b" too.
    let slow = Remote {
        timeout_secs: 2,
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("a", &srv.url("slow.wasm"), &slow)],
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    envoy.send(ack(&["a", "b"], "v0", "n0"));
    let stale = up.recv().await;
    assert_eq!(
        (stale.response_nonce.as_str(), names(&stale)),
        ("n0", vec!["a", "b"])
    );
    let agent_nack = up.recv().await;
    assert_eq!(agent_nack.response_nonce, "n1");
    assert!(agent_nack.error_detail.is_some());
    let standin = envoy.recv().await;
    assert_eq!(standin.nonce, "n1");
    // Envoy's ACK of n1 carries the new names: the control plane must hear them, but not as an
    // ACK of n1, which Envoy did not get: a new watch (no nonce, no version), which istiod
    // answers with a push of the names (its INIT path).
    envoy.send(ack(&["a", "b"], "v1", "n1"));
    let sub = up.recv().await;
    assert_eq!(
        (sub.response_nonce.as_str(), names(&sub)),
        ("", vec!["a", "b"])
    );
    assert!(sub.error_detail.is_none(), "{sub:?}");
    assert!(sub.version_info.is_empty(), "{sub:?}");
}

#[tokio::test]
async fn envoy_rejecting_a_stand_in_is_counted_and_shown() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    let dead = Remote {
        timeout_secs: 1,
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("a", "http://127.0.0.1:1/m.wasm", &dead)],
    ));
    assert!(up.recv().await.error_detail.is_some(), "agent NACK");
    let got = envoy.recv().await;
    assert_eq!(open_tec(&got.resources[0]).1.type_url, HTTP_RBAC);
    envoy.send(nack(&["a"], "", "n1", "Envoy says: RBAC rejected"));
    // n1 already has the agent's NACK: nothing more goes up, but the rejection is visible.
    assert!(up.try_recv(Duration::from_millis(500)).await.is_none());
    assert_eq!(
        agent
            .metric("ecds_agent_envoy_rejections", "reason=\"stand_in\"")
            .await,
        1.0
    );
    let (_, debug) = agent.get("/debug/wasm").await;
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    let r = &v["envoy_rejections"][0];
    assert_eq!(
        (r["nonce"].as_str(), r["reason"].as_str()),
        (Some("n1"), Some("stand_in"))
    );
    assert!(r["message"].as_str().unwrap().contains("RBAC rejected"));
}

#[tokio::test]
async fn a_delta_reconnect_ends_with_the_real_module_not_the_stand_in() {
    let srv = ModuleServer::start().await;
    let w = module("reconnect");
    srv.set(
        "m.wasm",
        Route {
            body: w.clone(),
            fail_first: usize::MAX,
            fail_status: 404,
            ..Default::default()
        },
    );
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let resource = Resource {
        name: "a".into(),
        version: "v1".into(),
        resource: Some(ecds_remote("a", &srv.url("m.wasm"), &Remote::default())),
        ..Default::default()
    };
    // A control plane that honours initial_resource_versions (as go-control-plane does).
    let serve = |req: &DeltaDiscoveryRequest| {
        req.initial_resource_versions.get("a").map(String::as_str) != Some("v1")
    };

    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        resource_names_subscribe: vec!["a".into()],
        ..Default::default()
    });
    let mut up = cp.next_delta().await;
    assert!(serve(&up.recv().await));
    up.send(DeltaDiscoveryResponse {
        type_url: ECDS.into(),
        nonce: "d1".into(),
        resources: vec![resource.clone()],
        ..Default::default()
    });
    let got = envoy.recv().await;
    assert_eq!(
        open_tec(got.resources[0].resource.as_ref().unwrap())
            .1
            .type_url,
        HTTP_RBAC
    );
    drop(envoy);
    drop(up);

    // The module appears; Envoy reconnects saying it holds "a" at v1 (the stand-in).
    srv.put("m.wasm", w);
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: ECDS.into(),
        resource_names_subscribe: vec!["a".into()],
        initial_resource_versions: HashMap::from([("a".to_string(), "v1".to_string())]),
        ..Default::default()
    });
    let mut up = cp.next_delta().await;
    let first = up.recv().await;
    assert!(first.initial_resource_versions.is_empty(), "{first:?}");
    assert!(serve(&first));
    up.send(DeltaDiscoveryResponse {
        type_url: ECDS.into(),
        nonce: "d2".into(),
        resources: vec![resource],
        ..Default::default()
    });
    let got = envoy.recv().await;
    assert!(local_filename(got.resources[0].resource.as_ref().unwrap()).ends_with(".wasm"));
}

/// A SotW server in the style of go-control-plane: it answers a request only when the version
/// Envoy reports differs from its own, and serves wildcard (empty-name) LDS.
#[tokio::test]
async fn a_sotw_reconnect_to_a_resend_on_version_change_server_ends_with_the_real_module() {
    let srv = ModuleServer::start().await;
    let w = module("sotw-reconnect");
    srv.set(
        "m.wasm",
        Route {
            body: w.clone(),
            fail_first: usize::MAX,
            fail_status: 404,
            ..Default::default()
        },
    );
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let resource = ecds_remote("a", &srv.url("m.wasm"), &Remote::default());
    // The server's rule: respond only when the version Envoy reports is not the current one.
    let answers = |req: &DiscoveryRequest| req.version_info != "v1";

    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    up.send(ecds_resp("v1", "n1", vec![resource.clone()]));
    let got = envoy.recv().await;
    assert_eq!(
        open_tec(&got.resources[0]).1.type_url,
        HTTP_RBAC,
        "stand-in"
    );
    envoy.send(ack(&["a"], "v1", "n1")); // Envoy accepted v1: it holds the stand-in
    drop(envoy);
    drop(up);

    // The module appears; Envoy reconnects saying it has ECDS v1, and LDS (wildcard) at l7.
    srv.put("m.wasm", w);
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        version_info: "l7".into(),
        ..Default::default()
    });
    envoy.send(ack(&["a"], "v1", ""));
    let mut up = cp.next_sotw().await;
    let lds = up.recv().await;
    assert_eq!(lds.version_info, "l7", "other types keep their version");
    assert!(lds.resource_names.is_empty(), "wildcard stays wildcard");
    let ecds = up.recv().await;
    assert_eq!(ecds.version_info, "", "{ecds:?}");
    assert!(answers(&ecds));
    up.send(ecds_resp("v1", "n2", vec![resource]));
    let got = envoy.recv().await;
    assert!(local_filename(&got.resources[0]).ends_with(".wasm"));
}

#[tokio::test]
async fn an_oversized_request_ends_only_its_stream_with_resource_exhausted() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--max-request-bytes", "1048576"]).await;
    let mut client = connect_tcp(&agent.listen).await;
    let other = open_sotw(&mut client, &[]).await;
    other.send(DiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    let mut other_up = cp.next_sotw().await;
    other_up.recv().await;
    let mut big = open_sotw(&mut client, &[]).await;
    big.send(DiscoveryRequest {
        type_url: CDS.into(),
        resource_names: vec!["x".repeat(2 << 20)],
        ..Default::default()
    });
    let status = big.expect_status().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-request-bytes"),
        "{status:?}"
    );
    // The other stream is unaffected.
    other.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: "again".into(),
        ..Default::default()
    });
    assert_eq!(other_up.recv().await.response_nonce, "again");
}

#[tokio::test]
async fn an_oversized_response_ends_the_stream_with_resource_exhausted() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--max-response-bytes", "1048576"]).await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    let mut up = cp.next_sotw().await;
    up.recv().await;
    up.send(DiscoveryResponse {
        type_url: CDS.into(),
        nonce: "c1".into(),
        resources: vec![cluster(&"c".repeat(2 << 20))],
        ..Default::default()
    });
    let status = envoy.expect_status().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-response-bytes"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_newer_push_abandons_a_stalled_conversion() {
    let srv = good_and_stalled("newer", "stall.wasm", Duration::from_secs(120)).await;
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    let stalled = Remote {
        timeout_secs: 60,
        ..Default::default()
    };
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("a", &srv.url("stall.wasm"), &stalled)],
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    up.send(ecds_resp(
        "v2",
        "n2",
        vec![ecds_remote("a", &srv.url("good.wasm"), &Remote::default())],
    ));
    // Well inside n1's 60 s timeout (recv waits 15 s at most): n2 arrives, n1 never does.
    let got = envoy.recv().await;
    assert_eq!(got.nonce, "n2");
    assert!(local_filename(&got.resources[0]).ends_with(".wasm"));
    envoy.send(ack(&["a"], "v2", "n2"));
    let reply = up.recv().await;
    assert_eq!(
        reply.response_nonce, "n2",
        "no NACK of the abandoned n1: {reply:?}"
    );
    assert!(agent.metric("ecds_agent_ecds_superseded", "").await >= 1.0);
}

#[tokio::test]
async fn past_max_streams_the_oldest_stream_ends() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--max-streams", "1"]).await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut old = open_sotw(&mut client, &[]).await;
    old.send(DiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    // Keep the old stream's upstream open: only the stream cap may end it.
    let mut old_up = cp.next_sotw().await;
    old_up.recv().await;
    let new = open_sotw(&mut client, &[]).await;
    new.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: "new".into(),
        ..Default::default()
    });
    let status = old.expect_status().await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("--max-streams 1"), "{status:?}");
    let mut up = cp.next_sotw().await;
    assert_eq!(up.recv().await.response_nonce, "new");
    drop(old_up);
}

/// CPU time (user + system, clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn accept_failures_back_off_instead_of_spinning() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &[]).await;
    let pid = agent.pid().to_string();
    let prlimit = |args: &[&str]| {
        let out = Command::new("prlimit")
            .args(["--pid", &pid])
            .args(args)
            .output()
            .expect("prlimit (util-linux)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // Only the soft limit moves: raising a hard limit again needs a capability.
    let soft = prlimit(&["--nofile", "--output", "SOFT", "--noheadings"]);
    prlimit(&["--nofile=40:"]);
    // More connections than the agent has descriptors for: accept fails with EMFILE.
    let mut conns = vec![];
    for _ in 0..60 {
        if let Ok(c) = tokio::net::TcpStream::connect(&agent.listen).await {
            conns.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(agent.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(agent.pid()) - before;
    assert!(
        spent < 40,
        "agent burnt {spent} ticks in 2 s while accept failed"
    );
    drop(conns);
    prlimit(&[&format!("--nofile={soft}:")]);
    // It serves again.
    let mut client = connect_tcp(&agent.listen).await;
    let envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: "after".into(),
        ..Default::default()
    });
    assert_eq!(cp.next_sotw().await.recv().await.response_nonce, "after");
}

/// A CA with a server (127.0.0.1) and a client certificate, made with openssl in `dir`.
struct MiniPki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn openssl(args: &[&str], paths: &[&Path]) {
    let mut c = Command::new("openssl");
    c.args(args);
    for p in paths {
        c.arg(p);
    }
    let out = c.output().expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mini_pki(dir: &Path, tag: &str) -> MiniPki {
    let p = |n: &str| dir.join(format!("{tag}-{n}"));
    let (ca, ca_key) = (p("ca.crt"), p("ca.key"));
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=ca-{tag}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            ca_key.to_str().unwrap(),
            "-out",
        ],
        &[&ca],
    );
    let leaf = |name: &str, eku: &str| {
        let (crt, key, csr, ext) = (
            p(&format!("{name}.crt")),
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.ext")),
        );
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}-{tag}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
            ],
            &[&csr],
        );
        std::fs::write(&ext, format!("basicConstraints=critical,CA:FALSE\nextendedKeyUsage={eku}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")).unwrap();
        openssl(
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-CAcreateserial",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                ca.to_str().unwrap(),
                "-CAkey",
                ca_key.to_str().unwrap(),
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
            ],
            &[&crt],
        );
        (crt, key)
    };
    MiniPki {
        server: leaf("server", "serverAuth"),
        client: leaf("client", "clientAuth"),
        ca,
    }
}

/// Whether a new Envoy stream through the agent reaches `cp`.
async fn round_trip(listen: &str, cp: &mut ControlPlane, nonce: &str) -> bool {
    let mut client = connect_tcp(listen).await;
    let envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    });
    match cp.stream_within(Duration::from_secs(5)).await {
        Some(support::CpStream::Sotw(mut up)) => up.recv().await.response_nonce == nonce,
        _ => false,
    }
}

#[tokio::test]
async fn rotated_upstream_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (mini_pki(dir.path(), "one"), mini_pki(dir.path(), "two"));
    // The files the agent is pointed at; rotation replaces them as cert-manager does.
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
    );
    let install = |p: &MiniPki| {
        for (from, to) in [(&p.ca, &ca), (&p.client.0, &cert), (&p.client.1, &key)] {
            let tmp = to.with_extension("new");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    };
    install(&one);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cp = ControlPlane::start_mtls_files(addr, &one.server.0, &one.server.1, &one.ca).await;
    let agent = Agent::builder(&format!("https://{addr}"))
        .args([
            "--upstream-ca",
            ca.to_str().unwrap(),
            "--client-cert",
            cert.to_str().unwrap(),
            "--client-key",
            key.to_str().unwrap(),
        ])
        .start()
        .await;
    assert!(
        round_trip(&agent.listen, &mut cp, "one").await,
        "first PKI works"
    );
    // Rotation: a new CA and client certificate that only the restarted control plane accepts.
    install(&two);
    cp.stop().await;
    let mut cp = ControlPlane::start_mtls_files(addr, &two.server.0, &two.server.1, &two.ca).await;
    assert!(
        round_trip(&agent.listen, &mut cp, "two").await,
        "new files used without a restart:\n{}",
        agent.log_text()
    );
}

#[tokio::test]
async fn the_nack_error_detail_stays_under_4_kib() {
    let mut cp = ControlPlane::start().await;
    let agent = agent(&cp, &["--fetch-failure", "nack-only"]).await;
    let names: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_envoy, mut up) = sotw_ecds(&agent, &mut cp, &refs).await;
    let dead = Remote {
        timeout_secs: 1,
        ..Default::default()
    };
    let long = format!("http://127.0.0.1:1/{}.wasm", "x".repeat(300));
    up.send(ecds_resp(
        "v1",
        "n1",
        names.iter().map(|n| ecds_remote(n, &long, &dead)).collect(),
    ));
    let nack = up.recv().await;
    let msg = nack.error_detail.expect("NACK").message;
    assert!(msg.len() < 4096, "{} bytes", msg.len());
    assert!(
        msg.starts_with("ecds-agent: 40 of 40 ECDS resource(s) not converted"),
        "{msg}"
    );
    assert!(
        msg.contains("more (see the agent log and /debug/wasm)"),
        "{msg}"
    );
}
