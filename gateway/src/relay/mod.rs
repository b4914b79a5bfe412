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

pub mod grpc;
pub mod limits;
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
use tunnel_proto::stream::{SendHalf, Transmit};
use tunnel_proto::{AgentId, Message, StreamKind};

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
        })
    }

    /// Forwards streams for agents with no session here through `forwarder` from now on (set
    /// once; a second call is ignored).
    pub fn set_forwarder(&self, forwarder: Arc<Forwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Where to send a call for `agent`: its live sessions in turn, so load spreads across them.
    /// A stream stays on the session it was opened on.
    fn pick(&self, agent: &AgentId) -> Result<Arc<SessionInfo>, RelayError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        // Under the registry's lock, without copying the agent's sessions.
        self.registry
            .with_sessions(agent, |s| {
                // Make-before-break: while an agent instance moves to a new session (GoAway, or
                // back from the TCP fallback to QUIC), its older session only finishes what it
                // carries. Sessions are in connection order, so the newest of each instance is
                // the last.
                let current = |i: usize| {
                    !s[i + 1..]
                        .iter()
                        .any(|b| b.hello.instance_id == s[i].hello.instance_id)
                };
                let n = (0..s.len()).filter(|&i| current(i)).count();
                if n == 0 {
                    return None;
                }
                (0..s.len())
                    .filter(|&i| current(i))
                    .nth(turn % n)
                    .map(|i| s[i].clone())
            })
            .ok_or_else(|| RelayError::UnknownAgent(agent.clone()))?
            .ok_or_else(|| RelayError::NotConnected(agent.clone()))
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
        let local = match self.pick(agent) {
            Ok(session) => session,
            Err(e @ (RelayError::UnknownAgent(_) | RelayError::NotConnected(_))) => {
                return match self.forwarder.get() {
                    Some(f) => self.forward(f, caller, agent, machine, deadline, e).await,
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let permit = self.permit(agent)?;
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
                            self.forward(f, caller, agent, machine, deadline, lost)
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
        caller: Option<&Caller>,
        agent: &AgentId,
        machine: &mut S,
        deadline: Option<Instant>,
        local: RelayError,
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
        };
        match forwarder.open(req, &queued).await {
            Ok((send, recv)) => Ok((send, recv, permit)),
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
            let session = self.pick(agent).map_err(|_| LocalRefusal::NotHere)?;
            let permit = self
                .permit(agent)
                .map_err(|e| LocalRefusal::TooManyStreams(e.to_string()))?;
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
    use http::HeaderValue;

    fn headers(agent: &[u8]) -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(TETHER_AGENT, HeaderValue::from_bytes(agent).ok()?);
        Some(h)
    }

    #[test]
    fn code_labels_are_the_codes_debug_names() {
        for i in 0..=16 {
            let code = Code::from_i32(i);
            assert_eq!(code_label(code), format!("{code:?}"));
        }
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
