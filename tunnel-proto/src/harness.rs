//! A deterministic in-memory agent/gateway pair with a simulated clock, for tests.
//!
//! The control stream is reliable and ordered (QUIC or TLS underneath), so the harness models
//! what such a stream can do to the protocol: one-way latency, arbitrary splitting of writes into
//! reads, and partitions during which bytes are held back and then delivered late, in order.
//! Time only moves when [`Pair::step`] jumps to the next delivery or timer; nothing reads a clock
//! except [`Pair::new`], once, to get a base `Instant`.
//!
//! The other streams' machines ([`crate::stream`]) meet over a [`stream::StreamLink`].

pub mod stream;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::session::{
    AgentEvent, AgentSession, AgentSessionConfig, GatewayEvent, GatewaySession,
    GatewaySessionConfig,
};

/// Which end bytes travel to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum To {
    /// Towards the agent.
    Agent,
    /// Towards the gateway.
    Gateway,
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    to: To,
    bytes: Bytes,
}

/// An agent session and a gateway session joined by a simulated control stream.
#[derive(Debug)]
pub struct Pair {
    /// The agent side.
    pub agent: AgentSession,
    /// The gateway side.
    pub gateway: GatewaySession,
    /// Simulated now.
    pub now: Instant,
    start: Instant,
    latency: Duration,
    in_flight: VecDeque<InFlight>,
    held: Vec<(To, Bytes)>,
    partitioned: bool,
    rng: Option<u64>,
    agent_eof: bool,
    /// Agent events with the simulated time they were seen.
    pub agent_events: Vec<(Duration, AgentEvent)>,
    /// Gateway events with the simulated time they were seen.
    pub gateway_events: Vec<(Duration, GatewayEvent)>,
}

impl Pair {
    /// Both sessions start now; bytes take `latency` each way.
    pub fn new(
        agent: AgentSessionConfig,
        gateway: GatewaySessionConfig,
        latency: Duration,
    ) -> Pair {
        let now = Instant::now();
        Pair {
            agent: AgentSession::new(agent, now),
            gateway: GatewaySession::new(gateway, now),
            now,
            start: now,
            latency,
            in_flight: VecDeque::new(),
            held: Vec::new(),
            partitioned: false,
            rng: None,
            agent_eof: false,
            agent_events: Vec::new(),
            gateway_events: Vec::new(),
        }
    }

    /// Splits every write into pseudo-random small reads, seeded for reproducibility.
    pub fn with_chunking(mut self, seed: u64) -> Pair {
        self.rng = Some(seed.max(1));
        self
    }

    /// Simulated time since start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Cuts (`true`) or heals (`false`) the link. Bytes sent while cut arrive after healing.
    pub fn partition(&mut self, cut: bool) {
        self.partitioned = cut;
        if !cut {
            let at = self.now + self.latency;
            for (to, bytes) in std::mem::take(&mut self.held) {
                self.in_flight.push_back(InFlight { at, to, bytes });
            }
        }
    }

    /// Puts raw bytes on the wire towards `to`, as a misbehaving peer would.
    pub fn inject(&mut self, to: To, bytes: &[u8]) {
        self.send(to, Bytes::copy_from_slice(bytes));
    }

    /// The agent's side of the stream ends (a killed agent process).
    pub fn silence_agent(&mut self) {
        self.agent_eof = true;
    }

    fn send(&mut self, to: To, bytes: Bytes) {
        if self.partitioned {
            self.held.push((to, bytes));
        } else {
            self.in_flight.push_back(InFlight {
                at: self.now + self.latency,
                to,
                bytes,
            });
        }
    }

    fn next_rand(&mut self) -> Option<u64> {
        let x = self.rng.as_mut()?;
        // xorshift64: deterministic, no dependency.
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        Some(*x)
    }

    fn flush(&mut self) {
        if !self.agent_eof {
            while let Some(b) = self.agent.poll_transmit() {
                self.send(To::Gateway, b);
            }
        }
        while let Some(b) = self.gateway.poll_transmit() {
            self.send(To::Agent, b);
        }
        let t = self.elapsed();
        while let Some(e) = self.agent.poll_event() {
            self.agent_events.push((t, e));
        }
        while let Some(e) = self.gateway.poll_event() {
            self.gateway_events.push((t, e));
        }
    }

    fn deliver(&mut self, to: To, bytes: Bytes) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = match self.next_rand() {
                Some(r) => (1 + (r % 7) as usize).min(rest.len()),
                None => rest.len(),
            };
            let chunk = rest.split_to(n);
            match to {
                To::Agent => self.agent.handle_input(&chunk, self.now),
                To::Gateway if !self.agent_eof => self.gateway.handle_input(&chunk, self.now),
                To::Gateway => {}
            }
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let agent = if self.agent_eof {
            None
        } else {
            self.agent.poll_timeout()
        };
        [
            self.in_flight.front().map(|p| p.at),
            agent,
            self.gateway.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Advances to the next delivery or timer, but not past `limit`. False when idle.
    pub fn step_until(&mut self, limit: Instant) -> bool {
        self.flush();
        let Some(next) = self.next_time() else {
            return false;
        };
        if next > limit {
            self.now = limit;
            return false;
        }
        self.now = self.now.max(next);
        while self.in_flight.front().is_some_and(|p| p.at <= self.now) {
            let p = self.in_flight.pop_front().expect("front exists");
            self.deliver(p.to, p.bytes);
        }
        if !self.agent_eof && self.agent.poll_timeout().is_some_and(|t| t <= self.now) {
            self.agent.handle_timeout(self.now);
        }
        if self.gateway.poll_timeout().is_some_and(|t| t <= self.now) {
            self.gateway.handle_timeout(self.now);
        }
        self.flush();
        true
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step_until(limit) {}
        self.now = self.now.max(limit);
        self.flush();
    }
}
