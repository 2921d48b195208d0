//! The two ADS variants — State-of-the-World and Delta — behind one trait, so the stream loop
//! and the ECDS session are written once. Everything protocol-specific lives here: which field
//! is the nonce, how a NACK is shaped, how resources are taken out of and put back into a
//! response, how the agent shapes a response it originates.

use std::future::Future;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Status, Streaming};

use super::book::NonceBook;
use super::upstream::AdsClient;
use crate::proto::type_url;

/// gRPC code INTERNAL, as Istio's agent uses in its NACKs.
const CODE_INTERNAL: i32 = 13;

/// One resource of a response as it travels through conversion: the payload plus, for Delta,
/// the envelope (`name`, `version`, `aliases`, `ttl`, …) with its `resource` taken out.
#[derive(Debug, Clone)]
pub struct Carried {
    pub any: Any,
    pub envelope: Option<Resource>,
}

pub trait Flavor: Send + Sync + 'static {
    type Req: prost::Message + Clone + Default + Send + 'static;
    type Resp: prost::Message + Clone + Default + Send + 'static;
    /// "sotw" or "delta", for logs and labels.
    const NAME: &'static str;

    /// Opens the upstream stream of the same kind.
    fn open(
        client: &mut AdsClient,
        req: Request<UnboundedReceiverStream<Self::Req>>,
    ) -> impl Future<Output = Result<Streaming<Self::Resp>, Status>> + Send;

    fn req_type_url(r: &Self::Req) -> &str;
    fn req_nonce(r: &Self::Req) -> &str;
    /// Envoy's rejection message, when the request is a NACK.
    fn req_error(r: &Self::Req) -> Option<&str>;
    /// Records what an Envoy request says about its ECDS state (version, subscription).
    fn note_request(r: &Self::Req, book: &mut NonceBook);
    /// Whether a request the agent would swallow also changes the subscription
    /// (then it must still go upstream, stripped of its reply part).
    fn changes_subscription(r: &Self::Req, book: &NonceBook) -> bool;
    /// The request with its reply part (nonce, error) removed: a pure subscription message.
    fn subscription_only(r: Self::Req) -> Self::Req;

    fn resp_type_url(r: &Self::Resp) -> &str;
    fn resp_nonce(r: &Self::Resp) -> &str;
    fn resp_version(r: &Self::Resp) -> &str;
    fn take_resources(r: &mut Self::Resp) -> Vec<Carried>;
    fn set_resources(r: &mut Self::Resp, items: Vec<Carried>);
    /// Names the response removes (Delta only).
    fn removed(r: &Self::Resp) -> &[String];

    /// The NACK for `nonce`, carrying `message` with code INTERNAL.
    fn nack(type_url: &str, nonce: &str, book: &NonceBook, message: String) -> Self::Req;
    /// A response the agent sends on its own (a module delivered by background retry).
    fn originate(type_url: &str, version: &str, nonce: String, item: Carried) -> Self::Resp;
}

fn error_detail(message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: CODE_INTERNAL,
        message,
        details: vec![],
    })
}

/// State-of-the-World ADS (`StreamAggregatedResources`).
pub struct Sotw;

impl Flavor for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    async fn open(
        client: &mut AdsClient,
        req: Request<UnboundedReceiverStream<Self::Req>>,
    ) -> Result<Streaming<Self::Resp>, Status> {
        client
            .stream_aggregated_resources(req)
            .await
            .map(|r| r.into_inner())
    }

    fn req_type_url(r: &Self::Req) -> &str {
        &r.type_url
    }
    fn req_nonce(r: &Self::Req) -> &str {
        &r.response_nonce
    }
    fn req_error(r: &Self::Req) -> Option<&str> {
        r.error_detail.as_ref().map(|e| e.message.as_str())
    }
    fn note_request(r: &Self::Req, book: &mut NonceBook) {
        if r.type_url != type_url::ECDS {
            return;
        }
        if !r.version_info.is_empty() {
            book.ecds_version = r.version_info.clone();
        }
        book.ecds_names = r.resource_names.clone();
    }
    fn changes_subscription(r: &Self::Req, book: &NonceBook) -> bool {
        r.resource_names != book.forwarded_ecds_names
    }
    fn subscription_only(mut r: Self::Req) -> Self::Req {
        r.response_nonce.clear();
        r.error_detail = None;
        r
    }

    fn resp_type_url(r: &Self::Resp) -> &str {
        &r.type_url
    }
    fn resp_nonce(r: &Self::Resp) -> &str {
        &r.nonce
    }
    fn resp_version(r: &Self::Resp) -> &str {
        &r.version_info
    }
    fn take_resources(r: &mut Self::Resp) -> Vec<Carried> {
        std::mem::take(&mut r.resources)
            .into_iter()
            .map(|any| Carried {
                any,
                envelope: None,
            })
            .collect()
    }
    fn set_resources(r: &mut Self::Resp, items: Vec<Carried>) {
        r.resources = items.into_iter().map(|c| c.any).collect();
    }
    fn removed(_: &Self::Resp) -> &[String] {
        &[]
    }

    fn nack(type_url: &str, nonce: &str, book: &NonceBook, message: String) -> Self::Req {
        DiscoveryRequest {
            version_info: book.ecds_version.clone(),
            resource_names: book.ecds_names.clone(),
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error_detail(message),
            ..Default::default()
        }
    }
    fn originate(type_url: &str, version: &str, nonce: String, item: Carried) -> Self::Resp {
        DiscoveryResponse {
            version_info: version.to_owned(),
            resources: vec![item.any],
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        }
    }
}

/// Incremental ADS (`DeltaAggregatedResources`).
pub struct Delta;

impl Flavor for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    async fn open(
        client: &mut AdsClient,
        req: Request<UnboundedReceiverStream<Self::Req>>,
    ) -> Result<Streaming<Self::Resp>, Status> {
        client
            .delta_aggregated_resources(req)
            .await
            .map(|r| r.into_inner())
    }

    fn req_type_url(r: &Self::Req) -> &str {
        &r.type_url
    }
    fn req_nonce(r: &Self::Req) -> &str {
        &r.response_nonce
    }
    fn req_error(r: &Self::Req) -> Option<&str> {
        r.error_detail.as_ref().map(|e| e.message.as_str())
    }
    fn note_request(_: &Self::Req, _: &mut NonceBook) {}
    fn changes_subscription(r: &Self::Req, _: &NonceBook) -> bool {
        !r.resource_names_subscribe.is_empty() || !r.resource_names_unsubscribe.is_empty()
    }
    fn subscription_only(mut r: Self::Req) -> Self::Req {
        r.response_nonce.clear();
        r.error_detail = None;
        r
    }

    fn resp_type_url(r: &Self::Resp) -> &str {
        &r.type_url
    }
    fn resp_nonce(r: &Self::Resp) -> &str {
        &r.nonce
    }
    fn resp_version(r: &Self::Resp) -> &str {
        &r.system_version_info
    }
    fn take_resources(r: &mut Self::Resp) -> Vec<Carried> {
        std::mem::take(&mut r.resources)
            .into_iter()
            .map(|mut res| Carried {
                any: res.resource.take().unwrap_or_default(),
                envelope: Some(res),
            })
            .collect()
    }
    fn set_resources(r: &mut Self::Resp, items: Vec<Carried>) {
        r.resources = items
            .into_iter()
            .map(|c| {
                let mut res = c.envelope.unwrap_or_default();
                res.resource = Some(c.any);
                res
            })
            .collect();
    }
    fn removed(r: &Self::Resp) -> &[String] {
        &r.removed_resources
    }

    fn nack(type_url: &str, nonce: &str, _: &NonceBook, message: String) -> Self::Req {
        // Empty subscribe/unsubscribe lists mean "subscription unchanged" in Delta.
        DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error_detail(message),
            ..Default::default()
        }
    }
    fn originate(type_url: &str, version: &str, nonce: String, item: Carried) -> Self::Resp {
        let mut res = item.envelope.unwrap_or_default();
        res.resource = Some(item.any);
        DeltaDiscoveryResponse {
            system_version_info: version.to_owned(),
            resources: vec![res],
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        }
    }
}
