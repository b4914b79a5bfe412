//! One control (or stream) message payload of any frame type: decoded, round-tripped, and
//! handed to the session that would receive it.
//!
//! The body is `tether_fuzz::control_message` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::control_message(data);
});
