//! The agent's answer on a TCP stream into the gateway's machine (`GatewayTcp`), then raw bytes.
//!
//! The body is `tether_fuzz::tcp_answer` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::tcp_answer(data);
});
