//! Backend: presence, which replica holds which agent session (`agent_sessions`), and the
//! agents ever seen (`agents`).
//!
//! A replica writes a row when a session registers and removes it when the session ends, and
//! in between only when the agent's owner pauses or resumes it (the row's `info` rewritten; no
//! heartbeat reaches PostgreSQL). Changes are queued and written in
//! batches, one transaction for whatever is queued, with one event each on the cluster feed
//! (`SessionUp`/`SessionDown`, the `tether.v1.AgentEvent` as body) so other replicas' watchers
//! see them. A row counts only while its replica is alive: a replica that died leaves rows the
//! queries ignore, and its next process (a new epoch) deletes them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message as _;
use sqlx::postgres::PgPool;
use tether_api::v1;
use tether_runtime::CancellationToken;
use tokio::sync::mpsc;

use super::events::{self, EventFeed, EventKind};
use super::replica::Replica;

/// Changes written per transaction at most.
const BATCH: usize = 512;

/// One presence change.
#[derive(Debug)]
enum Change {
    Up(v1::AgentEvent),
    Down(v1::AgentEvent),
    /// A live session's `info` changed (the agent's pause).
    Update(v1::Session),
}

/// This replica's presence writer.
#[derive(Debug)]
pub struct Presence {
    tx: mpsc::UnboundedSender<Change>,
    replica: Arc<Replica>,
}

impl Presence {
    /// Starts the writer; it runs until `shutdown`, then writes what is queued (best effort).
    pub fn start(
        replica: Arc<Replica>,
        feed: Arc<EventFeed>,
        shutdown: CancellationToken,
    ) -> Arc<Presence> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(replica.clone(), feed, rx, shutdown));
        Arc::new(Presence { tx, replica })
    }

    /// The replica name sessions are recorded under.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Records a session that registered here.
    pub fn up(&self, mut session: v1::Session) {
        session.replica = self.replica.id().name.clone();
        let _ = self.tx.send(Change::Up(v1::AgentEvent {
            kind: v1::agent_event::Kind::Connected as i32,
            agent: session.agent.clone(),
            time: session.connected_at,
            session: Some(session),
            reason: String::new(),
            initial: false,
        }));
    }

    /// Records a change of a live session of this replica (the agent's pause).
    pub fn update(&self, mut session: v1::Session) {
        session.replica = self.replica.id().name.clone();
        let _ = self.tx.send(Change::Update(session));
    }

    /// Records a session of this replica that ended.
    pub fn down(&self, mut session: v1::Session, reason: String) {
        session.replica = self.replica.id().name.clone();
        let _ = self.tx.send(Change::Down(v1::AgentEvent {
            kind: v1::agent_event::Kind::Disconnected as i32,
            agent: session.agent.clone(),
            time: Some(SystemTime::now().into()),
            session: Some(session),
            reason,
            initial: false,
        }));
    }
}

async fn run(
    replica: Arc<Replica>,
    feed: Arc<EventFeed>,
    mut rx: mpsc::UnboundedReceiver<Change>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Change> = Vec::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        if batch.is_empty() {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => batch.push(c),
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        match write(&replica, &batch).await {
            Ok(()) => {
                super::record_store_latency("presence_batch", started.elapsed());
                metrics::histogram!("tether_gateway_presence_batch_size")
                    .record(batch.len() as f64);
                batch.clear();
                backoff = Duration::from_millis(100);
                feed.poke();
            }
            Err(e) => {
                // Kept and retried: a session's row appears (or goes) once PostgreSQL is back.
                tracing::warn!(error = %e, queued = batch.len(), retry_in = ?backoff,
                    "writing session presence failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn write(replica: &Replica, batch: &[Change]) -> Result<(), sqlx::Error> {
    let me = replica.id();
    let mut tx = replica.pool().begin().await?;
    let mut bodies: Vec<(EventKind, String, Vec<u8>)> = Vec::with_capacity(batch.len());
    for change in batch {
        let (kind, ev) = match change {
            Change::Up(ev) => (EventKind::SessionUp, ev),
            Change::Down(ev) => (EventKind::SessionDown, ev),
            Change::Update(s) => {
                // Only this process's own row (a session collected meanwhile stays gone).
                sqlx::query(
                    "UPDATE agent_sessions SET info = $2
                     WHERE session_id = $1 AND replica_id = $3 AND replica_epoch = $4",
                )
                .bind(&s.session_id)
                .bind(s.encode_to_vec())
                .bind(&me.name)
                .bind(me.epoch)
                .execute(&mut *tx)
                .await?;
                continue;
            }
        };
        let Some(s) = &ev.session else { continue };
        let tenant = s.agent.split('/').next().unwrap_or_default();
        match kind {
            EventKind::SessionUp => {
                let connected = s
                    .connected_at
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .unwrap_or_else(SystemTime::now);
                sqlx::query(
                    "INSERT INTO agent_sessions
                         (session_id, replica_id, replica_epoch, agent, tenant, connected_at, info)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (session_id) DO NOTHING",
                )
                .bind(&s.session_id)
                .bind(&me.name)
                .bind(me.epoch)
                .bind(&s.agent)
                .bind(tenant)
                .bind(time::OffsetDateTime::from(connected))
                .bind(s.encode_to_vec())
                .execute(&mut *tx)
                .await?;
            }
            _ => {
                sqlx::query("DELETE FROM agent_sessions WHERE session_id = $1")
                    .bind(&s.session_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(
            "INSERT INTO agents (agent, tenant) VALUES ($1, $2)
             ON CONFLICT (agent) DO UPDATE SET last_seen = now()",
        )
        .bind(&s.agent)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
        bodies.push((kind, s.agent.clone(), ev.encode_to_vec()));
    }
    let refs: Vec<(EventKind, &str, &[u8])> = bodies
        .iter()
        .map(|(k, a, b)| (*k, a.as_str(), b.as_slice()))
        .collect();
    events::append_all(&mut tx, &refs).await?;
    events::notify(&mut tx).await?;
    tx.commit().await
}

/// Which sessions a query wants.
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    /// One agent (`tenant/agent`).
    pub agent: Option<String>,
    /// One tenant.
    pub tenant: Option<String>,
}

/// Live sessions on live replicas, in `(agent, session id)` order.
pub async fn sessions(
    pool: &PgPool,
    filter: &SessionFilter,
) -> Result<Vec<v1::Session>, sqlx::Error> {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT s.info FROM agent_sessions s
         JOIN gateway_replicas r ON r.replica_id = s.replica_id AND r.epoch = s.replica_epoch
         WHERE r.expires_at > now()
           AND ($1::text IS NULL OR s.agent = $1)
           AND ($2::text IS NULL OR s.tenant = $2)
         ORDER BY s.agent, s.session_id",
    )
    .bind(filter.agent.as_deref())
    .bind(filter.tenant.as_deref())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|b| v1::Session::decode(b.as_slice()).ok())
        .collect())
}

/// An agent the cluster has seen: `(agent, last seen)`.
pub async fn agents(
    pool: &PgPool,
    filter: &SessionFilter,
) -> Result<Vec<(String, SystemTime)>, sqlx::Error> {
    let rows: Vec<(String, time::OffsetDateTime)> = sqlx::query_as(
        "SELECT agent, last_seen FROM agents
         WHERE ($1::text IS NULL OR agent = $1) AND ($2::text IS NULL OR tenant = $2)
         ORDER BY agent",
    )
    .bind(filter.agent.as_deref())
    .bind(filter.tenant.as_deref())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(a, t)| (a, t.into())).collect())
}

/// Removes the sessions of replicas dead for longer than `after` (lazily: their rows are
/// ignored meanwhile). Any replica may run it.
pub async fn collect_dead(pool: &PgPool, after: Duration) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM agent_sessions s USING gateway_replicas r
         WHERE r.replica_id = s.replica_id
           AND (r.epoch <> s.replica_epoch OR r.expires_at < now() - $1 * interval '1 millisecond')",
    )
    .bind(after.as_millis() as i64)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Who holds an agent's sessions, for forwarding: the live replicas with one, and whether the
/// cluster has ever seen the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders {
    /// Replicas (`cluster.replica_id`) with a session of the agent, alive when read.
    pub replicas: Vec<String>,
    /// The agent is in `agents` (connected at least once to some replica).
    pub known: bool,
}

/// The live replicas holding a session of `agent`, in one indexed query (the forwarder caches
/// the answer: this runs on a miss, not per call).
pub async fn holders(pool: &PgPool, agent: &str) -> Result<Holders, sqlx::Error> {
    let (replicas, known): (Vec<String>, bool) = sqlx::query_as(
        "SELECT COALESCE((SELECT array_agg(DISTINCT s.replica_id) FROM agent_sessions s
                  JOIN gateway_replicas r
                    ON r.replica_id = s.replica_id AND r.epoch = s.replica_epoch
                  WHERE s.agent = $1 AND r.expires_at > now()), '{}'::text[]),
                EXISTS (SELECT 1 FROM agents WHERE agent = $1)",
    )
    .bind(agent)
    .fetch_one(pool)
    .await?;
    Ok(Holders { replicas, known })
}
