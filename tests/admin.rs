//! The admin port as exposed in a pod: /debug/* answers allowed clients only (loopback by
//! default) while health and metrics answer everyone, and a client that trickles its request
//! headers (slowloris) is cut off without blocking others.

mod support;

use std::time::{Duration, Instant};

use support::{Agent, ControlPlane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get_from(source: &str, admin: &str, path: &str) -> u16 {
    body_from(source, admin, path).await.0
}

async fn body_from(source: &str, admin: &str, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    match client.get(format!("http://{admin}{path}")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

#[tokio::test]
async fn debug_pages_answer_allowed_clients_only() {
    let cp = ControlPlane::start().await;
    // Default: loopback clients see everything.
    let agent = Agent::builder(&cp.url()).start().await;
    assert_eq!(agent.get("/debug/wasm").await.0, 200);
    // Only 127.0.0.2 may read /debug/*: a request from 127.0.0.1 is refused, metrics are not.
    let agent = Agent::builder(&cp.url())
        .args(["--admin-debug-cidrs", "127.0.0.2/32"])
        .start()
        .await;
    let (code, body) = agent.get("/debug/wasm").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("--admin-debug-cidrs"), "{body}");
    assert_eq!(agent.get("/stats/prometheus").await.0, 200);
    assert_eq!(agent.get("/healthz/ready").await.0, 200);
    assert_eq!(
        get_from("127.0.0.2", &agent.admin, "/debug/wasm").await,
        200
    );
    // /stats: metric lines for everyone, the cache's details for allowed clients only.
    let (code, body) = agent.get("/stats").await;
    assert_eq!(code, 200);
    assert!(!body.contains("cache_dir"), "{body}");
    assert!(body.contains("--admin-debug-cidrs"), "{body}");
    assert!(body.contains("istio_agent_"), "{body}");
    let (code, body) = body_from("127.0.0.2", &agent.admin, "/stats").await;
    assert_eq!(code, 200);
    assert!(body.contains("cache_dir"), "{body}");
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_and_others_are_served() {
    let cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).start().await;
    let mut slow = tokio::net::TcpStream::connect(&agent.admin).await.unwrap();
    slow.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // Meanwhile others are served.
    assert_eq!(agent.get("/healthz/live").await.0, 200);
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(15), slow.read(&mut buf))
        .await
        .expect("the server must close a connection whose headers never end")
        .unwrap_or(0);
    let _ = n; // hyper may answer 408 before closing; either way the connection ends.
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => continue,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "connection still open after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
}
