//! Clusters with no registry: modules from an OCI image layout — a directory, or an
//! `oci-archive` tar of one (what `skopeo copy … oci:DIR:TAG` / `oci-archive:FILE:TAG` and
//! `oras copy --to-oci-layout` write) — into the cache under their references, with no network.
//!
//! Owns reading the layout: `index.json`, the blobs (each checked against its digest before
//! use), the same layout rules as a pull (`oci::find_layer`, `oci::candidates`) and signatures
//! stored in the layout (sigstore bundles as OCI 1.1 referrers, cosign's legacy `.sig` tags),
//! checked under the same policy. Produces a new module; storing it is the cache's
//! ([`super::Cache::import`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::fetch::NewModule;
use super::oci::{candidates, find_layer, RawDesc, RawManifest};
use super::signature::{Action, LegacySig, VerifyPolicy, BUNDLE_TYPES, SIMPLESIGNING};
use super::store::{sha256_file, Store};
use super::unbox;
use super::url::ModuleUrl;

/// Manifests and signatures read into memory at most.
const MAX_SMALL_BLOB: u64 = 4 << 20;

/// An opened layout: its root directory (a temp copy for an archive).
pub struct Layout {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// One image of a layout, ready to be stored: the module and what admitted it.
pub struct Imported {
    pub url: String,
    pub(super) new: NewModule,
    /// The digest a signature verified over, and the signer's fingerprint.
    pub(super) signed: Option<(String, String)>,
}

impl Layout {
    /// A layout directory, or an archive extracted into a temp directory beside `scratch`
    /// (entry sizes capped at `max`; paths that leave the directory refused).
    pub fn open(path: &Path, scratch: &Path, max: u64) -> Result<Layout, String> {
        if path.is_dir() {
            return Layout::check(path.to_owned(), None);
        }
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(scratch)
            .map_err(|e| format!("cannot make a temp directory: {e}"))?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        // What an archive may unpack to in all: a few modules' worth.
        let budget = max.saturating_mul(4);
        let mut total: u64 = 0;
        for entry in archive
            .entries()
            .map_err(|e| format!("{}: not a tar archive: {e}", path.display()))?
        {
            let mut entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
            // Files and directories only: a link could point anywhere (/dev/zero, /etc).
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                return Err(format!(
                    "{}: entry {:?} is neither a file nor a directory",
                    path.display(),
                    entry
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ));
            }
            total = total.saturating_add(entry.size());
            if total > budget {
                return Err(format!(
                    "{}: unpacks to more than {budget} bytes",
                    path.display()
                ));
            }
            if entry.size() > max {
                return Err(format!(
                    "{}: entry of {} bytes, over the {max}-byte limit",
                    path.display(),
                    entry.size()
                ));
            }
            // `unpack_in` refuses paths that would leave the directory.
            entry
                .unpack_in(tmp.path())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Layout::check(tmp.path().to_owned(), Some(tmp))
    }

    fn check(root: PathBuf, tmp: Option<tempfile::TempDir>) -> Result<Layout, String> {
        if !root.join("index.json").is_file() || !root.join("oci-layout").is_file() {
            return Err(format!(
                "{}: not an OCI image layout (no oci-layout and index.json)",
                root.display()
            ));
        }
        Ok(Layout { root, _tmp: tmp })
    }

    /// The path of blob `digest`: a regular file, not a link (a layout directory is input).
    fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| super::index::valid_key(h))
            .ok_or_else(|| format!("unsupported digest {digest:?}"))?;
        let path = self.root.join("blobs").join("sha256").join(hex);
        regular(&path).map_err(|e| format!("blob {digest}: {e}"))?;
        Ok(path)
    }

    /// A small blob, checked against its digest.
    fn small(&self, digest: &str) -> Result<Vec<u8>, String> {
        let path = self.blob_path(digest)?;
        let f = std::fs::File::open(&path).map_err(|e| format!("blob {digest}: {e}"))?;
        let mut buf = Vec::new();
        f.take(MAX_SMALL_BLOB + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("blob {digest}: {e}"))?;
        if buf.len() as u64 > MAX_SMALL_BLOB {
            return Err(format!("blob {digest} is over {MAX_SMALL_BLOB} bytes"));
        }
        if format!("sha256:{}", super::verify::sha256_hex(&buf)) != digest {
            return Err(format!(
                "blob {digest} does not match its digest (corrupted)"
            ));
        }
        Ok(buf)
    }

    fn manifest(&self, digest: &str) -> Result<RawManifest, String> {
        serde_json::from_slice(&self.small(digest)?)
            .map_err(|e| format!("manifest {digest} is not a manifest: {e}"))
    }

    /// `index.json`'s entries.
    pub fn entries(&self) -> Result<Vec<(String, Option<String>)>, String> {
        self.index_entries(true)
    }

    /// `index.json`'s entries; with `images`, without referrers (manifests with a subject).
    fn index_entries(&self, images: bool) -> Result<Vec<(String, Option<String>)>, String> {
        let path = self.root.join("index.json");
        regular(&path).map_err(|e| format!("index.json: {e}"))?;
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_SMALL_BLOB + 1).read_to_end(&mut text))
            .map_err(|e| format!("index.json: {e}"))?;
        if text.len() as u64 > MAX_SMALL_BLOB {
            return Err(format!("index.json is over {MAX_SMALL_BLOB} bytes"));
        }
        let index: RawManifest =
            serde_json::from_slice(&text).map_err(|e| format!("index.json: {e}"))?;
        Ok(index
            .manifests
            .iter()
            // Referrers (signatures, SBOMs) are not images to import.
            .filter(|d| {
                !images
                    || d.artifact_type.is_none()
                    || !self.manifest(&d.digest).is_ok_and(|m| m.subject.is_some())
            })
            .map(|d| {
                (
                    d.digest.clone(),
                    d.annotations
                        .get("org.opencontainers.image.ref.name")
                        .cloned(),
                )
            })
            .collect())
    }

    /// Every manifest the layout holds (for referrers and `.sig` tags).
    fn all(&self) -> Vec<(Option<String>, RawManifest, String)> {
        let Ok(entries) = self.index_entries(false) else {
            return vec![];
        };
        entries
            .into_iter()
            .filter_map(|(d, name)| self.manifest(&d).ok().map(|m| (name, m, d)))
            .collect()
    }

    /// The module of the image `digest` (an index resolved by its Wasm platform), for `url`.
    pub fn module(
        &self,
        digest: &str,
        url: &str,
        store: &Store,
        max: u64,
        policy: Option<&VerifyPolicy>,
    ) -> Result<Imported, String> {
        let parsed = ModuleUrl::parse(url).map_err(|e| e.to_string())?;
        let top = self.manifest(digest)?;
        let (image, index) = if top.manifests.is_empty() {
            (digest.to_owned(), None)
        } else {
            let c = candidates(&top)?;
            let first = c.first().ok_or("the index lists no image")?;
            (first.digest.clone(), Some(digest.to_owned()))
        };
        let m = self.manifest(&image)?;
        let signed = self.check_signature(policy, &parsed, &image, index.as_deref())?;
        let (layers, extract) = find_layer(&m)?;
        let mut why = Vec::new();
        for layer in &layers {
            match self.extract(layer, store, max, extract.boxing()) {
                Ok((file, sha)) => {
                    let mut digests = vec![image.clone()];
                    digests.extend(index.clone());
                    return Ok(Imported {
                        url: url.to_owned(),
                        new: NewModule {
                            file,
                            sha,
                            digests,
                            matched: None,
                            served_by: "import".into(),
                        },
                        signed,
                    });
                }
                Err(e) => why.push(format!("layer {}: {e}", layer.digest)),
            }
        }
        Err(why.join("; "))
    }

    /// Copies a layer into the cache's temp area, checking its digest, and unboxes it.
    fn extract(
        &self,
        layer: &RawDesc,
        store: &Store,
        max: u64,
        boxing: unbox::Boxing,
    ) -> Result<(super::store::TempFile, String), String> {
        let src = self.blob_path(&layer.digest)?;
        let len = std::fs::metadata(&src)
            .map_err(|e| format!("missing blob: {e}"))?
            .len();
        if len > max {
            return Err(format!("{len} bytes, over the {max}-byte limit"));
        }
        let raw = store.temp("import", 0o644)?;
        let copied = std::io::copy(
            &mut std::fs::File::open(&src)
                .map_err(|e| e.to_string())?
                .take(max.saturating_add(1)),
            &mut &raw.file,
        )
        .map_err(|e| format!("cannot copy the layer: {e}"))?;
        if copied > max {
            return Err(format!("over the {max}-byte limit"));
        }
        let (sha, _) = sha256_file(&raw.path).map_err(|e| e.to_string())?;
        if format!("sha256:{sha}") != layer.digest {
            return Err("the blob does not match its digest (corrupted)".into());
        }
        let module = unbox::unbox(store, raw, boxing, max)?;
        let (sha, _) = sha256_file(&module.path).map_err(|e| e.to_string())?;
        Ok((module, sha))
    }

    /// The policy applied to the image, with the signatures the layout holds for it.
    fn check_signature(
        &self,
        policy: Option<&VerifyPolicy>,
        url: &ModuleUrl,
        image: &str,
        index: Option<&str>,
    ) -> Result<Option<(String, String)>, String> {
        let Some(policy) = policy else {
            return Ok(None);
        };
        let name = url.policy_name();
        let rule = policy.rule_for(&name).ok_or_else(|| {
            format!("signature check failed: no rule of --verify-policy matches {name}")
        })?;
        let signers = match &rule.action {
            Action::Deny => {
                return Err(format!(
                    "signature check failed: {name} is denied by rule {:?}",
                    rule.pattern
                ))
            }
            Action::AllowUnsigned => return Ok(None),
            Action::Verify(s) => s,
        };
        let mut why = Vec::new();
        let all = self.all();
        for digest in index.into_iter().chain(std::iter::once(image)) {
            let mut checks = Vec::new();
            // Referrers: manifests whose subject is the image, holding bundles.
            for (_, m, _) in all
                .iter()
                .filter(|(_, m, _)| m.subject.as_ref().is_some_and(|s| s.digest == digest))
            {
                for l in m
                    .layers
                    .iter()
                    .filter(|l| BUNDLE_TYPES.contains(&l.media_type.as_str()))
                {
                    if let Ok(b) = self.small(&l.digest) {
                        checks.extend(signers.check_bundle(&b, digest));
                    }
                }
            }
            // cosign's legacy tag, as skopeo/oras copy it: ref.name sha256-<hex>.sig.
            let tag = format!("{}.sig", digest.replace(':', "-"));
            for (_, m, _) in all.iter().filter(|(n, _, _)| {
                n.as_deref()
                    .is_some_and(|n| n == tag || n.ends_with(&format!(":{tag}")))
            }) {
                for l in m.layers.iter().filter(|l| l.media_type == SIMPLESIGNING) {
                    let Ok(payload) = self.small(&l.digest) else {
                        continue;
                    };
                    let Some(legacy) = LegacySig::from_layer(payload, &l.annotations) else {
                        continue;
                    };
                    checks.extend(signers.check_legacy(&legacy, digest));
                }
            }
            for c in checks {
                match c {
                    Ok(name) => {
                        let fp = signers.fingerprint_of(&name).unwrap_or_default();
                        return Ok(Some((digest.to_owned(), fp)));
                    }
                    Err(e) => why.push(e),
                }
            }
        }
        if why.is_empty() {
            why.push(format!("the layout holds no signature for {image}"));
        }
        why.truncate(8);
        Err(format!(
            "signature check failed: rule {:?} of --verify-policy requires a signature: {}",
            rule.pattern,
            why.join("; ")
        ))
    }
}

/// `path` is a regular file (not a link, a device or a directory).
fn regular(path: &Path) -> Result<(), String> {
    let m = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if m.file_type().is_file() {
        Ok(())
    } else {
        Err("not a regular file".into())
    }
}

/// The reference of each image of `entries` (digest, ref.name): the `--as` references in order,
/// else a ref.name that is a whole reference (`oci://…` or `host/repo:tag`).
pub fn references(
    entries: &[(String, Option<String>)],
    given: &[String],
) -> Result<Vec<(String, String)>, String> {
    // Signature tags and referrers are not images to import.
    let images: Vec<&(String, Option<String>)> = entries
        .iter()
        .filter(|(_, n)| {
            !n.as_deref()
                .is_some_and(|n| n.ends_with(".sig") || n.starts_with("sha256-"))
        })
        .collect();
    if !given.is_empty() {
        if given.len() != images.len() {
            return Err(format!(
                "the layout holds {} image(s) and {} --as reference(s) were given",
                images.len(),
                given.len()
            ));
        }
        return Ok(images
            .iter()
            .zip(given)
            .map(|((d, _), u)| (d.clone(), u.clone()))
            .collect());
    }
    images
        .iter()
        .map(|(d, n)| {
            let n = n.as_deref().ok_or_else(|| {
                format!("image {d} has no org.opencontainers.image.ref.name; name it with --as")
            })?;
            let url = if n.contains("://") {
                n.to_owned()
            } else if n.contains('/') {
                format!("oci://{n}")
            } else {
                return Err(format!(
                    "image {d} is named only {n:?} (a tag); give its reference with --as oci://registry/repo:{n}"
                ));
            };
            ModuleUrl::parse(&url).map_err(|e| e.to_string())?;
            Ok((d.clone(), url))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_come_from_as_or_whole_ref_names() {
        let e = |d: &str, n: Option<&str>| (d.to_string(), n.map(str::to_string));
        let entries = vec![
            e("sha256:a", Some("v1")),
            e("sha256:s", Some("sha256-abc.sig")),
        ];
        assert_eq!(
            references(&entries, &["oci://r.example/m:v1".into()]).unwrap(),
            vec![("sha256:a".to_string(), "oci://r.example/m:v1".to_string())]
        );
        assert!(references(&entries, &[]).unwrap_err().contains("--as"));
        let whole = vec![e("sha256:a", Some("r.example/m:v1"))];
        assert_eq!(
            references(&whole, &[]).unwrap()[0].1,
            "oci://r.example/m:v1"
        );
        assert!(references(&entries, &["a".into(), "b".into()]).is_err());
    }
}
