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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tether_runtime::CancellationToken;
use tokio::sync::{mpsc, oneshot};
use tunnel_proto::message::Hello;
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};
use tunnel_proto::{Backoff, ErrorCode};

use crate::dialer::{Dialer, describe};
use crate::status::{AgentStatus, SessionStatus};

/// What a supervisor needs, shared by all of an agent's supervisors.
#[derive(Debug)]
pub struct Shared {
    /// Dialing material.
    pub dialer: Dialer,
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
}

enum Report {
    Established {
        id: u64,
    },
    GoAway {
        id: u64,
        within: Duration,
    },
    Ended {
        id: u64,
        established: bool,
        reason: String,
    },
}

struct Attempt {
    close: Option<oneshot::Sender<(ErrorCode, &'static str)>>,
    established: bool,
}

/// Keeps a session to `gateway` until `shutdown`.
pub async fn supervise(gateway: String, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(shared.initial_backoff, shared.max_backoff);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut attempts: HashMap<u64, Attempt> = HashMap::new();
    let mut next_id = 0u64;
    // When to dial next; `Some(now)` dials at once.
    let mut dial_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    // Set by GoAway until a replacement is established.
    let mut replacing = false;
    let far = Duration::from_secs(86_400 * 365);
    loop {
        let dial_timer =
            tokio::time::sleep_until(dial_at.unwrap_or_else(|| tokio::time::Instant::now() + far));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = dial_timer, if dial_at.is_some() => {
                dial_at = None;
                next_id += 1;
                let (close_tx, close_rx) = oneshot::channel();
                attempts.insert(next_id, Attempt { close: Some(close_tx), established: false });
                tokio::spawn(run_attempt(next_id, gateway.clone(), shared.clone(), tx.clone(), close_rx));
            }
            Some(report) = rx.recv() => match report {
                Report::Established { id } => {
                    backoff.reset();
                    replacing = false;
                    if let Some(a) = attempts.get_mut(&id) {
                        a.established = true;
                    }
                    // Make-before-break: the new session is up, retire the others.
                    for (other, a) in attempts.iter_mut() {
                        if *other != id && a.established
                            && let Some(c) = a.close.take() {
                                let _ = c.send((ErrorCode::REPLACED, "replaced by a new session"));
                            }
                    }
                }
                Report::GoAway { id, within } => {
                    tracing::info!(%gateway, attempt = id, ?within, "gateway asked us to move (GoAway)");
                    let dialing = attempts.values().any(|a| !a.established) || dial_at.is_some();
                    replacing = true;
                    if !dialing {
                        let spread = within.mul_f64(rand::random::<f64>() * 0.25);
                        dial_at = Some(tokio::time::Instant::now() + spread);
                    }
                }
                Report::Ended { id, established, reason } => {
                    attempts.remove(&id);
                    if established {
                        tracing::warn!(%gateway, %reason, "session ended");
                    } else {
                        tracing::warn!(%gateway, %reason, "could not establish a session");
                        metrics::counter!("tether_agent_connect_failures_total").increment(1);
                    }
                    shared.status.set_error(reason);
                    let live = attempts.values().any(|a| a.established);
                    let dialing = attempts.values().any(|a| !a.established) || dial_at.is_some();
                    if (!live || replacing) && !dialing {
                        let delay = backoff.next_delay(rand::random::<f64>());
                        shared.status.record_delay(delay);
                        tracing::info!(%gateway, ?delay, attempt = backoff.attempt(), "reconnecting after backoff");
                        dial_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            },
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
    tx: mpsc::UnboundedSender<Report>,
    close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
) {
    let mut established = false;
    let reason = match session(id, &gateway, &shared, &tx, close_rx, &mut established).await {
        Ok(r) | Err(r) => r,
    };
    if established {
        shared.status.session_down(id_key(&gateway, id));
    }
    let _ = tx.send(Report::Ended {
        id,
        established,
        reason,
    });
}

fn id_key(gateway: &str, id: u64) -> u64 {
    // Sessions of all supervisors share one status map: key by gateway and attempt.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    gateway.hash(&mut h);
    h.finish() ^ id
}

async fn session(
    id: u64,
    gateway: &str,
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Report>,
    mut close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    established: &mut bool,
) -> Result<String, String> {
    let dial = tokio::select! {
        d = tokio::time::timeout(shared.connect_timeout, shared.dialer.dial(gateway)) => match d {
            Ok(d) => d,
            Err(_) => {
                return Err(format!(
                    "gateway {gateway}: no answer within {:?} (is UDP to it allowed by the firewall?)",
                    shared.connect_timeout
                ));
            }
        },
        r = &mut close_rx => {
            return Ok(format!("closed before connecting: {}", r.map(|(_, why)| why).unwrap_or("supervisor gone")));
        }
    };
    let (endpoint, conn) = dial.map_err(|e| e.to_string())?;
    // Streams the gateway opens on this connection; ends with the connection.
    tokio::spawn(crate::relay::serve(conn.clone(), shared.services.clone()));
    let result = run_control(id, gateway, shared, tx, close_rx, established, &conn).await;
    // Give the close a moment to reach the gateway, without holding shutdown hostage.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

async fn run_control(
    id: u64,
    gateway: &str,
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Report>,
    mut close_rx: oneshot::Receiver<(ErrorCode, &'static str)>,
    established: &mut bool,
    conn: &quinn::Connection,
) -> Result<String, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| describe(&e))?;
    let mut session = AgentSession::new(
        AgentSessionConfig::new(shared.hello.clone()),
        Instant::now(),
    );
    let key = id_key(gateway, id);
    let mut buf = vec![0u8; 16 * 1024];
    let mut close_rx_live = true;
    loop {
        while let Some(bytes) = session.poll_transmit() {
            send.write_all(&bytes)
                .await
                .map_err(|e| format!("control stream: {e}"))?;
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                AgentEvent::Established(w) => {
                    *established = true;
                    tracing::info!(%gateway, session = %w.session_id, gateway_id = %w.gateway_id,
                        heartbeat_ms = w.heartbeat_interval_ms, "connected to gateway");
                    shared.status.session_up(
                        key,
                        SessionStatus {
                            gateway: gateway.to_owned(),
                            session_id: w.session_id,
                            transport: "quic",
                            since: SystemTime::now(),
                            rtt: None,
                        },
                    );
                    let _ = tx.send(Report::Established { id });
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
                    if !info.by_peer {
                        let _ = send.finish();
                    }
                    conn.close(info.code.0.into(), info.reason.as_bytes());
                    let who = if info.by_peer { "gateway" } else { "agent" };
                    return Ok(format!("closed by {who}: {} {}", info.code, info.reason));
                }
            }
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(quinn::ReadError::ConnectionLost(e)) => return Err(describe(&e)),
                Err(e) => return Err(format!("control stream: {e}")),
            },
            _ = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(Instant::now()),
            r = &mut close_rx, if close_rx_live => {
                close_rx_live = false;
                if let Ok((code, why)) = r {
                    session.close(code, why);
                }
            }
        }
    }
}
