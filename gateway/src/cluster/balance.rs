//! Backend: each replica's count of agent sessions in its `gateway_replicas` row, and the other
//! live replicas' counts, from which a replica knows its share of the fleet
//! (`tunnel::balance`). One small write when the count changed, one read of the replicas'
//! rows: nothing grows with the number of agents.

use sqlx::PgPool;

use super::replica::ReplicaId;

/// Writes this replica's count of sessions.
pub async fn record(pool: &PgPool, me: &ReplicaId, sessions: u64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE gateway_replicas SET sessions = $3 WHERE replica_id = $1 AND epoch = $2")
        .bind(&me.name)
        .bind(me.epoch)
        .bind(i64::try_from(sessions).unwrap_or(i64::MAX))
        .execute(pool)
        .await?;
    Ok(())
}

/// The other replicas alive and not draining now (by the database's clock), and the sessions
/// they hold together.
pub async fn others(pool: &PgPool, me: &ReplicaId) -> Result<(u32, u64), sqlx::Error> {
    let (n, sessions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(sessions), 0)::bigint FROM gateway_replicas
         WHERE expires_at > now() AND NOT draining AND replica_id <> $1",
    )
    .bind(&me.name)
    .fetch_one(pool)
    .await?;
    Ok((
        u32::try_from(n).unwrap_or(u32::MAX),
        u64::try_from(sessions).unwrap_or(0),
    ))
}
