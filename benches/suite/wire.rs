//! The benchmark's own ADS control plane, run as a separate process (`ECDS_BENCH_ROLE=cp`).
//!
//! It answers from pre-encoded bytes, so its own cost is a memcpy: what is measured is the
//! path between it and the Envoy-side client, with or without the agent in between.
//!
//! Behaviour, per stream (SotW and Delta alike):
//! * a CDS request is answered with one response of `--clusters` clusters (every request,
//!   ACKs included, so a client loop of request → response → ACK measures round trips);
//! * a request whose first resource name is `burst:K` (CDS or EDS) is answered with K
//!   responses back to back; the ACKs that follow are not answered.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use prost::{Message, Name};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Encodes pre-encoded bytes as they are; decodes requests with prost.
pub struct RawCodec<D>(std::marker::PhantomData<D>);
impl<D> Default for RawCodec<D> {
    fn default() -> Self {
        RawCodec(std::marker::PhantomData)
    }
}
pub struct RawEncoder;
pub struct ProstDecoder<D>(std::marker::PhantomData<D>);

impl<D: Message + Default + Send + 'static> Codec for RawCodec<D> {
    type Encode = Bytes;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<D>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<D> {
        ProstDecoder(std::marker::PhantomData)
    }
}
impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl<D: Message + Default> Decoder for ProstDecoder<D> {
    type Item = D;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A realistic EDS-style cluster: name, type, timeout, an inline load assignment.
pub fn cluster(i: usize) -> Cluster {
    let name = format!("outbound|8080||svc-{i:05}.bench-ns.svc.cluster.local");
    Cluster {
        name: name.clone(),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 10,
            nanos: 0,
        }),
        load_assignment: Some(load_assignment(&name, i)),
        ..Default::default()
    }
}

fn load_assignment(name: &str, i: usize) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: (0..2)
                .map(|k| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: format!("10.{}.{}.{}", (i >> 8) & 255, i & 255, k + 1),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    8080,
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// A response body without version and nonce (fields 1 and 5, appended per send: protobuf
/// lets a field come after the ones with higher numbers).
struct Body {
    sotw: Bytes,
    delta: Bytes,
}

impl Body {
    fn new(type_url: &str, resources: Vec<(String, Any)>) -> Body {
        let sotw = DiscoveryResponse {
            type_url: type_url.into(),
            resources: resources.iter().map(|(_, a)| a.clone()).collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let delta = DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources: resources
                .into_iter()
                .map(|(name, a)| Resource {
                    name,
                    version: "1".into(),
                    resource: Some(a),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        Body {
            sotw: sotw.into(),
            delta: delta.into(),
        }
    }

    fn stamped(&self, delta: bool, n: u64) -> Bytes {
        let base = if delta { &self.delta } else { &self.sotw };
        let v = n.to_string();
        let mut b = BytesMut::with_capacity(base.len() + 2 * v.len() + 8);
        b.put_slice(base);
        for field in [1u32, 5] {
            prost::encoding::string::encode(field, &v, &mut b);
        }
        b.freeze()
    }
}

pub struct Plane {
    cds: Body,
    eds: Body,
    nonce: AtomicU64,
}

impl Plane {
    pub fn new(clusters: usize) -> Plane {
        let cds = (0..clusters)
            .map(|i| {
                let c = cluster(i);
                (c.name.clone(), any(&c))
            })
            .collect();
        let cla = load_assignment("outbound|8080||svc-00000.bench-ns.svc.cluster.local", 0);
        Plane {
            cds: Body::new(CDS, cds),
            eds: Body::new(EDS, vec![(cla.cluster_name.clone(), any(&cla))]),
            nonce: AtomicU64::new(0),
        }
    }

    /// What to send for one request: (body, how many times).
    fn answer(&self, type_url: &str, first_name: Option<&str>, is_ack: bool) -> (&Body, u64) {
        let body = if type_url == EDS {
            &self.eds
        } else {
            &self.cds
        };
        match first_name.and_then(|n| n.strip_prefix("burst:")) {
            Some(k) if !is_ack => (body, k.parse().unwrap_or(1)),
            Some(_) => (body, 0),
            None if type_url == CDS => (body, 1),
            None => (body, 0),
        }
    }

    /// Serves one stream: `reqs` in, pre-encoded responses out.
    fn serve<R>(self: Arc<Self>, mut reqs: tonic::Streaming<R>, delta: bool, f: Peek<R>) -> Out
    where
        R: Message + Default + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Status>>(16);
        tokio::spawn(async move {
            while let Ok(Some(r)) = reqs.message().await {
                let (type_url, first, is_ack) = f(&r);
                let (body, times) = self.answer(&type_url, first.as_deref(), is_ack);
                for _ in 0..times {
                    let n = self.nonce.fetch_add(1, Ordering::Relaxed) + 1;
                    if tx.send(Ok(body.stamped(delta, n))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// The ADS service over [`RawCodec`], for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct RawAds(pub Arc<Plane>);

impl tonic::server::NamedService for RawAds {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

type BoxFut<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What [`Plane::serve`] needs of a request: type URL, first resource name, whether it is an
/// ACK/NACK (has a response nonce).
type Peek<R> = fn(&R) -> (String, Option<String>, bool);

/// One ADS method (SotW or Delta) over the plane.
struct Method<R> {
    plane: Arc<Plane>,
    delta: bool,
    peek: Peek<R>,
}

impl<R: Message + Default + Send + 'static> tower::Service<tonic::Request<tonic::Streaming<R>>>
    for Method<R>
{
    type Response = tonic::Response<Out>;
    type Error = Status;
    type Future = BoxFut<Result<Self::Response, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: tonic::Request<tonic::Streaming<R>>) -> Self::Future {
        let out = self
            .plane
            .clone()
            .serve(req.into_inner(), self.delta, self.peek);
        Box::pin(async move { Ok(tonic::Response::new(out)) })
    }
}

impl<B> tower::Service<http::Request<B>> for RawAds
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFut<Result<Self::Response, Self::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let plane = self.0.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            Ok(if path.ends_with("/DeltaAggregatedResources") {
                tonic::server::Grpc::new(RawCodec::<DeltaDiscoveryRequest>::default())
                    .streaming(
                        Method {
                            plane,
                            delta: true,
                            peek: |r: &DeltaDiscoveryRequest| {
                                (
                                    r.type_url.clone(),
                                    r.resource_names_subscribe.first().cloned(),
                                    !r.response_nonce.is_empty(),
                                )
                            },
                        },
                        req,
                    )
                    .await
            } else {
                tonic::server::Grpc::new(RawCodec::<DiscoveryRequest>::default())
                    .streaming(
                        Method {
                            plane,
                            delta: false,
                            peek: |r: &DiscoveryRequest| {
                                (
                                    r.type_url.clone(),
                                    r.resource_names.first().cloned(),
                                    !r.response_nonce.is_empty(),
                                )
                            },
                        },
                        req,
                    )
                    .await
            })
        })
    }
}

/// `ECDS_BENCH_ROLE=cp`: serve on 127.0.0.1:`ECDS_BENCH_PORT` until killed.
pub fn run_cp() {
    let clusters = std::env::var("ECDS_BENCH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let port: u16 = std::env::var("ECDS_BENCH_PORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("ECDS_BENCH_PORT");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let plane = Arc::new(Plane::new(clusters));
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        println!("ready");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        let incoming = futures::StreamExt::map(incoming, |c| {
            if let Ok(s) = &c {
                let _ = s.set_nodelay(true);
            }
            c
        });
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .add_service(RawAds(plane))
            .serve_with_incoming(incoming)
            .await
            .expect("serve");
    });
}
