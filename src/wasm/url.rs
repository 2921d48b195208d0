//! Module URLs: `http(s)://…` and `oci://host[:port]/repo[:tag|@sha256:digest]`, parsed into
//! their one canonical form.
//!
//! # Invariant
//! Every name the cache derives from a URL — the signature policy's key, the pull-secret and
//! credential-helper lookup, mirrors, the index key — is taken from the canonical form made
//! here, never from the URL as written: the host is lower-cased and IDNA-encoded (punycode), a
//! trailing dot and the scheme's default port (443 for `oci://` and `https://`, 80 for
//! `http://`) are dropped, IPv4 literals are written in dotted decimal and IPv6 literals in
//! their shortest bracketed form. `oci://LOCALHOST:443/x:v1`, `oci://localhost./x:v1` and
//! `oci://localhost/x:v1` are one module, under one policy rule. A host that cannot be
//! canonicalised is a [`FetchError::BadUrl`].

use super::error::{redact, FetchError};

/// A parsed OCI reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `host[:port]`, canonical (see the module docs).
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
                let mut u = reqwest::Url::parse(url).map_err(|e| bad(url, e.to_string()))?;
                let host = u.host_str().unwrap_or_default().to_owned();
                if host.is_empty() {
                    return Err(bad(url, "no host"));
                }
                // The URL parser already lower-cases, IDNA-encodes and drops default ports;
                // a trailing dot is the one spelling it keeps.
                if let Some(h) = host.strip_suffix('.') {
                    if h.is_empty() || h.ends_with('.') {
                        return Err(bad(url, "empty label in the host"));
                    }
                    u.set_host(Some(h)).map_err(|e| bad(url, e.to_string()))?;
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

    /// The canonical URL: what the cache keys, logs and shows (see the module docs). For
    /// HTTP(S) the query string stays (it may select the object); OCI URLs have none.
    pub fn canonical(&self) -> String {
        match self {
            ModuleUrl::Http(u) => u.to_string(),
            ModuleUrl::Oci(r) => {
                let mut s = format!("oci://{}/{}", r.registry, r.repository);
                if let Some(t) = &r.tag {
                    s.push(':');
                    s.push_str(t);
                }
                if let Some(d) = &r.digest {
                    s.push('@');
                    s.push_str(d);
                }
                s
            }
        }
    }

    /// The name the signature policy matches: `host[:port]/repository` for OCI,
    /// `host[:port]/path` for HTTP(S), both canonical.
    pub fn policy_name(&self) -> String {
        match self {
            ModuleUrl::Http(u) => format!("{}{}", self.host_port(), u.path()),
            ModuleUrl::Oci(r) => format!("{}/{}", r.registry, r.repository),
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

    /// `host[:port]`, canonical, for the insecure list.
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
    if repository.split('/').any(str::is_empty) {
        return Err(bad(url, "empty path component in the repository"));
    }
    let registry = canonical_registry(registry).map_err(|reason| bad(url, reason))?;
    Ok(OciRef {
        registry,
        repository: repository.to_owned(),
        tag,
        digest,
    })
}

/// The canonical `host[:port]` of a registry (see the module docs): lower case, IDNA
/// (punycode), no trailing dot, no `:443`. Pure; the one place a registry name is normalised.
pub fn canonical_registry(registry: &str) -> Result<String, String> {
    let (host, port) = split_host_port(registry)?;
    let host = canonical_host(host)?;
    Ok(match port {
        Some(p) if p != 443 => format!("{host}:{p}"),
        _ => host,
    })
}

/// `host[:port][/path]` (a policy pattern, a mirror prefix, a docker config key) with its host
/// canonical, so it compares equal to names made from canonical URLs. A host part that does not
/// canonicalise (a glob such as `*.corp`) is kept as written.
pub fn canonical_name(name: &str) -> String {
    let (host, rest) = match name.find('/') {
        Some(i) => name.split_at(i),
        None => (name, ""),
    };
    if host.contains('*') {
        return name.to_owned();
    }
    match canonical_registry(host) {
        Ok(h) => format!("{h}{rest}"),
        Err(_) => name.to_owned(),
    }
}

/// `host` or `host:port` or `[v6]` or `[v6]:port`, the port checked.
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| format!("unclosed '[' in registry host {s:?}"))?;
        let after = &rest[end + 1..];
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after the IPv6 address"))?,
            ),
        };
        (&s[..end + 2], port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("port {p} is out of range"))?,
        ),
        Some(p) => return Err(format!("port {p:?} is not a number")),
    };
    if host.is_empty() {
        return Err("empty registry host".into());
    }
    Ok((host, port))
}

/// One host, canonical: IPv4/IPv6 literals normalised, domains lower-cased and IDNA-encoded,
/// a single trailing dot dropped.
fn canonical_host(host: &str) -> Result<String, String> {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if !trimmed.starts_with('[') && trimmed.split('.').any(str::is_empty) {
        return Err(format!("registry host {host:?} has an empty label"));
    }
    if trimmed
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'@')
    {
        return Err(format!(
            "registry host {host:?} has characters a host cannot have"
        ));
    }
    match url::Host::parse(trimmed) {
        Ok(url::Host::Domain(d)) => Ok(d),
        Ok(url::Host::Ipv4(a)) => Ok(a.to_string()),
        Ok(url::Host::Ipv6(a)) => Ok(format!("[{a}]")),
        Err(e) => Err(format!(
            "registry host {host:?} is not a valid host name: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spelling variants of one registry all canonicalise to one name; bad hosts are errors.
    #[test]
    fn canonical_registries() {
        for (given, want) in [
            ("localhost:5000", "localhost:5000"),
            ("LOCALHOST:5000", "localhost:5000"),
            ("LocalHost.:5000", "localhost:5000"),
            ("registry.corp:443", "registry.corp"),
            ("registry.corp.", "registry.corp"),
            ("Registry.Corp.:443", "registry.corp"),
            ("registry.corp:80", "registry.corp:80"),
            ("registry.corp:0443", "registry.corp"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("[::1]:5000", "[::1]:5000"),
            ("[0:0:0:0:0:0:0:1]:443", "[::1]"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("ghcr.io", "ghcr.io"),
        ] {
            assert_eq!(canonical_registry(given).as_deref(), Ok(want), "{given}");
        }
        for bad in [
            "",
            ":5000",
            "host:",
            "host:99999",
            "host:port",
            "host..",
            ".host",
            "a..b",
            "[::1",
            "[::1]x",
            "ho st",
            "exa%mple",
        ] {
            assert!(canonical_registry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canonical_urls() {
        for (given, want) in [
            (
                "oci://LOCALHOST:5000/sc/x:v1",
                "oci://localhost:5000/sc/x:v1",
            ),
            ("oci://registry.corp:443/a/b:1", "oci://registry.corp/a/b:1"),
            ("oci://registry.corp./a/b", "oci://registry.corp/a/b"),
            ("https://H.Example:443/m.wasm", "https://h.example/m.wasm"),
            (
                "https://h.example./m.wasm?x=1",
                "https://h.example/m.wasm?x=1",
            ),
            ("http://h.example:80/m.wasm", "http://h.example/m.wasm"),
            (
                "http://h.example:8080/m.wasm",
                "http://h.example:8080/m.wasm",
            ),
        ] {
            let u = ModuleUrl::parse(given).unwrap();
            assert_eq!(u.canonical(), want, "{given}");
            // Canonical is a fixed point.
            assert_eq!(ModuleUrl::parse(want).unwrap().canonical(), want);
        }
        let u = ModuleUrl::parse("oci://Registry.Corp.:443/team/m:v1").unwrap();
        assert_eq!(u.policy_name(), "registry.corp/team/m");
        let h = ModuleUrl::parse("https://H.example./p/m.wasm").unwrap();
        assert_eq!(h.policy_name(), "h.example/p/m.wasm");
        assert_eq!(canonical_name("LOCALHOST:443/sc/*"), "localhost/sc/*");
        assert_eq!(canonical_name("Reg.Corp./a"), "reg.corp/a");
        assert_eq!(canonical_name("*.corp/a"), "*.corp/a");
        assert_eq!(canonical_name("*"), "*");
        for bad in [
            "oci://a..b/x",
            "oci://h:99999/x",
            "oci://h/a//b",
            "https://./m",
        ] {
            assert!(ModuleUrl::parse(bad).is_err(), "{bad}");
        }
    }

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
