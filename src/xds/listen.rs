//! Binding the Envoy-facing socket: a Unix socket (Istio's default, `/etc/istio/proxy/XDS`)
//! or TCP. Owns only socket set-up; serving happens in `server`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

/// Where Envoy connects: a Unix socket path or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Parses `unix:/path` or `host:port`.
pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path, e.g. unix:/etc/istio/proxy/XDS".into());
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|e| {
        format!("'{s}' is neither unix:/path nor host:port ({e}); e.g. 127.0.0.1:15010")
    })
}

/// A bound Envoy-facing listener.
pub enum Bound {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Why the listen address is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("--listen {addr}: cannot create directory {dir}: {source}")]
    Dir {
        addr: ListenAddr,
        dir: String,
        source: std::io::Error,
    },
    #[error("--listen {addr}: cannot remove stale socket: {source}")]
    Stale {
        addr: ListenAddr,
        source: std::io::Error,
    },
    #[error("--listen {addr}: {path} exists and is not a socket; refusing to remove it")]
    NotASocket { addr: ListenAddr, path: String },
    #[error("--listen {addr}: cannot bind: {source}")]
    Bind {
        addr: ListenAddr,
        source: std::io::Error,
    },
}

/// Binds `addr`. For Unix sockets: creates the parent directory, removes a stale socket file
/// and makes the socket world-writable (0666) so an Envoy running as another user can connect.
pub async fn bind(addr: &ListenAddr) -> Result<Bound, ListenError> {
    match addr {
        ListenAddr::Tcp(a) => TcpListener::bind(a)
            .await
            .map(Bound::Tcp)
            .map_err(|source| ListenError::Bind {
                addr: addr.clone(),
                source,
            }),
        ListenAddr::Unix(path) => bind_unix(addr, path),
    }
}

fn bind_unix(addr: &ListenAddr, path: &Path) -> Result<Bound, ListenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ListenError::Dir {
            addr: addr.clone(),
            dir: dir.display().to_string(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ListenError::NotASocket {
                    addr: addr.clone(),
                    path: path.display().to_string(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ListenError::Stale {
                addr: addr.clone(),
                source,
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ListenError::Stale {
                addr: addr.clone(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        addr: addr.clone(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|source| {
        ListenError::Bind {
            addr: addr.clone(),
            source,
        }
    })?;
    Ok(Bound::Unix(listener))
}
