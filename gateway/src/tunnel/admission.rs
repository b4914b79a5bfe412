//! Transport + feature layers: limits against abuse (`[limits]`), and their metrics.
//!
//! - [`Admission`]: new tunnel handshakes per source address (a token bucket per IP, in a
//!   bounded map), and the gateway-wide handshake rate above which QUIC answers unvalidated
//!   addresses with a stateless Retry. Decided before any cryptography.
//! - [`AgentStreams`]: relayed calls and TCP streams in flight per agent.
//! - [`AgentSessions`]: tunnel connections per agent identity.
//! - [`Connections`]: northbound connections, in total and per source address.
//! - [`raise_open_files_limit`]: the process's file-descriptor limit, raised to what it may.
//!
//! Every refusal is counted in `tether_gateway_limit_rejections_total{limit}`; every connection
//! closed for idling in `tether_gateway_idle_timeouts_total{where}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunnel_proto::AgentId;

use crate::config::LimitsConfig;

/// Counts one refusal by `limit` (`streams_per_agent`, `pending_commands_per_agent`,
/// `handshake_rate`, `message_size`, ...).
pub fn count_rejection(limit: &'static str) {
    metrics::counter!("tether_gateway_limit_rejections_total", "limit" => limit).increment(1);
}

/// Counts one connection or stream closed because it sent nothing in time; `place` is the
/// listener (`tunnel_quic`, `tunnel_tcp`, `enrollment`, `northbound_tls`, `northbound_idle`).
pub fn count_idle_timeout(place: &'static str) {
    metrics::counter!("tether_gateway_idle_timeouts_total", "where" => place).increment(1);
}

// === Admission ===

/// Source addresses tracked at most. When the map is full, addresses whose bucket has refilled
/// are forgotten (they would start full anyway); if most are still busy (a flood from many
/// addresses, which only spoofing makes cheap, and which Retry answers), the map is cleared:
/// the memory stays bounded and the cost stays amortised O(1) per handshake.
const MAX_TRACKED: usize = 65_536;

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
struct Bucket {
    tokens: f64,
    at: Instant,
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

// === Per agent ===

type PerAgentCounts = Arc<Mutex<HashMap<AgentId, u32>>>;

/// Something counted per agent, capped at `max`; the map holds only agents with a count.
#[derive(Debug)]
struct PerAgent {
    max: u32,
    /// The `limit` label of refusals.
    limit: &'static str,
    open: PerAgentCounts,
}

/// One thing counted against its agent; released when dropped.
#[derive(Debug)]
pub struct AgentPermit {
    agent: AgentId,
    open: PerAgentCounts,
}

/// One stream counted against its agent.
pub type StreamPermit = AgentPermit;

/// One tunnel connection counted against its agent.
pub type SessionPermit = AgentPermit;

impl PerAgent {
    fn new(limit: &'static str, max: u32) -> PerAgent {
        PerAgent {
            max,
            limit,
            open: Arc::default(),
        }
    }

    /// A permit, or (counted as a refusal) how many `agent` holds already.
    fn acquire(&self, agent: &AgentId) -> Result<AgentPermit, u32> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(agent.clone()).or_default();
        if *n >= self.max {
            let held = *n;
            drop(open);
            count_rejection(self.limit);
            return Err(held);
        }
        *n += 1;
        Ok(AgentPermit {
            agent: agent.clone(),
            open: self.open.clone(),
        })
    }
}

impl Drop for AgentPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.agent);
            }
        }
    }
}

// === KeyedRate ===

/// A token bucket per key (a caller, say): `rate` per second refilled continuously, `burst`
/// at most, in a map of at most [`MAX_TRACKED`] keys (when full, keys whose bucket has
/// refilled are forgotten: they would start full anyway).
#[derive(Debug)]
pub struct KeyedRate<K> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedRate<K> {
    /// `per_minute` per key, with a burst of as many.
    pub fn per_minute(per_minute: u32) -> KeyedRate<K> {
        KeyedRate {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(per_minute.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `key`'s bucket; false when it has none.
    pub fn take(&self, key: &K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(key) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_TRACKED {
                // Every key is busy: forget the lot rather than grow (each starts full again).
                buckets.clear();
            }
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// === Shares ===

/// Places taken at once, at most `total` in all and `per_key` for one key (a source address,
/// say), so that one key cannot take every place.
#[derive(Debug)]
pub struct Shares<K: std::hash::Hash + Eq> {
    total: usize,
    per_key: usize,
    taken: Mutex<(usize, HashMap<K, usize>)>,
}

/// Why [`Shares::take`] gave no place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    Total,
    /// The key has its share.
    Key,
}

impl<K: std::hash::Hash + Eq + Clone> Shares<K> {
    /// `total` places, `per_key` of them for one key at most.
    pub fn new(total: usize, per_key: usize) -> Arc<Shares<K>> {
        Arc::new(Shares {
            total,
            per_key,
            taken: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for `key`, held until the returned value is dropped.
    pub fn take(self: &Arc<Self>, key: &K) -> Result<Share<K>, Full> {
        let mut t = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if t.0 >= self.total {
            return Err(Full::Total);
        }
        let n = t.1.entry(key.clone()).or_default();
        if *n >= self.per_key {
            return Err(Full::Key);
        }
        *n += 1;
        t.0 += 1;
        Ok(Share {
            shares: self.clone(),
            key: key.clone(),
        })
    }

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// A place of [`Shares`]; given back when dropped.
#[derive(Debug)]
pub struct Share<K: std::hash::Hash + Eq + Clone> {
    shares: Arc<Shares<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Share<K> {
    fn drop(&mut self) {
        let mut t = self.shares.taken.lock().unwrap_or_else(|e| e.into_inner());
        t.0 -= 1;
        if let Some(n) = t.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                t.1.remove(&self.key);
            }
        }
    }
}

// === AgentStreams ===

/// Streams in flight per agent, capped at `limits.streams_per_agent`.
#[derive(Debug)]
pub struct AgentStreams(PerAgent);

impl AgentStreams {
    /// At most `max` streams per agent.
    pub fn new(max: u32) -> AgentStreams {
        AgentStreams(PerAgent::new("streams_per_agent", max))
    }

    /// A permit for one more stream to `agent`, or `None` (counted) when it has `max` already.
    pub fn acquire(&self, agent: &AgentId) -> Option<StreamPermit> {
        self.0.acquire(agent).ok()
    }

    /// The cap.
    pub fn max(&self) -> u32 {
        self.0.max
    }
}

// === AgentSessions ===

/// Tunnel connections per agent identity (every instance, QUIC and TCP), capped at
/// `limits.sessions_per_agent`. Counted from the moment the TLS handshake names the agent, so
/// a connection that never sends `Hello` counts too: an agent certificate cannot make the
/// gateway hold more connections than this, whatever they carry.
#[derive(Debug)]
pub struct AgentSessions(PerAgent);

impl AgentSessions {
    /// At most `max` connections per agent.
    pub fn new(max: u32) -> AgentSessions {
        AgentSessions(PerAgent::new("sessions_per_agent", max))
    }

    /// A permit for one more connection of `agent`, held for the connection's life; or
    /// (counted) how many it holds already.
    pub fn acquire(&self, agent: &AgentId) -> Result<SessionPermit, u32> {
        self.0.acquire(agent)
    }

    /// The cap.
    pub fn max(&self) -> u32 {
        self.0.max
    }
}

// === Northbound connections ===

#[derive(Debug, Default)]
struct ConnectionCounts {
    total: u32,
    /// Entries leave at zero: the map never holds more addresses than open connections.
    per_address: HashMap<IpAddr, u32>,
}

/// Northbound connections open at once, capped in total (`limits.northbound_connections`) and
/// per source address (`limits.northbound_connections_per_address`). Checked as a connection
/// is accepted, before TLS: a refused one costs a file descriptor for an instant.
#[derive(Debug)]
pub struct Connections {
    total: u32,
    per_address: u32,
    counts: Mutex<ConnectionCounts>,
}

/// One open northbound connection; released when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    /// From `[limits]`.
    pub fn new(total: u32, per_address: u32) -> Arc<Connections> {
        Arc::new(Connections {
            total,
            per_address,
            counts: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, or the limit it would exceed (counted as a refusal):
    /// `northbound_connections_per_address` or `northbound_connections`.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, &'static str> {
        let mut c = self.lock();
        let limit = if c.per_address.get(&ip).copied().unwrap_or(0) >= self.per_address {
            "northbound_connections_per_address"
        } else if c.total >= self.total {
            "northbound_connections"
        } else {
            c.total += 1;
            *c.per_address.entry(ip).or_default() += 1;
            return Ok(ConnectionSlot {
                connections: self.clone(),
                ip,
            });
        };
        drop(c);
        count_rejection(limit);
        Err(limit)
    }

    /// Connections open now.
    pub fn open_now(&self) -> u32 {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.connections.lock();
        c.total -= 1;
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

// === File descriptors ===

/// Raises the soft limit on open files to the hard limit (Linux starts most processes at a
/// soft 1,024 whatever the hard limit allows) and returns the limit now in force. Every
/// connection on every listener costs one: with too few, `northbound_connections` cannot be
/// reached before the process runs out and agents on the TCP fallback are shut out.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
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

    #[test]
    fn northbound_connections_are_capped_per_address_then_in_total() {
        let c = Connections::new(3, 2);
        let (x, y, z): (IpAddr, IpAddr, IpAddr) = (
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            [10, 0, 0, 3].into(),
        );
        let x1 = c.open(x).unwrap();
        let _x2 = c.open(x).unwrap();
        assert_eq!(c.open(x).unwrap_err(), "northbound_connections_per_address");
        let _y1 = c.open(y).unwrap();
        assert_eq!(c.open(z).unwrap_err(), "northbound_connections");
        drop(x1);
        assert_eq!(c.open_now(), 2);
        let _z1 = c.open(z).unwrap();
        assert_eq!(c.lock().per_address.len(), 3);
    }

    #[test]
    fn agent_streams_are_capped_and_released() {
        let s = AgentStreams::new(2);
        let a: AgentId = "t/a".parse().unwrap();
        let b: AgentId = "t/b".parse().unwrap();
        let p1 = s.acquire(&a).unwrap();
        let _p2 = s.acquire(&a).unwrap();
        assert!(s.acquire(&a).is_none());
        let _q = s.acquire(&b).unwrap();
        drop(p1);
        assert!(s.acquire(&a).is_some());
    }

    #[test]
    fn keyed_rates_give_each_key_its_burst_then_its_rate() {
        let rate = KeyedRate::per_minute(60);
        let t0 = Instant::now();
        for _ in 0..60 {
            assert!(rate.take(&"a", t0));
        }
        assert!(!rate.take(&"a", t0), "burst spent");
        assert!(rate.take(&"b", t0), "another key has its own");
        assert!(rate.take(&"a", t0 + Duration::from_secs(1)), "one a second");
        assert!(!rate.take(&"a", t0 + Duration::from_secs(1)));
    }

    #[test]
    fn shares_cap_each_key_and_the_total_and_come_back() {
        let shares = Shares::new(3, 2);
        let a1 = shares.take(&"a").unwrap();
        let _a2 = shares.take(&"a").unwrap();
        assert_eq!(shares.take(&"a").unwrap_err(), Full::Key);
        let _b = shares.take(&"b").unwrap();
        assert_eq!(shares.take(&"c").unwrap_err(), Full::Total);
        drop(a1);
        assert_eq!(shares.taken(), 2);
        shares.take(&"c").unwrap();
    }
}
