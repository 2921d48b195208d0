//! Registry mirrors through `ecds-agent fetch`, against real docker-registry processes: a
//! pull-through cache (distribution in proxy mode) in front of the origin, a mirror that is
//! down, a digest-only mirror, and a rewrite to another repository path.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::registry::sha256_hex;
use support::res::module;
use support::res::{ecds_remote, local_filename, Remote};
use support::xds::{ecds_resp, sotw_ecds};
use support::{free_port, Agent, ControlPlane, Layout, Registry};

fn fetch(url: &str, extra: &[&str], cache: &Path) -> Output {
    Command::new(support::agent::BIN)
        .args(["fetch", url, "--timeout", "30s"])
        .args(extra)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

use support::agent::output_text as text;

#[tokio::test]
async fn a_pull_through_mirror_serves_many_fetches_without_more_origin_pulls() {
    let origin = Registry::plain().await;
    let w = module("pull-through");
    origin.push("team/p", "1.0", &w, Layout::Docker).await;
    let mirror = Registry::pull_through(&origin.base()).await;
    let dir = tempfile::tempdir().unwrap();
    let shorthand = format!("{}={}", origin.addr, mirror.addr);
    let insecure = format!("{},{}", origin.addr, mirror.addr);
    // Five fetches with five caches: five pulls, all from the mirror.
    let mut first_fill = 0;
    for i in 0..5 {
        let out = fetch(
            &origin.url("team/p:1.0"),
            &[
                "--registry-mirror",
                &shorthand,
                "--insecure-registries",
                &insecure,
            ],
            &dir.path().join(format!("c{i}")),
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(&sha256_hex(&w)));
        assert!(
            text(&out).contains(&format!("served_by: {}", mirror.addr)),
            "{}",
            text(&out)
        );
        if i == 0 {
            first_fill = origin.blob_gets("team/p");
            assert!(first_fill >= 1);
        }
    }
    assert_eq!(
        mirror.blob_gets("team/p"),
        5,
        "the layer from the mirror each time"
    );
    // distribution 2.8's proxy fetches a blob from upstream twice on its first miss (once to
    // serve it, once to store it); after that it serves from its own storage. So five pulls
    // cost the origin exactly what the mirror's first fill cost: they do not multiply.
    assert_eq!(
        origin.blob_gets("team/p"),
        first_fill,
        "later pulls reached the origin:\n{}",
        origin.log_text()
    );
}

#[tokio::test]
async fn a_mirror_that_is_down_falls_back_to_the_origin() {
    let origin = Registry::plain().await;
    let w = module("fallback");
    origin.push("team/f", "1.0", &w, Layout::Artifact).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registries.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[registry]]\nprefix = \"{}\"\ninsecure = true\n[[registry.mirror]]\nlocation = \"{dead}\"\ninsecure = true\n",
            origin.addr
        ),
    )
    .unwrap();
    let out = fetch(
        &origin.url("team/f:1.0"),
        &["--registries-config", cfg.to_str().unwrap()],
        &dir.path().join("c"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("served_by: {}", origin.addr)),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("mirror failed"),
        "the fallback is logged: {}",
        text(&out)
    );
}

#[tokio::test]
async fn digest_only_mirrors_get_digests_and_the_origin_resolves_tags() {
    let origin = Registry::plain().await;
    let mirror = Registry::plain().await;
    let w = module("digest-only");
    let digest = origin.push("team/d", "1.0", &w, Layout::Artifact).await;
    // The mirror holds the same image under another tag only: a tag pull there would fail.
    assert_eq!(
        mirror
            .push("team/d", "elsewhere", &w, Layout::Artifact)
            .await,
        digest
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registries.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[registry]]\nprefix = \"{}/team\"\ninsecure = true\n[[registry.mirror]]\nlocation = \"{}/team\"\npull-from-mirror = \"digest-only\"\ninsecure = true\n",
            origin.addr, mirror.addr
        ),
    )
    .unwrap();
    let out = fetch(
        &origin.url("team/d:1.0"),
        &["--registries-config", cfg.to_str().unwrap()],
        &dir.path().join("c"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("served_by: {}", mirror.addr)),
        "{}",
        text(&out)
    );
    assert!(
        origin.manifest_gets("team/d") >= 1,
        "the tag was resolved at the origin"
    );
    assert_eq!(
        origin.blob_gets("team/d"),
        0,
        "no blob came from the origin"
    );
}

#[tokio::test]
async fn a_rewrite_moves_references_to_another_repository_path() {
    let reg = Registry::plain().await;
    let w = module("rewrite");
    reg.push("moved/team/p", "2.0", &w, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("registries.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[registry]]\nprefix = \"ghcr.example/team\"\nlocation = \"{}/moved/team\"\ninsecure = true\n",
            reg.addr
        ),
    )
    .unwrap();
    let out = fetch(
        "oci://ghcr.example/team/p:2.0",
        &["--registries-config", cfg.to_str().unwrap()],
        &dir.path().join("c"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&sha256_hex(&w)));
    assert!(text(&out).contains(&format!("served_by: {}", reg.addr)));
    // A bad file or shorthand is a usage error naming the flag.
    std::fs::write(&cfg, "[[registry]]\nprefix = \"x\"\nbogus = 1\n").unwrap();
    let out = fetch(
        "oci://x/y:1",
        &["--registries-config", cfg.to_str().unwrap()],
        &dir.path().join("c"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--registries-config"));
    let out = fetch(
        "oci://x/y:1",
        &["--registry-mirror", "no-equals-sign"],
        &dir.path().join("c"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--registry-mirror"));
}

#[tokio::test]
async fn the_agent_pulls_through_a_mirror_and_says_which_host_served() {
    let origin = Registry::plain().await;
    let w = module("agent-mirror");
    origin.push("team/a", "1.0", &w, Layout::Docker).await;
    let mirror = Registry::pull_through(&origin.base()).await;
    let mut cp = ControlPlane::start().await;
    let agent = Agent::builder(&cp.url())
        .args([
            "--registry-mirror",
            &format!("{}={}", origin.addr, mirror.addr),
            "--insecure-registries",
            &format!("{},{}", origin.addr, mirror.addr),
        ])
        .start()
        .await;
    let (mut envoy, up) = sotw_ecds(&agent, &mut cp, &["a"]).await;
    up.send(ecds_resp(
        "v1",
        "n1",
        vec![ecds_remote(
            "a",
            &origin.url("team/a:1.0"),
            &Remote::default(),
        )],
    ));
    let got = envoy.recv().await;
    assert!(local_filename(&got.resources[0]).ends_with(&format!("{}.wasm", sha256_hex(&w))));
    let (_, debug) = agent.get("/debug/wasm").await;
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    assert_eq!(
        v["modules"][0]["served_by"].as_str(),
        Some(mirror.addr.as_str()),
        "{debug}"
    );
    let served = format!("host=\"{}\"", mirror.addr);
    assert_eq!(
        agent
            .metric("ecds_agent_wasm_fetches_served", &served)
            .await,
        1.0
    );
}
