//! Protobuf messages envoy-types does not generate (compiled from `proto/` by `build.rs`),
//! and the type URLs the agent recognises.

/// `xds.type.v3.TypedStruct`.
pub mod xds_type_v3 {
    include!(concat!(env!("OUT_DIR"), "/xds.r#type.v3.rs"));
}

/// `udpa.type.v1.TypedStruct` (legacy name, same wire format).
pub mod udpa_type_v1 {
    include!(concat!(env!("OUT_DIR"), "/udpa.r#type.v1.rs"));
}

/// Type URLs the agent routes on.
pub mod type_url {
    pub const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    /// The SotW wrapper that carries a TTL (`envoy.service.discovery.v3.Resource`).
    pub const RESOURCE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";
    pub const HTTP_WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
    pub const NETWORK_WASM: &str =
        "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
    pub const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    pub const NETWORK_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    pub const UDPA_TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
    pub const XDS_TYPED_STRUCT: &str = "type.googleapis.com/xds.type.v3.TypedStruct";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
}
