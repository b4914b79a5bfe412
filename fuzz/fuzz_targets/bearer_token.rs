//! An `authorization` header value through the gateway's northbound authentication (JWT
//! bearer tokens against a fixed JWKS).
//!
//! The body is `tether_fuzz::bearer_token` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::bearer_token(data);
});
