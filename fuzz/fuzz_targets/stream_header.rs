//! The bytes of a gateway-opened stream (a StreamHeader of any kind, then what follows) as the
//! agent decodes them, and the headers both ends build from them.
//!
//! The body is `tether_fuzz::stream_header` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::stream_header(data);
});
