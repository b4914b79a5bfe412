//! Feature layer: delivery of commands to agents, in lanes.
//!
//! A lane, one per `(agent, ordering_key)`, delivers its commands one at a time in submission
//! order, the next only after the previous reached a final state; lanes run in parallel. A
//! delivery is a gateway-opened stream of kind `Command` on the agent's newest session; a
//! stream that fails before the result is redelivered after a backoff, up to
//! `commands.max_attempts` deliveries.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use tether_api::v1;
use tether_api::v1::{Command, CommandState};
use tether_runtime::stream::{Reader, StreamError, flush};
use tunnel_proto::stream::StreamFailure;
use tunnel_proto::stream::command::{GatewayCommand, ReportEvent};
use tunnel_proto::{AgentId, ErrorCode, ProtoError};

use super::{Commands, LANE_RECHECK, LaneKey, now_ts, push_progress, since};
use crate::tunnel::registry::SessionInfo;

/// Why one delivery attempt failed before the command's result: the command is delivered
/// again (up to `commands.max_attempts`), and the last reason is its message if none succeeds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// No stream could be opened: the agent's connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(StreamError),
    /// The header or the payload could not be written.
    #[error("sending the command: {0}")]
    Send(StreamError),
    /// The agent ended its side of the stream without a result.
    #[error("agent ended the stream without a result")]
    NoResult,
    /// Reading the agent's answer failed (a reset, the connection lost).
    #[error(transparent)]
    Read(StreamError),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The agent sent a frame that has no place on a command stream.
    #[error("agent sent {0} on a command stream")]
    Unexpected(&'static str),
    /// The command stream failed otherwise, as its machine reports it.
    #[error("the command stream failed: {0}")]
    Stream(StreamFailure),
}

/// An agent's delivery permits.
#[derive(Clone)]
pub(super) struct AgentPermits {
    /// Concurrent deliveries (`commands.max_in_flight`), so command streams never take all of
    /// an agent's stream credit from relayed calls.
    pub(super) deliveries: Arc<tokio::sync::Semaphore>,
    /// Deliveries buffering an output sent in `Data` frames ([`OUTPUT_BUFFERS_PER_AGENT`]), so
    /// one agent makes the gateway hold at most that many times `commands.max_output`.
    pub(super) outputs: Arc<tokio::sync::Semaphore>,
}

/// Deliveries of one agent that may buffer a large output (up to `commands.max_output`) at once;
/// the others wait before reading theirs, and the agent's stream flow control holds it back.
pub const OUTPUT_BUFFERS_PER_AGENT: usize = 4;

impl Commands {
    pub(super) async fn run_lane(self: Arc<Self>, lane: LaneKey) {
        // A lane whose agent's lease went to another replica is retired (its generation moves):
        // this runner then stops without touching a queue a later runner owns.
        let generation = self.lock().lane_gen.get(&lane).copied().unwrap_or(0);
        loop {
            let id = {
                let mut st = self.lock();
                if st.lane_gen.get(&lane).copied().unwrap_or(0) != generation {
                    return;
                }
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
            if st.lane_gen.get(&lane).copied().unwrap_or(0) != generation {
                return;
            }
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

    /// Across replicas: waits while this replica fenced itself (its liveness lapsed: another
    /// replica may be taking its leases), and says whether the command is still this replica's
    /// to deliver. Always true at once in the embedded mode.
    async fn wait_live(&self, id: &str) -> bool {
        let Some(r) = self.replicated() else {
            return true;
        };
        let mut live = r.cluster.replica.watch();
        loop {
            if !self.is_active(id) {
                return false;
            }
            if r.cluster.replica.is_live() {
                return true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                changed = live.changed() => if changed.is_err() { return false },
                _ = tokio::time::sleep(LANE_RECHECK) => {}
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
            if !self.wait_live(id).await {
                return;
            }
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
            // The version the transition below gives it.
            record.version += 1;
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

    /// One delivery: `Ok` when the command reached a final state (or left `active`
    /// meanwhile), `Err` when the stream failed before the result.
    async fn attempt(
        &self,
        session: &SessionInfo,
        id: &str,
        outputs: &Arc<tokio::sync::Semaphore>,
    ) -> Result<(), DeliveryError> {
        // The stream first: waiting for stream credit (the agent's stream limit) is not a
        // failed attempt, and Cancel stays possible meanwhile.
        let (mut send, recv) = session
            .link
            .open()
            .await
            .map_err(DeliveryError::ConnectionLost)?;
        let Some((cmd, written)) = self.begin_attempt(id) else {
            send.reset(ErrorCode::CANCELLED);
            return Ok(());
        };
        if self.replicated().is_some() {
            // Across replicas the delivery is recorded before the agent sees the command: a
            // Cancel on another replica either lands first (this write is then refused and the
            // command left `active`) or finds it delivered.
            written.await;
            if !self.is_active(id) {
                send.reset(ErrorCode::CANCELLED);
                return Ok(());
            }
        } else {
            // The embedded store applies writes in call order; no need to wait here.
            drop(written);
        }
        let mut delivery = self.delivery(cmd);
        flush(&mut send, &mut delivery)
            .await
            .map_err(DeliveryError::Send)?;
        self.read_outcome(session, id, Reader::new(recv, delivery), outputs)
            .await
    }

    /// Marks the command delivered (the first time) and counts the attempt, atomically with
    /// Cancel's check; `None` when it is no longer to be delivered (cancelled, finished, or
    /// expired, which this records).
    fn begin_attempt(&self, id: &str) -> Option<(Command, super::Persisting)> {
        let (cmd, written, first) = {
            let mut st = self.lock();
            let (state, expires) = st.active.get(id).map(|c| (c.state, c.expires))?;
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
                return None;
            }
            let to = if first {
                CommandState::Delivered
            } else {
                CommandState::try_from(state).unwrap_or(CommandState::Delivered)
            };
            let cmd = st.transition(id, to, |c| {
                c.attempts += 1;
                // Each attempt's progress starts anew: the record shows the lines of the attempt
                // that produced its result, and nothing a failed attempt sent outlives it.
                c.progress.clear();
                if first {
                    c.delivered = Some(now_ts());
                }
            })?;
            let written = self.persist(cmd.clone());
            (cmd, written, first)
        };
        if first {
            metrics::histogram!("tether_gateway_command_submit_to_delivered_seconds")
                .record(since(cmd.created.as_ref()));
        }
        Some((cmd, written))
    }

    /// The command's delivery: header, payload and FIN queued, the agent's report to read.
    fn delivery(&self, cmd: Command) -> GatewayCommand {
        GatewayCommand::new(
            cmd.id,
            cmd.kind,
            cmd.content_type,
            Bytes::from(cmd.payload),
            self.cfg.max_output,
        )
    }

    /// Reads the agent's answer up to its result, recording each step; `Ok` once the command
    /// reached a final state.
    async fn read_outcome(
        &self,
        session: &SessionInfo,
        id: &str,
        mut reader: Reader<GatewayCommand>,
        outputs: &Arc<tokio::sync::Semaphore>,
    ) -> Result<(), DeliveryError> {
        let mut buffering = None;
        loop {
            match reader.next().await.map_err(DeliveryError::Read)? {
                ReportEvent::Acked => {
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
                ReportEvent::Progress(line) => {
                    // Progress is for display: not written on its own (a chatty handler would
                    // rewrite the whole record per line); the final record carries the last lines.
                    self.lock().transition(id, CommandState::Running, |c| {
                        if c.started.is_none() {
                            c.started = Some(now_ts());
                        }
                        push_progress(&mut c.progress, line);
                    });
                }
                ReportEvent::OutputStarted => {
                    if buffering.is_none() {
                        // Until a buffer is free this stream is not read: the agent waits.
                        match outputs.clone().acquire_owned().await {
                            Ok(p) => buffering = Some(p),
                            Err(_) => return Err(DeliveryError::ShuttingDown),
                        }
                    }
                }
                ReportEvent::Finished {
                    succeeded,
                    output,
                    message,
                } => {
                    self.finish(id, succeeded, output, message).await;
                    return Ok(());
                }
                // The machine stopped a stream whose `Data` went above the limit.
                ReportEvent::OutputTooLarge { .. } => {
                    self.finish(id, false, Vec::new(), self.output_too_large(&session.agent))
                        .await;
                    return Ok(());
                }
                // An agent without command support answers like a relay stream.
                ReportEvent::Unsupported => {
                    self.finish(
                        id,
                        false,
                        Vec::new(),
                        format!("agent {} does not support commands", session.agent),
                    )
                    .await;
                    return Ok(());
                }
                ReportEvent::Failed(StreamFailure::Ended { .. }) => {
                    return Err(DeliveryError::NoResult);
                }
                // The machine stopped the stream (PROTOCOL_ERROR).
                ReportEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected {
                    got,
                    ..
                })) => return Err(DeliveryError::Unexpected(got)),
                ReportEvent::Failed(StreamFailure::Reset(code)) => {
                    return Err(DeliveryError::Read(StreamError::Reset(code)));
                }
                ReportEvent::Failed(StreamFailure::Protocol(e)) => {
                    return Err(DeliveryError::Read(StreamError::Protocol(e)));
                }
                ReportEvent::Failed(other) => {
                    return Err(DeliveryError::Stream(other));
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
}
