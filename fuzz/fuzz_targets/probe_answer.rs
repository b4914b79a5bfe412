//! The agent's answer to a probe into the gateway's probe machine (`GatewayProbe`).
//!
//! The body is `tether_fuzz::probe_answer` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::probe_answer(data);
});
