//! The ADS proxy: Envoy-facing gRPC server (SotW + Delta), one upstream stream per Envoy
//! stream, and the interception point where ECDS responses are handed to [`crate::ecds`].
//!
//! This module owns sockets, streams, ordering and nonces. It does not look inside resources:
//! everything that is not ECDS passes through byte-for-byte, and ECDS resources are only
//! carried to and from the converter.
//!
//! * `listen`   — binding the Envoy-facing Unix/TCP socket
//! * `upstream` — dialling the control plane (h2, TLS, mTLS)
//! * `flavor`   — SotW vs Delta message shapes behind one trait
//! * `stream`   — the per-stream proxy loops
//! * `book`     — nonce bookkeeping (one reply per upstream nonce)
//! * `ecds_session` — per-stream ECDS conversion, NACKs and self-healing deliveries
//! * `server`   — the tonic service and `serve`

pub mod book;
mod ecds_session;
pub mod flavor;
pub mod listen;
pub mod server;
mod stream;
pub mod upstream;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

pub use server::serve;

/// What every proxied stream shares.
pub struct ProxyContext {
    pub upstream: upstream::Upstream,
    /// `None` when conversion is disabled: ECDS then passes through untouched.
    pub converter: Option<Arc<crate::ecds::Converter>>,
    /// Flips to `true` on shutdown; streams end with UNAVAILABLE so Envoy reconnects.
    pub shutdown: watch::Receiver<bool>,
    pub stream_ids: AtomicU64,
    /// Headers added to every upstream stream: Istio's `XDS_HEADER_<name>` variables.
    pub extra_metadata: tonic::metadata::MetadataMap,
    /// Envoy streams currently open (shutdown waits for this to reach zero, not for peers to
    /// close their connections).
    active: AtomicUsize,
}

impl ProxyContext {
    pub fn new(
        upstream: upstream::Upstream,
        converter: Option<Arc<crate::ecds::Converter>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            upstream,
            converter,
            shutdown,
            stream_ids: AtomicU64::new(1),
            extra_metadata: xds_headers_from_env(),
            active: AtomicUsize::new(0),
        }
    }

    /// How many Envoy streams are open.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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

/// Counts one open stream for as long as it lives: the context's count (shutdown waits on it)
/// and the `ecds_agent_envoy_streams_active` gauge move together.
pub(crate) struct ActiveStream<'a>(&'a AtomicUsize);

impl<'a> ActiveStream<'a> {
    pub(crate) fn new(ctx: &'a ProxyContext) -> Self {
        ctx.active.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::admin::metrics::ENVOY_STREAMS_ACTIVE).increment(1.0);
        Self(&ctx.active)
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::admin::metrics::ENVOY_STREAMS_ACTIVE).decrement(1.0);
    }
}
