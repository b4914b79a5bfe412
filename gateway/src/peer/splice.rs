//! Transport layer: the holder's splice between a forwarded stream and the agent's stream.
//!
//! Bytes are copied as they come, one chunk in flight per direction, so each side's flow
//! control reaches the other end to end: a caller that stops reading stops the forwarding
//! replica reading the peer stream, which stops this replica reading the agent's stream,
//! which stops the agent. How a direction ends is handed on unchanged: FIN as FIN, a reset
//! with its code, a stop (`STOP_SENDING`) with its code, so cancellation and deadlines work as
//! they do on a local stream. A connection lost on one side is a `LINK_LOST` reset (or stop)
//! on the other.

use tether_runtime::stream::StreamError;
use tether_runtime::transport::{RecvStream, SendStream};
use tunnel_proto::ErrorCode;
use tunnel_proto::frame::MAX_DATA_FRAME;

/// Splices the forwarded stream (`from_peer`, `to_peer`) and the agent's (`from_agent`,
/// `to_agent`) until both directions have ended.
pub async fn splice(
    from_peer: RecvStream,
    to_peer: SendStream,
    from_agent: RecvStream,
    to_agent: SendStream,
) {
    tokio::join!(pipe(from_peer, to_agent), pipe(from_agent, to_peer));
}

/// Copies `src` into `dst` until one of them ends, and hands the end on.
async fn pipe(mut src: RecvStream, mut dst: SendStream) {
    loop {
        let read = tokio::select! {
            r = src.read_chunk(MAX_DATA_FRAME) => r,
            // The far reader stopped (or its connection is gone): stop ours.
            code = dst.stopped_code() => {
                src.stop(code.unwrap_or(ErrorCode::LINK_LOST));
                return;
            }
        };
        match read {
            Ok(Some(chunk)) => {
                if let Err(e) = dst.write_all_chunks(&mut [chunk]).await {
                    src.stop(match e {
                        StreamError::Reset(code) => code,
                        _ => ErrorCode::LINK_LOST,
                    });
                    return;
                }
            }
            Ok(None) => {
                let _ = dst.finish();
                return;
            }
            Err(StreamError::Reset(code)) => {
                dst.reset(code);
                return;
            }
            Err(_) => {
                dst.reset(ErrorCode::LINK_LOST);
                return;
            }
        }
    }
}
