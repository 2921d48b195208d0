//! Wasm modules: fetchers (HTTP(S), OCI), verification and the on-disk cache.
//!
//! Independent of xDS: this module knows URLs, checksums, pull policies and files, and nothing
//! about Envoy or ECDS. The single entry point is [`Cache::get`] (or [`Cache::get_streaming`],
//! which may answer before the download ends).
//!
//! * `url`    — parsing module URLs
//! * `http`   — HTTP(S) fetcher (retries, backoff, size cap, redirects by hand)
//! * `guard`  — what a fetch may reach: blocked addresses (SSRF), redirect rules
//! * `mirrors` — registry mirrors and rewrites (registries.conf subset)
//! * `oci`    — OCI fetcher (manifest/index resolution, three image layouts)
//! * `secret` — docker config JSON pull secrets
//! * `credhelper` — docker credential helpers (`credHelpers`, `credsStore`)
//! * `signature` — cosign signature policy and checks
//! * `keyless` — sigstore bundles: keyless (Fulcio, Rekor) and managed keys
//! * `admission` — whether a module may be handed to this request (policy, credentials), pure
//! * `proofs` — which credentials showed recently that they may pull a repository
//! * `import` — air-gap import from OCI image layouts and `oci-archive` tars
//! * `tls`    — extra CA roots and the insecure registry list
//! * `unbox`  — gzip / tar unwrapping with caps
//! * `verify` — sha256 and Wasm validation
//! * `store`  — atomic files and the persistent index
//! * `options` — the types at the cache's boundary (options, results, config)
//! * `cache`  — the façade: `get`, its order of work, the state and the cache's invariants
//! * `index`  — the index and its rules as pure functions (lookup, pull policy, merge)
//! * `flight` — one download per module, in-process and across processes
//! * `growing` — a module being downloaded, readable as it grows (served before it ends)
//! * `fetch`  — the fetchers' common path: URL in, verified temp file out (no cache state)
//! * `serve`  — modules in use served to Envoy over its ADS cluster (`remote` delivery)
//! * `error`  — why a module could not be had (redacted URL and exact cause)
//! * `view`   — the admin snapshot
//! * `pins`   — which module each live ECDS resource uses, with use counts
//! * `retention` — what pins mean for the disk: expiry purge, LRU byte budget, the lease
//! * `lease`  — pins published to other processes sharing the directory

pub mod admission;
pub mod cache;
pub mod credhelper;
pub mod error;
mod fetch;
mod flight;
pub mod growing;
pub mod guard;
pub mod http;
pub mod import;
pub mod index;
pub mod keyless;
pub mod lease;
pub mod mirrors;
pub mod oci;
pub mod options;
mod pins;
mod proofs;
mod retention;
pub mod secret;
pub mod serve;
pub mod signature;
pub mod store;
pub mod tls;
pub mod unbox;
pub mod url;
pub mod verify;
mod view;

pub use cache::Cache;
pub use error::FetchError;
pub use options::{CacheConfig, GetOptions, Got, Matched, Module, Pending, PullPolicy};
pub use view::{CacheView, FailureInfo, ModuleView};
