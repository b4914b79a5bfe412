//! Feature layer: revoking northbound callers' certificates (`tether.v1.Callers/Revoke`,
//! `tetherctl callers revoke`), and the deny-list the northbound authentication consults on
//! every call.
//!
//! A caller certificate (`spiffe://<td>/controlplane/<name>`) is revoked two ways, like an
//! agent's:
//! - by **caller name with a cut-off time**: every certificate of that name valid from (its
//!   `notBefore`) at or before the revocation is refused; certificates issued later are
//!   accepted, so the caller can be given a new one (`pki issue-client` dates certificates a
//!   minute back: issue it a minute after the revocation);
//! - by **certificate fingerprint** (SHA-256 of the DER): exactly that certificate, whatever its
//!   dates.
//!
//! Revoking persists first (the identity store: `identity.redb`, fsync'd, or PostgreSQL with
//! replicas, whose feed tells every other replica to do the same), then updates this list (from then on
//! every call with such a certificate is `UNAUTHENTICATED`), then closes the open northbound
//! connections that presented one. The northbound TLS has no session resumption, so a new
//! connection always goes through the certificate checks.
//!
//! Only a caller acting for every tenant may revoke callers: a caller serves tenants of its
//! own, and one scoped to some tenants could otherwise cut off the callers of tenants it may
//! not act for.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tether_api::v1;
use tether_api::v1::callers_server::{Callers, CallersServer};
use tonic::{Request, Response, Status};
use tunnel_proto::SpiffeId;

use crate::identity::db::IdentityDbError;
use crate::identity::revocation::{MAX_REASON, from_ms, to_ms};
use crate::identity::store::IdentityStore;
use crate::northbound::listener::LiveConnections;
use crate::tls::CertFacts;

/// The revocation of a caller name, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerRevocation {
    /// The cut-off (Unix ms): certificates valid from this second or before are refused.
    pub revoked_at_ms: i64,
    /// The operator's reason.
    pub reason: String,
    /// The caller that revoked it.
    pub revoked_by: String,
}

/// One caller certificate revoked by fingerprint, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCallerCert {
    /// The caller name given with it (may be empty).
    pub name: String,
    /// When (Unix ms).
    pub revoked_at_ms: i64,
    /// The operator's reason.
    pub reason: String,
    /// The caller that revoked it.
    pub revoked_by: String,
}

#[derive(Default)]
struct Index {
    names: HashMap<String, CallerRevocation>,
    certs: HashMap<String, RevokedCallerCert>,
}

/// The revoked callers in memory; see the module docs. Filled and updated by the
/// [`IdentityStore`].
#[derive(Default)]
pub struct CallerRevocationList {
    index: RwLock<Index>,
}

impl std::fmt::Debug for CallerRevocationList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.read();
        f.debug_struct("CallerRevocationList")
            .field("names", &i.names.len())
            .field("certs", &i.certs.len())
            .finish()
    }
}

fn reason_text(r: &str) -> &str {
    if r.is_empty() { "no reason given" } else { r }
}

impl CallerRevocationList {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn insert_name(&self, name: String, r: CallerRevocation) {
        self.write().names.insert(name, r);
    }

    pub(crate) fn insert_cert(&self, fingerprint: String, r: RevokedCallerCert) {
        self.write().certs.insert(fingerprint, r);
    }

    /// The revocation of caller `name`, if any.
    pub fn name(&self, name: &str) -> Option<CallerRevocation> {
        self.read().names.get(name).cloned()
    }

    /// The revocation of the certificate with `fingerprint`, if any.
    pub fn cert(&self, fingerprint: &str) -> Option<RevokedCallerCert> {
        self.read().certs.get(fingerprint).cloned()
    }

    /// True when nothing is revoked (the common case: no work per call).
    pub fn is_empty(&self) -> bool {
        let i = self.read();
        i.names.is_empty() && i.certs.is_empty()
    }

    /// Why caller `name`'s certificate `cert` is refused, or `None` when it is not revoked.
    pub fn refusal(&self, name: &str, cert: &CertFacts) -> Option<String> {
        let i = self.read();
        if let Some(r) = i.certs.get(&cert.fingerprint) {
            return Some(format!(
                "caller certificate {} was revoked at {} ({})",
                cert.fingerprint,
                humantime::format_rfc3339_seconds(from_ms(r.revoked_at_ms)),
                reason_text(&r.reason)
            ));
        }
        let r = i.names.get(name)?;
        cert.issued_by(r.revoked_at_ms).then(|| {
            format!(
                "caller {name} was revoked at {} ({}): its certificates issued until then are refused",
                humantime::format_rfc3339_seconds(from_ms(r.revoked_at_ms)),
                reason_text(&r.reason)
            )
        })
    }

    /// Why the control-plane certificate `cert` is refused, or `None` (also for a certificate
    /// that is no caller's: others decide about those).
    pub fn refusal_of(&self, cert: &CertificateDer<'_>) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let name = match tether_runtime::tls::spiffe_id(cert) {
            Ok(SpiffeId::ControlPlane { name, .. }) => name,
            _ => String::new(),
        };
        match CertFacts::of(cert) {
            Ok(facts) => self.refusal(&name, &facts),
            Err(e) => Some(e.to_string()),
        }
    }
}

/// A SHA-256 fingerprint as written by people (hex, any case, colons allowed), as stored:
/// 64 lowercase hex digits.
pub fn normalize_fingerprint(s: &str) -> Result<String, String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "sha256_fingerprint {s:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
        ))
    }
}

/// Why a caller revocation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallerRevokeError {
    /// Neither a name nor a fingerprint (the caller's mistake).
    #[error("name a caller or a certificate fingerprint to revoke")]
    Nothing,
    /// A malformed name or fingerprint, or a reason too long (the caller's mistake).
    #[error("{0}")]
    Invalid(String),
    /// The revocation could not be stored (the gateway's fault; retrying may help). Nothing
    /// was revoked.
    #[error(transparent)]
    Store(#[from] IdentityDbError),
}

/// `tether.v1.Callers`.
#[derive(Debug, Clone)]
pub struct CallersApi {
    db: IdentityStore,
    live: Arc<LiveConnections>,
}

impl CallersApi {
    /// Revocations stored in `db`; connections to close from `live`.
    pub fn new(db: impl Into<IdentityStore>, live: Arc<LiveConnections>) -> Self {
        CallersApi {
            db: db.into(),
            live,
        }
    }

    /// The tonic service (callers are authenticated by `auth::Authenticated` around it).
    pub fn into_service(self) -> CallersServer<CallersApi> {
        CallersServer::new(self)
    }
}

#[tonic::async_trait]
impl Callers for CallersApi {
    async fn revoke(
        &self,
        req: Request<v1::RevokeCallerRequest>,
    ) -> Result<Response<v1::RevokeCallerResponse>, Status> {
        const METHOD: &str = "tether.v1.Callers/Revoke";
        let caller = crate::northbound::auth::caller(&req)?;
        caller.authorize_every_tenant(METHOD)?;
        let r = req.into_inner();
        let done = revoke(
            &self.db,
            &self.live,
            &r.name,
            &r.sha256_fingerprint,
            &r.reason,
            &caller.name,
        )
        .await
        .map_err(Status::from)?;
        let target = if r.name.is_empty() {
            done.fingerprint.clone().unwrap_or_default()
        } else {
            r.name.clone()
        };
        caller.audit_allowed_on(
            METHOD,
            "",
            &target,
            &format!("caller revoked: {}", r.reason),
        );
        Ok(Response::new(v1::RevokeCallerResponse {
            name: r.name,
            sha256_fingerprint: done.fingerprint.unwrap_or_default(),
            revoked_at: Some(prost_types::Timestamp::from(from_ms(done.revoked_at_ms))),
            connections_closed: done.closed.len() as u32,
            closed_fingerprints: done.closed,
        }))
    }
}

/// What a caller revocation did.
#[derive(Clone, Debug)]
pub struct CallerRevoked {
    /// The fingerprint revoked, normalized.
    pub fingerprint: Option<String>,
    /// The cut-off (Unix ms).
    pub revoked_at_ms: i64,
    /// Fingerprints of the certificates of the connections closed.
    pub closed: Vec<String>,
}

/// Revokes caller `name` (may be empty) and/or the certificate `fingerprint` (may be empty),
/// then closes the open northbound connections whose certificate is now refused.
pub async fn revoke(
    db: &IdentityStore,
    live: &LiveConnections,
    name: &str,
    fingerprint: &str,
    reason: &str,
    revoked_by: &str,
) -> Result<CallerRevoked, CallerRevokeError> {
    if name.is_empty() && fingerprint.is_empty() {
        return Err(CallerRevokeError::Nothing);
    }
    if reason.len() > MAX_REASON {
        return Err(CallerRevokeError::Invalid(format!(
            "reason is {} bytes long; at most {MAX_REASON} are allowed",
            reason.len()
        )));
    }
    if !name.is_empty() {
        tunnel_proto::identity::check_name("caller name", name)
            .map_err(|e| CallerRevokeError::Invalid(e.to_string()))?;
    }
    let fingerprint = if fingerprint.is_empty() {
        None
    } else {
        Some(normalize_fingerprint(fingerprint).map_err(CallerRevokeError::Invalid)?)
    };
    let now_ms = to_ms(SystemTime::now());
    db.revoke_caller(
        (!name.is_empty()).then(|| name.to_owned()),
        fingerprint.clone(),
        reason.to_owned(),
        revoked_by.to_owned(),
        now_ms,
    )
    .await?;
    // From here on every call with such a certificate is refused; close what is open.
    let closed = close_refused(&db.caller_revocations(), live);
    tracing::warn!(caller = name, fingerprint = ?fingerprint, reason, revoked_by,
        connections_closed = closed.len(), "northbound caller revoked");
    metrics::counter!("tether_gateway_caller_revocations_total").increment(1);
    Ok(CallerRevoked {
        fingerprint,
        revoked_at_ms: now_ms,
        closed,
    })
}

/// Closes the open northbound connections whose certificate `list` refuses; returns their
/// certificates' fingerprints.
pub fn close_refused(list: &CallerRevocationList, live: &LiveConnections) -> Vec<String> {
    live.close_matching(|certs| certs.first().is_some_and(|c| list.refusal_of(c).is_some()))
        .iter()
        .filter_map(|certs| certs.0.first())
        .map(|c| tether_runtime::digest::sha256_hex(c.as_ref()))
        .collect()
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
    fn names_refuse_certificates_up_to_the_cutoff_and_fingerprints_always() {
        let list = CallerRevocationList::default();
        assert!(list.is_empty());
        list.insert_name(
            "billing".into(),
            CallerRevocation {
                revoked_at_ms: 100_500,
                reason: "left".into(),
                revoked_by: "ops".into(),
            },
        );
        list.insert_cert(
            "ff".into(),
            RevokedCallerCert {
                name: String::new(),
                revoked_at_ms: 1,
                reason: String::new(),
                revoked_by: "ops".into(),
            },
        );
        assert!(list.refusal("billing", &facts("00", 100)).is_some());
        assert!(list.refusal("billing", &facts("00", 101)).is_none());
        assert!(list.refusal("other", &facts("00", 1)).is_none());
        let why = list.refusal("other", &facts("ff", 1_000_000)).unwrap();
        assert!(why.contains("ff"), "{why}");
    }

    #[test]
    fn fingerprints_are_normalized() {
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(normalize_fingerprint(&fp).unwrap(), "ab".repeat(32));
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }
}
