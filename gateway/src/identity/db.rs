//! Backend layer: the gateway's durable identity state, one redb file beside the command store
//! (`<data_dir>/identity.redb`): the revocation lists (agents, and northbound callers) and the
//! enrollment tokens.
//!
//! One file for both, so that revoking an agent and invalidating its pending tokens is one
//! transaction. redb commits are fsync'd before they return (`Durability::Immediate`), and redb
//! runs one write transaction at a time: a token's check-and-mark-used is atomic, so a token is
//! redeemed at most once even when two enrollments race. Writes are rare (a revocation, a
//! token), so there is no writer thread: callers run these methods on a blocking thread.
//!
//! Tokens are indexed by agent (`tokens_by_agent`) and by expiry (`tokens_by_expiry`), both
//! kept in the transactions that change the tokens, so that creating a token, revoking an agent
//! and asking whether an agent is known read only that agent's tokens, whatever the size of the
//! table: one tenant's tokens cannot slow another's revocation inside the single write lock.
//! Files written before the indexes existed are indexed once, at open (`meta.schema`).
//!
//! The revocation lists are also kept in memory ([`RevocationList`], [`CallerRevocationList`]),
//! loaded at open and updated after each commit, because the TLS verifier and the northbound
//! authentication consult them synchronously on every handshake or call.
//!
//! Records are JSON (serde): small, rare, and readable with any redb tool.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{
    Database, Durability, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, TableDefinition,
};
use serde::{Deserialize, Serialize};
use tunnel_proto::AgentId;

use crate::identity::callers::{CallerRevocation, CallerRevocationList, RevokedCallerCert};
use crate::identity::revocation::{AgentRevocation, RevocationList, RevokedCert};

/// agent id → [`AgentRevocation`] (JSON).
const REVOKED_AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_agents");
/// certificate SHA-256 fingerprint (hex) → agent id.
const REVOKED_CERTS: TableDefinition<&str, &str> = TableDefinition::new("revoked_certs");
/// token SHA-256 (hex) → [`TokenRecord`] (JSON). The token itself is never stored.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// agent id → the SHA-256 of each of its tokens.
const TOKENS_BY_AGENT: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("tokens_by_agent");
/// (expiry in Unix ms, token SHA-256) → nothing: tokens in the order they can be pruned.
const TOKENS_BY_EXPIRY: TableDefinition<(i64, &str), ()> = TableDefinition::new("tokens_by_expiry");
/// control-plane caller name → [`CallerRevocation`] (JSON).
const REVOKED_CALLERS: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_callers");
/// caller certificate SHA-256 fingerprint (hex) → [`RevokedCallerCert`] (JSON).
const REVOKED_CALLER_CERTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("revoked_caller_certs");
/// `schema` → the version of the tables above this file holds.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// 2: the token indexes exist and are complete.
const SCHEMA: u64 = 2;

/// The file name inside the data directory.
pub const FILE: &str = "identity.redb";

/// How long token records are kept after they expire (for a clear "already used" or "expired"
/// answer) before they are pruned.
const TOKEN_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Records pruned at most per token creation, so one creation never pays for a long backlog.
const PRUNE_BATCH: usize = 256;

/// Ended tokens (used, revoked, expired) of one agent kept for their clear answer; older ones
/// are pruned when the agent gets a new token, so an agent's tokens stay few.
pub const ENDED_TOKENS_KEPT: usize = 8;

/// Why the identity store failed: the gateway's fault (disk, corruption), never the caller's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityDbError {
    /// The database refused an operation (IO error, corruption, full disk).
    #[error("identity store: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("identity store: record {key} is corrupt: {detail}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What the decoder said.
        detail: String,
    },
}

fn backend(e: impl std::fmt::Display) -> IdentityDbError {
    IdentityDbError::Backend(e.to_string())
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, IdentityDbError> {
    serde_json::from_slice(bytes).map_err(|e| IdentityDbError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// Where an enrollment token stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Not used yet (it may have expired: see `expires_ms`).
    Pending,
    /// Redeemed once; it never works again.
    Used,
    /// Invalidated by a revocation of its agent.
    Revoked,
}

/// One enrollment token, stored under the SHA-256 of the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The identity a certificate issued for this token carries, `<tenant>/<agent>`.
    pub agent: String,
    /// When it was created (Unix ms).
    pub created_ms: i64,
    /// When it stops working (Unix ms).
    pub expires_ms: i64,
    /// Pending, used or revoked.
    pub state: TokenState,
    /// When it was used or revoked (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_ms: Option<i64>,
    /// The control-plane caller that created it.
    #[serde(default)]
    pub created_by: String,
    /// For a used token: the fingerprint of the certificate issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

impl TokenRecord {
    /// Pending and not expired at `now_ms`: it can still be redeemed.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.state == TokenState::Pending && now_ms < self.expires_ms
    }
}

/// [`IdentityDb::put_token`] refused: the agent has as many live tokens as it may.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent {agent} has {pending} pending enrollment tokens, the limit (limits.pending_tokens_per_agent): use one, or wait until one expires"
)]
pub struct TooManyPending {
    /// The agent.
    pub agent: String,
    /// Its pending, unexpired tokens.
    pub pending: u32,
}

/// Why a token cannot be redeemed. Each is the caller's (the agent's operator's) to fix: a new
/// token is needed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// No token with this hash was ever issued (or it was pruned long after it ended).
    #[error("unknown enrollment token")]
    Unknown,
    /// The token was redeemed already.
    #[error("enrollment token already used (tokens are single-use)")]
    Used,
    /// The token's expiry passed.
    #[error("enrollment token expired")]
    Expired,
    /// The token's agent was revoked after the token was created.
    #[error("enrollment token invalidated: agent {0} was revoked")]
    Revoked(String),
}

/// See the module docs.
pub struct IdentityDb {
    db: Database,
    revocations: Arc<RevocationList>,
    callers: Arc<CallerRevocationList>,
    /// Token records decoded so far: the work token operations do, for tests.
    token_rows_read: AtomicU64,
}

impl std::fmt::Debug for IdentityDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityDb").finish_non_exhaustive()
    }
}

fn corrupt(key: &str) -> impl FnOnce(tunnel_proto::IdentityError) -> IdentityDbError + '_ {
    move |e| IdentityDbError::Corrupt {
        key: key.to_owned(),
        detail: format!("{e}"),
    }
}

/// Stores `record` under `hash` with its index entries.
fn insert_token(
    tx: &redb::WriteTransaction,
    hash: &str,
    record: &TokenRecord,
) -> Result<(), IdentityDbError> {
    tx.open_table(TOKENS)
        .map_err(backend)?
        .insert(hash, encode(record).as_slice())
        .map_err(backend)?;
    tx.open_multimap_table(TOKENS_BY_AGENT)
        .map_err(backend)?
        .insert(record.agent.as_str(), hash)
        .map_err(backend)?;
    tx.open_table(TOKENS_BY_EXPIRY)
        .map_err(backend)?
        .insert((record.expires_ms, hash), ())
        .map_err(backend)?;
    Ok(())
}

/// Removes the token stored under `hash` (`record` is what is stored) and its index entries.
fn remove_token(
    tx: &redb::WriteTransaction,
    hash: &str,
    record: &TokenRecord,
) -> Result<(), IdentityDbError> {
    tx.open_table(TOKENS)
        .map_err(backend)?
        .remove(hash)
        .map_err(backend)?;
    tx.open_multimap_table(TOKENS_BY_AGENT)
        .map_err(backend)?
        .remove(record.agent.as_str(), hash)
        .map_err(backend)?;
    tx.open_table(TOKENS_BY_EXPIRY)
        .map_err(backend)?
        .remove((record.expires_ms, hash))
        .map_err(backend)?;
    Ok(())
}

impl IdentityDb {
    /// Opens (or creates) `dir/identity.redb`, indexes its tokens if an older gateway wrote it,
    /// and loads the revocation lists.
    pub fn open(dir: &Path) -> Result<IdentityDb, IdentityDbError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| IdentityDbError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let db = Database::create(&path)
            .map_err(|e| IdentityDbError::Backend(format!("opening {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(backend)?;
        {
            tx.open_table(REVOKED_AGENTS).map_err(backend)?;
            tx.open_table(REVOKED_CERTS).map_err(backend)?;
            tx.open_table(REVOKED_CALLERS).map_err(backend)?;
            tx.open_table(REVOKED_CALLER_CERTS).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            let schema = meta.get("schema").map_err(backend)?.map(|v| v.value());
            if schema.unwrap_or(0) < SCHEMA {
                let indexed = index_tokens(&tx)?;
                if indexed > 0 {
                    tracing::info!(file = %path.display(), tokens = indexed,
                        "identity store: enrollment tokens indexed by agent and expiry");
                }
                meta.insert("schema", SCHEMA).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)?;
        let list = RevocationList::default();
        let callers = CallerRevocationList::default();
        {
            let tx = db.begin_read().map_err(backend)?;
            let agents = tx.open_table(REVOKED_AGENTS).map_err(backend)?;
            for row in agents.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                let key = k.value();
                let id: AgentId = key.parse().map_err(corrupt(key))?;
                list.insert(id, decode(key, v.value())?);
            }
            let certs = tx.open_table(REVOKED_CERTS).map_err(backend)?;
            for row in certs.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                let id: AgentId = v.value().parse().map_err(corrupt(k.value()))?;
                list.insert_cert(k.value().to_owned(), id);
            }
            let names = tx.open_table(REVOKED_CALLERS).map_err(backend)?;
            for row in names.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                callers.insert_name(k.value().to_owned(), decode(k.value(), v.value())?);
            }
            let fps = tx.open_table(REVOKED_CALLER_CERTS).map_err(backend)?;
            for row in fps.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                callers.insert_cert(k.value().to_owned(), decode(k.value(), v.value())?);
            }
        }
        Ok(IdentityDb {
            db,
            revocations: Arc::new(list),
            callers: Arc::new(callers),
            token_rows_read: AtomicU64::new(0),
        })
    }

    /// The in-memory revocation list, kept in step with the file.
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.revocations.clone()
    }

    /// The in-memory list of revoked northbound callers, kept in step with the file.
    pub fn caller_revocations(&self) -> Arc<CallerRevocationList> {
        self.callers.clone()
    }

    fn write(&self) -> Result<redb::WriteTransaction, IdentityDbError> {
        let mut tx = self.db.begin_write().map_err(backend)?;
        // The default, stated: commit returns only once the data is on disk.
        tx.set_durability(Durability::Immediate).map_err(backend)?;
        Ok(tx)
    }

    /// The tokens of `agent` (through the index), each with its hash.
    fn tokens_of(
        &self,
        tx: &redb::WriteTransaction,
        agent: &str,
    ) -> Result<Vec<(String, TokenRecord)>, IdentityDbError> {
        let hashes: Vec<String> = {
            let index = tx.open_multimap_table(TOKENS_BY_AGENT).map_err(backend)?;
            let mut out = Vec::new();
            for h in index.get(agent).map_err(backend)? {
                out.push(h.map_err(backend)?.value().to_owned());
            }
            out
        };
        let tokens = tx.open_table(TOKENS).map_err(backend)?;
        let mut out = Vec::with_capacity(hashes.len());
        for h in hashes {
            if let Some(v) = tokens.get(h.as_str()).map_err(backend)? {
                self.token_rows_read.fetch_add(1, Ordering::Relaxed);
                let t: TokenRecord = decode(&h, v.value())?;
                out.push((h, t));
            }
        }
        Ok(out)
    }

    /// Revokes `agent` as of `now_ms`: certificates valid from then or before are refused, and
    /// so are `certs` by fingerprint; its pending tokens are invalidated. Durable when it
    /// returns; the in-memory list is updated after the commit. Returns the stored record and
    /// the number of tokens invalidated.
    pub fn revoke(
        &self,
        agent: &AgentId,
        reason: &str,
        certs: Vec<RevokedCert>,
        now_ms: i64,
    ) -> Result<(AgentRevocation, u32), IdentityDbError> {
        let key = agent.to_string();
        let tx = self.write()?;
        let (record, invalidated) = {
            let mut agents = tx.open_table(REVOKED_AGENTS).map_err(backend)?;
            let previous = match agents.get(key.as_str()).map_err(backend)? {
                Some(v) => Some(decode::<AgentRevocation>(&key, v.value())?),
                None => None,
            };
            let record = AgentRevocation::renewed(previous, reason, certs, now_ms);
            agents
                .insert(key.as_str(), encode(&record).as_slice())
                .map_err(backend)?;
            let mut fps = tx.open_table(REVOKED_CERTS).map_err(backend)?;
            for c in &record.certificates {
                fps.insert(c.fingerprint.as_str(), key.as_str())
                    .map_err(backend)?;
            }
            let pending: Vec<(String, TokenRecord)> = self
                .tokens_of(&tx, &key)?
                .into_iter()
                .filter(|(_, t)| t.state == TokenState::Pending)
                .collect();
            let mut tokens = tx.open_table(TOKENS).map_err(backend)?;
            for (k, mut t) in pending.iter().cloned() {
                t.state = TokenState::Revoked;
                t.changed_ms = Some(now_ms);
                tokens
                    .insert(k.as_str(), encode(&t).as_slice())
                    .map_err(backend)?;
            }
            (record, pending.len() as u32)
        };
        tx.commit().map_err(backend)?;
        for c in &record.certificates {
            self.revocations
                .insert_cert(c.fingerprint.clone(), agent.clone());
        }
        self.revocations.insert(agent.clone(), record.clone());
        Ok((record, invalidated))
    }

    /// True when the store has anything on `agent`: a revocation or an enrollment token.
    pub fn knows_agent(&self, agent: &AgentId) -> Result<bool, IdentityDbError> {
        if self.revocations.revocation(agent).is_some() {
            return Ok(true);
        }
        let tx = self.db.begin_read().map_err(backend)?;
        let index = tx.open_multimap_table(TOKENS_BY_AGENT).map_err(backend)?;
        let known = !index
            .get(agent.to_string().as_str())
            .map_err(backend)?
            .is_empty();
        Ok(known)
    }

    /// Stores a new pending token under `hash` (the SHA-256 of the token, hex), unless its
    /// agent already has `max_pending` pending, unexpired tokens. Prunes on the way: token
    /// records that expired more than a week ago (a bounded batch), and the agent's ended
    /// tokens beyond the newest [`ENDED_TOKENS_KEPT`]. Reads only the agent's own tokens.
    pub fn put_token(
        &self,
        hash: &str,
        record: &TokenRecord,
        max_pending: u32,
    ) -> Result<Result<(), TooManyPending>, IdentityDbError> {
        let now = record.created_ms;
        let tx = self.write()?;
        self.prune_expired(&tx, now - TOKEN_RETENTION_MS)?;
        let (live, mut ended): (Vec<_>, Vec<_>) = self
            .tokens_of(&tx, &record.agent)?
            .into_iter()
            .partition(|(_, t)| t.is_live(now));
        if live.len() >= max_pending as usize {
            return Ok(Err(TooManyPending {
                agent: record.agent.clone(),
                pending: live.len() as u32,
            }));
        }
        // Newest first: the ones an operator may still ask about.
        ended.sort_by_key(|(_, t)| std::cmp::Reverse(t.created_ms));
        for (h, t) in ended.iter().skip(ENDED_TOKENS_KEPT) {
            remove_token(&tx, h, t)?;
        }
        insert_token(&tx, hash, record)?;
        tx.commit().map_err(backend)?;
        Ok(Ok(()))
    }

    /// Removes up to [`PRUNE_BATCH`] token records that expired before `cutoff_ms`.
    fn prune_expired(
        &self,
        tx: &redb::WriteTransaction,
        cutoff_ms: i64,
    ) -> Result<(), IdentityDbError> {
        let stale: Vec<(i64, String)> = {
            let by_expiry = tx.open_table(TOKENS_BY_EXPIRY).map_err(backend)?;
            let mut out = Vec::new();
            for row in by_expiry
                .range::<(i64, &str)>(..(cutoff_ms, ""))
                .map_err(backend)?
                .take(PRUNE_BATCH)
            {
                let (k, _) = row.map_err(backend)?;
                let (at, h) = k.value();
                out.push((at, h.to_owned()));
            }
            out
        };
        for (at, h) in stale {
            let record = {
                let tokens = tx.open_table(TOKENS).map_err(backend)?;
                let v = tokens.get(h.as_str()).map_err(backend)?;
                match v {
                    Some(v) => {
                        self.token_rows_read.fetch_add(1, Ordering::Relaxed);
                        Some(decode::<TokenRecord>(&h, v.value())?)
                    }
                    None => None,
                }
            };
            match record {
                Some(r) => remove_token(tx, &h, &r)?,
                // An index entry without its record: drop the entry.
                None => {
                    tx.open_table(TOKENS_BY_EXPIRY)
                        .map_err(backend)?
                        .remove((at, h.as_str()))
                        .map_err(backend)?;
                }
            }
        }
        Ok(())
    }

    /// Redeems the token stored under `hash` if it is pending, unexpired and its agent was not
    /// revoked since; `issue` then runs inside the same write transaction (so nobody else can
    /// redeem it meanwhile) and returns what to record as the certificate issued. The token is
    /// marked used only when `issue` succeeds. Returns the token's record and `issue`'s value.
    pub fn redeem_token<T, E>(
        &self,
        hash: &str,
        now_ms: i64,
        issue: impl FnOnce(&TokenRecord) -> Result<(T, String), E>,
    ) -> Result<Result<(TokenRecord, T), RedeemError<E>>, IdentityDbError> {
        let tx = self.write()?;
        let out = {
            let mut tokens = tx.open_table(TOKENS).map_err(backend)?;
            let Some(v) = tokens.get(hash).map_err(backend)? else {
                return Ok(Err(RedeemError::Refused(TokenRefusal::Unknown)));
            };
            let mut record: TokenRecord = decode(hash, v.value())?;
            drop(v);
            let value = match record.redeem(now_ms, issue) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            tokens
                .insert(hash, encode(&record).as_slice())
                .map_err(backend)?;
            (record, value)
        };
        tx.commit().map_err(backend)?;
        Ok(Ok(out))
    }

    /// Revokes northbound caller certificates: every certificate of `name` valid from
    /// `now_ms` or before (when `name` is given), and the certificate with `fingerprint`
    /// (when given). Durable when it returns; the in-memory list is updated after the commit.
    pub fn revoke_caller(
        &self,
        name: Option<&str>,
        fingerprint: Option<&str>,
        reason: &str,
        revoked_by: &str,
        now_ms: i64,
    ) -> Result<(), IdentityDbError> {
        let tx = self.write()?;
        let by_name = name.map(|n| {
            (
                n.to_owned(),
                CallerRevocation {
                    revoked_at_ms: now_ms,
                    reason: reason.to_owned(),
                    revoked_by: revoked_by.to_owned(),
                },
            )
        });
        let by_cert = fingerprint.map(|f| {
            (
                f.to_owned(),
                RevokedCallerCert {
                    name: name.unwrap_or_default().to_owned(),
                    revoked_at_ms: now_ms,
                    reason: reason.to_owned(),
                    revoked_by: revoked_by.to_owned(),
                },
            )
        });
        if let Some((n, r)) = &by_name {
            tx.open_table(REVOKED_CALLERS)
                .map_err(backend)?
                .insert(n.as_str(), encode(r).as_slice())
                .map_err(backend)?;
        }
        if let Some((f, r)) = &by_cert {
            tx.open_table(REVOKED_CALLER_CERTS)
                .map_err(backend)?
                .insert(f.as_str(), encode(r).as_slice())
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        if let Some((n, r)) = by_name {
            self.callers.insert_name(n, r);
        }
        if let Some((f, r)) = by_cert {
            self.callers.insert_cert(f, r);
        }
        Ok(())
    }
}

/// Builds the token indexes from the tokens table (a file written before they existed).
fn index_tokens(tx: &redb::WriteTransaction) -> Result<usize, IdentityDbError> {
    let all: Vec<(String, TokenRecord)> = {
        let tokens = tx.open_table(TOKENS).map_err(backend)?;
        let mut out = Vec::new();
        for row in tokens.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            out.push((k.value().to_owned(), decode(k.value(), v.value())?));
        }
        out
    };
    let mut by_agent = tx.open_multimap_table(TOKENS_BY_AGENT).map_err(backend)?;
    let mut by_expiry = tx.open_table(TOKENS_BY_EXPIRY).map_err(backend)?;
    for (h, t) in &all {
        by_agent
            .insert(t.agent.as_str(), h.as_str())
            .map_err(backend)?;
        by_expiry
            .insert((t.expires_ms, h.as_str()), ())
            .map_err(backend)?;
    }
    Ok(all.len())
}

/// Why [`IdentityDb::redeem_token`] issued nothing.
#[derive(Debug)]
pub enum RedeemError<E> {
    /// The token cannot be used.
    Refused(TokenRefusal),
    /// The issuing step failed (the token stays pending).
    Issue(E),
}

impl TokenRecord {
    /// Uses this token, read under the store's lock, if it is pending and unexpired at
    /// `now_ms`: `issue` signs the certificate, and only when it succeeds is the record marked
    /// used with it (the caller writes the record back in the same transaction). Both stores
    /// redeem through this.
    pub fn redeem<T, E>(
        &mut self,
        now_ms: i64,
        issue: impl FnOnce(&TokenRecord) -> Result<(T, String), E>,
    ) -> Result<T, RedeemError<E>> {
        match self.state {
            TokenState::Used => return Err(RedeemError::Refused(TokenRefusal::Used)),
            TokenState::Revoked => {
                return Err(RedeemError::Refused(TokenRefusal::Revoked(
                    self.agent.clone(),
                )));
            }
            TokenState::Pending => {}
        }
        if now_ms >= self.expires_ms {
            return Err(RedeemError::Refused(TokenRefusal::Expired));
        }
        let (value, certificate) = issue(self).map_err(RedeemError::Issue)?;
        self.state = TokenState::Used;
        self.changed_ms = Some(now_ms);
        self.certificate = Some(certificate);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(agent: &str, expires_ms: i64) -> TokenRecord {
        TokenRecord {
            agent: agent.into(),
            created_ms: 1_000,
            expires_ms,
            state: TokenState::Pending,
            changed_ms: None,
            created_by: "test".into(),
            certificate: None,
        }
    }

    fn put(db: &IdentityDb, hash: &str, t: &TokenRecord) {
        db.put_token(hash, t, 100).unwrap().unwrap();
    }

    fn redeem(db: &IdentityDb, hash: &str, now: i64) -> Result<TokenRecord, TokenRefusal> {
        match db
            .redeem_token(hash, now, |_| Ok::<_, ()>(((), "fp".to_owned())))
            .unwrap()
        {
            Ok((r, ())) => Ok(r),
            Err(RedeemError::Refused(r)) => Err(r),
            Err(RedeemError::Issue(())) => unreachable!(),
        }
    }

    #[test]
    fn a_token_is_redeemed_once_and_not_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        put(&db, "a", &token("t/a", 10_000));
        put(&db, "b", &token("t/b", 10_000));
        assert_eq!(redeem(&db, "a", 2_000).unwrap().state, TokenState::Used);
        assert_eq!(redeem(&db, "a", 2_001), Err(TokenRefusal::Used));
        assert_eq!(redeem(&db, "b", 10_000), Err(TokenRefusal::Expired));
        assert_eq!(redeem(&db, "c", 2_000), Err(TokenRefusal::Unknown));
    }

    #[test]
    fn a_failed_issue_leaves_the_token_pending() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        put(&db, "a", &token("t/a", 10_000));
        let r = db
            .redeem_token("a", 2_000, |_| Err::<((), String), _>("bad csr"))
            .unwrap();
        assert!(matches!(r, Err(RedeemError::Issue("bad csr"))));
        assert!(redeem(&db, "a", 2_000).is_ok());
    }

    #[test]
    fn revocation_survives_reopen_and_invalidates_pending_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let id: AgentId = "t/a".parse().unwrap();
        {
            let db = IdentityDb::open(dir.path()).unwrap();
            put(&db, "a", &token("t/a", i64::MAX));
            put(&db, "b", &token("t/b", i64::MAX));
            let cert = RevokedCert {
                fingerprint: "ff".into(),
                serial: "01".into(),
            };
            let (rec, n) = db.revoke(&id, "stolen", vec![cert], 5_000).unwrap();
            assert_eq!((rec.revoked_at_ms, n), (5_000, 1));
            assert_eq!(
                redeem(&db, "a", 6_000),
                Err(TokenRefusal::Revoked("t/a".into()))
            );
            assert!(redeem(&db, "b", 6_000).is_ok());
        }
        let db = IdentityDb::open(dir.path()).unwrap();
        let list = db.revocations();
        let rec = list.revocation(&id).expect("revocation reloaded");
        assert_eq!((rec.revoked_at_ms, rec.reason.as_str()), (5_000, "stolen"));
        assert!(list.is_cert_revoked("ff"));
        assert!(db.knows_agent(&id).unwrap());
        assert!(db.knows_agent(&"t/b".parse().unwrap()).unwrap());
        assert!(!db.knows_agent(&"t/c".parse().unwrap()).unwrap());
    }

    impl IdentityDb {
        /// Stores many token records in one transaction, with their index entries.
        fn put_tokens_for_test(
            &self,
            records: &[(String, TokenRecord)],
        ) -> Result<(), IdentityDbError> {
            let tx = self.write()?;
            for (hash, r) in records {
                insert_token(&tx, hash, r)?;
            }
            tx.commit().map_err(backend)
        }
    }

    /// Work done by token operations since the last call.
    fn rows_read(db: &IdentityDb) -> u64 {
        db.token_rows_read.swap(0, Ordering::Relaxed)
    }

    #[test]
    fn revoking_creating_and_looking_up_read_only_the_agents_own_tokens() {
        const OTHERS: usize = 5_000;
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        // One transaction for the many: the test is about what the operations below read.
        let many: Vec<(String, TokenRecord)> = (0..OTHERS)
            .map(|i| (format!("h{i}"), token(&format!("other/a{i}"), i64::MAX)))
            .collect();
        db.put_tokens_for_test(&many).unwrap();
        put(&db, "mine1", &token("t/a", i64::MAX));
        put(&db, "mine2", &token("t/a", i64::MAX));
        rows_read(&db);

        let id: AgentId = "t/a".parse().unwrap();
        assert!(db.knows_agent(&id).unwrap());
        let read = rows_read(&db);
        assert!(read <= 2, "knows_agent read {read} token records");

        let (_, invalidated) = db.revoke(&id, "", Vec::new(), 5_000).unwrap();
        assert_eq!(invalidated, 2);
        let read = rows_read(&db);
        assert!(
            read <= 2,
            "revoke read {read} token records for an agent with 2"
        );

        put(&db, "mine3", &token("t/b", i64::MAX));
        let read = rows_read(&db);
        assert!(read <= 2, "put_token read {read} token records");
    }

    #[test]
    fn pending_tokens_per_agent_are_capped_and_ended_ones_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        for i in 0..3 {
            db.put_token(&format!("p{i}"), &token("t/a", 50_000), 3)
                .unwrap()
                .unwrap();
        }
        let refused = db.put_token("p3", &token("t/a", 50_000), 3).unwrap();
        let e = refused.unwrap_err();
        assert_eq!(e.pending, 3);
        assert!(
            e.to_string().contains("limits.pending_tokens_per_agent"),
            "{e}"
        );
        // Another agent is not affected; a used token frees a place.
        db.put_token("q", &token("t/b", 50_000), 3)
            .unwrap()
            .unwrap();
        redeem(&db, "p0", 2_000).unwrap();
        db.put_token("p4", &token("t/a", 50_000), 3)
            .unwrap()
            .unwrap();

        // Expired tokens free their place too, and only the newest ended ones are kept.
        for i in 0..20 {
            let mut t = token("t/c", 0);
            t.created_ms = 1_000 + 10 * i;
            t.expires_ms = t.created_ms + 1;
            db.put_token(&format!("e{i}"), &t, 3).unwrap().unwrap();
        }
        let tx = db.write().unwrap();
        let left = db.tokens_of(&tx, "t/c").unwrap();
        drop(tx);
        assert!(left.len() <= ENDED_TOKENS_KEPT + 3, "{} kept", left.len());
        assert!(left.iter().any(|(h, _)| h == "e19"), "the newest is kept");
    }

    #[test]
    fn tokens_expired_beyond_retention_are_pruned_when_a_token_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        put(&db, "old", &token("t/a", 2_000));
        let mut later = token("t/b", i64::MAX);
        later.created_ms = 2_000 + TOKEN_RETENTION_MS + 1;
        put(&db, "new", &later);
        assert_eq!(
            redeem(&db, "old", later.created_ms),
            Err(TokenRefusal::Unknown)
        );
        assert!(!db.knows_agent(&"t/a".parse().unwrap()).unwrap());
    }

    #[test]
    fn a_file_without_token_indexes_is_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What a gateway before the indexes wrote: tokens only, no schema.
            let db = Database::create(dir.path().join(FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut tokens = tx.open_table(TOKENS).unwrap();
                let t = encode(&token("t/a", i64::MAX));
                tokens.insert("h1", t.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let db = IdentityDb::open(dir.path()).unwrap();
        let id: AgentId = "t/a".parse().unwrap();
        assert!(db.knows_agent(&id).unwrap());
        let (_, invalidated) = db.revoke(&id, "", Vec::new(), 5_000).unwrap();
        assert_eq!(
            invalidated, 1,
            "the old token is found through the new index"
        );
        assert_eq!(
            redeem(&db, "h1", 6_000),
            Err(TokenRefusal::Revoked("t/a".into()))
        );
    }

    #[test]
    fn caller_revocations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = IdentityDb::open(dir.path()).unwrap();
            db.revoke_caller(Some("billing"), None, "left", "ops", 10_000)
                .unwrap();
            db.revoke_caller(None, Some("ab12"), "lost", "ops", 11_000)
                .unwrap();
        }
        let db = IdentityDb::open(dir.path()).unwrap();
        let list = db.caller_revocations();
        assert_eq!(list.name("billing").unwrap().reason, "left");
        assert_eq!(list.cert("ab12").unwrap().reason, "lost");
        assert!(list.name("other").is_none());
    }
}
