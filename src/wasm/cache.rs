//! `Cache::get(url, opts) -> Module`: the one entry point that turns a module URL into a
//! verified local file.
//!
//! Order of work for a `get`:
//! 1. lookup without network: by the expected sha256 (module or OCI digest), else by the URL's
//!    last result when the pull policy allows reuse (IfNotPresent; Always with an unchanged
//!    resource version; `:latest`/untagged OCI means Always);
//! 2. otherwise join or start the single download for (URL, expected sha256) — N concurrent
//!    callers, one download; different modules download in parallel;
//! 3. OCI: manifest first, and a module already cached under that digest is reused without
//!    pulling the layer; then layer, extraction, checksum, validation, atomic store.
//!
//! The cache also tracks which modules live ECDS resources use (pins): purge and LRU eviction
//! never remove a pinned module.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use metrics::{counter, gauge, histogram};
use oci_client::secrets::RegistryAuth;
use serde::Serialize;
use tokio::time::Instant;

use super::error::{redact, FetchError};
use super::http::{HttpFetcher, HttpOptions};
use super::oci::OciFetcher;
use super::store::{now_secs, Index, ModuleEntry, Store};
use super::tls::FetchTls;
use super::url::ModuleUrl;
use super::{secret, unbox, verify};
use crate::admin::metrics as m;

/// Istio's pull policies (`ISTIO_META_WASM_IMAGE_PULL_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum PullPolicy {
    #[default]
    Unspecified,
    IfNotPresent,
    Always,
}

impl PullPolicy {
    /// Istio's lookup: unknown values mean unspecified.
    pub fn from_env(v: &str) -> Self {
        match v {
            "IfNotPresent" => PullPolicy::IfNotPresent,
            "Always" => PullPolicy::Always,
            _ => PullPolicy::Unspecified,
        }
    }
}

/// What a caller knows about the module it wants.
#[derive(Clone, Default)]
pub struct GetOptions {
    /// Expected sha256 (hex, optionally `sha256:`-prefixed) of the module, or for OCI of the
    /// image manifest or index.
    pub sha256: Option<String>,
    pub resource_name: String,
    pub resource_version: String,
    pub pull_policy: PullPolicy,
    /// Raw `.dockerconfigjson` bytes.
    pub pull_secret: Option<Vec<u8>>,
    /// Deadline for the whole fetch.
    pub timeout: Duration,
}

impl std::fmt::Debug for GetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetOptions")
            .field("sha256", &self.sha256)
            .field("resource_name", &self.resource_name)
            .field("resource_version", &self.resource_version)
            .field("pull_policy", &self.pull_policy)
            .field(
                "pull_secret",
                &self.pull_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Which expected checksum a module matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matched {
    ModuleSha256,
    ManifestDigest,
    IndexDigest,
    RawBodySha256,
}

/// A verified module on local disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Module {
    pub path: PathBuf,
    /// sha256 (hex) of the module bytes.
    pub sha256: String,
    /// OCI image manifest digest it came from, if any.
    pub oci_digest: Option<String>,
    pub size: u64,
    /// Which expected checksum matched, when one was given.
    pub matched: Option<Matched>,
    /// Whether this call went to the network.
    pub fetched: bool,
}

/// Cache settings.
#[derive(Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub expiry: Duration,
    pub purge_interval: Duration,
    pub max_module_bytes: u64,
    /// 0 = no budget.
    pub max_cache_bytes: u64,
    pub http: HttpOptions,
    pub tls: FetchTls,
}

impl CacheConfig {
    pub fn from_args(a: &crate::config::CacheArgs) -> Result<Self, String> {
        Ok(Self {
            dir: a.cache_dir.clone(),
            expiry: a.effective_expiry(),
            purge_interval: a.effective_purge_interval(),
            max_module_bytes: a.max_module_bytes,
            max_cache_bytes: a.cache_max_bytes,
            http: HttpOptions {
                request_timeout: a.http_timeout,
                max_attempts: a.http_max_attempts,
                max_bytes: a.max_module_bytes,
            },
            tls: FetchTls::new(a.fetch_ca.as_deref(), a.insecure_list())?,
        })
    }
}

/// The last failure seen for a URL, for the debug page.
#[derive(Debug, Clone, Serialize)]
pub struct FailureInfo {
    pub error: String,
    pub at: u64,
    pub next_retry: Option<u64>,
    pub resources: Vec<String>,
}

type Flight = Shared<BoxFuture<'static, Result<Module, FetchError>>>;

#[derive(Default)]
struct State {
    index: Index,
    /// (owner, resource name) → module sha256.
    pins: HashMap<(u64, String), String>,
    /// One download per (URL, expected checksum, pull-secret hash): callers with different
    /// credentials never share a download (nor its auth result).
    flights: HashMap<(String, Option<String>, Option<String>), Flight>,
    failures: HashMap<String, FailureInfo>,
    dirty: bool,
}

impl State {
    fn pinned(&self) -> HashSet<&str> {
        self.pins.values().map(String::as_str).collect()
    }
    fn total_bytes(&self) -> u64 {
        self.index.modules.values().map(|e| e.size).sum()
    }
}

pub struct Cache {
    cfg: CacheConfig,
    store: Store,
    http: HttpFetcher,
    oci: OciFetcher,
    state: Mutex<State>,
    save_lock: tokio::sync::Mutex<()>,
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
        let (store, index, report) = tokio::task::spawn_blocking(move || Store::open(&dir))
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

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_gauges(&self) {
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
        match tokio::task::spawn_blocking(move || store.save_index(&snapshot)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot save the cache index; will retry");
                self.lock().dirty = true;
            }
            Err(e) => tracing::warn!(error = %e, "cache index save task failed"),
        }
    }

    /// Turns `url` into a verified local module file.
    pub async fn get(self: &Arc<Self>, url: &str, opts: GetOptions) -> Result<Module, FetchError> {
        let parsed = ModuleUrl::parse(url)?;
        let shown = redact(url);
        let expected = match opts.sha256.as_deref().and_then(normalize_sha) {
            Some(s) if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                return Err(FetchError::BadUrl {
                    url: shown,
                    reason: format!("sha256 {s:?} is not 64 hex digits"),
                })
            }
            Some(s) => {
                if let Some(pinned) = parsed.pinned_digest() {
                    if pinned != s {
                        return Err(FetchError::BadUrl {
                            url: shown,
                            reason: format!(
                                "sha256 {s} differs from the digest in the URL ({pinned})"
                            ),
                        });
                    }
                }
                Some(s)
            }
            None => parsed.pinned_digest(),
        };

        let hit = self.lookup(url, &parsed, expected.as_deref(), &opts);
        counter!(m::CACHE_LOOKUP_COUNT, "hit" => if hit.is_some() { "true" } else { "false" })
            .increment(1);
        if let Some(module) = hit {
            self.save().await;
            return Ok(module);
        }

        let flight = self.flight(url, parsed, expected.clone(), &opts);
        let result = match tokio::time::timeout(opts.timeout, flight).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout {
                url: shown.clone(),
                timeout: opts.timeout,
                stage: "waiting for the download",
            }),
        };
        match &result {
            Ok(module) => {
                let mut st = self.lock();
                record_url(&mut st, url, module, &opts);
                st.failures.remove(&shown);
            }
            Err(e) => {
                let mut st = self.lock();
                let entry = st
                    .failures
                    .entry(shown.clone())
                    .or_insert_with(|| FailureInfo {
                        error: String::new(),
                        at: 0,
                        next_retry: None,
                        resources: vec![],
                    });
                entry.error = e.to_string();
                entry.at = now_secs();
                if !opts.resource_name.is_empty() && !entry.resources.contains(&opts.resource_name)
                {
                    entry.resources.push(opts.resource_name.clone());
                }
            }
        }
        self.save().await;
        result
    }

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
                let policy = match opts.pull_policy {
                    PullPolicy::Unspecified if parsed.is_latest() => PullPolicy::Always,
                    p => p,
                };
                let u = st.index.urls.get(url)?;
                let reuse = match policy {
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
        let entry = st.index.modules.get(&sha)?.clone();
        let path = self.store.module_path(&sha);
        if !path.exists() {
            st.index.modules.remove(&sha);
            st.dirty = true;
            return None;
        }
        let module = Module {
            path,
            sha256: sha.clone(),
            oci_digest: entry.oci_digests.iter().next().cloned(),
            size: entry.size,
            matched,
            fetched: false,
        };
        record_url(&mut st, url, &module, opts);
        Some(module)
    }

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
        let deadline = Instant::now() + opts.timeout;
        let key2 = key.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = this
                .fill(&url_owned, &parsed, expected.as_deref(), secret, deadline)
                .await;
            this.lock().flights.remove(&key2);
            match &result {
                Ok(m) if m.fetched => {
                    counter!(m::REMOTE_FETCH_COUNT, "result" => "success").increment(1);
                    histogram!(m::REMOTE_FETCH_DURATION).record(started.elapsed().as_secs_f64());
                    histogram!(m::REMOTE_FETCH_BYTES).record(m.size as f64);
                    tracing::info!(url = %redact(&url_owned), sha256 = %m.sha256, size = m.size,
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

    async fn fill(
        self: &Arc<Self>,
        url: &str,
        parsed: &ModuleUrl,
        expected: Option<&str>,
        secret: Option<Vec<u8>>,
        deadline: Instant,
    ) -> Result<Module, FetchError> {
        let shown = redact(url);
        let total = deadline.saturating_duration_since(Instant::now());
        let timeout = |stage| FetchError::Timeout {
            url: shown.clone(),
            timeout: total,
            stage,
        };
        let max = self.cfg.max_module_bytes;
        let (bytes, sha, oci_digest, matched) = match parsed {
            ModuleUrl::Http(u) => {
                let raw = self.http.fetch(u, deadline).await?;
                let (raw_sha, module, sha) = tokio::task::spawn_blocking(move || {
                    let raw_sha = verify::sha256_hex(&raw);
                    let module = unbox::unbox(raw, max)?;
                    let sha = verify::sha256_hex(&module);
                    Ok::<_, String>((raw_sha, module, sha))
                })
                .await
                .map_err(|e| io_err(&shown, e.to_string()))?
                .map_err(|reason| FetchError::Invalid {
                    url: shown.clone(),
                    reason,
                })?;
                let matched = match expected {
                    None => None,
                    Some(e) if e == sha => Some(Matched::ModuleSha256),
                    Some(e) if e == raw_sha => Some(Matched::RawBodySha256),
                    Some(e) => {
                        return Err(FetchError::Checksum {
                            url: shown,
                            want: e.to_owned(),
                            got: sha,
                            digest: None,
                        })
                    }
                };
                (module, sha, None, matched)
            }
            ModuleUrl::Oci(r) => {
                let auth = match &secret {
                    None => RegistryAuth::Anonymous,
                    Some(s) => {
                        secret::auth_for(s, &r.registry).map_err(|reason| FetchError::Secret {
                            url: shown.clone(),
                            reason,
                        })?
                    }
                };
                let resolved = tokio::time::timeout_at(deadline, self.oci.resolve(&shown, r, auth))
                    .await
                    .map_err(|_| timeout("fetching the manifest"))??;
                let digest_hex = resolved.digest.trim_start_matches("sha256:").to_owned();
                let index_hex = resolved
                    .index_digest
                    .as_deref()
                    .map(|d| d.trim_start_matches("sha256:").to_owned());
                let digest_match = |e: &str| {
                    if e == digest_hex {
                        Some(Matched::ManifestDigest)
                    } else if Some(e) == index_hex.as_deref() {
                        Some(Matched::IndexDigest)
                    } else {
                        None
                    }
                };
                // Lookup #2: this manifest's module may already be here (no layer pull).
                let known = {
                    let st = self.lock();
                    find_by_checksum(&st.index, &digest_hex)
                };
                if let Some((sha, _)) = known {
                    let matched = match expected {
                        None => None,
                        Some(e) if e == sha => Some(Matched::ModuleSha256),
                        Some(e) => digest_match(e),
                    };
                    if expected.is_none() || matched.is_some() {
                        counter!(m::CACHE_LOOKUP_COUNT, "hit" => "true").increment(1);
                        let mut st = self.lock();
                        if let Some(entry) = st.index.modules.get_mut(&sha) {
                            entry.last_used = now_secs();
                            entry.urls.insert(url.to_owned());
                            let size = entry.size;
                            st.dirty = true;
                            return Ok(Module {
                                path: self.store.module_path(&sha),
                                sha256: sha,
                                oci_digest: Some(resolved.digest.clone()),
                                size,
                                matched,
                                fetched: false,
                            });
                        }
                    }
                }
                let bytes = tokio::time::timeout_at(deadline, self.oci.download(&shown, &resolved))
                    .await
                    .map_err(|_| timeout("pulling the layer"))??;
                let sha = verify::sha256_hex(&bytes);
                let matched = match expected {
                    None => None,
                    Some(e) if e == sha => Some(Matched::ModuleSha256),
                    Some(e) => match digest_match(e) {
                        Some(m) => Some(m),
                        None => {
                            return Err(FetchError::Checksum {
                                url: shown,
                                want: e.to_owned(),
                                got: sha,
                                digest: Some(resolved.digest.clone()),
                            })
                        }
                    },
                };
                let mut digests = vec![resolved.digest.clone()];
                digests.extend(resolved.index_digest.clone());
                (bytes, sha, Some(digests), matched)
            }
        };
        if bytes.len() as u64 > max {
            return Err(FetchError::TooLarge {
                url: shown,
                limit: max,
                what: format!("module is {} bytes", bytes.len()),
            });
        }
        let store = self.store.clone();
        let sha2 = sha.clone();
        let path = tokio::task::spawn_blocking(move || {
            verify::validate(&bytes).map_err(|r| (true, r))?;
            store
                .put_module(&sha2, &bytes)
                .map(|p| (p, bytes.len() as u64))
                .map_err(|r| (false, r))
        })
        .await
        .map_err(|e| io_err(&shown, e.to_string()))?;
        let (path, size) = path.map_err(|(invalid, reason)| {
            if invalid {
                FetchError::Invalid {
                    url: shown.clone(),
                    reason,
                }
            } else {
                io_err(&shown, reason)
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
            for d in oci_digest.iter().flatten() {
                entry.oci_digests.insert(d.clone());
            }
            st.dirty = true;
        }
        self.enforce_budget(&sha);
        self.publish_gauges();
        Ok(Module {
            path,
            sha256: sha,
            oci_digest: oci_digest.and_then(|d| d.into_iter().next()),
            size,
            matched,
            fetched: true,
        })
    }

    /// Evicts least recently used, unpinned modules (never `keep`) while over the byte budget.
    fn enforce_budget(&self, keep: &str) {
        if self.cfg.max_cache_bytes == 0 {
            return;
        }
        let victims: Vec<String> = {
            let mut st = self.lock();
            let mut total = st.total_bytes();
            let pinned: HashSet<String> = st.pinned().into_iter().map(str::to_owned).collect();
            let mut candidates: Vec<(u64, String, u64)> = st
                .index
                .modules
                .iter()
                .filter(|(sha, _)| sha.as_str() != keep && !pinned.contains(*sha))
                .map(|(sha, e)| (e.last_used, sha.clone(), e.size))
                .collect();
            candidates.sort();
            let mut out = Vec::new();
            for (_, sha, size) in candidates {
                if total <= self.cfg.max_cache_bytes {
                    break;
                }
                total -= size;
                out.push(sha);
            }
            if total > self.cfg.max_cache_bytes {
                tracing::warn!(
                    total,
                    budget = self.cfg.max_cache_bytes,
                    "cache over its byte budget, but the remaining modules are in use"
                );
            }
            for sha in &out {
                remove_entry(&mut st, sha);
            }
            out
        };
        for sha in victims {
            counter!(m::CACHE_EVICTIONS, "reason" => "budget").increment(1);
            if let Err(e) = self.store.remove_module(&sha) {
                tracing::warn!(error = %e, "eviction could not delete the module file");
            }
        }
    }

    /// Removes modules unused for longer than the expiry, unless a live resource uses them.
    pub async fn purge_expired(&self) -> usize {
        let expiry = self.cfg.expiry.as_secs();
        let now = now_secs();
        let victims: Vec<String> = {
            let mut st = self.lock();
            let pinned: HashSet<String> = st.pinned().into_iter().map(str::to_owned).collect();
            let out: Vec<String> = st
                .index
                .modules
                .iter()
                .filter(|(sha, e)| {
                    !pinned.contains(*sha) && now.saturating_sub(e.last_used) >= expiry
                })
                .map(|(sha, _)| sha.clone())
                .collect();
            for sha in &out {
                remove_entry(&mut st, sha);
            }
            out
        };
        for sha in &victims {
            counter!(m::CACHE_EVICTIONS, "reason" => "expired").increment(1);
            if let Err(e) = self.store.remove_module(sha) {
                tracing::warn!(error = %e, "purge could not delete the module file");
            }
            tracing::info!(sha256 = %sha, "expired module purged");
        }
        self.publish_gauges();
        self.save().await;
        victims.len()
    }

    /// Runs `purge_expired` every purge interval until the task is dropped.
    pub fn spawn_purger(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.cfg.purge_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                this.purge_expired().await;
            }
        })
    }

    /// Records that `owner`'s resource `name` uses module `sha` (`None`: uses none).
    pub fn pin(&self, owner: u64, name: &str, sha: Option<&str>) {
        let mut st = self.lock();
        let key = (owner, name.to_owned());
        let old = match sha {
            Some(s) => st.pins.insert(key, s.to_owned()),
            None => st.pins.remove(&key),
        };
        if let Some(old) = old {
            touch(&mut st, &old);
        }
    }

    /// Drops every pin of `owner` (a closed Envoy stream); released modules start a fresh expiry.
    pub fn release_owner(&self, owner: u64) {
        let mut st = self.lock();
        let released: Vec<String> = st
            .pins
            .iter()
            .filter(|((o, _), _)| *o == owner)
            .map(|(_, s)| s.clone())
            .collect();
        st.pins.retain(|(o, _), _| *o != owner);
        for sha in released {
            touch(&mut st, &sha);
        }
    }

    /// Notes when the next background retry for a URL will run (debug page).
    pub fn note_retry(&self, url: &str, next_retry_in: Duration) {
        let mut st = self.lock();
        if let Some(f) = st.failures.get_mut(&redact(url)) {
            f.next_retry = Some(now_secs() + next_retry_in.as_secs());
        }
    }

    /// A JSON view of the cache for `/debug/wasm`.
    pub fn debug_view(&self) -> serde_json::Value {
        let st = self.lock();
        let mut users: HashMap<&str, Vec<String>> = HashMap::new();
        for ((owner, name), sha) in &st.pins {
            users
                .entry(sha.as_str())
                .or_default()
                .push(format!("{name} (stream {owner})"));
        }
        let modules: Vec<serde_json::Value> = st
            .index
            .modules
            .iter()
            .map(|(sha, e)| {
                let mut used_by = users.get(sha.as_str()).cloned().unwrap_or_default();
                used_by.sort();
                let urls: Vec<String> = e.urls.iter().map(|u| redact(u)).collect();
                let last_error = urls
                    .iter()
                    .find_map(|u| st.failures.get(u))
                    .map(|f| serde_json::to_value(f).unwrap_or_default());
                serde_json::json!({
                    "sha256": sha,
                    "path": self.store.module_path(sha),
                    "urls": urls,
                    "oci_digests": e.oci_digests,
                    "size": e.size,
                    "fetched_at": e.fetched_at,
                    "last_used": e.last_used,
                    "used_by": used_by,
                    "last_error": last_error,
                })
            })
            .collect();
        let failures: serde_json::Map<String, serde_json::Value> = st
            .failures
            .iter()
            .map(|(u, f)| (u.clone(), serde_json::to_value(f).unwrap_or_default()))
            .collect();
        serde_json::json!({
            "cache_dir": self.cfg.dir,
            "total_bytes": st.total_bytes(),
            "budget_bytes": self.cfg.max_cache_bytes,
            "modules": modules,
            "failures": failures,
        })
    }
}

fn touch(st: &mut State, sha: &str) {
    if let Some(e) = st.index.modules.get_mut(sha) {
        e.last_used = now_secs();
        st.dirty = true;
    }
}

fn remove_entry(st: &mut State, sha: &str) {
    st.index.modules.remove(sha);
    st.index.urls.retain(|_, u| u.sha256 != sha);
    st.dirty = true;
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

fn record_url(st: &mut State, url: &str, module: &Module, opts: &GetOptions) {
    let entry = st.index.urls.entry(url.to_owned()).or_default();
    let mut changed = entry.sha256 != module.sha256;
    entry.sha256 = module.sha256.clone();
    if module.oci_digest.is_some() {
        entry.oci_digest = module.oci_digest.clone();
    }
    if !opts.resource_name.is_empty()
        && entry.versions.get(&opts.resource_name) != Some(&opts.resource_version)
    {
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
