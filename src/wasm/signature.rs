//! Signature policy for OCI modules (cosign, public keys): which images must be signed by which
//! key, and the check itself. Pure policy and crypto, no I/O beyond reading the policy's files
//! at load time; the OCI fetcher fetches the signatures and calls [`verify_payload`].
//!
//! Policy file (`--verify-policy`, TOML): ordered rules, the first whose `match` glob fits
//! `host[:port]/repository` wins.
//!
//! ```toml
//! [[rule]]
//! match = "registry.example.com:5000/team/*"   # `*` matches any run of characters, `/` included
//! public_key = "/etc/ecds-agent/cosign.pub"    # PEM, ECDSA P-256 (cosign generate-key-pair)
//! [[rule]]
//! match = "*"
//! action = "allow-unsigned"                    # or "deny"
//! ```
//!
//! A rule with `public_key` (one path or a list) requires at least one signature that verifies
//! with one of its keys, over a cosign simple-signing payload whose
//! `critical.image.docker-manifest-digest` is the digest the agent resolved and is about to use.
//! A module no rule matches is refused. Without a policy file nothing is verified.

use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{ParsedPublicKey, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use base64::Engine;
use serde::Deserialize;

/// Artifact types of a sigstore bundle v0.3 (what cosign v3 pushes as an OCI 1.1 referrer).
pub const BUNDLE_TYPES: &[&str] = &[
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
];

/// Layer media type of a cosign simple-signing payload.
pub const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation holding the base64 DER signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Keyless legacy signatures: the signing certificate (PEM).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// Keyless legacy signatures: Rekor's signed entry timestamp and entry (cosign's JSON).
pub const REKOR_BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";

/// One layer of cosign's legacy `sha256-<hex>.sig` manifest.
#[derive(Debug, Clone)]
pub struct LegacySig {
    /// The simple-signing payload.
    pub payload: Vec<u8>,
    /// Base64 signature over the payload.
    pub signature: String,
    /// Keyless: the certificate (PEM) and the Rekor bundle annotation.
    pub certificate: Option<String>,
    pub rekor_bundle: Option<String>,
}

impl LegacySig {
    /// The signature a simple-signing layer's `annotations` carry over `payload` (`None`: the
    /// layer has no signature annotation).
    pub fn from_layer(
        payload: Vec<u8>,
        annotations: &std::collections::HashMap<String, String>,
    ) -> Option<LegacySig> {
        Some(LegacySig {
            payload,
            signature: annotations.get(SIGNATURE_ANNOTATION)?.clone(),
            certificate: annotations.get(CERTIFICATE_ANNOTATION).cloned(),
            rekor_bundle: annotations.get(REKOR_BUNDLE_ANNOTATION).cloned(),
        })
    }
}

/// What a rule requires.
#[derive(Debug, Clone)]
pub enum Action {
    /// A valid signature by one of these signers.
    Verify(Signers),
    AllowUnsigned,
    Deny,
}

/// Who may sign under a rule: any one of them verifies.
#[derive(Debug, Clone, Default)]
pub struct Signers {
    /// Public keys (SubjectPublicKeyInfo DER), named for messages.
    pub keys: Vec<(String, Vec<u8>)>,
    /// Keyless identities (a Fulcio certificate for an OIDC identity, logged in Rekor).
    pub keyless: Vec<Keyless>,
    /// The trust root keyless signatures are checked against.
    pub trust: Option<KeylessTrust>,
}

/// A keyless identity a rule accepts.
#[derive(Debug, Clone)]
pub struct Keyless {
    /// The OIDC issuer, exactly.
    pub issuer: String,
    pub identity: super::keyless::Identity,
}

impl Keyless {
    /// How messages name it.
    pub fn name(&self) -> String {
        format!("keyless {} from {}", self.identity, self.issuer)
    }
}

/// A loaded trust root and what identifies it (for fingerprints).
#[derive(Clone)]
pub struct KeylessTrust {
    pub id: String,
    pub root: std::sync::Arc<sigstore_verify::trust_root::TrustedRoot>,
}

impl std::fmt::Debug for KeylessTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeylessTrust({})", self.id)
    }
}

impl Signers {
    /// Every signer's (name, fingerprint): a key's is the sha256 of its DER; a keyless
    /// identity's covers its issuer, identity rule and trust root, so changing any of them
    /// makes recorded verdicts stale.
    pub fn fingerprints(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|(n, der)| (n.clone(), key_fingerprint(der)))
            .collect();
        let trust = self.trust.as_ref().map(|t| t.id.as_str()).unwrap_or("");
        out.extend(self.keyless.iter().map(|k| {
            (
                k.name(),
                super::verify::sha256_hex(
                    format!("keyless\n{}\n{}\n{trust}", k.issuer, k.identity).as_bytes(),
                ),
            )
        }));
        out
    }

    /// The fingerprint of the signer named `name`.
    pub fn fingerprint_of(&self, name: &str) -> Option<String> {
        self.fingerprints()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, fp)| fp)
    }

    /// Every check of a sigstore bundle over `digest`: by the rule's keys, then by its keyless
    /// identities. Each gives the signer's name, or why not.
    pub fn check_bundle(&self, bundle: &[u8], digest: &str) -> Vec<Result<String, String>> {
        let mut checks = Vec::new();
        if !self.keys.is_empty() {
            checks.push(verify_bundle(bundle, &self.keys, digest));
        }
        if !self.keyless.is_empty() {
            checks.push(verify_keyless(bundle, self, digest));
        }
        checks
    }

    /// Every check of one layer of cosign's legacy `.sig` manifest over `digest`, as
    /// [`Signers::check_bundle`].
    pub fn check_legacy(&self, sig: &LegacySig, digest: &str) -> Vec<Result<String, String>> {
        let mut checks = Vec::new();
        if !self.keys.is_empty() {
            checks.push(verify_payload(
                &sig.payload,
                &sig.signature,
                &self.keys,
                digest,
            ));
        }
        if !self.keyless.is_empty() {
            checks.push(verify_legacy_keyless(sig, self, digest));
        }
        checks
    }

    /// The names of every signer, for messages.
    pub fn names(&self) -> String {
        self.fingerprints()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub action: Action,
}

/// The ordered rules of a policy file.
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    public_key: Option<OneOrMany>,
    #[serde(default)]
    action: Option<String>,
    /// One keyless identity, inline.
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    identity_regexp: Option<String>,
    /// Several keyless identities.
    #[serde(default)]
    keyless: Vec<FileKeyless>,
    /// A trusted_root.json for keyless signatures (default: Sigstore's production root).
    #[serde(default)]
    trusted_root: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyless {
    issuer: String,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    identity_regexp: Option<String>,
}

/// One keyless identity of a rule, checked: an issuer, and exactly one of `identity` and
/// `identity_regexp` (matched whole: compiled as `^(?:…)$`).
fn keyless_of(
    issuer: Option<String>,
    identity: Option<String>,
    identity_regexp: Option<String>,
) -> Result<Option<Keyless>, String> {
    use super::keyless::Identity;
    let identity = match (identity, identity_regexp) {
        (Some(i), None) => Some(Identity::Exact(i)),
        (None, Some(r)) => {
            // The whole identity must match: `a|b` means `^(?:a|b)$`, never `^a|b$`.
            let anchored = format!("^(?:{r})$");
            Some(Identity::Regex(
                regex_lite::Regex::new(&anchored)
                    .map_err(|e| format!("identity_regexp {r:?}: {e}"))?,
            ))
        }
        (Some(_), Some(_)) => return Err("identity and identity_regexp exclude each other".into()),
        (None, None) => None,
    };
    match (issuer, identity) {
        (Some(issuer), Some(identity)) if !issuer.is_empty() => {
            Ok(Some(Keyless { issuer, identity }))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err("issuer needs identity or identity_regexp".into()),
        _ => Err("identity and identity_regexp need an issuer".into()),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<FileRule>,
}

/// The DER of a PEM `PUBLIC KEY`, checked to be an ECDSA P-256 key.
fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PUBLIC KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(format!("{}: no PEM PUBLIC KEY block", path.display()));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    // A key that is not P-256 is refused now, not at the first pull.
    ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &der).map_err(|_| {
        format!(
            "{}: not an ECDSA P-256 public key (what cosign generate-key-pair writes)",
            path.display()
        )
    })?;
    Ok(der)
}

/// The trust root of a rule's keyless identities: a file (relative to the policy), else
/// Sigstore's public-good production root carried in the binary.
fn load_trust(path: Option<&Path>, base: &Path) -> Result<KeylessTrust, String> {
    use super::keyless::Trust;
    let (trust, id) = match path {
        Some(p) => {
            let p = if p.is_relative() {
                base.join(p)
            } else {
                p.to_owned()
            };
            let bytes =
                std::fs::read(&p).map_err(|e| format!("trusted_root {}: {e}", p.display()))?;
            (Trust::File(p), super::verify::sha256_hex(&bytes))
        }
        None => (Trust::Production, "sigstore-production".to_owned()),
    };
    Ok(KeylessTrust {
        id,
        root: std::sync::Arc::new(trust.load()?),
    })
}

impl VerifyPolicy {
    /// Reads and checks a policy file (errors name the file and the rule).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: File = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if file.rule.is_empty() {
            return Err(format!("{}: no [[rule]]", path.display()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rules = Vec::new();
        for (i, r) in file.rule.into_iter().enumerate() {
            let at = format!("{} rule {} ({:?})", path.display(), i + 1, r.pattern);
            let mut keyless = Vec::new();
            if let Some(k) = keyless_of(r.issuer, r.identity, r.identity_regexp)
                .map_err(|e| format!("{at}: {e}"))?
            {
                keyless.push(k);
            }
            for k in r.keyless {
                if let Some(k) = keyless_of(Some(k.issuer), k.identity, k.identity_regexp)
                    .map_err(|e| format!("{at}: {e}"))?
                {
                    keyless.push(k);
                }
            }
            let signs = r.public_key.is_some() || !keyless.is_empty();
            let action = match (r.action.as_deref(), signs) {
                (None | Some("verify"), true) => {
                    let paths = match r.public_key {
                        Some(OneOrMany::One(p)) => vec![p],
                        Some(OneOrMany::Many(v)) => v,
                        None => vec![],
                    };
                    let mut loaded = Vec::new();
                    for p in paths {
                        let p = if p.is_relative() { base.join(p) } else { p };
                        loaded.push((
                            p.display().to_string(),
                            read_key(&p).map_err(|e| format!("{at}: {e}"))?,
                        ));
                    }
                    let trust = if keyless.is_empty() {
                        None
                    } else {
                        Some(load_trust(r.trusted_root.as_deref(), base).map_err(|e| format!("{at}: {e}"))?)
                    };
                    Action::Verify(Signers {
                        keys: loaded,
                        keyless,
                        trust,
                    })
                }
                (Some("allow-unsigned"), false) => Action::AllowUnsigned,
                (Some("deny"), false) => Action::Deny,
                (Some(a), false) => {
                    return Err(format!(
                        "{at}: action {a:?} is not verify, allow-unsigned or deny"
                    ))
                }
                (Some(_), true) => {
                    return Err(format!(
                        "{at}: public_key and keyless identities go with action \"verify\" only"
                    ))
                }
                (None, false) => {
                    return Err(format!(
                        "{at}: needs public_key, a keyless identity (issuer + identity or identity_regexp) or action"
                    ))
                }
            };
            rules.push(Rule {
                // Names are matched in canonical form (lower case, no default port, …).
                pattern: super::url::canonical_name(&r.pattern),
                action,
            });
        }
        Ok(Self { rules })
    }

    /// The first rule that matches `host[:port]/repository`.
    pub fn rule_for(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| glob(&r.pattern, name))
    }
}

/// `*` matches any run of characters (`/` included); everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The `critical.type` of a cosign simple-signing payload: what makes it a signature.
pub const SIMPLESIGNING_TYPE: &str = "cosign container image signature";
/// The DSSE payload type of an in-toto statement.
pub const INTOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The predicate of cosign's signing statement (cosign v3 `sign`). Attestations (SBOMs, scan
/// results, provenance) carry other predicates and never count as a signature.
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";

/// The fingerprint the cache records for a key: sha256 of its SubjectPublicKeyInfo DER, hex.
/// A rotated key has another fingerprint, so a module admitted under the old key is checked
/// again under the new policy.
pub fn key_fingerprint(der: &[u8]) -> String {
    super::verify::sha256_hex(der)
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: Image,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// Checks one signature: `signature_b64` (base64 DER ECDSA) over `payload` by one of `keys`,
/// and the payload names `digest`. Returns the key that verified, or why not.
pub fn verify_payload(
    payload: &[u8],
    signature_b64: &str,
    keys: &[(String, Vec<u8>)],
    digest: &str,
) -> Result<String, String> {
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let key = keys
        .iter()
        .find(|(_, der)| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, der)
                .verify(payload, &sig)
                .is_ok()
        })
        .map(|(name, _)| name.clone())
        .ok_or_else(|| {
            let names: Vec<&str> = keys.iter().map(|(n, _)| n.as_str()).collect();
            format!("no signature verifies with {}", names.join(", "))
        })?;
    check_simplesigning(payload, digest)?;
    Ok(key)
}

/// A cosign simple-signing payload of type "cosign container image signature" naming `digest`.
fn check_simplesigning(payload: &[u8], digest: &str) -> Result<(), String> {
    let p: Payload = serde_json::from_slice(payload)
        .map_err(|e| format!("signed payload is not a cosign simple-signing payload: {e}"))?;
    // Case as cosign compares it (it lower-cases before comparing).
    match p.critical.kind.as_deref() {
        Some(t) if t.eq_ignore_ascii_case(SIMPLESIGNING_TYPE) => {}
        other => {
            return Err(format!(
                "the signed payload's critical.type is {:?}, not {SIMPLESIGNING_TYPE:?}",
                other.unwrap_or("missing")
            ))
        }
    }
    if p.critical.image.digest != digest {
        return Err(format!(
            "the signature is for {}, not for {digest} (a re-tagged image?)",
            p.critical.image.digest
        ));
    }
    Ok(())
}

/// cosign's `dev.sigstore.cosign/bundle` annotation.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RekorAnnotation {
    signed_entry_timestamp: String,
    payload: RekorAnnotationPayload,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RekorAnnotationPayload {
    body: String,
    integrated_time: i64,
    log_index: i64,
    #[serde(rename = "logID")]
    log_id: String,
}

/// A legacy keyless `.sig` layer as the sigstore bundle v0.1 it amounts to: a message signature
/// over the payload, the leaf certificate, and the log entry with its signed entry timestamp.
fn legacy_bundle(sig: &LegacySig) -> Result<String, String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let cert_pem = sig
        .certificate
        .as_deref()
        .ok_or("no certificate annotation (a key signature, not a keyless one)")?;
    let cert_der = pem_body(cert_pem, "CERTIFICATE")?;
    let annotation = sig
        .rekor_bundle
        .as_deref()
        .ok_or("no Rekor bundle annotation (the signature was not logged)")?;
    let rekor: RekorAnnotation = serde_json::from_str(annotation)
        .map_err(|e| format!("the Rekor bundle annotation: {e}"))?;
    let body = b64
        .decode(rekor.payload.body.trim())
        .map_err(|e| format!("the logged entry is not base64: {e}"))?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct KindVersion {
        kind: String,
        api_version: String,
    }
    let kv: KindVersion =
        serde_json::from_slice(&body).map_err(|e| format!("the logged entry: {e}"))?;
    let log_id =
        hex::decode(&rekor.payload.log_id).map_err(|e| format!("the log ID is not hex: {e}"))?;
    let digest = super::verify::sha256_bytes(&sig.payload);
    serde_json::to_string(&serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "verificationMaterial": {
            "x509CertificateChain": {"certificates": [{"rawBytes": b64.encode(&cert_der)}]},
            "tlogEntries": [{
                "logIndex": rekor.payload.log_index.to_string(),
                "logId": {"keyId": b64.encode(&log_id)},
                "kindVersion": {"kind": kv.kind, "version": kv.api_version},
                "integratedTime": rekor.payload.integrated_time.to_string(),
                "inclusionPromise": {"signedEntryTimestamp": rekor.signed_entry_timestamp},
                "canonicalizedBody": rekor.payload.body,
            }],
        },
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": b64.encode(digest)},
            "signature": sig.signature.trim(),
        },
    }))
    .map_err(|e| e.to_string())
}

/// The DER inside the first PEM block labelled `label`.
fn pem_body(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let body: String = pem
        .lines()
        .skip_while(|l| l.trim() != begin)
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(format!("no PEM {label} block"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| format!("bad PEM {label}: {e}"))
}

/// Checks a legacy keyless `.sig` layer (cosign before bundles): the certificate, log entry and
/// signature through `sigstore-verify` against one of the rule's keyless identities, and the
/// payload naming `digest`. Returns the identity's name.
pub fn verify_legacy_keyless(
    sig: &LegacySig,
    signers: &Signers,
    digest: &str,
) -> Result<String, String> {
    let Some(trust) = &signers.trust else {
        return Err("the rule names no keyless identity".into());
    };
    let bundle = legacy_bundle(sig)?;
    check_simplesigning(&sig.payload, digest)?;
    first_identity(
        &bundle,
        super::keyless::Subject::Bytes(&sig.payload),
        signers,
        trust,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
    #[serde(default)]
    message_signature: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSig>,
}

#[derive(Deserialize)]
struct EnvelopeSig {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(default)]
    subject: Vec<Subject>,
    #[serde(default)]
    predicate_type: Option<String>,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    digest: std::collections::HashMap<String, String>,
}

/// DSSE's pre-authentication encoding of a payload: what the signature covers.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Checks a sigstore bundle v0.3 with a DSSE envelope: a signature by one of `keys` over the
/// envelope (DSSE PAE), whose in-toto statement names `digest` as a subject. Bundles with a
/// bare message signature, and keyless (certificate) verification, are not supported.
pub fn verify_bundle(
    bundle: &[u8],
    keys: &[(String, Vec<u8>)],
    digest: &str,
) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bundle: Bundle =
        serde_json::from_slice(bundle).map_err(|e| format!("not a sigstore bundle: {e}"))?;
    let Some(env) = bundle.dsse_envelope else {
        return Err(if bundle.message_signature.is_some() {
            "the bundle carries a message signature, not a DSSE envelope (not supported)".into()
        } else {
            "the bundle has no DSSE envelope".into()
        });
    };
    let payload = b64
        .decode(env.payload.trim())
        .map_err(|e| format!("DSSE payload is not base64: {e}"))?;
    let signed = pae(&env.payload_type, &payload);
    let key = env
        .signatures
        .iter()
        .filter_map(|s| b64.decode(s.sig.trim()).ok())
        .find_map(|sig| {
            keys.iter()
                .find(|(_, der)| {
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, der)
                        .verify(&signed, &sig)
                        .is_ok()
                })
                .map(|(name, _)| name.clone())
        })
        .ok_or_else(|| {
            let names: Vec<&str> = keys.iter().map(|(n, _)| n.as_str()).collect();
            format!("no bundle signature verifies with {}", names.join(", "))
        })?;
    if env.payload_type != INTOTO_PAYLOAD_TYPE {
        return Err(format!(
            "the DSSE payload type is {:?}, not {INTOTO_PAYLOAD_TYPE:?}",
            clip(&env.payload_type, 128)
        ));
    }
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| format!("DSSE payload is not an in-toto statement: {e}"))?;
    match statement.predicate_type.as_deref() {
        Some(COSIGN_SIGN_PREDICATE) => {}
        other => {
            return Err(format!(
                "the bundle is an attestation ({}), not a signature ({COSIGN_SIGN_PREDICATE})",
                clip(other.unwrap_or("no predicateType"), 128)
            ))
        }
    }
    let hex = digest.trim_start_matches("sha256:");
    if !statement
        .subject
        .iter()
        .any(|s| s.digest.get("sha256").map(String::as_str) == Some(hex))
    {
        return Err(format!(
            "the bundle's statement does not name {digest} as its subject"
        ));
    }
    Ok(key)
}

/// A DSSE bundle must carry cosign's signing statement (an attestation is not a signature); a
/// bundle with a message signature is a signature by construction.
fn signing_statement_only(bundle: &[u8]) -> Result<(), String> {
    let b: Bundle =
        serde_json::from_slice(bundle).map_err(|e| format!("not a sigstore bundle: {e}"))?;
    let Some(env) = b.dsse_envelope else {
        return Ok(());
    };
    if env.payload_type != INTOTO_PAYLOAD_TYPE {
        return Err(format!(
            "the DSSE payload type is {:?}, not {INTOTO_PAYLOAD_TYPE:?}",
            clip(&env.payload_type, 128)
        ));
    }
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env.payload.trim())
        .map_err(|e| format!("DSSE payload is not base64: {e}"))?;
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| format!("DSSE payload is not an in-toto statement: {e}"))?;
    match statement.predicate_type.as_deref() {
        Some(COSIGN_SIGN_PREDICATE) => Ok(()),
        other => Err(format!(
            "the bundle is an attestation ({}), not a signature ({COSIGN_SIGN_PREDICATE})",
            clip(other.unwrap_or("no predicateType"), 128)
        )),
    }
}

/// Checks a sigstore bundle as a keyless signature over `digest` (`sha256:<hex>`) by one of the
/// rule's keyless identities, against its trust root (`sigstore-verify`: certificate chain valid
/// at signing time, SCTs, Rekor entry and proofs, timestamps). Returns the identity's name.
pub fn verify_keyless(bundle: &[u8], signers: &Signers, digest: &str) -> Result<String, String> {
    use super::keyless::{parse_digest, Subject};
    let Some(trust) = &signers.trust else {
        return Err("the rule names no keyless identity".into());
    };
    let text = std::str::from_utf8(bundle).map_err(|_| "the bundle is not UTF-8".to_owned())?;
    signing_statement_only(bundle)?;
    let d = parse_digest(digest).ok_or_else(|| format!("{digest:?} is not a sha256 digest"))?;
    first_identity(text, Subject::Sha256(d), signers, trust)
}

/// The first of the rule's keyless identities `bundle_json` verifies for, or why none does.
fn first_identity(
    bundle_json: &str,
    subject: super::keyless::Subject<'_>,
    signers: &Signers,
    trust: &KeylessTrust,
) -> Result<String, String> {
    use super::keyless::{verify, Signer};
    let mut why = Vec::new();
    for k in &signers.keyless {
        let signer = Signer::Keyless {
            issuer: k.issuer.clone(),
            identity: k.identity.clone(),
        };
        match verify(bundle_json, subject, &signer, &trust.root) {
            Ok(_) => return Ok(k.name()),
            Err(e) => why.push(format!("{}: {}", k.name(), clip(&e, 300))),
        }
    }
    Err(why.join("; "))
}

/// `s` cut to at most `max` bytes (on a character boundary), marked when cut.
fn clip(s: &str, max: usize) -> String {
    super::error::clip(s, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "r.example:5000/team/x"));
        assert!(glob("r.example:5000/team/*", "r.example:5000/team/a/b"));
        assert!(!glob("r.example:5000/team/*", "r.example:5000/other/a"));
        assert!(glob("*/team/*", "h/team/x"));
        assert!(glob("h/x", "h/x") && !glob("h/x", "h/xy"));
        assert!(glob("h/*-wasm", "h/auth-wasm") && !glob("h/*-wasm", "h/auth"));
    }

    #[test]
    fn identity_patterns_match_the_whole_identity() {
        let k = keyless_of(
            Some("https://issuer".into()),
            None,
            Some("a@corp.com|b@corp.com".into()),
        )
        .unwrap()
        .unwrap();
        assert!(k.identity.matches("a@corp.com") && k.identity.matches("b@corp.com"));
        assert!(!k.identity.matches("a@corp.com.evil.example"));
        assert!(!k.identity.matches("x-b@corp.com"));
    }

    #[test]
    fn policy_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        let bad = |text: &str, want: &str| {
            std::fs::write(&p, text).unwrap();
            let e = VerifyPolicy::load(&p).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad("", "no [[rule]]");
        bad(
            "[[rule]]\nmatch = \"*\"\n",
            "needs public_key, a keyless identity",
        );
        bad(
            "[[rule]]\nmatch = \"*\"\nissuer = \"https://i\"\n",
            "issuer needs identity or identity_regexp",
        );
        bad(
            "[[rule]]\nmatch = \"*\"\nissuer = \"https://i\"\nidentity_regexp = \"(\"\n",
            "identity_regexp",
        );
        bad(
            "[[rule]]\nmatch = \"*\"\nissuer = \"https://i\"\nidentity = \"a\"\ntrusted_root = \"missing.json\"\n",
            "missing.json",
        );
        bad(
            "[[rule]]\nmatch = \"*\"\naction = \"maybe\"\n",
            "is not verify",
        );
        bad(
            "[[rule]]\nmatch = \"*\"\npublic_key = \"missing.pub\"\n",
            "missing.pub",
        );
        bad("[[rule]]\nmatch = \"*\"\nkey = \"x\"\n", "unknown field");
        std::fs::write(&p, "[[rule]]\nmatch = \"a/*\"\naction = \"deny\"\n[[rule]]\nmatch = \"*\"\naction = \"allow-unsigned\"\n").unwrap();
        let policy = VerifyPolicy::load(&p).unwrap();
        assert!(matches!(
            policy.rule_for("a/b").unwrap().action,
            Action::Deny
        ));
        assert!(matches!(
            policy.rule_for("c/d").unwrap().action,
            Action::AllowUnsigned
        ));
    }
}
