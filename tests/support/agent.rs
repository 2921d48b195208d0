//! The real `ecds-agent` binary as a child process, with its admin port polled for readiness.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ecds-agent");

/// A free TCP port on 127.0.0.1 (bound and released), taken below the kernel's ephemeral
/// range: a port from `bind(:0)` is ephemeral, so any outgoing connection of a test running in
/// parallel could take it before the process meant to listen there binds it (seen as Envoy's
/// "cannot bind … Address already in use"). Ports are handed out in sequence from a per-process
/// start, so one test binary never gets the same port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        let (lo, span) = (10_000u32, low - 10_000);
        let start = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let p = lo + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if TcpListener::bind(("127.0.0.1", p as u16)).is_ok() {
                return p as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A numeric field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `Threads`, …): kB for the
/// memory fields, a count for the others; `None` if the process or the field is gone.
pub fn proc_status(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `proc_status` of a memory field in MiB (0 when unreadable).
pub fn proc_mib(pid: u32, field: &str) -> f64 {
    proc_status(pid, field).unwrap_or(0.0) / 1024.0
}

pub struct Agent {
    child: Option<Child>,
    pub admin: String,
    /// TCP address Envoy connects to (`None` for a Unix socket).
    pub listen: String,
    pub cache_dir: PathBuf,
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub struct AgentBuilder {
    upstream: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cache_dir: Option<PathBuf>,
    listen: Option<String>,
}

impl AgentBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn cache_dir(mut self, p: &Path) -> Self {
        self.cache_dir = Some(p.to_owned());
        self
    }
    pub fn listen(mut self, l: &str) -> Self {
        self.listen = Some(l.into());
        self
    }

    /// Starts the agent; a port taken meanwhile by another process (free_port's race) is
    /// retried with fresh ports.
    pub async fn start(self) -> Agent {
        for _ in 0..4 {
            let agent = self.spawn();
            match agent.wait_ready().await {
                Ok(()) => return agent,
                Err(log) if log.contains("Address already in use") && self.listen.is_none() => {
                    continue
                }
                Err(log) => panic!("agent not ready; log:\n{log}"),
            }
        }
        panic!("agent: no free ports after 4 tries");
    }

    fn spawn(&self) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let cache_dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| tmp.path().join("cache"));
        let admin = format!("127.0.0.1:{}", free_port());
        let listen = self
            .listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let log = tmp.path().join("agent.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args([
                "--listen",
                &listen,
                "--upstream",
                &self.upstream,
                "--admin",
                &admin,
            ])
            .arg("--cache-dir")
            .arg(&cache_dir)
            .args(&self.args)
            .env("RUST_LOG", "info,ecds_agent=trace")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn ecds-agent");
        Agent {
            child: Some(child),
            admin,
            listen,
            cache_dir,
            log,
            _tmp: Some(tmp),
        }
    }
}

impl Agent {
    pub fn builder(upstream: &str) -> AgentBuilder {
        AgentBuilder {
            upstream: upstream.into(),
            args: vec![],
            env: vec![],
            cache_dir: None,
            listen: None,
        }
    }

    /// Waits for /healthz/ready; `Err(log)` when the agent exits or never gets ready.
    async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(format!("http://{}/healthz/ready", self.admin)).await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            let exited = self.child.as_ref().map(|c| c.id()).is_some_and(|pid| {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| s.contains(") Z "))
            });
            if exited || Instant::now() > deadline {
                return Err(self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .expect("admin request");
        let code = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        super::assert_no_secrets(path, &body);
        (code, body)
    }

    pub async fn metrics(&self) -> String {
        self.get("/stats/prometheus").await.1
    }

    /// The value of the series `name{labels}` (labels as written, e.g. `result="success"`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for exit; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("agent already stopped");
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("agent did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, started.elapsed())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log_text());
        } else {
            super::assert_no_secrets("the agent log", &self.log_text());
        }
    }
}

/// Reads one series from Prometheus text; 0 when absent.
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let matches = if labels.is_empty() {
            series == name
        } else {
            series.starts_with(&format!("{name}{{"))
                && labels.split(',').all(|l| series.contains(l))
        };
        if matches {
            return value.parse().unwrap_or(0.0);
        }
    }
    0.0
}

/// A finished command's stdout and stderr, as one text.
pub fn output_text(o: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    super::assert_no_secrets("a command's output", &text);
    text
}
