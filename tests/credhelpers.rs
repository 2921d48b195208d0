//! Docker credential helpers (`credHelpers`, `credsStore`) through `ecds-agent fetch`, against
//! the TLS + htpasswd docker-registry, with small helper programs of the test's own on PATH.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::registry::{pki, sha256_hex, PASS, USER};
use support::res::module;
use support::res::{ecds_remote, local_filename, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, Layout, Registry};

/// Writes `docker-credential-<name>` (a shell script) into `bin`.
fn helper(bin: &Path, name: &str, body: &str) {
    let p = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn fetch(reg: &Registry, bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(support::agent::BIN);
    cmd.args([
        "fetch",
        &reg.url("team/helped:1.0"),
        "--fetch-ca",
        pki().ca.to_str().unwrap(),
    ])
    .args(extra)
    .arg("--cache-dir")
    .arg(dir.path())
    .env("PATH", path)
    .env_remove("DOCKER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

use support::agent::output_text as text;

fn config(dir: &Path, name: &str, json: serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(&json).unwrap()).unwrap();
    p
}

#[tokio::test]
async fn credential_helpers_supply_registry_credentials() {
    let reg = Registry::secure().await;
    let w = module("helped");
    reg.push("team/helped", "1.0", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = dir.path().join("asked");
    helper(
        &bin,
        "good",
        &format!(
            "[ \"$1\" = get ] || exit 2\ncat > {}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}' \"$(cat {})\"",
            asked.display(),
            asked.display()
        ),
    );
    helper(&bin, "fails", &format!("echo 'oops {PASS}' >&2\nexit 1"));
    helper(&bin, "hangs", "sleep 30");
    helper(&bin, "garbage", &format!("echo 'not json {PASS}'"));
    let sha = sha256_hex(&w);

    // credHelpers for this registry, from --docker-config.
    let c = config(
        dir.path(),
        "helpers.json",
        serde_json::json!({"credHelpers": {reg.addr.clone(): "good"}}),
    );
    let out = fetch(&reg, &bin, &["--docker-config", c.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&sha));
    assert_eq!(
        std::fs::read_to_string(&asked).unwrap(),
        reg.addr,
        "the helper got the registry host"
    );

    // credsStore, from DOCKER_CONFIG/config.json.
    let docker_dir = dir.path().join("docker");
    std::fs::create_dir(&docker_dir).unwrap();
    config(
        &docker_dir,
        "config.json",
        serde_json::json!({"credsStore": "good", "auths": {}}),
    );
    let out = fetch(
        &reg,
        &bin,
        &[],
        &[("DOCKER_CONFIG", docker_dir.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", text(&out));

    // A pull secret naming a helper works the same way.
    let s = config(
        dir.path(),
        "secret.json",
        serde_json::json!({"credHelpers": {reg.addr.clone(): "good"}}),
    );
    let out = fetch(&reg, &bin, &["--pull-secret", s.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));

    // Helpers that fail, hang or print garbage: clear errors, never the secret.
    for (name, want) in [
        ("fails", "docker-credential-fails failed"),
        ("hangs", "did not answer within"),
        ("garbage", "printed no credentials JSON"),
        (
            "missing",
            "cannot run credential helper docker-credential-missing",
        ),
    ] {
        let c = config(
            dir.path(),
            &format!("{name}.json"),
            serde_json::json!({"credHelpers": {reg.addr.clone(): name}}),
        );
        let out = fetch(&reg, &bin, &["--docker-config", c.to_str().unwrap()], &[]);
        assert!(!out.status.success(), "{name}");
        assert!(text(&out).contains(want), "{name}: {}", text(&out));
        assert!(
            !text(&out).contains(PASS),
            "{name} leaked the secret: {}",
            text(&out)
        );
    }
    // A helper name that is not a plain program name is refused.
    let c = config(
        dir.path(),
        "evil.json",
        serde_json::json!({"credHelpers": {reg.addr.clone(): "../../bin/sh"}}),
    );
    let out = fetch(&reg, &bin, &["--docker-config", c.to_str().unwrap()], &[]);
    assert!(
        text(&out).contains("not a plain program name"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn the_agent_uses_a_credential_helper_from_its_docker_config() {
    let reg = Registry::secure().await;
    let w = module("agent-helped");
    reg.push("team/helped", "1.0", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    helper(
        &bin,
        "agent",
        &format!("cat >/dev/null\nprintf '{{\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}'"),
    );
    let c = config(
        dir.path(),
        "config.json",
        serde_json::json!({"credHelpers": {reg.addr.clone(): "agent"}}),
    );
    let mut cp = ControlPlane::start().await;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let agent = Agent::builder(&cp.url())
        .args([
            "--docker-config",
            c.to_str().unwrap(),
            "--fetch-ca",
            pki().ca.to_str().unwrap(),
        ])
        .env("PATH", &path)
        .start()
        .await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["h"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            "h",
            &reg.url("team/helped:1.0"),
            &Remote::default(),
        )],
    ));
    let got = envoy.recv().await;
    assert!(local_filename(&got.resources[0]).ends_with(&format!("{}.wasm", sha256_hex(&w))));
    assert!(
        !agent.log_text().contains(PASS),
        "the secret reached the log"
    );
}
