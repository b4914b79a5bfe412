//! Tether's wire protocol, sans-IO.
//!
//! The agent dials the gateway and opens a *control stream*; over it the two sides exchange
//! `Hello` → `Welcome`, heartbeats (which measure RTT), `GoAway`, and certificate renewals
//! (`RenewRequest` → `RenewResponse`). The gateway opens one more
//! stream per relayed RPC, TCP stream or command delivery, each starting with a [`StreamHeader`].
//!
//! This crate only encodes, decodes and steps state machines. The caller hands it bytes and the
//! current time and asks what to send and when to wake up (`handle_input`, `handle_timeout`,
//! `poll_transmit`, `poll_timeout`, `poll_event`), exactly like quinn-proto beside quinn. It never
//! reads a clock, opens a socket or spawns a task, so the whole session can be driven
//! deterministically by [`harness::Pair`] with a simulated clock.
//!
//! # Layout
//! - [`frame`]: length-delimited framing, with limits checked before any allocation;
//! - [`message`]: the versioned messages (protobuf encoded, so fields can be added compatibly);
//! - [`session`]: the control-stream state machines, [`AgentSession`] and [`GatewaySession`],
//!   and the [`Session`] face they share;
//! - [`stream`]: the protocols of the other streams (relayed calls, TCP streams, command
//!   deliveries, probes), one small machine per kind and side;
//! - [`identity`]: the SPIFFE identity URIs agents and control-plane callers carry;
//! - [`backoff`]: capped exponential backoff with full jitter for reconnects;
//! - [`error`]: [`ProtoError`] and the connection/stream close codes [`ErrorCode`];
//! - [`harness`]: an in-memory agent/gateway pair with a simulated clock, and a simulated
//!   stream between two stream machines ([`harness::stream`]), for tests.
#![warn(missing_docs)]

pub mod backoff;
pub mod error;
pub mod frame;
pub mod harness;
pub mod identity;
pub mod message;
pub mod session;
pub mod stream;

pub use backoff::Backoff;
pub use error::{ErrorCode, ProtoError};
pub use frame::{FrameDecoder, Limits};
pub use identity::{AgentId, IdentityError, SpiffeId};
pub use message::{Message, StreamHeader, StreamKind};
pub use session::{AgentEvent, AgentSession, GatewayEvent, GatewaySession, Session};

/// The ALPN protocol id both sides must negotiate, on QUIC and on the TLS fallback.
pub const ALPN: &[u8] = b"tether/1";

/// The ALPN protocol id of agent enrollment (TLS + HTTP/2 on the tunnel's TCP port, no client
/// certificate).
pub const ENROLL_ALPN: &[u8] = b"tether-enroll/1";

/// Protocol versions this build speaks, newest last. Negotiated in `Hello` / `Welcome`.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];
