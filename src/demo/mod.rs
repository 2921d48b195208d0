//! The built-in demo control plane: an istiod stand-in for `make demo` and the end-to-end
//! tests. It reads a `WasmPlugin` YAML, builds the ECDS resource as istiod does, and serves it
//! with a listener and a cluster over ADS (SotW and Delta); editing the YAML pushes again. It
//! also runs the "productpage" upstream, and a `probe` that plays Envoy where none is installed.
//!
//! Never used by `ecds-agent run`; it only shares the protocol types.

pub mod control_plane;
pub mod probe;
pub mod resources;
pub mod wasmplugin;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::parse_duration;
use crate::proto::type_url;
use crate::xds::listen::{parse_listen, ListenAddr};
use control_plane::DemoControlPlane;
use wasmplugin::WasmPlugin;

/// `ecds-agent demo [FLAGS]` runs the control plane; `ecds-agent demo probe …` plays Envoy.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    pub command: Option<DemoCommand>,
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Serve a WasmPlugin as istiod would (the same as `ecds-agent demo` without a subcommand).
    ControlPlane(ControlPlaneArgs),
    /// Play Envoy: subscribe to one ECDS resource through the agent and print what arrives.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ControlPlaneArgs {
    /// WasmPlugin YAML, or an Istio 1.30+ TrafficExtension (served under its 1.30+ resource
    /// name); re-read on change, each change is a new push.
    #[arg(long, default_value = "testdata/wasmplugin.yaml", value_name = "FILE")]
    pub wasmplugin: PathBuf,
    /// ADS address the agent connects to: host:port, or unix:/path (as pilot-agent's socket).
    #[arg(long, default_value = "127.0.0.1:15010", value_parser = parse_listen, value_name = "ADDR")]
    pub listen: ListenAddr,
    /// Address of the listener Envoy opens for the seed's curls.
    #[arg(long, default_value = "127.0.0.1:18080", value_name = "ADDR")]
    pub envoy_listener: SocketAddr,
    /// Address of the productpage upstream this process serves.
    #[arg(long, default_value = "127.0.0.1:19080", value_name = "ADDR")]
    pub productpage: SocketAddr,
    /// `.dockerconfigjson` content used when the WasmPlugin names an imagePullSecret.
    #[arg(long, value_name = "FILE")]
    pub pull_secret: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The agent's Envoy-facing address (unix:/path or host:port).
    #[arg(long, value_parser = parse_listen, value_name = "ADDR")]
    pub xds: ListenAddr,
    /// ECDS resource name to subscribe to.
    #[arg(long, value_name = "NAME")]
    pub resource: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    match args.command {
        None => run_control_plane(args.control_plane).await,
        Some(DemoCommand::ControlPlane(a)) => run_control_plane(a).await,
        Some(DemoCommand::Probe(a)) => probe::run(&a.xds, &a.resource, a.timeout).await,
    }
}

/// Builds LDS/CDS/ECDS from the plugin file and installs them in `cp`.
fn load(cp: &DemoControlPlane, a: &ControlPlaneArgs, version: u64) -> anyhow::Result<WasmPlugin> {
    let text = std::fs::read_to_string(&a.wasmplugin)
        .with_context(|| format!("--wasmplugin {}", a.wasmplugin.display()))?;
    let plugin = WasmPlugin::parse(&text).map_err(anyhow::Error::msg)?;
    let secret = match (&a.pull_secret, plugin.spec.image_pull_secret.is_empty()) {
        (Some(p), false) => Some(
            std::fs::read_to_string(p).with_context(|| format!("--pull-secret {}", p.display()))?,
        ),
        _ => None,
    };
    let name = plugin.resource_name();
    cp.set(
        type_url::LISTENER,
        BTreeMap::from([(
            resources::LISTENER_NAME.to_owned(),
            resources::listener(a.envoy_listener, &name, plugin.is_network()),
        )]),
    );
    cp.set(
        type_url::CLUSTER,
        BTreeMap::from([(
            resources::CLUSTER_NAME.to_owned(),
            resources::cluster(a.productpage),
        )]),
    );
    cp.set(
        type_url::ECDS,
        BTreeMap::from([(
            name.clone(),
            plugin.to_ecds(&version.to_string(), secret.as_deref()),
        )]),
    );
    println!(
        "[control-plane] WasmPlugin {} (resource version {version}): {} → ECDS {name}",
        plugin.qualified_name(),
        plugin.url()
    );
    Ok(plugin)
}

fn fingerprint(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

async fn productpage(addr: SocketAddr) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .fallback(|uri: http::Uri| async move { format!("productpage: {}\n", uri.path()) });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--productpage {addr}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn run_control_plane(a: ControlPlaneArgs) -> anyhow::Result<()> {
    let cp = DemoControlPlane::new();
    let mut version = 1u64;
    load(&cp, &a, version)?;
    let mut seen = fingerprint(&a.wasmplugin);

    let bound = crate::xds::listen::bind(&a.listen).await?;
    println!(
        "[control-plane] ADS on {}, productpage on {}",
        a.listen, a.productpage
    );
    let router = tonic::transport::Server::builder().add_service(cp.service());
    let server = async move {
        match bound {
            crate::xds::listen::Bound::Tcp(l) => {
                router
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                    .await
            }
            crate::xds::listen::Bound::Unix(l) => {
                router
                    .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
                    .await
            }
        }
    };
    let page = productpage(a.productpage);
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = fingerprint(&a.wasmplugin);
            if now != seen {
                seen = now;
                version += 1;
                if let Err(e) = load(&cp, &a, version) {
                    println!("[control-plane] keeping the previous config: {e:#}");
                }
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = server => r.context("ADS server")?,
        r = page => r?,
        _ = watch => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
