//! Tether's northbound gRPC API, `tether.v1`: the contract the control plane codes against.
//!
//! # Layout
//! - `proto/tether/v1/*.proto`: the definitions, compiled at build time by protox (pure Rust);
//! - [`v1`]: the generated messages, tonic servers and clients.

/// `tether.v1`: generated from `proto/tether/v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tether.v1.rs"));
}
