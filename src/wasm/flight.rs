//! Single-flight: one download per module, inside this process and across every process
//! sharing the cache directory.
//!
//! * In-process: concurrent gets with the same (URL, expected checksum, pull-secret hash) share
//!   one download task; callers with different credentials never share one (nor its result).
//!   The download runs on its own task, so a caller that gives up does not cancel it.
//! * Across processes: one lock file per download key (`locks/<key>.lock`, `flock`), held until
//!   the result is on disk; whoever takes the lock first checks the on-disk index for a result
//!   another process recorded meanwhile.

use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use super::cache::{io_err, record_fetch, Cache};
use super::error::{redact, FetchError};
use super::index::{effective_policy, find_by_checksum};
use super::options::{GetOptions, Module, PullPolicy};
use super::pipeline::Fetched;
use super::store::now_ms;
use super::url::ModuleUrl;
use super::verify;

pub(super) type Flight = Shared<BoxFuture<'static, Result<Module, FetchError>>>;
pub(super) type FlightKey = (String, Option<String>, Option<String>);

/// `now + d`, saturating far in the future instead of overflowing the clock.
pub(super) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

impl Cache {
    /// Waits for the directory-wide lock of one download.
    async fn lock_download(
        &self,
        key: &str,
        deadline: Instant,
        shown: &str,
    ) -> Result<std::fs::File, FetchError> {
        let budget = deadline.saturating_duration_since(Instant::now());
        loop {
            let (store, k) = (self.store.clone(), key.to_owned());
            let attempt = tokio::task::spawn_blocking(move || store.try_lock_download(&k))
                .await
                .unwrap_or_else(|e| Err(format!("lock task failed: {e}")));
            match attempt {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(reason) => return Err(io_err(shown, reason)),
            }
            if Instant::now() >= deadline {
                return Err(FetchError::Timeout {
                    url: shown.to_owned(),
                    timeout: budget,
                    stage: "waiting for another process downloading the same module",
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// After waiting for another process: the module it fetched, if it is what we need and
    /// the gate lets this request have it without asking the registry.
    async fn fetched_meanwhile(
        &self,
        url: &str,
        parsed: &ModuleUrl,
        expected: Option<&str>,
        since_ms: u64,
        opts: &GetOptions,
    ) -> Option<Module> {
        let store = self.store.clone();
        let disk = tokio::task::spawn_blocking(move || store.read_index())
            .await
            .ok()?;
        let (sha, matched, same_url) = {
            let mut st = self.lock();
            st.index.absorb(disk);
            match expected {
                Some(e) => {
                    let (sha, matched) = find_by_checksum(&st.index, e)?;
                    let same = st.index.url(url).is_some_and(|u| u.sha256 == sha);
                    (sha, matched, same)
                }
                None => {
                    let u = st.index.url(url).filter(|u| u.fetched_at_ms >= since_ms)?;
                    (u.sha256.clone(), None, true)
                }
            }
        };
        let mut hit = self.cached(&sha, matched).await?;
        hit.same_url = same_url;
        self.gate(parsed, hit, opts, &redact(url), false)
            .await
            .ok()
            .flatten()
    }

    /// Joins the download in flight for the same key, or starts it. The download runs on its
    /// own task, so a caller that gives up does not cancel it for the others.
    pub(super) fn flight(
        self: &Arc<Self>,
        url: &str,
        parsed: ModuleUrl,
        expected: Option<String>,
        opts: &GetOptions,
    ) -> Flight {
        let secret_id = opts.pull_secret.as_deref().map(verify::sha256_hex);
        let key = (url.to_owned(), expected.clone(), secret_id);
        let mut st = self.lock();
        if let Some(f) = st.flights.get(&key) {
            return f.clone();
        }
        let this = self.clone();
        let url_owned = url.to_owned();
        let opts_owned = opts.clone();
        let deadline = deadline_after(opts.timeout);
        // What another process fetched may be reused as a cache hit would be: any time, or under
        // Always only from now on.
        let since_ms = match effective_policy(&parsed, opts) {
            PullPolicy::Always => now_ms(),
            _ => 0,
        };
        let key2 = key.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = this
                .fill(
                    &url_owned,
                    &parsed,
                    expected.as_deref(),
                    &opts_owned,
                    deadline,
                    since_ms,
                )
                .await
                .map_err(FetchError::bounded);
            this.lock().flights.remove(&key2);
            record_fetch(&url_owned, &result, started);
            result
        });
        let shown = redact(url);
        let fut: BoxFuture<'static, Result<Module, FetchError>> = async move {
            task.await
                .unwrap_or_else(|e| Err(io_err(&shown, format!("fetch task failed: {e}"))))
        }
        .boxed();
        let shared = fut.shared();
        st.flights.insert(key, shared.clone());
        shared
    }

    /// Fetches, verifies and stores one module.
    async fn fill(
        self: &Arc<Self>,
        url: &str,
        parsed: &ModuleUrl,
        expected: Option<&str>,
        opts: &GetOptions,
        deadline: Instant,
        since_ms: u64,
    ) -> Result<Module, FetchError> {
        let shown = redact(url);
        let secret = opts.pull_secret.clone();
        // Other processes sharing the directory (agents, `ecds-agent fetch`) download a module
        // once too: one lock file per download key, held until the result is on disk. Once the
        // lock is ours, the index on disk says whether another process got there first (while
        // we waited, or between our lookup and now).
        let key = verify::sha256_hex(
            format!(
                "{url}\n{expected:?}\n{:?}",
                secret.as_deref().map(verify::sha256_hex)
            )
            .as_bytes(),
        );
        let _lock = self.lock_download(&key, deadline, &shown).await?;
        if let Some(module) = self
            .fetched_meanwhile(url, parsed, expected, since_ms, opts)
            .await
        {
            return Ok(module);
        }
        let (fetched, provenance) = match parsed {
            ModuleUrl::Http(u) => (self.fetch_http(u, &shown, expected, deadline).await?, None),
            ModuleUrl::Oci(r) => {
                let (f, p) = self
                    .fetch_oci(r, &shown, expected, secret.as_deref(), deadline)
                    .await?;
                (f, Some(p))
            }
        };
        let module = match fetched {
            Fetched::Cached(module) => module,
            Fetched::New(new) => self.store_module(url, &shown, new).await?,
        };
        // What this download showed: the signature that admitted it, whether the repository
        // wanted credentials, and that these credentials may pull it.
        if let Some(p) = provenance {
            if let Some((digest, fingerprint)) = &p.signed {
                self.note_signature(&module.sha256, digest, fingerprint);
            }
            self.note_access(&module.sha256, &p.repo, p.access);
            self.proofs_lock()
                .insert(&p.cred, &p.repo, std::time::Instant::now());
        }
        // Make the result visible on disk before the lock is released.
        {
            let mut st = self.lock();
            self.record(&mut st, url, &module, None);
            st.index.url_mut(url).fetched_at_ms = now_ms();
            st.changed();
        }
        self.save().await;
        Ok(module)
    }
}
