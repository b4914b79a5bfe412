//! Any bytes from an agent into the gateway's session state machine, with time passing.
//!
//! The body is `tether_fuzz::gateway_session` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::gateway_session(data);
});
