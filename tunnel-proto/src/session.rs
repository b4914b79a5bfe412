//! The control-stream state machines: [`AgentSession`] (dialing side) and [`GatewaySession`].
//!
//! Both are sans-IO. Feed received bytes with `handle_input`, the end of the stream with
//! `handle_eof`, and the passing of time with `handle_timeout`; then drain `poll_transmit`
//! (bytes to write on the control stream), `poll_event` (what happened) and ask `poll_timeout`
//! when to call again. A session never panics on peer input: bad input closes it with a code.
//!
//! Liveness: the agent sends a `Heartbeat` every interval the gateway chose in `Welcome`; the
//! gateway answers each with `HeartbeatAck`, from which the agent measures RTT (and reports the
//! last value in its next heartbeat). Either side closes the session with `HEARTBEAT_TIMEOUT`
//! when it has heard nothing from its peer for `dead_after` intervals.
//!
//! Leaving (both sides list `leave`, [`crate::message::LEAVE`]): the agent sends `GoAway` on
//! the control stream when a newer session took over ([`AgentSession::leave`]); the gateway
//! session reports it once as [`GatewayEvent::Left`] and its IO stops opening streams on the
//! session and closes it once the streams it carries are done. A `GoAway` from an agent to a
//! gateway that does not offer `leave` is a protocol error, as it always was.
//!
//! Admission: a gateway that decides on a session only once it has read the agent's `Hello`
//! (its balance and handshake budget) sets [`GatewaySessionConfig::hold_hello`]; the session
//! then reports [`GatewayEvent::Hello`] and waits for [`GatewaySession::welcome`] or
//! [`GatewaySession::refuse`] (a `Close` frame with a retry-after).
//!
//! Renewal: a gateway that lists `renew` in `Welcome.capabilities` takes `RenewRequest`s (a CSR)
//! and answers each with a `RenewResponse` of the same id. The agent sends one at a time and only
//! to such a gateway ([`AgentSession::renew`]); the gateway session hands a request out as
//! [`GatewayEvent::RenewRequested`] and answers itself, without handing it out, one sooner than
//! `renew_min_interval` after the previous (`RESOURCE_EXHAUSTED`) or when it does not renew
//! (`UNIMPLEMENTED`). A response to nothing asked is a protocol error.
//!
//! [`Session`] is the face both sides share, so that one IO driver (in `tether-runtime`) runs
//! either: it is the calls above and nothing more.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::SUPPORTED_VERSIONS;
use crate::error::{ErrorCode, ProtoError};
use crate::frame::{FrameDecoder, Limits};
use crate::message::{
    Close, GoAway, Heartbeat, HeartbeatAck, Hello, LEAVE, Message, RENEW, RenewRequest,
    RenewResponse, ServiceEntry, Welcome,
};

/// gRPC `RESOURCE_EXHAUSTED`, in a [`RenewResponse`] the session answers itself.
const RESOURCE_EXHAUSTED: i32 = 8;
/// gRPC `UNIMPLEMENTED`.
const UNIMPLEMENTED: i32 = 12;

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: String,
    /// True when the peer closed (sent `Close` or finished the stream), false when we did.
    pub by_peer: bool,
    /// When the peer's `Close` said when to come back (a gateway turning a session away,
    /// [`ErrorCode::BUSY`]).
    pub retry_after: Option<Duration>,
}

// === Session ===

/// What a driver needs from either side's machine: the sans-IO calls both share. The side's
/// own calls (`renew`, `go_away`, ...) stay inherent; a driver hands the machine back to the
/// side's code for those.
pub trait Session {
    /// What this side reports ([`AgentEvent`] or [`GatewayEvent`]).
    type Event;

    /// Bytes read from the control stream.
    fn handle_input(&mut self, data: &[u8], now: Instant);
    /// The peer finished the control stream.
    fn handle_eof(&mut self, now: Instant);
    /// Call when [`Session::poll_timeout`] has passed.
    fn handle_timeout(&mut self, now: Instant);
    /// Bytes to write on the control stream.
    fn poll_transmit(&mut self) -> Option<Bytes>;
    /// The next event, if any.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// When to call [`Session::handle_timeout`] next; `None` once closed.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Closes the session from this side; a `Close` frame is queued.
    fn close(&mut self, code: ErrorCode, reason: &str);
    /// How the session ended, once it has (by either side).
    fn close_info(&self) -> Option<&CloseInfo>;
}

/// Implements [`Session`] by the inherent methods of the same names.
macro_rules! session_by_inherent {
    ($ty:ty, $event:ty) => {
        impl Session for $ty {
            type Event = $event;
            fn handle_input(&mut self, data: &[u8], now: Instant) {
                <$ty>::handle_input(self, data, now)
            }
            fn handle_eof(&mut self, now: Instant) {
                <$ty>::handle_eof(self, now)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$ty>::handle_timeout(self, now)
            }
            fn poll_transmit(&mut self) -> Option<Bytes> {
                <$ty>::poll_transmit(self)
            }
            fn poll_event(&mut self) -> Option<$event> {
                <$ty>::poll_event(self)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$ty>::poll_timeout(self)
            }
            fn close(&mut self, code: ErrorCode, reason: &str) {
                <$ty>::close(self, code, reason)
            }
            fn close_info(&self) -> Option<&CloseInfo> {
                self.core.closed.as_ref()
            }
        }
    };
}

session_by_inherent!(AgentSession, AgentEvent);
session_by_inherent!(GatewaySession, GatewayEvent);

// === Core ===

/// What both sides share: the decoder, the outgoing buffer and the close state.
#[derive(Debug)]
struct Core {
    decoder: FrameDecoder,
    out: BytesMut,
    closed: Option<CloseInfo>,
    last_heard: Instant,
}

impl Core {
    fn new(max_frame: usize, now: Instant) -> Self {
        Core {
            decoder: FrameDecoder::new(max_frame),
            out: BytesMut::new(),
            closed: None,
            last_heard: now,
        }
    }

    fn send(&mut self, msg: Message) {
        if self.closed.is_none() {
            msg.encode(&mut self.out);
        }
    }

    /// Closes locally: queues a `Close` frame and returns the info to report.
    fn close_local(&mut self, code: ErrorCode, reason: String) -> Option<CloseInfo> {
        self.close_local_after(code, reason, None)
    }

    /// [`Core::close_local`], telling the peer when to come back.
    fn close_local_after(
        &mut self,
        code: ErrorCode,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Option<CloseInfo> {
        if self.closed.is_some() {
            return None;
        }
        self.send(Message::Close(Close {
            code: code.0,
            reason: reason.clone(),
            retry_after_ms: retry_after.map_or(0, |d| d.as_millis().max(1) as u64),
        }));
        let info = CloseInfo {
            code,
            reason,
            by_peer: false,
            retry_after,
        };
        self.closed = Some(info.clone());
        Some(info)
    }

    fn close_by_peer(&mut self, close: Close) -> Option<CloseInfo> {
        if self.closed.is_some() {
            return None;
        }
        let info = CloseInfo {
            code: ErrorCode(close.code),
            reason: close.reason,
            by_peer: true,
            retry_after: (close.retry_after_ms > 0)
                .then(|| Duration::from_millis(close.retry_after_ms)),
        };
        self.closed = Some(info.clone());
        Some(info)
    }

    fn handle_eof(&mut self) -> Option<CloseInfo> {
        match self.decoder.finish() {
            Ok(()) => self.close_by_peer(Close {
                code: ErrorCode::NO_ERROR.0,
                reason: "control stream finished".into(),
                retry_after_ms: 0,
            }),
            Err(e) => self.close_local(e.code(), e.to_string()),
        }
    }

    fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }
}

// === AgentSession ===

/// Settings for the agent side of a session.
#[derive(Clone, Debug)]
pub struct AgentSessionConfig {
    /// The `Hello` to send; its `versions` default to [`SUPPORTED_VERSIONS`] when empty.
    pub hello: Hello,
    /// How long to wait for `Welcome`.
    pub handshake_timeout: Duration,
    /// Heartbeat intervals without hearing from the gateway before giving up.
    pub dead_after: u32,
    /// Largest control frame accepted from the gateway.
    pub max_frame: usize,
}

impl AgentSessionConfig {
    /// Defaults for everything but the `Hello`.
    pub fn new(hello: Hello) -> Self {
        AgentSessionConfig {
            hello,
            handshake_timeout: Duration::from_secs(10),
            dead_after: 3,
            max_frame: Limits::DEFAULT.max_control_frame,
        }
    }
}

/// Something the agent's IO layer must act on or may report.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentEvent {
    /// The gateway accepted the session.
    Established(Welcome),
    /// A heartbeat round trip completed.
    Rtt(Duration),
    /// The gateway asks for a new session elsewhere; keep this one until that one is up.
    GoAway(GoAway),
    /// The gateway's count of live replicas changed (a `HeartbeatAck` said so).
    LiveReplicas(u32),
    /// The gateway answered the [`AgentSession::renew`] request with this id.
    Renewed(RenewResponse),
    /// The session is over; close the connection with this code.
    Closed(CloseInfo),
}

#[derive(Debug)]
enum AgentState {
    AwaitingWelcome {
        deadline: Instant,
    },
    Established {
        interval: Duration,
        next_heartbeat: Instant,
    },
}

/// The agent's side of the control stream.
#[derive(Debug)]
pub struct AgentSession {
    core: Core,
    state: AgentState,
    dead_after: u32,
    events: VecDeque<AgentEvent>,
    seq: u64,
    outstanding: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    /// The gateway listed [`RENEW`] in its `Welcome`.
    gateway_renews: bool,
    /// The id of the renewal awaiting its answer, and the last id used.
    renewing: Option<u64>,
    renew_ids: u64,
    /// The gateway listed [`LEAVE`] in its `Welcome`.
    gateway_leaves: bool,
    /// [`AgentSession::leave`] sent its `GoAway`.
    left: bool,
    /// The gateway's last count of live replicas (0: not said).
    live_replicas: u32,
    /// Paused by the owner, and why ([`AgentSession::set_paused`]).
    pause: Option<String>,
    /// The allow-list the gateway was last told of (`Hello`, then a heartbeat), and whether
    /// the next heartbeat must carry it ([`AgentSession::set_services`]).
    services: Vec<ServiceEntry>,
    services_changed: bool,
}

impl AgentSession {
    /// Starts a session: the `Hello` is queued for transmission at once.
    pub fn new(mut config: AgentSessionConfig, now: Instant) -> Self {
        if config.hello.versions.is_empty() {
            config.hello.versions = SUPPORTED_VERSIONS.to_vec();
        }
        let mut core = Core::new(config.max_frame, now);
        let pause = config
            .hello
            .paused
            .then(|| config.hello.pause_reason.clone());
        let services = config.hello.services.clone();
        core.send(Message::Hello(config.hello));
        AgentSession {
            core,
            state: AgentState::AwaitingWelcome {
                deadline: now + config.handshake_timeout,
            },
            dead_after: config.dead_after.max(1),
            events: VecDeque::new(),
            seq: 0,
            outstanding: None,
            rtt: None,
            gateway_renews: false,
            renewing: None,
            renew_ids: 0,
            gateway_leaves: false,
            left: false,
            live_replicas: 0,
            pause,
            services,
            services_changed: false,
        }
    }

    /// Tells the gateway the agent's allow-list is now `services` (a reload), for display:
    /// in the next heartbeat, sent at once, when this changes what the gateway was told.
    pub fn set_services(&mut self, services: Vec<ServiceEntry>, now: Instant) {
        if self.services == services {
            return;
        }
        self.services = services;
        self.services_changed = true;
        if let AgentState::Established {
            ref mut next_heartbeat,
            ..
        } = self.state
        {
            *next_heartbeat = now;
        }
    }

    /// Tells the gateway the agent is paused (`Some(reason)`) or not, for display: in every
    /// heartbeat from now on, the next one sent at once when this changes it.
    pub fn set_paused(&mut self, pause: Option<String>, now: Instant) {
        if self.pause == pause {
            return;
        }
        self.pause = pause;
        if let AgentState::Established {
            ref mut next_heartbeat,
            ..
        } = self.state
        {
            *next_heartbeat = now;
        }
    }

    /// Bytes read from the control stream.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if self.is_closed() {
            return;
        }
        self.core.decoder.push(data);
        loop {
            match self.core.decoder.next_message() {
                Ok(Some(msg)) => {
                    self.core.last_heard = now;
                    if let Err(e) = self.on_message(msg, now) {
                        self.fail(e);
                    }
                    if self.is_closed() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => return self.fail(e),
            }
        }
    }

    fn on_message(&mut self, msg: Message, now: Instant) -> Result<(), ProtoError> {
        match (&self.state, msg) {
            (AgentState::AwaitingWelcome { .. }, Message::Welcome(w)) => {
                if !SUPPORTED_VERSIONS.contains(&w.version) {
                    return Err(ProtoError::NoCommonVersion {
                        peer: vec![w.version],
                        ours: SUPPORTED_VERSIONS.to_vec(),
                    });
                }
                let interval = Duration::from_millis(w.heartbeat_interval_ms.max(10));
                self.gateway_renews = w.capabilities.iter().any(|c| c == RENEW);
                self.gateway_leaves = w.capabilities.iter().any(|c| c == LEAVE);
                self.live_replicas = w.live_replicas;
                self.state = AgentState::Established {
                    interval,
                    next_heartbeat: now + interval,
                };
                self.events.push_back(AgentEvent::Established(w));
            }
            (AgentState::Established { .. }, Message::HeartbeatAck(ack)) => {
                if let Some((seq, sent)) = self.outstanding
                    && seq == ack.seq
                {
                    let rtt = now.saturating_duration_since(sent);
                    self.rtt = Some(rtt);
                    self.outstanding = None;
                    self.events.push_back(AgentEvent::Rtt(rtt));
                }
                if ack.live_replicas > 0 && ack.live_replicas != self.live_replicas {
                    self.live_replicas = ack.live_replicas;
                    self.events
                        .push_back(AgentEvent::LiveReplicas(ack.live_replicas));
                }
            }
            (AgentState::Established { .. }, Message::GoAway(g)) => {
                self.events.push_back(AgentEvent::GoAway(g));
            }
            (AgentState::Established { .. }, Message::RenewResponse(r))
                if self.renewing == Some(r.id) =>
            {
                self.renewing = None;
                self.events.push_back(AgentEvent::Renewed(r));
            }
            (_, Message::Close(c)) => {
                if let Some(info) = self.core.close_by_peer(c) {
                    self.events.push_back(AgentEvent::Closed(info));
                }
            }
            (state, other) => {
                return Err(ProtoError::Unexpected {
                    got: other.name(),
                    state: match state {
                        AgentState::AwaitingWelcome { .. } => "awaiting Welcome",
                        AgentState::Established { .. } => "established",
                    },
                });
            }
        }
        Ok(())
    }

    /// The gateway finished the control stream.
    pub fn handle_eof(&mut self, _now: Instant) {
        if let Some(info) = self.core.handle_eof() {
            self.events.push_back(AgentEvent::Closed(info));
        }
    }

    /// Call when [`AgentSession::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        match self.state {
            AgentState::AwaitingWelcome { deadline } => {
                if now >= deadline {
                    self.close(
                        ErrorCode::HANDSHAKE_TIMEOUT,
                        "no Welcome from the gateway in time",
                    );
                }
            }
            AgentState::Established {
                interval,
                ref mut next_heartbeat,
            } => {
                if now >= self.core.last_heard + interval * self.dead_after {
                    let reason =
                        format!("gateway silent for {} heartbeat intervals", self.dead_after);
                    self.close(ErrorCode::HEARTBEAT_TIMEOUT, &reason);
                    return;
                }
                if now >= *next_heartbeat {
                    *next_heartbeat = now + interval;
                    self.seq += 1;
                    self.outstanding = Some((self.seq, now));
                    let last_rtt_us = self.rtt.map_or(0, |d| d.as_micros() as u64);
                    let changed = std::mem::take(&mut self.services_changed);
                    self.core.send(Message::Heartbeat(Heartbeat {
                        seq: self.seq,
                        last_rtt_us,
                        paused: self.pause.is_some(),
                        pause_reason: self.pause.clone().unwrap_or_default(),
                        services_changed: changed,
                        services: if changed {
                            self.services.clone()
                        } else {
                            Vec::new()
                        },
                    }));
                }
            }
        }
    }

    /// When to call [`AgentSession::handle_timeout`] next; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        Some(match self.state {
            AgentState::AwaitingWelcome { deadline } => deadline,
            AgentState::Established {
                interval,
                next_heartbeat,
            } => next_heartbeat.min(self.core.last_heard + interval * self.dead_after),
        })
    }

    /// Bytes to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.core.poll_transmit()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// Closes the session from this side; a `Close` frame is queued.
    pub fn close(&mut self, code: ErrorCode, reason: &str) {
        if let Some(info) = self.core.close_local(code, reason.to_owned()) {
            self.events.push_back(AgentEvent::Closed(info));
        }
    }

    fn fail(&mut self, e: ProtoError) {
        self.close(e.code(), &e.to_string());
    }

    /// True when [`AgentSession::renew`] would send: established, the gateway renews
    /// certificates, and no renewal is awaiting its answer.
    pub fn can_renew(&self) -> bool {
        self.is_established() && self.gateway_renews && self.renewing.is_none()
    }

    /// Queues a [`RenewRequest`] carrying `csr_pem`; its answer comes as
    /// [`AgentEvent::Renewed`] with the returned id. `None` (nothing sent) unless
    /// [`AgentSession::can_renew`].
    pub fn renew(&mut self, csr_pem: String) -> Option<u64> {
        if !self.can_renew() {
            return None;
        }
        self.renew_ids += 1;
        let id = self.renew_ids;
        self.renewing = Some(id);
        self.core
            .send(Message::RenewRequest(RenewRequest { id, csr_pem }));
        Some(id)
    }

    /// True when [`AgentSession::leave`] would send: established, the gateway offers
    /// [`LEAVE`], and not left already.
    pub fn can_leave(&self) -> bool {
        self.is_established() && self.gateway_leaves && !self.left
    }

    /// Tells the gateway this agent is leaving the session (a `GoAway`): it opens no new
    /// stream on it and closes it once its streams are done. The caller must refuse every
    /// stream it has not accepted yet from now on ([`ErrorCode::REFUSED_STREAM`]). False
    /// (nothing sent) unless [`AgentSession::can_leave`].
    pub fn leave(&mut self, reason: &str) -> bool {
        if !self.can_leave() {
            return false;
        }
        self.left = true;
        self.core.send(Message::GoAway(GoAway {
            reason: reason.to_owned(),
            ..Default::default()
        }));
        true
    }

    /// True once [`AgentSession::leave`] sent its `GoAway`.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The gateway's last count of live replicas (`Welcome`, then heartbeat acks); 0 when it
    /// did not say.
    pub fn live_replicas(&self) -> u32 {
        self.live_replicas
    }

    /// True once closed by either side.
    pub fn is_closed(&self) -> bool {
        self.core.closed.is_some()
    }

    /// True once `Welcome` arrived (and until closed).
    pub fn is_established(&self) -> bool {
        !self.is_closed() && matches!(self.state, AgentState::Established { .. })
    }

    /// The last measured heartbeat round trip.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }
}

// === GatewaySession ===

/// Settings for the gateway side of a session.
#[derive(Clone, Debug)]
pub struct GatewaySessionConfig {
    /// Session id to announce.
    pub session_id: String,
    /// This gateway's id, for display.
    pub gateway_id: String,
    /// How often agents must send heartbeats.
    pub heartbeat_interval: Duration,
    /// How long to wait for `Hello`.
    pub handshake_timeout: Duration,
    /// Heartbeat intervals without hearing from the agent before closing.
    pub dead_after: u32,
    /// Frame limits.
    pub limits: Limits,
    /// Concurrent gateway-opened streams the agent must accept.
    pub max_concurrent_streams: u32,
    /// Versions this gateway speaks.
    pub versions: Vec<u32>,
    /// How often the gateway probes the session end to end (announced in `Welcome`); zero:
    /// never.
    pub probe_interval: Duration,
    /// What the gateway offers beyond the base protocol, announced in `Welcome` ([`RENEW`]:
    /// renewal requests become [`GatewayEvent::RenewRequested`]; without it they are refused).
    pub capabilities: Vec<String>,
    /// Least time between two renewal requests of one session; sooner ones are refused
    /// (`RESOURCE_EXHAUSTED`), so an agent cannot make the gateway sign in a loop.
    pub renew_min_interval: Duration,
    /// This gateway process among replicas, announced in `Welcome` ([`Welcome::replica_id`]).
    pub replica_id: String,
    /// Replicas alive and not draining, announced in `Welcome` and then in heartbeat acks
    /// ([`GatewaySession::set_live_replicas`]).
    pub live_replicas: u32,
    /// Report `Hello` as [`GatewayEvent::Hello`] and wait for [`GatewaySession::welcome`] or
    /// [`GatewaySession::refuse`] instead of answering it at once.
    pub hold_hello: bool,
}

impl GatewaySessionConfig {
    /// Defaults for a session id.
    pub fn new(session_id: String) -> Self {
        GatewaySessionConfig {
            session_id,
            gateway_id: String::new(),
            heartbeat_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            dead_after: 3,
            limits: Limits::DEFAULT,
            max_concurrent_streams: 1024,
            versions: SUPPORTED_VERSIONS.to_vec(),
            probe_interval: Duration::ZERO,
            capabilities: Vec::new(),
            renew_min_interval: Duration::from_secs(1),
            replica_id: String::new(),
            live_replicas: 0,
            hold_hello: false,
        }
    }
}

/// Something the gateway's IO layer must act on or may report.
#[derive(Clone, Debug, PartialEq)]
pub enum GatewayEvent {
    /// With [`GatewaySessionConfig::hold_hello`]: `Hello` arrived with a version in common;
    /// answer with [`GatewaySession::welcome`] or [`GatewaySession::refuse`].
    Hello {
        /// The agent's hello.
        hello: Hello,
        /// The version that would be chosen.
        version: u32,
    },
    /// `Hello` accepted and `Welcome` queued: register the session.
    Established {
        /// The agent's hello.
        hello: Hello,
        /// The negotiated version.
        version: u32,
    },
    /// A heartbeat arrived and its `HeartbeatAck` is queued; `rtt` is the round trip the agent
    /// reported for its previous one (none on the first). Traffic the gateway writes in the same
    /// turn as the queued bytes usually shares their packet, since the transport builds packets
    /// once the writer yields; the gateway's end-to-end probe rides on this.
    Heartbeat {
        /// The agent's last measured heartbeat round trip.
        rtt: Option<Duration>,
        /// Paused by its owner, and why ([`Heartbeat::paused`]).
        pause: Option<String>,
        /// The agent's new allow-list, when it changed ([`Heartbeat::services_changed`]).
        services: Option<Vec<ServiceEntry>>,
    },
    /// The agent asks for a new certificate: answer with [`GatewaySession::renew_response`]
    /// (one renewal per session is pending at most).
    RenewRequested(RenewRequest),
    /// The agent is leaving the session (its `GoAway`, only when this gateway offers
    /// [`LEAVE`]; reported once): open no new stream on it, and close it once the streams on
    /// it are done.
    Left {
        /// The agent's reason, for logs.
        reason: String,
    },
    /// The session is over; close the connection with this code.
    Closed(CloseInfo),
}

#[derive(Debug)]
enum GatewayState {
    AwaitingHello {
        deadline: Instant,
    },
    /// `Hello` held for the IO's decision ([`GatewaySessionConfig::hold_hello`]).
    Deciding {
        deadline: Instant,
        hello: Box<Hello>,
        version: u32,
    },
    Established,
}

/// The gateway's side of the control stream.
#[derive(Debug)]
pub struct GatewaySession {
    core: Core,
    state: GatewayState,
    config: GatewaySessionConfig,
    events: VecDeque<GatewayEvent>,
    /// The renewal handed out as an event and not answered yet.
    renew_pending: Option<u64>,
    /// When the last renewal request was accepted.
    last_renew: Option<Instant>,
    /// The agent left the session (its `GoAway`).
    left: bool,
}

impl GatewaySession {
    /// Waits for `Hello` from `now`.
    pub fn new(config: GatewaySessionConfig, now: Instant) -> Self {
        GatewaySession {
            core: Core::new(config.limits.max_control_frame, now),
            state: GatewayState::AwaitingHello {
                deadline: now + config.handshake_timeout,
            },
            config,
            events: VecDeque::new(),
            renew_pending: None,
            last_renew: None,
            left: false,
        }
    }

    /// Bytes read from the control stream.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if self.is_closed() {
            return;
        }
        self.core.decoder.push(data);
        loop {
            match self.core.decoder.next_message() {
                Ok(Some(msg)) => {
                    self.core.last_heard = now;
                    if let Err(e) = self.on_message(msg, now) {
                        self.fail(e);
                    }
                    if self.is_closed() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => return self.fail(e),
            }
        }
    }

    fn on_message(&mut self, msg: Message, now: Instant) -> Result<(), ProtoError> {
        match (&self.state, msg) {
            (GatewayState::AwaitingHello { deadline }, Message::Hello(hello)) => {
                let deadline = *deadline;
                let version = hello
                    .versions
                    .iter()
                    .copied()
                    .filter(|v| self.config.versions.contains(v))
                    .max()
                    .ok_or_else(|| ProtoError::NoCommonVersion {
                        peer: hello.versions.clone(),
                        ours: self.config.versions.clone(),
                    })?;
                if self.config.hold_hello {
                    self.state = GatewayState::Deciding {
                        deadline,
                        hello: Box::new(hello.clone()),
                        version,
                    };
                    self.events
                        .push_back(GatewayEvent::Hello { hello, version });
                } else {
                    self.send_welcome(hello, version);
                }
            }
            (GatewayState::Established, Message::Heartbeat(hb)) => {
                self.core.send(Message::HeartbeatAck(HeartbeatAck {
                    seq: hb.seq,
                    live_replicas: self.config.live_replicas,
                }));
                let rtt = (hb.last_rtt_us > 0).then(|| Duration::from_micros(hb.last_rtt_us));
                let pause = hb.paused.then_some(hb.pause_reason);
                let services = hb.services_changed.then_some(hb.services);
                self.events.push_back(GatewayEvent::Heartbeat {
                    rtt,
                    pause,
                    services,
                });
            }
            (GatewayState::Established, Message::RenewRequest(req)) => self.on_renew(req, now),
            (GatewayState::Established, Message::GoAway(g))
                if self.config.capabilities.iter().any(|c| c == LEAVE) =>
            {
                if !self.left {
                    self.left = true;
                    self.events
                        .push_back(GatewayEvent::Left { reason: g.reason });
                }
            }
            (_, Message::Close(c)) => {
                if let Some(info) = self.core.close_by_peer(c) {
                    self.events.push_back(GatewayEvent::Closed(info));
                }
            }
            (state, other) => {
                return Err(ProtoError::Unexpected {
                    got: other.name(),
                    state: match state {
                        GatewayState::AwaitingHello { .. } => "awaiting Hello",
                        GatewayState::Deciding { .. } => "deciding on Hello",
                        GatewayState::Established => "established",
                    },
                });
            }
        }
        Ok(())
    }

    fn send_welcome(&mut self, hello: Hello, version: u32) {
        self.core.send(Message::Welcome(Welcome {
            version,
            session_id: self.config.session_id.clone(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            max_frame_size: self.config.limits.max_control_frame as u32,
            max_concurrent_streams: self.config.max_concurrent_streams,
            gateway_id: self.config.gateway_id.clone(),
            probe_interval_ms: self.config.probe_interval.as_millis() as u64,
            capabilities: self.config.capabilities.clone(),
            replica_id: self.config.replica_id.clone(),
            live_replicas: self.config.live_replicas,
            server_time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }));
        self.state = GatewayState::Established;
        self.events
            .push_back(GatewayEvent::Established { hello, version });
    }

    /// Answers the held `Hello` ([`GatewayEvent::Hello`]) with `Welcome`: the session is
    /// established ([`GatewayEvent::Established`] follows). Does nothing in any other state.
    pub fn welcome(&mut self) {
        if self.is_closed() {
            return;
        }
        let state = std::mem::replace(&mut self.state, GatewayState::Established);
        match state {
            GatewayState::Deciding { hello, version, .. } => self.send_welcome(*hello, version),
            other => self.state = other,
        }
    }

    /// Turns the session away before it starts: a `Close` frame with `code`, `reason` and
    /// when to come back (`retry_after`), instead of `Welcome`.
    pub fn refuse(&mut self, code: ErrorCode, reason: &str, retry_after: Duration) {
        if let Some(info) = self
            .core
            .close_local_after(code, reason.to_owned(), Some(retry_after))
        {
            self.events.push_back(GatewayEvent::Closed(info));
        }
    }

    /// The count of live replicas heartbeat acks announce from now on.
    pub fn set_live_replicas(&mut self, live: u32) {
        self.config.live_replicas = live;
    }

    /// True once the agent left the session ([`GatewayEvent::Left`]).
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// A renewal request: handed out as an event, or refused here (not offered, one already
    /// pending, or too soon after the last one).
    fn on_renew(&mut self, req: RenewRequest, now: Instant) {
        let refusal = if !self.config.capabilities.iter().any(|c| c == RENEW) {
            Some((
                UNIMPLEMENTED,
                "this gateway does not renew certificates".to_owned(),
            ))
        } else if self.renew_pending.is_some() {
            Some((
                RESOURCE_EXHAUSTED,
                "a renewal of this session is already in progress".to_owned(),
            ))
        } else {
            match self.last_renew {
                Some(last) if now < last + self.config.renew_min_interval => Some((
                    RESOURCE_EXHAUSTED,
                    format!(
                        "renewal requests come too often: at most one every {:?}",
                        self.config.renew_min_interval
                    ),
                )),
                _ => None,
            }
        };
        match refusal {
            Some((code, message)) => self.core.send(Message::RenewResponse(RenewResponse {
                id: req.id,
                code,
                message,
                ..Default::default()
            })),
            None => {
                self.renew_pending = Some(req.id);
                self.last_renew = Some(now);
                self.events.push_back(GatewayEvent::RenewRequested(req));
            }
        }
    }

    /// Answers the pending [`GatewayEvent::RenewRequested`] (matched by `response.id`; an
    /// answer to nothing pending is dropped).
    pub fn renew_response(&mut self, response: RenewResponse) {
        if self.renew_pending == Some(response.id) {
            self.renew_pending = None;
            self.core.send(Message::RenewResponse(response));
        }
    }

    /// The agent finished the control stream.
    pub fn handle_eof(&mut self, _now: Instant) {
        if let Some(info) = self.core.handle_eof() {
            self.events.push_back(GatewayEvent::Closed(info));
        }
    }

    /// Call when [`GatewaySession::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.poll_timeout() {
            Some(t) if now >= t => {}
            _ => return,
        }
        match self.state {
            GatewayState::AwaitingHello { .. } => {
                self.close(
                    ErrorCode::HANDSHAKE_TIMEOUT,
                    "no Hello from the agent in time",
                );
            }
            GatewayState::Deciding { .. } => {
                self.close(
                    ErrorCode::HANDSHAKE_TIMEOUT,
                    "no decision on the agent's Hello in time",
                );
            }
            GatewayState::Established => {
                let reason = format!(
                    "agent silent for {} heartbeat intervals",
                    self.config.dead_after
                );
                self.close(ErrorCode::HEARTBEAT_TIMEOUT, &reason);
            }
        }
    }

    /// When to call [`GatewaySession::handle_timeout`] next; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        Some(match self.state {
            GatewayState::AwaitingHello { deadline } | GatewayState::Deciding { deadline, .. } => {
                deadline
            }
            GatewayState::Established => {
                self.core.last_heard
                    + self.config.heartbeat_interval * self.config.dead_after.max(1)
            }
        })
    }

    /// Bytes to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.core.poll_transmit()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.events.pop_front()
    }

    /// Asks the agent to move to a new session within `within`.
    pub fn go_away(&mut self, reason: &str, within: Duration) {
        self.send_go_away(GoAway {
            reason: reason.to_owned(),
            reconnect_within_ms: within.as_millis() as u64,
            ..Default::default()
        });
    }

    /// Sends `go_away` as it is (a hint of where not to go, and why).
    pub fn send_go_away(&mut self, go_away: GoAway) {
        if matches!(self.state, GatewayState::Established) {
            self.core.send(Message::GoAway(go_away));
        }
    }

    /// Closes the session from this side; a `Close` frame is queued.
    pub fn close(&mut self, code: ErrorCode, reason: &str) {
        if let Some(info) = self.core.close_local(code, reason.to_owned()) {
            self.events.push_back(GatewayEvent::Closed(info));
        }
    }

    fn fail(&mut self, e: ProtoError) {
        self.close(e.code(), &e.to_string());
    }

    /// True once closed by either side.
    pub fn is_closed(&self) -> bool {
        self.core.closed.is_some()
    }

    /// The heartbeat interval this session announces.
    pub fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat_interval
    }
}
