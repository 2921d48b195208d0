//! 3. Cold fetch: `ecds-agent fetch` (a separate process, fresh cache directory each run)
//!    against the tools an operator would use instead, each timed with its peak RSS by
//!    `/usr/bin/time`:
//!    * HTTP from a loopback server vs `curl -o file` + `sha256sum` + `sync file` (fsync);
//!    * OCI artifact layout from docker-registry vs `skopeo copy docker://… dir:`;
//!    * OCI tar.gz image layout vs `skopeo copy` + `tar xzf` of the layer.
//!
//! The agent does more than each peer: it also validates the Wasm and writes its index.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::report::{self, Sample};
use crate::support::{Layout, Registry};
use crate::Mode;

/// A valid Wasm module of exactly `size` bytes (at least 24): the empty module plus one
/// custom section of pseudo-random (incompressible) bytes.
pub fn module_of_size(size: usize) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend(custom_section(size - m.len()));
    m
}

/// A custom section named `bench` of exactly `len` bytes (at least 16), payload pseudo-random.
pub fn custom_section(len: usize) -> Vec<u8> {
    const NAME: &[u8] = b"bench";
    assert!(len >= 16, "a custom section of {len} bytes");
    // id (1 byte) + LEB128 of the body length (w bytes) + body (name length, name, payload).
    let w = (1..=5)
        .find(|&w| leb128((len - 1 - w) as u64).len() == w)
        .expect("a LEB128 width that fits");
    let mut s = Vec::with_capacity(len);
    s.push(0);
    s.extend(leb128((len - 1 - w) as u64));
    s.push(NAME.len() as u8);
    s.extend_from_slice(NAME);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while s.len() + 8 <= len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.extend_from_slice(&x.to_le_bytes());
    }
    s.resize(len, 0x5a);
    s
}

fn leb128(mut v: u64) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Serves `Bytes` bodies (no copy per request) on loopback.
pub struct BlobServer {
    pub addr: std::net::SocketAddr,
    bodies: Arc<std::sync::Mutex<std::collections::HashMap<String, Bytes>>>,
}

impl BlobServer {
    pub async fn start() -> BlobServer {
        let bodies: Arc<std::sync::Mutex<std::collections::HashMap<String, Bytes>>> =
            Default::default();
        let b = bodies.clone();
        let app = axum::Router::new().route(
            "/{*path}",
            axum::routing::get(move |axum::extract::Path(p): axum::extract::Path<String>| {
                let b = b.clone();
                async move {
                    let body = b.lock().ok().and_then(|m| m.get(&p).cloned());
                    match body {
                        Some(body) => (axum::http::StatusCode::OK, body),
                        None => (axum::http::StatusCode::NOT_FOUND, Bytes::new()),
                    }
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(l, app).await });
        BlobServer { addr, bodies }
    }

    pub fn put(&self, path: &str, body: Vec<u8>) -> String {
        if let Ok(mut m) = self.bodies.lock() {
            m.insert(path.into(), Bytes::from(body));
        }
        format!("http://{}/{path}", self.addr)
    }
}

/// Runs `sh -c cmd` under `/usr/bin/time`; (wall time, peak RSS MiB of the largest process).
/// The wall time is taken here (`time`'s own has 10 ms steps).
fn timed(cmd: &str) -> (Duration, f64) {
    let t0 = std::time::Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "@@%e %M", "sh", "-c", cmd])
        .output()
        .expect("/usr/bin/time (Debian package `time`)");
    let wall = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{cmd}` failed:\n{err}");
    let line = err
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("@@"))
        .unwrap_or("0 0");
    let mut it = line.split_whitespace();
    let _secs = it.next();
    let kib: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (wall, kib / 1024.0)
}

/// Median of `n` runs of `cmd(i)` (each its own fresh directory); (time, peak RSS).
fn median(n: usize, mut cmd: impl FnMut(usize) -> String) -> (Duration, f64) {
    let mut runs: Vec<(Duration, f64)> = (0..n).map(|i| timed(&cmd(i))).collect();
    runs.sort_by_key(|r| r.0);
    let rss = runs.iter().fold(0.0f64, |a, r| a.max(r.1));
    (runs[n / 2].0, rss)
}

fn sample(case: String, agent: (Duration, f64), peer: (Duration, f64), peer_name: &str) -> Sample {
    let r = report::ratio(agent.0, peer.0);
    Sample {
        section: "cold fetch",
        case,
        agent: report::ms(agent.0),
        peer: format!("{peer_name} {}", report::ms(peer.0)),
        ratio: Some(r),
        goal: "≤ 1.0×, RSS < 64 MiB".into(),
        met: Some(r <= 1.0 && agent.1 < 64.0),
        rss_mib: Some(agent.1),
    }
}

pub async fn run(mode: Mode) -> (Vec<Sample>, String) {
    let sizes_mib: &[usize] = match mode {
        Mode::Full => &[1, 32, 200],
        Mode::Smoke => &[1],
    };
    let reps = match mode {
        Mode::Full => 5,
        Mode::Smoke => 1,
    };
    let bin = crate::bin();
    let work = crate::tempdir();
    let w = work.path().display().to_string();
    let srv = BlobServer::start().await;
    let reg = Registry::plain().await;
    let mut out = vec![];
    let (mut http_agent, mut http_curl) = (vec![], vec![]);
    for &mib in sizes_mib {
        let size = mib << 20;
        let wasm = module_of_size(size);
        let sha = crate::support::registry::sha256_hex(&wasm);
        let url = srv.put(&format!("m{mib}.wasm"), wasm.clone());
        let max = format!("--max-module-bytes {}", size + (16 << 20));
        let agent = |kind: &str, url: &str, extra: &str| {
            let (bin, w, kind, url, extra, max) = (
                bin.display().to_string(),
                w.clone(),
                kind.to_owned(),
                url.to_owned(),
                extra.to_owned(),
                max.clone(),
            );
            move |i: usize| {
                format!(
                    "RUST_LOG=warn {bin} fetch '{url}' --cache-dir {w}/agent-{kind}-{mib}-{i} {max} {extra} >/dev/null"
                )
            }
        };
        // HTTP.
        let a = median(reps, agent("http", &url, &format!("--sha256 {sha}")));
        let p = median(reps, |i| {
            let f = format!("{w}/curl-{mib}-{i}.wasm");
            format!("curl -sSf -o {f} '{url}' && sha256sum {f} >/dev/null && sync {f}")
        });
        http_agent.push((mib as f64, a.0.as_secs_f64() * 1e3));
        http_curl.push((mib as f64, p.0.as_secs_f64() * 1e3));
        out.push(sample(
            format!("HTTP, {mib} MiB"),
            a,
            p,
            "curl + sha256sum + fsync",
        ));
        // OCI, both layouts.
        for (layout, label, untar) in [
            (Layout::Artifact, "OCI artifact", false),
            (Layout::OciImage, "OCI tar.gz image", true),
        ] {
            let repo = format!("bench/m{mib}-{}", if untar { "image" } else { "artifact" });
            reg.push(&repo, "v1", &wasm, layout).await;
            let oci = format!("oci://{}/{repo}:v1", reg.addr);
            let insecure = format!("--insecure-registries {}", reg.addr);
            let a = median(
                reps,
                agent(if untar { "img" } else { "art" }, &oci, &insecure),
            );
            let p = median(reps, |i| {
                let d = format!("{w}/skopeo-{mib}-{untar}-{i}");
                let copy = format!(
                    "skopeo copy -q --src-tls-verify=false docker://{}/{repo}:v1 dir:{d}",
                    reg.addr
                );
                if untar {
                    format!("{copy} && mkdir {d}/x && tar xzf $(ls -S {d}/* | head -1) -C {d}/x")
                } else {
                    copy
                }
            });
            out.push(sample(
                format!("{label}, {mib} MiB"),
                a,
                p,
                if untar {
                    "skopeo copy + tar xzf"
                } else {
                    "skopeo copy"
                },
            ));
        }
        // Keep the disk from filling with 200 MiB copies.
        let _ = Command::new("sh")
            .args(["-c", &format!("rm -rf {w}/*")])
            .status();
    }
    let chart = report::line_chart(
        "Cold HTTP fetch: time vs module size",
        "module size (MiB)",
        "ms",
        &[
            ("ecds-agent fetch".into(), "#d62728", http_agent),
            ("curl+sha256sum+fsync".into(), "#1f77b4", http_curl),
        ],
        false,
    );
    (out, chart)
}
