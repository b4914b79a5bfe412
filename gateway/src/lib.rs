//! Tether's control-plane gateway.
//!
//! Agents dial the gateway over mutual-TLS QUIC; the gateway keeps a registry of their live
//! sessions and serves the northbound gRPC API the control plane calls.
//!
//! # Layout
//! One folder per concern, each in its layers: transport → session → feature → backend
//! (ARCHITECTURE.md, "Inside the gateway", says which folder may import which).
//! - [`tunnel`] (transport + session): where agents connect: TLS, the QUIC endpoint, the accept
//!   loops and their side doors, admission, the certificate verifier, the session driver, the
//!   end-to-end probe, the registry of live sessions;
//! - [`northbound`] (transport + feature): the listener the control plane calls, its callers
//!   and their tenants (`auth`), `tether.v1.Agents`, and the one error → status mapping;
//! - [`console`] (feature): the web console at `/ui/` on the northbound listener, its login
//!   links and session cookies, asking the northbound services as the viewer;
//! - [`relay`] (feature): gRPC calls and TCP streams relayed to agents, streams per agent;
//! - [`commands`] (feature + backend): durable commands, their delivery, `Watch`, and the
//!   command store;
//! - [`identity`] (feature + backend): the PKI, the identity store, revocation of agents and
//!   callers, enrollment, the CSR check, renewal;
//! - [`cluster`] (backend): the state replicas share in PostgreSQL;
//! - [`peer`] (transport + feature): the links between replicas, and forwarding a call to the
//!   replica that holds the agent's session;
//! - [`tools`] (dev tooling): `dev`, the demo upstream, `tetherctl`'s logic;
//! - leaves: [`config`], [`metrics`], [`quota`], [`tls`], [`data_dir`], [`error`];
//! - [`server`] (wiring).
#![warn(missing_docs)]

pub mod cluster;
pub mod commands;
pub mod config;
pub mod console;
pub mod data_dir;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod northbound;
pub mod peer;
pub mod quota;
pub mod relay;
pub mod server;
pub mod tls;
pub mod tools;
pub mod tunnel;

pub use config::GatewayConfig;
pub use error::GatewayError;
pub use server::{GatewayHandle, Sockets, start};
