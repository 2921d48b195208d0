//! Every Wasm packaging in the wild, pushed to the real docker-registry and fetched through the
//! CLI and through `run` with ECDS: the module is chosen by content, not by label.

mod support;

use std::io::Write;
use std::process::{Command, Output};

use serde_json::{json, Value};
use support::agent::output_text as text;
use support::registry::sha256_hex;
use support::res::{ecds_remote, local_filename, module, open_tec, Remote};
use support::xds::{ack, ecds_resp, sotw_ecds};
use support::{Agent, ControlPlane, Registry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A tar of `files`, optionally gzipped.
fn tar(files: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    let t = b.into_inner().unwrap();
    if !gzip {
        return t;
    }
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&t).unwrap();
    e.finish().unwrap()
}

/// One layer: (media type, bytes, title annotation).
type Layer<'a> = (&'a str, Vec<u8>, Option<&'a str>);

/// Pushes a manifest with `config` (media type, bytes) and `layers`; returns its digest.
async fn push(
    reg: &Registry,
    repo: &str,
    tag: &str,
    manifest_type: &str,
    config: (&str, &[u8]),
    layers: Vec<Layer<'_>>,
) -> String {
    let cd = reg.push_blob(repo, config.1).await;
    let mut ls = Vec::new();
    for (mt, data, title) in layers {
        let d = reg.push_blob(repo, &data).await;
        let mut l = json!({"mediaType": mt, "digest": d, "size": data.len()});
        if let Some(t) = title {
            l["annotations"] = json!({"org.opencontainers.image.title": t});
        }
        ls.push(l);
    }
    let m = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config.0, "digest": cd, "size": config.1.len()},
        "layers": ls,
    });
    reg.push_manifest(repo, tag, manifest_type, &m).await
}

/// Every layout of the issue, each as `lay/<name>:v1`; the module each must yield (`None`: a
/// known failure form, with a word its error must contain).
async fn push_all(reg: &Registry) -> Vec<(&'static str, Result<Vec<u8>, &'static str>)> {
    let mut out = Vec::new();
    let solo = "application/vnd.module.wasm.content.layer.v1+wasm";
    let solo_cfg = ("application/vnd.module.wasm.config.v1+json", &b"{}"[..]);
    let empty_cfg = ("application/vnd.oci.empty.v1+json", &b"{}"[..]);
    let img_cfg = (
        "application/vnd.oci.image.config.v1+json",
        &br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#[..],
    );

    // 1. Istio/Solo: config + one content layer.
    let w = module("lay-solo");
    push(
        reg,
        "lay/solo",
        "v1",
        OCI_MANIFEST,
        solo_cfg,
        vec![(solo, w.clone(), None)],
    )
    .await;
    out.push(("solo", Ok(w)));

    // 2. The same layer behind extra layers (README, icon, metadata), not first, not last.
    let w = module("lay-extras");
    push(
        reg,
        "lay/extras",
        "v1",
        OCI_MANIFEST,
        empty_cfg,
        vec![
            ("text/markdown", b"# README".to_vec(), Some("README.md")),
            ("image/png", b"\x89PNG...".to_vec(), Some("icon.png")),
            (solo, w.clone(), None),
            (
                "application/json",
                b"{\"spec\":1}".to_vec(),
                Some("spec.json"),
            ),
        ],
    )
    .await;
    out.push(("extras", Ok(w)));

    // 3. wasm-to-oci: one application/vnd.wasm.content.layer.v1+wasm layer.
    let w = module("lay-wasm-to-oci");
    push(
        reg,
        "lay/wasm-to-oci",
        "v1",
        OCI_MANIFEST,
        ("application/vnd.wasm.config.v1+json", b"{}"),
        vec![(
            "application/vnd.wasm.content.layer.v1+wasm",
            w.clone(),
            None,
        )],
    )
    .await;
    out.push(("wasm-to-oci", Ok(w)));

    // 4. The CNCF Wasm OCI artifact (wkg, oci-wasm): application/wasm.
    let w = module("lay-cncf");
    push(
        reg,
        "lay/cncf",
        "v1",
        OCI_MANIFEST,
        (
            "application/vnd.wasm.config.v0+json",
            br#"{"architecture":"wasm","os":"wasip2"}"#,
        ),
        vec![("application/wasm", w.clone(), None)],
    )
    .await;
    out.push(("cncf", Ok(w)));

    // 5. ORAS defaults: empty config, the raw module in a layer labelled tar, with a title.
    let w = module("lay-oras");
    push(
        reg,
        "lay/oras",
        "v1",
        OCI_MANIFEST,
        empty_cfg,
        vec![(
            "application/vnd.oci.image.layer.v1.tar",
            w.clone(),
            Some("plugin.wasm"),
        )],
    )
    .await;
    out.push(("oras", Ok(w)));

    // 6a. A Docker image whose last layer holds no module: plugin.wasm is in an earlier one.
    let w = module("lay-docker-earlier");
    push(
        reg,
        "lay/docker-earlier",
        "v1",
        DOCKER_MANIFEST,
        ("application/vnd.docker.container.image.v1+json", img_cfg.1),
        vec![
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                tar(&[("plugin.wasm", &w)], true),
                None,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                tar(&[("etc/motd", b"hello")], true),
                None,
            ),
        ],
    )
    .await;
    out.push(("docker-earlier", Ok(w)));

    // 6b. An OCI image, uncompressed tar, a single *.wasm at the root and no plugin.wasm.
    let w = module("lay-single-wasm");
    push(
        reg,
        "lay/single-wasm",
        "v1",
        OCI_MANIFEST,
        img_cfg,
        vec![(
            "application/vnd.oci.image.layer.v1.tar",
            tar(&[("filter.wasm", &w)], false),
            None,
        )],
    )
    .await;
    out.push(("single-wasm", Ok(w)));

    // 6c. plugin.wasm in two layers: the last one wins.
    let (old, new) = (module("lay-old"), module("lay-new"));
    push(
        reg,
        "lay/last-wins",
        "v1",
        OCI_MANIFEST,
        img_cfg,
        vec![
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                tar(&[("plugin.wasm", &old)], true),
                None,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                tar(&[("plugin.wasm", &new)], true),
                None,
            ),
        ],
    )
    .await;
    out.push(("last-wins", Ok(new)));

    // 7. An index: the Wasm platform entry is picked among others.
    let w = module("lay-index");
    let art = push(
        reg,
        "lay/index",
        "art",
        OCI_MANIFEST,
        solo_cfg,
        vec![(solo, w.clone(), None)],
    )
    .await;
    let other = push(
        reg,
        "lay/index",
        "amd64",
        OCI_MANIFEST,
        img_cfg,
        vec![(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            tar(&[("bin/sh", b"#!")], true),
            None,
        )],
    )
    .await;
    let entry = |d: &str, os: &str, arch: &str| json!({"mediaType": OCI_MANIFEST, "digest": d, "size": 1, "platform": {"os": os, "architecture": arch}});
    let index = |entries: Vec<Value>| json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    reg.push_manifest(
        "lay/index",
        "v1",
        OCI_INDEX,
        &index(vec![
            entry(&other, "linux", "amd64"),
            entry(&art, "wasip1", "wasm"),
            entry(&other, "linux", "arm64"),
        ]),
    )
    .await;
    out.push(("index", Ok(w)));

    // Known failure forms.
    push(
        reg,
        "lay/no-module",
        "v1",
        OCI_MANIFEST,
        empty_cfg,
        vec![
            ("application/json", b"{}".to_vec(), None),
            ("text/plain", b"hi".to_vec(), None),
        ],
    )
    .await;
    out.push(("no-module", Err("text/plain (2 bytes)")));
    push(
        reg,
        "lay/two-modules",
        "v1",
        OCI_MANIFEST,
        empty_cfg,
        vec![(solo, module("lay-a"), None), (solo, module("lay-b"), None)],
    )
    .await;
    out.push(("two-modules", Err("none is titled plugin.wasm")));
    push(
        reg,
        "lay/two-wasm-files",
        "v1",
        OCI_MANIFEST,
        img_cfg,
        vec![(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            tar(&[("a.wasm", &module("x")), ("b.wasm", &module("y"))], true),
            None,
        )],
    )
    .await;
    out.push(("two-wasm-files", Err("2 .wasm files and no plugin.wasm")));
    let other = push(
        reg,
        "lay/index-no-wasm",
        "amd64",
        OCI_MANIFEST,
        img_cfg,
        vec![(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            tar(&[("bin/sh", b"#!")], true),
            None,
        )],
    )
    .await;
    reg.push_manifest(
        "lay/index-no-wasm",
        "v1",
        OCI_INDEX,
        &index(vec![
            entry(&other, "linux", "amd64"),
            entry(&other, "linux", "arm64"),
        ]),
    )
    .await;
    out.push(("index-no-wasm", Err("linux/amd64, linux/arm64")));
    out
}

fn fetch(reg: &Registry, repo: &str, cache: &std::path::Path) -> Output {
    Command::new(support::agent::BIN)
        .args([
            "fetch",
            &reg.url(&format!("{repo}:v1")),
            "--insecure-registries",
            &reg.addr,
        ])
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

#[tokio::test]
async fn every_layout_through_fetch() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, want) in push_all(&reg).await {
        let out = fetch(&reg, &format!("lay/{name}"), &dir.path().join(name));
        match want {
            Ok(w) => {
                assert!(out.status.success(), "{name}: {}", text(&out));
                assert!(
                    text(&out).contains(&format!("sha256: {}", sha256_hex(&w))),
                    "{name}: {}",
                    text(&out)
                );
            }
            Err(why) => {
                assert!(!out.status.success(), "{name}: {}", text(&out));
                assert!(
                    text(&out).contains(why),
                    "{name}: want {why:?} in {}",
                    text(&out)
                );
            }
        }
    }
}

#[tokio::test]
async fn every_layout_through_ecds() {
    let reg = Registry::plain().await;
    let cases = push_all(&reg).await;
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .args(["--insecure-registries", &reg.addr])
        .start()
        .await;
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let (mut envoy, mut up) = sotw_ecds(&agent, &mut cp, &names).await;
    let resources = cases
        .iter()
        .map(|(n, _)| ecds_remote(n, &reg.url(&format!("lay/{n}:v1")), &Remote::default()))
        .collect();
    up.send(ecds_resp("v1", "n1", resources));
    let nack = up
        .recv()
        .await
        .error_detail
        .expect("a NACK for the failure forms")
        .message;
    let got = envoy.recv().await;
    assert_eq!(got.resources.len(), cases.len());
    for (r, (name, want)) in got.resources.iter().zip(&cases) {
        assert_eq!(open_tec(r).0, *name);
        match want {
            Ok(w) => assert_eq!(
                sha256_hex(&std::fs::read(local_filename(r)).unwrap()),
                sha256_hex(w),
                "{name}"
            ),
            Err(_) => {
                assert!(
                    open_tec(r).1.type_url.ends_with("RBAC"),
                    "{name}: a stand-in"
                );
                assert!(
                    nack.contains(&format!("\"{name}\"")),
                    "{name} not in {nack}"
                );
            }
        }
    }
    envoy.send(ack(&names, "v1", "n1"));
}
