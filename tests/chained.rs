//! The agent in front of a control plane on a Unix socket (`--upstream unix:/path`), as it runs
//! chained in front of pilot-agent's `/etc/istio/proxy/XDS`: SotW and Delta both ways, both
//! spellings of the flag, and the same status and reconnect behaviour as over TCP. The real
//! Envoy run of the chain is in `envoy_e2e.rs` (`chained_behind_a_unix_socket_control_plane_*`).

mod support;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use support::res::{cluster, CDS};
use support::xds::{connect_tcp, open_delta, open_sotw};
use support::{Agent, ControlPlane};

#[tokio::test]
async fn unix_upstream_round_trips_sotw_and_delta_in_both_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("XDS");
    let mut cp = ControlPlane::start_unix(&sock).await;
    for flag in [
        format!("unix:{}", sock.display()),
        format!("unix://{}", sock.display()),
    ] {
        let agent = Agent::builder(&flag).start().await;
        let mut client = connect_tcp(&agent.listen).await;

        let mut envoy = open_sotw(&mut client, &[]).await;
        let req = DiscoveryRequest {
            type_url: CDS.into(),
            resource_names: vec!["c1".into()],
            ..Default::default()
        };
        envoy.send(req.clone());
        let mut up = cp.next_sotw().await;
        assert_eq!(up.recv().await, req);
        let resp = DiscoveryResponse {
            type_url: CDS.into(),
            version_info: "1".into(),
            nonce: "s1".into(),
            resources: vec![cluster("c1")],
            ..Default::default()
        };
        up.send(resp.clone());
        assert_eq!(envoy.recv().await, resp, "{flag}");

        let mut delta = open_delta(&mut client).await;
        let dreq = DeltaDiscoveryRequest {
            type_url: CDS.into(),
            resource_names_subscribe: vec!["c2".into()],
            ..Default::default()
        };
        delta.send(dreq.clone());
        let mut dup = cp.next_delta().await;
        assert_eq!(dup.recv().await, dreq);
        let dresp = DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "d1".into(),
            ..Default::default()
        };
        dup.send(dresp.clone());
        assert_eq!(delta.recv().await, dresp, "{flag}");
    }
}

#[tokio::test]
async fn unix_upstream_absent_then_restarted_behaves_as_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("XDS");
    let agent = Agent::builder(&format!("unix:{}", sock.display()))
        .start()
        .await;
    let mut client = connect_tcp(&agent.listen).await;

    // Nothing listens yet: the stream ends UNAVAILABLE naming the socket.
    let mut envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    });
    let status = envoy.expect_status().await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&sock.display().to_string()),
        "{status:?}"
    );

    // It appears: a reconnect works.
    let mut cp = ControlPlane::start_unix(&sock).await;
    let envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: "one".into(),
        ..Default::default()
    });
    let up = {
        let mut up = cp.next_sotw().await;
        assert_eq!(up.recv().await.response_nonce, "one");
        up
    };

    // It goes away mid-stream: Envoy's stream ends UNAVAILABLE, and comes back after a restart.
    let mut envoy = envoy;
    cp.stop().await;
    drop(up);
    let status = envoy.expect_status().await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let mut cp = ControlPlane::start_unix(&sock).await;
    let envoy = open_sotw(&mut client, &[]).await;
    envoy.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: "two".into(),
        ..Default::default()
    });
    let mut up = cp.next_sotw().await;
    assert_eq!(up.recv().await.response_nonce, "two");
}
