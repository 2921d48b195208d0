//! Hostile and misdirecting servers for the HTTP fetcher, through the real `fetch` command and a
//! Python server (not written in Rust): an https URL redirected to plain http, a pre-signed URL
//! whose token must not reach the redirect target, loops and long chains, and the dial-level
//! SSRF guard (`BLOCKED_CIDRS_IN_WASM_FETCH`), tested with loopback addresses only.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use support::registry::{pki, sha256_hex};
use support::res::module;

struct Py {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Py {
    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn python() -> PathBuf {
    std::env::var_os("PYTHON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// Starts the redirector on `bind`, serving `dir`; HTTPS with the test PKI when `tls`.
fn redirector(bind: &str, dir: &Path, tls: bool) -> Py {
    redirector_with(bind, dir, tls, &[])
}

fn redirector_with(bind: &str, dir: &Path, tls: bool, extra: &[&str]) -> Py {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("requests-{n}.jsonl"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/redirector.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args(["--bind", bind, "--dir"])
        .arg(dir)
        .arg("--log")
        .arg(&log)
        .args(extra)
        .stdout(Stdio::piped());
    if tls {
        cmd.arg("--cert")
            .arg(&pki().cert)
            .arg("--key")
            .arg(&pki().key);
    }
    let mut child = cmd.spawn().expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Py {
        child,
        port: line.trim().parse().expect("the redirector's port"),
        log,
    }
}

fn fetch(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    fetch_into(url, dir.path(), extra, env)
}

fn fetch_into(url: &str, cache: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(support::agent::BIN);
    let timeout = if extra.contains(&"--timeout") {
        vec![]
    } else {
        vec!["--timeout", "20s"]
    };
    cmd.args(["fetch", url, "--http-max-attempts", "1"])
        .args(timeout)
        .args(["--fetch-ca", pki().ca.to_str().unwrap()])
        .args(extra)
        .arg("--cache-dir")
        .arg(cache);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

use support::agent::output_text as text;

fn enc(u: &str) -> String {
    u.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn an_https_url_never_continues_over_plain_http_unless_the_host_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module("downgrade");
    std::fs::write(dir.path().join("m.wasm"), &wasm).unwrap();
    let plain = redirector("127.0.0.1", dir.path(), false);
    let secure = redirector("127.0.0.1", dir.path(), true);
    let target = format!("http://127.0.0.1:{}/file/m.wasm", plain.port);
    let url = format!(
        "https://127.0.0.1:{}/redirect?to={}",
        secure.port,
        enc(&target)
    );
    let out = fetch(&url, &[], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("plain http refused"), "{}", text(&out));
    assert!(
        plain.requests().is_empty(),
        "the plain-http host was dialled"
    );
    // Listed as insecure, the hop is allowed.
    let listed = format!("127.0.0.1:{}", plain.port);
    let out = fetch(&url, &["--insecure-registries", &listed], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&sha256_hex(&wasm)));
}

#[test]
fn a_redirect_target_gets_no_referer_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module("referer");
    std::fs::write(dir.path().join("m.wasm"), &wasm).unwrap();
    let origin = redirector("127.0.0.1", dir.path(), false);
    let third = redirector("127.0.0.1", dir.path(), false);
    let target = format!("http://127.0.0.1:{}/file/m.wasm", third.port);
    let url = format!(
        "http://127.0.0.1:{}/redirect?X-Amz-Signature=s3cr3t-token&to={}",
        origin.port,
        enc(&target)
    );
    let cache = dir.path().join("cache");
    let out = fetch_into(&url, &cache, &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let index = std::fs::read_to_string(cache.join("index.json")).unwrap();
    assert!(
        !index.contains("s3cr3t-token"),
        "index.json holds the token: {index}"
    );
    let seen = third.requests();
    assert_eq!(seen.len(), 1);
    let headers = seen[0]["headers"].as_object().unwrap();
    assert!(
        !headers.keys().any(|k| k.eq_ignore_ascii_case("referer")),
        "{headers:?}"
    );
    assert!(!seen[0].to_string().contains("s3cr3t-token"));
    assert!(
        !text(&out).contains("s3cr3t-token"),
        "the token is not printed"
    );
}

#[test]
fn loops_and_more_than_ten_redirects_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.wasm"), module("chain")).unwrap();
    let s = redirector("127.0.0.1", dir.path(), false);
    let out = fetch(&format!("http://127.0.0.1:{}/loop", s.port), &[], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("redirect loop"), "{}", text(&out));
    let target = format!("http://127.0.0.1:{}/file/m.wasm", s.port);
    let chain = |n: usize| format!("http://127.0.0.1:{}/chain/{n}?to={}", s.port, enc(&target));
    // /chain/9 is ten redirects: allowed; /chain/10 is eleven.
    let out = fetch(&chain(9), &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = fetch(&chain(10), &[], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("more than 10 redirects"),
        "{}",
        text(&out)
    );
}

#[test]
fn blocked_addresses_are_refused_at_every_hop() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.wasm"), module("ssrf")).unwrap();
    let origin = redirector("127.0.0.1", dir.path(), false);
    let blocked = redirector("127.0.0.2", dir.path(), false);
    let env = [("BLOCKED_CIDRS_IN_WASM_FETCH", "127.0.0.2/32")];
    let target = format!("http://127.0.0.2:{}/file/m.wasm", blocked.port);
    // Directly,
    let out = fetch(&target, &[], &env);
    assert!(!out.status.success());
    assert!(text(&out).contains("blocked address"), "{}", text(&out));
    // and through a redirect.
    let url = format!(
        "http://127.0.0.1:{}/redirect?to={}",
        origin.port,
        enc(&target)
    );
    let out = fetch(&url, &[], &env);
    assert!(!out.status.success());
    assert!(text(&out).contains("blocked address"), "{}", text(&out));
    assert!(
        blocked.requests().is_empty(),
        "the blocked host was dialled"
    );
    // A name that resolves only to blocked addresses.
    let name = format!("http://localhost:{}/file/m.wasm", origin.port);
    let out = fetch(
        &name,
        &[],
        &[("BLOCKED_CIDRS_IN_WASM_FETCH", "127.0.0.0/8,::1/128")],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("only to blocked addresses"),
        "{}",
        text(&out)
    );
    assert!(
        origin.requests().len() == 1,
        "only the redirect itself reached the origin"
    );
    // Without the variable the same fetch works.
    assert!(fetch(&target, &[], &[]).status.success());
    // A bad list is a usage error naming the flag.
    let out = fetch(&target, &["--blocked-cidrs", "10.0.0.0/99"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--blocked-cidrs"), "{}", text(&out));
}

#[test]
fn an_unsafe_bearer_realm_gets_no_credentials() {
    realm_case(false);
}

/// The realm is checked on the request that carries the credentials, not on a probe: a
/// registry whose first answer names a harmless token endpoint and every later one a loopback
/// literal still gets no credentials sent there.
#[test]
fn a_realm_that_changes_after_the_first_answer_gets_no_credentials() {
    realm_case(true);
}

/// A "registry" that sends clients to a token endpoint on a loopback literal (think
/// 169.254.169.254) — from its first answer, or only after a harmless first answer when
/// `flip`: the agent must refuse before anything is sent there.
fn realm_case(flip: bool) {
    let dir = tempfile::tempdir().unwrap();
    let token_host = redirector("127.0.0.1", dir.path(), false);
    let realm = format!("http://127.0.0.1:{}/token", token_host.port);
    let mut extra = vec!["--realm", &realm];
    if flip {
        extra.extend(["--realm-first", "http://tokens.invalid/token"]);
    }
    let reg = redirector_with("127.0.0.1", dir.path(), false, &extra);
    let secret = dir.path().join("secret.json");
    std::fs::write(
        &secret,
        support::registry::pull_secret(&format!("127.0.0.1:{}", reg.port), "user", "hunter2"),
    )
    .unwrap();
    let url = format!("oci://127.0.0.1:{}/team/plugin:1.0", reg.port);
    let listed = format!("127.0.0.1:{}", reg.port);
    let out = fetch(
        &url,
        &[
            "--insecure-registries",
            &listed,
            "--pull-secret",
            secret.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rejected unsafe bearer realm"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("hunter2"));
    assert!(
        token_host.requests().is_empty(),
        "credentials went to the realm: {:?}",
        token_host.requests()
    );
}

/// Starts tests/hostile/registry.py (a misbehaving registry).
fn hostile_registry(dir: &Path) -> Py {
    hostile_registry_with(dir, &[])
}

fn hostile_registry_with(dir: &Path, extra: &[&str]) -> Py {
    let log = dir.join(format!("registry-requests{}.jsonl", extra.join("-")));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/registry.py");
    let mut child = Command::new(python())
        .arg(script)
        .arg("--log")
        .arg(&log)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Py {
        child,
        port: line.trim().parse().expect("the registry's port"),
        log,
    }
}

#[test]
fn hostile_registries_get_clear_errors_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let reg = hostile_registry(dir.path());
    let host = format!("127.0.0.1:{}", reg.port);
    let cases: Vec<(String, &str)> = vec![
        (
            format!("oci://{host}/many-layers/p:1.0"),
            "more than the 256",
        ),
        (
            format!("oci://{host}/huge-index/p:1.0"),
            "no Wasm platform (wasm, wasip1, wasip2) among its 10000 entries",
        ),
        (
            format!("oci://{host}/lie-manifest/p@sha256:{}", "a".repeat(64)),
            "digest",
        ),
        (format!("oci://{host}/lie-blob/p:1.0"), "layer"),
        (format!("oci://{host}/html/p:1.0"), "manifest"),
        (format!("oci://{host}/stall/p:1.0"), "timed out"),
        (
            format!("oci://{host}/huge/p:1.0"),
            "over the 4194304-byte limit",
        ),
        (
            format!("oci://{host}/endless/p:1.0"),
            "over the 4194304-byte limit",
        ),
        (format!("oci://{host}/stall-blob/p:1.0"), "timed out"),
    ];
    for (url, want) in &cases {
        let started = std::time::Instant::now();
        let cache = dir
            .path()
            .join(format!("cache-{}", sha256_hex(url.as_bytes())));
        let out = fetch_into(
            url,
            &cache,
            &["--insecure-registries", &host, "--timeout", "5s"],
            &[],
        );
        let took = started.elapsed();
        assert!(!out.status.success(), "{url}: {}", text(&out));
        assert!(
            text(&out).contains(want),
            "{url}: want {want:?} in {}",
            text(&out)
        );
        assert!(
            took < std::time::Duration::from_secs(15),
            "{url}: took {took:?}"
        );
        let modules = cache.join("modules");
        let stored = std::fs::read_dir(&modules).map(|d| d.count()).unwrap_or(0);
        assert_eq!(stored, 0, "{url}: a module was stored");
    }
    // The index with 10 000 entries cost at most 16 child manifest requests.
    let children = reg
        .requests()
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v2/huge-index/p/manifests/sha256:"))
        })
        .count();
    assert!(children <= 16, "{children} child manifests pulled");
}

/// Token endpoints that never answer, stall after the headers, or answer with 100 MiB: each a
/// clear error within the fetch deadline, nothing stored, memory bounded (the body cap).
#[test]
fn hostile_token_endpoints_fail_clearly_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, want) in [
        ("silent", "timed out"),
        ("stall", "timed out"),
        ("huge", "over the 4194304-byte limit"),
    ] {
        let reg = hostile_registry_with(dir.path(), &["--token", mode]);
        let host = format!("127.0.0.1:{}", reg.port);
        let proxy = format!("http://{host}");
        let cache = dir.path().join(format!("cache-{mode}"));
        let started = std::time::Instant::now();
        let out = fetch_into(
            &format!("oci://{host}/team/p:1.0"),
            &cache,
            &["--insecure-registries", &host, "--timeout", "5s"],
            &[
                ("HTTP_PROXY", &proxy),
                ("http_proxy", &proxy),
                ("NO_PROXY", ""),
            ],
        );
        let took = started.elapsed();
        let t = text(&out);
        assert!(!out.status.success(), "{mode}: {t}");
        assert!(t.contains(want), "{mode}: want {want:?} in {t}");
        assert!(
            took < std::time::Duration::from_secs(15),
            "{mode}: took {took:?}"
        );
        let token_requests = reg
            .requests()
            .iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("tokens.hostile.test"))
            })
            .count();
        assert!(
            token_requests >= 1,
            "{mode}: the token endpoint was never asked: {t}"
        );
        let stored = std::fs::read_dir(cache.join("modules"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, 0, "{mode}: a module was stored");
    }
}

/// Redirects oci-client follows by itself (a registry sending the layer download to object
/// storage) meet the same guard: followed to an allowed host, refused to a blocked one.
#[test]
fn blob_redirects_inside_the_oci_client_meet_the_ssrf_guard() {
    let dir = tempfile::tempdir().unwrap();
    let reg = hostile_registry(dir.path());
    let host = format!("127.0.0.1:{}", reg.port);
    let env = [("BLOCKED_CIDRS_IN_WASM_FETCH", "127.0.0.2/32")];
    let ok = fetch_into(
        &format!("oci://{host}/to-storage/p:1.0"),
        &dir.path().join("cache-ok"),
        &["--insecure-registries", &host, "--timeout", "5s"],
        &env,
    );
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(reg.requests().iter().any(|r| r["path"] == "/storage/wasm"));
    let cache = dir.path().join("cache-blocked");
    let out = fetch_into(
        &format!("oci://{host}/to-blocked/p:1.0"),
        &cache,
        &["--insecure-registries", &host, "--timeout", "5s"],
        &env,
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("127.0.0.2 is a blocked address (SSRF guard)"),
        "{}",
        text(&out)
    );
    let stored = std::fs::read_dir(cache.join("modules"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0);
}

/// A gzip bomb (256 MiB of zeros in ~250 KiB, against a 64 MiB cap) and a tar entry that
/// declares 1 TiB: refused at the module cap or as a short archive, in bounded time, with nothing stored.
#[test]
fn gzip_bombs_and_absurd_tar_sizes_are_refused() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    // 256 MiB of zeros, gzipped.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        gz.write_all(&zeros).unwrap();
    }
    std::fs::write(www.join("bomb.wasm.gz"), gz.finish().unwrap()).unwrap();
    // A tar whose only entry says it is 1 TiB long, followed by 1 KiB.
    let mut h = tar::Header::new_gnu();
    h.set_path("plugin.wasm").unwrap();
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    std::fs::write(www.join("absurd.tar.gz"), gz.finish().unwrap()).unwrap();
    // A small tar.gz of 100 000 empty `.wasm` entries: the error keeps a count and a few names.
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for i in 0..100_000 {
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("m/{i:06}.wasm"), std::io::empty())
            .unwrap();
    }
    let names = b.into_inner().unwrap().finish().unwrap();
    std::fs::write(www.join("names.tar.gz"), names).unwrap();

    let port = support::free_port();
    let mut srv = Command::new(python())
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "http.server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for (name, want) in [
        ("bomb.wasm.gz", "decompresses to more than 67108864 bytes"),
        (
            "absurd.tar.gz",
            "is 1099511627776 bytes, over the 67108864-byte limit",
        ),
        (
            "names.tar.gz",
            "100000 .wasm files and no plugin.wasm: m/000000.wasm",
        ),
    ] {
        let cache = dir.path().join(format!("cache-{name}"));
        let started = std::time::Instant::now();
        let out = fetch_into(
            &format!("http://127.0.0.1:{port}/{name}"),
            &cache,
            &["--timeout", "10s", "--max-module-bytes", "67108864"],
            &[],
        );
        let t = text(&out);
        assert!(!out.status.success(), "{name}: {t}");
        assert!(t.contains(want), "{name}: want {want:?} in {t}");
        assert!(t.len() < 8 << 10, "{name}: {} bytes of output", t.len());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "{name}: took {:?}",
            started.elapsed()
        );
        let stored = std::fs::read_dir(cache.join("modules"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, 0, "{name}: a module was stored");
    }
    let _ = srv.kill();
    let _ = srv.wait();
}
