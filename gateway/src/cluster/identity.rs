//! Backend: the identity state on PostgreSQL — agent and caller revocations, enrollment
//! tokens, and the cluster-wide renewal rate — with the semantics of the embedded identity
//! store (`identity_db`), records in the same JSON.
//!
//! Concurrency is PostgreSQL's: a token is redeemed under `SELECT … FOR UPDATE`, so two
//! replicas redeeming one token at once issue one certificate; token creation for one agent is
//! serialized by an advisory transaction lock on the agent, so the pending cap holds across
//! replicas. A revocation appends an event to the cluster feed in its transaction: every
//! replica then reloads that agent's record into its in-memory list and closes its sessions.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use tunnel_proto::AgentId;

use super::events::{self, EventKind};
use crate::identity::callers::{CallerRevocation, CallerRevocationList, RevokedCallerCert};
use crate::identity::db::{
    ENDED_TOKENS_KEPT, IdentityDbError, RedeemError, TokenRecord, TokenRefusal, TokenState,
    TooManyPending,
};
use crate::identity::revocation::{AgentRevocation, RevocationList, RevokedCert};

/// How long token records are kept after they expire (for a clear "already used" or
/// "expired" answer), as in the embedded store.
const TOKEN_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Expired token records pruned at most per token creation.
const PRUNE_BATCH: i64 = 256;

/// Why the identity state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityPgError {
    /// PostgreSQL failed (the gateway's side; retrying may help).
    #[error("identity store (PostgreSQL): {0}")]
    Store(#[from] sqlx::Error),
    /// A stored record could not be decoded.
    #[error("identity store (PostgreSQL): record {key} is corrupt: {detail}")]
    Corrupt {
        /// Its key.
        key: String,
        /// What the decoder said.
        detail: String,
    },
}

impl From<IdentityPgError> for IdentityDbError {
    fn from(e: IdentityPgError) -> Self {
        match e {
            IdentityPgError::Store(e) => IdentityDbError::Backend(format!("PostgreSQL: {e}")),
            IdentityPgError::Corrupt { key, detail } => IdentityDbError::Corrupt { key, detail },
        }
    }
}

/// The identity state on PostgreSQL, with this replica's in-memory revocation lists (the TLS
/// verifier and the northbound authentication read those on every handshake and call). A
/// revocation made here updates them after its commit; one made by another replica reaches
/// them through the cluster feed (`identity::follow`).
#[derive(Debug)]
pub struct PgIdentity {
    pool: PgPool,
    revocations: Arc<RevocationList>,
    callers: Arc<CallerRevocationList>,
}

impl PgIdentity {
    /// Loads every revocation into new lists.
    pub async fn open(pool: PgPool) -> Result<PgIdentity, IdentityPgError> {
        let me = PgIdentity {
            pool,
            revocations: Arc::default(),
            callers: Arc::default(),
        };
        me.reload().await?;
        Ok(me)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The agents' revocation list in memory.
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.revocations.clone()
    }

    /// The callers' revocation list in memory.
    pub fn caller_revocations(&self) -> Arc<CallerRevocationList> {
        self.callers.clone()
    }

    /// Reads every revocation again into the lists (revocations are never lifted, so adding
    /// is enough): after the feed could not be followed.
    pub async fn reload(&self) -> Result<(), IdentityPgError> {
        let all = load(&self.pool).await?;
        for (agent, r) in all.agents {
            self.revocations.insert(agent, r);
        }
        for (fp, agent) in all.certs {
            self.revocations.insert_cert(fp, agent);
        }
        for (name, r) in all.callers {
            self.callers.insert_name(name, r);
        }
        for (fp, r) in all.caller_certs {
            self.callers.insert_cert(fp, r);
        }
        Ok(())
    }

    /// Puts `agent`'s revocation `r` (as stored) into the list.
    pub fn apply_revocation(&self, agent: &AgentId, r: AgentRevocation) {
        for c in &r.certificates {
            self.revocations
                .insert_cert(c.fingerprint.clone(), agent.clone());
        }
        self.revocations.insert(agent.clone(), r);
    }

    /// [`revoke`], then the list updated.
    pub async fn revoke(
        &self,
        agent: &AgentId,
        reason: &str,
        certs: Vec<RevokedCert>,
        now_ms: i64,
    ) -> Result<(AgentRevocation, u32), IdentityPgError> {
        let (record, n) = revoke(&self.pool, agent, reason, certs, now_ms).await?;
        self.apply_revocation(agent, record.clone());
        Ok((record, n))
    }

    /// [`revoke_caller`], then the list updated.
    pub async fn revoke_caller(
        &self,
        name: Option<&str>,
        fingerprint: Option<&str>,
        reason: &str,
        revoked_by: &str,
        now_ms: i64,
    ) -> Result<(), IdentityPgError> {
        let (by_name, by_cert) =
            revoke_caller(&self.pool, name, fingerprint, reason, revoked_by, now_ms).await?;
        if let (Some(n), Some(r)) = (name, by_name) {
            self.callers.insert_name(n.to_owned(), r);
        }
        if let (Some(f), Some(r)) = (fingerprint, by_cert) {
            self.callers.insert_cert(f.to_owned(), r);
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(key: &str, json: &str) -> Result<T, IdentityPgError> {
    serde_json::from_str(json).map_err(|e| IdentityPgError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

/// Everything revoked, for the in-memory lists at start.
#[derive(Debug, Default)]
pub struct Revoked {
    /// Agents and their records.
    pub agents: Vec<(AgentId, AgentRevocation)>,
    /// Revoked certificate fingerprints and their agents.
    pub certs: Vec<(String, AgentId)>,
    /// Revoked caller names.
    pub callers: Vec<(String, CallerRevocation)>,
    /// Revoked caller certificates.
    pub caller_certs: Vec<(String, RevokedCallerCert)>,
}

/// Loads every revocation.
pub async fn load(pool: &PgPool) -> Result<Revoked, IdentityPgError> {
    let mut out = Revoked::default();
    let agents: Vec<(String, String)> =
        sqlx::query_as("SELECT agent, record::text FROM revoked_agents")
            .fetch_all(pool)
            .await?;
    for (a, rec) in agents {
        let id = a.parse::<AgentId>().map_err(|e| IdentityPgError::Corrupt {
            key: a.clone(),
            detail: e.to_string(),
        })?;
        out.agents.push((id, decode(&a, &rec)?));
    }
    let certs: Vec<(String, String)> =
        sqlx::query_as("SELECT fingerprint, agent FROM revoked_certs")
            .fetch_all(pool)
            .await?;
    for (fp, a) in certs {
        if let Ok(id) = a.parse::<AgentId>() {
            out.certs.push((fp, id));
        }
    }
    let callers: Vec<(String, String)> =
        sqlx::query_as("SELECT name, record::text FROM revoked_callers")
            .fetch_all(pool)
            .await?;
    for (n, rec) in callers {
        let r = decode(&n, &rec)?;
        out.callers.push((n, r));
    }
    let caller_certs: Vec<(String, String)> =
        sqlx::query_as("SELECT fingerprint, record::text FROM revoked_caller_certs")
            .fetch_all(pool)
            .await?;
    for (fp, rec) in caller_certs {
        let r = decode(&fp, &rec)?;
        out.caller_certs.push((fp, r));
    }
    Ok(out)
}

/// One agent's revocation, as stored.
pub async fn revocation_of(
    pool: &PgPool,
    agent: &str,
) -> Result<Option<AgentRevocation>, IdentityPgError> {
    let rec: Option<String> =
        sqlx::query_scalar("SELECT record::text FROM revoked_agents WHERE agent = $1")
            .bind(agent)
            .fetch_optional(pool)
            .await?;
    rec.map(|r| decode(agent, &r)).transpose()
}

/// Revokes `agent` as of `now_ms` (certificates valid from then or before are refused, `certs`
/// by fingerprint, its pending tokens invalidated), in one transaction with its event.
/// Returns the stored record and how many tokens were invalidated.
pub async fn revoke(
    pool: &PgPool,
    agent: &AgentId,
    reason: &str,
    certs: Vec<RevokedCert>,
    now_ms: i64,
) -> Result<(AgentRevocation, u32), IdentityPgError> {
    let key = agent.to_string();
    let mut tx = pool.begin().await?;
    let old: Option<String> =
        sqlx::query_scalar("SELECT record::text FROM revoked_agents WHERE agent = $1 FOR UPDATE")
            .bind(&key)
            .fetch_optional(&mut *tx)
            .await?;
    let previous = match old {
        Some(r) => Some(decode::<AgentRevocation>(&key, &r)?),
        None => None,
    };
    let record = AgentRevocation::renewed(previous, reason, certs, now_ms);
    let json = encode(&record);
    sqlx::query(
        "INSERT INTO revoked_agents (agent, record) VALUES ($1, $2::jsonb)
         ON CONFLICT (agent) DO UPDATE SET record = excluded.record",
    )
    .bind(&key)
    .bind(&json)
    .execute(&mut *tx)
    .await?;
    for c in &record.certificates {
        sqlx::query(
            "INSERT INTO revoked_certs (fingerprint, agent) VALUES ($1, $2)
             ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(&c.fingerprint)
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    }
    let pending = tokens_of(&mut tx, &key, true).await?;
    let mut invalidated = 0u32;
    for (hash, mut t) in pending {
        if t.state != TokenState::Pending {
            continue;
        }
        t.state = TokenState::Revoked;
        t.changed_ms = Some(now_ms);
        update_token(&mut tx, &hash, &t).await?;
        invalidated += 1;
    }
    events::append(&mut tx, EventKind::Revocation, &key, json.as_bytes()).await?;
    events::notify(&mut tx).await?;
    tx.commit().await?;
    Ok((record, invalidated))
}

/// True when the cluster has anything on `agent`: a revocation, an enrollment token, or a
/// session on any replica, ever (`agents`).
pub async fn knows_agent(pool: &PgPool, agent: &str) -> Result<bool, IdentityPgError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM revoked_agents WHERE agent = $1)
             OR EXISTS (SELECT 1 FROM enrollment_tokens WHERE agent = $1)
             OR EXISTS (SELECT 1 FROM agents WHERE agent = $1)",
    )
    .bind(agent)
    .fetch_one(pool)
    .await?)
}

async fn tokens_of(
    conn: &mut PgConnection,
    agent: &str,
    for_update: bool,
) -> Result<Vec<(String, TokenRecord)>, IdentityPgError> {
    let sql = if for_update {
        "SELECT hash, record::text FROM enrollment_tokens WHERE agent = $1 FOR UPDATE"
    } else {
        "SELECT hash, record::text FROM enrollment_tokens WHERE agent = $1"
    };
    let rows: Vec<(String, String)> = sqlx::query_as(sql)
        .bind(agent)
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter()
        .map(|(h, r)| decode(&h, &r).map(|t| (h, t)))
        .collect()
}

async fn update_token(
    conn: &mut PgConnection,
    hash: &str,
    t: &TokenRecord,
) -> Result<(), IdentityPgError> {
    sqlx::query("UPDATE enrollment_tokens SET record = $2::jsonb WHERE hash = $1")
        .bind(hash)
        .bind(encode(t))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores a new pending token under `hash` unless its agent already has `max_pending`
/// pending, unexpired tokens (checked under a per-agent lock, so replicas creating tokens
/// for one agent at once cannot overshoot). Prunes on the way as the embedded store does.
pub async fn put_token(
    pool: &PgPool,
    hash: &str,
    record: &TokenRecord,
    max_pending: u32,
) -> Result<Result<(), TooManyPending>, IdentityPgError> {
    let now = record.created_ms;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
        .bind(format!("tether-token:{}", record.agent))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM enrollment_tokens WHERE hash IN (
             SELECT hash FROM enrollment_tokens WHERE expires_ms < $1 LIMIT $2)",
    )
    .bind(now - TOKEN_RETENTION_MS)
    .bind(PRUNE_BATCH)
    .execute(&mut *tx)
    .await?;
    let (live, mut ended): (Vec<_>, Vec<_>) = tokens_of(&mut tx, &record.agent, false)
        .await?
        .into_iter()
        .partition(|(_, t)| t.is_live(now));
    if live.len() >= max_pending as usize {
        return Ok(Err(TooManyPending {
            agent: record.agent.clone(),
            pending: live.len() as u32,
        }));
    }
    ended.sort_by_key(|(_, t)| std::cmp::Reverse(t.created_ms));
    for (h, _) in ended.iter().skip(ENDED_TOKENS_KEPT) {
        sqlx::query("DELETE FROM enrollment_tokens WHERE hash = $1")
            .bind(h)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO enrollment_tokens (hash, agent, expires_ms, record)
         VALUES ($1, $2, $3, $4::jsonb)",
    )
    .bind(hash)
    .bind(&record.agent)
    .bind(record.expires_ms)
    .bind(encode(record))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Redeems the token under `hash` if it is pending and unexpired; `issue` runs while the
/// token's row is locked, and the token is marked used only when it succeeds.
pub async fn redeem_token<T, E>(
    pool: &PgPool,
    hash: &str,
    now_ms: i64,
    issue: impl FnOnce(&TokenRecord) -> Result<(T, String), E>,
) -> Result<Result<(TokenRecord, T), RedeemError<E>>, IdentityPgError> {
    let mut tx = pool.begin().await?;
    let row: Option<String> =
        sqlx::query_scalar("SELECT record::text FROM enrollment_tokens WHERE hash = $1 FOR UPDATE")
            .bind(hash)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(row) = row else {
        return Ok(Err(RedeemError::Refused(TokenRefusal::Unknown)));
    };
    let mut record: TokenRecord = decode(hash, &row)?;
    let value = match record.redeem(now_ms, issue) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    update_token(&mut tx, hash, &record).await?;
    tx.commit().await?;
    Ok(Ok((record, value)))
}

/// Revokes caller certificates (by name: valid from `now_ms` or before; by fingerprint),
/// with an event so every replica updates its list.
pub async fn revoke_caller(
    pool: &PgPool,
    name: Option<&str>,
    fingerprint: Option<&str>,
    reason: &str,
    revoked_by: &str,
    now_ms: i64,
) -> Result<(Option<CallerRevocation>, Option<RevokedCallerCert>), IdentityPgError> {
    let mut tx = pool.begin().await?;
    let by_name = name.map(|_| CallerRevocation {
        revoked_at_ms: now_ms,
        reason: reason.to_owned(),
        revoked_by: revoked_by.to_owned(),
    });
    let by_cert = fingerprint.map(|_| RevokedCallerCert {
        name: name.unwrap_or_default().to_owned(),
        revoked_at_ms: now_ms,
        reason: reason.to_owned(),
        revoked_by: revoked_by.to_owned(),
    });
    if let (Some(n), Some(r)) = (name, &by_name) {
        sqlx::query(
            "INSERT INTO revoked_callers (name, record) VALUES ($1, $2::jsonb)
             ON CONFLICT (name) DO UPDATE SET record = excluded.record",
        )
        .bind(n)
        .bind(encode(r))
        .execute(&mut *tx)
        .await?;
    }
    if let (Some(f), Some(r)) = (fingerprint, &by_cert) {
        sqlx::query(
            "INSERT INTO revoked_caller_certs (fingerprint, record) VALUES ($1, $2::jsonb)
             ON CONFLICT (fingerprint) DO UPDATE SET record = excluded.record",
        )
        .bind(f)
        .bind(encode(r))
        .execute(&mut *tx)
        .await?;
    }
    events::append(&mut tx, EventKind::CallerRevocation, "", b"").await?;
    events::notify(&mut tx).await?;
    tx.commit().await?;
    Ok((by_name, by_cert))
}

/// Takes the right to issue `agent` a renewed certificate now: false when one was issued to
/// it, by any replica, less than `min_interval_ms` ago.
pub async fn take_renewal(
    pool: &PgPool,
    agent: &str,
    now_ms: i64,
    min_interval_ms: i64,
) -> Result<bool, IdentityPgError> {
    let taken: Option<i64> = sqlx::query_scalar(
        "INSERT INTO renewals (agent, last_issued_ms) VALUES ($1, $2)
         ON CONFLICT (agent) DO UPDATE SET last_issued_ms = excluded.last_issued_ms
             WHERE renewals.last_issued_ms <= $2 - $3
         RETURNING last_issued_ms",
    )
    .bind(agent)
    .bind(now_ms)
    .bind(min_interval_ms)
    .fetch_optional(pool)
    .await?;
    Ok(taken.is_some())
}
