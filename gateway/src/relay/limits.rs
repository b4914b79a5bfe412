//! Feature layer: relayed calls and TCP streams in flight per agent
//! (`limits.streams_per_agent`).

use tunnel_proto::AgentId;

use crate::metrics::Limit;
use crate::quota::{AgentPermit, PerAgent};
use crate::tunnel::registry::RelayedStream;

/// One stream counted against its agent (and, once opened, on the session it went on, so a
/// session the agent left closes only when its streams are done). Hold it as long as the
/// stream lives.
#[derive(Debug)]
pub struct StreamPermit {
    _agent: AgentPermit,
    session: Option<RelayedStream>,
}

impl StreamPermit {
    /// The stream goes on `session`'s session.
    pub(crate) fn on_session(mut self, session: RelayedStream) -> StreamPermit {
        self.session = Some(session);
        self
    }
}

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
        self.0.acquire(agent).ok().map(|p| StreamPermit {
            _agent: p,
            session: None,
        })
    }

    /// Streams open to `agent` now.
    pub fn open(&self, agent: &AgentId) -> u32 {
        self.0.count(agent)
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
