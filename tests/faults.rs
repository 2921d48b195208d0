//! Crash and fault safety of the cache through the real binary: SIGKILL at random points of a
//! slow download, a full disk (size-limited tmpfs), and a process that opens the cache while
//! another is mid-download.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::registry::sha256_hex;
use support::res::{ecds_remote, local_filename, module, open_tec, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, ModuleServer, Route};

const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// A valid module of `n` bytes or a little more (a custom section pads it).
fn sized_module(tag: &str, n: usize) -> Vec<u8> {
    let mut m = module(tag);
    let pad = n.saturating_sub(m.len() + 16);
    let mut body = vec![3, b'p', b'a', b'd'];
    body.resize(4 + pad, 0x5a);
    m.push(0);
    let mut len = body.len();
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            m.push(b);
            break;
        }
        m.push(b | 0x80);
    }
    m.extend_from_slice(&body);
    m
}

/// No partial module is visible, and the index (if any) names only whole, correct files.
fn assert_consistent(cache: &Path) {
    let modules = cache.join("modules");
    if let Ok(rd) = std::fs::read_dir(&modules) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let sha = name
                .strip_suffix(".wasm")
                .expect("only .wasm files in modules/");
            let bytes = std::fs::read(e.path()).unwrap();
            assert_eq!(
                sha256_hex(&bytes),
                sha,
                "modules/{name} is partial or corrupt"
            );
        }
    }
    if let Ok(text) = std::fs::read_to_string(cache.join("index.json")) {
        let index: serde_json::Value = serde_json::from_str(&text).expect("index.json parses");
        for sha in index["modules"].as_object().unwrap().keys() {
            assert!(
                modules.join(format!("{sha}.wasm")).exists(),
                "index names a missing {sha}"
            );
        }
    }
}

fn fetch(url: &str, cache: &Path) -> std::process::Child {
    fetch_with(url, cache, &[])
}

/// `ecds-agent fetch URL` into `cache`, with `extra` flags.
fn fetch_with(url: &str, cache: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(support::agent::BIN)
        .args(["fetch", url, "--timeout", "60s", "--cache-dir"])
        .arg(cache)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_download_leaves_no_partial_file_and_the_next_fetch_works() {
    let srv = ModuleServer::start().await;
    let wasm = sized_module("kill", 4 << 20);
    // 64 pieces, 25 ms apart: a download of about 1.6 s.
    srv.set(
        "slow.wasm",
        Route {
            body: wasm.clone(),
            trickle: Duration::from_millis(25),
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    for at in [150u64, 700, 1300] {
        let mut child = fetch(&srv.url("slow.wasm"), &cache);
        tokio::time::sleep(Duration::from_millis(at)).await;
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        assert_consistent(&cache);
        assert!(
            !cache
                .join("modules")
                .join(format!("{}.wasm", sha256_hex(&wasm)))
                .exists(),
            "killed at {at} ms, yet the module is in place"
        );
    }
    // An agent killed mid-download too.
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).cache_dir(&cache).start().await;
    let (_envoy, up) = sotw_ecds(&agent, &mut cp, &["k"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("k", &srv.url("slow.wasm"), &Remote::default())],
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(agent); // SIGKILL
    assert_consistent(&cache);
    // After the crashes, the next fetch works.
    srv.put("slow.wasm", wasm.clone());
    let out = fetch(&srv.url("slow.wasm"), &cache)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha256_hex(&wasm)));
    assert_consistent(&cache);
}

/// Delivery no longer waits for the fsyncs: an agent killed (SIGKILL) the moment Envoy got the
/// resource leaves the delivered file whole and indexed, and the next process serves the
/// module from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_delivery_keeps_the_delivered_file_whole() {
    let srv = ModuleServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    for round in 0..3 {
        let wasm = sized_module(&format!("delivered-{round}"), 8 << 20);
        let name = format!("m{round}.wasm");
        srv.put(&name, wasm.clone());
        let mut cp = ControlPlane::start().await;
        let agent = Agent::builder(&cp.url()).cache_dir(&cache).start().await;
        let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["k"]).await;
        up.send(ecds_resp(
            "v1",
            "n1",
            vec![ecds_remote("k", &srv.url(&name), &Remote::default())],
        ));
        let got = envoy.recv().await;
        drop(agent); // SIGKILL, as soon as the resource reached Envoy
        let path = local_filename(&got.resources[0]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            sha256_hex(&wasm),
            "round {round}: {path}"
        );
        assert_consistent(&cache);
        // The next process serves it from the cache without downloading (the server no
        // longer has it): the index entry reached the page cache before the delivery.
        srv.set(
            &name,
            Route {
                fail_first: usize::MAX,
                fail_status: 404,
                ..Default::default()
            },
        );
        let out = fetch_with(&srv.url(&name), &cache, &["--sha256", &sha256_hex(&wasm)])
            .wait_with_output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&sha256_hex(&wasm)),
            "round {round}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_consistent(&cache);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_opening_the_cache_mid_download_does_not_break_it() {
    let srv = ModuleServer::start().await;
    let slow = sized_module("mid-slow", 2 << 20);
    srv.set(
        "slow.wasm",
        Route {
            body: slow.clone(),
            trickle: Duration::from_millis(30),
            ..Default::default()
        },
    );
    srv.put("fast.wasm", module("mid-fast"));
    let dir = tempfile::tempdir().unwrap();
    let first = fetch(&srv.url("slow.wasm"), dir.path());
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Meanwhile other processes open the same directory.
    for _ in 0..3 {
        let out = fetch(&srv.url("fast.wasm"), dir.path())
            .wait_with_output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha256_hex(&slow)));
}

/// Mounts a tmpfs of `size` at `dir`; `false` where this machine cannot.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_clean_error_and_heals_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    if !mount_tmpfs(&cache, "3m") {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    }
    let _unmount = Unmount(cache.clone());
    let srv = ModuleServer::start().await;
    let small = module("disk-small");
    let big = sized_module("disk-big", 6 << 20);
    srv.put("small.wasm", small.clone());
    srv.put("big.wasm", big.clone());

    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .cache_dir(&cache)
        .args(["--retry-max-backoff", "1s"])
        .start()
        .await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["small", "big"]).await;
    let small_res = ecds_remote("small", &srv.url("small.wasm"), &Remote::default());
    up.send(ecds_resp("v1", "n1", vec![small_res.clone()]));
    envoy.recv().await;
    up.send(ecds_resp(
        "v2",
        "n2",
        vec![
            small_res,
            ecds_remote("big", &srv.url("big.wasm"), &Remote::default()),
        ],
    ));
    let nack = up.recv().await;
    let msg = nack
        .error_detail
        .expect("a NACK for the module that did not fit")
        .message;
    assert!(msg.contains("\"big\"") && msg.contains("ENOSPC"), "{msg}");
    assert!(!msg.contains("\"small\""), "{msg}");
    let got = envoy.recv().await;
    let small_path = local_filename(&got.resources[0]);
    assert_eq!(
        open_tec(&got.resources[1]).1.type_url,
        HTTP_RBAC,
        "stand-in for big"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&small_path).unwrap()),
        sha256_hex(&small)
    );
    assert_eq!(agent.get("/healthz/live").await.0, 200);
    assert_consistent(&cache);

    // Space is freed: the background retry delivers the module without a new push.
    let ok = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let healed = envoy.recv().await;
        if healed.nonce.starts_with("ecds-agent/") {
            let path = local_filename(&healed.resources[0]);
            assert_eq!(sha256_hex(&std::fs::read(&path).unwrap()), sha256_hex(&big));
            break;
        }
        assert!(Instant::now() < deadline, "no healed delivery");
    }
    assert_eq!(
        sha256_hex(&std::fs::read(&small_path).unwrap()),
        sha256_hex(&small)
    );
    assert_consistent(&cache);
}
