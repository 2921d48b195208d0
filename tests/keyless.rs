//! Keyless signatures under `--verify-policy`, with no network: the material in
//! `testdata/keyless/` comes from a throwaway local Sigstore (sigstore-go's VirtualSigstore: a
//! Fulcio-style CA, a Rekor log key, a TSA), made by `scripts/keyless-testdata.sh`. The OCI
//! artifact is pushed byte for byte (its manifest digest is what was signed), the bundles as
//! OCI 1.1 referrers, to the real docker-registry; the HTTP module and its `.sigstore.json` are
//! served by a real HTTP server.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::agent::output_text as text;
use support::registry::sha256_hex;
use support::res::{ecds_remote, local_filename, open_tec, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, ModuleServer, Registry};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/keyless")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(data().join(name)).unwrap()
}

fn identity() -> String {
    String::from_utf8(read("identity.txt")).unwrap()
}

fn issuer() -> String {
    String::from_utf8(read("issuer.txt")).unwrap()
}

/// Pushes the signed artifact to `repo:v1` byte for byte (its manifest digest is what was
/// signed); returns that digest.
async fn push_artifact(reg: &Registry, repo: &str) -> String {
    reg.push_blob(repo, &read("config.json")).await;
    reg.push_blob(repo, &read("module.wasm")).await;
    let digest = reg
        .push_manifest_bytes(
            repo,
            "v1",
            "application/vnd.oci.image.manifest.v1+json",
            read("manifest.json"),
        )
        .await;
    digest
}

/// Pushes the signed artifact to `repo:v1`, and `bundle` as its referrer.
async fn push_signed(reg: &Registry, repo: &str, bundle: &str) -> String {
    let digest = push_artifact(reg, repo).await;
    reg.push_bundle_referrer(repo, &digest, &read(bundle)).await;
    digest
}

/// Pushes the signed artifact to `repo:v1` with cosign's legacy keyless signature: the
/// `sha256-<hex>.sig` manifest whose simple-signing layer carries the signature, the
/// certificate and the Rekor bundle in annotations.
async fn push_legacy(reg: &Registry, repo: &str) {
    use base64::Engine;
    let digest = push_artifact(reg, repo).await;
    let legacy: serde_json::Value = serde_json::from_slice(&read("legacy-sig.json")).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(legacy["payload"].as_str().unwrap())
        .unwrap();
    let config = b"{}".to_vec();
    let cd = reg.push_blob(repo, &config).await;
    let ld = reg.push_blob(repo, &payload).await;
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": ld, "size": payload.len(),
            "annotations": {
                "dev.cosignproject.cosign/signature": legacy["signature"],
                "dev.sigstore.cosign/certificate": legacy["certificate"],
                "dev.sigstore.cosign/bundle": legacy["bundle"],
            }
        }],
    });
    let tag = format!("{}.sig", digest.replace(':', "-"));
    reg.push_manifest(repo, &tag, mt, &m).await;
}

/// A policy with one keyless rule for `pattern`.
fn policy(dir: &Path, pattern: &str, identity_line: &str, issuer: &str, root: &str) -> PathBuf {
    let p = dir.join(format!(
        "policy-{}.toml",
        sha256_hex(identity_line.as_bytes())
    ));
    std::fs::write(
        &p,
        format!(
            "[[rule]]\nmatch = \"{pattern}\"\nissuer = \"{issuer}\"\n{identity_line}\ntrusted_root = \"{}\"\n",
            data().join(root).display()
        ),
    )
    .unwrap();
    p
}

fn fetch(url: &str, insecure: &str, policy: &Path, cache: &Path) -> Output {
    Command::new(support::agent::BIN)
        .args([
            "fetch",
            url,
            "--insecure-registries",
            insecure,
            "--timeout",
            "20s",
        ])
        .arg("--verify-policy")
        .arg(policy)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

const GOOD_REGEXP: &str =
    "identity_regexp = \"^https://github.com/example-org/wasm-plugins/.github/workflows/.+@refs/tags/v.+$\"";

/// cosign's legacy keyless layout (certificate and Rekor bundle in the `.sig` layer's annotations).
#[tokio::test]
async fn legacy_keyless_signatures() {
    let reg = Registry::plain().await;
    push_legacy(&reg, "kl/legacy").await;
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/kl/*", reg.addr);
    let good = policy(
        dir.path(),
        &pattern,
        GOOD_REGEXP,
        &issuer(),
        "trusted_root.json",
    );
    let out = fetch(
        &reg.url("kl/legacy:v1"),
        &reg.addr,
        &good,
        &dir.path().join("c1"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let wrong = policy(
        dir.path(),
        &pattern,
        "identity = \"someone@example.com\"",
        &issuer(),
        "trusted_root.json",
    );
    let out = fetch(
        &reg.url("kl/legacy:v1"),
        &reg.addr,
        &wrong,
        &dir.path().join("c2"),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("identity mismatch"), "{}", text(&out));
    let expired = policy(
        dir.path(),
        &pattern,
        GOOD_REGEXP,
        &issuer(),
        "trusted_root_expired.json",
    );
    let out = fetch(
        &reg.url("kl/legacy:v1"),
        &reg.addr,
        &expired,
        &dir.path().join("c3"),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no trusted certificate authority"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn keyless_signatures_on_oci_modules() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/kl/*", reg.addr);
    let exact = format!("identity = \"{}\"", identity());
    // (repo, bundle, identity line, issuer, trust root, refusal that must be named)
    type Case<'a> = (&'a str, &'a str, String, String, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        // (repo, bundle, identity line, issuer, trust root, refusal that must be named)
        (
            "kl/ok",
            "oci-ok.sigstore.json",
            GOOD_REGEXP.into(),
            issuer(),
            "trusted_root.json",
            None,
        ),
        (
            "kl/exact",
            "oci-ok.sigstore.json",
            exact.clone(),
            issuer(),
            "trusted_root.json",
            None,
        ),
        (
            "kl/wrong-identity",
            "oci-ok.sigstore.json",
            "identity_regexp = \"^https://github.com/other-org/.+$\"".into(),
            issuer(),
            "trusted_root.json",
            Some("identity mismatch"),
        ),
        (
            "kl/wrong-issuer",
            "oci-ok.sigstore.json",
            exact.clone(),
            "https://accounts.google.com".into(),
            "trusted_root.json",
            Some("issuer mismatch"),
        ),
        (
            "kl/expired",
            "oci-expired-no-timestamp.sigstore.json",
            exact.clone(),
            issuer(),
            "trusted_root.json",
            Some("time"),
        ),
        (
            "kl/tampered",
            "oci-tampered-log.sigstore.json",
            exact.clone(),
            issuer(),
            "trusted_root.json",
            Some("inclusion promise"),
        ),
        (
            "kl/other-digest",
            "oci-other-digest.sigstore.json",
            exact.clone(),
            issuer(),
            "trusted_root.json",
            Some("artifact mismatch"),
        ),
        (
            "kl/root-expired",
            "oci-ok.sigstore.json",
            exact.clone(),
            issuer(),
            "trusted_root_expired.json",
            Some("no trusted certificate authority is valid"),
        ),
    ];
    for (repo, bundle, id_line, iss, root, refusal) in cases {
        push_signed(&reg, repo, bundle).await;
        let p = policy(dir.path(), &pattern, &id_line, &iss, root);
        let cache = dir.path().join(format!("cache-{}", repo.replace('/', "-")));
        let out = fetch(&reg.url(&format!("{repo}:v1")), &reg.addr, &p, &cache);
        match refusal {
            None => {
                assert!(out.status.success(), "{repo}: {}", text(&out));
                assert!(
                    text(&out).contains(&sha256_hex(&read("module.wasm"))),
                    "{repo}"
                );
            }
            Some(why) => {
                assert!(!out.status.success(), "{repo} passed: {}", text(&out));
                assert!(
                    text(&out).contains("signature check") && text(&out).contains(why),
                    "{repo}: want {why:?} in {}",
                    text(&out)
                );
                let stored = std::fs::read_dir(cache.join("modules"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                assert_eq!(stored, 0, "{repo}: nothing stored");
            }
        }
    }
}

// Multi-threaded: the module server runs on this runtime while `fetch` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_signatures_on_http_modules() {
    let srv = ModuleServer::start().await;
    srv.put("m.wasm", read("module.wasm"));
    srv.put("m.wasm.sigstore.json", read("module.wasm.sigstore.json"));
    srv.put("unsigned.wasm", read("module.wasm"));
    let dir = tempfile::tempdir().unwrap();
    let host = srv
        .url("m.wasm")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let good = policy(dir.path(), "*", GOOD_REGEXP, &issuer(), "trusted_root.json");
    let out = fetch(&srv.url("m.wasm"), &host, &good, &dir.path().join("c1"));
    assert!(out.status.success(), "{}", text(&out));
    let out = fetch(
        &srv.url("unsigned.wasm"),
        &host,
        &good,
        &dir.path().join("c2"),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no sigstore bundle at"),
        "{}",
        text(&out)
    );
    let other = policy(
        dir.path(),
        "*",
        "identity = \"someone@example.com\"",
        &issuer(),
        "trusted_root.json",
    );
    let out = fetch(&srv.url("m.wasm"), &host, &other, &dir.path().join("c3"));
    assert!(!out.status.success());
    assert!(text(&out).contains("identity mismatch"), "{}", text(&out));
}

/// Through ECDS: a wrong identity gives the stand-in and a NACK saying what did not match;
/// the right one, a local file.
#[tokio::test]
async fn keyless_through_ecds() {
    let reg = Registry::plain().await;
    push_signed(&reg, "kl/ecds", "oci-ok.sigstore.json").await;
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/kl/*", reg.addr);
    for (id_line, ok) in [
        ("identity = \"someone@example.com\"".to_string(), false),
        (GOOD_REGEXP.to_string(), true),
    ] {
        let p = policy(
            dir.path(),
            &pattern,
            &id_line,
            &issuer(),
            "trusted_root.json",
        );
        let mut cp = ControlPlane::start().await;
        let agent = Agent::builder(&cp.url())
            .args(["--insecure-registries", &reg.addr])
            .args(["--verify-policy", p.to_str().unwrap()])
            .start()
            .await;
        let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["signed"]).await;
        up.send(ecds_resp(
            "v1",
            "n1",
            vec![ecds_remote(
                "signed",
                &reg.url("kl/ecds:v1"),
                &Remote::default(),
            )],
        ));
        let got = envoy.recv().await;
        if ok {
            let path = local_filename(&got.resources[0]);
            assert_eq!(
                sha256_hex(&std::fs::read(path).unwrap()),
                sha256_hex(&read("module.wasm"))
            );
        } else {
            assert!(open_tec(&got.resources[0]).1.type_url.ends_with("RBAC"));
            let detail = up.recv().await.error_detail.expect("a NACK").message;
            assert!(
                detail.contains("\"signed\"")
                    && detail.contains("identity mismatch")
                    && detail.contains("someone@example.com"),
                "{detail}"
            );
            let m = agent.metrics().await;
            assert!(
                support::agent::metric_value(
                    &m,
                    "ecds_agent_wasm_signature_checks",
                    "result=\"failed\""
                ) >= 1.0,
                "{m}"
            );
        }
    }
}
