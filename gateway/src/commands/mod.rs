//! Feature layer: durable asynchronous commands — `tether.v1.Commands` and delivery to agents.
//!
//! A command is a [`CommandRecord`] (`record.rs`): a typed state, a typed agent, its payload in
//! shared [`bytes::Bytes`]. It becomes the `tether.v1.Command` message only at the API edge
//! (`api.rs`) and at rest (`store/codec.rs`).
//!
//! A Submit is committed to the [`CommandStore`] (fsync'd, group-committed) before it is
//! answered. Delivery runs in *lanes*, one per `(agent, ordering_key)`: a lane delivers its
//! commands one at a time in submission order, the next only after the previous reached a final
//! state; different lanes run in parallel. Each agent's commands and lanes sit behind that
//! agent's own lock (`state.rs`): two agents' commands never wait for each other. A delivery is
//! a gateway-opened QUIC stream of kind `Command` on any live session of the agent (never the
//! control stream):
//!
//! ```text
//! gateway ──StreamHeader{Command, id, kind}, Data(payload)…, FIN──► agent
//! gateway ◄──CommandAck, CommandProgress…, Data(output)…, CommandResult, FIN── agent
//! ```
//!
//! A stream that fails before its `CommandResult` (agent died, connection lost) is redelivered
//! after a backoff once the agent has a session again, up to `commands.max_attempts` deliveries;
//! the agent's record of completed ids makes redelivery at-most-once in effect. On start every
//! command not in a final state goes back into its lane.
//!
//! What an agent reports is bounded here whatever it sends: a progress line is cut to
//! [`COMMAND_PROGRESS_LINE_MAX`] bytes and a command keeps its last [`PROGRESS_KEPT`] lines within
//! [`PROGRESS_BYTES_MAX`] (each delivery attempt starts them anew), a result message is cut to
//! [`COMMAND_MESSAGE_MAX`](tunnel_proto::message::COMMAND_MESSAGE_MAX), and an output above
//! `commands.max_output` fails the command. Finished commands are deleted after
//! `commands.retention` or beyond `commands.retention_max`.

mod api;
mod delivery;
pub mod record;
mod replicated;
mod state;
pub mod store;
mod watch;

pub use api::CommandsApi;
pub use delivery::{DeliveryError, OUTPUT_BUFFERS_PER_AGENT};
pub use record::{CommandRecord, CommandState, EVENT_OUTPUT_MAX, NewCommand, Outcome};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tether_runtime::CancellationToken;
use tunnel_proto::AgentId;
use tunnel_proto::message::{COMMAND_PROGRESS_LINE_MAX, truncate_text};

use crate::cluster::Cluster;
use crate::cluster::commands as pg;
use crate::commands::replicated::Replicated;
use crate::commands::state::State;
use crate::commands::store::{CommandStore, ListFilter, ListPage, Retention, StoreError};
use crate::config::CommandsConfig;
use crate::tunnel::registry::Registry;

/// Progress lines kept per command (the last ones).
pub const PROGRESS_KEPT: usize = 20;
/// Bytes of progress kept per command: the last lines that fit (each at most
/// [`COMMAND_PROGRESS_LINE_MAX`]). Every progress line publishes the command, progress included,
/// to the watchers' feed, whose buffer holds 8,192 events for slow watchers.
pub const PROGRESS_BYTES_MAX: usize = 8 << 10;
/// Largest `List` response, in bytes: a page ends before the command that would pass it. gRPC
/// clients refuse messages above 4 MiB unless told otherwise (tonic, grpc-go, grpcio), and the
/// largest listed command (no payload, output up to [`EVENT_OUTPUT_MAX`], capped progress and
/// message, bounded names) is well below this, so every page carries at least one.
pub const LIST_PAGE_BYTES: usize = 1 << 20;
/// Longest `kind`, `content_type`, `idempotency_key` and `ordering_key` a Submit may carry: they
/// are stored with the command and listed with it.
const NAME_MAX: usize = 256;
pub(crate) const KEY_MAX: usize = 1024;
/// Finished commands deleted per store transaction, so retention never holds the writer long.
const PRUNE_BATCH: usize = 1000;
/// Longest wait between two retention passes (a pass with nothing to delete is one read).
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Default and largest `List` page.
pub(crate) const PAGE_SIZE: usize = 100;
pub(crate) const MAX_PAGE_SIZE: usize = 1000;
/// How often queued commands are checked for expiry (and checked again right before delivery).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often a lane waiting for its agent rechecks on its own; registry events wake it anyway.
pub(crate) const LANE_RECHECK: Duration = Duration::from_secs(5);

// === Errors ===

/// Why a Commands call failed; mapped to a gRPC status in `northbound::status`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The caller named an agent this gateway has never seen (caller's mistake).
    #[error("agent {0} is not known to this gateway")]
    UnknownAgent(AgentId),
    /// The caller sent a malformed request (caller's mistake, do not retry as is).
    #[error("{0}")]
    Invalid(String),
    /// The payload is over the configured limit (caller's mistake).
    #[error("payload is {size} bytes, above the limit of {limit} bytes (commands.max_payload)")]
    PayloadTooLarge {
        /// What was sent.
        size: usize,
        /// `commands.max_payload`.
        limit: u64,
    },
    /// The agent has as many unfinished commands as `limits.pending_commands_per_agent`
    /// (retry once some have finished).
    #[error(
        "agent {agent} has {limit} pending commands, the limit (limits.pending_commands_per_agent); submit again once some have finished"
    )]
    TooManyPending {
        /// The agent.
        agent: AgentId,
        /// The limit.
        limit: u32,
    },
    /// The caller has as many `Commands/Watch` streams open as
    /// `limits.command_watches_per_caller` (retry once one has ended).
    #[error(
        "caller {caller:?} has {limit} command watches open, the limit (limits.command_watches_per_caller); end one before opening another"
    )]
    TooManyWatches {
        /// The caller's name.
        caller: String,
        /// The limit.
        limit: u32,
    },
    /// A `Commands/Watch` stream fell so far behind the gateway's events that some were lost
    /// (the caller reads too slowly; start a new watch).
    #[error("watch fell {missed} events behind")]
    WatchLagged {
        /// Events it missed.
        missed: u64,
    },
    /// No command has this id (or none the caller may see: the answer is the same).
    #[error("no command {0}")]
    NotFound(String),
    /// This replica cannot take the Submit now: it fenced itself (its liveness in PostgreSQL
    /// expired) or PostgreSQL failed. Another replica can; this one once it renewed.
    #[error("{0}")]
    Unavailable(String),
    /// Cancel came too late: the command was already delivered or finished.
    #[error("command {id} was already {state}: too late to cancel")]
    TooLate {
        /// The command.
        id: String,
        /// Its state.
        state: CommandState,
    },
    /// The store failed (the gateway's fault; retrying may help).
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn since(t: Option<SystemTime>) -> f64 {
    let Some(t) = t else { return 0.0 };
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends a progress line the agent reported to a command's `progress`: the line cut to
/// [`COMMAND_PROGRESS_LINE_MAX`], then the oldest lines dropped until at most [`PROGRESS_KEPT`]
/// lines of at most [`PROGRESS_BYTES_MAX`] bytes together are left. The newest line always stays.
pub fn push_progress(progress: &mut Vec<String>, mut line: String) {
    truncate_text(&mut line, COMMAND_PROGRESS_LINE_MAX);
    progress.push(line);
    let mut bytes: usize = progress.iter().map(String::len).sum();
    let mut drop = 0;
    while progress.len() - drop > PROGRESS_KEPT
        || (bytes > PROGRESS_BYTES_MAX && progress.len() - drop > 1)
    {
        bytes -= progress[drop].len();
        drop += 1;
    }
    progress.drain(..drop);
}

/// A write of command state on its way; queued when made, so dropping it does not cancel it.
pub(crate) type Persisting = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Where command state lives.
#[derive(Debug)]
enum Backend {
    /// One gateway, the store in `data_dir`: every command is this process's to deliver.
    Embedded(Arc<dyn CommandStore>),
    /// Replicas sharing PostgreSQL: this one delivers the commands of the agents whose lease it
    /// holds (see [`replicated`]).
    Replicated(Arc<Replicated>),
}

/// The commands feature: the API's state and the delivery lanes.
pub struct Commands {
    backend: Backend,
    registry: Arc<Registry>,
    cfg: CommandsConfig,
    state: State,
    shutdown: CancellationToken,
    pending_limit: std::sync::atomic::AtomicU32,
    /// Open `Commands/Watch` streams per caller, for `limits.command_watches_per_caller`.
    watches: Mutex<HashMap<String, u32>>,
    watch_limit: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Commands {
    /// Recovers every unfinished command from `store` into its lane and starts delivering.
    pub fn start(
        store: Arc<dyn CommandStore>,
        registry: Arc<Registry>,
        cfg: CommandsConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Commands>, StoreError> {
        let unfinished = store.unfinished()?;
        let this = Commands::new(
            Backend::Embedded(store),
            registry,
            cfg,
            shutdown,
            State::new(false),
        );
        let mut lanes = Vec::new();
        for cmd in unfinished {
            let (agent, key) = (cmd.agent.clone(), cmd.ordering_key.clone());
            let spawn = this.state.agents.run_new(&agent, |st| {
                st.pending += 1;
                let idle = st.enqueue(&cmd.ordering_key, &cmd.id);
                this.state.activate(st, cmd);
                idle.then_some(st.generation)
            });
            if let Some(generation) = spawn {
                lanes.push((agent, key, generation));
            }
        }
        if !lanes.is_empty() {
            tracing::info!(lanes = lanes.len(), "recovered unfinished commands");
        }
        for (agent, key, generation) in lanes {
            tokio::spawn(this.clone().run_lane(agent, key, generation));
        }
        tokio::spawn(this.clone().sweep());
        tokio::spawn(this.clone().retain());
        Ok(this)
    }

    fn new(
        backend: Backend,
        registry: Arc<Registry>,
        cfg: CommandsConfig,
        shutdown: CancellationToken,
        state: State,
    ) -> Arc<Commands> {
        Arc::new(Commands {
            backend,
            registry,
            cfg,
            state,
            shutdown,
            pending_limit: std::sync::atomic::AtomicU32::new(u32::MAX),
            watches: Mutex::new(HashMap::new()),
            watch_limit: std::sync::atomic::AtomicU32::new(u32::MAX),
        })
    }

    /// Starts the feature on a replica sharing `cluster`'s PostgreSQL: it delivers the
    /// commands of agents whose lease it takes (see [`replicated`]).
    pub fn start_replicated(
        cluster: Arc<Cluster>,
        registry: Arc<Registry>,
        cfg: CommandsConfig,
        shutdown: CancellationToken,
    ) -> Arc<Commands> {
        let (r, writers) = Replicated::new(cluster);
        let this = Commands::new(
            Backend::Replicated(r.clone()),
            registry,
            cfg,
            shutdown,
            State::new(true),
        );
        this.start_replicated_tasks(&r, writers);
        tokio::spawn(this.clone().retain());
        this
    }

    /// Puts a command this replica now delivers into its lane (once).
    fn adopt(self: &Arc<Self>, cmd: CommandRecord) {
        if cmd.is_final() {
            return;
        }
        let (agent, key) = (cmd.agent.clone(), cmd.ordering_key.clone());
        let spawn = self.state.agents.run_new(&agent, |st| {
            if st.active.contains_key(&cmd.id) {
                return None;
            }
            let idle = st.enqueue(&cmd.ordering_key, &cmd.id);
            self.state.activate(st, cmd);
            idle.then_some(st.generation)
        });
        if let Some(generation) = spawn {
            tokio::spawn(self.clone().run_lane(agent, key, generation));
        }
    }

    /// The replicated part, when replicas share PostgreSQL.
    fn replicated(&self) -> Option<&Arc<Replicated>> {
        match &self.backend {
            Backend::Replicated(r) => Some(r),
            Backend::Embedded(_) => None,
        }
    }

    /// Deletes finished commands past `commands.retention` / `commands.retention_max`, a batch
    /// per store transaction so Submits and state changes queue behind one batch at most.
    async fn retain(self: Arc<Self>) {
        let every = (self.cfg.retention / 4).clamp(Duration::from_millis(250), PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let finished_before = SystemTime::now()
                .checked_sub(self.cfg.retention)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let retention = Retention {
                finished_before_ms: finished_before,
                keep: self.cfg.retention_max,
                batch: PRUNE_BATCH,
            };
            loop {
                let pruned = match &self.backend {
                    Backend::Embedded(store) => store.prune(retention).await,
                    Backend::Replicated(r) => pg::prune(
                        &r.cluster.pool,
                        i64::try_from(retention.finished_before_ms).unwrap_or(i64::MAX),
                        i64::try_from(retention.keep).unwrap_or(i64::MAX),
                        retention.batch as i64,
                    )
                    .await
                    .map(|n| n as usize)
                    .map_err(|e| StoreError::Backend(format!("PostgreSQL: {e}"))),
                };
                match pruned {
                    Ok(n) => {
                        metrics::counter!("tether_gateway_commands_pruned_total")
                            .increment(n as u64);
                        if n < PRUNE_BATCH || self.shutdown.is_cancelled() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "deleting finished commands past their retention failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// Caps unfinished commands per agent (`limits.pending_commands_per_agent`); unlimited
    /// until set.
    pub fn set_pending_limit(&self, limit: u32) {
        self.pending_limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes a record; logged when it fails (the in-memory state stays authoritative until the
    /// next write, and redelivery covers a lost intermediate state). Called under the command's
    /// agent's lock, so one command's writes are queued in the order they were made.
    fn persist(&self, cmd: CommandRecord) -> Persisting {
        match &self.backend {
            Backend::Embedded(store) => {
                let fut = store.put(cmd);
                Box::pin(async move {
                    if let Err(e) = fut.await {
                        tracing::error!(error = %e, "command state not persisted");
                    }
                })
            }
            // Refusals (fenced, cancelled elsewhere) are handled by the writer.
            Backend::Replicated(r) => Box::pin(r.write(cmd)),
        }
    }

    // === Submit, Get, List, Cancel ===

    /// Validates and durably queues a command; returns it and whether it was created.
    pub async fn submit(
        self: &Arc<Self>,
        req: NewCommand,
    ) -> Result<(CommandRecord, bool), CommandError> {
        if req.kind.is_empty() {
            return Err(CommandError::Invalid(
                "kind is empty: name the handler the agent should run".into(),
            ));
        }
        for (field, value, max) in [
            ("kind", &req.kind, NAME_MAX),
            ("content_type", &req.content_type, NAME_MAX),
            ("idempotency_key", &req.idempotency_key, KEY_MAX),
            ("ordering_key", &req.ordering_key, KEY_MAX),
        ] {
            if value.len() > max {
                return Err(CommandError::Invalid(format!(
                    "{field} is {} bytes, above the limit of {max} bytes",
                    value.len()
                )));
            }
        }
        if req.payload.len() as u64 > self.cfg.max_payload {
            return Err(CommandError::PayloadTooLarge {
                size: req.payload.len(),
                limit: self.cfg.max_payload,
            });
        }
        // Known: seen by this process, or has commands in the store (a restarted gateway
        // accepts commands for its agents before they reconnect).
        let known = self.registry.get(&req.agent).is_some();
        if let Some(r) = self.replicated()
            && !r.cluster.replica.is_live()
        {
            return Err(CommandError::Unavailable(format!(
                "gateway replica {} cannot renew its liveness in PostgreSQL, so it takes no Submit now; retry (another replica can take it)",
                r.cluster.replica.id()
            )));
        }
        if !known && !self.knows_agent(&req.agent).await? {
            return Err(CommandError::UnknownAgent(req.agent));
        }
        let created = SystemTime::now();
        let expires = match req.ttl {
            Some(ttl) if !ttl.is_zero() => Some(
                created
                    .checked_add(ttl)
                    .ok_or_else(|| CommandError::Invalid("ttl is too large".into()))?,
            ),
            Some(_) | None => None,
        };
        let cmd = CommandRecord::queued(req, created, expires);
        let limit = self
            .pending_limit
            .load(std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.replicated() {
            return self.submit_replicated(r, cmd, limit).await;
        }
        let Backend::Embedded(store) = &self.backend else {
            unreachable!("replicated Submits returned above")
        };
        // Reserve a pending slot before storing, so racing Submits cannot overshoot the limit;
        // given back below unless a new command took it. The reservation also keeps the agent's
        // state in memory until the command joins it.
        let agent = cmd.agent.clone();
        let reserved = self.state.agents.run_new(&agent, |st| {
            let free = st.pending < limit;
            if free {
                st.pending += 1;
            }
            free
        });
        if !reserved {
            crate::metrics::count_rejection(crate::metrics::Limit::PendingCommandsPerAgent);
            return Err(CommandError::TooManyPending { agent, limit });
        }
        let out = match store.submit(cmd).await {
            Ok(out) if out.created => out,
            other => {
                self.state.agents.run(&agent, |st| st.release_pending());
                other?
            }
        };
        if !out.created {
            return Ok((out.command, false));
        }
        let cmd = out.command.clone();
        let key = cmd.ordering_key.clone();
        let spawn = self.state.agents.run_new(&agent, |st| {
            self.state.publish(Arc::new(cmd.view()));
            let idle = st.enqueue(&cmd.ordering_key, &cmd.id);
            self.state.activate(st, cmd);
            idle.then_some(st.generation)
        });
        if let Some(generation) = spawn {
            tokio::spawn(self.clone().run_lane(agent, key, generation));
        }
        Ok((out.command, out.created))
    }

    /// True when `agent` was seen (by any replica) or has commands in the store.
    async fn knows_agent(&self, agent: &AgentId) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Embedded(store) => store.knows_agent(agent),
            Backend::Replicated(r) => pg::knows_agent(&r.cluster.pool, agent)
                .await
                .map_err(replicated::sql),
        }
    }

    /// One stored command.
    async fn stored(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        match &self.backend {
            Backend::Embedded(store) => store.get(id),
            Backend::Replicated(r) => pg::get(&r.cluster.pool, id).await.map_err(replicated::sql),
        }
    }

    /// Stored commands matching `filter`.
    pub(crate) async fn list_stored(&self, filter: ListFilter) -> Result<ListPage, StoreError> {
        match &self.backend {
            Backend::Embedded(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.list(&filter))
                    .await
                    .map_err(|e| StoreError::Backend(format!("list: {e}")))?
            }
            Backend::Replicated(r) => {
                let q = pg::ListQuery {
                    agent: filter.agent,
                    tenants: filter.tenants,
                    state: filter.state,
                    kind: filter.kind,
                    from_ms: filter.from_ms,
                    to_ms: filter.to_ms,
                    after: filter.after,
                    limit: filter.limit as i64,
                };
                let commands = pg::list(&r.cluster.pool, &q)
                    .await
                    .map_err(replicated::sql)?;
                Ok(ListPage {
                    commands,
                    resume: None,
                })
            }
        }
    }

    /// One command.
    pub async fn get(&self, id: &str) -> Result<CommandRecord, CommandError> {
        if let Some(c) = self.state.active(id) {
            return Ok(c);
        }
        let stored = self.stored(id).await?;
        let mut c = stored.ok_or_else(|| CommandError::NotFound(id.to_owned()))?;
        self.overlay_recent(std::slice::from_mut(&mut c));
        Ok(c)
    }

    /// Replaces store records that lag the in-memory state (an active command, or a final
    /// state whose write is still on its way) with the live state, keeping the stored payload.
    fn overlay_recent(&self, cmds: &mut [CommandRecord]) {
        for c in cmds {
            let live = match self.state.active(&c.id) {
                Some(live) => Some(live),
                None if !c.is_final() => self.state.recent(&c.id).map(|r| (*r).clone()),
                None => None,
            };
            if let Some(live) = live {
                let payload = std::mem::take(&mut c.payload);
                *c = CommandRecord { payload, ..live };
            }
        }
    }

    /// Cancels a command that was not delivered yet, or one its agent holds for its owner's
    /// approval (its delivery then withdraws it from the agent).
    pub async fn cancel(&self, id: &str) -> Result<CommandRecord, CommandError> {
        if let Some(r) = self.replicated() {
            return self.cancel_replicated(r, id).await;
        }
        let found = self.state.agent_of(id).and_then(|agent| {
            self.state
                .agents
                .run(&agent, |st| match st.active.get(id).map(|c| c.state) {
                    Some(from @ (CommandState::Queued | CommandState::AwaitingApproval)) => {
                        let cmd = self
                            .state
                            .transition(st, id, CommandState::Cancelled, |c| {
                                c.finished = Some(SystemTime::now());
                                c.result = Some(Outcome::message(cancelled_from(from)));
                            })
                            .ok_or_else(|| CommandError::NotFound(id.to_owned()));
                        Some(cmd.map(|cmd| {
                            let write = self.persist(cmd.clone());
                            (cmd, write)
                        }))
                    }
                    Some(state) => Some(Err(CommandError::TooLate {
                        id: id.to_owned(),
                        state,
                    })),
                    None => None,
                })
                .flatten()
        });
        let Some(found) = found else {
            let c = self
                .stored(id)
                .await?
                .ok_or_else(|| CommandError::NotFound(id.to_owned()))?;
            return Err(CommandError::TooLate {
                id: id.to_owned(),
                state: c.state,
            });
        };
        let (cmd, write) = found?;
        write.await;
        Ok(cmd)
    }

    // === Delivery ===

    /// Expires queued commands past their TTL (embedded; across replicas see
    /// `replicated::expire_replicated`).
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            let now = SystemTime::now();
            let mut expired = 0u64;
            self.state.agents.each(|_, st| {
                let ids: Vec<String> = st
                    .active
                    .values()
                    .filter(|c| c.state == CommandState::Queued)
                    .filter(|c| c.expires.is_some_and(|e| e <= now))
                    .map(|c| c.id.clone())
                    .collect();
                for id in ids {
                    let done = self.state.transition(st, &id, CommandState::Expired, |c| {
                        c.finished = Some(now);
                        c.result = Some(Outcome::message("expired before delivery"));
                    });
                    if let Some(c) = done {
                        drop(self.persist(c));
                        expired += 1;
                    }
                }
            });
            metrics::counter!("tether_gateway_command_expirations_total").increment(expired);
        }
    }
}

/// A cancelled command's message, by the state it was cancelled in.
pub(crate) fn cancelled_from(state: CommandState) -> &'static str {
    match state {
        CommandState::AwaitingApproval => {
            "cancelled while awaiting the data plane owner's approval"
        }
        _ => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z ]{0,80}",
            // Long lines, multi-byte characters across the cut.
            "(é|x|\u{1F600}){0,4000}",
            (0usize..200_000).prop_map(|n| "y".repeat(n)),
        ]
    }

    proptest! {
        /// Whatever an agent sends, in whatever attempt, a command keeps at most PROGRESS_KEPT
        /// lines of at most COMMAND_PROGRESS_LINE_MAX bytes and PROGRESS_BYTES_MAX together, and
        /// they are the newest lines, in order, each the head of what was sent.
        #[test]
        fn progress_kept_is_the_newest_lines_within_every_cap(
            attempts in proptest::collection::vec(proptest::collection::vec(line(), 0..60), 1..4),
        ) {
            let mut progress = Vec::new();
            for lines in &attempts {
                // A new attempt starts its progress anew (see `attempt`).
                progress.clear();
                for l in lines {
                    push_progress(&mut progress, l.clone());
                    prop_assert!(progress.len() <= PROGRESS_KEPT);
                    prop_assert!(progress.iter().map(String::len).sum::<usize>() <= PROGRESS_BYTES_MAX);
                    prop_assert!(progress.iter().all(|p| p.len() <= COMMAND_PROGRESS_LINE_MAX));
                }
                let sent = lines.len();
                let kept = progress.len();
                prop_assert!(kept <= sent);
                prop_assert!(sent == 0 || kept >= 1, "the newest line is always kept");
                for (k, s) in progress.iter().zip(&lines[sent - kept..]) {
                    if s.len() <= COMMAND_PROGRESS_LINE_MAX {
                        prop_assert_eq!(k, s);
                    } else {
                        let head = k.rsplit_once(" \u{2026} [+").map(|(h, _)| h).unwrap_or(k);
                        prop_assert!(s.starts_with(head));
                    }
                }
                // Only the byte budget may make it keep fewer than the last PROGRESS_KEPT.
                if kept < sent.min(PROGRESS_KEPT) {
                    let dropped = &lines[sent - kept - 1];
                    let mut d = dropped.clone();
                    truncate_text(&mut d, COMMAND_PROGRESS_LINE_MAX);
                    let total: usize = progress.iter().map(String::len).sum();
                    prop_assert!(total + d.len() > PROGRESS_BYTES_MAX);
                }
            }
        }
    }
}
