//! Converting one ECDS resource: a `TypedExtensionConfig` holding a Wasm filter with remote
//! code becomes the same resource with its code pointing at the verified module in the cache
//! (`code.local.filename` by default; see [`super::delivery`]). On
//! failure the caller gets a stand-in and, where retrying can help, a [`HealJob`] that
//! [`Converter::heal`] runs until the module arrives.
//!
//! Knows resources, not streams: what to deliver and what to NACK is decided by `xds`.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{async_data_source, TypedExtensionConfig};
use envoy_types::pb::google::protobuf::Any;
use metrics::counter;
use prost::Message;

use super::delivery::{code_source, Delivery, Source};
use super::env::take_hints;
use super::standin;
use super::wasm_filter::{classify, WasmFilter};
use crate::backoff::Backoff;
use crate::metrics as m;
use crate::proto::type_url;
use crate::wasm::{Cache, FetchError, GetOptions, Got, Module, Pending};

/// Istio's default when `http_uri.timeout` is absent.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `http_uri.timeout` honoured; larger (or absurd) values are clamped to it.
pub const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(3600);
const HEAL_INITIAL: Duration = Duration::from_secs(1);

/// The `result` label of `istio_agent_wasm_config_conversion_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversionResult {
    Success,
    NoRemoteLoad,
    MarshalFailure,
    UnmarshalFailure,
    FetchFailure,
    MissRemoteFetchHint,
}

impl ConversionResult {
    pub fn label(self) -> &'static str {
        match self {
            ConversionResult::Success => "success",
            ConversionResult::NoRemoteLoad => "no_remote_load",
            ConversionResult::MarshalFailure => "marshal_failure",
            ConversionResult::UnmarshalFailure => "unmarshal_failure",
            ConversionResult::FetchFailure => "fetch_failure",
            ConversionResult::MissRemoteFetchHint => "miss_remote_fetch_hint",
        }
    }
}

/// Everything needed to fetch the module again and rebuild the resource.
#[derive(Clone)]
pub struct HealJob {
    pub name: String,
    pub url: String,
    filter: WasmFilter,
    opts: GetOptions,
    /// The last failure could only be fixed at the registry or in the policy.
    permanent: bool,
}

impl HealJob {
    /// What a fetch failure of this job means: the error, the NACK reason, and the retry
    /// (transient failures only).
    fn failed(&self, e: &FetchError) -> (String, &'static str, Option<Box<HealJob>>) {
        let heal = e.is_transient().then(|| {
            Box::new(HealJob {
                permanent: e.is_permanent(),
                ..self.clone()
            })
        });
        (e.to_string(), e.nack_reason(), heal)
    }
}

/// How failed modules are retried in the background.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Transient failures: 1 s doubling up to this.
    pub max_backoff: Duration,
    /// Permanent failures: checked again this often.
    pub permanent_recheck: Duration,
}

impl RetryPolicy {
    /// The backoff of a failure class: a permanent failure waits for the recheck interval, a
    /// transient one starts at 1 s and doubles to the cap; both ±20 % jitter.
    pub fn backoff(&self, permanent: bool) -> Backoff {
        if permanent {
            Backoff::fixed(self.permanent_recheck, HEAL_JITTER)
        } else {
            Backoff {
                initial: HEAL_INITIAL,
                factor: 2.0,
                max: self.max_backoff,
                jitter: HEAL_JITTER,
            }
        }
    }
}

/// Jitter of background retries.
const HEAL_JITTER: f64 = 0.2;

/// What became of one resource.
pub enum Outcome {
    /// Not Wasm, or Wasm with local code: deliver as received — except that a local-code
    /// filter carrying the `ISTIO_META_WASM_*` hints (istiod sends them for `file://` plugins
    /// too) is delivered as `stripped`, so a pull secret never reaches Envoy.
    Unchanged { name: String, stripped: Option<Any> },
    /// Remote code replaced by the verified module (see [`super::delivery`]).
    Converted {
        name: String,
        any: Any,
        module: Module,
        /// Set when `any` names a module still being downloaded, served to Envoy as it
        /// arrives and completed only once verified: the session learns how it ended from
        /// [`Converter::settle`].
        provisional: Option<Box<Provisional>>,
    },
    /// The module could not be had. `standin` (absent in nack-only mode) goes to Envoy;
    /// `heal`, when present, can fetch it later.
    FetchFailed {
        name: String,
        standin: Option<Any>,
        error: String,
        result: ConversionResult,
        /// The NACK's reason label (`fetch_failure`, `signature`, …).
        reason: &'static str,
        heal: Option<Box<HealJob>>,
    },
    /// Malformed: nothing is delivered for it and the control plane is told.
    Rejected { name: Option<String>, error: String },
}

/// A resource delivered while its module downloads: what settling it needs.
pub struct Provisional {
    /// The download Envoy was pointed at (its token is in the URL).
    growing: std::sync::Arc<crate::wasm::growing::Growing>,
    done: Pending,
    job: HealJob,
    standin: Option<Any>,
}

/// How a provisional delivery ended.
pub enum Settled {
    /// The module arrived verified: Envoy's fetch completes; the resource now uses it.
    Verified { module: Module },
    /// The download gave a verified module, but not the one announced (a boxed body): this
    /// resource is to be delivered again, naming it.
    Replaced { any: Any, module: Module },
    /// No module: Envoy's fetch was reset; the stand-in (if any) goes to Envoy, the control
    /// plane gets the NACK, `heal` (if any) retries.
    Failed {
        standin: Option<Any>,
        error: String,
        reason: &'static str,
        heal: Option<Box<HealJob>>,
    },
}

/// What Envoy gets for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// The resource as the control plane sent it.
    AsReceived,
    /// The resource rewritten by the agent (a local file, or hints stripped).
    Rewritten,
    /// The RBAC stand-in of the same name.
    StandIn,
    /// Nothing.
    Nothing,
}

/// What happens to the module pin of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// It uses this module now.
    Module(String),
    /// It uses no module now (its old one starts its expiry).
    Release,
    /// Unchanged (a malformed resource says nothing about what Envoy runs).
    Keep,
}

/// The session's response to one outcome: the pure table behind `session` (tested below).
/// Acknowledging a healed resource upstream is the nonce book's (`xds::book`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub deliver: Deliver,
    /// The control plane gets a NACK naming it.
    pub nack: bool,
    /// A background retry starts.
    pub heal: bool,
    pub pin: Pin,
    /// Its remembered failures are forgotten (it asks for nothing that failed).
    pub settles: bool,
}

impl Outcome {
    /// What the session does with this outcome.
    pub fn plan(&self) -> Plan {
        match self {
            Outcome::Unchanged { stripped, .. } => Plan {
                deliver: if stripped.is_some() {
                    Deliver::Rewritten
                } else {
                    Deliver::AsReceived
                },
                nack: false,
                heal: false,
                pin: Pin::Release,
                settles: true,
            },
            // A claimed sha256 pins nothing until the download is verified (a pin makes
            // the module servable); the resource's failures stay until then too.
            Outcome::Converted {
                provisional: Some(_),
                ..
            } => Plan {
                deliver: Deliver::Rewritten,
                nack: false,
                heal: false,
                pin: Pin::Keep,
                settles: false,
            },
            Outcome::Converted { module, .. } => Plan {
                deliver: Deliver::Rewritten,
                nack: false,
                heal: false,
                pin: Pin::Module(module.sha256.clone()),
                settles: true,
            },
            // A stand-in replaces the module Envoy ran (its pin goes); with nothing delivered
            // (nack-only), Envoy keeps running the old one, so its pin stays.
            Outcome::FetchFailed { standin, heal, .. } => Plan {
                deliver: if standin.is_some() {
                    Deliver::StandIn
                } else {
                    Deliver::Nothing
                },
                nack: true,
                heal: heal.is_some(),
                pin: if standin.is_some() {
                    Pin::Release
                } else {
                    Pin::Keep
                },
                settles: false,
            },
            Outcome::Rejected { .. } => Plan {
                deliver: Deliver::Nothing,
                nack: true,
                heal: false,
                pin: Pin::Keep,
                settles: false,
            },
        }
    }

    pub fn result(&self) -> ConversionResult {
        match self {
            Outcome::Unchanged { .. } => ConversionResult::NoRemoteLoad,
            Outcome::Converted { .. } => ConversionResult::Success,
            Outcome::FetchFailed { result, .. } => *result,
            Outcome::Rejected { .. } => ConversionResult::UnmarshalFailure,
        }
    }
}

/// What Envoy gets for a module that cannot be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// An allow-all / deny-all RBAC filter of the same name, per the plugin's failure policy.
    StandIn,
    /// Nothing for that resource (Istio 1.24); the NACK says why.
    NackOnly,
}

pub struct Converter {
    cache: Arc<Cache>,
    mode: FailureMode,
    retry: RetryPolicy,
    /// How a resource's first load goes to an Envoy that is starting.
    delivery: Delivery,
    /// How every other delivery goes: never `remote` (see [`Load`]).
    update: Delivery,
}

/// Whether Envoy is waiting for this resource to start (its listener warming) or takes it as
/// an update. Envoy 1.40 fetches `remote` code only while the listener that needs it warms:
/// an ECDS update to a module not in its code cache is accepted and then runs *no* module
/// (measured: the old VM is destroyed, no fetch starts; fail-closed filters let everything
/// through). So `remote` is only ever chosen for a first load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// The first ECDS response on a stream from an Envoy that held no ECDS resource.
    First,
    /// Anything else.
    Update,
}

fn wrap(name: &str, typed_config: Any) -> Any {
    Any {
        type_url: type_url::ECDS.into(),
        value: TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(typed_config),
        }
        .encode_to_vec(),
    }
}

/// The filter with its code pointed at `module`, delivered as `delivery` says for its size.
fn rewrite(
    filter: &WasmFilter,
    name: &str,
    module: &Module,
    delivery: &Delivery,
    token: Option<&str>,
) -> Any {
    let mut filter = filter.clone();
    if let Some(vm) = filter.vm_config_mut() {
        let (code, source) = code_source(delivery, module, token);
        counter!(m::DELIVERIES, "source" => source.label()).increment(1);
        vm.code = Some(code);
    }
    wrap(name, filter.encode())
}

/// The fetch deadline a resource asks for: Istio's default when absent or zero, negative parts
/// read as zero, and never more than [`MAX_FETCH_TIMEOUT`] (a control plane can send any i64).
fn fetch_timeout(d: Option<envoy_types::pb::google::protobuf::Duration>) -> Duration {
    let Some(d) = d else {
        return DEFAULT_FETCH_TIMEOUT;
    };
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u64::try_from(d.nanos).unwrap_or(0);
    if secs >= MAX_FETCH_TIMEOUT.as_secs() {
        return MAX_FETCH_TIMEOUT;
    }
    let t = Duration::from_secs(secs) + Duration::from_nanos(nanos);
    if t.is_zero() {
        DEFAULT_FETCH_TIMEOUT
    } else {
        t.min(MAX_FETCH_TIMEOUT)
    }
}

impl Converter {
    pub fn new(
        cache: Arc<Cache>,
        mode: FailureMode,
        retry: RetryPolicy,
        delivery: Delivery,
    ) -> Self {
        let update = Delivery {
            remote: None,
            ..delivery.clone()
        };
        Self {
            cache,
            mode,
            delivery,
            update,
            retry: RetryPolicy {
                max_backoff: retry.max_backoff.max(HEAL_INITIAL),
                permanent_recheck: retry.permanent_recheck,
            },
        }
    }

    fn delivery(&self, load: Load) -> &Delivery {
        match load {
            Load::First => &self.delivery,
            Load::Update => &self.update,
        }
    }

    /// The code source `module` is delivered with (see [`super::delivery::choose`]).
    pub fn source_for(&self, module: &Module, load: Load) -> super::delivery::Source {
        super::delivery::choose(self.delivery(load), module.size)
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Converts one resource (an `Any` from an ECDS response) and counts the result.
    pub async fn convert(&self, resource: &Any, load: Load) -> Outcome {
        let outcome = self.convert_inner(resource, load).await;
        // A provisional delivery is counted when it settles.
        if !matches!(
            &outcome,
            Outcome::Converted {
                provisional: Some(_),
                ..
            }
        ) {
            counter!(m::CONVERSION_COUNT, "result" => outcome.result().label()).increment(1);
        }
        outcome
    }

    async fn convert_inner(&self, resource: &Any, load: Load) -> Outcome {
        let reject = |name: Option<String>, error: String| Outcome::Rejected { name, error };
        if resource.type_url != type_url::ECDS {
            return reject(
                None,
                format!(
                    "resource of type {:?} is not a TypedExtensionConfig",
                    resource.type_url
                ),
            );
        }
        let tec = match TypedExtensionConfig::decode(resource.value.as_slice()) {
            Ok(t) => t,
            Err(e) => return reject(None, format!("cannot decode TypedExtensionConfig: {e}")),
        };
        let name = tec.name;
        let Some(typed_config) = tec.typed_config else {
            return reject(Some(name), "does not contain any typed config".into());
        };
        let mut filter = match classify(&typed_config) {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Outcome::Unchanged {
                    name,
                    stripped: None,
                }
            }
            Err(e) => return reject(Some(name), e),
        };
        let fail_open = filter.fail_open();
        let kind = filter.kind;
        let Some(vm) = filter.vm_config_mut() else {
            return reject(Some(name), "Wasm filter has no vm_config".into());
        };
        let remote = match vm.code.as_ref().and_then(|c| c.specifier.as_ref()) {
            Some(async_data_source::Specifier::Remote(r)) => r.clone(),
            Some(async_data_source::Specifier::Local(_)) => {
                let before = vm.environment_variables.clone();
                take_hints(vm);
                let changed = vm.environment_variables != before;
                let stripped = changed.then(|| wrap(&name, filter.encode()));
                return Outcome::Unchanged { name, stripped };
            }
            None => {
                return reject(
                    Some(name),
                    "Wasm filter has no remote and no local code".into(),
                )
            }
        };
        let hints = take_hints(vm);
        let fail = |error: String, result: ConversionResult, reason, heal| Outcome::FetchFailed {
            standin: (self.mode == FailureMode::StandIn)
                .then(|| standin::resource(&name, kind, fail_open)),
            name: name.clone(),
            error,
            result,
            reason,
            heal,
        };
        let Some(http_uri) = remote.http_uri else {
            return fail(
                "remote code has no http_uri".into(),
                ConversionResult::MissRemoteFetchHint,
                ConversionResult::MissRemoteFetchHint.label(),
                None,
            );
        };
        let url = http_uri.uri;
        if hints.pull_secret.as_deref() == Some("") {
            return fail(
                format!("{}: missing image pulling secret (the Secret named by imagePullSecret is missing or not of type kubernetes.io/dockerconfigjson)", crate::wasm::error::redact(&url)),
                ConversionResult::FetchFailure,
                ConversionResult::FetchFailure.label(),
                None,
            );
        }
        let timeout = fetch_timeout(http_uri.timeout);
        let opts = GetOptions {
            sha256: Some(remote.sha256).filter(|s| !s.is_empty()),
            resource_name: name.clone(),
            resource_version: hints.resource_version,
            pull_policy: hints.pull_policy,
            pull_secret: hints.pull_secret.map(String::into_bytes),
            timeout,
        };
        let job = HealJob {
            name: name.clone(),
            url: url.clone(),
            filter: filter.clone(),
            opts: opts.clone(),
            permanent: false,
        };
        let failed = |e: FetchError| {
            let (error, reason, heal) = job.failed(&e);
            fail(error, ConversionResult::FetchFailure, reason, heal)
        };
        // Where Envoy would fetch the module from the agent anyway, it may start before the
        // agent's own download ends.
        let delivery = self.delivery(load);
        let got = if delivery.remote.is_some() {
            self.cache.get_streaming(&url, opts.clone()).await
        } else {
            self.cache.get(&url, opts.clone()).await.map(Got::Ready)
        };
        let (module, provisional) = match got {
            Ok(Got::Ready(module)) => (module, None),
            Ok(Got::Growing {
                module,
                growing,
                done,
            }) if self.source_for(&module, load) == Source::Remote => {
                let provisional = Provisional {
                    growing,
                    done,
                    job: job.clone(),
                    standin: (self.mode == FailureMode::StandIn)
                        .then(|| standin::resource(&name, kind, fail_open)),
                };
                (module, Some(Box::new(provisional)))
            }
            Ok(Got::Growing { done, .. }) => match done.await {
                Ok(module) => (module, None),
                Err(e) => return failed(e),
            },
            Err(e) => return failed(e),
        };
        let token = provisional.as_ref().map(|p| p.growing.token.as_str());
        Outcome::Converted {
            any: rewrite(&filter, &name, &module, delivery, token),
            name,
            module,
            provisional,
        }
    }

    /// Waits for the download behind a provisional delivery and says how it ended.
    pub async fn settle(&self, p: Provisional) -> Settled {
        match p.done.await {
            // The very download Envoy was pointed at ended verified: its fetch completes.
            Ok(module) if p.growing.is_verified() && module.sha256 == p.growing.sha256 => {
                counter!(m::CONVERSION_COUNT, "result" => ConversionResult::Success.label())
                    .increment(1);
                Settled::Verified { module }
            }
            // A module, but not through the bytes Envoy was streamed (a boxed body, a retried
            // attempt): delivered again as a file.
            Ok(module) => {
                counter!(m::CONVERSION_COUNT, "result" => ConversionResult::Success.label())
                    .increment(1);
                Settled::Replaced {
                    any: rewrite(&p.job.filter, &p.job.name, &module, &self.update, None),
                    module,
                }
            }
            Err(e) => {
                counter!(m::CONVERSION_COUNT, "result" => ConversionResult::FetchFailure.label())
                    .increment(1);
                let (error, reason, heal) = p.job.failed(&e);
                Settled::Failed {
                    standin: p.standin,
                    error,
                    reason,
                    heal,
                }
            }
        }
    }

    /// Fetches the module of `job` until it arrives, then returns the converted resource:
    /// transient failures back off (1 s doubling to the cap), permanent ones are checked again
    /// at the recheck interval, both with ±20 % jitter ([`next_pause`]). Cancel by dropping
    /// the future (a newer push, a removal, Envoy unsubscribing, the stream ending).
    pub async fn heal(&self, job: &HealJob) -> (Any, Module) {
        let mut permanent = job.permanent;
        // Retries of the current failure class (a change of class starts its backoff over).
        let mut n = 0u32;
        loop {
            n += 1;
            let pause = self.retry.backoff(permanent).pause(n);
            self.cache
                .note_retry(&job.url, job.opts.sha256.as_deref(), pause);
            tokio::time::sleep(pause).await;
            counter!(m::HEAL_ATTEMPTS).increment(1);
            match self.cache.get(&job.url, job.opts.clone()).await {
                Ok(module) => {
                    counter!(m::CONVERSION_COUNT, "result" => ConversionResult::Success.label())
                        .increment(1);
                    return (
                        rewrite(&job.filter, &job.name, &module, &self.update, None),
                        module,
                    );
                }
                Err(e) => {
                    if e.is_permanent() != permanent {
                        permanent = e.is_permanent();
                        n = 0;
                    }
                    tracing::info!(resource = %job.name, error = %e, permanent,
                        "background retry failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Duration as PbDuration;

    /// The outcome → (deliver, NACK, heal, pin) table.
    #[test]
    fn outcome_table() {
        let any = Any::default;
        let module = || Module {
            path: "m".into(),
            sha256: "s".into(),
            oci_digest: None,
            size: 1,
            matched: None,
            fetched: false,
            served_by: None,
        };
        let job = || {
            Box::new(HealJob {
                name: "n".into(),
                url: "u".into(),
                filter: WasmFilter {
                    kind: crate::ecds::wasm_filter::FilterKind::Http,
                    config: Default::default(),
                },
                opts: GetOptions::default(),
                permanent: false,
            })
        };
        let failed = |standin: Option<Any>, heal: Option<Box<HealJob>>| Outcome::FetchFailed {
            name: "n".into(),
            standin,
            error: "e".into(),
            result: ConversionResult::FetchFailure,
            reason: "fetch_failure",
            heal,
        };
        use Deliver::*;
        for (o, deliver, nack, heal, pin, settles) in [
            (
                Outcome::Unchanged {
                    name: "n".into(),
                    stripped: None,
                },
                AsReceived,
                false,
                false,
                Pin::Release,
                true,
            ),
            (
                Outcome::Unchanged {
                    name: "n".into(),
                    stripped: Some(any()),
                },
                Rewritten,
                false,
                false,
                Pin::Release,
                true,
            ),
            (
                Outcome::Converted {
                    name: "n".into(),
                    any: any(),
                    module: module(),
                    provisional: None,
                },
                Rewritten,
                false,
                false,
                Pin::Module("s".into()),
                true,
            ),
            (
                failed(Some(any()), Some(job())),
                StandIn,
                true,
                true,
                Pin::Release,
                false,
            ),
            (
                failed(None, Some(job())),
                Nothing,
                true,
                true,
                Pin::Keep,
                false,
            ),
            (
                failed(Some(any()), None),
                StandIn,
                true,
                false,
                Pin::Release,
                false,
            ),
            (
                Outcome::Rejected {
                    name: None,
                    error: "e".into(),
                },
                Nothing,
                true,
                false,
                Pin::Keep,
                false,
            ),
        ] {
            assert_eq!(
                o.plan(),
                Plan {
                    deliver,
                    nack,
                    heal,
                    pin,
                    settles
                },
                "{:?}",
                o.result()
            );
        }
    }

    #[test]
    fn retry_pauses() {
        let p = RetryPolicy {
            max_backoff: Duration::from_secs(60),
            permanent_recheck: Duration::from_secs(300),
        };
        let s = Duration::from_secs;
        assert_eq!(p.backoff(false).pause_with(1, 0.0), s(1));
        assert_eq!(p.backoff(false).pause_with(2, 0.0), s(2));
        assert_eq!(p.backoff(false).pause_with(9, 0.0), s(60), "capped");
        assert_eq!(
            p.backoff(true).pause_with(1, 0.0),
            s(300),
            "the recheck interval"
        );
        assert_eq!(p.backoff(true).pause_with(9, -1.0), s(240), "-20 %");
    }

    #[test]
    fn fetch_timeouts_are_clamped() {
        let d = |seconds, nanos| Some(PbDuration { seconds, nanos });
        assert_eq!(fetch_timeout(None), DEFAULT_FETCH_TIMEOUT);
        assert_eq!(fetch_timeout(d(0, 0)), DEFAULT_FETCH_TIMEOUT);
        assert_eq!(fetch_timeout(d(30, 0)), Duration::from_secs(30));
        assert_eq!(fetch_timeout(d(i64::MAX, i32::MAX)), MAX_FETCH_TIMEOUT);
        assert_eq!(fetch_timeout(d(3599, i32::MAX)), MAX_FETCH_TIMEOUT);
        assert_eq!(fetch_timeout(d(-5, -1)), DEFAULT_FETCH_TIMEOUT);
        assert_eq!(fetch_timeout(d(0, 5_000_000)), Duration::from_millis(5));
    }
}
