//! 5. Single-flight and 6. RSS under streams: Envoy-side streams (this process) through the
//!    agent (a separate process) to the benchmark's control plane; every stream asks ECDS for
//!    the same module, served by a loopback server that waits 200 ms before answering.

use std::time::{Duration, Instant};

use crate::passthrough::rss_mib;
use crate::report::{self, Sample};
use crate::support::res::{ecds_remote, Remote};
use crate::support::xds::{ack, connect_tcp, ecds_resp, open_sotw, EnvoyStream};
use crate::support::{Agent, ControlPlane, ModuleServer, Route};
use crate::Mode;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

type Stream = EnvoyStream<DiscoveryRequest, DiscoveryResponse>;

/// `k` streams subscribe to `name`; the control plane answers all at once; returns the time
/// until every stream holds the converted resource, and the streams (kept open).
async fn deliver(
    agent: &Agent,
    cp: &mut ControlPlane,
    k: usize,
    name: &str,
    url: &str,
    sha: &str,
) -> (Duration, Vec<Stream>) {
    let mut envoys = vec![];
    let mut ups = vec![];
    for _ in 0..k {
        let mut client = connect_tcp(&agent.listen).await;
        let e = open_sotw(&mut client, &[]).await;
        e.send(ack(&[name], "", ""));
        let mut up = cp.next_sotw().await;
        up.recv().await;
        envoys.push(e);
        ups.push(up);
    }
    let res = ecds_remote(
        name,
        url,
        &Remote {
            sha256: sha.into(),
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    for up in &ups {
        up.send(ecds_resp("1", "n1", vec![res.clone()]));
    }
    for e in envoys.iter_mut() {
        let r = e.recv().await;
        assert!(
            !r.resources.is_empty(),
            "single-flight bench: an empty response"
        );
    }
    let t = t0.elapsed();
    std::mem::forget(ups); // keep the upstream ends open while the streams live
    (t, envoys)
}

pub async fn run(mode: Mode) -> Vec<Sample> {
    let srv = ModuleServer::start().await;
    let mut cp = ControlPlane::start().await;
    let agent = crate::agent(&cp.url()).start().await;
    let big = crate::fetch::module_of_size(1 << 20);
    let (many, rss_streams) = match mode {
        Mode::Full => (100, 200),
        Mode::Smoke => (10, 20),
    };
    let mut times = vec![];
    for (i, k) in [1usize, many].into_iter().enumerate() {
        let path = format!("slow-{i}.wasm");
        // A distinct module per case (the cache is keyed by content).
        let mut body = big.clone();
        if let Some(last) = body.last_mut() {
            *last ^= 1 + i as u8;
        }
        let sha = crate::support::registry::sha256_hex(&body);
        srv.set(
            &path,
            Route {
                body,
                delay: Duration::from_millis(200),
                ..Default::default()
            },
        );
        let name = format!("extensions.istio.io/wasmplugin/bench.flight{i}");
        let (t, streams) = deliver(&agent, &mut cp, k, &name, &srv.url(&path), &sha).await;
        times.push((k, t, srv.hits(&path), sha));
        drop(streams);
    }
    let mut out = vec![];
    let (k1, t1, _, sha) = times[0].clone();
    let (kn, tn, hits, _) = times[1].clone();
    out.push(Sample {
        section: "single-flight",
        case: format!("{kn} streams want one uncached 1 MiB module (server waits 200 ms)"),
        agent: format!(
            "{hits} download(s), all {kn} delivered in {}",
            report::ms(tn)
        ),
        peer: format!("{k1} stream: {}", report::ms(t1)),
        ratio: Some(report::ratio(tn, t1)),
        goal: "1 download".into(),
        met: Some(hits == 1),
        rss_mib: None,
    });
    // RSS with many streams, each holding the delivered module.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, base) = rss_mib(agent.pid());
    let (_, streams) = deliver(
        &agent,
        &mut cp,
        rss_streams,
        "extensions.istio.io/wasmplugin/bench.flight0",
        &srv.url("slow-0.wasm"),
        &sha,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (peak, now) = rss_mib(agent.pid());
    out.push(Sample {
        section: "RSS",
        case: format!("{rss_streams} Envoy streams, each with the module delivered"),
        agent: format!("{now:.1} MiB (peak {peak:.1} MiB)"),
        peer: format!("no extra stream: {base:.1} MiB"),
        ratio: None,
        goal: "—".into(),
        met: None,
        rss_mib: Some(peak),
    });
    drop(streams);
    out
}
