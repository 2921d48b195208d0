//! Keeping the cache bounded without ever removing a module Envoy is using, as pure functions
//! over the index: which modules the expiry purge and the LRU byte budget take. What counts as
//! in use (this process's pins and holds, and every other live process's, from `lease`) is the
//! caller's to say; deleting files and saving the index is the cache's.

use super::index::Index;

/// Modules unused for at least `expiry` seconds at `now` and not in use, oldest first.
pub fn expired(index: &Index, in_use: impl Fn(&str) -> bool, now: u64, expiry: u64) -> Vec<String> {
    let mut out: Vec<(u64, String)> = index
        .modules
        .iter()
        .filter(|(sha, e)| !in_use(sha) && now.saturating_sub(e.last_used) >= expiry)
        .map(|(sha, e)| (e.last_used, sha.clone()))
        .collect();
    out.sort();
    out.into_iter().map(|(_, sha)| sha).collect()
}

/// The least recently used modules (never `keep`, never in use) to evict to get the index's
/// total size within `budget`, and the total left after evicting them (still over `budget`
/// when what is left is in use).
pub fn over_budget(
    index: &Index,
    keep: &str,
    in_use: impl Fn(&str) -> bool,
    budget: u64,
) -> (Vec<String>, u64) {
    let mut total: u64 = index.modules.values().map(|e| e.size).sum();
    let mut candidates: Vec<(u64, &String, u64)> = index
        .modules
        .iter()
        .filter(|(sha, _)| sha.as_str() != keep && !in_use(sha))
        .map(|(sha, e)| (e.last_used, sha, e.size))
        .collect();
    candidates.sort();
    let mut out = Vec::new();
    for (_, sha, size) in candidates {
        if total <= budget {
            break;
        }
        total -= size;
        out.push(sha.clone());
    }
    (out, total)
}

/// Drops module `sha` and every URL result naming it.
pub fn remove_entry(index: &mut Index, sha: &str) {
    index.modules.remove(sha);
    index.urls.retain(|_, u| u.sha256 != sha);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::index::{ModuleEntry, UrlEntry};

    fn index(mods: &[(&str, u64, u64)]) -> Index {
        let mut i = Index::default();
        for (sha, size, last_used) in mods {
            i.modules.insert(
                sha.to_string(),
                ModuleEntry {
                    size: *size,
                    last_used: *last_used,
                    ..Default::default()
                },
            );
        }
        i
    }

    #[test]
    fn expiry_and_budget_never_take_what_is_in_use() {
        let i = index(&[("a", 10, 1), ("b", 10, 5), ("c", 10, 9)]);
        let busy = |s: &str| s == "a";
        assert_eq!(expired(&i, busy, 10, 4), vec!["b".to_string()]);
        assert_eq!(expired(&i, |_| false, 10, 1), vec!["a", "b", "c"]);
        // Budget 15: evict the least recently used that is neither in use nor kept.
        assert_eq!(over_budget(&i, "c", busy, 15), (vec!["b".to_string()], 20));
        assert_eq!(
            over_budget(&i, "c", |_| false, 15),
            (vec!["a".to_string(), "b".to_string()], 10)
        );
        assert_eq!(over_budget(&i, "c", |_| false, 100), (vec![], 30));
        let mut j = i.clone();
        j.urls.insert(
            "k".into(),
            UrlEntry {
                sha256: "b".into(),
                ..Default::default()
            },
        );
        remove_entry(&mut j, "b");
        assert!(!j.modules.contains_key("b") && j.urls.is_empty());
    }
}
