//! Transport and feature layers: the northbound API the control plane calls.
//!
//! The TLS + HTTP/2 listener, the authentication of callers, and `tether.v1.Agents`.

pub mod agents;
pub mod auth;
pub mod listener;
pub mod live_connections;
pub mod status;
