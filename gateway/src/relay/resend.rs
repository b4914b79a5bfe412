//! Feature layer: a caller's request body that can be sent again, for the re-sends of
//! [`super::Attempts`].
//!
//! The body is read once, from the caller; each attempt reads it through its own
//! [`ReplayReader`], which first replays what earlier attempts read (the chunks are `Bytes`:
//! kept by reference, not copied) and then reads on. Kept until the call's first answer
//! ([`Replay::settle`]) or until more than [`REPLAY_MAX`] bytes were read, after which the call
//! can no longer be sent again.

use std::sync::Arc;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most request bytes kept for a re-send; a call whose body is longer is not re-sent.
pub const REPLAY_MAX: usize = 1 << 20;

#[derive(Debug)]
struct Source {
    body: axum::body::Body,
    /// The data chunks read so far, while they are kept.
    log: Vec<Bytes>,
    logged: usize,
    /// Frames read from the body so far.
    read: usize,
    /// Still replayable: everything read is in `log`.
    keep: bool,
    ended: bool,
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Replay(Arc<tokio::sync::Mutex<Source>>);

impl Replay {
    /// Reads `body` for one attempt after another.
    pub fn new(body: axum::body::Body) -> Replay {
        Replay(Arc::new(tokio::sync::Mutex::new(Source {
            body,
            log: Vec::new(),
            logged: 0,
            read: 0,
            keep: true,
            ended: false,
        })))
    }

    /// A reader for the next attempt, from the start. Only one attempt reads at a time: the
    /// previous one's pump is cancelled before the next starts.
    pub fn reader(&self) -> ReplayReader {
        ReplayReader {
            src: self.0.clone(),
            pos: 0,
        }
    }

    /// True while everything read so far can be replayed (the caller's body was read within
    /// [`REPLAY_MAX`]). Cancel the previous attempt's pump first: it holds the body while it
    /// waits for the caller.
    pub async fn replayable(&self) -> bool {
        self.0.lock().await.keep
    }

    /// The call got its first answer: nothing will be sent again, drop what was kept.
    pub fn settle(&self) {
        if let Ok(mut s) = self.0.try_lock() {
            s.keep = false;
            s.log = Vec::new();
        } else {
            let src = self.0.clone();
            tokio::spawn(async move {
                let mut s = src.lock().await;
                s.keep = false;
                s.log = Vec::new();
            });
        }
    }
}

/// One attempt's view of the body; see [`Replay`].
#[derive(Debug)]
pub struct ReplayReader {
    src: Arc<tokio::sync::Mutex<Source>>,
    /// Frames this reader has given out.
    pos: usize,
}

impl ReplayReader {
    /// The next frame of the body, as `BodyExt::frame` gives it; cancel-safe.
    pub async fn frame(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        let mut s = self.src.lock().await;
        if self.pos < s.read {
            if !s.keep {
                return Some(Err("the request body can no longer be replayed".into()));
            }
            let chunk = s.log.get(self.pos).cloned()?;
            self.pos += 1;
            return Some(Ok(Frame::data(chunk)));
        }
        if s.ended {
            return None;
        }
        let frame = s.body.frame().await;
        match &frame {
            None => s.ended = true,
            Some(Ok(f)) => {
                s.read += 1;
                self.pos += 1;
                match f.data_ref() {
                    Some(d) if s.keep && s.logged + d.len() <= REPLAY_MAX => {
                        s.logged += d.len();
                        s.log.push(d.clone());
                    }
                    // Too long, or not data (trailers cannot be replayed as they came).
                    _ => {
                        s.keep = false;
                        s.log = Vec::new();
                    }
                }
            }
            Some(Err(_)) => {
                s.keep = false;
                s.log = Vec::new();
            }
        }
        frame.map(|r| r.map_err(BoxError::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: &[&'static [u8]]) -> axum::body::Body {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        axum::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    async fn read_all(r: &mut ReplayReader) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(f) = r.frame().await {
            out.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_second_attempt_reads_the_whole_body_again_from_the_start() {
        let replay = Replay::new(body(&[b"ab", b"cd", b"ef"]));
        // The first attempt read part of it and was refused.
        let mut first = replay.reader();
        assert_eq!(
            &first.frame().await.unwrap().unwrap().into_data().unwrap()[..],
            b"ab"
        );
        drop(first);
        assert!(replay.replayable().await);
        let mut second = replay.reader();
        assert_eq!(read_all(&mut second).await, b"abcdef");
        let mut third = replay.reader();
        assert_eq!(read_all(&mut third).await, b"abcdef");
        replay.settle();
        assert!(!replay.replayable().await);
    }

    #[tokio::test]
    async fn a_body_longer_than_the_limit_is_not_replayable() {
        static BIG: [u8; REPLAY_MAX] = [7; REPLAY_MAX];
        let replay = Replay::new(body(&[b"x", &BIG]));
        let mut first = replay.reader();
        assert_eq!(read_all(&mut first).await.len(), REPLAY_MAX + 1);
        assert!(!replay.replayable().await);
        let mut second = replay.reader();
        assert!(second.frame().await.unwrap().is_err());
    }
}
