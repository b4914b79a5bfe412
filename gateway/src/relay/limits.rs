//! Feature layer: relayed calls and TCP streams in flight per agent
//! (`limits.streams_per_agent`).

use tunnel_proto::AgentId;

use crate::metrics::Limit;
use crate::quota::{AgentPermit, PerAgent};

/// One stream counted against its agent.
pub type StreamPermit = AgentPermit;

/// Streams in flight per agent, capped at `limits.streams_per_agent`.
#[derive(Debug)]
pub struct AgentStreams(PerAgent);

impl AgentStreams {
    /// At most `max` streams per agent.
    pub fn new(max: u32) -> AgentStreams {
        AgentStreams(PerAgent::new(Limit::StreamsPerAgent, max))
    }

    /// A permit for one more stream to `agent`, or `None` (counted) when it has `max` already.
    pub fn acquire(&self, agent: &AgentId) -> Option<StreamPermit> {
        self.0.acquire(agent).ok()
    }

    /// The cap.
    pub fn max(&self) -> u32 {
        self.0.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
