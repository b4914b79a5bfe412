//! Backend layer: where command state lives. One interface, [`CommandStore`], so a PostgreSQL
//! implementation can follow the embedded one ([`embedded`], on redb).
//!
//! Records are the northbound `tether.v1.Command` messages themselves (protobuf-encoded at rest):
//! the API and the store cannot drift apart, and fields added later load from older files. A
//! large payload is kept apart and written once, so state changes rewrite a small record.

pub mod embedded;

use std::future::Future;
use std::pin::Pin;

use tether_api::v1::Command;

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
    pub command: Command,
    /// False when the idempotency key already named a command.
    pub created: bool,
}

/// Which commands `list` returns; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// `<tenant>/<agent>`.
    pub agent: String,
    /// A `CommandState` value, 0 for any.
    pub state: i32,
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

/// Durable command state. Ids are assigned by the store and sort in submission order.
pub trait CommandStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new command (its `id` is assigned here) unless `(agent, idempotency_key)` already
    /// names one, in which case that one is returned (its payload may be left out). Resolves
    /// only once the write is durable.
    fn submit(&self, command: Command) -> StoreFuture<SubmitOutcome>;
    /// Overwrites a command's record. Writes are applied in call order; resolves once durable.
    fn put(&self, command: Command) -> StoreFuture<()>;
    /// One command.
    fn get(&self, id: &str) -> Result<Option<Command>, StoreError>;
    /// Commands matching `filter`, in id (submission) order; large payloads are left out.
    fn list(&self, filter: &ListFilter) -> Result<Vec<Command>, StoreError>;
    /// Every command not in a final state, in submission order (for recovery at start).
    fn unfinished(&self) -> Result<Vec<Command>, StoreError>;
    /// True when the store holds any command for `agent`.
    fn knows_agent(&self, agent: &str) -> Result<bool, StoreError>;
}
