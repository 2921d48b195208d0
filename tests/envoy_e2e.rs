//! End to end with the real Envoy 1.40 (V8): registry → demo control plane → agent → Envoy,
//! the seed's curls, a new push, fail-close / fail-open stand-ins and self-healing.
//!
//! Envoy comes from `ENVOY_BIN` or `.venv/bin/envoy` (installed by `make test`). Without it the
//! tests say so and pass only when neither CI nor `ENVOY_BIN` asked for Envoy.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::{free_port, Agent, Layout, ModuleServer, Registry, Route};

const REPO: &str = "istio-ecosystem/wasm-extensions/basic_auth";
const ADMIN3: &str = "Basic YWRtaW4zOmFkbWluMw==";
const OK_TEST: &str = "Basic b2s6dGVzdA==";

fn envoy_bin() -> Option<PathBuf> {
    let candidate = support::envoy::path();
    if candidate.exists() {
        return Some(candidate);
    }
    if std::env::var_os("ENVOY_BIN").is_some() || std::env::var_os("CI").is_some() {
        panic!(
            "Envoy not found at {} (run `make envoy`)",
            candidate.display()
        );
    }
    eprintln!(
        "SKIPPED: no Envoy at {} (run `make envoy`)",
        candidate.display()
    );
    None
}

fn plugin_wasm() -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/plugins/basic_auth/basic_auth.wasm"),
    )
    .unwrap()
}

/// The plugin padded with a custom section to `size` bytes or more (Envoy ignores it).
fn padded_plugin(size: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let mut wasm = plugin_wasm();
    let name = b"padding";
    let payload = size.saturating_sub(wasm.len());
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend((0..payload).map(|i| (i % 251) as u8));
    wasm.push(0);
    leb(body.len(), &mut wasm);
    wasm.extend_from_slice(&body);
    wasm
}

/// `wasmplugin_yaml` for an HTTP(S) URL with the module's sha256.
fn wasmplugin_yaml_sha(url: &str, sha: &str, fail: &str, credentials: &[&str]) -> String {
    wasmplugin_yaml(url, fail, credentials).replace(
        &format!("  url: {url}\n"),
        &format!("  url: {url}\n  sha256: {sha}\n"),
    )
}

fn wasmplugin_yaml(url: &str, fail: &str, credentials: &[&str]) -> String {
    let creds: String = credentials
        .iter()
        .map(|c| format!("          - \"{c}\"\n"))
        .collect();
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: basic-auth\n  namespace: istio-system\nspec:\n  url: {url}\n  phase: AUTHN\n  failStrategy: {fail}\n  pluginConfig:\n    basic_auth_rules:\n      - prefix: \"/productpage\"\n        request_methods: [\"GET\", \"POST\"]\n        credentials:\n{creds}"
    )
}

/// The status of `GET http://{http}{path}` (0 when there is no answer within 5 s).
async fn status_of(http: &str, path: &str, auth: Option<&str>) -> u16 {
    let c = reqwest::Client::new();
    let mut r = c
        .get(format!("http://{http}{path}"))
        .timeout(Duration::from_secs(5));
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Polls `GET path` until it answers `want`; after `secs`, the last status seen.
async fn until_status(
    http: &str,
    path: &str,
    auth: Option<&str>,
    want: u16,
    secs: u64,
) -> Result<(), u16> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = 0;
    while Instant::now() < deadline {
        last = status_of(http, path, auth).await;
        if last == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Stack {
    reg: Registry,
    yaml: PathBuf,
    http: String,
    envoy_admin: String,
    cp_log: PathBuf,
    agent: Agent,
    /// How the agent was started, to start it again.
    upstream: String,
    sock: PathBuf,
    agent_args: Vec<String>,
    _envoy: Killed,
    _cp: Killed,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// With `chained`, the control plane listens on a Unix socket and the agent dials it there,
    /// as ecds-agent chained in front of pilot-agent's socket in an Istio pod.
    async fn start(
        envoy: &Path,
        api_type: &str,
        url_repo: &str,
        fail: &str,
        push: bool,
        chained: bool,
    ) -> Stack {
        Self::start_with(envoy, api_type, url_repo, fail, push, chained, &[]).await
    }

    /// [`Stack::start`] with extra agent flags.
    async fn start_with(
        envoy: &Path,
        api_type: &str,
        url_repo: &str,
        fail: &str,
        push: bool,
        chained: bool,
        extra: &[&str],
    ) -> Stack {
        let wasm = plugin_wasm();
        let push = push.then_some((&wasm[..], Layout::OciImage));
        Self::start_custom(envoy, api_type, push, chained, extra, |reg| {
            let yaml = wasmplugin_yaml(
                &reg.url(url_repo),
                fail,
                &["ok:test", "YWRtaW4zOmFkbWluMw=="],
            );
            (yaml, None)
        })
        .await
    }

    /// [`Stack::start_with`] with the module pushed as `REPO:1.12.0` (if any), and the
    /// WasmPlugin the control plane starts with and the insecure registries (default: the
    /// registry) from `wasmplugin`.
    async fn start_custom(
        envoy: &Path,
        api_type: &str,
        push: Option<(&[u8], Layout)>,
        chained: bool,
        extra: &[&str],
        wasmplugin: impl FnOnce(&Registry) -> (String, Option<String>),
    ) -> Stack {
        let reg = Registry::plain().await;
        if let Some((wasm, layout)) = push {
            reg.push(REPO, "1.12.0", wasm, layout).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("wasmplugin.yaml");
        let (plugin, insecure) = wasmplugin(&reg);
        let insecure = insecure.unwrap_or_else(|| reg.addr.clone());
        std::fs::write(&yaml, plugin).unwrap();
        let (cp_addr, http, page) = (
            if chained {
                format!("unix:{}", dir.path().join("pilot-agent-XDS").display())
            } else {
                format!("127.0.0.1:{}", free_port())
            },
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let cp_log = dir.path().join("control-plane.log");
        let cp = Command::new(support::agent::BIN)
            .args([
                "demo",
                "--listen",
                &cp_addr,
                "--envoy-listener",
                &http,
                "--productpage",
                &page,
                "--wasmplugin",
            ])
            .arg(&yaml)
            .stdout(std::fs::File::create(&cp_log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let cp = Killed(cp);
        let sock = dir.path().join("XDS");
        let upstream = if chained {
            cp_addr.clone()
        } else {
            format!("http://{cp_addr}")
        };
        let mut agent_args: Vec<String> = [
            "--insecure-registries",
            &insecure,
            "--retry-max-backoff",
            "2s",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        agent_args.extend(extra.iter().map(|a| a.to_string()));
        let agent = Agent::builder(&upstream)
            .listen(&format!("unix:{}", sock.display()))
            .args(agent_args.clone())
            .start()
            .await;
        let admin_port = free_port();
        let bootstrap = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/envoy/bootstrap.yaml"),
        )
        .unwrap()
        .replace("@XDS_SOCKET@", &sock.display().to_string())
        .replace("@ADMIN_PORT@", &admin_port.to_string())
        .replace("@API_TYPE@", api_type);
        let boot = dir.path().join("envoy.yaml");
        std::fs::write(&boot, bootstrap).unwrap();
        let envoy = support::envoy::spawn(envoy, &boot, &dir.path().join("envoy.log"));
        Stack {
            reg,
            yaml,
            http,
            envoy_admin: format!("127.0.0.1:{admin_port}"),
            cp_log,
            agent,
            upstream,
            sock,
            agent_args,
            _envoy: Killed(envoy),
            _cp: cp,
            _dir: dir,
        }
    }

    /// Stops the agent (SIGTERM) and starts a new one on the same socket and cache; returns
    /// the old one (keep it: it may own the cache directory).
    async fn restart_agent(&mut self) -> Agent {
        self.agent.terminate();
        let next = Agent::builder(&self.upstream)
            .listen(&format!("unix:{}", self.sock.display()))
            .cache_dir(&self.agent.cache_dir)
            .args(self.agent_args.clone())
            .start()
            .await;
        std::mem::replace(&mut self.agent, next)
    }

    /// `curl` (HTTP/2, no TLS) GET of `path` on the agent's xDS socket: status and body.
    fn get_from_agent(&self, path: &str) -> (u16, Vec<u8>) {
        let out = Command::new("curl")
            .args([
                "-s",
                "--path-as-is",
                "--http2-prior-knowledge",
                "--max-time",
                "10",
                "--unix-socket",
            ])
            .arg(&self.sock)
            .args(["-w", "\n%{http_code}", &format!("http://ecds-agent{path}")])
            .output()
            .expect("curl");
        let mut body = out.stdout;
        let nl = body.iter().rposition(|b| *b == b'\n').unwrap_or(0);
        let code = String::from_utf8_lossy(&body[nl + 1..])
            .trim()
            .parse()
            .unwrap_or(0);
        body.truncate(nl);
        (code, body)
    }

    /// A new push of the same module whose only credentials are `user_pass`; waits (up to
    /// `secs`) until they open /productpage.
    async fn push_credentials(&self, user_pass: &str, secs: u64) {
        std::fs::write(
            &self.yaml,
            wasmplugin_yaml(
                &self.reg.url(&format!("{REPO}:1.12.0")),
                "FAIL_CLOSE",
                &[user_pass],
            ),
        )
        .unwrap();
        let auth = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, user_pass)
        );
        self.until("/productpage", Some(&auth), 200, secs).await;
    }

    /// `curl` of `path` on the agent's xDS socket, in the background: whether the transfer
    /// ended cleanly with a success status, and the body.
    fn fetch_from_agent_bg(&self, path: &str) -> std::thread::JoinHandle<(bool, Vec<u8>)> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sf",
            "--http2-prior-knowledge",
            "--max-time",
            "30",
            "--unix-socket",
        ])
        .arg(&self.sock)
        .arg(format!("http://ecds-agent{path}"));
        std::thread::spawn(move || {
            let out = cmd.output().expect("curl");
            (out.status.success(), out.stdout)
        })
    }

    /// Waits (up to 20 s) until the agent has answered `n` module requests while their
    /// download was under way.
    async fn streamed_serves(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .agent
            .metric("ecds_agent_wasm_module_serves", "result=\"streamed\"")
            .await
            < n
        {
            assert!(Instant::now() < deadline, "fewer than {n} streamed serves");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn status(&self, path: &str, auth: Option<&str>) -> u16 {
        status_of(&self.http, path, auth).await
    }

    /// Polls until `GET path` answers `want` (panics after `secs`).
    async fn until(&self, path: &str, auth: Option<&str>, want: u16, secs: u64) {
        let Err(last) = until_status(&self.http, path, auth, want, secs).await else {
            return;
        };
        panic!(
            "{path} (auth {auth:?}) never answered {want}; last {last}\n--- control plane\n{}\n--- envoy\n{}",
            std::fs::read_to_string(&self.cp_log).unwrap_or_default(),
            std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
        );
    }

    async fn config_dump(&self) -> String {
        reqwest::get(format!(
            "http://{}/config_dump?resource=ecds_filters",
            self.envoy_admin
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    }

    fn ecds_pushes(&self) -> usize {
        std::fs::read_to_string(&self.cp_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("→ ECDS"))
            .count()
    }
}

async fn seed_walkthrough(api_type: &str, chained: bool) {
    let Some(envoy) = envoy_bin() else { return };
    let s = Stack::start(
        &envoy,
        api_type,
        &format!("{REPO}:1.12.0"),
        "FAIL_CLOSE",
        true,
        chained,
    )
    .await;
    // The seed's two curls.
    s.until("/productpage", None, 401, 30).await;
    assert_eq!(s.status("/productpage", Some(ADMIN3)).await, 200);
    assert_eq!(
        s.status("/productpage", Some(OK_TEST)).await,
        200,
        "user:pass credentials work too"
    );
    assert_eq!(
        s.status("/productpage", Some("Basic d3Jvbmc6d3Jvbmc="))
            .await,
        401
    );
    assert_eq!(
        s.status("/reviews", None).await,
        200,
        "other paths are not protected"
    );
    let dump = s.config_dump().await;
    let modules = s.agent.cache_dir.join("modules");
    assert!(
        dump.contains(&format!("\"filename\": \"{}/", modules.display())),
        "config_dump shows the local file:\n{dump}"
    );
    assert!(!dump.contains("oci://"), "no remote code reaches Envoy");

    // A new push (changed credentials) takes effect.
    s.push_credentials("new:pass", 20).await;
    assert_eq!(
        s.status("/productpage", Some(ADMIN3)).await,
        401,
        "old credentials revoked"
    );
    assert_eq!(
        s.agent
            .metric("istio_agent_wasm_remote_fetch_count", "result=\"success\"")
            .await,
        1.0,
        "the second push reused the cache"
    );
}

#[tokio::test]
async fn seed_walkthrough_sotw() {
    seed_walkthrough("GRPC", false).await;
}

#[tokio::test]
async fn seed_walkthrough_delta() {
    seed_walkthrough("DELTA_GRPC", false).await;
}

/// Chained in an Istio pod: Envoy → ecds-agent → a control plane on a Unix socket (playing
/// pilot-agent's `/etc/istio/proxy/XDS` with its conversion off) — the seed's 401 then 200.
#[tokio::test]
async fn chained_behind_a_unix_socket_control_plane_sotw() {
    seed_walkthrough("GRPC", true).await;
}

#[tokio::test]
async fn chained_behind_a_unix_socket_control_plane_delta() {
    seed_walkthrough("DELTA_GRPC", true).await;
}

async fn fail_close_then_heal(api_type: &str) {
    let Some(envoy) = envoy_bin() else { return };
    // The module is not in the registry yet: deny-all stand-in, 403.
    let s = Stack::start(
        &envoy,
        api_type,
        &format!("{REPO}:1.12.0"),
        "FAIL_CLOSE",
        false,
        false,
    )
    .await;
    s.until("/productpage", None, 403, 30).await;
    assert_eq!(
        s.status("/reviews", Some(ADMIN3)).await,
        403,
        "deny-all covers every path"
    );
    let pushes = s.ecds_pushes();
    // The module appears: the agent delivers it by itself, without a new push.
    s.reg
        .push(REPO, "1.12.0", &plugin_wasm(), Layout::OciImage)
        .await;
    s.until("/productpage", None, 401, 30).await;
    assert_eq!(s.status("/productpage", Some(ADMIN3)).await, 200);
    assert_eq!(
        s.ecds_pushes(),
        pushes,
        "healed without a new push from the control plane"
    );
    assert_eq!(
        s.agent.metric("ecds_agent_wasm_heal_deliveries", "").await,
        1.0
    );
}

#[tokio::test]
async fn bad_url_fail_close_gives_403_then_heals_sotw() {
    fail_close_then_heal("GRPC").await;
}

#[tokio::test]
async fn bad_url_fail_close_gives_403_then_heals_delta() {
    fail_close_then_heal("DELTA_GRPC").await;
}

#[tokio::test]
async fn bad_url_fail_open_gives_200() {
    let Some(envoy) = envoy_bin() else { return };
    let s = Stack::start(
        &envoy,
        "DELTA_GRPC",
        &format!("{REPO}/missing:0.0.1"),
        "FAIL_OPEN",
        true,
        false,
    )
    .await;
    s.until("/productpage", None, 200, 30).await;
    let dump = s.config_dump().await;
    assert!(
        dump.contains("wasm-default-allow"),
        "allow-all stand-in in Envoy:\n{dump}"
    );
}

/// `--remote-via-cluster xds-grpc`: Envoy gets a `remote` source with the verified sha256 and
/// fetches the module from the agent over its ADS connection; the next push hits Envoy's own
/// code cache; the agent serves only modules in use; a restarted agent keeps it working.
#[tokio::test]
async fn remote_delivery_over_the_ads_cluster_survives_an_agent_restart() {
    let Some(envoy) = envoy_bin() else { return };
    let mut s = Stack::start_with(
        &envoy,
        "GRPC",
        &format!("{REPO}:1.12.0"),
        "FAIL_CLOSE",
        true,
        false,
        &[
            "--remote-via-cluster",
            "xds-grpc",
            "--remote-min-bytes",
            "1",
        ],
    )
    .await;
    s.until("/productpage", None, 401, 30).await;
    assert_eq!(s.status("/productpage", Some(ADMIN3)).await, 200);
    let sha = support::registry::sha256_hex(&plugin_wasm());
    let dump = s.config_dump().await;
    assert!(
        dump.contains(&format!("http://ecds-agent/ecds-agent.modules/{sha}"))
            && dump.contains(&format!("\"sha256\": \"{sha}\""))
            && dump.contains("\"cluster\": \"xds-grpc\""),
        "Envoy fetches the verified module from the agent:\n{dump}"
    );
    assert!(
        !dump.contains("oci://") && !dump.contains("\"filename\""),
        "{dump}"
    );
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_module_serves", "result=\"served\"")
            .await,
        1.0,
        "Envoy fetched it once"
    );

    // The agent serves what is in use, byte for byte, and nothing else.
    let (code, body) = s.get_from_agent(&format!("/ecds-agent.modules/{sha}"));
    assert_eq!(code, 200);
    assert_eq!(support::registry::sha256_hex(&body), sha);
    let (code, _) = s.get_from_agent(&format!("/ecds-agent.modules/{}", "0".repeat(64)));
    assert_eq!(code, 404);
    let (code, _) = s.get_from_agent("/ecds-agent.modules/../index.json");
    assert_eq!(code, 404);

    // A new push of the same module: Envoy's code cache, no fetch.
    s.push_credentials("new:pass", 20).await;
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_module_serves", "result=\"served\"")
            .await,
        2.0,
        "one fetch plus the curl above"
    );

    // The agent restarts (registry gone): Envoy reconnects, the module stays in force, and
    // the next push works from the new agent's cache.
    s.reg.stop();
    let _old = s.restart_agent().await;
    s.push_credentials("third:pass", 30).await;
    assert_eq!(s.status("/productpage", None).await, 401);
    let (code, body) = s.get_from_agent(&format!("/ecds-agent.modules/{sha}"));
    assert_eq!(
        (code, support::registry::sha256_hex(&body) == sha),
        (200, true)
    );
}

/// `--inline-max-bytes`: a filter-sized module rides in the ECDS resource itself.
#[tokio::test]
async fn small_modules_can_be_delivered_inline() {
    let Some(envoy) = envoy_bin() else { return };
    let s = Stack::start_with(
        &envoy,
        "DELTA_GRPC",
        &format!("{REPO}:1.12.0"),
        "FAIL_CLOSE",
        true,
        false,
        &["--inline-max-bytes", "1048576"],
    )
    .await;
    s.until("/productpage", None, 401, 30).await;
    assert_eq!(s.status("/productpage", Some(ADMIN3)).await, 200);
    let dump = s.config_dump().await;
    assert!(
        dump.contains("\"inline_bytes\"") && !dump.contains("\"filename\""),
        "the module is inline:\n{}",
        &dump[..dump.len().min(3000)]
    );
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_deliveries", "source=\"inline\"")
            .await,
        1.0
    );
}

/// Starts Envoy through the agent with `--remote-via-cluster` and a WasmPlugin naming a 2 MiB
/// module over HTTP (with its sha256) that a server trickles out as `body`: the agent hands the
/// starting Envoy the `remote` source as soon as the download starts. Returns the stack, the
/// module and its sha256, and what a `curl` of the module on the agent's socket, started while
/// the download runs, got.
async fn streamed_first_load(envoy: &Path, api_type: &str, body: fn(&[u8]) -> Vec<u8>) -> Streamed {
    let wasm = padded_plugin(2 << 20);
    let sha = support::registry::sha256_hex(&wasm);
    let srv = ModuleServer::start().await;
    // The body stops half-sent until the test has seen Envoy and curl streaming it.
    let (open, held) = tokio::sync::watch::channel(false);
    srv.set(
        "/big.wasm",
        Route {
            body: body(&wasm),
            trickle: Duration::from_millis(5),
            hold_after: Some((16, held)),
            ..Default::default()
        },
    );
    let url = srv.url("/big.wasm");
    let s = Stack::start_custom(
        envoy,
        api_type,
        None,
        false,
        &[
            "--remote-via-cluster",
            "xds-grpc",
            "--remote-min-bytes",
            "1048576",
        ],
        |_| {
            let yaml = wasmplugin_yaml_sha(
                &url,
                &sha,
                "FAIL_CLOSE",
                &["ok:test", "YWRtaW4zOmFkbWluMw=="],
            );
            (yaml, None)
        },
    )
    .await;
    // Envoy got the remote source while the download is held open, and fetches it.
    s.streamed_serves(1.0).await;
    assert_eq!(srv.hits("/big.wasm"), 1, "one download, still under way");
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_deliveries", "source=\"remote\"")
            .await,
        1.0
    );
    // The URL Envoy was given names this download; the claimed sha256 alone serves nothing
    // until it is verified (it could be any cached module's).
    let dump = s.config_dump().await;
    let prefix = format!("http://ecds-agent/ecds-agent.modules/{sha}/");
    let at = dump
        .find(&prefix)
        .expect("the remote URL names the download")
        + prefix.len();
    let token = dump[at..at + 32].to_owned();
    let (code, _) = s.get_from_agent(&format!("/ecds-agent.modules/{sha}"));
    assert_eq!(code, 404, "a claimed sha256 is not servable by itself");
    let curl = s.fetch_from_agent_bg(&format!("/ecds-agent.modules/{sha}/{token}"));
    s.streamed_serves(2.0).await;
    open.send_replace(true);
    let curled = tokio::task::spawn_blocking(move || curl.join().unwrap())
        .await
        .unwrap();
    Streamed {
        s,
        wasm,
        sha,
        curled,
        _srv: srv,
    }
}

struct Streamed {
    s: Stack,
    wasm: Vec<u8>,
    sha: String,
    curled: (bool, Vec<u8>),
    _srv: ModuleServer,
}

/// A big module's bytes reach Envoy while the agent downloads them (Envoy's fetch overlaps
/// the agent's), and the stream ends once the agent verified the module.
#[tokio::test]
async fn a_big_module_is_streamed_to_envoy_while_the_agent_downloads_it() {
    let Some(envoy) = envoy_bin() else { return };
    let Streamed {
        s,
        wasm,
        sha,
        curled,
        ..
    } = streamed_first_load(&envoy, "GRPC", |w| w.to_vec()).await;
    let (clean, body) = curled;
    assert!(clean && body == wasm, "the streamed body is the module");
    // Envoy runs the module.
    s.until("/productpage", None, 401, 30).await;
    assert_eq!(s.status("/productpage", Some(OK_TEST)).await, 200);
    let dump = s.config_dump().await;
    assert!(dump.contains(&format!("\"sha256\": \"{sha}\"")), "{dump}");
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_streamed_failures", "")
            .await,
        0.0
    );

    // An update to another module goes as a file: Envoy 1.40 fetches `remote` code only for
    // a listener that warms, and would run no module at all after such an update.
    let next = padded_plugin(3 << 20);
    let next_sha = support::registry::sha256_hex(&next);
    let srv2 = ModuleServer::start().await;
    srv2.put("/next.wasm", next);
    std::fs::write(
        &s.yaml,
        wasmplugin_yaml_sha(
            &srv2.url("/next.wasm"),
            &next_sha,
            "FAIL_CLOSE",
            &["new:pass"],
        ),
    )
    .unwrap();
    s.until("/productpage", Some("Basic bmV3OnBhc3M="), 200, 30)
        .await;
    assert_eq!(s.status("/productpage", None).await, 401);
    assert_eq!(s.status("/productpage", Some(OK_TEST)).await, 401);
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_deliveries", "source=\"file\"")
            .await,
        1.0
    );
}

/// A streamed module whose bytes turn out wrong: the stream is reset instead of ended, so
/// neither Envoy nor anyone else holds it as complete; Envoy gets the stand-in and the
/// control plane the NACK.
#[tokio::test]
async fn a_streamed_module_that_fails_verification_is_never_complete() {
    let Some(envoy) = envoy_bin() else { return };
    let Streamed {
        s, wasm, curled, ..
    } = streamed_first_load(&envoy, "DELTA_GRPC", |w| {
        let mut bad = w.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        bad
    })
    .await;
    let (clean, body) = curled;
    assert!(!clean, "the transfer was reset, never ended");
    assert!(
        body.len() >= 1 << 20 && body.len() < wasm.len(),
        "streamed (the held first MiB at least), never whole: {} of {} bytes",
        body.len(),
        wasm.len()
    );
    // FAIL_CLOSE: the deny-all stand-in.
    s.until("/productpage", Some(ADMIN3), 403, 30).await;
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_streamed_failures", "")
            .await,
        1.0
    );
    assert_eq!(
        s.agent
            .metric("ecds_agent_nacks_sent", "reason=\"fetch_failure\"")
            .await,
        1.0,
        "the control plane was told"
    );
    let cp = std::fs::read_to_string(&s.cp_log).unwrap_or_default();
    assert!(
        cp.contains("NACK") && cp.contains("does not match sha256"),
        "the NACK names the mismatch:\n{cp}"
    );
}

/// An OCI module layer's digest is the module's sha256: pulled from a slow registry, its bytes
/// reach a starting Envoy while the agent still pulls them.
#[tokio::test]
async fn an_oci_module_layer_is_streamed_on_first_load() {
    let Some(envoy) = envoy_bin() else { return };
    let wasm = padded_plugin(2 << 20);
    let s = Stack::start_custom(
        &envoy,
        "GRPC",
        Some((&wasm, Layout::Artifact)),
        false,
        &[
            "--remote-via-cluster",
            "xds-grpc",
            "--remote-min-bytes",
            "1048576",
        ],
        |reg| {
            // 32 pieces of 64 KiB, 20 ms apart.
            let proxy = support::throttle::start(&reg.addr, Duration::from_millis(40));
            let yaml = wasmplugin_yaml(
                &format!("oci://{proxy}/{REPO}:1.12.0"),
                "FAIL_CLOSE",
                &["ok:test", "YWRtaW4zOmFkbWluMw=="],
            );
            (yaml, Some(proxy))
        },
    )
    .await;
    s.until("/productpage", None, 401, 60).await;
    assert_eq!(s.status("/productpage", Some(OK_TEST)).await, 200);
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_deliveries", "source=\"remote\"")
            .await,
        1.0
    );
    assert!(
        s.agent
            .metric("ecds_agent_wasm_module_serves", "result=\"streamed\"")
            .await
            >= 1.0,
        "Envoy was served while the layer was being pulled"
    );
    assert_eq!(
        s.agent
            .metric("ecds_agent_wasm_streamed_failures", "")
            .await,
        0.0
    );
}

/// What the agent's delivery rules rest on, pinned against Envoy itself (no agent): how
/// Envoy 1.40 takes an ECDS *update* whose `remote` code it has not cached. Without
/// `nack_on_code_cache_miss` it ACKs and then runs no module (a fail-closed filter lets
/// everything through): why the agent hands `remote` only to first loads. With it, Envoy
/// rejects the update, keeps the running filter and fills its code cache in the background;
/// the *same* resource sent again is then ACKed but not applied (Envoy dropped it as
/// unchanged), while one that differs hits the cache and runs. If an Envoy upgrade changes
/// any of this, this test says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_updates_to_uncached_remote_code_as_the_delivery_rules_assume() {
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm;
    use support::res::{any, basic_auth_plugin, tec};
    use support::xds::{ecds_resp, CpSotw};

    let Some(envoy_path) = envoy_bin() else {
        return;
    };
    const FILTER: &str = "pinned.basic-auth";
    let srv = ModuleServer::start().await;
    // Three distinct modules (padding changes the sha256), none fetched yet.
    let mods: Vec<(String, String)> = (0..3)
        .map(|i| {
            let wasm = padded_plugin(plugin_wasm().len() + 64 * (i + 1));
            let sha = support::registry::sha256_hex(&wasm);
            let path = format!("m{i}.wasm");
            srv.put(&path, wasm);
            (srv.url(&path), sha)
        })
        .collect();
    let resource = |i: usize, prefix: &str, nack_on_miss: bool| {
        let mut pc = basic_auth_plugin(FILTER, &mods[i].0, &mods[i].1, 30, prefix);
        if let Some(Vm::VmConfig(vm)) = pc.vm.as_mut() {
            vm.nack_on_code_cache_miss = nack_on_miss;
        }
        tec(FILTER, any(&Wasm { config: Some(pc) }))
    };
    /// Sends `resource` as version `v` (nonce `n{v}`); Envoy's reply: its error, if a NACK.
    async fn push(
        s: &mut CpSotw,
        v: &str,
        resource: envoy_types::pb::google::protobuf::Any,
    ) -> Option<String> {
        let nonce = format!("n{v}");
        s.send(ecds_resp(v, &nonce, vec![resource]));
        loop {
            let r = s.recv().await;
            if r.type_url == support::res::ECDS && !r.response_nonce.is_empty() {
                assert_eq!(r.response_nonce, nonce, "Envoy replies to the latest push");
                return r.error_detail.map(|e| e.message);
            }
        }
    }

    let mut cp = support::ControlPlane::start().await;
    let xds_port: u16 = cp
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("control plane port");
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let boot = dir.path().join("envoy.yaml");
    std::fs::write(
        &boot,
        support::envoy::ads_bootstrap(FILTER, xds_port, http, free_port(), &srv.addr.to_string()),
    )
    .unwrap();
    let log = dir.path().join("envoy.log");
    let _envoy = Killed(support::envoy::spawn(&envoy_path, &boot, &log));
    let http = format!("127.0.0.1:{http}");
    let status = |path: &'static str| status_of(&http, path, None);
    // Envoy answers 401 on `path` within 20 s (its first load warms the listener).
    let until_401 = |path: &'static str| until_status(&http, path, None, 401, 20);
    let envoy_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut s = cp.next_sotw().await;
    loop {
        if s.recv().await.type_url == support::res::ECDS {
            break;
        }
    }
    // A first load fetches: /a is protected.
    assert_eq!(push(&mut s, "1", resource(0, "/a", false)).await, None);
    assert_eq!(until_401("/a").await, Ok(()), "{}", envoy_log());

    // An update to uncached code with nack_on_code_cache_miss: rejected, the old filter stays.
    let error = push(&mut s, "2", resource(1, "/b", true)).await;
    assert!(error.is_some(), "a cache miss is a rejection");
    assert_eq!((status("/a").await, status("/b").await), (401, 200));
    // Envoy fills its cache in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.hits("m1.wasm") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.hits("m1.wasm"), 1, "background fill");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The same resource again: ACKed, yet the old filter still runs.
    assert_eq!(push(&mut s, "3", resource(1, "/b", true)).await, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (status("/a").await, status("/b").await),
        (401, 200),
        "an ACKed copy of a rejected resource is not applied"
    );

    // A different resource with that module: a code-cache hit, applied.
    assert_eq!(push(&mut s, "4", resource(1, "/c", true)).await, None);
    assert_eq!(until_401("/c").await, Ok(()), "{}", envoy_log());
    assert_eq!(status("/a").await, 200);

    // An update to uncached code without the flag: ACKed, and then no module runs.
    assert_eq!(push(&mut s, "5", resource(2, "/d", false)).await, None);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (status("/c").await, status("/d").await),
        (200, 200),
        "Envoy 1.40 runs no module after an update to remote code it has not cached"
    );
    assert_eq!(srv.hits("m2.wasm"), 0, "and does not even fetch it");
}
