//! The admin view of the cache: a consistent snapshot of its modules, who uses them and what
//! failed, for `/debug/wasm` and `/stats`. A pure function of the state the cache lends it
//! under its lock; it never changes anything.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use super::error::redact;
use super::index::Index;
use super::pins::Pins;
use super::store::Store;

/// The last failure seen for what was asked (a URL with its expected sha256), for the debug
/// page; forgotten once no resource asks for it any more.
#[derive(Debug, Clone, Serialize)]
pub struct FailureInfo {
    /// The URL (canonical, redacted).
    pub url: String,
    /// The sha256 the request expected, if any.
    pub sha256: Option<String>,
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
    /// The host that served the module (a mirror or the origin).
    pub served_by: Option<String>,
    /// Signatures that admitted it: digest → fingerprints (sha256 of the key's DER).
    pub signatures: BTreeMap<String, Vec<String>>,
    /// Per repository: `public` (pulled without credentials) or `private`.
    pub access: BTreeMap<String, super::admission::Access>,
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

/// A snapshot for the admin pages: modules, their URLs, digests, users and last errors.
pub(super) fn snapshot(
    index: &Index,
    pins: &Pins,
    failures: &HashMap<String, FailureInfo>,
    store: &Store,
    cache_dir: &std::path::Path,
    budget_bytes: u64,
) -> CacheView {
    let mut users: HashMap<&str, Vec<String>> = HashMap::new();
    for ((owner, name), sha) in pins.iter() {
        users
            .entry(sha.as_str())
            .or_default()
            .push(format!("{name} (stream {owner})"));
    }
    let modules = index
        .modules
        .iter()
        .map(|(sha, e)| {
            let urls: Vec<String> = e.urls.iter().map(|u| redact(u)).collect();
            let mut used_by = users.get(sha.as_str()).cloned().unwrap_or_default();
            used_by.sort();
            ModuleView {
                sha256: sha.clone(),
                path: store.module_path(sha),
                last_error: failures
                    .values()
                    .filter(|f| urls.contains(&f.url))
                    .max_by_key(|f| f.at)
                    .cloned(),
                urls,
                oci_digests: e.oci_digests.iter().cloned().collect(),
                size: e.size,
                fetched_at: e.fetched_at,
                last_used: e.last_used,
                used_by,
                served_by: e.served_by.clone(),
                signatures: e
                    .signatures
                    .iter()
                    .map(|(d, fps)| (d.clone(), fps.iter().cloned().collect()))
                    .collect(),
                access: e.access.clone(),
            }
        })
        .collect();
    CacheView {
        cache_dir: cache_dir.to_owned(),
        total_bytes: index.modules.values().map(|e| e.size).sum(),
        budget_bytes,
        modules,
        failures: failures
            .iter()
            .map(|(u, f)| (u.clone(), f.clone()))
            .collect(),
    }
}
