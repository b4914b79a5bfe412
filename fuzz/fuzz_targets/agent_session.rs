//! Any bytes from a gateway into the agent's session state machine (Welcome, heartbeat acks,
//! GoAway, Close, garbage), with time passing: no panic, and the session always ends.
//!
//! The body is `tether_fuzz::agent_session` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::agent_session(data);
});
