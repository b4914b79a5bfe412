//! Transport layer: the listeners agents dial, QUIC on UDP and TLS + HTTP/2 on TCP (same
//! port), and the side doors on that TCP port (enrollment), chosen by the ClientHello's ALPN.
//! Each accepted connection is handed to the session driver ([`super::driver`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tether_runtime::CancellationToken;
use tether_runtime::accept::Acceptor;
use tether_runtime::stream::send_msg;
use tether_runtime::tls;
use tether_runtime::transport::{H2Link, Link, RecvStream, SendStream};
use tunnel_proto::message::Close;
use tunnel_proto::{ALPN, ErrorCode, Message, SpiffeId};

use crate::metrics::{
    HandshakeFailure, IdleIn, Limit, count_handshake_failure, count_idle_timeout, count_rejection,
};
use crate::tls::CertFacts;
use crate::tunnel::TunnelContext;
use crate::tunnel::admission::{Admission, Admit, HandshakeSlot, SessionPermit};
use crate::tunnel::driver::drive_session;

/// Serves one TCP connection whose ClientHello was read (the handler completes the handshake
/// with its own TLS config).
pub type SideDoorFn = Arc<
    dyn Fn(
            tokio_rustls::StartHandshake<tokio::net::TcpStream>,
            SocketAddr,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Another protocol on the tunnel's TCP port, selected by ALPN.
#[derive(Clone)]
pub struct SideDoor {
    pub(crate) alpn: Vec<u8>,
    pub(crate) serve: SideDoorFn,
}

impl std::fmt::Debug for SideDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideDoor")
            .field("alpn", &String::from_utf8_lossy(&self.alpn))
            .finish_non_exhaustive()
    }
}

/// (`CONNECTION_REFUSED`, before any cryptography) and the agent retries after its jittered
/// backoff. Without a cap, a reconnect storm (every agent after a gateway restart) queues more
/// handshakes than the CPU completes within the agents' connect timeout: they give up and
/// retry, and the work spent on them is lost (measured with `tether-loadtest`: 10,000 agents
/// took 40 s to come back with thousands of timed-out dials; see docs/PERFORMANCE.md).
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// QUIC handshakes in progress from one source address at most: a quarter of
/// [`MAX_CONCURRENT_HANDSHAKES`], so one address cannot take every slot while a fleet behind one
/// NAT still connects many agents at once; all of them when `limits.handshake_burst` is above
/// [`MAX_CONCURRENT_HANDSHAKES`] (one address standing for many hosts, as in a load test).
fn handshakes_per_address(admission: &Admission) -> usize {
    if admission.burst() > MAX_CONCURRENT_HANDSHAKES as f64 {
        MAX_CONCURRENT_HANDSHAKES
    } else {
        MAX_CONCURRENT_HANDSHAKES / 4
    }
}

/// Accepts agent connections until `stop_accepting` is cancelled. Each Initial is first
/// admitted by `admission` (before any cryptography): a stateless Retry while the gateway-wide
/// handshake rate is above `limits.retry_above` and the address is unvalidated, a refusal when
/// its source address is over `limits.handshakes_per_second`.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: Arc<TunnelContext>,
    admission: Arc<Admission>,
    stop_accepting: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let per_address = handshakes_per_address(&admission);
    loop {
        let incoming = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        match admission.admit_quic(
            remote.ip(),
            incoming.remote_address_validated(),
            Instant::now(),
        ) {
            Admit::Accept => {}
            Admit::Retry => {
                metrics::counter!("tether_gateway_quic_retries_total").increment(1);
                if let Err(e) = incoming.retry() {
                    // Only an Initial that already carried a token cannot be retried, and
                    // those are validated: not reached.
                    e.into_incoming().ignore();
                }
                continue;
            }
            Admit::Refuse => {
                count_rejection(Limit::HandshakeRate);
                tracing::debug!(%remote, "too many handshakes from this address; refusing");
                incoming.refuse();
                continue;
            }
        }
        let Some(own_slot) = admission.begin_handshake(remote.ip(), per_address) else {
            count_rejection(Limit::HandshakesPerAddress);
            tracing::debug!(%remote, "too many handshakes in progress from this address; refusing");
            incoming.refuse();
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            metrics::counter!("tether_gateway_handshakes_refused_total").increment(1);
            tracing::debug!(%remote, "too many handshakes in progress; refusing a connection");
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        // The `Incoming` (about a KB) boxed: the task keeps its arguments' room for its life.
        let incoming = Box::new(incoming);
        tokio::spawn(async move {
            if let Err(e) = handle_connection(incoming, ctx, (permit, own_slot)).await {
                tracing::debug!(%remote, error = %e, "agent connection ended with an error");
            }
        });
    }
}

/// TLS alerts that rustls sends for a certificate our verifier refused (and already counted):
/// bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
/// certificate_unknown, unknown_ca, access_denied, decrypt_error (bad signature).
fn counted_by_verifier(e: &quinn::ConnectionError) -> bool {
    const ALERTS: [u64; 8] = [42, 43, 44, 45, 46, 48, 49, 51];
    matches!(e, quinn::ConnectionError::TransportError(t)
        if ALERTS.iter().any(|a| u64::from(t.code) == 0x100 + a))
}

fn handshake_failure_reason(e: &quinn::ConnectionError) -> HandshakeFailure {
    match e {
        quinn::ConnectionError::TransportError(t) => match u64::from(t.code) {
            // TLS alert `certificate_required`: the agent sent no certificate.
            0x174 => HandshakeFailure::NoClientCertificate,
            // TLS alert `no_application_protocol`: wrong ALPN.
            0x178 => HandshakeFailure::AlpnMismatch,
            _ => HandshakeFailure::TlsError,
        },
        quinn::ConnectionError::TimedOut => HandshakeFailure::Timeout,
        _ => HandshakeFailure::ConnectionError,
    }
}

/// One agent's QUIC connection: its handshake, then its session until it ends.
async fn handle_connection(
    incoming: Box<quinn::Incoming>,
    ctx: Arc<TunnelContext>,
    handshake_permit: (tokio::sync::OwnedSemaphorePermit, HandshakeSlot),
) -> Result<(), quinn::ConnectionError> {
    let remote = incoming.remote_address();
    // Boxed: the handshake's futures are a few KB and live only until the session starts,
    // while this task lives as long as the session; unboxed, the task would keep their room
    // for its whole life (4.7 KB per task before, 2.6 KB after; see docs/PERFORMANCE.md).
    let Some((link, control, peer, permit)) =
        Box::pin(establish(*incoming, &ctx, handshake_permit)).await?
    else {
        return Ok(());
    };
    drive_session(link, control.0, control.1, peer, remote, ctx, permit).await;
    Ok(())
}

/// A session about to start: its connection, control stream, agent and admission.
type Established = (
    Link,
    (SendStream, RecvStream),
    (tunnel_proto::AgentId, CertFacts),
    SessionPermit,
);

/// The QUIC handshake, the agent's identity and admission, and its control stream; `None`
/// when the connection was turned away (and closed, counted and logged as such).
async fn establish(
    incoming: quinn::Incoming,
    ctx: &TunnelContext,
    handshake_permit: (tokio::sync::OwnedSemaphorePermit, HandshakeSlot),
) -> Result<Option<Established>, quinn::ConnectionError> {
    let remote = incoming.remote_address();
    // The first flight is processed in `accept`, so a refusal can surface there or later.
    // Bounded: a peer that sends its Initial and then nothing must not hold a handshake slot
    // until QUIC's idle timeout (dropping `Connecting` abandons the connection).
    let handshake = match incoming.accept() {
        Ok(connecting) => {
            match tokio::time::timeout(ctx.session.handshake_timeout, connecting).await {
                Ok(r) => r,
                Err(_) => {
                    count_idle_timeout(IdleIn::TunnelQuic);
                    count_handshake_failure(
                        HandshakeFailure::Timeout,
                        &format!("{remote}: QUIC handshake timed out"),
                    );
                    return Ok(None);
                }
            }
        }
        Err(e) => Err(e),
    };
    drop(handshake_permit);
    let conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            if !counted_by_verifier(&e) {
                count_handshake_failure(handshake_failure_reason(&e), &format!("{remote}: {e}"));
            }
            return Err(e);
        }
    };
    // The verifier accepted exactly one agent identity of our trust domain.
    let (agent, cert) = match peer_agent(&conn) {
        Some(a) => a,
        None => {
            conn.close(ErrorCode::UNAUTHENTICATED.0.into(), b"no agent identity");
            return Ok(None);
        }
    };
    let permit = match ctx.admit_session(&agent, remote) {
        Ok(p) => p,
        Err(why) => {
            conn.close(ErrorCode::TOO_MANY_SESSIONS.0.into(), why.as_bytes());
            return Ok(None);
        }
    };
    let link = Link::Quic(conn);
    // Over QUIC the agent opens the control stream.
    let accept = tokio::time::timeout(ctx.session.handshake_timeout, link.accept()).await;
    let (send, recv) = match accept {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(_) => {
            count_idle_timeout(IdleIn::TunnelQuic);
            link.close(ErrorCode::HANDSHAKE_TIMEOUT, b"no control stream opened");
            return Ok(None);
        }
    };
    Ok(Some((link, (send, recv), (agent, cert), permit)))
}

/// Accepts agent connections on TCP (the fallback, and the enrollment side door) until
/// `stop_accepting` is cancelled; a source address over `limits.handshakes_per_second` is
/// closed at once, before TLS.
pub async fn accept_tcp_loop(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<TunnelContext>,
    admission: Arc<Admission>,
    stop_accepting: CancellationToken,
) {
    // Out of file descriptors: keep serving the connections we have, paced and quiet.
    let mut listener = Acceptor::new(listener, "tunnel_tcp");
    loop {
        let (sock, remote) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            a = listener.accept() => a,
        };
        if admission.admit_tcp(remote.ip(), Instant::now()) != Admit::Accept {
            count_rejection(Limit::HandshakeRate);
            tracing::debug!(%remote, "too many TCP handshakes from this address; closing");
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        let (tls, ctx) = (tls.clone(), ctx.clone());
        tokio::spawn(async move {
            handle_tcp(sock, remote, tls, ctx).await;
        });
    }
}

/// Why a TLS-over-TCP handshake failed, as a `handshake_failures_total` reason; `None` when the
/// verifier already counted it.
fn tcp_failure_reason(e: &std::io::Error) -> Option<HandshakeFailure> {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Some(HandshakeFailure::ConnectionError);
    };
    match tls {
        rustls::Error::NoCertificatesPresented => Some(HandshakeFailure::NoClientCertificate),
        rustls::Error::NoApplicationProtocol => Some(HandshakeFailure::AlpnMismatch),
        rustls::Error::InvalidCertificate(_) => None,
        _ => Some(HandshakeFailure::TlsError),
    }
}

async fn handle_tcp(
    sock: tokio::net::TcpStream,
    remote: SocketAddr,
    tunnel_tls: Arc<rustls::ServerConfig>,
    ctx: Arc<TunnelContext>,
) {
    let deadline = tokio::time::Instant::now() + ctx.session.handshake_timeout;
    // Read the ClientHello first: its ALPN says whether this is the tunnel or a side door.
    let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), sock);
    let start = match tokio::time::timeout_at(deadline, hello).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if let Some(reason) = tcp_failure_reason(&e) {
                count_handshake_failure(reason, &format!("tcp {remote}: {e}"));
            }
            return;
        }
        Err(_) => {
            count_idle_timeout(IdleIn::TunnelTcp);
            count_handshake_failure(
                HandshakeFailure::Timeout,
                &format!("tcp {remote}: no TLS ClientHello"),
            );
            return;
        }
    };
    let offered: Vec<Vec<u8>> = start
        .client_hello()
        .alpn()
        .map(|a| a.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    if let Some(door) = ctx
        .side_doors
        .iter()
        .find(|d| !offered.contains(&ALPN.to_vec()) && offered.contains(&d.alpn))
    {
        (door.serve)(start, remote).await;
        return;
    }
    let handshake_started = std::time::Instant::now();
    let handshake = tokio::time::timeout_at(deadline, start.into_stream(tunnel_tls));
    let tls = match handshake.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            if let Some(reason) = tcp_failure_reason(&e) {
                count_handshake_failure(reason, &format!("tcp {remote}: {e}"));
            }
            return;
        }
        Err(_) => {
            count_idle_timeout(IdleIn::TunnelTcp);
            count_handshake_failure(
                HandshakeFailure::Timeout,
                &format!("tcp {remote}: TLS handshake timed out"),
            );
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN) {
        count_handshake_failure(
            HandshakeFailure::AlpnMismatch,
            &format!("tcp {remote}: no tether ALPN"),
        );
        return;
    }
    let Some(peer) = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(agent_of)
    else {
        return;
    };
    let handshake_took = handshake_started.elapsed();
    let admitted = ctx.admit_session(&peer.0, remote);
    let link = match H2Link::client(tls, remote).await {
        Ok(l) => {
            l.set_handshake_rtt(handshake_took);
            l
        }
        Err(e) => {
            tracing::debug!(%remote, error = %e, "HTTP/2 handshake with an agent failed");
            return;
        }
    };
    // Over HTTP/2 the gateway opens the control stream (the agent is the HTTP/2 server).
    let (mut send, recv) = match link.open().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "opening the control stream failed");
            return;
        }
    };
    let permit = match admitted {
        Ok(p) => p,
        Err(why) => {
            // No CONNECTION_CLOSE over TCP: the refusal travels as the session's Close frame.
            let code = ErrorCode::TOO_MANY_SESSIONS;
            let close = Message::Close(Close {
                code: code.0,
                reason: why.clone(),
                retry_after_ms: 0,
            });
            let refuse = async {
                if send_msg(&mut send, &close).await.is_ok() {
                    let _ = send.finish();
                }
                link.close(code, why.as_bytes());
                link.linger().await;
            };
            let _ = tokio::time::timeout(ctx.session.handshake_timeout, refuse).await;
            return;
        }
    };
    drive_session(link, send, recv, peer, remote, ctx, permit).await;
}

fn peer_agent(conn: &quinn::Connection) -> Option<(tunnel_proto::AgentId, CertFacts)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    agent_of(certs.first()?)
}

/// The agent identity and revocation facts of a leaf the verifier accepted.
fn agent_of(
    cert: &rustls_pki_types::CertificateDer<'_>,
) -> Option<(tunnel_proto::AgentId, CertFacts)> {
    match tls::spiffe_id(cert) {
        Ok(SpiffeId::Agent { id, .. }) => Some((id, CertFacts::of(cert).ok()?)),
        _ => None,
    }
}
