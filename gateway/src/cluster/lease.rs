//! Backend: per-agent command leases with an epoch fence (`agent_queues`).
//!
//! Exactly one replica delivers a given agent's commands at a time: the one named in the
//! agent's `agent_queues` row, `(lease_replica, lease_replica_epoch)`, while that replica is
//! alive. Nothing renews a lease: it lives as long as its holder's liveness row
//! ([`super::replica`]), so a lease costs one write when taken or handed over and none while
//! held, whatever the number of agents.
//!
//! The fence: taking a lease from a dead holder (or a released one) increments `lease_epoch`.
//! Every state write of the holder first locks its agent's row `FOR SHARE` and checks it still
//! names this replica and the epoch it took ([`fence`]); a take-over's `UPDATE` waits for such a
//! write to commit, and a write that comes after a take-over finds another epoch and is refused
//! (`tether_gateway_fenced_writes_total`). So a replica that was thought dead cannot overwrite
//! the new holder's work, even if it can still reach PostgreSQL.

use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use super::replica::ReplicaId;

/// A lease this replica holds on one agent's commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// `tenant/agent`.
    pub agent: String,
    /// The epoch it was taken at: every fenced write names it.
    pub epoch: i64,
}

/// Why a fenced write was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// Another replica took the agent's lease: this replica must stop delivering to it.
    #[error(
        "the command lease of agent {agent} was taken over by another replica (epoch {epoch} is no longer current)"
    )]
    Lost {
        /// The agent.
        agent: String,
        /// The epoch this replica held.
        epoch: i64,
    },
    /// The store failed.
    #[error("PostgreSQL: {0}")]
    Store(#[from] sqlx::Error),
}

/// Takes the lease of `agent` for `me` when it is free, released or held by a replica that is
/// not alive; keeps it (same epoch) when `me` holds it already. `None`: a live replica holds it.
pub async fn acquire(
    pool: &PgPool,
    me: &ReplicaId,
    agent: &str,
    tenant: &str,
) -> Result<Option<Lease>, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO agent_queues (agent, tenant) VALUES ($1, $2) ON CONFLICT (agent) DO NOTHING",
    )
    .bind(agent)
    .bind(tenant)
    .execute(&mut *tx)
    .await?;
    // The row lock serializes concurrent takers: the second sees what the first wrote.
    let (holder, holder_epoch, epoch, holder_alive): (Option<String>, Option<i64>, i64, bool) =
        sqlx::query_as(
            "SELECT q.lease_replica, q.lease_replica_epoch, q.lease_epoch,
                    EXISTS (SELECT 1 FROM gateway_replicas r WHERE r.replica_id = q.lease_replica
                            AND r.epoch = q.lease_replica_epoch AND r.expires_at > now())
             FROM agent_queues q WHERE q.agent = $1 FOR UPDATE",
        )
        .bind(agent)
        .fetch_one(&mut *tx)
        .await?;
    let mine = holder.as_deref() == Some(me.name.as_str()) && holder_epoch == Some(me.epoch);
    if mine {
        tx.commit().await?;
        return Ok(Some(Lease {
            agent: agent.to_owned(),
            epoch,
        }));
    }
    if holder.is_some() && holder_alive {
        tx.commit().await?;
        return Ok(None);
    }
    let epoch = epoch + 1;
    sqlx::query(
        "UPDATE agent_queues SET lease_replica = $2, lease_replica_epoch = $3, lease_epoch = $4
         WHERE agent = $1",
    )
    .bind(agent)
    .bind(&me.name)
    .bind(me.epoch)
    .bind(epoch)
    .execute(&mut *tx)
    .await?;
    super::events::append(&mut tx, super::events::EventKind::Lease, agent, b"").await?;
    super::events::notify(&mut tx).await?;
    tx.commit().await?;
    super::record_store_latency("lease_acquire", started.elapsed());
    let handover = if holder.is_some() { "takeover" } else { "free" };
    metrics::counter!("tether_gateway_lease_acquisitions_total", "from" => handover).increment(1);
    if let Some(h) = holder {
        tracing::info!(%agent, previous = %h, epoch, "took over the command lease of a replica that is not alive");
    }
    Ok(Some(Lease {
        agent: agent.to_owned(),
        epoch,
    }))
}

/// Gives leases back (a draining replica, or one that lost its last session with the agents),
/// so a replica with a session takes them now rather than at this one's expiry.
pub async fn release(pool: &PgPool, me: &ReplicaId, leases: &[Lease]) -> Result<u64, sqlx::Error> {
    if leases.is_empty() {
        return Ok(0);
    }
    let agents: Vec<&str> = leases.iter().map(|l| l.agent.as_str()).collect();
    let epochs: Vec<i64> = leases.iter().map(|l| l.epoch).collect();
    let mut tx = pool.begin().await?;
    let released: Vec<String> = sqlx::query_scalar(
        "UPDATE agent_queues q SET lease_replica = NULL, lease_replica_epoch = NULL
         FROM unnest($3::text[], $4::bigint[]) AS l(agent, epoch)
         WHERE q.agent = l.agent AND q.lease_epoch = l.epoch
           AND q.lease_replica = $1 AND q.lease_replica_epoch = $2
         RETURNING q.agent",
    )
    .bind(&me.name)
    .bind(me.epoch)
    .bind(&agents)
    .bind(&epochs)
    .fetch_all(&mut *tx)
    .await?;
    announce_released(tx, &released).await
}

/// Releases every lease `me` holds (at shutdown, once its sessions are gone), with a `Lease`
/// event each so the replicas holding the agents' sessions take them at once, instead of after
/// `me`'s liveness expires. Returns how many.
pub async fn release_all(pool: &PgPool, me: &ReplicaId) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let released: Vec<String> = sqlx::query_scalar(
        "UPDATE agent_queues SET lease_replica = NULL, lease_replica_epoch = NULL
         WHERE lease_replica = $1 AND lease_replica_epoch = $2
         RETURNING agent",
    )
    .bind(&me.name)
    .bind(me.epoch)
    .fetch_all(&mut *tx)
    .await?;
    announce_released(tx, &released).await
}

/// Appends a `Lease` event for each released agent (the replicas holding its sessions take
/// the lease at once), commits `tx` and counts them.
async fn announce_released(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    released: &[String],
) -> Result<u64, sqlx::Error> {
    let events: Vec<(super::events::EventKind, &str, &[u8])> = released
        .iter()
        .map(|a| (super::events::EventKind::Lease, a.as_str(), &b""[..]))
        .collect();
    super::events::append_all(&mut tx, &events).await?;
    if !released.is_empty() {
        super::events::notify(&mut tx).await?;
    }
    tx.commit().await?;
    metrics::counter!("tether_gateway_lease_releases_total").increment(released.len() as u64);
    Ok(released.len() as u64)
}

/// In the caller's transaction: checks (and holds, until commit) that `lease` is still this
/// replica's. Every state write of a lease holder calls this first.
pub async fn fence(
    conn: &mut PgConnection,
    me: &ReplicaId,
    lease: &Lease,
) -> Result<(), FenceError> {
    let held: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM agent_queues
         WHERE agent = $1 AND lease_replica = $2 AND lease_replica_epoch = $3 AND lease_epoch = $4
         FOR SHARE",
    )
    .bind(&lease.agent)
    .bind(&me.name)
    .bind(me.epoch)
    .bind(lease.epoch)
    .fetch_optional(&mut *conn)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => {
            metrics::counter!("tether_gateway_fenced_writes_total").increment(1);
            Err(FenceError::Lost {
                agent: lease.agent.clone(),
                epoch: lease.epoch,
            })
        }
    }
}

/// Who holds `agent`'s lease now: `(replica, alive)`, or `None` when nobody does.
pub async fn holder(pool: &PgPool, agent: &str) -> Result<Option<(ReplicaId, bool)>, sqlx::Error> {
    let row: Option<(Option<String>, Option<i64>, Option<bool>)> = sqlx::query_as(
        "SELECT q.lease_replica, q.lease_replica_epoch,
                EXISTS (SELECT 1 FROM gateway_replicas r WHERE r.replica_id = q.lease_replica
                        AND r.epoch = q.lease_replica_epoch AND r.expires_at > now())
         FROM agent_queues q WHERE q.agent = $1",
    )
    .bind(agent)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((Some(name), Some(epoch), alive)) => {
            Some((ReplicaId { name, epoch }, alive.unwrap_or(false)))
        }
        _ => None,
    })
}
