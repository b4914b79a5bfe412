//! Backend layer: the gateway's durable identity state, one redb file beside the command store
//! (`<data_dir>/identity.redb`): the revocation list and the enrollment tokens.
//!
//! One file for both, so that revoking an agent and invalidating its pending tokens is one
//! transaction. redb commits are fsync'd before they return (`Durability::Immediate`), and redb
//! runs one write transaction at a time: a token's check-and-mark-used is atomic, so a token is
//! redeemed at most once even when two enrollments race. Writes are rare (a revocation, a
//! token), so there is no writer thread: callers run these methods on a blocking thread.
//!
//! The revocation list is also kept in memory ([`RevocationList`]), loaded at open and updated
//! after each commit, because the TLS verifier consults it synchronously on every handshake.
//!
//! Records are JSON (serde): small, rare, and readable with any redb tool.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tunnel_proto::AgentId;

use crate::revocation::{AgentRevocation, RevocationList, RevokedCert};

/// agent id → [`AgentRevocation`] (JSON).
const REVOKED_AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_agents");
/// certificate SHA-256 fingerprint (hex) → agent id.
const REVOKED_CERTS: TableDefinition<&str, &str> = TableDefinition::new("revoked_certs");
/// token SHA-256 (hex) → [`TokenRecord`] (JSON). The token itself is never stored.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// The file name inside the data directory.
pub const FILE: &str = "identity.redb";

/// How long used, revoked and expired token records are kept (for a clear "already used" or
/// "expired" answer) before they are pruned.
const TOKEN_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

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
    /// Token records decoded so far: the work token operations do, for tests.
    token_rows_read: AtomicU64,
}

impl std::fmt::Debug for IdentityDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityDb").finish_non_exhaustive()
    }
}

impl IdentityDb {
    /// Opens (or creates) `dir/identity.redb` and loads the revocation list.
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
            tx.open_table(TOKENS).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        let list = RevocationList::default();
        {
            let tx = db.begin_read().map_err(backend)?;
            let agents = tx.open_table(REVOKED_AGENTS).map_err(backend)?;
            for row in agents.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                let key = k.value();
                let id: AgentId = key.parse().map_err(|e| IdentityDbError::Corrupt {
                    key: key.to_owned(),
                    detail: format!("{e}"),
                })?;
                list.insert(id, decode(key, v.value())?);
            }
            let certs = tx.open_table(REVOKED_CERTS).map_err(backend)?;
            for row in certs.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                let id: AgentId = v.value().parse().map_err(|e| IdentityDbError::Corrupt {
                    key: k.value().to_owned(),
                    detail: format!("{e}"),
                })?;
                list.insert_cert(k.value().to_owned(), id);
            }
        }
        Ok(IdentityDb {
            db,
            revocations: Arc::new(list),
            token_rows_read: AtomicU64::new(0),
        })
    }

    /// The in-memory revocation list, kept in step with the file.
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.revocations.clone()
    }

    fn write(&self) -> Result<redb::WriteTransaction, IdentityDbError> {
        let mut tx = self.db.begin_write().map_err(backend)?;
        // The default, stated: commit returns only once the data is on disk.
        tx.set_durability(Durability::Immediate).map_err(backend)?;
        Ok(tx)
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
            // Fingerprints revoked earlier stay revoked.
            let mut all: Vec<RevokedCert> = match agents.get(key.as_str()).map_err(backend)? {
                Some(v) => decode::<AgentRevocation>(&key, v.value())?.certificates,
                None => Vec::new(),
            };
            for c in certs {
                if !all.iter().any(|a| a.fingerprint == c.fingerprint) {
                    all.push(c);
                }
            }
            let record = AgentRevocation {
                revoked_at_ms: now_ms,
                reason: reason.to_owned(),
                certificates: all,
            };
            agents
                .insert(key.as_str(), encode(&record).as_slice())
                .map_err(backend)?;
            let mut fps = tx.open_table(REVOKED_CERTS).map_err(backend)?;
            for c in &record.certificates {
                fps.insert(c.fingerprint.as_str(), key.as_str())
                    .map_err(backend)?;
            }
            let mut tokens = tx.open_table(TOKENS).map_err(backend)?;
            let mut pending = Vec::new();
            for row in tokens.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                self.token_rows_read.fetch_add(1, Ordering::Relaxed);
                let t: TokenRecord = decode(k.value(), v.value())?;
                if t.agent == key && t.state == TokenState::Pending {
                    pending.push((k.value().to_owned(), t));
                }
            }
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
        let key = agent.to_string();
        let tx = self.db.begin_read().map_err(backend)?;
        let tokens = tx.open_table(TOKENS).map_err(backend)?;
        for row in tokens.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            self.token_rows_read.fetch_add(1, Ordering::Relaxed);
            if decode::<TokenRecord>(k.value(), v.value())?.agent == key {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Stores a new pending token under `hash` (the SHA-256 of the token, hex), pruning token
    /// records that ended more than a week ago.
    pub fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), IdentityDbError> {
        let tx = self.write()?;
        {
            let mut tokens = tx.open_table(TOKENS).map_err(backend)?;
            let cutoff = record.created_ms - TOKEN_RETENTION_MS;
            let mut stale = Vec::new();
            for row in tokens.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                self.token_rows_read.fetch_add(1, Ordering::Relaxed);
                let t: TokenRecord = decode(k.value(), v.value())?;
                let ended = match t.state {
                    TokenState::Pending => t.expires_ms,
                    _ => t.changed_ms.unwrap_or(t.expires_ms),
                };
                if ended < cutoff {
                    stale.push(k.value().to_owned());
                }
            }
            for k in stale {
                tokens.remove(k.as_str()).map_err(backend)?;
            }
            tokens
                .insert(hash, encode(record).as_slice())
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)
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
            match record.state {
                TokenState::Used => return Ok(Err(RedeemError::Refused(TokenRefusal::Used))),
                TokenState::Revoked => {
                    return Ok(Err(RedeemError::Refused(TokenRefusal::Revoked(
                        record.agent,
                    ))));
                }
                TokenState::Pending => {}
            }
            if now_ms >= record.expires_ms {
                return Ok(Err(RedeemError::Refused(TokenRefusal::Expired)));
            }
            let (value, certificate) = match issue(&record) {
                Ok(v) => v,
                Err(e) => return Ok(Err(RedeemError::Issue(e))),
            };
            record.state = TokenState::Used;
            record.changed_ms = Some(now_ms);
            record.certificate = Some(certificate);
            tokens
                .insert(hash, encode(&record).as_slice())
                .map_err(backend)?;
            (record, value)
        };
        tx.commit().map_err(backend)?;
        Ok(Ok(out))
    }
}

#[cfg(test)]
impl IdentityDb {
    /// Stores many token records in one transaction, as they are (tests only).
    fn put_tokens_for_test(&self, records: &[(String, TokenRecord)]) -> Result<(), IdentityDbError> {
        let tx = self.write()?;
        {
            let mut tokens = tx.open_table(TOKENS).map_err(backend)?;
            for (hash, r) in records {
                tokens
                    .insert(hash.as_str(), encode(r).as_slice())
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }
}

/// Why [`IdentityDb::redeem_token`] issued nothing.
#[derive(Debug)]
pub enum RedeemError<E> {
    /// The token cannot be used.
    Refused(TokenRefusal),
    /// The issuing step failed (the token stays pending).
    Issue(E),
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
        db.put_token("a", &token("t/a", 10_000)).unwrap();
        db.put_token("b", &token("t/b", 10_000)).unwrap();
        assert_eq!(redeem(&db, "a", 2_000).unwrap().state, TokenState::Used);
        assert_eq!(redeem(&db, "a", 2_001), Err(TokenRefusal::Used));
        assert_eq!(redeem(&db, "b", 10_000), Err(TokenRefusal::Expired));
        assert_eq!(redeem(&db, "c", 2_000), Err(TokenRefusal::Unknown));
    }

    #[test]
    fn a_failed_issue_leaves_the_token_pending() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        db.put_token("a", &token("t/a", 10_000)).unwrap();
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
            db.put_token("a", &token("t/a", i64::MAX)).unwrap();
            db.put_token("b", &token("t/b", i64::MAX)).unwrap();
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
        db.put_token("mine1", &token("t/a", i64::MAX)).unwrap();
        db.put_token("mine2", &token("t/a", i64::MAX)).unwrap();
        rows_read(&db);

        let id: AgentId = "t/a".parse().unwrap();
        assert!(db.knows_agent(&id).unwrap());
        let read = rows_read(&db);
        assert!(read <= 2, "knows_agent read {read} token records");

        let (_, invalidated) = db.revoke(&id, "", Vec::new(), 5_000).unwrap();
        assert_eq!(invalidated, 2);
        let read = rows_read(&db);
        assert!(read <= 2, "revoke read {read} token records for an agent with 2");

        db.put_token("mine3", &token("t/b", i64::MAX)).unwrap();
        let read = rows_read(&db);
        assert!(read <= 2, "put_token read {read} token records");
    }
}
