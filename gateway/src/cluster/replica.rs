//! Backend + wiring: this replica's row in `gateway_replicas`, its liveness heartbeat, and the
//! self-fence.
//!
//! A replica registers under its `cluster.replica_id` with a new epoch (every process that takes
//! the name gets the next one, so whatever a dead process left behind never counts for the
//! next), then renews `expires_at = now() + liveness_timeout` every `heartbeat_interval`
//! (jittered ±20%). PostgreSQL's clock is the only one compared: a replica is alive exactly while
//! its `expires_at` is ahead of the database's `now()`.
//!
//! The self-fence: this process knows when it *sent* its last successful renewal, so it knows a
//! lower bound of its own expiry without asking anyone. Once that bound (less a tenth, for clock
//! rates) has passed, [`Replica::is_live`] is false and everything that depends on holding
//! leases stops, whether or not PostgreSQL is reachable; when a renewal succeeds again it is
//! live again. One renewal writes one row: nothing here grows with sessions or agents.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use tether_runtime::CancellationToken;
use tokio::sync::watch;

use super::db::DbError;

/// Who this replica is in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaId {
    /// `cluster.replica_id`.
    pub name: String,
    /// Grows each time a process registers the name.
    pub epoch: i64,
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.name, self.epoch)
    }
}

/// Whether this replica may act as a lease holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Renewed recently enough: alive for every other replica.
    Live,
    /// The last successful renewal is older than the liveness timeout: the other replicas
    /// consider this one dead (and take its leases). `reason` says why renewals fail.
    Expired {
        /// The last renewal error, or that none succeeded in time.
        reason: String,
    },
    /// Another process registered the same `cluster.replica_id` after this one: this one is
    /// dead for good.
    Superseded,
}

/// One row of `gateway_replicas`, as any replica sees it.
#[derive(Clone, Debug)]
pub struct ReplicaRow {
    /// Name.
    pub replica_id: String,
    /// Epoch.
    pub epoch: i64,
    /// Where its peers dial it.
    pub advertise: String,
    /// Its release.
    pub version: String,
    /// Draining (shutting down).
    pub draining: bool,
    /// Alive by the database's clock now.
    pub alive: bool,
}

/// This replica's registration and liveness.
#[derive(Debug)]
pub struct Replica {
    id: ReplicaId,
    pool: PgPool,
    interval: Duration,
    timeout: Duration,
    liveness: watch::Sender<Liveness>,
    /// When the last successful renewal was sent (local monotonic clock).
    renewed: std::sync::Mutex<Instant>,
    /// Why the last renewal failed, until one succeeds.
    failing: std::sync::Mutex<Option<String>>,
    draining: AtomicBool,
}

impl Replica {
    /// Registers `name` with the next epoch, alive for `timeout` from now.
    pub async fn register(
        pool: PgPool,
        name: &str,
        advertise: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Arc<Replica>, DbError> {
        let sent = Instant::now();
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO gateway_replicas (replica_id, epoch, advertise, version, expires_at)
             VALUES ($1, 1, $2, $3, now() + $4 * interval '1 millisecond')
             ON CONFLICT (replica_id) DO UPDATE SET
                 epoch = gateway_replicas.epoch + 1, advertise = excluded.advertise,
                 version = excluded.version, started_at = now(), heartbeat_at = now(),
                 expires_at = excluded.expires_at, draining = false
             RETURNING epoch",
        )
        .bind(name)
        .bind(advertise)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(timeout.as_millis() as i64)
        .fetch_one(&pool)
        .await?;
        let id = ReplicaId {
            name: name.to_owned(),
            epoch,
        };
        // Sessions a previous process of this name left: never valid again (the epoch moved).
        sqlx::query("DELETE FROM agent_sessions WHERE replica_id = $1 AND replica_epoch < $2")
            .bind(name)
            .bind(epoch)
            .execute(&pool)
            .await?;
        tracing::info!(replica = %id, %advertise, "registered in the cluster");
        metrics::gauge!("tether_gateway_replica_live").set(1.0);
        Ok(Arc::new(Replica {
            id,
            pool,
            interval,
            timeout,
            liveness: watch::channel(Liveness::Live).0,
            renewed: std::sync::Mutex::new(sent),
            failing: std::sync::Mutex::new(None),
            draining: AtomicBool::new(false),
        }))
    }

    /// This replica's name and epoch.
    pub fn id(&self) -> &ReplicaId {
        &self.id
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// True while this replica is alive for the others (see the module docs).
    pub fn is_live(&self) -> bool {
        *self.liveness.borrow() == Liveness::Live && !self.deadline_passed(Instant::now())
    }

    /// The liveness, as it changes.
    pub fn watch(&self) -> watch::Receiver<Liveness> {
        self.liveness.subscribe()
    }

    /// The current liveness.
    pub fn liveness(&self) -> Liveness {
        self.liveness.borrow().clone()
    }

    /// Why PostgreSQL could not be reached at the last renewal, until a renewal succeeds
    /// again (sooner than the liveness expires: for `/readyz`).
    pub fn store_error(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_failing(&self, why: Option<String>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn deadline_passed(&self, now: Instant) -> bool {
        // A tenth of the timeout for the two clocks' rates (and scheduling): this process stops
        // before the others can see it as dead.
        let margin = self.timeout / 10;
        let renewed = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        now > renewed + self.timeout - margin
    }

    /// Marks this replica draining (peers stop choosing it); written with the next renewal and
    /// at once.
    pub async fn set_draining(&self) -> Result<(), DbError> {
        self.draining.store(true, Ordering::Relaxed);
        self.renew().await.map(|_| ())
    }

    /// True once [`Replica::set_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// One renewal; `Ok(false)` when another process took the name.
    async fn renew(&self) -> Result<bool, DbError> {
        let sent = Instant::now();
        let started = std::time::Instant::now();
        let n = sqlx::query(
            "UPDATE gateway_replicas SET heartbeat_at = now(),
                 expires_at = now() + $3 * interval '1 millisecond', draining = $4
             WHERE replica_id = $1 AND epoch = $2",
        )
        .bind(&self.id.name)
        .bind(self.id.epoch)
        .bind(self.timeout.as_millis() as i64)
        .bind(self.draining.load(Ordering::Relaxed))
        .execute(&self.pool)
        .await?
        .rows_affected();
        super::record_store_latency("replica_heartbeat", started.elapsed());
        if n == 0 {
            return Ok(false);
        }
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = sent;
        Ok(true)
    }

    fn set(&self, next: Liveness) {
        let changed = self.liveness.send_if_modified(|cur| {
            if *cur == next || *cur == Liveness::Superseded {
                false
            } else {
                *cur = next.clone();
                true
            }
        });
        if !changed {
            return;
        }
        metrics::gauge!("tether_gateway_replica_live").set(f64::from(next == Liveness::Live));
        match &next {
            Liveness::Live => {
                tracing::info!(replica = %self.id, "PostgreSQL reachable again: this replica is live")
            }
            Liveness::Expired { reason } => tracing::error!(replica = %self.id, %reason,
                timeout = ?self.timeout,
                "cannot renew this replica's liveness in PostgreSQL: it stops delivering commands \
                 (the other replicas take its agents) until PostgreSQL is back"),
            Liveness::Superseded => tracing::error!(replica = %self.id,
                "another gateway process registered the same cluster.replica_id: this one stops \
                 delivering commands for good; give every replica its own cluster.replica_id"),
        }
    }

    /// Renews until `shutdown`, updating the liveness. On shutdown the row is marked expired
    /// so the other replicas take over at once (a clean exit leaves no lease to wait out).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_error = String::from("no renewal succeeded in time");
        let mut warned_at: Option<Instant> = None;
        loop {
            let jitter = 0.8 + rand::random::<f64>() * 0.4;
            let wait = self.interval.mul_f64(jitter);
            // Wake at the local deadline too, so the fence is noticed on time when renewals
            // hang.
            let renewed = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
            let fence_at = renewed + self.timeout - self.timeout / 10;
            let now = Instant::now();
            let until = if fence_at > now {
                (now + wait).min(fence_at)
            } else {
                now + wait
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(until.into()) => {}
            }
            if self.deadline_passed(Instant::now()) {
                self.set(Liveness::Expired {
                    reason: last_error.clone(),
                });
            }
            if *self.liveness.borrow() == Liveness::Superseded {
                continue;
            }
            // A renewal may take at most what is left of the liveness window.
            let budget = self.timeout.max(Duration::from_millis(100));
            match tokio::time::timeout(budget, self.renew()).await {
                Ok(Ok(true)) => {
                    self.set_failing(None);
                    self.set(Liveness::Live)
                }
                Ok(Ok(false)) => self.set(Liveness::Superseded),
                Ok(Err(e)) => {
                    last_error = e.to_string();
                    self.set_failing(Some(last_error.clone()));
                    if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(replica = %self.id, error = %e, "liveness renewal failed");
                        warned_at = Some(Instant::now());
                    }
                }
                Err(_) => {
                    last_error = format!("a renewal took longer than {budget:?}");
                    self.set_failing(Some(last_error.clone()));
                }
            }
        }
        let _ = sqlx::query(
            "UPDATE gateway_replicas SET expires_at = now(), draining = true
             WHERE replica_id = $1 AND epoch = $2",
        )
        .bind(&self.id.name)
        .bind(self.id.epoch)
        .execute(&self.pool)
        .await;
    }
}

/// Every registered replica, with whether it is alive now.
pub async fn replicas(pool: &PgPool) -> Result<Vec<ReplicaRow>, DbError> {
    let rows: Vec<(String, i64, String, String, bool, bool)> = sqlx::query_as(
        "SELECT replica_id, epoch, advertise, version, draining, expires_at > now()
         FROM gateway_replicas ORDER BY replica_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(replica_id, epoch, advertise, version, draining, alive)| ReplicaRow {
                replica_id,
                epoch,
                advertise,
                version,
                draining,
                alive,
            },
        )
        .collect())
}

/// A replica as its peers need it: where to dial it and how long it is surely alive.
#[derive(Clone, Debug)]
pub struct PeerRecord {
    /// Name.
    pub replica_id: String,
    /// Epoch.
    pub epoch: i64,
    /// Where its peers dial it.
    pub advertise: String,
    /// Draining (shutting down).
    pub draining: bool,
    /// What was left of its liveness by the database's clock when the row was read (zero once
    /// expired).
    pub alive_for: Duration,
}

/// Every registered replica with what is left of its liveness: the peer links read it every
/// probe interval (one small query, whatever the number of agents).
pub async fn peer_records(pool: &PgPool) -> Result<Vec<PeerRecord>, DbError> {
    let rows: Vec<(String, i64, String, bool, i64)> = sqlx::query_as(
        "SELECT replica_id, epoch, advertise, draining,
                GREATEST(0, EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::bigint
         FROM gateway_replicas",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(replica_id, epoch, advertise, draining, left_ms)| PeerRecord {
                replica_id,
                epoch,
                advertise,
                draining,
                alive_for: Duration::from_millis(left_ms.max(0) as u64),
            },
        )
        .collect())
}
