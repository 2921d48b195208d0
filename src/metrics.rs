//! Every metric the agent exports, by name, in one place.
//!
//! Wasm metrics keep Istio's exact names (no `_total` suffix) so existing dashboards and alerts
//! work unchanged. This module owns the Prometheus recorder; other modules only call the small
//! recording helpers below and never format metric names themselves.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// ---- xDS proxy (Istio names)
pub const XDS_PROXY_REQUESTS: &str = "istio_agent_xds_proxy_requests";
pub const XDS_PROXY_RESPONSES: &str = "istio_agent_xds_proxy_responses";
pub const UPSTREAM_CONNECTION_FAILURES: &str = "istio_agent_istiod_connection_failures";
pub const UPSTREAM_TERMINATIONS: &str = "istio_agent_istiod_connection_terminations";
pub const ENVOY_TERMINATIONS: &str = "istio_agent_envoy_connection_terminations";
pub const ENVOY_STREAMS_ACTIVE: &str = "ecds_agent_envoy_streams_active";

// ---- Wasm cache and fetchers (Istio names)
pub const CACHE_LOOKUP_COUNT: &str = "istio_agent_wasm_cache_lookup_count";
pub const CACHE_ENTRIES: &str = "istio_agent_wasm_cache_entries";
pub const REMOTE_FETCH_COUNT: &str = "istio_agent_wasm_remote_fetch_count";
pub const REMOTE_FETCH_DURATION: &str = "istio_agent_wasm_remote_fetch_duration_seconds";
pub const REMOTE_FETCH_BYTES: &str = "istio_agent_wasm_remote_fetch_bytes";
pub const CACHE_BYTES: &str = "ecds_agent_wasm_cache_bytes";
pub const CACHE_EVICTIONS: &str = "ecds_agent_wasm_cache_evictions";

// ---- ECDS conversion (Istio names) and what the agent adds
pub const CONVERSION_COUNT: &str = "istio_agent_wasm_config_conversion_count";
pub const CONVERSION_DURATION: &str = "istio_agent_wasm_config_conversion_duration";
pub const NACKS_SENT: &str = "ecds_agent_nacks_sent";
/// Envoy's own NACKs of what the agent delivered (`reason`: converted, stand_in, healed).
pub const ENVOY_REJECTIONS: &str = "ecds_agent_envoy_rejections";
pub const ECDS_SUPERSEDED: &str = "ecds_agent_ecds_superseded";
/// Signature checks of OCI modules (`result`: verified, unsigned_allowed, failed).
pub const SIGNATURE_CHECKS: &str = "ecds_agent_wasm_signature_checks";
/// Checks that a requester may pull a cached private module (`result`: allowed, denied,
/// unreachable).
pub const PULL_AUTH_CHECKS: &str = "ecds_agent_wasm_pull_auth_checks";
/// Modules fetched, by the host that served them (`host`: a mirror or the origin).
pub const FETCHES_SERVED: &str = "ecds_agent_wasm_fetches_served";
/// Module requests of Envoy's own remote fetch answered by the agent (`result`: served from
/// the file, streamed while the agent downloads it, refused).
pub const MODULE_SERVES: &str = "ecds_agent_wasm_module_serves";
/// Modules handed to Envoy, by code source (`source`: file, inline, remote).
pub const DELIVERIES: &str = "ecds_agent_wasm_deliveries";
/// Modules delivered while downloading (streamed to Envoy) whose download then failed.
pub const LATE_FAILURES: &str = "ecds_agent_wasm_streamed_failures";
pub const HEAL_DELIVERIES: &str = "ecds_agent_wasm_heal_deliveries";
pub const HEAL_ATTEMPTS: &str = "ecds_agent_wasm_heal_attempts";

/// Distinct values a free-form label (a host) may take before further ones are counted as
/// `other`: a control plane naming ever new hosts cannot grow the metric set without bound.
pub const MAX_LABEL_VALUES: usize = 64;

/// `value` if it is one of the first [`MAX_LABEL_VALUES`] seen for `metric`, else `"other"`.
pub fn bounded_label(metric: &'static str, value: &str) -> String {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<&'static str, HashSet<String>>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let set = seen.entry(metric).or_default();
    if set.contains(value) {
        return value.to_owned();
    }
    if set.len() < MAX_LABEL_VALUES {
        set.insert(value.to_owned());
        return value.to_owned();
    }
    "other".to_owned()
}

const CONVERSION_BUCKETS_MS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];
const FETCH_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BYTES_BUCKETS: &[f64] = &[
    1024.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (idempotent) and returns its handle for rendering.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CONVERSION_DURATION.into()),
                    CONVERSION_BUCKETS_MS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(REMOTE_FETCH_DURATION.into()),
                        FETCH_BUCKETS_S,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(REMOTE_FETCH_BYTES.into()),
                        BYTES_BUCKETS,
                    )
                });
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                // A recorder already installed (only possible in tests that embed the agent):
                // render from a detached one instead of failing.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Renders the Prometheus text exposition.
pub fn render() -> String {
    install().render()
}

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        XDS_PROXY_REQUESTS,
        "xDS requests forwarded (and sent by the agent) to the control plane"
    );
    describe_counter!(
        XDS_PROXY_RESPONSES,
        "xDS responses forwarded (and sent by the agent) to Envoy"
    );
    describe_counter!(
        UPSTREAM_CONNECTION_FAILURES,
        "failures to open a stream to the control plane"
    );
    describe_counter!(
        UPSTREAM_TERMINATIONS,
        "control plane streams ended, by cause"
    );
    describe_counter!(ENVOY_TERMINATIONS, "Envoy streams ended, by cause");
    describe_gauge!(ENVOY_STREAMS_ACTIVE, "open Envoy ADS streams");
    describe_counter!(CACHE_LOOKUP_COUNT, "Wasm module cache lookups, by hit");
    describe_gauge!(CACHE_ENTRIES, "modules in the Wasm cache");
    describe_counter!(REMOTE_FETCH_COUNT, "remote Wasm fetches, by result");
    describe_histogram!(
        REMOTE_FETCH_DURATION,
        "time to fetch and verify one module (seconds)"
    );
    describe_histogram!(REMOTE_FETCH_BYTES, "size of fetched modules (bytes)");
    describe_gauge!(CACHE_BYTES, "bytes held by the Wasm cache");
    describe_counter!(CACHE_EVICTIONS, "modules removed from the cache, by reason");
    describe_counter!(CONVERSION_COUNT, "ECDS resources converted, by result");
    describe_histogram!(
        CONVERSION_DURATION,
        "time to convert one ECDS response (milliseconds)"
    );
    describe_counter!(
        NACKS_SENT,
        "NACKs the agent sent to the control plane, by reason"
    );
    describe_counter!(
        HEAL_DELIVERIES,
        "modules delivered to Envoy by background retry, without a new push"
    );
    describe_counter!(HEAL_ATTEMPTS, "background retries of failed module fetches");
    describe_counter!(
        LATE_FAILURES,
        "modules streamed to Envoy while downloading whose download then failed verification"
    );
    describe_counter!(
        MODULE_SERVES,
        "module requests of Envoy's own remote fetch answered by the agent, by result"
    );
    describe_counter!(
        DELIVERIES,
        "modules handed to Envoy in a converted resource, by code source"
    );
    describe_counter!(
        ENVOY_REJECTIONS,
        "Envoy NACKs of ECDS updates the agent delivered, by what was delivered"
    );
    describe_counter!(
        FETCHES_SERVED,
        "modules fetched, by the host that served them"
    );
    describe_counter!(
        SIGNATURE_CHECKS,
        "signature checks of OCI modules under --verify-policy, by result"
    );
    describe_counter!(
        PULL_AUTH_CHECKS,
        "manifest HEADs showing a requester may pull a cached private module, by result"
    );
    describe_counter!(
        ECDS_SUPERSEDED,
        "ECDS responses dropped or abandoned because a newer push replaced them"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_form_labels_are_bounded() {
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(
                bounded_label("test_metric", &format!("h{i}")),
                format!("h{i}")
            );
        }
        assert_eq!(
            bounded_label("test_metric", "h0"),
            "h0",
            "a known value stays"
        );
        assert_eq!(bounded_label("test_metric", "new"), "other");
        assert_eq!(bounded_label("other_metric", "new"), "new", "per metric");
    }
}
