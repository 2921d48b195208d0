//! How Envoy is handed a verified module: the code source written into the converted filter.
//!
//! * `local.filename` (the default, as Istio's agent does): Envoy reads the cache file.
//! * `local.inline_bytes`, for modules up to `--inline-max-bytes`: the bytes ride in the ECDS
//!   resource itself, read here and checked against the module's sha256 first, so Envoy opens
//!   no file.
//! * `remote` with the module's sha256, for modules of at least `--remote-min-bytes` when
//!   `--remote-via-cluster` names Envoy's bootstrap cluster that reaches this agent (Istio:
//!   `xds-grpc`): Envoy fetches the bytes from the agent itself ([`crate::wasm::serve`]) over
//!   the connection it already has, checks the sha256, and keeps them in its own sha256-keyed
//!   code cache, which a re-push or a new listener then hits without any read.
//!
//! Owns the choice ([`choose`], a pure function) and the code source; it does not fetch,
//! verify or serve anything. Envoy never gets bytes the agent did not verify: inline bytes are
//! hashed again as they are read, and a remote source carries the verified sha256, which
//! Envoy checks before it runs the module.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, BackoffStrategy, DataSource, HttpUri,
    RemoteDataSource, RetryPolicy,
};

use crate::wasm::Module;

/// The largest `--inline-max-bytes` accepted: larger modules would bloat every ECDS message
/// and Envoy's config dump.
pub const INLINE_LIMIT: u64 = 1 << 20;

/// Envoy's own fetch from the agent: the deadline of one attempt, and its retries (an agent
/// restarting is back within them).
const REMOTE_TIMEOUT: Duration = Duration::from_secs(60);
const REMOTE_RETRIES: u32 = 5;

/// Where modules are delivered from, per size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Modules up to this many bytes go inline (0 = never).
    pub inline_max: u64,
    /// Envoy fetches larger modules from the agent, over this cluster.
    pub remote: Option<RemoteVia>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVia {
    /// Envoy's bootstrap cluster that reaches this agent (its ADS cluster).
    pub cluster: String,
    /// Modules of at least this many bytes are fetched by Envoy.
    pub min_bytes: u64,
}

/// The kind of code source a module gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Inline,
    File,
    Remote,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Inline => "inline",
            Source::File => "file",
            Source::Remote => "remote",
        }
    }
}

/// Which source a module of `size` bytes gets. Inline wins over remote where both apply.
pub fn choose(d: &Delivery, size: u64) -> Source {
    if d.inline_max > 0 && size <= d.inline_max {
        return Source::Inline;
    }
    match &d.remote {
        Some(r) if size >= r.min_bytes => Source::Remote,
        _ => Source::File,
    }
}

/// The code source for `module`, and the kind it is; a remote one names the download
/// `token` when the module is still being downloaded. An inline read that fails, or whose
/// bytes do not hash to the module's sha256, falls back to the file (logged).
pub fn code_source(
    d: &Delivery,
    module: &Module,
    token: Option<&str>,
) -> (AsyncDataSource, Source) {
    let local = |s| AsyncDataSource {
        specifier: Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(s),
            ..Default::default()
        })),
    };
    let file = || {
        local(data_source::Specifier::Filename(
            module.path.to_string_lossy().into_owned(),
        ))
    };
    match (choose(d, module.size), &d.remote) {
        (Source::Inline, _) => match inline_bytes(module, d.inline_max) {
            Ok(bytes) => (
                local(data_source::Specifier::InlineBytes(bytes)),
                Source::Inline,
            ),
            Err(e) => {
                tracing::warn!(sha256 = %module.sha256, error = %e,
                    "cannot inline the module; Envoy reads its file");
                (file(), Source::File)
            }
        },
        (Source::Remote, Some(via)) => {
            let cluster = via.cluster.clone();
            let remote = RemoteDataSource {
                http_uri: Some(HttpUri {
                    uri: crate::wasm::serve::url_for(&module.sha256, token),
                    timeout: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: REMOTE_TIMEOUT.as_secs() as i64,
                        nanos: 0,
                    }),
                    http_upstream_type: Some(
                        envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                            cluster,
                        ),
                    ),
                }),
                sha256: module.sha256.clone(),
                retry_policy: Some(RetryPolicy {
                    num_retries: Some(envoy_types::pb::google::protobuf::UInt32Value {
                        value: REMOTE_RETRIES,
                    }),
                    retry_back_off: Some(BackoffStrategy {
                        base_interval: Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: 0,
                            nanos: 200_000_000,
                        }),
                        max_interval: Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: 2,
                            nanos: 0,
                        }),
                    }),
                    ..Default::default()
                }),
            };
            (
                AsyncDataSource {
                    specifier: Some(async_data_source::Specifier::Remote(remote)),
                },
                Source::Remote,
            )
        }
        // `choose` gives Remote only with a cluster.
        _ => (file(), Source::File),
    }
}

/// The module's bytes, read whole (at most `max`) and checked against its sha256.
fn inline_bytes(module: &Module, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(&module.path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::with_capacity(module.size.min(max) as usize);
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    let got = crate::wasm::verify::sha256_hex(&bytes);
    if got != module.sha256 {
        return Err(format!("the file hashes to {got}, not to its name"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_pick_sources() {
        let remote = |min| {
            Some(RemoteVia {
                cluster: "xds-grpc".into(),
                min_bytes: min,
            })
        };
        let cases = [
            // (inline_max, remote, size, source)
            (0, None, 0, Source::File),
            (0, None, 1, Source::File),
            (0, None, 50 << 20, Source::File),
            (65536, None, 65536, Source::Inline),
            (65536, None, 65537, Source::File),
            (0, remote(1 << 20), (1 << 20) - 1, Source::File),
            (0, remote(1 << 20), 1 << 20, Source::Remote),
            (65536, remote(0), 100, Source::Inline),
            (65536, remote(0), 65537, Source::Remote),
        ];
        for (inline_max, remote, size, want) in cases {
            let d = Delivery { inline_max, remote };
            assert_eq!(choose(&d, size), want, "{d:?} size {size}");
        }
    }
}
