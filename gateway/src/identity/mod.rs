//! Feature and backend layers: who agents and callers are.
//!
//! The PKI, the durable identity store (embedded or PostgreSQL, behind [`store`]), revocation
//! of agents and callers (applied on every replica by [`follow`]), and enrollment.

pub mod callers;
pub mod csr;
pub mod db;
pub mod endpoint;
pub mod enrollment;
pub mod follow;
pub mod pki;
pub mod renewal;
pub mod revocation;
pub mod store;
