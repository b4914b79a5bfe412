//! Session layer: which new agent sessions this gateway takes, and which of its agents it asks
//! to move: the drain, the fleet's fair share, the handshake budget and rebalancing.
//!
//! A session is decided on once the agent's `Hello` is read, before it is registered (nothing
//! of it reaches the registry, the presence table or the command leases when it is turned away).
//! It is turned away with `BUSY` and a retry-after, which agents honour with jitter, when:
//! - this gateway is draining (shutting down): another replica takes it at once;
//! - the agent said this replica is one it must avoid (it holds a session here already, or this
//!   replica asked it to move): an agent keeps its sessions on distinct replicas;
//! - this replica holds more than its share of the fleet's sessions (the mean per live replica
//!   times `1 + tunnel.fair_share_margin`, plus 2) and the agent holds a session elsewhere: an
//!   agent with no session at all is always admitted, since an unbalanced fleet is better than
//!   an unreachable agent;
//! - more sessions were admitted this second than `limits.new_sessions_per_second` (the
//!   handshake budget): the retry-after grows with the excess, so a reconnect storm is spread
//!   over the time the budget needs to absorb it.
//!
//! Rebalancing ([`rebalance`]): every `tunnel.rebalance_interval`, a replica above its share
//! sends `GoAway` (kind `rebalance`, this replica to avoid) to a few of its sessions, at most a
//! twentieth of them each time; their agents move make-before-break. That is how the fleet
//! evens out after a scale-out, when the new replica starts with nothing.
//!
//! The fleet's counts come from the cluster (`server.rs` feeds [`Balance::set_fleet`] from
//! PostgreSQL, where each replica writes its own count about once a second); without replicas
//! there is no share to keep and the live count is 1.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_runtime::CancellationToken;
use tunnel_proto::message::{GoAway, GoAwayKind, Hello};

use crate::tunnel::registry::{Registry, SessionCommand};

/// A fleet view older than this is not used to turn sessions away (the cluster could not be
/// read): better unbalanced than wrongly refused.
const FLEET_STALE: Duration = Duration::from_secs(10);
/// Sessions above the margin's share tolerated before turning agents away, so a small fleet
/// does not flap over one session.
const SHARE_SLACK: usize = 2;
/// When a draining replica, or one the agent must avoid, turns it away: another replica can
/// take it at once.
const RETRY_ELSEWHERE: Duration = Duration::from_millis(500);
/// When a replica above its share turns an agent away: it holds a session elsewhere, so there
/// is no hurry.
const RETRY_OVER_SHARE: Duration = Duration::from_secs(5);
/// The longest retry-after the budget asks for.
const RETRY_BUDGET_MAX: Duration = Duration::from_secs(30);
/// At most this fraction of a replica's sessions is asked to move per rebalancing round.
const REBALANCE_FRACTION: usize = 20;

/// Why a session was turned away (the `reason` label of
/// `tether_gateway_sessions_turned_away_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnAway {
    /// This gateway is draining.
    Draining,
    /// The agent must avoid this replica (it holds a session here, or was asked to move).
    Avoided,
    /// This replica holds more than its share of the fleet's sessions.
    FairShare,
    /// More sessions were admitted this second than the handshake budget.
    Budget,
}

impl TurnAway {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnAway::Draining => "draining",
            TurnAway::Avoided => "avoided",
            TurnAway::FairShare => "fair_share",
            TurnAway::Budget => "budget",
        }
    }
}

/// What to do with a session whose `Hello` arrived.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Answer `Welcome`.
    Welcome,
    /// Answer `Close` with `BUSY`, `reason` and the retry-after.
    Refuse {
        /// Why.
        why: TurnAway,
        /// For the agent's log.
        reason: String,
        /// When to come back.
        retry_after: Duration,
    },
}

/// The other live replicas as the cluster last showed them.
#[derive(Clone, Copy, Debug, Default)]
pub struct FleetView {
    /// Live replicas, not draining, this one excluded.
    pub others: u32,
    /// Sessions they hold together.
    pub others_sessions: u64,
}

#[derive(Debug)]
struct State {
    fleet: Option<(FleetView, Instant)>,
    /// Sessions admitted in the current one-second window, and in the one before.
    window_start: Instant,
    admitted: u32,
    admitted_last: u32,
    /// Sessions asking in the current window and the one before (admitted or not).
    asked: u32,
    asked_last: u32,
}

/// See the module docs. One per gateway, shared by every session's driver.
#[derive(Debug)]
pub struct Balance {
    replica_id: String,
    margin: f64,
    budget: u32,
    draining: AtomicBool,
    state: Mutex<State>,
}

impl Balance {
    /// A gateway known as `replica_id` (`Welcome.replica_id`), turning sessions away above
    /// `margin` over the fleet's mean and above `budget` new sessions a second (0: none).
    pub fn new(replica_id: String, margin: f64, budget: u32) -> Balance {
        Balance {
            replica_id,
            margin,
            budget,
            draining: AtomicBool::new(false),
            state: Mutex::new(State {
                fleet: None,
                window_start: Instant::now(),
                admitted: 0,
                admitted_last: 0,
                asked: 0,
                asked_last: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This gateway among replicas, as agents see it in `Welcome`.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// From now on every new session is turned away, and this replica counts as gone in
    /// [`Balance::live_replicas`].
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// True once draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The other live replicas, read from the cluster at `now`.
    pub fn set_fleet(&self, view: FleetView, now: Instant) {
        self.lock().fleet = Some((view, now));
    }

    /// Live replicas not draining, this one included unless it drains (at least 1): what
    /// `Welcome` and heartbeat acks announce.
    pub fn live_replicas(&self) -> u32 {
        let others = self.lock().fleet.map_or(0, |(v, _)| v.others);
        let me = u32::from(!self.is_draining());
        (others + me).max(1)
    }

    /// The most sessions this replica should hold with `local` held now; `None` without a
    /// recent fleet view (or without replicas).
    fn share_limit(&self, local: usize, now: Instant) -> Option<usize> {
        let (view, at) = self.lock().fleet?;
        if now.saturating_duration_since(at) > FLEET_STALE || view.others == 0 {
            return None;
        }
        let total = view.others_sessions as f64 + local as f64;
        let mean = total / f64::from(view.others + 1);
        Some((mean * (1.0 + self.margin)).ceil() as usize + SHARE_SLACK)
    }

    /// Sessions above this replica's share with `local` held now (0 when within it).
    pub fn excess(&self, local: usize, now: Instant) -> usize {
        self.share_limit(local, now)
            .map_or(0, |limit| local.saturating_sub(limit))
    }

    /// Decides on a session whose `Hello` is `hello`, with `local` sessions held here now.
    /// An admitted session counts against the budget.
    pub fn decide(&self, hello: &Hello, local: usize, now: Instant) -> Verdict {
        if self.is_draining() {
            return Verdict::Refuse {
                why: TurnAway::Draining,
                reason: format!(
                    "replica {} is draining (shutting down): dial again, another replica takes \
                     the session",
                    self.replica_id
                ),
                retry_after: RETRY_ELSEWHERE,
            };
        }
        if hello.avoid_replicas.contains(&self.replica_id) {
            return Verdict::Refuse {
                why: TurnAway::Avoided,
                reason: format!(
                    "this agent asked not to land on replica {} (it holds a session there, or \
                     was asked to move): dial again through the load balancer",
                    self.replica_id
                ),
                retry_after: RETRY_ELSEWHERE,
            };
        }
        if hello.sessions_held > 0
            && let Some(limit) = self.share_limit(local, now)
            && local >= limit
        {
            return Verdict::Refuse {
                why: TurnAway::FairShare,
                reason: format!(
                    "replica {} holds {local} sessions, above its share of the fleet ({limit} \
                     with tunnel.fair_share_margin): keep the sessions you hold and dial again",
                    self.replica_id
                ),
                retry_after: RETRY_OVER_SHARE,
            };
        }
        let mut st = self.lock();
        let window = Duration::from_secs(1);
        let elapsed = now.saturating_duration_since(st.window_start);
        if elapsed >= window {
            let stale = elapsed >= 2 * window;
            st.admitted_last = if stale { 0 } else { st.admitted };
            st.asked_last = if stale { 0 } else { st.asked };
            st.admitted = 0;
            st.asked = 0;
            st.window_start = now;
        }
        st.asked = st.asked.saturating_add(1);
        if self.budget > 0 && st.admitted.max(st.admitted_last) >= self.budget {
            // Spread the agents asking over the seconds the budget needs to take them all.
            let asking = f64::from(st.asked.max(st.asked_last));
            let secs = (asking / f64::from(self.budget)).max(1.0);
            let retry_after = Duration::from_secs_f64(secs).min(RETRY_BUDGET_MAX);
            return Verdict::Refuse {
                why: TurnAway::Budget,
                reason: format!(
                    "replica {} admits at most {} new sessions a second \
                     (limits.new_sessions_per_second): dial again after the retry-after",
                    self.replica_id, self.budget
                ),
                retry_after,
            };
        }
        st.admitted = st.admitted.saturating_add(1);
        Verdict::Welcome
    }
}

/// Every `interval` until `shutdown`: when this replica holds more than its share, asks some
/// of its sessions to move (see the module docs).
pub async fn rebalance(
    balance: std::sync::Arc<Balance>,
    registry: std::sync::Arc<Registry>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    loop {
        let jitter = interval.mul_f64(0.8 + rand::random::<f64>() * 0.4);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jitter) => {}
        }
        if balance.is_draining() {
            return;
        }
        let sessions = registry.sessions();
        let excess = balance.excess(sessions.len(), Instant::now());
        if excess == 0 {
            continue;
        }
        let moves = excess.min((sessions.len() / REBALANCE_FRACTION).max(1));
        // Sessions that can move cleanly first (agents that leave), never one asked already.
        let mut candidates: Vec<_> = sessions
            .into_iter()
            .filter(|s| s.is_usable() && !s.is_asked_to_go())
            .collect();
        candidates.sort_by_key(|s| (!s.agent_leaves(), rand::random::<u32>()));
        tracing::info!(excess, moves, replica = %balance.replica_id(),
            "above this replica's share of the fleet's sessions: asking agents to move");
        for s in candidates.into_iter().take(moves) {
            metrics::counter!("tether_gateway_go_aways_total", "kind" => "rebalance").increment(1);
            s.command(SessionCommand::GoAway(GoAway {
                reason: "rebalancing: this replica holds more than its share of sessions".into(),
                reconnect_within_ms: (interval / 2).as_millis() as u64,
                avoid_replica: balance.replica_id().to_owned(),
                kind: GoAwayKind::Rebalance as i32,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(held: u32, avoid: &[&str]) -> Hello {
        Hello {
            sessions_held: held,
            avoid_replicas: avoid.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn refused(v: &Verdict) -> Option<(TurnAway, Duration)> {
        match v {
            Verdict::Refuse {
                why, retry_after, ..
            } => Some((*why, *retry_after)),
            Verdict::Welcome => None,
        }
    }

    #[test]
    fn a_draining_or_avoided_replica_turns_every_session_away_to_another() {
        let b = Balance::new("r1#2".into(), 0.25, 0);
        let now = Instant::now();
        assert_eq!(b.decide(&hello(0, &[]), 0, now), Verdict::Welcome);
        let (why, after) = refused(&b.decide(&hello(1, &["r2#1", "r1#2"]), 0, now)).unwrap();
        assert_eq!((why, after), (TurnAway::Avoided, RETRY_ELSEWHERE));
        // Another process of the same name is another replica.
        assert_eq!(b.decide(&hello(1, &["r1#1"]), 0, now), Verdict::Welcome);
        assert_eq!(b.live_replicas(), 1);
        b.set_draining();
        let (why, _) = refused(&b.decide(&hello(0, &[]), 0, now)).unwrap();
        assert_eq!(why, TurnAway::Draining);
        assert_eq!(b.live_replicas(), 1, "never less than one");
    }

    #[test]
    fn above_its_share_a_replica_turns_away_only_agents_that_hold_a_session_elsewhere() {
        let b = Balance::new("r1#1".into(), 0.25, 0);
        let now = Instant::now();
        // No fleet view: no share to keep.
        assert_eq!(b.decide(&hello(1, &[]), 1000, now), Verdict::Welcome);
        b.set_fleet(
            FleetView {
                others: 2,
                others_sessions: 200,
            },
            now,
        );
        assert_eq!(b.live_replicas(), 3);
        // 100 each: 100 · 1.25 + 2 = 127 is the limit.
        assert_eq!(b.decide(&hello(1, &[]), 100, now), Verdict::Welcome);
        assert_eq!(b.excess(100, now), 0);
        // With 160 here: the mean is 120, the limit 152.
        let (why, after) = refused(&b.decide(&hello(1, &[]), 160, now)).unwrap();
        assert_eq!((why, after), (TurnAway::FairShare, RETRY_OVER_SHARE));
        assert_eq!(b.excess(160, now), 8);
        // An agent with no session anywhere is always taken.
        assert_eq!(b.decide(&hello(0, &[]), 160, now), Verdict::Welcome);
        // A view gone stale decides nothing.
        let later = now + FLEET_STALE + Duration::from_secs(1);
        assert_eq!(b.decide(&hello(1, &[]), 160, later), Verdict::Welcome);
        assert_eq!(b.excess(160, later), 0);
    }

    #[test]
    fn the_budget_admits_so_many_a_second_and_spreads_the_rest_over_the_time_it_needs() {
        let b = Balance::new("r1#1".into(), 0.25, 10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.decide(&hello(0, &[]), 0, t0), Verdict::Welcome);
        }
        // 30 more ask in the same second: 40 asked of a budget of 10 take four seconds.
        let mut last = None;
        for _ in 0..30 {
            last = refused(&b.decide(&hello(0, &[]), 0, t0));
            assert_eq!(last.unwrap().0, TurnAway::Budget);
        }
        assert_eq!(last.unwrap().1, Duration::from_secs(4));
        // The next second still counts the last one's admissions (a sliding view).
        let t1 = t0 + Duration::from_millis(1100);
        assert_eq!(
            refused(&b.decide(&hello(0, &[]), 0, t1)).unwrap().0,
            TurnAway::Budget
        );
        // Two quiet seconds later the budget is whole again.
        let t3 = t0 + Duration::from_secs(4);
        assert_eq!(b.decide(&hello(0, &[]), 0, t3), Verdict::Welcome);
        // No budget: no limit.
        let free = Balance::new("r".into(), 0.25, 0);
        for _ in 0..10_000 {
            assert_eq!(free.decide(&hello(0, &[]), 0, t0), Verdict::Welcome);
        }
    }
}
