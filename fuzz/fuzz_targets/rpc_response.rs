//! The agent's answer to a relayed call into the gateway's response half (`ResponseRecv`).
//!
//! The body is `tether_fuzz::rpc_response` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::rpc_response(data);
});
