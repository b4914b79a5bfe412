//! Any bytes, split anywhere, through the frame decoder: no panic, no unbounded buffering.
//!
//! The body is `tether_fuzz::frame_decoder` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::frame_decoder(data);
});
