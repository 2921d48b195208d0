//! The Envoy-facing tonic service. Each RPC hands its stream to `stream::start`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
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
    let svc = AggregatedDiscoveryServiceServer::new(AdsProxy { ctx })
        .max_decoding_message_size(usize::MAX)
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
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await
        }
        Bound::Tcp(l) => {
            // xDS messages are small and latency-bound: no Nagle (a custom incoming stream
            // does not get tonic's tcp_nodelay, so it is set here).
            let incoming = TcpListenerStream::new(l).map(|conn| {
                conn.inspect(|s| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                })
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}
