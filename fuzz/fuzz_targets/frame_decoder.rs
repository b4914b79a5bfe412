//! Any bytes, split anywhere, through the frame decoder: no panic, no unbounded buffering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::frame::{decode_frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let max = 4096;
    let _ = decode_frame(data, max);
    // The first byte picks a split size, so partial frames are exercised too.
    let (split, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s).max(1), r),
        None => return,
    };
    let mut dec = FrameDecoder::new(max);
    for chunk in rest.chunks(split) {
        dec.push(chunk);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => {
                    // Whatever decodes re-encodes to a frame that decodes to the same message.
                    let again = decode_frame(&msg.to_bytes(), usize::MAX).unwrap().unwrap().0;
                    assert_eq!(again, msg);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.buffered() <= max + 5 + split, "buffered beyond one frame plus one read");
    }
});
