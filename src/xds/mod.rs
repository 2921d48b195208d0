//! The ADS proxy: Envoy-facing gRPC server (SotW + Delta), one upstream stream per Envoy
//! stream, and the interception point ([`Interceptor`]) where the responses of one type URL are
//! handed to whoever takes them over (ECDS: `crate::ecds`, plugged in by `main`).
//!
//! This module owns sockets, streams, framing, ordering and nonces. It knows nothing of Wasm and
//! does not look inside resources: everything not intercepted passes through unchanged (a large
//! response is relayed frame by frame as it arrives, without being decoded); intercepted
//! responses go to the interceptor, which answers through the stream's handles.
//!
//! * `listen`   — binding the Envoy-facing Unix/TCP socket
//! * `upstream` — dialling the control plane (h2, TLS, mTLS)
//! * `flavor`   — SotW vs Delta message shapes behind one trait
//! * `stream`   — the per-stream proxy loops
//! * `wire`     — gRPC framing and the early look that tells a relayable response
//! * `relay`    — the stream bodies below tonic's codec (cut-through relay of large responses)
//! * `book`     — nonce bookkeeping (one reply per upstream nonce)
//! * `server`   — the tonic service and `serve`

pub mod book;
pub mod flavor;
pub mod listen;
pub mod relay;
pub mod server;
mod stream;
pub mod upstream;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{oneshot, watch};

pub use server::serve;
pub use stream::DownTx;

/// What an interception of one stream is given: the stream's id, its nonce book, and the ways
/// to Envoy and to the control plane.
pub struct StreamHandles<F: flavor::Flavor> {
    pub id: u64,
    pub book: Arc<Mutex<book::Book>>,
    pub down_tx: DownTx<F>,
    pub up_tx: tokio::sync::mpsc::UnboundedSender<F::Req>,
}

/// What the stream hands an interception: the responses of its type URL, and the names of
/// resources of that type Envoy unsubscribed from. The stream ends when `task` ends.
pub struct Intercepted<F: flavor::Flavor> {
    pub responses: tokio::sync::mpsc::UnboundedSender<F::Resp>,
    pub unsubscribed: tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Takes over the responses of one type URL on every stream (SotW and Delta).
pub trait Interceptor: Send + Sync + 'static {
    /// The type URL whose responses it takes.
    fn type_url(&self) -> &'static str;
    fn start_sotw(&self, h: StreamHandles<flavor::Sotw>) -> Intercepted<flavor::Sotw>;
    fn start_delta(&self, h: StreamHandles<flavor::Delta>) -> Intercepted<flavor::Delta>;
}

/// Limits of the proxy, set from the command line.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest gRPC message accepted from Envoy.
    pub max_request_bytes: usize,
    /// Largest gRPC message accepted from the control plane.
    pub max_response_bytes: usize,
    /// Longest silence of the control plane in the middle of a response.
    pub response_stall_timeout: std::time::Duration,
    /// Most Envoy streams open at once; a new stream past it ends the oldest one.
    pub max_streams: usize,
    /// Bearer token file, read for every new upstream stream.
    pub token_file: Option<std::path::PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 4 << 20,
            max_response_bytes: 256 << 20,
            response_stall_timeout: std::time::Duration::from_secs(30),
            token_file: None,
            max_streams: 1024,
        }
    }
}

/// What every proxied stream shares.
pub struct ProxyContext {
    pub config: ProxyConfig,
    pub upstream: upstream::Upstream,
    /// Who takes over one type URL's responses (`None`: everything passes through untouched).
    pub interceptor: Option<Arc<dyn Interceptor>>,
    /// Flips to `true` on shutdown; streams end with UNAVAILABLE so Envoy reconnects.
    pub shutdown: watch::Receiver<bool>,
    pub stream_ids: AtomicU64,
    /// Headers added to every upstream stream: Istio's `XDS_HEADER_<name>` variables.
    pub extra_metadata: tonic::metadata::MetadataMap,
    /// Envoy streams currently open, oldest first, each with the switch that ends it when a
    /// newer stream needs its place (shutdown waits for this to empty, not for peers to close
    /// their connections).
    open: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
    /// Envoy's rejections of what the agent delivered (for `/debug/wasm`).
    pub rejections: Arc<RejectionLog>,
}

impl ProxyContext {
    pub fn new(
        config: ProxyConfig,
        upstream: upstream::Upstream,
        interceptor: Option<Arc<dyn Interceptor>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            config,
            upstream,
            interceptor,
            shutdown,
            stream_ids: AtomicU64::new(1),
            extra_metadata: xds_headers_from_env(),
            open: Mutex::new(BTreeMap::new()),
            rejections: Arc::new(RejectionLog::default()),
        }
    }

    /// How many Envoy streams are open.
    pub fn active_streams(&self) -> usize {
        self.open.lock().map(|o| o.len()).unwrap_or(0)
    }
}

/// One rejection by Envoy, as `/debug/wasm` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RejectionView {
    pub stream: u64,
    pub nonce: String,
    /// What the agent had delivered: `converted`, `stand_in` or `healed`.
    pub reason: &'static str,
    pub message: String,
    /// Unix seconds.
    pub at: u64,
}

/// The most recent rejections (bounded).
#[derive(Debug, Default)]
pub struct RejectionLog(Mutex<VecDeque<RejectionView>>);

impl RejectionLog {
    const KEEP: usize = 32;

    pub fn record(&self, v: RejectionView) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == Self::KEEP {
            q.pop_front();
        }
        q.push_back(v);
    }

    pub fn snapshot(&self) -> Vec<RejectionView> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

/// Istio's convention: each `XDS_HEADER_<name>=<value>` environment variable becomes the gRPC
/// header `<name>` (lower-cased) on the upstream connection. Invalid names or values are skipped
/// with a warning.
pub fn xds_headers_from_env() -> tonic::metadata::MetadataMap {
    let mut md = tonic::metadata::MetadataMap::new();
    for (k, v) in std::env::vars() {
        let Some(name) = k.strip_prefix("XDS_HEADER_") else {
            continue;
        };
        let key =
            tonic::metadata::AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes());
        match (key, v.parse()) {
            (Ok(key), Ok(value)) => {
                md.insert(key, value);
            }
            _ => {
                tracing::warn!(variable = %k, "XDS_HEADER_ variable is not a valid gRPC header; ignored")
            }
        }
    }
    md
}

/// Registers one open stream for as long as it lives: the context's open set (shutdown waits
/// on it, `--max-streams` bounds it) and the `ecds_agent_envoy_streams_active` gauge move
/// together.
pub(crate) struct ActiveStream<'a> {
    ctx: &'a ProxyContext,
    id: u64,
}

impl<'a> ActiveStream<'a> {
    /// Registers stream `id`, ending the oldest streams past `max_streams`; the receiver fires
    /// when this stream must give way to a newer one.
    pub(crate) fn new(ctx: &'a ProxyContext, id: u64) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut open = ctx.open.lock().unwrap_or_else(|p| p.into_inner());
        while open.len() >= ctx.config.max_streams.max(1) {
            match open.pop_first() {
                Some((old, evict)) => {
                    tracing::warn!(
                        stream = old,
                        max = ctx.config.max_streams,
                        "too many Envoy streams; ending the oldest"
                    );
                    let _ = evict.send(());
                }
                None => break,
            }
        }
        open.insert(id, tx);
        metrics::gauge!(crate::metrics::ENVOY_STREAMS_ACTIVE).set(open.len() as f64);
        (Self { ctx, id }, rx)
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        let mut open = self.ctx.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&self.id);
        metrics::gauge!(crate::metrics::ENVOY_STREAMS_ACTIVE).set(open.len() as f64);
    }
}
