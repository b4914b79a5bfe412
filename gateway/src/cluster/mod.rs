//! Backend: the state gateway replicas share in PostgreSQL (`store.dsn`), and this replica's
//! place among them.
//!
//! PostgreSQL is the single source of truth; there is no gossip. What lives there:
//! - [`replica`]: one row per replica, renewed every `cluster.heartbeat_interval`: a replica is
//!   alive while its row has not expired, and fences itself when it cannot renew;
//! - [`presence`]: which replica holds which agent session, written on connect and disconnect
//!   only;
//! - [`lease`]: which replica delivers each agent's commands, valid while its holder is alive,
//!   with an epoch that fences a holder that was taken over;
//! - [`events`]: the feed every replica reads to learn what the others did;
//! - [`balance`]: each replica's count of sessions, for their shares of the fleet;
//! - [`db`]: the pool and the schema's migrations.
//!
//! Nothing is written per heartbeat or per lease renewal: a replica's one liveness row renews
//! all its leases at once (see `../shared/SCALE.md` in the design notes, and ARCHITECTURE.md,
//! "Replicas").

pub mod balance;
pub mod commands;
pub mod db;
pub mod events;
pub mod identity;
pub mod lease;
pub mod presence;
pub mod replica;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tether_runtime::CancellationToken;

use crate::cluster::db::DbError;
use crate::cluster::events::EventFeed;
use crate::cluster::presence::Presence;
use crate::cluster::replica::Replica;
use crate::config::{ClusterConfig, StoreConfig};

/// This replica's handle on the cluster: the pool, its registration and liveness, the feed it
/// reads and the presence writer. Built once at start when `store.dsn` is set.
#[derive(Debug)]
pub struct Cluster {
    /// The pool every PostgreSQL-backed module uses.
    pub pool: PgPool,
    /// This replica (id, epoch, liveness; renewed by its own task).
    pub replica: Arc<Replica>,
    /// What the other replicas did.
    pub feed: Arc<EventFeed>,
    /// Where this replica records the agent sessions it holds.
    pub presence: Arc<Presence>,
}

impl Cluster {
    /// Connects (retrying up to `store.connect_timeout`), migrates the schema under the
    /// advisory lock, registers this replica with the next epoch (peers dial it at
    /// `advertise`) and starts its heartbeat, the feed reader and the presence writer; they
    /// stop at `shutdown`.
    pub async fn start(
        store: &StoreConfig,
        cluster: &ClusterConfig,
        advertise: &str,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, DbError> {
        let pool = db::connect(store).await?;
        db::migrate(&pool).await?;
        let replica = Replica::register(
            pool.clone(),
            &cluster.replica_id(),
            advertise,
            cluster.heartbeat_interval,
            cluster.liveness_timeout,
        )
        .await?;
        tokio::spawn(replica.clone().run(shutdown.clone()));
        let feed = EventFeed::start(pool.clone(), shutdown.clone()).await?;
        let presence = Presence::start(replica.clone(), feed.clone(), shutdown.clone());
        tokio::spawn(housekeeping(
            replica.clone(),
            cluster.liveness_timeout,
            shutdown,
        ));
        Ok(Arc::new(Cluster {
            pool,
            replica,
            feed,
            presence,
        }))
    }
}

impl Cluster {
    /// At shutdown, once this replica's sessions are gone and its commands stopped: releases
    /// every command lease it holds, so the replicas holding the agents' sessions take them at
    /// once instead of after this replica's liveness expires. Returns how many.
    pub async fn release_leases(&self) -> Result<u64, DbError> {
        Ok(lease::release_all(&self.pool, self.replica.id()).await?)
    }

    /// The last step of a shutdown, after the heartbeat stopped: marks this replica's row
    /// expired and draining, so nothing it left counts any more.
    pub async fn expire(&self) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE gateway_replicas SET expires_at = now(), draining = true
             WHERE replica_id = $1 AND epoch = $2",
        )
        .bind(&self.replica.id().name)
        .bind(self.replica.id().epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Sessions of a dead replica are ignored at once and deleted this long after it died (or
/// ten liveness timeouts, if longer); a replica cut off for longer writes its sessions again
/// when it is back (see `server`).
const COLLECT_AFTER: Duration = Duration::from_secs(60);
/// How often the replica count is refreshed and dead replicas' sessions collected.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// Keeps `tether_gateway_replicas` (replicas alive now) current and deletes the sessions of
/// replicas long dead, until `shutdown`. Any live replica may collect; doing it twice is
/// harmless.
async fn housekeeping(
    replica: Arc<Replica>,
    liveness_timeout: Duration,
    shutdown: CancellationToken,
) {
    let after = COLLECT_AFTER.max(liveness_timeout * 10);
    loop {
        if replica.is_live() {
            match replica::replicas(replica.pool()).await {
                Ok(rows) => {
                    let alive = rows.iter().filter(|r| r.alive).count();
                    metrics::gauge!("tether_gateway_replicas").set(alive as f64);
                }
                Err(e) => tracing::debug!(error = %e, "counting live replicas failed"),
            }
            let started = std::time::Instant::now();
            match presence::collect_dead(replica.pool(), after).await {
                Ok(0) => {}
                Ok(n) => {
                    record_store_latency("presence_collect", started.elapsed());
                    tracing::info!(
                        sessions = n,
                        "deleted the sessions of replicas dead for long"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "collecting dead replicas' sessions failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
    }
}

/// Records how long one store operation took (`tether_gateway_store_seconds{op}`).
pub fn record_store_latency(op: &'static str, took: Duration) {
    metrics::histogram!("tether_gateway_store_seconds", "op" => op).record(took.as_secs_f64());
}
