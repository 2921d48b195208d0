//! The command line of `run` and `fetch`: every flag, its environment variable, its default and
//! its validation, and the mapping of flags onto each component's own config type
//! ([`CacheConfig`], [`crate::xds::ProxyConfig`], [`crate::ecds::FailureMode`]). The components
//! never read flags themselves; `main` composes the subcommands.
//!
//! Parsing only: this module opens no sockets and reads no files beyond checking that the
//! files named exist. A value that cannot work is rejected here so that `main` can exit 2
//! with a message that names the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::wasm::http::HttpOptions;
use crate::wasm::tls::FetchTls;
use crate::wasm::CacheConfig;
pub use crate::xds::listen::{parse_listen, ListenAddr};
pub use crate::xds::upstream::{parse_upstream, UpstreamAddr};

/// The longest duration any flag takes: longer values are typos, and would overflow clocks.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a Go-style duration ("24h", "15s", "500ms", "1h30m"), at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration ({e}); e.g. 15s, 1h, 500ms"))?;
    if d > MAX_DURATION {
        return Err(format!("'{s}' is too long (at most 365d)"));
    }
    Ok(d)
}

/// Parses a byte count of a gRPC message: 1 KiB up to 2 GiB.
fn parse_message_bytes(s: &str) -> Result<usize, String> {
    let n = parse_bytes(s)?;
    if !(1024..=(2 << 30)).contains(&n) {
        return Err(format!("'{s}' must be between 1024 and 2147483648"));
    }
    Ok(n as usize)
}

/// A duration of at least 1 ms.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!("'{s}' must be at least 1ms"));
    }
    Ok(d)
}

fn parse_positive_u32(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("'{s}' is not a whole number ({e})")),
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|e| format!("'{s}' is not a byte count ({e})"))
}

fn parse_inline_max(s: &str) -> Result<u64, String> {
    let n = parse_bytes(s)?;
    let max = crate::ecds::delivery::INLINE_LIMIT;
    if n > max {
        return Err(format!(
            "{n} is more than the {max} bytes a module may be inlined"
        ));
    }
    Ok(n)
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("'{s}' is not an Envoy cluster name"));
    }
    Ok(s.to_owned())
}

/// Checks a comma-separated CIDR list (kept as text; [`CacheArgs::cache_config`] maps it).
fn parse_cidrs(s: &str) -> Result<String, String> {
    crate::wasm::guard::Blocklist::parse_extra(s).map(|_| s.to_owned())
}

fn existing_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        Ok(_) => Err(format!("'{s}' is not a file")),
        Err(e) => Err(format!("cannot read '{s}': {e}")),
    }
}

/// What Envoy gets when a module cannot be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FetchFailureMode {
    /// Deliver an allow-all / deny-all RBAC filter of the same name (per the plugin's failure
    /// policy), NACK upstream and keep retrying in the background (Istio 1.25+ plus self-healing).
    StandIn,
    /// Deliver nothing for the failed resource and NACK upstream (Istio 1.24 behaviour);
    /// background retries still deliver the module once it arrives.
    NackOnly,
}

/// Flags of `ecds-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where Envoy connects: unix:/path (stale socket removed, mode 0666, parent created) or host:port.
    #[arg(long, env = "ECDS_AGENT_LISTEN", default_value = "unix:/etc/istio/proxy/XDS",
          value_parser = parse_listen, value_name = "ADDR")]
    pub listen: ListenAddr,

    /// The control plane: http://host:port (plaintext HTTP/2), https://host:port (TLS), or
    /// unix:/path (plaintext HTTP/2 over a Unix socket, e.g. pilot-agent's /etc/istio/proxy/XDS).
    #[arg(long, env = "ECDS_AGENT_UPSTREAM", default_value = "https://istiod.istio-system.svc:15012",
          value_parser = parse_upstream, value_name = "URL")]
    pub upstream: UpstreamAddr,

    /// PEM CA bundle that signs the control plane's certificate (https upstream); system roots if unset.
    #[arg(long, env = "ECDS_AGENT_UPSTREAM_CA", value_parser = existing_file, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// PEM client certificate for mTLS to the control plane (needs --client-key).
    #[arg(long, env = "ECDS_AGENT_CLIENT_CERT", value_parser = existing_file, value_name = "FILE",
          requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key for --client-cert.
    #[arg(long, env = "ECDS_AGENT_CLIENT_KEY", value_parser = existing_file, value_name = "FILE",
          requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// TLS server name to verify on the control plane's certificate (default: the URL host).
    #[arg(long, env = "ECDS_AGENT_UPSTREAM_SNI", value_name = "NAME")]
    pub upstream_sni: Option<String>,

    /// A bearer token file (e.g. the projected service-account token
    /// /var/run/secrets/tokens/istio-token), read again for every new upstream stream and sent
    /// as `authorization: Bearer …`, so a rotated token is used without a restart (replaces an
    /// `XDS_HEADER_authorization` given at start).
    #[arg(long, env = "ECDS_AGENT_UPSTREAM_TOKEN_FILE", value_parser = existing_file,
          value_name = "FILE")]
    pub upstream_token_file: Option<PathBuf>,

    /// Admin HTTP server: /healthz/ready, /stats/prometheus, /stats, /debug/wasm.
    #[arg(
        long,
        env = "ECDS_AGENT_ADMIN",
        default_value = "127.0.0.1:15020",
        value_name = "ADDR"
    )]
    pub admin: SocketAddr,

    /// Clients (comma-separated CIDRs) allowed on the admin port's /debug/* pages; health and
    /// metrics answer everyone who can reach --admin.
    #[arg(long, env = "ECDS_AGENT_ADMIN_DEBUG_CIDRS", default_value = "127.0.0.0/8,::1/128",
          value_parser = parse_cidrs, value_name = "CIDRS")]
    pub admin_debug_cidrs: String,

    /// Convert ECDS Wasm resources (false = pass ECDS through untouched, like Istio's
    /// ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION=false).
    #[arg(long, env = "ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub wasm_conversion: bool,

    /// What Envoy receives for a module that cannot be fetched.
    #[arg(long, env = "ECDS_AGENT_FETCH_FAILURE", value_enum, default_value_t = FetchFailureMode::StandIn)]
    pub fetch_failure: FetchFailureMode,

    /// Modules up to this many bytes are handed to Envoy inline (`code.local.inline_bytes`,
    /// re-checked against their sha256 as they are read) instead of as a file; 0 = never, at
    /// most 1048576. See docs/configuration.md for the measured trade-off.
    #[arg(long, env = "ECDS_AGENT_INLINE_MAX_BYTES", default_value = "0",
          value_parser = parse_inline_max, value_name = "BYTES")]
    pub inline_max_bytes: u64,

    /// Envoy's bootstrap cluster that reaches this agent (its ADS cluster; Istio: xds-grpc).
    /// When set, modules of at least --remote-min-bytes are handed to Envoy as a `remote`
    /// source with their sha256, served by the agent on its xDS listener: Envoy fetches the
    /// verified bytes itself and keeps them in its sha256-keyed code cache, streamed while the
    /// agent still downloads them (the stream ends only once verified). First loads of a
    /// starting Envoy only: Envoy 1.40 fetches remote code only while a listener warms, so
    /// updates go as files. Unset = files.
    #[arg(long, env = "ECDS_AGENT_REMOTE_VIA_CLUSTER", value_name = "CLUSTER",
          value_parser = parse_cluster_name)]
    pub remote_via_cluster: Option<String>,

    /// The smallest module handed to Envoy as a remote source (with --remote-via-cluster).
    #[arg(long, env = "ECDS_AGENT_REMOTE_MIN_BYTES", default_value = "8388608",
          value_parser = parse_bytes, value_name = "BYTES")]
    pub remote_min_bytes: u64,

    /// Longest wait between background retries of a failed module (retries start at 1s and double).
    #[arg(long, env = "ECDS_AGENT_RETRY_MAX_BACKOFF", default_value = "60s", value_parser = parse_duration,
          value_name = "DURATION")]
    pub retry_max_backoff: Duration,

    /// How often a module that failed for a reason retrying cannot fix (signature policy,
    /// checksum mismatch, invalid Wasm, too large, refused credentials) is checked again in the
    /// background (±20 % jitter); transient failures back off up to --retry-max-backoff.
    #[arg(long, env = "ECDS_AGENT_PERMANENT_RECHECK_INTERVAL", default_value = "5m",
          value_parser = parse_positive_duration, value_name = "DURATION")]
    pub permanent_recheck_interval: Duration,

    /// Largest gRPC message accepted from Envoy (bytes); a larger one ends that stream with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "ECDS_AGENT_MAX_REQUEST_BYTES", default_value = "4194304",
          value_parser = parse_message_bytes, value_name = "BYTES")]
    pub max_request_bytes: usize,

    /// Largest gRPC message accepted from the control plane (bytes); a larger one ends that
    /// stream with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ECDS_AGENT_MAX_RESPONSE_BYTES", default_value = "268435456",
          value_parser = parse_message_bytes, value_name = "BYTES")]
    pub max_response_bytes: usize,

    /// Longest the control plane may go silent in the middle of a response. Past it the stream
    /// ends with UNAVAILABLE and Envoy reconnects: a large response is relayed to Envoy as it
    /// arrives, and one cut off mid-way would otherwise hold every later update on that
    /// stream, the agent's ECDS deliveries included. Timed between arrivals of data (a slow
    /// but steady response is fine); pauses between responses are not timed.
    #[arg(long, env = "ECDS_AGENT_RESPONSE_STALL_TIMEOUT", default_value = "30s",
          value_parser = parse_positive_duration, value_name = "DURATION")]
    pub response_stall_timeout: Duration,

    /// Most Envoy streams open at once; a new stream past it ends the oldest (as Istio's agent
    /// does with its one stream).
    #[arg(long, env = "ECDS_AGENT_MAX_STREAMS", default_value = "1024",
          value_parser = parse_positive_u32, value_name = "N")]
    pub max_streams: u32,

    /// How long open streams may drain on SIGTERM/SIGINT before the agent exits anyway.
    #[arg(long, env = "ECDS_AGENT_SHUTDOWN_GRACE", default_value = "3s", value_parser = parse_duration,
          value_name = "DURATION")]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub cache: CacheArgs,
}

/// Flags shared by `run` and `fetch`: the module cache and its fetchers.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Directory of the module cache (content-addressed files plus index.json).
    #[arg(
        long,
        env = "ECDS_AGENT_CACHE_DIR",
        default_value = "/var/lib/istio/data",
        value_name = "DIR"
    )]
    pub cache_dir: PathBuf,

    /// Comma-separated registry hosts (host or host:port, `*` = all) reached over TLS without
    /// verification, or over plain HTTP if they do not speak TLS. Other hosts: verified TLS only.
    #[arg(
        long,
        env = "WASM_INSECURE_REGISTRIES",
        default_value = "",
        value_name = "HOSTS"
    )]
    pub insecure_registries: String,

    /// A module unused for this long is removed (never while a live ECDS resource uses it); 0 = 24h.
    #[arg(long, env = "WASM_MODULE_EXPIRY", default_value = "24h", value_parser = parse_duration,
          value_name = "DURATION")]
    pub module_expiry: Duration,

    /// How often expired modules are purged; 0 = 1h.
    #[arg(long, env = "WASM_PURGE_INTERVAL", default_value = "1h", value_parser = parse_duration,
          value_name = "DURATION")]
    pub purge_interval: Duration,

    /// Timeout of one HTTP(S) request (the whole fetch is bounded by the resource's http_uri.timeout).
    #[arg(long, env = "WASM_HTTP_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_duration,
          value_name = "DURATION")]
    pub http_timeout: Duration,

    /// Attempts per HTTP(S) download (transport errors and retryable 5xx are retried with backoff).
    #[arg(long, env = "WASM_HTTP_REQUEST_MAX_RETRIES", default_value = "5", value_parser = parse_positive_u32,
          value_name = "N")]
    pub http_max_attempts: u32,

    /// Largest module accepted, in bytes (compressed or not); larger is an error, never truncated.
    #[arg(long, env = "ISTIO_WASM_MAX_BINARY_SIZE_BYTES", default_value = "268435456",
          value_parser = parse_bytes, value_name = "BYTES")]
    pub max_module_bytes: u64,

    /// Byte budget of the cache; least recently used modules not in use are evicted past it (0 = none).
    #[arg(long, env = "ECDS_AGENT_CACHE_MAX_BYTES", default_value = "0", value_parser = parse_bytes,
          value_name = "BYTES")]
    pub cache_max_bytes: u64,

    /// Extra CIDRs no HTTP(S) module download may dial (comma-separated), besides the always
    /// blocked link-local and cloud metadata ranges (169.254.0.0/16, fe80::/10,
    /// 100.100.100.200/32, fd00:ec2::/32). Applied at every redirect hop, after DNS.
    #[arg(long, env = "BLOCKED_CIDRS_IN_WASM_FETCH", default_value = "", value_name = "CIDRS",
          value_parser = parse_cidrs)]
    pub blocked_cidrs: String,

    /// Docker config JSON for registries when a resource names no pull secret (auths,
    /// credHelpers, credsStore); default: $DOCKER_CONFIG/config.json if DOCKER_CONFIG is set.
    #[arg(long, env = "ECDS_AGENT_DOCKER_CONFIG", value_parser = existing_file, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,

    /// Registry mirrors and rewrites (a subset of containers-registries.conf v2, TOML).
    #[arg(long, env = "ECDS_AGENT_REGISTRIES_CONFIG", value_parser = existing_file, value_name = "FILE")]
    pub registries_config: Option<PathBuf>,

    /// UPSTREAM=MIRROR: try MIRROR first for every oci:// reference under UPSTREAM (repeatable;
    /// the env var takes a comma-separated list).
    #[arg(
        long,
        env = "ECDS_AGENT_REGISTRY_MIRRORS",
        value_delimiter = ',',
        value_name = "UPSTREAM=MIRROR"
    )]
    pub registry_mirror: Vec<String>,

    /// Signature policy (TOML): which OCI modules must carry a cosign signature by which public
    /// key, which may be unsigned, which are refused. Unset: nothing is verified.
    #[arg(long, env = "ECDS_AGENT_VERIFY_POLICY", value_parser = existing_file, value_name = "FILE")]
    pub verify_policy: Option<PathBuf>,

    /// How long a requester's right to pull a private cached module (its credentials × the
    /// repository, shown by one manifest HEAD) is remembered; 0 = check on every cache hit.
    #[arg(long, env = "ECDS_AGENT_PULL_AUTH_TTL", default_value = "5m", value_parser = parse_duration,
          value_name = "DURATION")]
    pub pull_auth_ttl: Duration,

    /// Extra PEM CA bundle trusted for HTTPS module servers and OCI registries (besides system roots).
    #[arg(long, env = "ECDS_AGENT_FETCH_CA", value_parser = existing_file, value_name = "FILE")]
    pub fetch_ca: Option<PathBuf>,
}

impl RunArgs {
    /// The proxy's limits from these flags.
    pub fn proxy_config(&self) -> crate::xds::ProxyConfig {
        crate::xds::ProxyConfig {
            max_request_bytes: self.max_request_bytes,
            max_response_bytes: self.max_response_bytes,
            response_stall_timeout: self.response_stall_timeout,
            max_streams: self.max_streams as usize,
            token_file: self.upstream_token_file.clone(),
        }
    }

    /// The admin server's settings from these flags.
    pub fn admin_config(&self) -> crate::admin::AdminConfig {
        crate::admin::AdminConfig {
            debug_cidrs: crate::wasm::guard::Blocklist::parse_extra(&self.admin_debug_cidrs)
                .unwrap_or_default(),
        }
    }

    /// How failed modules are retried in the background.
    pub fn retry_policy(&self) -> crate::ecds::RetryPolicy {
        crate::ecds::RetryPolicy {
            max_backoff: self.retry_max_backoff,
            permanent_recheck: self.permanent_recheck_interval,
        }
    }

    /// How verified modules are handed to Envoy, per size.
    pub fn delivery(&self) -> crate::ecds::delivery::Delivery {
        crate::ecds::delivery::Delivery {
            inline_max: self.inline_max_bytes,
            remote: self.remote_via_cluster.clone().map(|cluster| {
                crate::ecds::delivery::RemoteVia {
                    cluster,
                    min_bytes: self.remote_min_bytes,
                }
            }),
        }
    }

    /// What the converter delivers for a module that cannot be fetched.
    pub fn failure_mode(&self) -> crate::ecds::FailureMode {
        match self.fetch_failure {
            FetchFailureMode::StandIn => crate::ecds::FailureMode::StandIn,
            FetchFailureMode::NackOnly => crate::ecds::FailureMode::NackOnly,
        }
    }
}

impl CacheArgs {
    /// The cache's config from these flags.
    pub fn cache_config(&self) -> Result<CacheConfig, String> {
        Ok(CacheConfig {
            dir: self.cache_dir.clone(),
            expiry: self.effective_expiry(),
            purge_interval: self.effective_purge_interval(),
            max_module_bytes: self.max_module_bytes,
            max_cache_bytes: self.cache_max_bytes,
            http: HttpOptions {
                request_timeout: self.http_timeout,
                max_attempts: self.http_max_attempts,
                max_bytes: self.max_module_bytes,
                blocked: crate::wasm::guard::Blocklist::with_extra(
                    &crate::wasm::guard::Blocklist::parse_extra(&self.blocked_cidrs)
                        .map_err(|e| format!("--blocked-cidrs: {e}"))?,
                ),
            },
            tls: FetchTls::new(self.fetch_ca.as_deref(), self.insecure_list())?,
            docker_config: self.docker_config.clone().or_else(|| {
                // Docker's convention: $DOCKER_CONFIG/config.json.
                std::env::var_os("DOCKER_CONFIG")
                    .map(|d| PathBuf::from(d).join("config.json"))
                    .filter(|p| p.is_file())
            }),
            registries: std::sync::Arc::new(self.registries()?),
            verify: match &self.verify_policy {
                Some(p) => Some(std::sync::Arc::new(
                    crate::wasm::signature::VerifyPolicy::load(p)
                        .map_err(|e| format!("--verify-policy {e}"))?,
                )),
                None => None,
            },
            auth_ttl: self.pull_auth_ttl,
        })
    }

    /// The mirrors and rewrites of --registries-config plus --registry-mirror.
    fn registries(&self) -> Result<crate::wasm::mirrors::Registries, String> {
        let mut r = match &self.registries_config {
            Some(p) => crate::wasm::mirrors::Registries::load(p)
                .map_err(|e| format!("--registries-config {e}"))?,
            None => Default::default(),
        };
        for m in &self.registry_mirror {
            r.add_shorthand(m)
                .map_err(|e| format!("--registry-mirror {e}"))?;
        }
        Ok(r)
    }

    /// The insecure list, trimmed, empty entries dropped.
    pub fn insecure_list(&self) -> Vec<String> {
        self.insecure_registries
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            // Compared with canonical registry names (`*` stays `*`).
            .map(crate::wasm::url::canonical_name)
            .collect()
    }

    /// Expiry with Istio's "0 means default".
    pub fn effective_expiry(&self) -> Duration {
        if self.module_expiry.is_zero() {
            Duration::from_secs(24 * 3600)
        } else {
            self.module_expiry
        }
    }

    /// Purge interval with Istio's "0 means default".
    pub fn effective_purge_interval(&self) -> Duration {
        if self.purge_interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.purge_interval
        }
    }
}

/// Flags of `ecds-agent fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Module URL: oci://host[:port]/repo[:tag|@sha256:digest], http://… or https://…
    #[arg(value_name = "URL")]
    pub url: String,

    /// Expected sha256 (hex) of the module, or for OCI also of the manifest.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,

    /// Docker config JSON file with registry credentials (the content of a .dockerconfigjson secret).
    #[arg(long, value_parser = existing_file, value_name = "FILE")]
    pub pull_secret: Option<PathBuf>,

    /// if-not-present: reuse a cached copy; always: pull again even if one is cached.
    #[arg(long, value_enum, default_value_t = FetchPolicy::IfNotPresent)]
    pub pull_policy: FetchPolicy,

    /// Deadline for the whole fetch.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,

    #[command(flatten)]
    pub cache: CacheArgs,
}

/// `ecds-agent import`: modules of an OCI image layout into the cache, with no network.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// An OCI image layout directory, or an oci-archive tar (`skopeo copy … oci:DIR:TAG` /
    /// `oci-archive:FILE:TAG`, `oras copy --to-oci-layout`).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,

    /// The reference each image is imported under (repeat, in the layout's order); default: the
    /// layout's org.opencontainers.image.ref.name when it is a whole reference.
    #[arg(long = "as", value_name = "oci://REGISTRY/REPO:TAG")]
    pub as_refs: Vec<String>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

/// `ecds-agent prefetch`: fetch every module named in WasmPlugin / TrafficExtension YAML or a
/// URL list into the cache (a node warm-up job, an image build step).
#[derive(Debug, clap::Args)]
pub struct PrefetchArgs {
    /// YAML files (one or many documents: WasmPlugin, TrafficExtension), or plain lists of URLs
    /// (one per line; `#` comments).
    #[arg(value_name = "FILE", required = true, value_parser = existing_file)]
    pub files: Vec<PathBuf>,

    /// Docker config JSON file with registry credentials (the content of a .dockerconfigjson secret).
    #[arg(long, value_parser = existing_file, value_name = "FILE")]
    pub pull_secret: Option<PathBuf>,

    /// Deadline of each module's fetch.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FetchPolicy {
    /// Istio's spelling is accepted too.
    #[value(alias = "IfNotPresent")]
    IfNotPresent,
    #[value(alias = "Always")]
    Always,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            parse_listen("unix:/tmp/x").unwrap(),
            ListenAddr::Unix("/tmp/x".into())
        );
        assert_eq!(
            parse_listen("127.0.0.1:1").unwrap(),
            ListenAddr::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert!(parse_listen("unix:").is_err());
        assert!(parse_listen("nonsense").is_err());
    }

    #[test]
    fn upstream_forms() {
        assert!(parse_upstream("http://127.0.0.1:15010").is_ok());
        assert!(parse_upstream("https://istiod:15012").is_ok());
        assert!(parse_upstream("grpc://x:1").is_err());
        assert!(parse_upstream("127.0.0.1:15010").is_err());
        for s in ["unix:/etc/istio/proxy/XDS", "unix:///etc/istio/proxy/XDS"] {
            assert_eq!(
                parse_upstream(s).unwrap(),
                UpstreamAddr::Unix("/etc/istio/proxy/XDS".into())
            );
        }
        assert!(parse_upstream("unix:relative").is_err());
        assert!(parse_upstream("unix:").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("300000000000y")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_duration("366d").is_err() && parse_duration("365d").is_ok());
        assert!(parse_message_bytes("100").is_err() && parse_message_bytes("4096").is_ok());
    }
}

/// `ecds-agent verify-bundle`: verify one sigstore bundle, speaking the sigstore-conformance
/// suite's CLI protocol (exit 0: verified; 1: refused, with the reason).
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("signer").required(true).args(["certificate_identity", "key"])))]
pub struct VerifyBundleArgs {
    /// Use Sigstore's staging trust root instead of the production one (both carried in the binary).
    #[arg(long)]
    pub staging: bool,
    /// The sigstore bundle (v0.1–v0.3 JSON) to verify.
    #[arg(long, value_name = "FILE")]
    pub bundle: PathBuf,
    /// The identity (SAN: an e-mail or a URI) the signing certificate must carry (keyless).
    #[arg(long, value_name = "IDENTITY", requires = "certificate_oidc_issuer")]
    pub certificate_identity: Option<String>,
    /// The OIDC issuer the signing certificate must name (keyless).
    #[arg(long, value_name = "URL", requires = "certificate_identity")]
    pub certificate_oidc_issuer: Option<String>,
    /// A PEM public key that must have signed (managed key) instead of a keyless identity.
    #[arg(long, value_name = "PATH_TO_KEY", conflicts_with_all = ["certificate_identity", "certificate_oidc_issuer"])]
    pub key: Option<PathBuf>,
    /// A trusted_root.json to verify against instead of the embedded root.
    #[arg(long, value_name = "FILE")]
    pub trusted_root: Option<PathBuf>,
    /// The artifact: a file, or `sha256:<64 hex>` (its digest).
    #[arg(value_name = "FILE_OR_DIGEST")]
    pub artifact: String,
}
