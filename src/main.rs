//! The binary's edge: parse flags, set up logging, run a subcommand, map failures to exit
//! codes (2: bad flag or unusable value/address; 1: runtime failure; 0: clean exit).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ecds_agent::admin::{self, AdminState};
use ecds_agent::config::{FetchArgs, FetchPolicy, RunArgs};
use ecds_agent::ecds::Converter;
use ecds_agent::wasm::{Cache, GetOptions, PullPolicy};
use ecds_agent::xds::{self, listen, upstream, ProxyContext};
use tokio::sync::watch;
use tracing::{info, warn};

/// Top-level command line: the subcommands, each with its own flags.
#[derive(Debug, Parser)]
#[command(
    name = "ecds-agent",
    version,
    about = "Sidecar that proxies Envoy's ADS to the control plane and turns remote Wasm modules \
             (HTTP(S) / OCI) in ECDS into verified local files.",
    long_about = None,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: listen for Envoy, proxy ADS upstream, convert ECDS.
    Run(Box<RunArgs>),
    /// Pull one module into the cache and print its path and digest (pre-warm / debug).
    Fetch(Box<FetchArgs>),
    /// Import the modules of an OCI image layout (directory or oci-archive tar) into the cache
    /// under their references, with no network (air-gapped clusters).
    Import(Box<ecds_agent::config::ImportArgs>),
    /// Fetch every module named in WasmPlugin / TrafficExtension YAML or a URL list into the
    /// cache (node warm-up, image build); one line per module, exit 1 if any failed.
    Prefetch(Box<ecds_agent::config::PrefetchArgs>),
    /// Verify a sigstore bundle (keyless identity or public key) over a file or a sha256 digest;
    /// speaks the sigstore-conformance CLI protocol (exit 0 verified, 1 refused).
    VerifyBundle(Box<ecds_agent::config::VerifyBundleArgs>),
    /// Run the built-in demo control plane (istiod stand-in) serving a WasmPlugin over ADS
    /// (built with the `demo` feature only).
    #[cfg(feature = "demo")]
    Demo(Box<ecds_agent::demo::DemoArgs>),
}

/// A failure and the exit code it deserves.
enum Failure {
    /// A flag or value that cannot work: exit 2.
    Usage(String),
    /// Something went wrong at run time: exit 1.
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version: print as clap renders them, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // A usage error: one line naming the flag, exit 2.
            // clap's first paragraph, joined (e.g. "required arguments were not provided: <URL>").
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .trim_start()
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "ecds-agent: {} (see --help)",
                first.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ecds-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Fetch(args) => fetch(*args).await,
            Command::VerifyBundle(args) => verify_bundle(&args),
            Command::Import(args) => import(*args).await,
            Command::Prefetch(args) => prefetch(*args).await,
            #[cfg(feature = "demo")]
            Command::Demo(args) => ecds_agent::demo::run(*args).await.map_err(Failure::Runtime),
        }
    });
    // Do not wait for lingering tasks (streams, retries) once the command is done.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("ecds-agent: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("ecds-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Downloads over this size are shown (a bar on a terminal, two lines otherwise).
const SHOW_ABOVE: u64 = 4 << 20;

/// Download progress for the commands a person runs: an indicatif bar on a terminal, plain
/// lines otherwise (CI, logs); on stderr, so stdout keeps only the results.
struct CliProgress {
    tty: bool,
}

impl ecds_agent::progress::Reporter for CliProgress {
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn ecds_agent::progress::Bar> {
        if self.tty {
            let pb = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::no_length(),
            };
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            ) {
                pb.set_style(style);
            }
            pb.set_message(label.to_owned());
            Box::new(TtyBar {
                pb,
                shown: std::sync::atomic::AtomicBool::new(false),
            })
        } else {
            Box::new(PlainBar {
                label: label.to_owned(),
                total,
                bytes: std::sync::atomic::AtomicU64::new(0),
                announced: std::sync::atomic::AtomicBool::new(false),
            })
        }
    }
}

struct TtyBar {
    pb: indicatif::ProgressBar,
    shown: std::sync::atomic::AtomicBool,
}

impl ecds_agent::progress::Bar for TtyBar {
    fn advance(&self, bytes: u64) {
        self.pb.inc(bytes);
        let big = self.pb.length().unwrap_or(0) > SHOW_ABOVE || self.pb.position() > SHOW_ABOVE;
        if big && !self.shown.swap(true, Ordering::Relaxed) {
            self.pb
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }
    fn finish(&self) {
        self.pb.finish_and_clear();
    }
}

struct PlainBar {
    label: String,
    total: Option<u64>,
    bytes: std::sync::atomic::AtomicU64,
    announced: std::sync::atomic::AtomicBool,
}

impl ecds_agent::progress::Bar for PlainBar {
    fn advance(&self, bytes: u64) {
        let now = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let big = self.total.unwrap_or(0) > SHOW_ABOVE || now > SHOW_ABOVE;
        if big && !self.announced.swap(true, Ordering::Relaxed) {
            match self.total {
                Some(t) => eprintln!(
                    "downloading {} ({:.1} MiB)",
                    self.label,
                    t as f64 / 1048576.0
                ),
                None => eprintln!("downloading {}", self.label),
            }
        }
    }
    fn finish(&self) {
        if self.announced.load(Ordering::Relaxed) {
            eprintln!(
                "downloaded {}: {:.1} MiB",
                self.label,
                self.bytes.load(Ordering::Relaxed) as f64 / 1048576.0
            );
        }
    }
}

/// Shows downloads of the command a person runs.
fn show_progress() {
    ecds_agent::progress::install(Box::new(CliProgress {
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    }));
}

async fn import(args: ecds_agent::config::ImportArgs) -> Result<(), Failure> {
    show_progress();
    let cache = open_cache(&args.cache).await?;
    let results = cache
        .import_layout(&args.path, &args.as_refs)
        .await
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("import {}: {e}", args.path.display())))?;
    let failed = report(&results);
    cache.save().await;
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} of {} image(s) not imported",
            results.len()
        )));
    }
    Ok(())
}

/// One line per module (`ok URL sha256 size`, or `failed URL: why`); how many failed.
fn report(
    results: &[(
        String,
        Result<ecds_agent::wasm::Module, ecds_agent::wasm::FetchError>,
    )],
) -> usize {
    let mut failed = 0;
    for (url, r) in results {
        match r {
            Ok(m) => println!(
                "ok {} sha256:{} {} bytes",
                ecds_agent::wasm::error::redact(url),
                m.sha256,
                m.size
            ),
            Err(e) => {
                failed += 1;
                println!("failed {}: {e}", ecds_agent::wasm::error::redact(url));
            }
        }
    }
    failed
}

async fn prefetch(args: ecds_agent::config::PrefetchArgs) -> Result<(), Failure> {
    let mut wanted = Vec::new();
    for f in &args.files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Failure::Usage(format!("{}: {e}", f.display())))?;
        wanted.extend(
            ecds_agent::prefetch::wanted(&text)
                .map_err(|e| Failure::Usage(format!("{}: {e}", f.display())))?,
        );
    }
    let pull_secret = match &args.pull_secret {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| Failure::Usage(format!("--pull-secret {}: {e}", p.display())))?,
        ),
        None => None,
    };
    show_progress();
    let cache = open_cache(&args.cache).await?;
    let mut failed = 0;
    for w in &wanted {
        let started = std::time::Instant::now();
        let opts = GetOptions {
            sha256: w.sha256.clone(),
            resource_name: "ecds-agent-prefetch".into(),
            resource_version: String::new(),
            pull_policy: w
                .pull_policy
                .as_deref()
                .map(PullPolicy::from_env)
                .unwrap_or(PullPolicy::IfNotPresent),
            pull_secret: pull_secret.clone(),
            timeout: args.timeout,
        };
        let shown = ecds_agent::wasm::error::redact(&w.url);
        match cache.get(&w.url, opts).await {
            Ok(m) => println!(
                "ok {shown} sha256:{} {} bytes {} ms{}",
                m.sha256,
                m.size,
                started.elapsed().as_millis(),
                if m.fetched { "" } else { " (cached)" }
            ),
            Err(e) => {
                failed += 1;
                println!("failed {shown}: {e}");
            }
        }
    }
    cache.save().await;
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} of {} module(s) not fetched",
            wanted.len()
        )));
    }
    Ok(())
}

fn verify_bundle(args: &ecds_agent::config::VerifyBundleArgs) -> Result<(), Failure> {
    use ecds_agent::wasm::keyless::{verify_cli, CliSigner, Trust};
    let trust = match (&args.trusted_root, args.staging) {
        (Some(p), _) => Trust::File(p.clone()),
        (None, true) => Trust::Staging,
        (None, false) => Trust::Production,
    };
    let signer = match (
        &args.key,
        &args.certificate_identity,
        &args.certificate_oidc_issuer,
    ) {
        (Some(k), _, _) => CliSigner::Key(k),
        (None, Some(identity), Some(issuer)) => CliSigner::Keyless { identity, issuer },
        _ => {
            return Err(Failure::Usage(
                "--key, or --certificate-identity with --certificate-oidc-issuer, is required"
                    .into(),
            ))
        }
    };
    match verify_cli(&args.bundle, &args.artifact, signer, &trust) {
        Ok(v) => {
            println!(
                "verified{}",
                v.identity
                    .map(|i| format!(": {i} ({})", v.issuer.unwrap_or_else(|| "no issuer".into())))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Err(e) => Err(Failure::Runtime(anyhow::anyhow!(
            "bundle not verified: {e}"
        ))),
    }
}

async fn open_cache(args: &ecds_agent::config::CacheArgs) -> Result<Arc<Cache>, Failure> {
    let cfg = args.cache_config().map_err(Failure::Usage)?;
    Cache::open(cfg)
        .await
        .map_err(|e| Failure::Usage(format!("--cache-dir {}: {e}", args.cache_dir.display())))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(args: RunArgs) -> Result<(), Failure> {
    admin::metrics::install();
    admin::metrics::describe();
    let tls = upstream::UpstreamTls {
        ca: args.upstream_ca.clone(),
        client_cert: args.client_cert.clone(),
        client_key: args.client_key.clone(),
        server_name: args.upstream_sni.clone(),
    };
    let up = upstream::Upstream::new(args.upstream.clone(), &tls)
        .map_err(|e| Failure::Usage(format!("--upstream: {e}")))?;
    let admin_listener = admin::bind(args.admin).await.map_err(Failure::Usage)?;
    let bound = listen::bind(&args.listen)
        .await
        .map_err(|e| Failure::Usage(e.to_string()))?;

    let (cache, converter) = if args.wasm_conversion {
        let cache = open_cache(&args.cache).await?;
        let conv = Arc::new(Converter::new(
            cache.clone(),
            args.failure_mode(),
            args.retry_policy(),
            args.delivery(),
        ));
        (Some(cache), Some(conv))
    } else {
        (None, None)
    };
    let purger = cache.as_ref().map(|c| c.spawn_purger());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let interceptor = converter.map(|c| {
        Arc::new(ecds_agent::ecds::EcdsInterceptor(c)) as Arc<dyn ecds_agent::xds::Interceptor>
    });
    let ctx = Arc::new(ProxyContext::new(
        args.proxy_config(),
        up,
        interceptor,
        shutdown_rx.clone(),
    ));
    let state = AdminState::new(cache.clone(), ctx.rejections.clone(), args.admin_config());
    let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone()));
    let mut stop = shutdown_rx.clone();
    // Envoy's own remote fetch of modules reaches the agent on the xDS listener.
    let routes = match (&cache, &args.remote_via_cluster) {
        (Some(c), Some(_)) => {
            tonic::service::Routes::new(ecds_agent::wasm::serve::ModuleService::new(c.clone()))
        }
        _ => tonic::service::Routes::default(),
    };
    let mut server = tokio::spawn(xds::serve(bound, ctx.clone(), routes, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    state.ready.store(true, Ordering::Relaxed);
    info!(listen = %args.listen, upstream = %args.upstream, admin = %args.admin,
          conversion = args.wasm_conversion, "ecds-agent ready");

    let early_end = tokio::select! {
        _ = shutdown_signal() => None,
        r = &mut server => Some(r),
    };
    state.ready.store(false, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    let result = match early_end {
        Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(Failure::Runtime(anyhow::anyhow!("xDS server failed: {e}"))),
        Some(Err(e)) => Err(Failure::Runtime(anyhow::anyhow!(
            "xDS server task failed: {e}"
        ))),
        None => {
            // Every stream ends with UNAVAILABLE at once; wait for that (bounded by the grace
            // period), not for each Envoy to close its connection.
            let drained = async {
                while ctx.active_streams() > 0 && !server.is_finished() {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            };
            match tokio::time::timeout(args.shutdown_grace, drained).await {
                Ok(()) => info!("streams drained"),
                Err(_) => warn!(grace = ?args.shutdown_grace, open = ctx.active_streams(),
                                "streams still open after the grace period; exiting"),
            }
            server.abort();
            Ok(())
        }
    };
    if let Some(p) = purger {
        p.abort();
    }
    if let Some(c) = &cache {
        c.save().await;
    }
    admin_task.abort();
    result
}

async fn fetch(args: FetchArgs) -> Result<(), Failure> {
    show_progress();
    let cache = open_cache(&args.cache).await?;
    let pull_secret = match &args.pull_secret {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| Failure::Usage(format!("--pull-secret {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let opts = GetOptions {
        sha256: args.sha256.clone(),
        resource_name: "ecds-agent-fetch".into(),
        resource_version: match args.pull_policy {
            // A version never seen before forces a pull under Always.
            FetchPolicy::Always => format!("{:?}", std::time::SystemTime::now()),
            FetchPolicy::IfNotPresent => String::new(),
        },
        pull_policy: match args.pull_policy {
            FetchPolicy::Always => PullPolicy::Always,
            FetchPolicy::IfNotPresent => PullPolicy::IfNotPresent,
        },
        pull_secret,
        timeout: args.timeout,
    };
    let module = cache
        .get(&args.url, opts)
        .await
        .map_err(|e| Failure::Runtime(anyhow::anyhow!(e)))?;
    cache.save().await;
    println!("path: {}", module.path.display());
    println!("sha256: {}", module.sha256);
    if let Some(d) = &module.oci_digest {
        println!("oci_digest: {d}");
    }
    println!("size: {}", module.size);
    if let Some(m) = module.matched {
        println!(
            "matched: {}",
            serde_json::to_value(m)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        );
    }
    println!(
        "source: {}",
        if module.fetched { "network" } else { "cache" }
    );
    if let Some(host) = &module.served_by {
        println!("served_by: {host}");
    }
    Ok(())
}
