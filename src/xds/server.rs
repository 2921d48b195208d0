//! The Envoy-facing tonic service. Each RPC hands its stream to `stream::start`.
//!
//! Accepting never spins: when `accept` fails (EMFILE, ENFILE, ENOMEM, …) the loop waits, from
//! 5 ms doubling to 1 s, and logs once per failure burst.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::flavor::{Delta, Sotw};
use super::listen::Bound;
use super::{stream, ProxyContext};

struct AdsProxy {
    ctx: Arc<ProxyContext>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsProxy {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(stream::start::<Sotw>(
            self.ctx.clone(),
            request,
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(stream::start::<Delta>(
            self.ctx.clone(),
            request,
        )))
    }
}

/// Serves ADS on `bound` until `shutdown` completes and the streams have ended.
pub async fn serve(
    bound: Bound,
    ctx: Arc<ProxyContext>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let max_request = ctx.config.max_request_bytes;
    let svc = AggregatedDiscoveryServiceServer::new(AdsProxy { ctx })
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(usize::MAX);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(svc);
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

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The connections of `listener`; accept errors are waited out, never yielded.
fn incoming<L: Accept>(listener: L) -> impl Stream<Item = std::io::Result<L::Conn>> {
    futures::stream::unfold(listener, |l| async move {
        let mut pause = Duration::ZERO;
        loop {
            match l.accept().await {
                Ok(conn) => return Some((Ok(conn), l)),
                Err(e) => {
                    if pause.is_zero() {
                        tracing::warn!(error = %e, "cannot accept a connection; backing off");
                        pause = ACCEPT_BACKOFF_FIRST;
                    } else {
                        pause = (pause * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    })
}
