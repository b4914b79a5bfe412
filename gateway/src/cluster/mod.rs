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
//! - [`db`]: the pool and the schema's migrations.
//!
//! Nothing is written per heartbeat or per lease renewal: a replica's one liveness row renews
//! all its leases at once (see `../shared/SCALE.md` in the design notes, and ARCHITECTURE.md,
//! "Replicas").

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
    /// advisory lock, registers this replica with the next epoch and starts its heartbeat, the
    /// feed reader and the presence writer; they stop at `shutdown`.
    pub async fn start(
        store: &StoreConfig,
        cluster: &ClusterConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, DbError> {
        let pool = db::connect(store).await?;
        db::migrate(&pool).await?;
        let replica = Replica::register(
            pool.clone(),
            &cluster.replica_id(),
            &cluster.advertise(),
            cluster.heartbeat_interval,
            cluster.liveness_timeout,
        )
        .await?;
        tokio::spawn(replica.clone().run(shutdown.clone()));
        let feed = EventFeed::start(pool.clone(), shutdown.clone()).await?;
        let presence = Presence::start(replica.clone(), feed.clone(), shutdown);
        Ok(Arc::new(Cluster {
            pool,
            replica,
            feed,
            presence,
        }))
    }
}

/// Records how long one store operation took (`tether_gateway_store_seconds{op}`).
pub fn record_store_latency(op: &'static str, took: Duration) {
    metrics::histogram!("tether_gateway_store_seconds", "op" => op).record(took.as_secs_f64());
}
