//! The bytes of a gateway-opened stream into the agent's stream machines: `Incoming` until the
//! header, then the machine of the stream's kind (relayed call, TCP stream, command delivery).
//!
//! The body is `tether_fuzz::agent_stream` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::agent_stream(data);
});
