//! Admission and authorization: whether a module may be handed to *this* request, decided on
//! every request — a cache hit as much as a download. Pure functions over what the index
//! records about a module; no I/O. The cache calls them at its one choke point
//! (`Cache::get`), and what they cannot decide from the record they say must be checked
//! against the registry ([`Admission::Recheck`], [`Authorization::Prove`],
//! [`Authorization::Fetch`]).
//!
//! # What the index records per module
//! * `signatures`: manifest (or index) digest → fingerprints of the keys whose signature over
//!   that digest verified ([`super::signature::key_fingerprint`]).
//! * `access`: canonical `host/repository` → [`Access`]: `public` when it was pulled without
//!   credentials, `private` when credentials were used (the registry may have demanded them).
//!
//! # Rules
//! * Admission follows the policy **in force**, never the one a module was admitted under: a
//!   hit whose record shows no signature by a key the matching rule lists is re-checked at the
//!   registry (signatures looked up again by digest, no blob download); a deny rule, no
//!   matching rule, or a signature rule on an HTTP(S) module refuses at once.
//! * Authorization: a module pulled with credentials from a repository is handed to a request
//!   for that repository only after the requester's own credentials were shown to pull it (a
//!   manifest `HEAD`, remembered for a TTL per credentials and repository). Public modules
//!   need no check. A hit found by checksum for a repository (or an HTTP(S) URL) the module never
//!   came from is not served from the cache: nothing ties the bytes to what was asked for, so
//!   the request pulls (or downloads) from its own reference, which binds them.

use std::collections::{BTreeMap, BTreeSet};

#[cfg(test)]
use super::signature::{key_fingerprint, Signers};

use serde::{Deserialize, Serialize};

use super::signature::{Action, VerifyPolicy};
use super::url::ModuleUrl;

/// How a repository gave the module out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Pulled without credentials.
    Public,
    /// Pulled with credentials.
    Private,
}

impl Access {
    /// The merge of two processes' records: a repository that served the module without
    /// credentials to anyone is public.
    pub fn merge(self, other: Access) -> Access {
        if self == Access::Public || other == Access::Public {
            Access::Public
        } else {
            Access::Private
        }
    }
}

/// What the signature policy says about handing a module to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// No policy, or the matching rule allows unsigned modules (its pattern, if any).
    Allowed(Option<String>),
    /// The record shows a signature by a key of the matching rule (pattern, digest, key).
    Verified {
        rule: String,
        digest: String,
        key: String,
    },
    /// The record does not satisfy the rule: check the registry's signatures again.
    Recheck(String),
    /// Refused outright, with the reason.
    Refused(String),
}

impl Admission {
    /// Whether the module may be served without going to the registry.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Admission::Allowed(_) | Admission::Verified { .. })
    }
}

/// What the policy says before anything is looked up: `Some(reason)` refuses at once.
pub fn refused_upfront(policy: Option<&VerifyPolicy>, url: &ModuleUrl) -> Option<String> {
    match admit(policy, url, &BTreeMap::new()) {
        Admission::Refused(why) => Some(why),
        _ => None,
    }
}

/// The policy in force applied to `url` and a module whose verified signatures are `record`
/// (digest → key fingerprints).
pub fn admit(
    policy: Option<&VerifyPolicy>,
    url: &ModuleUrl,
    record: &BTreeMap<String, BTreeSet<String>>,
) -> Admission {
    let Some(policy) = policy else {
        return Admission::Allowed(None);
    };
    let name = url.policy_name();
    let Some(rule) = policy.rule_for(&name) else {
        return Admission::Refused(format!("no rule of --verify-policy matches {name}"));
    };
    let signers = match &rule.action {
        Action::Deny => {
            return Admission::Refused(format!("{name} is denied by rule {:?}", rule.pattern))
        }
        Action::AllowUnsigned => return Admission::Allowed(Some(rule.pattern.clone())),
        Action::Verify(signers) => signers,
    };
    if matches!(url, ModuleUrl::Http(_)) && signers.keyless.is_empty() {
        return Admission::Refused(format!(
            "rule {:?} of --verify-policy requires a key signature for {name}; HTTP(S) modules carry only keyless bundles (<url>.sigstore.json)",
            rule.pattern
        ));
    }
    let wanted = signers.fingerprints();
    for (digest, fps) in record {
        if let Some((key, _)) = wanted.iter().find(|(_, fp)| fps.contains(fp)) {
            return Admission::Verified {
                rule: rule.pattern.clone(),
                digest: digest.clone(),
                key: key.clone(),
            };
        }
    }
    Admission::Recheck(rule.pattern.clone())
}

/// What a request must show before a cached module is handed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// Nothing: the module is public where asked for, or came from this very URL.
    None,
    /// Its own credentials must pull this repository (`host/repository`): one manifest `HEAD`,
    /// unless proven within the TTL.
    Prove(String),
    /// It cannot prove access (an HTTP(S) URL naming a registry's private module): download
    /// from its own URL instead of using the cached file.
    Fetch,
}

/// Whether handing the cached module with `access` records to a request for `url` needs
/// proof. `same_url` is set when the hit came from this very URL's own recorded result (an
/// HTTP(S) URL, with whatever token it carries, is its own proof).
pub fn authorize(
    access: &BTreeMap<String, Access>,
    url: &ModuleUrl,
    same_url: bool,
) -> Authorization {
    match url {
        ModuleUrl::Oci(r) => {
            let repo = format!("{}/{}", r.registry, r.repository);
            match (access.get(&repo), same_url) {
                (Some(Access::Public), _) => Authorization::None,
                // Pulled from this repository with credentials (or an older record that says
                // nothing, for this very URL): show it may be pulled.
                (Some(Access::Private), _) | (None, true) => Authorization::Prove(repo),
                // Found by checksum but never pulled from this repository: nothing ties the
                // cached bytes to it, so the pull path binds them (manifest, then lookup #2).
                (None, false) => Authorization::Fetch,
            }
        }
        ModuleUrl::Http(_) if same_url => Authorization::None,
        // Another URL naming a cached module's sha256: it downloads from its own URL.
        ModuleUrl::Http(_) => Authorization::Fetch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::signature::Rule;

    fn policy(rules: &[(&str, Action)]) -> VerifyPolicy {
        VerifyPolicy {
            rules: rules
                .iter()
                .map(|(p, a)| Rule {
                    pattern: crate::wasm::url::canonical_name(p),
                    action: a.clone(),
                })
                .collect(),
        }
    }

    fn keys(k: &[(String, Vec<u8>)]) -> Signers {
        Signers {
            keys: k.to_vec(),
            ..Default::default()
        }
    }

    fn url(s: &str) -> ModuleUrl {
        ModuleUrl::parse(s).unwrap()
    }

    fn rec(pairs: &[(&str, &[u8])]) -> BTreeMap<String, BTreeSet<String>> {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (d, der) in pairs {
            m.entry(d.to_string())
                .or_default()
                .insert(key_fingerprint(der));
        }
        m
    }

    #[test]
    fn admission_table() {
        let k1 = ("k1.pub".to_string(), b"key-one".to_vec());
        let k2 = ("k2.pub".to_string(), b"key-two".to_vec());
        let p = policy(&[
            (
                "localhost:5000/sc/*",
                Action::Verify(keys(std::slice::from_ref(&k1))),
            ),
            (
                "localhost:5000/rot/*",
                Action::Verify(keys(std::slice::from_ref(&k2))),
            ),
            ("localhost:5000/no/*", Action::Deny),
            ("h.example/open/*", Action::AllowUnsigned),
            ("localhost:5000/*", Action::AllowUnsigned),
        ]);
        let none = rec(&[]);
        let by_k1 = rec(&[("sha256:d1", b"key-one")]);
        use Admission::*;
        let verified = |rule: &str, key: &str| Verified {
            rule: rule.into(),
            digest: "sha256:d1".into(),
            key: key.into(),
        };
        for (u, record, want) in [
            // Spelling variants meet the same rule.
            (
                "oci://localhost:5000/sc/x:v1",
                &none,
                Recheck("localhost:5000/sc/*".into()),
            ),
            (
                "oci://LOCALHOST:5000/sc/x:v1",
                &none,
                Recheck("localhost:5000/sc/*".into()),
            ),
            (
                "oci://localhost.:5000/sc/x:v1",
                &none,
                Recheck("localhost:5000/sc/*".into()),
            ),
            (
                "oci://localhost:5000/sc/x:v1",
                &by_k1,
                verified("localhost:5000/sc/*", "k1.pub"),
            ),
            // A key rotated away: admitted under k1, the rule now lists k2 only.
            (
                "oci://localhost:5000/rot/x:v1",
                &by_k1,
                Recheck("localhost:5000/rot/*".into()),
            ),
            (
                "oci://localhost:5000/no/x:v1",
                &by_k1,
                Refused("localhost:5000/no/x is denied by rule \"localhost:5000/no/*\"".into()),
            ),
            (
                "oci://localhost:5000/other:v1",
                &none,
                Allowed(Some("localhost:5000/*".into())),
            ),
            (
                "oci://elsewhere/x:v1",
                &none,
                Refused("no rule of --verify-policy matches elsewhere/x".into()),
            ),
            (
                "https://h.example/open/m.wasm",
                &none,
                Allowed(Some("h.example/open/*".into())),
            ),
        ] {
            assert_eq!(admit(Some(&p), &url(u), record), want, "{u}");
        }
        // An HTTP URL under a key rule is refused, whatever the record says.
        let sig_http = policy(&[("*", Action::Verify(keys(std::slice::from_ref(&k1))))]);
        let got = admit(Some(&sig_http), &url("https://h.example/m.wasm"), &by_k1);
        assert!(
            matches!(&got, Refused(w) if w.contains("only keyless bundles")),
            "{got:?}"
        );
        assert!(refused_upfront(Some(&sig_http), &url("https://h.example/m.wasm")).is_some());
        // A keyless rule: an HTTP module is checked (its bundle beside it), and a record made
        // under another identity does not count.
        let keyless = policy(&[(
            "*",
            Action::Verify(Signers {
                keyless: vec![crate::wasm::signature::Keyless {
                    issuer: "https://issuer".into(),
                    identity: crate::wasm::keyless::Identity::Exact("ci@example.com".into()),
                }],
                ..Default::default()
            }),
        )]);
        assert_eq!(
            admit(Some(&keyless), &url("https://h.example/m.wasm"), &by_k1),
            Recheck("*".into())
        );
        assert!(refused_upfront(Some(&sig_http), &url("oci://r/x:1")).is_none());
        // No policy: everything is allowed.
        assert_eq!(admit(None, &url("oci://r/x:1"), &none), Allowed(None));
        assert!(Allowed(None).is_allowed() && !Recheck(String::new()).is_allowed());
    }

    #[test]
    fn authorization_table() {
        let public = BTreeMap::from([("r.example/a".to_string(), Access::Public)]);
        let private = BTreeMap::from([("r.example/a".to_string(), Access::Private)]);
        let nothing = BTreeMap::new();
        use Authorization::*;
        let prove = |r: &str| Prove(r.to_string());
        for (access, u, same, want) in [
            (&public, "oci://r.example/a:v1", false, None),
            (&public, "oci://R.Example./a:v1", false, None),
            (
                &private,
                "oci://r.example/a:v1",
                false,
                prove("r.example/a"),
            ),
            (&private, "oci://r.example/a:v1", true, prove("r.example/a")),
            // Found by checksum for a repository it never came from: pulled from there instead
            // (public in one repository says nothing about another).
            (&public, "oci://r.example/b:v1", false, Fetch),
            (&nothing, "oci://r.example/a:v1", false, Fetch),
            // An older record that says nothing, for this very URL: prove.
            (&nothing, "oci://r.example/a:v1", true, prove("r.example/a")),
            (&private, "https://h.example/m.wasm", false, Fetch),
            (&private, "https://h.example/m.wasm", true, None),
            (&public, "https://h.example/m.wasm", false, Fetch),
            (&nothing, "https://h.example/m.wasm", false, Fetch),
            (&nothing, "https://h.example/m.wasm", true, None),
        ] {
            assert_eq!(authorize(access, &url(u), same), want, "{u}");
        }
        assert_eq!(Access::Private.merge(Access::Public), Access::Public);
        assert_eq!(Access::Private.merge(Access::Private), Access::Private);
    }
}
