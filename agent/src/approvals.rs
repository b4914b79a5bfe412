//! Feature layer: approvals. A command whose kind is in `approvals.kinds` does not run when it
//! arrives: the agent tells the gateway it waits (the command's state becomes
//! `AWAITING_APPROVAL`) and holds it until someone in the customer's cluster decides, with
//! `tether-agent approve <id>` or `tether-agent reject <id> --reason …` on the agent's pod
//! (through the loopback ops endpoint). Approved, it runs; rejected, it ends `FAILED` with
//! "rejected by the data plane's owner: <reason>" and never runs. A command not decided before
//! its TTL (the gateway says when, in the delivery's header) is forgotten here as the gateway
//! ends it `EXPIRED`.
//!
//! The waits and the decisions are kept in `state_dir/approvals.json` (rewritten whole, atomically,
//! at each change), so a restart, a reconnect or a redelivery keeps them: a decision made while
//! the gateway is unreachable applies at the next delivery. Each wait, decision and expiry is a
//! ledger record, with the payload's SHA-256 (what was approved). An entry goes once the command's
//! outcome is in the executor's record (which answers any later redelivery).
//!
//! `approvals.kinds` reloads live; a kind taken off the list lets its waiting commands run (the
//! ledger says the config approved them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ledger::{Entry, Ledger};

/// The file under `state_dir` holding the waits and decisions.
pub const FILE: &str = "approvals.json";

/// The message of a rejected command's result.
pub fn rejection(reason: &str) -> String {
    format!("rejected by the data plane's owner: {reason}")
}

/// Where a waiting command stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Nobody decided yet.
    Pending,
    /// Approved: it runs at its next delivery.
    Approved {
        /// Who.
        by: String,
        /// When (Unix ms).
        at_ms: u64,
    },
    /// Rejected: it ends failed with the reason.
    Rejected {
        /// Who.
        by: String,
        /// Why.
        reason: String,
        /// When (Unix ms).
        at_ms: u64,
    },
}

/// A command held for approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The command id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// SHA-256 of its payload, hex.
    pub payload_sha256: String,
    /// When it first arrived (Unix ms).
    pub received_ms: u64,
    /// When its TTL ends (Unix ms), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecideError {
    /// No command of that id waits here.
    #[error(
        "no command {0} is waiting for approval in this agent (`tether-agent approvals` lists those that are)"
    )]
    NotFound(String),
    /// It was decided already.
    #[error("command {id} was already {what} by {by}")]
    Decided {
        /// The command id.
        id: String,
        /// `approved` or `rejected`.
        what: &'static str,
        /// By whom.
        by: String,
    },
    /// A rejection needs a reason.
    #[error("a rejection needs a reason (--reason): the vendor sees it in the command's result")]
    NoReason,
    /// The decision could not be written to `state_dir`.
    #[error("the decision could not be written to {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The kinds that need approval, the waits, and a feed of changes (a decision, a reload).
#[derive(Debug)]
pub struct Approvals {
    kinds: RwLock<BTreeSet<String>>,
    book: Mutex<BTreeMap<String, Request>>,
    file: Option<PathBuf>,
    ledger: Ledger,
    changed: watch::Sender<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Approvals {
    /// Approvals for `kinds`, with the waits kept in `state_dir` (an unreadable file is
    /// refused, naming it: dropping the waits silently would lose decisions, a rejection too).
    pub fn new(
        kinds: &[String],
        state_dir: Option<&Path>,
        ledger: Ledger,
    ) -> Result<Approvals, crate::error::AgentError> {
        let file = state_dir.map(|d| d.join(FILE));
        let mut book = BTreeMap::new();
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let list: Vec<Request> = serde_json::from_slice(&bytes).map_err(|e| {
                        crate::error::AgentError::Io {
                            what: format!(
                                "reading {} (the commands waiting for approval; fix or remove it: removing it forgets every wait and decision)",
                                path.display()
                            ),
                            source: std::io::Error::other(e),
                        }
                    })?;
                    book = list.into_iter().map(|r| (r.id.clone(), r)).collect();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(crate::error::AgentError::Io {
                        what: format!("reading {}", path.display()),
                        source,
                    });
                }
            }
        }
        Ok(Approvals {
            kinds: RwLock::new(kinds.iter().cloned().collect()),
            book: Mutex::new(book),
            file,
            ledger,
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Request>> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether commands of `kind` wait for approval.
    pub fn required(&self, kind: &str) -> bool {
        self.kinds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(kind)
    }

    /// The kinds that need approval, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.kinds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A reload's `approvals.kinds`: waiters of a kind no longer listed go on.
    pub fn set_kinds(&self, kinds: &[String]) {
        *self.kinds.write().unwrap_or_else(|e| e.into_inner()) = kinds.iter().cloned().collect();
        self.changed.send_modify(|n| *n += 1);
    }

    /// Follows decisions and reloads.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Writes the book; the caller holds its lock.
    fn persist(&self, book: &BTreeMap<String, Request>) -> Result<(), DecideError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let io = |source| DecideError::Io {
            path: path.display().to_string(),
            source,
        };
        let list: Vec<&Request> = book.values().collect();
        let json = serde_json::to_vec_pretty(&list).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Drops waits whose TTL ended (the gateway ended them `EXPIRED`); the caller holds the lock.
    fn prune(&self, book: &mut BTreeMap<String, Request>) -> bool {
        let now = now_ms();
        let gone: Vec<Request> = book
            .values()
            .filter(|r| r.decision == Decision::Pending && r.expires_ms.is_some_and(|e| e <= now))
            .cloned()
            .collect();
        for r in &gone {
            book.remove(&r.id);
            tracing::info!(command = %r.id, kind = %r.kind, "the command's TTL ended before anyone approved it: forgotten (the gateway ends it EXPIRED)");
            self.record(r, "expired", "", "");
        }
        !gone.is_empty()
    }

    fn record(&self, r: &Request, decision: &str, by: &str, reason: &str) {
        self.ledger.record(Entry::Approval {
            id: r.id.clone(),
            command_kind: r.kind.clone(),
            payload_sha256: r.payload_sha256.clone(),
            decision: decision.to_owned(),
            by: by.to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// The decision on command `id`, entering a wait for it when none is kept (recorded in the
    /// ledger and in `state_dir`). A kind taken off `approvals.kinds` meanwhile is approved by
    /// the config.
    pub fn request(
        &self,
        id: &str,
        kind: &str,
        payload_sha256: &str,
        expires_ms: Option<u64>,
    ) -> Result<Decision, DecideError> {
        let mut book = self.lock();
        let pruned = self.prune(&mut book);
        if let Some(r) = book.get(id) {
            if r.decision == Decision::Pending && !self.required(kind) {
                return Ok(Decision::Approved {
                    by: "config (approvals.kinds no longer lists this kind)".into(),
                    at_ms: now_ms(),
                });
            }
            if pruned {
                self.persist(&book)?;
            }
            return Ok(r.decision.clone());
        }
        if expires_ms.is_some_and(|e| e <= now_ms()) {
            // Its TTL ended on the way here: the gateway ends it.
            return Ok(Decision::Pending);
        }
        let r = Request {
            id: id.to_owned(),
            kind: kind.to_owned(),
            payload_sha256: payload_sha256.to_owned(),
            received_ms: now_ms(),
            expires_ms,
            decision: Decision::Pending,
        };
        book.insert(id.to_owned(), r.clone());
        if let Err(e) = self.persist(&book) {
            book.remove(id);
            return Err(e);
        }
        metrics::gauge!("tether_agent_commands_awaiting_approval").set(pending(&book) as f64);
        tracing::warn!(command = %id, %kind, payload_sha256, "command waits for approval: `tether-agent approve {id}` or `tether-agent reject {id} --reason …`");
        self.record(&r, "awaiting", "", "");
        Ok(Decision::Pending)
    }

    /// Approves (`reason` = `None`) or rejects command `id`.
    pub fn decide(&self, id: &str, by: &str, reject: Option<&str>) -> Result<Request, DecideError> {
        if reject.is_some_and(|r| r.trim().is_empty()) {
            return Err(DecideError::NoReason);
        }
        let mut book = self.lock();
        self.prune(&mut book);
        let Some(r) = book.get(id).cloned() else {
            return Err(DecideError::NotFound(id.to_owned()));
        };
        match &r.decision {
            Decision::Pending => {}
            Decision::Approved { by, .. } => {
                return Err(DecideError::Decided {
                    id: id.to_owned(),
                    what: "approved",
                    by: by.clone(),
                });
            }
            Decision::Rejected { by, .. } => {
                return Err(DecideError::Decided {
                    id: id.to_owned(),
                    what: "rejected",
                    by: by.clone(),
                });
            }
        }
        let by = if by.trim().is_empty() {
            "unnamed (tether-agent on the agent's pod)".to_owned()
        } else {
            by.trim().to_owned()
        };
        let mut decided = r.clone();
        decided.decision = match reject {
            None => Decision::Approved {
                by: by.clone(),
                at_ms: now_ms(),
            },
            Some(reason) => Decision::Rejected {
                by: by.clone(),
                reason: reason.trim().to_owned(),
                at_ms: now_ms(),
            },
        };
        book.insert(id.to_owned(), decided.clone());
        if let Err(e) = self.persist(&book) {
            book.insert(id.to_owned(), r);
            return Err(e);
        }
        metrics::gauge!("tether_agent_commands_awaiting_approval").set(pending(&book) as f64);
        match reject {
            None => {
                tracing::warn!(command = %id, kind = %r.kind, %by, "command approved: it runs at its delivery");
                self.record(&r, "approved", &by, "");
            }
            Some(reason) => {
                tracing::warn!(command = %id, kind = %r.kind, %by, reason, "command rejected: it ends failed without running");
                self.record(&r, "rejected", &by, reason.trim());
            }
        }
        drop(book);
        self.changed.send_modify(|n| *n += 1);
        Ok(decided)
    }

    /// Forgets the wait of command `id`, which the gateway withdrew (cancelled, or expired
    /// there): recorded in the ledger.
    pub fn withdraw(&self, id: &str) {
        let mut book = self.lock();
        let Some(r) = book.remove(id) else { return };
        if let Err(e) = self.persist(&book) {
            tracing::error!(command = %id, error = %e, "could not forget a withdrawn approval");
        }
        metrics::gauge!("tether_agent_commands_awaiting_approval").set(pending(&book) as f64);
        // At its TTL (within a second: the two clocks): the gateway expired it.
        let expired = r.expires_ms.is_some_and(|e| e <= now_ms() + 1000);
        tracing::info!(command = %id, kind = %r.kind, expired, "the gateway withdrew the command (cancelled or expired): its wait is forgotten");
        self.record(&r, if expired { "expired" } else { "withdrawn" }, "", "");
    }

    /// Forgets command `id` once its outcome is in the executor's record.
    pub fn forget(&self, id: &str) {
        let mut book = self.lock();
        if book.remove(id).is_some() {
            if let Err(e) = self.persist(&book) {
                tracing::error!(command = %id, error = %e, "could not forget a decided approval");
            }
            metrics::gauge!("tether_agent_commands_awaiting_approval").set(pending(&book) as f64);
        }
    }

    /// Every wait and undecided-yet-unrun decision, oldest first.
    pub fn list(&self) -> Vec<Request> {
        let mut book = self.lock();
        if self.prune(&mut book)
            && let Err(e) = self.persist(&book)
        {
            tracing::error!(error = %e, "could not write the approvals file");
        }
        let mut v: Vec<Request> = book.values().cloned().collect();
        v.sort_by_key(|r| r.received_ms);
        v
    }

    /// How many commands wait for a decision.
    pub fn pending(&self) -> usize {
        pending(&self.lock())
    }
}

fn pending(book: &BTreeMap<String, Request>) -> usize {
    book.values()
        .filter(|r| r.decision == Decision::Pending)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_decisions_survive_a_restart_and_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = vec!["deploy".to_owned()];
        let a = Approvals::new(&kinds, Some(dir.path()), Ledger::disabled()).unwrap();
        assert!(a.required("deploy") && !a.required("echo"));
        assert_eq!(
            a.request("c1", "deploy", "ab", None).unwrap(),
            Decision::Pending
        );
        assert_eq!(
            a.request("c2", "deploy", "cd", None).unwrap(),
            Decision::Pending
        );
        assert_eq!(a.pending(), 2);
        assert!(matches!(
            a.decide("c1", "", Some("  ")),
            Err(DecideError::NoReason)
        ));
        a.decide("c1", "alice", None).unwrap();
        a.decide("c2", "bob", Some("not during the freeze"))
            .unwrap();
        assert!(matches!(
            a.decide("c2", "carol", None),
            Err(DecideError::Decided {
                what: "rejected",
                ..
            })
        ));
        assert!(matches!(
            a.decide("nope", "carol", None),
            Err(DecideError::NotFound(_))
        ));
        // A restart keeps both decisions.
        let b = Approvals::new(&kinds, Some(dir.path()), Ledger::disabled()).unwrap();
        assert!(matches!(
            b.request("c1", "deploy", "ab", None).unwrap(),
            Decision::Approved { by, .. } if by == "alice"
        ));
        assert!(matches!(
            b.request("c2", "deploy", "cd", None).unwrap(),
            Decision::Rejected { reason, .. } if reason == "not during the freeze"
        ));
        b.forget("c1");
        b.forget("c2");
        assert!(b.list().is_empty());
        let c = Approvals::new(&kinds, Some(dir.path()), Ledger::disabled()).unwrap();
        assert!(c.list().is_empty());
    }

    #[test]
    fn a_wait_past_its_ttl_is_forgotten_and_a_kind_taken_off_the_list_goes_on() {
        let a = Approvals::new(&["deploy".to_owned()], None, Ledger::disabled()).unwrap();
        a.request("old", "deploy", "", Some(now_ms() + 60_000))
            .unwrap();
        a.request("new", "deploy", "", None).unwrap();
        assert_eq!(a.list().len(), 2);
        // Its TTL ends.
        a.lock().get_mut("old").unwrap().expires_ms = Some(now_ms() - 1);
        let left: Vec<String> = a.list().into_iter().map(|r| r.id).collect();
        assert_eq!(left, vec!["new".to_owned()]);
        assert!(matches!(
            a.decide("old", "x", None),
            Err(DecideError::NotFound(_))
        ));
        let rx = a.subscribe();
        a.set_kinds(&[]);
        assert!(rx.has_changed().unwrap());
        assert!(matches!(
            a.request("new", "deploy", "", None).unwrap(),
            Decision::Approved { by, .. } if by.starts_with("config")
        ));
    }

    #[test]
    fn an_unreadable_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "{not json").unwrap();
        let e = Approvals::new(&[], Some(dir.path()), Ledger::disabled()).unwrap_err();
        assert!(e.to_string().contains(FILE), "{e}");
    }
}
