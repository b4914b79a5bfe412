//! Feature layer: the revocations other replicas make, applied here (PostgreSQL mode only).
//!
//! Every revocation is committed with an event on the cluster feed (`cluster::events`). This
//! replica's follower reads them as they come (a NOTIFY wakes the feed at once, a poll every
//! quarter second backs it): an agent's revocation goes into the in-memory list the tunnel's
//! verifier consults (its certificates are refused at the next handshake) and the agent's
//! sessions held here whose certificate it covers are closed with `REVOKED`; a caller's
//! revocation reloads the callers' list and closes the northbound connections it now refuses.
//! Events of this replica's own revocations come back too: applying them again changes
//! nothing. When the feed could not be followed (this replica fell behind or was cut off for
//! longer than the feed keeps events), every revocation is read again from the tables and
//! every session and connection checked against them.

use std::sync::Arc;

use tether_runtime::CancellationToken;
use tokio::sync::broadcast::error::RecvError;
use tunnel_proto::AgentId;

use crate::cluster::events::{ClusterEvent, EventFeed, EventKind, FeedItem};
use crate::cluster::identity::PgIdentity;
use crate::identity::callers::close_refused;
use crate::identity::revocation::{AgentRevocation, close_reason, close_sessions};
use crate::northbound::live_connections::LiveConnections;
use crate::tunnel::registry::Registry;

/// What the follower acts on.
#[derive(Debug, Clone)]
pub struct Follower {
    /// The store and its lists.
    pub identity: Arc<PgIdentity>,
    /// This replica's agent sessions.
    pub registry: Arc<Registry>,
    /// This replica's northbound connections.
    pub callers: Arc<LiveConnections>,
}

impl Follower {
    /// Applies the feed's revocations until `shutdown`.
    pub async fn run(self, feed: Arc<EventFeed>, shutdown: CancellationToken) {
        let mut rx = feed.subscribe();
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = rx.recv() => item,
            };
            match item {
                Ok(FeedItem::Event(ev)) => self.apply(&ev).await,
                Ok(FeedItem::Resync) | Err(RecvError::Lagged(_)) => self.resync().await,
                Err(RecvError::Closed) => return,
            }
        }
    }

    async fn apply(&self, ev: &ClusterEvent) {
        match ev.kind {
            EventKind::Revocation => {
                let (Ok(agent), Ok(record)) = (
                    ev.agent.parse::<AgentId>(),
                    serde_json::from_slice::<AgentRevocation>(&ev.body),
                ) else {
                    tracing::warn!(agent = %ev.agent, "cluster feed: unreadable revocation event; reading every revocation again");
                    self.resync().await;
                    return;
                };
                let reason = close_reason(&record.reason);
                self.identity.apply_revocation(&agent, record);
                self.close_agent(&agent, &reason);
            }
            EventKind::CallerRevocation => {
                if let Err(e) = self.identity.reload().await {
                    tracing::warn!(error = %e, "cluster feed: reading caller revocations failed");
                }
                self.close_callers();
            }
            _ => {}
        }
    }

    /// Closes the sessions of `agent` held here whose certificate the list now refuses (in a
    /// task of its own: a stuck session must not hold back the next event).
    fn close_agent(&self, agent: &AgentId, reason: &str) {
        let list = self.identity.revocations();
        let refused: Vec<_> = self
            .registry
            .get(agent)
            .map(|a| a.sessions)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| list.refusal(agent, &s.cert_facts()).is_some())
            .collect();
        if refused.is_empty() {
            return;
        }
        tracing::warn!(%agent, sessions = refused.len(),
            "agent revoked (by another replica or this one): closing its sessions here");
        let (registry, agent, reason) = (self.registry.clone(), agent.clone(), reason.to_owned());
        tokio::spawn(async move { close_sessions(&registry, &agent, &refused, &reason).await });
    }

    fn close_callers(&self) {
        let closed = close_refused(&self.identity.caller_revocations(), &self.callers);
        if !closed.is_empty() {
            tracing::warn!(
                connections = closed.len(),
                "northbound caller revoked (by another replica or this one): its connections here closed"
            );
        }
    }

    async fn resync(&self) {
        if let Err(e) = self.identity.reload().await {
            tracing::warn!(error = %e, "cluster feed: reading every revocation again failed");
            return;
        }
        let list = self.identity.revocations();
        for s in self.registry.sessions() {
            if let Some(why) = list.refusal(&s.agent, &s.cert_facts()) {
                let (registry, agent) = (self.registry.clone(), s.agent.clone());
                tokio::spawn(async move { close_sessions(&registry, &agent, &[s], &why).await });
            }
        }
        self.close_callers();
    }
}
