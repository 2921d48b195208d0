//! The cache's types at its boundary: what a caller asks for ([`GetOptions`], [`PullPolicy`]),
//! what it gets back ([`Module`], [`Matched`]) and how the cache is set up ([`CacheConfig`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::http::HttpOptions;
use super::tls::FetchTls;

/// Istio's pull policies (`ISTIO_META_WASM_IMAGE_PULL_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum PullPolicy {
    #[default]
    Unspecified,
    IfNotPresent,
    Always,
}

impl PullPolicy {
    /// Istio's lookup: unknown values mean unspecified.
    pub fn from_env(v: &str) -> Self {
        match v {
            "IfNotPresent" => PullPolicy::IfNotPresent,
            "Always" => PullPolicy::Always,
            _ => PullPolicy::Unspecified,
        }
    }
}

/// What a caller knows about the module it wants.
#[derive(Clone, Default)]
pub struct GetOptions {
    /// Expected sha256 (hex, optionally `sha256:`-prefixed) of the module, or for OCI of the
    /// image manifest or index.
    pub sha256: Option<String>,
    pub resource_name: String,
    pub resource_version: String,
    pub pull_policy: PullPolicy,
    /// Raw `.dockerconfigjson` bytes.
    pub pull_secret: Option<Vec<u8>>,
    /// Deadline for the whole fetch.
    pub timeout: Duration,
}

impl std::fmt::Debug for GetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetOptions")
            .field("sha256", &self.sha256)
            .field("resource_name", &self.resource_name)
            .field("resource_version", &self.resource_version)
            .field("pull_policy", &self.pull_policy)
            .field(
                "pull_secret",
                &self.pull_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Which expected checksum a module matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matched {
    ModuleSha256,
    ManifestDigest,
    IndexDigest,
    RawBodySha256,
}

/// A verified module on local disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Module {
    pub path: PathBuf,
    /// sha256 (hex) of the module bytes.
    pub sha256: String,
    /// OCI image manifest digest it came from, if any.
    pub oci_digest: Option<String>,
    pub size: u64,
    /// Which expected checksum matched, when one was given.
    pub matched: Option<Matched>,
    /// Whether this call went to the network.
    pub fetched: bool,
    /// The host the bytes came from when this call fetched them (a mirror or the origin).
    pub served_by: Option<String>,
}

/// The end of a download that is still going: the module, or why there is none.
pub type Pending =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Module, super::FetchError>>>;

/// What `Cache::get_streaming` gives.
pub enum Got {
    /// The module, verified and in place.
    Ready(Module),
    /// A module still being downloaded whose sha256 and size are known: `module` says what
    /// it will be (its file is not in place yet); its bytes so far can be served
    /// (by the `serve` module, under `growing.token`), and `done` ends with the verified
    /// module or the failure.
    Growing {
        module: Module,
        growing: std::sync::Arc<super::growing::Growing>,
        done: Pending,
    },
}

/// Cache settings.
#[derive(Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub expiry: Duration,
    pub purge_interval: Duration,
    pub max_module_bytes: u64,
    /// 0 = no budget.
    pub max_cache_bytes: u64,
    pub http: HttpOptions,
    pub tls: FetchTls,
    /// Docker config JSON used for registries when a resource names no pull secret.
    pub docker_config: Option<PathBuf>,
    /// Registry mirrors and rewrites.
    pub registries: std::sync::Arc<super::mirrors::Registries>,
    /// Signature policy for OCI modules (`None`: nothing is verified).
    pub verify: Option<std::sync::Arc<super::signature::VerifyPolicy>>,
    /// How long a shown right to pull a private module (credentials × repository) is
    /// remembered before a cache hit checks it with the registry again.
    pub auth_ttl: Duration,
}
