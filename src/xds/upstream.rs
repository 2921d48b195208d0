//! The control-plane side: how a new upstream ADS connection is dialled (plaintext h2, TLS or
//! mTLS). One connection per Envoy stream, as Istio's agent does, so streams never share fate.

use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub type AdsClient = AggregatedDiscoveryServiceClient<Channel>;

/// TLS material for the upstream connection (all optional).
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("invalid upstream {uri}: {source}")]
    Endpoint {
        uri: String,
        source: tonic::transport::Error,
    },
}

/// A recipe for dialling the control plane.
#[derive(Clone)]
pub struct Upstream {
    uri: http::Uri,
    endpoint: Endpoint,
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(path).map_err(|source| UpstreamError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl Upstream {
    pub fn new(uri: http::Uri, tls: &UpstreamTls) -> Result<Self, UpstreamError> {
        let err = |source| UpstreamError::Endpoint {
            uri: uri.to_string(),
            source,
        };
        let mut endpoint = Endpoint::from(uri.clone())
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20));
        if uri.scheme_str() == Some("https") {
            let mut cfg = ClientTlsConfig::new();
            cfg = match &tls.ca {
                Some(ca) => cfg.ca_certificate(Certificate::from_pem(read("--upstream-ca", ca)?)),
                None => cfg.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                cfg = cfg.identity(Identity::from_pem(
                    read("--client-cert", cert)?,
                    read("--client-key", key)?,
                ));
            }
            if let Some(name) = &tls.server_name {
                cfg = cfg.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(cfg).map_err(err)?;
        }
        Ok(Self { uri, endpoint })
    }

    pub fn uri(&self) -> &http::Uri {
        &self.uri
    }

    /// Dials a fresh connection.
    pub async fn connect(&self) -> Result<AdsClient, tonic::transport::Error> {
        let channel = self.endpoint.connect().await?;
        Ok(AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}
