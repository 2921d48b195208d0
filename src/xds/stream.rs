//! One Envoy ADS stream, proxied to its own upstream stream of the same kind.
//!
//! Three loops run per stream:
//! * requests: Envoy → upstream through an unbounded queue, so a slow Envoy reader can never
//!   stop requests going up (Istio #39209);
//! * responses: upstream → Envoy; ECDS responses are diverted to the stream's ECDS session,
//!   everything else goes straight down byte for byte, never decoded: a small one whole, a
//!   large one (≥ 64 KiB) relayed while it is still arriving (`relay`);
//! * the ECDS session (see `ecds_session`), which converts and may answer upstream itself.
//!
//! When either side ends, the other is ended with a matching status so Envoy reconnects.
//! A stream failure never ends the process, and never leaves Envoy's stream silent: a message
//! over the size cap ends it with RESOURCE_EXHAUSTED, a failed task with INTERNAL.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use metrics::counter;
use tokio::sync::mpsc;
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Request, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use super::book::{Book, Rejection};
use super::flavor::Flavor;
use super::relay::{Down, DownBody, Next, ReadEnd, Relay, ResponseReader, UpBody, RELAY_CHUNKS};
use super::wire::{self, HEADER};
use super::{ProxyContext, RejectionView};
use crate::errors::error_chain;
use crate::metrics as m;

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

pub type DownTx<F> = mpsc::Sender<Down<<F as Flavor>::Resp>>;

/// Why a stream ended.
#[derive(Debug)]
enum End {
    EnvoyClosed,
    EnvoyError(Status),
    EnvoyTooLarge(String),
    EnvoyGone,
    UpstreamUnreachable(String),
    UpstreamClosed,
    UpstreamError(Status),
    UpstreamTooLarge(String),
    /// A per-stream task failed (a bug): Envoy gets INTERNAL and reconnects.
    Internal(String),
    /// A newer stream took this one's place (`--max-streams`).
    Evicted,
    Shutdown,
}

/// tonic's decoder refuses a message over the cap with OUT_OF_RANGE and this text.
fn too_large(status: &Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains("length too large")
}

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Starts proxying one Envoy stream; returns the stream of responses for Envoy.
pub fn start<F: Flavor>(
    ctx: Arc<ProxyContext>,
    req: Request<Streaming<F::Req>>,
) -> DownBody<F::Resp> {
    let (down_tx, down_rx) = mpsc::channel(DOWNSTREAM_BUFFER);
    let id = ctx.stream_ids.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("stream", id, kind = F::NAME);
    let last_word = down_tx.clone();
    tokio::spawn(
        async move {
            let run = std::panic::AssertUnwindSafe(session::<F>(ctx, id, req, down_tx));
            if let Err(p) = run.catch_unwind().await {
                let why = panic_text(p.as_ref());
                tracing::error!(error = %why, "stream task failed");
                let status = Status::internal(format!("ecds-agent: stream failed: {why}"));
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    last_word.send(Down::End(status)),
                )
                .await;
            }
        }
        .instrument(span),
    );
    DownBody::new(down_rx)
}

/// The most of a token file read.
const MAX_TOKEN_BYTES: u64 = 64 << 10;

/// `authorization: Bearer <token>` from `path`, read now (a projected token is rotated on disk;
/// each new stream presents the current one). A file that cannot be read or holds no usable
/// token is logged (without its content) and the stream goes up without it, so the control
/// plane's refusal says what is wrong.
async fn add_token(md: &mut MetadataMap, path: &std::path::Path) {
    use tokio::io::AsyncReadExt;
    let read = async {
        let f = tokio::fs::File::open(path).await?;
        let mut text = String::new();
        f.take(MAX_TOKEN_BYTES).read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    match read.await {
        Ok(text) => match format!("Bearer {}", text.trim()).parse() {
            Ok(value) if !text.trim().is_empty() => {
                md.insert("authorization", value);
            }
            _ => warn!(file = %path.display(), "token file holds no usable bearer token"),
        },
        Err(e) => warn!(file = %path.display(), error = %e, "cannot read the token file"),
    }
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
    let (_active, evicted) = super::ActiveStream::new(&ctx, id);
    let mut metadata = upstream_metadata(req.metadata(), &ctx.extra_metadata);
    if let Some(path) = &ctx.config.token_file {
        add_token(&mut metadata, path).await;
    }
    let downstream = req.into_inner();
    let (up_tx, up_rx) = mpsc::unbounded_channel::<F::Req>();
    let book = Arc::new(Mutex::new(Book::default()));

    let mut ecds = ctx.interceptor.as_ref().map(|i| {
        F::intercept(
            &**i,
            super::StreamHandles {
                id,
                book: book.clone(),
                down_tx: down_tx.clone(),
                up_tx: up_tx.clone(),
            },
        )
    });
    let ecds_tx = ecds.as_ref().map(|i| i.responses.clone());
    let unsub_tx = ecds.as_ref().map(|i| i.unsubscribed.clone());
    // The ECDS session ends only after the stream does; if it ends first, it failed.
    let ecds_failed = async {
        match ecds.as_mut() {
            Some(i) => match (&mut i.task).await {
                Err(e) if e.is_panic() => End::Internal(format!(
                    "ECDS session failed: {}",
                    panic_text(&*e.into_panic())
                )),
                Err(e) => End::Internal(format!("ECDS session failed: {e}")),
                Ok(()) => End::EnvoyGone,
            },
            None => std::future::pending().await,
        }
    };

    let mut shutdown = ctx.shutdown.clone();
    let end = tokio::select! {
        e = forward_requests::<F>(&ctx, id, downstream, up_tx, unsub_tx, book.clone()) => e,
        e = forward_responses::<F>(&ctx, metadata, up_rx, down_tx.clone(), ecds_tx, book) => e,
        e = ecds_failed => e,
        _ = evicted => End::Evicted,
        _ = shutdown.wait_for(|s| *s) => End::Shutdown,
    };
    if let Some(i) = ecds {
        i.task.abort();
    }
    let to_envoy = match &end {
        End::EnvoyClosed | End::EnvoyError(_) | End::EnvoyGone => None,
        End::EnvoyTooLarge(e) => Some(Status::resource_exhausted(format!(
            "ecds-agent: request from Envoy over --max-request-bytes ({}): {e}",
            ctx.config.max_request_bytes
        ))),
        End::UpstreamTooLarge(e) => Some(Status::resource_exhausted(format!(
            "ecds-agent: response from the control plane over --max-response-bytes ({}): {e}",
            ctx.config.max_response_bytes
        ))),
        End::Internal(e) => Some(Status::internal(format!("ecds-agent: {e}"))),
        End::Evicted => Some(Status::unavailable(format!(
            "ecds-agent: replaced by a newer Envoy stream (--max-streams {})",
            ctx.config.max_streams
        ))),
        End::UpstreamUnreachable(e) => Some(Status::unavailable(format!(
            "ecds-agent: control plane {} unreachable: {e}",
            ctx.upstream.addr()
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
        End::EnvoyTooLarge(_) => ("too_large", "cancelled"),
        End::EnvoyGone => ("cancelled", "cancelled"),
        End::UpstreamUnreachable(_) => ("upstream_unreachable", "error"),
        End::UpstreamClosed => ("upstream_closed", "closed"),
        End::UpstreamError(_) => ("upstream_error", "error"),
        End::UpstreamTooLarge(_) => ("upstream_too_large", "error"),
        End::Internal(_) => ("internal", "cancelled"),
        End::Evicted => ("evicted", "cancelled"),
        End::Shutdown => ("shutdown", "cancelled"),
    };
    counter!(m::ENVOY_TERMINATIONS, "type" => envoy_cause).increment(1);
    counter!(m::UPSTREAM_TERMINATIONS, "type" => upstream_cause).increment(1);
    match &end {
        End::UpstreamUnreachable(_)
        | End::UpstreamError(_)
        | End::UpstreamTooLarge(_)
        | End::EnvoyTooLarge(_)
        | End::Internal(_)
        | End::Evicted => warn!(?end, "stream ended"),
        _ => info!(?end, "stream ended"),
    }
    if let Some(status) = to_envoy {
        // Envoy may be gone, or not reading: the stream ends either way, within a second.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            down_tx.send(Down::End(status)),
        )
        .await;
    }
}

async fn forward_requests<F: Flavor>(
    ctx: &ProxyContext,
    id: u64,
    mut downstream: Streaming<F::Req>,
    up_tx: mpsc::UnboundedSender<F::Req>,
    unsub_tx: Option<mpsc::UnboundedSender<Vec<String>>>,
    book: Arc<Mutex<Book>>,
) -> End {
    loop {
        match downstream.message().await {
            Ok(Some(req)) => {
                let decision = book
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .envoy_request::<F>(req);
                if let Some(r) = decision.rejection {
                    record_rejection(ctx, id, r, decision.up.is_some());
                }
                if let Some(tx) = unsub_tx
                    .as_ref()
                    .filter(|_| !decision.unsubscribed.is_empty())
                {
                    let _ = tx.send(decision.unsubscribed);
                }
                let Some(req) = decision.up else { continue };
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
            Err(status) if too_large(&status) => {
                return End::EnvoyTooLarge(status.message().to_owned())
            }
            Err(status) => return End::EnvoyError(status),
        }
    }
}

/// Envoy rejected something the agent delivered: a metric with the reason, a log line and an
/// entry on `/debug/wasm`.
fn record_rejection(ctx: &ProxyContext, id: u64, r: Rejection, forwarded: bool) {
    let reason = r.what.label();
    warn!(nonce = %r.nonce, reason, error = %r.message, forwarded,
          "Envoy rejected an ECDS update the agent delivered");
    counter!(m::ENVOY_REJECTIONS, "reason" => reason).increment(1);
    ctx.rejections.record(RejectionView {
        stream: id,
        nonce: r.nonce,
        reason,
        message: r.message,
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
}

async fn forward_responses<F: Flavor>(
    ctx: &ProxyContext,
    metadata: MetadataMap,
    up_rx: mpsc::UnboundedReceiver<F::Req>,
    down_tx: DownTx<F>,
    ecds_tx: Option<mpsc::UnboundedSender<F::Resp>>,
    book: Arc<Mutex<Book>>,
) -> End {
    let mut channel = match ctx.upstream.connect().await {
        Ok(c) => c,
        Err(e) => {
            counter!(m::UPSTREAM_CONNECTION_FAILURES).increment(1);
            return End::UpstreamUnreachable(error_chain(&e));
        }
    };
    let mut request = http::Request::new(tonic::body::Body::new(UpBody::new(up_rx)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(F::PATH);
    *request.headers_mut() = metadata.into_headers();
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let response = match tower::ServiceExt::oneshot(&mut channel, request).await {
        Ok(r) => r,
        Err(e) => {
            counter!(m::UPSTREAM_CONNECTION_FAILURES).increment(1);
            return End::UpstreamUnreachable(error_chain(&e));
        }
    };
    if let Some(refused) = refused(&response) {
        counter!(m::UPSTREAM_CONNECTION_FAILURES).increment(1);
        return refused;
    }
    let intercepted = ctx
        .interceptor
        .as_ref()
        .filter(|_| ecds_tx.is_some())
        .map(|i| i.type_url());
    let mut reader = ResponseReader::new(
        response.into_body(),
        ctx.config.max_response_bytes,
        F::SHAPE,
        ctx.config.response_stall_timeout,
        intercepted,
    );
    loop {
        match reader.next().await {
            Ok(Next::Whole(framed)) => {
                let body = framed.slice(HEADER..);
                // Whole, its own type_url decides (a malformed ECDS response whose first
                // resource is of another type still reaches the ECDS session and its NACK).
                let as_is = intercepted.is_none_or(|t| wire::string_of(&body, 4) != Some(t));
                if as_is {
                    // Not ECDS: on to Envoy as it came, without decoding.
                    counter!(m::XDS_PROXY_RESPONSES).increment(1);
                    debug!(
                        type_url = wire::string_of(&body, 4),
                        nonce = wire::string_of(&body, 5),
                        "response down"
                    );
                    if down_tx.send(Down::Raw(framed)).await.is_err() {
                        return End::EnvoyGone;
                    }
                    continue;
                }
                let resp = match <F::Resp as prost::Message>::decode(body) {
                    Ok(r) => r,
                    Err(e) => {
                        return End::UpstreamError(Status::internal(format!(
                            "cannot decode a response: {e}"
                        )))
                    }
                };
                counter!(m::XDS_PROXY_RESPONSES).increment(1);
                debug!(
                    type_url = F::resp_type_url(&resp),
                    nonce = F::resp_nonce(&resp),
                    "response down"
                );
                if Some(F::resp_type_url(&resp)) == intercepted {
                    if let Some(tx) = &ecds_tx {
                        book.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .upstream_response(F::resp_nonce(&resp));
                        if tx.send(resp).is_err() {
                            return End::EnvoyGone;
                        }
                        continue;
                    }
                }
                if down_tx.send(Down::Message(resp)).await.is_err() {
                    return End::EnvoyGone;
                }
            }
            Ok(Next::Relay { head, remaining }) => {
                // A large response that is not ECDS: to Envoy as it arrives, byte for byte.
                counter!(m::XDS_PROXY_RESPONSES).increment(1);
                debug!(
                    bytes = head.len() + remaining - HEADER,
                    "response relayed as it arrives"
                );
                let (tx, rest) = mpsc::channel(RELAY_CHUNKS);
                let relay = Relay {
                    head,
                    rest,
                    remaining,
                };
                if down_tx.send(Down::Relay(relay)).await.is_err() {
                    return End::EnvoyGone;
                }
                let mut left = remaining;
                while left > 0 {
                    let chunks = match reader.chunks(left).await {
                        Ok(c) => c,
                        Err(e) => return read_end(e),
                    };
                    left -= chunks.iter().map(Bytes::len).sum::<usize>();
                    if tx.send(chunks).await.is_err() {
                        return End::EnvoyGone;
                    }
                }
            }
            Err(e) => return read_end(e),
        }
    }
}

/// The control plane refused the stream in its response headers (an HTTP error, or a
/// trailers-only gRPC status).
fn refused<B>(response: &http::Response<B>) -> Option<End> {
    let code = response.status();
    if code != http::StatusCode::OK {
        let grpc = match code.as_u16() {
            400 => tonic::Code::Internal,
            401 => tonic::Code::Unauthenticated,
            403 => tonic::Code::PermissionDenied,
            404 => tonic::Code::Unimplemented,
            429 | 502 | 503 | 504 => tonic::Code::Unavailable,
            _ => tonic::Code::Unknown,
        };
        return Some(End::UpstreamError(Status::new(
            grpc,
            format!("HTTP status {code} from the control plane"),
        )));
    }
    match Status::from_header_map(response.headers()) {
        Some(s) if s.code() == tonic::Code::Ok => Some(End::UpstreamClosed),
        Some(s) => Some(End::UpstreamError(s)),
        None => None,
    }
}

/// How the response side ended, as the stream's end.
fn read_end(e: ReadEnd) -> End {
    match e {
        ReadEnd::Status(s) if s.code() == tonic::Code::Ok => End::UpstreamClosed,
        ReadEnd::Status(s) => End::UpstreamError(s),
        ReadEnd::TooLarge(t) => End::UpstreamTooLarge(t),
        ReadEnd::Broken(s) => upstream_failure(s),
        ReadEnd::Stalled(d) => End::UpstreamError(Status::unavailable(format!(
            "the control plane sent nothing for {d:?} in the middle of a response \
             (--response-stall-timeout)"
        ))),
    }
}

/// A status the control plane sent is passed on as is; a broken connection (TLS refused,
/// reset, …) has a local transport error as its source and becomes UNAVAILABLE. (Oversized
/// responses are caught by the reader itself: `ReadEnd::TooLarge`.)
fn upstream_failure(status: Status) -> End {
    match std::error::Error::source(&status) {
        Some(transport) => End::UpstreamUnreachable(error_chain(transport)),
        None => End::UpstreamError(status),
    }
}
