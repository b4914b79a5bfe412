//! Session layer: one agent session, whatever its transport, on the shared control-stream
//! driver (`tether_runtime::driver`).
//!
//! The shared driver owns the control stream: it feeds bytes and time into the sans-IO
//! `tunnel_proto::GatewaySession`, writes what the session wants written, sleeps until the
//! earliest deadline (no tick), and closes the connection with the session's close code when it
//! ends. A control-stream read or write error ends the session and its connection at once, as
//! on the agent: a session that cannot carry heartbeats and their answers is not alive, and
//! keeping it registered would route streams to it until the heartbeat timeout. What only the
//! gateway does is its [`GatewaySide`]: registering the session when `Hello` is accepted,
//! answering renewals, the registry's orders (`GoAway`, `Close`), shutdown, and the end-to-end
//! probe ([`super::probe`]), whose timer is the side's deadline and whose answer is one of its
//! wake-ups. A bad peer ends only its own connection.
//!
//! The session is decided on once its `Hello` is read (`hold_hello`): the tunnel's
//! [`Balance`](super::balance::Balance) welcomes it or turns it away with `BUSY` and a
//! retry-after, before anything of it is registered. An agent that leaves the session (its
//! `GoAway`) gets no new stream on it; the session is closed (`REPLACED`) as soon as the
//! relayed streams on it are done, and is no longer probed meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_runtime::driver::{self, SessionEnd, Side};
use tether_runtime::stream::StreamError;
use tether_runtime::transport::{Link, RecvStream, SendStream, Transport};
use tunnel_proto::session::{GatewayEvent, GatewaySession};
use tunnel_proto::{AgentId, ErrorCode};

use crate::tunnel::balance::Verdict;

use crate::tls::CertFacts;
use crate::tunnel::TunnelContext;
use crate::tunnel::admission::SessionPermit;
use crate::tunnel::probe::Probe;
use crate::tunnel::registry::{SessionCommand, SessionInfo};

/// Runs one session until its connection ends; `_permit` counts the connection against its
/// agent until then.
pub(crate) async fn drive_session(
    link: Link,
    send: SendStream,
    recv: RecvStream,
    (agent, cert): (AgentId, CertFacts),
    remote: SocketAddr,
    ctx: Arc<TunnelContext>,
    _permit: SessionPermit,
) {
    let mut cfg = ctx.session.clone();
    cfg.session_id = ctx.next_session_id();
    cfg.replica_id = ctx.balance.replica_id().to_owned();
    cfg.live_replicas = ctx.balance.live_replicas();
    let session_id = cfg.session_id.clone();
    let mut session = GatewaySession::new(cfg, Instant::now());
    let transport = link.transport();
    let mut side = GatewaySide {
        ctx: &ctx,
        link: &link,
        agent: &agent,
        cert: &cert,
        remote,
        session_id: &session_id,
        transport,
        // The end-to-end probe runs inside this session's task (one task and one timer per
        // session, which matters at 10,000 mostly idle sessions; see docs/PERFORMANCE.md).
        probe: Probe::new(ctx.probe, ctx.session.heartbeat_interval),
        registered: None,
    };
    let end = driver::drive(&mut session, &mut side, &link, (send, recv)).await;
    let close_reason = match &end {
        SessionEnd::Closed(info) => {
            metrics::counter!("tether_gateway_session_closes_total", "code" => info.code.name())
                .increment(1);
            format!("{}: {}", info.code, info.reason)
        }
        SessionEnd::Transport(StreamError::Closed { code, reason }) => {
            format!("closed by agent: {code} {reason}")
        }
        SessionEnd::Transport(e) => e.to_string(),
        _ => format!("{end:?}"),
    };
    if let Some(info) = side.registered {
        tracing::info!(%agent, session = %session_id, %transport, reason = %close_reason, "agent disconnected");
        ctx.registry.unregister(&info, close_reason);
    } else {
        tracing::info!(%agent, %remote, reason = %close_reason, "agent session ended before Hello");
    }
}

/// What the gateway adds to the shared driver for one session.
struct GatewaySide<'a> {
    ctx: &'a TunnelContext,
    link: &'a Link,
    agent: &'a AgentId,
    cert: &'a CertFacts,
    remote: SocketAddr,
    session_id: &'a str,
    transport: Transport,
    probe: Probe,
    /// The session in the registry, once `Hello` is accepted.
    registered: Option<Arc<SessionInfo>>,
}

/// What woke the gateway's side.
enum Wake {
    /// The registry's order.
    Order(SessionCommand),
    /// The probe in flight has its outcome.
    Probe(Result<(), String>),
    /// The agent left the session and no relayed stream is open on it any more.
    LeftIdle,
    /// The gateway is shutting down.
    Shutdown,
}

impl GatewaySide<'_> {
    /// The agent's `Hello` arrived: welcome the session or turn it away.
    fn decide(&mut self, session: &mut GatewaySession, hello: &tunnel_proto::message::Hello) {
        if let Some(reason) = self.ctx.min_version.refusal(&hello.agent_version) {
            metrics::counter!("tether_gateway_sessions_turned_away_total",
                "reason" => "upgrade_required")
            .increment(1);
            tracing::warn!(agent = %self.agent, remote = %self.remote,
                agent_version = %hello.agent_version, "refusing an agent older than agents.min_version");
            // Dialing again helps only after an upgrade: the agent waits its longest backoff.
            session.refuse(
                ErrorCode::UPGRADE_REQUIRED,
                &reason,
                Duration::from_secs(300),
            );
            return;
        }
        let local = self.ctx.registry.session_count();
        match self.ctx.balance.decide(hello, local, Instant::now()) {
            Verdict::Welcome => session.welcome(),
            Verdict::Refuse {
                why,
                reason,
                retry_after,
            } => {
                metrics::counter!("tether_gateway_sessions_turned_away_total",
                    "reason" => why.as_str())
                .increment(1);
                tracing::debug!(agent = %self.agent, remote = %self.remote, reason = %reason,
                    ?retry_after, "turning a session away");
                session.refuse(ErrorCode::BUSY, &reason, retry_after);
            }
        }
    }

    /// The agent left the session: nothing new goes on it, and it closes once its relayed
    /// streams are done.
    fn left(&mut self, session: &mut GatewaySession, reason: &str) {
        self.probe.stop();
        let Some(info) = &self.registered else {
            return;
        };
        info.mark_left();
        tracing::info!(agent = %self.agent, session = %self.session_id, %reason,
            relayed = info.relayed_streams(), "the agent is leaving this session");
        if info.relayed_streams() == 0 {
            self.close_left(session);
        }
    }

    fn close_left(&mut self, session: &mut GatewaySession) {
        if let Some(info) = &self.registered {
            // Before the close: a stream that raced it must see why it failed.
            info.mark_closed_after_leave();
        }
        session.close(
            ErrorCode::REPLACED,
            "the agent left this session and its streams are done",
        );
    }

    fn established(
        &mut self,
        session: &mut GatewaySession,
        (hello, version): (tunnel_proto::message::Hello, u32),
        now: Instant,
    ) {
        let (agent, transport) = (self.agent, self.transport);
        // With one gateway address, an agent keeps at most one session per live replica.
        let wanted = match hello.gateway_addresses {
            0 | 1 => hello
                .sessions_wanted
                .min(self.ctx.balance.live_replicas().max(1)),
            _ => hello.sessions_wanted,
        };
        let mut info = SessionInfo::new(
            self.session_id.to_owned(),
            agent.clone(),
            self.remote,
            self.link.clone(),
            (hello, version),
            self.cert,
        );
        info.sessions_wanted = wanted;
        let info = self.ctx.registry.register(info);
        tracing::info!(%agent, session = %self.session_id, remote = %self.remote, %transport,
            agent_version = %info.hello.agent_version, "agent connected");
        metrics::counter!("tether_gateway_sessions_total", "transport" => transport.name())
            .increment(1);
        self.probe.start(now);
        self.registered = Some(info);
        // A revocation that landed between the handshake and the registration missed this
        // session: catch it here.
        if let Some(why) = self.ctx.revocations.refusal(agent, self.cert) {
            tracing::warn!(%agent, session = %self.session_id, reason = %why,
                "closing a session of a revoked certificate");
            session.close(ErrorCode::REVOKED, "agent revoked");
        }
    }
}

impl Side<GatewaySession> for GatewaySide<'_> {
    type Wake = Wake;

    fn on_event(&mut self, session: &mut GatewaySession, event: GatewayEvent, now: Instant) {
        match event {
            GatewayEvent::Hello { hello, .. } => self.decide(session, &hello),
            GatewayEvent::Established { hello, version } => {
                self.established(session, (hello, version), now);
            }
            GatewayEvent::Left { reason } => self.left(session, &reason),
            GatewayEvent::Heartbeat {
                rtt,
                pause,
                services,
            } => {
                // The next ack tells the agent of replicas that came or went.
                session.set_live_replicas(self.ctx.balance.live_replicas());
                if let Some(s) = &self.registered {
                    let mut changed = s.set_pause(pause);
                    if let Some(services) = services {
                        s.set_services(services);
                        changed = true;
                    }
                    if changed {
                        // Other replicas show it too (a presence update: only on a change,
                        // never per heartbeat).
                        self.ctx.registry.session_changed(s);
                    }
                }
                if let Some(rtt) = rtt {
                    if let Some(s) = &self.registered {
                        s.set_rtt(rtt);
                    }
                    metrics::histogram!("tether_gateway_heartbeat_rtt_seconds")
                        .record(rtt.as_secs_f64());
                }
                self.probe.on_heartbeat(self.link, now);
            }
            // Signing takes well under a millisecond: answered here, in order.
            GatewayEvent::RenewRequested(req) => {
                if let Some(renewal) = &self.ctx.renewal {
                    session.renew_response(renewal.renew(self.agent, self.cert, &req));
                }
            }
            // The driver ends the session; `drive_session` reads how from its `SessionEnd`.
            GatewayEvent::Closed(_) => {}
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.probe.deadline()
    }

    fn handle_timeout(&mut self, _: &mut GatewaySession, now: Instant) {
        self.probe.on_timer(self.link, now);
    }

    async fn wake(&mut self) -> Wake {
        let registered = self.registered.as_ref();
        let order = async move {
            match registered {
                Some(s) => s.next_order().await,
                None => std::future::pending().await,
            }
        };
        let left = self.registered.as_ref().filter(|s| s.has_left());
        let left_idle = async move {
            match left {
                Some(s) => s.relay_idle().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            order = order => Wake::Order(order),
            outcome = self.probe.answer() => Wake::Probe(outcome),
            () = left_idle => Wake::LeftIdle,
            () = self.ctx.shutdown.cancelled() => Wake::Shutdown,
        }
    }

    fn on_wake(&mut self, session: &mut GatewaySession, wake: Wake, _: Instant) {
        match wake {
            Wake::Order(SessionCommand::GoAway(go_away)) => session.send_go_away(go_away),
            Wake::LeftIdle => self.close_left(session),
            Wake::Order(SessionCommand::Close(code, reason)) => session.close(code, &reason),
            Wake::Probe(Ok(())) => {}
            Wake::Probe(Err(why)) => {
                let (agent, transport) = (self.agent, self.transport);
                metrics::counter!("tether_gateway_probe_failures_total",
                    "transport" => transport.name())
                .increment(1);
                tracing::warn!(%agent, session = %self.session_id, remote = %self.remote,
                    %transport, reason = %why, "end-to-end probe failed; closing the session");
                session.close(ErrorCode::UNRESPONSIVE, "end-to-end probe failed");
            }
            Wake::Shutdown => session.close(ErrorCode::SHUTDOWN, "gateway shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {

    use tether_runtime::CancellationToken;
    use tokio::sync::broadcast::error::RecvError;
    use tunnel_proto::Message;
    use tunnel_proto::message::{Heartbeat, Hello};

    use super::*;
    use crate::config::GatewayConfig;
    use crate::tunnel::registry::{Registry, RegistryEvent};
    use crate::tunnel::test_support::quic_pair;

    const T: Duration = Duration::from_secs(20);

    /// The gateway's half of the shared driver's rule: a control stream the gateway can no
    /// longer write ends the session (unregistered, its connection closed) while the agent's
    /// heartbeats still arrive, instead of staying registered with its answers lost.
    #[tokio::test]
    async fn a_session_whose_control_stream_cannot_be_written_is_unregistered_at_once() {
        let cfg: GatewayConfig = toml::from_str(
            "trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [tunnel]\nheartbeat_interval = \"10s\"\nprobe_interval = \"1h\"\n",
        )
        .expect("config");
        let registry = Arc::new(Registry::default());
        let mut feed = registry.feed();
        let ctx = Arc::new(TunnelContext::new(
            &cfg,
            registry.clone(),
            CancellationToken::new(),
        ));
        let (agent_conn, gateway_link, _endpoints) = quic_pair().await;
        let agent = AgentId::new("t1", "a1").expect("agent id");
        let permit = ctx.sessions.acquire(&agent).expect("permit");
        let facts = CertFacts {
            fingerprint: "00".into(),
            serial: "01".into(),
            not_before: 0,
            not_after: i64::MAX,
        };
        let remote = SocketAddr::from(([127, 0, 0, 1], 0));
        let gateway = tokio::spawn(async move {
            let (send, recv) = gateway_link.accept().await.expect("control stream");
            drive_session(
                gateway_link,
                send,
                recv,
                (agent, facts),
                remote,
                ctx,
                permit,
            )
            .await;
        });

        // A hand-driven agent: Hello, then it stops reading but keeps its heartbeats coming.
        let (mut send, mut recv) = agent_conn.open_bi().await.expect("control stream");
        let hello = Hello {
            versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
            agent_version: "test".into(),
            ..Default::default()
        };
        send.write_all(&Message::Hello(hello).to_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(T, recv.read(&mut buf))
            .await
            .expect("Welcome in time")
            .unwrap();
        assert!(n.is_some_and(|n| n > 0), "Welcome");
        match tokio::time::timeout(T, feed.recv())
            .await
            .expect("registered")
        {
            Ok(RegistryEvent::Connected(_)) => {}
            other => panic!("{other:?}"),
        }
        recv.stop(7u32.into()).unwrap();
        let heartbeats = async {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                let beat = Message::Heartbeat(Heartbeat::default()).to_bytes();
                if send.write_all(&beat).await.is_err() {
                    return std::future::pending::<()>().await;
                }
            }
        };
        let disconnected = tokio::select! {
            e = feed.recv() => e,
            () = heartbeats => unreachable!(),
            () = tokio::time::sleep(T) => Err(RecvError::Closed),
        };
        match disconnected {
            Ok(RegistryEvent::Disconnected { reason, .. }) => {
                assert!(reason.contains("reset the stream"), "{reason}");
            }
            other => panic!("the session stayed registered: {other:?}"),
        }
        match tokio::time::timeout(T, agent_conn.closed())
            .await
            .expect("the gateway closes the connection")
        {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    u64::from(c.error_code),
                    u64::from(ErrorCode::PROTOCOL_ERROR.0)
                );
            }
            other => panic!("{other:?}"),
        }
        tokio::time::timeout(T, gateway)
            .await
            .expect("the driver returns")
            .unwrap();
        assert_eq!(registry.session_count(), 0);
    }
}
