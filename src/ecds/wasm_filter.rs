//! Recognising a Wasm filter inside an ECDS `typed_config`: native HTTP or network
//! `envoy.extensions.filters.*.wasm.v3.Wasm`, or either wrapped in `udpa.type.v1.TypedStruct`
//! / `xds.type.v3.TypedStruct` (decoded strictly: an unknown field is an error, as in Istio).
//! After conversion the filter is always re-encoded as the native typed message.

use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm as NetworkWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{plugin_config, PluginConfig, VmConfig};
use envoy_types::pb::google::protobuf::{Any, Struct};
use prost::Message;

use super::typed_struct;
use crate::proto::{type_url, udpa_type_v1, xds_type_v3};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    Http,
    Network,
}

/// A decoded Wasm filter.
#[derive(Debug, Clone, PartialEq)]
pub struct WasmFilter {
    pub kind: FilterKind,
    pub config: PluginConfig,
}

impl WasmFilter {
    pub fn vm_config(&self) -> Option<&VmConfig> {
        match &self.config.vm {
            Some(plugin_config::Vm::VmConfig(vm)) => Some(vm),
            None => None,
        }
    }

    pub fn vm_config_mut(&mut self) -> Option<&mut VmConfig> {
        match &mut self.config.vm {
            Some(plugin_config::Vm::VmConfig(vm)) => Some(vm),
            None => None,
        }
    }

    /// Native typed `Any` of this filter.
    pub fn encode(&self) -> Any {
        let config = Some(self.config.clone());
        match self.kind {
            FilterKind::Http => Any {
                type_url: type_url::HTTP_WASM.into(),
                value: HttpWasm { config }.encode_to_vec(),
            },
            FilterKind::Network => Any {
                type_url: type_url::NETWORK_WASM.into(),
                value: NetworkWasm { config }.encode_to_vec(),
            },
        }
    }

    /// Istio's rule: `failure_policy` when set, else the deprecated `fail_open`.
    #[allow(deprecated)] // `fail_open` is still sent by Istio ≤ 1.28
    pub fn fail_open(&self) -> bool {
        use envoy_types::pb::envoy::extensions::wasm::v3::FailurePolicy;
        match FailurePolicy::try_from(self.config.failure_policy) {
            Ok(FailurePolicy::Unspecified) | Err(_) => self.config.fail_open,
            Ok(p) => p == FailurePolicy::FailOpen,
        }
    }
}

/// Decodes `typed_config`: `Ok(None)` when it is not a Wasm filter (pass through).
pub fn classify(typed_config: &Any) -> Result<Option<WasmFilter>, String> {
    let native = |kind, config: Option<PluginConfig>| {
        Ok(Some(WasmFilter {
            kind,
            config: config.unwrap_or_default(),
        }))
    };
    match typed_config.type_url.as_str() {
        type_url::HTTP_WASM => {
            let w = HttpWasm::decode(typed_config.value.as_slice())
                .map_err(|e| format!("cannot decode {}: {e}", type_url::HTTP_WASM))?;
            native(FilterKind::Http, w.config)
        }
        type_url::NETWORK_WASM => {
            let w = NetworkWasm::decode(typed_config.value.as_slice())
                .map_err(|e| format!("cannot decode {}: {e}", type_url::NETWORK_WASM))?;
            native(FilterKind::Network, w.config)
        }
        t @ (type_url::UDPA_TYPED_STRUCT | type_url::XDS_TYPED_STRUCT) => {
            let (inner_type, value) = if t == type_url::UDPA_TYPED_STRUCT {
                let ts = udpa_type_v1::TypedStruct::decode(typed_config.value.as_slice())
                    .map_err(|e| format!("cannot decode {t}: {e}"))?;
                (ts.type_url, ts.value)
            } else {
                let ts = xds_type_v3::TypedStruct::decode(typed_config.value.as_slice())
                    .map_err(|e| format!("cannot decode {t}: {e}"))?;
                (ts.type_url, ts.value)
            };
            let kind = match inner_type.as_str() {
                type_url::HTTP_WASM => FilterKind::Http,
                type_url::NETWORK_WASM => FilterKind::Network,
                _ => return Ok(None),
            };
            let config = typed_struct::wasm_config(&value.unwrap_or_else(Struct::default))
                .map_err(|e| format!("TypedStruct of {inner_type}: {e}"))?;
            Ok(Some(WasmFilter { kind, config }))
        }
        _ => Ok(None),
    }
}
