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

use std::time::Duration;

/// Records how long one store operation took (`tether_gateway_store_seconds{op}`).
pub fn record_store_latency(op: &'static str, took: Duration) {
    metrics::histogram!("tether_gateway_store_seconds", "op" => op).record(took.as_secs_f64());
}
