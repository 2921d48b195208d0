//! `Cache::get(url, opts) -> Module`: the one entry point that turns a module URL into a
//! verified local file.
//!
//! Order of work for a `get`:
//! 1. lookup without network: by the expected sha256 (module or OCI digest), else by the URL's
//!    last result when the pull policy allows reuse (IfNotPresent; Always with an unchanged
//!    resource version; `:latest`/untagged OCI means Always);
//! 2. otherwise join or start the single download for (URL, expected sha256, credentials) —
//!    N concurrent callers, one download; different modules download in parallel;
//! 3. OCI: manifest first, and a module already cached under that digest is reused without
//!    pulling the layer; then layer, extraction, checksum, validation, atomic store.
//!
//! Retention (pins, purge, LRU) lives in `retention`; this file is the path a request takes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use metrics::{counter, gauge, histogram};
use oci_client::secrets::RegistryAuth;
use serde::Serialize;
use tokio::time::Instant;

use super::error::{redact, FetchError};
use super::http::HttpFetcher;
use super::lease::Lease;
use super::oci::{OciFetcher, Resolved};
use super::options::{CacheConfig, GetOptions, Matched, Module, PullPolicy};
use super::store::{now_ms, now_secs, sha256_file, Index, ModuleEntry, Store, TempFile};
use super::unbox::Boxing;
use super::url::{ModuleUrl, OciRef};
use super::{secret, unbox, verify};
use crate::admin::metrics as m;

/// The last failure seen for a URL (debug page).
#[derive(Debug, Clone, Serialize)]
pub struct FailureInfo {
    pub error: String,
    /// Unix seconds.
    pub at: u64,
    /// Unix seconds of the next background retry, when one is scheduled.
    pub next_retry: Option<u64>,
    pub resources: Vec<String>,
}

/// One cached module as the debug page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleView {
    pub sha256: String,
    pub path: PathBuf,
    pub urls: Vec<String>,
    pub oci_digests: Vec<String>,
    pub size: u64,
    pub fetched_at: u64,
    pub last_used: u64,
    /// `resource (stream N)` for each live ECDS resource using it.
    pub used_by: Vec<String>,
    pub last_error: Option<FailureInfo>,
}

/// A consistent snapshot of the cache for the admin pages.
#[derive(Debug, Clone, Serialize)]
pub struct CacheView {
    pub cache_dir: PathBuf,
    pub total_bytes: u64,
    pub budget_bytes: u64,
    pub modules: Vec<ModuleView>,
    pub failures: BTreeMap<String, FailureInfo>,
}

type Flight = Shared<BoxFuture<'static, Result<Module, FetchError>>>;
type FlightKey = (String, Option<String>, Option<String>);

#[derive(Default)]
pub(super) struct State {
    pub(super) index: Index,
    /// (owner, resource name) → module sha256.
    pub(super) pins: HashMap<(u64, String), String>,
    /// Bumped whenever the pinned set changes (orders its publication).
    pub(super) pin_generation: u64,
    /// One download per (URL, expected checksum, pull-secret hash): callers with different
    /// credentials never share a download (nor its auth result).
    flights: HashMap<FlightKey, Flight>,
    failures: HashMap<String, FailureInfo>,
    pub(super) dirty: bool,
}

impl State {
    pub(super) fn total_bytes(&self) -> u64 {
        self.index.modules.values().map(|e| e.size).sum()
    }
}

pub struct Cache {
    pub(super) cfg: CacheConfig,
    pub(super) store: Store,
    http: HttpFetcher,
    oci: OciFetcher,
    /// This process's pins as other processes see them.
    pub(super) lease: Arc<Lease>,
    state: Mutex<State>,
    save_lock: tokio::sync::Mutex<()>,
}

/// What a fetch produced: a module already in the cache (OCI digest known), or new bytes.
enum Fetched {
    Cached(Module),
    New {
        /// The unboxed module, not validated yet, in a temp file.
        file: TempFile,
        sha: String,
        digests: Vec<String>,
        matched: Option<Matched>,
    },
}

fn normalize_sha(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    if s.is_empty() || s == "nil" {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

fn io_err(url: &str, reason: String) -> FetchError {
    FetchError::Io {
        url: url.to_owned(),
        reason,
    }
}

impl Cache {
    /// Opens the cache directory (re-indexing what a previous run left) without network I/O.
    pub async fn open(cfg: CacheConfig) -> Result<Arc<Cache>, String> {
        let dir = cfg.dir.clone();
        let (store, index, report, lease) = tokio::task::spawn_blocking(move || {
            let (store, index, report) = Store::open(&dir)?;
            let lease = Lease::create(&dir)?;
            Ok::<_, String>((store, index, report, lease))
        })
        .await
        .map_err(|e| format!("cache open task failed: {e}"))??;
        tracing::info!(
            dir = %cfg.dir.display(),
            modules = report.kept + report.adopted,
            adopted = report.adopted,
            dropped_corrupt = report.dropped_corrupt,
            removed_partials = report.removed_partials,
            "module cache opened"
        );
        let http = HttpFetcher::new(cfg.tls.clone(), cfg.http.clone())?;
        let oci = OciFetcher::new(cfg.tls.clone(), cfg.max_module_bytes);
        let cache = Arc::new(Cache {
            cfg,
            store,
            http,
            oci,
            lease: Arc::new(lease),
            state: Mutex::new(State {
                index,
                dirty: true,
                ..Default::default()
            }),
            save_lock: tokio::sync::Mutex::new(()),
        });
        cache.publish_gauges();
        cache.save().await;
        Ok(cache)
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn publish_gauges(&self) {
        let st = self.lock();
        gauge!(m::CACHE_ENTRIES).set(st.index.modules.len() as f64);
        gauge!(m::CACHE_BYTES).set(st.total_bytes() as f64);
    }

    /// Persists the index if it changed (serialised; never under the state lock).
    pub async fn save(&self) {
        let _g = self.save_lock.lock().await;
        let snapshot = {
            let mut st = self.lock();
            if !st.dirty {
                return;
            }
            st.dirty = false;
            st.index.clone()
        };
        let store = self.store.clone();
        let saved: Vec<String> = snapshot.modules.keys().cloned().collect();
        match tokio::task::spawn_blocking(move || store.merge_save(&snapshot)).await {
            Ok(Ok(merged)) => {
                let mut st = self.lock();
                // What another process removed meanwhile goes here too.
                for sha in saved.iter().filter(|s| !merged.modules.contains_key(*s)) {
                    st.index.modules.remove(sha);
                    st.index.urls.retain(|_, u| &u.sha256 != sha);
                }
                st.index.absorb(merged);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot save the cache index; will retry");
                self.lock().dirty = true;
            }
            Err(e) => tracing::warn!(error = %e, "cache index save task failed"),
        }
    }

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

    /// After waiting for another process: the module it fetched, if it is what we need.
    async fn fetched_meanwhile(
        &self,
        url: &str,
        expected: Option<&str>,
        since_ms: u64,
    ) -> Option<Module> {
        let store = self.store.clone();
        let disk = tokio::task::spawn_blocking(move || store.read_index())
            .await
            .ok()?;
        let mut st = self.lock();
        st.index.absorb(disk);
        let (sha, matched) = match expected {
            Some(e) => find_by_checksum(&st.index, e)?,
            None => {
                let u = st
                    .index
                    .urls
                    .get(url)
                    .filter(|u| u.fetched_at_ms >= since_ms)?;
                (u.sha256.clone(), None)
            }
        };
        self.cached(&mut st, &sha, matched)
    }

    /// The cached module `sha`, if its file is still there (a vanished file drops the entry).
    fn cached(&self, st: &mut State, sha: &str, matched: Option<Matched>) -> Option<Module> {
        let entry = st.index.modules.get(sha)?;
        let path = self.store.module_path(sha);
        if !path.exists() {
            st.index.modules.remove(sha);
            st.dirty = true;
            return None;
        }
        Some(Module {
            path,
            sha256: sha.to_owned(),
            oci_digest: entry.oci_digests.iter().next().cloned(),
            size: entry.size,
            matched,
            fetched: false,
        })
    }

    /// Turns `url` into a verified local module file.
    pub async fn get(self: &Arc<Self>, url: &str, opts: GetOptions) -> Result<Module, FetchError> {
        let parsed = ModuleUrl::parse(url)?;
        let shown = redact(url);
        let expected = expected_checksum(&parsed, opts.sha256.as_deref(), &shown)?;

        let hit = self.lookup(url, &parsed, expected.as_deref(), &opts);
        counter!(m::CACHE_LOOKUP_COUNT, "hit" => if hit.is_some() { "true" } else { "false" })
            .increment(1);
        if let Some(module) = hit {
            self.save().await;
            return Ok(module);
        }

        let flight = self.flight(url, parsed, expected, &opts);
        let result = match tokio::time::timeout(opts.timeout, flight).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout {
                url: shown.clone(),
                timeout: opts.timeout,
                stage: "waiting for the download",
            }),
        };
        {
            let mut st = self.lock();
            match &result {
                Ok(module) => {
                    record_url(&mut st, url, module, Some(&opts));
                    st.failures.remove(&shown);
                }
                Err(e) => {
                    let entry = st.failures.entry(shown).or_insert_with(|| FailureInfo {
                        error: String::new(),
                        at: 0,
                        next_retry: None,
                        resources: vec![],
                    });
                    entry.error = e.to_string();
                    entry.at = now_secs();
                    if !opts.resource_name.is_empty()
                        && !entry.resources.contains(&opts.resource_name)
                    {
                        entry.resources.push(opts.resource_name.clone());
                    }
                }
            }
        }
        self.save().await;
        result
    }

    /// Lookup #1: no network.
    fn lookup(
        &self,
        url: &str,
        parsed: &ModuleUrl,
        expected: Option<&str>,
        opts: &GetOptions,
    ) -> Option<Module> {
        let mut st = self.lock();
        let (sha, matched) = match expected {
            Some(exp) => find_by_checksum(&st.index, exp)?,
            None => {
                let u = st.index.urls.get(url)?;
                let reuse = match effective_policy(parsed, opts) {
                    PullPolicy::Always => {
                        u.versions.get(&opts.resource_name) == Some(&opts.resource_version)
                    }
                    _ => true,
                };
                if !reuse {
                    return None;
                }
                (u.sha256.clone(), None)
            }
        };
        let module = self.cached(&mut st, &sha, matched)?;
        record_url(&mut st, url, &module, Some(opts));
        Some(module)
    }

    /// Joins the download in flight for the same key, or starts it. The download runs on its
    /// own task, so a caller that gives up does not cancel it for the others.
    fn flight(
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
        let secret = opts.pull_secret.clone();
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
                    secret,
                    deadline,
                    since_ms,
                )
                .await;
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
        secret: Option<Vec<u8>>,
        deadline: Instant,
        since_ms: u64,
    ) -> Result<Module, FetchError> {
        let shown = redact(url);
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
        if let Some(module) = self.fetched_meanwhile(url, expected, since_ms).await {
            return Ok(module);
        }
        let fetched = match parsed {
            ModuleUrl::Http(u) => self.fetch_http(u, &shown, expected, deadline).await?,
            ModuleUrl::Oci(r) => {
                self.fetch_oci(r, &shown, expected, secret.as_deref(), deadline)
                    .await?
            }
        };
        let module = match fetched {
            Fetched::Cached(module) => module,
            Fetched::New {
                file,
                sha,
                digests,
                matched,
            } => {
                self.store_module(url, &shown, file, sha, digests, matched)
                    .await?
            }
        };
        // Make the result visible on disk before the lock is released.
        {
            let mut st = self.lock();
            record_url(&mut st, url, &module, None);
            st.index
                .urls
                .entry(url.to_owned())
                .or_default()
                .fetched_at_ms = now_ms();
            st.dirty = true;
        }
        self.save().await;
        Ok(module)
    }

    async fn fetch_http(
        &self,
        u: &reqwest::Url,
        shown: &str,
        expected: Option<&str>,
        deadline: Instant,
    ) -> Result<Fetched, FetchError> {
        let max = self.cfg.max_module_bytes;
        let raw = self.temp(shown, "download").await?;
        let (raw_sha, _) = self.http.fetch(u, deadline, &raw.file).await?;
        let store = self.store.clone();
        let (file, sha) = tokio::task::spawn_blocking(move || {
            let module = unbox::unbox(&store, raw, Boxing::Detect, max)?;
            let (sha, _) = sha256_file(&module.path)
                .map_err(|e| format!("cannot read {}: {e}", module.path.display()))?;
            Ok::<_, String>((module, sha))
        })
        .await
        .map_err(|e| io_err(shown, e.to_string()))?
        .map_err(|reason| FetchError::Invalid {
            url: shown.to_owned(),
            reason,
        })?;
        let matched = match expected {
            None => None,
            Some(e) if e == sha => Some(Matched::ModuleSha256),
            Some(e) if e == raw_sha => Some(Matched::RawBodySha256),
            Some(e) => {
                return Err(FetchError::Checksum {
                    url: shown.to_owned(),
                    want: e.to_owned(),
                    got: sha,
                    digest: None,
                })
            }
        };
        Ok(Fetched::New {
            file,
            sha,
            digests: vec![],
            matched,
        })
    }

    /// A new temp file in the cache (created off the async threads).
    async fn temp(&self, shown: &str, label: &'static str) -> Result<TempFile, FetchError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.temp(label, 0o644))
            .await
            .map_err(|e| io_err(shown, e.to_string()))?
            .map_err(|reason| io_err(shown, reason))
    }

    async fn fetch_oci(
        &self,
        r: &OciRef,
        shown: &str,
        expected: Option<&str>,
        secret: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<Fetched, FetchError> {
        let total = deadline.saturating_duration_since(Instant::now());
        let timeout = |stage| FetchError::Timeout {
            url: shown.to_owned(),
            timeout: total,
            stage,
        };
        let auth = match secret {
            None => RegistryAuth::Anonymous,
            Some(s) => secret::auth_for(s, &r.registry).map_err(|reason| FetchError::Secret {
                url: shown.to_owned(),
                reason,
            })?,
        };
        let resolved = tokio::time::timeout_at(deadline, self.oci.resolve(shown, r, auth))
            .await
            .map_err(|_| timeout("fetching the manifest"))??;

        // Lookup #2: this manifest's module may already be here (no layer pull).
        if let Some(module) = self.cached_by_manifest(&resolved, expected) {
            counter!(m::CACHE_LOOKUP_COUNT, "hit" => "true").increment(1);
            return Ok(Fetched::Cached(module));
        }
        let file =
            tokio::time::timeout_at(deadline, self.oci.download(shown, &resolved, &self.store))
                .await
                .map_err(|_| timeout("pulling the layer"))??;
        let (file, sha) = tokio::task::spawn_blocking(move || {
            sha256_file(&file.path).map(|(sha, _)| (file, sha))
        })
        .await
        .map_err(|e| io_err(shown, format!("hash task failed: {e}")))?
        .map_err(|e| io_err(shown, format!("cannot read the module: {e}")))?;
        let matched = match expected {
            None => None,
            Some(e) if e == sha => Some(Matched::ModuleSha256),
            Some(e) => Some(
                digest_match(&resolved, e).ok_or_else(|| FetchError::Checksum {
                    url: shown.to_owned(),
                    want: e.to_owned(),
                    got: sha.clone(),
                    digest: Some(resolved.digest.clone()),
                })?,
            ),
        };
        let mut digests = vec![resolved.digest.clone()];
        digests.extend(resolved.index_digest.clone());
        Ok(Fetched::New {
            file,
            sha,
            digests,
            matched,
        })
    }

    /// The cached module whose OCI digest is `resolved`'s, if it satisfies `expected`.
    fn cached_by_manifest(&self, resolved: &Resolved, expected: Option<&str>) -> Option<Module> {
        let mut st = self.lock();
        let (sha, _) = find_by_checksum(&st.index, resolved.digest.trim_start_matches("sha256:"))?;
        let matched = match expected {
            None => None,
            Some(e) if e == sha => Some(Matched::ModuleSha256),
            Some(e) => Some(digest_match(resolved, e)?),
        };
        let mut module = self.cached(&mut st, &sha, matched)?;
        module.oci_digest = Some(resolved.digest.clone());
        Some(module)
    }

    /// Validates and writes a new module, then indexes it.
    async fn store_module(
        &self,
        url: &str,
        shown: &str,
        file: TempFile,
        sha: String,
        digests: Vec<String>,
        matched: Option<Matched>,
    ) -> Result<Module, FetchError> {
        let max = self.cfg.max_module_bytes;
        let size = file
            .file
            .metadata()
            .map_err(|e| io_err(shown, format!("cannot stat the module: {e}")))?
            .len();
        if size > max {
            return Err(FetchError::TooLarge {
                url: shown.to_owned(),
                limit: max,
                what: format!("module is {size} bytes"),
            });
        }
        let store = self.store.clone();
        let sha2 = sha.clone();
        let written = tokio::task::spawn_blocking(move || {
            verify::validate_file(&file.path).map_err(|r| (true, r))?;
            store.persist_module(file, &sha2).map_err(|r| (false, r))
        })
        .await
        .map_err(|e| io_err(shown, e.to_string()))?;
        let path = written.map_err(|(invalid, reason)| {
            if invalid {
                FetchError::Invalid {
                    url: shown.to_owned(),
                    reason,
                }
            } else {
                io_err(shown, reason)
            }
        })?;
        let now = now_secs();
        {
            let mut st = self.lock();
            let entry = st
                .index
                .modules
                .entry(sha.clone())
                .or_insert_with(|| ModuleEntry {
                    size,
                    fetched_at: now,
                    ..Default::default()
                });
            entry.last_used = now;
            entry.urls.insert(url.to_owned());
            entry.oci_digests.extend(digests.iter().cloned());
            st.dirty = true;
        }
        self.enforce_budget(&sha).await;
        self.publish_gauges();
        Ok(Module {
            path,
            sha256: sha,
            oci_digest: digests.into_iter().next(),
            size,
            matched,
            fetched: true,
        })
    }

    /// Notes when the next background retry for a URL will run (debug page).
    pub fn note_retry(&self, url: &str, next_retry_in: Duration) {
        let mut st = self.lock();
        if let Some(f) = st.failures.get_mut(&redact(url)) {
            f.next_retry = Some(now_secs() + next_retry_in.as_secs());
        }
    }

    /// A snapshot for the admin pages: modules, their URLs, digests, users and last errors.
    pub fn view(&self) -> CacheView {
        let st = self.lock();
        let mut users: HashMap<&str, Vec<String>> = HashMap::new();
        for ((owner, name), sha) in &st.pins {
            users
                .entry(sha.as_str())
                .or_default()
                .push(format!("{name} (stream {owner})"));
        }
        let modules = st
            .index
            .modules
            .iter()
            .map(|(sha, e)| {
                let urls: Vec<String> = e.urls.iter().map(|u| redact(u)).collect();
                let mut used_by = users.get(sha.as_str()).cloned().unwrap_or_default();
                used_by.sort();
                ModuleView {
                    sha256: sha.clone(),
                    path: self.store.module_path(sha),
                    last_error: urls.iter().find_map(|u| st.failures.get(u)).cloned(),
                    urls,
                    oci_digests: e.oci_digests.iter().cloned().collect(),
                    size: e.size,
                    fetched_at: e.fetched_at,
                    last_used: e.last_used,
                    used_by,
                }
            })
            .collect();
        CacheView {
            cache_dir: self.cfg.dir.clone(),
            total_bytes: st.total_bytes(),
            budget_bytes: self.cfg.max_cache_bytes,
            modules,
            failures: st
                .failures
                .iter()
                .map(|(u, f)| (u.clone(), f.clone()))
                .collect(),
        }
    }
}

/// The pull policy a get follows: unspecified means Always for `:latest` and untagged OCI.
fn effective_policy(parsed: &ModuleUrl, opts: &GetOptions) -> PullPolicy {
    match opts.pull_policy {
        PullPolicy::Unspecified if parsed.is_latest() => PullPolicy::Always,
        p => p,
    }
}

/// `now + d`, saturating far in the future instead of overflowing the clock.
pub(super) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// The checksum a get must satisfy: `sha256` given, else a digest pinned in the URL.
fn expected_checksum(
    parsed: &ModuleUrl,
    sha256: Option<&str>,
    shown: &str,
) -> Result<Option<String>, FetchError> {
    let bad = |reason: String| FetchError::BadUrl {
        url: shown.to_owned(),
        reason,
    };
    match sha256.and_then(normalize_sha) {
        None => Ok(parsed.pinned_digest()),
        Some(s) if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(bad(format!("sha256 {s:?} is not 64 hex digits")))
        }
        Some(s) => match parsed.pinned_digest() {
            Some(pinned) if pinned != s => Err(bad(format!(
                "sha256 {s} differs from the digest in the URL ({pinned})"
            ))),
            _ => Ok(Some(s)),
        },
    }
}

/// Which OCI digest of `resolved` equals `hex`, if any.
fn digest_match(resolved: &Resolved, hex: &str) -> Option<Matched> {
    if resolved.digest.trim_start_matches("sha256:") == hex {
        Some(Matched::ManifestDigest)
    } else if resolved
        .index_digest
        .as_deref()
        .map(|d| d.trim_start_matches("sha256:"))
        == Some(hex)
    {
        Some(Matched::IndexDigest)
    } else {
        None
    }
}

/// Metrics and a log line for one finished download.
fn record_fetch(url: &str, result: &Result<Module, FetchError>, started: Instant) {
    match result {
        Ok(m) if m.fetched => {
            counter!(m::REMOTE_FETCH_COUNT, "result" => "success").increment(1);
            histogram!(m::REMOTE_FETCH_DURATION).record(started.elapsed().as_secs_f64());
            histogram!(m::REMOTE_FETCH_BYTES).record(m.size as f64);
            tracing::info!(url = %redact(url), sha256 = %m.sha256, size = m.size,
                ms = started.elapsed().as_millis() as u64, "module fetched");
        }
        Ok(_) => {}
        Err(e) => {
            if let Some(r) = e.fetch_result() {
                counter!(m::REMOTE_FETCH_COUNT, "result" => r).increment(1);
            }
            tracing::warn!(error = %e, "module fetch failed");
        }
    }
}

/// A module whose bytes or OCI digest equal `hex`.
fn find_by_checksum(index: &Index, hex: &str) -> Option<(String, Option<Matched>)> {
    if index.modules.contains_key(hex) {
        return Some((hex.to_owned(), Some(Matched::ModuleSha256)));
    }
    let digest = format!("sha256:{hex}");
    index
        .modules
        .iter()
        .find(|(_, e)| e.oci_digests.contains(&digest))
        .map(|(sha, _)| (sha.clone(), Some(Matched::ManifestDigest)))
}

/// Records `url`'s result (and, with `opts`, the resource version it was asked for).
fn record_url(st: &mut State, url: &str, module: &Module, opts: Option<&GetOptions>) {
    let entry = st.index.urls.entry(url.to_owned()).or_default();
    let mut changed = entry.sha256 != module.sha256;
    entry.sha256 = module.sha256.clone();
    if module.oci_digest.is_some() {
        entry.oci_digest = module.oci_digest.clone();
    }
    if let Some(opts) = opts.filter(|o| {
        !o.resource_name.is_empty()
            && entry.versions.get(&o.resource_name) != Some(&o.resource_version)
    }) {
        entry
            .versions
            .insert(opts.resource_name.clone(), opts.resource_version.clone());
        changed = true;
    }
    if let Some(e) = st.index.modules.get_mut(&module.sha256) {
        e.last_used = now_secs();
        if e.urls.insert(url.to_owned()) {
            changed = true;
        }
    }
    if changed {
        st.dirty = true;
    }
}
