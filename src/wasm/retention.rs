//! Keeping the cache bounded without ever removing a module Envoy is using: pins (which module
//! each live ECDS resource uses), expiry purge and the LRU byte budget.

use std::collections::HashSet;
use std::sync::Arc;

use metrics::counter;

use super::cache::{Cache, State};
use super::store::now_secs;
use crate::admin::metrics as m;

impl State {
    fn pinned(&self) -> HashSet<String> {
        self.pins.values().cloned().collect()
    }
}

impl Cache {
    /// Evicts least recently used, unpinned modules (never `keep`) while over the byte budget.
    pub(super) fn enforce_budget(&self, keep: &str) {
        if self.cfg.max_cache_bytes == 0 {
            return;
        }
        let victims: Vec<String> = {
            let mut st = self.lock();
            let mut total = st.total_bytes();
            let pinned = st.pinned();
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
            let pinned = st.pinned();
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
