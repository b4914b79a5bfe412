//! Feature layer: durable asynchronous commands — `tether.v1.Commands` and delivery to agents.
//!
//! A Submit is committed to the [`CommandStore`] (fsync'd, group-committed) before it is
//! answered. Delivery runs in *lanes*, one per `(agent, ordering_key)`: a lane delivers its
//! commands one at a time in submission order, the next only after the previous reached a final
//! state; different lanes run in parallel. A delivery is a gateway-opened QUIC stream of kind
//! `Command` on any live session of the agent (never the control stream):
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
//! [`COMMAND_MESSAGE_MAX`], and an output above `commands.max_output` fails the command. Finished
//! commands are deleted after `commands.retention` or beyond `commands.retention_max`.

pub mod store;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_api::v1;
use tether_api::v1::commands_server::{Commands as CommandsRpc, CommandsServer};
use tether_api::v1::{Command, CommandState};
use tether_runtime::CancellationToken;
use tether_runtime::stream::{FramedRecv, send_data, send_msg};
use tether_runtime::transport::SendStream;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tunnel_proto::message::{
    COMMAND_MAX_OUTPUT_KEY, COMMAND_MESSAGE_MAX, COMMAND_PROGRESS_LINE_MAX, MetadataEntry,
    StreamHeader, StreamKind, truncate_text,
};
use tunnel_proto::{AgentId, ErrorCode, Message};

use crate::commands::store::embedded::is_final;
use crate::commands::store::{CommandStore, ListFilter, Retention, StoreError};
use crate::config::CommandsConfig;
use crate::northbound::auth::{Caller, TenantScope, caller};
use crate::tunnel::registry::{Registry, SessionInfo};

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
const KEY_MAX: usize = 1024;
/// Finished commands deleted per store transaction, so retention never holds the writer long.
const PRUNE_BATCH: usize = 1000;
/// Longest wait between two retention passes (a pass with nothing to delete is one read).
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Default and largest `List` page.
const PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// How often queued commands are checked for expiry (and checked again right before delivery).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often a lane waiting for its agent rechecks on its own; registry events wake it anyway.
const LANE_RECHECK: Duration = Duration::from_secs(5);
/// Largest result output a Watch event carries.
pub const EVENT_OUTPUT_MAX: usize = 64 << 10;
/// Events buffered for slow watchers before they are dropped with RESOURCE_EXHAUSTED.
const EVENT_BUFFER: usize = 8192;
/// Recently finished commands kept in memory (see `State::recent`).
const RECENT_KEPT: usize = 4096;

// === Errors ===

/// Why a Commands call failed; mapped to a gRPC status in one place (`From` below).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The caller named an agent this gateway has never seen (caller's mistake).
    #[error("agent {0} is not known to this gateway")]
    UnknownAgent(String),
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
        agent: String,
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
    /// No command has this id (or none the caller may see: the answer is the same).
    #[error("no command {0}")]
    NotFound(String),
    /// Cancel came too late: the command was already delivered or finished.
    #[error("command {id} was already {state}: too late to cancel")]
    TooLate {
        /// The command.
        id: String,
        /// Its state, lower case.
        state: String,
    },
    /// The store failed (the gateway's fault; retrying may help).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CommandError> for Status {
    fn from(e: CommandError) -> Status {
        let msg = e.to_string();
        match e {
            CommandError::UnknownAgent(_) | CommandError::NotFound(_) => Status::not_found(msg),
            CommandError::Invalid(_) | CommandError::PayloadTooLarge { .. } => {
                Status::invalid_argument(msg)
            }
            CommandError::TooLate { .. } => Status::failed_precondition(msg),
            CommandError::TooManyPending { .. } | CommandError::TooManyWatches { .. } => {
                Status::resource_exhausted(msg)
            }
            CommandError::Store(_) => Status::unavailable(msg),
        }
    }
}

fn state_name(state: i32) -> String {
    CommandState::try_from(state).map_or_else(
        |_| format!("state {state}"),
        |s| s.as_str_name().to_lowercase(),
    )
}

fn now_ts() -> prost_types::Timestamp {
    SystemTime::now().into()
}

fn since(ts: Option<&prost_types::Timestamp>) -> f64 {
    let Some(ts) = ts else { return 0.0 };
    let Ok(t) = SystemTime::try_from(*ts) else {
        return 0.0;
    };
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| d.as_secs_f64())
}

// === State ===

type LaneKey = (String, String);

struct State {
    /// Commands not in a final state.
    active: HashMap<String, Command>,
    /// The last commands that reached a final state (without payload), so reads never see an
    /// older state from the store while its final write is still on its way.
    recent: HashMap<String, Command>,
    recent_order: VecDeque<String>,
    /// Every transition, sent under the state lock: the feed's order is the state's order, and a
    /// watcher that subscribes under the lock with a snapshot misses nothing and sees nothing twice.
    events: broadcast::Sender<Command>,
    /// Ids waiting or being delivered, per lane, in order. A lane with an entry here has a
    /// running task.
    lanes: HashMap<LaneKey, VecDeque<String>>,
    /// Active commands per state, for the gauge.
    depth: HashMap<i32, i64>,
    /// Per agent: permits for concurrent deliveries and for buffering their outputs.
    in_flight: HashMap<String, AgentPermits>,
    /// Per agent: commands not final (in `active`) plus Submits reserved but not yet stored,
    /// for `limits.pending_commands_per_agent`; kept as commands come and go, never counted.
    pending: HashMap<String, u32>,
}

impl State {
    fn new() -> State {
        State {
            active: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            lanes: HashMap::new(),
            depth: HashMap::new(),
            in_flight: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    fn release_pending(&mut self, agent: &str) {
        if let Some(n) = self.pending.get_mut(agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(agent);
            }
        }
    }

    /// Sends a transition to watchers. Events leave out the payload, and output above
    /// [`EVENT_OUTPUT_MAX`] (Get has it): the feed's ring buffer must not pin megabytes.
    fn publish(&self, cmd: &Command) {
        let _ = self.events.send(for_event(cmd));
    }

    fn count(&mut self, state: i32, delta: i64) {
        let n = self.depth.entry(state).or_default();
        *n += delta;
        metrics::gauge!("tether_gateway_commands", "state" => state_name(state)).set(*n as f64);
    }

    /// Moves an active command to `to`; final states leave `active`. Returns the new record.
    fn transition(
        &mut self,
        id: &str,
        to: CommandState,
        edit: impl FnOnce(&mut Command),
    ) -> Option<Command> {
        let cmd = self.active.get_mut(id)?;
        let from = cmd.state;
        cmd.state = to as i32;
        edit(cmd);
        let snapshot = cmd.clone();
        if from != to as i32 {
            self.count(from, -1);
            if !is_final(to as i32) {
                self.count(to as i32, 1);
            }
        }
        if is_final(to as i32) {
            self.active.remove(id);
            self.release_pending(&snapshot.agent);
            self.recent.insert(id.to_owned(), for_event(&snapshot));
            self.recent_order.push_back(id.to_owned());
            while self.recent_order.len() > RECENT_KEPT {
                if let Some(old) = self.recent_order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
        self.publish(&snapshot);
        Some(snapshot)
    }
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

/// An agent's delivery permits.
#[derive(Clone)]
struct AgentPermits {
    /// Concurrent deliveries (`commands.max_in_flight`), so command streams never take all of
    /// an agent's stream credit from relayed calls.
    deliveries: Arc<tokio::sync::Semaphore>,
    /// Deliveries buffering an output sent in `Data` frames ([`OUTPUT_BUFFERS_PER_AGENT`]), so
    /// one agent makes the gateway hold at most that many times `commands.max_output`.
    outputs: Arc<tokio::sync::Semaphore>,
}

/// Deliveries of one agent that may buffer a large output (up to `commands.max_output`) at once;
/// the others wait before reading theirs, and the agent's stream flow control holds it back.
pub const OUTPUT_BUFFERS_PER_AGENT: usize = 4;

/// A command as events carry it: no payload, no large output.
fn for_event(cmd: &Command) -> Command {
    let mut ev = Command {
        payload: Vec::new(),
        ..cmd.clone()
    };
    if let Some(r) = &mut ev.result
        && r.output.len() > EVENT_OUTPUT_MAX
    {
        r.output.clear();
    }
    ev
}

/// The commands feature: the API's state and the delivery lanes.
pub struct Commands {
    store: Arc<dyn CommandStore>,
    registry: Arc<Registry>,
    cfg: CommandsConfig,
    state: Mutex<State>,
    shutdown: CancellationToken,
    pending_limit: std::sync::atomic::AtomicU32,
    /// Open `Commands/Watch` streams per caller, for `limits.command_watches_per_caller`.
    watches: Mutex<HashMap<String, u32>>,
    watch_limit: std::sync::atomic::AtomicU32,
}

/// One open `Commands/Watch` stream of a caller; given back when the stream's task ends.
struct WatchSlot {
    commands: Arc<Commands>,
    key: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self
            .commands
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(&self.key);
            }
        }
    }
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("store", &self.store)
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
        let this = Arc::new(Commands {
            store,
            registry,
            cfg,
            state: Mutex::new(State::new()),
            shutdown,
            pending_limit: std::sync::atomic::AtomicU32::new(u32::MAX),
            watches: Mutex::new(HashMap::new()),
            watch_limit: std::sync::atomic::AtomicU32::new(u32::MAX),
        });
        let mut lanes = Vec::new();
        {
            let mut st = this.lock();
            for cmd in unfinished {
                let lane = (cmd.agent.clone(), cmd.ordering_key.clone());
                st.count(cmd.state, 1);
                let q = st.lanes.entry(lane.clone()).or_default();
                if q.is_empty() {
                    lanes.push(lane);
                }
                q.push_back(cmd.id.clone());
                *st.pending.entry(cmd.agent.clone()).or_default() += 1;
                st.active.insert(cmd.id.clone(), cmd);
            }
        }
        if !lanes.is_empty() {
            tracing::info!(lanes = lanes.len(), "recovered unfinished commands");
        }
        for lane in lanes {
            tokio::spawn(this.clone().run_lane(lane));
        }
        tokio::spawn(this.clone().sweep());
        tokio::spawn(this.clone().retain());
        Ok(this)
    }

    /// Caps `Commands/Watch` streams per caller (`limits.command_watches_per_caller`);
    /// unlimited until set.
    pub fn set_watch_limit(&self, limit: u32) {
        self.watch_limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes one of `caller`'s watch slots, or refuses when it holds them all.
    fn watch_slot(self: &Arc<Self>, caller: &Caller) -> Result<WatchSlot, CommandError> {
        let limit = self.watch_limit.load(std::sync::atomic::Ordering::Relaxed);
        // Names are unique per kind: a certificate's `<name>` and a token's `sub` may coincide.
        let key = format!("{}:{}", caller.kind.as_str(), caller.name);
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.get(&key).copied().unwrap_or(0);
        if n >= limit {
            drop(w);
            crate::metrics::count_rejection(crate::metrics::Limit::CommandWatchesPerCaller);
            return Err(CommandError::TooManyWatches {
                caller: caller.name.clone(),
                limit,
            });
        }
        w.insert(key.clone(), n + 1);
        Ok(WatchSlot {
            commands: self.clone(),
            key,
        })
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
                match self.store.prune(retention).await {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a record; logged when it fails (the in-memory state stays authoritative until the
    /// next write, and redelivery covers a lost intermediate state).
    fn persist(&self, cmd: Command) -> impl std::future::Future<Output = ()> + Send + 'static {
        let fut = self.store.put(cmd);
        async move {
            if let Err(e) = fut.await {
                tracing::error!(error = %e, "command state not persisted");
            }
        }
    }

    // === Submit, Get, List, Cancel ===

    /// Validates and durably queues a command; returns it and whether it was created.
    pub async fn submit(
        self: &Arc<Self>,
        req: v1::SubmitCommandRequest,
    ) -> Result<(Command, bool), CommandError> {
        let agent: AgentId = req
            .agent
            .parse()
            .map_err(|e| CommandError::Invalid(format!("agent {:?}: {e}", req.agent)))?;
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
        let known = self.registry.get(&agent).is_some();
        let agent = agent.to_string();
        if !known && !self.store.knows_agent(&agent)? {
            return Err(CommandError::UnknownAgent(agent));
        }
        let created = SystemTime::now();
        let expires = match req.ttl {
            Some(ttl) if ttl.seconds < 0 || ttl.nanos < 0 => {
                return Err(CommandError::Invalid("ttl is negative".into()));
            }
            Some(ttl) if ttl.seconds > 0 || ttl.nanos > 0 => {
                let ttl = Duration::try_from(ttl)
                    .map_err(|e| CommandError::Invalid(format!("ttl: {e}")))?;
                Some(
                    created
                        .checked_add(ttl)
                        .ok_or_else(|| CommandError::Invalid("ttl is too large".into()))?
                        .into(),
                )
            }
            Some(_) | None => None,
        };
        let cmd = Command {
            agent,
            kind: req.kind,
            payload: req.payload,
            content_type: req.content_type,
            idempotency_key: req.idempotency_key,
            ordering_key: req.ordering_key,
            state: CommandState::Queued as i32,
            created: Some(created.into()),
            expires,
            ..Default::default()
        };
        // Reserve a pending slot before storing, so racing Submits cannot overshoot the limit;
        // given back below unless a new command took it.
        let limit = self
            .pending_limit
            .load(std::sync::atomic::Ordering::Relaxed);
        let reserved = {
            let mut st = self.lock();
            let n = st.pending.entry(cmd.agent.clone()).or_default();
            let free = *n < limit;
            if free {
                *n += 1;
            }
            free
        };
        if !reserved {
            crate::metrics::count_rejection(crate::metrics::Limit::PendingCommandsPerAgent);
            return Err(CommandError::TooManyPending {
                agent: cmd.agent,
                limit,
            });
        }
        let agent = cmd.agent.clone();
        let out = match self.store.submit(cmd).await {
            Ok(out) if out.created => out,
            other => {
                self.lock().release_pending(&agent);
                other?
            }
        };
        if out.created {
            let cmd = out.command.clone();
            let lane = (cmd.agent.clone(), cmd.ordering_key.clone());
            let spawn = {
                let mut st = self.lock();
                st.count(cmd.state, 1);
                st.active.insert(cmd.id.clone(), cmd.clone());
                st.publish(&cmd);
                let q = st.lanes.entry(lane.clone()).or_default();
                q.push_back(cmd.id.clone());
                q.len() == 1
            };
            if spawn {
                tokio::spawn(self.clone().run_lane(lane));
            }
        }
        Ok((out.command, out.created))
    }

    /// One command.
    pub fn get(&self, id: &str) -> Result<Command, CommandError> {
        if let Some(c) = self.lock().active.get(id) {
            return Ok(c.clone());
        }
        let stored = self.store.get(id)?;
        let mut c = stored.ok_or_else(|| CommandError::NotFound(id.to_owned()))?;
        self.overlay_recent(std::slice::from_mut(&mut c));
        Ok(c)
    }

    /// Replaces store records that lag the in-memory state (an active command, or a final
    /// state whose write is still on its way) with the live state, keeping the stored payload.
    fn overlay_recent(&self, cmds: &mut [Command]) {
        let st = self.lock();
        for c in cmds {
            let live = st
                .active
                .get(&c.id)
                .or_else(|| st.recent.get(&c.id).filter(|_| !is_final(c.state)));
            if let Some(live) = live {
                let payload = std::mem::take(&mut c.payload);
                *c = Command {
                    payload,
                    ..live.clone()
                };
            }
        }
    }

    /// Cancels a command that was not delivered yet.
    pub async fn cancel(&self, id: &str) -> Result<Command, CommandError> {
        let (cmd, write) = {
            let mut st = self.lock();
            match st.active.get(id).map(|c| c.state) {
                Some(s) if s == CommandState::Queued as i32 => {
                    let cmd = st
                        .transition(id, CommandState::Cancelled, |c| {
                            c.finished = Some(now_ts());
                            c.result = Some(v1::CommandResult {
                                output: Vec::new(),
                                message: "cancelled".into(),
                            });
                        })
                        .ok_or_else(|| CommandError::NotFound(id.to_owned()))?;
                    let write = self.persist(cmd.clone());
                    (cmd, write)
                }
                Some(s) => {
                    return Err(CommandError::TooLate {
                        id: id.to_owned(),
                        state: state_name(s),
                    });
                }
                None => {
                    drop(st);
                    let c = self
                        .store
                        .get(id)?
                        .ok_or_else(|| CommandError::NotFound(id.to_owned()))?;
                    return Err(CommandError::TooLate {
                        id: id.to_owned(),
                        state: state_name(c.state),
                    });
                }
            }
        };
        write.await;
        Ok(cmd)
    }

    // === Delivery ===

    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            let now = SystemTime::now();
            let expired: Vec<Command> = {
                let mut st = self.lock();
                let ids: Vec<String> = st
                    .active
                    .values()
                    .filter(|c| c.state == CommandState::Queued as i32)
                    .filter(|c| {
                        c.expires
                            .and_then(|e| SystemTime::try_from(e).ok())
                            .is_some_and(|e| e <= now)
                    })
                    .map(|c| c.id.clone())
                    .collect();
                ids.iter()
                    .filter_map(|id| {
                        st.transition(id, CommandState::Expired, |c| {
                            c.finished = Some(now.into());
                            c.result = Some(v1::CommandResult {
                                output: Vec::new(),
                                message: "expired before delivery".into(),
                            });
                        })
                    })
                    .inspect(|c| drop(self.persist(c.clone())))
                    .collect()
            };
            metrics::counter!("tether_gateway_command_expirations_total")
                .increment(expired.len() as u64);
        }
    }

    async fn run_lane(self: Arc<Self>, lane: LaneKey) {
        loop {
            let id = {
                let mut st = self.lock();
                match st.lanes.get(&lane).and_then(|q| q.front()) {
                    Some(id) => id.clone(),
                    None => {
                        st.lanes.remove(&lane);
                        return;
                    }
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.deliver_until_final(&lane.0, &id) => {}
            }
            // Pop and retire the lane in one critical section: a Submit that finds no lane
            // starts a new runner, so there is never a second runner on one lane.
            let mut st = self.lock();
            let empty = st.lanes.get_mut(&lane).is_none_or(|q| {
                q.pop_front();
                q.is_empty()
            });
            if empty {
                st.lanes.remove(&lane);
                // The agent's permits go once no lane holds them (a lane clones them under
                // this lock): the map stays as large as the agents with work, not every agent
                // ever commanded.
                if st
                    .in_flight
                    .get(&lane.0)
                    .is_some_and(|p| Arc::strong_count(&p.deliveries) == 1)
                {
                    st.in_flight.remove(&lane.0);
                }
                return;
            }
        }
    }

    fn is_active(&self, id: &str) -> bool {
        self.lock().active.contains_key(id)
    }

    /// A live session of `agent`, waiting for one; `None` once the command left `active`
    /// (expired or cancelled meanwhile).
    async fn wait_session(&self, agent: &AgentId, id: &str) -> Option<Arc<SessionInfo>> {
        // The common case (the agent is connected) needs no feed; the feed alone (no snapshot
        // of every live session: O(agents) per delivery) is taken before the check that may
        // wait on it, so a session registered in between still wakes this lane.
        let mut feed = None;
        loop {
            if !self.is_active(id) {
                return None;
            }
            if let Some(s) = self.registry.last_session(agent) {
                return Some(s);
            }
            let Some(feed) = feed.as_mut() else {
                feed = Some(self.registry.feed());
                continue;
            };
            tokio::select! {
                _ = feed.recv() => {}
                _ = tokio::time::sleep(LANE_RECHECK) => {}
            }
        }
    }

    async fn deliver_until_final(&self, agent: &str, id: &str) {
        let Ok(agent_id) = agent.parse::<AgentId>() else {
            self.finish(
                id,
                false,
                Vec::new(),
                format!("agent id {agent:?} is malformed"),
            )
            .await;
            return;
        };
        let permits = {
            let max = self.cfg.max_in_flight.max(1) as usize;
            let mut st = self.lock();
            st.in_flight
                .entry(agent.to_owned())
                .or_insert_with(|| AgentPermits {
                    deliveries: Arc::new(tokio::sync::Semaphore::new(max)),
                    outputs: Arc::new(tokio::sync::Semaphore::new(OUTPUT_BUFFERS_PER_AGENT)),
                })
                .clone()
        };
        loop {
            let Ok(permit) = permits.deliveries.clone().acquire_owned().await else {
                return;
            };
            let Some(session) = self.wait_session(&agent_id, id).await else {
                return;
            };
            let reason = match self.attempt(&session, id, &permits.outputs).await {
                Ok(()) => return,
                Err(reason) => reason,
            };
            drop(permit);
            let attempts = match self.lock().active.get(id) {
                Some(c) => c.attempts,
                None => return,
            };
            if attempts >= self.cfg.max_attempts {
                let msg = format!("delivery failed {attempts} times; last: {reason}");
                self.finish(id, false, Vec::new(), msg).await;
                return;
            }
            tracing::info!(command = %id, %agent, attempts, %reason, "command delivery failed; will redeliver");
            metrics::counter!("tether_gateway_command_redeliveries_total").increment(1);
            let exp = attempts.saturating_sub(1).min(16);
            let wait = self
                .cfg
                .retry_backoff
                .saturating_mul(1 << exp)
                .min(self.cfg.max_retry_backoff);
            tokio::time::sleep(wait).await;
        }
    }

    /// Records a final Succeeded/Failed state durably, then makes it visible (memory, watchers):
    /// whoever sees the final state can read it, output included, from the store.
    async fn finish(&self, id: &str, succeeded: bool, output: Vec<u8>, message: String) {
        let to = if succeeded {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        let finished = now_ts();
        let write = {
            let st = self.lock();
            let Some(c) = st.active.get(id) else { return };
            let mut record = c.clone();
            record.state = to as i32;
            record.finished = Some(finished);
            record.result = Some(v1::CommandResult {
                output: output.clone(),
                message: message.clone(),
            });
            // Enqueued under the lock, so it lands after every earlier write of this command.
            self.persist(record)
        };
        write.await;
        let mut st = self.lock();
        if let Some(c) = st.active.get(id) {
            metrics::histogram!("tether_gateway_command_submit_to_completed_seconds")
                .record(since(c.created.as_ref()));
        }
        st.transition(id, to, |c| {
            c.finished = Some(finished);
            c.result = Some(v1::CommandResult { output, message });
        });
    }

    /// One delivery: `Ok` when the command reached a final state, `Err(reason)` when the stream
    /// failed before the result.
    async fn attempt(
        &self,
        session: &SessionInfo,
        id: &str,
        outputs: &Arc<tokio::sync::Semaphore>,
    ) -> Result<(), String> {
        // The stream first: waiting for stream credit (the agent's stream limit) is not a
        // failed attempt, and Cancel stays possible meanwhile.
        let (mut send, recv) = match session.link.open().await {
            Ok(s) => s,
            Err(e) => return Err(format!("connection lost: {e}")),
        };
        let abandon = |mut send: SendStream| {
            send.reset(ErrorCode::CANCELLED);
        };
        // Mark delivered (first time) and count the attempt, atomically with Cancel's check.
        let (cmd, first) = {
            let mut st = self.lock();
            let Some((state, expires)) = st.active.get(id).map(|c| (c.state, c.expires)) else {
                abandon(send);
                return Ok(());
            };
            let first = state == CommandState::Queued as i32;
            let now = SystemTime::now();
            if first
                && expires
                    .and_then(|e| SystemTime::try_from(e).ok())
                    .is_some_and(|e| e <= now)
            {
                // The sweeper would get to it; never deliver late.
                if let Some(c) = st.transition(id, CommandState::Expired, |c| {
                    c.finished = Some(now.into());
                    c.result = Some(v1::CommandResult {
                        output: Vec::new(),
                        message: "expired before delivery".into(),
                    });
                }) {
                    drop(self.persist(c));
                    metrics::counter!("tether_gateway_command_expirations_total").increment(1);
                }
                abandon(send);
                return Ok(());
            }
            let to = if first {
                CommandState::Delivered
            } else {
                CommandState::try_from(state).unwrap_or(CommandState::Delivered)
            };
            let Some(cmd) = st.transition(id, to, |c| {
                c.attempts += 1;
                // Each attempt's progress starts anew: the record shows the lines of the attempt
                // that produced its result, and nothing a failed attempt sent outlives it.
                c.progress.clear();
                if first {
                    c.delivered = Some(now_ts());
                }
            }) else {
                abandon(send);
                return Ok(());
            };
            drop(self.persist(cmd.clone()));
            (cmd, first)
        };
        if first {
            metrics::histogram!("tether_gateway_command_submit_to_delivered_seconds")
                .record(since(cmd.created.as_ref()));
        }

        let header = StreamHeader {
            kind: StreamKind::Command as i32,
            service: cmd.kind.clone(),
            id: cmd.id.clone(),
            metadata: vec![
                MetadataEntry {
                    key: "content-type".into(),
                    value: cmd.content_type.clone().into_bytes(),
                },
                MetadataEntry {
                    key: COMMAND_MAX_OUTPUT_KEY.into(),
                    value: self.cfg.max_output.to_string().into_bytes(),
                },
            ],
            ..Default::default()
        };
        let sent = async {
            send_msg(&mut send, &Message::StreamHeader(header)).await?;
            send_data(&mut send, Bytes::from(cmd.payload)).await?;
            Ok::<_, tether_runtime::stream::StreamError>(())
        };
        if let Err(e) = sent.await {
            return Err(format!("sending the command: {e}"));
        }
        let _ = send.finish();

        let mut framed = FramedRecv::relay(recv);
        let mut output = Vec::new();
        let mut buffering = None;
        loop {
            let msg = match framed.next().await {
                Ok(Some(m)) => m,
                Ok(None) => return Err("agent ended the stream without a result".into()),
                Err(e) => return Err(e.to_string()),
            };
            match msg {
                Message::CommandAck(_) => {
                    let mut st = self.lock();
                    let cmd = st.transition(id, CommandState::Running, |c| {
                        if c.started.is_none() {
                            c.started = Some(now_ts());
                        }
                    });
                    if let Some(c) = cmd {
                        drop(self.persist(c));
                    }
                }
                Message::CommandProgress(p) => {
                    // Progress is for display: not written on its own (a chatty handler would
                    // rewrite the whole record per line); the final record carries the last lines.
                    self.lock().transition(id, CommandState::Running, |c| {
                        if c.started.is_none() {
                            c.started = Some(now_ts());
                        }
                        push_progress(&mut c.progress, p.message);
                    });
                }
                Message::Data(b) => {
                    if (output.len() + b.len()) as u64 > self.cfg.max_output {
                        framed.stop(ErrorCode::FRAME_TOO_LARGE);
                        self.finish(id, false, Vec::new(), self.output_too_large(&session.agent))
                            .await;
                        return Ok(());
                    }
                    if buffering.is_none() {
                        // Until a buffer is free this stream is not read: the agent waits.
                        match outputs.clone().acquire_owned().await {
                            Ok(p) => buffering = Some(p),
                            Err(_) => return Err("the gateway is shutting down".into()),
                        }
                    }
                    output.extend_from_slice(&b);
                }
                Message::CommandResult(mut r) => {
                    if (output.len() + r.output.len()) as u64 > self.cfg.max_output {
                        self.finish(id, false, Vec::new(), self.output_too_large(&session.agent))
                            .await;
                        return Ok(());
                    }
                    output.extend_from_slice(&r.output);
                    truncate_text(&mut r.message, COMMAND_MESSAGE_MAX);
                    self.finish(id, r.succeeded, output, r.message).await;
                    return Ok(());
                }
                // An agent without command support answers like a relay stream.
                Message::Trailers(_) => {
                    self.finish(
                        id,
                        false,
                        Vec::new(),
                        format!("agent {} does not support commands", session.agent),
                    )
                    .await;
                    return Ok(());
                }
                other => {
                    framed.stop(ErrorCode::PROTOCOL_ERROR);
                    return Err(format!("agent sent {} on a command stream", other.name()));
                }
            }
        }
    }

    fn output_too_large(&self, agent: &AgentId) -> String {
        format!(
            "agent {agent} reported an output above the gateway's limit of {} bytes (commands.max_output); the output was not kept",
            self.cfg.max_output
        )
    }

    // === Watch ===

    fn watch(
        self: &Arc<Self>,
        target: Option<v1::watch_commands_request::Target>,
        slot: WatchSlot,
    ) -> Result<EventStream, CommandError> {
        use v1::watch_commands_request::Target;
        // Snapshot and subscription under the state lock (events are sent under it too): no
        // transition is missed or seen twice between the two.
        let (mut feed, initial, only_id, only_agent) = match target {
            Some(Target::Id(id)) => {
                let st = self.lock();
                let live = st.active.get(&id).or_else(|| st.recent.get(&id)).cloned();
                let feed = st.events.subscribe();
                drop(st);
                // Neither active nor recent: final long ago, and stored.
                let c = match live {
                    Some(c) => c,
                    None => self
                        .store
                        .get(&id)?
                        .ok_or_else(|| CommandError::NotFound(id.clone()))?,
                };
                (feed, vec![c], Some(id), None)
            }
            Some(Target::Agent(agent)) => {
                let agent: AgentId = agent
                    .parse()
                    .map_err(|e| CommandError::Invalid(format!("agent {agent:?}: {e}")))?;
                let agent = agent.to_string();
                let st = self.lock();
                let mut cmds: Vec<Command> = st
                    .active
                    .values()
                    .filter(|c| c.agent == agent)
                    .map(for_event)
                    .collect();
                let feed = st.events.subscribe();
                drop(st);
                cmds.sort_by(|a, b| a.id.cmp(&b.id));
                (feed, cmds, None, Some(agent))
            }
            None => {
                return Err(CommandError::Invalid(
                    "watch needs an id or an agent".into(),
                ));
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // The caller's slot is held for as long as this stream runs.
            let _slot = slot;
            let mut done = false;
            for mut c in initial {
                c.payload.clear();
                done |= only_id.is_some() && is_final(c.state);
                if tx
                    .send(Ok(v1::CommandEvent {
                        command: Some(c),
                        initial: true,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            while !done {
                let c = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = feed.recv() => match r {
                        Ok(c) => c,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.send(Err(Status::resource_exhausted(format!("watch fell {n} events behind")))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if only_id.as_ref().is_some_and(|id| *id != c.id)
                    || only_agent.as_ref().is_some_and(|a| *a != c.agent)
                {
                    continue;
                }
                done = only_id.is_some() && is_final(c.state);
                if tx
                    .send(Ok(v1::CommandEvent {
                        command: Some(c),
                        initial: false,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

// === The gRPC service ===

/// Cuts a page of listed commands (already as events carry them) to [`LIST_PAGE_BYTES`]:
/// returns how many fit, at least one.
fn fit_page(cmds: &[Command]) -> usize {
    use prost::Message as _;
    let mut bytes = 0;
    for (i, c) in cmds.iter().enumerate() {
        // Each command is a length-delimited field of the response: its bytes plus a few.
        bytes += c.encoded_len() + 8;
        if bytes > LIST_PAGE_BYTES && i > 0 {
            return i;
        }
    }
    cmds.len()
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::CommandEvent, Status>> + Send>>;

/// `tether.v1.Commands`.
#[derive(Debug, Clone)]
pub struct CommandsApi {
    commands: Arc<Commands>,
}

impl CommandsApi {
    /// Serves `commands`.
    pub fn new(commands: Arc<Commands>) -> Self {
        CommandsApi { commands }
    }

    /// The tonic service (callers are authenticated by `auth::Authenticated` around it; each
    /// method checks the tenant of the command's agent).
    pub fn into_service(self, max_payload: u64) -> CommandsServer<CommandsApi> {
        // Room for the payload plus the request's other fields; larger ones are refused by tonic
        // before they reach Submit's own check, which names the limit.
        let max = usize::try_from(max_payload)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10);
        CommandsServer::new(self)
            .max_decoding_message_size(max.max(8 << 20))
            .max_encoding_message_size(usize::MAX)
    }

    /// The command `id` if `caller` may act for its agent's tenant. `NOT_FOUND` when there is
    /// no such command, and the very same answer for a command of another tenant (still audited
    /// and counted as a denial): a caller cannot tell another tenant's ids from unused ones.
    fn authorized(
        &self,
        caller: &Caller,
        method: &'static str,
        id: &str,
    ) -> Result<Command, Status> {
        let cmd = self.commands.get(id)?;
        if caller.authorize_command(method, id, &cmd.agent).is_err() {
            return Err(CommandError::NotFound(id.to_owned()).into());
        }
        Ok(cmd)
    }
}

/// The agent a request names, checked against the caller's tenants.
fn authorized_agent(caller: &Caller, method: &'static str, agent: &str) -> Result<AgentId, Status> {
    let id: AgentId = agent
        .parse()
        .map_err(|e| CommandError::Invalid(format!("agent {agent:?}: {e}")))?;
    caller.authorize(method, &id)?;
    Ok(id)
}

#[tonic::async_trait]
impl CommandsRpc for CommandsApi {
    async fn submit(
        &self,
        req: Request<v1::SubmitCommandRequest>,
    ) -> Result<Response<v1::SubmitCommandResponse>, Status> {
        const METHOD: &str = "tether.v1.Commands/Submit";
        let caller = caller(&req)?;
        let agent = authorized_agent(&caller, METHOD, &req.get_ref().agent)?;
        let (cmd, created) = self.commands.submit(req.into_inner()).await?;
        let detail = format!("command {} kind {} created {created}", cmd.id, cmd.kind);
        caller.audit_allowed(METHOD, &agent, &detail);
        Ok(Response::new(v1::SubmitCommandResponse {
            id: cmd.id,
            created,
        }))
    }

    async fn get(&self, req: Request<v1::GetCommandRequest>) -> Result<Response<Command>, Status> {
        let caller = caller(&req)?;
        let cmd = self.authorized(&caller, "tether.v1.Commands/Get", &req.get_ref().id)?;
        Ok(Response::new(cmd))
    }

    async fn list(
        &self,
        req: Request<v1::ListCommandsRequest>,
    ) -> Result<Response<v1::ListCommandsResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        if !r.agent.is_empty() {
            authorized_agent(&caller, "tether.v1.Commands/List", &r.agent)?;
        }
        let ms = |t: Option<prost_types::Timestamp>| {
            t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        let limit = match r.page_size as usize {
            0 => PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if r.page_token.len() > KEY_MAX {
            return Err(CommandError::Invalid(
                "page_token is not one List returned: pass next_page_token as it came".into(),
            )
            .into());
        }
        // A caller scoped to some tenants reads their indexes only, never another tenant's
        // records (nor their ids in a page token).
        let tenants = match (&caller.tenants, r.agent.is_empty()) {
            (TenantScope::Set(set), true) => Some(set.iter().cloned().collect()),
            _ => None,
        };
        let filter = ListFilter {
            agent: r.agent,
            tenants,
            state: r.state,
            kind: r.kind,
            from_ms: ms(r.from),
            to_ms: ms(r.to),
            after: r.page_token,
            limit: limit + 1,
        };
        let store = self.commands.store.clone();
        let page = tokio::task::spawn_blocking(move || store.list(&filter))
            .await
            .map_err(|e| Status::internal(format!("list: {e}")))?
            .map_err(CommandError::from)?;
        let mut cmds = page.commands;
        let more = cmds.len() > limit;
        cmds.truncate(limit);
        // The store may lag the in-memory state by one write: show the live one.
        self.commands.overlay_recent(&mut cmds);
        let mut cmds: Vec<Command> = cmds.iter().map(for_event).collect();
        let fit = fit_page(&cmds);
        let cut = fit < cmds.len();
        cmds.truncate(fit);
        let next_page_token = if cut || more {
            cmds.last().map(|c| c.id.clone()).unwrap_or_default()
        } else {
            page.resume.unwrap_or_default()
        };
        Ok(Response::new(v1::ListCommandsResponse {
            commands: cmds,
            next_page_token,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<v1::WatchCommandsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use v1::watch_commands_request::Target;
        const METHOD: &str = "tether.v1.Commands/Watch";
        let caller = caller(&req)?;
        let target = req.into_inner().target;
        match &target {
            Some(Target::Id(id)) => {
                self.authorized(&caller, METHOD, id)?;
            }
            Some(Target::Agent(agent)) => {
                authorized_agent(&caller, METHOD, agent)?;
            }
            None => {}
        }
        let slot = self.commands.watch_slot(&caller)?;
        Ok(Response::new(self.commands.watch(target, slot)?))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelCommandRequest>,
    ) -> Result<Response<Command>, Status> {
        const METHOD: &str = "tether.v1.Commands/Cancel";
        let caller = caller(&req)?;
        let id = req.into_inner().id;
        let cmd = self.authorized(&caller, METHOD, &id)?;
        let cancelled = self.commands.cancel(&id).await?;
        if let Ok(agent) = cmd.agent.parse::<AgentId>() {
            caller.audit_allowed(METHOD, &agent, &format!("command {id}"));
        }
        Ok(Response::new(cancelled))
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

    #[test]
    fn a_list_page_fits_its_byte_budget_and_carries_at_least_one_command() {
        let big = |id: &str| Command {
            id: id.into(),
            progress: vec!["p".repeat(COMMAND_PROGRESS_LINE_MAX); PROGRESS_KEPT],
            result: Some(v1::CommandResult {
                output: vec![0; EVENT_OUTPUT_MAX],
                message: "m".repeat(COMMAND_MESSAGE_MAX),
            }),
            ..Default::default()
        };
        let cmds: Vec<Command> = (0..1000).map(|i| big(&i.to_string())).collect();
        let n = fit_page(&cmds);
        let bytes: usize = cmds[..n]
            .iter()
            .map(|c| prost::Message::encoded_len(c) + 8)
            .sum();
        assert!(
            (1..1000).contains(&n) && bytes <= LIST_PAGE_BYTES,
            "{n} {bytes}"
        );
        let huge = Command {
            kind: "k".repeat(2 * LIST_PAGE_BYTES),
            ..Default::default()
        };
        assert_eq!(fit_page(&[huge.clone(), huge]), 1);
    }
}
