//! Feature layer: the commands feature's memory. Each agent's unfinished commands, lanes,
//! pending count and delivery permits sit behind that agent's own lock ([`AgentState`]), so two
//! agents' commands never wait for each other; what all agents share (the id index, the recently
//! finished commands, the watchers' feed) is split in shards whose locks are held only for one
//! lookup or insert.
//!
//! Lock order: an agent's lock, then (optionally) one shard lock. Never two agents' locks at
//! once, and never an agent's lock while a shard lock is held: [`Agents::run`] looks the agent
//! up under the map's shard lock, releases it, then takes the agent's.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use tunnel_proto::AgentId;

use super::delivery::AgentPermits;
use super::record::{CommandRecord, CommandState};

/// Shards of every shared map: enough that agents rarely share one, few enough to walk.
const SHARDS: usize = 64;
/// Events buffered for slow watchers before they are dropped with RESOURCE_EXHAUSTED.
const EVENT_BUFFER: usize = 8192;
/// Recently finished commands kept in memory (see [`State::recent`]), over all shards.
const RECENT_KEPT: usize = 4096;
/// Commands whose last published version is remembered across replicas (see
/// [`State::published`]), over all shards.
const PUBLISHED_KEPT: usize = 16_384;

/// Locks `m`; a panic while holding one of these locks would be a bug in this module, and the
/// state it guards stays usable: keep serving.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === Sharded ===

/// `T` split in [`SHARDS`] parts by a key's hash, each behind its own lock.
pub(super) struct Sharded<T> {
    hasher: RandomState,
    shards: Box<[Mutex<T>]>,
}

impl<T: Default> Sharded<T> {
    fn new() -> Self {
        Sharded {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(T::default())).collect(),
        }
    }
}

impl<T> Sharded<T> {
    /// The shard of `key`, locked.
    fn shard<K: Hash + ?Sized>(&self, key: &K) -> MutexGuard<'_, T> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        lock(&self.shards[i])
    }

    /// Every shard, one after another.
    fn each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        self.shards.iter().map(lock)
    }
}

/// A bounded map that forgets its oldest insertions first.
struct Bounded<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Default for Bounded<V> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Bounded<V> {
    /// Inserts or replaces `key`'s value; beyond `max` keys the oldest go.
    fn insert(&mut self, key: &str, value: V, max: usize) {
        if self.map.insert(key.to_owned(), value).is_none() {
            self.order.push_back(key.to_owned());
            while self.order.len() > max {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

// === One agent ===

/// One agent's part of the state, behind the agent's own lock.
pub(super) struct AgentState {
    /// Unique among all the agent states this process made; a new one when the agent's lanes
    /// are retired ([`AgentState::retire`]). A lane runner carries the generation it was started
    /// in and stops when it finds another: its lanes were retired, or this state was dropped
    /// and made anew.
    pub(super) generation: u64,
    /// Dropped from the map (idle): whoever locked it after looks the agent up again.
    detached: bool,
    /// The agent's commands not in a final state, by id.
    pub(super) active: HashMap<String, CommandRecord>,
    /// Ids waiting or being delivered, per ordering key, in order. A lane with an entry here has
    /// a running task.
    pub(super) lanes: HashMap<String, VecDeque<String>>,
    /// Commands not final (in `active`) plus Submits reserved but not yet stored, for
    /// `limits.pending_commands_per_agent`; kept as commands come and go, never counted.
    /// (Across replicas PostgreSQL counts them.)
    pub(super) pending: u32,
    /// Permits for concurrent deliveries and for buffering their outputs, while a lane has work.
    pub(super) permits: Option<AgentPermits>,
}

impl AgentState {
    fn new(generation: u64) -> Self {
        AgentState {
            generation,
            detached: false,
            active: HashMap::new(),
            lanes: HashMap::new(),
            pending: 0,
            permits: None,
        }
    }

    /// Nothing here any more: the state can leave the map.
    fn idle(&self) -> bool {
        self.active.is_empty()
            && self.lanes.is_empty()
            && self.pending == 0
            && self
                .permits
                .as_ref()
                .is_none_or(|p| Arc::strong_count(&p.deliveries) == 1)
    }

    pub(super) fn release_pending(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// Appends `id` to its lane; true when the lane was idle, so its runner must be started.
    pub(super) fn enqueue(&mut self, ordering_key: &str, id: &str) -> bool {
        let q = self.lanes.entry(ordering_key.to_owned()).or_default();
        q.push_back(id.to_owned());
        q.len() == 1
    }
}

/// Every agent with commands in memory, each behind its own lock.
pub(super) struct Agents {
    map: Sharded<HashMap<AgentId, Arc<Mutex<AgentState>>>>,
    generations: AtomicU64,
}

impl Agents {
    fn new() -> Self {
        Agents {
            map: Sharded::new(),
            generations: AtomicU64::new(1),
        }
    }

    /// A generation no agent state had before.
    pub(super) fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    fn entry(&self, agent: &AgentId, create: bool) -> Option<Arc<Mutex<AgentState>>> {
        let mut shard = self.map.shard(agent);
        if let Some(e) = shard.get(agent) {
            return Some(e.clone());
        }
        if !create {
            return None;
        }
        let e = Arc::new(Mutex::new(AgentState::new(self.next_generation())));
        shard.insert(agent.clone(), e.clone());
        Some(e)
    }

    /// Runs `f` on `agent`'s state under its lock; `None` when the agent has none.
    pub(super) fn run<R>(
        &self,
        agent: &AgentId,
        f: impl FnOnce(&mut AgentState) -> R,
    ) -> Option<R> {
        self.run_in(agent, false, f)
    }

    /// Runs `f` on `agent`'s state under its lock, making it if needed.
    pub(super) fn run_new<R>(&self, agent: &AgentId, f: impl FnOnce(&mut AgentState) -> R) -> R {
        match self.run_in(agent, true, f) {
            Some(r) => r,
            None => unreachable!("an agent state is made when missing"),
        }
    }

    fn run_in<R>(
        &self,
        agent: &AgentId,
        create: bool,
        f: impl FnOnce(&mut AgentState) -> R,
    ) -> Option<R> {
        let mut f = Some(f);
        loop {
            let entry = self.entry(agent, create)?;
            let mut st = lock(&entry);
            if st.detached {
                // Dropped from the map between the lookup and the lock: it is gone from the map
                // already, so the next lookup finds the new one (or none).
                continue;
            }
            let f = f.take()?;
            let r = f(&mut st);
            self.settle(agent, &entry, &mut st);
            return Some(r);
        }
    }

    /// Drops an idle state from the map (under its own lock, so nobody changes it meanwhile).
    fn settle(&self, agent: &AgentId, entry: &Arc<Mutex<AgentState>>, st: &mut AgentState) {
        if !st.idle() {
            return;
        }
        st.detached = true;
        let mut shard = self.map.shard(agent);
        if shard.get(agent).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            shard.remove(agent);
        }
    }

    /// Runs `f` on every agent's state, one agent at a time.
    pub(super) fn each(&self, mut f: impl FnMut(&AgentId, &mut AgentState)) {
        let all: Vec<(AgentId, Arc<Mutex<AgentState>>)> = self
            .map
            .each()
            .flat_map(|shard| {
                shard
                    .iter()
                    .map(|(a, e)| (a.clone(), e.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (agent, entry) in all {
            let mut st = lock(&entry);
            if st.detached {
                continue;
            }
            f(&agent, &mut st);
            self.settle(&agent, &entry, &mut st);
        }
    }

    /// Agents with a state in memory.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.each().map(|s| s.len()).sum()
    }
}

// === Shared ===

/// The commands feature's memory: the agents' states and what they share.
pub(super) struct State {
    /// Each agent's unfinished commands and lanes.
    pub(super) agents: Agents,
    /// The agent of every command in some agent's `active`, by id (for Get, Cancel and Watch by
    /// id). Written under that agent's lock.
    index: Sharded<HashMap<String, AgentId>>,
    /// The last commands that reached a final state (as watchers see them), so reads never see
    /// an older state from the store while its final write is still on its way.
    recent: Sharded<Bounded<Arc<CommandRecord>>>,
    /// Every transition, as watchers see it: sent under the command's agent's lock, so one
    /// command's events are in the order of its versions.
    events: broadcast::Sender<Arc<CommandRecord>>,
    /// Across replicas only: the last version shown to watchers per command, so a change
    /// published here when made is not published again when the feed brings it back, and a
    /// stale one never follows a newer one.
    published: Option<Sharded<Bounded<u64>>>,
}

impl State {
    /// The state of one gateway, or of a replica (`replicated`: changes also come back on the
    /// cluster feed, see [`State::published`]).
    pub(super) fn new(replicated: bool) -> Self {
        State {
            agents: Agents::new(),
            index: Sharded::new(),
            recent: Sharded::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            published: replicated.then(Sharded::new),
        }
    }

    /// A new receiver of every transition from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<CommandRecord>> {
        self.events.subscribe()
    }

    /// The agent of an unfinished command held in memory.
    pub(super) fn agent_of(&self, id: &str) -> Option<AgentId> {
        self.index.shard(id).get(id).cloned()
    }

    /// A command that reached a final state lately, as watchers saw it.
    pub(super) fn recent(&self, id: &str) -> Option<Arc<CommandRecord>> {
        self.recent.shard(id).map.get(id).cloned()
    }

    /// An active command's record (payload shared), wherever its agent is.
    pub(super) fn active(&self, id: &str) -> Option<CommandRecord> {
        let agent = self.agent_of(id)?;
        self.agents
            .run(&agent, |st| st.active.get(id).cloned())
            .flatten()
    }

    /// Makes `cmd` one of `st`'s active commands (`st` is its agent's, locked).
    pub(super) fn activate(&self, st: &mut AgentState, cmd: CommandRecord) {
        count(cmd.state, 1);
        self.index
            .shard(cmd.id.as_str())
            .insert(cmd.id.clone(), cmd.agent.clone());
        st.active.insert(cmd.id.clone(), cmd);
    }

    /// Forgets `st`'s active commands without a state change, and retires its lanes: their
    /// runners stop at their next step.
    pub(super) fn forget(&self, st: &mut AgentState, agents: &Agents) {
        for (id, c) in st.active.drain() {
            count(c.state, -1);
            self.index.shard(id.as_str()).remove(&id);
            st.pending = st.pending.saturating_sub(1);
        }
        st.lanes.clear();
        st.generation = agents.next_generation();
    }

    /// Moves an active command of `st` to `to`, its version one up, after `edit`; published to
    /// watchers when `publish`. `None` when it is not active; `Some(Some(record))` when it
    /// reached a final state (and left `active`: here it is), `Some(None)` otherwise.
    pub(super) fn change(
        &self,
        st: &mut AgentState,
        id: &str,
        to: CommandState,
        publish: bool,
        edit: impl FnOnce(&mut CommandRecord),
    ) -> Option<Option<CommandRecord>> {
        let cmd = st.active.get_mut(id)?;
        let from = cmd.state;
        cmd.state = to;
        cmd.version += 1;
        edit(cmd);
        if from != to {
            count(from, -1);
            if !to.is_final() {
                count(to, 1);
            }
        }
        if !to.is_final() {
            if publish {
                self.publish(Arc::new(cmd.view()));
            }
            return Some(None);
        }
        let view = Arc::new(cmd.view());
        if publish {
            self.publish(view.clone());
        }
        let done = st.active.remove(id)?;
        st.release_pending();
        self.index.shard(id).remove(id);
        self.recent.shard(id).insert(id, view, RECENT_KEPT / SHARDS);
        Some(Some(done))
    }

    /// [`State::change`], published, returning the new record.
    pub(super) fn transition(
        &self,
        st: &mut AgentState,
        id: &str,
        to: CommandState,
        edit: impl FnOnce(&mut CommandRecord),
    ) -> Option<CommandRecord> {
        match self.change(st, id, to, true, edit)? {
            Some(done) => Some(done),
            None => st.active.get(id).cloned(),
        }
    }

    /// Sends a command, as watchers see it, to the watchers (across replicas: unless a newer or
    /// the same version was sent already).
    pub(super) fn publish(&self, view: Arc<CommandRecord>) {
        if let Some(published) = &self.published {
            let mut seen = published.shard(view.id.as_str());
            match seen.map.get_mut(&view.id) {
                Some(v) if *v >= view.version => return,
                Some(v) => *v = view.version,
                None => seen.insert(&view.id, view.version, PUBLISHED_KEPT / SHARDS),
            }
            // Still under the shard's lock: this command's events leave in version order.
            let _ = self.events.send(view);
            return;
        }
        let _ = self.events.send(view);
    }
}

/// Counts a command into or out of `tether_gateway_commands{state}` (commands not final, by
/// state). The gauge adds atomically: no lock of ours around it.
pub(super) fn count(state: CommandState, delta: i64) {
    metrics::gauge!("tether_gateway_commands", "state" => state.name()).increment(delta as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::record::NewCommand;

    fn cmd(agent: &str, id: &str) -> CommandRecord {
        let mut c = CommandRecord::queued(
            NewCommand {
                agent: agent.parse().unwrap(),
                kind: "k".into(),
                payload: bytes::Bytes::from_static(b"p"),
                content_type: String::new(),
                idempotency_key: String::new(),
                ordering_key: String::new(),
                ttl: None,
                trace_context: Default::default(),
            },
            std::time::SystemTime::now(),
            None,
        );
        c.id = id.into();
        c
    }

    #[test]
    fn an_agent_state_leaves_the_map_when_idle_and_a_late_locker_finds_the_new_one() {
        let state = State::new(false);
        let a: AgentId = "t/a".parse().unwrap();
        let g1 = state.agents.run_new(&a, |st| {
            st.pending += 1;
            state.activate(st, cmd("t/a", "c1"));
            st.enqueue("", "c1");
            st.generation
        });
        assert_eq!(state.agent_of("c1"), Some(a.clone()));
        // A holder of the old entry (looked up before it was dropped) must not use it.
        let old = state.agents.entry(&a, false).unwrap();
        state.agents.run(&a, |st| {
            let done = state
                .change(st, "c1", CommandState::Succeeded, true, |_| {})
                .unwrap()
                .unwrap();
            assert_eq!(done.version, 1);
            st.lanes.clear();
        });
        assert_eq!(state.agents.len(), 0, "idle: gone");
        assert!(lock(&old).detached);
        assert_eq!(state.agent_of("c1"), None);
        assert_eq!(state.recent("c1").unwrap().state, CommandState::Succeeded);
        assert!(state.recent("c1").unwrap().payload.is_empty());
        let g2 = state.agents.run_new(&a, |st| {
            st.pending += 1;
            st.generation
        });
        assert_ne!(g1, g2, "a lane runner of the old state stops");
        assert_eq!(state.agents.len(), 1);
    }

    #[test]
    fn one_agents_lock_held_does_not_stop_another_agents_commands() {
        let state = State::new(false);
        let (a, b): (AgentId, AgentId) = ("t/a".parse().unwrap(), "t/b".parse().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            state.agents.run_new(&a, |_held| {
                // While `a`'s lock is held, `b`'s commands come, change and finish.
                s.spawn(|| {
                    state.agents.run_new(&b, |st| {
                        st.pending += 1;
                        state.activate(st, cmd("t/b", "b1"));
                        state.transition(st, "b1", CommandState::Running, |_| {});
                        state.change(st, "b1", CommandState::Failed, true, |_| {});
                    });
                    let _ = tx.send(state.recent("b1").map(|c| c.state));
                });
                let got = rx.recv_timeout(std::time::Duration::from_secs(10));
                assert_eq!(got, Ok(Some(CommandState::Failed)), "b waited for a");
            });
        });
    }

    #[test]
    fn agents_made_and_dropped_from_many_threads_at_once_leave_nothing_behind() {
        let state = State::new(false);
        let agents: Vec<AgentId> = (0..4).map(|i| format!("t/a{i}").parse().unwrap()).collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (state, agents) = (&state, &agents);
                s.spawn(move || {
                    for n in 0..300 {
                        let agent = &agents[(t + n) % agents.len()];
                        let id = format!("c{t}-{n}");
                        state.agents.run_new(agent, |st| {
                            st.pending += 1;
                            state.activate(st, cmd(&agent.to_string(), &id));
                        });
                        assert_eq!(state.agent_of(&id).as_ref(), Some(agent));
                        let done = state.agents.run(agent, |st| {
                            state.transition(st, &id, CommandState::Delivered, |_| {});
                            state.transition(st, &id, CommandState::Succeeded, |_| {})
                        });
                        let done = done.flatten().expect("its agent's state kept it");
                        assert_eq!((done.state, done.version), (CommandState::Succeeded, 2));
                    }
                });
            }
        });
        assert_eq!(state.agents.len(), 0);
        assert!(state.index.each().all(|s| s.is_empty()));
    }

    #[test]
    fn forgetting_an_agent_retires_its_lanes_and_releases_its_commands() {
        let state = State::new(true);
        let a: AgentId = "t/a".parse().unwrap();
        let g = state.agents.run_new(&a, |st| {
            for id in ["c1", "c2"] {
                st.pending += 1;
                state.activate(st, cmd("t/a", id));
                st.enqueue("", id);
            }
            st.generation
        });
        let mut feed = state.subscribe();
        state
            .agents
            .run(&a, |st| {
                assert!(
                    state
                        .transition(st, "c1", CommandState::Delivered, |_| {})
                        .is_some()
                );
                state.forget(st, &state.agents);
            })
            .unwrap();
        assert!(state.agents.run(&a, |st| st.generation).is_none());
        assert_ne!(state.agents.run_new(&a, |st| st.generation), g);
        assert_eq!(state.agent_of("c2"), None);
        // Across replicas an event comes once per version.
        let ev = feed.try_recv().unwrap();
        assert_eq!((ev.id.as_str(), ev.version), ("c1", 1));
        state.publish(ev.clone());
        assert!(
            feed.try_recv().is_err(),
            "the same version again is not sent"
        );
    }
}
