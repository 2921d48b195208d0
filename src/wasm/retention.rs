//! Keeping the cache bounded without ever removing a module Envoy is using: pins (which module
//! each live ECDS resource uses), expiry purge and the LRU byte budget. Pins are this process's
//! plus those every other live process sharing the directory publishes (`lease`).

use std::collections::BTreeSet;
use std::sync::Arc;

use metrics::counter;

use super::cache::{Cache, State};
use super::pins::PinChange;
use super::store::now_secs;
use crate::admin::metrics as m;

impl Cache {
    /// The modules other live processes pin (read off the async threads).
    async fn foreign_pins(&self) -> BTreeSet<String> {
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

    /// Evicts least recently used, unpinned modules (never `keep`) while over the byte budget.
    pub(super) async fn enforce_budget(&self, keep: &str) {
        if self.cfg.max_cache_bytes == 0 {
            return;
        }
        let foreign = self.foreign_pins().await;
        let victims: Vec<String> = {
            let mut st = self.lock();
            let mut total = st.total_bytes();
            let mut candidates: Vec<(u64, String, u64)> = st
                .index
                .modules
                .iter()
                .filter(|(sha, _)| {
                    // This process's holds do not count here: a module just
                    // handed out is the most recently used, so LRU takes it last.
                    sha.as_str() != keep && !st.pins.contains(sha) && !foreign.contains(*sha)
                })
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
        self.delete_files(victims, "budget").await;
    }

    /// Removes modules unused for longer than the expiry, unless a live resource uses them.
    pub async fn purge_expired(&self) -> usize {
        let expiry = self.cfg.expiry.as_secs();
        let foreign = self.foreign_pins().await;
        let now = now_secs();
        let victims: Vec<String> = {
            let mut st = self.lock();
            let out: Vec<String> = st
                .index
                .modules
                .iter()
                .filter(|(sha, e)| {
                    !st.in_use(sha)
                        && !foreign.contains(*sha)
                        && now.saturating_sub(e.last_used) >= expiry
                })
                .map(|(sha, _)| sha.clone())
                .collect();
            for sha in &out {
                remove_entry(&mut st, sha);
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

    /// Released modules start a fresh expiry; a changed set of modules in use is published to
    /// other processes (off the async threads, in order).
    fn apply(&self, st: &mut State, change: PinChange) {
        for sha in &change.released {
            touch(st, sha);
        }
        if !change.set_changed {
            return;
        }
        st.pin_generation += 1;
        let generation = st.pin_generation;
        let lease = self.lease.clone();
        let set = st.published();
        let write = move || {
            if let Err(e) = lease.publish(generation, &set) {
                tracing::warn!(error = %e, "cannot publish pinned modules to other processes");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}

fn touch(st: &mut State, sha: &str) {
    if let Some(e) = st.index.modules.get_mut(sha) {
        e.last_used = now_secs();
        st.changed();
    }
}

fn remove_entry(st: &mut State, sha: &str) {
    st.index.modules.remove(sha);
    st.index.urls.retain(|_, u| u.sha256 != sha);
    st.changed();
}
