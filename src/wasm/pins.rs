//! Which module each live ECDS resource uses: (stream, resource name) → module sha256, with a
//! use count per module so that "is this module in use" and "did the set of modules in use
//! change" cost O(1) per pin, not a rebuild of the whole set (2000 pins rebuilt twice per pin
//! made 200 streams × 10 modules take seconds to deliver).
//!
//! Pure bookkeeping: no I/O, no locking (the cache's state lock guards it). What a change
//! means for the disk (publishing the lease, refreshing last use) is `retention`'s.

use std::collections::{BTreeSet, HashMap, HashSet};

/// A live ECDS resource: the stream that owns it and its name.
pub type PinKey = (u64, String);

#[derive(Debug, Default)]
pub struct Pins {
    by_key: HashMap<PinKey, String>,
    /// The resource names each stream pins, so a closing stream costs its own pins only.
    by_owner: HashMap<u64, HashSet<String>>,
    uses: HashMap<String, usize>,
}

/// What one change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinChange {
    /// Modules no longer used by the changed resources (each once per resource).
    pub released: Vec<String>,
    /// The set of modules in use changed (a module gained its first or lost its last user).
    pub set_changed: bool,
}

impl Pins {
    /// `key` now uses `sha` (`None`: no module). Pinning a resource to the module it already
    /// uses changes nothing (its last use is refreshed by the cache lookup itself).
    pub fn set(&mut self, key: PinKey, sha: Option<&str>) -> PinChange {
        let mut change = PinChange::default();
        let old = match sha {
            Some(s) if self.by_key.get(&key).is_some_and(|o| o == s) => return change,
            Some(s) => {
                change.set_changed |= self.add_use(s);
                self.by_owner
                    .entry(key.0)
                    .or_default()
                    .insert(key.1.clone());
                self.by_key.insert(key, s.to_owned())
            }
            None => {
                if let Some(names) = self.by_owner.get_mut(&key.0) {
                    names.remove(&key.1);
                    if names.is_empty() {
                        self.by_owner.remove(&key.0);
                    }
                }
                self.by_key.remove(&key)
            }
        };
        if let Some(old) = old {
            change.set_changed |= self.drop_use(&old);
            change.released.push(old);
        }
        change
    }

    /// Drops every pin of `owner` (a stream that closed).
    pub fn release_owner(&mut self, owner: u64) -> PinChange {
        let mut change = PinChange::default();
        for name in self.by_owner.remove(&owner).unwrap_or_default() {
            if let Some(sha) = self.by_key.remove(&(owner, name)) {
                change.set_changed |= self.drop_use(&sha);
                change.released.push(sha);
            }
        }
        change
    }

    /// Whether any live resource uses `sha`.
    pub fn contains(&self, sha: &str) -> bool {
        self.uses.contains_key(sha)
    }

    /// The modules in use.
    pub fn shas(&self) -> BTreeSet<String> {
        self.uses.keys().cloned().collect()
    }

    /// Every pin: (stream, resource name) and its module.
    pub fn iter(&self) -> impl Iterator<Item = (&PinKey, &String)> {
        self.by_key.iter()
    }

    /// One more user of `sha`; `true` if it is the first.
    fn add_use(&mut self, sha: &str) -> bool {
        let n = self.uses.entry(sha.to_owned()).or_default();
        *n += 1;
        *n == 1
    }

    /// One user fewer of `sha`; `true` if it was the last.
    fn drop_use(&mut self, sha: &str) -> bool {
        match self.uses.get_mut(sha) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.uses.remove(sha);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(o: u64, n: &str) -> PinKey {
        (o, n.to_owned())
    }

    #[test]
    fn the_set_changes_only_with_a_first_or_last_user() {
        let mut p = Pins::default();
        assert!(p.set(key(1, "a"), Some("x")).set_changed);
        assert!(!p.set(key(2, "a"), Some("x")).set_changed);
        // The same pin again is no change at all.
        assert_eq!(p.set(key(2, "a"), Some("x")), PinChange::default());
        // Moving one of two users elsewhere adds y, keeps x.
        let c = p.set(key(2, "a"), Some("y"));
        assert!(c.set_changed);
        assert_eq!(c.released, ["x"]);
        assert!(p.contains("x") && p.contains("y"));
        // The last user of x goes: x leaves the set.
        let c = p.set(key(1, "a"), None);
        assert!(c.set_changed);
        assert!(!p.contains("x"));
        assert_eq!(p.shas(), BTreeSet::from(["y".to_owned()]));
        // Unpinning what is not pinned changes nothing.
        assert_eq!(p.set(key(9, "z"), None), PinChange::default());
    }

    #[test]
    fn releasing_an_owner_drops_only_its_pins() {
        let mut p = Pins::default();
        p.set(key(1, "a"), Some("x"));
        p.set(key(1, "b"), Some("y"));
        p.set(key(2, "a"), Some("x"));
        let mut c = p.release_owner(1);
        c.released.sort();
        assert_eq!(c.released, ["x", "y"]);
        assert!(c.set_changed, "y lost its last user");
        assert!(p.contains("x") && !p.contains("y"));
        assert_eq!(p.iter().count(), 1);
        let c = p.release_owner(2);
        assert!(c.set_changed);
        assert!(p.shas().is_empty());
        assert_eq!(p.release_owner(2), PinChange::default());
        // An owner whose pins were all unset one by one has nothing left to release.
        p.set(key(3, "a"), Some("x"));
        p.set(key(3, "a"), None);
        assert!(p.by_owner.is_empty());
        assert_eq!(p.release_owner(3), PinChange::default());
    }
}
