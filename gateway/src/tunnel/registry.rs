//! Session layer: the registry of live agent sessions, and the event feed `Agents/Watch` reads.
//!
//! Several sessions per agent id are normal (replicas, make-before-break reconnects, an agent's
//! `connections`). The registry also remembers agents whose sessions all ended, so `Agents/Get`
//! can tell "known but offline" from "never seen".
//!
//! A session's state while it goes away is kept on its [`SessionInfo`]: asked to go (this
//! gateway sent `GoAway`), left (the agent said it is leaving: no new stream goes on it), and
//! the relayed streams open on it, so its driver closes a left session once they are done.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, broadcast};
use tunnel_proto::AgentId;
use tunnel_proto::message::{GoAway, Hello, LEAVE, ServiceEntry};

use crate::tls::CertFacts;

/// What is known about one live session; immutable once registered (but for the RTT).
#[derive(Debug)]
pub struct SessionInfo {
    /// Gateway-assigned id.
    pub session_id: String,
    /// The agent's identity, from its certificate.
    pub agent: AgentId,
    /// Where the connection came from.
    pub remote: SocketAddr,
    /// `quic` (or `tcp` for the fallback).
    pub transport: &'static str,
    /// When `Hello` was accepted.
    pub connected_at: SystemTime,
    /// The agent's `Hello`.
    pub hello: Hello,
    /// Negotiated protocol version.
    pub version: u32,
    /// The connection, for opening streams towards the agent.
    pub link: tether_runtime::transport::Link,
    /// SHA-256 of the agent's certificate (DER), lowercase hex.
    pub cert_fingerprint: String,
    /// Its serial number, lowercase hex.
    pub cert_serial: String,
    /// Its `notAfter` (the session may outlive it).
    pub cert_not_after: SystemTime,
    /// Its `notBefore` (Unix seconds): what a revocation's cut-off is compared with.
    pub cert_not_before: i64,
    /// The agent's `Hello` lists `leave`: it refuses streams it will not serve, and says when
    /// it leaves.
    pub agent_leaves: bool,
    rtt: Mutex<Option<Duration>>,
    /// Paused by the agent's owner, and why (its `Hello`, then its heartbeats).
    pause: Mutex<Option<String>>,
    /// The agent's allow-listed services (its `Hello`, then a heartbeat after a reload).
    services: Mutex<Arc<[ServiceEntry]>>,
    /// Sessions the agent process keeps in all, as reckoned when this one started
    /// ([`Hello::sessions_wanted`], at most the live replicas when the agent has one gateway
    /// address); 0: unknown. Set by the driver before registering.
    pub sessions_wanted: u32,
    /// The registry's orders not yet taken by the session's driver. A queue and a `Notify`
    /// rather than a channel: orders are rare (a `GoAway`, a revocation) and a tokio channel
    /// allocates its first block of 32 slots up front, 2.6 KB of every idle session.
    orders: Mutex<VecDeque<SessionCommand>>,
    order_ready: Notify,
    asked_to_go: AtomicBool,
    left: AtomicBool,
    /// Set by the driver when it closes the session because the agent left it and its relayed
    /// streams were done: a stream opened on it after that reached no one.
    closed_after_leave: AtomicBool,
    relaying: AtomicUsize,
    relay_idle: Notify,
}

impl SessionInfo {
    /// The facts of the certificate this session authenticated with, as a revocation list
    /// checks them.
    pub fn cert_facts(&self) -> CertFacts {
        CertFacts {
            fingerprint: self.cert_fingerprint.clone(),
            serial: self.cert_serial.clone(),
            not_before: self.cert_not_before,
            not_after: self
                .cert_not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        }
    }

    /// The last RTT the agent reported.
    pub fn rtt(&self) -> Option<Duration> {
        *self.rtt.lock().expect("rtt lock")
    }

    /// Records the RTT the agent reported.
    pub fn set_rtt(&self, rtt: Duration) {
        *self.rtt.lock().expect("rtt lock") = Some(rtt);
    }

    /// The agent says it is paused by its owner (`Some(reason)`) or not; true when that
    /// changed.
    pub fn set_pause(&self, pause: Option<String>) -> bool {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if *p == pause {
            return false;
        }
        tracing::info!(agent = %self.agent, session = %self.session_id, paused = pause.is_some(),
            reason = pause.as_deref().unwrap_or(""), "the agent's owner changed its pause");
        *p = pause;
        true
    }

    /// Paused by the agent's owner, and why.
    pub fn pause(&self) -> Option<String> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The agent's allow-list changed (a reload): these services now.
    pub fn set_services(&self, services: Vec<ServiceEntry>) {
        tracing::info!(agent = %self.agent, session = %self.session_id,
            services = ?services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            "the agent's allow-list changed");
        *self.services.lock().unwrap_or_else(|e| e.into_inner()) = services.into();
    }

    /// The agent's allow-listed services, names and kinds.
    pub fn services(&self) -> Arc<[ServiceEntry]> {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the session's driver to do something (nothing happens if the session has ended).
    pub fn command(&self, cmd: SessionCommand) {
        if matches!(cmd, SessionCommand::GoAway(_)) {
            self.asked_to_go.store(true, Ordering::Relaxed);
        }
        self.orders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(cmd);
        // One waiter, the driver; with none waiting the permit is kept for its next wait.
        self.order_ready.notify_one();
    }

    /// The registry's next order, for the session's driver (its only reader). Cancel-safe: an
    /// order is taken from the queue only when this returns it.
    pub async fn next_order(&self) -> SessionCommand {
        loop {
            let order = self
                .orders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            if let Some(order) = order {
                return order;
            }
            self.order_ready.notified().await;
        }
    }

    /// This gateway asked the agent to move the session elsewhere (`GoAway`).
    pub fn is_asked_to_go(&self) -> bool {
        self.asked_to_go.load(Ordering::Relaxed)
    }

    /// The agent said it is leaving the session: no new stream goes on it.
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    /// A stream may be opened on the session (the agent has not left it).
    pub fn is_usable(&self) -> bool {
        !self.has_left()
    }

    /// The agent announced `leave` in its `Hello` (see [`tunnel_proto::message::LEAVE`]).
    pub fn agent_leaves(&self) -> bool {
        self.agent_leaves
    }

    /// Records that the agent left the session (its driver calls this on `GoAway` from the
    /// agent).
    pub fn mark_left(&self) {
        self.left.store(true, Ordering::Release);
    }

    /// Records that the driver closed the session because the agent left it and its relayed
    /// streams were done.
    pub fn mark_closed_after_leave(&self) {
        self.closed_after_leave.store(true, Ordering::Release);
    }

    /// True once the driver closed the session after the agent left it, its relayed streams
    /// done: a stream that was opened on it anyway (it raced the close) reached no upstream,
    /// since the agent refuses every stream that arrives after it leaves.
    pub fn was_closed_after_leave(&self) -> bool {
        self.closed_after_leave.load(Ordering::Acquire)
    }

    /// Counts a relayed stream on this session until the guard is dropped.
    pub fn relay_stream(self: &Arc<Self>) -> RelayedStream {
        self.relaying.fetch_add(1, Ordering::AcqRel);
        RelayedStream(self.clone())
    }

    /// Relayed streams open on this session.
    pub fn relayed_streams(&self) -> usize {
        self.relaying.load(Ordering::Acquire)
    }

    /// Resolves once no relayed stream is open on this session (at once when none is).
    pub async fn relay_idle(&self) {
        loop {
            let notified = self.relay_idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.relayed_streams() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One relayed stream counted on its session ([`SessionInfo::relay_stream`]), until dropped.
#[derive(Debug)]
pub struct RelayedStream(Arc<SessionInfo>);

impl RelayedStream {
    /// The session the stream is on.
    pub fn session(&self) -> &Arc<SessionInfo> {
        &self.0
    }
}

impl Drop for RelayedStream {
    fn drop(&mut self) {
        if self.0.relaying.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.relay_idle.notify_waiters();
        }
    }
}

impl SessionInfo {
    /// A session whose `Hello` was accepted now, over `link`, authenticated with `cert`; and
    /// the receiving end of the orders the registry gives its driver.
    pub fn new(
        session_id: String,
        agent: AgentId,
        remote: SocketAddr,
        link: tether_runtime::transport::Link,
        (hello, version): (Hello, u32),
        cert: &CertFacts,
    ) -> SessionInfo {
        let agent_leaves = hello.capabilities.iter().any(|c| c == LEAVE);
        // Until the first heartbeat measures it: the handshake's (QUIC's estimate, or how long
        // the TLS handshake over TCP took).
        let rtt = link.initial_rtt();
        let pause = hello.paused.then(|| hello.pause_reason.clone());
        let services = hello.services.clone().into();
        let sessions_wanted = hello.sessions_wanted;
        SessionInfo {
            session_id,
            agent,
            remote,
            transport: link.transport().name(),
            connected_at: SystemTime::now(),
            hello,
            version,
            link,
            cert_fingerprint: cert.fingerprint.clone(),
            cert_serial: cert.serial.clone(),
            cert_not_after: cert.not_after_time(),
            cert_not_before: cert.not_before,
            agent_leaves,
            rtt: Mutex::new(rtt),
            pause: Mutex::new(pause),
            services: Mutex::new(services),
            sessions_wanted,
            orders: Mutex::default(),
            order_ready: Notify::new(),
            asked_to_go: AtomicBool::new(false),
            left: AtomicBool::new(false),
            closed_after_leave: AtomicBool::new(false),
            relaying: AtomicUsize::new(0),
            relay_idle: Notify::new(),
        }
    }
}

/// Orders the registry can give a session's driver.
#[derive(Clone, Debug)]
pub enum SessionCommand {
    /// Send this `GoAway`: the agent should reconnect (make-before-break, elsewhere when it
    /// names this replica to avoid) within its window.
    GoAway(GoAway),
    /// Close the session with this code and reason (e.g. `REVOKED`).
    Close(tunnel_proto::ErrorCode, String),
}

/// A connect or disconnect.
#[derive(Clone, Debug)]
pub enum RegistryEvent {
    /// A session was registered (at its `connected_at`).
    Connected(Arc<SessionInfo>),
    /// A session ended.
    Disconnected {
        /// The session.
        session: Arc<SessionInfo>,
        /// When.
        at: SystemTime,
        /// Why.
        reason: String,
    },
}

impl RegistryEvent {
    /// The session that connected or ended.
    pub fn session(&self) -> &Arc<SessionInfo> {
        match self {
            RegistryEvent::Connected(s) | RegistryEvent::Disconnected { session: s, .. } => s,
        }
    }
}

/// A point-in-time view of one agent.
#[derive(Clone, Debug)]
pub struct AgentSnapshot {
    /// The agent.
    pub id: AgentId,
    /// Its live sessions.
    pub sessions: Vec<Arc<SessionInfo>>,
    /// Now if connected, else when its last session ended.
    pub last_seen: SystemTime,
}

#[derive(Default)]
struct Entry {
    sessions: Vec<Arc<SessionInfo>>,
    last_seen: Option<SystemTime>,
}

/// Every live session in `(agent, session id)` order, and how many agents have one. Changed
/// only while the agents map is locked, so it always agrees with it; kept so that a snapshot
/// needs no sort and the gauges and counts no scan of every agent (both ran once per
/// register, unregister or command delivery: quadratic in the fleet size).
#[derive(Default)]
struct Live {
    sessions: BTreeMap<(AgentId, String), Arc<SessionInfo>>,
    agents: usize,
}

/// Told of every connect and disconnect, in order, synchronously (under the registry's lock):
/// must not block. The replicas' presence writer is one.
pub type RegistryObserver = Arc<dyn Fn(&RegistryEvent) + Send + Sync>;

/// Told when a live session's state that other replicas show changed (the agent's pause, its
/// allow-list): rare, never per heartbeat. Must not block.
pub type SessionUpdater = Arc<dyn Fn(&Arc<SessionInfo>) + Send + Sync>;

/// See the module docs.
pub struct Registry {
    agents: Mutex<HashMap<AgentId, Entry>>,
    live: Mutex<Live>,
    events: broadcast::Sender<RegistryEvent>,
    observer: std::sync::OnceLock<RegistryObserver>,
    updater: std::sync::OnceLock<SessionUpdater>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            agents: Mutex::new(HashMap::new()),
            live: Mutex::new(Live::default()),
            events: broadcast::channel(4096).0,
            observer: std::sync::OnceLock::new(),
            updater: std::sync::OnceLock::new(),
        }
    }
}

impl Registry {
    /// Adds a live session.
    pub fn register(&self, info: SessionInfo) -> Arc<SessionInfo> {
        let info = Arc::new(info);
        let mut agents = self.agents.lock().expect("registry lock");
        let entry = agents.entry(info.agent.clone()).or_default();
        entry.sessions.push(info.clone());
        let mut live = self.live.lock().expect("registry lock");
        if entry.sessions.len() == 1 {
            live.agents += 1;
        }
        live.sessions
            .insert((info.agent.clone(), info.session_id.clone()), info.clone());
        Self::publish_gauges(&live);
        drop(live);
        // Sent under the lock so a concurrent `subscribe` sees it either in its snapshot or in
        // its feed, never both and never neither.
        self.publish(RegistryEvent::Connected(info.clone()));
        info
    }

    /// Tells `observer` of every connect and disconnect from now on, unlike the broadcast feed
    /// never dropping one (a lagging feed subscriber loses events; a presence writer must not).
    /// Set once; a second call is ignored and returns false.
    pub fn set_observer(&self, observer: RegistryObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Tells `updater` of each change to a live session that other replicas show. Set once;
    /// a second call is ignored and returns false.
    pub fn set_updater(&self, updater: SessionUpdater) -> bool {
        self.updater.set(updater).is_ok()
    }

    /// The agent of `session` changed its pause or its allow-list.
    pub fn session_changed(&self, session: &Arc<SessionInfo>) {
        if let Some(u) = self.updater.get() {
            u(session);
        }
    }

    fn publish(&self, ev: RegistryEvent) {
        if let Some(o) = self.observer.get() {
            o(&ev);
        }
        let _ = self.events.send(ev);
    }

    /// Removes a session that ended.
    pub fn unregister(&self, session: &Arc<SessionInfo>, reason: String) {
        let mut agents = self.agents.lock().expect("registry lock");
        let Some(entry) = agents.get_mut(&session.agent) else {
            return;
        };
        let before = entry.sessions.len();
        entry.sessions.retain(|s| !Arc::ptr_eq(s, session));
        if entry.sessions.len() == before {
            return;
        }
        let now = SystemTime::now();
        entry.last_seen = Some(now);
        let mut live = self.live.lock().expect("registry lock");
        if entry.sessions.is_empty() {
            live.agents -= 1;
        }
        live.sessions
            .remove(&(session.agent.clone(), session.session_id.clone()));
        Self::publish_gauges(&live);
        drop(live);
        self.publish(RegistryEvent::Disconnected {
            session: session.clone(),
            at: now,
            reason,
        });
    }

    fn publish_gauges(live: &Live) {
        metrics::gauge!("tether_gateway_sessions_active").set(live.sessions.len() as f64);
        metrics::gauge!("tether_gateway_agents_connected").set(live.agents as f64);
    }

    fn snapshot(id: &AgentId, e: &Entry) -> AgentSnapshot {
        AgentSnapshot {
            id: id.clone(),
            sessions: e.sessions.clone(),
            last_seen: if e.sessions.is_empty() {
                e.last_seen.unwrap_or(SystemTime::UNIX_EPOCH)
            } else {
                SystemTime::now()
            },
        }
    }

    /// Every known agent, sorted by id.
    pub fn list(&self) -> Vec<AgentSnapshot> {
        let agents = self.agents.lock().expect("registry lock");
        let sorted: BTreeMap<_, _> = agents.iter().collect();
        sorted
            .into_iter()
            .map(|(id, e)| Self::snapshot(id, e))
            .collect()
    }

    /// One agent, if it was ever seen.
    pub fn get(&self, id: &AgentId) -> Option<AgentSnapshot> {
        let agents = self.agents.lock().expect("registry lock");
        agents.get(id).map(|e| Self::snapshot(id, e))
    }

    /// Runs `f` on `id`'s live sessions (in connection order) under the registry's lock, without
    /// copying them: for the relay's per-call pick. `None` when the agent was never seen. `f`
    /// must not block.
    pub fn with_sessions<T>(
        &self,
        id: &AgentId,
        f: impl FnOnce(&[Arc<SessionInfo>]) -> T,
    ) -> Option<T> {
        let agents = self.agents.lock().expect("registry lock");
        agents.get(id).map(|e| f(&e.sessions))
    }

    /// The newest live session of `id` the agent has not left, if it has one (no snapshot of
    /// the agent). A session the agent left takes no new stream: it is about to go.
    pub fn last_session(&self, id: &AgentId) -> Option<Arc<SessionInfo>> {
        let agents = self.agents.lock().expect("registry lock");
        agents
            .get(id)
            .and_then(|e| e.sessions.iter().rev().find(|s| s.is_usable()).cloned())
    }

    /// The live sessions now, and a feed of every change after them.
    pub fn subscribe(&self) -> (Vec<Arc<SessionInfo>>, broadcast::Receiver<RegistryEvent>) {
        let _agents = self.agents.lock().expect("registry lock");
        let rx = self.events.subscribe();
        let live = self.live.lock().expect("registry lock");
        (live.sessions.values().cloned().collect(), rx)
    }

    /// The feed of changes alone, without a snapshot: for waiters that only need to wake when
    /// something changes (a snapshot copies every live session).
    pub fn feed(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    /// Every live session.
    pub fn sessions(&self) -> Vec<Arc<SessionInfo>> {
        self.subscribe().0
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.live.lock().expect("registry lock").sessions.len()
    }

    /// Sends `GoAway` to every live session (no hint of where to go).
    pub fn go_away_all(&self, reason: &str, within: Duration) {
        self.send_go_away_all(&GoAway {
            reason: reason.to_owned(),
            reconnect_within_ms: within.as_millis() as u64,
            ..Default::default()
        });
    }

    /// Sends `go_away` to every live session.
    pub fn send_go_away_all(&self, go_away: &GoAway) {
        for s in self.sessions() {
            s.command(SessionCommand::GoAway(go_away.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::test_support::quic_pair;

    /// The registry's orders reach the session's driver once each and in order, whether given
    /// before it waits or while it waits, and a wait given up (another wake-up came first)
    /// loses none.
    #[tokio::test]
    async fn orders_reach_the_driver_once_each_in_order_whether_or_not_it_waits() {
        let (_agent_end, link, _endpoints) = quic_pair().await;
        let facts = CertFacts {
            fingerprint: "00".into(),
            serial: "01".into(),
            not_before: 0,
            not_after: i64::MAX,
        };
        let info = Arc::new(SessionInfo::new(
            "s".into(),
            "t/a".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            link,
            (Hello::default(), 1),
            &facts,
        ));
        let close = |why: &str| SessionCommand::Close(tunnel_proto::ErrorCode::REVOKED, why.into());
        let reason = |o: SessionCommand| match o {
            SessionCommand::Close(_, why) => why,
            SessionCommand::GoAway(_) => "go away".into(),
        };
        info.command(close("first"));
        info.command(SessionCommand::GoAway(GoAway::default()));
        assert!(info.is_asked_to_go());
        assert_eq!(reason(info.next_order().await), "first");
        assert_eq!(reason(info.next_order().await), "go away");
        // Nothing queued: a wait that loses to another wake-up takes nothing with it.
        tokio::select! {
            biased;
            o = info.next_order() => panic!("no order was given: {}", reason(o)),
            () = std::future::ready(()) => {}
        }
        info.command(close("after a lost wait"));
        assert_eq!(reason(info.next_order().await), "after a lost wait");
        // Given while the driver waits.
        let waiting = tokio::spawn({
            let info = info.clone();
            async move { reason(info.next_order().await) }
        });
        tokio::task::yield_now().await;
        info.command(close("while waiting"));
        assert_eq!(waiting.await.unwrap(), "while waiting");
    }
}
