//! Benchmarks that print numbers and ratios (`make bench`, i.e. `cargo bench --bench convert`):
//!
//! 1. pass-through: ADS round trips client → control plane directly vs. through the agent's
//!    proxy (in-process, real gRPC over loopback TCP), latency and throughput;
//! 2. cached conversion: converting an ECDS resource whose module is already cached;
//! 3. single-flight: many concurrent gets of one slow module.
//!
//! Under `cargo test` (no `--bench` argument) it runs a few iterations as a smoke test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ecds_agent::config::ListenAddr;
use ecds_agent::ecds::FailureMode;
use ecds_agent::ecds::{Converter, Outcome};
use ecds_agent::wasm::http::HttpOptions;
use ecds_agent::wasm::tls::FetchTls;
use ecds_agent::wasm::{Cache, CacheConfig, GetOptions};
use ecds_agent::xds::{listen, upstream, ProxyContext};
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, http_uri, AsyncDataSource, HttpUri, RemoteDataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{plugin_config, PluginConfig, VmConfig};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// Answers every request with one response carrying `payload` bytes of opaque resource.
struct Echo {
    payload: usize,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Echo {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut inbound = req.into_inner();
        let body = vec![7u8; self.payload];
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok(Some(_)) = inbound.message().await {
                n += 1;
                let r = DiscoveryResponse {
                    version_info: n.to_string(),
                    nonce: n.to_string(),
                    type_url: LDS.into(),
                    resources: vec![Any {
                        type_url: LDS.into(),
                        value: body.clone(),
                    }],
                    ..Default::default()
                };
                if tx.send(Ok(r)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

async fn start_echo(payload: usize) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Echo { payload }))
            .serve_with_incoming(
                TcpListenerStream::new(l).map(|c| c.inspect(|s| s.set_nodelay(true).unwrap())),
            ),
    );
    addr
}

async fn start_agent(upstream_addr: SocketAddr) -> SocketAddr {
    let up = upstream::Upstream::new(
        ecds_agent::config::UpstreamAddr::Url(format!("http://{upstream_addr}").parse().unwrap()),
        &Default::default(),
    )
    .unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    std::mem::forget(_tx);
    let ctx = Arc::new(ProxyContext::new(Default::default(), up, None, rx));
    let bound = listen::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = match &bound {
        listen::Bound::Tcp(l) => l.local_addr().unwrap(),
        listen::Bound::Unix(_) => unreachable!(),
    };
    tokio::spawn(ecds_agent::xds::serve(bound, ctx, std::future::pending()));
    addr
}

/// (mean round-trip µs, responses/s pipelined) for `n` requests against `addr`.
async fn round_trips(addr: SocketAddr, n: usize) -> (f64, f64) {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut rx_stream = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let req = DiscoveryRequest {
        type_url: LDS.into(),
        ..Default::default()
    };
    // Warm up.
    for _ in 0..(n / 10).max(5) {
        tx.send(req.clone()).unwrap();
        rx_stream.message().await.unwrap().unwrap();
    }
    let t = Instant::now();
    for _ in 0..n {
        tx.send(req.clone()).unwrap();
        rx_stream.message().await.unwrap().unwrap();
    }
    let latency = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        tx.send(req.clone()).unwrap();
    }
    for _ in 0..n {
        rx_stream.message().await.unwrap().unwrap();
    }
    (latency, n as f64 / t.elapsed().as_secs_f64())
}

fn ecds_resource(name: &str, url: &str, sha: &str) -> Any {
    let config = PluginConfig {
        name: name.into(),
        root_id: "root".into(),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                    http_uri: Some(HttpUri {
                        uri: url.into(),
                        timeout: Some(PbDuration {
                            seconds: 30,
                            nanos: 0,
                        }),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                    }),
                    sha256: sha.into(),
                    retry_policy: None,
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let tec = TypedExtensionConfig {
        name: name.into(),
        typed_config: Some(Any {
            type_url: Wasm::type_url(),
            value: Wasm {
                config: Some(config),
            }
            .encode_to_vec(),
        }),
    };
    Any {
        type_url: TypedExtensionConfig::type_url(),
        value: tec.encode_to_vec(),
    }
}

/// A module server that counts downloads and answers after `delay`.
async fn module_server(body: Vec<u8>, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            body
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, hits)
}

async fn cache(dir: &std::path::Path) -> Arc<Cache> {
    Cache::open(CacheConfig {
        dir: dir.to_owned(),
        expiry: Duration::from_secs(86400),
        purge_interval: Duration::from_secs(3600),
        max_module_bytes: 256 << 20,
        max_cache_bytes: 0,
        http: HttpOptions {
            request_timeout: Duration::from_secs(5),
            max_attempts: 3,
            max_bytes: 256 << 20,
            blocked: Default::default(),
        },
        tls: FetchTls::default(),
        docker_config: None,
        registries: Default::default(),
        verify: None,
    })
    .await
    .unwrap()
}

fn module() -> Vec<u8> {
    // A module of realistic size (~100 KiB of code and data).
    let data = "x".repeat(100_000);
    format!("(module (memory 2) (data (i32.const 0) \"{data}\") (func (export \"f\") (result i32) i32.const 1))").into_bytes()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 20_000 } else { 50 };
    let wasm = wat_to_wasm(&module());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&wasm));
    let mut results: HashMap<&str, f64> = HashMap::new();

    // 1. Pass-through overhead.
    for payload in [512usize, 16 * 1024] {
        let cp = start_echo(payload).await;
        let agent = start_agent(cp).await;
        let (direct_lat, direct_tput) = round_trips(cp, n).await;
        let (agent_lat, agent_tput) = round_trips(agent, n).await;
        println!(
            "pass-through, {payload:>5} B responses: round trip direct {direct_lat:7.1} µs, via agent {agent_lat:7.1} µs \
             (+{:.1} µs, ×{:.2}); pipelined direct {direct_tput:8.0}/s, via agent {agent_tput:8.0}/s (×{:.2})",
            agent_lat - direct_lat,
            agent_lat / direct_lat,
            agent_tput / direct_tput
        );
        results.insert("pass_through_ratio", agent_lat / direct_lat);
    }

    // 2. Cached conversion.
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path()).await;
    let (srv, hits) = module_server(wasm.clone(), Duration::ZERO).await;
    let url = format!("http://{srv}/plugin.wasm");
    let opts = GetOptions {
        sha256: Some(sha.clone()),
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let t = Instant::now();
    c.get(&url, opts.clone()).await.unwrap();
    let cold = t.elapsed();
    let conv = Converter::new(c.clone(), FailureMode::StandIn, Duration::from_secs(60));
    let resource = ecds_resource("extensions.istio.io/wasmplugin/ns.bench", &url, &sha);
    let iters = if full { 100_000 } else { 100 };
    let t = Instant::now();
    for _ in 0..iters {
        match conv.convert(&resource).await {
            Outcome::Converted { .. } => {}
            _ => panic!("conversion failed"),
        }
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "cached conversions never touch the network"
    );
    println!(
        "conversion: first (download {} KiB + verify + store) {:.2} ms; cached {per:.2} µs/resource (×{:.0} faster)",
        wasm.len() / 1024,
        cold.as_secs_f64() * 1e3,
        cold.as_secs_f64() * 1e6 / per
    );

    // 3. Single-flight.
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path()).await;
    let (srv, hits) = module_server(wasm.clone(), Duration::from_millis(200)).await;
    let url = format!("http://{srv}/slow.wasm");
    let k = 100;
    let t = Instant::now();
    let gets = (0..k).map(|_| {
        let c = c.clone();
        let url = url.clone();
        tokio::spawn(async move {
            c.get(
                &url,
                GetOptions {
                    timeout: Duration::from_secs(10),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        })
    });
    futures::future::join_all(gets).await;
    println!(
        "single-flight: {k} concurrent gets of one module (200 ms server) → {} download(s) in {:.0} ms",
        hits.load(Ordering::SeqCst),
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let _ = results;
}

fn wat_to_wasm(text: &[u8]) -> Vec<u8> {
    wat::parse_bytes(text).unwrap().into_owned()
}
