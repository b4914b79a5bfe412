//! The agent's report of a command into the gateway's delivery machine (`GatewayCommand`).
//!
//! The body is `tether_fuzz::command_report` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::command_report(data);
});
