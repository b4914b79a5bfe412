//! `tetherctl`: the command-line client of the northbound API, as a library.

pub mod call;
pub mod cli;
mod client;
pub mod diagnose;

pub use client::*;
