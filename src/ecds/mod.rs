//! ECDS conversion: remote Wasm code in a `TypedExtensionConfig` → a verified local file.
//!
//! Owns the meaning of ECDS resources (which are Wasm, which hints they carry, what a stand-in
//! looks like). It does not touch streams, nonces or NACK delivery (that is `xds`), nor how
//! modules are fetched and stored (that is `wasm`).
//!
//! * `wasm_filter`  — recognising HTTP/network Wasm, native or in a TypedStruct
//! * `typed_struct` — strict proto3-JSON decoding of TypedStruct values
//! * `env`          — the `ISTIO_META_WASM_*` hints, read and stripped
//! * `standin`      — allow-all / deny-all RBAC stand-ins
//! * `convert`      — the converter and background healing

pub mod convert;
pub mod env;
pub mod standin;
pub mod typed_struct;
pub mod wasm_filter;

pub use convert::{ConversionResult, Converter, FailureMode, HealJob, Outcome, RetryPolicy};
