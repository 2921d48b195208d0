//! Trust settings shared by both fetchers: extra CA roots and the insecure host list
//! (`WASM_INSECURE_REGISTRIES`: listed hosts get TLS without verification, or plain HTTP
//! when they do not speak TLS; every other host gets verified TLS only).

use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct FetchTls {
    roots: Arc<Vec<reqwest::Certificate>>,
    roots_pem: Arc<Vec<Vec<u8>>>,
    insecure: Arc<Vec<String>>,
}

impl FetchTls {
    pub fn new(ca_file: Option<&Path>, insecure: Vec<String>) -> Result<Self, String> {
        let (roots, roots_pem) = match ca_file {
            None => (Vec::new(), Vec::new()),
            Some(p) => {
                let pem =
                    std::fs::read(p).map_err(|e| format!("--fetch-ca {}: {e}", p.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("--fetch-ca {}: {e}", p.display()))?;
                if certs.is_empty() {
                    return Err(format!(
                        "--fetch-ca {}: no PEM certificates found",
                        p.display()
                    ));
                }
                (certs, split_pem(&pem))
            }
        };
        Ok(Self {
            roots: Arc::new(roots),
            roots_pem: Arc::new(roots_pem),
            insecure: Arc::new(insecure),
        })
    }

    pub fn roots(&self) -> &[reqwest::Certificate] {
        &self.roots
    }

    pub fn roots_pem(&self) -> &[Vec<u8>] {
        &self.roots_pem
    }

    /// Whether `host_port` (as written in the URL) is on the insecure list.
    pub fn is_insecure(&self, host_port: &str) -> bool {
        self.insecure.iter().any(|h| h == "*" || h == host_port)
    }
}

/// Splits a PEM bundle into one PEM block per certificate.
fn split_pem(pem: &[u8]) -> Vec<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let stop = start + len + END.len();
        out.push(format!("{}\n", &rest[start..stop]).into_bytes());
        rest = &rest[stop..];
    }
    out
}
