//! Feature layer: revoking agents (`Agents/Revoke`), and the in-memory revocation list the
//! tunnel's certificate verifier consults on every handshake.
//!
//! A revocation is keyed two ways:
//! - by **agent id with a cut-off time**: every certificate of that agent issued at or before
//!   the revocation is refused. When it was issued is read from the issue stamp in its serial
//!   number (`pki issue-agent` stamps the millisecond of issue, so a certificate issued right
//!   after a revocation is accepted) or, without one, from its `notBefore` (the gateway's own
//!   issuance backdates it, so a renewal racing a revocation is refused; it starts new
//!   certificates of a revoked agent strictly after the cut-off, [`RevocationList::not_before`]).
//!   See [`CertFacts::issued_by`]. Certificates issued later are accepted, so the agent can
//!   be enrolled or issued a certificate again;
//! - by **certificate fingerprint** (SHA-256 of the DER): the certificates the agent's live
//!   sessions presented, refused whatever their dates.
//!
//! Revoking persists first ([`IdentityStore`]: fsync'd, or committed in PostgreSQL), then
//! updates this list, then closes the
//! agent's live sessions with `REVOKED` (forcing the connection closed if a session has not
//! gone within half a second). A session whose handshake passed the verifier just before the
//! list changed registers and is then caught by the session driver, which checks the list again
//! once the session is registered: no session of a revoked certificate outlives the call by
//! more than about a second. With replicas, every other replica learns of the revocation from
//! the cluster feed (within a quarter of a second, or at once when notified) and does the same
//! to the sessions it holds (`identity::follow`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tunnel_proto::{AgentId, ErrorCode};

use crate::identity::db::IdentityDbError;
use crate::identity::store::IdentityStore;
use crate::tls::CertFacts;
use crate::tunnel::registry::{Registry, SessionCommand, SessionInfo};

/// Longest reason a revocation may carry (it travels in the session's close frame).
pub const MAX_REASON: usize = 256;

/// How long closing sessions get to leave on their own before their connections are closed.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// One revoked certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Serial number, lowercase hex.
    pub serial: String,
}

/// The revocation of one agent, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRevocation {
    /// The cut-off (Unix ms): certificates valid from this second or before are refused.
    pub revoked_at_ms: i64,
    /// The operator's reason.
    pub reason: String,
    /// Certificates refused by fingerprint.
    pub certificates: Vec<RevokedCert>,
}

impl AgentRevocation {
    /// A revocation at `now_ms` for `reason`, refusing `certs` and every fingerprint the
    /// `previous` revocation refused (those stay revoked). Both stores revoke through this.
    pub fn renewed(
        previous: Option<AgentRevocation>,
        reason: &str,
        certs: Vec<RevokedCert>,
        now_ms: i64,
    ) -> AgentRevocation {
        let mut all = previous.map(|p| p.certificates).unwrap_or_default();
        for c in certs {
            if !all.iter().any(|a| a.fingerprint == c.fingerprint) {
                all.push(c);
            }
        }
        AgentRevocation {
            revoked_at_ms: now_ms,
            reason: reason.to_owned(),
            certificates: all,
        }
    }

    /// The cut-off in whole seconds (X.509 times have one-second resolution).
    fn cutoff_secs(&self) -> i64 {
        self.revoked_at_ms.div_euclid(1000)
    }
}

#[derive(Default)]
struct Index {
    agents: HashMap<AgentId, AgentRevocation>,
    certs: HashMap<String, AgentId>,
}

/// The revocation list in memory; see the module docs. Filled and updated by the
/// [`IdentityStore`].
#[derive(Default)]
pub struct RevocationList {
    index: RwLock<Index>,
}

impl std::fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.index.read().expect("revocation lock");
        f.debug_struct("RevocationList")
            .field("agents", &i.agents.len())
            .field("certs", &i.certs.len())
            .finish()
    }
}

impl RevocationList {
    pub(crate) fn insert(&self, agent: AgentId, r: AgentRevocation) {
        self.index
            .write()
            .expect("revocation lock")
            .agents
            .insert(agent, r);
    }

    pub(crate) fn insert_cert(&self, fingerprint: String, agent: AgentId) {
        self.index
            .write()
            .expect("revocation lock")
            .certs
            .insert(fingerprint, agent);
    }

    /// Why `agent`'s certificate `cert` is refused, or `None` when it is not revoked.
    pub fn refusal(&self, agent: &AgentId, cert: &CertFacts) -> Option<String> {
        let i = self.index.read().expect("revocation lock");
        if let Some(owner) = i.certs.get(&cert.fingerprint) {
            return Some(format!(
                "certificate {} (serial {}) of agent {owner} was revoked",
                cert.fingerprint, cert.serial
            ));
        }
        let r = i.agents.get(agent)?;
        cert.issued_by(r.revoked_at_ms).then(|| {
            format!(
                "agent {agent} was revoked at {} ({}): its certificates issued until then are refused",
                humantime::format_rfc3339_seconds(from_ms(r.revoked_at_ms)),
                if r.reason.is_empty() { "no reason given" } else { &r.reason }
            )
        })
    }

    /// True when the certificate with this fingerprint is revoked.
    pub fn is_cert_revoked(&self, fingerprint: &str) -> bool {
        self.index
            .read()
            .expect("revocation lock")
            .certs
            .contains_key(fingerprint)
    }

    /// `agent`'s revocation, if any.
    pub fn revocation(&self, agent: &AgentId) -> Option<AgentRevocation> {
        self.index
            .read()
            .expect("revocation lock")
            .agents
            .get(agent)
            .cloned()
    }

    /// The earliest `notBefore` (Unix seconds) a certificate issued now for `agent` may have
    /// and still be accepted: `wanted`, or just after the agent's revocation cut-off.
    pub fn not_before(&self, agent: &AgentId, wanted: i64) -> i64 {
        match self.revocation(agent) {
            Some(r) => wanted.max(r.cutoff_secs() + 1),
            None => wanted,
        }
    }
}

/// Unix ms → `SystemTime`.
pub fn from_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// `SystemTime` → Unix ms.
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    /// The gateway knows nothing of this agent (the caller's mistake).
    #[error(
        "agent {0} is not known to this gateway (it has not connected since the gateway started, was never revoked and has no enrollment token)"
    )]
    UnknownAgent(AgentId),
    /// The reason is longer than [`MAX_REASON`] bytes (the caller's mistake).
    #[error("reason is {0} bytes long; at most {MAX_REASON} are allowed")]
    ReasonTooLong(usize),
    /// The revocation could not be stored (the gateway's fault; retrying may help). Nothing
    /// was revoked.
    #[error(transparent)]
    Store(#[from] IdentityDbError),
}

/// What a revocation did.
#[derive(Clone, Debug)]
pub struct Revoked {
    /// The stored revocation.
    pub record: AgentRevocation,
    /// Live sessions closed.
    pub sessions_closed: u32,
    /// The certificates those sessions presented.
    pub certificates: Vec<RevokedCert>,
    /// Pending enrollment tokens invalidated.
    pub tokens_invalidated: u32,
}

/// Revokes `agent` (see the module docs); returns once its sessions are gone (about a second
/// at most).
pub async fn revoke(
    registry: &Registry,
    db: &IdentityStore,
    agent: &AgentId,
    reason: &str,
) -> Result<Revoked, RevokeError> {
    if reason.len() > MAX_REASON {
        return Err(RevokeError::ReasonTooLong(reason.len()));
    }
    let started = Instant::now();
    let seen = registry.get(agent);
    if seen.is_none() && !db.knows_agent(agent).await? {
        return Err(RevokeError::UnknownAgent(agent.clone()));
    }
    let live = seen.map(|a| a.sessions).unwrap_or_default();
    let mut certificates: Vec<RevokedCert> = Vec::new();
    for s in &live {
        if !s.cert_fingerprint.is_empty()
            && !certificates
                .iter()
                .any(|c| c.fingerprint == s.cert_fingerprint)
        {
            certificates.push(RevokedCert {
                fingerprint: s.cert_fingerprint.clone(),
                serial: s.cert_serial.clone(),
            });
        }
    }
    let now_ms = to_ms(SystemTime::now());
    let (record, tokens_invalidated) = db
        .revoke(agent, reason, certificates.clone(), now_ms)
        .await?;
    // From here on the verifier refuses the agent's certificates; close what is live now (a
    // session registering after this look is closed by its own driver's check).
    let sessions = registry.get(agent).map(|a| a.sessions).unwrap_or_default();
    close_sessions(registry, agent, &sessions, &close_reason(reason)).await;
    metrics::counter!("tether_gateway_revocations_total").increment(1);
    tracing::warn!(%agent, reason, sessions_closed = sessions.len(), tokens_invalidated,
        certificates = certificates.len(), elapsed = ?started.elapsed(), "agent revoked");
    Ok(Revoked {
        record,
        sessions_closed: sessions.len() as u32,
        certificates,
        tokens_invalidated,
    })
}

/// What a revoked session is told.
pub fn close_reason(reason: &str) -> String {
    if reason.is_empty() {
        "agent revoked".to_owned()
    } else {
        format!("agent revoked: {reason}")
    }
}

/// Closes `sessions` of `agent` with `REVOKED` and waits for them to leave the registry,
/// forcing the connection closed under a session that has not left within [`CLOSE_GRACE`]
/// (a driver stuck writing to a peer that does not read).
pub async fn close_sessions(
    registry: &Registry,
    agent: &AgentId,
    sessions: &[Arc<SessionInfo>],
    close_reason: &str,
) {
    for s in sessions {
        s.command(SessionCommand::Close(
            ErrorCode::REVOKED,
            close_reason.to_owned(),
        ));
    }
    let gone = |registry: &Registry| {
        let now: Vec<_> = registry.get(agent).map(|a| a.sessions).unwrap_or_default();
        sessions
            .iter()
            .filter(|s| now.iter().any(|n| Arc::ptr_eq(n, s)))
            .cloned()
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + CLOSE_GRACE;
    let mut left = gone(registry);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        left = gone(registry);
    }
    for s in &left {
        tracing::warn!(agent = %agent, session = %s.session_id,
            "revoked session did not close within {CLOSE_GRACE:?}; closing its connection");
        s.link.close(ErrorCode::REVOKED, close_reason.as_bytes());
    }
    let deadline = Instant::now() + CLOSE_GRACE;
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        left = gone(registry);
    }
}

/// The API view of a revocation.
pub fn response(agent: &AgentId, r: &Revoked) -> tether_api::v1::RevokeAgentResponse {
    tether_api::v1::RevokeAgentResponse {
        agent: agent.to_string(),
        revoked_at: Some(prost_types::Timestamp::from(from_ms(
            r.record.revoked_at_ms,
        ))),
        sessions_closed: r.sessions_closed,
        certificates: r
            .certificates
            .iter()
            .map(|c| tether_api::v1::RevokedCertificate {
                sha256_fingerprint: c.fingerprint.clone(),
                serial: c.serial.clone(),
            })
            .collect(),
        tokens_invalidated: r.tokens_invalidated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fp: &str, not_before: i64) -> CertFacts {
        CertFacts {
            fingerprint: fp.into(),
            serial: "01".into(),
            not_before,
            not_after: i64::MAX,
        }
    }

    #[test]
    fn certificates_valid_from_the_cutoff_or_before_are_refused_later_ones_accepted() {
        let list = RevocationList::default();
        let a: AgentId = "t/a".parse().unwrap();
        let b: AgentId = "t/b".parse().unwrap();
        list.insert(
            a.clone(),
            AgentRevocation {
                revoked_at_ms: 100_500,
                reason: "lost laptop".into(),
                certificates: vec![],
            },
        );
        list.insert_cert("ff".into(), b.clone());
        assert!(list.refusal(&a, &facts("00", 99)).is_some());
        assert!(list.refusal(&a, &facts("00", 100)).is_some(), "same second");
        assert!(list.refusal(&a, &facts("00", 101)).is_none());
        assert_eq!(list.not_before(&a, 40), 101);
        assert_eq!(list.not_before(&a, 500), 500);
        assert!(list.refusal(&b, &facts("ee", 99)).is_none());
        let why = list.refusal(&b, &facts("ff", 10_000)).unwrap();
        assert!(why.contains("ff"), "{why}");
        assert!(
            list.refusal(&a, &facts("00", 1))
                .unwrap()
                .contains("lost laptop")
        );
    }
}
