//! Feature and backend layers: who agents and callers are.
//!
//! The PKI, the durable identity store, revocation of agents and callers, and enrollment.

pub mod callers;
pub mod csr;
pub mod db;
pub mod endpoint;
pub mod enrollment;
pub mod pki;
pub mod renewal;
pub mod revocation;
