//! Tether's control-plane gateway.
//!
//! Agents dial the gateway over mutual-TLS QUIC; the gateway keeps a registry of their live
//! sessions and serves the northbound gRPC API the control plane calls.
//!
//! # Layout
//! Layers only look down: transport → session → feature → backend.
//! - [`verifier`] (transport): agent client-certificate checks, with refusal metrics;
//! - [`listener`] (transport): the northbound TLS + HTTP/2 listener (hyper);
//! - [`live_connections`] (transport): its open connections by certificate, to close a
//!   revoked caller's;
//! - [`tunnel`] (transport + session): the QUIC listener and the per-connection session driver;
//! - [`limits`] (transport + feature): handshake admission per source address (and QUIC Retry),
//!   streams per agent, and the abuse-limit metrics;
//! - [`registry`] (session): live sessions and the connect/disconnect feed;
//! - [`auth`] (feature): northbound callers (client certificates, bearer JWTs), their tenant
//!   scope, and the audit of denials;
//! - [`northbound`] (feature): `tether.v1.Agents` over TLS, scoped to the caller's tenants;
//! - [`relay`] (feature): the transparent gRPC relay (any other service, to an agent);
//! - [`commands`] (feature): `tether.v1.Commands`, durable commands and their delivery;
//! - [`store`] (backend): the command store interface and its embedded (redb) implementation;
//! - [`callers`] (feature): `tether.v1.Callers/Revoke`, the deny-list of caller certificates;
//! - [`revocation`] (feature): `Agents/Revoke` and the revocation list the verifier consults;
//! - [`data_dir`] (backend): the state directory, private to the gateway's user (0700/0600);
//! - [`identity_db`] (backend): revocations and enrollment tokens, durable (redb);
//! - [`enrollment`] (feature): `tether.v1.Enrollment`, tokens and CSR-based issuance;
//! - [`streams`] (feature): `tether.v1.Streams`, raw TCP streams to an agent's TCP services;
//! - [`pki`] (backend): CA and certificate issuance with rcgen;
//! - [`demo`] (backend): the demo upstream `dev` runs behind its agent;
//! - [`config`], [`server`] (wiring), [`dev`] (the `dev` command), [`ctl`] (tetherctl's client).
#![warn(missing_docs)]

pub mod cluster;
pub mod commands;
pub mod config;
pub mod data_dir;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod northbound;
pub mod quota;
pub mod relay;
pub mod server;
pub mod tls;
pub mod tools;
pub mod tunnel;

pub use config::GatewayConfig;
pub use error::GatewayError;
pub use server::{GatewayHandle, Sockets, start};
