//! Why a module could not be had. Every variant names the (redacted) URL and the exact cause;
//! none carries credentials. Errors are `Clone` because one download may answer many waiters.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("invalid module URL {url}: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("download {url} failed after {attempts} attempt(s): {last}")]
    Download {
        url: String,
        attempts: u32,
        last: String,
    },

    #[error("fetch {url} timed out after {timeout:?} ({stage})")]
    Timeout {
        url: String,
        timeout: Duration,
        stage: &'static str,
    },

    #[error("OCI manifest {url}: {reason}")]
    Manifest { url: String, reason: String },

    #[error("OCI registry refused access to {url}: {reason}")]
    Auth { url: String, reason: String },

    #[error("OCI image {url} holds no Wasm module: {reason}")]
    Layout { url: String, reason: String },

    #[error("OCI blob of {url}: {reason}")]
    Blob { url: String, reason: String },

    #[error("signature check of {url} failed: {reason}")]
    Signature { url: String, reason: String },

    #[error("module from {url} does not match sha256 {want}: got module sha256 {got}{}",
            .digest.as_ref().map(|d| format!(" and manifest digest {d}")).unwrap_or_default())]
    Checksum {
        url: String,
        want: String,
        got: String,
        digest: Option<String>,
    },

    #[error("module from {url} is not valid Wasm: {reason}")]
    Invalid { url: String, reason: String },

    #[error("module from {url} is larger than the limit of {limit} bytes ({what})")]
    TooLarge {
        url: String,
        limit: u64,
        what: String,
    },

    #[error("pull secret for {url} is unusable: {reason}")]
    Secret { url: String, reason: String },

    #[error("cache write for {url} failed: {reason}")]
    Io { url: String, reason: String },
}

/// A cache-directory I/O failure for `url`.
pub fn io_err(url: &str, reason: String) -> FetchError {
    FetchError::Io {
        url: url.to_owned(),
        reason,
    }
}

/// The most of an error's cause the agent stores, logs, shows or sends in a NACK.
pub const MAX_REASON_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, marked `…(N bytes cut)` when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes cut)", &s[..end], s.len() - end)
}

impl FetchError {
    /// The URL and the free-text fields of the error, to rewrite in place.
    fn texts_mut(&mut self) -> (&mut String, Vec<&mut String>) {
        match self {
            FetchError::BadUrl { url, reason }
            | FetchError::Manifest { url, reason }
            | FetchError::Auth { url, reason }
            | FetchError::Layout { url, reason }
            | FetchError::Blob { url, reason }
            | FetchError::Signature { url, reason }
            | FetchError::Invalid { url, reason }
            | FetchError::Secret { url, reason }
            | FetchError::Io { url, reason } => (url, vec![reason]),
            FetchError::Download { url, last, .. } => (url, vec![last]),
            FetchError::Timeout { url, .. } => (url, vec![]),
            FetchError::Checksum {
                url,
                want,
                got,
                digest,
            } => (
                url,
                [Some(want), Some(got), digest.as_mut()]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
            FetchError::TooLarge { url, what, .. } => (url, vec![what]),
        }
    }

    /// The same error about `url` (a remembered answer given to another request).
    pub fn with_url(mut self, url: &str) -> Self {
        *self.texts_mut().0 = url.to_owned();
        self
    }

    /// The same error with every free-text field clipped to [`MAX_REASON_BYTES`]: what a
    /// hostile peer can make an error say is stored and logged at a bounded size.
    pub fn bounded(mut self) -> Self {
        let (url, texts) = self.texts_mut();
        for t in std::iter::once(url).chain(texts) {
            if t.len() > MAX_REASON_BYTES {
                *t = clip(t, MAX_REASON_BYTES);
            }
        }
        self
    }

    /// The `result` label of `istio_agent_wasm_remote_fetch_count`, or `None` when the error
    /// happened before any network I/O (nothing was fetched).
    pub fn fetch_result(&self) -> Option<&'static str> {
        match self {
            FetchError::BadUrl { .. } | FetchError::Secret { .. } => None,
            FetchError::Manifest { .. } | FetchError::Auth { .. } => Some("manifest_failure"),
            FetchError::Checksum { .. } => Some("checksum_mismatched"),
            FetchError::Invalid { .. }
            | FetchError::TooLarge { .. }
            | FetchError::Io { .. }
            | FetchError::Signature { .. } => Some("fetch_failure"),
            FetchError::Download { .. }
            | FetchError::Timeout { .. }
            | FetchError::Layout { .. }
            | FetchError::Blob { .. } => Some("download_failure"),
        }
    }

    /// The `reason` label of the NACK this failure causes: `signature` for a failed signature
    /// check, `fetch_failure` otherwise (Istio's conversion result).
    pub fn nack_reason(&self) -> &'static str {
        match self {
            FetchError::Signature { .. } => "signature",
            _ => "fetch_failure",
        }
    }

    /// Whether a background retry is worth it at all: not for a bad URL or an unusable pull
    /// secret, which only a new push fixes.
    pub fn is_transient(&self) -> bool {
        !matches!(self, FetchError::BadUrl { .. } | FetchError::Secret { .. })
    }

    /// Whether retrying soon cannot help: only a change at the registry or in the policy can
    /// fix it (signature policy, checksum mismatch, invalid Wasm, too large, a layout without a
    /// module, refused credentials). Such failures are checked again rarely; the others
    /// (unreachable, timed out, not found yet, cut off) back off and retry.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            FetchError::BadUrl { .. }
                | FetchError::Secret { .. }
                | FetchError::Signature { .. }
                | FetchError::Checksum { .. }
                | FetchError::Invalid { .. }
                | FetchError::TooLarge { .. }
                | FetchError::Layout { .. }
                | FetchError::Auth { .. }
        )
    }
}

/// A URL fit for logs and NACKs: no user-info, no query string (pre-signed URLs carry tokens).
pub fn redact(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        // Not parseable: drop anything after '?' or '#', and anything up to the last '@' after
        // the scheme (user-info), with or without "//" (parsers forgive a missing one).
        let no_query = url.split(['?', '#']).next().unwrap_or(url);
        let after_scheme = no_query
            .find("://")
            .map(|i| i + 3)
            .or_else(|| no_query.find(':').map(|i| i + 1));
        let cut = match (after_scheme, no_query.rfind('@')) {
            (Some(p), Some(a)) if a >= p => format!("{}{}", &no_query[..p], &no_query[a + 1..]),
            _ => no_query.to_owned(),
        };
        // Whatever a URL parser still reads as user-info goes too (found by fuzzing).
        return match reqwest::Url::parse(&cut) {
            Ok(again) if !again.username().is_empty() || again.password().is_some() => {
                redact(again.as_str())
            }
            _ => cut,
        };
    };
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?<redacted>");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{clip, redact, FetchError, MAX_REASON_BYTES};

    /// What a failure costs afterwards, as a table: never retried (a new push fixes it),
    /// rechecked rarely (only the registry or the policy can fix it), or retried with backoff.
    #[test]
    fn failure_classes() {
        let u = || "u".to_string();
        let r = || "r".to_string();
        for (e, transient, permanent) in [
            (
                FetchError::BadUrl {
                    url: u(),
                    reason: r(),
                },
                false,
                true,
            ),
            (
                FetchError::Secret {
                    url: u(),
                    reason: r(),
                },
                false,
                true,
            ),
            (
                FetchError::Signature {
                    url: u(),
                    reason: r(),
                },
                true,
                true,
            ),
            (
                FetchError::Checksum {
                    url: u(),
                    want: r(),
                    got: r(),
                    digest: None,
                },
                true,
                true,
            ),
            (
                FetchError::Invalid {
                    url: u(),
                    reason: r(),
                },
                true,
                true,
            ),
            (
                FetchError::TooLarge {
                    url: u(),
                    limit: 1,
                    what: r(),
                },
                true,
                true,
            ),
            (
                FetchError::Layout {
                    url: u(),
                    reason: r(),
                },
                true,
                true,
            ),
            (
                FetchError::Auth {
                    url: u(),
                    reason: r(),
                },
                true,
                true,
            ),
            (
                FetchError::Manifest {
                    url: u(),
                    reason: r(),
                },
                true,
                false,
            ),
            (
                FetchError::Download {
                    url: u(),
                    attempts: 1,
                    last: r(),
                },
                true,
                false,
            ),
            (
                FetchError::Blob {
                    url: u(),
                    reason: r(),
                },
                true,
                false,
            ),
            (
                FetchError::Io {
                    url: u(),
                    reason: r(),
                },
                true,
                false,
            ),
            (
                FetchError::Timeout {
                    url: u(),
                    timeout: std::time::Duration::ZERO,
                    stage: "s",
                },
                true,
                false,
            ),
        ] {
            assert_eq!(
                (e.is_transient(), e.is_permanent()),
                (transient, permanent),
                "{e}"
            );
        }
    }

    #[test]
    fn errors_are_clipped() {
        let long = "é".repeat(5000);
        let e = FetchError::Layout {
            url: "u".into(),
            reason: long,
        }
        .bounded()
        .to_string();
        assert!(e.len() < MAX_REASON_BYTES + 100, "{}", e.len());
        assert!(e.contains("bytes cut"), "{e}");
        assert_eq!(clip("short", 10), "short");
    }

    #[test]
    fn redacts_secrets() {
        assert_eq!(
            redact("https://u:p@h.example/x.wasm?sig=abc"),
            "https://h.example/x.wasm?<redacted>"
        );
        assert_eq!(redact("oci://reg:5000/a/b:v1"), "oci://reg:5000/a/b:v1");
        assert_eq!(redact("oci://user:pw@reg/a?x=1"), "oci://reg/a?<redacted>");
    }
}
