//! OCI fetcher. Two steps so the cache can stop after the first: [`OciFetcher::resolve`]
//! fetches only manifests (and picks the Wasm-bearing image out of an index), then
//! [`OciFetcher::download`] pulls the one layer and extracts the module.
//!
//! The module is chosen by **content, not by label** (how a Wasm module sits in an image is not
//! settled; fetchers that trust one label break):
//! 1. layers a label marks as a module — a media type naming Wasm
//!    (`application/vnd.module.wasm.content.layer.v1+wasm` of Istio/Solo,
//!    `application/vnd.wasm.content.layer.v1+wasm` of wasm-to-oci, `application/wasm` of the CNCF
//!    layout, any `…+wasm`) or an `org.opencontainers.image.title` ending in `.wasm` (ORAS) — in
//!    any position among other layers; the one titled `plugin.wasm` when there are several. Its
//!    bytes are sniffed: the Wasm magic, gzip or tar, in that order;
//! 2. otherwise the image rule: tar / tar+gzip layers from the last one back, the first holding
//!    `plugin.wasm` (or a single `*.wasm`) wins, earlier layers are ignored;
//! 3. nothing fits: the error names every layer's media type and size.
//!
//! An index: the entries whose platform says Wasm (`wasm`, `wasip1`, `wasip2` in architecture or
//! os, or a Wasm artifact type) are tried; an index with a single (non-attestation) entry is used
//! as it is; otherwise the error lists the platforms found.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    OciDescriptor, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use super::error::FetchError;
use super::growing::{Announcer, Signalling};
use super::guard::{self, Blocklist, GuardedResolver};
use super::signature;
use super::store::{Store, TempFile};
use super::tls::FetchTls;
use super::unbox::{self, Boxing};
use super::url::OciRef;
use crate::errors::describe_reqwest;

pub const WASM_LAYER_SOLO: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASM_LAYER_CNCF: &str = "application/vnd.wasm.content.layer.v1+wasm";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// The CNCF Wasm OCI artifact layout's layer (TAG Runtime; `wkg`, the `oci-wasm` crate).
pub const WASM_LAYER_BARE: &str = "application/wasm";

/// Index entries whose manifests are pulled, at most, looking for a module.
const MAX_INDEX_TRIES: usize = 16;
/// More layers than this in one manifest is not a Wasm image.
const MAX_LAYERS: usize = 256;

const ACCEPT: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A manifest or index as the layout rules read it (also from an OCI image layout: `import`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawManifest {
    pub media_type: Option<String>,
    /// OCI 1.1 artifact type (referrers: signatures, bundles).
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<RawDesc>,
    #[serde(default)]
    pub layers: Vec<RawDesc>,
    /// OCI 1.1: the manifest this one refers to (a signature's image).
    #[serde(default)]
    pub subject: Option<RawDesc>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawDesc {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    platform: Option<Platform>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    pub artifact_type: Option<String>,
}

#[derive(Deserialize, Clone)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Extract {
    /// A layer marked as the module: whatever its bytes say (Wasm, gzip, tar).
    Module,
    /// An image layer: tar or tar+gzip (by content) holding `plugin.wasm` or a single `*.wasm`.
    Image,
}

impl Extract {
    /// How the layer's bytes are unboxed.
    pub(super) fn boxing(self) -> Boxing {
        match self {
            Extract::Module => Boxing::Detect,
            Extract::Image => Boxing::Image,
        }
    }
}

/// Media types that name a module.
fn marks_module(d: &RawDesc) -> bool {
    let t = d.media_type.as_str();
    t == WASM_LAYER_SOLO
        || t == WASM_LAYER_CNCF
        || t == WASM_LAYER_BARE
        || t.ends_with("+wasm")
        || title(d).is_some_and(|n| n.ends_with(".wasm"))
}

fn title(d: &RawDesc) -> Option<&str> {
    d.annotations
        .get("org.opencontainers.image.title")
        .map(String::as_str)
}

/// Layer media types of images (tar, tar+gzip, Docker's rootfs layers).
fn is_image_layer(d: &RawDesc) -> bool {
    let t = d.media_type.as_str();
    t == DOCKER_LAYER_GZIP
        || t == DOCKER_LAYER_TAR
        || t.starts_with(OCI_LAYER_TAR)
        || t == "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
}

/// Image layers tried at most, from the last one back.
const MAX_IMAGE_LAYERS: usize = 8;

/// A manifest resolved to the layer that holds the module.
pub struct Resolved {
    client: Client,
    reference: Reference,
    /// The credentials the manifest was fetched with (signatures are fetched with them too).
    auth: RegistryAuth,
    /// The layers to try, in order (one for a marked module layer).
    layers: Vec<OciDescriptor>,
    extract: Extract,
    /// Digest (`sha256:…`) of the image manifest that holds the module.
    pub digest: String,
    /// Digest of the index the image was chosen from, when the tag named an index.
    pub index_digest: Option<String>,
}

pub struct OciFetcher {
    tls: FetchTls,
    max_bytes: u64,
    blocked: Blocklist,
}

fn oci_reason(e: &OciDistributionError) -> String {
    match e {
        OciDistributionError::RequestError(r) => describe_reqwest(r),
        OciDistributionError::IoError(io) => format!("I/O error: {}", crate::errors::io_text(io)),
        other => other.to_string(),
    }
}

fn is_auth(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => true,
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { .. } => {
            let s = e.to_string();
            s.contains("UNAUTHORIZED") || s.contains("DENIED")
        }
        _ => false,
    }
}

fn is_transport(e: &OciDistributionError) -> bool {
    matches!(e, OciDistributionError::RequestError(r) if r.is_connect() || r.is_request() || r.is_timeout())
}

/// The layers to try for the module, in order, and how to read them (see the module docs).
pub(super) fn find_layer(m: &RawManifest) -> Result<(Vec<RawDesc>, Extract), String> {
    if m.layers.len() > MAX_LAYERS {
        return Err(format!(
            "the manifest lists {} layers, more than the {MAX_LAYERS} a Wasm image may have",
            m.layers.len()
        ));
    }
    let marked: Vec<&RawDesc> = m.layers.iter().filter(|l| marks_module(l)).collect();
    match marked.as_slice() {
        [one] => return Ok((vec![(*one).clone()], Extract::Module)),
        [] => {}
        several => {
            return match several.iter().find(|l| title(l) == Some("plugin.wasm")) {
                Some(l) => Ok((vec![(*l).clone()], Extract::Module)),
                None => Err(format!(
                    "{} layers are marked as a module and none is titled plugin.wasm: {}",
                    several.len(),
                    describe(several.iter().copied())
                )),
            }
        }
    }
    let images: Vec<RawDesc> = m
        .layers
        .iter()
        .rev()
        .filter(|l| is_image_layer(l))
        .take(MAX_IMAGE_LAYERS)
        .cloned()
        .collect();
    if images.is_empty() {
        return Err(format!(
            "no layer holds a module: no Wasm media type or .wasm title, and no tar layer (manifest type {}; layers: {})",
            m.media_type.as_deref().unwrap_or("unset"),
            if m.layers.is_empty() {
                "none".to_owned()
            } else {
                describe(m.layers.iter())
            }
        ));
    }
    Ok((images, Extract::Image))
}

/// `type (size bytes)` of each layer, at most 16.
fn describe<'a>(layers: impl Iterator<Item = &'a RawDesc>) -> String {
    let all: Vec<String> = layers
        .map(|l| format!("{} ({} bytes)", l.media_type, l.size))
        .collect();
    let n = all.len();
    let mut out = all.into_iter().take(16).collect::<Vec<_>>().join(", ");
    if n > 16 {
        out.push_str(&format!(" and {} more", n - 16));
    }
    out
}

pub fn select_layer(manifest: &[u8]) -> Result<Vec<String>, String> {
    let m: RawManifest =
        serde_json::from_slice(manifest).map_err(|e| format!("unparseable manifest: {e}"))?;
    if m.manifests.is_empty() {
        return find_layer(&m).map(|(l, _)| l.into_iter().map(|l| l.digest).collect());
    }
    Ok(candidates(&m)?
        .into_iter()
        .take(MAX_INDEX_TRIES)
        .map(|d| d.digest)
        .collect())
}

/// Index entries in the order they are tried.
/// The index entries to try (see the module docs): the Wasm ones; else a single entry as it is;
/// else an error listing the platforms found.
pub(super) fn candidates(index: &RawManifest) -> Result<Vec<RawDesc>, String> {
    let wasmish = |d: &RawDesc| {
        d.platform.as_ref().is_some_and(|p| {
            p.architecture.contains("wasm") || p.os.starts_with("wasi") || p.os.contains("wasm")
        }) || d
            .artifact_type
            .as_deref()
            .is_some_and(|t| t.contains("wasm"))
    };
    let attestation = |d: &RawDesc| {
        d.annotations
            .get("vnd.docker.reference.type")
            .map(String::as_str)
            == Some("attestation-manifest")
    };
    let wasm: Vec<RawDesc> = index
        .manifests
        .iter()
        .filter(|d| wasmish(d))
        .cloned()
        .collect();
    if !wasm.is_empty() {
        return Ok(wasm);
    }
    let rest: Vec<&RawDesc> = index.manifests.iter().filter(|d| !attestation(d)).collect();
    match rest.as_slice() {
        [one] => Ok(vec![(*one).clone()]),
        [] => Err("the index lists no image".into()),
        many => {
            let platforms: Vec<String> = many
                .iter()
                .take(16)
                .map(|d| match &d.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => format!("{} (no platform)", d.digest),
                })
                .collect();
            let more = many.len().saturating_sub(platforms.len());
            Err(format!(
                "the index has no Wasm platform (wasm, wasip1, wasip2) among its {} entries: {}{}",
                many.len(),
                platforms.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ))
        }
    }
}

impl OciFetcher {
    pub fn new(tls: FetchTls, max_bytes: u64, blocked: Blocklist) -> Result<Self, String> {
        Ok(Self {
            tls,
            max_bytes,
            blocked,
        })
    }

    /// How `r`'s registry is reached, in order, as (plain HTTP, skip TLS verification):
    /// verified TLS for everyone; listed insecure hosts get TLS without verification, then
    /// plain HTTP if they do not speak TLS. Never a silent downgrade otherwise.
    fn attempts(&self, r: &OciRef, insecure: bool) -> &'static [(bool, bool)] {
        if insecure || self.tls.is_insecure(&r.registry) {
            &[(false, true), (true, false)]
        } else {
            &[(false, false)]
        }
    }

    /// Proves that `auth` may pull `r` (which names a digest): one manifest `HEAD` with those
    /// credentials. Anything but a success is a refusal naming the registry's answer.
    pub async fn prove(
        &self,
        shown: &str,
        r: &OciRef,
        auth: &RegistryAuth,
        insecure: bool,
    ) -> Result<(), FetchError> {
        let reference = Self::reference(r);
        let mut failures = Vec::new();
        for &(plain, skip_verify) in self.attempts(r, insecure) {
            self.check_registry(shown, &r.registry, plain)?;
            let client = self.client(plain, skip_verify);
            match client.fetch_manifest_digest(&reference, auth).await {
                Ok(_) => return Ok(()),
                Err(e) if is_transport(&e) => failures.push(oci_reason(&e)),
                Err(e) => {
                    return Err(FetchError::Auth {
                        url: shown.to_owned(),
                        reason: format!(
                        "the cached module is private and these credentials may not pull it ({})",
                        oci_reason(&e)
                    ),
                    })
                }
            }
        }
        Err(FetchError::Manifest {
            url: shown.to_owned(),
            reason: format!(
                "could not check access to the cached private module: {}",
                failures.join("; then ")
            ),
        })
    }

    /// Before any manifest request, without network I/O: the registry must not be a blocked
    /// address literal. (Names are checked at dial time by the guarded resolver, and a Bearer
    /// realm inside the token request itself: see [`Self::client`].)
    fn check_registry(&self, shown: &str, registry: &str, plain: bool) -> Result<(), FetchError> {
        let base = format!("{}://{registry}/v2/", if plain { "http" } else { "https" });
        let Ok(base) = reqwest::Url::parse(&base) else {
            return Ok(());
        };
        guard::check_literal(&base, &self.blocked).map_err(|reason| FetchError::Auth {
            url: shown.to_owned(),
            reason,
        })
    }

    fn client(&self, plain_http: bool, skip_verify: bool) -> Client {
        Client::new(ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: skip_verify,
            extra_root_certificates: self
                .tls
                .roots_pem()
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            // Redirects oci-client follows itself (blob downloads sent to object storage)
            // meet the same guard as the HTTP fetcher's: blocked addresses at every dial,
            // the hop rules at every redirect.
            dns_resolver: Some(std::sync::Arc::new(GuardedResolver(self.blocked.clone()))),
            redirect_policy: Some(guard::redirect_policy(
                self.blocked.clone(),
                self.tls.clone(),
                skip_verify,
            )),
            // The realm a 401 names is checked on the token request that carries the
            // credentials, inside the transport (istio#48627's rule).
            realm_guard: Some({
                let blocked = self.blocked.clone();
                std::sync::Arc::new(move |realm: &str| guard::check_realm(realm, &blocked))
            }),
            ..Default::default()
        })
    }

    fn reference(r: &OciRef) -> Reference {
        match (&r.tag, &r.digest) {
            (_, Some(d)) => {
                Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone())
            }
            (Some(t), None) => {
                Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone())
            }
            (None, None) => {
                Reference::with_tag(r.registry.clone(), r.repository.clone(), "latest".into())
            }
        }
    }

    /// Fetches manifests only and finds the layer holding the module.
    pub async fn resolve(
        &self,
        shown: &str,
        r: &OciRef,
        auth: RegistryAuth,
        insecure: bool,
    ) -> Result<Resolved, FetchError> {
        let reference = Self::reference(r);
        let manifest_err = |reason: String| FetchError::Manifest {
            url: shown.to_owned(),
            reason,
        };
        let mut failures = Vec::new();
        for &(plain, skip_verify) in self.attempts(r, insecure) {
            self.check_registry(shown, &r.registry, plain)?;
            let client = self.client(plain, skip_verify);
            match client.pull_manifest_raw(&reference, &auth, ACCEPT).await {
                Ok((body, digest)) => {
                    let mut resolved = self
                        .pick(client, reference, body.as_ref(), digest, shown, &auth)
                        .await?;
                    resolved.auth = auth;
                    return Ok(resolved);
                }
                Err(e) if is_auth(&e) => {
                    // oci-client drops the reason a token request failed and retries
                    // without one; ask once more so the error names it (a token endpoint
                    // answering garbage or an oversized body).
                    let reason = match client
                        .auth(&reference, &auth, oci_client::RegistryOperation::Pull)
                        .await
                    {
                        Err(te) => {
                            format!("{}; token request: {}", oci_reason(&e), oci_reason(&te))
                        }
                        Ok(_) => oci_reason(&e),
                    };
                    return Err(FetchError::Auth {
                        url: shown.to_owned(),
                        reason,
                    });
                }
                Err(e) if is_transport(&e) => {
                    failures.push(format!(
                        "{}: {}",
                        if plain { "http" } else { "https" },
                        oci_reason(&e)
                    ));
                }
                Err(e) => return Err(manifest_err(oci_reason(&e))),
            }
        }
        Err(manifest_err(failures.join("; then ")))
    }

    async fn pick(
        &self,
        client: Client,
        reference: Reference,
        body: &[u8],
        digest: String,
        shown: &str,
        auth: &RegistryAuth,
    ) -> Result<Resolved, FetchError> {
        let parse = |b: &[u8]| {
            serde_json::from_slice::<RawManifest>(b).map_err(|e| FetchError::Manifest {
                url: shown.to_owned(),
                reason: format!("unparseable manifest: {e}"),
            })
        };
        let top = parse(body)?;
        if top.manifests.is_empty() {
            let (layers, extract) = find_layer(&top).map_err(|reason| FetchError::Layout {
                url: shown.to_owned(),
                reason,
            })?;
            return self.resolved(client, reference, layers, extract, digest, None, shown);
        }
        let mut why = Vec::new();
        let all = candidates(&top).map_err(|reason| FetchError::Layout {
            url: shown.to_owned(),
            reason,
        })?;
        if all.len() > MAX_INDEX_TRIES {
            why.push(format!(
                "{} entries; only the first {MAX_INDEX_TRIES} are tried",
                all.len()
            ));
        }
        for entry in all.into_iter().take(MAX_INDEX_TRIES) {
            let child = reference.clone_with_digest(entry.digest.clone());
            let (raw, child_digest) = client
                .pull_manifest_raw(&child, auth, ACCEPT)
                .await
                .map_err(|e| FetchError::Manifest {
                    url: shown.to_owned(),
                    reason: format!("index entry {}: {}", entry.digest, oci_reason(&e)),
                })?;
            let m = parse(raw.as_ref())?;
            match find_layer(&m) {
                Ok((layers, extract)) => {
                    return self.resolved(
                        client,
                        child,
                        layers,
                        extract,
                        child_digest,
                        Some(digest),
                        shown,
                    )
                }
                Err(e) => why.push(format!("{}: {e}", entry.digest)),
            }
        }
        Err(FetchError::Layout {
            url: shown.to_owned(),
            reason: format!("no image in the index holds a module ({})", why.join("; ")),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn resolved(
        &self,
        client: Client,
        reference: Reference,
        layers: Vec<RawDesc>,
        extract: Extract,
        digest: String,
        index_digest: Option<String>,
        shown: &str,
    ) -> Result<Resolved, FetchError> {
        // A marked module layer that declares more than the cap is refused before any pull.
        if let (Extract::Module, Some(layer)) = (extract, layers.first()) {
            if layer.size > 0 && layer.size as u64 > self.max_bytes {
                return Err(FetchError::TooLarge {
                    url: shown.to_owned(),
                    limit: self.max_bytes,
                    what: format!("layer {} declares {} bytes", layer.digest, layer.size),
                });
            }
        }
        Ok(Resolved {
            client,
            reference,
            auth: RegistryAuth::Anonymous,
            layers: layers
                .into_iter()
                .map(|l| OciDescriptor {
                    media_type: l.media_type,
                    digest: l.digest,
                    size: l.size,
                    ..Default::default()
                })
                .collect(),
            extract,
            digest,
            index_digest,
        })
    }

    /// The cosign signatures stored for `digest` in the legacy layout: the manifest tagged
    /// `sha256-<hex>.sig` in the same repository, its simple-signing layers and their
    /// `dev.cosignproject.cosign/signature` annotations. `(payload, base64 signature)` pairs;
    /// `Err` says why there are none.
    pub async fn signatures(
        &self,
        r: &Resolved,
        digest: &str,
    ) -> Result<Vec<signature::LegacySig>, String> {
        const MAX_PAYLOAD: u64 = 256 << 10;
        let tag = format!("{}.sig", digest.replace(':', "-"));
        let sig_ref = Reference::with_tag(
            r.reference.registry().to_owned(),
            r.reference.repository().to_owned(),
            tag.clone(),
        );
        let (body, _) = r
            .client
            .pull_manifest_raw(
                &sig_ref,
                &r.auth,
                &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE],
            )
            .await
            .map_err(|e| {
                let why = oci_reason(&e);
                let lower = why.to_ascii_lowercase();
                if ["not found", "manifest unknown", "manifest_unknown", "404"]
                    .iter()
                    .any(|m| lower.contains(m))
                {
                    format!("no signature for {digest} (no {tag} in the repository)")
                } else {
                    format!("cannot read {tag}: {why}")
                }
            })?;
        let m: RawManifest = serde_json::from_slice(body.as_ref())
            .map_err(|e| format!("{tag} is not a manifest: {e}"))?;
        let mut out = Vec::new();
        for layer in m
            .layers
            .iter()
            .filter(|l| l.media_type == signature::SIMPLESIGNING)
        {
            if !layer
                .annotations
                .contains_key(signature::SIGNATURE_ANNOTATION)
            {
                continue;
            }
            if let Some(payload) = small_blob(&r.client, &sig_ref, layer, MAX_PAYLOAD).await {
                out.extend(signature::LegacySig::from_layer(
                    payload,
                    &layer.annotations,
                ));
            }
        }
        if out.is_empty() {
            return Err(format!("{tag} holds no cosign simple-signing signature"));
        }
        Ok(out)
    }

    /// Sigstore bundles (v0.3) attached to `digest` as OCI 1.1 referrers: from the registry's
    /// referrers API where it has one, else from the referrers tag schema (`sha256-<hex>`, an
    /// index of referrer manifests). The bundle JSON of each; `Err` says why there are none.
    pub async fn bundles(&self, r: &Resolved, digest: &str) -> Result<Vec<Vec<u8>>, String> {
        const MAX_BUNDLE: u64 = 1 << 20;
        let subject = r.reference.clone_with_digest(digest.to_owned());
        let mut candidates: Vec<String> = match r.client.pull_referrers(&subject, None).await {
            Ok(index) => index.manifests.into_iter().map(|m| m.digest).collect(),
            Err(_) => Vec::new(),
        };
        if candidates.is_empty() {
            let tag = digest.replace(':', "-");
            let fallback = Reference::with_tag(
                r.reference.registry().to_owned(),
                r.reference.repository().to_owned(),
                tag,
            );
            if let Ok((body, _)) = r
                .client
                .pull_manifest_raw(&fallback, &r.auth, &[OCI_IMAGE_INDEX_MEDIA_TYPE])
                .await
            {
                if let Ok(index) = serde_json::from_slice::<RawManifest>(body.as_ref()) {
                    candidates = index
                        .manifests
                        .into_iter()
                        .filter(|m| {
                            m.artifact_type
                                .as_deref()
                                .is_none_or(|t| signature::BUNDLE_TYPES.contains(&t))
                        })
                        .map(|m| m.digest)
                        .collect();
                }
            }
        }
        let mut out = Vec::new();
        for d in candidates.into_iter().take(16) {
            let at = r.reference.clone_with_digest(d);
            let Ok((body, _)) = r
                .client
                .pull_manifest_raw(&at, &r.auth, &[OCI_IMAGE_MEDIA_TYPE])
                .await
            else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<RawManifest>(body.as_ref()) else {
                continue;
            };
            let is_bundle = |t: &str| signature::BUNDLE_TYPES.contains(&t);
            if !m.artifact_type.as_deref().is_some_and(is_bundle)
                && !m.layers.iter().any(|l| is_bundle(&l.media_type))
            {
                continue;
            }
            for layer in &m.layers {
                out.extend(small_blob(&r.client, &at, layer, MAX_BUNDLE).await);
            }
        }
        if out.is_empty() {
            return Err(format!("no sigstore bundle refers to {digest}"));
        }
        Ok(out)
    }

    /// Downloads the layer (digest-verified by the client) into a temp file and extracts the
    /// module into another, streaming. With the module, its sha256 when the layer itself is
    /// the module (its digest, checked as it arrived): no second hash.
    pub async fn download(
        &self,
        shown: &str,
        r: &Resolved,
        store: &Store,
        announcer: &Announcer,
    ) -> Result<(TempFile, Option<String>), FetchError> {
        let mut tried = Vec::new();
        for layer in &r.layers {
            match self.download_layer(shown, r, layer, store, announcer).await {
                Ok(module) => return Ok(module),
                // An image layer without the module: the next one back (the image rule).
                Err(FetchError::Layout { reason, .. }) if r.extract == Extract::Image => {
                    tried.push(reason)
                }
                Err(e) => return Err(e),
            }
        }
        Err(FetchError::Layout {
            url: shown.to_owned(),
            reason: format!(
                "no image layer holds plugin.wasm or a single .wasm ({})",
                tried.join("; ")
            ),
        })
    }

    /// Pulls one layer (digest-verified by the client, capped) into a temp file and extracts
    /// the module from it.
    async fn download_layer(
        &self,
        shown: &str,
        r: &Resolved,
        layer_desc: &OciDescriptor,
        store: &Store,
        announcer: &Announcer,
    ) -> Result<(TempFile, Option<String>), FetchError> {
        let io = |e: String| FetchError::Io {
            url: shown.to_owned(),
            reason: e,
        };
        let layer = store.temp("layer", 0o644).map_err(io)?;
        let file = layer
            .file
            .try_clone()
            .map_err(|e| io(format!("cannot write the layer: {e}")))?;
        // A module layer's digest is the module's sha256 (unless it turns out boxed, which
        // the flight's end catches): its bytes can be served as they arrive.
        let size = u64::try_from(layer_desc.size).ok().filter(|s| *s > 0);
        if let (Extract::Module, Some(size), Some(sha)) = (
            r.extract,
            size.filter(|s| *s <= self.max_bytes),
            layer_desc.digest.strip_prefix("sha256:"),
        ) {
            announcer.announce(sha, size, &layer.file);
        }
        let mut sink = CappedSink {
            file: tokio::io::BufWriter::with_capacity(
                1 << 20,
                Signalling {
                    inner: tokio::fs::File::from_std(file),
                    announcer: announcer.clone(),
                },
            ),
            written: 0,
            limit: self.max_bytes,
            overflowed: false,
            progress: crate::progress::start(shown, size),
        };
        if let Err(e) = r
            .client
            .pull_blob(&r.reference, layer_desc, &mut sink)
            .await
        {
            announcer.withdraw();
            if sink.overflowed {
                return Err(FetchError::TooLarge {
                    url: shown.to_owned(),
                    limit: self.max_bytes,
                    what: format!("layer {}", layer_desc.digest),
                });
            }
            return Err(FetchError::Blob {
                url: shown.to_owned(),
                reason: format!("layer {}: {}", layer_desc.digest, oci_reason(&e)),
            });
        }
        // The client checked the bytes against the layer digest as they arrived.
        if let Some(sha) = layer_desc.digest.strip_prefix("sha256:") {
            announcer.confirm(sha);
        }
        let digest = layer_desc.digest.clone();
        let layout = |reason: String| FetchError::Layout {
            url: shown.to_owned(),
            reason: format!("layer {digest}: {reason}"),
        };
        let boxing = r.extract.boxing();
        let (max, store) = (self.max_bytes, store.clone());
        let layer_path = layer.path.clone();
        // gunzip and untar are CPU and disk work: off the async threads.
        let module = tokio::task::spawn_blocking(move || unbox::unbox(&store, layer, boxing, max))
            .await
            .map_err(|e| layout(format!("extraction task failed: {e}")))?
            .map_err(layout)?;
        let sha = (module.path == layer_path)
            .then(|| digest.strip_prefix("sha256:").map(str::to_owned))
            .flatten();
        Ok((module, sha))
    }
}

/// A small blob (a signature payload, a bundle) read into memory: `None` when its descriptor
/// declares more than `limit` bytes, or the pull fails (digest-checked by the client, capped).
async fn small_blob(
    client: &Client,
    reference: &Reference,
    layer: &RawDesc,
    limit: u64,
) -> Option<Vec<u8>> {
    if layer.size < 0 || layer.size as u64 > limit {
        return None;
    }
    let mut sink = VecSink {
        buf: Vec::new(),
        limit,
    };
    let desc = OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
        ..Default::default()
    };
    client.pull_blob(reference, &desc, &mut sink).await.ok()?;
    Some(sink.buf)
}

/// An `AsyncWrite` into memory that fails past `limit` bytes (small blobs: signature payloads).
struct VecSink {
    buf: Vec<u8>,
    limit: u64,
}

impl tokio::io::AsyncWrite for VecSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if (self.buf.len() + data.len()) as u64 > self.limit {
            return Poll::Ready(Err(std::io::Error::other("blob over its size limit")));
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An `AsyncWrite` into a file that fails once more than `limit` bytes arrive.
struct CappedSink {
    file: tokio::io::BufWriter<Signalling<tokio::fs::File>>,
    written: u64,
    limit: u64,
    overflowed: bool,
    progress: crate::progress::Progress,
}

impl tokio::io::AsyncWrite for CappedSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.written + data.len() as u64 > self.limit {
            self.overflowed = true;
            return Poll::Ready(Err(std::io::Error::other("module exceeds the size limit")));
        }
        let this = &mut *self;
        match Pin::new(&mut this.file).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                this.written += n as u64;
                this.progress.advance(n as u64);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}
