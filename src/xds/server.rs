//! The Envoy-facing tonic service. Each RPC hands its stream to `stream::start`.
//!
//! Accepting never spins: when `accept` fails (EMFILE, ENFILE, ENOMEM, …) the loop waits, from
//! 5 ms doubling to 1 s, and logs once per failure burst.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Request, Status};

use super::flavor::{Delta, Flavor, Sotw};
use super::listen::Bound;
use super::{stream, ProxyContext};

/// The ADS service: both methods, with the stream bodies of `relay` rather than a generated
/// server's message codec, so that large responses are relayed as they arrive.
#[derive(Clone)]
struct AdsProxy {
    ctx: Arc<ProxyContext>,
}

impl NamedService for AdsProxy {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

/// Decodes Envoy's requests with prost.
struct RequestDecoder<T>(PhantomData<T>);

impl<T: prost::Message + Default> Decoder for RequestDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode a request: {e}")))
    }
}

impl AdsProxy {
    fn open<F: Flavor>(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let (parts, body) = req.into_parts();
        let requests = Streaming::new_request(
            RequestDecoder::<F::Req>(PhantomData),
            body,
            None,
            Some(self.ctx.config.max_request_bytes),
        );
        let request = Request::from_parts(
            MetadataMap::from_headers(parts.headers),
            parts.extensions,
            requests,
        );
        let down = stream::start::<F>(self.ctx.clone(), request);
        let mut resp = http::Response::new(tonic::body::Body::new(down));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        resp
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for AdsProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let resp = match req.uri().path() {
            Sotw::PATH => self.open::<Sotw>(req),
            Delta::PATH => self.open::<Delta>(req),
            other => Status::unimplemented(format!("ecds-agent serves ADS only, not {other}"))
                .into_http(),
        };
        std::future::ready(Ok(resp))
    }
}

/// Serves ADS on `bound`, next to the services of `others` (routed by their names; the
/// binary's, this module knows none of them), until `shutdown` completes and the streams
/// have ended.
pub async fn serve(
    bound: Bound,
    ctx: Arc<ProxyContext>,
    others: tonic::service::Routes,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let svc = AdsProxy { ctx };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_routes(others.add_service(svc));
    match bound {
        Bound::Unix(l) => {
            router
                .serve_with_incoming_shutdown(incoming(l), shutdown)
                .await
        }
        Bound::Tcp(l) => {
            router
                .serve_with_incoming_shutdown(incoming(l), shutdown)
                .await
        }
    }
}

/// A listener the accept loop can drive.
trait Accept: Send + 'static {
    type Conn: Send;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    async fn accept(&self) -> std::io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Accept for TcpListener {
    type Conn = TcpStream;
    async fn accept(&self) -> std::io::Result<TcpStream> {
        let (s, _) = TcpListener::accept(self).await?;
        // xDS messages are small and latency-bound: no Nagle (a custom incoming stream does
        // not get tonic's tcp_nodelay, so it is set here).
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok(s)
    }
}

/// Accept errors (EMFILE) are waited out: 5 ms doubling to 1 s.
const ACCEPT_BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff {
    initial: Duration::from_millis(5),
    factor: 2.0,
    max: Duration::from_secs(1),
    jitter: 0.0,
};

/// The connections of `listener`; accept errors are waited out, never yielded.
fn incoming<L: Accept>(listener: L) -> impl Stream<Item = std::io::Result<L::Conn>> {
    futures::stream::unfold(listener, |l| async move {
        let mut failures = 0u32;
        loop {
            match l.accept().await {
                Ok(conn) => return Some((Ok(conn), l)),
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(error = %e, "cannot accept a connection; backing off");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(ACCEPT_BACKOFF.pause(failures)).await;
                }
            }
        }
    })
}
