//! The listener and cluster the demo control plane serves: an HTTP listener whose filter chain
//! takes the Wasm filter from ECDS (type URLs for Wasm and RBAC, as istiod sets them, so the
//! agent's stand-ins are accepted) and routes to a local "productpage" upstream.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, ExtensionConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::google::protobuf::{Any, Duration};
use prost::{Message, Name};

use crate::proto::type_url;

pub const LISTENER_NAME: &str = "ingress-http";
pub const CLUSTER_NAME: &str = "productpage";

fn pack<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn addr(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(a.port() as u32)),
            ..Default::default()
        })),
    }
}

fn ecds_source(type_urls: &[&str]) -> ExtensionConfigSource {
    ExtensionConfigSource {
        config_source: Some(ConfigSource {
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                AggregatedConfigSource::default(),
            )),
            // As istiod: wait for ECDS indefinitely (the agent's stand-ins keep this safe).
            initial_fetch_timeout: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
        type_urls: type_urls.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The listener: HCM → [Wasm via ECDS] → router → productpage. `network_filter` puts the
/// ECDS filter in front of the HCM instead (a NETWORK WasmPlugin).
pub fn listener(listen: SocketAddr, ecds_name: &str, network_filter: bool) -> Any {
    let mut http_filters = Vec::new();
    if !network_filter {
        http_filters.push(HttpFilter {
            name: ecds_name.to_owned(),
            config_type: Some(http_filter::ConfigType::ConfigDiscovery(ecds_source(&[
                type_url::HTTP_WASM,
                type_url::HTTP_RBAC,
            ]))),
            ..Default::default()
        });
    }
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(
            &Router::default(),
        ))),
        ..Default::default()
    });
    let routes = RouteConfiguration {
        name: "local".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        CLUSTER_NAME.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "ingress".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)),
        http_filters,
        ..Default::default()
    };
    let mut filters = Vec::new();
    if network_filter {
        filters.push(Filter {
            name: ecds_name.to_owned(),
            config_type: Some(filter::ConfigType::ConfigDiscovery(ecds_source(&[
                type_url::NETWORK_WASM,
                type_url::NETWORK_RBAC,
            ]))),
        });
    }
    filters.push(Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
    });
    pack(&Listener {
        name: LISTENER_NAME.into(),
        address: Some(addr(listen)),
        filter_chains: vec![FilterChain {
            filters,
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// The productpage upstream as a static cluster.
pub fn cluster(upstream: SocketAddr) -> Any {
    pack(&Cluster {
        name: CLUSTER_NAME.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: CLUSTER_NAME.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(addr(upstream)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}
