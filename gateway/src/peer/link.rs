//! Transport layer: one link to a peer replica — a QUIC connection, multiplexed — and its
//! health probe.
//!
//! Either end probes the link every `probe_interval` with a `Ping` stream and records the
//! round trip; a probe unanswered for `down_after` closes the link (`UNRESPONSIVE`), and the
//! replica that dialed it dials again. A forwarded stream whose answer is late marks the link
//! *suspect*: the forwarder prefers other links until a probe, run at once, answers.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tether_runtime::stream::StreamError;
use tether_runtime::transport::{Link, RecvStream, SendStream};
use tokio::sync::Notify;
use tunnel_proto::ErrorCode;

use crate::peer::PeerSettings;
use crate::peer::metrics::{self, PeerFailure};
use crate::peer::wire::{self, AnswerCode, PeerAnswer, PeerHeader, PeerKind, WireError};

/// See the module docs.
#[derive(Debug)]
pub struct PeerLink {
    peer: String,
    /// The epoch of the peer process this replica dialed, as its first probe answered (or,
    /// from a peer too old to say, its row when dialed); 0 when accepted.
    epoch: AtomicI64,
    conn: quinn::Connection,
    link: Link,
    suspect: AtomicBool,
    probe_now: Notify,
    /// Round trip of the last probe, in microseconds (0: none yet).
    rtt_us: AtomicU64,
    since: Instant,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The stream or the link failed.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The stream could not be written.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The peer answered with something other than `Ok`.
    #[error("the peer answered the probe with {0:?}")]
    Refused(AnswerCode),
}

impl PeerLink {
    /// A link to `peer` over `conn` (`epoch`: the peer's, when this side dialed).
    pub fn new(peer: String, epoch: Option<i64>, conn: quinn::Connection) -> PeerLink {
        PeerLink {
            peer,
            epoch: AtomicI64::new(epoch.unwrap_or(0)),
            link: Link::Quic(conn.clone()),
            conn,
            suspect: AtomicBool::new(false),
            probe_now: Notify::new(),
            rtt_us: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    /// The peer's replica id.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The epoch of the peer process at the other end, when this side dialed it.
    pub fn epoch(&self) -> Option<i64> {
        match self.epoch.load(Ordering::Relaxed) {
            0 => None,
            e => Some(e),
        }
    }

    /// True until the connection closed.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// True while no forwarded stream's answer was late since the last probe answered.
    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// Marks the link suspect and asks for a probe now.
    pub fn suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
        self.probe_now.notify_one();
    }

    /// The round trip of the last probe.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// When the link was set up.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Opens a stream towards the peer.
    pub async fn open(&self) -> Result<(SendStream, RecvStream), StreamError> {
        self.link.open().await
    }

    /// The next stream the peer opened; `None` once the link is gone.
    pub async fn accept(&self) -> Option<(SendStream, RecvStream)> {
        self.link.accept().await
    }

    /// Closes the link with `code`.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.conn.close(code.0.into(), reason.as_bytes());
    }

    /// Waits until the link is gone; says why.
    pub async fn closed(&self) -> String {
        self.link.closed().await
    }

    /// One probe: a `Ping` stream, answered `Ok`. On a dialed link, the answer's epoch (when
    /// the peer says it) becomes the link's: the process that answers is the one linked.
    pub async fn ping(&self) -> Result<(), ProbeError> {
        let (mut send, mut recv) = self.open().await?;
        let header = PeerHeader {
            version: wire::VERSION,
            kind: PeerKind::Ping as u32,
            ..Default::default()
        };
        send.write_all_chunks(&mut [wire::encode(&header)]).await?;
        send.finish()?;
        let answer: PeerAnswer = wire::read(&mut recv).await?;
        match answer.code() {
            AnswerCode::Ok => {
                if answer.epoch > 0 && self.epoch().is_some() {
                    self.epoch.store(answer.epoch, Ordering::Relaxed);
                }
                Ok(())
            }
            other => Err(ProbeError::Refused(other)),
        }
    }

    /// Probes every `probe_interval` (and at once when [`suspect`](Self::suspect)ed) until the
    /// link is gone; a probe unanswered within `down_after`, or refused, closes it.
    pub async fn run_probes(&self, settings: PeerSettings) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(settings.probe_interval) => {}
                _ = self.probe_now.notified() => {}
                _ = self.conn.closed() => return,
            }
            let started = Instant::now();
            match tokio::time::timeout(settings.down_after, self.ping()).await {
                Ok(Ok(())) => {
                    let rtt = started.elapsed();
                    self.rtt_us
                        .store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
                    metrics::set_rtt(&self.peer, rtt);
                    metrics::set_up(&self.peer, true);
                    self.suspect.store(false, Ordering::Relaxed);
                }
                Ok(Err(_)) if !self.is_open() => return,
                Ok(Err(e)) => {
                    metrics::count_failure(&self.peer, PeerFailure::ProbeTimeout);
                    tracing::warn!(peer = %self.peer, error = %e,
                        "peer link probe failed: closing the link (it is dialed again)");
                    self.close(ErrorCode::UNRESPONSIVE, "probe failed");
                    return;
                }
                Err(_) => {
                    metrics::count_failure(&self.peer, PeerFailure::ProbeTimeout);
                    tracing::warn!(peer = %self.peer, timeout = ?settings.down_after,
                        "peer link probe unanswered: closing the link (it is dialed again)");
                    self.close(ErrorCode::UNRESPONSIVE, "probe unanswered");
                    return;
                }
            }
        }
    }
}
