//! Tether's northbound gRPC API, `tether.v1`: the contract the control plane codes against.
//!
//! # Layout
//! - `proto/tether/v1/*.proto`: the definitions, compiled at build time by protox (pure Rust);
//! - [`v1`]: the generated messages, tonic servers and clients.

/// `tether.v1`: the northbound API, generated from `proto/tether/v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tether.v1.rs"));
}

/// `tether.agent.v1`: served by each agent itself (`tether-service: agent`).
pub mod agent {
    /// Generated from `proto/tether/agent/v1`.
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tether.agent.v1.rs"));
    }
}

/// `tether.demo.v1`: the demo upstream's echo service.
pub mod demo {
    /// Generated from `proto/tether/demo/v1`.
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tether.demo.v1.rs"));
    }
}

/// Every file descriptor above, encoded, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
