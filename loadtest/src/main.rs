//! `tether-loadtest`: parses flags and runs the load test library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_loadtest::RunOptions;

#[derive(Parser)]
#[command(
    name = "tether-loadtest",
    version,
    about = "Load test of Tether's tunnel fan-out: a fleet of simulated agents, a northbound driver, a report"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start (or target) a gateway, ramp up the fleet, run the scenarios, write the report.
    Run(Box<RunOptions>),
}

fn main() -> ExitCode {
    tether_runtime::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let Cmd::Run(opts) = Cli::parse().cmd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(tether_loadtest::run(*opts)) {
        Ok(out) => {
            println!("report: {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}
