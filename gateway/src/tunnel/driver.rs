//! Session layer: the driver of one agent session, whatever its transport.
//!
//! The driver owns the control stream: it feeds bytes and time into the sans-IO
//! `tunnel_proto::GatewaySession`, writes what the session wants written, registers the session
//! when `Hello` is accepted, and closes the connection with the session's close code when it
//! ends. The end-to-end probe ([`super::probe`]) runs inside it. A bad peer ends only its own
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_runtime::stream::StreamError;
use tether_runtime::transport::{Link, RecvStream, SendStream};
use tunnel_proto::ErrorCode;
use tunnel_proto::session::{GatewayEvent, GatewaySession};

use crate::tls::CertFacts;
use crate::tunnel::TunnelContext;
use crate::tunnel::admission::SessionPermit;
use crate::tunnel::probe::Probe;
use crate::tunnel::registry::{SessionCommand, SessionInfo};

/// Runs one session until its connection ends; `_permit` counts the connection against its
/// agent until then.
pub(crate) async fn drive_session(
    link: Link,
    mut send: SendStream,
    mut recv: RecvStream,
    (agent, cert): (tunnel_proto::AgentId, CertFacts),
    remote: SocketAddr,
    ctx: Arc<TunnelContext>,
    _permit: SessionPermit,
) {
    let mut cfg = ctx.session.clone();
    cfg.session_id = ctx.next_session_id();
    let session_id = cfg.session_id.clone();
    let mut session = GatewaySession::new(cfg, Instant::now());
    let mut registered: Option<Arc<SessionInfo>> = None;
    let mut commands = None;
    let transport = link.transport();
    // The end-to-end probe runs inside this driver (one task and one timer per session, which
    // matters at 10,000 mostly idle sessions; see docs/PERFORMANCE.md).
    let mut probe = Probe::new(ctx.probe, ctx.session.heartbeat_interval);
    let close_reason;
    loop {
        while let Some(bytes) = session.poll_transmit() {
            if let Err(e) = send.write_all(&bytes).await {
                tracing::debug!(%agent, error = %e, "control stream write failed");
                break;
            }
        }
        let mut closed = None;
        while let Some(ev) = session.poll_event() {
            match ev {
                GatewayEvent::Established { hello, version } => {
                    let (info, rx) = SessionInfo::new(
                        session_id.clone(),
                        agent.clone(),
                        remote,
                        link.clone(),
                        (hello, version),
                        &cert,
                    );
                    let info = ctx.registry.register(info);
                    tracing::info!(%agent, session = %session_id, %remote, %transport,
                        agent_version = %info.hello.agent_version, "agent connected");
                    metrics::counter!("tether_gateway_sessions_total", "transport" => transport.name())
                        .increment(1);
                    probe.start(Instant::now());
                    registered = Some(info);
                    commands = Some(rx);
                    // A revocation that landed between the handshake and the registration
                    // missed this session: catch it here.
                    if let Some(why) = ctx.revocations.refusal(&agent, &cert) {
                        tracing::warn!(%agent, session = %session_id, reason = %why,
                            "closing a session of a revoked certificate");
                        session.close(ErrorCode::REVOKED, "agent revoked");
                    }
                }
                GatewayEvent::Heartbeat { rtt } => {
                    if let Some(rtt) = rtt {
                        if let Some(s) = &registered {
                            s.set_rtt(rtt);
                        }
                        metrics::histogram!("tether_gateway_heartbeat_rtt_seconds")
                            .record(rtt.as_secs_f64());
                    }
                    probe.on_heartbeat(&link, Instant::now());
                }
                // Signing takes well under a millisecond: answered here, in order.
                GatewayEvent::RenewRequested(req) => {
                    if let Some(renewal) = &ctx.renewal {
                        session.renew_response(renewal.renew(&agent, &cert, &req));
                    }
                }
                GatewayEvent::Closed(info) => closed = Some(info),
            }
        }
        if let Some(info) = closed {
            metrics::counter!("tether_gateway_session_closes_total", "code" => info.code.name())
                .increment(1);
            close_reason = format!("{}: {}", info.code, info.reason);
            if info.by_peer {
                link.close(ErrorCode::NO_ERROR, b"");
            } else {
                // A close decided while handling events (a revoked certificate) has its Close
                // frame still queued.
                let flush = async {
                    while let Some(bytes) = session.poll_transmit() {
                        if send.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_millis(250), flush).await;
                // Let the Close frame go out before the connection close discards it.
                let _ = send.finish();
                link.close(info.code, info.reason.as_bytes());
                link.linger().await;
            }
            break;
        }
        let session_deadline = session.poll_timeout();
        let deadline = [session_deadline, probe.deadline()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let command = async {
            match commands.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // `read_chunk` hands over the transport's own buffer: no read buffer per session.
            r = recv.read_chunk(CONTROL_READ_MAX) => match r {
                Ok(Some(bytes)) => session.handle_input(&bytes, Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(StreamError::Closed { code, reason }) => {
                    close_reason = format!("closed by agent: {code} {reason}");
                    break;
                }
                Err(e) => {
                    close_reason = e.to_string();
                    break;
                }
            },
            outcome = probe.answer() => {
                if let Err(why) = outcome {
                    metrics::counter!("tether_gateway_probe_failures_total",
                        "transport" => transport.name())
                    .increment(1);
                    tracing::warn!(%agent, session = %session_id, %remote, %transport,
                        reason = %why, "end-to-end probe failed; closing the session");
                    session.close(ErrorCode::UNRESPONSIVE, "end-to-end probe failed");
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                if session_deadline.is_some_and(|d| d <= now) {
                    session.handle_timeout(now);
                }
                probe.on_timer(&link, now);
            }
            Some(cmd) = command => match cmd {
                SessionCommand::GoAway(reason, within) => session.go_away(&reason, within),
                SessionCommand::Close(code, reason) => session.close(code, &reason),
            },
            _ = ctx.shutdown.cancelled() => session.close(ErrorCode::SHUTDOWN, "gateway shutting down"),
        }
    }
    if let Some(info) = registered {
        tracing::info!(%agent, session = %session_id, %transport, reason = %close_reason, "agent disconnected");
        ctx.registry.unregister(&info, close_reason);
    } else {
        tracing::info!(%agent, %remote, reason = %close_reason, "agent session ended before Hello");
    }
}

/// Most bytes of the control stream taken at once. Control messages are a few dozen bytes.
const CONTROL_READ_MAX: usize = 16 * 1024;
