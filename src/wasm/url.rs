//! Module URLs: `http(s)://…` and `oci://host[:port]/repo[:tag|@sha256:digest]`.

use super::error::{redact, FetchError};

/// A parsed OCI reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `host[:port]` exactly as written.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>` when the URL pins a digest.
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleUrl {
    Http(reqwest::Url),
    Oci(OciRef),
}

fn bad(url: &str, reason: impl Into<String>) -> FetchError {
    FetchError::BadUrl {
        url: redact(url),
        reason: reason.into(),
    }
}

impl ModuleUrl {
    pub fn parse(url: &str) -> Result<Self, FetchError> {
        let scheme = url.split("://").next().unwrap_or("");
        if !url.contains("://") {
            return Err(bad(url, "no scheme; use oci://, https:// or http://"));
        }
        match scheme {
            "http" | "https" => {
                let u = reqwest::Url::parse(url).map_err(|e| bad(url, e.to_string()))?;
                if u.host_str().is_none_or(str::is_empty) {
                    return Err(bad(url, "no host"));
                }
                Ok(ModuleUrl::Http(u))
            }
            "oci" => parse_oci(url).map(ModuleUrl::Oci),
            other => Err(bad(
                url,
                format!("unsupported Wasm module downloading URL scheme: {other}"),
            )),
        }
    }

    /// The cache's notion of "the same module": the URL without tag/digest for OCI
    /// (as Istio), the whole URL for HTTP.
    pub fn module_name(&self) -> String {
        match self {
            ModuleUrl::Http(u) => u.to_string(),
            ModuleUrl::Oci(r) => format!("oci://{}/{}", r.registry, r.repository),
        }
    }

    /// `host[:port]` as written, for the insecure list.
    pub fn host_port(&self) -> String {
        match self {
            ModuleUrl::Http(u) => match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_owned(),
                _ => String::new(),
            },
            ModuleUrl::Oci(r) => r.registry.clone(),
        }
    }

    /// An OCI tag that moves: `:latest`, or no tag and no digest (which means `:latest`).
    pub fn is_latest(&self) -> bool {
        match self {
            ModuleUrl::Oci(r) => {
                r.digest.is_none() && r.tag.as_deref().is_none_or(|t| t == "latest")
            }
            ModuleUrl::Http(_) => false,
        }
    }

    /// The hex of an `@sha256:` digest in the URL.
    pub fn pinned_digest(&self) -> Option<String> {
        match self {
            ModuleUrl::Oci(OciRef {
                digest: Some(d), ..
            }) => d.strip_prefix("sha256:").map(str::to_owned),
            _ => None,
        }
    }
}

fn parse_oci(url: &str) -> Result<OciRef, FetchError> {
    let rest = &url["oci://".len()..];
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    if rest.contains('@') && rest.find('@') < rest.find('/') {
        return Err(bad(
            url,
            "credentials in OCI URLs are not supported; use a pull secret",
        ));
    }
    let (name, digest) = match rest.split_once('@') {
        Some((n, d)) => {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| bad(url, "only sha256 digests are supported"))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(url, "digest must be sha256:<64 hex digits>"));
            }
            (n, Some(format!("sha256:{}", hex.to_ascii_lowercase())))
        }
        None => (rest, None),
    };
    let (registry, path) = name
        .split_once('/')
        .ok_or_else(|| bad(url, "expected oci://registry/repository[:tag]"))?;
    if registry.is_empty() || path.is_empty() {
        return Err(bad(url, "expected oci://registry/repository[:tag]"));
    }
    let (repository, tag) = match path.rfind(':') {
        Some(i) if !path[i..].contains('/') => (&path[..i], Some(path[i + 1..].to_owned())),
        _ => (path, None),
    };
    if repository.is_empty() || tag.as_deref() == Some("") {
        return Err(bad(url, "empty repository or tag"));
    }
    if repository
        .bytes()
        .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace())
    {
        return Err(bad(
            url,
            "repository names must be lowercase without spaces",
        ));
    }
    Ok(OciRef {
        registry: registry.to_owned(),
        repository: repository.to_owned(),
        tag,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_forms() {
        let u = ModuleUrl::parse("oci://127.0.0.1:5000/wasm/basic_auth:1.12.0").unwrap();
        let ModuleUrl::Oci(r) = &u else { panic!() };
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "wasm/basic_auth");
        assert_eq!(r.tag.as_deref(), Some("1.12.0"));
        assert_eq!(u.module_name(), "oci://127.0.0.1:5000/wasm/basic_auth");
        assert!(!u.is_latest());
        assert!(ModuleUrl::parse("oci://r/x").unwrap().is_latest());
        assert!(ModuleUrl::parse("oci://r/x:latest").unwrap().is_latest());
        let d = format!("oci://r:1/x@sha256:{}", "a".repeat(64));
        let u = ModuleUrl::parse(&d).unwrap();
        assert_eq!(u.pinned_digest().unwrap(), "a".repeat(64));
        assert!(!u.is_latest());
    }

    #[test]
    fn rejects() {
        for bad in [
            "ftp://x/y",
            "oci://",
            "oci://host",
            "oci://h/x@md5:1",
            "noscheme",
        ] {
            assert!(ModuleUrl::parse(bad).is_err(), "{bad}");
        }
        let e = ModuleUrl::parse("foo://abc").unwrap_err().to_string();
        assert!(
            e.contains("unsupported Wasm module downloading URL scheme: foo"),
            "{e}"
        );
    }
}
