//! The index of the cache and its rules, as pure functions: what a URL or checksum resolves
//! to, when a cached result may be reused under a pull policy, how a result is recorded and how
//! two processes' indexes merge. No I/O, no locks: `store` reads and writes the index, the
//! cache façade holds it under its mutex.
//!
//! URLs may carry credentials (user-info, pre-signed query strings) and `index.json` is read by
//! every process sharing the directory, so the index never holds a URL as given: results are
//! keyed by the URL's sha256 ([`url_key`]) and only the redacted form is kept, for people.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::admission::Access;
use super::error::{redact, FetchError};
use super::options::{GetOptions, Matched, Module, PullPolicy};
use super::url::ModuleUrl;

/// One cached module.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ModuleEntry {
    pub size: u64,
    /// URLs this module was fetched from, redacted.
    #[serde(default)]
    pub urls: BTreeSet<String>,
    /// OCI image manifest (and index) digests that resolve to this module.
    #[serde(default)]
    pub oci_digests: BTreeSet<String>,
    /// Unix seconds.
    pub last_used: u64,
    pub fetched_at: u64,
    /// The host that served the module when it was fetched (a mirror or the origin).
    #[serde(default)]
    pub served_by: Option<String>,
    /// Signatures verified for it: manifest (or index) digest → fingerprints of the keys that
    /// verified over that digest (see `admission`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signatures: BTreeMap<String, BTreeSet<String>>,
    /// Canonical `host/repository` → whether it was pulled from there with credentials.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub access: BTreeMap<String, Access>,
}

impl ModuleEntry {
    /// Takes in another process's record of the same module: verified signatures and access
    /// records add up, the latest use wins.
    pub fn merge(&mut self, other: &ModuleEntry) -> bool {
        let before = (
            self.last_used,
            self.signatures.clone(),
            self.access.clone(),
            self.urls.len(),
            self.oci_digests.len(),
        );
        self.last_used = self.last_used.max(other.last_used);
        for (d, fps) in &other.signatures {
            self.signatures
                .entry(d.clone())
                .or_default()
                .extend(fps.iter().cloned());
        }
        for (repo, a) in &other.access {
            let merged = match self.access.get(repo) {
                Some(mine) => mine.merge(*a),
                None => *a,
            };
            self.access.insert(repo.clone(), merged);
        }
        self.urls.extend(other.urls.iter().cloned());
        self.oci_digests.extend(other.oci_digests.iter().cloned());
        before
            != (
                self.last_used,
                self.signatures.clone(),
                self.access.clone(),
                self.urls.len(),
                self.oci_digests.len(),
            )
    }
}

/// What the cache remembers about one URL (for pull policies).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UrlEntry {
    /// The URL, redacted (the key is the sha256 of the full URL).
    #[serde(default)]
    pub url: String,
    pub sha256: String,
    #[serde(default)]
    pub oci_digest: Option<String>,
    /// Resource name → last resource version seen with this URL.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// Unix milliseconds of the last fetch from this URL (by any process).
    #[serde(default)]
    pub fetched_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Index {
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleEntry>,
    #[serde(default)]
    pub urls: BTreeMap<String, UrlEntry>,
}

/// Whether `key` can name a module file: exactly 64 lowercase hex digits. Index keys come from
/// a file other processes write, so they are checked before they become paths.
pub fn valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The index key of a URL: the sha256 (hex) of the URL as given.
pub fn url_key(url: &str) -> String {
    super::verify::sha256_hex(url.as_bytes())
}

impl Index {
    /// What the index remembers about `url`.
    pub fn url(&self, url: &str) -> Option<&UrlEntry> {
        self.urls.get(&url_key(url))
    }

    /// The entry of `url`, created (with its redacted form) if new.
    pub fn url_mut(&mut self, url: &str) -> &mut UrlEntry {
        self.urls.entry(url_key(url)).or_insert_with(|| UrlEntry {
            url: redact(url),
            ..Default::default()
        })
    }

    /// Drops what an index file must not hold or cannot name: URL results not keyed by a URL
    /// hash (an older format, keyed by the raw URL) and unredacted URLs in module entries.
    pub fn sanitize(&mut self) {
        self.urls.retain(|k, _| valid_key(k));
        for u in self.urls.values_mut() {
            u.url = redact(&u.url);
        }
        for m in self.modules.values_mut() {
            m.urls = m.urls.iter().map(|u| redact(u)).collect();
        }
    }

    /// Takes in what another process recorded: modules this index lacks, and URL results
    /// fetched more recently than ours (for modules this index has). The one merge rule for
    /// a cache directory shared between processes.
    pub fn absorb(&mut self, other: Index) {
        for (sha, entry) in other.modules {
            match self.modules.get_mut(&sha) {
                Some(mine) => {
                    mine.merge(&entry);
                }
                None => {
                    self.modules.insert(sha, entry);
                }
            }
        }
        for (url, entry) in other.urls {
            let newer = self
                .urls
                .get(&url)
                .is_none_or(|u| u.fetched_at_ms < entry.fetched_at_ms);
            if newer && self.modules.contains_key(&entry.sha256) {
                self.urls.insert(url, entry);
            }
        }
    }
}

/// A checksum as the cache compares it: lower-case hex without `sha256:`; empty or Istio's
/// `nil` is none.
pub fn normalize_sha(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    if s.is_empty() || s == "nil" {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

/// The checksum a get must satisfy: `sha256` given, else a digest pinned in the URL.
pub fn expected_checksum(
    parsed: &ModuleUrl,
    sha256: Option<&str>,
    shown: &str,
) -> Result<Option<String>, FetchError> {
    let bad = |reason: String| FetchError::BadUrl {
        url: shown.to_owned(),
        reason,
    };
    match sha256.and_then(normalize_sha) {
        None => Ok(parsed.pinned_digest()),
        Some(s) if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(bad(format!("sha256 {s:?} is not 64 hex digits")))
        }
        Some(s) => match parsed.pinned_digest() {
            Some(pinned) if pinned != s => Err(bad(format!(
                "sha256 {s} differs from the digest in the URL ({pinned})"
            ))),
            _ => Ok(Some(s)),
        },
    }
}

/// The pull policy a get follows: unspecified means Always for `:latest` and untagged OCI.
pub fn effective_policy(parsed: &ModuleUrl, opts: &GetOptions) -> PullPolicy {
    match opts.pull_policy {
        PullPolicy::Unspecified if parsed.is_latest() => PullPolicy::Always,
        p => p,
    }
}

/// Whether the cached result `u` of a URL may be reused under `policy`: always, except under
/// Always, where only the same resource version reuses it.
pub fn reusable(u: &UrlEntry, policy: PullPolicy, opts: &GetOptions) -> bool {
    match policy {
        PullPolicy::Always => u.versions.get(&opts.resource_name) == Some(&opts.resource_version),
        _ => true,
    }
}

/// Which of an OCI manifest's `digest` and its index's `index_digest` equals `hex`, if any.
pub fn digest_match(digest: &str, index_digest: Option<&str>, hex: &str) -> Option<Matched> {
    if digest.trim_start_matches("sha256:") == hex {
        Some(Matched::ManifestDigest)
    } else if index_digest.map(|d| d.trim_start_matches("sha256:")) == Some(hex) {
        Some(Matched::IndexDigest)
    } else {
        None
    }
}

/// A module whose bytes or OCI digest equal `hex`.
pub fn find_by_checksum(index: &Index, hex: &str) -> Option<(String, Option<Matched>)> {
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

/// Records `url`'s result (and, with `opts`, the resource version it was asked for) at time
/// `now`; returns whether the index changed.
pub fn record_url(
    index: &mut Index,
    url: &str,
    module: &Module,
    opts: Option<&GetOptions>,
    now: u64,
) -> bool {
    let entry = index.url_mut(url);
    let mut changed = entry.sha256 != module.sha256;
    entry.sha256 = module.sha256.clone();
    if module.oci_digest.is_some() {
        entry.oci_digest = module.oci_digest.clone();
    }
    if let Some(opts) = opts.filter(|o| {
        !o.resource_name.is_empty()
            && entry.versions.get(&o.resource_name) != Some(&o.resource_version)
    }) {
        entry
            .versions
            .insert(opts.resource_name.clone(), opts.resource_version.clone());
        changed = true;
    }
    if let Some(e) = index.modules.get_mut(&module.sha256) {
        // A use is a change: it is what keeps the module from expiring in other processes.
        if e.last_used < now {
            e.last_used = now;
            changed = true;
        }
        if e.urls.insert(redact(url)) {
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn module_a() -> Module {
        Module {
            path: "p".into(),
            sha256: sha('a'),
            oci_digest: None,
            size: 1,
            matched: None,
            fetched: true,
            served_by: None,
        }
    }

    fn index_with(module: &str, digest: &str) -> Index {
        let mut index = Index::default();
        index.modules.insert(
            module.to_owned(),
            ModuleEntry {
                size: 1,
                oci_digests: BTreeSet::from([digest.to_owned()]),
                ..Default::default()
            },
        );
        index
    }

    #[test]
    fn checksums_find_modules_by_bytes_or_oci_digest() {
        let index = index_with(&sha('a'), &format!("sha256:{}", sha('b')));
        assert_eq!(
            find_by_checksum(&index, &sha('a')),
            Some((sha('a'), Some(Matched::ModuleSha256)))
        );
        assert_eq!(
            find_by_checksum(&index, &sha('b')),
            Some((sha('a'), Some(Matched::ManifestDigest)))
        );
        assert_eq!(find_by_checksum(&index, &sha('c')), None);
        assert_eq!(normalize_sha(" sha256:ABC "), Some("abc".into()));
        assert_eq!(normalize_sha("nil"), None);
        let d = format!("sha256:{}", sha('d'));
        assert_eq!(
            digest_match(&d, None, &sha('d')),
            Some(Matched::ManifestDigest)
        );
        assert_eq!(
            digest_match("x", Some(&d), &sha('d')),
            Some(Matched::IndexDigest)
        );
        assert_eq!(digest_match("x", None, &sha('d')), None);
    }

    #[test]
    fn pull_policy_table() {
        let latest = ModuleUrl::parse("oci://r.example/p:latest").unwrap();
        let untagged = ModuleUrl::parse("oci://r.example/p").unwrap();
        let tagged = ModuleUrl::parse("oci://r.example/p:1.0").unwrap();
        let http = ModuleUrl::parse("https://h.example/p.wasm").unwrap();
        let opts = |p| GetOptions {
            pull_policy: p,
            resource_name: "r".into(),
            resource_version: "2".into(),
            ..Default::default()
        };
        use PullPolicy::*;
        for (url, policy, want) in [
            (&latest, Unspecified, Always),
            (&untagged, Unspecified, Always),
            (&tagged, Unspecified, Unspecified),
            (&http, Unspecified, Unspecified),
            (&latest, IfNotPresent, IfNotPresent),
            (&tagged, Always, Always),
        ] {
            assert_eq!(effective_policy(url, &opts(policy)), want);
        }
        let mut u = UrlEntry::default();
        u.versions.insert("r".into(), "1".into());
        assert!(reusable(&u, IfNotPresent, &opts(IfNotPresent)));
        assert!(!reusable(&u, Always, &opts(Always)), "new resource version");
        u.versions.insert("r".into(), "2".into());
        assert!(reusable(&u, Always, &opts(Always)), "same resource version");
    }

    #[test]
    fn expected_checksums() {
        let pinned = ModuleUrl::parse(&format!("oci://r.example/p@sha256:{}", sha('e'))).unwrap();
        let plain = ModuleUrl::parse("https://h.example/p.wasm").unwrap();
        assert_eq!(expected_checksum(&plain, None, "u").unwrap(), None);
        assert_eq!(
            expected_checksum(&pinned, None, "u").unwrap(),
            Some(sha('e'))
        );
        assert!(
            expected_checksum(&pinned, Some(&sha('f')), "u").is_err(),
            "differs from the URL"
        );
        assert!(
            expected_checksum(&plain, Some("xyz"), "u").is_err(),
            "not 64 hex digits"
        );
    }

    #[test]
    fn recording_marks_changes_only() {
        let mut index = index_with(&sha('a'), "d");
        let m = module_a();
        assert!(record_url(&mut index, "u", &m, None, 5));
        assert!(!record_url(&mut index, "u", &m, None, 5));
        assert!(
            record_url(&mut index, "u", &m, None, 6),
            "a later use is a change"
        );
        assert_eq!(index.modules[&sha('a')].last_used, 6);
        assert!(index.modules[&sha('a')].urls.contains("u"));
    }

    #[test]
    fn merging_keeps_the_latest_use_and_adds_up_records() {
        let mut mine = index_with(&sha('a'), "d");
        mine.modules.get_mut(&sha('a')).unwrap().last_used = 10;
        mine.modules
            .get_mut(&sha('a'))
            .unwrap()
            .access
            .insert("r/x".into(), Access::Private);
        let mut theirs = index_with(&sha('a'), "d2");
        {
            let e = theirs.modules.get_mut(&sha('a')).unwrap();
            e.last_used = 20;
            e.signatures
                .entry("sha256:d".into())
                .or_default()
                .insert("fp".into());
            e.access.insert("r/x".into(), Access::Public);
        }
        mine.absorb(theirs);
        let e = &mine.modules[&sha('a')];
        assert_eq!(e.last_used, 20);
        assert!(e.oci_digests.contains("d") && e.oci_digests.contains("d2"));
        assert!(e.signatures["sha256:d"].contains("fp"));
        assert_eq!(e.access["r/x"], Access::Public);
        // An older use does not go back in time.
        let mut older = index_with(&sha('a'), "d");
        older.modules.get_mut(&sha('a')).unwrap().last_used = 5;
        mine.absorb(older);
        assert_eq!(mine.modules[&sha('a')].last_used, 20);
    }

    #[test]
    fn the_index_never_holds_a_url_as_given() {
        let mut index = index_with(&sha('a'), "d");
        let m = module_a();
        let url = "https://user:pa55@h.example/m.wasm?X-Amz-Signature=t0ken";
        record_url(&mut index, url, &m, None, 1);
        let json = serde_json::to_string(&index).unwrap();
        assert!(!json.contains("pa55") && !json.contains("t0ken"), "{json}");
        assert_eq!(index.url(url).unwrap().sha256, sha('a'));
        // An older index keyed by raw URLs is cleaned on load.
        let mut old = index_with(&sha('a'), "d");
        old.urls.insert(url.into(), UrlEntry::default());
        old.modules
            .get_mut(&sha('a'))
            .unwrap()
            .urls
            .insert(url.into());
        old.sanitize();
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("pa55") && !json.contains("t0ken"), "{json}");
    }
}
