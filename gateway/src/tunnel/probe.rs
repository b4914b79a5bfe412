//! Session layer: the end-to-end probe of one session, driven by its session driver.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tether_runtime::stream::{Reader, StreamError, flush};
use tether_runtime::transport::Link;
use tunnel_proto::stream::StreamFailure;
use tunnel_proto::stream::probe::{GatewayProbe, ProbeEvent};
use tunnel_proto::{ErrorCode, ProtoError};

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The end-to-end probe of one session: every `interval` the gateway opens a stream, sends a
/// `Probe` header and expects the agent's `OpenResult` within `timeout`. Driven by the
/// session's own loop: a timer deadline and, while a probe is out, its future.
///
/// A probe goes out with the heartbeat answer nearest its due time (within `slack`, half a
/// heartbeat interval, either side): both are written in one turn of the session's task, so
/// they share a packet, and the agent's answer to the probe carries its acknowledgement of
/// both. At 10,000 idle agents that is a third fewer datagrams than probing on a timer of its
/// own (see docs/PERFORMANCE.md). The timer at `next + slack` covers a session whose
/// heartbeats stopped.
pub(crate) struct Probe {
    interval: Duration,
    timeout: Duration,
    slack: Duration,
    /// When the next probe is due; `None` before the session is established and after a
    /// failure.
    next: Option<Instant>,
    /// The probe in flight, with when it went out.
    in_flight: Option<(Instant, ProbeFuture)>,
}

impl Probe {
    pub(crate) fn new((interval, timeout): (Duration, Duration), heartbeat: Duration) -> Probe {
        Probe {
            interval,
            timeout,
            slack: (heartbeat / 2).min(interval / 2),
            next: None,
            in_flight: None,
        }
    }

    pub(crate) fn start(&mut self, now: Instant) {
        self.next = Some(now + self.interval);
    }

    /// No more probes (the agent left the session: it refuses new streams), nor the outcome of
    /// one in flight.
    pub(crate) fn stop(&mut self) {
        self.next = None;
        self.in_flight = None;
    }

    /// When the session's timer must wake for the probe. None while a probe is out: its own
    /// timeout ends it, in `answer`, and a deadline already passed would only wake the driver
    /// again and again until then.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.in_flight {
            Some(_) => None,
            None => self.next.map(|n| n + self.slack),
        }
    }

    /// A heartbeat's answer is about to be written: the probe goes with it when due within
    /// `slack`.
    pub(crate) fn on_heartbeat(&mut self, link: &Link, now: Instant) {
        if self.due_with_heartbeat(now) {
            self.send(link, now);
        }
    }

    pub(crate) fn on_timer(&mut self, link: &Link, now: Instant) {
        // A probe in flight is ended by its own timeout, in `answer`.
        if self.due_by_timer(now) {
            self.send(link, now);
        }
    }

    fn due_with_heartbeat(&self, now: Instant) -> bool {
        self.in_flight.is_none() && self.next.is_some_and(|n| n <= now + self.slack)
    }

    fn due_by_timer(&self, now: Instant) -> bool {
        self.in_flight.is_none() && self.next.is_some_and(|n| n + self.slack <= now)
    }

    /// Starts a probe; its first poll (in the same turn of the session's loop, by `answer`)
    /// opens the stream and writes the header.
    fn send(&mut self, link: &Link, now: Instant) {
        self.next = None;
        let link = link.clone();
        let timeout = self.timeout;
        let fut = tokio::time::timeout(timeout, async move { probe_once(&link).await });
        let fut = async move {
            match fut.await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        };
        self.in_flight = Some((now, Box::pin(fut)));
    }

    /// The outcome of the probe in flight (pending while there is none). On success the next
    /// probe is scheduled; on failure none is.
    pub(crate) async fn answer(&mut self) -> Result<(), String> {
        let Some((sent, fut)) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = fut.await;
        let sent = *sent;
        self.in_flight = None;
        match &outcome {
            Ok(()) => {
                metrics::histogram!("tether_gateway_probe_seconds")
                    .record(sent.elapsed().as_secs_f64());
                self.next = Some(Instant::now() + self.interval);
            }
            Err(_) => self.next = None,
        }
        outcome
    }
}

async fn probe_once(link: &Link) -> Result<(), String> {
    let (mut send, recv) = link.open().await.map_err(|e| e.to_string())?;
    let mut probe = GatewayProbe::new();
    match flush(&mut send, &mut probe).await {
        Ok(()) => {}
        // The agent is leaving the session (its `GoAway` is on its way): it answered.
        Err(StreamError::Reset(code)) if code == ErrorCode::REFUSED_STREAM => return Ok(()),
        Err(e) => return Err(e.to_string()),
    }
    match Reader::new(recv, probe).next().await {
        Ok(ProbeEvent::Answered) => Ok(()),
        Ok(ProbeEvent::Failed(StreamFailure::Reset(code))) | Err(StreamError::Reset(code))
            if code == ErrorCode::REFUSED_STREAM =>
        {
            Ok(())
        }
        Ok(ProbeEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected { got, .. }))) => {
            Err(format!("unexpected answer {got}"))
        }
        Ok(ProbeEvent::Failed(StreamFailure::Ended { .. })) => {
            Err("stream ended without an answer".into())
        }
        Ok(ProbeEvent::Failed(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_probe_rides_on_the_heartbeat_nearest_its_due_time() {
        // Probe every 30 s, heartbeat every 10 s: slack 5 s either side.
        let mut p = Probe::new((30 * S, 10 * S), 10 * S);
        let t0 = Instant::now();
        assert!(
            !p.due_with_heartbeat(t0) && !p.due_by_timer(t0 + 3600 * S),
            "not started"
        );
        p.start(t0);
        assert_eq!(
            p.deadline(),
            Some(t0 + 35 * S),
            "the timer waits out the slack"
        );
        assert!(
            !p.due_with_heartbeat(t0 + 20 * S),
            "10 s early: the next heartbeat is nearer"
        );
        assert!(p.due_with_heartbeat(t0 + 26 * S), "4 s early");
        assert!(
            p.due_with_heartbeat(t0 + 34 * S),
            "4 s late (no heartbeat came in between)"
        );
        assert!(
            !p.due_by_timer(t0 + 34 * S),
            "the timer leaves the window to heartbeats"
        );
        assert!(
            p.due_by_timer(t0 + 35 * S),
            "heartbeats stopped: the timer sends it"
        );
    }

    #[test]
    fn the_slack_never_exceeds_half_the_probe_interval() {
        // Probes faster than heartbeats (as tests configure): slack is half the probe interval.
        let mut p = Probe::new((S / 5, S / 5), 10 * S);
        let t0 = Instant::now();
        p.start(t0);
        assert_eq!(p.deadline(), Some(t0 + S / 5 + S / 10));
        assert!(!p.due_with_heartbeat(t0));
        assert!(p.due_by_timer(t0 + S / 5 + S / 10));
    }
}
