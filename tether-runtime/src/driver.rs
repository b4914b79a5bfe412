//! Session layer: the one driver of a control stream, for either side's sans-IO machine
//! ([`tunnel_proto::Session`]: the agent's and the gateway's).
//!
//! The driver writes what the machine wants written, reads with `read_chunk` (the transport's
//! own buffer: no read buffer per session), feeds it the time, and sleeps until the earliest
//! deadline of the machine ([`Session::poll_timeout`]) and of the side ([`Side::poll_timeout`]):
//! no fixed tick, so an idle session wakes only when a heartbeat is due. What only one side does
//! (the agent's renewal orders, drain and wedged-session check; the gateway's registry orders
//! and end-to-end probe) comes in through [`Side`]: its events, its deadline and one wake-up
//! future, which is a plain `impl Future` (not boxed) polled in the driver's own `select!`.
//!
//! How a session ends, the same on both sides:
//! - **closed by this side** (the machine decided: a timeout, a protocol error, or the side
//!   called `close`): the queued `Close` frame is flushed (at most [`CLOSE_FLUSH`]), the stream
//!   finished, the connection closed with the session's code and reason, and the driver lingers
//!   until it is gone ([`Link::linger`]), so the peer reads `Close` before any reset;
//! - **closed by the peer** (its `Close` frame, or the end of its stream): the connection is
//!   closed with `NO_ERROR`; the peer's code is in the returned [`SessionEnd`];
//! - **the control stream failed** (a read or a write error): the session ends at once, on both
//!   sides. A session whose control stream cannot carry heartbeats and their answers is not
//!   alive, whichever half failed, and waiting for the heartbeat timeout would only keep a dead
//!   session registered (the gateway) or a dead connection dialed (the agent). The connection
//!   is closed with `PROTOCOL_ERROR` (`INTERNAL` when this side misused the stream); when it is
//!   gone already that is a no-op.

use std::future::Future;
use std::time::{Duration, Instant};

use tunnel_proto::session::CloseInfo;
use tunnel_proto::{ErrorCode, Session};

use crate::stream::StreamError;
use crate::transport::{Link, RecvStream, SendStream};

/// Most bytes of the control stream taken at once. Control messages are a few dozen bytes.
pub const CONTROL_READ_MAX: usize = 16 * 1024;

/// How long a session closed by this side keeps writing its queued `Close` frame.
pub const CLOSE_FLUSH: Duration = Duration::from_millis(250);

/// What one side adds to the driver's loop. Every call gets the machine, so the side can act on
/// it (`close`, `renew`, `go_away`, ...) with calls only its side has.
pub trait Side<S: Session> {
    /// What [`Side::wake`] resolves with.
    type Wake;

    /// One event of the machine, `Closed` included (the driver ends the session once the
    /// machine is closed and every event is handled). `now` is when the batch was taken.
    fn on_event(&mut self, session: &mut S, event: S::Event, now: Instant);

    /// The side's own next deadline, if it has one.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// [`Side::poll_timeout`] has passed.
    fn handle_timeout(&mut self, _session: &mut S, _now: Instant) {}

    /// Resolves with the side's next wake-up (an order, an outcome); stays pending while there
    /// is nothing to wait for. Dropped and called again on every turn of the loop: it must be
    /// cancel-safe (a channel's `recv`, a future the side keeps and polls by reference).
    fn wake(&mut self) -> impl Future<Output = Self::Wake> + Send;

    /// [`Side::wake`] resolved.
    fn on_wake(&mut self, session: &mut S, wake: Self::Wake, now: Instant);
}

/// How a driven session ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The machine closed: by this side or the peer ([`CloseInfo::by_peer`]), with its code.
    Closed(CloseInfo),
    /// The control stream or its connection failed first.
    Transport(StreamError),
}

impl SessionEnd {
    /// The close code the peer ended the session with: in its `Close` frame, or as the
    /// application close of the connection.
    pub fn peer_code(&self) -> Option<ErrorCode> {
        match self {
            SessionEnd::Closed(info) if info.by_peer => Some(info.code),
            SessionEnd::Closed(_) => None,
            SessionEnd::Transport(e) => e.close_code(),
        }
    }
}

/// Runs `session` on `control` (a stream of `link`) until it ends; see the module docs. On
/// return the connection is closed or closing.
pub async fn drive<S, H>(
    session: &mut S,
    side: &mut H,
    link: &Link,
    (mut send, mut recv): (SendStream, RecvStream),
) -> SessionEnd
where
    S: Session,
    H: Side<S>,
{
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    // The deadline `sleep` is set to; `None`: no deadline, the branch is off.
    let mut armed: Option<Instant> = None;
    loop {
        // Events first: what a side does on one (a `Welcome` after a decision, a renewal's
        // answer) is written in this same turn, not at the next wake-up.
        let now = Instant::now();
        while let Some(event) = session.poll_event() {
            side.on_event(session, event, now);
        }
        while let Some(bytes) = session.poll_transmit() {
            if let Err(e) = send.write_all(&bytes).await {
                return failed(link, e);
            }
        }
        if let Some(info) = session.close_info() {
            let info = info.clone();
            close(session, &mut send, link, &info).await;
            return SessionEnd::Closed(info);
        }
        let deadline = match (session.poll_timeout(), side.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if deadline != armed {
            if let Some(at) = deadline {
                sleep.as_mut().reset(at.into());
            }
            armed = deadline;
        }
        tokio::select! {
            r = recv.read_chunk(CONTROL_READ_MAX) => match r {
                Ok(Some(bytes)) => session.handle_input(&bytes, Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(e) => return failed(link, e),
            },
            () = &mut sleep, if armed.is_some() => {
                armed = None;
                let now = Instant::now();
                if session.poll_timeout().is_some_and(|t| t <= now) {
                    session.handle_timeout(now);
                }
                if side.poll_timeout().is_some_and(|t| t <= now) {
                    side.handle_timeout(session, now);
                }
            }
            wake = side.wake() => side.on_wake(session, wake, Instant::now()),
        }
    }
}

/// Closes the connection under a session that has closed; see the module docs.
async fn close<S: Session>(session: &mut S, send: &mut SendStream, link: &Link, info: &CloseInfo) {
    if info.by_peer {
        // The peer closes the connection itself; ours only agrees.
        link.close(ErrorCode::NO_ERROR, b"");
        return;
    }
    // A close decided while handling events (a revoked certificate, an order) has its `Close`
    // frame still queued.
    let flush = async {
        while let Some(bytes) = session.poll_transmit() {
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_FLUSH, flush).await;
    // Let the Close frame go out before the connection close discards it: over QUIC a close
    // drops stream data not yet acknowledged, so wait (briefly) for the peer's acknowledgement
    // of the finished stream. The peer's `Close` carries what it must act on (a gateway's
    // retry-after).
    if send.finish().is_ok() && matches!(link, Link::Quic(_)) {
        let _ = tokio::time::timeout(CLOSE_FLUSH, send.stopped()).await;
    }
    link.close(info.code, info.reason.as_bytes());
    link.linger().await;
}

/// The control stream failed: the session is over; see the module docs.
fn failed(link: &Link, e: StreamError) -> SessionEnd {
    let code = match e {
        StreamError::Unusable { .. } => ErrorCode::INTERNAL,
        _ => ErrorCode::PROTOCOL_ERROR,
    };
    link.close(code, b"control stream failed");
    SessionEnd::Transport(e)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;
    use tunnel_proto::message::{Heartbeat, Hello, Message};
    use tunnel_proto::session::{
        AgentEvent, AgentSession, AgentSessionConfig, GatewayEvent, GatewaySession,
        GatewaySessionConfig,
    };

    use super::*;

    const T: Duration = Duration::from_secs(20);

    /// A real QUIC connection on loopback: (the dialing end, the accepting end). The endpoints
    /// are returned so they outlive the test.
    async fn quic_pair() -> (Link, Link, [quinn::Endpoint; 2]) {
        crate::tls::install_crypto_provider();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let server = quinn::ServerConfig::with_single_cert(vec![der.clone()], key).expect("tls");
        let server = quinn::Endpoint::server(server, ([127, 0, 0, 1], 0).into()).expect("server");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
        ));
        let mut client = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("client");
        client.set_default_client_config(client_cfg);
        let addr = server.local_addr().expect("addr");
        let (dialed, accepted) = tokio::join!(
            async {
                client
                    .connect(addr, "localhost")
                    .unwrap()
                    .await
                    .expect("connect")
            },
            async {
                server
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("accept")
            },
        );
        (Link::Quic(dialed), Link::Quic(accepted), [client, server])
    }

    fn hello() -> Hello {
        Hello {
            versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
            agent_version: "test".into(),
            ..Default::default()
        }
    }

    /// The agent's side in these tests: reports heartbeat round trips, and closes nothing.
    struct AgentSide {
        rtts: mpsc::UnboundedSender<Duration>,
        /// A deadline of the side's own, and whether it fired.
        deadline: Option<Instant>,
        fired: bool,
    }

    impl Side<AgentSession> for AgentSide {
        type Wake = ();
        fn on_event(&mut self, _: &mut AgentSession, event: AgentEvent, _: Instant) {
            if let AgentEvent::Rtt(rtt) = event {
                let _ = self.rtts.send(rtt);
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.deadline
        }
        fn handle_timeout(&mut self, _: &mut AgentSession, _: Instant) {
            self.deadline = None;
            self.fired = true;
        }
        async fn wake(&mut self) {
            std::future::pending().await
        }
        fn on_wake(&mut self, _: &mut AgentSession, (): (), _: Instant) {}
    }

    /// The gateway's side in these tests: closes the session when ordered to, or at once when
    /// established if `close_on_hello` is set (as the gateway does for a certificate revoked
    /// between handshake and registration).
    struct GatewaySide {
        orders: mpsc::UnboundedReceiver<(ErrorCode, &'static str)>,
        close_on_hello: Option<ErrorCode>,
    }

    impl Side<GatewaySession> for GatewaySide {
        type Wake = Option<(ErrorCode, &'static str)>;
        fn on_event(&mut self, session: &mut GatewaySession, event: GatewayEvent, _: Instant) {
            if let (GatewayEvent::Established { .. }, Some(code)) = (&event, self.close_on_hello) {
                session.close(code, "closed on hello");
            }
        }
        async fn wake(&mut self) -> Self::Wake {
            self.orders.recv().await
        }
        fn on_wake(&mut self, session: &mut GatewaySession, order: Self::Wake, _: Instant) {
            if let Some((code, why)) = order {
                session.close(code, why);
            }
        }
    }

    fn gateway_session(heartbeat: Duration) -> GatewaySession {
        let mut cfg = GatewaySessionConfig::new("s1".into());
        cfg.heartbeat_interval = heartbeat;
        GatewaySession::new(cfg, Instant::now())
    }

    #[tokio::test]
    async fn one_driver_runs_both_sides_heartbeats_flow_and_an_order_closes_the_session() {
        let (agent_link, gateway_link, _endpoints) = quic_pair().await;
        let (rtt_tx, mut rtts) = mpsc::unbounded_channel();
        let (order_tx, orders) = mpsc::unbounded_channel();
        let agent = tokio::spawn(async move {
            let control = agent_link.open().await.expect("control stream");
            let mut side = AgentSide {
                rtts: rtt_tx,
                deadline: Some(Instant::now() + Duration::from_millis(50)),
                fired: false,
            };
            let mut session = AgentSession::new(AgentSessionConfig::new(hello()), Instant::now());
            let end = drive(&mut session, &mut side, &agent_link, control).await;
            (end, side.fired)
        });
        let gateway = tokio::spawn(async move {
            let control = gateway_link.accept().await.expect("control stream");
            let mut side = GatewaySide {
                orders,
                close_on_hello: None,
            };
            let mut session = gateway_session(Duration::from_millis(20));
            drive(&mut session, &mut side, &gateway_link, control).await
        });
        // Heartbeats go out at the interval the gateway announced, and their answers come back.
        for _ in 0..3 {
            tokio::time::timeout(T, rtts.recv())
                .await
                .expect("a heartbeat round trip")
                .expect("the agent's driver runs");
        }
        order_tx
            .send((ErrorCode::SHUTDOWN, "gateway shutting down"))
            .unwrap();
        let gateway_end = tokio::time::timeout(T, gateway).await.unwrap().unwrap();
        let (agent_end, fired) = tokio::time::timeout(T, agent).await.unwrap().unwrap();
        match gateway_end {
            SessionEnd::Closed(info) => {
                assert_eq!(info.code, ErrorCode::SHUTDOWN);
                assert!(!info.by_peer);
            }
            other => panic!("{other:?}"),
        }
        // The code and reason reach the agent in the `Close` frame or, when the connection
        // close overtakes it (QUIC drops unsent stream data on close), in that.
        assert_eq!(
            peer_reason(&agent_end),
            Some("gateway shutting down"),
            "{agent_end:?}"
        );
        assert_eq!(agent_end.peer_code(), Some(ErrorCode::SHUTDOWN));
        assert!(fired, "the side's own deadline reached it");
    }

    /// What the peer said when it ended the session, however it reached us.
    fn peer_reason(end: &SessionEnd) -> Option<&str> {
        match end {
            SessionEnd::Closed(info) if info.by_peer => Some(&info.reason),
            SessionEnd::Transport(StreamError::Closed { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_close_decided_while_handling_an_event_reaches_the_peer_with_its_code() {
        let (agent_link, gateway_link, _endpoints) = quic_pair().await;
        let (rtt_tx, _rtts) = mpsc::unbounded_channel();
        let (_order_tx, orders) = mpsc::unbounded_channel();
        let gateway = tokio::spawn(async move {
            let control = gateway_link.accept().await.expect("control stream");
            let mut side = GatewaySide {
                orders,
                close_on_hello: Some(ErrorCode::REVOKED),
            };
            let mut session = gateway_session(Duration::from_secs(10));
            drive(&mut session, &mut side, &gateway_link, control).await
        });
        let control = agent_link.open().await.expect("control stream");
        let mut side = AgentSide {
            rtts: rtt_tx,
            deadline: None,
            fired: false,
        };
        let mut session = AgentSession::new(AgentSessionConfig::new(hello()), Instant::now());
        let end = tokio::time::timeout(T, drive(&mut session, &mut side, &agent_link, control))
            .await
            .expect("the session ends");
        assert_eq!(end.peer_code(), Some(ErrorCode::REVOKED), "{end:?}");
        assert_eq!(peer_reason(&end), Some("closed on hello"), "{end:?}");
        let gateway_end = tokio::time::timeout(T, gateway).await.unwrap().unwrap();
        assert!(
            matches!(&gateway_end, SessionEnd::Closed(i) if i.code == ErrorCode::REVOKED && !i.by_peer),
            "{gateway_end:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_the_control_stream_ends_the_session_and_the_connection() {
        let (agent_link, gateway_link, _endpoints) = quic_pair().await;
        let (_order_tx, orders) = mpsc::unbounded_channel();
        let gateway = tokio::spawn(async move {
            let control = gateway_link.accept().await.expect("control stream");
            let mut side = GatewaySide {
                orders,
                close_on_hello: None,
            };
            let mut session = gateway_session(Duration::from_secs(10));
            drive(&mut session, &mut side, &gateway_link, control).await
        });
        // A hand-driven agent: Hello, then it stops reading and sends a heartbeat, whose answer
        // the gateway cannot write.
        let Link::Quic(conn) = &agent_link else {
            unreachable!()
        };
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        send.write_all(&Message::Hello(hello()).to_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(T, recv.read(&mut buf))
            .await
            .expect("Welcome in time")
            .unwrap();
        assert!(n.is_some_and(|n| n > 0), "Welcome");
        recv.stop(7u32.into()).unwrap();
        send.write_all(&Message::Heartbeat(Heartbeat::default()).to_bytes())
            .await
            .unwrap();
        let end = tokio::time::timeout(T, gateway).await.unwrap().unwrap();
        assert!(
            matches!(end, SessionEnd::Transport(StreamError::Reset(ErrorCode(7)))),
            "{end:?}"
        );
        // The connection is closed too, not left to the idle timeout.
        let closed = tokio::time::timeout(T, conn.closed())
            .await
            .expect("the gateway closes the connection");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    u64::from(c.error_code),
                    u64::from(ErrorCode::PROTOCOL_ERROR.0)
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
