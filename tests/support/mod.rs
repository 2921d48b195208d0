//! Shared test support: real processes and real sockets, no protocol mocks.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod envoy;
pub mod modsrv;
pub mod registry;
pub mod res;
pub mod throttle;
pub mod xds;

pub use agent::{free_port, metric_value, proc_mib, proc_status, Agent};

/// Every secret the suite hands the agent: registry passwords, a pull secret's `auth` value and
/// URL tokens. No log line (the agent runs with `ecds_agent=trace`), admin page, metric or CLI
/// output the suite reads may contain one: [`assert_no_secrets`] is applied to all of them.
pub const SECRETS: &[&str] = &[
    registry::PASS,
    "dGVzdHVzZXI6dGVzdHBhc3M=", // base64("testuser:testpass"), a pull secret's auth
    "hunter2",
    "s3cr3t-token",
];

/// Panics if `text` (from `what`) holds any of [`SECRETS`].
pub fn assert_no_secrets(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} leaked the secret {s:?}:\n{text}");
    }
}
/// How many module files the cache directory `cache` holds.
pub fn modules_in(cache: &std::path::Path) -> usize {
    std::fs::read_dir(cache.join("modules"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub use modsrv::{ModuleServer, Route};
pub use registry::{Layout, Registry};
pub use xds::{ControlPlane, CpStream};
