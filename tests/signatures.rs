//! Cosign signature policy against the real docker-registry, with signatures made by an
//! independent tool (openssl, ECDSA P-256 over the simple-signing payload) and pushed in
//! cosign's legacy layout (`sha256-<hex>.sig`, simple-signing layer, signature annotation).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use support::registry::sha256_hex;
use support::res::{ecds_remote, module, open_tec, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, Layout, Registry};

const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ECDSA P-256 key pair: (private PEM, public PEM).
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (k, p) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        k.to_str().unwrap(),
    ]);
    openssl(&[
        "ec",
        "-in",
        k.to_str().unwrap(),
        "-pubout",
        "-out",
        p.to_str().unwrap(),
    ]);
    (k, p)
}

/// A cosign simple-signing payload naming `digest`.
fn payload(reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    }))
    .unwrap()
}

/// base64 of openssl's DER ECDSA signature of `data` with `key`.
fn sign(dir: &Path, key: &Path, data: &[u8]) -> String {
    let (input, out) = (dir.join("payload.json"), dir.join("sig.der"));
    std::fs::write(&input, data).unwrap();
    openssl(&[
        "dgst",
        "-sha256",
        "-sign",
        key.to_str().unwrap(),
        "-out",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(&out).unwrap())
}

/// Pushes `payload` with `signature` as the cosign signature of `for_digest` in `repo`.
async fn push_signature(
    reg: &Registry,
    repo: &str,
    for_digest: &str,
    payload: &[u8],
    signature: &str,
) {
    let config = b"{}".to_vec();
    let cd = reg.push_blob(repo, &config).await;
    let ld = reg.push_blob(repo, payload).await;
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{
            "mediaType": SIMPLESIGNING, "digest": ld, "size": payload.len(),
            "annotations": {"dev.cosignproject.cosign/signature": signature}
        }],
    });
    let tag = format!("{}.sig", for_digest.replace(':', "-"));
    reg.push_manifest(repo, &tag, mt, &m).await;
}

fn policy(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn fetch(reg: &Registry, repo_ref: &str, policy: &Path, cache: &Path) -> Output {
    Command::new(support::agent::BIN)
        .args([
            "fetch",
            &reg.url(repo_ref),
            "--insecure-registries",
            &reg.addr,
            "--verify-policy",
        ])
        .arg(policy)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

use support::agent::output_text as text;

#[tokio::test]
async fn signature_policy_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (good_key, good_pub) = key_pair(dir.path(), "good");
    let (other_key, _) = key_pair(dir.path(), "other");
    let reg = Registry::plain().await;
    let team = format!("{}/team/*", reg.addr);
    let rules = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"{}/denied/*\"\naction = \"deny\"\n\
             [[rule]]\nmatch = \"{team}\"\npublic_key = \"{}\"\n\
             [[rule]]\nmatch = \"*\"\naction = \"allow-unsigned\"\n",
            reg.addr,
            good_pub.display()
        ),
    );
    let case = |name: &str| module(&format!("sig-{name}"));
    let cache = |n: &str| dir.path().join(format!("cache-{n}"));

    // 1. Signed with the rule's key over the digest in use: verified.
    let w = case("ok");
    let d = reg.push("team/ok", "1.0", &w, Layout::Docker).await;
    let p = payload(&format!("{}/team/ok", reg.addr), &d);
    push_signature(&reg, "team/ok", &d, &p, &sign(dir.path(), &good_key, &p)).await;
    let out = fetch(&reg, "team/ok:1.0", &rules, &cache("ok"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&sha256_hex(&w)));

    // 2. Unsigned under a key rule.
    let w = case("unsigned");
    reg.push("team/unsigned", "1.0", &w, Layout::Docker).await;
    let out = fetch(&reg, "team/unsigned:1.0", &rules, &cache("unsigned"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("signature check") && text(&out).contains("no signature for"),
        "{}",
        text(&out)
    );
    assert!(!cache("unsigned")
        .join("modules")
        .join(format!("{}.wasm", sha256_hex(&w)))
        .exists());

    // 3. Signed with another key.
    let w = case("other");
    let d = reg.push("team/other", "1.0", &w, Layout::Docker).await;
    let p = payload("x", &d);
    push_signature(
        &reg,
        "team/other",
        &d,
        &p,
        &sign(dir.path(), &other_key, &p),
    )
    .await;
    let out = fetch(&reg, "team/other:1.0", &rules, &cache("other"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no signature verifies with"),
        "{}",
        text(&out)
    );

    // 4. A valid signature over a different digest (a re-tagged image).
    let (w1, w2) = (case("retag-1"), case("retag-2"));
    let d1 = reg.push("team/retag", "old", &w1, Layout::Docker).await;
    let d2 = reg.push("team/retag", "1.0", &w2, Layout::Docker).await;
    let p = payload("x", &d1);
    push_signature(
        &reg,
        "team/retag",
        &d2,
        &p,
        &sign(dir.path(), &good_key, &p),
    )
    .await;
    let out = fetch(&reg, "team/retag:1.0", &rules, &cache("retag"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("the signature is for {d1}, not for {d2}")),
        "{}",
        text(&out)
    );

    // 5. A tampered payload (signed one, stored another).
    let w = case("tamper");
    let d = reg.push("team/tamper", "1.0", &w, Layout::Docker).await;
    let p = payload("x", &d);
    let sig = sign(dir.path(), &good_key, &p);
    let mut tampered = p.clone();
    tampered.extend_from_slice(b" ");
    push_signature(&reg, "team/tamper", &d, &tampered, &sig).await;
    let out = fetch(&reg, "team/tamper:1.0", &rules, &cache("tamper"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no signature verifies"),
        "{}",
        text(&out)
    );

    // 6. allow-unsigned elsewhere, and 7. deny.
    let w = case("free");
    reg.push("free/plugin", "1.0", &w, Layout::Artifact).await;
    let out = fetch(&reg, "free/plugin:1.0", &rules, &cache("free"));
    assert!(out.status.success(), "{}", text(&out));
    reg.push("denied/plugin", "1.0", &case("denied"), Layout::Artifact)
        .await;
    let out = fetch(&reg, "denied/plugin:1.0", &rules, &cache("denied"));
    assert!(!out.status.success());
    assert!(text(&out).contains("is denied by rule"), "{}", text(&out));
}

#[tokio::test]
async fn the_agent_delivers_a_stand_in_and_nacks_with_a_signature_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good_pub) = key_pair(dir.path(), "k");
    let reg = Registry::plain().await;
    let w = module("sig-agent");
    reg.push("team/p", "1.0", &w, Layout::Docker).await;
    let rules = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            good_pub.display()
        ),
    );
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .args([
            "--insecure-registries",
            &reg.addr,
            "--verify-policy",
            rules.to_str().unwrap(),
        ])
        .start()
        .await;
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &["p"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("p", &reg.url("team/p:1.0"), &Remote::default())],
    ));
    let nack = up.recv().await;
    let msg = nack.error_detail.expect("NACK").message;
    assert!(msg.contains("\"p\"") && msg.contains("signature"), "{msg}");
    let got = envoy.recv().await;
    assert!(
        open_tec(&got.resources[0])
            .1
            .type_url
            .ends_with("rbac.v3.RBAC"),
        "stand-in"
    );
    assert_eq!(
        agent
            .metric("ecds_agent_nacks_sent", "reason=\"signature\"")
            .await,
        1.0
    );
    assert!(
        agent
            .metric("ecds_agent_wasm_signature_checks", "result=\"failed\"")
            .await
            >= 1.0
    );
    let (_, debug) = agent.get("/debug/wasm").await;
    assert!(debug.contains("signature check"), "{debug}");
    assert!(!agent
        .cache_dir
        .join("modules")
        .join(format!("{}.wasm", sha256_hex(&w)))
        .exists());
}

#[test]
fn a_bad_policy_file_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(
        dir.path(),
        "[[rule]]\nmatch = \"*\"\naction = \"sometimes\"\n",
    );
    let out = Command::new(support::agent::BIN)
        .args(["fetch", "oci://127.0.0.1:1/x:1", "--verify-policy"])
        .arg(&p)
        .arg("--cache-dir")
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--verify-policy") && text(&out).contains("sometimes"),
        "{}",
        text(&out)
    );
}

/// Pushes a skopeo `dir:` layout or a directory of blobs named by their hex digest, plus its
/// `manifest.json` byte for byte, as `repo:reference`.
async fn push_dir(reg: &Registry, repo: &str, dir: &Path, reference: &str) -> String {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() == 64 {
            reg.push_blob(repo, &std::fs::read(e.path()).unwrap()).await;
        }
    }
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    let mt = serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()["mediaType"]
        .as_str()
        .unwrap()
        .to_owned();
    reg.push_manifest_bytes(repo, reference, &mt, manifest)
        .await
}

/// testdata/cosign: an image of the basic-auth plugin signed by the cosign CLI itself (v2.4.1,
/// built from its Go module; see testdata/cosign/README.md), replayed into a fresh registry.
#[tokio::test]
async fn an_image_signed_by_cosign_itself_verifies() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cosign");
    let reg = Registry::plain().await;
    let digest = push_dir(&reg, "team/cosigned", &data.join("image"), "1.0").await;
    assert_eq!(
        digest,
        "sha256:9802040d12334c64448062f3ca12f7762c5e6d0d13471b5e66188734ec46fd88"
    );
    push_dir(
        &reg,
        "team/cosigned",
        &data.join("signature"),
        &format!("{}.sig", digest.replace(':', "-")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let good = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            data.join("cosign.pub").display()
        ),
    );
    let out = fetch(&reg, "team/cosigned:1.0", &good, &dir.path().join("c1"));
    assert!(out.status.success(), "{}", text(&out));
    let plugin = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/plugins/basic_auth/basic_auth.wasm"),
    )
    .unwrap();
    assert!(text(&out).contains(&sha256_hex(&plugin)));
    // The same image under a key cosign did not sign with fails.
    let (_, other) = key_pair(dir.path(), "other");
    let bad = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            other.display()
        ),
    );
    let out = fetch(&reg, "team/cosigned:1.0", &bad, &dir.path().join("c2"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no signature verifies"),
        "{}",
        text(&out)
    );
}

/// A sigstore bundle v0.3 with a DSSE envelope over an in-toto statement naming `subject`,
/// signed (DSSE PAE) with `key` by openssl.
fn bundle(dir: &Path, key: &Path, subject: &str) -> Vec<u8> {
    dsse_bundle(
        dir,
        key,
        subject,
        "https://sigstore.dev/cosign/sign/v1",
        "application/vnd.in-toto+json",
    )
}

/// [`bundle`] with another predicate (an attestation: SBOM, scan result) or payload type.
fn dsse_bundle(dir: &Path, key: &Path, subject: &str, predicate: &str, ptype: &str) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let statement = serde_json::to_vec(&serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "plugin", "digest": {"sha256": subject.trim_start_matches("sha256:")}}],
        "predicateType": predicate,
        "predicate": {}
    }))
    .unwrap();
    let mut pae = format!("DSSEv1 {} {ptype} {} ", ptype.len(), statement.len()).into_bytes();
    pae.extend_from_slice(&statement);
    serde_json::to_vec(&serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": "test"}},
        "dsseEnvelope": {
            "payload": b64.encode(&statement),
            "payloadType": ptype,
            "signatures": [{"sig": sign(dir, key, &pae)}]
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn sigstore_bundles_attached_as_oci_referrers_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "k");
    let (other, _) = key_pair(dir.path(), "other");
    let reg = Registry::plain().await;
    let rules = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            public.display()
        ),
    );

    let w = module("bundle-ok");
    let d = reg.push("team/b-ok", "1.0", &w, Layout::Docker).await;
    reg.push_bundle_referrer("team/b-ok", &d, &bundle(dir.path(), &key, &d))
        .await;
    let out = fetch(&reg, "team/b-ok:1.0", &rules, &dir.path().join("c1"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&sha256_hex(&w)));

    let d = reg
        .push(
            "team/b-other",
            "1.0",
            &module("bundle-other"),
            Layout::Docker,
        )
        .await;
    reg.push_bundle_referrer("team/b-other", &d, &bundle(dir.path(), &other, &d))
        .await;
    let out = fetch(&reg, "team/b-other:1.0", &rules, &dir.path().join("c2"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no bundle signature verifies"),
        "{}",
        text(&out)
    );

    let d = reg
        .push(
            "team/b-subject",
            "1.0",
            &module("bundle-subject"),
            Layout::Docker,
        )
        .await;
    let elsewhere = format!("sha256:{}", "e".repeat(64));
    reg.push_bundle_referrer("team/b-subject", &d, &bundle(dir.path(), &key, &elsewhere))
        .await;
    let out = fetch(&reg, "team/b-subject:1.0", &rules, &dir.path().join("c3"));
    assert!(!out.status.success());
    assert!(text(&out).contains("does not name"), "{}", text(&out));
}

/// testdata/cosign/v3-*: the same image signed by cosign v3.1.3 (its default: a sigstore bundle
/// v0.3 with a DSSE envelope, attached as an OCI 1.1 referrer through the referrers tag schema,
/// since docker-registry has no referrers API), replayed byte for byte.
#[tokio::test]
async fn an_image_signed_by_cosign_v3_with_a_bundle_verifies() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cosign");
    let reg = Registry::plain().await;
    let digest = push_dir(&reg, "team/v3signed", &data.join("image"), "1.0").await;
    let referrer = push_dir(
        &reg,
        "team/v3signed",
        &data.join("v3-referrer"),
        "sha256:ef2b3c5ed4b9c4e58929e1773825a47be35bd33c03e7314112f0bd0230953ea3",
    )
    .await;
    assert_eq!(
        referrer,
        "sha256:ef2b3c5ed4b9c4e58929e1773825a47be35bd33c03e7314112f0bd0230953ea3"
    );
    reg.push_manifest_bytes(
        "team/v3signed",
        &digest.replace(':', "-"),
        "application/vnd.oci.image.index.v1+json",
        std::fs::read(data.join("v3-referrers-index.json")).unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let good = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            data.join("cosign.pub").display()
        ),
    );
    let out = fetch(&reg, "team/v3signed:1.0", &good, &dir.path().join("c"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("sigstore bundle) verified"),
        "{}",
        text(&out)
    );
}

fn fetch_url(url: &str, insecure: &str, policy: Option<&Path>, cache: &Path) -> Output {
    let mut cmd = Command::new(support::agent::BIN);
    cmd.args([
        "fetch",
        url,
        "--pull-policy",
        "IfNotPresent",
        "--insecure-registries",
        insecure,
    ]);
    if let Some(p) = policy {
        cmd.arg("--verify-policy").arg(p);
    }
    cmd.arg("--cache-dir").arg(cache).output().unwrap()
}

/// The policy matches the canonical name: every spelling of a registry meets the same rule.
#[tokio::test]
async fn every_spelling_of_a_registry_meets_the_same_rule() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good_pub) = key_pair(dir.path(), "good");
    let reg = Registry::plain().await;
    let port = reg.addr.rsplit(':').next().unwrap().to_owned();
    reg.push("sc/x", "v1", &module("spelling"), Layout::Docker)
        .await;
    let rules = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"localhost:{port}/sc/*\"\npublic_key = \"{}\"\n\
             [[rule]]\nmatch = \"*\"\naction = \"allow-unsigned\"\n",
            good_pub.display()
        ),
    );
    let cache = dir.path().join("cache");
    let listed = format!("localhost:{port}");
    for host in ["localhost", "LOCALHOST", "LocalHost.", "localhost."] {
        let url = format!("oci://{host}:{port}/sc/x:v1");
        let out = fetch_url(&url, &listed, Some(&rules), &cache);
        assert!(!out.status.success(), "{url} passed: {}", text(&out));
        assert!(
            text(&out).contains(&format!("localhost:{port}/sc/*")),
            "{url}: the message names the rule: {}",
            text(&out)
        );
        assert_eq!(support::modules_in(&cache), 0, "{url}: nothing stored");
    }
}

/// The policy in force applies to a cache hit as to a download: a module another process
/// cached without a policy, or admitted under a key that was since replaced, or named by an
/// https:// URL with its sha256, is refused (and not downloaded again when it passes).
#[tokio::test]
async fn a_cache_hit_meets_the_policy_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k1_pub) = key_pair(dir.path(), "k1");
    let (_, k2_pub) = key_pair(dir.path(), "k2");
    let reg = Registry::plain().await;
    let cache = dir.path().join("shared");
    let rule = |key: &Path, name: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
                key.display()
            ),
        )
        .unwrap();
        p
    };
    let (only_k1, only_k2) = (rule(&k1_pub, "k1.toml"), rule(&k2_pub, "k2.toml"));

    // Process A, no policy, caches an unsigned module; process B (a key rule) is refused it.
    let unsigned = module("hit-unsigned");
    reg.push("hit/unsigned", "v1", &unsigned, Layout::Docker)
        .await;
    let url = reg.url("hit/unsigned:v1");
    let out = fetch_url(&url, &reg.addr, None, &cache);
    assert!(out.status.success(), "{}", text(&out));
    let out = fetch_url(&url, &reg.addr, Some(&only_k1), &cache);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("source: cache"), "{}", text(&out));
    assert!(text(&out).contains("signature check"), "{}", text(&out));

    // Admitted under k1; then the policy lists only k2: refused; k1 again: served from the
    // cache with no registry request at all.
    let signed = module("hit-signed");
    let d = reg.push("hit/signed", "v1", &signed, Layout::Docker).await;
    let p = payload("x", &d);
    push_signature(&reg, "hit/signed", &d, &p, &sign(dir.path(), &k1, &p)).await;
    let url = reg.url("hit/signed:v1");
    let out = fetch_url(&url, &reg.addr, Some(&only_k1), &cache);
    assert!(out.status.success(), "{}", text(&out));
    let out = fetch_url(&url, &reg.addr, Some(&only_k2), &cache);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no signature verifies with") && text(&out).contains("k2.pub"),
        "{}",
        text(&out)
    );
    let (gets, blobs) = (reg.manifest_gets("hit/signed"), reg.blob_gets("hit/signed"));
    let out = fetch_url(&url, &reg.addr, Some(&only_k1), &cache);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("source: cache"), "{}", text(&out));
    assert_eq!(
        (reg.manifest_gets("hit/signed"), reg.blob_gets("hit/signed")),
        (gets, blobs),
        "a recorded verdict needs no registry request"
    );

    // An https:// URL naming the cached OCI module's sha256: a key rule refuses it before any
    // lookup (only oci:// modules carry signatures).
    let out = Command::new(support::agent::BIN)
        .args([
            "fetch",
            "https://127.0.0.1:1/m.wasm",
            "--sha256",
            &sha256_hex(&signed),
            "--verify-policy",
        ])
        .arg(&only_k1)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("only keyless bundles"),
        "{}",
        text(&out)
    );
}

/// Only a signature counts as a signature: a DSSE statement with another predicate (an SBOM or
/// scan attestation) or payload type by the same key, and a simple-signing payload whose
/// `critical.type` is not cosign's, are refused.
#[tokio::test]
async fn attestations_and_foreign_payloads_are_not_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "k");
    let reg = Registry::plain().await;
    let rules = policy(
        dir.path(),
        &format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            public.display()
        ),
    );
    // An SBOM attestation, and a signing statement under another payload type.
    for (repo, predicate, ptype, want) in [
        (
            "att/sbom",
            "https://spdx.dev/Document",
            "application/vnd.in-toto+json",
            "attestation",
        ),
        (
            "att/ptype",
            "https://sigstore.dev/cosign/sign/v1",
            "text/plain",
            "payload type",
        ),
    ] {
        let d = reg.push(repo, "1.0", &module(repo), Layout::Docker).await;
        let b = dsse_bundle(dir.path(), &key, &d, predicate, ptype);
        reg.push_bundle_referrer(repo, &d, &b).await;
        let out = fetch(&reg, &format!("{repo}:1.0"), &rules, &dir.path().join(repo));
        assert!(!out.status.success(), "{repo}: {}", text(&out));
        assert!(text(&out).contains(want), "{repo}: {}", text(&out));
    }

    let d = reg
        .push("att/legacy", "1.0", &module("legacy-type"), Layout::Docker)
        .await;
    let p = serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": "x"},
            "image": {"docker-manifest-digest": d},
            "type": "https://example.com/attestation"
        }
    }))
    .unwrap();
    push_signature(&reg, "att/legacy", &d, &p, &sign(dir.path(), &key, &p)).await;
    let out = fetch(&reg, "att/legacy:1.0", &rules, &dir.path().join("c3"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("critical.type"), "{}", text(&out));
}
