//! Session layer: keeps one session up to one gateway address.
//!
//! Each attempt runs as its own task (dial, `Hello`/`Welcome`, heartbeats) and reports to the
//! supervisor, which decides what comes next:
//! - an attempt failed or a session ended, and nothing else is up: wait a full-jitter backoff
//!   delay, then dial again;
//! - `GoAway` arrived: dial a replacement (after a random share of the window the gateway gave,
//!   so a fleet spreads out), and keep the old session until the new one is established —
//!   make-before-break — then close the old one with `REPLACED`;
//! - shutdown: close every session with `SHUTDOWN`.
//!
//! Transport (`transport.mode = auto`): an attempt dials QUIC and, when QUIC cannot connect
//! within `connect_timeout`, TCP (TLS + HTTP/2, through the proxy if one applies), so the
//! fallback is chosen within one connect timeout of start. While on TCP, QUIC is tried again
//! after [`REPROBE_FIRST`], then at doubling intervals up to `transport.quic_retry`; when it
//! works, the QUIC session takes over make-before-break.
//!
//! A retired session (replaced, or moved off TCP) closes only when the streams it carries are
//! done (at most [`DRAIN_MAX`]) and no sooner than [`DRAIN_GRACE`] after it was retired: the
//! gateway routes new streams to the newest session of each agent instance, so nothing in
//! flight fails. A session the gateway stops probing for three of its announced probe
//! intervals is wedged: it is replaced like after `GoAway`.
//!
//! A renewed certificate ([`crate::renew`]) replaces every session the same way: once nothing
//! is being dialed, a session presenting an older certificate is replaced by one dialed with
//! the new. Each established session to a gateway that renews certificates takes renewal
//! requests on its control stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tether_runtime::CancellationToken;
use tether_runtime::transport::{Link, Transport};
use tokio::sync::{mpsc, oneshot};
use tunnel_proto::message::Hello;
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};
use tunnel_proto::{Backoff, ErrorCode};

use crate::config::TransportMode;
use crate::dialer::Dialer;
use crate::relay::LinkStats;
use crate::renew::{Credentials, SessionRenewals};
use crate::status::{AgentStatus, SessionStatus};

/// The first QUIC re-probe after landing on TCP; later ones double up to `transport.quic_retry`.
pub const REPROBE_FIRST: Duration = Duration::from_secs(2);

/// Longest a retired session waits for its streams before closing.
pub const DRAIN_MAX: Duration = Duration::from_secs(30);

/// Least time a retired session stays open, idle or not: the gateway sends new calls to the new
/// session from before the agent hears of it, but a call it routed to the old one just before
/// is still on its way, on the old connection, when the new session's `Welcome` arrives on the
/// new one. Closing at the first idle moment would fail that call.
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
    },
    GoAway {
        id: u64,
        within: Duration,
    },
    Ended {
        id: u64,
        established: bool,
        reason: String,
        /// The gateway refused this agent's certificate as revoked (a `REVOKED` close, or the
        /// TLS `certificate_revoked` alert).
        revoked: bool,
        /// The gateway refused the session: the agent holds `limits.sessions_per_agent` there
        /// already (a `TOO_MANY_SESSIONS` close).
        over_limit: bool,
    },
}

/// What one attempt learned, beside why it ended.
#[derive(Default)]
struct Outcome {
    established: bool,
    revoked: bool,
    over_limit: bool,
}

impl Outcome {
    /// Notes what a close by the gateway with `code` says about this agent.
    fn closed_by_gateway(&mut self, code: ErrorCode) {
        self.revoked |= code == ErrorCode::REVOKED;
        self.over_limit |= code == ErrorCode::TOO_MANY_SESSIONS;
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
}

/// Keeps a session to `gateway` until `shutdown`.
pub async fn supervise(gateway: String, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(shared.initial_backoff, shared.max_backoff);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut renewed = shared.credentials.subscribe();
    let mut attempts: HashMap<u64, Attempt> = HashMap::new();
    let mut next_id = 0u64;
    // When to dial next; `Some(now)` dials at once.
    let mut dial_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    // When to try QUIC again while the live session runs on TCP (auto mode): soon at first
    // (QUIC may only have lost a race, e.g. with a gateway restart), then every `quic_retry`.
    let mut reprobe_at: Option<tokio::time::Instant> = None;
    let mut reprobe_delay = REPROBE_FIRST.min(shared.quic_retry);
    // Set by GoAway until a replacement is established.
    let mut replacing = false;
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
        let mut spawn = |dial: Dial, reprobe: bool, attempts: &mut HashMap<u64, Attempt>| {
            next_id += 1;
            let (close_tx, close_rx) = oneshot::channel();
            let credentials = shared.credentials.current();
            attempts.insert(
                next_id,
                Attempt {
                    close: Some(close_tx),
                    established: false,
                    reprobe,
                    transport: None,
                    generation: credentials.generation,
                },
            );
            tokio::spawn(run_attempt(
                next_id,
                gateway.clone(),
                shared.clone(),
                credentials.dialer.clone(),
                tx.clone(),
                close_rx,
                dial,
            ));
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = dial_timer, if dial_at.is_some() => {
                dial_at = None;
                spawn(first_dial, false, &mut attempts);
            }
            // A renewed certificate: the sessions move to it below.
            Ok(()) = renewed.changed() => {}
            _ = reprobe_timer, if reprobe_at.is_some() => {
                reprobe_at = None;
                let dialing = attempts.values().any(|a| !a.established) || dial_at.is_some();
                if !dialing {
                    tracing::debug!(%gateway, "on the TCP fallback: trying QUIC again");
                    spawn(Dial::Quic, true, &mut attempts);
                }
            }
            Some(report) = rx.recv() => match report {
                Report::Established { id, transport } => {
                    backoff.reset();
                    replacing = false;
                    if let Some(a) = attempts.get_mut(&id) {
                        a.established = true;
                        a.transport = Some(transport);
                        if a.reprobe {
                            tracing::info!(%gateway, "QUIC works again: moving off the TCP fallback");
                            metrics::counter!("tether_agent_transport_switches_total", "to" => "quic").increment(1);
                        } else if transport == Transport::Tcp && shared.mode == TransportMode::Auto {
                            metrics::counter!("tether_agent_transport_switches_total", "to" => "tcp").increment(1);
                        }
                    }
                    // Make-before-break: the new session is up, retire the others.
                    for (other, a) in attempts.iter_mut() {
                        if *other != id && a.established
                            && let Some(c) = a.close.take() {
                                let _ = c.send((ErrorCode::REPLACED, "a newer session took over"));
                            }
                    }
                    if transport == Transport::Quic {
                        reprobe_delay = REPROBE_FIRST.min(shared.quic_retry);
                    }
                    reprobe_at = (transport == Transport::Tcp && shared.mode == TransportMode::Auto)
                        .then(|| tokio::time::Instant::now() + reprobe_delay);
                }
                Report::GoAway { id, within } => {
                    tracing::info!(%gateway, attempt = id, ?within, "replacing the session");
                    let dialing = attempts.values().any(|a| !a.established) || dial_at.is_some();
                    replacing = true;
                    if !dialing {
                        let spread = within.mul_f64(rand::random::<f64>() * 0.25);
                        dial_at = Some(tokio::time::Instant::now() + spread);
                    }
                }
                Report::Ended { id, established, reason, revoked, over_limit } => {
                    let was = attempts.remove(&id);
                    let reprobe = was.as_ref().is_some_and(|a| a.reprobe);
                    if reprobe && !established {
                        tracing::debug!(%gateway, %reason, "QUIC still does not work; staying on TCP");
                        reprobe_delay = (reprobe_delay * 2).min(shared.quic_retry);
                        if attempts.values().any(|a| a.established) {
                            reprobe_at = Some(tokio::time::Instant::now() + reprobe_delay);
                        }
                    } else if revoked {
                        // Retrying cannot help until the agent has a new certificate: do not
                        // hammer the gateway, try again only at the longest backoff.
                        tracing::error!(%gateway, %reason, retry_in = ?shared.max_backoff,
                            "the gateway revoked this agent's certificate; it needs a new one");
                        metrics::counter!("tether_agent_revoked_total").increment(1);
                    } else if over_limit {
                        // The gateway's reason says what to do; retrying with the backoff
                        // succeeds once one of the agent's other sessions there ends.
                        tracing::error!(%gateway, %reason,
                            "the gateway refused this session: this agent (all its instances together) already holds as many sessions there as limits.sessions_per_agent allows");
                        metrics::counter!("tether_agent_connect_failures_total").increment(1);
                    } else if established && reason.starts_with("closed by agent: replaced") {
                        tracing::info!(%gateway, %reason, "session retired");
                    } else if established {
                        tracing::warn!(%gateway, %reason, "session ended");
                    } else {
                        tracing::warn!(%gateway, %reason, "could not establish a session");
                        metrics::counter!("tether_agent_connect_failures_total").increment(1);
                    }
                    if established {
                        shared.status.set_session_end(reason.clone());
                    }
                    if !reprobe || established {
                        shared.status.set_error(reason);
                    }
                    let live = attempts.values().any(|a| a.established);
                    let dialing = attempts.values().any(|a| !a.established) || dial_at.is_some();
                    if !live {
                        reprobe_at = None;
                    }
                    if (!live || replacing) && !dialing {
                        let delay = if revoked {
                            shared.max_backoff
                        } else {
                            backoff.next_delay(rand::random::<f64>())
                        };
                        shared.status.record_delay(delay);
                        tracing::info!(%gateway, ?delay, attempt = backoff.attempt(), "reconnecting after backoff");
                        dial_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            },
        }
        // Make-before-break onto a renewed certificate: when nothing is being dialed and a live
        // session (not one already retired) presents an older certificate, dial its
        // replacement now.
        let generation = *renewed.borrow_and_update();
        let dialing = attempts.values().any(|a| !a.established) || dial_at.is_some();
        if !dialing
            && attempts
                .values()
                .any(|a| a.established && a.close.is_some() && a.generation < generation)
        {
            tracing::info!(%gateway, "certificate renewed: replacing the session");
            replacing = true;
            dial_at = Some(tokio::time::Instant::now());
        }
    }
    // Shutdown: close every session and wait for the attempts to report their end.
    for a in attempts.values_mut() {
        if let Some(c) = a.close.take() {
            let _ = c.send((ErrorCode::SHUTDOWN, "agent shutting down"));
        }
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !attempts.is_empty() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Report::Ended { id, .. })) => {
                attempts.remove(&id);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

async fn run_attempt(
    id: u64,
    gateway: String,
    shared: Arc<Shared>,
    dialer: Arc<Dialer>,
    tx: mpsc::UnboundedSender<Report>,
    close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    dial: Dial,
) {
    let mut outcome = Outcome::default();
    let attempt = session(
        id,
        &gateway,
        &shared,
        &dialer,
        &tx,
        close_rx,
        &mut outcome,
        dial,
    );
    let reason = match attempt.await {
        Ok(r) | Err(r) => r,
    };
    if outcome.established {
        shared.status.session_down(id_key(&gateway, id));
    }
    let _ = tx.send(Report::Ended {
        id,
        established: outcome.established,
        reason,
        revoked: outcome.revoked,
        over_limit: outcome.over_limit,
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
) -> Result<(Option<quinn::Endpoint>, Link), String> {
    let quic = async {
        match tokio::time::timeout(t, dialer.dial(gateway)).await {
            Ok(Ok((endpoint, link))) => Ok((Some(endpoint), link)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "gateway {gateway}: no QUIC answer within {t:?} (is UDP to it allowed by the firewall?)"
            )),
        }
    };
    let tcp = async {
        match tokio::time::timeout(t, dialer.dial_tcp(gateway)).await {
            Ok(Ok(link)) => Ok((None, link)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("gateway {gateway}: no TCP answer within {t:?}")),
        }
    };
    match dial {
        Dial::Quic => quic.await,
        Dial::Tcp => tcp.await,
        Dial::QuicThenTcp => match quic.await {
            Ok(l) => Ok(l),
            Err(quic_err) => {
                tracing::info!(%gateway, reason = %quic_err, "QUIC cannot connect; trying TCP");
                tcp.await
                    .map_err(|tcp_err| format!("{quic_err}; and over TCP: {tcp_err}"))
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    id: u64,
    gateway: &str,
    shared: &Shared,
    dialer: &Dialer,
    tx: &mpsc::UnboundedSender<Report>,
    mut close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    outcome: &mut Outcome,
    dial: Dial,
) -> Result<String, String> {
    let (endpoint, link) = tokio::select! {
        d = connect(gateway, dialer, shared.connect_timeout, dial) => d.inspect_err(|e| {
            // Over TCP the refusal ends the HTTP/2 handshake inside `connect`; only rustls'
            // words for the alert are left by then.
            outcome.revoked = e.contains("received fatal alert: CertificateRevoked");
        })?,
        r = &mut close_rx => {
            return Ok(format!("closed before connecting: {}", r.map(|(_, why)| why).unwrap_or("supervisor gone")));
        }
    };
    let stats = Arc::new(LinkStats::default());
    // Over HTTP/2 the first stream the gateway opens is the control stream; QUIC's are all
    // gateway-opened streams after the one we open.
    let result = async {
        let control = match &link {
            Link::Quic(_) => link
                .open()
                .await
                .map_err(|e| format!("control stream: {e}"))?,
            Link::H2(_) => tokio::time::timeout(shared.connect_timeout, link.accept())
                .await
                .ok()
                .flatten()
                .ok_or_else(|| format!("gateway {gateway}: no control stream over TCP"))?,
        };
        // Streams the gateway opens on this connection; ends with the connection.
        tokio::spawn(crate::relay::serve(
            link.clone(),
            shared.services.clone(),
            stats.clone(),
        ));
        run_control(
            id, gateway, shared, tx, close_rx, outcome, &link, control, &stats,
        )
        .await
    }
    .await;
    if result.is_err() {
        outcome.revoked |= refused_as_revoked(&link);
        if let Some(code) = app_close_code(&link) {
            outcome.closed_by_gateway(code);
        }
    }
    // Give the close a moment to reach the gateway, without holding shutdown hostage.
    match endpoint {
        Some(e) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), link.closed()).await;
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_control(
    id: u64,
    gateway: &str,
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Report>,
    mut close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    outcome: &mut Outcome,
    link: &Link,
    (mut send, mut recv): (
        tether_runtime::transport::SendStream,
        tether_runtime::transport::RecvStream,
    ),
    stats: &LinkStats,
) -> Result<String, String> {
    let mut session = AgentSession::new(
        AgentSessionConfig::new(shared.hello.clone()),
        Instant::now(),
    );
    let key = id_key(gateway, id);
    let transport = link.transport();
    let mut buf = vec![0u8; 16 * 1024];
    let mut close_rx_live = true;
    // Retired: close once the grace has passed and the streams in flight are done, or at the
    // deadline.
    let mut draining: Option<(Instant, Instant, ErrorCode, &'static str)> = None;
    // The gateway's probe interval, once known; a session unprobed for long is wedged.
    let mut probe_interval: Option<Duration> = None;
    // Renewal requests for this session, while it is the one to send them on, and the one
    // awaiting the gateway's answer.
    let mut renewals: Option<SessionRenewals> = None;
    let mut renewing: Option<(u64, oneshot::Sender<tunnel_proto::message::RenewResponse>)> = None;
    let mut wedged_reported = false;
    let tick = Duration::from_millis(100);
    loop {
        while let Some(bytes) = session.poll_transmit() {
            send.write_all(&bytes)
                .await
                .map_err(|e| format!("control stream: {e}"))?;
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                AgentEvent::Established(w) => {
                    outcome.established = true;
                    tracing::info!(%gateway, session = %w.session_id, gateway_id = %w.gateway_id,
                        %transport, heartbeat_ms = w.heartbeat_interval_ms, "connected to gateway");
                    probe_interval = (w.probe_interval_ms > 0)
                        .then(|| Duration::from_millis(w.probe_interval_ms));
                    shared.status.session_up(
                        key,
                        SessionStatus {
                            gateway: gateway.to_owned(),
                            session_id: w.session_id,
                            transport: transport.name(),
                            since: SystemTime::now(),
                            rtt: None,
                        },
                    );
                    let _ = tx.send(Report::Established { id, transport });
                    if session.can_renew() {
                        renewals = Some(shared.credentials.register(key));
                    }
                }
                AgentEvent::Renewed(r) => {
                    if let Some((want, reply)) = renewing.take()
                        && want == r.id
                    {
                        let _ = reply.send(r);
                    }
                }
                AgentEvent::Rtt(rtt) => {
                    shared.status.session_rtt(key, rtt);
                    metrics::histogram!("tether_agent_heartbeat_rtt_seconds")
                        .record(rtt.as_secs_f64());
                }
                AgentEvent::GoAway(g) => {
                    let _ = tx.send(Report::GoAway {
                        id,
                        within: Duration::from_millis(g.reconnect_within_ms),
                    });
                }
                AgentEvent::Closed(info) => {
                    if info.by_peer {
                        outcome.closed_by_gateway(info.code);
                    }
                    if !info.by_peer {
                        let _ = send.finish();
                    }
                    link.close(info.code, info.reason.as_bytes());
                    if !info.by_peer {
                        link.linger().await;
                    }
                    let who = if info.by_peer { "gateway" } else { "agent" };
                    return Ok(format!("closed by {who}: {} {}", info.code, info.reason));
                }
            }
        }
        if let Some((grace, deadline, code, why)) = draining
            && ((stats.active() == 0 && Instant::now() >= grace) || Instant::now() >= deadline)
        {
            draining = None;
            session.close(code, why);
            continue;
        }
        if let Some(every) = probe_interval
            && !wedged_reported
            && stats.last_probe().elapsed() > every * 3
        {
            wedged_reported = true;
            tracing::warn!(%gateway, %transport, since = ?stats.last_probe().elapsed(),
                "the gateway has stopped probing this session: replacing it");
            metrics::counter!("tether_agent_wedged_sessions_total").increment(1);
            let _ = tx.send(Report::GoAway {
                id,
                within: Duration::ZERO,
            });
        }
        let mut deadline = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if draining.is_some() || probe_interval.is_some() {
            deadline = deadline.min(Instant::now() + tick);
        }
        let order = async {
            match renewals.as_mut() {
                Some(r) => r.orders.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(order) = order => {
                // Dropping the reply when nothing was sent tells the renewer at once.
                if let Some(id) = session.renew(order.csr_pem) {
                    renewing = Some((id, order.reply));
                }
            }
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(tether_runtime::stream::StreamError::Closed { code, reason }) => {
                    outcome.closed_by_gateway(code);
                    return Err(format!("gateway closed the connection: {code} {reason}"));
                }
                Err(e) => return Err(format!("gateway {gateway}: {e}")),
            },
            _ = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(Instant::now()),
            r = &mut close_rx, if close_rx_live => {
                close_rx_live = false;
                if let Ok((code, why)) = r {
                    // Retired: renewals go on the newer session.
                    renewals = None;
                    if code == ErrorCode::REPLACED {
                        // Finish what this session carries first: new streams go to the new one.
                        let now = Instant::now();
                        draining = Some((now + DRAIN_GRACE, now + DRAIN_MAX, code, why));
                    } else {
                        session.close(code, why);
                    }
                }
            }
        }
    }
}

/// The application close code the gateway ended a QUIC `link` with, if it did (a refusal
/// right after the handshake shows at the first stream operation, as any error).
fn app_close_code(link: &Link) -> Option<ErrorCode> {
    match link {
        Link::Quic(c) => match c.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                Some(ErrorCode::from(u64::from(close.error_code)))
            }
            _ => None,
        },
        Link::H2(_) => None,
    }
}

/// True when the gateway ended the TLS handshake of `link` with the `certificate_revoked`
/// alert (over QUIC a refused client certificate shows only after the handshake, at the first
/// stream operation).
fn refused_as_revoked(link: &Link) -> bool {
    /// TLS alert `certificate_revoked`.
    const CERTIFICATE_REVOKED: u8 = 44;
    match link {
        Link::Quic(c) => matches!(
            c.close_reason(),
            Some(quinn::ConnectionError::ConnectionClosed(close))
                if close.error_code == quinn::TransportErrorCode::crypto(CERTIFICATE_REVOKED)
        ),
        Link::H2(_) => false,
    }
}
