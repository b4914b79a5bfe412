//! A tether.v1.EnrollRequest protobuf through the gateway's whole enrollment path (token,
//! identity store, CSR check, issuance).
//!
//! The body is `tether_fuzz::enroll_request` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::enroll_request(data);
});
