//! Rights to pull private modules that requesters showed recently: (credentials, repository)
//! → when. In memory only, bounded, never holding a credential: credentials are kept as the
//! sha256 of what identifies them ([`cred_id`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;

/// The most (credentials, repository) pairs remembered; the oldest goes first.
pub const MAX_PROOFS: usize = 4096;

/// An identifier of credentials that is not the credentials: sha256 over their kind and value.
pub fn cred_id(auth: &RegistryAuth) -> String {
    let text = match auth {
        RegistryAuth::Anonymous => return "anonymous".to_owned(),
        RegistryAuth::Basic(u, p) => format!("basic\0{u}\0{p}"),
        RegistryAuth::Bearer(t) => format!("bearer\0{t}"),
    };
    super::verify::sha256_hex(text.as_bytes())
}

#[derive(Default)]
pub struct Proofs {
    /// (credentials id, `host/repository`) → when the right was last shown.
    shown: HashMap<(String, String), Instant>,
}

impl Proofs {
    /// Shown within `ttl` of `now`.
    pub fn fresh(&self, cred: &str, repo: &str, ttl: Duration, now: Instant) -> bool {
        self.shown
            .get(&(cred.to_owned(), repo.to_owned()))
            .is_some_and(|at| now.saturating_duration_since(*at) < ttl)
    }

    /// Shown at all in this process's life (remembered entries only).
    pub fn ever(&self, cred: &str, repo: &str) -> bool {
        self.shown.contains_key(&(cred.to_owned(), repo.to_owned()))
    }

    pub fn insert(&mut self, cred: &str, repo: &str, now: Instant) {
        let key = (cred.to_owned(), repo.to_owned());
        if !self.shown.contains_key(&key) && self.shown.len() >= MAX_PROOFS {
            if let Some(oldest) = self
                .shown
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
            {
                self.shown.remove(&oldest);
            }
        }
        self.shown.insert(key, now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shown.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_expire_and_stay_bounded() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        let mut p = Proofs::default();
        let alice = cred_id(&RegistryAuth::Basic("alice".into(), "pw".into()));
        let bob = cred_id(&RegistryAuth::Basic("bob".into(), "pw".into()));
        assert!(!alice.contains("alice") && alice != bob);
        p.insert(&alice, "r/x", t0);
        assert!(p.fresh(&alice, "r/x", ttl, t0 + Duration::from_secs(299)));
        assert!(!p.fresh(&alice, "r/x", ttl, t0 + Duration::from_secs(300)));
        assert!(p.ever(&alice, "r/x"));
        assert!(!p.fresh(&bob, "r/x", ttl, t0), "other credentials");
        assert!(!p.fresh(&alice, "r/y", ttl, t0), "other repository");
        for i in 0..MAX_PROOFS + 10 {
            p.insert(
                &bob,
                &format!("r/{i}"),
                t0 + Duration::from_millis(i as u64 + 1),
            );
        }
        assert_eq!(p.len(), MAX_PROOFS);
        assert!(!p.ever(&alice, "r/x"), "the oldest went first");
    }
}
