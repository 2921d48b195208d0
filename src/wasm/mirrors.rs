//! Registry mirrors and rewrites: a subset of containers-registries.conf(5) v2, the format
//! podman and CRI-O operators know, plus the `--registry-mirror UPSTREAM=MIRROR` shorthand.
//! Pure policy: which sources to try for an OCI reference, in order. The pipeline pulls.
//!
//! ```toml
//! [[registry]]
//! prefix = "ghcr.io/istio-ecosystem"        # host[/path] prefix of oci:// references
//! location = "127.0.0.1:5000/mirror/istio"  # optional rewrite of that prefix (the origin)
//! insecure = false
//! [[registry.mirror]]
//! location = "127.0.0.1:5001"
//! pull-from-mirror = "all"                  # all | digest-only | tag-only
//! insecure = true
//! ```
//!
//! The longest matching prefix wins. Mirrors are tried in order, then the origin. A
//! `digest-only` mirror is used only for references by digest (a tag is resolved at the origin
//! first, then the digest is pulled from the mirror); `tag-only` only for tags.

use std::path::Path;

use serde::Deserialize;

use super::url::OciRef;

/// When a mirror may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullFrom {
    All,
    DigestOnly,
    TagOnly,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub location: String,
    #[serde(default, rename = "pull-from-mirror")]
    pub pull_from: Option<PullFrom>,
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub prefix: String,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub mirror: Vec<Mirror>,
}

/// The registries configuration.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Registries {
    #[serde(default, rename = "registry")]
    pub registries: Vec<Registry>,
}

/// One place to pull a reference from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub reference: OciRef,
    /// Reached over TLS without verification, or plain HTTP.
    pub insecure: bool,
    pub mirror: bool,
    /// Usable only once the reference is pinned by digest.
    pub digest_only: bool,
}

impl Registries {
    /// Reads `--registries-config` (TOML; unknown keys are errors).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r: Registries =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for reg in &r.registries {
            if reg.prefix.trim().is_empty() {
                return Err(format!(
                    "{}: a [[registry]] has an empty prefix",
                    path.display()
                ));
            }
        }
        let mut r = r;
        r.canonicalise();
        Ok(r)
    }

    /// Every prefix and location with its host canonical (see `url`), as references are.
    fn canonicalise(&mut self) {
        use super::url::canonical_name;
        for reg in &mut self.registries {
            reg.prefix = canonical_name(&reg.prefix);
            reg.location = reg.location.as_deref().map(canonical_name);
            for m in &mut reg.mirror {
                m.location = canonical_name(&m.location);
            }
        }
    }

    /// Adds `UPSTREAM=MIRROR` (`--registry-mirror`): every reference under UPSTREAM is tried at
    /// MIRROR first.
    pub fn add_shorthand(&mut self, spec: &str) -> Result<(), String> {
        let (up, mirror) = spec
            .split_once('=')
            .filter(|(u, m)| !u.is_empty() && !m.is_empty())
            .ok_or_else(|| {
                format!("'{spec}' is not UPSTREAM=MIRROR (e.g. ghcr.io=127.0.0.1:5001)")
            })?;
        self.registries.push(Registry {
            prefix: up.to_owned(),
            location: None,
            insecure: false,
            mirror: vec![Mirror {
                location: mirror.to_owned(),
                pull_from: None,
                insecure: false,
            }],
        });
        self.canonicalise();
        Ok(())
    }

    /// Where to pull `r` from, in order: usable mirrors, then the origin.
    pub fn sources(&self, r: &OciRef) -> Vec<Source> {
        let name = format!("{}/{}", r.registry, r.repository);
        let matched = self
            .registries
            .iter()
            .filter(|reg| prefix_matches(&reg.prefix, &name))
            .max_by_key(|reg| reg.prefix.len());
        let Some(reg) = matched else {
            return vec![Source {
                reference: r.clone(),
                insecure: false,
                mirror: false,
                digest_only: false,
            }];
        };
        let rest = &name[reg.prefix.trim_end_matches('/').len()..];
        let at = |location: &str| rewrite(r, &format!("{}{rest}", location.trim_end_matches('/')));
        let by_digest = r.digest.is_some();
        let mut out: Vec<Source> = reg
            .mirror
            .iter()
            .filter_map(|m| {
                let pull = m.pull_from.unwrap_or(PullFrom::All);
                if pull == PullFrom::TagOnly && by_digest {
                    return None;
                }
                Some(Source {
                    reference: at(&m.location)?,
                    insecure: m.insecure,
                    mirror: true,
                    digest_only: pull == PullFrom::DigestOnly,
                })
            })
            .collect();
        let origin = reg
            .location
            .as_deref()
            .and_then(at)
            .unwrap_or_else(|| r.clone());
        out.push(Source {
            reference: origin,
            insecure: reg.insecure,
            mirror: false,
            digest_only: false,
        });
        out
    }
}

/// Whether `prefix` covers `name` at a path boundary (`a/b` covers `a/b` and `a/b/c`, not `a/bc`).
fn prefix_matches(prefix: &str, name: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    name == p
        || name
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `r` with its `host[:port]/repository` replaced by `location` (tag and digest kept).
fn rewrite(r: &OciRef, location: &str) -> Option<OciRef> {
    let (registry, repository) = location.split_once('/')?;
    Some(OciRef {
        registry: registry.to_owned(),
        repository: repository.to_owned(),
        tag: r.tag.clone(),
        digest: r.digest.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oci(s: &str) -> OciRef {
        match super::super::url::ModuleUrl::parse(s).unwrap() {
            super::super::url::ModuleUrl::Oci(r) => r,
            _ => unreachable!(),
        }
    }

    fn names(v: &[Source]) -> Vec<String> {
        v.iter()
            .map(|s| {
                format!(
                    "{}/{}{}",
                    s.reference.registry,
                    s.reference.repository,
                    if s.digest_only { " (digest-only)" } else { "" }
                )
            })
            .collect()
    }

    #[test]
    fn sources_in_order() {
        let r: Registries = toml::from_str(
            r#"
[[registry]]
prefix = "ghcr.io/istio-ecosystem"
location = "127.0.0.1:5000/mirror/istio"
[[registry.mirror]]
location = "127.0.0.1:5001"
insecure = true
[[registry.mirror]]
location = "127.0.0.1:5002/cache"
pull-from-mirror = "digest-only"
[[registry]]
prefix = "ghcr.io"
[[registry.mirror]]
location = "127.0.0.1:5003"
pull-from-mirror = "tag-only"
"#,
        )
        .unwrap();
        let s = r.sources(&oci("oci://ghcr.io/istio-ecosystem/wasm/auth:1.0"));
        assert_eq!(
            names(&s),
            [
                "127.0.0.1:5001/wasm/auth",
                "127.0.0.1:5002/cache/wasm/auth (digest-only)",
                "127.0.0.1:5000/mirror/istio/wasm/auth"
            ]
        );
        assert!(s[0].insecure && s[0].mirror && !s[2].mirror);
        assert_eq!(s[0].reference.tag.as_deref(), Some("1.0"));
        // The longest prefix wins; a tag-only mirror is skipped for digests.
        let d = format!("oci://ghcr.io/other/x@sha256:{}", "a".repeat(64));
        assert_eq!(names(&r.sources(&oci(&d))), ["ghcr.io/other/x"]);
        assert_eq!(
            names(&r.sources(&oci("oci://ghcr.io/other/x:1"))),
            ["127.0.0.1:5003/other/x", "ghcr.io/other/x"]
        );
        // Prefixes match at path boundaries only; unmatched references go straight to origin.
        assert_eq!(
            names(&r.sources(&oci("oci://ghcr.io/istio-ecosystemx/y:1"))),
            [
                "127.0.0.1:5003/istio-ecosystemx/y",
                "ghcr.io/istio-ecosystemx/y"
            ]
        );
        assert_eq!(
            names(&r.sources(&oci("oci://quay.io/a/b:1"))),
            ["quay.io/a/b"]
        );
    }

    #[test]
    fn shorthand_and_errors() {
        let mut r = Registries::default();
        r.add_shorthand("127.0.0.1:5000=127.0.0.1:5001").unwrap();
        assert_eq!(
            names(&r.sources(&oci("oci://127.0.0.1:5000/team/p:1"))),
            ["127.0.0.1:5001/team/p", "127.0.0.1:5000/team/p"]
        );
        assert!(r.add_shorthand("nomirror").is_err());
        assert!(toml::from_str::<Registries>("[[registry]]\nprefix = \"a\"\nbogus = 1\n").is_err());
    }
}
