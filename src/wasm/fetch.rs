//! Fetchers: a module URL in, a new module out (a temp file plus what the pull showed), with
//! nothing of the cache's state touched. HTTP body or OCI layer → temp file (hashed on the way)
//! → unboxed file → checksum; memory does not grow with the module. For OCI the manifest comes
//! first, its signatures are checked under the policy, and the cache is asked (through
//! [`Known`]) whether that manifest's module is already there before the layer is pulled.
//!
//! Owns: the HTTP and OCI clients, credential lookup (pull secrets, `--docker-config`,
//! credential helpers), mirrors, the signature check at the registry, and the proof that some
//! credentials may pull a repository. Must not touch: the index, pins, leases or anything else
//! of `cache` — those are the cache's alone; the only file it writes is its own temp file.

use metrics::counter;
use oci_client::secrets::RegistryAuth;
use tokio::time::Instant;

use super::admission::Access;
use super::credhelper::CredHelpers;
use super::error::{io_err, FetchError};
use super::growing::Announcer;
use super::http::HttpFetcher;
use super::index::digest_match;
use super::mirrors::Source;
use super::oci::{OciFetcher, Resolved};
use super::options::{CacheConfig, Matched, Module};
use super::secret;
use super::signature::{verify_keyless, Action, VerifyPolicy};
use super::store::{sha256_file, Store, TempFile};
use super::unbox::{self, Boxing};
use super::url::OciRef;
use crate::metrics as m;

/// What a fetch produced: a module already in the cache (OCI digest known), or new bytes.
pub(super) enum Fetched {
    Cached(Module),
    New(NewModule),
}

/// What a pull showed about the module, for the index (see `admission`).
pub(super) struct Provenance {
    /// The digest a signature verified over, and the signer's fingerprint.
    pub signed: Option<(String, String)>,
    /// Canonical `host/repository` of the reference asked for (OCI).
    pub repo: String,
    /// Whether the repository wanted credentials (`None`: not a registry pull).
    pub access: Option<Access>,
    /// Who pulled it ([`super::proofs::cred_id`]).
    pub cred: String,
}

impl Provenance {
    /// An HTTP(S) download's: a verified signature, nothing about access.
    pub fn signed_only(signed: (String, String)) -> Self {
        Provenance {
            signed: Some(signed),
            repo: String::new(),
            access: None,
            cred: String::new(),
        }
    }
}

/// The cache's answer to "is the module of this OCI manifest (digest, index digest) already
/// here, satisfying the expected checksum?" — lookup #2, without pulling the layer: the module,
/// or what the same manifest gave before and still gives (a checksum mismatch, invalid Wasm),
/// or `None` (pull it).
pub(super) type Known<'a> =
    &'a (dyn Fn(&Resolved, Option<&str>) -> Option<Result<Module, FetchError>> + Send + Sync);

/// The fetchers and what they need to reach registries and servers.
pub(super) struct Fetcher {
    cfg: CacheConfig,
    /// For temp files only.
    store: Store,
    http: HttpFetcher,
    oci: OciFetcher,
    helpers: CredHelpers,
}

/// A module just pulled, unboxed into a temp file, not validated or stored yet.
pub(super) struct NewModule {
    pub file: TempFile,
    pub sha: String,
    pub digests: Vec<String>,
    pub matched: Option<Matched>,
    /// The host the bytes came from (a mirror or the origin).
    pub served_by: String,
}

impl Fetcher {
    pub(super) fn new(cfg: CacheConfig, store: Store) -> Result<Self, String> {
        let http = HttpFetcher::new(cfg.tls.clone(), cfg.http.clone())?;
        let oci = OciFetcher::new(
            cfg.tls.clone(),
            cfg.max_module_bytes,
            cfg.http.blocked.clone(),
        )?;
        Ok(Self {
            cfg,
            store,
            http,
            oci,
            helpers: Default::default(),
        })
    }

    pub(super) async fn fetch_http(
        &self,
        u: &reqwest::Url,
        shown: &str,
        expected: Option<&str>,
        deadline: Instant,
        policy_name: &str,
        announcer: &Announcer,
    ) -> Result<(Fetched, Option<(String, String)>), FetchError> {
        // The signature policy was applied before the lookup (`admission::refused_upfront`):
        // an HTTP(S) module gets here only where its rule allows unsigned modules or names
        // keyless identities, whose bundle is checked below.
        let max = self.cfg.max_module_bytes;
        let raw = self.temp(shown, "download").await?;
        // With the expected sha256 known, the body is announced as that module while it
        // arrives (if it is boxed, or another module, the flight's end fails the stream).
        let announcer = announcer.expecting(expected);
        let (raw_sha, _) = self.http.fetch(u, deadline, &raw.file, &announcer).await?;
        // What was streamed is exactly these bytes.
        announcer.confirm(&raw_sha);
        let store = self.store.clone();
        let raw_path = raw.path.clone();
        let raw_sha2 = raw_sha.clone();
        let (file, sha) = tokio::task::spawn_blocking(move || {
            let module = unbox::unbox(&store, raw, Boxing::Detect, max)?;
            // The body itself is the module: it was hashed as it arrived.
            if module.path == raw_path {
                return Ok((module, raw_sha2));
            }
            let (sha, _) = sha256_file(&module.path)
                .map_err(|e| format!("cannot read {}: {e}", module.path.display()))?;
            Ok::<_, String>((module, sha))
        })
        .await
        .map_err(|e| io_err(shown, e.to_string()))?
        .map_err(|reason| FetchError::Invalid {
            url: shown.to_owned(),
            reason,
        })?;
        let matched = match expected {
            None => None,
            Some(e) if e == sha => Some(Matched::ModuleSha256),
            Some(e) if e == raw_sha => Some(Matched::RawBodySha256),
            Some(e) => {
                return Err(FetchError::Checksum {
                    url: shown.to_owned(),
                    want: e.to_owned(),
                    got: sha,
                    digest: None,
                })
            }
        };
        let signed = self
            .check_http_keyless(u, &sha, shown, deadline, policy_name)
            .await?;
        Ok((
            Fetched::New(NewModule {
                file,
                sha,
                digests: vec![],
                matched,
                served_by: super::guard::host_port(u),
            }),
            signed,
        ))
    }

    /// Under a rule with keyless identities, an HTTP(S) module needs a sigstore bundle beside
    /// it (`<url>.sigstore.json`) that verifies over its sha256. Returns the digest and the
    /// identity's fingerprint (`None`: the rule allows unsigned modules, or there is no policy).
    async fn check_http_keyless(
        &self,
        u: &reqwest::Url,
        sha: &str,
        shown: &str,
        deadline: Instant,
        policy_name: &str,
    ) -> Result<Option<(String, String)>, FetchError> {
        const MAX_BUNDLE: u64 = 1 << 20;
        let Some(policy) = &self.cfg.verify else {
            return Ok(None);
        };
        let Some(Action::Verify(signers)) = policy.rule_for(policy_name).map(|r| &r.action) else {
            return Ok(None);
        };
        let fail = |reason: String| {
            counter!(m::SIGNATURE_CHECKS, "result" => "failed").increment(1);
            FetchError::Signature {
                url: shown.to_owned(),
                reason,
            }
        };
        let mut bundle_url = u.clone();
        bundle_url.set_path(&format!("{}.sigstore.json", u.path()));
        bundle_url.set_query(None);
        let tmp = self.temp(shown, "bundle").await?;
        self.http
            .fetch(&bundle_url, deadline, &tmp.file, &Announcer::default())
            .await
            .map_err(|e| {
                fail(format!(
                    "no sigstore bundle at {}: {e}",
                    super::error::redact(bundle_url.as_str())
                ))
            })?;
        let path = tmp.path.clone();
        let bundle = tokio::task::spawn_blocking(move || {
            let len = std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if len > MAX_BUNDLE {
                return Err(format!(
                    "the sigstore bundle is {len} bytes (at most {MAX_BUNDLE})"
                ));
            }
            std::fs::read(&path).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| io_err(shown, e.to_string()))?
        .map_err(fail)?;
        drop(tmp);
        let digest = format!("sha256:{sha}");
        match verify_keyless(&bundle, signers, &digest) {
            Ok(name) => {
                tracing::info!(url = %shown, %digest, signer = %name, "keyless signature verified");
                counter!(m::SIGNATURE_CHECKS, "result" => "verified").increment(1);
                let fp = signers.fingerprint_of(&name).unwrap_or_default();
                Ok(Some((digest, fp)))
            }
            Err(why) => Err(fail(super::error::clip(&why, 1024))),
        }
    }

    /// Credentials for `r`'s registry: from the resource's pull secret, else from
    /// `--docker-config`; a `credHelpers` / `credsStore` entry runs its helper.
    pub(super) async fn registry_auth(
        &self,
        r: &OciRef,
        secret: Option<&[u8]>,
        shown: &str,
    ) -> Result<RegistryAuth, FetchError> {
        let bad = |reason: String| FetchError::Secret {
            url: shown.to_owned(),
            reason,
        };
        let config = match (secret, &self.cfg.docker_config) {
            (Some(s), _) => Some(s.to_vec()),
            (None, Some(path)) => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || {
                    std::fs::read(&path).map_err(|e| (path, e))
                })
                .await
                .map_err(|e| bad(e.to_string()))?;
                Some(read.map_err(|(p, e)| bad(format!("--docker-config {}: {e}", p.display())))?)
            }
            (None, None) => None,
        };
        let Some(config) = config else {
            return Ok(RegistryAuth::Anonymous);
        };
        match secret::source_for(&config, &r.registry).map_err(bad)? {
            secret::Source::Auth(a) => Ok(a),
            secret::Source::Helper(name) => self.helpers.get(&name, &r.registry).await.map_err(bad),
        }
    }

    /// A new temp file in the cache (created off the async threads).
    async fn temp(&self, shown: &str, label: &'static str) -> Result<TempFile, FetchError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.temp(label, 0o644))
            .await
            .map_err(|e| io_err(shown, e.to_string()))?
            .map_err(|reason| io_err(shown, reason))
    }

    /// Pulls `r` from the first source that serves it: its mirrors in order, then the origin
    /// (see `mirrors`). A failing mirror falls back to the next source.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fetch_oci(
        &self,
        r: &OciRef,
        shown: &str,
        expected: Option<&str>,
        secret: Option<&[u8]>,
        deadline: Instant,
        known: Known<'_>,
        announcer: &Announcer,
    ) -> Result<(Fetched, Provenance), FetchError> {
        let sources = self.cfg.registries.sources(r);
        let mut pinned = r.digest.clone();
        for (i, src) in sources.iter().enumerate() {
            let last = i + 1 == sources.len();
            let mut at = src.clone();
            if src.digest_only && at.reference.digest.is_none() {
                // digest-only: the tag is resolved at the origin, the digest pulled here.
                if pinned.is_none() {
                    let origin = &sources[sources.len() - 1];
                    let auth = self.registry_auth(&origin.reference, secret, shown).await?;
                    match tokio::time::timeout_at(
                        deadline,
                        self.oci
                            .resolve(shown, &origin.reference, auth, origin.insecure),
                    )
                    .await
                    {
                        Ok(Ok(res)) => {
                            pinned = Some(res.index_digest.clone().unwrap_or(res.digest.clone()))
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(_) => continue,
                    }
                }
                at.reference.digest = pinned.clone();
                at.reference.tag = None;
            }
            match self
                .fetch_oci_from(r, &at, shown, expected, secret, deadline, known, announcer)
                .await
            {
                Err(e) if !last => {
                    tracing::warn!(url = %shown, mirror = %at.reference.registry, error = %e,
                        "mirror failed; trying the next source");
                }
                other => return other,
            }
        }
        Err(FetchError::Manifest {
            url: shown.to_owned(),
            reason: "no source to pull from".into(),
        })
    }

    /// Pulls `r` from one source `src` (the policy still matches `r`'s own name).
    #[allow(clippy::too_many_arguments)]
    async fn fetch_oci_from(
        &self,
        r: &OciRef,
        src: &Source,
        shown: &str,
        expected: Option<&str>,
        secret: Option<&[u8]>,
        deadline: Instant,
        known: Known<'_>,
        announcer: &Announcer,
    ) -> Result<(Fetched, Provenance), FetchError> {
        let total = deadline.saturating_duration_since(Instant::now());
        let timeout = |stage| FetchError::Timeout {
            url: shown.to_owned(),
            timeout: total,
            stage,
        };
        let auth = self.registry_auth(&src.reference, secret, shown).await?;
        let provenance = |signed| Provenance {
            signed,
            repo: format!("{}/{}", r.registry, r.repository),
            access: Some(match &auth {
                RegistryAuth::Anonymous => Access::Public,
                _ => Access::Private,
            }),
            cred: super::proofs::cred_id(&auth),
        };
        let resolved = tokio::time::timeout_at(
            deadline,
            self.oci
                .resolve(shown, &src.reference, auth.clone(), src.insecure),
        )
        .await
        .map_err(|_| timeout("fetching the manifest"))??;
        let signed = match &self.cfg.verify {
            Some(policy) => {
                tokio::time::timeout_at(deadline, self.check_signature(policy, r, &resolved, shown))
                    .await
                    .map_err(|_| timeout("checking the signature"))??
            }
            None => None,
        };
        let provenance = provenance(signed);

        // Lookup #2: this manifest's module may already be here (no layer pull). The manifest
        // was just fetched with this request's credentials and its signatures checked: the
        // gate's questions are answered.
        if let Some(found) = known(&resolved, expected) {
            let module = found?;
            counter!(m::CACHE_LOOKUP_COUNT, "hit" => "true").increment(1);
            return Ok((Fetched::Cached(module), provenance));
        }
        let downloaded = tokio::time::timeout_at(
            deadline,
            self.oci.download(shown, &resolved, &self.store, announcer),
        )
        .await
        .map_err(|_| timeout("pulling the layer"))??;
        let (file, known) = downloaded;
        let (file, sha) = tokio::task::spawn_blocking(move || match known {
            Some(sha) => Ok((file, sha)),
            None => sha256_file(&file.path).map(|(sha, _)| (file, sha)),
        })
        .await
        .map_err(|e| io_err(shown, format!("hash task failed: {e}")))?
        .map_err(|e| io_err(shown, format!("cannot read the module: {e}")))?;
        let matched = match expected {
            None => None,
            Some(e) if e == sha => Some(Matched::ModuleSha256),
            Some(e) => Some(
                digest_match(&resolved.digest, resolved.index_digest.as_deref(), e).ok_or_else(
                    || FetchError::Checksum {
                        url: shown.to_owned(),
                        want: e.to_owned(),
                        got: sha.clone(),
                        digest: Some(resolved.digest.clone()),
                    },
                )?,
            ),
        };
        let mut digests = vec![resolved.digest.clone()];
        digests.extend(resolved.index_digest.clone());
        Ok((
            Fetched::New(NewModule {
                file,
                sha,
                digests,
                matched,
                served_by: src.reference.registry.clone(),
            }),
            provenance,
        ))
    }

    /// Applies the signature policy to the image about to be used: the index digest (when the
    /// tag named an index) or the manifest digest must carry a signature the rule's keys verify.
    /// Returns the digest and key fingerprint that verified (`None`: allowed unsigned).
    async fn check_signature(
        &self,
        policy: &VerifyPolicy,
        r: &OciRef,
        resolved: &Resolved,
        shown: &str,
    ) -> Result<Option<(String, String)>, FetchError> {
        let fail = |reason: String| {
            counter!(m::SIGNATURE_CHECKS, "result" => "failed").increment(1);
            FetchError::Signature {
                url: shown.to_owned(),
                reason,
            }
        };
        let name = format!("{}/{}", r.registry, r.repository);
        let Some(rule) = policy.rule_for(&name) else {
            return Err(fail(format!("no rule of --verify-policy matches {name}")));
        };
        let signers = match &rule.action {
            Action::Deny => {
                return Err(fail(format!("{name} is denied by rule {:?}", rule.pattern)))
            }
            Action::AllowUnsigned => {
                counter!(m::SIGNATURE_CHECKS, "result" => "unsigned_allowed").increment(1);
                return Ok(None);
            }
            Action::Verify(signers) => signers,
        };
        let mut why = Vec::new();
        let digests = resolved
            .index_digest
            .iter()
            .chain(std::iter::once(&resolved.digest));
        // The first check that passes wins; every failure is kept for the message.
        let fingerprint = |name: &str| signers.fingerprint_of(name);
        let mut passed = |form: &str, digest: &str, checks: Vec<Result<String, String>>| {
            for check in checks {
                match check {
                    Ok(key) => {
                        tracing::info!(url = %shown, %digest, key, "signature ({form}) verified");
                        counter!(m::SIGNATURE_CHECKS, "result" => "verified").increment(1);
                        return fingerprint(&key).map(|fp| (digest.to_owned(), fp));
                    }
                    Err(e) => why.push(e),
                }
            }
            None
        };
        for digest in digests {
            // OCI 1.1 referrers: sigstore bundles (cosign v3's default).
            match self.oci.bundles(resolved, digest).await {
                Ok(bundles) => {
                    let checks = bundles
                        .iter()
                        .flat_map(|b| signers.check_bundle(b, digest))
                        .collect();
                    if let Some(v) = passed("sigstore bundle", digest, checks) {
                        return Ok(Some(v));
                    }
                }
                Err(e) => tracing::debug!(url = %shown, error = %e, "no sigstore bundle"),
            }
            // Cosign's legacy layout: the sha256-<hex>.sig tag (key signatures, and keyless
            // ones with their certificate and Rekor bundle in annotations).
            let checks = match self.oci.signatures(resolved, digest).await {
                Ok(sigs) => sigs
                    .iter()
                    .flat_map(|sig| signers.check_legacy(sig, digest))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            if let Some(v) = passed("legacy .sig", digest, checks) {
                return Ok(Some(v));
            }
        }
        why.dedup();
        why.truncate(8);
        Err(fail(super::error::clip(
            &format!(
                "rule {:?} of --verify-policy requires a signature: {}",
                rule.pattern,
                why.join("; ")
            ),
            1024,
        )))
    }

    /// Proves that `auth` may pull `r` (one manifest `HEAD`, see `OciFetcher::prove`).
    pub(super) async fn prove(
        &self,
        r: &OciRef,
        auth: &RegistryAuth,
        shown: &str,
    ) -> Result<(), FetchError> {
        let insecure = self
            .cfg
            .registries
            .sources(r)
            .last()
            .is_some_and(|s| s.insecure);
        self.oci.prove(shown, r, auth, insecure).await
    }
}

/// Which expected checksum the cached module `sha` of an OCI manifest satisfies (`Some(None)`:
/// nothing was expected; `None`: it does not satisfy `expected`).
pub(super) fn manifest_match(
    sha: &str,
    resolved: &Resolved,
    expected: Option<&str>,
) -> Option<Option<Matched>> {
    match expected {
        None => Some(None),
        Some(e) if e == sha => Some(Some(Matched::ModuleSha256)),
        Some(e) => digest_match(&resolved.digest, resolved.index_digest.as_deref(), e).map(Some),
    }
}
