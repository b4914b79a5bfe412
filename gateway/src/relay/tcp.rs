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
use tether_runtime::stream::FramedRecv;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tunnel_proto::message::{StreamHeader, StreamKind};
use tunnel_proto::{ErrorCode, Message};

use crate::metrics::{Direction, RelayKind, count_relayed_bytes};
use crate::relay::{Relay, record_call, record_first_byte};

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

/// Bytes per response message.
const CHUNK: usize = 64 * 1024;

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
        let header = StreamHeader {
            kind: StreamKind::Tcp as i32,
            service,
            ..Default::default()
        };
        let started = Instant::now();
        let (mut send, recv, permit) = self.relay.open(&agent, header, None).await?;
        let mut framed = FramedRecv::relay(recv);
        match framed.next().await {
            Ok(Some(Message::OpenResult(r))) if r.ok => {}
            Ok(Some(Message::OpenResult(r))) => {
                return Err(Status::new(tonic::Code::from_i32(r.code), r.message));
            }
            Ok(other) => {
                send.reset(ErrorCode::PROTOCOL_ERROR);
                return Err(Status::internal(format!(
                    "agent {agent} answered a TCP stream with {}",
                    other.map_or("nothing", |m| m.name())
                )));
            }
            Err(e) => return Err(Status::unavailable(format!("agent {agent}: {e}"))),
        }
        record_first_byte(RelayKind::Tcp, started);
        record_call(RelayKind::Tcp, agent.tenant(), tonic::Code::Ok);
        let (mut recv, leftover) = framed.into_parts();

        // Caller → agent.
        let mut inbound = req.into_inner();
        tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(chunk)) => {
                        count_relayed_bytes(Direction::ToAgent, chunk.data.len());
                        if send.write_all(&chunk.data).await.is_err() {
                            return;
                        }
                    }
                    // The caller half-closed: so do we.
                    None => {
                        let _ = send.finish();
                        return;
                    }
                    Some(Err(_)) => {
                        send.reset(ErrorCode::CANCELLED);
                        return;
                    }
                }
            }
        });

        // Agent → caller. The stream counts against the agent's limit until this side ends.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            if !leftover.is_empty()
                && tx
                    .send(Ok(StreamChunk {
                        data: leftover.to_vec(),
                    }))
                    .await
                    .is_err()
            {
                recv.stop(ErrorCode::CANCELLED);
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = tokio::select! {
                    r = recv.read(&mut buf) => r,
                    _ = tx.closed() => {
                        recv.stop(ErrorCode::CANCELLED);
                        return;
                    }
                };
                match n {
                    Ok(Some(n)) => {
                        count_relayed_bytes(Direction::FromAgent, n);
                        if tx
                            .send(Ok(StreamChunk {
                                data: buf[..n].to_vec(),
                            }))
                            .await
                            .is_err()
                        {
                            recv.stop(ErrorCode::CANCELLED);
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "agent stream failed: {e}"
                            ))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
