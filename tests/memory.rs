//! Memory stays bounded whatever the module's size: the real binary fetches 200 MiB modules
//! over HTTP, as an OCI artifact and as an OCI image (tar.gz layer), and an agent downloads four
//! 100 MiB modules at once. Peak RSS is read from the kernel (`/usr/bin/time -v` for `fetch`,
//! `VmHWM` for the agent); mapped file pages count there too.

mod support;

use std::process::Command;
use std::time::Duration;

use support::registry::sha256_hex;
use support::res::{ecds_remote, local_filename, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, Layout, ModuleServer, Registry};

const MIB: usize = 1 << 20;

fn leb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn section(out: &mut Vec<u8>, id: u8, body: &[u8]) {
    out.push(id);
    leb(out, body.len());
    out.extend_from_slice(body);
}

/// A valid module of about `mib` MiB: one function, half of the bulk in an active data segment
/// and half in a custom section, filled with a repeating pseudo-random block.
fn big_module(mib: usize, seed: u64) -> Vec<u8> {
    let mut block = vec![0u8; 4096];
    let mut x = seed | 1;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let fill = |n: usize| block.iter().copied().cycle().take(n).collect::<Vec<u8>>();
    let half = mib * MIB / 2;
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    section(&mut m, 1, &[1, 0x60, 0, 0]); // type: () -> ()
    section(&mut m, 3, &[1, 0]); // one function of type 0
    section(&mut m, 5, &[1, 0, 1]); // memory: min 1 page
    section(&mut m, 10, &[1, 2, 0, 0x0b]); // code: one empty body
    let mut data = vec![1, 0, 0x41, 0, 0x0b]; // one segment: memory 0, offset i32.const 0
    leb(&mut data, half);
    data.extend(fill(half));
    section(&mut m, 11, &data);
    let mut custom = vec![3];
    custom.extend_from_slice(b"pad");
    custom.extend(fill(half));
    section(&mut m, 0, &custom);
    m
}

/// Runs `ecds-agent fetch` under `/usr/bin/time -v`; returns (stdout, peak RSS in MiB).
fn fetch_peak_rss(url: &str, extra: &[&str]) -> (String, f64) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(support::agent::BIN)
        .args([
            "fetch",
            url,
            "--max-module-bytes",
            "314572800",
            "--timeout",
            "300s",
        ])
        .args(["--http-timeout", "300s"])
        .args(extra)
        .arg("--cache-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("/usr/bin/time (Debian package time; make test-deps)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let kib: f64 = err
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in: {err}"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        kib / 1024.0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetching_a_200_mib_module_stays_under_64_mib_of_rss() {
    let wasm = big_module(200, 7);
    let sha = sha256_hex(&wasm);
    let srv = ModuleServer::start().await;
    srv.put("big.wasm", wasm.clone());
    let reg = Registry::plain().await;
    reg.push("big/artifact", "v1", &wasm, Layout::Artifact)
        .await;
    reg.push("big/image", "v1", &wasm, Layout::Docker).await;
    let cases = [
        ("HTTP", srv.url("big.wasm")),
        ("OCI artifact", reg.url("big/artifact:v1")),
        ("OCI image (tar.gz)", reg.url("big/image:v1")),
    ];
    let mut report = vec![];
    for (what, url) in &cases {
        let (out, mib) = fetch_peak_rss(url, &["--insecure-registries", &reg.addr]);
        assert!(out.contains(&sha), "{what}: {out}");
        report.push(format!("{what}: {mib:.1} MiB"));
        eprintln!("peak RSS, fetch of a 200 MiB module, {what}: {mib:.1} MiB");
        assert!(mib < 64.0, "{what}: peak RSS {mib:.1} MiB (limit 64)");
    }
    eprintln!("{}", report.join("; "));
}

/// Peak RSS (VmHWM) of process `pid`, MiB.
fn vm_hwm(pid: u32) -> f64 {
    support::proc_status(pid, "VmHWM")
        .map(|kib| kib / 1024.0)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_downloading_four_100_mib_modules_at_once_stays_under_128_mib() {
    let srv = ModuleServer::start().await;
    let names = ["m0", "m1", "m2", "m3"];
    for (i, n) in names.iter().enumerate() {
        srv.put(&format!("{n}.wasm"), big_module(100, 11 + i as u64));
    }
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .env("RUST_LOG", "info")
        .start()
        .await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &names).await;
    let slow = Remote {
        timeout_secs: 300,
        ..Default::default()
    };
    let resources = names
        .iter()
        .map(|n| ecds_remote(n, &srv.url(&format!("{n}.wasm")), &slow))
        .collect();
    up.send(ecds_resp("v1", "n1", resources));
    let got = tokio::time::timeout(Duration::from_secs(300), envoy.rx.message())
        .await
        .expect("four modules within 300 s")
        .expect("stream ok")
        .expect("a response");
    assert_eq!(got.resources.len(), 4);
    for r in &got.resources {
        assert!(local_filename(r).ends_with(".wasm"));
    }
    let mib = vm_hwm(agent.pid());
    eprintln!("agent peak RSS, four 100 MiB modules at once: {mib:.1} MiB");
    assert!(mib < 128.0, "agent peak RSS {mib:.1} MiB (limit 128)");
}
