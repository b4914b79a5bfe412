//! IO-side pieces shared by the gateway and the agent (they never import each other).
//!
//! # Layout
//! - [`accept`]: taking TCP connections without spinning when the process is out of file
//!   descriptors;
//! - [`duration`]: durations as people write them (`90d`, `1h 30m`);
//! - [`digest`]: SHA-256 in lowercase hex (certificate fingerprints, token hashes);
//! - [`driver`]: the one control-stream driver, for the agent's and the gateway's session
//!   machines alike (deadlines from the machines, no fixed tick);
//! - [`config`]: one merge point for TOML file, `TETHER_*` environment and `--set` flags, with
//!   errors that name the key; exit code [`config::EXIT_CONFIG`] (64) for bad config;
//! - [`grpc`]: metadata and `grpc-timeout` handling for the relay;
//! - [`logging`]: `tracing` subscriber, text or JSON, and a throttle for repeated lines;
//! - [`ops`]: the ops HTTP endpoint (`/metrics`, `/healthz`, `/readyz`);
//! - [`tls`]: loading PEM material and reading SPIFFE identities out of certificates;
//! - [`report`]: an error and its sources as one line, each part said once;
//! - [`shutdown`]: the one shutdown signal every task listens to;
//! - [`transport`]: a tunnel connection and its streams, over QUIC or TLS + HTTP/2 on TCP;
//! - [`stream`]: framed reads and writes on one tunnel stream.
#![warn(missing_docs)]

pub mod accept;
pub mod config;
pub mod digest;
pub mod driver;
pub mod duration;
pub mod grpc;
pub mod logging;
pub mod ops;
pub mod report;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod transport;

pub use tokio_util::sync::CancellationToken;
