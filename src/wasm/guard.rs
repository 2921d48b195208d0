//! What a module fetch may reach: the dial-level block list (SSRF) and the redirect rules.
//! Pure policy plus one DNS resolver that applies it; the HTTP fetcher enforces it at every hop.
//!
//! * **Blocked addresses**, at every dial (each redirect hop, after DNS): link-local
//!   (169.254.0.0/16, fe80::/10), the cloud metadata endpoints 100.100.100.200/32 and
//!   fd00:ec2::/32, and the CIDRs of Istio's `BLOCKED_CIDRS_IN_WASM_FETCH` (`--blocked-cidrs`).
//!   Private and loopback ranges stay allowed by default, as in Istio.
//! * **Bearer realms** an OCI registry names (`WWW-Authenticate: Bearer realm="…"`, where
//!   credentials go) are refused, as Istio ≥ 1.28.5 / 1.29.1 does, when not http(s), without a
//!   host, `localhost`, `metadata.google.internal`, or a private, loopback, link-local or
//!   unique-local IP literal (or a blocked address): "rejected unsafe bearer realm".
//! * **Redirects** are followed by hand, at most [`MAX_REDIRECTS`], each hop under its own
//!   host's TLS policy (verify, or no-verify only for listed insecure hosts); an `https://` URL
//!   never continues over plain `http://` unless the target host is listed insecure; a loop is
//!   an error; no `Referer` is ever sent (a pre-signed URL's token must not reach a third host).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::tls::FetchTls;

/// Most redirects followed for one download.
pub const MAX_REDIRECTS: usize = 10;

/// CIDRs blocked whatever the configuration says.
pub const ALWAYS_BLOCKED: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "100.100.100.200/32",
    "fd00:ec2::/32",
];

/// One CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not a CIDR (e.g. 10.0.0.0/8, fd00::/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("'{s}': prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { net, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

/// The addresses no fetch may dial.
#[derive(Debug, Clone)]
pub struct Blocklist(Arc<Vec<Cidr>>);

impl Default for Blocklist {
    fn default() -> Self {
        Self::with_extra(&[])
    }
}

impl Blocklist {
    /// The always-blocked CIDRs plus `extra`.
    pub fn with_extra(extra: &[Cidr]) -> Self {
        let mut all: Vec<Cidr> = ALWAYS_BLOCKED
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        all.extend_from_slice(extra);
        Self(Arc::new(all))
    }

    /// Parses a comma-separated CIDR list (Istio's `BLOCKED_CIDRS_IN_WASM_FETCH` format).
    pub fn parse_extra(list: &str) -> Result<Vec<Cidr>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect()
    }

    pub fn blocks(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// A DNS resolver that never returns a blocked address (a name resolving only to blocked
/// addresses fails to resolve, with a message saying so).
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Blocklist);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let blocked = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !blocked.blocks(a.ip()))
                .collect();
            if ok.is_empty() && !all.is_empty() {
                return Err(
                    format!("{host} resolves only to blocked addresses (SSRF guard)").into(),
                );
            }
            let addrs: reqwest::dns::Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

/// The `realm` of every Bearer challenge in a `WWW-Authenticate` value.
pub fn bearer_realms(header: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = header.to_ascii_lowercase();
    let mut from = 0;
    while let Some(at) = lower[from..].find("bearer") {
        let start = from + at + "bearer".len();
        let next = lower[start..]
            .find("bearer")
            .map_or(header.len(), |n| start + n);
        let params = &header[start..next];
        if let Some(r) = params.to_ascii_lowercase().find("realm=") {
            let v = params[r + "realm=".len()..].trim_start();
            let v = match v.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or(""),
                None => v.split([',', ' ']).next().unwrap_or(""),
            };
            out.push(v.to_owned());
        }
        from = next;
    }
    out
}

/// Whether credentials may be sent to the token endpoint `realm` (see the module docs).
pub fn check_realm(realm: &str, blocked: &Blocklist) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("rejected unsafe bearer realm {realm:?}: {why}"));
    let Ok(u) = reqwest::Url::parse(realm) else {
        return refuse("not a URL");
    };
    if !matches!(u.scheme(), "http" | "https") {
        return refuse("not http(s)");
    }
    let ip = match u.host() {
        None => return refuse("no host"),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") || d == "metadata.google.internal" {
                return refuse("a local or metadata host");
            }
            return Ok(());
        }
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
    };
    let unsafe_ip = match ip {
        IpAddr::V4(a) => {
            a.is_private() || a.is_loopback() || a.is_link_local() || a.is_unspecified()
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || (a.segments()[0] & 0xfe00) == 0xfc00
                || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if unsafe_ip || blocked.blocks(ip) {
        return refuse("a private, loopback or link-local address");
    }
    Ok(())
}

/// `host[:port]` as the insecure list names it.
pub fn host_port(u: &reqwest::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

/// Refuses a URL whose host is a blocked IP literal (names are checked by the resolver).
pub fn check_literal(u: &reqwest::Url, blocked: &Blocklist) -> Result<(), String> {
    let ip = match u.host() {
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        _ => return Ok(()),
    };
    if blocked.blocks(ip) {
        return Err(format!("{ip} is a blocked address (SSRF guard)"));
    }
    Ok(())
}

/// Where a redirect from `current` with `Location: location` goes, if it may be followed.
pub fn next_hop(
    current: &reqwest::Url,
    location: &str,
    tls: &FetchTls,
    seen: &[reqwest::Url],
) -> Result<reqwest::Url, String> {
    let next = current
        .join(location)
        .map_err(|e| format!("redirect to an invalid location: {e}"))?;
    let shown = super::error::redact(next.as_str());
    match next.scheme() {
        "http" | "https" => {}
        other => return Err(format!("redirect to a {other}: URL refused ({shown})")),
    }
    if current.scheme() == "https" && next.scheme() == "http" && !tls.is_insecure(&host_port(&next))
    {
        return Err(format!(
            "redirect from https to plain http refused ({shown}; list the host in --insecure-registries to allow it)"
        ));
    }
    if seen.contains(&next) {
        return Err(format!("redirect loop at {shown}"));
    }
    Ok(next)
}

/// The redirect policy of clients that follow redirects themselves (oci-client's blob
/// downloads): [`next_hop`]'s rules, blocked IP literals (names meet [`GuardedResolver`]),
/// at most [`MAX_REDIRECTS`] hops, and a client that skips TLS verification for a listed host
/// does not follow a redirect to a host that is not listed (it would skip it there too).
pub fn redirect_policy(
    blocked: Blocklist,
    tls: FetchTls,
    skip_verify: bool,
) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let previous = attempt.previous();
        if previous.len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let next = attempt.url().clone();
        let Some(current) = previous.last().cloned() else {
            return attempt.follow();
        };
        let seen = &previous[..previous.len() - 1];
        if let Err(e) = next_hop(&current, next.as_str(), &tls, seen)
            .and_then(|n| check_literal(&n, &blocked).map(|()| n))
        {
            return attempt.error(e);
        }
        if skip_verify
            && next.scheme() == "https"
            && host_port(&next) != host_port(&previous[0])
            && !tls.is_insecure(&host_port(&next))
        {
            return attempt.error(format!(
                "redirect from a registry listed insecure to {}, which is not listed, refused",
                super::error::redact(next.as_str())
            ));
        }
        attempt.follow()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_block_list_matches_istio() {
        let b = Blocklist::default();
        for s in [
            "169.254.169.254",
            "fe80::1",
            "100.100.100.200",
            "fd00:ec2::230",
            "::ffff:169.254.1.1",
        ] {
            assert!(b.blocks(ip(s)), "{s}");
        }
        for s in ["10.0.0.1", "127.0.0.1", "8.8.8.8", "::1", "100.100.100.201"] {
            assert!(!b.blocks(ip(s)), "{s}");
        }
        let b = Blocklist::with_extra(&Blocklist::parse_extra("10.0.0.0/8, 127.0.0.2").unwrap());
        assert!(b.blocks(ip("10.1.2.3")) && b.blocks(ip("127.0.0.2")));
        assert!(!b.blocks(ip("192.168.1.1")) && !b.blocks(ip("127.0.0.1")));
        assert!(Blocklist::parse_extra("10.0.0.0/33").is_err());
        assert!(Blocklist::parse_extra("nonsense").is_err());
        assert_eq!(Blocklist::parse_extra("").unwrap(), vec![]);
    }

    #[test]
    fn bearer_realms_as_istio_checks_them() {
        let b = Blocklist::default();
        for ok in [
            "https://auth.docker.io/token",
            "http://registry.example:5000/auth",
        ] {
            assert!(check_realm(ok, &b).is_ok(), "{ok}");
        }
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://metadata.google.internal/computeMetadata",
            "http://localhost/token",
            "http://127.0.0.1:5000/token",
            "http://127.1.2.3/token",
            "http://10.0.0.1/token",
            "http://192.168.1.1/token",
            "http://172.16.0.1/token",
            "http://[::1]/token",
            "http://[fe80::1]/token",
            "http://[fd00:ec2::254]/token",
            "http://[fc00::1]/token",
            "file:///etc/passwd",
            "gopher://x/",
            "dict://x/",
        ] {
            let e = check_realm(bad, &b).unwrap_err();
            assert!(e.contains("rejected unsafe bearer realm"), "{bad}: {e}");
        }
        let h = r#"Bearer realm="https://a.example/token",service="r", Bearer realm="http://169.254.169.254/x""#;
        assert_eq!(
            bearer_realms(h),
            ["https://a.example/token", "http://169.254.169.254/x"]
        );
        assert!(bearer_realms(r#"Basic realm="registry""#).is_empty());
    }

    #[test]
    fn redirect_rules() {
        let tls = FetchTls::new(None, vec!["insecure.example".into()]).unwrap();
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let here = u("https://a.example/x/m.wasm?X-Amz-Signature=secret");
        assert_eq!(
            next_hop(&here, "/y", &tls, &[]).unwrap(),
            u("https://a.example/y")
        );
        assert_eq!(
            next_hop(&here, "https://b.example/z", &tls, &[]).unwrap(),
            u("https://b.example/z")
        );
        let down = next_hop(&here, "http://b.example/z", &tls, &[]).unwrap_err();
        assert!(down.contains("plain http refused"), "{down}");
        assert!(next_hop(&here, "http://insecure.example/z", &tls, &[]).is_ok());
        assert!(next_hop(&here, "file:///etc/passwd", &tls, &[])
            .unwrap_err()
            .contains("file:"));
        let lp = next_hop(
            &here,
            "https://b.example/z",
            &tls,
            &[u("https://b.example/z")],
        )
        .unwrap_err();
        assert!(lp.contains("loop"), "{lp}");
        assert!(check_literal(&u("http://169.254.169.254/m"), &Blocklist::default()).is_err());
        assert!(check_literal(&u("http://127.0.0.1/m"), &Blocklist::default()).is_ok());
    }
}
