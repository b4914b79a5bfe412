//! Feature + backend: forwarding a stream to a replica that holds a session of its agent.
//!
//! The relay asks [`Forwarder::open`] when this replica has no session of the agent. The
//! candidates are the replicas presence says hold one ([`crate::cluster::presence::holders`]),
//! cached in memory so that steady traffic costs PostgreSQL nothing: an agent's entry is
//! dropped when the cluster feed says one of its sessions came or went, when a holder answers
//! that it has none after all, and after a minute at most. A candidate is never a replica
//! whose liveness expired (by the lower bound [`super::PeerRow::alive_until`], whatever rows it
//! left), nor this replica; a draining one only when no other holder is left; those with a
//! link up and not suspect come first, in random order to spread the load.
//!
//! Each attempt opens a stream on the link, writes the [`PeerHeader`] and the stream's own
//! header bytes, and waits for the holder's answer (at most `answer_timeout`, or the call's
//! deadline): `Ok` hands the stream to the relay, a refusal means nothing reached the agent,
//! so the next candidate is tried. None left: UNAVAILABLE naming the agent and what each
//! candidate said.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::seq::SliceRandom;
use sqlx::PgPool;
use tether_runtime::CancellationToken;
use tether_runtime::transport::{RecvStream, SendStream};
use tokio::sync::OnceCell;
use tokio::sync::broadcast::error::RecvError;
use tunnel_proto::stream::Transmit;
use tunnel_proto::{AgentId, ErrorCode};

use crate::cluster::events::{EventFeed, EventKind, FeedItem};
use crate::cluster::presence::{self, Holders};
use crate::peer::Peers;
use crate::peer::link::PeerLink;
use crate::peer::metrics::{self, Direction, PeerFailure};
use crate::peer::wire::{self, AnswerCode, PeerAnswer, PeerHeader, PeerKind};

/// Longest an agent's holders are cached without the feed saying anything about it.
const HOLDERS_TTL: Duration = Duration::from_secs(60);
/// Agents whose holders are cached at most; beyond, the cache starts over.
const HOLDERS_MAX: usize = 100_000;

/// Why a stream could not be forwarded. Each means nothing reached the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// No live replica holds a session of the agent.
    #[error("agent {agent} is not connected to any replica")]
    NoSession {
        /// The agent.
        agent: AgentId,
        /// The cluster has seen it before (else it is unknown).
        known: bool,
    },
    /// Replicas hold sessions of the agent, but none could take the stream (retrying helps
    /// once links or sessions are back).
    #[error(
        "agent {agent} is connected only to replicas this one ({me}) could not reach: {detail}; retry (agents reconnect to reachable replicas)"
    )]
    Unreachable {
        /// The agent.
        agent: AgentId,
        /// This replica.
        me: String,
        /// What each candidate said.
        detail: String,
    },
    /// Every holder refused for want of streams (retry when some have ended).
    #[error("agent {agent}: {detail}")]
    Busy {
        /// The agent.
        agent: AgentId,
        /// What the holders said.
        detail: String,
    },
    /// The call's deadline passed before a holder answered.
    #[error("deadline passed forwarding a stream to agent {0}")]
    Deadline(AgentId),
    /// Which replicas hold the agent could not be read from PostgreSQL.
    #[error("cannot look up which replica holds agent {agent}: {source}; retry")]
    Lookup {
        /// The agent.
        agent: AgentId,
        /// What PostgreSQL said.
        source: sqlx::Error,
    },
}

/// One attempt's failure.
#[derive(Debug)]
enum Attempt {
    /// No session there (presence was behind).
    NotHere(String),
    /// The holder refused for want of streams.
    Busy(String),
    /// The holder refused otherwise, or the stream failed.
    Failed(String),
    /// No answer in time: the link is suspect.
    Timeout,
    /// The call's deadline passed.
    Deadline,
}

/// What [`Forwarder::open`] sends: the stream's kind and who it is for (both for the holder's
/// logs), and its timeout.
#[derive(Clone, Copy, Debug)]
pub struct ForwardRequest<'a> {
    /// The agent.
    pub agent: &'a AgentId,
    /// Who the call acts for.
    pub caller: &'a str,
    /// `grpc` or `tcp`.
    pub stream_kind: &'a str,
    /// The call's deadline.
    pub deadline: Option<Instant>,
    /// Replicas earlier attempts of this call were forwarded to (and came back refused): tried
    /// only when no other holder is left.
    pub avoid: &'a [String],
}

/// See the module docs.
#[derive(Debug)]
pub struct Forwarder {
    peers: Arc<Peers>,
    pool: PgPool,
    cache: Mutex<HashMap<String, Arc<OnceCell<Cached>>>>,
}

#[derive(Clone, Debug)]
struct Cached {
    holders: Holders,
    at: Instant,
}

impl Forwarder {
    /// A forwarder over `peers`, looking holders up in `pool` and dropping what the `feed`
    /// says changed, until `stop`.
    pub fn start(
        peers: Arc<Peers>,
        pool: PgPool,
        feed: &EventFeed,
        stop: CancellationToken,
    ) -> Arc<Forwarder> {
        let fwd = Arc::new(Forwarder {
            peers,
            pool,
            cache: Mutex::default(),
        });
        let rx = feed.subscribe();
        tokio::spawn(follow(Arc::downgrade(&fwd), rx, stop));
        fwd
    }

    /// The peer links.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    fn forget(&self, agent: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(agent);
    }

    fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The agent's holders: cached, or read once for every caller waiting on the same agent.
    async fn holders(&self, agent: &str) -> Result<Holders, sqlx::Error> {
        for _ in 0..2 {
            let cell = {
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= HOLDERS_MAX && !cache.contains_key(agent) {
                    cache.clear();
                }
                cache.entry(agent.to_owned()).or_default().clone()
            };
            let cached = cell
                .get_or_try_init(|| async {
                    let started = Instant::now();
                    let holders = presence::holders(&self.pool, agent).await?;
                    crate::cluster::record_store_latency("presence_holders", started.elapsed());
                    Ok::<_, sqlx::Error>(Cached {
                        holders,
                        at: Instant::now(),
                    })
                })
                .await?;
            if cached.at.elapsed() < HOLDERS_TTL {
                return Ok(cached.holders.clone());
            }
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.get(agent).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                cache.remove(agent);
            }
        }
        presence::holders(&self.pool, agent).await
    }

    /// Opens a stream to `req.agent` through a replica that holds one of its sessions and
    /// writes `header` (what the stream's protocol machine queued: its `StreamHeader`) on it.
    /// On `Ok`, the holder has opened the agent's stream and splices: what is written and read
    /// from here on is the agent's stream protocol.
    pub async fn open(
        &self,
        req: ForwardRequest<'_>,
        header: &[Transmit],
    ) -> Result<(SendStream, RecvStream, String), ForwardError> {
        let agent = req.agent;
        let holders =
            self.holders(&agent.to_string())
                .await
                .map_err(|source| ForwardError::Lookup {
                    agent: agent.clone(),
                    source,
                })?;
        let me = self.peers.me();
        let mut notes: Vec<String> = Vec::new();
        let mut ready: Vec<(Arc<PeerLink>, bool)> = Vec::new();
        for r in holders.replicas.iter().filter(|r| r.as_str() != me) {
            let Some(row) = self.peers.row(r) else {
                notes.push(format!("{r}: not in the replica table"));
                continue;
            };
            if !row.alive() {
                notes.push(format!("{r}: liveness expired"));
                continue;
            }
            match self.peers.link(r) {
                // The link is to a process that has since restarted: it holds nothing now.
                Some(link) if link.epoch().is_some_and(|e| e < row.epoch) => {
                    notes.push(format!("{r}: restarted; its link is being dialed again"))
                }
                Some(link) => ready.push((link, row.draining)),
                None => notes.push(format!("{r}: no peer link")),
            }
        }
        if ready.is_empty() && notes.is_empty() {
            return Err(ForwardError::NoSession {
                agent: agent.clone(),
                known: holders.known,
            });
        }
        ready.shuffle(&mut rand::rng());
        // Stable: shuffled within (not tried by this call, not draining, link healthy) first.
        ready.sort_by_key(|(l, draining)| {
            (
                req.avoid.iter().any(|a| a == l.peer()),
                *draining,
                l.is_suspect(),
            )
        });

        let mut busy = Vec::new();
        for (link, _) in &ready {
            let peer = link.peer();
            metrics::count_forwarded(peer, Direction::Out);
            match self.attempt(link, &req, header).await {
                Ok((send, recv)) => return Ok((send, recv, peer.to_owned())),
                Err(Attempt::Deadline) => return Err(ForwardError::Deadline(agent.clone())),
                Err(Attempt::NotHere(m)) => {
                    metrics::count_failure(peer, PeerFailure::NotHere);
                    self.forget(&agent.to_string());
                    notes.push(format!("{peer}: {m}"));
                }
                Err(Attempt::Busy(m)) => {
                    metrics::count_failure(peer, PeerFailure::Refused);
                    busy.push(format!("{peer}: {m}"));
                }
                Err(Attempt::Failed(m)) => {
                    metrics::count_failure(peer, PeerFailure::Stream);
                    self.forget(&agent.to_string());
                    notes.push(format!("{peer}: {m}"));
                }
                Err(Attempt::Timeout) => {
                    metrics::count_failure(peer, PeerFailure::AnswerTimeout);
                    link.suspect();
                    self.forget(&agent.to_string());
                    notes.push(format!(
                        "{peer}: no answer within {:?}",
                        self.peers.settings().answer_timeout
                    ));
                }
            }
        }
        if !busy.is_empty() && notes.is_empty() {
            return Err(ForwardError::Busy {
                agent: agent.clone(),
                detail: busy.join("; "),
            });
        }
        notes.extend(busy);
        Err(ForwardError::Unreachable {
            agent: agent.clone(),
            me: me.to_owned(),
            detail: notes.join("; "),
        })
    }

    /// One attempt on `link`.
    async fn attempt(
        &self,
        link: &PeerLink,
        req: &ForwardRequest<'_>,
        header: &[Transmit],
    ) -> Result<(SendStream, RecvStream), Attempt> {
        let now = Instant::now();
        let answer_by = now + self.peers.settings().answer_timeout;
        let until = req.deadline.map_or(answer_by, |d| d.min(answer_by));
        let timeout_ms = req.deadline.map_or(0, |d| {
            d.saturating_duration_since(now).as_millis().max(1) as u64
        });
        let mut opened: Option<(SendStream, RecvStream)> = None;
        let exchange = async {
            let (send, recv) = opened.insert(
                link.open()
                    .await
                    .map_err(|e| Attempt::Failed(e.to_string()))?,
            );
            let mut chunks: Vec<Bytes> = vec![wire::encode(&PeerHeader {
                version: wire::VERSION,
                kind: PeerKind::Forward as u32,
                agent: req.agent.to_string(),
                caller: req.caller.to_owned(),
                timeout_ms,
                stream_kind: req.stream_kind.to_owned(),
            })];
            let mut end = None;
            for t in header {
                match t {
                    Transmit::Bytes(b) => chunks.push(b.clone()),
                    other => end = Some(other.clone()),
                }
            }
            send.write_all_chunks(&mut chunks)
                .await
                .map_err(|e| Attempt::Failed(e.to_string()))?;
            match end {
                Some(Transmit::Finish) => {
                    let _ = send.finish();
                }
                Some(Transmit::Reset(code)) => send.reset(code),
                _ => {}
            }
            let answer: PeerAnswer = wire::read(recv)
                .await
                .map_err(|e| Attempt::Failed(e.to_string()))?;
            Ok::<_, Attempt>(answer)
        };
        let exchanged = tokio::time::timeout_at(until.into(), exchange).await;
        let answer = match exchanged {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                abandon(opened);
                return Err(e);
            }
            Err(_) => {
                abandon(opened);
                return Err(if req.deadline.is_some_and(|d| Instant::now() >= d) {
                    Attempt::Deadline
                } else {
                    Attempt::Timeout
                });
            }
        };
        match answer.code() {
            AnswerCode::Ok => Ok(opened.expect("opened before the answer")),
            AnswerCode::NotHere => Err(Attempt::NotHere(answer.message)),
            AnswerCode::TooManyStreams | AnswerCode::NoFreeStream => {
                Err(Attempt::Busy(answer.message))
            }
            AnswerCode::AgentLost | AnswerCode::BadRequest => Err(Attempt::Failed(answer.message)),
        }
    }
}

/// Gives a stream up both ways (the holder then cancels whatever it opened).
fn abandon(opened: Option<(SendStream, RecvStream)>) {
    if let Some((mut send, mut recv)) = opened {
        send.reset(ErrorCode::CANCELLED);
        recv.stop(ErrorCode::CANCELLED);
    }
}

/// Drops cached holders as the feed says sessions come and go, until `stop` (or the
/// forwarder is gone).
async fn follow(
    fwd: std::sync::Weak<Forwarder>,
    mut rx: tokio::sync::broadcast::Receiver<FeedItem>,
    stop: CancellationToken,
) {
    loop {
        let item = tokio::select! {
            _ = stop.cancelled() => return,
            i = rx.recv() => i,
        };
        let Some(fwd) = fwd.upgrade() else { return };
        match item {
            Ok(FeedItem::Event(ev))
                if matches!(ev.kind, EventKind::SessionUp | EventKind::SessionDown) =>
            {
                fwd.forget(&ev.agent)
            }
            Ok(FeedItem::Event(_)) => {}
            Ok(FeedItem::Resync) | Err(RecvError::Lagged(_)) => fwd.forget_all(),
            Err(RecvError::Closed) => return,
        }
    }
}
