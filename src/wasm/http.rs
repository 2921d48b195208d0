//! HTTP(S) fetcher: bounded attempts with exponential backoff and jitter inside the caller's
//! deadline, retrying only transport errors and retryable statuses; the proxy environment
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`) is honoured by reqwest; redirects are followed by
//! hand under `guard`'s rules (TLS policy per hop, no https→http downgrade, no Referer, at most
//! 10, no loops) and every dial skips blocked addresses; the body is streamed into a file under
//! the size cap and hashed on the way, never held in memory.

use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;

use super::error::{redact, FetchError};
use super::growing::{Announcer, Signalling};
use super::guard::{self, Blocklist, GuardedResolver, MAX_REDIRECTS};
use super::tls::FetchTls;
use crate::errors::describe_reqwest;

/// Retry settings (Istio's WASM_HTTP_REQUEST_* meaning).
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub request_timeout: Duration,
    pub max_attempts: u32,
    pub max_bytes: u64,
    /// Addresses no download may dial.
    pub blocked: Blocklist,
}

pub struct HttpFetcher {
    secure: reqwest::Client,
    insecure: reqwest::Client,
    tls: FetchTls,
    opts: HttpOptions,
}

enum Attempt {
    Retry(String),
    Fatal(FetchError),
}

const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Backoff before attempt `n + 1` (n ≥ 1): 0.5 s × 1.5^(n-1), ±50 % jitter, capped at 60 s.
const BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff {
    initial: Duration::from_millis(500),
    factor: 1.5,
    max: BACKOFF_MAX,
    jitter: 0.5,
};

fn backoff(n: u32) -> Duration {
    BACKOFF.pause(n)
}

fn retryable_status(code: u16) -> bool {
    matches!(code, 408 | 429) || (code >= 500 && !matches!(code, 501 | 505 | 511))
}

impl HttpFetcher {
    pub fn new(tls: FetchTls, opts: HttpOptions) -> Result<Self, String> {
        let build = |insecure: bool| {
            let mut b = reqwest::Client::builder()
                .user_agent(concat!("ecds-agent/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .referer(false)
                .dns_resolver(std::sync::Arc::new(GuardedResolver(opts.blocked.clone())));
            for c in tls.roots() {
                b = b.add_root_certificate(c.clone());
            }
            if insecure {
                b = b.danger_accept_invalid_certs(true);
            }
            b.build().map_err(|e| format!("HTTP client: {e}"))
        };
        Ok(Self {
            secure: build(false)?,
            insecure: build(true)?,
            tls,
            opts,
        })
    }

    /// Downloads `url` (raw body, not unboxed) into `sink` before `deadline`; returns the
    /// body's sha256 (hex) and length.
    pub async fn fetch(
        &self,
        url: &reqwest::Url,
        deadline: Instant,
        sink: &std::fs::File,
        announcer: &Announcer,
    ) -> Result<(String, u64), FetchError> {
        let shown_io = redact(url.as_str());
        let io = |e: std::io::Error| FetchError::Io {
            url: shown_io.clone(),
            reason: format!("cannot write the download: {}", crate::errors::io_text(&e)),
        };
        let shown = redact(url.as_str());
        let total = deadline.saturating_duration_since(Instant::now());
        let mut last = String::from("no attempt made: the deadline had already passed");
        let mut attempts = 0;
        for n in 1..=self.opts.max_attempts {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            attempts = n;
            // Each attempt starts the file afresh. Writes go to the blocking pool in 1 MiB
            // pieces, not one hop per network chunk.
            let mut f = tokio::fs::File::from_std(sink.try_clone().map_err(io)?);
            f.set_len(0).await.map_err(io)?;
            f.rewind().await.map_err(io)?;
            let mut file = tokio::io::BufWriter::with_capacity(
                1 << 20,
                Signalling {
                    inner: f,
                    announcer: announcer.clone(),
                },
            );
            let outcome = self
                .attempt(
                    url,
                    &shown,
                    remaining.min(self.opts.request_timeout),
                    &mut file,
                    |size| announcer.announce_expected(size, sink),
                )
                .await;
            // A failed attempt's buffered bytes are dropped unwritten; one already on its way
            // to the disk is waited for, so it cannot land after the next truncation.
            let _ = file.get_mut().flush().await;
            if outcome.is_err() {
                // What was streamed of this attempt will not be the module.
                announcer.withdraw();
            }
            match outcome {
                Ok(body) => return Ok(body),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => {
                    tracing::debug!(url = %shown, attempt = n, error = %why, "download attempt failed");
                    last = why;
                }
            }
            if n == self.opts.max_attempts {
                break;
            }
            let pause = backoff(n);
            if Instant::now() + pause >= deadline {
                return Err(FetchError::Timeout {
                    url: shown,
                    timeout: total,
                    stage: "no time left for another attempt",
                });
            }
            tokio::time::sleep(pause).await;
        }
        Err(FetchError::Download {
            url: shown,
            attempts,
            last,
        })
    }

    /// The client for `u`'s host: verified TLS, or no verification for listed insecure hosts.
    fn client_for(&self, u: &reqwest::Url) -> &reqwest::Client {
        if self.tls.is_insecure(&guard::host_port(u)) {
            &self.insecure
        } else {
            &self.secure
        }
    }

    async fn attempt(
        &self,
        url: &reqwest::Url,
        shown: &str,
        timeout: Duration,
        file: &mut tokio::io::BufWriter<Signalling<tokio::fs::File>>,
        announce: impl FnOnce(u64),
    ) -> Result<(String, u64), Attempt> {
        let refused = |last: String| {
            Attempt::Fatal(FetchError::Download {
                url: shown.to_owned(),
                attempts: 1,
                last,
            })
        };
        let until = Instant::now() + timeout;
        let mut current = url.clone();
        let mut seen: Vec<reqwest::Url> = Vec::new();
        let resp = loop {
            guard::check_literal(&current, &self.opts.blocked).map_err(refused)?;
            let resp = self
                .client_for(&current)
                .get(current.clone())
                .timeout(until.saturating_duration_since(Instant::now()))
                .send()
                .await
                .map_err(|e| Attempt::Retry(describe_reqwest(&e)))?;
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            let Some(location) = location.filter(|_| resp.status().is_redirection()) else {
                break resp;
            };
            if seen.len() >= MAX_REDIRECTS {
                return Err(refused(format!("more than {MAX_REDIRECTS} redirects")));
            }
            seen.push(current.clone());
            current = guard::next_hop(&current, location, &self.tls, &seen).map_err(refused)?;
        };
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            let why = format!("HTTP status {status}");
            return Err(if retryable_status(status.as_u16()) {
                Attempt::Retry(why)
            } else {
                Attempt::Fatal(FetchError::Download {
                    url: shown.to_owned(),
                    attempts: 1,
                    last: why,
                })
            });
        }
        let limit = self.opts.max_bytes;
        let too_large = |what: String| {
            Attempt::Fatal(FetchError::TooLarge {
                url: shown.to_owned(),
                limit,
                what,
            })
        };
        if let Some(len) = resp.content_length().filter(|l| *l > limit) {
            return Err(too_large(format!("Content-Length {len}")));
        }
        let write_err = |e: std::io::Error| {
            Attempt::Fatal(FetchError::Io {
                url: shown.to_owned(),
                reason: format!("cannot write the download: {}", crate::errors::io_text(&e)),
            })
        };
        if let Some(size) = resp.content_length().filter(|l| *l > 0) {
            announce(size);
        }
        let mut hash = Sha256::new();
        let mut len: u64 = 0;
        let progress = crate::progress::start(shown, resp.content_length());
        let mut chunks = resp.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| Attempt::Retry(describe_reqwest(&e)))?;
            len += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
            if len > limit {
                return Err(too_large("body kept coming past the limit".into()));
            }
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(write_err)?;
        }
        file.flush().await.map_err(write_err)?;
        Ok((hex::encode(hash.finalize()), len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= Duration::from_millis(750));
        assert!(backoff(1) >= Duration::from_millis(250));
        assert!(backoff(40) <= BACKOFF_MAX);
    }

    #[test]
    fn statuses() {
        assert!(retryable_status(500) && retryable_status(503) && retryable_status(429));
        assert!(!retryable_status(501) && !retryable_status(404) && !retryable_status(401));
    }
}
