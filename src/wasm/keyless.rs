//! Sigstore bundle verification — keyless (a Fulcio certificate for an OIDC identity, logged in
//! Rekor) and managed keys — through the maintained `sigstore-verify` crate: certificate chains
//! to the Fulcio CA valid at signing time, SCTs, Rekor v1 (signed entry timestamps, inclusion
//! proofs, body match) and v2 (checkpoints), RFC 3161 timestamps, DSSE in-toto statements and
//! trust-root validity windows are its job; which identities and issuers a rule accepts is ours.
//!
//! Pure apart from reading the trust root file; no network (the trust roots are carried in the
//! binary: Sigstore's public-good production root, the staging root, or a file). Signed
//! certificate timestamps are required whenever the trust root lists a CT log. Signed
//! certificate timestamps are required whenever the trust root lists a CT log.

use std::path::Path;

use sigstore_verify::trust_root::{
    TrustedRoot, SIGSTORE_PRODUCTION_TRUSTED_ROOT, SIGSTORE_STAGING_TRUSTED_ROOT,
};
use sigstore_verify::types::{Artifact, Bundle, DerPublicKey, Sha256Hash};
use sigstore_verify::{PublicKeyVerificationPolicy, VerificationPolicy};

/// Which trust root to verify against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Sigstore's public-good production instance (carried in the binary).
    Production,
    /// Sigstore's staging instance (carried in the binary).
    Staging,
    /// A `trusted_root.json` file (a private Sigstore, or a pinned copy).
    File(std::path::PathBuf),
}

impl Trust {
    /// The trusted root, parsed.
    pub fn load(&self) -> Result<TrustedRoot, String> {
        match self {
            Trust::Production => TrustedRoot::from_json(SIGSTORE_PRODUCTION_TRUSTED_ROOT)
                .map_err(|e| format!("the embedded production trust root: {e}")),
            Trust::Staging => TrustedRoot::from_json(SIGSTORE_STAGING_TRUSTED_ROOT)
                .map_err(|e| format!("the embedded staging trust root: {e}")),
            Trust::File(p) => {
                TrustedRoot::from_file(p).map_err(|e| format!("trusted root {}: {e}", p.display()))
            }
        }
    }
}

/// Who must have signed.
#[derive(Debug, Clone)]
pub enum Signer {
    /// A keyless signature: the certificate's OIDC issuer equals `issuer`, and its SAN identity
    /// satisfies `identity`.
    Keyless { issuer: String, identity: Identity },
    /// A managed key (PEM `PUBLIC KEY`).
    Key(String),
}

/// How a certificate's SAN identity (an e-mail, a workflow URI) must look.
#[derive(Debug, Clone)]
pub enum Identity {
    Exact(String),
    /// Anchored by the caller (`^…$`).
    Regex(regex_lite::Regex),
}

impl Identity {
    pub fn matches(&self, san: &str) -> bool {
        match self {
            Identity::Exact(e) => e == san,
            Identity::Regex(r) => r.is_match(san),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Exact(e) => write!(f, "{e:?}"),
            Identity::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

/// What was signed: the bytes, or their sha256.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Bytes(&'a [u8]),
    Sha256([u8; 32]),
}

/// What a verified bundle says: the identity and issuer of a keyless signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: Option<String>,
    pub issuer: Option<String>,
}

/// Parses `sha256:<64 hex>` (the conformance protocol's digest form); `None` for anything else.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let v = hex::decode(hex).ok()?;
    v.try_into().ok()
}

/// Verifies the sigstore bundle `bundle_json` over `subject` for `signer`, against `root`.
/// The error says what did not match (identity, issuer, which log or time proof failed).
pub fn verify(
    bundle_json: &str,
    subject: Subject<'_>,
    signer: &Signer,
    root: &TrustedRoot,
) -> Result<Verified, String> {
    let bundle =
        Bundle::from_json(bundle_json).map_err(|e| format!("not a sigstore bundle: {e}"))?;
    let artifact: Artifact<'_> = match subject {
        Subject::Bytes(b) => b.into(),
        Subject::Sha256(d) => Artifact::from_digest(Sha256Hash::new(d)),
    };
    match signer {
        Signer::Key(pem) => {
            let key = DerPublicKey::from_pem(pem).map_err(|e| format!("public key: {e}"))?;
            sigstore_verify::verify(
                artifact,
                &bundle,
                &PublicKeyVerificationPolicy::new(key),
                root,
            )
            .map_err(|e| e.to_string())?;
            Ok(Verified {
                identity: None,
                issuer: None,
            })
        }
        Signer::Keyless { issuer, identity } => {
            let mut policy = match identity {
                Identity::Exact(id) => VerificationPolicy::any_identity()
                    .require_identity(id.clone())
                    .require_issuer(issuer.clone()),
                Identity::Regex(_) => {
                    VerificationPolicy::any_identity().require_issuer(issuer.clone())
                }
            };
            // SCTs are required whenever the trust root names a CT log (Sigstore's production
            // and staging roots do); a private Sigstore without CT (a root with no `ctlogs`)
            // cannot have them, as with cosign's --insecure-ignore-sct.
            if root.ctlogs.is_empty() {
                policy = policy.skip_sct();
            }
            let result = sigstore_verify::verify(artifact, &bundle, &policy, root)
                .map_err(|e| e.to_string())?;
            let san = result.identity().map(|s| s.as_str().to_owned());
            match &san {
                Some(s) if identity.matches(s) => {}
                other => {
                    return Err(format!(
                        "identity mismatch: expected {identity}, got {}",
                        other.as_deref().unwrap_or("none")
                    ))
                }
            }
            Ok(Verified {
                identity: san,
                issuer: result.issuer().map(str::to_owned),
            })
        }
    }
}

/// `ecds-agent verify-bundle`: the sigstore-conformance CLI protocol. Reads the bundle, the key
/// and the artifact (a file, or `sha256:<hex>`), verifies, and says why not.
pub fn verify_cli(
    bundle: &Path,
    artifact: &str,
    signer: CliSigner<'_>,
    trust: &Trust,
) -> Result<Verified, String> {
    let bundle_json = std::fs::read_to_string(bundle)
        .map_err(|e| format!("--bundle {}: {e}", bundle.display()))?;
    let signer = match signer {
        CliSigner::Key(p) => Signer::Key(
            std::fs::read_to_string(p).map_err(|e| format!("--key {}: {e}", p.display()))?,
        ),
        CliSigner::Keyless { identity, issuer } => Signer::Keyless {
            issuer: issuer.to_owned(),
            identity: Identity::Exact(identity.to_owned()),
        },
    };
    let root = trust.load()?;
    // A digest only when it has the digest's shape and names no file (the protocol's rule).
    match parse_digest(artifact).filter(|_| !Path::new(artifact).exists()) {
        Some(d) => verify(&bundle_json, Subject::Sha256(d), &signer, &root),
        None => {
            let bytes = std::fs::read(artifact).map_err(|e| format!("artifact {artifact}: {e}"))?;
            verify(&bundle_json, Subject::Bytes(&bytes), &signer, &root)
        }
    }
}

/// The signer as the conformance CLI names it.
pub enum CliSigner<'a> {
    Key(&'a Path),
    Keyless { identity: &'a str, issuer: &'a str },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_roots() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_digest(&format!("sha256:{hex}")), Some([0xab; 32]));
        for bad in [
            "sha256:abc",
            "sha512:00",
            "file.txt",
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert_eq!(parse_digest(bad), None, "{bad}");
        }
        assert!(Trust::Production.load().is_ok());
        assert!(Trust::Staging.load().is_ok());
        let e = Trust::File("/nonexistent/root.json".into())
            .load()
            .unwrap_err();
        assert!(e.contains("/nonexistent/root.json"), "{e}");
        let re = Identity::Regex(
            regex_lite::Regex::new(
                "^https://github.com/org/repo/.github/workflows/.+@refs/tags/v.+$",
            )
            .unwrap(),
        );
        assert!(
            re.matches("https://github.com/org/repo/.github/workflows/release.yml@refs/tags/v1.2")
        );
        assert!(!re.matches("https://github.com/org/other/.github/workflows/r.yml@refs/tags/v1"));
        assert!(Identity::Exact("a@b".into()).matches("a@b"));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let root = Trust::Production.load().unwrap();
        let signer = Signer::Keyless {
            issuer: "https://token.actions.githubusercontent.com".into(),
            identity: Identity::Exact("x".into()),
        };
        let e = verify("{not json", Subject::Bytes(b"x"), &signer, &root).unwrap_err();
        assert!(e.contains("not a sigstore bundle"), "{e}");
    }
}
