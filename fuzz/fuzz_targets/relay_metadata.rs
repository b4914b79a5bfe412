//! A `tether-agent` metadata value through the relay's parsing, which feeds the tenant label
//! of `tether_gateway_relay_calls_total`.
//!
//! The body is `tether_fuzz::relay_metadata` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::relay_metadata(data);
});
