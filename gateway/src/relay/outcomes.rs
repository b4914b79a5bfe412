//! Feature layer: how relayed calls and TCP streams ended, per agent, kept in memory for the
//! console (the agent's outcomes by status code, its failing calls; a tenant's failing calls).
//! Only calls routed to an agent the registry knows are counted, so the map holds at most one
//! entry per agent this gateway has relayed to.

use std::collections::HashMap;
use std::sync::Mutex;

use tonic::Code;

/// Calls ended per status code (index: the code's number, 0 to 16).
pub type Tally = [u64; 17];

/// Relayed calls' outcomes by agent (`<tenant>/<agent>`) since the gateway started.
#[derive(Debug, Default)]
pub struct CallOutcomes {
    by_agent: Mutex<HashMap<String, Tally>>,
}

impl CallOutcomes {
    /// Counts a call to `agent` ending with `code`.
    pub fn record(&self, agent: &str, code: Code) {
        let mut m = self.by_agent.lock().unwrap_or_else(|e| e.into_inner());
        let i = (code as usize).min(16);
        match m.get_mut(agent) {
            Some(t) => t[i] += 1,
            None => {
                let mut t = [0; 17];
                t[i] = 1;
                m.insert(agent.to_owned(), t);
            }
        }
    }

    /// The tally of `agent` (zeros if it had no call).
    pub fn of(&self, agent: &str) -> Tally {
        let m = self.by_agent.lock().unwrap_or_else(|e| e.into_inner());
        m.get(agent).copied().unwrap_or([0; 17])
    }

    /// Every agent's tally.
    pub fn all(&self) -> HashMap<String, Tally> {
        self.by_agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

    #[test]
    fn outcomes_are_counted_per_agent_and_code() {
        let o = CallOutcomes::default();
        o.record("t/a", Code::Ok);
        o.record("t/a", Code::Unavailable);
        o.record("t/a", Code::Unavailable);
        o.record("t/b", Code::Ok);
        let a = o.of("t/a");
        assert_eq!(
            (total(&a), failed(&a), a[Code::Unavailable as usize]),
            (3, 2, 2)
        );
        assert_eq!(total(&o.of("t/none")), 0);
        assert_eq!(o.all().len(), 2);
    }
}
