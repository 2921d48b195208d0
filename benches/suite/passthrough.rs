//! 1. Pass-through overhead: an Envoy-side client (this process) ↔ the benchmark control plane
//!    (a child process, `wire.rs`), directly and through the agent (the release binary), over
//!    loopback TCP. CDS of 1 k / 10 k / 50 k clusters in SotW and Delta, and a burst of small EDS
//!    updates.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::report::{self, Sample};
use crate::support::{free_port, proc_mib, Agent};
use crate::wire::{CDS, EDS};
use crate::Mode;

/// The control plane child process; killed on drop.
pub struct CpProcess {
    child: Child,
    pub addr: String,
}

impl CpProcess {
    pub fn start(clusters: usize) -> CpProcess {
        let port = free_port();
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env("ECDS_BENCH_ROLE", "cp")
            .env("ECDS_BENCH_PORT", port.to_string())
            .env("ECDS_BENCH_CLUSTERS", clusters.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn control plane");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .expect("control plane ready line");
        assert_eq!(line.trim(), "ready", "control plane did not start");
        CpProcess {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak and current RSS of a process, MiB (VmHWM, VmRSS).
pub fn rss_mib(pid: u32) -> (f64, f64) {
    (proc_mib(pid, "VmHWM"), proc_mib(pid, "VmRSS"))
}

pub async fn start_agent(upstream: &str) -> Agent {
    crate::agent(&format!("http://{upstream}")).start().await
}

async fn client(addr: &str) -> AggregatedDiscoveryServiceClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect()
        .await
        .expect("connect");
    AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(usize::MAX)
}

/// One ADS stream as Envoy drives it: request, response, ACK.
enum Stream {
    Sotw(
        mpsc::UnboundedSender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    Delta(
        mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        tonic::Streaming<DeltaDiscoveryResponse>,
    ),
}

/// What one received response tells the client: its size and what to ACK.
struct Got {
    bytes: usize,
    version: String,
    nonce: String,
}

impl Stream {
    async fn open(addr: &str, delta: bool) -> Stream {
        let mut c = client(addr).await;
        if delta {
            let (tx, rx) = mpsc::unbounded_channel();
            let s = c
                .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
                .await
                .expect("open delta")
                .into_inner();
            Stream::Delta(tx, s)
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            let s = c
                .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
                .await
                .expect("open sotw")
                .into_inner();
            Stream::Sotw(tx, s)
        }
    }

    fn request(&self, type_url: &str, names: &[String], last: Option<&Got>) {
        match self {
            Stream::Sotw(tx, _) => {
                let _ = tx.send(DiscoveryRequest {
                    type_url: type_url.into(),
                    resource_names: names.to_vec(),
                    version_info: last.map(|g| g.version.clone()).unwrap_or_default(),
                    response_nonce: last.map(|g| g.nonce.clone()).unwrap_or_default(),
                    ..Default::default()
                });
            }
            Stream::Delta(tx, _) => {
                let _ = tx.send(DeltaDiscoveryRequest {
                    type_url: type_url.into(),
                    resource_names_subscribe: if last.is_none() {
                        names.to_vec()
                    } else {
                        vec![]
                    },
                    response_nonce: last.map(|g| g.nonce.clone()).unwrap_or_default(),
                    ..Default::default()
                });
            }
        }
    }

    async fn recv(&mut self) -> Got {
        let fut = async {
            match self {
                Stream::Sotw(_, s) => s.message().await.map(|m| {
                    m.map(|r| Got {
                        bytes: r.encoded_len(),
                        version: r.version_info,
                        nonce: r.nonce,
                    })
                }),
                Stream::Delta(_, s) => s.message().await.map(|m| {
                    m.map(|r| Got {
                        bytes: r.encoded_len(),
                        version: r.system_version_info,
                        nonce: r.nonce,
                    })
                }),
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), fut).await {
            Ok(Ok(Some(g))) => g,
            other => panic!(
                "bench stream: no response ({:?})",
                other.map(|r| r.map(|_| ()))
            ),
        }
    }
}

/// Round trips: request/ACK → full response, `iters` times after `warm` warm-ups.
/// Returns (latencies, response bytes).
async fn round_trips(addr: &str, delta: bool, warm: usize, iters: usize) -> (Vec<Duration>, usize) {
    let mut s = Stream::open(addr, delta).await;
    s.request(CDS, &[], None);
    let mut last = s.recv().await;
    let mut lat = Vec::with_capacity(iters);
    for i in 0..warm + iters {
        let t = Instant::now();
        s.request(CDS, &[], Some(&last));
        last = s.recv().await;
        if i >= warm {
            lat.push(t.elapsed());
        }
    }
    (lat, last.bytes)
}

/// A burst: one request, `k` responses back to back (each ACKed as it arrives).
async fn burst(addr: &str, delta: bool, type_url: &str, k: usize) -> Duration {
    let mut s = Stream::open(addr, delta).await;
    let names = vec![format!("burst:{k}")];
    let t = Instant::now();
    s.request(type_url, &names, None);
    for _ in 0..k {
        let g = s.recv().await;
        s.request(type_url, &names, Some(&g));
    }
    t.elapsed()
}

pub struct CaseResult {
    pub flavor: &'static str,
    pub clusters: usize,
    pub bytes: usize,
    pub direct: Vec<Duration>,
    pub via: Vec<Duration>,
    pub burst_direct: Duration,
    pub burst_via: Duration,
    pub burst_k: usize,
    pub agent_peak_mib: f64,
}

pub async fn run(mode: Mode) -> (Vec<CaseResult>, Vec<Sample>) {
    let sizes: &[(usize, usize)] = match mode {
        // (clusters, round trips)
        Mode::Full => &[(1_000, 400), (10_000, 120), (50_000, 60)],
        Mode::Smoke => &[(50, 5)],
    };
    let mut cases = vec![];
    let mut samples = vec![];
    for delta in [false, true] {
        let flavor = if delta { "Delta" } else { "SotW" };
        for &(clusters, iters) in sizes {
            let cp = CpProcess::start(clusters);
            let agent = start_agent(&cp.addr).await;
            let warm = (iters / 5).max(2);
            // Interleave direct and via-agent rounds so drift hits both alike.
            let (mut direct, mut via, mut bytes) = (vec![], vec![], 0);
            for _ in 0..4 {
                let (d, b) = round_trips(&cp.addr, delta, warm, iters / 4).await;
                direct.extend(d);
                bytes = b;
                let (v, _) = round_trips(&agent.listen, delta, warm, iters / 4).await;
                via.extend(v);
            }
            let k = match mode {
                Mode::Full => (60_000_000 / bytes.max(1)).clamp(5, 200),
                Mode::Smoke => 3,
            };
            let burst_direct = burst(&cp.addr, delta, CDS, k).await;
            let burst_via = burst(&agent.listen, delta, CDS, k).await;
            let (peak, _) = rss_mib(agent.pid());
            let r = CaseResult {
                flavor,
                clusters,
                bytes,
                direct,
                via,
                burst_direct,
                burst_via,
                burst_k: k,
                agent_peak_mib: peak,
            };
            samples.push(report::passthrough_sample(&r));
            cases.push(r);
            drop(agent);
            drop(cp);
        }
        // 1000 small EDS updates back to back.
        let k = match mode {
            Mode::Full => 1000,
            Mode::Smoke => 20,
        };
        let cp = CpProcess::start(1);
        let agent = start_agent(&cp.addr).await;
        let mut d = vec![];
        let mut v = vec![];
        for _ in 0..3 {
            d.push(burst(&cp.addr, delta, EDS, k).await);
            v.push(burst(&agent.listen, delta, EDS, k).await);
        }
        d.sort();
        v.sort();
        let (peak, _) = rss_mib(agent.pid());
        samples.push(report::eds_burst_sample(flavor, k, d[1], v[1], peak));
    }
    (cases, samples)
}
