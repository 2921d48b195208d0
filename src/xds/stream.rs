//! One Envoy ADS stream, proxied to its own upstream stream of the same kind.
//!
//! Three loops run per stream:
//! * requests: Envoy → upstream through an unbounded queue, so a slow Envoy reader can never
//!   stop requests going up (Istio #39209);
//! * responses: upstream → Envoy; ECDS responses are diverted to the stream's ECDS session,
//!   everything else goes straight down, untouched;
//! * the ECDS session (see `ecds_session`), which converts and may answer upstream itself.
//!
//! When either side ends, the other is ended with a matching status so Envoy reconnects.
//! A stream failure never ends the process.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use metrics::counter;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Request, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use super::book::NonceBook;
use super::ecds_session::EcdsSession;
use super::flavor::Flavor;
use super::ProxyContext;
use crate::admin::metrics as m;
use crate::errors::error_chain;
use crate::proto::type_url;

/// How many responses may wait for a slow Envoy before the upstream reader pauses.
const DOWNSTREAM_BUFFER: usize = 64;

/// Headers that belong to the hop, not to the xDS conversation.
const HOP_HEADERS: &[&str] = &[
    "te",
    "content-type",
    "user-agent",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "host",
];

pub type DownTx<F> = mpsc::Sender<Result<<F as Flavor>::Resp, Status>>;

/// Why a stream ended.
#[derive(Debug)]
enum End {
    EnvoyClosed,
    EnvoyError(Status),
    EnvoyGone,
    UpstreamUnreachable(String),
    UpstreamClosed,
    UpstreamError(Status),
    Shutdown,
}

/// Starts proxying one Envoy stream; returns the stream of responses for Envoy.
pub fn start<F: Flavor>(
    ctx: Arc<ProxyContext>,
    req: Request<Streaming<F::Req>>,
) -> ReceiverStream<Result<F::Resp, Status>> {
    let (down_tx, down_rx) = mpsc::channel(DOWNSTREAM_BUFFER);
    let id = ctx.stream_ids.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("stream", id, kind = F::NAME);
    tokio::spawn(session::<F>(ctx, id, req, down_tx).instrument(span));
    ReceiverStream::new(down_rx)
}

/// Envoy's metadata minus hop headers, plus the agent's own headers (`XDS_HEADER_*`), which
/// replace any of the same name.
fn upstream_metadata(from: &MetadataMap, extra: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new();
    for kv in from.iter() {
        match kv {
            KeyAndValueRef::Ascii(k, v) if !HOP_HEADERS.contains(&k.as_str()) => {
                out.append(k.clone(), v.clone());
            }
            KeyAndValueRef::Binary(k, v) => {
                out.append_bin(k.clone(), v.clone());
            }
            KeyAndValueRef::Ascii(..) => {}
        }
    }
    for kv in extra.iter() {
        if let KeyAndValueRef::Ascii(k, v) = kv {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

async fn session<F: Flavor>(
    ctx: Arc<ProxyContext>,
    id: u64,
    req: Request<Streaming<F::Req>>,
    down_tx: DownTx<F>,
) {
    info!("Envoy stream opened");
    let _active = super::ActiveStream::new(&ctx);
    let metadata = upstream_metadata(req.metadata(), &ctx.extra_metadata);
    let downstream = req.into_inner();
    let (up_tx, up_rx) = mpsc::unbounded_channel::<F::Req>();
    let book = Arc::new(Mutex::new(NonceBook::default()));

    let ecds = ctx.converter.clone().map(|conv| {
        EcdsSession::<F>::spawn(id, conv, book.clone(), down_tx.clone(), up_tx.clone())
    });
    let ecds_tx = ecds.as_ref().map(|(tx, _)| tx.clone());

    let mut shutdown = ctx.shutdown.clone();
    let end = tokio::select! {
        e = forward_requests::<F>(downstream, up_tx, book) => e,
        e = forward_responses::<F>(&ctx, metadata, up_rx, down_tx.clone(), ecds_tx) => e,
        _ = shutdown.wait_for(|s| *s) => End::Shutdown,
    };
    if let Some((_, task)) = ecds {
        task.abort();
    }
    let to_envoy = match &end {
        End::EnvoyClosed | End::EnvoyError(_) | End::EnvoyGone => None,
        End::UpstreamUnreachable(e) => Some(Status::unavailable(format!(
            "ecds-agent: control plane {} unreachable: {e}",
            ctx.upstream.uri()
        ))),
        End::UpstreamClosed => Some(Status::unavailable(
            "ecds-agent: control plane closed the stream",
        )),
        End::UpstreamError(s) => Some(Status::new(
            s.code(),
            format!("ecds-agent: control plane stream failed: {}", s.message()),
        )),
        End::Shutdown => Some(Status::unavailable("ecds-agent: shutting down")),
    };
    let (envoy_cause, upstream_cause) = match &end {
        End::EnvoyClosed => ("closed", "cancelled"),
        End::EnvoyError(s) if s.code() == tonic::Code::Cancelled => ("cancelled", "cancelled"),
        End::EnvoyError(_) => ("error", "cancelled"),
        End::EnvoyGone => ("cancelled", "cancelled"),
        End::UpstreamUnreachable(_) => ("upstream_unreachable", "error"),
        End::UpstreamClosed => ("upstream_closed", "closed"),
        End::UpstreamError(_) => ("upstream_error", "error"),
        End::Shutdown => ("shutdown", "cancelled"),
    };
    counter!(m::ENVOY_TERMINATIONS, "type" => envoy_cause).increment(1);
    counter!(m::UPSTREAM_TERMINATIONS, "type" => upstream_cause).increment(1);
    match &end {
        End::UpstreamUnreachable(_) | End::UpstreamError(_) => warn!(?end, "stream ended"),
        _ => info!(?end, "stream ended"),
    }
    if let Some(status) = to_envoy {
        // Envoy may be gone, or not reading: the stream ends either way, within a second.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), down_tx.send(Err(status)))
            .await;
    }
}

async fn forward_requests<F: Flavor>(
    mut downstream: Streaming<F::Req>,
    up_tx: mpsc::UnboundedSender<F::Req>,
    book: Arc<Mutex<NonceBook>>,
) -> End {
    loop {
        match downstream.message().await {
            Ok(Some(req)) => {
                let forwarded = match book.lock() {
                    Ok(mut b) => b.filter::<F>(req),
                    Err(poisoned) => poisoned.into_inner().filter::<F>(req),
                };
                let Some(req) = forwarded else { continue };
                debug!(
                    type_url = F::req_type_url(&req),
                    nonce = F::req_nonce(&req),
                    "request up"
                );
                counter!(m::XDS_PROXY_REQUESTS).increment(1);
                if up_tx.send(req).is_err() {
                    // The upstream request stream is gone; the response side reports why.
                    std::future::pending::<()>().await;
                }
            }
            Ok(None) => return End::EnvoyClosed,
            Err(status) => return End::EnvoyError(status),
        }
    }
}

async fn forward_responses<F: Flavor>(
    ctx: &ProxyContext,
    metadata: MetadataMap,
    up_rx: mpsc::UnboundedReceiver<F::Req>,
    down_tx: DownTx<F>,
    ecds_tx: Option<mpsc::UnboundedSender<F::Resp>>,
) -> End {
    let mut client = match ctx.upstream.connect().await {
        Ok(c) => c,
        Err(e) => {
            counter!(m::UPSTREAM_CONNECTION_FAILURES).increment(1);
            return End::UpstreamUnreachable(error_chain(&e));
        }
    };
    let mut request = Request::new(UnboundedReceiverStream::new(up_rx));
    *request.metadata_mut() = metadata;
    let mut upstream = match F::open(&mut client, request).await {
        Ok(s) => s,
        Err(status) => {
            counter!(m::UPSTREAM_CONNECTION_FAILURES).increment(1);
            return upstream_failure(status);
        }
    };
    loop {
        match upstream.message().await {
            Ok(Some(resp)) => {
                counter!(m::XDS_PROXY_RESPONSES).increment(1);
                debug!(
                    type_url = F::resp_type_url(&resp),
                    nonce = F::resp_nonce(&resp),
                    "response down"
                );
                if F::resp_type_url(&resp) == type_url::ECDS {
                    if let Some(tx) = &ecds_tx {
                        if tx.send(resp).is_err() {
                            return End::EnvoyGone;
                        }
                        continue;
                    }
                }
                if down_tx.send(Ok(resp)).await.is_err() {
                    return End::EnvoyGone;
                }
            }
            Ok(None) => return End::UpstreamClosed,
            Err(status) => return upstream_failure(status),
        }
    }
}

/// A status the control plane sent is passed on as is; a broken connection (TLS refused,
/// reset, …) has a local transport error as its source and becomes UNAVAILABLE.
fn upstream_failure(status: Status) -> End {
    match std::error::Error::source(&status) {
        Some(transport) => End::UpstreamUnreachable(error_chain(transport)),
        None => End::UpstreamError(status),
    }
}
