//! Backend seam: where the identity state lives (revocations of agents and callers,
//! enrollment tokens, the renewal rate), one of two stores with the same semantics:
//! - **embedded** ([`IdentityDb`], `identity.redb` in `data_dir`): one gateway, no server;
//! - **PostgreSQL** ([`PgIdentity`], with `store.dsn`): every replica shares it, so a token
//!   redeemed at one replica is refused at every other, and a revocation made at one reaches
//!   every replica's lists through the cluster feed (`identity::follow`).
//!
//! An enum rather than a trait object: the token redemption is generic over what the issuing
//! step returns, and there are exactly these two.

use std::sync::Arc;
use std::time::Duration;

use tunnel_proto::AgentId;

use crate::cluster::identity::PgIdentity;
use crate::identity::callers::CallerRevocationList;
use crate::identity::db::{IdentityDb, IdentityDbError, RedeemError, TokenRecord, TooManyPending};
use crate::identity::revocation::{AgentRevocation, RevocationList, RevokedCert};

/// How long the renewal rate may wait for PostgreSQL before the replica's own memory decides
/// alone: renewal runs on the session's driver, which must not stall its heartbeats.
const RENEWAL_RATE_WAIT: Duration = Duration::from_millis(500);

/// See the module docs.
#[derive(Clone, Debug)]
pub enum IdentityStore {
    /// `identity.redb` in `data_dir`.
    Embedded(Arc<IdentityDb>),
    /// The cluster's PostgreSQL.
    Postgres(Arc<PgIdentity>),
}

impl From<Arc<IdentityDb>> for IdentityStore {
    fn from(db: Arc<IdentityDb>) -> Self {
        IdentityStore::Embedded(db)
    }
}

impl From<Arc<PgIdentity>> for IdentityStore {
    fn from(db: Arc<PgIdentity>) -> Self {
        IdentityStore::Postgres(db)
    }
}

fn joined(e: tokio::task::JoinError) -> IdentityDbError {
    IdentityDbError::Backend(e.to_string())
}

impl IdentityStore {
    /// The agents' revocation list in memory, kept in step with the store.
    pub fn revocations(&self) -> Arc<RevocationList> {
        match self {
            IdentityStore::Embedded(db) => db.revocations(),
            IdentityStore::Postgres(db) => db.revocations(),
        }
    }

    /// The callers' revocation list in memory, kept in step with the store.
    pub fn caller_revocations(&self) -> Arc<CallerRevocationList> {
        match self {
            IdentityStore::Embedded(db) => db.caller_revocations(),
            IdentityStore::Postgres(db) => db.caller_revocations(),
        }
    }

    /// Revokes `agent` (see [`IdentityDb::revoke`]); the list is updated when it returns.
    pub async fn revoke(
        &self,
        agent: &AgentId,
        reason: &str,
        certs: Vec<RevokedCert>,
        now_ms: i64,
    ) -> Result<(AgentRevocation, u32), IdentityDbError> {
        match self {
            IdentityStore::Embedded(db) => {
                let (db, id, reason) = (db.clone(), agent.clone(), reason.to_owned());
                tokio::task::spawn_blocking(move || db.revoke(&id, &reason, certs, now_ms))
                    .await
                    .map_err(joined)?
            }
            IdentityStore::Postgres(db) => Ok(db.revoke(agent, reason, certs, now_ms).await?),
        }
    }

    /// True when the store has anything on `agent` (with PostgreSQL: also a session on any
    /// replica, ever).
    pub async fn knows_agent(&self, agent: &AgentId) -> Result<bool, IdentityDbError> {
        match self {
            IdentityStore::Embedded(db) => {
                let (db, id) = (db.clone(), agent.clone());
                tokio::task::spawn_blocking(move || db.knows_agent(&id))
                    .await
                    .map_err(joined)?
            }
            IdentityStore::Postgres(db) => {
                Ok(crate::cluster::identity::knows_agent(db.pool(), &agent.to_string()).await?)
            }
        }
    }

    /// Stores a new pending token (see [`IdentityDb::put_token`]).
    pub async fn put_token(
        &self,
        hash: String,
        record: TokenRecord,
        max_pending: u32,
    ) -> Result<Result<(), TooManyPending>, IdentityDbError> {
        match self {
            IdentityStore::Embedded(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || db.put_token(&hash, &record, max_pending))
                    .await
                    .map_err(joined)?
            }
            IdentityStore::Postgres(db) => {
                Ok(
                    crate::cluster::identity::put_token(db.pool(), &hash, &record, max_pending)
                        .await?,
                )
            }
        }
    }

    /// Redeems a token at most once, store-wide (see [`IdentityDb::redeem_token`]): `issue`
    /// runs while the token is held, and it is marked used only when `issue` succeeds.
    pub async fn redeem_token<T, E, F>(
        &self,
        hash: String,
        now_ms: i64,
        issue: F,
    ) -> Result<Result<(TokenRecord, T), RedeemError<E>>, IdentityDbError>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&TokenRecord) -> Result<(T, String), E> + Send + 'static,
    {
        match self {
            IdentityStore::Embedded(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || db.redeem_token(&hash, now_ms, issue))
                    .await
                    .map_err(joined)?
            }
            IdentityStore::Postgres(db) => {
                Ok(crate::cluster::identity::redeem_token(db.pool(), &hash, now_ms, issue).await?)
            }
        }
    }

    /// Revokes caller certificates (see [`IdentityDb::revoke_caller`]); the list is updated
    /// when it returns.
    pub async fn revoke_caller(
        &self,
        name: Option<String>,
        fingerprint: Option<String>,
        reason: String,
        revoked_by: String,
        now_ms: i64,
    ) -> Result<(), IdentityDbError> {
        match self {
            IdentityStore::Embedded(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || {
                    db.revoke_caller(
                        name.as_deref(),
                        fingerprint.as_deref(),
                        &reason,
                        &revoked_by,
                        now_ms,
                    )
                })
                .await
                .map_err(joined)?
            }
            IdentityStore::Postgres(db) => Ok(db
                .revoke_caller(
                    name.as_deref(),
                    fingerprint.as_deref(),
                    &reason,
                    &revoked_by,
                    now_ms,
                )
                .await?),
        }
    }

    /// With PostgreSQL, takes the cluster-wide right to renew `agent`'s certificate now:
    /// `Some(false)` when any replica renewed it less than `min_interval` ago. `None` when
    /// this replica's memory decides alone: the embedded store, or PostgreSQL not answering
    /// within half a second (renewal must not stall the session asking for it), or a runtime
    /// that cannot wait in place.
    pub fn take_renewal(
        &self,
        agent: &AgentId,
        now_ms: i64,
        min_interval: Duration,
    ) -> Option<bool> {
        let IdentityStore::Postgres(db) = self else {
            return None;
        };
        let handle = tokio::runtime::Handle::try_current().ok()?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        let (pool, agent) = (db.pool().clone(), agent.to_string());
        let taken = tokio::task::block_in_place(|| {
            handle.block_on(async {
                tokio::time::timeout(
                    RENEWAL_RATE_WAIT,
                    crate::cluster::identity::take_renewal(
                        &pool,
                        &agent,
                        now_ms,
                        min_interval.as_millis() as i64,
                    ),
                )
                .await
            })
        });
        match taken {
            Ok(Ok(t)) => Some(t),
            Ok(Err(e)) => {
                tracing::warn!(%agent, error = %e,
                    "renewal rate: PostgreSQL failed; this replica's memory decides");
                None
            }
            Err(_) => {
                tracing::warn!(%agent, "renewal rate: PostgreSQL did not answer in time; this replica's memory decides");
                None
            }
        }
    }
}
