//! The two ADS variants — State-of-the-World and Delta — behind one trait, so the stream loop
//! and the ECDS session are written once. Everything protocol-specific lives here: which field
//! is the nonce, how a NACK is shaped, how resources are taken out of and put back into a
//! response, how the agent shapes a response it originates.

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;

use crate::proto::type_url;

/// gRPC code INTERNAL, as Istio's agent uses in its NACKs.
const CODE_INTERNAL: i32 = 13;

/// One resource of a response as it travels through conversion: the payload plus its
/// envelope (`name`, `version`, `aliases`, `ttl`, …) with the body taken out — always in Delta,
/// and in SotW when the control plane wrapped it in a `Resource` (TTL).
#[derive(Debug, Clone)]
pub struct Carried {
    /// The resource; `None` for a TTL heartbeat (an envelope without a body), which goes to
    /// Envoy untouched.
    pub any: Option<Any>,
    pub envelope: Option<Resource>,
}

impl Carried {
    /// Delta: the envelope with the body put back.
    fn into_resource(self) -> Resource {
        let mut res = self.envelope.unwrap_or_default();
        res.resource = self.any;
        res
    }

    /// SotW: the body, re-wrapped in its `Resource` if it came in one.
    fn into_sotw_any(self) -> Any {
        match self.envelope {
            None => self.any.unwrap_or_default(),
            Some(mut res) => {
                res.resource = self.any;
                Any {
                    type_url: type_url::RESOURCE.into(),
                    value: res.encode_to_vec(),
                }
            }
        }
    }

    /// SotW: unwraps a `Resource` wrapper; anything else is carried as it is.
    fn from_sotw_any(any: Any) -> Self {
        if any.type_url == type_url::RESOURCE {
            if let Ok(mut res) = Resource::decode(any.value.as_slice()) {
                return Carried {
                    any: res.resource.take(),
                    envelope: Some(res),
                };
            }
        }
        Carried {
            any: Some(any),
            envelope: None,
        }
    }
}

pub trait Flavor: Send + Sync + 'static {
    type Req: prost::Message + Clone + Default + Send + Unpin + 'static;
    type Resp: prost::Message + Clone + Default + Send + Unpin + 'static;
    /// "sotw" or "delta", for logs and labels.
    const NAME: &'static str;

    /// The gRPC method path of this kind of stream.
    const PATH: &'static str;
    /// The response shape, for the early look at large responses.
    const SHAPE: super::wire::Shape;

    fn req_type_url(r: &Self::Req) -> &str;
    fn req_nonce(r: &Self::Req) -> &str;
    /// Envoy's rejection message, when the request is a NACK.
    fn req_error(r: &Self::Req) -> Option<&str>;
    /// SotW only: the version Envoy reports and the names it subscribes to.
    fn sotw_state(r: &Self::Req) -> Option<(&str, &[String])>;
    /// Whether a request the agent would swallow changes the subscription the control plane
    /// knows (`known`: SotW names; Delta requests carry changes themselves).
    fn changes_subscription(r: &Self::Req, known: Option<&[String]>) -> bool;
    /// The reply part of a request: its response nonce and error.
    fn reply_part(r: &mut Self::Req) -> (&mut String, &mut Option<RpcStatus>);
    /// The request with its reply part (nonce, error) removed: a pure subscription message.
    fn subscription_only(r: Self::Req) -> Self::Req {
        Self::readdress(r, "", false)
    }
    /// The request as a reply to `nonce`, with Envoy's error kept only if `keep_error`.
    fn readdress(mut r: Self::Req, nonce: &str, keep_error: bool) -> Self::Req {
        let (n, error) = Self::reply_part(&mut r);
        *n = nonce.to_owned();
        if !keep_error {
            *error = None;
        }
        r
    }
    /// Names a Delta request unsubscribes from (SotW: none; the book compares name lists).
    fn unsubscribed(r: &Self::Req) -> &[String];
    /// Drops the resource versions Envoy says it holds (SotW `version_info`, Delta
    /// `initial_resource_versions`), so the control plane sends everything again.
    fn forget_versions(r: &mut Self::Req);
    /// Whether a stream's first request says Envoy holds resources of its type already.
    fn carries_versions(r: &Self::Req) -> bool;

    fn resp_type_url(r: &Self::Resp) -> &str;
    fn resp_nonce(r: &Self::Resp) -> &str;
    fn resp_version(r: &Self::Resp) -> &str;
    fn take_resources(r: &mut Self::Resp) -> Vec<Carried>;
    fn set_resources(r: &mut Self::Resp, items: Vec<Carried>);
    /// Names the response removes (Delta only).
    fn removed(r: &Self::Resp) -> &[String];
    /// Every resource name a response sets or removes (what a newer push must cover to make
    /// it obsolete).
    fn resp_names(r: &Self::Resp) -> Vec<String>;

    /// The NACK for `nonce`, carrying `message` with code INTERNAL; SotW NACKs repeat the
    /// version Envoy accepted last and its subscription.
    fn nack(
        type_url: &str,
        nonce: &str,
        version: &str,
        names: &[String],
        message: String,
    ) -> Self::Req;
    /// A response the agent sends on its own (a module delivered by background retry).
    fn originate(type_url: &str, version: &str, nonce: String, item: Carried) -> Self::Resp;
    /// Starts `i`'s interception of a stream of this flavor.
    fn intercept(
        i: &dyn super::Interceptor,
        h: super::StreamHandles<Self>,
    ) -> super::Intercepted<Self>
    where
        Self: Sized;
}

fn error_detail(message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: CODE_INTERNAL,
        message,
        details: vec![],
    })
}

/// The name of a SotW ECDS resource (bare or in a `Resource` wrapper); empty if it has none.
fn sotw_name(any: &Any) -> String {
    let tec = |bytes: &[u8]| {
        TypedExtensionConfig::decode(bytes)
            .map(|t| t.name)
            .unwrap_or_default()
    };
    if any.type_url != type_url::RESOURCE {
        return tec(&any.value);
    }
    match Resource::decode(any.value.as_slice()) {
        Ok(r) if !r.name.is_empty() => r.name,
        Ok(r) => r.resource.map(|b| tec(&b.value)).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// State-of-the-World ADS (`StreamAggregatedResources`).
pub struct Sotw;

impl Flavor for Sotw {
    fn intercept(
        i: &dyn super::Interceptor,
        h: super::StreamHandles<Self>,
    ) -> super::Intercepted<Self> {
        i.start_sotw(h)
    }
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    const SHAPE: super::wire::Shape = super::wire::Shape::Sotw;

    fn req_type_url(r: &Self::Req) -> &str {
        &r.type_url
    }
    fn req_nonce(r: &Self::Req) -> &str {
        &r.response_nonce
    }
    fn req_error(r: &Self::Req) -> Option<&str> {
        r.error_detail.as_ref().map(|e| e.message.as_str())
    }
    fn sotw_state(r: &Self::Req) -> Option<(&str, &[String])> {
        Some((&r.version_info, &r.resource_names))
    }
    fn changes_subscription(r: &Self::Req, known: Option<&[String]>) -> bool {
        known != Some(r.resource_names.as_slice())
    }
    fn reply_part(r: &mut Self::Req) -> (&mut String, &mut Option<RpcStatus>) {
        (&mut r.response_nonce, &mut r.error_detail)
    }
    fn unsubscribed(_: &Self::Req) -> &[String] {
        &[]
    }
    fn forget_versions(r: &mut Self::Req) {
        r.version_info.clear();
    }
    fn carries_versions(r: &Self::Req) -> bool {
        !r.version_info.is_empty()
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
            .map(Carried::from_sotw_any)
            .collect()
    }
    fn set_resources(r: &mut Self::Resp, items: Vec<Carried>) {
        r.resources = items.into_iter().map(Carried::into_sotw_any).collect();
    }
    fn removed(_: &Self::Resp) -> &[String] {
        &[]
    }
    fn resp_names(r: &Self::Resp) -> Vec<String> {
        r.resources.iter().map(sotw_name).collect()
    }

    fn nack(
        type_url: &str,
        nonce: &str,
        version: &str,
        names: &[String],
        message: String,
    ) -> Self::Req {
        DiscoveryRequest {
            version_info: version.to_owned(),
            resource_names: names.to_vec(),
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error_detail(message),
            ..Default::default()
        }
    }
    fn originate(type_url: &str, version: &str, nonce: String, item: Carried) -> Self::Resp {
        DiscoveryResponse {
            version_info: version.to_owned(),
            resources: vec![item.into_sotw_any()],
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        }
    }
}

/// Incremental ADS (`DeltaAggregatedResources`).
pub struct Delta;

impl Flavor for Delta {
    fn intercept(
        i: &dyn super::Interceptor,
        h: super::StreamHandles<Self>,
    ) -> super::Intercepted<Self> {
        i.start_delta(h)
    }
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
    const SHAPE: super::wire::Shape = super::wire::Shape::Delta;

    fn req_type_url(r: &Self::Req) -> &str {
        &r.type_url
    }
    fn req_nonce(r: &Self::Req) -> &str {
        &r.response_nonce
    }
    fn req_error(r: &Self::Req) -> Option<&str> {
        r.error_detail.as_ref().map(|e| e.message.as_str())
    }
    fn sotw_state(_: &Self::Req) -> Option<(&str, &[String])> {
        None
    }
    fn changes_subscription(r: &Self::Req, _: Option<&[String]>) -> bool {
        !r.resource_names_subscribe.is_empty() || !r.resource_names_unsubscribe.is_empty()
    }
    fn reply_part(r: &mut Self::Req) -> (&mut String, &mut Option<RpcStatus>) {
        (&mut r.response_nonce, &mut r.error_detail)
    }
    fn unsubscribed(r: &Self::Req) -> &[String] {
        &r.resource_names_unsubscribe
    }
    fn forget_versions(r: &mut Self::Req) {
        r.initial_resource_versions.clear();
    }
    fn carries_versions(r: &Self::Req) -> bool {
        !r.initial_resource_versions.is_empty()
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
                any: res.resource.take(),
                envelope: Some(res),
            })
            .collect()
    }
    fn set_resources(r: &mut Self::Resp, items: Vec<Carried>) {
        r.resources = items.into_iter().map(Carried::into_resource).collect();
    }
    fn removed(r: &Self::Resp) -> &[String] {
        &r.removed_resources
    }
    fn resp_names(r: &Self::Resp) -> Vec<String> {
        r.resources
            .iter()
            .map(|res| res.name.clone())
            .chain(r.removed_resources.iter().cloned())
            .collect()
    }

    fn nack(type_url: &str, nonce: &str, _: &str, _: &[String], message: String) -> Self::Req {
        // Empty subscribe/unsubscribe lists mean "subscription unchanged" in Delta.
        DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error_detail(message),
            ..Default::default()
        }
    }
    fn originate(type_url: &str, version: &str, nonce: String, item: Carried) -> Self::Resp {
        DeltaDiscoveryResponse {
            system_version_info: version.to_owned(),
            resources: vec![item.into_resource()],
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        }
    }
}
