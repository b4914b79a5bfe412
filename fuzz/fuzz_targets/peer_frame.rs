//! A frame on a peer link between gateway replicas: a `PeerHeader` as the holder reads it, or a
//! `PeerAnswer` as the forwarding replica reads it.
//!
//! The body is `tether_fuzz::peer_frame` (fuzz-bodies), which the stable smoke test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_fuzz::peer_frame(data);
});
