//! Feature layer: relayed calls and bytes per agent, kept in memory for the console and
//! `Agents/List` (how an agent's calls ended by status code, its failing calls, the bytes each
//! way; a tenant's failing calls).
//!
//! Cheap on the relay's path: an agent's counters are looked up once per call (a read lock
//! and a hash lookup; an allocation only the first time the gateway relays to that agent),
//! then every frame adds to them with one relaxed atomic add. Nothing is written to the store.
//! Only calls routed to an agent the registry knows are counted, so the map holds at most one
//! entry per agent this gateway has relayed to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tonic::Code;
use tunnel_proto::AgentId;

/// Calls ended per status code (index: the code's number, 0 to 16).
pub type Tally = [u64; 17];

/// One agent's relayed calls and bytes since the gateway started.
#[derive(Debug, Default)]
pub struct AgentTraffic {
    codes: [AtomicU64; 17],
    to_agent: AtomicU64,
    from_agent: AtomicU64,
}

impl AgentTraffic {
    /// Counts a call (or TCP stream) that ended with `code`.
    pub fn ended(&self, code: Code) {
        self.codes[(code as usize).min(16)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` bytes from the caller to the agent.
    pub fn to_agent(&self, n: u64) {
        self.to_agent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` bytes from the agent to the caller.
    pub fn from_agent(&self, n: u64) {
        self.from_agent.fetch_add(n, Ordering::Relaxed);
    }

    /// What was counted so far.
    pub fn snapshot(&self) -> Traffic {
        let mut tally = [0; 17];
        for (t, c) in tally.iter_mut().zip(&self.codes) {
            *t = c.load(Ordering::Relaxed);
        }
        Traffic {
            tally,
            bytes_to_agent: self.to_agent.load(Ordering::Relaxed),
            bytes_from_agent: self.from_agent.load(Ordering::Relaxed),
        }
    }
}

/// A copy of one agent's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Calls ended, by status code.
    pub tally: Tally,
    /// Bytes caller → agent.
    pub bytes_to_agent: u64,
    /// Bytes agent → caller.
    pub bytes_from_agent: u64,
}

impl Traffic {
    /// Calls ended.
    pub fn calls(&self) -> u64 {
        total(&self.tally)
    }
}

/// Relayed calls and bytes by agent since the gateway started.
#[derive(Debug, Default)]
pub struct CallOutcomes {
    by_agent: RwLock<HashMap<AgentId, Arc<AgentTraffic>>>,
}

impl CallOutcomes {
    /// The counters of `agent`, created on its first call. Held for the length of a call, so
    /// its frames count without a lookup.
    pub fn agent(&self, agent: &AgentId) -> Arc<AgentTraffic> {
        if let Some(t) = self
            .by_agent
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
        {
            return t.clone();
        }
        self.by_agent
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent.clone())
            .or_default()
            .clone()
    }

    /// Counts a call to `agent` ending with `code`.
    pub fn record(&self, agent: &AgentId, code: Code) {
        self.agent(agent).ended(code);
    }

    /// The counters of `agent` (`<tenant>/<agent>`; zeros if it had no call).
    pub fn traffic(&self, agent: &str) -> Traffic {
        let Ok(id) = agent.parse::<AgentId>() else {
            return Traffic::default();
        };
        self.by_agent
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|t| t.snapshot())
            .unwrap_or_default()
    }

    /// The tally of `agent` (zeros if it had no call).
    pub fn of(&self, agent: &str) -> Tally {
        self.traffic(agent).tally
    }
}

/// Calls in a tally that did not end `OK`.
pub fn failed(t: &Tally) -> u64 {
    t[1..].iter().sum()
}

/// Calls in a tally.
pub fn total(t: &Tally) -> u64 {
    t.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        s.parse().unwrap()
    }

    #[test]
    fn outcomes_are_counted_per_agent_and_code() {
        let o = CallOutcomes::default();
        o.record(&id("t/a"), Code::Ok);
        o.record(&id("t/a"), Code::Unavailable);
        o.record(&id("t/a"), Code::Unavailable);
        o.record(&id("t/b"), Code::Ok);
        let a = o.of("t/a");
        assert_eq!(
            (total(&a), failed(&a), a[Code::Unavailable as usize]),
            (3, 2, 2)
        );
        assert_eq!(total(&o.of("t/none")), 0);
        assert_eq!(total(&o.of("not an id")), 0);
    }

    #[test]
    fn bytes_are_counted_per_agent_each_way_on_one_shared_counter() {
        let o = CallOutcomes::default();
        let a = o.agent(&id("t/a"));
        // A second call's lookup finds the same counters.
        assert!(Arc::ptr_eq(&a, &o.agent(&id("t/a"))));
        a.to_agent(5);
        a.from_agent(7);
        a.from_agent(3);
        o.agent(&id("t/b")).to_agent(100);
        let t = o.traffic("t/a");
        assert_eq!(
            (t.bytes_to_agent, t.bytes_from_agent, t.calls()),
            (5, 10, 0)
        );
        assert_eq!(o.traffic("t/b").bytes_to_agent, 100);
        assert_eq!(o.traffic("t/c"), Traffic::default());
    }

    #[test]
    fn counters_add_up_across_threads() {
        let o = Arc::new(CallOutcomes::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let o = o.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let t = o.agent(&id("t/a"));
                        t.to_agent(1);
                        t.from_agent(2);
                        t.ended(Code::Ok);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let t = o.traffic("t/a");
        assert_eq!(
            (t.calls(), t.bytes_to_agent, t.bytes_from_agent),
            (4000, 4000, 8000)
        );
    }
}
