//! A shared cache no one can talk past: a private module pulled with one tenant's credentials is
//! handed to another only after that tenant's own credentials pull it (one manifest HEAD per
//! TTL, counted in the real registry's access log), through `ecds-agent fetch` and through
//! `run` with ECDS. Signature-policy cases on the hit path live in `tests/signatures.rs`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::agent::output_text as text;
use support::registry::{pki, pull_secret, sha256_hex, PASS, USER};
use support::res::{ecds_remote, local_filename, module, open_tec, Remote};
use support::xds::{ack, ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, Layout, Registry};

const SECRET_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
const POLICY_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";

fn fetch(url: &str, cache: &Path, extra: &[&str]) -> Output {
    Command::new(support::agent::BIN)
        .args([
            "fetch",
            url,
            "--pull-policy",
            "IfNotPresent",
            "--timeout",
            "20s",
        ])
        .args(["--fetch-ca", pki().ca.to_str().unwrap()])
        .args(extra)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

/// `HEAD` requests for `repo`'s manifests the registry answered with 200 (its access log).
fn manifest_heads(reg: &Registry, repo: &str) -> usize {
    let needle = format!("\"HEAD /v2/{repo}/manifests/");
    reg.log_text()
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("\" 200 "))
        .count()
}

#[tokio::test]
async fn a_private_module_is_not_handed_to_a_requester_without_credentials() {
    let reg = Registry::secure().await;
    let w = module("private-cli");
    reg.push("cred/mod", "v1", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let good = dir.path().join("good.json");
    std::fs::write(&good, pull_secret(&reg.addr, USER, PASS)).unwrap();
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, pull_secret(&reg.addr, USER, "not-the-password")).unwrap();
    let url = reg.url("cred/mod:v1");

    // Tenant A, with credentials, pulls the module into the shared cache.
    let out = fetch(&url, &cache, &["--pull-secret", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("source: network"), "{}", text(&out));
    assert_eq!(support::modules_in(&cache), 1);

    // Tenant B has no credentials for the registry, and tenant C the wrong ones: refused,
    // naming why, without the cached file.
    for (who, extra) in [
        ("none", vec![]),
        ("wrong", vec!["--pull-secret", wrong.to_str().unwrap()]),
    ] {
        let out = fetch(&url, &cache, &extra);
        assert!(!out.status.success(), "{who}: {}", text(&out));
        assert!(
            text(&out).contains("private") && text(&out).contains("credentials"),
            "{who}: {}",
            text(&out)
        );
        assert!(!text(&out).contains("source: cache"), "{who}");
        assert!(!text(&out).contains(PASS) && !text(&out).contains("not-the-password"));
    }
    assert_eq!(support::modules_in(&cache), 1, "nothing written");

    // A spelling of the same registry is the same module and the same rule.
    let upper = url.replace("127.0.0.1", "127.000.0.1");
    let out = fetch(&upper, &cache, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("private"), "{}", text(&out));

    // Tenant A again (a new process): its credentials are shown with one HEAD, no download.
    let heads = manifest_heads(&reg, "cred/mod");
    let blobs = reg.blob_gets("cred/mod");
    let out = fetch(&url, &cache, &["--pull-secret", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("source: cache"), "{}", text(&out));
    assert!(text(&out).contains(&sha256_hex(&w)));
    assert_eq!(manifest_heads(&reg, "cred/mod"), heads + 1, "one HEAD");
    assert_eq!(reg.blob_gets("cred/mod"), blobs, "no download");
}

#[tokio::test]
async fn a_public_module_needs_no_check_and_the_cache_serves_it_with_the_registry_down() {
    let mut reg = Registry::plain().await;
    let w = module("public-cli");
    reg.push("open/mod", "v1", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = reg.url("open/mod:v1");
    let addr = reg.addr.clone();
    let insecure = ["--insecure-registries", &addr];
    let out = fetch(&url, &cache, &insecure);
    assert!(out.status.success(), "{}", text(&out));
    reg.stop();
    let out = fetch(&url, &cache, &insecure);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("source: cache"), "{}", text(&out));
}

#[tokio::test]
async fn through_ecds_a_private_module_needs_the_resources_own_pull_secret_proven_once_per_ttl() {
    let reg = Registry::secure().await;
    let w = module("private-ecds");
    reg.push("cred/ecds", "v1", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let good = dir.path().join("good.json");
    std::fs::write(&good, pull_secret(&reg.addr, USER, PASS)).unwrap();
    // Another tenant's process pulled the private module into the shared cache.
    let out = fetch(
        &reg.url("cred/ecds:v1"),
        &cache,
        &["--pull-secret", good.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));

    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .cache_dir(&cache)
        .args(["--fetch-ca", pki().ca.to_str().unwrap()])
        .start()
        .await;
    let names = ["extensions.istio.io/wasmplugin/ns.private"];
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &names).await;

    // No pull secret in the resource: stand-in to Envoy, NACK upstream naming the credentials.
    let bare = ecds_remote(
        names[0],
        &reg.url("cred/ecds:v1"),
        &Remote {
            env: vec![(POLICY_ENV.into(), "IfNotPresent".into())],
            ..Default::default()
        },
    );
    up.send(ecds_resp("v1", "n1", vec![bare]));
    let nack = up.recv().await;
    let detail = nack.error_detail.expect("a NACK").message;
    assert!(
        detail.contains("private") && detail.contains("credentials"),
        "{detail}"
    );
    let got = envoy.recv().await;
    let (_, tc) = open_tec(&got.resources[0]);
    assert!(tc.type_url.ends_with("rbac.v3.RBAC"), "{}", tc.type_url);
    envoy.send(ack(&names, "v1", "n1"));

    // With the pull secret: served from the cache after one HEAD; later pushes within the TTL
    // cost nothing at the registry.
    let secret = String::from_utf8(pull_secret(&reg.addr, USER, PASS)).unwrap();
    let heads = manifest_heads(&reg, "cred/ecds");
    let blobs = reg.blob_gets("cred/ecds");
    for (i, version) in ["v2", "v3", "v4"].iter().enumerate() {
        let nonce = format!("n{}", i + 2);
        let with = ecds_remote(
            names[0],
            &reg.url("cred/ecds:v1"),
            &Remote {
                env: vec![
                    (SECRET_ENV.into(), secret.clone()),
                    (POLICY_ENV.into(), "IfNotPresent".into()),
                    ("V".into(), version.to_string()),
                ],
                ..Default::default()
            },
        );
        up.send(ecds_resp(version, &nonce, vec![with]));
        let got = envoy.recv().await;
        let path = local_filename(&got.resources[0]);
        assert_eq!(sha256_hex(&std::fs::read(&path).unwrap()), sha256_hex(&w));
        envoy.send(ack(&names, version, &nonce));
        let _ = up.recv().await;
    }
    assert_eq!(
        manifest_heads(&reg, "cred/ecds"),
        heads + 1,
        "one HEAD per TTL:\n{}",
        agent.log_text()
    );
    assert_eq!(reg.blob_gets("cred/ecds"), blobs, "no download");
    let m = agent.metrics().await;
    assert!(
        support::agent::metric_value(&m, "ecds_agent_wasm_pull_auth_checks", "result=\"denied\"")
            >= 1.0,
        "{m}"
    );
}

/// An ECDSA P-256 public key (PEM) made by openssl, for a policy that requires a signature.
fn public_key(dir: &Path) -> std::path::PathBuf {
    let (k, p) = (dir.join("k.key"), dir.join("k.pub"));
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ],
        vec!["ec", "-pubout", "-in"],
    ] {
        let mut cmd = Command::new("openssl");
        cmd.args(&args).arg(&k);
        if args[0] == "ec" {
            cmd.arg("-out").arg(&p);
        }
        assert!(cmd.output().unwrap().status.success());
    }
    p
}

/// A module another process cached without a policy is refused through ECDS by an agent whose
/// policy requires a signature: stand-in to Envoy, a NACK naming the rule, nothing new stored.
#[tokio::test]
async fn through_ecds_a_cached_module_meets_the_agents_policy() {
    let reg = Registry::plain().await;
    let w = module("policy-ecds");
    reg.push("sc/ecds", "v1", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let insecure = ["--insecure-registries", reg.addr.as_str()];
    let out = fetch(&reg.url("sc/ecds:v1"), &cache, &insecure);
    assert!(out.status.success(), "{}", text(&out));
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nmatch = \"{}/sc/*\"\npublic_key = \"{}\"\n",
            reg.addr,
            public_key(dir.path()).display()
        ),
    )
    .unwrap();

    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .cache_dir(&cache)
        .args(insecure)
        .args(["--verify-policy", policy.to_str().unwrap()])
        .start()
        .await;
    let names = ["extensions.istio.io/wasmplugin/ns.signed-only"];
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &names).await;
    let res = ecds_remote(
        names[0],
        &reg.url("sc/ecds:v1"),
        &Remote {
            env: vec![(POLICY_ENV.into(), "IfNotPresent".into())],
            ..Default::default()
        },
    );
    up.send(ecds_resp("v1", "n1", vec![res]));
    let detail = up.recv().await.error_detail.expect("a NACK").message;
    assert!(
        detail.contains("signature check") && detail.contains(&format!("{}/sc/*", reg.addr)),
        "{detail}"
    );
    let got = envoy.recv().await;
    let (_, tc) = open_tec(&got.resources[0]);
    assert!(tc.type_url.ends_with("rbac.v3.RBAC"), "{}", tc.type_url);
    assert_eq!(support::modules_in(&cache), 1, "nothing new stored");
    let m = agent.metrics().await;
    assert!(
        support::agent::metric_value(&m, "ecds_agent_wasm_signature_checks", "result=\"failed\"")
            >= 1.0,
        "{m}"
    );
}

/// A request that names a cached private module's sha256 for another repository (one it may
/// pull anonymously) does not get the cached bytes: nothing ties them to that repository, so
/// the pull binds them — and that repository's image is not the module.
#[tokio::test]
async fn a_checksum_for_another_repository_does_not_unlock_a_private_module() {
    let private = Registry::secure().await;
    let public = Registry::plain().await;
    let secret_module = module("victim-private");
    private
        .push("cred/victim", "v1", &secret_module, Layout::Docker)
        .await;
    public
        .push("open/attacker", "v1", &module("attacker"), Layout::Docker)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let good = dir.path().join("good.json");
    std::fs::write(&good, pull_secret(&private.addr, USER, PASS)).unwrap();
    let out = fetch(
        &private.url("cred/victim:v1"),
        &cache,
        &["--pull-secret", good.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));

    let out = fetch(
        &public.url("open/attacker:v1"),
        &cache,
        &[
            "--sha256",
            &sha256_hex(&secret_module),
            "--insecure-registries",
            &public.addr,
        ],
    );
    assert!(!out.status.success(), "served: {}", text(&out));
    assert!(
        text(&out).contains("does not match sha256"),
        "{}",
        text(&out)
    );
    // The victim's module is not recorded as what the attacker's tag gives.
    let out = fetch(
        &public.url("open/attacker:v1"),
        &cache,
        &["--insecure-registries", &public.addr],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains(&sha256_hex(&secret_module)),
        "{}",
        text(&out)
    );
}
