//! `Cache::get(url, opts) -> Module`: the one entry point that turns a module URL into a
//! verified local file that *this* request may have. The cache is the only owner of its state
//! (index, pins, holds, flights, failures, proofs): no other module has an `impl Cache` or
//! reaches into `State`; the jobs beside it are pure functions over what it lends them
//! (`admission`, `index`, `retention`, `view`) or do I/O without touching it (`fetch`,
//! `store`, `lease`, `flight`'s lock).
//!
//! Order of work for a `get`, one pipeline for every path:
//! 1. canonicalise the URL (`url`), refuse what the policy refuses outright (`admission`);
//! 2. lookup without network (`index`): by the expected sha256 (module or OCI digest), else by
//!    the URL's last result when the pull policy allows reuse;
//! 3. the gate on a hit: the signature policy in force against what admitted the module, and
//!    the requester's right to pull a private one (`admission`, one manifest `HEAD` per TTL);
//!    what the record cannot answer goes to the network;
//! 4. otherwise join or start the single download for (URL, expected sha256, credentials), in
//!    this process and across processes sharing the directory (`flight`); a module another
//!    process fetched meanwhile passes the same gate;
//! 5. fetch (`fetch`), validate, rename into place, index, with what the pull showed
//!    (signature, access), write the index to the page cache, and return: the fsyncs (module,
//!    index) follow in the background ([`Cache::make_durable`]; [`Cache::save`] waits for
//!    them). A SIGKILL right after delivery loses nothing; a power loss may lose the entry,
//!    never a file's integrity (the next open verifies every indexed file by its hash);
//! 6. hold: the module is published as in use (`lease`) before `get` returns, until the caller
//!    pins it.
//!
//! # Invariants
//! * A file in `modules/` is complete and named by the sha256 of its bytes: modules are written
//!   to a locked temp file, validated and renamed into place; a crash leaves only temp files.
//! * An index entry names a module file that exists with its size; entries whose file another
//!   process removed are dropped on the next save, never written back.
//! * No module is handed out that the policy in force, or the requester's credentials, would
//!   not get from the registry (`gate`, on every path).
//! * A module pinned or held by *any* process sharing the directory is never purged; one pinned
//!   by any process is never evicted.
//! * One download per download key at a time, across every process sharing the directory.
//! * No file I/O, hashing or lock waiting under the state mutex, and none on async threads
//!   beyond one `stat(2)`. Lock order: `save_lock` (async) → file locks (with deadlines) →
//!   the state mutex; the proofs mutex is never held with the state mutex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tokio::time::Instant;

use futures::future::{BoxFuture, FutureExt};

use super::admission::{self, Admission, Authorization};
use super::error::{io_err, redact, FetchError};
use super::fetch::{manifest_match, Fetched, Fetcher, NewModule, Provenance};
use super::flight::{deadline_after, lock_download, FlightKey, InFlight};
use super::growing::{Announcer, Growing};
use super::index::{effective_policy, expected_checksum, find_by_checksum, record_url, reusable};
use super::lease::Lease;
use super::oci::Resolved;
use super::options::{CacheConfig, GetOptions, Got, Matched, Module, PullPolicy};
use super::pins::{PinChange, Pins};
use super::proofs::{cred_id, Proofs};
use super::store::{now_ms, now_secs, Durability, Index, ModuleEntry, Store};
use super::url::ModuleUrl;
use super::view::{CacheView, FailureInfo};
use super::{retention, verify, view};
use crate::metrics as m;

#[derive(Default)]
struct State {
    index: Index,
    /// Which module each live ECDS resource uses.
    pins: Pins,
    /// Bumped whenever the pinned set changes (orders its publication).
    pin_generation: u64,
    /// One download per (URL, expected checksum, pull-secret hash): callers with different
    /// credentials never share a download (nor its auth result).
    flights: HashMap<FlightKey, InFlight>,
    /// The last failure per URL, at most [`MAX_FAILURES`] (the oldest goes first).
    failures: HashMap<String, FailureInfo>,
    /// Modules handed out by `get` and not pinned yet, until when: published with the pins, so
    /// that no other process purges a module between the hit and its pin.
    holds: HashMap<String, Instant>,
    /// What OCI manifests (by digest) gave that was not stored: a module with another sha256
    /// than expected, or a refusal. A retry of an unchanged image checks the manifest only.
    digests: HashMap<String, Gave>,
    /// Changes made to `index` so far, and how many of them are on disk: saves are group
    /// commits, so whoever waited behind a save that took its change along returns at once.
    edits: u64,
    saved: u64,
    /// The last change number written with fsync (`saved` may be ahead: in the page cache).
    synced: u64,
}

impl State {
    /// Records that `index` changed and must be saved.
    fn changed(&mut self) {
        self.edits += 1;
    }

    /// Whether a live resource uses `sha`, or a `get` handed it out moments ago.
    fn in_use(&self, sha: &str) -> bool {
        self.pins.contains(sha)
            || self
                .holds
                .get(sha)
                .is_some_and(|until| *until > Instant::now())
    }

    /// What this process publishes to others as in use: pins and live holds.
    fn published(&mut self) -> std::collections::BTreeSet<String> {
        let now = Instant::now();
        self.holds.retain(|_, until| *until > now);
        let mut set = self.pins.shas();
        set.extend(self.holds.keys().cloned());
        set
    }

    fn total_bytes(&self) -> u64 {
        self.index.modules.values().map(|e| e.size).sum()
    }
}

/// What a manifest digest gave, when it was not stored.
#[derive(Clone)]
enum Gave {
    /// A module with this sha256 (it did not match what was expected).
    Module(String),
    /// Refused (invalid Wasm, too large).
    Refused(FetchError),
}

/// Manifest digests remembered at most.
const MAX_DIGESTS: usize = 1024;

/// Failures remembered for the admin pages and `/stats`.
pub const MAX_FAILURES: usize = 256;
/// How long a module handed out by `get` stays protected from every process's purge while its
/// caller has not pinned it (at most this process's own expiry: a caller that never pins, such
/// as `ecds-agent fetch`, does not keep a module past the expiry it asked for).
const HOLD: std::time::Duration = std::time::Duration::from_secs(120);

/// What [`Cache::served`] found.
pub enum Served {
    /// The module's file, complete and verified.
    File(std::path::PathBuf),
    /// The download growing it.
    Growing(Arc<Growing>),
}

pub struct Cache {
    cfg: CacheConfig,
    store: Store,
    fetcher: Fetcher,
    /// This process's pins as other processes see them.
    lease: Arc<Lease>,
    state: Mutex<State>,
    save_lock: tokio::sync::Mutex<()>,
    /// A [`Cache::save_soon`] task is queued and has not started.
    save_queued: std::sync::atomic::AtomicBool,
    /// Rights to pull private modules shown recently (credentials × repository).
    proofs: Mutex<Proofs>,
    /// The durable tails of downloads (fsync, index commit) still running; [`Cache::save`]
    /// waits for them.
    syncs: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A cached module and what the index records about it, before the gate.
struct Hit {
    pub module: Module,
    pub signatures: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    pub access: std::collections::BTreeMap<String, admission::Access>,
    /// Found through this very URL's own recorded result.
    pub same_url: bool,
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
        let fetcher = Fetcher::new(cfg.clone(), store.clone())?;
        let cache = Arc::new(Cache {
            cfg,
            store,
            fetcher,
            lease: Arc::new(lease),
            state: Mutex::new(State {
                index,
                edits: 1,
                ..Default::default()
            }),
            save_lock: tokio::sync::Mutex::new(()),
            save_queued: std::sync::atomic::AtomicBool::new(false),
            proofs: Mutex::new(Proofs::default()),
            syncs: Mutex::new(Vec::new()),
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

    /// Persists the index if it changed, and returns once every change made before the call
    /// is on disk — or once writing it failed (logged; the change stays unsaved and the next
    /// save writes it). Saves are serialised and never run under the state lock; callers
    /// queued behind one save are all covered by the next, so a burst of changes costs two
    /// writes, not one each.
    pub async fn save(&self) {
        self.settle().await;
        let want = self.lock().edits;
        let _g = self.save_lock.lock().await;
        self.write_index(want, Durability::Disk).await;
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
            me.write_index(want, Durability::Disk).await;
        });
    }

    /// Waits until every module delivered so far is durable and indexed on disk.
    pub async fn settle(&self) {
        let tasks = std::mem::take(&mut *self.syncs.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Writes the index unless change number `want` is already written with `durability`
    /// (the caller holds `save_lock`).
    async fn write_index(&self, want: u64, durability: Durability) {
        let (upto, snapshot) = {
            let st = self.lock();
            match durability {
                Durability::PageCache if st.saved >= want => return,
                Durability::Disk if st.synced >= want => return,
                // Written already, only not fsynced: fsync the file instead of writing it again.
                Durability::Disk if st.saved >= want => (st.saved, None),
                _ => (st.edits, Some(st.index.clone())),
            }
        };
        let Some(snapshot) = snapshot else {
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.sync_index()).await {
                Ok(Ok(())) => {
                    let mut st = self.lock();
                    st.synced = st.synced.max(upto);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot fsync the cache index; will retry")
                }
                Err(e) => tracing::warn!(error = %e, "cache index fsync task failed"),
            }
            return;
        };
        let store = self.store.clone();
        let saved: Vec<String> = snapshot.modules.keys().cloned().collect();
        match tokio::task::spawn_blocking(move || store.merge_save(&snapshot, durability)).await {
            Ok(Ok(merged)) => {
                let mut st = self.lock();
                st.saved = st.saved.max(upto);
                if durability == Durability::Disk {
                    st.synced = st.synced.max(upto);
                }
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
    async fn cached(&self, sha: &str, matched: Option<Matched>) -> Option<Hit> {
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
        match self.get_with(url, opts, false).await? {
            Got::Ready(module) => Ok(module),
            Got::Growing { done, .. } => done.await,
        }
    }

    /// [`Cache::get`] that answers as soon as a download it has to make knows the sha256 and
    /// size of the module it is growing ([`Got::Growing`]): the same gate has been passed
    /// (the policy refuses nothing up front, the manifest's signatures and the credentials
    /// were checked before a layer is pulled); what is left — the bytes' hash, their
    /// validation, any check of the body — ends `done`, and the growing bytes are served
    /// complete only if it ends with that very module.
    pub async fn get_streaming(
        self: &Arc<Self>,
        url: &str,
        opts: GetOptions,
    ) -> Result<Got, FetchError> {
        self.get_with(url, opts, true).await
    }

    async fn get_with(
        self: &Arc<Self>,
        url: &str,
        opts: GetOptions,
        stream: bool,
    ) -> Result<Got, FetchError> {
        let key = failure_key(url, opts.sha256.as_deref());
        let got = match ModuleUrl::parse(url) {
            Ok(parsed) => {
                let canonical = parsed.canonical();
                self.get_canonical(&canonical, parsed, &opts, stream).await
            }
            Err(e) => Err(e),
        };
        match got.map_err(FetchError::bounded) {
            Ok(Got::Growing {
                module,
                growing,
                done,
            }) => {
                let this = self.clone();
                let done = async move {
                    let result = done.await.map_err(FetchError::bounded);
                    this.note_outcome(key, result.as_ref().err(), &opts);
                    result
                }
                .boxed()
                .shared();
                Ok(Got::Growing {
                    module,
                    growing,
                    done,
                })
            }
            Ok(ready) => {
                self.note_outcome(key, None, &opts);
                Ok(ready)
            }
            Err(e) => {
                self.note_outcome(key, Some(&e), &opts);
                Err(e)
            }
        }
    }

    /// `get` for a URL in canonical form.
    async fn get_canonical(
        self: &Arc<Self>,
        url: &str,
        parsed: ModuleUrl,
        opts: &GetOptions,
        stream: bool,
    ) -> Result<Got, FetchError> {
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
            let same_url = hit.same_url;
            match self.gate(&parsed, hit, opts, &shown, true).await {
                Ok(Some(module)) => {
                    if self.hold(&module).await {
                        // A hit by checksum refreshes the module's last use, never what this
                        // URL is recorded to give.
                        if same_url {
                            self.record(&mut self.lock(), url, &module, Some(opts));
                        } else {
                            self.touch(&module.sha256);
                        }
                        // A hit only refreshes what the index records (last use, URL,
                        // resource); that is written in the background so a conversion never
                        // waits for an fsync.
                        self.save_soon();
                        return Ok(Got::Ready(module));
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

        let InFlight {
            done: flight,
            mut announced,
        } = self.flight(url, parsed, expected, opts);
        let this = self.clone();
        let (url, opts) = (url.to_owned(), opts.clone());
        let finish = async move {
            let result = match tokio::time::timeout(opts.timeout, flight).await {
                Ok(r) => r,
                Err(_) => Err(FetchError::Timeout {
                    url: shown.clone(),
                    timeout: opts.timeout,
                    stage: "waiting for the download",
                }),
            };
            if let Ok(module) = &result {
                this.hold(module).await;
                this.record(&mut this.lock(), &url, module, Some(&opts));
            }
            // The download itself saved the module before it returned; what is left (this
            // URL's use by this resource) is written in the background, as on a hit, so that
            // a hundred streams waiting for one download do not each wait for a write.
            this.save_soon();
            result
        };
        if !stream {
            return finish.await.map(Got::Ready);
        }
        let finish = finish.boxed().shared();
        let growing = tokio::select! {
            biased;
            r = finish.clone() => return r.map(Got::Ready),
            a = announced.wait_for(|g| g.as_ref().is_some_and(|g| g.is_live())) => {
                a.ok().and_then(|g| g.clone())
            }
        };
        match growing {
            Some(g) => Ok(Got::Growing {
                module: self.growing_module(&g),
                growing: g,
                done: finish,
            }),
            // The flight ended without a live announcement.
            None => finish.await.map(Got::Ready),
        }
    }

    /// What a growing module will be once in place.
    fn growing_module(&self, g: &Growing) -> Module {
        Module {
            path: self.store.module_path(&g.sha256),
            sha256: g.sha256.clone(),
            oci_digest: None,
            size: g.size,
            matched: None,
            fetched: true,
            served_by: None,
        }
    }

    /// The admin pages' record of how the last `get` of `key` ended (bounded in count). A
    /// resource's failure is forgotten when it gets a module, or fails on something else.
    fn note_outcome(&self, key: FailureKey, failed: Option<&FetchError>, opts: &GetOptions) {
        let mut st = self.lock();
        let name = opts.resource_name.as_str();
        if !name.is_empty() {
            let id = key.id();
            let others: Vec<String> = st
                .failures
                .iter()
                .filter(|(k, f)| **k != id && f.resources.iter().any(|r| r == name))
                .map(|(k, _)| k.clone())
                .collect();
            for k in others {
                forget_in(&mut st.failures, &k, name);
            }
        }
        let Some(e) = failed else {
            st.failures.remove(&key.id());
            return;
        };
        let id = key.id();
        if !st.failures.contains_key(&id) && st.failures.len() >= MAX_FAILURES {
            if let Some(oldest) = st
                .failures
                .iter()
                .min_by_key(|(_, f)| f.at)
                .map(|(k, _)| k.clone())
            {
                st.failures.remove(&oldest);
            }
        }
        let entry = st.failures.entry(id).or_insert_with(|| FailureInfo {
            url: key.url.clone(),
            sha256: key.sha256.clone(),
            error: String::new(),
            at: 0,
            next_retry: None,
            resources: vec![],
        });
        entry.error = e.to_string();
        entry.at = now_secs();
        if !name.is_empty()
            && !entry.resources.iter().any(|r| r == name)
            && entry.resources.len() < 16
        {
            entry.resources.push(name.to_owned());
        }
    }

    /// Resource `name` no longer asks for anything that failed (it was removed, Envoy
    /// unsubscribed, or it switched to local code): its failures are forgotten.
    pub fn forget_resource(&self, name: &str) {
        let mut st = self.lock();
        let keys: Vec<String> = st
            .failures
            .iter()
            .filter(|(_, f)| f.resources.iter().any(|r| r == name))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            forget_in(&mut st.failures, &k, name);
        }
    }

    /// The one gate between a cached module and a request: `Ok(Some)` serves it, `Ok(None)`
    /// sends the request to the registry (signatures to check again, or access the request
    /// cannot prove from here), `Err` refuses it. With `network` unset (a module another
    /// process fetched, found while holding the download lock) nothing is asked of the
    /// registry: what needs it gives `Ok(None)` and the download path checks it instead.
    async fn gate(
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
                    .fetcher
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
        let check = tokio::time::timeout(opts.timeout, self.fetcher.prove(r, auth, shown));
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

    fn proofs_lock(&self) -> MutexGuard<'_, Proofs> {
        self.proofs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records how `repo` gave out module `sha` (see `admission`).
    fn note_access(&self, sha: &str, repo: &str, access: admission::Access) {
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
    fn note_signature(&self, sha: &str, digest: &str, fingerprint: &str) {
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
    async fn hold(&self, module: &Module) -> bool {
        let publish = {
            let mut st = self.lock();
            let fresh = !st.in_use(&module.sha256);
            st.holds.insert(
                module.sha256.clone(),
                Instant::now() + HOLD.min(self.cfg.expiry),
            );
            fresh.then(|| self.publication(&mut st))
        };
        if let Some(write) = publish {
            let _ = tokio::task::spawn_blocking(write).await;
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

    /// Marks module `sha` used now.
    fn touch(&self, sha: &str) {
        let mut st = self.lock();
        let now = now_secs();
        if let Some(e) = st.index.modules.get_mut(sha) {
            if e.last_used < now {
                e.last_used = now;
                st.changed();
            }
        }
    }

    /// Records `url`'s result in the index (see [`record_url`]).
    fn record(&self, st: &mut State, url: &str, module: &Module, opts: Option<&GetOptions>) {
        if record_url(&mut st.index, url, module, opts, now_secs()) {
            st.changed();
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
    fn flight(
        self: &Arc<Self>,
        url: &str,
        parsed: ModuleUrl,
        expected: Option<String>,
        opts: &GetOptions,
    ) -> InFlight {
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
        let (announcer, announced) = Announcer::new();
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
                    &announcer,
                )
                .await
                .map_err(FetchError::bounded);
            // Whoever streams the growing module gets its end only if this is that module.
            announcer.finish(result.as_ref().ok().map(|m| (m.sha256.as_str(), m.size)));
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
        let flight = InFlight {
            done: fut.shared(),
            announced,
        };
        st.flights.insert(key, flight.clone());
        flight
    }

    /// Fetches, verifies and stores one module.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        self: &Arc<Self>,
        url: &str,
        parsed: &ModuleUrl,
        expected: Option<&str>,
        opts: &GetOptions,
        deadline: Instant,
        since_ms: u64,
        announcer: &Announcer,
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
        let lock = lock_download(&self.store, &key, deadline, &shown).await?;
        if let Some(module) = self
            .fetched_meanwhile(url, parsed, expected, since_ms, opts)
            .await
        {
            return Ok(module);
        }
        let (fetched, provenance) = match parsed {
            ModuleUrl::Http(u) => {
                let (f, signed) = self
                    .fetcher
                    .fetch_http(
                        u,
                        &shown,
                        expected,
                        deadline,
                        &parsed.policy_name(),
                        announcer,
                    )
                    .await?;
                (f, signed.map(Provenance::signed_only))
            }
            ModuleUrl::Oci(r) => {
                let known = |resolved: &Resolved, expected: Option<&str>| {
                    self.cached_by_manifest(resolved, expected, &shown)
                };
                let pulled = self
                    .fetcher
                    .fetch_oci(
                        r,
                        &shown,
                        expected,
                        secret.as_deref(),
                        deadline,
                        &known,
                        announcer,
                    )
                    .await;
                if let Err(FetchError::Checksum {
                    got,
                    digest: Some(d),
                    ..
                }) = &pulled
                {
                    self.remember_digest(d, Gave::Module(got.clone()));
                }
                let (f, p) = pulled?;
                (f, Some(p))
            }
        };
        let (module, fresh) = match fetched {
            Fetched::Cached(module) => (module, false),
            Fetched::New(new) => {
                let digests = new.digests.clone();
                let stored = self.store_module(url, &shown, new).await;
                if let Err(e @ (FetchError::Invalid { .. } | FetchError::TooLarge { .. })) = &stored
                {
                    for d in &digests {
                        self.remember_digest(d, Gave::Refused(e.clone()));
                    }
                }
                stored?
            }
        };
        // What this download showed: the signature that admitted it, whether the repository
        // wanted credentials, and that these credentials may pull it.
        if let Some(p) = provenance {
            if let Some((digest, fingerprint)) = &p.signed {
                self.note_signature(&module.sha256, digest, fingerprint);
            }
            if let Some(access) = p.access {
                self.note_access(&module.sha256, &p.repo, access);
                self.proofs_lock()
                    .insert(&p.cred, &p.repo, std::time::Instant::now());
            }
        }
        {
            let mut st = self.lock();
            self.record(&mut st, url, &module, None);
            st.index.url_mut(url).fetched_at_ms = now_ms();
            st.changed();
        }
        // In the page cache before the module is delivered: a process killed right after
        // still finds it; the fsyncs follow off Envoy's path.
        {
            let _g = self.save_lock.lock().await;
            let want = self.lock().edits;
            self.write_index(want, Durability::PageCache).await;
        }
        self.make_durable(&module, fresh, Some(lock));
        Ok(module)
    }

    /// The durable tail of a download, off the caller's path (Envoy needs the bytes in the
    /// page cache, not on the platter): fsync the module if it is `fresh` (renamed into place
    /// by this call), then make the index durable, and only then release the download lock `lock`. A power loss before the
    /// end loses at most the index entry (the next open drops an indexed file that does not
    /// hash to its name, and adopts a whole one the index lost). Every path that stores a
    /// module ends here; [`Cache::save`] waits for it.
    fn make_durable(self: &Arc<Self>, module: &Module, fresh: bool, lock: Option<std::fs::File>) {
        let me = self.clone();
        let path = module.path.clone();
        let task = tokio::spawn(async move {
            if fresh {
                let synced = tokio::task::spawn_blocking(move || super::store::sync_file(&path))
                    .await
                    .unwrap_or_else(|e| Err(format!("fsync task failed: {e}")));
                if let Err(e) = synced {
                    // Purged meanwhile, or a disk error: the next open checks the file.
                    tracing::warn!(error = %e, "module not made durable");
                }
            }
            let _g = me.save_lock.lock().await;
            let want = me.lock().edits;
            me.write_index(want, Durability::Disk).await;
            drop(lock);
        });
        let mut syncs = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
        syncs.retain(|t| !t.is_finished());
        syncs.push(task);
    }

    /// Validates a new module, renames it into place and indexes it in memory; returns it and
    /// whether this call put its file in place, for the caller to hand to
    /// [`Cache::make_durable`].
    async fn store_module(
        &self,
        url: &str,
        shown: &str,
        new: NewModule,
    ) -> Result<(Module, bool), FetchError> {
        let NewModule {
            file,
            sha,
            digests,
            matched,
            served_by,
        } = new;
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
            store.place_module(file, &sha2).map_err(|r| (false, r))
        })
        .await
        .map_err(|e| io_err(shown, e.to_string()))?;
        let (path, fresh) = written.map_err(|(invalid, reason)| {
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
            entry.urls.insert(redact(url));
            entry.oci_digests.extend(digests.iter().cloned());
            entry.served_by = Some(served_by.clone());
            st.changed();
        }
        counter!(m::FETCHES_SERVED, "host" => m::bounded_label(m::FETCHES_SERVED, &served_by))
            .increment(1);
        self.enforce_budget(&sha).await;
        self.publish_gauges();
        let module = Module {
            path,
            sha256: sha,
            oci_digest: digests.into_iter().next(),
            size,
            matched,
            fetched: true,
            served_by: Some(served_by),
        };
        Ok((module, fresh))
    }

    /// The cached module whose OCI digest is `resolved`'s, if it satisfies `expected` (lookup
    /// #2, asked by the fetcher before it pulls a layer; the manifest was just fetched with the
    /// request's credentials and its signatures checked, so the gate's questions are answered).
    /// A manifest that gave a module with another sha256, or one refused as invalid or too
    /// large, gives the same answer again without the layer being pulled.
    fn cached_by_manifest(
        &self,
        resolved: &Resolved,
        expected: Option<&str>,
        shown: &str,
    ) -> Option<Result<Module, FetchError>> {
        let (found, gave) = {
            let st = self.lock();
            let hex = resolved.digest.trim_start_matches("sha256:");
            (
                find_by_checksum(&st.index, hex).map(|(sha, _)| sha),
                st.digests.get(&resolved.digest).cloned(),
            )
        };
        if let Some(sha) = found {
            let matched = manifest_match(&sha, resolved, expected)?;
            let path = self.store.module_path(&sha);
            let size = std::fs::metadata(&path).ok()?.len();
            return Some(Ok(Module {
                path,
                sha256: sha,
                oci_digest: Some(resolved.digest.clone()),
                size,
                matched,
                fetched: false,
                served_by: None,
            }));
        }
        match gave? {
            Gave::Module(sha) => match (manifest_match(&sha, resolved, expected), expected) {
                (None, Some(want)) => Some(Err(FetchError::Checksum {
                    url: shown.to_owned(),
                    want: want.to_owned(),
                    got: sha,
                    digest: Some(resolved.digest.clone()),
                })),
                _ => None,
            },
            Gave::Refused(e) => Some(Err(e.with_url(shown))),
        }
    }

    /// Remembers what manifest `digest` gave, for the next pull of the same manifest.
    fn remember_digest(&self, digest: &str, gave: Gave) {
        let mut st = self.lock();
        if !st.digests.contains_key(digest) && st.digests.len() >= MAX_DIGESTS {
            if let Some(k) = st.digests.keys().next().cloned() {
                st.digests.remove(&k);
            }
        }
        st.digests.insert(digest.to_owned(), gave);
    }

    // ---- retention: pins, holds, purge, budget (the policy itself is `retention`) ----

    /// The modules other live processes pin or hold (read off the async threads).
    async fn foreign_pins(&self) -> std::collections::BTreeSet<String> {
        let lease = self.lease.clone();
        tokio::task::spawn_blocking(move || lease.foreign_pins())
            .await
            .unwrap_or_default()
    }

    /// Deletes module files (off the async threads), counting each under `reason`.
    async fn delete_files(&self, victims: Vec<String>, reason: &'static str) {
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for sha in victims {
                counter!(m::CACHE_EVICTIONS, "reason" => reason).increment(1);
                match store.remove_module(&sha) {
                    Ok(()) => {
                        tracing::info!(sha256 = %sha, reason, "module removed from the cache")
                    }
                    Err(e) => tracing::warn!(error = %e, "could not delete the module file"),
                }
            }
        })
        .await;
    }

    /// Evicts least recently used modules no process pins (never `keep`) while over the byte
    /// budget. This process's holds do not count here: a module just handed out is the most
    /// recently used, so LRU takes it last.
    async fn enforce_budget(&self, keep: &str) {
        if self.cfg.max_cache_bytes == 0 {
            return;
        }
        let foreign = self.foreign_pins().await;
        let victims = {
            let mut st = self.lock();
            let (out, left) = retention::over_budget(
                &st.index,
                keep,
                |sha| st.pins.contains(sha) || foreign.contains(sha),
                self.cfg.max_cache_bytes,
            );
            if left > self.cfg.max_cache_bytes {
                tracing::warn!(
                    total = left,
                    budget = self.cfg.max_cache_bytes,
                    "cache over its byte budget, but the remaining modules are in use"
                );
            }
            for sha in &out {
                retention::remove_entry(&mut st.index, sha);
                st.changed();
            }
            out
        };
        self.delete_files(victims, "budget").await;
    }

    /// Removes modules unused for longer than the expiry, unless a live resource of any
    /// process uses them or a `get` of any process just handed them out.
    pub async fn purge_expired(&self) -> usize {
        // Holds that ran out stop protecting their modules in other processes too.
        let republish = {
            let mut st = self.lock();
            let before = st.holds.len();
            let now = Instant::now();
            st.holds.retain(|_, until| *until > now);
            (st.holds.len() != before).then(|| self.publication(&mut st))
        };
        if let Some(write) = republish {
            let _ = tokio::task::spawn_blocking(write).await;
        }
        let foreign = self.foreign_pins().await;
        let victims = {
            let mut st = self.lock();
            let out = retention::expired(
                &st.index,
                |sha| st.in_use(sha) || foreign.contains(sha),
                now_secs(),
                self.cfg.expiry.as_secs(),
            );
            for sha in &out {
                retention::remove_entry(&mut st.index, sha);
                st.changed();
            }
            out
        };
        let n = victims.len();
        self.delete_files(victims, "expired").await;
        self.publish_gauges();
        self.save().await;
        n
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

    /// What [`super::serve`] may hand to Envoy's own fetch of module `sha`: with `token`,
    /// the live download of that name ([`Cache::get_streaming`] handed it out, and the URL of
    /// a provisional delivery carries it); else, or once that download ended, the module's
    /// file if this process has it in use (pinned by a live resource, or handed out moments
    /// ago) — a claimed sha256 never pins anything before it is verified.
    pub fn served(&self, sha: &str, token: Option<&str>) -> Option<Served> {
        let st = self.lock();
        if let Some(token) = token {
            let growing = st.flights.values().find_map(|f| {
                f.announced
                    .borrow()
                    .as_ref()
                    .filter(|g| g.sha256 == sha && g.token == token && g.is_live())
                    .cloned()
            });
            if let Some(g) = growing {
                return Some(Served::Growing(g));
            }
        }
        (st.in_use(sha) && st.index.modules.contains_key(sha))
            .then(|| Served::File(self.store.module_path(sha)))
    }

    /// Records that `owner`'s resource `name` uses module `sha` (`None`: uses none).
    pub fn pin(&self, owner: u64, name: &str, sha: Option<&str>) {
        let mut st = self.lock();
        let change = st.pins.set((owner, name.to_owned()), sha);
        // The pin takes over from the hold `get` took.
        if let Some(sha) = sha {
            st.holds.remove(sha);
        }
        self.apply(&mut st, change);
    }

    /// Drops every pin of `owner` (a closed Envoy stream); released modules start a fresh expiry.
    pub fn release_owner(&self, owner: u64) {
        let mut st = self.lock();
        let change = st.pins.release_owner(owner);
        self.apply(&mut st, change);
    }

    /// The next publication of what this process uses (pins and live holds) to other processes:
    /// a blocking write, ordered by generation, for the caller to run off the async threads.
    fn publication(&self, st: &mut State) -> impl FnOnce() + Send + 'static {
        st.pin_generation += 1;
        let (generation, set, lease) = (st.pin_generation, st.published(), self.lease.clone());
        move || {
            if let Err(e) = lease.publish(generation, &set) {
                tracing::warn!(error = %e, "cannot publish the modules in use to other processes");
            }
        }
    }

    /// Released modules start a fresh expiry; a changed set of modules in use is published to
    /// other processes (off the async threads, in order).
    fn apply(&self, st: &mut State, change: PinChange) {
        for sha in &change.released {
            if let Some(e) = st.index.modules.get_mut(sha) {
                e.last_used = now_secs();
                st.changed();
            }
        }
        if !change.set_changed {
            return;
        }
        let write = self.publication(st);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    // ---- air-gapped clusters: OCI image layouts ----

    /// Imports the modules of an OCI image layout (directory or `oci-archive` tar) under their
    /// references (`given` in order, else the layout's whole ref names): the same layout,
    /// digest and signature rules as a pull, no network. One result per image.
    pub async fn import_layout(
        self: &Arc<Self>,
        path: &std::path::Path,
        given: &[String],
    ) -> Result<Vec<(String, Result<Module, FetchError>)>, String> {
        use super::import::{references, Layout};
        let (store, max) = (self.store.clone(), self.cfg.max_module_bytes);
        let policy = self.cfg.verify.clone();
        let (path, given) = (path.to_owned(), given.to_vec());
        let scratch = self.cfg.dir.join("tmp");
        let prepared = tokio::task::spawn_blocking(move || {
            let layout = Layout::open(&path, &scratch, max)?;
            let refs = references(&layout.entries()?, &given)?;
            Ok::<_, String>(
                refs.into_iter()
                    .map(|(digest, url)| {
                        let r = layout.module(&digest, &url, &store, max, policy.as_deref());
                        (url, r)
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(|e| format!("import task failed: {e}"))??;
        let mut out = Vec::new();
        for (url, r) in prepared {
            let shown = redact(&url);
            let result = match r {
                Ok(imp) => self.import(imp).await,
                Err(reason) if reason.starts_with("signature check failed") => {
                    counter!(m::SIGNATURE_CHECKS, "result" => "failed").increment(1);
                    Err(FetchError::Signature { url: shown, reason })
                }
                Err(reason) => Err(FetchError::Layout { url: shown, reason }),
            };
            out.push((url, result.map_err(FetchError::bounded)));
        }
        Ok(out)
    }

    /// Stores one imported module under its reference, as a pull of it would be recorded
    /// (digests, the signature that admitted it), public on this node: the operator put it
    /// here for every workload that names it.
    async fn import(self: &Arc<Self>, imp: super::import::Imported) -> Result<Module, FetchError> {
        let parsed = ModuleUrl::parse(&imp.url)?;
        let url = parsed.canonical();
        let shown = redact(&url);
        let (module, fresh) = self.store_module(&url, &shown, imp.new).await?;
        if let Some((digest, fingerprint)) = &imp.signed {
            self.note_signature(&module.sha256, digest, fingerprint);
        }
        if let ModuleUrl::Oci(r) = &parsed {
            let repo = format!("{}/{}", r.registry, r.repository);
            self.note_access(&module.sha256, &repo, admission::Access::Public);
        }
        {
            let mut st = self.lock();
            self.record(&mut st, &url, &module, None);
            st.index.url_mut(&url).fetched_at_ms = now_ms();
            st.changed();
        }
        self.make_durable(&module, fresh, None);
        self.save().await;
        Ok(module)
    }

    // ---- the admin view ----

    /// Notes when the next background retry for a URL (with its expected sha256) will run.
    pub fn note_retry(&self, url: &str, sha256: Option<&str>, next_retry_in: Duration) {
        let key = failure_key(url, sha256).id();
        let mut st = self.lock();
        if let Some(f) = st.failures.get_mut(&key) {
            f.next_retry = Some(now_secs() + next_retry_in.as_secs());
        }
    }

    /// A consistent snapshot for the admin pages.
    pub fn view(&self) -> CacheView {
        let st = self.lock();
        view::snapshot(
            &st.index,
            &st.pins,
            &st.failures,
            &self.store,
            &self.cfg.dir,
            self.cfg.max_cache_bytes,
        )
    }
}

/// What a failure is remembered under: the canonical, redacted URL and the expected sha256.
struct FailureKey {
    url: String,
    sha256: Option<String>,
}

impl FailureKey {
    fn id(&self) -> String {
        match &self.sha256 {
            Some(s) => format!("{} sha256:{s}", self.url),
            None => self.url.clone(),
        }
    }
}

fn failure_key(url: &str, sha256: Option<&str>) -> FailureKey {
    FailureKey {
        url: ModuleUrl::parse(url)
            .map(|u| redact(&u.canonical()))
            .unwrap_or_else(|_| redact(url)),
        sha256: sha256.and_then(super::index::normalize_sha),
    }
}

/// Drops resource `name` from failure `key`, and the failure once no resource is left.
fn forget_in(failures: &mut HashMap<String, FailureInfo>, key: &str, name: &str) {
    if let Some(f) = failures.get_mut(key) {
        f.resources.retain(|r| r != name);
        if f.resources.is_empty() {
            failures.remove(key);
        }
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
