//! The fetch hints istiod passes in the Wasm VM's environment (`ISTIO_META_WASM_*`), read and
//! then removed so they never reach Envoy (the pull secret above all). As Istio's agent does
//! (`pkg/wasm/convert.go`), **every** `ISTIO_META_*` key is removed from `key_values`; other
//! user variables stay.

use envoy_types::pb::envoy::extensions::wasm::v3::VmConfig;

use crate::wasm::PullPolicy;

pub const PULL_SECRET: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
pub const PULL_POLICY: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
pub const RESOURCE_VERSION: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";

/// The prefix of the keys Istio's agent strips from a Wasm VM's environment.
pub const ISTIO_META_PREFIX: &str = "ISTIO_META_";

/// What the environment told the agent about fetching.
#[derive(Default, Clone)]
pub struct FetchHints {
    /// `Some("")` means istiod wanted a secret and could not provide one.
    pub pull_secret: Option<String>,
    pub pull_policy: PullPolicy,
    pub resource_version: String,
}

impl std::fmt::Debug for FetchHints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchHints")
            .field(
                "pull_secret",
                &self.pull_secret.as_ref().map(|s| {
                    if s.is_empty() {
                        "<empty>"
                    } else {
                        "<redacted>"
                    }
                }),
            )
            .field("pull_policy", &self.pull_policy)
            .field("resource_version", &self.resource_version)
            .finish()
    }
}

/// Removes the three hint variables (and every other `ISTIO_META_*` key) from `vm` and returns
/// the hints. Drops the environment block when nothing is left in it.
pub fn take_hints(vm: &mut VmConfig) -> FetchHints {
    let Some(env) = vm.environment_variables.as_mut() else {
        return FetchHints::default();
    };
    let hints = FetchHints {
        pull_secret: env.key_values.remove(PULL_SECRET),
        pull_policy: env
            .key_values
            .remove(PULL_POLICY)
            .map(|p| PullPolicy::from_env(&p))
            .unwrap_or_default(),
        resource_version: env.key_values.remove(RESOURCE_VERSION).unwrap_or_default(),
    };
    env.key_values
        .retain(|k, _| !k.starts_with(ISTIO_META_PREFIX));
    if env.key_values.is_empty() && env.host_env_keys.is_empty() {
        vm.environment_variables = None;
    }
    hints
}
