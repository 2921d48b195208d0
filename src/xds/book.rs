//! The ECDS reply bookkeeping of one stream: the single owner of which upstream nonces were
//! answered, what the agent delivered under which nonce, and which subscription the control
//! plane knows. Pure state and decisions, no I/O: the stream loop and the ECDS session call
//! it, `flavor` only supplies message shapes.
//!
//! Rules it enforces:
//! * exactly one reply per upstream nonce the agent answered itself (a NACK): Envoy's own reply
//!   to that nonce stays here, and so do replies to nonces the agent invented
//!   ([`AGENT_NONCE_PREFIX`], background deliveries);
//! * a subscription change is never lost: names count as known upstream only once they went up
//!   in an ACK carrying the *latest* upstream nonce (SotW control planes ignore requests with an
//!   older nonce, and a NACK does not change the subscription at istiod). A swallowed request
//!   whose names differ goes up re-addressed to the latest nonce (SotW) or as a pure
//!   subscription message (Delta);
//! * a nonce Envoy has not accepted is never ACKed: while the latest upstream nonce stands
//!   NACKed by the agent, a SotW subscription change goes up as a new watch (no nonce, no
//!   versions), which a control plane answers with a push of the names, not as an ACK;
//! * the control plane learns when Envoy runs what it NACKed: once Envoy accepted a background
//!   delivery for every resource the agent's NACK of the latest nonce named, Envoy's ACK goes
//!   up re-addressed to that nonce (istiod clears the rejection on an ACK of the NACKed nonce);
//! * Envoy's rejections of what the agent delivered are reported ([`Rejection`]), and go
//!   upstream when the control plane has not had a reply to its latest nonce yet;
//! * resources Envoy stops subscribing to are reported ([`Decision::unsubscribed`]), so their
//!   pins and retries end whatever the control plane sends;
//! * a new stream never carries ECDS versions upstream: Envoy may hold a stand-in under the
//!   control plane's version, so the control plane must send the real resource again.

use std::collections::{BTreeSet, VecDeque};

use super::flavor::Flavor;
use crate::proto::type_url;

/// Prefix of nonces the agent invents; control planes never see them.
pub const AGENT_NONCE_PREFIX: &str = "ecds-agent/";

/// How many nonces each memory keeps.
const MEMORY: usize = 256;

/// What the agent put into a response Envoy got (where it changed something).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivered {
    pub converted: bool,
    pub stand_in: bool,
    pub healed: bool,
}

impl Delivered {
    /// The `reason` label of an Envoy rejection of this delivery.
    pub fn label(self) -> &'static str {
        if self.healed {
            "healed"
        } else if self.stand_in {
            "stand_in"
        } else if self.converted {
            "converted"
        } else {
            "unchanged"
        }
    }
}

/// Envoy rejected something the agent answered, originated or rewrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub nonce: String,
    pub what: Delivered,
    pub message: String,
}

/// What to do with one Envoy request.
#[derive(Debug)]
pub struct Decision<R> {
    /// What goes upstream, if anything.
    pub up: Option<R>,
    /// Set when Envoy rejected something of the agent's.
    pub rejection: Option<Rejection>,
    /// ECDS resources Envoy no longer subscribes to.
    pub unsubscribed: Vec<String>,
}

/// The agent's NACK of the latest upstream nonce, while what it failed may still heal.
#[derive(Debug)]
struct Nacked {
    nonce: String,
    /// Resources of that response Envoy does not run yet.
    pending: BTreeSet<String>,
}

/// A FIFO set with a bounded memory.
#[derive(Debug, Default)]
struct Recent<T>(VecDeque<T>);

impl<T: PartialEq> Recent<T> {
    fn push(&mut self, v: T) {
        if self.0.len() == MEMORY {
            self.0.pop_front();
        }
        self.0.push_back(v);
    }
}

impl Recent<String> {
    fn contains(&self, v: &str) -> bool {
        self.0.iter().any(|x| x == v)
    }
}

#[derive(Debug, Default)]
pub struct Book {
    /// Nonce of the newest ECDS response received from upstream.
    latest: Option<String>,
    /// Upstream nonces the agent answered itself (NACKs).
    answered_by_agent: Recent<String>,
    /// Upstream nonces that had any reply upstream (the agent's or Envoy's).
    replied: Recent<String>,
    /// What the agent delivered under each nonce where it changed something.
    delivered: Recent<(String, Delivered)>,
    /// SotW: last non-empty ECDS `version_info` Envoy reported (what Envoy accepted).
    envoy_version: String,
    /// SotW: Envoy's current ECDS subscription.
    envoy_names: Vec<String>,
    /// SotW: the subscription the control plane knows (sent in an ACK of its latest nonce, or
    /// in the first request).
    known_names: Option<Vec<String>>,
    /// The agent's NACK of the latest upstream nonce, until healed or superseded.
    nacked: Option<Nacked>,
    /// Agent nonces of background deliveries, with the resource each one healed and the
    /// NACKed nonce it healed for.
    healed: Recent<(String, String, Option<String>)>,
    /// Envoy's first ECDS request on this stream said it holds ECDS resources already.
    envoy_had_ecds: bool,
}

impl Book {
    /// An ECDS response with `nonce` arrived from upstream (before it is converted).
    pub fn upstream_response(&mut self, nonce: &str) {
        self.latest = Some(nonce.to_owned());
        if self.nacked.as_ref().is_some_and(|n| n.nonce != nonce) {
            self.nacked = None;
        }
    }

    /// Whether Envoy came to this stream holding no ECDS resource (a starting Envoy, whose
    /// listeners wait for their first ECDS response).
    pub fn envoy_fresh(&self) -> bool {
        !self.envoy_had_ecds
    }

    /// Whether `nonce` is the newest ECDS response from upstream.
    pub fn is_latest(&self, nonce: &str) -> bool {
        self.latest.as_deref() == Some(nonce)
    }

    /// The agent NACKs `nonce` itself, for the resources `failed`; returns the NACK to send
    /// upstream.
    pub fn agent_nack<F: Flavor>(
        &mut self,
        nonce: &str,
        message: String,
        failed: &[String],
    ) -> F::Req {
        self.answered_by_agent.push(nonce.to_owned());
        self.replied.push(nonce.to_owned());
        if self.latest.as_deref() == Some(nonce) {
            self.nacked = Some(Nacked {
                nonce: nonce.to_owned(),
                pending: failed.iter().cloned().collect(),
            });
        }
        F::nack(
            type_url::ECDS,
            nonce,
            &self.envoy_version,
            &self.envoy_names,
            message,
        )
    }

    /// A failure of `failed` found after `nonce` was delivered: the NACK to send, unless the
    /// agent NACKed that nonce already — then its standing NACK also names `failed` (what
    /// must heal before the nonce is ACKed) and nothing more goes up.
    pub fn late_nack<F: Flavor>(
        &mut self,
        nonce: &str,
        message: String,
        failed: &[String],
    ) -> Option<F::Req> {
        if self.answered_by_agent.contains(nonce) {
            if let Some(n) = self.nacked.as_mut().filter(|n| n.nonce == nonce) {
                n.pending.extend(failed.iter().cloned());
            }
            return None;
        }
        Some(self.agent_nack::<F>(nonce, message, failed))
    }

    /// The agent delivered the healed resource `name` under its own `nonce`.
    pub fn agent_healed(&mut self, nonce: &str, name: &str) {
        let for_nack = self.nacked.as_ref().map(|n| n.nonce.clone());
        self.healed
            .push((nonce.to_owned(), name.to_owned(), for_nack));
        self.agent_delivered(
            nonce,
            Delivered {
                converted: true,
                healed: true,
                ..Default::default()
            },
        );
    }

    /// Envoy accepted the background delivery `nonce`: the NACKed nonce it completes, if every
    /// resource that NACK named now runs in Envoy (and the NACKed nonce is still the latest).
    fn heal_completes(&mut self, nonce: &str) -> Option<String> {
        let (name, for_nack) = self
            .healed
            .0
            .iter()
            .rev()
            .find(|(n, _, _)| n == nonce)
            .map(|(_, name, f)| (name.clone(), f.clone()))?;
        let nacked = self.nacked.as_mut()?;
        // A delivery made for an older NACK says nothing about the one standing now.
        if self.latest.as_deref() != Some(nacked.nonce.as_str())
            || for_nack.as_deref() != Some(nacked.nonce.as_str())
        {
            return None;
        }
        nacked.pending.remove(&name);
        if !nacked.pending.is_empty() {
            return None;
        }
        self.nacked.take().map(|n| n.nonce)
    }

    /// Records what the agent changed in the response with `nonce` that goes to Envoy.
    pub fn agent_delivered(&mut self, nonce: &str, what: Delivered) {
        if what != Delivered::default() {
            self.delivered.push((nonce.to_owned(), what));
        }
    }

    fn delivered_under(&self, nonce: &str) -> Option<Delivered> {
        self.delivered
            .0
            .iter()
            .rev()
            .find(|(n, _)| n == nonce)
            .map(|(_, d)| *d)
    }

    fn is_agents(&self, nonce: &str) -> bool {
        nonce.starts_with(AGENT_NONCE_PREFIX) || self.answered_by_agent.contains(nonce)
    }

    /// Decides what of an Envoy request goes upstream.
    pub fn envoy_request<F: Flavor>(&mut self, mut req: F::Req) -> Decision<F::Req> {
        if F::req_type_url(&req) != type_url::ECDS {
            return Decision {
                up: Some(req),
                rejection: None,
                unsubscribed: vec![],
            };
        }
        let unsubscribed: Vec<String> = match F::sotw_state(&req) {
            Some((version, names)) => {
                if !version.is_empty() {
                    self.envoy_version = version.to_owned();
                }
                let gone = self
                    .envoy_names
                    .iter()
                    .filter(|n| !names.contains(n))
                    .cloned()
                    .collect();
                self.envoy_names = names.to_vec();
                gone
            }
            None => F::unsubscribed(&req).to_vec(),
        };
        if let Some(n) = self.nacked.as_mut() {
            for name in &unsubscribed {
                n.pending.remove(name);
            }
        }
        let nonce = F::req_nonce(&req).to_owned();
        let error = F::req_error(&req).map(str::to_owned);
        // Envoy rejected the very response the agent NACKed (a resource the agent delivered
        // did not load): healing the failed ones can no longer make it an ACK.
        if error.is_some() && self.nacked.as_ref().is_some_and(|n| n.nonce == nonce) {
            self.nacked = None;
        }
        let rejection = error.as_ref().and_then(|message| {
            self.delivered_under(&nonce).map(|what| Rejection {
                nonce: nonce.clone(),
                what,
                message: message.clone(),
            })
        });

        if nonce.is_empty() {
            self.envoy_had_ecds |= F::carries_versions(&req);
            // A new stream: ask for everything again (see the module docs).
            F::forget_versions(&mut req);
            self.note_sent::<F>(&req, true);
            return Decision {
                up: Some(req),
                rejection,
                unsubscribed,
            };
        }
        if !self.is_agents(&nonce) {
            // Envoy's own reply to an upstream nonce: it goes up as it is.
            self.replied.push(nonce.clone());
            let latest = self.latest.as_deref() == Some(nonce.as_str());
            self.note_sent::<F>(&req, latest && error.is_none());
            return Decision {
                up: Some(req),
                rejection,
                unsubscribed,
            };
        }

        // The agent answered (or invented) this nonce: Envoy's reply stays here, except what the
        // control plane still needs to hear.
        let latest_unreplied = self
            .latest
            .clone()
            .filter(|l| !self.replied.contains(l.as_str()));
        let healed = if error.is_none() {
            self.heal_completes(&nonce)
        } else {
            None
        };
        let up = match (&error, latest_unreplied, healed) {
            (Some(_), Some(latest), _) => {
                // Envoy rejected an agent delivery while the control plane waits for a reply to
                // its latest nonce: Envoy's rejection is that reply.
                self.replied.push(latest.clone());
                Some(F::readdress(req, &latest, true))
            }
            (None, _, Some(nacked)) => {
                // Envoy runs everything the agent's NACK of the latest nonce named: its ACK
                // of the healing delivery is the ACK of that nonce.
                self.replied.push(nacked.clone());
                let up = F::readdress(req, &nacked, false);
                self.note_sent::<F>(&up, true);
                Some(up)
            }
            _ if F::changes_subscription(&req, self.known_names.as_deref()) => {
                self.subscription_change::<F>(req)
            }
            _ => None,
        };
        Decision {
            up,
            rejection,
            unsubscribed,
        }
    }

    /// A subscription change in a request the agent would otherwise keep: under the latest
    /// nonce (SotW), or as a pure subscription message (Delta). While the agent's NACK of the
    /// latest nonce stands, a SotW change goes up with no nonce and no versions — a control
    /// plane takes that as a new watch of the names (istiod's INIT path) and pushes them — never
    /// as an ACK of a nonce Envoy did not accept, and never lost (istiod ignores a NACK's names).
    fn subscription_change<F: Flavor>(&mut self, req: F::Req) -> Option<F::Req> {
        let nacked = self
            .nacked
            .as_ref()
            .is_some_and(|n| self.latest.as_deref() == Some(n.nonce.as_str()));
        let up = match &self.latest {
            Some(_) if F::NAME == "sotw" && nacked => {
                let mut up = F::subscription_only(req);
                F::forget_versions(&mut up);
                up
            }
            Some(latest) if F::NAME == "sotw" => F::readdress(req, latest, false),
            _ => F::subscription_only(req),
        };
        self.note_sent::<F>(&up, true);
        Some(up)
    }

    /// Remembers the SotW names of a request that went up, when the control plane will take
    /// them as the subscription.
    fn note_sent<F: Flavor>(&mut self, req: &F::Req, counts: bool) {
        if counts {
            if let Some((_, names)) = F::sotw_state(req) {
                self.known_names = Some(names.to_vec());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::flavor::{Delta, Sotw};
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use envoy_types::pb::google::rpc::Status;

    fn sotw(nonce: &str, names: &[&str], error: Option<&str>) -> Box<DiscoveryRequest> {
        Box::new(DiscoveryRequest {
            type_url: type_url::ECDS.into(),
            response_nonce: nonce.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: "v1".into(),
            error_detail: error.map(|m| Status {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        })
    }

    /// One step of a table: an event, and what must go upstream (nonce, names, error?).
    enum Step {
        Upstream(&'static str),
        AgentNack(&'static str),
        Delivered(&'static str, Delivered),
        Envoy(
            Box<DiscoveryRequest>,
            Option<(&'static str, &'static [&'static str], bool)>,
        ),
    }

    fn run_sotw(steps: Vec<Step>) -> Vec<Rejection> {
        let mut b = Book::default();
        let mut rejections = vec![];
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Upstream(n) => b.upstream_response(n),
                Step::AgentNack(n) => {
                    let nack = b.agent_nack::<Sotw>(n, "bad".into(), &["a".to_string()]);
                    assert_eq!(nack.response_nonce, n);
                    assert!(nack.error_detail.is_some());
                }
                Step::Delivered(n, d) => b.agent_delivered(n, d),
                Step::Envoy(req, want) => {
                    let d = b.envoy_request::<Sotw>(*req);
                    rejections.extend(d.rejection);
                    let got = d.up.as_ref().map(|r| {
                        (
                            r.response_nonce.as_str(),
                            r.resource_names.clone(),
                            r.error_detail.is_some(),
                        )
                    });
                    let want = want
                        .map(|(n, names, e)| (n, names.iter().map(|s| s.to_string()).collect(), e));
                    assert_eq!(got, want, "step {i}");
                }
            }
        }
        rejections
    }

    const STAND_IN: Delivered = Delivered {
        converted: false,
        stand_in: true,
        healed: false,
    };
    const HEALED: Delivered = Delivered {
        converted: true,
        stand_in: false,
        healed: true,
    };

    #[test]
    fn sotw_table() {
        use Step::*;
        let rejections = run_sotw(vec![
            // The first request goes up (its version dropped: see forget_versions).
            Envoy(sotw("", &["a"], None), Some(("", &["a"], false))),
            Upstream("n1"),
            AgentNack("n1"),
            Delivered("n1", STAND_IN),
            // Envoy's ACK of a nonce the agent NACKed stays here.
            Envoy(sotw("n1", &["a"], None), None),
            // So does its reply to an agent delivery.
            Envoy(sotw("ecds-agent/1/1", &["a"], None), None),
            // A subscription change in a swallowed reply while n1 stands NACKed: a new watch
            // (no nonce), never an ACK of a nonce Envoy did not accept.
            Envoy(
                sotw("ecds-agent/1/1", &["a", "b"], None),
                Some(("", &["a", "b"], false)),
            ),
            // Replies to other upstream nonces go up as they are.
            Upstream("n2"),
            Envoy(
                sotw("n2", &["a", "b"], None),
                Some(("n2", &["a", "b"], false)),
            ),
        ]);
        assert!(rejections.is_empty());
    }

    #[test]
    fn sotw_change_during_conversion_is_not_lost() {
        use Step::*;
        // n2 arrives from upstream while Envoy, still at n1, changes its names; n2 then partly
        // fails. The change went up with a stale nonce (ignored upstream), so Envoy's later ACK
        // of n2 must carry it up again.
        run_sotw(vec![
            Envoy(sotw("", &["a"], None), Some(("", &["a"], false))),
            Upstream("n1"),
            Envoy(sotw("n1", &["a"], None), Some(("n1", &["a"], false))),
            Upstream("n2"),
            Envoy(
                sotw("n1", &["a", "b"], None),
                Some(("n1", &["a", "b"], false)),
            ),
            AgentNack("n2"),
            // n2 stands NACKed: the change goes up as a new watch, once.
            Envoy(
                sotw("n2", &["a", "b"], None),
                Some(("", &["a", "b"], false)),
            ),
            Envoy(sotw("ecds-agent/1/1", &["a", "b"], None), None),
        ]);
    }

    /// The control plane learns that Envoy runs what the agent NACKed: Envoy's ACK of the
    /// healing delivery goes up as the ACK of the NACKed nonce, once every resource that NACK
    /// named runs; not for an older nonce, not while another resource still fails.
    #[test]
    fn a_late_failure_joins_the_standing_nack() {
        let mut b = Book::default();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let _ = b.envoy_request::<Sotw>(*sotw("", &["a", "b"], None));
        b.upstream_response("n1");
        // a failed at conversion, b streamed and failed later: one NACK, both must heal.
        let _ = b.agent_nack::<Sotw>("n1", "a failed".into(), &names(&["a"]));
        assert!(b
            .late_nack::<Sotw>("n1", "b failed".into(), &names(&["b"]))
            .is_none());
        b.agent_healed("ecds-agent/1/1", "b");
        let acked = |b: &mut Book, nonce: &str| {
            b.envoy_request::<Sotw>(*sotw(nonce, &["a", "b"], None))
                .up
                .map(|r| r.response_nonce)
        };
        assert_eq!(acked(&mut b, "ecds-agent/1/1"), None, "a still fails");
        b.agent_healed("ecds-agent/1/2", "a");
        assert_eq!(acked(&mut b, "ecds-agent/1/2"), Some("n1".into()));
        // A late failure of a nonce nobody NACKed yet is NACKed (even after Envoy's ACK).
        b.upstream_response("n2");
        let _ = acked(&mut b, "n2");
        let nack = b.late_nack::<Sotw>("n2", "c failed".into(), &names(&["c"]));
        assert!(nack.is_some_and(|r| r.response_nonce == "n2" && r.error_detail.is_some()));
    }

    #[test]
    fn healing_acks_the_nacked_nonce() {
        let mut b = Book::default();
        let up = |b: &mut Book, req: Box<DiscoveryRequest>| {
            b.envoy_request::<Sotw>(*req).up.map(|r| {
                (
                    r.response_nonce.clone(),
                    r.resource_names.clone(),
                    r.error_detail.is_some(),
                )
            })
        };
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(up(&mut b, sotw("", &["a", "b"], None)).is_some());
        b.upstream_response("n1");
        let _ = b.agent_nack::<Sotw>("n1", "a and b failed".into(), &names(&["a", "b"]));
        assert_eq!(up(&mut b, sotw("n1", &["a", "b"], None)), None);
        b.agent_healed("ecds-agent/1/1", "a");
        assert_eq!(
            up(&mut b, sotw("ecds-agent/1/1", &["a", "b"], None)),
            None,
            "b still fails"
        );
        b.agent_healed("ecds-agent/1/2", "b");
        // Rejected by Envoy: no ACK.
        let _ = up(&mut b, sotw("ecds-agent/1/2", &["a", "b"], Some("V8")));
        b.agent_healed("ecds-agent/1/3", "b");
        assert_eq!(
            up(&mut b, sotw("ecds-agent/1/3", &["a", "b"], None)),
            Some(("n1".into(), names(&["a", "b"]), false)),
            "the ACK of n1"
        );
        // Once only.
        b.agent_healed("ecds-agent/1/4", "b");
        assert_eq!(up(&mut b, sotw("ecds-agent/1/4", &["a", "b"], None)), None);

        // A newer nonce supersedes the NACK: healing an older one ACKs nothing.
        b.upstream_response("n2");
        let _ = b.agent_nack::<Sotw>("n2", "a failed".into(), &names(&["a"]));
        b.upstream_response("n3");
        b.agent_healed("ecds-agent/1/5", "a");
        assert_eq!(up(&mut b, sotw("ecds-agent/1/5", &["a", "b"], None)), None);

        // A delivery made while an older NACK stood does not ACK a newer one.
        b.upstream_response("n5");
        let _ = b.agent_nack::<Sotw>("n5", "a failed".into(), &names(&["a"]));
        b.agent_healed("ecds-agent/1/50", "a");
        b.upstream_response("n6");
        let _ = b.agent_nack::<Sotw>("n6", "a failed again".into(), &names(&["a"]));
        assert_eq!(up(&mut b, sotw("ecds-agent/1/50", &["a", "b"], None)), None);
        // Envoy rejecting the NACKed response itself: a later heal ACKs nothing.
        let _ = up(&mut b, sotw("n6", &["a", "b"], Some("b did not load")));
        b.agent_healed("ecds-agent/1/51", "a");
        assert_eq!(up(&mut b, sotw("ecds-agent/1/51", &["a", "b"], None)), None);

        // A resource Envoy unsubscribes from no longer holds the ACK back; the unsubscribe is
        // reported.
        b.upstream_response("n4");
        let _ = b.agent_nack::<Sotw>("n4", "a, b failed".into(), &names(&["a", "b"]));
        let d = b.envoy_request::<Sotw>(*sotw("ecds-agent/1/6", &["a"], None));
        assert_eq!(d.unsubscribed, names(&["b"]));
        assert!(
            d.up.as_ref()
                .is_some_and(|r| r.response_nonce.is_empty() && r.error_detail.is_none()),
            "a new watch, not an ACK of n4"
        );
        b.agent_healed("ecds-agent/1/7", "a");
        assert_eq!(
            up(&mut b, sotw("ecds-agent/1/7", &["a"], None)),
            Some(("n4".into(), names(&["a"]), false))
        );
    }

    #[test]
    fn envoy_rejections_are_reported_and_reach_an_unanswered_nonce() {
        use Step::*;
        let rejections = run_sotw(vec![
            Envoy(sotw("", &["a"], None), Some(("", &["a"], false))),
            Upstream("n1"),
            AgentNack("n1"),
            Delivered("n1", STAND_IN),
            // Rejected stand-in: n1 was already answered by the agent, so it stays here.
            Envoy(sotw("n1", &["a"], Some("no RBAC")), None),
            // A healed delivery rejected while upstream waits for a reply to n2: it goes up.
            Upstream("n2"),
            Delivered("ecds-agent/1/1", HEALED),
            Envoy(
                sotw("ecds-agent/1/1", &["a"], Some("V8 cannot compile")),
                Some(("n2", &["a"], true)),
            ),
            // n2 is answered now: a second rejection only gets reported.
            Delivered("ecds-agent/1/2", HEALED),
            Envoy(sotw("ecds-agent/1/2", &["a"], Some("again")), None),
        ]);
        let what: Vec<_> = rejections
            .iter()
            .map(|r| (r.nonce.as_str(), r.what.label()))
            .collect();
        assert_eq!(
            what,
            [
                ("n1", "stand_in"),
                ("ecds-agent/1/1", "healed"),
                ("ecds-agent/1/2", "healed")
            ]
        );
    }

    #[test]
    fn first_request_forgets_versions() {
        let mut b = Book::default();
        let up = b.envoy_request::<Sotw>(*sotw("", &["a"], None)).up.unwrap();
        assert!(up.version_info.is_empty());
        let delta = DeltaDiscoveryRequest {
            type_url: type_url::ECDS.into(),
            resource_names_subscribe: vec!["a".into()],
            initial_resource_versions: [("a".to_string(), "v1".to_string())].into(),
            ..Default::default()
        };
        let up = b.envoy_request::<Delta>(delta).up.unwrap();
        assert!(up.initial_resource_versions.is_empty());
        assert_eq!(up.resource_names_subscribe, ["a"]);
        // Other types keep theirs.
        let cds = DeltaDiscoveryRequest {
            type_url: type_url::CLUSTER.into(),
            initial_resource_versions: [("c".to_string(), "v1".to_string())].into(),
            ..Default::default()
        };
        let up = b.envoy_request::<Delta>(cds).up.unwrap();
        assert_eq!(up.initial_resource_versions.len(), 1);
    }

    #[test]
    fn delta_subscription_changes_still_go_up() {
        let mut b = Book::default();
        b.upstream_response("d1");
        let _ = b.agent_nack::<Delta>("d1", "x".into(), &[]);
        let ack = DeltaDiscoveryRequest {
            type_url: type_url::ECDS.into(),
            response_nonce: "d1".into(),
            ..Default::default()
        };
        assert!(b.envoy_request::<Delta>(ack.clone()).up.is_none());
        let sub = DeltaDiscoveryRequest {
            resource_names_subscribe: vec!["z".into()],
            ..ack
        };
        let up = b
            .envoy_request::<Delta>(sub)
            .up
            .expect("subscription change");
        assert!(up.response_nonce.is_empty() && up.error_detail.is_none());
    }

    #[test]
    fn memory_is_bounded() {
        let mut b = Book::default();
        for i in 0..(MEMORY + 10) {
            let _ = b.agent_nack::<Sotw>(&i.to_string(), String::new(), &[]);
        }
        assert_eq!(b.answered_by_agent.0.len(), MEMORY);
        assert!(!b.is_agents("0") && b.is_agents(&(MEMORY + 9).to_string()));
    }
}
