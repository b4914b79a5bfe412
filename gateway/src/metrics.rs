//! The label values of the gateway's metrics that name a place or a cause, as enums: a label
//! cannot be mistyped at one call site, nor take a value no dashboard knows, nor grow with
//! what a peer sends. (Labels that carry a bounded value of their own, a close code or a
//! transport, are written where they are recorded.)

/// A limit that refused something: `tether_gateway_limit_rejections_total{limit}`. The label
/// is the `[limits]` key (or the constant) that set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// `limits.streams_per_agent`: relayed calls and TCP streams in flight to one agent.
    StreamsPerAgent,
    /// `limits.sessions_per_agent`: tunnel connections of one agent identity.
    SessionsPerAgent,
    /// `limits.pending_commands_per_agent`: unfinished commands of one agent.
    PendingCommandsPerAgent,
    /// `limits.command_watches_per_caller`: `Commands/Watch` streams of one caller.
    CommandWatchesPerCaller,
    /// `limits.agent_watches_per_caller`: `Agents/Watch` streams of one caller.
    AgentWatchesPerCaller,
    /// `limits.handshakes_per_second`: tunnel handshakes from one source address.
    HandshakeRate,
    /// QUIC handshakes in progress from one source address.
    HandshakesPerAddress,
    /// `limits.max_message_size`: a northbound message.
    MessageSize,
    /// `limits.max_header_list_size`: a northbound request's headers.
    HeaderListSize,
    /// Enrollment connections open at once, in all or from one address.
    EnrollmentConnections,
    /// A second request on an enrollment connection.
    EnrollmentRequestsPerConnection,
    /// Enrollments being decided at once.
    EnrollmentsInProgress,
    /// `limits.pending_tokens_per_agent`: enrollment tokens pending for one agent.
    PendingTokensPerAgent,
    /// `limits.token_creations_per_minute`: `CreateToken` calls of one caller.
    TokenCreationsPerMinute,
    /// `limits.northbound_connections`: northbound connections open at once.
    NorthboundConnections,
    /// `limits.northbound_connections_per_address`: from one source address.
    NorthboundConnectionsPerAddress,
}

impl Limit {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::StreamsPerAgent => "streams_per_agent",
            Limit::SessionsPerAgent => "sessions_per_agent",
            Limit::PendingCommandsPerAgent => "pending_commands_per_agent",
            Limit::CommandWatchesPerCaller => "command_watches_per_caller",
            Limit::AgentWatchesPerCaller => "agent_watches_per_caller",
            Limit::HandshakeRate => "handshake_rate",
            Limit::HandshakesPerAddress => "handshakes_per_address",
            Limit::MessageSize => "message_size",
            Limit::HeaderListSize => "header_list_size",
            Limit::EnrollmentConnections => "enrollment_connections",
            Limit::EnrollmentRequestsPerConnection => "enrollment_requests_per_connection",
            Limit::EnrollmentsInProgress => "enrollments_in_progress",
            Limit::PendingTokensPerAgent => "pending_tokens_per_agent",
            Limit::TokenCreationsPerMinute => "token_creations_per_minute",
            Limit::NorthboundConnections => "northbound_connections",
            Limit::NorthboundConnectionsPerAddress => "northbound_connections_per_address",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts one refusal by `limit`.
pub fn count_rejection(limit: Limit) {
    metrics::counter!("tether_gateway_limit_rejections_total", "limit" => limit.as_str())
        .increment(1);
}

/// Where a connection or stream was closed because it sent nothing in time:
/// `tether_gateway_idle_timeouts_total{where}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdleIn {
    /// A QUIC tunnel connection (handshake, or no control stream).
    TunnelQuic,
    /// A TCP tunnel connection (no ClientHello, or the TLS handshake).
    TunnelTcp,
    /// An enrollment connection.
    Enrollment,
    /// A northbound TLS handshake.
    NorthboundTls,
    /// A northbound connection on which no caller authenticated.
    NorthboundUnauthenticated,
    /// A northbound connection with no call open.
    NorthboundIdle,
}

impl IdleIn {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleIn::TunnelQuic => "tunnel_quic",
            IdleIn::TunnelTcp => "tunnel_tcp",
            IdleIn::Enrollment => "enrollment",
            IdleIn::NorthboundTls => "northbound_tls",
            IdleIn::NorthboundUnauthenticated => "northbound_unauthenticated",
            IdleIn::NorthboundIdle => "northbound_idle",
        }
    }
}

/// Counts one connection or stream closed because it sent nothing in time.
pub fn count_idle_timeout(place: IdleIn) {
    metrics::counter!("tether_gateway_idle_timeouts_total", "where" => place.as_str()).increment(1);
}

/// Why an agent's handshake was refused: `tether_gateway_handshake_failures_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The certificate's validity period is over.
    Expired,
    /// The certificate's validity period has not begun.
    NotYetValid,
    /// The certificate does not chain to a trusted CA.
    UnknownCa,
    /// A signature does not verify.
    BadSignature,
    /// The certificate or its agent is revoked.
    Revoked,
    /// The certificate is not for client authentication.
    WrongPurpose,
    /// Any other certificate error.
    InvalidCertificate,
    /// The identity in the certificate cannot be read.
    BadIdentity,
    /// An agent of another trust domain.
    WrongTrustDomain,
    /// A control-plane identity, not an agent.
    NotAnAgent,
    /// No URI SAN, or several.
    NoIdentity,
    /// The agent sent no certificate.
    NoClientCertificate,
    /// The client did not offer `tether/1`.
    AlpnMismatch,
    /// Any other TLS error.
    TlsError,
    /// The handshake did not finish in time.
    Timeout,
    /// The connection failed during the handshake.
    ConnectionError,
}

impl HandshakeFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::NotYetValid => "not_yet_valid",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::BadSignature => "bad_signature",
            HandshakeFailure::Revoked => "revoked",
            HandshakeFailure::WrongPurpose => "wrong_purpose",
            HandshakeFailure::InvalidCertificate => "invalid_certificate",
            HandshakeFailure::BadIdentity => "bad_identity",
            HandshakeFailure::WrongTrustDomain => "wrong_trust_domain",
            HandshakeFailure::NotAnAgent => "not_an_agent",
            HandshakeFailure::NoIdentity => "no_identity",
            HandshakeFailure::NoClientCertificate => "no_client_certificate",
            HandshakeFailure::AlpnMismatch => "alpn_mismatch",
            HandshakeFailure::TlsError => "tls_error",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ConnectionError => "connection_error",
        }
    }
}

/// Metric: refused agent handshakes by reason.
pub const HANDSHAKE_FAILURES: &str = "tether_gateway_handshake_failures_total";

/// Counts and logs one refused agent handshake.
pub fn count_handshake_failure(reason: HandshakeFailure, detail: &str) {
    let reason = reason.as_str();
    metrics::counter!(HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    tracing::warn!(reason, detail, "agent handshake refused");
}

/// What a relayed stream carries: the `kind` label of the relay's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayKind {
    /// A relayed gRPC call.
    Grpc,
    /// A `Streams/Open` TCP stream.
    Tcp,
}

impl RelayKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Grpc => "grpc",
            RelayKind::Tcp => "tcp",
        }
    }
}

/// Which way relayed bytes went: the `direction` label of `tether_gateway_relay_bytes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the caller to the agent.
    ToAgent,
    /// From the agent to the caller.
    FromAgent,
}

/// The counter of bytes relayed `direction`: looked up once per relayed call or stream, so
/// the per-frame path only adds to it (no key built, no registry lookup).
pub fn relayed_bytes(direction: Direction) -> metrics::Counter {
    let direction = match direction {
        Direction::ToAgent => "to_agent",
        Direction::FromAgent => "from_agent",
    };
    metrics::counter!("tether_gateway_relay_bytes_total", "direction" => direction)
}
