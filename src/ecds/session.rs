//! The ECDS side of one stream: the `xds` interception of the ECDS type URL (see
//! [`crate::xds::Interceptor`], implemented by [`super::EcdsInterceptor`]). ECDS responses arrive here in the order the control plane
//! sent them and leave in that order (one at a time), while other types never wait for them.
//!
//! For each response: every resource is converted concurrently; good ones are delivered
//! converted, failed fetches as stand-ins, malformed ones not at all; if anything failed the
//! control plane gets exactly one NACK for that nonce (and Envoy's own reply is swallowed).
//! Failed fetches keep retrying in the background; when a module arrives the converted
//! resource is delivered to Envoy under an agent nonce, without waiting for a new push. A
//! newer push of the same resource (or its removal) cancels the retry.
//!
//! A newer push supersedes older ones: queued responses whose resources a later response
//! covers are dropped, and a conversion in progress (say, a dead URL waiting for its timeout)
//! is abandoned as soon as such a response arrives. TTL heartbeats (envelopes without a body)
//! go to Envoy untouched; TTL'd resources with a body convert and keep their envelope.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use futures::StreamExt;
use metrics::{counter, histogram};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::convert::Pin;
use super::{ConversionResult, Converter, HealJob, Load, Outcome, Provisional, Settled};
use crate::metrics as m;
use crate::proto::type_url;
use crate::wasm::Module;
use crate::xds::book::{Book, Delivered, AGENT_NONCE_PREFIX};
use crate::xds::flavor::{Carried, Flavor};
use crate::xds::relay::Down;
use crate::xds::{DownTx, Intercepted, StreamHandles};

/// Envoy went away; the session ends.
struct Gone;

/// Resources of one response converted at once (the rest wait; order is kept).
const CONVERT_CONCURRENCY: usize = 32;
/// Longest text of one failure in a NACK; the whole `error_detail` stays under 4 KiB.
const NACK_PART_MAX: usize = 512;
const NACK_MAX: usize = 3800;

struct Heal {
    generation: u64,
    task: AbortHandle,
    envelope: Option<Resource>,
}

struct Healed {
    name: String,
    generation: u64,
    any: Any,
    module: Module,
}

/// What a background task of the session reports.
enum Background {
    /// A retry got the module.
    Healed(Healed),
    /// The download behind a provisional delivery (under the upstream `nonce`) ended.
    Settled {
        name: String,
        generation: u64,
        nonce: String,
        settled: Settled,
    },
}

struct Failure {
    name: String,
    error: String,
    /// The NACK reason label.
    reason: &'static str,
}

pub(crate) struct EcdsSession<F: Flavor> {
    id: u64,
    conv: Arc<Converter>,
    book: Arc<Mutex<Book>>,
    down_tx: DownTx<F>,
    up_tx: mpsc::UnboundedSender<F::Req>,
    heals: HashMap<String, Heal>,
    healed_tx: mpsc::UnboundedSender<Background>,
    generation: u64,
    /// Version of the last ECDS response from upstream (used on agent deliveries).
    version: String,
    seq: u64,
    /// Envoy got an ECDS response on this stream: what follows is an update ([`Load`]).
    delivered: bool,
}

impl<F: Flavor> Drop for EcdsSession<F> {
    fn drop(&mut self) {
        for (_, h) in self.heals.drain() {
            h.task.abort();
        }
        self.conv.cache().release_owner(self.id);
    }
}

impl<F: Flavor> EcdsSession<F> {
    /// Starts the session on the stream `h`; returns where ECDS responses, and the names of
    /// resources Envoy unsubscribed from, are to be sent.
    pub fn spawn(conv: Arc<Converter>, h: StreamHandles<F>) -> Intercepted<F> {
        let StreamHandles {
            id,
            book,
            down_tx,
            up_tx,
        } = h;
        let (tx, rx) = mpsc::unbounded_channel();
        let (unsub_tx, unsub_rx) = mpsc::unbounded_channel();
        let (healed_tx, healed_rx) = mpsc::unbounded_channel();
        let session = EcdsSession::<F> {
            id,
            conv,
            book,
            down_tx,
            up_tx,
            heals: HashMap::new(),
            healed_tx,
            generation: 0,
            version: String::new(),
            seq: 0,
            delivered: false,
        };
        let task: JoinHandle<()> =
            tokio::spawn(session.run(rx, healed_rx, unsub_rx).in_current_span());
        Intercepted {
            responses: tx,
            unsubscribed: unsub_tx,
            task,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<F::Resp>,
        mut healed: mpsc::UnboundedReceiver<Background>,
        mut unsubscribed: mpsc::UnboundedReceiver<Vec<String>>,
    ) {
        let mut queue: VecDeque<F::Resp> = VecDeque::new();
        loop {
            if queue.is_empty() {
                let step = tokio::select! {
                    biased;
                    r = rx.recv() => match r {
                        Some(resp) => {
                            queue.push_back(resp);
                            Ok(())
                        }
                        None => return,
                    },
                    Some(b) = healed.recv() => match b {
                        Background::Healed(h) => self.on_healed(h).await,
                        Background::Settled { name, generation, nonce, settled } => {
                            self.on_settled(name, generation, nonce, settled).await
                        }
                    },
                    Some(names) = unsubscribed.recv() => {
                        self.on_unsubscribed(&names);
                        Ok(())
                    }
                };
                if step.is_err() {
                    return;
                }
            }
            while let Ok(resp) = rx.try_recv() {
                queue.push_back(resp);
            }
            while let Ok(names) = unsubscribed.try_recv() {
                self.on_unsubscribed(&names);
            }
            coalesce::<F>(&mut queue);
            let Some(resp) = queue.pop_front() else {
                continue;
            };
            if self.on_response(resp, &mut rx, &mut queue).await.is_err() {
                return;
            }
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn supersede(&mut self, name: &str) {
        if let Some(h) = self.heals.remove(name) {
            h.task.abort();
        }
    }

    /// Envoy no longer subscribes to `names` (a WasmPlugin deleted, a listener gone): their
    /// retries stop, their pins go (the module starts its expiry), their failures are
    /// forgotten — whatever the control plane sends (istiod sends no ECDS removal).
    fn on_unsubscribed(&mut self, names: &[String]) {
        for name in names {
            if self.heals.contains_key(name) {
                info!(resource = %name, "Envoy unsubscribed; background retry stopped");
            }
            self.supersede(name);
            self.conv.cache().pin(self.id, name, None);
            self.conv.cache().forget_resource(name);
        }
    }

    /// Converts and delivers one response. Newer responses arriving meanwhile join `queue`;
    /// one that covers this response's resources abandons it.
    async fn on_response(
        &mut self,
        mut resp: F::Resp,
        rx: &mut mpsc::UnboundedReceiver<F::Resp>,
        queue: &mut VecDeque<F::Resp>,
    ) -> Result<(), Gone> {
        let started = Instant::now();
        let nonce = F::resp_nonce(&resp).to_owned();
        let names = F::resp_names(&resp);
        let mut items = F::take_resources(&mut resp);
        let total = items.len();
        let bodies: Vec<Option<Any>> = items.iter_mut().map(|c| c.any.take()).collect();
        let conv = self.conv.clone();
        let load = if !self.delivered && self.book().envoy_fresh() {
            Load::First
        } else {
            Load::Update
        };
        let outcomes = {
            let conversion = futures::stream::iter(bodies.into_iter().map(move |body| {
                let conv = conv.clone();
                async move {
                    let outcome = match &body {
                        Some(any) => Some(conv.convert(any, load).await),
                        None => None, // a TTL heartbeat
                    };
                    (body, outcome)
                }
            }))
            .buffered(CONVERT_CONCURRENCY)
            .collect::<Vec<_>>();
            tokio::pin!(conversion);
            loop {
                tokio::select! {
                    o = &mut conversion => break o,
                    r = rx.recv() => {
                        let Some(newer) = r else { return Err(Gone) };
                        let covers = covers(&F::resp_names(&newer), &names);
                        queue.push_back(newer);
                        if covers {
                            info!(%nonce, "ECDS response superseded by a newer push while converting; abandoned");
                            counter!(m::ECDS_SUPERSEDED).increment(1);
                            return Ok(());
                        }
                    }
                }
            }
        };
        histogram!(m::CONVERSION_DURATION).record(started.elapsed().as_secs_f64() * 1000.0);
        self.version = F::resp_version(&resp).to_owned();
        for name in F::removed(&resp).to_vec() {
            self.supersede(&name);
            self.conv.cache().pin(self.id, &name, None);
            self.conv.cache().forget_resource(&name);
        }

        let mut deliver = Vec::with_capacity(total);
        let mut failures = Vec::new();
        let mut delivered = Delivered::default();
        for (i, (mut item, (body, outcome))) in items.into_iter().zip(outcomes).enumerate() {
            item.any = body;
            let envelope_name = item.envelope.as_ref().map(|r| r.name.clone());
            let Some(outcome) = outcome else {
                deliver.push(item);
                continue;
            };
            let plan = outcome.plan();
            let name = match &outcome {
                Outcome::Unchanged { name, .. }
                | Outcome::Converted { name, .. }
                | Outcome::FetchFailed { name, .. } => name.clone(),
                Outcome::Rejected { name, .. } => name
                    .clone()
                    .or(envelope_name)
                    .unwrap_or_else(|| format!("#{i}")),
            };
            // A newer outcome for the resource ends its retry; its pin and remembered failures
            // follow the plan.
            self.supersede(&name);
            match &plan.pin {
                Pin::Module(sha) => self.conv.cache().pin(self.id, &name, Some(sha)),
                Pin::Release => self.conv.cache().pin(self.id, &name, None),
                Pin::Keep => {}
            }
            if plan.settles {
                self.conv.cache().forget_resource(&name);
            }
            match outcome {
                Outcome::Unchanged { stripped, .. } => match stripped {
                    Some(any) => deliver.push(Carried {
                        any: Some(any),
                        envelope: item.envelope,
                    }),
                    None => deliver.push(item),
                },
                Outcome::Converted {
                    any,
                    module,
                    provisional,
                    ..
                } => {
                    info!(resource = %name, path = %module.path.display(), sha256 = %module.sha256,
                          fetched = module.fetched, source = self.conv.source_for(&module, load).label(),
                          streamed = provisional.is_some(), "Wasm module delivered");
                    delivered.converted = true;
                    if let Some(p) = provisional {
                        self.start_settle(&name, *p, &nonce, item.envelope.clone());
                    }
                    deliver.push(Carried {
                        any: Some(any),
                        envelope: item.envelope,
                    });
                }
                Outcome::FetchFailed {
                    standin,
                    error,
                    reason,
                    heal,
                    ..
                } => {
                    warn!(resource = %name, %error, stand_in = standin.is_some(), retrying = heal.is_some(),
                          "Wasm module unavailable");
                    if let Some(any) = standin {
                        delivered.stand_in = true;
                        deliver.push(Carried {
                            any: Some(any),
                            envelope: item.envelope.clone(),
                        });
                    }
                    if let Some(job) = heal {
                        self.start_heal(*job, item.envelope);
                    }
                    failures.push(Failure {
                        name,
                        error,
                        reason,
                    });
                }
                Outcome::Rejected { error, .. } => {
                    warn!(resource = %name, %error, "malformed ECDS resource rejected");
                    failures.push(Failure {
                        name,
                        error,
                        reason: ConversionResult::UnmarshalFailure.label(),
                    });
                }
            }
        }

        let delivering =
            !deliver.is_empty() || !F::removed(&resp).is_empty() || failures.is_empty();
        if !failures.is_empty() {
            let message = nack_message(&failures, total);
            let reason = nack_reason(&failures);
            // Answered here: Envoy's own reply to this nonce stays with the agent (when Envoy
            // gets nothing, it sends none).
            let failed: Vec<String> = failures.iter().map(|f| f.name.clone()).collect();
            let nack = self
                .book()
                .agent_nack::<F>(&nonce, message.clone(), &failed);
            warn!(%nonce, %reason, %message, "NACK sent to the control plane");
            counter!(m::NACKS_SENT, "reason" => reason).increment(1);
            counter!(m::XDS_PROXY_REQUESTS).increment(1);
            if self.up_tx.send(nack).is_err() {
                return Err(Gone);
            }
        }
        if delivering {
            self.delivered = true;
            self.book().agent_delivered(&nonce, delivered);
            F::set_resources(&mut resp, deliver);
            self.down_tx
                .send(Down::Message(resp))
                .await
                .map_err(|_| Gone)?;
        }
        Ok(())
    }

    fn start_heal(&mut self, job: HealJob, envelope: Option<Resource>) {
        self.generation += 1;
        let generation = self.generation;
        let conv = self.conv.clone();
        let tx = self.healed_tx.clone();
        let name = job.name.clone();
        let task = tokio::spawn(
            async move {
                let (any, module) = conv.heal(&job).await;
                let _ = tx.send(Background::Healed(Healed {
                    name: job.name.clone(),
                    generation,
                    any,
                    module,
                }));
            }
            .in_current_span(),
        );
        self.heals.insert(
            name,
            Heal {
                generation,
                task: task.abort_handle(),
                envelope,
            },
        );
    }

    /// Watches the download behind a provisional delivery of `name` (made under the upstream
    /// `nonce`); a newer outcome for the resource cancels it, as it does a retry.
    fn start_settle(
        &mut self,
        name: &str,
        p: Provisional,
        nonce: &str,
        envelope: Option<Resource>,
    ) {
        self.generation += 1;
        let generation = self.generation;
        let conv = self.conv.clone();
        let tx = self.healed_tx.clone();
        let (name_owned, nonce) = (name.to_owned(), nonce.to_owned());
        let task = tokio::spawn(
            async move {
                let settled = conv.settle(p).await;
                let _ = tx.send(Background::Settled {
                    name: name_owned,
                    generation,
                    nonce,
                    settled,
                });
            }
            .in_current_span(),
        );
        self.heals.insert(
            name.to_owned(),
            Heal {
                generation,
                task: task.abort_handle(),
                envelope,
            },
        );
    }

    /// A provisional delivery ended: verified (nothing to do), another module (delivered
    /// again), or no module — then Envoy gets the stand-in under an agent nonce, the control
    /// plane a NACK of the nonce it came under (if still its latest), and a retry starts, as
    /// for a failure found before delivery.
    async fn on_settled(
        &mut self,
        name: String,
        generation: u64,
        nonce: String,
        settled: Settled,
    ) -> Result<(), Gone> {
        if self.heals.get(&name).map(|x| x.generation) != Some(generation) {
            return Ok(()); // superseded meanwhile
        }
        let (standin, error, reason, heal) = match settled {
            Settled::Verified { module } => {
                self.heals.remove(&name);
                // Verified: now it is the resource's module (pinned, servable as a file).
                self.conv.cache().pin(self.id, &name, Some(&module.sha256));
                self.conv.cache().forget_resource(&name);
                info!(resource = %name, "streamed module verified; Envoy's fetch completes");
                return Ok(());
            }
            Settled::Replaced { any, module } => {
                return self
                    .on_healed(Healed {
                        name,
                        generation,
                        any,
                        module,
                    })
                    .await;
            }
            Settled::Failed {
                standin,
                error,
                reason,
                heal,
            } => (standin, error, reason, heal),
        };
        let envelope = self.heals.remove(&name).and_then(|h| h.envelope);
        warn!(resource = %name, %error, stand_in = standin.is_some(), retrying = heal.is_some(),
              "streamed Wasm module failed after delivery; Envoy's fetch was reset");
        counter!(m::LATE_FAILURES).increment(1);
        if let Some(any) = standin {
            self.conv.cache().pin(self.id, &name, None);
            self.seq += 1;
            let agent_nonce = format!("{AGENT_NONCE_PREFIX}{}/{}", self.id, self.seq);
            let resp = F::originate(
                type_url::ECDS,
                &self.version,
                agent_nonce.clone(),
                Carried {
                    any: Some(any),
                    envelope: envelope.clone(),
                },
            );
            self.book().agent_delivered(
                &agent_nonce,
                Delivered {
                    stand_in: true,
                    ..Default::default()
                },
            );
            counter!(m::XDS_PROXY_RESPONSES).increment(1);
            self.delivered = true;
            self.down_tx
                .send(Down::Message(resp))
                .await
                .map_err(|_| Gone)?;
        }
        if self.book().is_latest(&nonce) {
            let failure = Failure {
                name: name.clone(),
                error,
                reason,
            };
            let message = nack_message(std::slice::from_ref(&failure), 1);
            // One NACK per nonce: a nonce the agent NACKed already only gains the name.
            let nack = self.book().late_nack::<F>(&nonce, message.clone(), &[name]);
            if let Some(nack) = nack {
                warn!(%nonce, %reason, %message, "NACK sent to the control plane");
                counter!(m::NACKS_SENT, "reason" => reason).increment(1);
                counter!(m::XDS_PROXY_REQUESTS).increment(1);
                if self.up_tx.send(nack).is_err() {
                    return Err(Gone);
                }
            }
        }
        if let Some(job) = heal {
            self.start_heal(*job, envelope);
        }
        Ok(())
    }

    async fn on_healed(&mut self, h: Healed) -> Result<(), Gone> {
        if self.heals.get(&h.name).map(|x| x.generation) != Some(h.generation) {
            return Ok(()); // superseded meanwhile
        }
        let Some(heal) = self.heals.remove(&h.name) else {
            return Ok(());
        };
        self.conv
            .cache()
            .pin(self.id, &h.name, Some(&h.module.sha256));
        self.seq += 1;
        let nonce = format!("{AGENT_NONCE_PREFIX}{}/{}", self.id, self.seq);
        let resp = F::originate(
            type_url::ECDS,
            &self.version,
            nonce.clone(),
            Carried {
                any: Some(h.any),
                envelope: heal.envelope,
            },
        );
        self.book().agent_healed(&nonce, &h.name);
        info!(resource = %h.name, path = %h.module.path.display(), %nonce,
              "module arrived after retry; delivered to Envoy without a new push");
        counter!(m::HEAL_DELIVERIES).increment(1);
        counter!(m::XDS_PROXY_RESPONSES).increment(1);
        self.delivered = true;
        self.down_tx
            .send(Down::Message(resp))
            .await
            .map_err(|_| Gone)
    }
}

/// Whether a response naming `newer` makes one naming `older` obsolete.
fn covers(newer: &[String], older: &[String]) -> bool {
    let newer: HashSet<&str> = newer.iter().map(String::as_str).collect();
    older.iter().all(|n| newer.contains(n.as_str()))
}

/// Drops queued responses that a later queued response covers.
fn coalesce<F: Flavor>(queue: &mut VecDeque<F::Resp>) {
    if queue.len() < 2 {
        return;
    }
    let names: Vec<Vec<String>> = queue.iter().map(F::resp_names).collect();
    let mut i = 0;
    let mut keep = vec![true; names.len()];
    while i < names.len() {
        keep[i] = !names[i + 1..].iter().any(|later| covers(later, &names[i]));
        i += 1;
    }
    let mut idx = 0;
    queue.retain(|_| {
        let k = keep[idx];
        idx += 1;
        if !k {
            counter!(m::ECDS_SUPERSEDED).increment(1);
        }
        k
    });
}

/// `s` cut to at most `max` bytes (on a character boundary), marked when cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The NACK's `error_detail` text: each failure (clipped), the whole under 4 KiB. The full
/// errors are in the log and on `/debug/wasm`.
fn nack_message(failures: &[Failure], total: usize) -> String {
    let mut out = format!(
        "ecds-agent: {} of {} ECDS resource(s) not converted: ",
        failures.len(),
        total
    );
    for (i, f) in failures.iter().enumerate() {
        let part = format!(
            "{}resource {:?}: {}",
            if i > 0 { "; " } else { "" },
            clip(&f.name, 200),
            clip(&f.error, NACK_PART_MAX)
        );
        if out.len() + part.len() > NACK_MAX {
            out.push_str(&format!(
                "; … and {} more (see the agent log and /debug/wasm)",
                failures.len() - i
            ));
            break;
        }
        out.push_str(&part);
    }
    out
}

fn nack_reason(failures: &[Failure]) -> &'static str {
    let first = failures.first().map(|f| f.reason).unwrap_or("unknown");
    if failures.iter().all(|f| f.reason == first) {
        first
    } else {
        "mixed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn newer_pushes_cover_older_ones() {
        assert!(covers(&names(&["a", "b"]), &names(&["a"])));
        assert!(covers(&names(&["a"]), &names(&["a"])));
        assert!(!covers(&names(&["a"]), &names(&["a", "b"])));
        assert!(covers(&names(&["a"]), &names(&[])));
    }

    #[test]
    fn nack_text_stays_under_4k() {
        let failures: Vec<Failure> = (0..50)
            .map(|i| Failure {
                name: format!("r{i}"),
                error: "x".repeat(10_000),
                reason: "fetch_failure",
            })
            .collect();
        let m = nack_message(&failures, 50);
        assert!(m.len() < 4096, "{}", m.len());
        assert!(m.starts_with(
            "ecds-agent: 50 of 50 ECDS resource(s) not converted: resource \"r0\": xxx"
        ));
        assert!(m.contains("more (see the agent log and /debug/wasm)"));
        assert_eq!(clip("héllo", 2), "h…");
    }
}
