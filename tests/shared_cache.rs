//! A cache directory shared by several agents (a node-level `hostPath`): one agent's in-use
//! module survives another agent's short expiry, for as long as the first agent lives.

mod support;

use std::time::{Duration, Instant};

use support::res::{ecds_remote, local_filename, module, Remote};
use support::xds::{ack, ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, ModuleServer};

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn another_agents_in_use_module_survives_a_short_expiry_until_that_agent_dies() {
    let srv = ModuleServer::start().await;
    srv.put("m.wasm", module("shared-pin"));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");

    // Agent A: its Envoy uses the module.
    let mut cp_a = ControlPlane::start().await;
    let a = Agent::builder(&cp_a.url()).cache_dir(&cache).start().await;
    let (mut envoy, up) = sotw_ecds(&a, &mut cp_a, &["p"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("p", &srv.url("m.wasm"), &Remote::default())],
    ));
    let path = local_filename(&envoy.recv().await.resources[0]);
    envoy.send(ack(&["p"], "v1", "n1"));

    // Agent B on the same directory purges every second anything unused for a second.
    let cp_b = ControlPlane::start().await;
    let b = Agent::builder(&cp_b.url())
        .cache_dir(&cache)
        .env("WASM_MODULE_EXPIRY", "1s")
        .env("WASM_PURGE_INTERVAL", "1s")
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        std::path::Path::new(&path).exists(),
        "B purged the module A's Envoy runs:\n{}",
        b.log_text()
    );

    // A dies (SIGKILL): its pins go with it, and B may purge the module now.
    drop(envoy);
    drop(a);
    wait_until("B purges the module no live process uses", || {
        !std::path::Path::new(&path).exists()
    })
    .await;
    // The index does not bring it back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let index = std::fs::read_to_string(cache.join("index.json")).unwrap();
    let sha = std::path::Path::new(&path)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(!index.contains(&sha), "{index}");
}

#[test]
fn a_read_only_cache_dir_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ro");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,ro", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a read-only tmpfs here (needs root and mount rights)");
        return;
    }
    let out = std::process::Command::new(support::agent::BIN)
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--upstream", "http://127.0.0.1:1", "--cache-dir"])
        .arg(&mnt)
        .output()
        .unwrap();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--cache-dir")
            && err.contains(mnt.to_str().unwrap())
            && err.contains("Read-only"),
        "{err}"
    );
}
