//! The transparent ADS proxy, tested through the real binary: a test control plane upstream, a
//! test Envoy client downstream, real gRPC over TCP and Unix sockets.

mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use support::res::{cluster, listener, CDS, EDS, LDS, RDS};
use support::xds::{connect_tcp, connect_uds, open_delta, open_sotw, AdsClient};
use support::{Agent, ControlPlane};

fn sotw_req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(Node {
            id: "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: None,
        ..Default::default()
    }
}

/// Opens a SotW stream, sends an LDS request, answers it upstream and checks it arrives.
async fn lds_round_trip(client: &mut support::xds::AdsClient, cp: &mut ControlPlane, nonce: &str) {
    let mut envoy = open_sotw(client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let mut up = cp.next_sotw().await;
    up.recv().await;
    up.send(DiscoveryResponse {
        type_url: LDS.into(),
        nonce: nonce.into(),
        ..Default::default()
    });
    assert_eq!(envoy.recv().await.nonce, nonce);
}

fn opaque(type_url: &str, n: usize) -> Any {
    // Not decodable as the named type on purpose: the proxy must not look inside.
    Any {
        type_url: type_url.into(),
        value: (0..n).map(|i| (i % 251) as u8).collect(),
    }
}

#[tokio::test]
async fn sotw_round_trips_every_type_unchanged_with_metadata() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(
        &mut client,
        &[("x-envoy-test", "hello"), ("clusterid", "Kubernetes")],
    )
    .await;

    let first = sotw_req(LDS, &[], "", "");
    envoy.send(first.clone());
    let mut up = cp.next_sotw().await;
    assert_eq!(
        up.metadata.get("x-envoy-test").unwrap(),
        "hello",
        "gRPC metadata carried upstream"
    );
    assert_eq!(up.metadata.get("clusterid").unwrap(), "Kubernetes");
    assert_eq!(up.recv().await, first);

    for (i, (t, res)) in [
        (LDS, vec![listener("l1"), listener("l2")]),
        (CDS, vec![cluster("c1")]),
        (RDS, vec![opaque(RDS, 300)]),
        (EDS, vec![opaque(EDS, 50), opaque(EDS, 0)]),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            let req = sotw_req(t, &["a", "b"], "", "");
            envoy.send(req.clone());
            assert_eq!(up.recv().await, req);
        }
        let resp = DiscoveryResponse {
            version_info: format!("v{i}"),
            resources: res,
            type_url: t.into(),
            nonce: format!("nonce-{i}"),
            ..Default::default()
        };
        up.send(resp.clone());
        let got = envoy.recv().await;
        assert_eq!(
            got.encode_to_vec(),
            resp.encode_to_vec(),
            "{t} response byte-for-byte"
        );
        // ACK, then a NACK, both reach upstream unchanged.
        let ack = sotw_req(t, &["a"], &format!("v{i}"), &format!("nonce-{i}"));
        envoy.send(ack.clone());
        assert_eq!(up.recv().await, ack);
        let mut nack = sotw_req(t, &["a"], "", &format!("nonce-{i}"));
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad config".into(),
            details: vec![],
        });
        envoy.send(nack.clone());
        assert_eq!(up.recv().await, nack);
    }
    let text = agent.metrics().await;
    // 1 initial + 3 subscriptions + 4 × (ACK + NACK) requests; 4 responses.
    assert_eq!(
        support::metric_value(&text, "istio_agent_xds_proxy_requests", ""),
        12.0,
        "{text}"
    );
    assert_eq!(
        support::metric_value(&text, "istio_agent_xds_proxy_responses", ""),
        4.0,
        "{text}"
    );
}

#[tokio::test]
async fn delta_round_trips_unchanged() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_delta(&mut client).await;
    let sub = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "n".into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        resource_names_subscribe: vec!["x".into(), "y".into()],
        initial_resource_versions: [("x".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    envoy.send(sub.clone());
    let mut up = cp.next_delta().await;
    assert_eq!(up.recv().await, sub);
    for (j, t) in [CDS, LDS, RDS, EDS].into_iter().enumerate() {
        if j > 0 {
            let s = DeltaDiscoveryRequest {
                type_url: t.into(),
                resource_names_subscribe: vec!["z".into()],
                ..Default::default()
            };
            envoy.send(s.clone());
            assert_eq!(up.recv().await, s);
        }
        let resp = DeltaDiscoveryResponse {
            system_version_info: format!("sys{j}"),
            resources: vec![Resource {
                name: "x".into(),
                version: "7".into(),
                aliases: vec!["alias-x".into()],
                resource: Some(opaque(t, 100 + j)),
                ..Default::default()
            }],
            type_url: t.into(),
            removed_resources: vec!["gone".into()],
            nonce: format!("d{j}"),
            ..Default::default()
        };
        up.send(resp.clone());
        assert_eq!(envoy.recv().await.encode_to_vec(), resp.encode_to_vec());
        let ack = DeltaDiscoveryRequest {
            type_url: t.into(),
            response_nonce: format!("d{j}"),
            ..Default::default()
        };
        envoy.send(ack.clone());
        assert_eq!(up.recv().await, ack);
        let nack = DeltaDiscoveryRequest {
            type_url: t.into(),
            response_nonce: format!("d{j}"),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "no".into(),
                details: vec![],
            }),
            ..Default::default()
        };
        envoy.send(nack.clone());
        assert_eq!(up.recv().await, nack);
    }
}

#[tokio::test]
async fn three_streams_stay_independent() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut envoys = Vec::new();
    let mut ups = Vec::new();
    for i in 0..3 {
        let mut client = connect_tcp(&agent.listen).await;
        let e = open_sotw(&mut client, &[]).await;
        e.send(sotw_req(LDS, &[], "", &format!("hello-{i}")));
        let mut up = cp.next_sotw().await;
        assert_eq!(up.recv().await.response_nonce, format!("hello-{i}"));
        envoys.push((client, e));
        ups.push(up);
    }
    // Answer in reverse order; each Envoy gets only its own.
    for i in (0..3).rev() {
        ups[i].send(DiscoveryResponse {
            type_url: LDS.into(),
            nonce: format!("for-{i}"),
            resources: vec![listener(&format!("l{i}"))],
            ..Default::default()
        });
    }
    for (i, (_, e)) in envoys.iter_mut().enumerate() {
        assert_eq!(e.recv().await.nonce, format!("for-{i}"));
        assert!(e.try_recv(Duration::from_millis(200)).await.is_none());
    }
    // Ending one stream leaves the others working.
    let (_, dead) = envoys.remove(0);
    drop(dead);
    assert!(
        ups[0].try_recv(Duration::from_secs(5)).await.is_none(),
        "upstream of the closed stream ends"
    );
    for (i, (_, e)) in envoys.iter_mut().enumerate() {
        e.send(sotw_req(CDS, &[], "", ""));
        assert_eq!(ups[i + 1].recv().await.type_url, CDS);
    }
}

#[tokio::test]
async fn upstream_failure_ends_envoy_stream_with_matching_status_and_reconnect_works() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;

    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let up = cp.next_sotw().await;
    up.fail(tonic::Status::permission_denied("you shall not pass"));
    let status = envoy.expect_status().await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("you shall not pass"),
        "{}",
        status.message()
    );

    // Upstream closes cleanly: Envoy gets UNAVAILABLE (so it reconnects).
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let up = cp.next_sotw().await;
    drop(up);
    assert_eq!(envoy.expect_status().await.code(), tonic::Code::Unavailable);

    // Reconnect works; the agent is still up.
    lds_round_trip(&mut client, &mut cp, "after").await;
    assert!(
        agent
            .metric(
                "istio_agent_envoy_connection_terminations",
                "type=\"upstream_closed\""
            )
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn upstream_restart_mid_stream() {
    let mut cp = ControlPlane::start().await;
    let addr = cp.addr;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    let up = cp.next_delta().await;
    up.fail(tonic::Status::unavailable("istiod restarting"));
    drop(up);
    cp.stop().await;
    assert_eq!(envoy.expect_status().await.code(), tonic::Code::Unavailable);

    // While it is down, Envoy's retries fail with UNAVAILABLE, the agent stays up.
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    assert_eq!(envoy.expect_status().await.code(), tonic::Code::Unavailable);

    let mut cp = ControlPlane::start_on(addr).await;
    let mut envoy = open_delta(&mut client).await;
    envoy.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    let mut up = cp.next_delta().await;
    assert_eq!(up.recv().await.type_url, CDS);
    up.send(DeltaDiscoveryResponse {
        type_url: CDS.into(),
        nonce: "back".into(),
        ..Default::default()
    });
    assert_eq!(envoy.recv().await.nonce, "back");
}

#[tokio::test]
async fn upstream_absent_at_start_then_appears() {
    let port = support::free_port();
    let agent = Agent::builder(&format!("http://127.0.0.1:{port}"))
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let st = envoy.expect_status().await;
    assert_eq!(st.code(), tonic::Code::Unavailable);
    assert!(st.message().contains("unreachable"), "{}", st.message());
    assert!(
        agent
            .metric("istio_agent_istiod_connection_failures", "")
            .await
            >= 1.0
    );

    let mut cp = ControlPlane::start_on(format!("127.0.0.1:{port}").parse().unwrap()).await;
    lds_round_trip(&mut client, &mut cp, "1").await;
}

#[tokio::test]
async fn envoy_close_and_reopen() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    for round in 0..3 {
        let mut envoy = open_sotw(&mut client, &[]).await;
        envoy.send(sotw_req(CDS, &[], "", &format!("r{round}")));
        let mut up = cp.next_sotw().await;
        assert_eq!(up.recv().await.response_nonce, format!("r{round}"));
        up.send(DiscoveryResponse {
            type_url: CDS.into(),
            nonce: format!("n{round}"),
            ..Default::default()
        });
        assert_eq!(envoy.recv().await.nonce, format!("n{round}"));
        drop(envoy);
        assert!(
            up.try_recv(Duration::from_secs(5)).await.is_none(),
            "upstream stream ends with Envoy's"
        );
    }
    // A whole new connection too.
    let mut client = connect_tcp(&agent.listen).await;
    let envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(CDS, &[], "", ""));
    cp.next_sotw().await.recv().await;
}

#[tokio::test]
async fn burst_of_1000_requests_with_a_slow_reader_does_not_deadlock() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(EDS, &[], "", "0"));
    let mut up = cp.next_sotw().await;
    up.recv().await;
    // Upstream floods responses nobody reads yet, while Envoy keeps sending requests.
    for i in 0..1000 {
        up.send(DiscoveryResponse {
            type_url: EDS.into(),
            nonce: format!("r{i}"),
            resources: vec![opaque(EDS, 2048)],
            ..Default::default()
        });
    }
    for i in 1..=1000 {
        envoy.send(sotw_req(EDS, &["x"], "", &format!("{i}")));
    }
    for i in 1..=1000 {
        assert_eq!(
            up.recv().await.response_nonce,
            format!("{i}"),
            "requests go up in order despite the unread responses"
        );
    }
    for i in 0..1000 {
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // slow reader
        }
        assert_eq!(envoy.recv().await.nonce, format!("r{i}"));
    }
}

#[tokio::test]
async fn a_64_mib_response_passes() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(CDS, &[], "", ""));
    let mut up = cp.next_sotw().await;
    up.recv().await;
    let big = DiscoveryResponse {
        type_url: CDS.into(),
        nonce: "big".into(),
        resources: vec![opaque(CDS, 64 << 20), opaque(CDS, 1 << 20)],
        ..Default::default()
    };
    let want = big.encode_to_vec();
    assert!(want.len() >= 64 << 20);
    up.send(big);
    let got = envoy.recv().await;
    assert!(
        got.encode_to_vec() == want,
        "64 MiB response arrives intact"
    );
    // The stream is still healthy afterwards.
    envoy.send(sotw_req(CDS, &[], "", "big"));
    assert_eq!(up.recv().await.response_nonce, "big");
}

#[tokio::test]
async fn unix_socket_listener_replaces_stale_socket_with_mode_0666() {
    use std::os::unix::fs::PermissionsExt;
    let mut cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nested/dir/XDS");
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A stale socket file from a previous run.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let agent = Agent::builder(&cp.url())
        .listen(&format!("unix:{}", sock.display()))
        .start()
        .await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let mut client = connect_uds(&sock).await;
    lds_round_trip(&mut client, &mut cp, "uds").await;
    drop(agent);
}

#[tokio::test]
async fn sigterm_exits_within_seconds_with_streams_open() {
    let mut cp = ControlPlane::start().await;
    let mut agent = Agent::builder(&cp.url())
        .args(["--shutdown-grace", "10s"])
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoys = Vec::new();
    let mut ups = Vec::new();
    for _ in 0..3 {
        let e = open_sotw(&mut client, &[]).await;
        e.send(sotw_req(LDS, &[], "", ""));
        let mut up = cp.next_sotw().await;
        up.recv().await;
        envoys.push(e);
        ups.push(up);
    }
    let (status, took) = agent.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} (the grace period is 10 s)"
    );
    for e in envoys.iter_mut() {
        let s = e.expect_status().await;
        assert_ne!(s.code(), tonic::Code::Ok);
    }
}

#[tokio::test]
async fn admin_ready_and_metrics_answer() {
    let cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let (code, body) = agent.get("/healthz/ready").await;
    assert_eq!((code, body.trim()), (200, "ready"));
    let (code, _) = agent.get("/stats/prometheus").await;
    assert_eq!(code, 200);
    let (code, _) = agent.get("/stats").await;
    assert_eq!(code, 200);
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    use std::process::Command;
    let bin = support::agent::BIN;
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--listen", "nowhere"], "--listen"),
        (&["run", "--upstream", "ftp://x"], "--upstream"),
        (&["run", "--module-expiry", "soon"], "--module-expiry"),
        (&["run", "--http-max-attempts", "0"], "--http-max-attempts"),
        (
            &["run", "--response-stall-timeout", "0s"],
            "--response-stall-timeout",
        ),
        (&["run", "--no-such-flag"], "--no-such-flag"),
        (
            &["run", "--upstream-ca", "/does/not/exist"],
            "--upstream-ca",
        ),
    ];
    for (args, flag) in cases {
        let out = Command::new(bin)
            .args(*args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    // An unusable address at run time: also exit 2, one line naming the flag.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(bin)
        .args([
            "run",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            &addr,
            "--admin",
            "127.0.0.1:0",
            "--cache-dir",
        ])
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--listen") && err.contains(&addr), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn help_documents_every_flag_and_env_var() {
    let out = std::process::Command::new(support::agent::BIN)
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for (flag, env) in [
        ("--listen", "ECDS_AGENT_LISTEN"),
        ("--upstream", "ECDS_AGENT_UPSTREAM"),
        ("--upstream-ca", "ECDS_AGENT_UPSTREAM_CA"),
        ("--client-cert", "ECDS_AGENT_CLIENT_CERT"),
        ("--client-key", "ECDS_AGENT_CLIENT_KEY"),
        ("--admin", "ECDS_AGENT_ADMIN"),
        ("--cache-dir", "ECDS_AGENT_CACHE_DIR"),
        ("--insecure-registries", "WASM_INSECURE_REGISTRIES"),
        ("--module-expiry", "WASM_MODULE_EXPIRY"),
        ("--purge-interval", "WASM_PURGE_INTERVAL"),
        ("--http-timeout", "WASM_HTTP_REQUEST_TIMEOUT"),
        ("--http-max-attempts", "WASM_HTTP_REQUEST_MAX_RETRIES"),
        ("--max-module-bytes", "ISTIO_WASM_MAX_BINARY_SIZE_BYTES"),
        ("--cache-max-bytes", "ECDS_AGENT_CACHE_MAX_BYTES"),
        ("--fetch-failure", "ECDS_AGENT_FETCH_FAILURE"),
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
        assert!(help.contains(env), "help lacks {env}");
    }
}

#[tokio::test]
async fn tls_and_mtls_upstream() {
    let p = support::registry::pki();
    let (ca, cert, key) = (
        p.ca.to_str().unwrap(),
        p.client_cert.to_str().unwrap(),
        p.client_key.to_str().unwrap(),
    );
    let mut cp = ControlPlane::start_tls(true).await;
    let url = format!("https://127.0.0.1:{}", cp.addr.port());

    // CA + client certificate: the stream works.
    let agent = Agent::builder(&url)
        .args([
            "--upstream-ca",
            ca,
            "--client-cert",
            cert,
            "--client-key",
            key,
        ])
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    lds_round_trip(&mut client, &mut cp, "mtls").await;

    // No client certificate: the control plane refuses, Envoy gets UNAVAILABLE, nothing reaches upstream.
    let agent = Agent::builder(&url)
        .args(["--upstream-ca", ca])
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let st = envoy.expect_status().await;
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(st.message().contains("unreachable"), "{}", st.message());
    assert!(cp.stream_within(Duration::from_millis(500)).await.is_none());

    // No CA: the control plane's certificate is not trusted.
    let mut tls_only = ControlPlane::start_tls(false).await;
    let url = format!("https://127.0.0.1:{}", tls_only.addr.port());
    let agent = Agent::builder(&url).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let st = envoy.expect_status().await;
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(tls_only
        .stream_within(Duration::from_millis(500))
        .await
        .is_none());
    // With the CA (server-only TLS) it works.
    let agent = Agent::builder(&url)
        .args(["--upstream-ca", ca])
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    let envoy = open_sotw(&mut client, &[]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    tls_only.next_sotw().await.recv().await;
}

#[tokio::test]
async fn xds_header_env_vars_become_upstream_metadata() {
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .env("XDS_HEADER_CLUSTERID", "Kubernetes")
        .env("XDS_HEADER_X_Tenant", "blue")
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;
    let envoy = open_sotw(&mut client, &[("x-from-envoy", "yes")]).await;
    envoy.send(sotw_req(LDS, &[], "", ""));
    let up = cp.next_sotw().await;
    assert_eq!(up.metadata.get("clusterid").unwrap(), "Kubernetes");
    assert_eq!(up.metadata.get("x_tenant").unwrap(), "blue");
    assert_eq!(up.metadata.get("x-from-envoy").unwrap(), "yes");
}

/// How [`cut_off_control_plane`] breaks off its response.
#[derive(Clone, Copy)]
enum Break {
    /// RST_STREAM.
    Reset,
    /// Trailers with this grpc-status and message "quota".
    Status(tonic::Code),
    /// Nothing more, the stream left open.
    Stall,
}

/// A control plane on raw h2 that answers every ADS stream with the first `cut` bytes of a
/// large CDS message and then breaks off (`how`): a response cut off in the middle, which the
/// agent is already relaying to Envoy (cut-through) when the break comes.
async fn cut_off_control_plane(cut: usize, how: Break) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(sock).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let _body = req.into_body();
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            return;
                        };
                        let msg = DiscoveryResponse {
                            type_url: CDS.into(),
                            nonce: "never-whole".into(),
                            resources: vec![opaque(CDS, 2 << 20)],
                            ..Default::default()
                        }
                        .encode_to_vec();
                        let mut framed = vec![0];
                        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                        framed.extend_from_slice(&msg);
                        let _ = send.send_data(framed[..cut].to_vec().into(), false);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        match how {
                            Break::Reset => send.send_reset(h2::Reason::INTERNAL_ERROR),
                            Break::Status(code) => {
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", (code as i32).to_string().parse().unwrap());
                                t.insert("grpc-message", "quota".parse().unwrap());
                                let _ = send.send_trailers(t);
                            }
                            Break::Stall => {}
                        }
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(send);
                    });
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_response_broken_off_mid_relay_ends_the_envoy_stream_with_a_status() {
    let url = cut_off_control_plane(700 << 10, Break::Reset).await;
    let agent = Agent::builder(&url).start().await;
    let mut client = connect_tcp(&agent.listen).await;
    for _ in 0..2 {
        // Envoy's side never sees a message (a partial one is discarded by its gRPC stack),
        // and the stream ends with a status it reconnects on, within seconds; the next stream
        // on the same connection meets the same.
        let (status, took) = status_after_break(&mut client).await;
        assert!(took < Duration::from_secs(5));
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown
            ),
            "{status:?}"
        );
    }
    // Both responses were counted: the agent had begun relaying them before they broke off
    // (read whole, they would never have been counted).
    assert!(agent.metric("istio_agent_xds_proxy_responses", "").await >= 2.0);
}

/// The Envoy side's status on a new stream of `client` once the relayed response broke off,
/// and how long it took.
async fn status_after_break(client: &mut AdsClient) -> (tonic::Status, Duration) {
    let mut envoy = open_sotw(client, &[]).await;
    envoy.send(sotw_req(CDS, &[], "", ""));
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), envoy.rx.message()).await {
        Ok(Err(s)) => (s, started.elapsed()),
        Ok(Ok(m)) => panic!("expected the stream to fail, got {m:?}"),
        Err(_) => panic!("the stream hung after the control plane broke off"),
    }
}

#[tokio::test]
async fn an_error_status_mid_relay_reaches_envoy_as_the_control_plane_sent_it() {
    let url = cut_off_control_plane(700 << 10, Break::Status(tonic::Code::ResourceExhausted)).await;
    let agent = Agent::builder(&url).start().await;
    let (status, _) = status_after_break(&mut connect_tcp(&agent.listen).await).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("quota") && status.message().contains("middle of a message"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_control_plane_stalling_mid_relay_is_cut_off_after_the_stall_timeout() {
    let url = cut_off_control_plane(700 << 10, Break::Stall).await;
    let agent = Agent::builder(&url)
        .args(["--response-stall-timeout", "1s"])
        .start()
        .await;
    let (status, took) = status_after_break(&mut connect_tcp(&agent.listen).await).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("sent nothing for 1s")
            && status.message().contains("--response-stall-timeout"),
        "{status:?}"
    );
    // 300 ms to the stall, then the 1 s timeout: not the 60 s the control plane would hold it.
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(
        agent
            .metric(
                "istio_agent_envoy_connection_terminations",
                r#"type="upstream_error""#
            )
            .await
            >= 1.0
    );
}
