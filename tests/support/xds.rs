//! A scriptable control plane (tonic ADS server) and an Envoy-side ADS client, both speaking
//! real gRPC over real sockets.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(15);

/// One stream as the control plane sees it.
pub struct CpConn<Req, Resp> {
    pub metadata: MetadataMap,
    pub requests: mpsc::UnboundedReceiver<Req>,
    pub tx: mpsc::UnboundedSender<Result<Resp, Status>>,
}

impl<Req: std::fmt::Debug, Resp> CpConn<Req, Resp> {
    /// The next request (panics after 15 s).
    pub async fn recv(&mut self) -> Req {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("control plane: timed out waiting for a request")
            .expect("control plane: stream ended")
    }

    /// `Some(request)` if one arrives within `d`.
    pub async fn try_recv(&mut self, d: Duration) -> Option<Req> {
        tokio::time::timeout(d, self.requests.recv())
            .await
            .ok()
            .flatten()
    }

    pub fn send(&self, resp: Resp) {
        self.tx.send(Ok(resp)).expect("control plane: stream gone");
    }

    pub fn fail(&self, status: Status) {
        let _ = self.tx.send(Err(status));
    }
}

pub type CpSotw = CpConn<DiscoveryRequest, DiscoveryResponse>;
pub type CpDelta = CpConn<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

pub enum CpStream {
    Sotw(CpSotw),
    Delta(CpDelta),
}

struct Server {
    streams: mpsc::UnboundedSender<CpStream>,
}

fn pump<T: Send + 'static>(mut inbound: Streaming<T>) -> mpsc::UnboundedReceiver<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    rx
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Server {
    type StreamAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let metadata = req.metadata().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let requests = pump(req.into_inner());
        let _ = self.streams.send(CpStream::Sotw(CpConn {
            metadata,
            requests,
            tx,
        }));
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let metadata = req.metadata().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let requests = pump(req.into_inner());
        let _ = self.streams.send(CpStream::Delta(CpConn {
            metadata,
            requests,
            tx,
        }));
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// A test control plane on 127.0.0.1.
pub struct ControlPlane {
    pub addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<CpStream>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::start_with(addr, None).await
    }

    /// A control plane serving TLS with the test PKI's server certificate; with `mtls`, it
    /// also demands a client certificate signed by the test CA.
    pub async fn start_tls(mtls: bool) -> Self {
        let p = super::registry::pki();
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(&p.cert).unwrap(),
            std::fs::read(&p.key).unwrap(),
        );
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if mtls {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(
                std::fs::read(&p.ca).unwrap(),
            ));
        }
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(tls)).await
    }

    /// A TLS control plane on `addr` with the given server certificate, demanding a client
    /// certificate signed by `client_ca`.
    pub async fn start_mtls_files(
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
        client_ca: &Path,
    ) -> Self {
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        );
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(tonic::transport::Certificate::from_pem(
                std::fs::read(client_ca).unwrap(),
            ));
        Self::start_with(addr, Some(tls)).await
    }

    /// A plaintext control plane on a Unix socket (as pilot-agent's `/etc/istio/proxy/XDS`).
    pub async fn start_unix(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).expect("bind control plane socket");
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(Server {
            streams: streams_tx,
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Self {
            addr: "0.0.0.0:0".parse().unwrap(),
            streams,
            stop: Some(stop),
            task,
        }
    }

    async fn start_with(addr: SocketAddr, tls: Option<tonic::transport::ServerTlsConfig>) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind control plane");
        let addr = listener.local_addr().unwrap();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(Server {
            streams: streams_tx,
        })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("server TLS config");
        }
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            streams,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn next_stream(&mut self) -> CpStream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("control plane: no stream opened in time")
            .expect("control plane stopped")
    }

    pub async fn next_sotw(&mut self) -> CpSotw {
        match self.next_stream().await {
            CpStream::Sotw(s) => s,
            CpStream::Delta(_) => panic!("expected a SotW stream, got Delta"),
        }
    }

    pub async fn next_delta(&mut self) -> CpDelta {
        match self.next_stream().await {
            CpStream::Delta(s) => s,
            CpStream::Sotw(_) => panic!("expected a Delta stream, got SotW"),
        }
    }

    /// Whether a stream opens within `d`.
    pub async fn stream_within(&mut self, d: Duration) -> Option<CpStream> {
        tokio::time::timeout(d, self.streams.recv())
            .await
            .ok()
            .flatten()
    }

    /// Stops accepting; existing streams must be ended by the caller (drop their `tx`).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// The Envoy side of one ADS stream.
pub struct EnvoyStream<Req, Resp> {
    pub tx: mpsc::UnboundedSender<Req>,
    pub rx: Streaming<Resp>,
}

impl<Req, Resp> EnvoyStream<Req, Resp> {
    /// Sends a request. A stream the agent already ended is not an error here: the test
    /// observes that through `recv` / `expect_status`.
    pub fn send(&self, req: Req) {
        let _ = self.tx.send(req);
    }

    /// The next response (panics on error or after 15 s).
    pub async fn recv(&mut self) -> Resp {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("envoy: stream ended"),
            Ok(Err(s)) => panic!("envoy: stream failed: {s:?}"),
            Err(_) => panic!("envoy: timed out waiting for a response"),
        }
    }

    /// `Some(response)` if one arrives within `d`; panics if the stream fails.
    pub async fn try_recv(&mut self, d: Duration) -> Option<Resp> {
        match tokio::time::timeout(d, self.rx.message()).await {
            Ok(Ok(r)) => r,
            Ok(Err(s)) => panic!("envoy: stream failed: {s:?}"),
            Err(_) => None,
        }
    }

    /// Waits for the stream to end with an error status.
    pub async fn expect_status(&mut self) -> Status {
        loop {
            match tokio::time::timeout(WAIT, self.rx.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => panic!("envoy: stream ended with OK"),
                Ok(Err(s)) => return s,
                Err(_) => panic!("envoy: timed out waiting for the stream to fail"),
            }
        }
    }
}

pub type AdsClient = AggregatedDiscoveryServiceClient<Channel>;

pub async fn connect_tcp(addr: &str) -> AdsClient {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("envoy: connect to agent");
    AggregatedDiscoveryServiceClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

pub async fn connect_uds(path: &Path) -> AdsClient {
    let path = path.to_owned();
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("envoy: connect to agent socket");
    AggregatedDiscoveryServiceClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

pub async fn open_sotw(
    client: &mut AdsClient,
    metadata: &[(&'static str, &'static str)],
) -> EnvoyStream<DiscoveryRequest, DiscoveryResponse> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut req = Request::new(UnboundedReceiverStream::new(rx));
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    let rx = client
        .stream_aggregated_resources(req)
        .await
        .expect("envoy: open SotW stream")
        .into_inner();
    EnvoyStream { tx, rx }
}

pub async fn open_delta(
    client: &mut AdsClient,
) -> EnvoyStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = client
        .delta_aggregated_resources(Request::new(UnboundedReceiverStream::new(rx)))
        .await
        .expect("envoy: open Delta stream")
        .into_inner();
    EnvoyStream { tx, rx }
}

/// Opens a SotW stream through `agent` and subscribes to ECDS `names`; returns both ends (the
/// control plane's with the subscription already read).
pub async fn sotw_ecds(
    agent: &super::Agent,
    cp: &mut ControlPlane,
    names: &[&str],
) -> (EnvoyStream<DiscoveryRequest, DiscoveryResponse>, CpSotw) {
    let mut client = connect_tcp(&agent.listen).await;
    let envoy = open_sotw(&mut client, &[]).await;
    std::mem::forget(client);
    envoy.send(ack(names, "", ""));
    let mut up = cp.next_sotw().await;
    up.recv().await;
    (envoy, up)
}

/// A SotW ECDS response.
pub fn ecds_resp(
    version: &str,
    nonce: &str,
    resources: Vec<envoy_types::pb::google::protobuf::Any>,
) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        nonce: nonce.into(),
        type_url: super::res::ECDS.into(),
        resources,
        ..Default::default()
    }
}

/// A SotW ECDS request (an ACK, or with empty nonce the first request).
pub fn ack(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: super::res::ECDS.into(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}
