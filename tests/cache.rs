//! The module cache and its fetchers against real servers: Debian's `docker-registry` (plain,
//! and TLS + htpasswd) and a real HTTP server. Counts of downloads come from the servers.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ecds_agent::wasm::http::HttpOptions;
use ecds_agent::wasm::tls::FetchTls;
use ecds_agent::wasm::{Cache, CacheConfig, FetchError, GetOptions, Matched, PullPolicy};
use support::registry::{pull_secret, sha256_hex, tar_gz, PASS, USER};
use support::res::module;
use support::{Layout, ModuleServer, Registry, Route};

struct Opts {
    ca: bool,
    insecure: Vec<String>,
    max_bytes: u64,
    budget: u64,
    expiry: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            ca: true,
            insecure: vec![],
            max_bytes: 256 << 20,
            budget: 0,
            expiry: Duration::from_secs(86400),
        }
    }
}

async fn cache_in(dir: &std::path::Path, o: Opts) -> Arc<Cache> {
    let ca = o.ca.then(|| support::registry::pki().ca.clone());
    Cache::open(CacheConfig {
        dir: dir.to_owned(),
        expiry: o.expiry,
        purge_interval: Duration::from_secs(3600),
        max_module_bytes: o.max_bytes,
        max_cache_bytes: o.budget,
        http: HttpOptions {
            request_timeout: Duration::from_secs(5),
            max_attempts: 5,
            max_bytes: o.max_bytes,
            blocked: Default::default(),
        },
        tls: FetchTls::new(ca.as_deref(), o.insecure).unwrap(),
        docker_config: None,
        registries: Default::default(),
        verify: None,
        auth_ttl: Duration::from_secs(300),
    })
    .await
    .unwrap()
}

/// A plain-HTTP registry is reachable only when listed as insecure (never a silent downgrade).
fn plain_ok(reg: &Registry) -> Opts {
    Opts {
        insecure: vec![reg.addr.clone()],
        ..Default::default()
    }
}

/// Options of a resource at `version` under `policy`.
fn versioned(pull_policy: PullPolicy, version: &str) -> GetOptions {
    GetOptions {
        pull_policy,
        resource_version: version.into(),
        ..opts()
    }
}

fn opts() -> GetOptions {
    GetOptions {
        timeout: Duration::from_secs(20),
        resource_name: "ns.plugin".into(),
        ..Default::default()
    }
}

fn files_in(dir: &std::path::Path, sub: &str) -> usize {
    std::fs::read_dir(dir.join(sub))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn every_oci_layout_by_tag_and_digest() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), plain_ok(&reg)).await;
    for (i, layout) in [
        Layout::Artifact,
        Layout::CncfArtifact,
        Layout::Docker,
        Layout::OciImage,
    ]
    .into_iter()
    .enumerate()
    {
        let wasm = module(&format!("layout{i}"));
        let digest = reg.push(&format!("wasm/l{i}"), "v1", &wasm, layout).await;
        let m = cache
            .get(&reg.url(&format!("wasm/l{i}:v1")), opts())
            .await
            .unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        assert_eq!(std::fs::read(&m.path).unwrap(), wasm, "{layout:?}");
        assert_eq!(m.sha256, sha256_hex(&wasm));
        assert_eq!(m.oci_digest.as_deref(), Some(digest.as_str()));
        assert!(m.fetched);
        // By digest: served from cache, no network.
        let m2 = cache
            .get(&reg.url(&format!("wasm/l{i}@{digest}")), opts())
            .await
            .unwrap();
        assert_eq!(m2.path, m.path);
        assert!(!m2.fetched);
    }
}

#[tokio::test]
async fn sha256_matches_module_or_manifest_and_mismatch_leaves_nothing() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), plain_ok(&reg)).await;
    let wasm = module("sum");
    let digest = reg.push("wasm/sum", "v1", &wasm, Layout::Docker).await;
    let url = reg.url("wasm/sum:v1");

    let wrong = "0".repeat(64);
    let err = cache
        .get(
            &url,
            GetOptions {
                sha256: Some(wrong.clone()),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    let FetchError::Checksum {
        want,
        got,
        digest: Some(d),
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!((want, got, d), (&wrong, &sha256_hex(&wasm), &digest));
    assert!(err.to_string().contains(&wrong) && err.to_string().contains(&sha256_hex(&wasm)));
    assert_eq!(
        files_in(dir.path(), "modules"),
        0,
        "no file after a mismatch"
    );
    assert_eq!(
        files_in(dir.path(), "tmp"),
        0,
        "no partial file after a mismatch"
    );

    let m = cache
        .get(
            &url,
            GetOptions {
                sha256: Some(digest.clone()),
                ..opts()
            },
        )
        .await
        .unwrap();
    assert_eq!(m.matched, Some(Matched::ManifestDigest));
    let m = cache
        .get(
            &url,
            GetOptions {
                sha256: Some(sha256_hex(&wasm)),
                ..opts()
            },
        )
        .await
        .unwrap();
    assert_eq!(m.matched, Some(Matched::ModuleSha256));
    assert!(!m.fetched, "known module sha256: no network");

    // HTTP: the checksum of the unboxed module.
    let srv = ModuleServer::start().await;
    srv.put("m.wasm", wasm.clone());
    let err = cache
        .get(
            &srv.url("m.wasm"),
            GetOptions {
                sha256: Some("1".repeat(64)),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
}

#[tokio::test]
async fn pull_policies_over_oci_follow_resource_versions() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), plain_ok(&reg)).await;
    let (m1, m2) = (module("v1"), module("v2"));
    reg.push("wasm/pp", "1.0", &m1, Layout::Artifact).await;
    let url = reg.url("wasm/pp:1.0");

    let a = cache
        .get(&url, versioned(PullPolicy::Unspecified, "1"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&a.path).unwrap(), m1);
    reg.push("wasm/pp", "1.0", &m2, Layout::Artifact).await; // the tag moves
    for (policy, version) in [
        (PullPolicy::IfNotPresent, "2"),
        (PullPolicy::Unspecified, "3"),
        (PullPolicy::Always, "3"),
    ] {
        let m = cache.get(&url, versioned(policy, version)).await.unwrap();
        assert!(!m.fetched, "{policy:?} v{version}: no pull");
        assert_eq!(m.sha256, a.sha256);
    }
    let b = cache
        .get(&url, versioned(PullPolicy::Always, "4"))
        .await
        .unwrap();
    assert!(b.fetched, "Always with a new resource version pulls");
    assert_eq!(std::fs::read(&b.path).unwrap(), m2);
    let c = cache
        .get(&url, versioned(PullPolicy::Always, "4"))
        .await
        .unwrap();
    assert!(!c.fetched, "Always with the same version does not");

    // :latest (and an untagged reference) mean Always under the default policy.
    let (latest, untagged) = (reg.url("wasm/pp:latest"), reg.url("wasm/pp"));
    reg.push("wasm/pp", "latest", &m1, Layout::Artifact).await;
    let first = cache
        .get(&latest, versioned(PullPolicy::Unspecified, "1"))
        .await
        .unwrap();
    assert_eq!(first.sha256, sha256_hex(&m1));
    reg.push("wasm/pp", "latest", &m2, Layout::Artifact).await; // :latest moves
    for (url, policy, version, want, why) in [
        (
            &latest,
            PullPolicy::Unspecified,
            "1",
            &m1,
            "same version: reuse",
        ),
        (
            &latest,
            PullPolicy::Unspecified,
            "2",
            &m2,
            "new version: pull",
        ),
        (
            &latest,
            PullPolicy::IfNotPresent,
            "3",
            &m2,
            "IfNotPresent: reuse",
        ),
        (
            &untagged,
            PullPolicy::Unspecified,
            "9",
            &m2,
            "untagged means :latest",
        ),
    ] {
        let m = cache.get(url, versioned(policy, version)).await.unwrap();
        assert_eq!(m.sha256, sha256_hex(want), "{why}");
    }
}

#[tokio::test]
async fn pull_policies_over_http_count_requests() {
    // Istio's TestWasmCachePolicyChangesUsingHTTP sequence.
    let srv = ModuleServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), Opts::default()).await;
    let (b1, b2) = (module("h1"), module("h2"));
    srv.put("p.wasm", b1.clone());
    let url = srv.url("p.wasm");
    let a = cache
        .get(&url, versioned(PullPolicy::Unspecified, "1"))
        .await
        .unwrap();
    assert_eq!(srv.hits("p.wasm"), 1);
    cache
        .get(&url, versioned(PullPolicy::Unspecified, "2"))
        .await
        .unwrap();
    assert_eq!(srv.hits("p.wasm"), 1);
    cache
        .get(&url, versioned(PullPolicy::IfNotPresent, "3"))
        .await
        .unwrap();
    cache
        .get(&url, versioned(PullPolicy::Always, "3"))
        .await
        .unwrap();
    assert_eq!(srv.hits("p.wasm"), 1);
    let same = cache
        .get(&url, versioned(PullPolicy::Always, "4"))
        .await
        .unwrap();
    assert_eq!(srv.hits("p.wasm"), 2);
    assert_eq!(same.path, a.path, "unchanged content, same file");
    srv.put("p.wasm", b2.clone());
    let changed = cache
        .get(&url, versioned(PullPolicy::Always, "5"))
        .await
        .unwrap();
    assert_eq!(srv.hits("p.wasm"), 3);
    assert_eq!(std::fs::read(&changed.path).unwrap(), b2);
}

#[tokio::test]
async fn tls_registry_with_pull_secrets() {
    let reg = Registry::secure().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), Opts::default()).await;
    let wasm = module("private");
    reg.push("wasm/private", "v1", &wasm, Layout::OciImage)
        .await;
    let url = reg.url("wasm/private:v1");

    let err = cache.get(&url, opts()).await.unwrap_err();
    assert!(
        matches!(err, FetchError::Auth { .. }),
        "no credentials: {err}"
    );
    assert_eq!(err.fetch_result(), Some("manifest_failure"));

    let bad = pull_secret(&reg.addr, USER, "hunter2-not-it");
    let err = cache
        .get(
            &url,
            GetOptions {
                pull_secret: Some(bad),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Auth { .. }),
        "wrong password: {err}"
    );
    assert!(!err.to_string().contains("hunter2"), "secret leaked: {err}");

    let good = pull_secret(&reg.addr, USER, PASS);
    let m = cache
        .get(
            &url,
            GetOptions {
                pull_secret: Some(good),
                ..opts()
            },
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read(&m.path).unwrap(), wasm);

    // Cached by now, but private: a requester whose secret is unusable does not get it.
    let err = cache
        .get(
            &url,
            GetOptions {
                pull_secret: Some(b"{not json".to_vec()),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pull secret"), "{err}");
    // The good secret, proven by the download within the TTL: a hit with no network.
    let blobs = reg.blob_gets("wasm/private");
    let m = cache
        .get(
            &url,
            GetOptions {
                pull_secret: Some(pull_secret(&reg.addr, USER, PASS)),
                ..opts()
            },
        )
        .await
        .unwrap();
    assert!(!m.fetched);
    assert_eq!(reg.blob_gets("wasm/private"), blobs);
}

#[tokio::test]
async fn insecure_list_decides_tls_verification_and_plain_http() {
    let secure = Registry::secure().await;
    let plain = Registry::plain().await;
    let wasm = module("insecure");
    secure.push("wasm/x", "v1", &wasm, Layout::Artifact).await;
    plain.push("wasm/x", "v1", &wasm, Layout::Artifact).await;
    let secret = Some(pull_secret(&secure.addr, USER, PASS));

    // No CA, not listed: the self-signed chain is refused; the plain registry is never downgraded to.
    let dir = tempfile::tempdir().unwrap();
    let strict = cache_in(
        dir.path(),
        Opts {
            ca: false,
            ..Default::default()
        },
    )
    .await;
    let err = strict
        .get(
            &secure.url("wasm/x:v1"),
            GetOptions {
                pull_secret: secret.clone(),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate") || err.to_string().contains("https"),
        "{err}"
    );
    let err = strict
        .get(&plain.url("wasm/x:v1"), opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Manifest { .. }),
        "no silent downgrade: {err}"
    );

    // Listed hosts: TLS without verification, or plain HTTP.
    let dir = tempfile::tempdir().unwrap();
    let (listed, listed_plain) = (secure.addr.clone(), plain.addr.clone());
    let lax = cache_in(
        dir.path(),
        Opts {
            ca: false,
            insecure: vec![listed, listed_plain.clone()],
            ..Default::default()
        },
    )
    .await;
    lax.get(
        &secure.url("wasm/x:v1"),
        GetOptions {
            pull_secret: secret.clone(),
            ..opts()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lax = cache_in(
        dir.path(),
        Opts {
            ca: false,
            insecure: vec![listed_plain],
            ..Default::default()
        },
    )
    .await;
    lax.get(&plain.url("wasm/x:v1"), opts()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let star = cache_in(
        dir.path(),
        Opts {
            ca: false,
            insecure: vec!["*".into()],
            ..Default::default()
        },
    )
    .await;
    star.get(
        &secure.url("wasm/x:v1"),
        GetOptions {
            pull_secret: secret,
            ..opts()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn invalid_and_oversized_modules_are_errors_and_leave_nothing() {
    let srv = ModuleServer::start().await;
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(
        dir.path(),
        Opts {
            max_bytes: 4096,
            ..plain_ok(&reg)
        },
    )
    .await;

    srv.put("garbage.wasm", b"<html>not wasm</html>".to_vec());
    let err = cache
        .get(&srv.url("garbage.wasm"), opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Invalid { .. }) && err.to_string().contains("magic"),
        "{err}"
    );
    assert_eq!(err.fetch_result(), Some("fetch_failure"));

    let mut broken = module("broken");
    broken.truncate(broken.len() - 3);
    srv.put("broken.wasm", broken);
    let err = cache
        .get(&srv.url("broken.wasm"), opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("validation failed"), "{err}");

    let big = wat::parse_str(format!("(module (data \"{}\"))", "x".repeat(8000))).unwrap();
    srv.put("big.wasm", big.clone());
    let err = cache.get(&srv.url("big.wasm"), opts()).await.unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { limit: 4096, .. }),
        "{err}"
    );
    let (_, gz) = tar_gz("plugin.wasm", &big);
    srv.put("big.tgz", gz);
    let err = cache.get(&srv.url("big.tgz"), opts()).await.unwrap_err();
    assert!(
        err.to_string().contains("4096"),
        "compressed bomb refused: {err}"
    );

    reg.push("wasm/big", "v1", &big, Layout::Artifact).await;
    let err = cache
        .get(&reg.url("wasm/big:v1"), opts())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");
    reg.push("wasm/garbage", "v1", b"definitely not wasm", Layout::Docker)
        .await;
    let err = cache
        .get(&reg.url("wasm/garbage:v1"), opts())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Invalid { .. }), "{err}");

    assert_eq!(files_in(dir.path(), "modules"), 0);
    assert_eq!(files_in(dir.path(), "tmp"), 0);
}

#[tokio::test]
async fn http_retries_only_what_can_recover() {
    let srv = ModuleServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), Opts::default()).await;
    let wasm = module("retry");
    srv.set(
        "flaky.wasm",
        Route {
            body: wasm.clone(),
            fail_first: 3,
            fail_status: 500,
            ..Default::default()
        },
    );
    let m = cache.get(&srv.url("flaky.wasm"), opts()).await.unwrap();
    assert_eq!(std::fs::read(&m.path).unwrap(), wasm);
    assert_eq!(srv.hits("flaky.wasm"), 4, "three 500s then success");

    srv.set(
        "down.wasm",
        Route {
            body: wasm.clone(),
            fail_first: 100,
            fail_status: 503,
            ..Default::default()
        },
    );
    let err = cache.get(&srv.url("down.wasm"), opts()).await.unwrap_err();
    assert_eq!(srv.hits("down.wasm"), 5);
    assert!(
        err.to_string().contains("after 5 attempt(s)") && err.to_string().contains("503"),
        "{err}"
    );
    assert_eq!(err.fetch_result(), Some("download_failure"));

    let err = cache
        .get(&srv.url("missing.wasm"), opts())
        .await
        .unwrap_err();
    assert_eq!(srv.hits("missing.wasm"), 1, "404 is not retried");
    assert!(err.to_string().contains("404"), "{err}");

    srv.set(
        "slow.wasm",
        Route {
            body: wasm,
            delay: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let err = cache
        .get(
            &srv.url("slow.wasm"),
            GetOptions {
                timeout: Duration::from_secs(1),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the deadline holds: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            FetchError::Timeout { .. } | FetchError::Download { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn gzip_and_tar_bodies_are_unboxed() {
    let srv = ModuleServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), Opts::default()).await;
    let wasm = module("boxed");
    let (tar, tgz) = tar_gz("plugin.wasm", &wasm);
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&wasm).unwrap();
        e.finish().unwrap()
    };
    for (path, body) in [
        ("a.wasm", wasm.clone()),
        ("a.wasm.gz", gz),
        ("a.tar", tar),
        ("a.tar.gz", tgz.clone()),
    ] {
        srv.put(path, body);
        let m = cache.get(&srv.url(path), opts()).await.unwrap();
        assert_eq!(m.sha256, sha256_hex(&wasm), "{path}");
    }
    // The sha256 of the body as served is accepted too, and reported.
    let m = cache
        .get(
            &srv.url("a.tar.gz"),
            GetOptions {
                sha256: Some(sha256_hex(&tgz)),
                ..opts()
            },
        )
        .await
        .unwrap();
    assert_eq!(m.matched, Some(Matched::RawBodySha256));
}

#[tokio::test]
async fn fifty_concurrent_gets_download_once() {
    let srv = ModuleServer::start().await;
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), plain_ok(&reg)).await;
    srv.set(
        "one.wasm",
        Route {
            body: module("one"),
            delay: Duration::from_millis(300),
            ..Default::default()
        },
    );
    srv.set(
        "two.wasm",
        Route {
            body: module("two"),
            delay: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let gets = (0..50).map(|i| {
        let c = cache.clone();
        let url = srv.url(if i % 2 == 0 { "one.wasm" } else { "two.wasm" });
        tokio::spawn(async move { c.get(&url, opts()).await.unwrap() })
    });
    for r in futures::future::join_all(gets).await {
        r.unwrap();
    }
    assert_eq!(
        (srv.hits("one.wasm"), srv.hits("two.wasm")),
        (1, 1),
        "one download per module"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "modules downloaded in parallel"
    );

    reg.push("wasm/popular", "v1", &module("popular"), Layout::Docker)
        .await;
    let url = reg.url("wasm/popular:v1");
    let gets = (0..50).map(|_| {
        let c = cache.clone();
        let url = url.clone();
        tokio::spawn(async move { c.get(&url, opts()).await.unwrap() })
    });
    for r in futures::future::join_all(gets).await {
        r.unwrap();
    }
    assert_eq!(
        reg.blob_gets("wasm/popular"),
        1,
        "one layer download for 50 gets"
    );
}

#[tokio::test]
async fn restart_serves_from_disk_with_the_registry_stopped() {
    let mut reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let wasm = module("persist");
    reg.push("wasm/persist", "v1", &wasm, Layout::Artifact)
        .await;
    let url = reg.url("wasm/persist:v1");
    let first = {
        let cache = cache_in(dir.path(), plain_ok(&reg)).await;
        cache.get(&url, opts()).await.unwrap()
    };
    reg.stop();
    let cache = cache_in(dir.path(), plain_ok(&reg)).await;
    let again = cache.get(&url, opts()).await.unwrap();
    assert_eq!((again.path.clone(), again.fetched), (first.path, false));
    assert_eq!(std::fs::read(&again.path).unwrap(), wasm);

    // The CLI sees the same cache.
    let out = std::process::Command::new(support::agent::BIN)
        .args([
            "fetch",
            &url,
            "--insecure-registries",
            &reg.addr,
            "--cache-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("sha256: {}", sha256_hex(&wasm)))
            && stdout.contains("source: cache"),
        "{stdout}"
    );
}

#[tokio::test]
async fn cli_fetch_prints_path_and_digests_and_fails_clearly() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let wasm = module("cli");
    let digest = reg.push("wasm/cli", "v2", &wasm, Layout::OciImage).await;
    let out = std::process::Command::new(support::agent::BIN)
        .args([
            "fetch",
            &reg.url("wasm/cli:v2"),
            "--sha256",
            &digest,
            "--insecure-registries",
            &reg.addr,
            "--cache-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir
        .path()
        .join("modules")
        .join(format!("{}.wasm", sha256_hex(&wasm)));
    assert!(
        stdout.contains(&format!("path: {}", path.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("oci_digest: {digest}"))
            && stdout.contains("matched: manifest_digest"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(path).unwrap(), wasm);

    let out = std::process::Command::new(support::agent::BIN)
        .args([
            "fetch",
            "oci://127.0.0.1:1/nothing:here",
            "--timeout",
            "3s",
            "--cache-dir",
        ])
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("oci://127.0.0.1:1/nothing:here"),
        "{stderr}"
    );
}

#[tokio::test]
async fn purge_and_budget_never_remove_modules_in_use() {
    let srv = ModuleServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(
        dir.path(),
        Opts {
            expiry: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let (a, b) = (module("in-use"), module("idle"));
    srv.put("a.wasm", a);
    srv.put("b.wasm", b);
    let ma = cache.get(&srv.url("a.wasm"), opts()).await.unwrap();
    let mb = cache.get(&srv.url("b.wasm"), opts()).await.unwrap();
    cache.pin(1, "ns.a", Some(&ma.sha256));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(cache.purge_expired().await, 1);
    assert!(ma.path.exists(), "a module in use survives expiry");
    assert!(!mb.path.exists(), "an idle module is purged");
    // Released: it starts a fresh expiry, then goes.
    cache.release_owner(1);
    assert_eq!(cache.purge_expired().await, 0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(cache.purge_expired().await, 1);
    assert!(!ma.path.exists());

    // Byte budget: LRU eviction skips pinned modules.
    let dir = tempfile::tempdir().unwrap();
    let one = module("b1");
    let budget = (one.len() as u64) * 2 + 10;
    let cache = cache_in(
        dir.path(),
        Opts {
            budget,
            ..Default::default()
        },
    )
    .await;
    let mut got = vec![];
    for i in 0..4 {
        srv.put(&format!("lru{i}.wasm"), module(&format!("b{i}")));
        let m = cache
            .get(&srv.url(&format!("lru{i}.wasm")), opts())
            .await
            .unwrap();
        if i == 0 {
            cache.pin(7, "ns.first", Some(&m.sha256));
        }
        got.push(m);
        tokio::time::sleep(Duration::from_millis(1100)).await; // distinct last-use seconds
    }
    assert!(got[0].path.exists(), "pinned first module kept");
    assert!(
        !got[1].path.exists() && !got[2].path.exists(),
        "least recently used evicted"
    );
    assert!(got[3].path.exists(), "newest kept");
}

#[tokio::test]
async fn image_index_resolves_to_the_wasm_image_without_assuming_amd64() {
    let reg = Registry::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), plain_ok(&reg)).await;
    let wasm = module("indexed");
    let img = reg.push("wasm/multi", "img", &wasm, Layout::OciImage).await;
    let art = reg.push("wasm/multi", "art", &wasm, Layout::Artifact).await;
    let size = |_: &str| 400;
    for (tag, entries) in [
        (
            "arm-only",
            serde_json::json!([
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": img, "size": size(&img),
                 "platform": {"architecture": "arm64", "os": "linux"}},
            ]),
        ),
        (
            "wasi-with-attestation",
            serde_json::json!([
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": img, "size": size(&img),
                 "platform": {"architecture": "unknown", "os": "unknown"},
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": art, "size": size(&art),
                 "platform": {"architecture": "wasm", "os": "wasip1"}},
            ]),
        ),
    ] {
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
        let idx = reg
            .push_manifest(
                "wasm/multi",
                tag,
                "application/vnd.oci.image.index.v1+json",
                &index,
            )
            .await;
        let m = cache
            .get(
                &reg.url(&format!("wasm/multi:{tag}")),
                GetOptions {
                    sha256: Some(idx.clone()),
                    ..opts()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(m.sha256, sha256_hex(&wasm), "{tag}");
        assert!(
            m.matched == Some(Matched::IndexDigest) || m.matched == Some(Matched::ManifestDigest),
            "{tag}: {:?}",
            m.matched
        );
    }
}

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), Opts::default()).await;
    for (url, needle) in [
        (
            "foo://abc",
            "unsupported Wasm module downloading URL scheme: foo",
        ),
        ("oci://", "expected oci://registry/repository"),
        ("https://", "invalid module URL"),
        ("registry/repo:tag", "no scheme"),
    ] {
        let err = cache.get(url, opts()).await.unwrap_err();
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }
    let err = cache
        .get(
            "http://127.0.0.1:1/x.wasm",
            GetOptions {
                sha256: Some("xyz".into()),
                ..opts()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not 64 hex digits"), "{err}");
}

#[tokio::test]
async fn http_proxy_environment_is_honoured() {
    // The module host does not exist; only the proxy (our server) can answer for it.
    let proxy = ModuleServer::start().await;
    let wasm = module("proxied");
    proxy.put("filters/x.wasm", wasm.clone());
    let dir = tempfile::tempdir().unwrap();
    // tokio's Command: the proxy runs on this test's runtime and must keep serving.
    let out = tokio::process::Command::new(support::agent::BIN)
        .args([
            "fetch",
            "http://modules.example.invalid/filters/x.wasm",
            "--timeout",
            "5s",
            "--cache-dir",
        ])
        .arg(dir.path())
        .env("HTTP_PROXY", format!("http://{}", proxy.addr))
        .env("NO_PROXY", "")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha256_hex(&wasm)));
    assert_eq!(
        proxy.hits("filters/x.wasm"),
        1,
        "the request went through the proxy"
    );
}

#[tokio::test]
async fn system_roots_honour_ssl_cert_file() {
    let reg = Registry::secure().await;
    let wasm = module("ssl-cert-file");
    reg.push("wasm/roots", "v1", &wasm, Layout::Artifact).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("dockerconfig.json");
    std::fs::write(&secret, pull_secret(&reg.addr, USER, PASS)).unwrap();
    let fetch = |extra: Option<(&str, &std::path::Path)>| {
        let mut cmd = std::process::Command::new(support::agent::BIN);
        cmd.args([
            "fetch",
            &reg.url("wasm/roots:v1"),
            "--timeout",
            "10s",
            "--pull-secret",
        ])
        .arg(&secret)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env_remove("SSL_CERT_FILE")
        .env("RUST_BACKTRACE", "0");
        if let Some((k, v)) = extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = fetch(None);
    assert_eq!(out.status.code(), Some(1), "untrusted CA is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fetch(Some(("SSL_CERT_FILE", reg.ca_path())));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha256_hex(&wasm)));
}

#[tokio::test]
async fn concurrent_gets_with_different_credentials_do_not_share_a_download() {
    let reg = Registry::secure().await;
    reg.push("wasm/creds", "v1", &module("creds"), Layout::Artifact)
        .await;
    let url = reg.url("wasm/creds:v1");
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_in(dir.path(), Opts::default()).await;
        let mut gets = Vec::new();
        for i in 0..6 {
            let c = cache.clone();
            let url = url.clone();
            let secret = if i == 3 {
                pull_secret(&reg.addr, USER, PASS)
            } else {
                pull_secret(&reg.addr, USER, "wrong")
            };
            gets.push(tokio::spawn(async move {
                c.get(
                    &url,
                    GetOptions {
                        pull_secret: Some(secret),
                        ..opts()
                    },
                )
                .await
            }));
        }
        let results: Vec<_> = futures::future::join_all(gets)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(
            results[3].is_ok(),
            "round {round}: the caller with valid credentials gets the module: {:?}",
            results[3]
        );
    }
}

#[tokio::test]
async fn processes_sharing_a_cache_dir_download_once() {
    // 20 `ecds-agent fetch` processes (or agents on a node-shared cache) started together on a
    // cold directory: each opening the cache must leave the others' temp files alone.
    let srv = ModuleServer::start().await;
    let reg = Registry::plain().await;
    let wasm = module("shared-dir");
    srv.set(
        "shared.wasm",
        Route {
            body: wasm.clone(),
            delay: Duration::from_millis(500),
            ..Default::default()
        },
    );
    reg.push("wasm/shared", "v1", &wasm, Layout::Docker).await;
    let dir = tempfile::tempdir().unwrap();
    for url in [srv.url("shared.wasm"), reg.url("wasm/shared:v1")] {
        let runs = (0..20).map(|_| {
            tokio::process::Command::new(support::agent::BIN)
                .args([
                    "fetch",
                    &url,
                    "--insecure-registries",
                    &reg.addr,
                    "--cache-dir",
                ])
                .arg(dir.path())
                .env("RUST_BACKTRACE", "0")
                .output()
        });
        for out in futures::future::join_all(runs).await {
            let out = out.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(&sha256_hex(&wasm)));
        }
    }
    assert_eq!(
        srv.hits("shared.wasm"),
        1,
        "one HTTP download for 20 processes"
    );
    assert_eq!(
        reg.blob_gets("wasm/shared"),
        1,
        "one layer pull for 20 processes"
    );
    // The index written by 40 processes still knows both URLs.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    assert!(index["urls"].as_object().unwrap().len() >= 2, "{index}");
}

/// Two caches on one directory stand for two processes (each has its own lease). A module B
/// hands out is safe from A's purge before B pins it: `get` publishes it as in use before it
/// returns, whatever A's index says about its last use.
#[tokio::test]
async fn a_module_handed_out_is_safe_from_another_process_purge_before_its_pin() {
    let srv = ModuleServer::start().await;
    srv.put("m.wasm", module("handed-out"));
    let dir = tempfile::tempdir().unwrap();
    let a = cache_in(
        dir.path(),
        Opts {
            expiry: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let m = a.get(&srv.url("m.wasm"), opts()).await.unwrap();
    let b = cache_in(dir.path(), Opts::default()).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // A's record says unused for 2 s; B takes it now (a hit) and has not pinned it yet.
    let again = b.get(&srv.url("m.wasm"), opts()).await.unwrap();
    assert!(!again.fetched);
    assert_eq!(a.purge_expired().await, 0);
    assert!(m.path.exists(), "A purged the module B just handed out");
}

/// An index lock held by a suspended process (here: this test) does not wedge the others: a
/// save gives up after its deadline, logged, and the get still returns its module.
#[tokio::test]
async fn a_held_index_lock_does_not_wedge_a_get() {
    let srv = ModuleServer::start().await;
    srv.put("m.wasm", module("lock-held"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("locks")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("locks/index.lock"))
        .unwrap();
    lock.lock().unwrap();
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        let cache = cache_in(dir.path(), Opts::default()).await;
        cache.get(&srv.url("m.wasm"), opts()).await
    })
    .await
    .expect("a held index lock wedged the cache");
    assert!(got.is_ok(), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(25));
    drop(lock);
}

/// The failures remembered for the admin pages are bounded: a control plane naming ever new
/// bad URLs cannot grow them (nor `/stats`) without limit.
#[tokio::test]
async fn remembered_failures_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path(), Opts::default()).await;
    for i in 0..300 {
        // One resource each (a resource failing on something new forgets its old failure).
        let o = GetOptions {
            resource_name: format!("r{i}"),
            ..opts()
        };
        let e = cache
            .get(&format!("oci://bad..host{i}/x:v1"), o)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::BadUrl { .. }), "{e}");
    }
    let v = cache.view();
    assert_eq!(v.failures.len(), ecds_agent::wasm::cache::MAX_FAILURES);
    assert!(
        v.failures.keys().any(|k| k.contains("host299")),
        "the newest stays"
    );
}
