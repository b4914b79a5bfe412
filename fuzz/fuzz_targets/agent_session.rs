//! Any bytes from a gateway into the agent's session state machine (Welcome, heartbeat acks,
//! GoAway, Close, garbage), with time passing: no panic, and the session always ends.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunnel_proto::message::Hello;
use tunnel_proto::session::{AgentSession, AgentSessionConfig};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let hello = Hello {
        versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
        agent_version: "fuzz".into(),
        ..Default::default()
    };
    let mut s = AgentSession::new(AgentSessionConfig::new(hello), start);
    while s.poll_transmit().is_some() {}
    for (i, chunk) in data.chunks(7).enumerate() {
        let now = start + Duration::from_millis(i as u64 * 300);
        s.handle_input(chunk, now);
        s.handle_timeout(now);
        while s.poll_transmit().is_some() {}
        while s.poll_event().is_some() {}
    }
    s.handle_eof(start + Duration::from_secs(3600));
    while s.poll_event().is_some() {}
    assert!(s.is_closed());
});
