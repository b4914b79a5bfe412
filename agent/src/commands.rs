//! Feature layer: runs the commands a gateway delivers on `Command` streams.
//!
//! ```text
//! gateway ──StreamHeader{Command, id, kind}, Data(payload)…, FIN──► agent
//! gateway ◄──CommandAck, CommandProgress…, Data(output)…, CommandResult, FIN── agent
//! ```
//!
//! Handlers are looked up by kind in [`Handlers`] (built-ins: `echo`, `sleep`). A handler runs in
//! its own task, detached from the stream that delivered it: a panic becomes a Failed result and
//! a lost stream does not stop it. Delivery is at-least-once, execution at-most-once in effect:
//! [`Executor`] keeps a bounded record of completed ids with their results (appended and fsync'd
//! to `state_dir/commands.jsonl` when the agent has a state directory, before the result is
//! reported); a redelivered id that completed is answered from the record, one still running is
//! attached to instead of started again.
//!
//! What goes back stays within the protocol's caps: progress lines are cut to
//! [`COMMAND_PROGRESS_LINE_MAX`] bytes and result messages to [`COMMAND_MESSAGE_MAX`] (with a
//! marker saying how much was cut), and an output above the limit the gateway states in the
//! delivery's header (`tether-max-output`, its `commands.max_output`) is reported as a failure
//! instead of being sent.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether_runtime::stream::{Reader, flush};
use tether_runtime::transport::SendStream;
use tokio::sync::{broadcast, watch};
use tunnel_proto::ErrorCode;
use tunnel_proto::message::{COMMAND_MESSAGE_MAX, COMMAND_PROGRESS_LINE_MAX, truncate_text};
use tunnel_proto::stream::StreamFailure;
use tunnel_proto::stream::command::{AgentCommand, OutputSent, PayloadEvent};

use crate::error::AgentError;

/// Completed ids remembered (and re-reported on redelivery).
pub const COMPLETED_KEPT: usize = 10_000;

/// What a handler returns: its output, or an error message.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>;

/// Runs one kind of command.
pub trait Handler: Send + Sync + 'static {
    /// Runs the command with `payload`, reporting progress lines on `progress`.
    fn run(&self, payload: Bytes, progress: ProgressSink) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Bytes, ProgressSink) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
{
    fn run(&self, payload: Bytes, progress: ProgressSink) -> HandlerFuture {
        Box::pin(self(payload, progress))
    }
}

/// Where a handler reports progress; lines reach the gateway (and its watchers) as they come.
#[derive(Clone, Debug)]
pub struct ProgressSink(broadcast::Sender<String>);

impl ProgressSink {
    /// A sink and a receiver of what is reported to it, for running a handler directly (tests,
    /// embedders).
    pub fn channel(capacity: usize) -> (ProgressSink, broadcast::Receiver<String>) {
        let (tx, rx) = broadcast::channel(capacity);
        (ProgressSink(tx), rx)
    }

    /// Reports one progress line; a line above [`COMMAND_PROGRESS_LINE_MAX`] bytes is cut, with
    /// a marker saying how much.
    pub fn report(&self, message: impl Into<String>) {
        let mut line = message.into();
        truncate_text(&mut line, COMMAND_PROGRESS_LINE_MAX);
        let _ = self.0.send(line);
    }
}

/// The handler registry: kind → handler.
pub struct Handlers {
    map: RwLock<HashMap<String, Arc<dyn Handler>>>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Handlers {
    /// No handlers at all.
    pub fn empty() -> Handlers {
        Handlers {
            map: RwLock::new(HashMap::new()),
        }
    }

    /// The built-ins: `echo` (returns its payload) and `sleep` (payload `{"ms": N}` or `N`).
    pub fn with_builtins() -> Handlers {
        let h = Handlers::empty();
        h.register(
            "echo",
            |payload: Bytes, _progress: ProgressSink| async move { Ok(payload) },
        );
        h.register("sleep", sleep);
        h
    }

    /// Adds (or replaces) the handler of `kind`.
    pub fn register(&self, kind: &str, handler: impl Handler) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind.to_owned(), Arc::new(handler));
    }

    /// The handler of `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
            .cloned()
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    }
}

impl Default for Handlers {
    fn default() -> Self {
        Handlers::with_builtins()
    }
}

/// The built-in `sleep`: waits, reporting progress about ten times along the way.
async fn sleep(payload: Bytes, progress: ProgressSink) -> Result<Bytes, String> {
    #[derive(Deserialize)]
    struct Args {
        ms: u64,
    }
    let text = std::str::from_utf8(&payload)
        .map_err(|_| "sleep: payload is not UTF-8".to_owned())?
        .trim();
    let ms = match text.parse::<u64>() {
        Ok(ms) => ms,
        Err(_) => {
            serde_json::from_str::<Args>(text)
                .map_err(|e| format!("sleep: payload must be {{\"ms\": N}} or N: {e}"))?
                .ms
        }
    };
    let steps = 10u64;
    for i in 1..=steps {
        tokio::time::sleep(Duration::from_millis(ms / steps)).await;
        progress.report(format!("slept {} of {ms} ms", ms * i / steps));
    }
    Ok(Bytes::from(format!("slept {ms} ms")))
}

// === Executor ===

/// How a command ended, as remembered and re-reported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Outcome {
    id: String,
    ok: bool,
    /// Output, hex-encoded in the state file.
    #[serde(with = "hex")]
    out: Vec<u8>,
    msg: String,
}

mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

struct Running {
    progress: broadcast::Sender<String>,
    done: watch::Receiver<Option<Outcome>>,
}

#[derive(Default)]
struct Record {
    done: HashMap<String, Outcome>,
    order: VecDeque<String>,
    running: HashMap<String, Running>,
    /// Lines in the state file, to know when to compact it.
    lines: usize,
}

impl Record {
    fn remember(&mut self, o: Outcome) {
        if self.done.insert(o.id.clone(), o.clone()).is_none() {
            self.order.push_back(o.id);
        }
        while self.order.len() > COMPLETED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
    }
}

/// Runs delivered commands at most once in effect; see the module docs.
pub struct Executor {
    handlers: Arc<Handlers>,
    record: Mutex<Record>,
    state_file: Option<PathBuf>,
    /// While paused, deliveries are held unacknowledged (the gateway keeps the commands).
    pause: Option<Arc<crate::pause::PauseSwitch>>,
    /// Kinds held for the owner's approval (`approvals.kinds`).
    approvals: Option<Arc<crate::approvals::Approvals>>,
    ledger: crate::ledger::Ledger,
}

/// What the ledger says of one delivery, filled in as it goes.
struct Note {
    outcome: &'static str,
    payload_sha256: String,
    held: Duration,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("handlers", &self.handlers)
            .field("state_file", &self.state_file)
            .finish()
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

impl Executor {
    /// An executor for `handlers`, loading completed ids from `state_dir` when given.
    pub fn new(handlers: Arc<Handlers>, state_dir: Option<&Path>) -> Result<Executor, AgentError> {
        let mut record = Record::default();
        let state_file = match state_dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(io(format!("creating state_dir {}", dir.display())))?;
                let path = crate::state::StateDir::new(dir).commands();
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        for line in text.lines() {
                            record.lines += 1;
                            // A torn last line (crash mid-write) is skipped: its result was never
                            // reported, so the gateway redelivers and the command runs again.
                            if let Ok(o) = serde_json::from_str::<Outcome>(line) {
                                record.remember(o);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
                }
                Some(path)
            }
        };
        Ok(Executor {
            handlers,
            record: Mutex::new(record),
            state_file,
            pause: None,
            approvals: None,
            ledger: crate::ledger::Ledger::disabled(),
        })
    }

    /// Holds commands of the kinds `approvals` lists until the owner decides.
    pub fn with_approvals(mut self, approvals: Arc<crate::approvals::Approvals>) -> Executor {
        self.approvals = Some(approvals);
        self
    }

    /// Holds deliveries while `pause` says so, and records each delivery in `ledger`.
    pub fn with_control(
        mut self,
        pause: Arc<crate::pause::PauseSwitch>,
        ledger: crate::ledger::Ledger,
    ) -> Executor {
        self.pause = Some(pause);
        self.ledger = ledger;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many completed ids are remembered.
    pub fn completed(&self) -> usize {
        self.lock().done.len()
    }

    /// Appends an outcome to the state file and fsyncs; compacts when it grew to twice the
    /// record. Blocking: called from `spawn_blocking`.
    fn persist(&self, o: &Outcome) {
        let Some(path) = &self.state_file else { return };
        let compact = {
            let mut r = self.lock();
            r.lines += 1;
            (r.lines > 2 * COMPLETED_KEPT).then(|| {
                r.lines = r.order.len();
                r.order
                    .iter()
                    .filter_map(|id| r.done.get(id).cloned())
                    .collect::<Vec<_>>()
            })
        };
        let res = match compact {
            None => append(path, o),
            Some(all) => rewrite(path, &all),
        };
        if let Err(e) = res {
            tracing::error!(error = %e, path = %path.display(), "could not record a completed command");
        }
    }

    /// Serves one `Command` stream whose header was read, and records it in the ledger. With
    /// `telemetry` on, the delivery is a span of its own (`command <kind>`), linked to the
    /// Submit call's trace context the gateway sent.
    pub async fn serve(
        self: Arc<Self>,
        mut reader: Reader<AgentCommand>,
        send: SendStream,
        telemetry: &tether_runtime::telemetry::Telemetry,
    ) {
        let (start, began) = (std::time::SystemTime::now(), std::time::Instant::now());
        let header = reader.half_mut().header();
        let (id, kind, attempt) = (header.id.clone(), header.service.clone(), header.attempt);
        let mut note = Note {
            outcome: "stream_lost",
            payload_sha256: String::new(),
            held: Duration::ZERO,
        };
        self.clone()
            .deliver(reader, send, &mut note, telemetry)
            .await;
        if self.ledger.is_enabled() {
            self.ledger
                .record(crate::ledger::Entry::Command(crate::ledger::CommandEntry {
                    id,
                    kind,
                    payload_sha256: note.payload_sha256,
                    attempt,
                    outcome: note.outcome.to_owned(),
                    start,
                    duration_ms: began.elapsed().as_secs_f64() * 1000.0,
                    held_ms: note.held.as_secs_f64() * 1000.0,
                }));
        }
    }

    async fn deliver(
        self: Arc<Self>,
        mut reader: Reader<AgentCommand>,
        mut send: SendStream,
        note: &mut Note,
        telemetry: &tether_runtime::telemetry::Telemetry,
    ) {
        let id = reader.half_mut().id().to_owned();
        let kind = reader.half_mut().kind().to_owned();
        let span = telemetry.linked_span(
            format!("command {kind}"),
            tether_runtime::telemetry::SpanKind::Consumer,
            &reader.half_mut().trace_context(),
            vec![
                tether_runtime::telemetry::KeyValue::new("tether.command.id", id.clone()),
                tether_runtime::telemetry::KeyValue::new("tether.command.kind", kind.clone()),
            ],
        );
        // The payload: Data frames up to FIN.
        let payload = match reader.next().await {
            Ok(PayloadEvent::Payload(p)) => p,
            Ok(PayloadEvent::Failed(e)) => {
                if let StreamFailure::Protocol(e) = &e {
                    tracing::warn!(command = %id, error = %e, "command stream refused");
                }
                // The machine reset the stream.
                let _ = flush(&mut send, reader.half_mut()).await;
                return;
            }
            Err(_) => {
                send.reset(ErrorCode::CANCELLED);
                return;
            }
        };
        if self.ledger.is_enabled() {
            note.payload_sha256 = crate::ledger::sha256_hex(&payload);
        }
        // Paused: not acknowledged, not run. The gateway keeps the command (and the rest of
        // the agent's commands queued behind its delivery permits) until the agent resumes;
        // a delivery the gateway gives up on meanwhile is simply dropped here.
        if let Some(pause) = &self.pause
            && pause.reason().is_some()
        {
            let held = std::time::Instant::now();
            tracing::info!(command = %id, %kind, "paused: the delivery is held, unacknowledged, until the agent resumes");
            let mut rx = pause.subscribe();
            tokio::select! {
                ok = crate::pause::resumed(&mut rx) => if !ok { return },
                _ = send.stopped() => {
                    note.held = held.elapsed();
                    return;
                }
            }
            note.held = held.elapsed();
        }
        let (_, mut machine) = reader.into_parts();
        // A kind that needs the owner's approval waits for it here (unless this id already
        // ran or runs: a redelivery is answered as ever).
        let mut rejected = None;
        if let Some(approvals) = self.approvals.clone()
            && approvals.required(&kind)
            && !self.known(&id)
        {
            let sha = if note.payload_sha256.is_empty() {
                crate::ledger::sha256_hex(&payload)
            } else {
                note.payload_sha256.clone()
            };
            match wait_for_approval(&approvals, &id, &kind, &sha, &mut machine, &mut send).await {
                Waited::Approved => {}
                Waited::Rejected(reason) => rejected = Some(crate::approvals::rejection(&reason)),
                Waited::Left(outcome) => {
                    note.outcome = outcome;
                    return;
                }
            }
        }
        let _ = machine.ack();
        if flush(&mut send, &mut machine).await.is_err() {
            return;
        }
        let from_record = self.lock().done.contains_key(&id);
        let was_rejected = rejected.is_some();
        let (mut progress, mut done) = self.clone().start(id.clone(), kind, payload, rejected);
        let outcome = loop {
            if let Some(o) = done.borrow_and_update().clone() {
                break o;
            }
            tokio::select! {
                p = progress.recv() => match p {
                    Ok(message) => {
                        let _ = machine.progress(message);
                        if flush(&mut send, &mut machine).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The execution ended; its outcome is in `done`.
                    Err(broadcast::error::RecvError::Closed) => {
                        if done.changed().await.is_err() && done.borrow().is_none() {
                            return;
                        }
                    }
                },
                r = done.changed() => if r.is_err() && done.borrow().is_none() {
                    return;
                },
            }
        };
        // The handler has returned, so every line it reported is queued by now: send those the
        // loop did not reach before the result, or the record would miss its last lines.
        loop {
            match progress.try_recv() {
                Ok(message) => {
                    let _ = machine.progress(message);
                    if flush(&mut send, &mut machine).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        // The machine cuts the message (outcomes recorded by an older agent may carry longer
        // ones) and sends the output inline, in `Data` frames, or not at all above the
        // gateway's limit.
        // The span's status: gRPC's OK or UNKNOWN, as the command succeeded or failed.
        span.end(if outcome.ok { 0 } else { 2 }, &outcome.msg);
        let ok = outcome.ok;
        if let Ok(OutputSent::AboveLimit { len, max }) =
            machine.result(outcome.ok, Bytes::from(outcome.out), outcome.msg)
        {
            tracing::warn!(command = %id, bytes = len, limit = max, "command output is above the gateway's limit: reported as a failure");
        }
        if flush(&mut send, &mut machine).await.is_ok() {
            note.outcome = match (from_record, ok) {
                (true, _) => "answered_from_record",
                (false, true) => "succeeded",
                (false, false) if was_rejected => "rejected",
                (false, false) => "failed",
            };
        }
    }

    /// Whether command `id` completed or runs.
    fn known(&self, id: &str) -> bool {
        let r = self.lock();
        r.done.contains_key(id) || r.running.contains_key(id)
    }

    /// The progress feed and outcome of command `id`: from the record if it completed, from its
    /// execution if it is running, or from a new execution (`rejected`: a failure with that
    /// message, recorded without running the handler).
    fn start(
        self: Arc<Self>,
        id: String,
        kind: String,
        payload: Bytes,
        rejected: Option<String>,
    ) -> (
        broadcast::Receiver<String>,
        watch::Receiver<Option<Outcome>>,
    ) {
        let mut r = self.lock();
        if let Some(o) = r.done.get(&id) {
            tracing::info!(command = %id, "redelivered command already completed: re-reporting its result");
            let (ptx, prx) = broadcast::channel(1);
            drop(ptx);
            return (prx, watch::channel(Some(o.clone())).1);
        }
        if let Some(run) = r.running.get(&id) {
            tracing::info!(command = %id, "redelivered command still running: attaching to it");
            return (run.progress.subscribe(), run.done.clone());
        }
        let (ptx, prx) = broadcast::channel(64);
        let (dtx, drx) = watch::channel(None);
        r.running.insert(
            id.clone(),
            Running {
                progress: ptx.clone(),
                done: drx.clone(),
            },
        );
        drop(r);
        let this = self.clone();
        tokio::spawn(async move {
            let handler = match rejected {
                Some(msg) => Err(msg),
                None => Ok(this.handlers.get(&kind)),
            };
            let (ok, out, msg) = match handler {
                Err(rejection) => (false, Vec::new(), rejection),
                Ok(None) => (false, Vec::new(), format!("unsupported kind {kind}")),
                Ok(Some(h)) => {
                    let fut = h.run(payload, ProgressSink(ptx));
                    match tokio::spawn(fut).await {
                        Ok(Ok(out)) => (true, out.to_vec(), String::new()),
                        Ok(Err(msg)) => (false, Vec::new(), msg),
                        Err(e) => {
                            let why = if e.is_panic() {
                                let p = e.into_panic();
                                p.downcast_ref::<&str>()
                                    .map(|s| (*s).to_owned())
                                    .or_else(|| p.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "non-text panic payload".into())
                            } else {
                                "cancelled".into()
                            };
                            tracing::warn!(command = %id, %kind, %why, "command handler panicked");
                            (false, Vec::new(), format!("handler panicked: {why}"))
                        }
                    }
                }
            };
            if ok {
                tracing::info!(command = %id, %kind, "command succeeded");
            } else {
                tracing::warn!(command = %id, %kind, reason = %msg, "command failed");
            }
            let mut msg = msg;
            truncate_text(&mut msg, COMMAND_MESSAGE_MAX);
            let o = Outcome {
                id: id.clone(),
                ok,
                out,
                msg,
            };
            // Durable before anyone hears of it.
            let persisted = {
                let this = this.clone();
                let o = o.clone();
                tokio::task::spawn_blocking(move || this.persist(&o)).await
            };
            if persisted.is_err() {
                tracing::error!(command = %id, "recording the command's result failed");
            }
            {
                let mut r = this.lock();
                r.running.remove(&id);
                r.remember(o.clone());
            }
            // The record answers from now on: an approval kept for it is done with.
            if let Some(a) = &this.approvals {
                a.forget(&id);
            }
            let _ = dtx.send(Some(o));
        });
        (prx, drx)
    }
}

/// How a wait for approval ended.
enum Waited {
    Approved,
    Rejected(String),
    /// The delivery ended first (the gateway's stream went: a reconnect, the TTL, a
    /// shutdown); the wait is kept for the next delivery. The ledger's outcome.
    Left(&'static str),
}

/// Tells the gateway command `id` awaits approval (or, to an older gateway, holds it
/// unacknowledged) and waits for the owner's decision, the end of its TTL, or the stream's end.
async fn wait_for_approval(
    approvals: &crate::approvals::Approvals,
    id: &str,
    kind: &str,
    sha: &str,
    machine: &mut AgentCommand,
    send: &mut SendStream,
) -> Waited {
    use crate::approvals::Decision;
    let expires = machine.expires_unix_ms();
    let mut changes = approvals.subscribe();
    let mut said = false;
    loop {
        changes.borrow_and_update();
        match approvals.request(id, kind, sha, expires) {
            Ok(Decision::Approved { .. }) => return Waited::Approved,
            Ok(Decision::Rejected { reason, .. }) => return Waited::Rejected(reason),
            Ok(Decision::Pending) => {}
            Err(e) => {
                // Not kept, so not waited on: it would be lost at a restart. The gateway
                // redelivers.
                tracing::error!(command = %id, error = %e, "could not keep the command's wait for approval");
                send.reset(ErrorCode::INTERNAL);
                return Waited::Left("approval_not_kept");
            }
        }
        if !said {
            said = true;
            if machine.gateway_takes_approvals() {
                let _ = machine.awaiting_approval();
                if flush(send, machine).await.is_err() {
                    return Waited::Left("awaiting_approval");
                }
            } else {
                tracing::warn!(command = %id, "this gateway predates approvals: the command is held unacknowledged (DELIVERED) until it is approved");
            }
        }
        let ttl = async {
            match expires {
                Some(ms) => {
                    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
                    let left = at
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    tokio::time::sleep(left).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                return Waited::Left("awaiting_approval");
            },
            code = send.stopped_code() => {
                if code == Some(ErrorCode::WITHDRAWN) {
                    // Cancelled or expired at the gateway: never delivered again.
                    approvals.withdraw(id);
                    return Waited::Left("approval_withdrawn");
                }
                return Waited::Left("awaiting_approval");
            }
            _ = ttl => {
                // Forgotten by `request`'s pruning; the gateway ends it EXPIRED.
                let _ = approvals.list();
                return Waited::Left("approval_expired");
            }
        }
    }
}

fn append(path: &Path, o: &Outcome) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(o).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

fn rewrite(path: &Path, all: &[Outcome]) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        for o in all {
            let mut line = serde_json::to_vec(o).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let ex = Executor::new(Arc::new(Handlers::with_builtins()), Some(dir.path())).unwrap();
        let o = Outcome {
            id: "c1".into(),
            ok: true,
            out: vec![0, 1, 255],
            msg: "m".into(),
        };
        ex.persist(&o);
        let again = Executor::new(Arc::new(Handlers::with_builtins()), Some(dir.path())).unwrap();
        assert_eq!(again.lock().done.get("c1"), Some(&o));
    }

    async fn outcome_of(mut done: watch::Receiver<Option<Outcome>>) -> Outcome {
        loop {
            if let Some(o) = done.borrow_and_update().clone() {
                return o;
            }
            done.changed()
                .await
                .expect("execution ended without an outcome");
        }
    }

    #[tokio::test]
    async fn a_redelivered_id_attaches_or_is_answered_from_the_record_and_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let handlers = || {
            let h = Handlers::with_builtins();
            let r = runs.clone();
            h.register("count", move |p: Bytes, _s: ProgressSink| {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(p)
                }
            });
            Arc::new(h)
        };
        let ex = Arc::new(Executor::new(handlers(), Some(dir.path())).unwrap());
        let (_, first) =
            ex.clone()
                .start("c1".into(), "count".into(), Bytes::from_static(b"x"), None);
        // Redelivered while running: attaches.
        let (_, second) =
            ex.clone()
                .start("c1".into(), "count".into(), Bytes::from_static(b"x"), None);
        assert_eq!(outcome_of(first).await.out, b"x");
        assert_eq!(outcome_of(second).await.out, b"x");
        // Redelivered after completion, even to a restarted agent: answered from the record.
        let restarted = Arc::new(Executor::new(handlers(), Some(dir.path())).unwrap());
        let (_, third) =
            restarted.start("c1".into(), "count".into(), Bytes::from_static(b"y"), None);
        assert_eq!(outcome_of(third).await.out, b"x");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn the_record_is_bounded() {
        let mut r = Record::default();
        for i in 0..COMPLETED_KEPT + 5 {
            r.remember(Outcome {
                id: i.to_string(),
                ok: true,
                out: vec![],
                msg: String::new(),
            });
        }
        assert_eq!(r.done.len(), COMPLETED_KEPT);
        assert!(!r.done.contains_key("0"));
    }

    #[tokio::test]
    async fn progress_lines_and_messages_leave_the_agent_within_the_protocols_caps() {
        let handlers = Handlers::empty();
        handlers.register("loud", |_: Bytes, p: ProgressSink| async move {
            p.report("é".repeat(100_000));
            Err::<Bytes, _>("x".repeat(100_000))
        });
        let ex = Arc::new(Executor::new(Arc::new(handlers), None).unwrap());
        let (mut progress, done) = ex.start("c1".into(), "loud".into(), Bytes::new(), None);
        let line = progress.recv().await.unwrap();
        assert!(line.len() <= COMMAND_PROGRESS_LINE_MAX && line.starts_with("éé"));
        assert!(line.ends_with(" bytes]"), "{line}");
        let o = outcome_of(done).await;
        assert!(!o.ok && o.msg.len() <= COMMAND_MESSAGE_MAX && o.msg.starts_with("xx"));
    }
}
