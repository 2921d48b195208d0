//! Stand-ins for a Wasm filter whose module cannot be had: an RBAC filter of the same name, so
//! listeners waiting on ECDS never hang. Fail-open → allow-all; otherwise deny-all. The shapes
//! and stat prefixes are Istio 1.28's, so dashboards built on them keep working.

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::config::rbac::v3::Rbac as RbacRules;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::wasm_filter::FilterKind;
use crate::proto::type_url;

pub const ALLOW_PREFIX: &str = "wasm-default-allow";
pub const DENY_PREFIX: &str = "wasm-default-deny";

/// The RBAC typed config standing in for a filter of `kind`.
pub fn rbac(kind: FilterKind, fail_open: bool) -> Any {
    // `rules: None` enforces nothing (allow all); `rules: {}` allows nothing (deny all).
    let rules = if fail_open {
        None
    } else {
        Some(RbacRules::default())
    };
    let prefix = if fail_open { ALLOW_PREFIX } else { DENY_PREFIX };
    match kind {
        FilterKind::Http => Any {
            type_url: type_url::HTTP_RBAC.into(),
            value: HttpRbac {
                rules,
                rules_stat_prefix: prefix.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        },
        FilterKind::Network => Any {
            type_url: type_url::NETWORK_RBAC.into(),
            value: NetworkRbac {
                rules,
                stat_prefix: prefix.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        },
    }
}

/// The whole ECDS resource: a TypedExtensionConfig named `name` holding the RBAC stand-in.
pub fn resource(name: &str, kind: FilterKind, fail_open: bool) -> Any {
    Any {
        type_url: type_url::ECDS.into(),
        value: TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(rbac(kind, fail_open)),
        }
        .encode_to_vec(),
    }
}
