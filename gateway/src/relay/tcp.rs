//! Feature layer: `tether.v1.Streams/Open`, raw TCP streams to an agent's `kind = "tcp"` services.
//!
//! The gateway opens a `Tcp` stream; the agent connects to the service and answers `OpenResult`;
//! from then on the QUIC stream carries raw bytes both ways. Ending the request stream finishes
//! the QUIC stream (the agent half-closes the TCP connection); the service closing its side
//! finishes the response stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tether_api::v1::StreamChunk;
use tether_api::v1::streams_server::{Streams, StreamsServer};
use tether_runtime::stream::{Reader, flush};
use tether_runtime::telemetry::{self, KeyValue, SpanKind};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tunnel_proto::stream::StreamFailure;
use tunnel_proto::stream::tcp::{GatewayTcp, RawRecv, TcpEvent};
use tunnel_proto::{ErrorCode, ProtoError};

use crate::metrics::{Direction, RelayKind, relayed_bytes};
use crate::relay::limits::StreamPermit;
use crate::relay::outcomes::AgentTraffic;
use crate::relay::{Attempts, Relay, record_call, record_first_byte, record_resend};

/// `tether.v1.Streams`.
#[derive(Debug, Clone)]
pub struct StreamsApi {
    relay: Arc<Relay>,
}

impl StreamsApi {
    /// Streams through `relay`'s routing and sessions.
    pub fn new(relay: Arc<Relay>) -> Self {
        StreamsApi { relay }
    }

    /// The tonic service (callers are authenticated by `auth::Authenticated` around it; the
    /// tenant is checked in `Relay::route`).
    pub fn into_service(self) -> StreamsServer<StreamsApi> {
        StreamsServer::new(self)
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Streams for StreamsApi {
    type OpenStream = ChunkStream;

    async fn open(
        &self,
        req: Request<Streaming<StreamChunk>>,
    ) -> Result<Response<ChunkStream>, Status> {
        let caller = crate::northbound::auth::caller(&req)?;
        let headers = req.metadata().clone().into_headers();
        let (agent, service) = self
            .relay
            .route(&headers, &caller, "tether.v1.Streams/Open")?;
        let started = Instant::now();
        // The stream's span (its opening: the agent's connect to the service), child of the
        // caller's trace context; the agent's span is its child.
        let span = self.relay.telemetry().span(
            "relay tether.v1.Streams/Open".to_owned(),
            SpanKind::Server,
            &telemetry::context_of(&headers),
            vec![
                KeyValue::new("tether.tenant", agent.tenant().to_owned()),
                KeyValue::new("tether.agent", agent.to_string()),
                KeyValue::new("tether.service", service.clone()),
            ],
        );
        let trace_context = span.context();
        // Nothing of the caller's goes before `Opened`: a stream that provably did not reach
        // the agent is opened again on another session (`Attempts`).
        let mut attempts = Attempts::default();
        let (mut send, mut reader, permit, first) = loop {
            let mut machine = GatewayTcp::with_caller(
                service.clone(),
                trace_context.clone(),
                format!("{}:{}", caller.kind.as_str(), caller.name),
            );
            let (send, recv, permit) = match self
                .relay
                .open_attempt(Some(&caller), &agent, &mut machine, None, &mut attempts)
                .await
            {
                Ok(o) => o,
                Err(e) if attempts.resend_after_open(&e) => {
                    record_resend(RelayKind::Tcp);
                    continue;
                }
                Err(e) => {
                    let status: Status = e.into();
                    span.end(status.code() as i32, status.message());
                    return Err(status);
                }
            };
            let mut reader = Reader::new(recv, machine);
            let first = reader.next().await;
            let again = match &first {
                Err(e) => attempts.resend_after_stream_error(e),
                Ok(TcpEvent::Failed(f)) => attempts.resend_after_failure(f),
                Ok(_) => false,
            };
            if again {
                record_resend(RelayKind::Tcp);
                continue;
            }
            break (send, reader, permit, first);
        };
        let opened: Result<(), Status> = match first {
            Ok(TcpEvent::Opened) => Ok(()),
            Ok(TcpEvent::Refused { code, message }) => {
                Err(Status::new(tonic::Code::from_i32(code), message))
            }
            Ok(TcpEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected {
                got, ..
            }))) => {
                // The machine reset the stream (PROTOCOL_ERROR).
                let _ = flush(&mut send, reader.half_mut()).await;
                Err(Status::internal(format!(
                    "agent {agent} answered a TCP stream with {got}"
                )))
            }
            Ok(TcpEvent::Failed(StreamFailure::Ended { .. })) => {
                let _ = flush(&mut send, reader.half_mut()).await;
                Err(Status::internal(format!(
                    "agent {agent} answered a TCP stream with nothing"
                )))
            }
            Ok(TcpEvent::Failed(e)) => {
                let _ = flush(&mut send, reader.half_mut()).await;
                Err(Status::unavailable(format!("agent {agent}: {e}")))
            }
            // Bytes or an end come only after `Opened`.
            Ok(other) => {
                send.reset(ErrorCode::PROTOCOL_ERROR);
                Err(Status::internal(format!(
                    "agent {agent} answered a TCP stream with {other:?}"
                )))
            }
            Err(e) => Err(Status::unavailable(format!("agent {agent}: {e}"))),
        };
        if let Err(status) = opened {
            span.end(status.code() as i32, status.message());
            self.relay.outcomes().record(&agent, status.code());
            return Err(status);
        }
        // The agent's counters: this stream's opening, then its bytes each way.
        let traffic = self.relay.outcomes().agent(&agent);
        traffic.ended(tonic::Code::Ok);
        span.end(0, "");
        record_first_byte(RelayKind::Tcp, started);
        record_call(RelayKind::Tcp, agent.tenant(), tonic::Code::Ok);
        let (recv, machine) = reader.into_parts();
        let Ok((mut to_agent, from_agent)) = machine.into_raw() else {
            return Err(Status::internal("TCP stream not open after its answer"));
        };

        // Caller → agent: a task of its own, so this direction flows whether or not the caller
        // reads the other.
        let mut inbound = req.into_inner();
        let to_agent_bytes = relayed_bytes(Direction::ToAgent);
        let to_agent_traffic = traffic.clone();
        tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(chunk)) => {
                        to_agent_bytes.increment(chunk.data.len() as u64);
                        to_agent_traffic.to_agent(chunk.data.len() as u64);
                        let _ = to_agent.write(chunk.data);
                    }
                    // The caller half-closed: so do we.
                    None => {
                        let _ = to_agent.finish();
                        let _ = flush(&mut send, &mut to_agent).await;
                        return;
                    }
                    Some(Err(_)) => {
                        to_agent.reset(ErrorCode::CANCELLED);
                        let _ = flush(&mut send, &mut to_agent).await;
                        return;
                    }
                }
                if flush(&mut send, &mut to_agent).await.is_err() {
                    return;
                }
            }
        });

        // Agent → caller: read from the QUIC stream as the response is polled (by the HTTP/2
        // stream's task, with no task or channel between). The stream counts against the
        // agent's limit until this side ends or is dropped.
        let state = FromAgent {
            reader: Reader::new(recv, from_agent),
            bytes: relayed_bytes(Direction::FromAgent),
            traffic,
            done: false,
            _permit: permit,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            |mut st| async move {
                let item = st.next().await?;
                Some((item, st))
            },
        ))))
    }
}

/// The agent → caller half of an open TCP stream, read as the caller's response is polled.
struct FromAgent {
    reader: Reader<RawRecv>,
    bytes: metrics::Counter,
    /// The agent's counters.
    traffic: Arc<AgentTraffic>,
    /// The final item was given: nothing more is read.
    done: bool,
    _permit: StreamPermit,
}

impl FromAgent {
    /// The next chunk for the caller; `None` once the agent finished (or after an error).
    async fn next(&mut self) -> Option<Result<StreamChunk, Status>> {
        if self.done {
            return None;
        }
        let failed = match self.reader.next().await {
            Ok(TcpEvent::Data(b)) => {
                self.bytes.increment(b.len() as u64);
                self.traffic.from_agent(b.len() as u64);
                return Some(Ok(StreamChunk { data: b }));
            }
            Ok(TcpEvent::Finished) => {
                self.done = true;
                return None;
            }
            Ok(TcpEvent::Failed(e)) => e.to_string(),
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        };
        self.done = true;
        Some(Err(Status::unavailable(format!(
            "agent stream failed: {failed}"
        ))))
    }
}

impl Drop for FromAgent {
    /// The caller went away before the agent finished: tell the agent to stop sending.
    fn drop(&mut self) {
        if !self.done && !self.reader.half_mut().is_ended() {
            self.reader.half_mut().stop(ErrorCode::CANCELLED);
            self.reader.apply_stop();
        }
    }
}
