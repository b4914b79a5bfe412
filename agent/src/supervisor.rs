//! Session layer: keeps the sessions to one gateway address up: `connections` sessions on
//! distinct gateway replicas when it is the agent's only address (a load balancer in front of
//! replicas), one otherwise. Where they should be is decided in [`crate::placement`].
//!
//! Each attempt runs as its own task (dial, `Hello`/`Welcome`, heartbeats) and reports to the
//! supervisor, which decides what comes next, one dial at a time:
//! - fewer sessions than the target (`connections`, at most the live replicas each `Welcome`
//!   and heartbeat ack announces): dial another, naming in its `Hello` the replicas it holds
//!   sessions to, which a gateway turns away (`BUSY`); one that lands there anyway is let go,
//!   and dialed again after a full-jitter backoff delay;
//! - an attempt failed or a session ended: wait a full-jitter backoff delay, then dial again;
//!   turned away (`BUSY`): wait the gateway's retry-after plus up to as much again at random;
//! - `GoAway` arrived: dial a replacement (after a random share of the window the gateway gave,
//!   so a fleet spreads out), never on the replica that asked when it named itself, and keep
//!   the old session until the new one is established — make-before-break — then retire it;
//! - shutdown: close every session with `SHUTDOWN`.
//!
//! Retiring a session on a gateway that offers `leave`: the agent refuses every stream that
//! arrives from then on (`REFUSED_STREAM`: the gateway sends it again on another session,
//! nothing of it was processed), tells the gateway it leaves (`GoAway` from the agent), and
//! the gateway closes the session once the calls it relays on it are done. That replaces a
//! timing margin with a guarantee; an older gateway gets the margin ([`DRAIN_GRACE`]).
//!
//! Transport (`transport.mode = auto`): an attempt dials QUIC and, when QUIC cannot connect
//! within `connect_timeout`, TCP (TLS + HTTP/2, through the proxy if one applies), so the
//! fallback is chosen within one connect timeout of start. While on TCP, QUIC is tried again
//! after [`REPROBE_FIRST`], then at doubling intervals up to `transport.quic_retry`; when it
//! works, the QUIC session takes over make-before-break.
//!
//! A retired session on an older gateway (no `leave`) closes only when the streams it carries
//! are done (at most [`DRAIN_MAX`]) and no sooner than [`DRAIN_GRACE`] after it was retired:
//! such a gateway routes new streams to the newest session of each agent instance. A session
//! the gateway stops probing for three of its announced probe intervals is wedged: it is
//! replaced like after `GoAway`.
//!
//! Each session runs on the shared control-stream driver (`tether_runtime::driver`); what only
//! the agent does there (renewal orders, the drain of a retired session, the wedged-session
//! check) is its [`Side`], woken by deadlines and channels, never by a tick. How an attempt
//! ended is an [`Ended`], and the retry policy decides on its methods ([`Ended::is_revoked`],
//! [`Ended::is_over_limit`], [`Ended::is_retired`]), never on its text.
//!
//! A renewed certificate ([`crate::renew`]) replaces every session the same way: once nothing
//! is being dialed, a session presenting an older certificate is replaced by one dialed with
//! the new. Each established session to a gateway that renews certificates takes renewal
//! requests on its control stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::AlertDescription;
use tether_runtime::CancellationToken;
use tether_runtime::driver::{self, SessionEnd, Side};
use tether_runtime::stream::StreamError;
use tether_runtime::transport::{Link, Transport};
use tokio::sync::{mpsc, oneshot};
use tunnel_proto::message::{Hello, Proxy, RenewResponse};
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};
use tunnel_proto::{Backoff, ErrorCode};

use crate::config::TransportMode;
use crate::dialer::{DialError, DialFailure, Dialer};
use crate::placement::{self, Held, Landing, Purpose, Replace};
use crate::relay::LinkStats;
use crate::renew::{Credentials, RenewOrder, SessionRenewals};
use crate::status::{AgentStatus, SessionStatus};

/// The first QUIC re-probe after landing on TCP; later ones double up to `transport.quic_retry`.
pub const REPROBE_FIRST: Duration = Duration::from_secs(2);

/// Longest a retired session waits for its streams before closing.
pub const DRAIN_MAX: Duration = Duration::from_secs(30);

/// Least time a retired session stays open, idle or not, on a gateway that does not offer
/// `leave`: it sends new calls to the new session from before the agent hears of it, but a
/// call it routed to the old one just before is still on its way, on the old connection, when
/// the new session's `Welcome` arrives on the new one. Closing at the first idle moment would
/// fail that call. (With `leave` such a call is refused and sent again: no margin needed.)
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// What a supervisor needs, shared by all of an agent's supervisors.
#[derive(Debug)]
pub struct Shared {
    /// The certificate to dial with (replaced by renewals), and the sessions renewals go on.
    pub credentials: Arc<Credentials>,
    /// The allow-listed upstreams gateway-opened streams may reach.
    pub services: Arc<crate::relay::Services>,
    /// The `Hello` every session sends.
    pub hello: Hello,
    /// Reported status.
    pub status: Arc<AgentStatus>,
    /// Backoff base.
    pub initial_backoff: Duration,
    /// Backoff cap.
    pub max_backoff: Duration,
    /// Time allowed for one dial.
    pub connect_timeout: Duration,
    /// Which transports to use.
    pub mode: TransportMode,
    /// While on TCP in `auto` mode, how often QUIC is tried again.
    pub quic_retry: Duration,
    /// Sessions to keep on distinct replicas behind a single gateway address (`connections`).
    pub connections: usize,
    /// The owner's pause (the kill switch's effective state), told to the gateway for display
    /// in `Hello` and heartbeats.
    pub pause: tokio::sync::watch::Receiver<Option<Arc<str>>>,
}

/// What one attempt may dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dial {
    /// QUIC, then TCP if QUIC cannot connect.
    QuicThenTcp,
    /// QUIC only (also the background re-probe while on TCP).
    Quic,
    /// TCP only.
    Tcp,
}

enum Report {
    Established {
        id: u64,
        transport: Transport,
        /// `Welcome.replica_id`.
        replica: String,
        /// `Welcome.live_replicas`.
        live: u32,
    },
    /// The gateway's count of live replicas changed.
    Live { live: u32 },
    /// The session wants a replacement: the gateway asked (`GoAway`), or it is wedged.
    GoAway {
        id: u64,
        within: Duration,
        /// The gateway named its replica: the replacement goes elsewhere.
        avoid: bool,
        /// Not the gateway's asking: the agent found the session wedged.
        wedged: bool,
    },
    Ended {
        id: u64,
        /// The session was established before it ended.
        established: bool,
        ended: Ended,
    },
}

// === How an attempt ended ===

/// How one attempt (a dial, then a session) ended. Its `Display` is what the agent reports
/// (`last_error`, `last_session_end`, logs); the supervisor decides on its methods.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ended {
    /// The supervisor retired or stopped the attempt before it connected.
    #[error("closed before connecting: {0}")]
    Cancelled(&'static str),
    /// No connection to the gateway.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Connected, but the control stream could not be opened.
    #[error("control stream: {0}")]
    ControlStream(#[source] StreamError),
    /// Connected over TCP, but the gateway opened no control stream in time.
    #[error("gateway {gateway}: no control stream over TCP")]
    NoControlStream {
        /// The gateway address.
        gateway: String,
    },
    /// The session ran and ended.
    #[error("{}", describe_end(gateway, end))]
    Session {
        /// The gateway address.
        gateway: String,
        /// How the driver saw it end.
        end: SessionEnd,
    },
}

fn describe_end(gateway: &str, end: &SessionEnd) -> String {
    match end {
        SessionEnd::Closed(info) => {
            let who = if info.by_peer { "gateway" } else { "agent" };
            format!("closed by {who}: {} {}", info.code, info.reason)
        }
        SessionEnd::Transport(StreamError::Closed { code, reason }) => {
            format!("gateway closed the connection: {code} {reason}")
        }
        SessionEnd::Transport(e) => format!("gateway {gateway}: {e}"),
        other => format!("gateway {gateway}: {other:?}"),
    }
}

impl Ended {
    /// The gateway refused this agent's certificate as revoked: it closed with `REVOKED`, or
    /// ended the TLS handshake with the `certificate_revoked` alert.
    pub fn is_revoked(&self) -> bool {
        self.gateway_code() == Some(ErrorCode::REVOKED)
            || self.tls_alert() == Some(AlertDescription::CertificateRevoked)
    }

    /// The gateway refused the session because this agent's version is older than its
    /// `agents.min_version` (`UPGRADE_REQUIRED`; the reason names both versions).
    pub fn is_upgrade_required(&self) -> bool {
        self.gateway_code() == Some(ErrorCode::UPGRADE_REQUIRED)
    }

    /// The gateway refused the session because this agent holds `limits.sessions_per_agent`
    /// there already (it closed with `TOO_MANY_SESSIONS`).
    pub fn is_over_limit(&self) -> bool {
        self.gateway_code() == Some(ErrorCode::TOO_MANY_SESSIONS)
    }

    /// The gateway turned the session away before it started (`BUSY`: draining, over its
    /// share of the fleet, its handshake budget, or a replica this agent must avoid): when to
    /// dial again (its `Close` said, else a second).
    pub fn busy(&self) -> Option<Duration> {
        if self.gateway_code() != Some(ErrorCode::BUSY) {
            return None;
        }
        let said = match self {
            Ended::Session {
                end: SessionEnd::Closed(info),
                ..
            } => info.retry_after,
            _ => None,
        };
        Some(said.unwrap_or(Duration::from_secs(1)))
    }

    /// This agent retired the session (`REPLACED`): a newer one took over.
    pub fn is_retired(&self) -> bool {
        matches!(
            self,
            Ended::Session { end: SessionEnd::Closed(info), .. }
                if !info.by_peer && info.code == ErrorCode::REPLACED
        )
    }

    /// The close code the gateway ended the attempt with: in its `Close` frame, or as the
    /// application close of the connection (a refusal right after the handshake shows at the
    /// first stream operation, or at the end of the handshake).
    pub fn gateway_code(&self) -> Option<ErrorCode> {
        match self {
            Ended::Session { end, .. } => end.peer_code(),
            Ended::ControlStream(e) => e.close_code(),
            Ended::Connect(e) => e.gateway_code(),
            Ended::Cancelled(_) | Ended::NoControlStream { .. } => None,
        }
    }

    /// The TLS alert the gateway ended the connection with, if it did.
    pub fn tls_alert(&self) -> Option<AlertDescription> {
        match self {
            Ended::Session {
                end: SessionEnd::Transport(e),
                ..
            }
            | Ended::ControlStream(e) => e.tls_alert(),
            Ended::Connect(e) => e.tls_alert(),
            _ => None,
        }
    }
}

/// Why an attempt could not connect, within `connect_timeout` per transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A dial failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// QUIC did not connect in time.
    #[error(
        "gateway {gateway}: no QUIC answer within {after:?} (is UDP to it allowed by the firewall?)"
    )]
    QuicTimeout {
        /// The gateway address.
        gateway: String,
        /// The connect timeout.
        after: Duration,
    },
    /// TCP did not connect in time.
    #[error("gateway {gateway}: no TCP answer within {after:?}")]
    TcpTimeout {
        /// The gateway address.
        gateway: String,
        /// The connect timeout.
        after: Duration,
    },
    /// QUIC failed, and so did the TCP fallback.
    #[error("{quic}; and over TCP: {tcp}")]
    Both {
        /// Why QUIC failed.
        quic: Box<ConnectError>,
        /// Why TCP failed.
        tcp: Box<ConnectError>,
    },
}

impl ConnectError {
    fn tls_alert(&self) -> Option<AlertDescription> {
        match self {
            ConnectError::Dial(e) => e.tls_alert(),
            ConnectError::Both { quic, tcp } => tcp.tls_alert().or_else(|| quic.tls_alert()),
            _ => None,
        }
    }

    fn gateway_code(&self) -> Option<ErrorCode> {
        match self {
            ConnectError::Dial(DialError {
                failure: DialFailure::Handshake(quinn::ConnectionError::ApplicationClosed(c)),
                ..
            }) => Some(ErrorCode::from(u64::from(c.error_code))),
            ConnectError::Both { quic, tcp } => tcp.gateway_code().or_else(|| quic.gateway_code()),
            _ => None,
        }
    }
}

struct Attempt {
    close: Option<oneshot::Sender<(ErrorCode, &'static str)>>,
    established: bool,
    /// A background QUIC re-probe while on TCP: its failure is expected, not an outage.
    reprobe: bool,
    transport: Option<Transport>,
    /// Which certificate it dialed with ([`crate::renew::Current::generation`]).
    generation: u64,
    /// What it was dialed for.
    purpose: Purpose,
    /// Its replica, once established (`Welcome.replica_id`).
    replica: String,
    /// Whether, and why, it wants a replacement.
    replace: Option<Replace>,
    /// Retired (or let go): it no longer counts as held.
    retiring: bool,
}

/// The supervisor's view of its attempts.
struct Attempts(HashMap<u64, Attempt>);

impl Attempts {
    /// Established sessions it keeps (not being retired).
    fn held(&self) -> Vec<Held> {
        let mut held: Vec<Held> = self
            .0
            .iter()
            .filter(|(_, a)| a.established && !a.retiring)
            .map(|(id, a)| Held {
                id: *id,
                replica: a.replica.clone(),
                transport: a.transport.unwrap_or(Transport::Quic),
                replace: a.replace,
            })
            .collect();
        held.sort_by_key(|h| h.id);
        held
    }

    /// A dial is in flight (not established yet).
    fn dialing(&self) -> bool {
        self.0.values().any(|a| !a.established)
    }

    fn live(&self) -> bool {
        self.0.values().any(|a| a.established)
    }

    /// Orders the session `id` to retire (make-before-break: it finishes what it carries).
    fn retire(&mut self, id: u64, why: &'static str) {
        if let Some(a) = self.0.get_mut(&id) {
            a.retiring = true;
            if let Some(c) = a.close.take() {
                let _ = c.send((ErrorCode::REPLACED, why));
            }
        }
    }
}

/// Keeps sessions to `gateway` until `shutdown`: `connections` on distinct replicas when it is
/// the agent's only address (a load balancer in front of replicas), else one.
pub async fn supervise(
    gateway: String,
    single_address: bool,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(shared.initial_backoff, shared.max_backoff);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut renewed = shared.credentials.subscribe();
    let mut attempts = Attempts(HashMap::new());
    let mut next_id = 0u64;
    // When to dial next (what for is decided then); `Some(now)` dials at once.
    let mut dial_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    // When to try QUIC again while a session runs on TCP (auto mode): soon at first (QUIC may
    // only have lost a race, e.g. with a gateway restart), then every `quic_retry`.
    let mut reprobe_at: Option<tokio::time::Instant> = None;
    let mut reprobe_delay = REPROBE_FIRST.min(shared.quic_retry);
    // Replicas alive, as the gateway last said (0: it did not).
    let mut live_replicas: u32 = 0;
    // Landings on a replica to avoid in a row, for the log.
    let mut duplicates = 0u32;
    let first_dial = match shared.mode {
        TransportMode::Auto => Dial::QuicThenTcp,
        TransportMode::Quic => Dial::Quic,
        TransportMode::Tcp => Dial::Tcp,
    };
    let far = Duration::from_secs(86_400 * 365);
    loop {
        let dial_timer =
            tokio::time::sleep_until(dial_at.unwrap_or_else(|| tokio::time::Instant::now() + far));
        let reprobe_timer = tokio::time::sleep_until(
            reprobe_at.unwrap_or_else(|| tokio::time::Instant::now() + far),
        );
        let mut spawn = |purpose: Purpose, dial: Dial, reprobe: bool, attempts: &mut Attempts| {
            next_id += 1;
            let (close_tx, close_rx) = oneshot::channel();
            let credentials = shared.credentials.current();
            let mut hello = shared.hello.clone();
            hello.avoid_replicas = placement::avoid(&attempts.held(), purpose);
            hello.sessions_held = shared.status.session_count() as u32;
            if let Some(reason) = shared.pause.borrow().as_deref() {
                hello.paused = true;
                hello.pause_reason = reason.to_owned();
            }
            attempts.0.insert(
                next_id,
                Attempt {
                    close: Some(close_tx),
                    established: false,
                    reprobe,
                    transport: None,
                    generation: credentials.generation,
                    purpose,
                    replica: String::new(),
                    replace: None,
                    retiring: false,
                },
            );
            tokio::spawn(run_attempt(
                next_id,
                gateway.clone(),
                shared.clone(),
                credentials.dialer.clone(),
                hello,
                tx.clone(),
                close_rx,
                dial,
            ));
        };
        // What the next dial waits for, when one is needed and none is planned: set by the
        // event handled below.
        let mut delay: Option<Duration> = None;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = dial_timer, if dial_at.is_some() => {
                dial_at = None;
                let target = placement::target(single_address, shared.connections, live_replicas);
                if !attempts.dialing()
                    && let Some(purpose) = placement::next(&attempts.held(), target)
                {
                    spawn(purpose, first_dial, false, &mut attempts);
                }
            }
            // A renewed certificate: the sessions move to it below.
            Ok(()) = renewed.changed() => {}
            _ = reprobe_timer, if reprobe_at.is_some() => {
                reprobe_at = None;
                let on_tcp = attempts.held().into_iter().find(|h| h.transport == Transport::Tcp);
                if let Some(tcp) = on_tcp && !attempts.dialing() && dial_at.is_none() {
                    tracing::debug!(%gateway, "on the TCP fallback: trying QUIC again");
                    spawn(Purpose::Replace(tcp.id), Dial::Quic, true, &mut attempts);
                }
            }
            Some(report) = rx.recv() => match report {
                Report::Established { id, transport, replica, live } => {
                    if live > 0 {
                        live_replicas = live;
                    }
                    let held = attempts.held();
                    let Some(a) = attempts.0.get_mut(&id) else { continue };
                    a.established = true;
                    a.transport = Some(transport);
                    a.replica = replica.clone();
                    let purpose = a.purpose;
                    match placement::land(&held, purpose, &replica) {
                        Landing::Duplicate => {
                            duplicates += 1;
                            tracing::info!(%gateway, %replica, landings = duplicates,
                                "landed on a replica this agent holds a session to already (or was asked to leave): letting it go and dialing again");
                            metrics::counter!("tether_agent_duplicate_landings_total").increment(1);
                            attempts.retire(id, "this agent holds a session to this replica already");
                            if a_reprobe(&attempts, id) {
                                // QUIC works; the TCP session moves on the next dial.
                                mark_tcp_for_quic(&mut attempts);
                            }
                            delay = Some(backoff.next_delay(rand::random::<f64>()));
                        }
                        Landing::Keep { retire } => {
                            backoff.reset();
                            duplicates = 0;
                            if a_reprobe(&attempts, id) {
                                tracing::info!(%gateway, "QUIC works again: moving off the TCP fallback");
                                metrics::counter!("tether_agent_transport_switches_total", "to" => "quic").increment(1);
                                reprobe_delay = REPROBE_FIRST.min(shared.quic_retry);
                            } else if transport == Transport::Tcp && shared.mode == TransportMode::Auto {
                                metrics::counter!("tether_agent_transport_switches_total", "to" => "tcp").increment(1);
                            }
                            // Make-before-break: the new session is up, retire the old.
                            if let Some(old) = retire {
                                attempts.retire(old, "a newer session took over");
                            }
                            // More to dial (a second session, another replacement): now.
                            delay = Some(Duration::ZERO);
                        }
                    }
                    let on_tcp = attempts.held().iter().any(|h| h.transport == Transport::Tcp);
                    reprobe_at = (on_tcp && shared.mode == TransportMode::Auto)
                        .then(|| reprobe_at.unwrap_or_else(|| tokio::time::Instant::now() + reprobe_delay));
                }
                Report::Live { live } => {
                    if live > 0 && live != live_replicas {
                        tracing::info!(%gateway, live, "the number of live gateway replicas changed");
                        live_replicas = live;
                        delay = Some(Duration::ZERO);
                    }
                }
                Report::GoAway { id, within, avoid, wedged } => {
                    let why = if wedged {
                        Replace::Wedged
                    } else {
                        Replace::Away { avoid }
                    };
                    if let Some(a) = attempts.0.get_mut(&id)
                        && a.replace.is_none()
                    {
                        tracing::info!(%gateway, attempt = id, ?within, replica = %a.replica, ?why,
                            "replacing the session");
                        a.replace = Some(why);
                    }
                    delay = Some(within.mul_f64(rand::random::<f64>() * 0.25));
                }
                Report::Ended { id, established, ended } => {
                    let reason = ended.to_string();
                    let revoked = ended.is_revoked();
                    let over_limit = ended.is_over_limit();
                    let upgrade = ended.is_upgrade_required();
                    let was = attempts.0.remove(&id);
                    let reprobe = was.as_ref().is_some_and(|a| a.reprobe);
                    let retired = was.as_ref().is_some_and(|a| a.retiring);
                    let busy = ended.busy();
                    if reprobe && !established {
                        tracing::debug!(%gateway, %reason, "QUIC still does not work; staying on TCP");
                        reprobe_delay = (reprobe_delay * 2).min(shared.quic_retry);
                        if attempts.live() {
                            reprobe_at = Some(tokio::time::Instant::now() + reprobe_delay);
                        }
                    } else if revoked {
                        // Retrying cannot help until the agent has a new certificate: do not
                        // hammer the gateway, try again only at the longest backoff.
                        tracing::error!(%gateway, %reason, retry_in = ?shared.max_backoff,
                            "the gateway revoked this agent's certificate; it needs a new one: a certificate issued after the revocation (`tether-gateway pki issue-agent`, or enrolling with a new token) is accepted at once");
                        metrics::counter!("tether_agent_revoked_total").increment(1);
                    } else if upgrade {
                        // Retrying cannot help until this agent is upgraded (or the gateway's
                        // minimum lowered): try again only at the longest backoff.
                        tracing::error!(%gateway, %reason, agent_version = crate::VERSION,
                            retry_in = ?shared.max_backoff,
                            "the gateway requires a newer agent: upgrade this agent");
                        metrics::counter!("tether_agent_upgrade_required_total").increment(1);
                    } else if over_limit {
                        // The gateway's reason says what to do; retrying with the backoff
                        // succeeds once one of the agent's other sessions there ends.
                        tracing::error!(%gateway, %reason,
                            "the gateway refused this session: this agent (all its instances together) already holds as many sessions there as limits.sessions_per_agent allows");
                        metrics::counter!("tether_agent_connect_failures_total").increment(1);
                    } else if let Some(after) = busy {
                        // Turned away before it started (draining, over its share, its
                        // handshake budget, or a replica to avoid): come back when it said.
                        tracing::debug!(%gateway, %reason, ?after, "the gateway turned the session away");
                        metrics::counter!("tether_agent_sessions_turned_away_total").increment(1);
                    } else if established && (retired || ended.is_retired()) {
                        tracing::info!(%gateway, %reason, "session retired");
                    } else if established {
                        tracing::warn!(%gateway, %reason, "session ended");
                    } else {
                        tracing::warn!(%gateway, %reason, "could not establish a session");
                        metrics::counter!("tether_agent_connect_failures_total").increment(1);
                    }
                    if established && !retired {
                        shared.status.set_session_end(reason.clone());
                    }
                    if (!reprobe || established) && !retired {
                        shared.status.set_error(reason);
                    }
                    if !attempts.held().iter().any(|h| h.transport == Transport::Tcp) {
                        reprobe_at = None;
                    }
                    delay = Some(if revoked || upgrade {
                        shared.max_backoff
                    } else if let Some(after) = busy {
                        // Honoured with jitter: a fleet turned away together comes back spread.
                        after + after.mul_f64(rand::random::<f64>())
                    } else if retired || (reprobe && !established) {
                        Duration::ZERO
                    } else {
                        backoff.next_delay(rand::random::<f64>())
                    });
                }
            },
        }
        // Make-before-break onto a renewed certificate: a live session (not one retired)
        // presenting an older certificate gets a replacement.
        let generation = *renewed.borrow_and_update();
        let mut renewing = false;
        for a in attempts.0.values_mut() {
            if a.established && !a.retiring && a.generation < generation && a.replace.is_none() {
                a.replace = Some(Replace::Renewal);
                renewing = true;
            }
        }
        if renewing {
            tracing::info!(%gateway, "certificate renewed: replacing the sessions");
            delay = Some(Duration::ZERO);
        }
        // Plan the next dial: when one is needed, none is in flight, and none planned sooner.
        let target = placement::target(single_address, shared.connections, live_replicas);
        let needed = placement::next(&attempts.held(), target).is_some();
        if !needed {
            dial_at = None;
        } else if !attempts.dialing()
            && let Some(d) = delay.or(dial_at.is_none().then_some(Duration::ZERO))
        {
            let at = tokio::time::Instant::now() + d;
            if dial_at.is_none_or(|t| at < t) {
                if !d.is_zero() {
                    shared.status.record_delay(d);
                    tracing::info!(%gateway, delay = ?d, attempt = backoff.attempt(), "dialing after a delay");
                }
                dial_at = Some(at);
            }
        }
    }
    // Shutdown: close every session and wait for the attempts to report their end.
    for a in attempts.0.values_mut() {
        if let Some(c) = a.close.take() {
            let _ = c.send((ErrorCode::SHUTDOWN, "agent shutting down"));
        }
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !attempts.0.is_empty() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Report::Ended { id, .. })) => {
                attempts.0.remove(&id);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

/// The attempt `id` is a background QUIC re-probe.
fn a_reprobe(attempts: &Attempts, id: u64) -> bool {
    attempts.0.get(&id).is_some_and(|a| a.reprobe)
}

/// QUIC works (a re-probe landed, on a replica to avoid): the sessions on the TCP fallback
/// move to QUIC with the next dials.
fn mark_tcp_for_quic(attempts: &mut Attempts) {
    for a in attempts.0.values_mut() {
        if a.established
            && !a.retiring
            && a.transport == Some(Transport::Tcp)
            && a.replace.is_none()
        {
            a.replace = Some(Replace::ToQuic);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_attempt(
    id: u64,
    gateway: String,
    shared: Arc<Shared>,
    dialer: Arc<Dialer>,
    hello: Hello,
    tx: mpsc::UnboundedSender<Report>,
    close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    dial: Dial,
) {
    let mut established = false;
    let ended = session(
        id,
        &gateway,
        (&shared, &dialer, hello),
        &tx,
        close_rx,
        &mut established,
        dial,
    )
    .await;
    if established {
        shared.status.session_down(id_key(&gateway, id));
    }
    let _ = tx.send(Report::Ended {
        id,
        established,
        ended,
    });
}

fn id_key(gateway: &str, id: u64) -> u64 {
    // Sessions of all supervisors share one status map: key by gateway and attempt.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    gateway.hash(&mut h);
    h.finish() ^ id
}

/// Dials `dial` within `connect_timeout` per transport.
async fn connect(
    gateway: &str,
    dialer: &Dialer,
    t: Duration,
    dial: Dial,
) -> Result<(Option<quinn::Endpoint>, Link), ConnectError> {
    let quic = async {
        match tokio::time::timeout(t, dialer.dial(gateway)).await {
            Ok(Ok((endpoint, link))) => Ok((Some(endpoint), link)),
            Ok(Err(e)) => Err(ConnectError::Dial(e)),
            Err(_) => Err(ConnectError::QuicTimeout {
                gateway: gateway.to_owned(),
                after: t,
            }),
        }
    };
    let tcp = async {
        match tokio::time::timeout(t, dialer.dial_tcp(gateway)).await {
            Ok(Ok(link)) => Ok((None, link)),
            Ok(Err(e)) => Err(ConnectError::Dial(e)),
            Err(_) => Err(ConnectError::TcpTimeout {
                gateway: gateway.to_owned(),
                after: t,
            }),
        }
    };
    match dial {
        Dial::Quic => quic.await,
        Dial::Tcp => tcp.await,
        Dial::QuicThenTcp => match quic.await {
            Ok(l) => Ok(l),
            Err(quic_err) => {
                tracing::info!(%gateway, reason = %quic_err, "QUIC cannot connect; trying TCP");
                tcp.await.map_err(|tcp_err| ConnectError::Both {
                    quic: Box::new(quic_err),
                    tcp: Box::new(tcp_err),
                })
            }
        },
    }
}

async fn session(
    id: u64,
    gateway: &str,
    (shared, dialer, mut hello): (&Shared, &Dialer, Hello),
    tx: &mpsc::UnboundedSender<Report>,
    mut close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    established: &mut bool,
    dial: Dial,
) -> Ended {
    let (endpoint, link) = tokio::select! {
        d = connect(gateway, dialer, shared.connect_timeout, dial) => match d {
            Ok(connected) => connected,
            Err(e) => return e.into(),
        },
        r = &mut close_rx => {
            return Ended::Cancelled(r.map(|(_, why)| why).unwrap_or("supervisor gone"));
        }
    };
    hello.proxy = match &link {
        Link::H2(_) if dialer.proxied(gateway) => Proxy::Http,
        _ => Proxy::Direct,
    } as i32;
    // Followed from before it is read: a reload from here on reaches the gateway.
    let services = shared.services.subscribe();
    hello.services = shared.services.announced();
    let stats = Arc::new(LinkStats::default());
    // Over HTTP/2 the first stream the gateway opens is the control stream; QUIC's are all
    // gateway-opened streams after the one we open.
    let ended = async {
        let control = match &link {
            Link::Quic(_) => link.open().await.map_err(Ended::ControlStream)?,
            Link::H2(_) => tokio::time::timeout(shared.connect_timeout, link.accept())
                .await
                .ok()
                .flatten()
                .ok_or_else(|| Ended::NoControlStream {
                    gateway: gateway.to_owned(),
                })?,
        };
        // Streams the gateway opens on this connection; ends with the connection.
        tokio::spawn(crate::relay::serve(
            link.clone(),
            shared.services.clone(),
            stats.clone(),
        ));
        let mut side = AgentSide {
            id,
            key: id_key(gateway, id),
            gateway,
            shared,
            tx,
            transport: link.transport(),
            stats: &stats,
            established: false,
            close_rx: Some(close_rx),
            draining: None,
            probe_interval: None,
            wedged_reported: false,
            renewals: None,
            renewing: None,
            pause: shared.pause.clone(),
            services,
        };
        let mut session = AgentSession::new(AgentSessionConfig::new(hello), Instant::now());
        let end = driver::drive(&mut session, &mut side, &link, control).await;
        *established = side.established;
        Ok::<_, Ended>(Ended::Session {
            gateway: gateway.to_owned(),
            end,
        })
    }
    .await
    .unwrap_or_else(|e| e);
    // Give the close a moment to reach the gateway, without holding shutdown hostage.
    match endpoint {
        Some(e) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), link.closed()).await;
        }
    }
    ended
}

// === The agent's side of the driver ===

/// A retired session. To a gateway that offers `leave`, the agent has left it (it refuses new
/// streams) and the gateway closes it once the calls it relays on it are done, or the agent
/// closes it at the deadline. To an older gateway: it closes once the grace has passed and the
/// streams in flight are done, or at the deadline.
struct Drain {
    /// Left (the gateway closes it); else the agent closes it when idle.
    left: bool,
    grace: Instant,
    deadline: Instant,
    code: ErrorCode,
    why: &'static str,
}

/// What the agent adds to the shared driver for one session.
struct AgentSide<'a> {
    id: u64,
    /// This session in the status map.
    key: u64,
    gateway: &'a str,
    shared: &'a Shared,
    tx: &'a mpsc::UnboundedSender<Report>,
    transport: Transport,
    stats: &'a LinkStats,
    established: bool,
    /// The supervisor's order to retire or close the session; taken once it came.
    close_rx: Option<oneshot::Receiver<(ErrorCode, &'static str)>>,
    draining: Option<Drain>,
    /// The gateway's probe interval, once known; a session unprobed for long is wedged.
    probe_interval: Option<Duration>,
    wedged_reported: bool,
    /// Renewal requests for this session, while it is the one to send them on, and the one
    /// awaiting the gateway's answer.
    renewals: Option<SessionRenewals>,
    renewing: Option<(u64, oneshot::Sender<RenewResponse>)>,
    /// The owner's pause, to tell the gateway of its changes.
    pause: tokio::sync::watch::Receiver<Option<Arc<str>>>,
    /// The allow-list, to tell the gateway of its changes (a reload).
    services: tokio::sync::watch::Receiver<Arc<crate::relay::Live>>,
}

/// What woke the agent's side.
enum Wake {
    /// The owner paused or resumed the agent (`None`: the switch is gone).
    Pause(Option<Option<Arc<str>>>),
    /// The allow-list was replaced (a reload).
    Services,
    /// A renewal to send.
    Renew(RenewOrder),
    /// The supervisor's order (`None`: the supervisor is gone).
    Close(Option<(ErrorCode, &'static str)>),
    /// A draining session's last stream is done.
    Idle,
}

impl AgentSide<'_> {
    /// When an unprobed session counts as wedged.
    fn wedged_at(&self) -> Option<Instant> {
        let every = self.probe_interval?;
        (!self.wedged_reported).then(|| self.stats.last_probe() + every * 3)
    }

    /// Closes a retired session that is done, and reports a wedged one.
    fn check(&mut self, session: &mut AgentSession, now: Instant) {
        if let Some(d) = &self.draining {
            if now >= d.deadline {
                let code = if d.left && self.stats.active() > 0 {
                    ErrorCode::DRAIN_TIMEOUT
                } else {
                    d.code
                };
                session.close(code, d.why);
                self.draining = None;
            } else if !d.left && self.stats.active() == 0 && now >= d.grace {
                session.close(d.code, d.why);
                self.draining = None;
            }
        }
        if let Some(at) = self.wedged_at()
            && now >= at
        {
            self.wedged_reported = true;
            tracing::warn!(gateway = %self.gateway, transport = %self.transport,
                since = ?self.stats.last_probe().elapsed(),
                "the gateway has stopped probing this session: replacing it");
            metrics::counter!("tether_agent_wedged_sessions_total").increment(1);
            let _ = self.tx.send(Report::GoAway {
                id: self.id,
                within: Duration::ZERO,
                avoid: false,
                wedged: true,
            });
        }
    }
}

impl Side<AgentSession> for AgentSide<'_> {
    type Wake = Wake;

    fn on_event(&mut self, session: &mut AgentSession, event: AgentEvent, _: Instant) {
        match event {
            AgentEvent::Established(w) => {
                self.established = true;
                tracing::info!(gateway = %self.gateway, session = %w.session_id, gateway_id = %w.gateway_id,
                    replica = %w.replica_id, live_replicas = w.live_replicas,
                    transport = %self.transport, heartbeat_ms = w.heartbeat_interval_ms, "connected to gateway");
                self.probe_interval =
                    (w.probe_interval_ms > 0).then(|| Duration::from_millis(w.probe_interval_ms));
                self.shared.status.session_up(
                    self.key,
                    SessionStatus {
                        gateway: self.gateway.to_owned(),
                        session_id: w.session_id,
                        replica: w.replica_id.clone(),
                        transport: self.transport.name(),
                        since: SystemTime::now(),
                        rtt: None,
                    },
                );
                let _ = self.tx.send(Report::Established {
                    id: self.id,
                    transport: self.transport,
                    replica: w.replica_id,
                    live: w.live_replicas,
                });
                if session.can_renew() {
                    self.renewals = Some(self.shared.credentials.register(self.key));
                }
            }
            AgentEvent::Renewed(r) => {
                if let Some((want, reply)) = self.renewing.take()
                    && want == r.id
                {
                    let _ = reply.send(r);
                }
            }
            AgentEvent::Rtt(rtt) => {
                self.shared.status.session_rtt(self.key, rtt);
                metrics::histogram!("tether_agent_heartbeat_rtt_seconds").record(rtt.as_secs_f64());
            }
            AgentEvent::GoAway(g) => {
                metrics::counter!("tether_agent_go_aways_total", "kind" => g.go_away_kind().name())
                    .increment(1);
                let _ = self.tx.send(Report::GoAway {
                    id: self.id,
                    within: Duration::from_millis(g.reconnect_within_ms),
                    avoid: !g.avoid_replica.is_empty(),
                    wedged: false,
                });
            }
            AgentEvent::LiveReplicas(live) => {
                let _ = self.tx.send(Report::Live { live });
            }
            // The driver ends the session; the supervisor learns how from `Ended`.
            AgentEvent::Closed(_) => {}
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let drain = self.draining.as_ref().map(|d| {
            if Instant::now() < d.grace {
                d.grace
            } else {
                // From here the last stream's end wakes it (`Wake::Idle`).
                d.deadline
            }
        });
        match (drain, self.wedged_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn handle_timeout(&mut self, session: &mut AgentSession, now: Instant) {
        self.check(session, now);
    }

    async fn wake(&mut self) -> Wake {
        let idle_matters = self
            .draining
            .as_ref()
            .is_some_and(|d| !d.left && Instant::now() >= d.grace);
        let (renewals, close_rx, stats) = (&mut self.renewals, &mut self.close_rx, self.stats);
        let services = &mut self.services;
        let reloaded = async move {
            match services.changed().await {
                Ok(()) => {}
                Err(_) => std::future::pending().await,
            }
        };
        let pause = &mut self.pause;
        let paused = async move {
            match pause.changed().await {
                Ok(()) => Some(pause.borrow_and_update().clone()),
                Err(_) => std::future::pending().await,
            }
        };
        let order = async move {
            match renewals {
                Some(r) => r.orders.recv().await,
                None => None,
            }
        };
        let close = async move {
            match close_rx {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(order) = order => Wake::Renew(order),
            r = close => Wake::Close(r),
            () = stats.idle(), if idle_matters => Wake::Idle,
            p = paused => Wake::Pause(p),
            () = reloaded => Wake::Services,
        }
    }

    fn on_wake(&mut self, session: &mut AgentSession, wake: Wake, now: Instant) {
        match wake {
            Wake::Renew(order) => {
                // Dropping the reply when nothing was sent tells the renewer at once.
                if let Some(id) = session.renew(order.csr_pem) {
                    self.renewing = Some((id, order.reply));
                }
            }
            Wake::Close(order) => {
                self.close_rx = None;
                if let Some((code, why)) = order {
                    // Retired: renewals go on the newer session, and it no longer counts as
                    // one of the agent's sessions (`/readyz`, `sessions_held`).
                    self.renewals = None;
                    self.shared.status.session_down(self.key);
                    if code == ErrorCode::REPLACED && session.can_leave() {
                        // Refuse what arrives from now on (the gateway sends it again on
                        // another session), then say so: the gateway opens nothing new here
                        // and closes the session once the calls it relays on it are done.
                        self.stats.refuse_new_streams();
                        session.leave(why);
                        self.draining = Some(Drain {
                            left: true,
                            grace: now,
                            deadline: now + DRAIN_MAX,
                            code,
                            why,
                        });
                    } else if code == ErrorCode::REPLACED {
                        // An older gateway: finish what this session carries first; new
                        // streams go to the new one, but one it routed here just before may
                        // still be on its way.
                        self.draining = Some(Drain {
                            left: false,
                            grace: now + DRAIN_GRACE,
                            deadline: now + DRAIN_MAX,
                            code,
                            why,
                        });
                    } else {
                        session.close(code, why);
                    }
                }
            }
            Wake::Idle => self.check(session, now),
            Wake::Pause(p) => {
                if let Some(p) = p {
                    session.set_paused(p.map(|r| r.to_string()), now);
                }
            }
            // Sent only when the names or kinds changed (not an address or a credential).
            Wake::Services => session.set_services(self.shared.services.announced(), now),
        }
    }
}

#[cfg(test)]
mod tests {
    use tether_runtime::stream::LinkError;
    use tunnel_proto::session::CloseInfo;

    use super::*;

    fn closed(code: ErrorCode, reason: &str, by_peer: bool) -> Ended {
        Ended::Session {
            gateway: "gw:7443".into(),
            end: SessionEnd::Closed(CloseInfo {
                code,
                reason: reason.into(),
                by_peer,
                retry_after: None,
            }),
        }
    }

    fn quic_closed_by_tls_alert(alert: u8) -> StreamError {
        StreamError::ConnectionLost(LinkError::Quic(quinn::ConnectionError::ConnectionClosed(
            quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::crypto(alert),
                frame_type: None,
                reason: bytes::Bytes::new(),
            },
        )))
    }

    #[test]
    fn the_retry_policy_reads_codes_and_typed_alerts_never_the_words() {
        // Revoked: the gateway's REVOKED close, in its Close frame or its connection close, or
        // the TLS alert certificate_revoked (44).
        assert!(closed(ErrorCode::REVOKED, "agent revoked", true).is_revoked());
        assert!(
            Ended::Session {
                gateway: "gw:7443".into(),
                end: SessionEnd::Transport(StreamError::Closed {
                    code: ErrorCode::REVOKED,
                    reason: String::new(),
                }),
            }
            .is_revoked()
        );
        assert!(Ended::ControlStream(quic_closed_by_tls_alert(44)).is_revoked());
        assert!(!Ended::ControlStream(quic_closed_by_tls_alert(42)).is_revoked());
        // Words that look like it decide nothing.
        let lookalike = closed(
            ErrorCode::PROTOCOL_ERROR,
            "received fatal alert: CertificateRevoked",
            true,
        );
        assert!(!lookalike.is_revoked());

        // Retired: this agent closed it with REPLACED; the same code from the gateway is not.
        let retired = closed(ErrorCode::REPLACED, "a newer session took over", false);
        assert!(retired.is_retired());
        assert_eq!(
            retired.to_string(),
            "closed by agent: replaced a newer session took over"
        );
        assert!(!closed(ErrorCode::REPLACED, "a newer session took over", true).is_retired());
        assert!(!closed(ErrorCode::SHUTDOWN, "replaced", false).is_retired());

        // Over the limit: TOO_MANY_SESSIONS, however it arrived.
        let refused = Ended::ControlStream(StreamError::Closed {
            code: ErrorCode::TOO_MANY_SESSIONS,
            reason: "this agent holds 2 sessions".into(),
        });
        assert!(refused.is_over_limit() && !refused.is_revoked());
        assert!(closed(ErrorCode::TOO_MANY_SESSIONS, "", true).is_over_limit());
    }

    #[test]
    fn a_session_turned_away_says_when_to_come_back() {
        let turned_away = Ended::Session {
            gateway: "gw:7443".into(),
            end: SessionEnd::Closed(CloseInfo {
                code: ErrorCode::BUSY,
                reason: "replica r1#1 is draining".into(),
                by_peer: true,
                retry_after: Some(Duration::from_millis(500)),
            }),
        };
        assert_eq!(turned_away.busy(), Some(Duration::from_millis(500)));
        assert!(!turned_away.is_over_limit() && !turned_away.is_revoked());
        // Only the connection's close arrived: a second, by default.
        let by_connection = Ended::ControlStream(StreamError::Closed {
            code: ErrorCode::BUSY,
            reason: String::new(),
        });
        assert_eq!(by_connection.busy(), Some(Duration::from_secs(1)));
        assert_eq!(closed(ErrorCode::SHUTDOWN, "", true).busy(), None);
    }

    #[test]
    fn how_a_session_ended_reads_as_before() {
        assert_eq!(
            closed(ErrorCode::SHUTDOWN, "gateway shutting down", true).to_string(),
            "closed by gateway: shutdown gateway shutting down"
        );
        let by_connection = Ended::Session {
            gateway: "gw:7443".into(),
            end: SessionEnd::Transport(StreamError::Closed {
                code: ErrorCode::SHUTDOWN,
                reason: "gateway shutting down".into(),
            }),
        };
        assert_eq!(
            by_connection.to_string(),
            "gateway closed the connection: shutdown gateway shutting down"
        );
        assert_eq!(
            Ended::Cancelled("agent shutting down").to_string(),
            "closed before connecting: agent shutting down"
        );
    }
}
