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

    /// Forgets an answered nonce whose response Envoy will never see.
    pub fn forget(&mut self, nonce: &str) {
        self.answered.retain(|n| n != nonce);
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
        let out = if nonce.is_empty() || !self.is_agents(nonce) {
            Some(req)
        } else if F::changes_subscription(&req, self) {
            Some(F::subscription_only(req))
        } else {
            tracing::debug!(
                nonce,
                "Envoy's reply to an agent-answered nonce not forwarded"
            );
            None
        };
        if out.is_some() {
            self.forwarded_ecds_names = self.ecds_names.clone();
        }
        out
    }
}
