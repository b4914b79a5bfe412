//! Dev tooling, beside the serving library: nothing under `tunnel`, `northbound`, `relay`,
//! `commands` or `identity` imports it.

pub mod ctl;
pub mod demo;
pub mod dev;
pub mod local_postgres;
pub mod ports;
