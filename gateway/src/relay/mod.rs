//! Feature layer: calls and TCP streams relayed to agents.

pub mod grpc;
pub mod tcp;
