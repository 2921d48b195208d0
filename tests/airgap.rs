//! Clusters with no registry: a module exported with skopeo (an OCI image layout directory and an
//! oci-archive tar, written by a tool not of this project) is imported with `ecds-agent import`
//! and then served with the registry stopped, through `fetch` and through `run` with ECDS; a
//! corrupted blob and a layout whose signature fails the policy are refused with nothing stored.
//! `ecds-agent prefetch` reads WasmPlugin / TrafficExtension YAML and URL lists.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::agent::output_text as text;
use support::registry::sha256_hex;
use support::res::{ecds_remote, local_filename, module, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, Layout, Registry};

fn agent_cmd(args: &[&str], cache: &Path) -> Output {
    Command::new(support::agent::BIN)
        .args(args)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo").args(args).output().expect("skopeo");
    assert!(out.status.success(), "skopeo {args:?}: {}", text(&out));
}

#[tokio::test]
async fn an_exported_module_is_served_with_the_registry_down() {
    let mut reg = Registry::plain().await;
    let w = module("airgap");
    reg.push("air/mod", "v1", &w, Layout::Artifact).await;
    let dir = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/air/mod:v1", reg.addr);
    let layout = dir.path().join("layout");
    let archive = dir.path().join("mod.tar");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!("oci:{}:v1", layout.display()),
    ]);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!("oci-archive:{}:v1", archive.display()),
    ]);
    let url = reg.url("air/mod:v1");
    reg.stop();

    // The layout names the image only by tag: --as gives its reference.
    let cache = dir.path().join("cache");
    let out = agent_cmd(&["import", layout.to_str().unwrap()], &cache);
    assert!(!out.status.success());
    assert!(text(&out).contains("--as"), "{}", text(&out));
    let out = agent_cmd(&["import", layout.to_str().unwrap(), "--as", &url], &cache);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("sha256:{}", sha256_hex(&w))),
        "{}",
        text(&out)
    );

    // Served with no registry: the CLI…
    let out = agent_cmd(&["fetch", &url, "--timeout", "5s"], &cache);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("source: cache"), "{}", text(&out));

    // …and ECDS, the WasmPlugin unchanged.
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url()).cache_dir(&cache).start().await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["air"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote("air", &url, &Remote::default())],
    ));
    let got = envoy.recv().await;
    let path = local_filename(&got.resources[0]);
    assert_eq!(sha256_hex(&std::fs::read(path).unwrap()), sha256_hex(&w));

    // The oci-archive form imports the same way.
    let cache2 = dir.path().join("cache2");
    let out = agent_cmd(
        &["import", archive.to_str().unwrap(), "--as", &url],
        &cache2,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(support::modules_in(&cache2), 1);
}

#[tokio::test]
async fn a_corrupted_or_unsigned_layout_is_refused_and_nothing_is_stored() {
    let reg = Registry::plain().await;
    let w = module("airgap-bad");
    reg.push("air/bad", "v1", &w, Layout::Artifact).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/air/bad:v1", reg.addr),
        &format!("oci:{}:v1", layout.display()),
    ]);
    let url = reg.url("air/bad:v1");

    // A policy that wants a signature the layout does not hold.
    let key = dir.path().join("k.pem");
    let pubkey = dir.path().join("k.pub");
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            key.to_str().unwrap(),
        ],
        vec![
            "ec",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-out",
            pubkey.to_str().unwrap(),
        ],
    ] {
        assert!(Command::new("openssl")
            .args(&args)
            .output()
            .unwrap()
            .status
            .success());
    }
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"{}\"\n",
            pubkey.display()
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let out = agent_cmd(
        &[
            "import",
            layout.to_str().unwrap(),
            "--as",
            &url,
            "--verify-policy",
            policy.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("signature check"), "{}", text(&out));
    assert_eq!(support::modules_in(&cache), 0);

    // The module's blob altered in the layout: refused as corrupted.
    let blob = dir.path().join("layout/blobs/sha256").join(sha256_hex(&w));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = agent_cmd(&["import", layout.to_str().unwrap(), "--as", &url], &cache);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not match its digest"),
        "{}",
        text(&out)
    );
    assert_eq!(support::modules_in(&cache), 0);
}

#[tokio::test]
async fn prefetch_reads_plugins_and_url_lists() {
    let reg = Registry::plain().await;
    let (a, b) = (module("pre-a"), module("pre-b"));
    reg.push("pre/a", "v1", &a, Layout::Artifact).await;
    reg.push("pre/b", "v1", &b, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("plugins.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: a}}\nspec:\n  url: {}/pre/a:v1\n---\napiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: {{name: b}}\nspec:\n  wasm:\n    url: oci://{}/pre/b:v1\n",
            reg.addr, reg.addr
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let insecure = ["--insecure-registries", reg.addr.as_str()];
    let mut args = vec!["prefetch", yaml.to_str().unwrap()];
    args.extend(insecure);
    let out = agent_cmd(&args, &cache);
    assert!(out.status.success(), "{}", text(&out));
    for w in [&a, &b] {
        assert!(
            text(&out).contains(&format!("sha256:{}", sha256_hex(w))),
            "{}",
            text(&out)
        );
    }
    assert_eq!(support::modules_in(&cache), 2);

    // A URL list with one module that does not exist: one line each, exit 1.
    let list = dir.path().join("urls.txt");
    std::fs::write(
        &list,
        format!(
            "# warm-up\n{}\n{}\n",
            reg.url("pre/a:v1"),
            reg.url("pre/missing:v1")
        ),
    )
    .unwrap();
    let mut args = vec!["prefetch", list.to_str().unwrap(), "--timeout", "10s"];
    args.extend(insecure);
    let out = agent_cmd(&args, &cache);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("(cached)"), "{}", text(&out));
    assert!(text(&out).contains("failed oci://"), "{}", text(&out));
    assert!(
        text(&out).contains("1 of 2 module(s) not fetched"),
        "{}",
        text(&out)
    );
}

/// A valid module of `mib` MiB: the header and one custom section.
fn big_module(mib: usize) -> Vec<u8> {
    let body_len = mib << 20;
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    let mut custom = vec![3];
    custom.extend_from_slice(b"pad");
    custom.extend(std::iter::repeat_n(0x5au8, body_len));
    m.push(0);
    let mut n = custom.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            m.push(byte);
            break;
        }
        m.push(byte | 0x80);
    }
    m.extend(custom);
    m
}

/// Downloads over a few MiB are shown: plain lines on stderr when it is not a terminal (a bar
/// on a terminal); stdout keeps only the result.
#[tokio::test]
async fn large_downloads_are_shown_as_plain_lines_off_a_terminal() {
    let reg = Registry::plain().await;
    let w = big_module(6);
    reg.push("big/mod", "v1", &w, Layout::Artifact).await;
    let small = module("small-quiet");
    reg.push("big/small", "v1", &small, Layout::Artifact).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = reg.url("big/mod:v1");
    let out = agent_cmd(&["fetch", &url, "--insecure-registries", &reg.addr], &cache);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("downloading {url} (6.0 MiB)")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("downloaded {url}: 6.0 MiB")),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("downloading"));
    let out = agent_cmd(
        &[
            "fetch",
            &reg.url("big/small:v1"),
            "--insecure-registries",
            &reg.addr,
        ],
        &cache,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("downloading"),
        "small downloads stay quiet"
    );
}

/// A layout that carries the image's keyless signature as an OCI 1.1 referrer (as `oras copy -r`
/// exports it) satisfies a keyless rule on import, with no network.
#[tokio::test]
async fn a_signature_stored_in_the_layout_counts() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/keyless");
    let read = |n: &str| std::fs::read(data.join(n)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("layout");
    let blobs = root.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    };
    put(&read("config.json"));
    put(&read("module.wasm"));
    let manifest = read("manifest.json");
    let image = put(&manifest);
    let empty = put(b"{}");
    let bundle = read("oci-ok.sigstore.json");
    let bd = put(&bundle);
    let bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json";
    let referrer = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": bundle_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": bundle_type, "digest": bd, "size": bundle.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image, "size": manifest.len()},
    }))
    .unwrap();
    let rd = put(&referrer);
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        root.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image,
                 "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "registry.example/kl/mod:v1"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": rd,
                 "size": referrer.len(), "artifactType": bundle_type,
                 "annotations": {"org.opencontainers.image.ref.name": image.replace(':', "-")}},
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    let rule = |identity: &str| {
        format!(
            "[[rule]]\nmatch = \"registry.example/kl/*\"\nissuer = \"{}\"\nidentity = \"{identity}\"\ntrusted_root = \"{}\"\n",
            String::from_utf8(read("issuer.txt")).unwrap(),
            data.join("trusted_root.json").display()
        )
    };
    std::fs::write(
        &policy,
        rule(&String::from_utf8(read("identity.txt")).unwrap()),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let args = [
        "import",
        root.to_str().unwrap(),
        "--verify-policy",
        policy.to_str().unwrap(),
    ];
    let out = agent_cmd(&args, &cache);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ok oci://registry.example/kl/mod:v1"),
        "{}",
        text(&out)
    );
    // Another identity: refused, nothing stored.
    std::fs::write(&policy, rule("someone@example.com")).unwrap();
    let cache2 = dir.path().join("cache2");
    let out = agent_cmd(&args, &cache2);
    assert!(!out.status.success());
    assert!(text(&out).contains("identity mismatch"), "{}", text(&out));
    assert_eq!(support::modules_in(&cache2), 0);
}
