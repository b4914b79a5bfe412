//! Backend: durable commands on PostgreSQL, shared by every replica.
//!
//! - **Submit** (any replica): one transaction inserts the command, its payload and its event;
//!   the idempotency key is a unique index, so concurrent Submits of one key on several replicas
//!   make one command. The agent's `agent_queues` row counts Submits and is locked for the
//!   check, so `limits.pending_commands_per_agent` holds across replicas.
//! - **Writes of the lease holder** ([`write`]): each names the version it changes and the lease
//!   it holds; it lands only if both are still current (optimistic concurrency plus the epoch
//!   fence, in one `UPDATE`), so a replica that was taken over cannot overwrite its successor's
//!   work, and a Cancel or an expiry that won the race is never undone.
//! - **Cancel and expiry** (any replica): conditional on the command still being queued.
//! - Every change appends a `Command` event (the record without its payload) to the cluster
//!   feed in its transaction, and the transaction notifies once.
//!
//! A [`CommandRecord`] is stored as columns the queries filter on (`agent`, `tenant`, `state` as
//! its `tether.v1.CommandState` number, `kind`, times in Unix ms, `version`) beside `record`, its
//! bytes without payload ([`codec`]), and the payload and a large output in their own columns.

use std::time::SystemTime;

use bytes::Bytes;
use sqlx::PgConnection;
use sqlx::Row as _;
use sqlx::postgres::PgPool;
use tunnel_proto::AgentId;

use super::events::{self, EventKind};
use super::lease::Lease;
use super::replica::ReplicaId;
use crate::commands::record::{CommandRecord, CommandState, Outcome, from_unix_ms, unix_ms};
use crate::commands::store::codec::{self, Parts};

/// Outputs up to this size stay in the record (and its events); larger ones are read by Get.
pub const INLINE_OUTPUT: usize = 64 << 10;

/// The record as stored and sent on the feed: no payload, no output above [`INLINE_OUTPUT`].
/// Returns it and the large output, if any.
fn split(cmd: &CommandRecord) -> (Vec<u8>, Option<&[u8]>) {
    let big = cmd
        .result
        .as_ref()
        .filter(|r| r.output.len() > INLINE_OUTPUT)
        .map(|r| &r.output[..]);
    let record = codec::encode(
        cmd,
        Parts {
            payload: false,
            output: big.is_none(),
        },
    );
    (record, big)
}

/// The `state` column.
fn state_col(s: CommandState) -> i16 {
    s.wire() as i16
}

fn ms(t: Option<SystemTime>) -> Option<i64> {
    t.map(unix_ms)
}

fn decode(id: &str, bytes: &[u8]) -> Result<CommandRecord, sqlx::Error> {
    codec::decode(id, bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// A `Command` event's body from the cluster feed: the record without payload (and without an
/// output above [`INLINE_OUTPUT`]).
pub fn decode_event(body: &[u8]) -> Result<CommandRecord, sqlx::Error> {
    decode("(feed event)", body)
}

/// What [`submit`] did.
#[derive(Debug)]
pub enum Submitted {
    /// Stored (with the id the caller chose).
    Created(CommandRecord),
    /// The idempotency key already named this command; nothing was stored.
    Existing(CommandRecord),
    /// The agent has `pending` unfinished commands, the limit; nothing was stored.
    TooManyPending {
        /// Its unfinished commands.
        pending: i64,
    },
}

/// Stores `cmd` (its `id` chosen by the caller, version 1) durably, unless its idempotency key
/// names a command already or its agent has `pending_limit` unfinished commands.
pub async fn submit(
    pool: &PgPool,
    cmd: &CommandRecord,
    pending_limit: u32,
) -> Result<Submitted, sqlx::Error> {
    submit_batch(pool, std::slice::from_ref(cmd), pending_limit)
        .await?
        .pop()
        .ok_or(sqlx::Error::RowNotFound)
}

/// Stores `cmds` (ids chosen by the caller, version 1) in ONE transaction, each as [`submit`]
/// would alone and in order: a group commit, so concurrent Submits share the agent's row lock
/// and one fsync instead of queueing on them one by one. Agents' rows are locked in name order
/// (no deadlock with another replica's batch); a key repeated within the batch, or committed by
/// another replica meanwhile, answers the existing command.
pub async fn submit_batch(
    pool: &PgPool,
    cmds: &[CommandRecord],
    pending_limit: u32,
) -> Result<Vec<Submitted>, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let names: Vec<String> = cmds.iter().map(|c| c.agent.to_string()).collect();
    let mut agents: Vec<&str> = names.iter().map(String::as_str).collect();
    agents.sort_unstable();
    agents.dedup();
    let tenants: Vec<&str> = agents
        .iter()
        .map(|a| a.split('/').next().unwrap_or_default())
        .collect();
    sqlx::query(
        "INSERT INTO agent_queues (agent, tenant)
         SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (agent) DO NOTHING",
    )
    .bind(&agents)
    .bind(&tenants)
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT q.agent, q.submitted - coalesce((SELECT f.finished FROM agent_finished f WHERE f.agent = q.agent), 0)
         FROM agent_queues q WHERE q.agent = ANY($1) ORDER BY q.agent FOR NO KEY UPDATE OF q",
    )
    .bind(&agents)
    .fetch_all(&mut *tx)
    .await?;
    let mut pending: std::collections::HashMap<String, i64> = rows.into_iter().collect();
    let mut out = Vec::with_capacity(cmds.len());
    let mut created: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    let mut bodies: Vec<(&str, Vec<u8>)> = Vec::new();
    for (cmd, agent) in cmds.iter().zip(&names) {
        if !cmd.idempotency_key.is_empty()
            && let Some(existing) = by_idempotency(&mut *tx, agent, &cmd.idempotency_key).await?
        {
            out.push(Submitted::Existing(existing));
            continue;
        }
        let n = pending.entry(agent.clone()).or_default();
        if *n >= i64::from(pending_limit) {
            out.push(Submitted::TooManyPending { pending: *n });
            continue;
        }
        let (record, big) = split(cmd);
        let inserted = sqlx::query(
            "INSERT INTO commands (id, agent, tenant, seq, state, kind, idempotency_key, created_ms,
                                   expires_ms, version, record, output)
             VALUES ($1, $2, $3, nextval('commands_seq'), $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (agent, idempotency_key) WHERE idempotency_key <> '' DO NOTHING",
        )
        .bind(&cmd.id)
        .bind(agent)
        .bind(cmd.agent.tenant())
        .bind(state_col(cmd.state))
        .bind(&cmd.kind)
        .bind(&cmd.idempotency_key)
        .bind(ms(cmd.created).unwrap_or_default())
        .bind(ms(cmd.expires))
        .bind(cmd.version as i64)
        .bind(&record)
        .bind(big)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // Another replica committed the key while this batch waited for it.
            match by_idempotency(&mut *tx, agent, &cmd.idempotency_key).await? {
                Some(c) => out.push(Submitted::Existing(c)),
                None => return Err(sqlx::Error::RowNotFound),
            }
            continue;
        }
        if !cmd.payload.is_empty() {
            sqlx::query("INSERT INTO command_payloads (id, payload) VALUES ($1, $2)")
                .bind(&cmd.id)
                .bind(&cmd.payload[..])
                .execute(&mut *tx)
                .await?;
        }
        *n += 1;
        *created.entry(agent.as_str()).or_default() += 1;
        bodies.push((agent.as_str(), record));
        out.push(Submitted::Created(cmd.clone()));
    }
    if !created.is_empty() {
        let (a, n): (Vec<&str>, Vec<i64>) = created.into_iter().unzip();
        sqlx::query(
            "UPDATE agent_queues q SET submitted = q.submitted + c.n
             FROM unnest($1::text[], $2::bigint[]) AS c(agent, n) WHERE q.agent = c.agent",
        )
        .bind(&a)
        .bind(&n)
        .execute(&mut *tx)
        .await?;
        let events: Vec<(EventKind, &str, &[u8])> = bodies
            .iter()
            .map(|(a, b)| (EventKind::Command, *a, b.as_slice()))
            .collect();
        events::append_all(&mut tx, &events).await?;
        events::notify(&mut tx).await?;
    }
    tx.commit().await?;
    super::record_store_latency("command_submit_batch", started.elapsed());
    metrics::histogram!("tether_gateway_submit_batch_size").record(cmds.len() as f64);
    Ok(out)
}

async fn by_idempotency<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    agent: &str,
    key: &str,
) -> Result<Option<CommandRecord>, sqlx::Error> {
    let row: Option<(String, Vec<u8>)> =
        sqlx::query_as("SELECT id, record FROM commands WHERE agent = $1 AND idempotency_key = $2")
            .bind(agent)
            .bind(key)
            .fetch_optional(conn)
            .await?;
    row.map(|(id, r)| decode(&id, &r)).transpose()
}

/// One change a lease holder makes.
#[derive(Clone, Debug)]
pub struct Write {
    /// The new record: it lands only over a lower `version` of a command not final yet.
    pub record: CommandRecord,
}

/// What became of one [`Write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Stored.
    Ok,
    /// Someone else changed the command first (a Cancel, an expiry, a previous holder): the
    /// holder must reload it.
    Conflict,
    /// The lease is no longer this replica's: it must stop delivering the agent's commands.
    Fenced,
}

/// Applies `writes` of `lease`'s agent in one transaction; each lands only if the stored command
/// is older (a lower version; the holder's versions only grow, see `commands::replicated`), not
/// final (a Cancel or an expiry that won stays), and the lease is still `me`'s at `lease.epoch`.
pub async fn write(
    pool: &PgPool,
    me: &ReplicaId,
    lease: &Lease,
    writes: &[Write],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut out = write_many(pool, me, &[(lease, writes)]).await?;
    Ok(out.pop().unwrap_or_default())
}

/// [`write`] for several agents' leases in ONE transaction (one WAL flush for a writer's whole
/// batch): what became of each group's writes, in order.
pub async fn write_many(
    pool: &PgPool,
    me: &ReplicaId,
    groups: &[(&Lease, &[Write])],
) -> Result<Vec<Vec<Written>>, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(groups.len());
    let mut events = false;
    for (lease, writes) in groups {
        let (written, appended) = write_in(&mut tx, me, lease, writes).await?;
        out.push(written);
        events |= appended;
    }
    if events {
        events::notify(&mut tx).await?;
    }
    tx.commit().await?;
    super::record_store_latency("command_write", started.elapsed());
    Ok(out)
}

/// One lease's writes inside `tx`; true when it appended events.
async fn write_in(
    tx: &mut PgConnection,
    me: &ReplicaId,
    lease: &Lease,
    writes: &[Write],
) -> Result<(Vec<Written>, bool), sqlx::Error> {
    let mut out = Vec::with_capacity(writes.len());
    let mut finished = 0i64;
    let mut bodies = Vec::new();
    for w in writes {
        let (record, big) = split(&w.record);
        let done = ms(w.record.finished);
        let n = sqlx::query(
            "UPDATE commands c SET state = $2, version = $3, finished_ms = $4, record = $5,
                 output = coalesce($6, c.output)
             WHERE c.id = $1 AND c.version < $3 AND c.state IN (1, 2, 3, 8)
               AND EXISTS (SELECT 1 FROM agent_queues q WHERE q.agent = c.agent
                           AND q.lease_replica = $7 AND q.lease_replica_epoch = $8
                           AND q.lease_epoch = $9)",
        )
        .bind(&w.record.id)
        .bind(state_col(w.record.state))
        .bind(w.record.version as i64)
        .bind(done)
        .bind(&record)
        .bind(big)
        .bind(&me.name)
        .bind(me.epoch)
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            if w.record.is_final() {
                finished += 1;
            }
            bodies.push(record);
            out.push(Written::Ok);
            continue;
        }
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM agent_queues WHERE agent = $1 AND lease_replica = $2
                            AND lease_replica_epoch = $3 AND lease_epoch = $4)",
        )
        .bind(&lease.agent)
        .bind(&me.name)
        .bind(me.epoch)
        .bind(lease.epoch)
        .fetch_one(&mut *tx)
        .await?;
        if held {
            out.push(Written::Conflict);
        } else {
            metrics::counter!("tether_gateway_fenced_writes_total").increment(1);
            out.push(Written::Fenced);
        }
    }
    if finished > 0 {
        count_finished(&mut *tx, &lease.agent, finished).await?;
    }
    let events: Vec<(EventKind, &str, &[u8])> = bodies
        .iter()
        .map(|b| (EventKind::Command, lease.agent.as_str(), b.as_slice()))
        .collect();
    events::append_all(&mut *tx, &events).await?;
    Ok((out, !events.is_empty()))
}

async fn count_finished(conn: &mut PgConnection, agent: &str, n: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agent_finished (agent, finished) VALUES ($1, $2)
         ON CONFLICT (agent) DO UPDATE SET finished = agent_finished.finished + excluded.finished",
    )
    .bind(agent)
    .bind(n)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One command, with its payload and output.
pub async fn get(pool: &PgPool, id: &str) -> Result<Option<CommandRecord>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT c.record, c.output, p.payload FROM commands c
         LEFT JOIN command_payloads p ON p.id = c.id WHERE c.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let record: Vec<u8> = row.try_get("record")?;
    let mut cmd = decode(id, &record)?;
    if let Some(out) = row.try_get::<Option<Vec<u8>>, _>("output")?
        && let Some(r) = cmd.result.as_mut()
    {
        r.output = Bytes::from(out);
    }
    if let Some(p) = row.try_get::<Option<Vec<u8>>, _>("payload")? {
        cmd.payload = Bytes::from(p);
    }
    Ok(Some(cmd))
}

/// The unfinished commands of `agent`, with payloads, in submission order (what a new lease
/// holder delivers).
pub async fn unfinished(pool: &PgPool, agent: &AgentId) -> Result<Vec<CommandRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.id, c.record, p.payload FROM commands c
         LEFT JOIN command_payloads p ON p.id = c.id
         WHERE c.agent = $1 AND c.state IN (1, 2, 3, 8) ORDER BY c.seq",
    )
    .bind(agent.to_string())
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get("id")?;
        let record: Vec<u8> = row.try_get("record")?;
        let mut cmd = decode(&id, &record)?;
        if let Some(p) = row.try_get::<Option<Vec<u8>>, _>("payload")? {
            cmd.payload = Bytes::from(p);
        }
        out.push(cmd);
    }
    Ok(out)
}

/// True when any replica ever held a session with `agent` or any command was submitted for it.
pub async fn knows_agent(pool: &PgPool, agent: &AgentId) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM agents WHERE agent = $1)
             OR EXISTS (SELECT 1 FROM agent_queues WHERE agent = $1)",
    )
    .bind(agent.to_string())
    .fetch_one(pool)
    .await
}

/// Why [`cancel`] changed nothing.
#[derive(Debug)]
pub enum NotCancelled {
    /// No such command.
    NotFound,
    /// It left `QUEUED` first; its state now.
    TooLate(Box<CommandRecord>),
}

/// Cancels a command still queued, or awaiting its owner's approval (any replica may: the
/// holder's writes are conditional on the version this changes, and its delivery withdraws a
/// wait from the agent when the cancel reaches it on the feed).
pub async fn cancel(
    pool: &PgPool,
    id: &str,
    now: SystemTime,
) -> Result<Result<CommandRecord, NotCancelled>, sqlx::Error> {
    let Some(mut cmd) = get(pool, id).await? else {
        return Ok(Err(NotCancelled::NotFound));
    };
    let from = cmd.state;
    if !matches!(from, CommandState::Queued | CommandState::AwaitingApproval) {
        return Ok(Err(NotCancelled::TooLate(Box::new(cmd))));
    }
    let expected = cmd.version;
    cmd.payload = Bytes::new();
    cmd.state = CommandState::Cancelled;
    cmd.finished = Some(now);
    cmd.version += 1;
    cmd.result = Some(Outcome::message(crate::commands::cancelled_from(from)));
    if !change_unleased(pool, &cmd, expected, from).await? {
        // Delivered (or expired) meanwhile.
        return match get(pool, id).await? {
            Some(c) => Ok(Err(NotCancelled::TooLate(Box::new(c)))),
            None => Ok(Err(NotCancelled::NotFound)),
        };
    }
    Ok(Ok(cmd))
}

/// A final transition any replica may make (Cancel, expiry): lands only while the command is
/// still at version `expected` in state `from`.
async fn change_unleased(
    pool: &PgPool,
    cmd: &CommandRecord,
    expected: u64,
    from: CommandState,
) -> Result<bool, sqlx::Error> {
    let (record, _) = split(cmd);
    let agent = cmd.agent.to_string();
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE commands SET state = $3, version = $4, finished_ms = $5, record = $6
         WHERE id = $1 AND version = $2 AND state = $7",
    )
    .bind(&cmd.id)
    .bind(expected as i64)
    .bind(state_col(cmd.state))
    .bind(cmd.version as i64)
    .bind(ms(cmd.finished))
    .bind(&record)
    .bind(state_col(from))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    count_finished(&mut tx, &agent, 1).await?;
    events::append(&mut tx, EventKind::Command, &agent, &record).await?;
    events::notify(&mut tx).await?;
    tx.commit().await?;
    Ok(true)
}

/// Expires up to `limit` queued commands whose TTL passed at `now_ms`, whoever holds their
/// agent; returns them.
pub async fn expire_due(
    pool: &PgPool,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<CommandRecord>, sqlx::Error> {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT id, record FROM commands WHERE state = 1 AND expires_ms IS NOT NULL
         AND expires_ms <= $1 ORDER BY expires_ms LIMIT $2",
    )
    .bind(now_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let now = from_unix_ms(now_ms);
    let mut out = Vec::new();
    for (id, r) in rows {
        let mut cmd = decode(&id, &r)?;
        let expected = cmd.version;
        cmd.state = CommandState::Expired;
        cmd.finished = Some(now);
        cmd.version += 1;
        cmd.result = Some(Outcome::message("expired before delivery"));
        if change_unleased(pool, &cmd, expected, CommandState::Queued).await? {
            out.push(cmd);
        }
    }
    Ok(out)
}

/// Agents with unfinished commands whose lease no live replica holds, among those `me` holds
/// a session with (at most `limit`): the ones `me` should take.
pub async fn orphaned(
    pool: &PgPool,
    me: &ReplicaId,
    limit: i64,
) -> Result<Vec<AgentId>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT q.agent, q.tenant FROM agent_queues q
         WHERE q.submitted > coalesce((SELECT f.finished FROM agent_finished f WHERE f.agent = q.agent), 0)
           AND EXISTS (SELECT 1 FROM agent_sessions s WHERE s.agent = q.agent
                       AND s.replica_id = $1 AND s.replica_epoch = $2)
           AND NOT EXISTS (SELECT 1 FROM gateway_replicas r WHERE r.replica_id = q.lease_replica
                           AND r.epoch = q.lease_replica_epoch AND r.expires_at > now())
         LIMIT $3",
    )
    .bind(&me.name)
    .bind(me.epoch)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(agent, _)| {
            agent.parse().map_err(|e| {
                sqlx::Error::Decode(format!("agent_queues.agent {agent:?}: {e}").into())
            })
        })
        .collect()
}

/// Deletes up to `batch` finished commands, oldest finished first: those finished before
/// `before_ms`, and those beyond the newest `keep`; returns how many.
pub async fn prune(
    pool: &PgPool,
    before_ms: i64,
    keep: i64,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let excess: i64 = sqlx::query_scalar(
        "SELECT greatest(count(*) - $1, 0) FROM commands WHERE finished_ms IS NOT NULL",
    )
    .bind(keep)
    .fetch_one(pool)
    .await?;
    let n = sqlx::query(
        "DELETE FROM commands WHERE id IN (
             SELECT id FROM (
                 SELECT id, finished_ms, row_number() OVER (ORDER BY finished_ms, id) AS n
                 FROM commands WHERE finished_ms IS NOT NULL
                 ORDER BY finished_ms, id LIMIT $3) v
             WHERE v.finished_ms < $1 OR v.n <= $2)",
    )
    .bind(before_ms)
    .bind(excess)
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n)
}

/// Which commands [`list`] returns.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// One agent.
    pub agent: Option<AgentId>,
    /// Only these tenants (`None`: every tenant).
    pub tenants: Option<Vec<String>>,
    /// One state (`None`: any).
    pub state: Option<CommandState>,
    /// A kind, empty for any.
    pub kind: String,
    /// Created at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Created before (Unix ms).
    pub to_ms: Option<i64>,
    /// Ids strictly after this one.
    pub after: String,
    /// At most this many.
    pub limit: i64,
}

/// Commands matching `q` in id (submission) order, without payloads or large outputs, read
/// through the agent's or the tenants' index when the query names them.
pub async fn list(pool: &PgPool, q: &ListQuery) -> Result<Vec<CommandRecord>, sqlx::Error> {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT id, record FROM commands
         WHERE ($1::text IS NULL OR agent = $1)
           AND ($2::text[] IS NULL OR tenant = ANY($2))
           AND ($3 = 0 OR state = $3)
           AND ($4 = '' OR kind = $4)
           AND ($5::bigint IS NULL OR created_ms >= $5)
           AND ($6::bigint IS NULL OR created_ms < $6)
           AND id > $7
         ORDER BY id LIMIT $8",
    )
    .bind(q.agent.as_ref().map(ToString::to_string))
    .bind(q.tenants.as_deref())
    .bind(q.state.map_or(0, state_col))
    .bind(&q.kind)
    .bind(q.from_ms)
    .bind(q.to_ms)
    .bind(&q.after)
    .bind(q.limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(id, r)| decode(&id, &r)).collect()
}
