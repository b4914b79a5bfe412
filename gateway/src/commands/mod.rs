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

mod api;
mod delivery;
pub mod store;
mod watch;

pub use api::CommandsApi;
pub use delivery::{DeliveryError, OUTPUT_BUFFERS_PER_AGENT};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tether_api::v1;
use tether_api::v1::{Command, CommandState};
use tether_runtime::CancellationToken;
use tokio::sync::broadcast;
use tunnel_proto::AgentId;
use tunnel_proto::message::{COMMAND_PROGRESS_LINE_MAX, truncate_text};

use crate::commands::delivery::AgentPermits;
use crate::commands::store::{CommandStore, Retention, StoreError, is_final};
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
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often a lane waiting for its agent rechecks on its own; registry events wake it anyway.
pub(crate) const LANE_RECHECK: Duration = Duration::from_secs(5);
/// Largest result output a Watch event carries.
pub const EVENT_OUTPUT_MAX: usize = 64 << 10;
/// Events buffered for slow watchers before they are dropped with RESOURCE_EXHAUSTED.
const EVENT_BUFFER: usize = 8192;
/// Recently finished commands kept in memory (see `State::recent`).
const RECENT_KEPT: usize = 4096;

// === Errors ===

/// Why a Commands call failed; mapped to a gRPC status in `northbound::status`.
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

fn state_name(state: i32) -> String {
    CommandState::try_from(state).map_or_else(
        |_| format!("state {state}"),
        |s| s.as_str_name().to_lowercase(),
    )
}

pub(crate) fn now_ts() -> prost_types::Timestamp {
    SystemTime::now().into()
}

pub(crate) fn since(ts: Option<&prost_types::Timestamp>) -> f64 {
    let Some(ts) = ts else { return 0.0 };
    let Ok(t) = SystemTime::try_from(*ts) else {
        return 0.0;
    };
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| d.as_secs_f64())
}

// === State ===

pub(crate) type LaneKey = (String, String);

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

/// A command as events carry it: no payload, no large output.
pub(crate) fn for_event(cmd: &Command) -> Command {
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
