//! The ECDS side of one stream. ECDS responses arrive here in the order the control plane
//! sent them and leave in that order (one at a time), while other types never wait for them.
//!
//! For each response: every resource is converted concurrently; good ones are delivered
//! converted, failed fetches as stand-ins, malformed ones not at all; if anything failed the
//! control plane gets exactly one NACK for that nonce (and Envoy's own reply is swallowed).
//! Failed fetches keep retrying in the background; when a module arrives the converted
//! resource is delivered to Envoy under an agent nonce, without waiting for a new push. A
//! newer push of the same resource (or its removal) cancels the retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use metrics::{counter, histogram};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::book::{NonceBook, AGENT_NONCE_PREFIX};
use super::flavor::{Carried, Flavor};
use super::stream::DownTx;
use crate::admin::metrics as m;
use crate::ecds::{ConversionResult, Converter, HealJob, Outcome};
use crate::proto::type_url;
use crate::wasm::Module;

/// Envoy went away; the session ends.
struct Gone;

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

struct Failure {
    name: String,
    error: String,
    result: ConversionResult,
}

pub(crate) struct EcdsSession<F: Flavor> {
    id: u64,
    conv: Arc<Converter>,
    book: Arc<Mutex<NonceBook>>,
    down_tx: DownTx<F>,
    up_tx: mpsc::UnboundedSender<F::Req>,
    heals: HashMap<String, Heal>,
    healed_tx: mpsc::UnboundedSender<Healed>,
    generation: u64,
    /// Version of the last ECDS response from upstream (used on agent deliveries).
    version: String,
    seq: u64,
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
    /// Starts the session; returns where ECDS responses are to be sent.
    pub fn spawn(
        id: u64,
        conv: Arc<Converter>,
        book: Arc<Mutex<NonceBook>>,
        down_tx: DownTx<F>,
        up_tx: mpsc::UnboundedSender<F::Req>,
    ) -> (mpsc::UnboundedSender<F::Resp>, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
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
        };
        let task = tokio::spawn(session.run(rx, healed_rx).in_current_span());
        (tx, task)
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<F::Resp>,
        mut healed: mpsc::UnboundedReceiver<Healed>,
    ) {
        loop {
            let step = tokio::select! {
                biased;
                r = rx.recv() => match r {
                    Some(resp) => self.on_response(resp).await,
                    None => return,
                },
                Some(h) = healed.recv() => self.on_healed(h).await,
            };
            if step.is_err() {
                return;
            }
        }
    }

    fn supersede(&mut self, name: &str) {
        if let Some(h) = self.heals.remove(name) {
            h.task.abort();
        }
    }

    async fn on_response(&mut self, mut resp: F::Resp) -> Result<(), Gone> {
        let started = Instant::now();
        let nonce = F::resp_nonce(&resp).to_owned();
        self.version = F::resp_version(&resp).to_owned();
        for name in F::removed(&resp).to_vec() {
            self.supersede(&name);
            self.conv.cache().pin(self.id, &name, None);
        }
        let items = F::take_resources(&mut resp);
        let total = items.len();
        let outcomes =
            futures::future::join_all(items.iter().map(|c| self.conv.convert(&c.any))).await;
        histogram!(m::CONVERSION_DURATION).record(started.elapsed().as_secs_f64() * 1000.0);

        let mut deliver = Vec::with_capacity(total);
        let mut failures = Vec::new();
        for (i, (item, outcome)) in items.into_iter().zip(outcomes).enumerate() {
            let envelope_name = item.envelope.as_ref().map(|r| r.name.clone());
            match outcome {
                Outcome::Unchanged { name, stripped } => {
                    self.supersede(&name);
                    self.conv.cache().pin(self.id, &name, None);
                    match stripped {
                        Some(any) => deliver.push(Carried {
                            any,
                            envelope: item.envelope,
                        }),
                        None => deliver.push(item),
                    }
                }
                Outcome::Converted { name, any, module } => {
                    self.supersede(&name);
                    self.conv.cache().pin(self.id, &name, Some(&module.sha256));
                    info!(resource = %name, path = %module.path.display(), sha256 = %module.sha256,
                          fetched = module.fetched, "Wasm module delivered as local file");
                    deliver.push(Carried {
                        any,
                        envelope: item.envelope,
                    });
                }
                Outcome::FetchFailed {
                    name,
                    standin,
                    error,
                    result,
                    heal,
                } => {
                    self.supersede(&name);
                    self.conv.cache().pin(self.id, &name, None);
                    warn!(resource = %name, %error, stand_in = standin.is_some(), retrying = heal.is_some(),
                          "Wasm module unavailable");
                    if let Some(any) = standin {
                        deliver.push(Carried {
                            any,
                            envelope: item.envelope.clone(),
                        });
                    }
                    if let Some(job) = heal {
                        self.start_heal(*job, item.envelope);
                    }
                    failures.push(Failure {
                        name,
                        error,
                        result,
                    });
                }
                Outcome::Rejected { name, error } => {
                    let name = name.or(envelope_name).unwrap_or_else(|| format!("#{i}"));
                    self.supersede(&name);
                    warn!(resource = %name, %error, "malformed ECDS resource rejected");
                    failures.push(Failure {
                        name,
                        error,
                        result: ConversionResult::UnmarshalFailure,
                    });
                }
            }
        }

        let delivering =
            !deliver.is_empty() || !F::removed(&resp).is_empty() || failures.is_empty();
        if !failures.is_empty() {
            let message = nack_message(&failures, total);
            let reason = nack_reason(&failures);
            let nack = {
                let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
                if delivering {
                    book.answered_by_agent(&nonce);
                }
                F::nack(type_url::ECDS, &nonce, &book, message.clone())
            };
            warn!(%nonce, %reason, %message, "NACK sent to the control plane");
            counter!(m::NACKS_SENT, "reason" => reason).increment(1);
            counter!(m::XDS_PROXY_REQUESTS).increment(1);
            if self.up_tx.send(nack).is_err() {
                return Err(Gone);
            }
        }
        if delivering {
            F::set_resources(&mut resp, deliver);
            self.down_tx.send(Ok(resp)).await.map_err(|_| Gone)?;
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
                let _ = tx.send(Healed {
                    name: job.name.clone(),
                    generation,
                    any,
                    module,
                });
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
                any: h.any,
                envelope: heal.envelope,
            },
        );
        info!(resource = %h.name, path = %h.module.path.display(), %nonce,
              "module arrived after retry; delivered to Envoy without a new push");
        counter!(m::HEAL_DELIVERIES).increment(1);
        counter!(m::XDS_PROXY_RESPONSES).increment(1);
        self.down_tx.send(Ok(resp)).await.map_err(|_| Gone)
    }
}

fn nack_message(failures: &[Failure], total: usize) -> String {
    let parts: Vec<String> = failures
        .iter()
        .map(|f| format!("resource {:?}: {}", f.name, f.error))
        .collect();
    format!(
        "ecds-agent: {} of {} ECDS resource(s) not converted: {}",
        failures.len(),
        total,
        parts.join("; ")
    )
}

fn nack_reason(failures: &[Failure]) -> &'static str {
    let first = failures
        .first()
        .map(|f| f.result.label())
        .unwrap_or("unknown");
    if failures.iter().all(|f| f.result.label() == first) {
        first
    } else {
        "mixed"
    }
}
