//! What the agent reports about itself: live sessions (for `/readyz` and metrics) and the
//! reconnect delays it chose (observable, so the jitter can be checked from outside).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// One live session as the agent sees it.
#[derive(Clone, Debug)]
pub struct SessionStatus {
    /// The gateway address dialed.
    pub gateway: String,
    /// Session id assigned by the gateway.
    pub session_id: String,
    /// The gateway replica holding it (`Welcome.replica_id`; empty from an older gateway).
    pub replica: String,
    /// Transport (`quic`).
    pub transport: &'static str,
    /// When `Welcome` arrived.
    pub since: SystemTime,
    /// Last heartbeat RTT.
    pub rtt: Option<Duration>,
}

/// Shared status of one agent process.
#[derive(Debug, Default)]
pub struct AgentStatus {
    sessions: Mutex<BTreeMap<u64, SessionStatus>>,
    last_error: Mutex<Option<String>>,
    last_session_end: Mutex<Option<String>>,
    delays: Mutex<Vec<Duration>>,
    preflight: Mutex<Option<crate::doctor::Report>>,
    /// A session was up at some point since the agent started.
    ever_connected: std::sync::atomic::AtomicBool,
}

impl AgentStatus {
    pub(crate) fn session_up(&self, key: u64, s: SessionStatus) {
        self.ever_connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut m = self.sessions.lock().expect("status lock");
        m.insert(key, s);
        metrics::gauge!("tether_agent_sessions_active").set(m.len() as f64);
    }

    pub(crate) fn session_rtt(&self, key: u64, rtt: Duration) {
        if let Some(s) = self.sessions.lock().expect("status lock").get_mut(&key) {
            s.rtt = Some(rtt);
        }
    }

    pub(crate) fn session_down(&self, key: u64) {
        let mut m = self.sessions.lock().expect("status lock");
        m.remove(&key);
        metrics::gauge!("tether_agent_sessions_active").set(m.len() as f64);
    }

    pub(crate) fn set_error(&self, e: String) {
        *self.last_error.lock().expect("status lock") = Some(e);
    }

    pub(crate) fn set_session_end(&self, reason: String) {
        *self.last_session_end.lock().expect("status lock") = Some(reason);
    }

    pub(crate) fn record_delay(&self, d: Duration) {
        let mut v = self.delays.lock().expect("status lock");
        if v.len() >= 1024 {
            v.remove(0);
        }
        v.push(d);
        metrics::histogram!("tether_agent_reconnect_delay_seconds").record(d.as_secs_f64());
    }

    /// Live sessions.
    pub fn sessions(&self) -> Vec<SessionStatus> {
        self.sessions
            .lock()
            .expect("status lock")
            .values()
            .cloned()
            .collect()
    }

    /// Sessions up now.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("status lock").len()
    }

    /// True while at least one session is up.
    pub fn connected(&self) -> bool {
        !self.sessions.lock().expect("status lock").is_empty()
    }

    /// The last connection error, if any: why the latest session or dial attempt ended.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("status lock").clone()
    }

    /// Why the last established session ended, if one has: kept apart from [`last_error`]
    /// so that the failed redials which usually follow do not hide it.
    ///
    /// [`last_error`]: Self::last_error
    pub fn last_session_end(&self) -> Option<String> {
        self.last_session_end.lock().expect("status lock").clone()
    }

    /// Reconnect delays chosen so far (most recent last, at most 1024).
    pub fn reconnect_delays(&self) -> Vec<Duration> {
        self.delays.lock().expect("status lock").clone()
    }

    /// True once a session was up at some point since the agent started.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps the last network preflight (run while no gateway could be reached).
    pub(crate) fn set_preflight(&self, report: crate::doctor::Report) {
        *self.preflight.lock().expect("status lock") = Some(report);
    }

    /// The last network preflight, if one ran.
    pub fn preflight(&self) -> Option<crate::doctor::Report> {
        self.preflight.lock().expect("status lock").clone()
    }

    /// The `/readyz` body.
    pub fn readiness(&self) -> tether_runtime::ops::Readiness {
        let sessions: Vec<_> = self
            .sessions()
            .into_iter()
            .map(|s| {
                serde_json::json!({
                    "gateway": s.gateway,
                    "session_id": s.session_id,
                    "replica": s.replica,
                    "transport": s.transport,
                    "rtt_ms": s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                })
            })
            .collect();
        tether_runtime::ops::Readiness {
            ready: !sessions.is_empty(),
            detail: serde_json::json!({
                "sessions": sessions,
                "last_error": self.last_error(),
                "last_session_end": self.last_session_end(),
                "preflight": self.preflight().map(|p| serde_json::json!({
                    "at": p.at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "can_connect": p.can_connect(),
                    "failures": p.failures(),
                })),
            }),
        }
    }
}
