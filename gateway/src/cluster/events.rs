//! Backend: the cluster's event feed, `cluster_events`: how a replica learns what the others
//! did (command transitions, sessions up and down, revocations, lease hand-overs).
//!
//! Writers append rows inside the transaction that makes the change, and send one
//! `NOTIFY tether_cluster` per transaction (a wake-up with no payload). Each replica runs one
//! [`EventFeed`]: it reads new rows when notified and at least every [`POLL_EVERY`] (so a lost
//! notification delays, never loses), and hands them to its subscribers in one order every
//! replica agrees on.
//!
//! Why the rows are read in `(xid, seq)` order, and only below `pg_snapshot_xmin`: a sequence
//! hands out numbers in call order, but transactions commit in another, so "everything after
//! the last number I saw" skips a row whose transaction committed late. Every transaction
//! older than the oldest one still running has ended, so no row can appear below that line
//! any more: reading only below it, in xid order, misses nothing and reads nothing twice. The
//! price: a transaction left open elsewhere on the same PostgreSQL holds the feed back (it
//! waits, nothing is lost); Tether's own transactions are short.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{PgConnection, Row as _};
use tether_runtime::CancellationToken;
use tokio::sync::{Notify, broadcast};

use super::db::DbError;

/// The NOTIFY channel.
pub const CHANNEL: &str = "tether_cluster";
/// Longest a replica goes without reading the feed, notified or not.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// Rows read per query.
const BATCH: i64 = 1000;
/// How long rows are kept. A replica that could not read for longer has been fenced long
/// before (its liveness timeout is seconds) and starts over from the tables.
pub const RETENTION: Duration = Duration::from_secs(600);
/// Events buffered per subscriber before it lags (and must start over from the tables).
const BUFFER: usize = 16 * 1024;

/// What an event is about. Stored as a `smallint`; never renumbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i16)]
pub enum EventKind {
    /// A command was created or changed state; body: the command record.
    Command = 1,
    /// A session registered; body: `tether.v1.Session`.
    SessionUp = 2,
    /// A session ended; body: `tether.v1.Session` (its last state).
    SessionDown = 3,
    /// An agent (or a certificate) was revoked; body: the revocation record.
    Revocation = 4,
    /// An agent's command lease was released or taken; no body.
    Lease = 5,
    /// A caller certificate was revoked; body: the revocation record.
    CallerRevocation = 6,
}

impl EventKind {
    fn from_i16(v: i16) -> Option<EventKind> {
        Some(match v {
            1 => EventKind::Command,
            2 => EventKind::SessionUp,
            3 => EventKind::SessionDown,
            4 => EventKind::Revocation,
            5 => EventKind::Lease,
            6 => EventKind::CallerRevocation,
            _ => return None,
        })
    }
}

/// One row of the feed.
#[derive(Clone, Debug)]
pub struct ClusterEvent {
    /// What it is about.
    pub kind: EventKind,
    /// The agent concerned (`tenant/agent`), or empty.
    pub agent: String,
    /// Kind-specific bytes.
    pub body: Bytes,
}

/// Appends an event in the caller's transaction (it becomes visible with it).
pub async fn append(
    conn: &mut PgConnection,
    kind: EventKind,
    agent: &str,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO cluster_events (kind, agent, body) VALUES ($1, $2, $3)")
        .bind(kind as i16)
        .bind(agent)
        .bind(body)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Appends many events in the caller's transaction, in order, in one statement.
pub async fn append_all(
    conn: &mut PgConnection,
    events: &[(EventKind, &str, &[u8])],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let kinds: Vec<i16> = events.iter().map(|e| e.0 as i16).collect();
    let agents: Vec<&str> = events.iter().map(|e| e.1).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.2).collect();
    // unnest keeps the arrays' order, and the identity column numbers rows in insert order.
    sqlx::query(
        "INSERT INTO cluster_events (kind, agent, body)
         SELECT * FROM unnest($1::smallint[], $2::text[], $3::bytea[])",
    )
    .bind(&kinds)
    .bind(&agents)
    .bind(&bodies)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Wakes every replica's feed when the caller's transaction commits (one per transaction is
/// enough: identical notifications in a transaction collapse into one anyway).
pub async fn notify(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Where a reader is in the feed: the last `(xid, seq)` read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    xid: i64,
    seq: i64,
}

/// The position of "now": every event after it is from a transaction that had not ended when
/// this was read.
pub async fn now(pool: &PgPool) -> Result<Cursor, DbError> {
    let xmin: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(pool)
            .await?;
    // Rows of xid `xmin` and above are read; (xmin - 1, max) is just before them.
    Ok(Cursor {
        xid: xmin - 1,
        seq: i64::MAX,
    })
}

/// Reads the events after `after` that can no longer be preceded by another (see the module
/// docs), at most [`BATCH`]; `None` for a kind this binary does not know (a newer replica's:
/// skipped, but its position counts).
pub async fn read(
    pool: &PgPool,
    after: Cursor,
) -> Result<Vec<(Cursor, Option<ClusterEvent>)>, DbError> {
    let rows = sqlx::query(
        "SELECT xid::text::bigint AS x, seq, kind, agent, body FROM cluster_events
         WHERE (xid, seq) > ($1::bigint::text::xid8, $2)
           AND xid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY xid, seq LIMIT $3",
    )
    .bind(after.xid)
    .bind(after.seq)
    .bind(BATCH)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let cursor = Cursor {
            xid: row.try_get("x")?,
            seq: row.try_get("seq")?,
        };
        let kind: i16 = row.try_get("kind")?;
        // A kind from a newer replica: skip it (older replicas ignore what they do not know).
        let Some(kind) = EventKind::from_i16(kind) else {
            out.push((cursor, None));
            continue;
        };
        let body: Vec<u8> = row.try_get("body")?;
        out.push((
            cursor,
            Some(ClusterEvent {
                kind,
                agent: row.try_get("agent")?,
                body: body.into(),
            }),
        ));
    }
    Ok(out)
}

/// What a subscriber receives.
#[derive(Clone, Debug)]
pub enum FeedItem {
    /// The next event.
    Event(Arc<ClusterEvent>),
    /// The feed could not be read for longer than [`RETENTION`]: events may be gone, so state
    /// built from the feed must be rebuilt from the tables.
    Resync,
}

/// This replica's reader of the feed.
#[derive(Debug)]
pub struct EventFeed {
    tx: broadcast::Sender<FeedItem>,
    wake: Notify,
}

impl EventFeed {
    /// Starts reading from now on; stops at `shutdown`.
    pub async fn start(
        pool: PgPool,
        shutdown: CancellationToken,
    ) -> Result<Arc<EventFeed>, DbError> {
        let cursor = now(&pool).await?;
        let feed = Arc::new(EventFeed {
            tx: broadcast::channel(BUFFER).0,
            wake: Notify::new(),
        });
        tokio::spawn(feed.clone().listen(pool.clone(), shutdown.clone()));
        tokio::spawn(feed.clone().run(pool, cursor, shutdown));
        Ok(feed)
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FeedItem> {
        self.tx.subscribe()
    }

    /// Reads the feed at once (a replica that just wrote wants its own events soon).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Relays NOTIFYs into wake-ups. sqlx's listener reconnects by itself; notifications sent
    /// while it reconnects are lost, which the poll covers.
    async fn listen(self: Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "cluster feed: LISTEN connection failed; polling");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::debug!(error = %e, "cluster feed: LISTEN failed; polling");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.try_recv() => match n {
                        Ok(_) => self.wake.notify_one(),
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster feed: notification stream broke");
                            break;
                        }
                    },
                }
            }
        }
    }

    async fn run(self: Arc<Self>, pool: PgPool, mut cursor: Cursor, shutdown: CancellationToken) {
        let mut failing_since: Option<std::time::Instant> = None;
        let mut prune_at = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
            loop {
                let started = std::time::Instant::now();
                match read(&pool, cursor).await {
                    Ok(batch) => {
                        super::record_store_latency("feed_read", started.elapsed());
                        if failing_since
                            .take()
                            .is_some_and(|t| t.elapsed() > RETENTION)
                        {
                            let _ = self.tx.send(FeedItem::Resync);
                            cursor = match now(&pool).await {
                                Ok(c) => c,
                                Err(_) => break,
                            };
                            continue;
                        }
                        let full = batch.len() as i64 == BATCH;
                        for (c, ev) in batch {
                            cursor = c;
                            if let Some(ev) = ev {
                                let _ = self.tx.send(FeedItem::Event(Arc::new(ev)));
                            }
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        if failing_since.is_none() {
                            tracing::warn!(error = %e, "cluster feed: reading failed; retrying");
                            failing_since = Some(std::time::Instant::now());
                        }
                        break;
                    }
                }
            }
            if std::time::Instant::now() > prune_at {
                prune_at = std::time::Instant::now() + Duration::from_secs(60);
                prune(&pool).await;
            }
        }
    }
}

/// Removes rows older than [`RETENTION`], a bounded batch at a time (any replica may; doing it
/// twice is harmless).
async fn prune(pool: &PgPool) {
    let r = sqlx::query(
        "DELETE FROM cluster_events WHERE (xid, seq) IN (
             SELECT xid, seq FROM cluster_events
             WHERE at < now() - $1 * interval '1 millisecond' LIMIT 10000)",
    )
    .bind(RETENTION.as_millis() as i64)
    .execute(pool)
    .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "cluster feed: pruning old events failed");
    }
}
