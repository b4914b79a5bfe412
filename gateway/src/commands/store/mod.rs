//! Backend layer: where command state lives. One interface, [`CommandStore`], so a PostgreSQL
//! implementation can follow the embedded one ([`embedded`], on redb).
//!
//! The store keeps [`CommandRecord`]s; at rest a record is the `tether.v1.Command` protobuf
//! ([`codec`]): fields added later load from older files. A large payload is kept apart and
//! written once, so state changes rewrite a small record.

pub mod codec;
pub mod embedded;

use std::future::Future;
use std::pin::Pin;

use tunnel_proto::AgentId;

use crate::commands::record::{CommandRecord, CommandState};

pub use embedded::EmbeddedStore;

/// A future the store hands back; boxed so the trait stays object-safe.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Why the store failed. Always the gateway's fault (disk, corruption), never the caller's;
/// retrying may help when the cause was transient.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused an operation (IO error, corruption, full disk).
    #[error("command store: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("command store: record {id} is corrupt: {detail}")]
    Corrupt {
        /// The record's key.
        id: String,
        /// What the decoder said.
        detail: String,
    },
    /// The store's writer has stopped (the gateway is shutting down or the writer failed).
    #[error("command store is closed")]
    Closed,
}

/// What `submit` did.
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitOutcome {
    /// The command (new, or the existing one for the idempotency key).
    pub command: CommandRecord,
    /// False when the idempotency key already named a command.
    pub created: bool,
}

/// Which commands `list` returns; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// One agent: read from the agent's index.
    pub agent: Option<AgentId>,
    /// Only these tenants' commands (a caller scoped to some tenants): read from their
    /// indexes. `None`: every tenant.
    pub tenants: Option<Vec<String>>,
    /// One state (`None`: any).
    pub state: Option<CommandState>,
    /// Command kind.
    pub kind: String,
    /// Created at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Created before (Unix ms).
    pub to_ms: Option<i64>,
    /// Ids strictly after this one (pagination).
    pub after: String,
    /// At most this many.
    pub limit: usize,
}

/// What `list` found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListPage {
    /// Matching commands in id order, at most the filter's `limit`.
    pub commands: Vec<CommandRecord>,
    /// Set when the read stopped at its budget ([`LIST_SCAN_RECORDS`], [`LIST_SCAN_BYTES`])
    /// before `limit` matches: the id to go on after (the last record read, which may not
    /// match). State, kind and time filters are checked record by record within the agent's,
    /// the tenants' or the whole store's id range, so a filter that matches little ends its page
    /// here instead of reading everything.
    pub resume: Option<String>,
}

/// Records one `list` call reads at most (matching or not).
pub const LIST_SCAN_RECORDS: usize = 10_000;
/// Record bytes one `list` call reads at most.
pub const LIST_SCAN_BYTES: usize = 32 << 20;

/// Which finished commands `prune` deletes.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Finished before this (Unix ms).
    pub finished_before_ms: u64,
    /// And the oldest finished beyond this many.
    pub keep: u64,
    /// At most this many per call, so one call holds the writer briefly.
    pub batch: usize,
}

/// A fresh command id for a command submitted at `at`: `t`, the Unix ms in 12 hex digits, 80
/// random bits in 20 (ids sort by submission time across replicas, to the millisecond).
pub fn fresh_id(at: std::time::SystemTime) -> String {
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rand = rand::random::<u128>() & ((1u128 << 80) - 1);
    format!("t{ms:012x}{rand:020x}")
}

/// Durable command state. Ids are assigned by the store, unguessable, and sort in submission
/// order.
pub trait CommandStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new command (its `id` is assigned here) unless `(agent, idempotency_key)` already
    /// names one, in which case that one is returned (its payload may be left out). Resolves
    /// only once the write is durable.
    fn submit(&self, command: CommandRecord) -> StoreFuture<SubmitOutcome>;
    /// Overwrites a command's record. Writes are applied in call order; resolves once durable.
    fn put(&self, command: CommandRecord) -> StoreFuture<()>;
    /// One command.
    fn get(&self, id: &str) -> Result<Option<CommandRecord>, StoreError>;
    /// Commands matching `filter`, in id (submission) order; large payloads and outputs are
    /// left out. Reads a bounded part of the store per call (see [`ListPage::resume`]).
    fn list(&self, filter: &ListFilter) -> Result<ListPage, StoreError>;
    /// Every command not in a final state, in submission order (for recovery at start).
    fn unfinished(&self) -> Result<Vec<CommandRecord>, StoreError>;
    /// True when the store holds any command for `agent` (or ever held one).
    fn knows_agent(&self, agent: &AgentId) -> Result<bool, StoreError>;
    /// Deletes up to `retention.batch` finished commands that are past `retention` (with their
    /// payload, output, index entries and idempotency key); resolves to how many, once durable.
    fn prune(&self, retention: Retention) -> StoreFuture<usize>;
}
