//! A small ADS server (SotW + Delta) over a versioned snapshot of resources, pushing changes
//! to every stream that asked for the changed type. It prints each exchange so a demo shows
//! what flows between it, the agent and Envoy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Resources of one type, with a version that changes whenever they do.
#[derive(Debug, Clone, Default)]
pub struct TypeState {
    pub version: u64,
    pub resources: BTreeMap<String, Any>,
}

pub type Snapshot = HashMap<String, TypeState>;

/// Short names for logs.
pub fn short(type_url: &str) -> &str {
    match type_url.rsplit('.').next().unwrap_or(type_url) {
        "Listener" => "LDS",
        "Cluster" => "CDS",
        "TypedExtensionConfig" => "ECDS",
        "RouteConfiguration" => "RDS",
        "ClusterLoadAssignment" => "EDS",
        other => other,
    }
}

#[derive(Clone)]
pub struct DemoControlPlane {
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for DemoControlPlane {
    fn default() -> Self {
        Self::new()
    }
}

impl DemoControlPlane {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::new()));
        Self {
            snapshot: Arc::new(tx),
        }
    }

    /// Replaces the resources of `type_url`; bumps its version when they changed.
    pub fn set(&self, type_url: &str, resources: BTreeMap<String, Any>) {
        self.snapshot.send_if_modified(|snap| {
            let current = snap.get(type_url);
            if current.is_some_and(|t| t.resources == resources) {
                return false;
            }
            let version = current.map_or(1, |t| t.version + 1);
            let mut next = (**snap).clone();
            next.insert(type_url.to_owned(), TypeState { version, resources });
            *snap = Arc::new(next);
            true
        });
    }

    pub fn service(&self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }
}

#[derive(Default)]
struct SotwSub {
    names: Vec<String>,
    sent: Option<u64>,
}

fn sotw_response(
    snap: &Snapshot,
    type_url: &str,
    sub: &mut SotwSub,
    nonce: &mut u64,
) -> Option<DiscoveryResponse> {
    let state = snap.get(type_url)?;
    if sub.sent == Some(state.version) {
        return None;
    }
    sub.sent = Some(state.version);
    *nonce += 1;
    let resources: Vec<(&String, &Any)> = state
        .resources
        .iter()
        .filter(|(n, _)| sub.names.is_empty() || sub.names.contains(n))
        .collect();
    println!(
        "[control-plane] → {} v{} nonce {}: {:?}",
        short(type_url),
        state.version,
        nonce,
        resources
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
    );
    Some(DiscoveryResponse {
        version_info: state.version.to_string(),
        resources: resources.into_iter().map(|(_, a)| a.clone()).collect(),
        type_url: type_url.to_owned(),
        nonce: nonce.to_string(),
        ..Default::default()
    })
}

fn log_reply(kind: &str, type_url: &str, nonce: &str, error: Option<&str>) {
    if nonce.is_empty() {
        return;
    }
    match error {
        Some(e) => println!(
            "[control-plane] ← {kind} NACK {} nonce {nonce}: {e}",
            short(type_url)
        ),
        None => println!(
            "[control-plane] ← {kind} ACK {} nonce {nonce}",
            short(type_url)
        ),
    }
}

/// Applies a SotW request to the stream's subscriptions; returns its type.
fn sotw_subscribe(subs: &mut HashMap<String, SotwSub>, req: DiscoveryRequest) -> String {
    log_reply(
        "sotw",
        &req.type_url,
        &req.response_nonce,
        req.error_detail.as_ref().map(|e| e.message.as_str()),
    );
    let sub = subs.entry(req.type_url.clone()).or_default();
    if req.response_nonce.is_empty() || sub.names != req.resource_names {
        sub.sent = None; // a new stream or a new subscription: send again
    }
    sub.names = req.resource_names;
    req.type_url
}

/// One stream: requests update the subscriptions, snapshot changes push to subscribers.
async fn drive<Req, Resp, Sub: Default>(
    mut snap: watch::Receiver<Arc<Snapshot>>,
    mut inbound: Streaming<Req>,
    tx: mpsc::Sender<Result<Resp, Status>>,
    subscribe: fn(&mut HashMap<String, Sub>, Req) -> String,
    respond: fn(&Snapshot, &str, &mut Sub, &mut u64) -> Option<Resp>,
) {
    let mut subs: HashMap<String, Sub> = HashMap::new();
    let mut nonce = 0u64;
    loop {
        let mut out = Vec::new();
        tokio::select! {
            m = inbound.message() => {
                let Ok(Some(req)) = m else { return };
                let t = subscribe(&mut subs, req);
                let s = snap.borrow().clone();
                if let Some(sub) = subs.get_mut(&t) {
                    out.extend(respond(&s, &t, sub, &mut nonce));
                }
            }
            r = snap.changed() => {
                if r.is_err() { return; }
                let s = snap.borrow_and_update().clone();
                for (t, sub) in subs.iter_mut() {
                    out.extend(respond(&s, t, sub, &mut nonce));
                }
            }
        }
        for r in out {
            if tx.send(Ok(r)).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: HashSet<String>,
    sent: HashMap<String, u64>,
}

fn delta_response(
    snap: &Snapshot,
    type_url: &str,
    sub: &mut DeltaSub,
    nonce: &mut u64,
) -> Option<DeltaDiscoveryResponse> {
    let state = snap.get(type_url).cloned().unwrap_or_default();
    let mut resources = Vec::new();
    for (name, any) in &state.resources {
        if (sub.wildcard || sub.names.contains(name)) && sub.sent.get(name) != Some(&state.version)
        {
            sub.sent.insert(name.clone(), state.version);
            resources.push(Resource {
                name: name.clone(),
                version: state.version.to_string(),
                resource: Some(any.clone()),
                ..Default::default()
            });
        }
    }
    let removed: Vec<String> = sub
        .sent
        .keys()
        .filter(|n| !state.resources.contains_key(*n))
        .cloned()
        .collect();
    for n in &removed {
        sub.sent.remove(n);
    }
    if resources.is_empty() && removed.is_empty() {
        return None;
    }
    *nonce += 1;
    println!(
        "[control-plane] → {} (delta) v{} nonce {}: {:?}",
        short(type_url),
        state.version,
        nonce,
        resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
    );
    Some(DeltaDiscoveryResponse {
        system_version_info: state.version.to_string(),
        resources,
        type_url: type_url.to_owned(),
        removed_resources: removed,
        nonce: nonce.to_string(),
        ..Default::default()
    })
}

/// Applies a Delta request to the stream's subscriptions; returns its type.
fn delta_subscribe(subs: &mut HashMap<String, DeltaSub>, req: DeltaDiscoveryRequest) -> String {
    log_reply(
        "delta",
        &req.type_url,
        &req.response_nonce,
        req.error_detail.as_ref().map(|e| e.message.as_str()),
    );
    let first = !subs.contains_key(&req.type_url);
    let sub = subs.entry(req.type_url.clone()).or_default();
    if first && req.resource_names_subscribe.is_empty() {
        sub.wildcard = true;
    }
    for n in req.resource_names_subscribe {
        if n == "*" {
            sub.wildcard = true;
        } else {
            sub.names.insert(n);
        }
    }
    for n in &req.resource_names_unsubscribe {
        sub.names.remove(n);
        sub.sent.remove(n);
    }
    req.type_url
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for DemoControlPlane {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        println!("[control-plane] SotW stream opened");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(drive(
            self.snapshot.subscribe(),
            req.into_inner(),
            tx,
            sotw_subscribe,
            sotw_response,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        println!("[control-plane] Delta stream opened");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(drive(
            self.snapshot.subscribe(),
            req.into_inner(),
            tx,
            delta_subscribe,
            delta_response,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
