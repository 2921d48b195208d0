//! 4. Envoy's own remote fetch as the peer. Real Envoy 1.40 (V8) with a static listener whose
//!    Wasm filter comes over ECDS from the benchmark's control plane:
//!    * native: the ECDS resource keeps its `remote` HTTP code source and Envoy downloads the
//!      module itself (cluster `modules`);
//!    * agent: the same resource through ecds-agent, once per code source it can deliver
//!      (`local.filename`, `remote` served by the agent over Envoy's ADS cluster, and
//!      `local.inline_bytes` for modules up to 1 MiB).
//!
//! Measured: the time from the moment the control plane sends the ECDS response until the
//! filter answers a request (the basic-auth plugin's first 401) — on first load, on a re-push
//! of the same module with a new plugin configuration (a new path becomes protected), and after
//! an Envoy restart (the agent and its cache stay up, as pilot-agent does).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::google::protobuf::Any;

use crate::fetch::BlobServer;
use crate::passthrough::rss_mib;
use crate::report::{self, Sample};
use crate::support::res::{any, basic_auth_plugin, tec, ECDS};
use crate::support::xds::{ecds_resp, CpSotw};
use crate::support::{free_port, ControlPlane};
use crate::Mode;
use ecds_agent::ecds::delivery::Source;

const FILTER: &str = "bench.basic-auth";

/// basic_auth.wasm padded with a custom section to `size` bytes (at least its own size).
fn plugin(size: usize) -> Vec<u8> {
    let mut m = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/plugins/basic_auth/basic_auth.wasm"),
    )
    .expect("basic_auth.wasm");
    if size > m.len() + 16 {
        m.extend(crate::fetch::custom_section(size - m.len()));
    }
    m
}

fn resource(url: &str, sha: &str, prefix: &str) -> Any {
    let pc = basic_auth_plugin(FILTER, url, sha, 60, prefix);
    tec(FILTER, any(&Wasm { config: Some(pc) }))
}

struct Envoy {
    child: Child,
    log: PathBuf,
    http: u16,
}

impl Envoy {
    fn start(dir: &Path, xds_port: u16, modules: &str, n: usize) -> Envoy {
        let http = free_port();
        let boot = dir.join(format!("envoy-{n}.yaml"));
        std::fs::write(
            &boot,
            crate::support::envoy::ads_bootstrap(FILTER, xds_port, http, free_port(), modules),
        )
        .expect("bootstrap");
        let log = dir.join(format!("envoy-{n}.log"));
        let child = crate::support::envoy::spawn(&crate::support::envoy::path(), &boot, &log);
        Envoy { child, log, http }
    }

    /// Polls GET `path` (a new connection each time) until it answers 401; the instant it did.
    async fn until_401(&self, path: &str) -> Instant {
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = c
                .get(format!("http://127.0.0.1:{}{path}", self.http))
                .send()
                .await
            {
                if r.status().as_u16() == 401 {
                    return Instant::now();
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!(
            "Envoy never answered 401 on {path}:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // ECDS_BENCH_KEEP_LOGS=DIR keeps every Envoy log (with ECDS_ENVOY_COMPONENT_LOG).
        if let Ok(dir) = std::env::var("ECDS_BENCH_KEEP_LOGS") {
            let n = KEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&self.log, Path::new(&dir).join(format!("envoy-{n:03}.log")));
        }
    }
}

static KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The next request of `s` that is an ECDS request.
async fn ecds_request(s: &mut CpSotw) {
    loop {
        let r = s.recv().await;
        if r.type_url == ECDS {
            return;
        }
    }
}

struct Times {
    first: Duration,
    repush: Duration,
    restart: Duration,
    idle_rss: Option<f64>,
}

/// Who hands Envoy the module.
#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    /// Envoy's own remote fetch.
    Native,
    /// The agent, with one of its code sources.
    Agent(Source),
}

impl How {
    fn label(self) -> &'static str {
        match self {
            How::Native => "Envoy native remote",
            How::Agent(Source::File) => "agent, local.filename",
            How::Agent(Source::Inline) => "agent, local.inline_bytes",
            How::Agent(Source::Remote) => "agent, remote served by the agent",
        }
    }

    fn agent_args(self) -> &'static [&'static str] {
        match self {
            How::Agent(Source::Inline) => &["--inline-max-bytes", "1048576"],
            How::Agent(Source::Remote) => &[
                "--remote-via-cluster",
                "xds-grpc",
                "--remote-min-bytes",
                "1",
            ],
            _ => &[],
        }
    }
}

async fn one_run(size: usize, how: How, srv: &BlobServer) -> Times {
    let via_agent = how != How::Native;
    let dir = crate::tempdir();
    let wasm = plugin(size);
    let sha = crate::support::registry::sha256_hex(&wasm);
    let url = srv.put(
        &format!("plugin-{size}-{}.wasm", rand::random::<u32>()),
        wasm,
    );
    let mut cp = ControlPlane::start().await;
    let agent = if via_agent {
        Some(
            crate::agent(&cp.url())
                .cache_dir(&dir.path().join("cache"))
                .args(how.agent_args().iter().copied())
                .start()
                .await,
        )
    } else {
        None
    };
    let xds_addr = match &agent {
        Some(a) => a.listen.clone(),
        None => cp.url(),
    };
    let xds_port: u16 = xds_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("xds port");
    let modules = srv.addr.to_string();

    // First load.
    let envoy = Envoy::start(dir.path(), xds_port, &modules, 0);
    let mut s = cp.next_sotw().await;
    ecds_request(&mut s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    s.send(ecds_resp(
        "1",
        "n1",
        vec![resource(&url, &sha, "/productpage")],
    ));
    let first = envoy.until_401("/productpage").await - t0;
    let idle_rss = match &agent {
        Some(a) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some(rss_mib(a.pid()).1)
        }
        None => None,
    };

    // Re-push of the same module, new configuration.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    s.send(ecds_resp("2", "n2", vec![resource(&url, &sha, "/p2")]));
    let repush = envoy.until_401("/p2").await - t0;
    drop(envoy);
    drop(s);

    // Envoy restarts; the agent (and its cache) stays.
    let envoy = Envoy::start(dir.path(), xds_port, &modules, 1);
    let mut s = cp.next_sotw().await;
    ecds_request(&mut s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    s.send(ecds_resp(
        "3",
        "n3",
        vec![resource(&url, &sha, "/productpage")],
    ));
    let restart = envoy.until_401("/productpage").await - t0;
    drop(envoy);
    if let (Some(a), Ok(_)) = (&agent, std::env::var("ECDS_BENCH_AGENT_LOG")) {
        eprintln!("--- agent log\n{}", a.log_text());
    }
    Times {
        first,
        repush,
        restart,
        idle_rss,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub async fn run(mode: Mode) -> Vec<Sample> {
    if !crate::support::envoy::path().exists() {
        eprintln!(
            "envoy bench: no Envoy at {} (make envoy)",
            crate::support::envoy::path().display()
        );
        return vec![];
    }
    let (sizes, reps): (&[(usize, &str)], usize) = match mode {
        Mode::Full => (
            &[
                (20 << 10, "20 KiB"),
                (2 << 20, "2 MiB"),
                (20 << 20, "20 MiB"),
            ],
            5,
        ),
        Mode::Smoke => (&[(20 << 10, "20 KiB")], 1),
    };
    // ECDS_BENCH_REPS=1 for a quick look (e.g. with Envoy's trace log kept).
    let reps = std::env::var("ECDS_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(reps);
    // ECDS_BENCH_SIZES=20MiB,2MiB picks sizes by label.
    let pick_sizes = std::env::var("ECDS_BENCH_SIZES").unwrap_or_default();
    let wanted = |label: &str| {
        let l = label.replace(' ', "");
        pick_sizes.is_empty() || pick_sizes.split(',').any(|p| p.eq_ignore_ascii_case(&l))
    };
    let srv = BlobServer::start().await;
    let mut out = vec![];
    let mut idle = vec![];
    for &(size, label) in sizes.iter().filter(|(_, l)| wanted(l)) {
        let mut hows = vec![
            How::Native,
            How::Agent(Source::File),
            How::Agent(Source::Remote),
        ];
        if size as u64 <= ecds_agent::ecds::delivery::INLINE_LIMIT {
            hows.push(How::Agent(Source::Inline));
        }
        let mut runs: Vec<Vec<Times>> = hows.iter().map(|_| vec![]).collect();
        for _ in 0..reps {
            for (k, how) in hows.iter().enumerate() {
                let t = one_run(size, *how, &srv).await;
                if let Some(r) = t.idle_rss {
                    idle.push(r);
                }
                runs[k].push(t);
            }
        }
        let pick = |k: usize, f: fn(&Times) -> Duration| median(runs[k].iter().map(f).collect());
        let small = size < (1 << 20);
        for (what, f, goal, limit) in [
            (
                "first load",
                (|t: &Times| t.first) as fn(&Times) -> Duration,
                if small { "≤ 1.0×" } else { "≤ 1.1×" },
                if small { 1.0 } else { 1.1 },
            ),
            ("re-push, same module", |t: &Times| t.repush, "< 1.0×", 1.0),
            ("after Envoy restart", |t: &Times| t.restart, "< 1.0×", 1.0),
        ] {
            let native = pick(0, f);
            for (k, how) in hows.iter().enumerate().skip(1) {
                let agent = pick(k, f);
                let r = report::ratio(agent, native);
                out.push(Sample {
                    section: "Envoy remote fetch",
                    case: format!("{label} module, {what}, {}", how.label()),
                    agent: report::ms(agent),
                    peer: format!("{} {}", How::Native.label(), report::ms(native)),
                    ratio: Some(r),
                    goal: goal.into(),
                    met: Some(if what == "first load" {
                        r <= limit
                    } else {
                        r < limit
                    }),
                    rss_mib: None,
                });
            }
        }
    }
    if !idle.is_empty() {
        idle.sort_by(|a, b| a.total_cmp(b));
        let r = idle[idle.len() / 2];
        out.push(Sample {
            section: "RSS",
            case: "idle, one real Envoy stream, module delivered".into(),
            agent: format!("{r:.1} MiB"),
            peer: "Istio's agent: about 24 MiB".into(),
            ratio: Some(r / 24.0),
            goal: "< 15 MiB".into(),
            met: Some(r < 15.0),
            rss_mib: Some(r),
        });
    }
    out
}
