//! Feature layer: calls and TCP streams relayed to agents.
//!
//! [`Relay`] picks the session a stream goes on and opens it: [`grpc`] relays any gRPC call
//! that is not `tether.v1.*` ([`grpc::RelayService`]), [`tcp`] serves `tether.v1.Streams`, and
//! [`limits`] caps the streams in flight per agent. With replicas, a stream for an agent with
//! no session here goes over a peer link to a replica that holds one (`peer::forwarder`): the
//! local session first, else forward; the stream handed back is the same either way, so the
//! call's code does not know. [`Relay`] is also what a forwarded stream is opened on at the
//! holder (`peer::LocalStreams`: local sessions only, one hop at most). The caller (resolved by
//! `northbound::auth::Authenticated`) must be allowed to act for the agent's tenant: otherwise
//! `PERMISSION_DENIED`, before the registry is consulted, so the answer says nothing about
//! whether the agent exists.
//!
//! **Sessions and re-sends.** Calls are spread over the agent's sessions here (round robin),
//! preferring those this gateway has not asked to go; a session the agent left takes nothing
//! new (with none usable here, the call is forwarded like one for an agent with no session
//! here). A call that did not reach the agent when its session went away is sent again on
//! another session ([`Attempts`]): nothing of it reached the upstream, so this is safe for
//! every call, idempotent or not.

pub mod grpc;
pub mod limits;
pub mod outcomes;
pub mod resend;
pub mod tcp;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::HeaderMap;
use tether_runtime::grpc::{TETHER_AGENT, TETHER_SERVICE};
use tether_runtime::stream::{StreamError, flush};
use tether_runtime::transport::{RecvStream, SendStream};
use tonic::{Code, Status};
use tunnel_proto::stream::{SendHalf, StreamFailure, Transmit};
use tunnel_proto::{AgentId, ErrorCode, Message, StreamKind};

use crate::metrics::RelayKind;
use crate::northbound::auth::Caller;
use crate::peer::forwarder::{ForwardError, ForwardRequest, Forwarder};
use crate::peer::{LocalRefusal, LocalStream, LocalStreams};
use crate::relay::limits::{AgentStreams, StreamPermit};
use crate::tunnel::registry::{Registry, SessionInfo};

/// How long opening a stream may wait when the agent's stream limit is reached and the call has
/// no deadline of its own.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call or stream could not be relayed; the northbound maps it to a gRPC status
/// (`northbound::status`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// No `tether-agent` metadata (the caller's mistake).
    #[error("missing tether-agent metadata: set it to <tenant>/<agent>")]
    NoAgent,
    /// `tether-agent` is not text (the caller's mistake).
    #[error("tether-agent metadata is not text")]
    AgentNotText,
    /// `tether-agent` is not `<tenant>/<agent>` of valid names (the caller's mistake).
    #[error("tether-agent metadata: {0}")]
    BadAgent(tunnel_proto::IdentityError),
    /// `tether-service` is not text (the caller's mistake).
    #[error("tether-service metadata is not text")]
    ServiceNotText,
    /// The gateway has never seen the agent.
    #[error("agent {0} is not known to this gateway")]
    UnknownAgent(AgentId),
    /// The agent has no live session (retrying once it is back helps).
    #[error("agent {0} is not connected")]
    NotConnected(AgentId),
    /// Every session the agent has here is one it is leaving (it moved to another replica) or
    /// one that already refused this call (retrying helps: another replica holds it).
    #[error(
        "agent {0} is moving its sessions away from this gateway and none here takes the call; retry (another replica holds its new session)"
    )]
    Moving(AgentId),
    /// The agent has `limits.streams_per_agent` streams in flight (retry when some end).
    #[error(
        "agent {agent} has {limit} streams in flight, the limit (limits.streams_per_agent); retry when some have ended"
    )]
    TooManyStreams {
        /// The agent.
        agent: AgentId,
        /// `limits.streams_per_agent`.
        limit: u32,
    },
    /// The session's connection went away while the stream was being opened.
    #[error("agent {agent}: connection lost: {source}")]
    ConnectionLost {
        /// The agent.
        agent: AgentId,
        /// What the transport said.
        source: StreamError,
    },
    /// The call's deadline passed while it waited for stream credit.
    #[error("deadline passed waiting for a stream to agent {0}")]
    DeadlineWaitingForStream(AgentId),
    /// No stream credit came within [`OPEN_TIMEOUT`] for a call without a deadline.
    #[error("agent {0} has no free stream for {OPEN_TIMEOUT:?}")]
    NoFreeStream(AgentId),
    /// The stream's header could not be written.
    #[error("agent {agent}: {source}")]
    Header {
        /// The agent.
        agent: AgentId,
        /// What the transport said.
        source: StreamError,
    },
    /// The agent's sessions are on other replicas, and forwarding there failed.
    #[error(transparent)]
    Forward(ForwardError),
}

/// Shared state of the relay.
#[derive(Debug)]
pub struct Relay {
    registry: Arc<Registry>,
    next: AtomicUsize,
    streams: AgentStreams,
    /// With peer links: where a stream goes when no session is here.
    forwarder: OnceLock<Arc<Forwarder>>,
    /// Spans of relayed calls and streams (`[telemetry]`); unset: none.
    telemetry: OnceLock<tether_runtime::telemetry::Telemetry>,
    /// How calls ended, per agent (for the console).
    outcomes: Arc<outcomes::CallOutcomes>,
}

impl Relay {
    /// A relay carrying at most `streams_per_agent` calls and TCP streams to one agent at a
    /// time (`limits.streams_per_agent`).
    pub fn with_stream_limit(registry: Arc<Registry>, streams_per_agent: u32) -> Arc<Relay> {
        Arc::new(Relay {
            registry,
            next: AtomicUsize::new(0),
            streams: AgentStreams::new(streams_per_agent),
            forwarder: OnceLock::new(),
            telemetry: OnceLock::new(),
            outcomes: Arc::default(),
        })
    }

    /// Calls and TCP streams this gateway relays to `agent` now.
    pub fn open_streams(&self, agent: &AgentId) -> u32 {
        self.streams.open(agent)
    }

    /// How relayed calls and streams ended, per agent.
    pub fn outcomes(&self) -> &Arc<outcomes::CallOutcomes> {
        &self.outcomes
    }

    /// Makes a span of every relayed call and stream with `telemetry` from now on (set once).
    pub fn set_telemetry(&self, telemetry: tether_runtime::telemetry::Telemetry) {
        let _ = self.telemetry.set(telemetry);
    }

    /// The tracer of relayed calls and streams.
    pub fn telemetry(&self) -> &tether_runtime::telemetry::Telemetry {
        static OFF: tether_runtime::telemetry::Telemetry =
            tether_runtime::telemetry::Telemetry::disabled();
        self.telemetry.get().unwrap_or(&OFF)
    }

    /// Forwards streams for agents with no session here through `forwarder` from now on (set
    /// once; a second call is ignored).
    pub fn set_forwarder(&self, forwarder: Arc<Forwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Where to send a call for `agent`: its local sessions in turn, so load spreads across
    /// them, leaving out the sessions `attempts` tried. A stream stays on the session it was
    /// opened on.
    ///
    /// - A session the agent left takes nothing (it refuses new streams).
    /// - An agent that does not leave sessions (before `leave`) moves make-before-break by
    ///   opening a newer session and retiring the older: only the newest session of each agent
    ///   instance takes calls (sessions are in connection order).
    /// - Sessions this gateway asked to go (`GoAway`: draining, rebalancing) take calls only
    ///   when the agent has no other here.
    fn pick(&self, agent: &AgentId, attempts: &Attempts) -> Result<Arc<SessionInfo>, RelayError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        // Under the registry's lock, without copying the agent's sessions.
        self.registry
            .with_sessions(agent, |s| {
                if s.is_empty() {
                    return Err(RelayError::NotConnected(agent.clone()));
                }
                let usable = |i: usize| {
                    let a = &s[i];
                    a.is_usable()
                        && !attempts.tried(a)
                        && (a.agent_leaves()
                            || !s[i + 1..]
                                .iter()
                                .any(|b| b.hello.instance_id == a.hello.instance_id))
                };
                let staying = |i: usize| usable(i) && !s[i].is_asked_to_go();
                let n = (0..s.len()).filter(|&i| staying(i)).count();
                let chosen = if n > 0 {
                    (0..s.len()).filter(|&i| staying(i)).nth(turn % n)
                } else {
                    let n = (0..s.len()).filter(|&i| usable(i)).count();
                    (n > 0)
                        .then(|| (0..s.len()).filter(|&i| usable(i)).nth(turn % n))
                        .flatten()
                };
                chosen
                    .map(|i| s[i].clone())
                    .ok_or_else(|| RelayError::Moving(agent.clone()))
            })
            .ok_or_else(|| RelayError::UnknownAgent(agent.clone()))?
    }

    /// Resolves `tether-agent` / `tether-service` from metadata and checks that `caller` may act
    /// for the agent's tenant (`method` names the call in audit events).
    pub fn route(
        &self,
        headers: &HeaderMap,
        caller: &Caller,
        method: &'static str,
    ) -> Result<(AgentId, String), Status> {
        let agent = agent_of_metadata(headers)?;
        caller.authorize(method, &agent)?;
        let service = match headers.get(TETHER_SERVICE) {
            None => String::new(),
            Some(v) => v
                .to_str()
                .map_err(|_| RelayError::ServiceNotText)?
                .to_owned(),
        };
        Ok((agent, service))
    }

    /// Opens a stream to one of `agent`'s sessions and writes what `machine` queued (its
    /// header). The permit counts the stream against `limits.streams_per_agent` until dropped:
    /// keep it as long as the stream lives.
    pub async fn open<S: SendHalf + ?Sized>(
        &self,
        agent: &AgentId,
        machine: &mut S,
        deadline: Option<Instant>,
    ) -> Result<(SendStream, RecvStream, StreamPermit), RelayError> {
        self.open_as(None, agent, machine, deadline).await
    }

    /// [`Relay::open_as`] for one attempt of a call: on a session `attempts` has not tried,
    /// which it records (see [`Attempts`] for when the call may go again).
    pub async fn open_attempt<S: SendHalf + ?Sized>(
        &self,
        caller: Option<&Caller>,
        agent: &AgentId,
        machine: &mut S,
        deadline: Option<Instant>,
        attempts: &mut Attempts,
    ) -> Result<(SendStream, RecvStream, StreamPermit), RelayError> {
        attempts.sends += 1;
        attempts.last = None;
        let local = match self.pick(agent, attempts) {
            Ok(session) => session,
            Err(
                e @ (RelayError::UnknownAgent(_)
                | RelayError::NotConnected(_)
                | RelayError::Moving(_)),
            ) => {
                return match self.forwarder.get() {
                    Some(f) => {
                        self.forward(f, (caller, agent), machine, deadline, e, attempts)
                            .await
                    }
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        // Counted on the session before the stream is opened: a session the agent left
        // closes only once this is dropped (see `SessionInfo::was_closed_after_leave`).
        let permit = self.permit(agent)?.on_session(local.relay_stream());
        attempts.tried.push(local.clone());
        attempts.last = Some(local.clone());
        self.open_on((caller, agent), local, permit, machine, deadline, attempts)
            .await
    }

    /// As [`open`](Self::open), for `caller` (named in the holder's logs when the stream is
    /// forwarded). A session here is used first; with none (or when its connection fails
    /// before anything was written), the stream is forwarded to a replica that holds one.
    pub async fn open_as<S: SendHalf + ?Sized>(
        &self,
        caller: Option<&Caller>,
        agent: &AgentId,
        machine: &mut S,
        deadline: Option<Instant>,
    ) -> Result<(SendStream, RecvStream, StreamPermit), RelayError> {
        self.open_attempt(caller, agent, machine, deadline, &mut Attempts::default())
            .await
    }

    /// The local part of [`Relay::open_attempt`], once a session here was picked.
    async fn open_on<S: SendHalf + ?Sized>(
        &self,
        (caller, agent): (Option<&Caller>, &AgentId),
        local: Arc<SessionInfo>,
        permit: StreamPermit,
        machine: &mut S,
        deadline: Option<Instant>,
        attempts: &mut Attempts,
    ) -> Result<(SendStream, RecvStream, StreamPermit), RelayError> {
        let open_by = deadline.unwrap_or_else(|| Instant::now() + OPEN_TIMEOUT);
        let (mut send, recv) =
            match tokio::time::timeout_at(open_by.into(), local.link.open()).await {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => {
                    let lost = RelayError::ConnectionLost {
                        agent: agent.clone(),
                        source,
                    };
                    // The session is going away and nothing was written: another replica's
                    // session may take the stream.
                    return match self.forwarder.get() {
                        Some(f) => {
                            drop(permit);
                            self.forward(f, (caller, agent), machine, deadline, lost, attempts)
                                .await
                        }
                        None => Err(lost),
                    };
                }
                Err(_) if deadline.is_some() => {
                    return Err(RelayError::DeadlineWaitingForStream(agent.clone()));
                }
                Err(_) => return Err(RelayError::NoFreeStream(agent.clone())),
            };
        flush(&mut send, machine)
            .await
            .map_err(|source| RelayError::Header {
                agent: agent.clone(),
                source,
            })?;
        Ok((send, recv, permit))
    }

    fn permit(&self, agent: &AgentId) -> Result<StreamPermit, RelayError> {
        self.streams
            .acquire(agent)
            .ok_or_else(|| RelayError::TooManyStreams {
                agent: agent.clone(),
                limit: self.streams.max(),
            })
    }

    /// Forwards the stream `machine` opens to a replica holding a session of `agent`;
    /// `local` is why it could not stay here (answered when no replica holds the agent).
    async fn forward<S: SendHalf + ?Sized>(
        &self,
        forwarder: &Forwarder,
        (caller, agent): (Option<&Caller>, &AgentId),
        machine: &mut S,
        deadline: Option<Instant>,
        local: RelayError,
        attempts: &mut Attempts,
    ) -> Result<(SendStream, RecvStream, StreamPermit), RelayError> {
        let permit = self.permit(agent)?;
        let mut queued = Vec::new();
        while let Some(t) = machine.poll_transmit() {
            queued.push(t);
        }
        let req = ForwardRequest {
            agent,
            caller: caller.map_or("-", |c| c.name.as_str()),
            stream_kind: stream_kind(&queued),
            deadline,
            avoid: &attempts.forwarded_to,
        };
        match forwarder.open(req, &queued).await {
            Ok((send, recv, peer)) => {
                attempts.forwarded_to.push(peer);
                Ok((send, recv, permit))
            }
            Err(ForwardError::NoSession { known, .. }) => Err(match local {
                RelayError::UnknownAgent(a) if known => RelayError::NotConnected(a),
                other => other,
            }),
            Err(ForwardError::Deadline(a)) => Err(RelayError::DeadlineWaitingForStream(a)),
            Err(e) => Err(RelayError::Forward(e)),
        }
    }
}

/// What a stream carries, from the `StreamHeader` its machine queued (for the holder's logs).
fn stream_kind(queued: &[Transmit]) -> &'static str {
    let Some(Transmit::Bytes(first)) = queued.first() else {
        return "unknown";
    };
    let mut dec = tunnel_proto::FrameDecoder::new(tunnel_proto::frame::MAX_STREAM_FRAME);
    dec.push(first);
    if let Some(Transmit::Bytes(rest)) = queued.get(1) {
        dec.push(rest);
    }
    match dec.next_message() {
        Ok(Some(Message::StreamHeader(h))) => match StreamKind::try_from(h.kind) {
            Ok(StreamKind::Rpc) => "grpc",
            Ok(StreamKind::Tcp) => "tcp",
            _ => "other",
        },
        _ => "unknown",
    }
}

impl LocalStreams for Relay {
    /// A stream to one of `agent`'s sessions here, never forwarded again (one hop at most).
    fn open_local<'a>(
        &'a self,
        agent: &'a AgentId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<LocalStream, LocalRefusal>> {
        Box::pin(async move {
            let session = self
                .pick(agent, &Attempts::default())
                .map_err(|_| LocalRefusal::NotHere)?;
            let permit = self
                .permit(agent)
                .map_err(|e| LocalRefusal::TooManyStreams(e.to_string()))?
                .on_session(session.relay_stream());
            match tokio::time::timeout_at(deadline.into(), session.link.open()).await {
                Ok(Ok((send, recv))) => Ok(LocalStream {
                    send,
                    recv,
                    permit: Box::new(permit),
                }),
                Ok(Err(e)) => Err(LocalRefusal::Lost(format!("agent {agent}: {e}"))),
                Err(_) => Err(LocalRefusal::NoFreeStream(
                    RelayError::NoFreeStream(agent.clone()).to_string(),
                )),
            }
        })
    }
}

/// Sends (at most) of one call: the first, and re-sends after a failure that proves the call did
/// not reach the agent.
pub const MAX_SENDS: usize = 4;

/// The sessions one call was sent on, and whether it may be sent again on another.
///
/// A call is re-sent, on a session it was not sent on, at most [`MAX_SENDS`] times in all, when
/// nothing of it can have reached an upstream (the caller's request body is replayed, see
/// [`resend::Replay`]), that is when no answer arrived and:
/// 1. the agent reset the stream with `REFUSED_STREAM`: it arrived on a session the agent is
///    leaving, and was dropped unread;
/// 2. the stream could not be opened (the connection was gone before anything was written);
/// 3. the session's connection was closed by this gateway because the agent had left it and
///    its relayed streams were done: a stream opened on it after that arrived after the agent
///    left, and the agent refuses those.
///
/// Everything else is not re-sent: a connection lost otherwise (the agent died, the network,
/// a heartbeat timeout: the agent may have forwarded the call), a stream reset with any other
/// code, any failure after the first answer, and a request body larger than
/// [`resend::REPLAY_MAX`].
#[derive(Debug, Default)]
pub struct Attempts {
    /// The local sessions tried.
    tried: Vec<Arc<SessionInfo>>,
    /// Attempts made, local or forwarded.
    sends: usize,
    /// The last attempt's session, when it was one here (not forwarded).
    last: Option<Arc<SessionInfo>>,
    /// The replicas attempts were forwarded to: a re-send goes to another holder first.
    forwarded_to: Vec<String>,
}

impl Attempts {
    fn tried(&self, s: &Arc<SessionInfo>) -> bool {
        self.tried.iter().any(|t| Arc::ptr_eq(t, s))
    }

    fn may_send_again(&self) -> bool {
        self.sends < MAX_SENDS
    }

    /// The last attempt's session (one here) was closed by this gateway after the agent left
    /// it.
    fn closed_after_leave(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|s| s.was_closed_after_leave())
    }

    /// `open_attempt` failed with `e`: may the call go again?
    pub fn resend_after_open(&self, e: &RelayError) -> bool {
        self.may_send_again()
            && match e {
                RelayError::ConnectionLost { .. } => true,
                RelayError::Header { source, .. } => {
                    refused(source) || (self.closed_after_leave() && connection_gone(source))
                }
                _ => false,
            }
    }

    /// The stream failed with `e` before any answer: may the call go again?
    pub fn resend_after_stream_error(&self, e: &StreamError) -> bool {
        self.may_send_again() && (refused(e) || (self.closed_after_leave() && connection_gone(e)))
    }

    /// The stream's machine reported `failure` before any answer: may the call go again?
    pub fn resend_after_failure(&self, failure: &StreamFailure) -> bool {
        self.may_send_again()
            && matches!(failure, StreamFailure::Reset(code) if *code == ErrorCode::REFUSED_STREAM)
    }
}

fn refused(e: &StreamError) -> bool {
    matches!(e, StreamError::Reset(code) if *code == ErrorCode::REFUSED_STREAM)
}

fn connection_gone(e: &StreamError) -> bool {
    matches!(
        e,
        StreamError::Closed { .. } | StreamError::ConnectionLost(_)
    )
}

/// Counts a call sent again on another session.
fn record_resend(kind: RelayKind) {
    metrics::counter!("tether_gateway_relay_resends_total", "kind" => kind.as_str()).increment(1);
}

/// Parses `tether-agent` metadata: `<tenant>/<agent>`, each a valid name.
pub fn agent_of_metadata(headers: &HeaderMap) -> Result<AgentId, RelayError> {
    headers
        .get(TETHER_AGENT)
        .ok_or(RelayError::NoAgent)?
        .to_str()
        .map_err(|_| RelayError::AgentNotText)?
        .parse::<AgentId>()
        .map_err(RelayError::BadAgent)
}

/// Records the time to a relayed call's first answer (its response head, or the TCP stream's
/// `OpenResult`).
fn record_first_byte(kind: RelayKind, started: Instant) {
    metrics::histogram!("tether_gateway_relay_first_byte_seconds", "kind" => kind.as_str())
        .record(started.elapsed().as_secs_f64());
}

/// Counts a relayed call or stream that ended (or was refused) with `code`, by the tenant it
/// was routed to (see [`grpc::tenant_label`]).
fn record_call(kind: RelayKind, tenant: &str, code: Code) {
    metrics::counter!("tether_gateway_relay_calls_total", "kind" => kind.as_str(),
        "tenant" => tenant.to_owned(), "code" => code_label(code))
    .increment(1);
}

/// The `code` label: the status code's name, as `{code:?}` writes it, without formatting it
/// on every call.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::CertFacts;
    use crate::tunnel::registry::SessionCommand;
    use crate::tunnel::test_support::quic_pair;
    use http::HeaderValue;
    use tunnel_proto::message::{GoAway, Hello, LEAVE};

    /// Registers a session of agent `t/a` for instance `instance` (leaving sessions when
    /// `leaves`) over `link`; returns it.
    fn session(
        registry: &Registry,
        link: &tether_runtime::transport::Link,
        id: &str,
        instance: &str,
        leaves: bool,
    ) -> Arc<SessionInfo> {
        let hello = Hello {
            instance_id: instance.into(),
            capabilities: if leaves { vec![LEAVE.into()] } else { vec![] },
            ..Default::default()
        };
        let facts = CertFacts {
            fingerprint: "00".into(),
            serial: "01".into(),
            not_before: 0,
            not_after: i64::MAX,
        };
        let info = SessionInfo::new(
            id.into(),
            "t/a".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            link.clone(),
            (hello, 1),
            &facts,
        );
        registry.register(info)
    }

    fn picks(relay: &Relay, n: usize) -> std::collections::BTreeMap<String, usize> {
        let agent: AgentId = "t/a".parse().unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            let s = relay.pick(&agent, &Attempts::default()).unwrap();
            *seen.entry(s.session_id.clone()).or_default() += 1;
        }
        seen
    }

    #[tokio::test]
    async fn calls_are_spread_over_an_agents_sessions_and_never_go_to_one_it_left() {
        let (_agent_end, link, _endpoints) = quic_pair().await;
        let registry = Arc::new(Registry::default());
        let relay = Relay::with_stream_limit(registry.clone(), 16);
        // One agent process with two sessions here (two addresses, or connections = 2 with two
        // of its replicas here).
        let s1 = session(&registry, &link, "s1", "i1", true);
        let s2 = session(&registry, &link, "s2", "i1", true);
        let seen = picks(&relay, 100);
        assert_eq!(seen.get("s1"), Some(&50));
        assert_eq!(seen.get("s2"), Some(&50));
        // A session this gateway asked to go takes calls only when nothing else does.
        s1.command(SessionCommand::GoAway(GoAway::default()));
        assert_eq!(picks(&relay, 10).keys().collect::<Vec<_>>(), ["s2"]);
        // A session the agent left takes none, even the last one.
        s2.mark_left();
        assert_eq!(picks(&relay, 10).keys().collect::<Vec<_>>(), ["s1"]);
        s1.mark_left();
        let agent: AgentId = "t/a".parse().unwrap();
        assert!(matches!(
            relay.pick(&agent, &Attempts::default()),
            Err(RelayError::Moving(_))
        ));
        // A call is never sent twice to one session.
        let s3 = session(&registry, &link, "s3", "i1", true);
        let mut tried = Attempts::default();
        tried.tried.push(s3.clone());
        assert!(matches!(
            relay.pick(&agent, &tried),
            Err(RelayError::Moving(_))
        ));
        assert!(!tried.resend_after_failure(&StreamFailure::Reset(ErrorCode::CANCELLED)));
        assert!(tried.resend_after_failure(&StreamFailure::Reset(ErrorCode::REFUSED_STREAM)));
    }

    #[tokio::test]
    async fn an_agent_that_does_not_leave_gets_calls_on_the_newest_session_of_each_instance() {
        let (_agent_end, link, _endpoints) = quic_pair().await;
        let registry = Arc::new(Registry::default());
        let relay = Relay::with_stream_limit(registry.clone(), 16);
        session(&registry, &link, "old", "i1", false);
        session(&registry, &link, "new", "i1", false);
        session(&registry, &link, "other", "i2", false);
        let seen = picks(&relay, 100);
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["new", "other"]);
    }

    fn headers(agent: &[u8]) -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(TETHER_AGENT, HeaderValue::from_bytes(agent).ok()?);
        Some(h)
    }

    #[test]
    fn missing_or_malformed_metadata_is_invalid_argument() {
        assert_eq!(
            Status::from(agent_of_metadata(&HeaderMap::new()).unwrap_err()).code(),
            Code::InvalidArgument
        );
        let long = format!("{}/a", "t".repeat(8 << 10));
        let e = Status::from(agent_of_metadata(&headers(long.as_bytes()).unwrap()).unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            agent_of_metadata(&headers(b"acme/a").unwrap())
                .unwrap()
                .tenant(),
            "acme"
        );
    }
}
