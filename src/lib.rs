//! ecds-agent: a sidecar between Envoy and its xDS control plane that makes remote
//! WebAssembly extensions work.
//!
//! Data flows one way through the crate:
//!
//! ```text
//! Envoy ──ADS──▶ xds (proxy streams) ──ADS──▶ control plane
//!                  │ ECDS responses only
//!                  ▼
//!                ecds (decode, rewrite remote→local, stand-ins, NACK text)
//!                  │ module URL + options
//!                  ▼
//!                wasm (HTTP/OCI fetchers, verification, on-disk cache)
//! ```
//!
//! `admin` serves health, metrics and debug pages; `config` owns the command line of the
//! sidecar. `demo` (cargo feature `demo`, which `make demo` and `make test` enable; never in a
//! production build) is a small istiod-like control plane for the walkthrough and the tests.

pub mod admin;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod ecds;
pub mod errors;
pub mod fuzzing;
pub mod proto;
pub mod wasm;
pub mod xds;
