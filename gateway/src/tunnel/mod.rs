//! Transport and session layers: where agents connect.
//!
//! The listeners agents dial (QUIC on UDP, TLS + HTTP/2 on TCP), the admission of their
//! handshakes, the certificate verifier, the driver of each session and the registry of live
//! sessions.

pub mod accept;
pub mod admission;
pub mod registry;
pub mod verifier;
