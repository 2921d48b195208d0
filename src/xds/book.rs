//! Per-stream nonce bookkeeping that keeps the control plane's view consistent when the agent
//! speaks for Envoy: exactly one reply per nonce the control plane sent, and never a nonce it
//! did not send.
//!
//! * When the agent NACKs a response itself, Envoy's own reply to that nonce is swallowed.
//! * Responses the agent originates (modules delivered by background retry) carry nonces with
//!   [`AGENT_NONCE_PREFIX`]; Envoy's replies to them are swallowed.
//! * A swallowed request that also changes the subscription still goes up, stripped of its
//!   nonce and error, as a pure subscription message.

use std::collections::VecDeque;

use super::flavor::Flavor;
use crate::proto::type_url;

/// Prefix of nonces the agent invents; control planes never see them.
pub const AGENT_NONCE_PREFIX: &str = "ecds-agent/";

/// How many agent-answered upstream nonces are remembered.
const ANSWERED_MEMORY: usize = 256;

#[derive(Debug, Default)]
pub struct NonceBook {
    answered: VecDeque<String>,
    /// Last non-empty ECDS `version_info` Envoy reported (SotW): what Envoy has accepted.
    pub ecds_version: String,
    /// Envoy's current ECDS subscription (SotW resource names).
    pub ecds_names: Vec<String>,
    /// The ECDS subscription as last forwarded upstream (SotW).
    pub forwarded_ecds_names: Vec<String>,
}

impl NonceBook {
    /// Marks `nonce` as answered by the agent (call before Envoy can see the response).
    pub fn answered_by_agent(&mut self, nonce: &str) {
        if self.answered.len() == ANSWERED_MEMORY {
            self.answered.pop_front();
        }
        self.answered.push_back(nonce.to_owned());
    }

    fn is_agents(&self, nonce: &str) -> bool {
        nonce.starts_with(AGENT_NONCE_PREFIX) || self.answered.iter().any(|n| n == nonce)
    }

    /// Decides what of an Envoy request goes upstream: the request itself, its subscription
    /// part only, or nothing.
    pub fn filter<F: Flavor>(&mut self, req: F::Req) -> Option<F::Req> {
        if F::req_type_url(&req) != type_url::ECDS {
            return Some(req);
        }
        F::note_request(&req, self);
        let nonce = F::req_nonce(&req);
        if nonce.is_empty() || !self.is_agents(nonce) {
            self.forwarded_ecds_names = self.ecds_names.clone();
            return Some(req);
        }
        // The agent already answered this nonce (or invented it): Envoy's reply stays here.
        match F::req_error(&req) {
            Some(error) => tracing::warn!(
                nonce,
                %error,
                "Envoy rejected an ECDS update the agent already answered; not forwarded"
            ),
            None => tracing::debug!(
                nonce,
                "Envoy's ACK of an agent-answered nonce not forwarded"
            ),
        }
        let out = F::changes_subscription(&req, self).then(|| F::subscription_only(req));
        if out.is_some() {
            self.forwarded_ecds_names = self.ecds_names.clone();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::flavor::{Delta, Sotw};
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};

    fn sotw(nonce: &str, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url::ECDS.into(),
            response_nonce: nonce.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: "v1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn sotw_replies_to_agent_nonces_stay_unless_the_subscription_changes() {
        let mut b = NonceBook::default();
        assert!(
            b.filter::<Sotw>(sotw("", &["a"])).is_some(),
            "initial request goes up"
        );
        b.answered_by_agent("n1");
        assert!(
            b.filter::<Sotw>(sotw("n1", &["a"])).is_none(),
            "ACK of an agent-NACKed nonce"
        );
        assert!(
            b.filter::<Sotw>(sotw("ecds-agent/1/1", &["a"])).is_none(),
            "ACK of an agent delivery"
        );
        let up = b
            .filter::<Sotw>(sotw("ecds-agent/1/1", &["a", "b"]))
            .expect("subscription change");
        assert!(up.response_nonce.is_empty() && up.error_detail.is_none());
        assert_eq!(up.resource_names, vec!["a", "b"]);
        assert!(
            b.filter::<Sotw>(sotw("n2", &["a", "b"])).is_some(),
            "other nonces go up"
        );
        let mut other = sotw("x", &[]);
        other.type_url = type_url::LISTENER.into();
        assert!(
            b.filter::<Sotw>(other).is_some(),
            "other types are never filtered"
        );
        assert_eq!(b.ecds_version, "v1");
    }

    #[test]
    fn delta_subscription_changes_still_go_up() {
        let mut b = NonceBook::default();
        b.answered_by_agent("d1");
        let ack = DeltaDiscoveryRequest {
            type_url: type_url::ECDS.into(),
            response_nonce: "d1".into(),
            ..Default::default()
        };
        assert!(b.filter::<Delta>(ack.clone()).is_none());
        let sub = DeltaDiscoveryRequest {
            resource_names_subscribe: vec!["z".into()],
            ..ack
        };
        let up = b.filter::<Delta>(sub).expect("subscription change");
        assert!(up.response_nonce.is_empty());
    }

    #[test]
    fn answered_memory_is_bounded() {
        let mut b = NonceBook::default();
        for i in 0..(ANSWERED_MEMORY + 10) {
            b.answered_by_agent(&i.to_string());
        }
        assert_eq!(b.answered.len(), ANSWERED_MEMORY);
        assert!(!b.is_agents("0") && b.is_agents(&(ANSWERED_MEMORY + 9).to_string()));
    }
}
