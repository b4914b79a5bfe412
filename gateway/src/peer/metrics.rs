//! Metrics of the peer links, per peer replica (a label bounded by the replicas that exist:
//! names from their own config, never from what a caller sends).
//!
//! | metric | type | what |
//! |---|---|---|
//! | `tether_gateway_peer_up{peer}` | gauge | 1 while a link to the peer is open and its last probe answered |
//! | `tether_gateway_peer_rtt_seconds{peer}` | gauge | round trip of the last probe |
//! | `tether_gateway_peer_forwarded_streams_total{peer,direction}` | counter | streams opened toward the peer (`out`, every attempt) and carried for it (`in`) |
//! | `tether_gateway_peer_streams_active{direction}` | gauge | forwarded streams carried for peers now (`in`) |
//! | `tether_gateway_peer_failures_total{peer,reason}` | counter | what went wrong with a peer ([`PeerFailure`]) |
//! | `tether_gateway_peer_handshake_failures_total{reason}` | counter | connections refused on the peer port ([`PeerRefusal`]) |

use std::time::Duration;

/// Something that went wrong with a peer: `tether_gateway_peer_failures_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerFailure {
    /// Dialing the peer failed (unreachable, refused our certificate, no answer).
    Dial,
    /// A probe got no answer in time: the link was closed and is dialed again.
    ProbeTimeout,
    /// The link closed under us (the peer went away, or the network between).
    LinkLost,
    /// A forwarded stream got no answer in time: the link is suspect until a probe answers.
    AnswerTimeout,
    /// The peer holds no session of the agent (presence was behind): the next holder is tried.
    NotHere,
    /// The peer refused the stream (stream limit, no free stream, agent lost while opening).
    Refused,
    /// Opening or writing the stream failed on the link.
    Stream,
}

impl PeerFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerFailure::Dial => "dial",
            PeerFailure::ProbeTimeout => "probe_timeout",
            PeerFailure::LinkLost => "link_lost",
            PeerFailure::AnswerTimeout => "answer_timeout",
            PeerFailure::NotHere => "not_here",
            PeerFailure::Refused => "refused",
            PeerFailure::Stream => "stream",
        }
    }
}

/// Why a connection was refused on the peer port:
/// `tether_gateway_peer_handshake_failures_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerRefusal {
    /// The certificate does not chain to `tls.ca`, has expired, or is not for this use.
    Certificate,
    /// A valid certificate of an agent or a control-plane caller: not a gateway replica.
    NotAGateway,
    /// A gateway of another trust domain.
    WrongTrustDomain,
    /// No URI SAN, several, or one that does not parse.
    NoIdentity,
    /// The replica dialed presented another replica's identity.
    WrongReplica,
}

impl PeerRefusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRefusal::Certificate => "certificate",
            PeerRefusal::NotAGateway => "not_a_gateway",
            PeerRefusal::WrongTrustDomain => "wrong_trust_domain",
            PeerRefusal::NoIdentity => "no_identity",
            PeerRefusal::WrongReplica => "wrong_replica",
        }
    }
}

/// Which way a forwarded stream goes, seen from this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This replica forwards a call to the peer.
    Out,
    /// This replica carries a call the peer forwarded.
    In,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// Sets `tether_gateway_peer_up{peer}`.
pub fn set_up(peer: &str, up: bool) {
    metrics::gauge!("tether_gateway_peer_up", "peer" => peer.to_owned()).set(f64::from(up));
}

/// Sets `tether_gateway_peer_rtt_seconds{peer}`.
pub fn set_rtt(peer: &str, rtt: Duration) {
    metrics::gauge!("tether_gateway_peer_rtt_seconds", "peer" => peer.to_owned())
        .set(rtt.as_secs_f64());
}

/// Counts one stream forwarded `direction` with `peer`.
pub fn count_forwarded(peer: &str, direction: Direction) {
    metrics::counter!("tether_gateway_peer_forwarded_streams_total",
        "peer" => peer.to_owned(), "direction" => direction.as_str())
    .increment(1);
}

/// Counts one failure with `peer`.
pub fn count_failure(peer: &str, reason: PeerFailure) {
    metrics::counter!("tether_gateway_peer_failures_total",
        "peer" => peer.to_owned(), "reason" => reason.as_str())
    .increment(1);
}

/// Counts and logs one connection refused on the peer port.
pub fn count_refusal(reason: PeerRefusal, detail: &str) {
    metrics::counter!("tether_gateway_peer_handshake_failures_total", "reason" => reason.as_str())
        .increment(1);
    tracing::warn!(
        reason = reason.as_str(),
        detail,
        "peer link refused: only gateway replicas of this trust domain may connect here"
    );
}

/// Counts a stream carried for a peer as active while it lives.
#[derive(Debug)]
pub struct ActiveIn;

impl ActiveIn {
    /// Counts one more.
    pub fn new() -> ActiveIn {
        metrics::gauge!("tether_gateway_peer_streams_active", "direction" => "in").increment(1.0);
        ActiveIn
    }
}

impl Default for ActiveIn {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ActiveIn {
    fn drop(&mut self) {
        metrics::gauge!("tether_gateway_peer_streams_active", "direction" => "in").decrement(1.0);
    }
}
