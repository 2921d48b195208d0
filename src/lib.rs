//! ecds-agent: a sidecar between Envoy and its xDS control plane that makes remote
//! WebAssembly extensions work.
//!
//! Data flows one way through the crate:
//!
//! ```text
//! Envoy ──ADS──▶ xds (proxy streams) ──ADS──▶ control plane
//!                  │ responses of the intercepted type URLs only (xds::Interceptor)
//!                  ▼
//!                ecds (the ECDS session: convert, rewrite remote→local, stand-ins, NACKs, heals)
//!                  │ module URL + options
//!                  ▼
//!                wasm (HTTP/OCI fetchers, verification, on-disk cache)
//! ```
//!
//! `xds` knows nothing of Wasm: `ecds` implements its [`xds::Interceptor`] for the ECDS type URL
//! and `main` plugs it in. `metrics` (the metric names) and `backoff` are leaves every layer may
//! use; `admin` serves health, metrics and debug pages and only reads; `config` owns the command
//! line of the sidecar. `tests/architecture.rs` checks that no two of these import each other. `demo` (cargo feature `demo`, which `make demo` and `make test` enable; never in a
//! production build) is a small istiod-like control plane for the walkthrough and the tests.

pub mod admin;
pub mod backoff;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod ecds;
pub mod errors;
pub mod fuzzing;
pub mod metrics;
pub mod prefetch;
pub mod progress;
pub mod proto;
pub mod wasm;
pub mod xds;
