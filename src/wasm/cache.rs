//! `Cache::get(url, opts) -> Module`: the one entry point that turns a module URL into a
//! verified local file. This file is the façade: it owns the cache's in-memory state and the
//! order of work; the jobs live beside it.
//!
//! Order of work for a `get`:
//! 1. lookup without network (`index`): by the expected sha256 (module or OCI digest), else by
//!    the URL's last result when the pull policy allows reuse (IfNotPresent; Always with an
//!    unchanged resource version; `:latest`/untagged OCI means Always);
//! 2. otherwise join or start the single download for (URL, expected sha256, credentials),
//!    in this process and across processes sharing the directory (`flight`);
//! 3. fetch, unbox, check, validate and store, streaming (`pipeline`).
//!
//! Beside it: `retention` (pins, purge, LRU) with `lease` (pins other processes see), `view`
//! (the admin snapshot), `store` (files on disk).
//!
//! # Invariants
//! * A file in `modules/` is complete and named by the sha256 of its bytes: modules are written
//!   to a locked temp file, validated and renamed into place; a crash leaves only temp files.
//! * An index entry names a module file that exists with its size; entries whose file another
//!   process removed are dropped on the next save, never written back.
//! * A module pinned by a live ECDS resource of *any* process sharing the directory is never
//!   purged or evicted.
//! * One download per download key at a time, across every process sharing the directory.
//! * No file I/O, hashing or lock waiting under the state mutex, and none on async threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::{counter, gauge, histogram};
use tokio::time::Instant;

use super::admission::{self, Admission, Authorization};
use super::error::{redact, FetchError};
use super::flight::{Flight, FlightKey};
use super::http::HttpFetcher;
use super::index::{effective_policy, expected_checksum, find_by_checksum, record_url, reusable};
use super::lease::Lease;
use super::oci::OciFetcher;
use super::options::{CacheConfig, GetOptions, Matched, Module};
use super::pins::Pins;
use super::proofs::{cred_id, Proofs};
use super::store::{now_secs, Index, Store};
use super::url::ModuleUrl;
use super::view::FailureInfo;
use crate::admin::metrics as m;

#[derive(Default)]
pub(super) struct State {
    pub(super) index: Index,
    /// Which module each live ECDS resource uses.
    pub(super) pins: Pins,
    /// Bumped whenever the pinned set changes (orders its publication).
    pub(super) pin_generation: u64,
    /// One download per (URL, expected checksum, pull-secret hash): callers with different
    /// credentials never share a download (nor its auth result).
    pub(super) flights: HashMap<FlightKey, Flight>,
    /// The last failure per URL, at most [`MAX_FAILURES`] (the oldest goes first).
    pub(super) failures: HashMap<String, FailureInfo>,
    /// Modules handed out by `get` and not pinned yet, until when: published with the pins, so
    /// that no other process purges a module between the hit and its pin.
    pub(super) holds: HashMap<String, Instant>,
    /// Changes made to `index` so far, and how many of them are on disk: saves are group
    /// commits, so whoever waited behind a save that took its change along returns at once.
    edits: u64,
    saved: u64,
}

impl State {
    /// Records that `index` changed and must be saved.
    pub(super) fn changed(&mut self) {
        self.edits += 1;
    }

    /// Whether a live resource uses `sha`, or a `get` handed it out moments ago.
    pub(super) fn in_use(&self, sha: &str) -> bool {
        self.pins.contains(sha)
            || self
                .holds
                .get(sha)
                .is_some_and(|until| *until > Instant::now())
    }

    /// What this process publishes to others as in use: pins and live holds.
    pub(super) fn published(&mut self) -> std::collections::BTreeSet<String> {
        let now = Instant::now();
        self.holds.retain(|_, until| *until > now);
        let mut set = self.pins.shas();
        set.extend(self.holds.keys().cloned());
        set
    }

    pub(super) fn total_bytes(&self) -> u64 {
        self.index.modules.values().map(|e| e.size).sum()
    }
}

/// Failures remembered for the admin pages and `/stats`.
pub const MAX_FAILURES: usize = 256;
/// How long a module handed out by `get` stays protected from every process's purge while its
/// caller has not pinned it (at most this process's own expiry: a caller that never pins, such
/// as `ecds-agent fetch`, does not keep a module past the expiry it asked for).
const HOLD: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Cache {
    pub(super) cfg: CacheConfig,
    pub(super) store: Store,
    pub(super) http: HttpFetcher,
    pub(super) oci: OciFetcher,
    pub(super) helpers: super::credhelper::CredHelpers,
    /// This process's pins as other processes see them.
    pub(super) lease: Arc<Lease>,
    state: Mutex<State>,
    save_lock: tokio::sync::Mutex<()>,
    /// A [`Cache::save_soon`] task is queued and has not started.
    save_queued: std::sync::atomic::AtomicBool,
    /// Rights to pull private modules shown recently (credentials × repository).
    pub(super) proofs: Mutex<Proofs>,
}

/// A cached module and what the index records about it, before the gate.
pub(super) struct Hit {
    pub module: Module,
    pub signatures: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    pub access: std::collections::BTreeMap<String, admission::Access>,
    /// Found through this very URL's own recorded result.
    pub same_url: bool,
}

pub(super) fn io_err(url: &str, reason: String) -> FetchError {
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
        let oci = OciFetcher::new(
            cfg.tls.clone(),
            cfg.max_module_bytes,
            cfg.http.blocked.clone(),
        )?;
        let cache = Arc::new(Cache {
            cfg,
            store,
            http,
            oci,
            helpers: Default::default(),
            lease: Arc::new(lease),
            state: Mutex::new(State {
                index,
                edits: 1,
                ..Default::default()
            }),
            save_lock: tokio::sync::Mutex::new(()),
            save_queued: std::sync::atomic::AtomicBool::new(false),
            proofs: Mutex::new(Proofs::default()),
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

    /// Persists the index if it changed, and returns once every change made before the call
    /// is on disk — or once writing it failed (logged; the change stays unsaved and the next
    /// save writes it). Saves are serialised and never run under the state lock; callers
    /// queued behind one save are all covered by the next, so a burst of changes costs two
    /// writes, not one each.
    pub async fn save(&self) {
        let want = self.lock().edits;
        let _g = self.save_lock.lock().await;
        self.write_index(want).await;
    }

    /// [`Cache::save`] on a background task, for whoever does not need the index on disk now
    /// (a cache hit). At most one such task waits for the save lock at a time: its save, taken
    /// once it holds the lock, covers every hit that found it queued.
    pub fn save_soon(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.save_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _g = me.save_lock.lock().await;
            me.save_queued.swap(false, Ordering::AcqRel);
            let want = me.lock().edits;
            me.write_index(want).await;
        });
    }

    /// Writes the index unless change number `want` is already on disk (the caller holds
    /// `save_lock`).
    async fn write_index(&self, want: u64) {
        let (upto, snapshot) = {
            let st = self.lock();
            if st.saved >= want {
                return;
            }
            (st.edits, st.index.clone())
        };
        let store = self.store.clone();
        let saved: Vec<String> = snapshot.modules.keys().cloned().collect();
        match tokio::task::spawn_blocking(move || store.merge_save(&snapshot)).await {
            Ok(Ok(merged)) => {
                let mut st = self.lock();
                st.saved = st.saved.max(upto);
                // What another process removed meanwhile goes here too.
                for sha in saved.iter().filter(|s| !merged.modules.contains_key(*s)) {
                    st.index.modules.remove(sha);
                    st.index.urls.retain(|_, u| &u.sha256 != sha);
                }
                st.index.absorb(merged);
            }
            // Not marked saved: the next save tries again.
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the cache index; will retry"),
            Err(e) => tracing::warn!(error = %e, "cache index save task failed"),
        }
    }

    /// The cached module `sha`, if its file is still there (a vanished file drops the entry),
    /// with what the index records about it. The file is looked at outside the state lock with
    /// one inline `stat(2)` of a file in the local cache directory: a blocking-pool round trip
    /// for it made a warm conversion 15× slower (`make bench BENCH=convert`: ~100 µs → ~7 µs).
    pub(super) async fn cached(&self, sha: &str, matched: Option<Matched>) -> Option<Hit> {
        let path = self.store.module_path(sha);
        let exists = std::fs::metadata(&path).is_ok();
        let mut st = self.lock();
        if !exists {
            if st.index.modules.remove(sha).is_some() {
                st.changed();
            }
            return None;
        }
        let entry = st.index.modules.get(sha)?;
        Some(Hit {
            module: Module {
                path,
                sha256: sha.to_owned(),
                oci_digest: entry.oci_digests.iter().next().cloned(),
                size: entry.size,
                matched,
                fetched: false,
                served_by: None,
            },
            signatures: entry.signatures.clone(),
            access: entry.access.clone(),
            same_url: false,
        })
    }

    /// Turns `url` into a verified local module file that this request may have.
    ///
    /// Every path — a hit in memory, a module another process fetched meanwhile, a download —
    /// goes through the same gate: the signature policy in force ([`admission::admit`]) and
    /// the requester's right to pull a private module ([`admission::authorize`]).
    pub async fn get(self: &Arc<Self>, url: &str, opts: GetOptions) -> Result<Module, FetchError> {
        let (key, result) = match ModuleUrl::parse(url) {
            Ok(parsed) => {
                let canonical = parsed.canonical();
                let r = self.get_canonical(&canonical, parsed, &opts).await;
                (redact(&canonical), r)
            }
            Err(e) => (redact(url), Err(e)),
        };
        let result = result.map_err(FetchError::bounded);
        self.note_outcome(key, &result, &opts);
        result
    }

    /// `get` for a URL in canonical form.
    async fn get_canonical(
        self: &Arc<Self>,
        url: &str,
        parsed: ModuleUrl,
        opts: &GetOptions,
    ) -> Result<Module, FetchError> {
        let shown = redact(url);
        let expected = expected_checksum(&parsed, opts.sha256.as_deref(), &shown)?;
        if let Some(reason) = admission::refused_upfront(self.cfg.verify.as_deref(), &parsed) {
            counter!(m::SIGNATURE_CHECKS, "result" => "failed").increment(1);
            return Err(FetchError::Signature { url: shown, reason });
        }

        let hit = self.lookup(url, &parsed, expected.as_deref(), opts).await;
        counter!(m::CACHE_LOOKUP_COUNT, "hit" => if hit.is_some() { "true" } else { "false" })
            .increment(1);
        if let Some(hit) = hit {
            let started = Instant::now();
            match self.gate(&parsed, hit, opts, &shown, true).await {
                Ok(Some(module)) => {
                    if self.hold(&module).await {
                        self.record(&mut self.lock(), url, &module, Some(opts));
                        // A hit only refreshes what the index records (last use, URL,
                        // resource); that is written in the background so a conversion never
                        // waits for an fsync.
                        self.save_soon();
                        return Ok(module);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let e = e.bounded();
                    record_fetch(url, &Err(e.clone()), started);
                    return Err(e);
                }
            }
        }

        let flight = self.flight(url, parsed, expected, opts);
        let result = match tokio::time::timeout(opts.timeout, flight).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout {
                url: shown.clone(),
                timeout: opts.timeout,
                stage: "waiting for the download",
            }),
        };
        if let Ok(module) = &result {
            self.hold(module).await;
            self.record(&mut self.lock(), url, module, Some(opts));
        }
        // The download itself saved the module before it returned; what is left (this URL's
        // use by this resource) is written in the background, as on a hit, so that a
        // hundred streams waiting for one download do not each wait for a write.
        self.save_soon();
        result
    }

    /// The admin pages' record of how the last `get` of `key` ended (bounded in count).
    fn note_outcome(&self, key: String, result: &Result<Module, FetchError>, opts: &GetOptions) {
        let mut st = self.lock();
        let e = match result {
            Ok(_) => {
                st.failures.remove(&key);
                return;
            }
            Err(e) => e,
        };
        if !st.failures.contains_key(&key) && st.failures.len() >= MAX_FAILURES {
            if let Some(oldest) = st
                .failures
                .iter()
                .min_by_key(|(_, f)| f.at)
                .map(|(k, _)| k.clone())
            {
                st.failures.remove(&oldest);
            }
        }
        let entry = st.failures.entry(key).or_insert_with(|| FailureInfo {
            error: String::new(),
            at: 0,
            next_retry: None,
            resources: vec![],
        });
        entry.error = e.to_string();
        entry.at = now_secs();
        if !opts.resource_name.is_empty()
            && !entry.resources.contains(&opts.resource_name)
            && entry.resources.len() < 16
        {
            entry.resources.push(opts.resource_name.clone());
        }
    }

    /// The one gate between a cached module and a request: `Ok(Some)` serves it, `Ok(None)`
    /// sends the request to the registry (signatures to check again, or access the request
    /// cannot prove from here), `Err` refuses it. With `network` unset (a module another
    /// process fetched, found while holding the download lock) nothing is asked of the
    /// registry: what needs it gives `Ok(None)` and the download path checks it instead.
    pub(super) async fn gate(
        &self,
        parsed: &ModuleUrl,
        hit: Hit,
        opts: &GetOptions,
        shown: &str,
        network: bool,
    ) -> Result<Option<Module>, FetchError> {
        match admission::admit(self.cfg.verify.as_deref(), parsed, &hit.signatures) {
            Admission::Refused(reason) => {
                counter!(m::SIGNATURE_CHECKS, "result" => "failed").increment(1);
                return Err(FetchError::Signature {
                    url: shown.to_owned(),
                    reason,
                });
            }
            Admission::Recheck(rule) => {
                tracing::info!(url = %shown, rule, sha256 = %hit.module.sha256,
                    "cached module not admitted under the policy in force; checking its signatures again");
                return Ok(None);
            }
            Admission::Allowed(_) | Admission::Verified { .. } => {}
        }
        match (
            admission::authorize(&hit.access, parsed, hit.same_url),
            parsed,
        ) {
            (Authorization::None, _) => Ok(Some(hit.module)),
            (Authorization::Fetch, _) => Ok(None),
            (Authorization::Prove(repo), ModuleUrl::Oci(r)) => {
                let auth = self
                    .registry_auth(r, opts.pull_secret.as_deref(), shown)
                    .await?;
                let cred = cred_id(&auth);
                let now = std::time::Instant::now();
                if self
                    .proofs_lock()
                    .fresh(&cred, &repo, self.cfg.auth_ttl, now)
                {
                    return Ok(Some(hit.module));
                }
                if !network {
                    return Ok(None);
                }
                self.prove(r, &repo, &auth, &cred, opts, shown).await?;
                if matches!(auth, oci_client::secrets::RegistryAuth::Anonymous) {
                    self.note_access(&hit.module.sha256, &repo, admission::Access::Public);
                }
                Ok(Some(hit.module))
            }
            (Authorization::Prove(_), ModuleUrl::Http(_)) => Ok(None),
        }
    }

    /// One manifest `HEAD` with the requester's credentials; remembered for the TTL. A
    /// registry that cannot be reached does not undo a right these credentials showed before
    /// in this process (the module is served, with a warning); a refusal always refuses.
    async fn prove(
        &self,
        r: &super::url::OciRef,
        repo: &str,
        auth: &oci_client::secrets::RegistryAuth,
        cred: &str,
        opts: &GetOptions,
        shown: &str,
    ) -> Result<(), FetchError> {
        let insecure = self
            .cfg
            .registries
            .sources(r)
            .last()
            .is_some_and(|s| s.insecure);
        let check = tokio::time::timeout(opts.timeout, self.oci.prove(shown, r, auth, insecure));
        match check.await {
            Ok(Ok(())) => {
                counter!(m::PULL_AUTH_CHECKS, "result" => "allowed").increment(1);
                self.proofs_lock()
                    .insert(cred, repo, std::time::Instant::now());
                Ok(())
            }
            Ok(Err(FetchError::Auth { url, reason })) => {
                counter!(m::PULL_AUTH_CHECKS, "result" => "denied").increment(1);
                Err(FetchError::Auth { url, reason })
            }
            other => {
                let e = match other {
                    Ok(Err(e)) => e,
                    _ => FetchError::Timeout {
                        url: shown.to_owned(),
                        timeout: opts.timeout,
                        stage: "checking access to a cached private module",
                    },
                };
                counter!(m::PULL_AUTH_CHECKS, "result" => "unreachable").increment(1);
                if self.proofs_lock().ever(cred, repo) {
                    tracing::warn!(url = %shown, error = %e,
                        "registry unreachable; serving the cached private module to credentials that pulled it before");
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    pub(super) fn proofs_lock(&self) -> MutexGuard<'_, Proofs> {
        self.proofs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records how `repo` gave out module `sha` (see `admission`).
    pub(super) fn note_access(&self, sha: &str, repo: &str, access: admission::Access) {
        let mut st = self.lock();
        let Some(e) = st.index.modules.get_mut(sha) else {
            return;
        };
        let merged = e.access.get(repo).map_or(access, |a| a.merge(access));
        if e.access.insert(repo.to_owned(), merged) != Some(merged) {
            st.changed();
        }
    }

    /// Records a signature verified over `digest` by key `fingerprint` for module `sha`.
    pub(super) fn note_signature(&self, sha: &str, digest: &str, fingerprint: &str) {
        let mut st = self.lock();
        let Some(e) = st.index.modules.get_mut(sha) else {
            return;
        };
        if e.signatures
            .entry(digest.to_owned())
            .or_default()
            .insert(fingerprint.to_owned())
        {
            st.changed();
        }
    }

    /// Protects `module` from every process's purge until its caller pins it (or [`HOLD`]
    /// passes), published before this returns; `false` if the file vanished meanwhile (another
    /// process purged it first: fetch it again).
    pub(super) async fn hold(&self, module: &Module) -> bool {
        let publish = {
            let mut st = self.lock();
            let fresh = !st.in_use(&module.sha256);
            st.holds.insert(
                module.sha256.clone(),
                Instant::now() + HOLD.min(self.cfg.expiry),
            );
            fresh.then(|| {
                st.pin_generation += 1;
                (st.pin_generation, st.published())
            })
        };
        if let Some((generation, set)) = publish {
            let lease = self.lease.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = lease.publish(generation, &set) {
                    tracing::warn!(error = %e, "cannot publish held modules to other processes");
                }
            })
            .await;
        }
        std::fs::metadata(&module.path).is_ok()
    }

    /// Lookup #1: no network.
    async fn lookup(
        &self,
        url: &str,
        parsed: &ModuleUrl,
        expected: Option<&str>,
        opts: &GetOptions,
    ) -> Option<Hit> {
        let (sha, matched, same_url) = {
            let st = self.lock();
            match expected {
                Some(exp) => {
                    let (sha, matched) = find_by_checksum(&st.index, exp)?;
                    let same = st.index.url(url).is_some_and(|u| u.sha256 == sha);
                    (sha, matched, same)
                }
                None => {
                    let u = st.index.url(url)?;
                    if !reusable(u, effective_policy(parsed, opts), opts) {
                        return None;
                    }
                    (u.sha256.clone(), None, true)
                }
            }
        };
        let mut hit = self.cached(&sha, matched).await?;
        hit.same_url = same_url;
        Some(hit)
    }

    /// Records `url`'s result in the index (see [`record_url`]).
    pub(super) fn record(
        &self,
        st: &mut State,
        url: &str,
        module: &Module,
        opts: Option<&GetOptions>,
    ) {
        if record_url(&mut st.index, url, module, opts, now_secs()) {
            st.changed();
        }
    }
}

/// Metrics and a log line for one finished download.
pub(super) fn record_fetch(url: &str, result: &Result<Module, FetchError>, started: Instant) {
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
