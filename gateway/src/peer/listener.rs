//! Transport + feature layer: the peer listener, and the holder's side of a forwarded stream.
//!
//! Peers that dial this replica are accepted here once the TLS handshake proved them gateway
//! replicas of our trust domain ([`super::tls::PeerClientVerifier`]: agent and control-plane
//! certificates are refused before any stream). On every link, dialed or accepted, the
//! streams a peer opens are served by [`serve_link`]: a probe is answered; a forwarded
//! stream is opened to one of this replica's *own* sessions of the agent
//! ([`super::LocalStreams`], never forwarded again), answered, then spliced both ways.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_runtime::transport::{RecvStream, SendStream};
use tunnel_proto::{AgentId, ErrorCode};

use crate::peer::link::PeerLink;
use crate::peer::metrics::{self, ActiveIn, Direction};
use crate::peer::wire::{self, AnswerCode, PeerAnswer, PeerHeader, PeerKind};
use crate::peer::{LocalRefusal, Peers, splice};

/// How long a peer may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream's header may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts peers until the endpoint is closed.
pub async fn accept_loop(peers: Arc<Peers>) {
    while let Some(incoming) = peers.endpoint.accept().await {
        let peers = peers.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "peer connection failed");
                    return;
                }
            };
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(Ok(c)) => c,
                // Refused certificates were counted and logged by the verifier.
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "peer handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "peer handshake timed out");
                    return;
                }
            };
            let Some(peer) = super::tls::peer_replica(&conn, &peers.trust_domain) else {
                conn.close(
                    ErrorCode::UNAUTHENTICATED.0.into(),
                    b"not a gateway replica",
                );
                return;
            };
            if peer == peers.me {
                conn.close(
                    ErrorCode::UNAUTHENTICATED.0.into(),
                    b"a replica cannot link to itself: is cluster.replica_id unique?",
                );
                tracing::warn!(%remote, "a peer presented this replica's own identity: give every replica its own cluster.replica_id and peer certificate");
                return;
            }
            peers.adopt(Arc::new(PeerLink::new(peer, None, conn)));
        });
    }
}

/// Serves the streams the peer opens on `link` until it is gone.
pub async fn serve_link(peers: &Arc<Peers>, link: &Arc<PeerLink>) {
    while let Some((send, recv)) = link.accept().await {
        tokio::spawn(serve_stream(peers.clone(), link.clone(), send, recv));
    }
}

async fn answer(send: &mut SendStream, code: AnswerCode, message: &str) -> bool {
    send.write_all_chunks(&mut [wire::encode(&PeerAnswer::new(code, message))])
        .await
        .is_ok()
}

/// Answers a refusal and ends the stream: nothing reached the agent. The forwarding replica
/// reads the answer; the stop (`NOT_HERE` when there is no session here) tells its send side
/// the same.
async fn refuse(mut send: SendStream, mut recv: RecvStream, code: AnswerCode, message: &str) {
    if answer(&mut send, code, message).await {
        let _ = send.finish();
    }
    recv.stop(if code == AnswerCode::NotHere {
        ErrorCode::NOT_HERE
    } else {
        ErrorCode::NO_ERROR
    });
}

async fn serve_stream(
    peers: Arc<Peers>,
    link: Arc<PeerLink>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, wire::read::<PeerHeader>(&mut recv))
        .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(peer = %link.peer(), error = %e, "peer stream without a valid header");
            send.reset(ErrorCode::PROTOCOL_ERROR);
            recv.stop(ErrorCode::PROTOCOL_ERROR);
            return;
        }
        Err(_) => {
            send.reset(ErrorCode::PROTOCOL_ERROR);
            recv.stop(ErrorCode::PROTOCOL_ERROR);
            return;
        }
    };
    match PeerKind::from_u32(header.kind) {
        Some(PeerKind::Ping) => {
            let pong = PeerAnswer {
                epoch: peers.epoch(),
                ..PeerAnswer::new(AnswerCode::Ok, "")
            };
            if send
                .write_all_chunks(&mut [wire::encode(&pong)])
                .await
                .is_ok()
            {
                let _ = send.finish();
            }
        }
        Some(PeerKind::Forward) => forwarded(&peers, &link, header, send, recv).await,
        None => {
            refuse(
                send,
                recv,
                AnswerCode::BadRequest,
                &format!("unknown peer stream kind {}", header.kind),
            )
            .await
        }
    }
}

/// The holder's side of a forwarded stream: a stream to a local session, the answer, then
/// the splice.
async fn forwarded(
    peers: &Arc<Peers>,
    link: &Arc<PeerLink>,
    header: PeerHeader,
    mut send: SendStream,
    recv: RecvStream,
) {
    let agent: AgentId = match header.agent.parse() {
        Ok(a) => a,
        Err(e) => {
            refuse(send, recv, AnswerCode::BadRequest, &format!("agent: {e}")).await;
            return;
        }
    };
    // The forwarding replica waits `answer_timeout` for this answer: wait for a free stream
    // at most half of it, so a busy agent is answered as such rather than taken for a dead
    // link.
    let now = Instant::now();
    let mut deadline = now + peers.settings.answer_timeout / 2;
    if header.timeout_ms > 0 {
        deadline = deadline.min(now + Duration::from_millis(header.timeout_ms));
    }
    let local = match peers.local.open_local(&agent, deadline).await {
        Ok(l) => l,
        Err(refusal) => {
            let (code, message) = match refusal {
                LocalRefusal::NotHere => (
                    AnswerCode::NotHere,
                    format!("replica {} holds no session of agent {agent}", peers.me),
                ),
                LocalRefusal::TooManyStreams(m) => (AnswerCode::TooManyStreams, m),
                LocalRefusal::NoFreeStream(m) => (AnswerCode::NoFreeStream, m),
                LocalRefusal::Lost(m) => (AnswerCode::AgentLost, m),
            };
            tracing::debug!(peer = %link.peer(), %agent, ?code, %message, "forwarded stream refused");
            refuse(send, recv, code, &message).await;
            return;
        }
    };
    let mut to_agent = local.send;
    let mut from_agent = local.recv;
    if !answer(&mut send, AnswerCode::Ok, "").await {
        // The forwarding replica gave up (its answer timeout, or the caller left).
        to_agent.reset(ErrorCode::CANCELLED);
        from_agent.stop(ErrorCode::CANCELLED);
        return;
    }
    metrics::count_forwarded(link.peer(), Direction::In);
    tracing::debug!(peer = %link.peer(), %agent, caller = %header.caller,
        kind = %header.stream_kind, "carrying a forwarded stream");
    let _active = ActiveIn::new();
    let _permit = local.permit;
    splice::splice(recv, send, from_agent, to_agent).await;
}
