//! A PKCS#10 request (DER or PEM) through the enrollment and renewal CSR check.
//!
//! The body is `tether_fuzz::csr_check` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::csr_check(data);
});
