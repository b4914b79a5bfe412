//! Transport layer: admission of new tunnel connections (`[limits]`).
//!
//! - [`Admission`]: new tunnel handshakes per source address (a token bucket per IP, in a
//!   bounded map), and the gateway-wide handshake rate above which QUIC answers unvalidated
//!   addresses with a stateless Retry. Decided before any cryptography.
//! - [`AgentSessions`]: tunnel connections per agent identity.
//!
//! Every refusal is counted in `tether_gateway_limit_rejections_total{limit}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunnel_proto::AgentId;

use crate::config::LimitsConfig;
use crate::metrics::Limit;
use crate::quota::{AgentPermit, Bucket, MAX_TRACKED, PerAgent};

// === Admission ===

/// What to do with a new connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead with the handshake.
    Accept,
    /// QUIC only: answer with a stateless Retry (the address must prove it receives).
    Retry,
    /// Refuse at once: the source address exceeded its handshake rate.
    Refuse,
}

#[derive(Debug)]
struct AdmissionState {
    buckets: HashMap<IpAddr, Bucket>,
    /// QUIC handshakes in progress per source address (entries leave at zero).
    in_progress: HashMap<IpAddr, usize>,
    window_start: Instant,
    this_window: u32,
    last_window: u32,
}

/// Handshake admission for the tunnel listeners (QUIC and TCP share the per-address buckets).
#[derive(Debug)]
pub struct Admission {
    per_second: f64,
    burst: f64,
    retry_above: u32,
    state: Mutex<AdmissionState>,
}

impl Admission {
    /// From `[limits]`.
    pub fn new(cfg: &LimitsConfig) -> Arc<Admission> {
        Arc::new(Admission {
            per_second: f64::from(cfg.handshakes_per_second),
            burst: f64::from(cfg.handshake_burst),
            retry_above: cfg.retry_above,
            state: Mutex::new(AdmissionState {
                buckets: HashMap::new(),
                in_progress: HashMap::new(),
                window_start: Instant::now(),
                this_window: 0,
                last_window: 0,
            }),
        })
    }

    /// Decides on a QUIC Initial from `ip` (`validated`: it came back with a Retry or address
    /// validation token). Unvalidated Initials while the gateway-wide rate is above
    /// `retry_above` get a Retry and take nothing from the address's bucket (the address may
    /// be spoofed); the rest take one token or are refused.
    pub fn admit_quic(&self, ip: IpAddr, validated: bool, now: Instant) -> Admit {
        let mut st = self.lock();
        let window = Duration::from_secs(1);
        let elapsed = now.saturating_duration_since(st.window_start);
        if elapsed >= window {
            // A window with nothing in it before this one counts as zero.
            st.last_window = if elapsed >= 2 * window {
                0
            } else {
                st.this_window
            };
            st.this_window = 0;
            st.window_start = now;
        }
        st.this_window = st.this_window.saturating_add(1);
        let rate = st.this_window.max(st.last_window);
        if !validated && rate > self.retry_above {
            return Admit::Retry;
        }
        self.take(&mut st, ip, now)
    }

    /// Decides on a TCP connection from `ip` (TCP's own handshake validated the address).
    pub fn admit_tcp(&self, ip: IpAddr, now: Instant) -> Admit {
        let mut st = self.lock();
        self.take(&mut st, ip, now)
    }

    /// A slot for one QUIC handshake from `ip`, held until the handshake ends; `None` when
    /// `ip` already has `max` in progress. Without it, one address whose Initials never lead
    /// anywhere could hold every gateway-wide handshake slot for `tunnel.handshake_timeout`.
    pub fn begin_handshake(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<HandshakeSlot> {
        let mut st = self.lock();
        let n = st.in_progress.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            admission: self.clone(),
            ip,
        })
    }

    /// `limits.handshake_burst`.
    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Source addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.lock().buckets.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, st: &mut AdmissionState, ip: IpAddr, now: Instant) -> Admit {
        if st.buckets.len() >= MAX_TRACKED && !st.buckets.contains_key(&ip) {
            let (rate, burst) = (self.per_second, self.burst);
            st.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if st.buckets.len() >= MAX_TRACKED / 2 {
                st.buckets.clear();
            }
        }
        let b = st.buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Admit::Accept
        } else {
            Admit::Refuse
        }
    }
}

/// One QUIC handshake in progress from an address; released when dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut st = self.admission.lock();
        if let Some(n) = st.in_progress.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.in_progress.remove(&self.ip);
            }
        }
    }
}

// === AgentSessions ===

/// One tunnel connection counted against its agent.
pub type SessionPermit = AgentPermit;

/// Tunnel connections per agent identity (every instance, QUIC and TCP), capped at
/// `limits.sessions_per_agent`. Counted from the moment the TLS handshake names the agent, so
/// a connection that never sends `Hello` counts too: an agent certificate cannot make the
/// gateway hold more connections than this, whatever they carry.
#[derive(Debug)]
pub struct AgentSessions(PerAgent);

impl AgentSessions {
    /// At most `max` connections per agent.
    pub fn new(max: u32) -> AgentSessions {
        AgentSessions(PerAgent::new(Limit::SessionsPerAgent, max))
    }

    /// A permit for one more connection of `agent`, held for the connection's life; or
    /// (counted) how many it holds already.
    pub fn acquire(&self, agent: &AgentId) -> Result<SessionPermit, u32> {
        self.0.acquire(agent)
    }

    /// The cap.
    pub fn max(&self) -> u32 {
        self.0.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: u32, burst: u32, retry_above: u32) -> LimitsConfig {
        LimitsConfig {
            handshakes_per_second: per_second,
            handshake_burst: burst,
            retry_above,
            ..Default::default()
        }
    }

    #[test]
    fn a_source_address_gets_its_burst_then_its_rate() {
        let a = Admission::new(&limits(10, 3, u32::MAX));
        let ip: IpAddr = [127, 0, 0, 2].into();
        let other: IpAddr = [127, 0, 0, 3].into();
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(a.admit_quic(ip, false, t), Admit::Accept);
        }
        assert_eq!(a.admit_quic(ip, false, t), Admit::Refuse);
        assert_eq!(a.admit_tcp(ip, t), Admit::Refuse);
        assert_eq!(a.admit_quic(other, false, t), Admit::Accept);
        // 100 ms at 10/s: one more.
        let later = t + Duration::from_millis(100);
        assert_eq!(a.admit_tcp(ip, later), Admit::Accept);
        assert_eq!(a.admit_tcp(ip, later), Admit::Refuse);
    }

    #[test]
    fn retry_only_above_the_gateway_wide_rate_and_only_for_unvalidated_addresses() {
        let a = Admission::new(&limits(1000, 1000, 5));
        let t = Instant::now();
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        for i in 0..5 {
            assert_eq!(a.admit_quic(ip(i), false, t), Admit::Accept);
        }
        assert_eq!(a.admit_quic(ip(9), false, t), Admit::Retry);
        assert_eq!(a.admit_quic(ip(9), true, t), Admit::Accept);
        // The next second still remembers the busy one; a quiet second after it does not.
        let next = t + Duration::from_millis(1100);
        assert_eq!(a.admit_quic(ip(9), false, next), Admit::Retry);
        let quiet = t + Duration::from_millis(3500);
        assert_eq!(a.admit_quic(ip(9), false, quiet), Admit::Accept);
        let always = Admission::new(&limits(1000, 1000, 0));
        assert_eq!(always.admit_quic(ip(1), false, t), Admit::Retry);
    }

    #[test]
    fn the_address_map_stays_bounded() {
        let a = Admission::new(&limits(1, 1, u32::MAX));
        let t = Instant::now();
        for i in 0..(MAX_TRACKED as u32 * 3) {
            a.admit_tcp(IpAddr::from(i.to_be_bytes()), t);
            assert!(a.tracked() <= MAX_TRACKED);
        }
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_handshakes_in_progress() {
        let a = Admission::new(&limits(10, 10, 0));
        let ip: IpAddr = [127, 0, 0, 2].into();
        let held: Vec<_> = (0..3).map(|_| a.begin_handshake(ip, 3).unwrap()).collect();
        assert!(a.begin_handshake(ip, 3).is_none());
        assert!(a.begin_handshake([127, 0, 0, 3].into(), 3).is_some());
        drop(held);
        assert!(a.begin_handshake(ip, 3).is_some());
        assert!(a.lock().in_progress.is_empty(), "entries leave at zero");
    }

    #[test]
    fn agent_sessions_are_capped_per_identity_and_released() {
        let s = AgentSessions::new(2);
        let a: AgentId = "t/a".parse().unwrap();
        let b: AgentId = "t/b".parse().unwrap();
        let p1 = s.acquire(&a).unwrap();
        let _p2 = s.acquire(&a).unwrap();
        assert_eq!(s.acquire(&a).unwrap_err(), 2);
        let _q = s.acquire(&b).unwrap();
        drop(p1);
        assert!(s.acquire(&a).is_ok());
    }
}
