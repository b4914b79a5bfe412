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
use tether_runtime::stream::{Reader, StreamError, flush};
use tether_runtime::transport::SendStream;
use tunnel_proto::stream::StreamFailure;
use tunnel_proto::stream::command::{GatewayCommand, ReportEvent};
use tunnel_proto::{AgentId, ErrorCode, ProtoError};

use super::record::{CommandRecord, CommandState, Outcome};
use super::{Commands, LANE_RECHECK, push_progress, since};
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

/// A command's message when its TTL ended while it waited for the owner's approval.
pub(super) const NOT_APPROVED_IN_TIME: &str = "not approved in the data plane before its TTL: the agent's owner neither approved nor rejected it";

/// The progress line of a command awaiting approval: what the vendor tells the customer.
fn awaiting_line(id: &str) -> String {
    format!(
        "awaiting approval by the data plane's owner: `tether-agent approve {id}` (or `tether-agent reject {id} --reason …`) in the agent's pod"
    )
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
    /// Delivers the lane `(agent, ordering_key)` until it is empty. `generation` is the agent
    /// state's when the lane was started: a lane whose agent's lease went to another replica is
    /// retired (the generation moves), and this runner then stops without touching a queue a
    /// later runner owns.
    pub(super) async fn run_lane(
        self: Arc<Self>,
        agent: AgentId,
        ordering_key: String,
        generation: u64,
    ) {
        loop {
            let next = self.state.agents.run(&agent, |st| {
                if st.generation != generation {
                    return None;
                }
                match st.lanes.get(&ordering_key).and_then(|q| q.front()) {
                    Some(id) => Some(id.clone()),
                    None => {
                        st.lanes.remove(&ordering_key);
                        None
                    }
                }
            });
            let Some(id) = next.flatten() else { return };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.deliver_until_final(&agent, &id) => {}
            }
            // Pop and retire the lane in one critical section: a Submit that finds no lane
            // starts a new runner, so there is never a second runner on one lane.
            let more = self.state.agents.run(&agent, |st| {
                if st.generation != generation {
                    return false;
                }
                let empty = st.lanes.get_mut(&ordering_key).is_none_or(|q| {
                    q.pop_front();
                    q.is_empty()
                });
                if !empty {
                    return true;
                }
                st.lanes.remove(&ordering_key);
                // The agent's permits go once no lane holds them (a lane clones them under
                // this lock): only agents with work keep them.
                if st
                    .permits
                    .as_ref()
                    .is_some_and(|p| Arc::strong_count(&p.deliveries) == 1)
                {
                    st.permits = None;
                }
                false
            });
            if more != Some(true) {
                return;
            }
        }
    }

    /// Across replicas: waits while this replica fenced itself (its liveness lapsed: another
    /// replica may be taking its leases), and says whether the command is still this replica's
    /// to deliver. Always true at once in the embedded mode.
    async fn wait_live(&self, agent: &AgentId, id: &str) -> bool {
        let Some(r) = self.replicated() else {
            return true;
        };
        let mut live = r.cluster.replica.watch();
        loop {
            if !self.is_active(agent, id) {
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

    pub(super) fn is_active(&self, agent: &AgentId, id: &str) -> bool {
        self.state
            .agents
            .run(agent, |st| st.active.contains_key(id))
            .unwrap_or(false)
    }

    /// A live session of `agent`, waiting for one; `None` once the command left `active`
    /// (expired or cancelled meanwhile).
    async fn wait_session(&self, agent: &AgentId, id: &str) -> Option<Arc<SessionInfo>> {
        // The common case (the agent is connected) needs no feed; the feed alone (no snapshot
        // of every live session: O(agents) per delivery) is taken before the check that may
        // wait on it, so a session registered in between still wakes this lane.
        let mut feed = None;
        loop {
            if !self.is_active(agent, id) || self.expire_unapproved(agent, id).await {
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

    async fn deliver_until_final(&self, agent: &AgentId, id: &str) {
        let max = self.cfg.max_in_flight.max(1) as usize;
        let permits = self.state.agents.run(agent, |st| {
            st.permits
                .get_or_insert_with(|| AgentPermits {
                    deliveries: Arc::new(tokio::sync::Semaphore::new(max)),
                    outputs: Arc::new(tokio::sync::Semaphore::new(OUTPUT_BUFFERS_PER_AGENT)),
                })
                .clone()
        });
        let Some(permits) = permits else { return };
        loop {
            if !self.wait_live(agent, id).await {
                return;
            }
            let Ok(permit) = permits.deliveries.clone().acquire_owned().await else {
                return;
            };
            let Some(session) = self.wait_session(agent, id).await else {
                return;
            };
            let reason = match self.attempt(&session, id, &permits.outputs, permit).await {
                Ok(()) => return,
                Err(reason) => reason,
            };
            let attempts = self
                .state
                .agents
                .run(agent, |st| {
                    st.active
                        .get(id)
                        .map(|c| (c.attempts, c.state == CommandState::AwaitingApproval))
                })
                .flatten();
            let Some((attempts, awaiting)) = attempts else {
                return;
            };
            // A wait for the owner's approval may outlast any number of reconnects (a rolling
            // upgrade, a flaky network): the agent remembers it, and its TTL bounds it.
            if attempts >= self.cfg.max_attempts && !awaiting {
                let msg = format!("delivery failed {attempts} times; last: {reason}");
                self.finish(agent, id, false, Bytes::new(), msg).await;
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
    async fn finish(
        &self,
        agent: &AgentId,
        id: &str,
        succeeded: bool,
        output: Bytes,
        message: String,
    ) {
        let to = if succeeded {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        let finished = SystemTime::now();
        let outcome = Outcome { output, message };
        let write = self.state.agents.run(agent, |st| {
            let c = st.active.get(id)?;
            let mut record = c.clone();
            // The version the transition below gives it.
            record.version += 1;
            record.state = to;
            record.finished = Some(finished);
            record.result = Some(outcome.clone());
            // Enqueued under the lock, so it lands after every earlier write of this command.
            Some(self.persist(record))
        });
        let Some(write) = write.flatten() else { return };
        write.await;
        self.state.agents.run(agent, |st| {
            if let Some(c) = st.active.get(id) {
                metrics::histogram!("tether_gateway_command_submit_to_completed_seconds")
                    .record(since(c.created));
            }
            self.state.change(st, id, to, true, |c| {
                c.finished = Some(finished);
                c.result = Some(outcome);
            });
        });
    }

    /// One delivery: `Ok` when the command reached a final state (or left `active`
    /// meanwhile), `Err` when the stream failed before the result. `permit` (a delivery
    /// permit) is let go while the agent holds the command for approval.
    async fn attempt(
        &self,
        session: &SessionInfo,
        id: &str,
        outputs: &Arc<tokio::sync::Semaphore>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), DeliveryError> {
        let agent = &session.agent;
        // The stream first: waiting for stream credit (the agent's stream limit) is not a
        // failed attempt, and Cancel stays possible meanwhile.
        let (mut send, recv) = session
            .link
            .open()
            .await
            .map_err(DeliveryError::ConnectionLost)?;
        let Some((cmd, written)) = self.begin_attempt(agent, id) else {
            send.reset(ErrorCode::CANCELLED);
            return Ok(());
        };
        if self.replicated().is_some() {
            // Across replicas the delivery is recorded before the agent sees the command: a
            // Cancel on another replica either lands first (this write is then refused and the
            // command left `active`) or finds it delivered.
            written.await;
            if !self.is_active(agent, id) {
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
        self.read_outcome(
            session,
            id,
            &mut send,
            Reader::new(recv, delivery),
            outputs,
            permit,
        )
        .await
    }

    /// Marks the command delivered (the first time) and counts the attempt, atomically with
    /// Cancel's check; `None` when it is no longer to be delivered (cancelled, finished, or
    /// expired, which this records).
    fn begin_attempt(
        &self,
        agent: &AgentId,
        id: &str,
    ) -> Option<(CommandRecord, super::Persisting)> {
        let (cmd, written, first) = self
            .state
            .agents
            .run(agent, |st| {
                let (state, expires) = st.active.get(id).map(|c| (c.state, c.expires))?;
                let first = state == CommandState::Queued;
                let now = SystemTime::now();
                if expires.is_some_and(|e| e <= now) {
                    // The sweeper would get to a queued one; never deliver late. A command
                    // the owner did not approve in time ends here too when its wait was cut
                    // off (the agent forgets it at the same time).
                    let why = match state {
                        CommandState::Queued => "expired before delivery",
                        CommandState::AwaitingApproval => NOT_APPROVED_IN_TIME,
                        _ => "",
                    };
                    if !why.is_empty() {
                        if let Some(c) = self.state.transition(st, id, CommandState::Expired, |c| {
                            c.finished = Some(now);
                            c.result = Some(Outcome::message(why));
                        }) {
                            drop(self.persist(c));
                            metrics::counter!("tether_gateway_command_expirations_total")
                                .increment(1);
                        }
                        return None;
                    }
                }
                let to = if first {
                    CommandState::Delivered
                } else {
                    state
                };
                let cmd = self.state.transition(st, id, to, |c| {
                    c.attempts += 1;
                    // Each attempt's progress starts anew: the record shows the lines of the
                    // attempt that produced its result, and nothing a failed attempt sent
                    // outlives it.
                    c.progress.clear();
                    if first {
                        c.delivered = Some(now);
                    }
                })?;
                let written = self.persist(cmd.clone());
                Some((cmd, written, first))
            })
            .flatten()?;
        if first {
            metrics::histogram!("tether_gateway_command_submit_to_delivered_seconds")
                .record(since(cmd.created));
        }
        Some((cmd, written))
    }

    /// The command's delivery: header, payload (shared, not copied) and FIN queued, the
    /// agent's report to read.
    fn delivery(&self, cmd: CommandRecord) -> GatewayCommand {
        let expires = cmd.expires.map(|e| super::record::unix_ms(e).max(0) as u64);
        GatewayCommand::delivery(
            cmd.id,
            cmd.kind,
            cmd.content_type,
            cmd.payload,
            self.cfg.max_output,
            cmd.attempts,
            &cmd.trace_context,
            expires,
        )
    }

    /// Resolves when a command awaiting approval is to be withdrawn from its agent: its TTL
    /// ended (and this wrote `EXPIRED`), or it left `active` (cancelled, or expired by another
    /// replica). Restarted at each of the delivery's events: `feed` keeps its place.
    async fn withdrawn(
        &self,
        agent: &AgentId,
        id: &str,
        deadline: Option<SystemTime>,
        feed: &mut tokio::sync::broadcast::Receiver<Arc<CommandRecord>>,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        let ttl = async {
            match deadline {
                Some(at) => {
                    let left = at
                        .duration_since(SystemTime::now())
                        .unwrap_or(std::time::Duration::ZERO);
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(ttl);
        let mut ttl_passed = false;
        loop {
            tokio::select! {
                () = &mut ttl, if !ttl_passed => {
                    ttl_passed = true;
                    if self.expire_unapproved(agent, id).await || !self.is_active(agent, id) {
                        return;
                    }
                }
                ev = feed.recv() => match ev {
                    Ok(c) if c.id == id && c.is_final() => return,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => if !self.is_active(agent, id) { return },
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                },
            }
        }
    }

    /// Ends a command still awaiting approval at its TTL: `true` when it expired now.
    async fn expire_unapproved(&self, agent: &AgentId, id: &str) -> bool {
        let now = SystemTime::now();
        let write = self.state.agents.run(agent, |st| {
            let c = st.active.get(id)?;
            if c.state != CommandState::AwaitingApproval || c.expires.is_none_or(|e| e > now) {
                return None;
            }
            let c = self.state.transition(st, id, CommandState::Expired, |c| {
                c.finished = Some(now);
                c.result = Some(Outcome::message(NOT_APPROVED_IN_TIME));
            })?;
            Some(self.persist(c))
        });
        let Some(write) = write.flatten() else {
            return false;
        };
        write.await;
        metrics::counter!("tether_gateway_command_expirations_total").increment(1);
        tracing::info!(command = %id, %agent, "command expired waiting for the data plane owner's approval");
        true
    }

    /// Reads the agent's answer up to its result, recording each step; `Ok` once the command
    /// reached a final state.
    async fn read_outcome(
        &self,
        session: &SessionInfo,
        id: &str,
        send: &mut SendStream,
        mut reader: Reader<GatewayCommand>,
        outputs: &Arc<tokio::sync::Semaphore>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), DeliveryError> {
        let agent = &session.agent;
        let mut buffering = None;
        let mut permit = Some(permit);
        // While the agent holds the command for approval: its TTL (`Some(deadline)`), and the
        // feed of transitions, to see it cancelled (or expired by another replica).
        let mut awaiting: Option<(
            Option<SystemTime>,
            tokio::sync::broadcast::Receiver<Arc<CommandRecord>>,
        )> = None;
        loop {
            let event = match awaiting.as_mut() {
                None => reader.next().await,
                Some((deadline, feed)) => tokio::select! {
                    ev = reader.next() => ev,
                    () = self.withdrawn(agent, id, *deadline, feed) => {
                        // The agent forgets its wait when it sees this code.
                        send.reset(ErrorCode::WITHDRAWN);
                        reader.into_parts().0.stop(ErrorCode::WITHDRAWN);
                        return Ok(());
                    }
                },
            };
            match event.map_err(DeliveryError::Read)? {
                ReportEvent::AwaitingApproval => {
                    // The wait holds no delivery permit: other lanes of this agent go on. Once
                    // approved it runs without one (approvals are a person's pace: few).
                    drop(permit.take());
                    let feed = self.state.subscribe();
                    let write = self.state.agents.run(agent, |st| {
                        let c =
                            self.state
                                .transition(st, id, CommandState::AwaitingApproval, |c| {
                                    c.progress.clear();
                                    push_progress(&mut c.progress, awaiting_line(id));
                                })?;
                        awaiting = Some((c.expires, feed));
                        Some(self.persist(c))
                    });
                    if let Some(write) = write.flatten() {
                        write.await;
                        metrics::counter!("tether_gateway_command_approval_waits_total")
                            .increment(1);
                    }
                }
                ReportEvent::Acked => {
                    awaiting = None;
                    self.state.agents.run(agent, |st| {
                        let cmd = self.state.transition(st, id, CommandState::Running, |c| {
                            if c.started.is_none() {
                                c.started = Some(SystemTime::now());
                            }
                        });
                        if let Some(c) = cmd {
                            drop(self.persist(c));
                        }
                    });
                }
                ReportEvent::Progress(line) => {
                    // Progress is for display: not written on its own (a chatty handler would
                    // rewrite the whole record per line); the final record carries the last lines.
                    self.state.agents.run(agent, |st| {
                        self.state.change(st, id, CommandState::Running, true, |c| {
                            if c.started.is_none() {
                                c.started = Some(SystemTime::now());
                            }
                            push_progress(&mut c.progress, line);
                        })
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
                    self.finish(agent, id, succeeded, Bytes::from(output), message)
                        .await;
                    return Ok(());
                }
                // The machine stopped a stream whose `Data` went above the limit.
                ReportEvent::OutputTooLarge { .. } => {
                    let msg = self.output_too_large(agent);
                    self.finish(agent, id, false, Bytes::new(), msg).await;
                    return Ok(());
                }
                // An agent without command support answers like a relay stream.
                ReportEvent::Unsupported => {
                    let msg = format!("agent {agent} does not support commands");
                    self.finish(agent, id, false, Bytes::new(), msg).await;
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
