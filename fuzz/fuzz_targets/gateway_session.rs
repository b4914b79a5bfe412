//! Any bytes from an agent into the gateway's session state machine, with time passing.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunnel_proto::session::{GatewaySession, GatewaySessionConfig};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut s = GatewaySession::new(GatewaySessionConfig::new("fuzz".into()), start);
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
