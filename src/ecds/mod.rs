//! ECDS conversion and the ECDS session: remote Wasm code in a `TypedExtensionConfig` → a
//! verified local file, delivered to Envoy with stand-ins, NACKs and background healing.
//!
//! Owns the meaning of ECDS resources (which are Wasm, which hints they carry, what a stand-in
//! looks like) and the per-stream ECDS session, which `xds` runs through the
//! [`crate::xds::Interceptor`] this module implements ([`EcdsInterceptor`]). It does not own
//! sockets, framing or the nonce book (that is `xds`: the session uses the stream's handles), nor
//! how modules are fetched and stored (that is `wasm`).
//!
//! * `wasm_filter`  — recognising HTTP/network Wasm, native or in a TypedStruct
//! * `typed_struct` — strict proto3-JSON decoding of TypedStruct values
//! * `env`          — the `ISTIO_META_WASM_*` hints, read and stripped
//! * `standin`      — allow-all / deny-all RBAC stand-ins
//! * `convert`      — the converter and background healing
//! * `session`      — one stream's ECDS responses: convert, deliver, NACK, heal, unsubscribe

pub mod convert;
pub mod delivery;
pub mod env;
mod session;
pub mod standin;
pub mod typed_struct;
pub mod wasm_filter;

pub use convert::{
    ConversionResult, Converter, FailureMode, HealJob, Load, Outcome, Provisional, RetryPolicy,
    Settled,
};

/// The `xds` interception of the ECDS type URL: one [`session::EcdsSession`] per stream.
pub struct EcdsInterceptor(pub std::sync::Arc<Converter>);

impl crate::xds::Interceptor for EcdsInterceptor {
    fn type_url(&self) -> &'static str {
        crate::proto::type_url::ECDS
    }

    fn start_sotw(
        &self,
        h: crate::xds::StreamHandles<crate::xds::flavor::Sotw>,
    ) -> crate::xds::Intercepted<crate::xds::flavor::Sotw> {
        session::EcdsSession::spawn(self.0.clone(), h)
    }

    fn start_delta(
        &self,
        h: crate::xds::StreamHandles<crate::xds::flavor::Delta>,
    ) -> crate::xds::Intercepted<crate::xds::flavor::Delta> {
        session::EcdsSession::spawn(self.0.clone(), h)
    }
}
