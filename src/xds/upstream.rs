//! The control-plane side: how a new upstream ADS connection is dialled (plaintext h2, TLS or
//! mTLS over TCP, or plaintext h2 over a Unix socket such as pilot-agent's). One connection per
//! Envoy stream, as Istio's agent does, so streams never share fate.
//!
//! TLS files are read again whenever they change (Istio and cert-manager rotate workload
//! certificates, typically daily): each new connection uses the files as they are then, without
//! a restart. A rotation caught half-written keeps the last good set until it is whole.

use std::path::PathBuf;
use std::sync::Mutex;

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Parses the control plane address: `http://host:port`, `https://host:port`, or
/// `unix:/path` (also `unix:///path`) for plaintext HTTP/2 over a Unix socket.
pub fn parse_upstream(s: &str) -> Result<UpstreamAddr, String> {
    if let Some(rest) = s.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if !path.starts_with('/') {
            return Err(format!(
                "'{s}' needs an absolute socket path, e.g. unix:/etc/istio/proxy/XDS"
            ));
        }
        return Ok(UpstreamAddr::Unix(PathBuf::from(path)));
    }
    parse_upstream_url(s).map(UpstreamAddr::Url)
}

/// Where the control plane is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `http://` (plaintext HTTP/2) or `https://` (TLS).
    Url(http::Uri),
    /// Plaintext HTTP/2 over a Unix socket (e.g. pilot-agent's `/etc/istio/proxy/XDS`).
    Unix(PathBuf),
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Url(u) => write!(f, "{u}"),
            UpstreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

fn parse_upstream_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("'{s}' is not a URL ({e}); e.g. http://127.0.0.1:15010"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("'{s}' must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("'{s}' has no host"));
    }
    Ok(uri)
}

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

/// The bytes of the TLS files an endpoint was built from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct TlsFiles {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

/// A recipe for dialling the control plane.
pub struct Upstream {
    addr: UpstreamAddr,
    uri: http::Uri,
    tls: UpstreamTls,
    /// The endpoint and the file contents it was built from.
    current: Mutex<(TlsFiles, Endpoint)>,
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(path).map_err(|source| UpstreamError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl UpstreamTls {
    fn read_files(&self) -> Result<TlsFiles, UpstreamError> {
        let opt = |what, p: &Option<PathBuf>| p.as_ref().map(|p| read(what, p)).transpose();
        Ok(TlsFiles {
            ca: opt("--upstream-ca", &self.ca)?,
            cert: opt("--client-cert", &self.client_cert)?,
            key: opt("--client-key", &self.client_key)?,
        })
    }
}

/// The HTTP/2 frame size the control plane may send (SETTINGS_MAX_FRAME_SIZE).
const UPSTREAM_MAX_FRAME: u32 = 256 << 10;

fn endpoint(
    uri: &http::Uri,
    tls: &UpstreamTls,
    files: &TlsFiles,
) -> Result<Endpoint, UpstreamError> {
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
        .initial_connection_window_size(Some(16 << 20))
        // Large responses may come in frames of up to 256 KiB (the sender picks; grpc-go keeps
        // to 16 KiB): per frame, h2's reader reserves and copies the partial tail once, so
        // bigger frames cut copies and reads per relayed MiB (scripts/relay-cost.sh).
        .max_frame_size(Some(UPSTREAM_MAX_FRAME));
    if uri.scheme_str() == Some("https") {
        let mut cfg = ClientTlsConfig::new();
        cfg = match &files.ca {
            Some(ca) => cfg.ca_certificate(Certificate::from_pem(ca)),
            None => cfg.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &tls.server_name {
            cfg = cfg.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(cfg).map_err(err)?;
    }
    Ok(endpoint)
}

impl Upstream {
    pub fn new(addr: UpstreamAddr, tls: &UpstreamTls) -> Result<Self, UpstreamError> {
        let uri = match &addr {
            UpstreamAddr::Url(u) => u.clone(),
            // The authority of requests over the socket; nothing resolves it.
            UpstreamAddr::Unix(_) => http::Uri::from_static("http://localhost"),
        };
        let files = tls.read_files()?;
        let ep = endpoint(&uri, tls, &files)?;
        Ok(Self {
            addr,
            uri,
            tls: tls.clone(),
            current: Mutex::new((files, ep)),
        })
    }

    /// Where the control plane is, as the user wrote it.
    pub fn addr(&self) -> &UpstreamAddr {
        &self.addr
    }

    /// The endpoint for a new connection, rebuilt if the TLS files changed.
    async fn endpoint(&self) -> Endpoint {
        if self.tls.ca.is_none() && self.tls.client_cert.is_none() && self.tls.client_key.is_none()
        {
            // No files to watch: nothing to re-read on each connect.
            return self
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone();
        }
        let tls = self.tls.clone();
        let fresh = match tokio::task::spawn_blocking(move || tls.read_files()).await {
            Ok(Ok(f)) => Some(f),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot re-read upstream TLS files; using the last good ones");
                None
            }
            Err(_) => None,
        };
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(files) = fresh.filter(|f| *f != cur.0) {
            match endpoint(&self.uri, &self.tls, &files) {
                Ok(ep) => {
                    tracing::info!("upstream TLS files changed; new connections use them");
                    *cur = (files, ep);
                }
                Err(e) => tracing::warn!(error = %e,
                    "changed upstream TLS files are not usable (yet); using the last good ones"),
            }
        }
        cur.1.clone()
    }

    /// Dials a fresh connection (the stream's framing is `relay`'s, not a generated client's).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let endpoint = self.endpoint().await;
        let channel = match &self.addr {
            UpstreamAddr::Url(_) => endpoint.connect().await?,
            UpstreamAddr::Unix(path) => {
                let path = path.clone();
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await?
            }
        };
        Ok(channel)
    }
}
