//! `tether-loadtest`: a load test of the tunnel fan-out. One process runs a fleet of simulated
//! agents (each with its own certificate and QUIC connection) against a real gateway, and a
//! driver that uses only the gateway's northbound API, as a control plane would. Scenarios
//! measure what the issue's targets ask for; the run writes a report directory.
//!
//! ```text
//! tether-loadtest run --agents 10000 --scenario ramp,broadcast,commands,storm,soak
//! tether-loadtest run --agents 3000 --replicas 3 --scenario ramp,broadcast,rolling
//! tether-loadtest run --agents 10000 --ramp-rate 500 --scenario ramp,console
//! ```
//!
//! # Layout
//! - [`identities`] (backend): agent and driver certificates issued in bulk from a local CA;
//! - [`gateway`] (wiring): the gateway under test, `tether-gateway serve` processes this tool
//!   starts, kills and restarts (one, or `--replicas N` on a local PostgreSQL), or an existing
//!   one;
//! - [`fleet`] (transport + session + feature): the simulated agents;
//! - [`driver`] (northbound client): relayed calls, commands, the agent list, console login
//!   links;
//! - [`console`] (northbound client, HTTPS): the web console as a browser uses it: login,
//!   pages, server-sent events;
//! - [`procstat`] (backend): RSS and CPU of each gateway replica and of this process, over time;
//! - [`scenario`]: `ramp`, `broadcast`, `commands`, `storm`, `soak`, `rolling`, `console`, and
//!   [`run`] that wires them;
//! - [`report`]: `report.json`, `report.md`, and [`chart`]: the SVG charts (plotters).
#![warn(missing_docs)]

pub mod chart;
pub mod console;
pub mod driver;
pub mod fleet;
pub mod gateway;
pub mod identities;
pub mod procstat;
pub mod report;
pub mod scenario;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use scenario::run;

/// Why a load test run failed (the run's own failure, not a missed target: those are in the
/// report).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The options do not make sense together (the caller's to fix).
    #[error("{0}")]
    Usage(String),
    /// Certificates could not be made or loaded.
    #[error("PKI: {0}")]
    Pki(String),
    /// The gateway under test could not be started or reached.
    #[error("gateway: {0}")]
    Gateway(String),
    /// The fleet could not be set up.
    #[error("fleet: {0}")]
    Fleet(String),
    /// The northbound API could not be reached.
    #[error("driver: {0}")]
    Driver(String),
    /// The report could not be written.
    #[error("report: {0}")]
    Report(String),
}

/// A scenario of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Connect the fleet at the ramp rate; agents/s, gateway memory per agent, idle CPU.
    Ramp,
    /// Unary calls to random agents, one call to every agent, bulk streams from a subset.
    Broadcast,
    /// One command per agent until all Succeeded.
    Commands,
    /// `kill -9` the gateway with the fleet connected, restart it, measure the reconnects.
    Storm,
    /// Steady mixed load (unary calls, commands, bulk streams) for `--soak-duration`.
    Soak,
    /// Steady mixed load while each replica in turn is stopped (SIGTERM: it drains) and
    /// started again; counts failed calls, lost commands and cut streams.
    Rolling,
    /// The web console with the fleet connected: log in through a login link, load the fleet
    /// page and a filtered one, and time the live update of agents stopped and started again
    /// (lean fleet) on the fleet page's event stream.
    Console,
}

impl Scenario {
    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ramp => "ramp",
            Scenario::Broadcast => "broadcast",
            Scenario::Commands => "commands",
            Scenario::Storm => "storm",
            Scenario::Soak => "soak",
            Scenario::Rolling => "rolling",
            Scenario::Console => "console",
        }
    }
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// `tether-loadtest run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Agents in the fleet.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Timed loads of each console page (console scenario).
    #[arg(long, default_value_t = 30)]
    pub console_loads: usize,
    /// Gateway replicas to start, on a local PostgreSQL started for the run (Debian's
    /// `postgresql`), as `tether-gateway dev --replicas N` does; agents are spread over them
    /// round robin. 1: one gateway on its embedded store.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Share of relayed calls sent to a replica that does not hold the agent's session, so
    /// that the gateway must forward it (0 to 1; needs --replicas 2 or more). The report gives
    /// local and forwarded latency apart.
    #[arg(long, default_value_t = 0.0)]
    pub forwarded: f64,
    /// Sessions each agent keeps on distinct replicas, as the agent's `connections` (default 2,
    /// at most --replicas): lean agents dial their next replica for each, full agents are given
    /// that many replica addresses (one session to each).
    #[arg(long, default_value_t = 2)]
    pub agent_connections: usize,
    /// `tunnel.drain_timeout` of the started gateways: how long a stopped replica drains.
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub drain_timeout: Duration,
    /// Unary calls per second during the rolling restart (plus `--soak-command-share` of that
    /// as commands, and one bulk stream a second).
    #[arg(long, default_value_t = 200.0)]
    pub rolling_rate: f64,
    /// Steady load before the first restart, between restarts and after the last.
    #[arg(long, value_parser = duration, default_value = "3s")]
    pub rolling_pause: Duration,
    /// Scenarios, comma-separated, run in this order (the fleet always ramps up first).
    #[arg(long, value_delimiter = ',', default_value = "ramp,broadcast,commands")]
    pub scenario: Vec<Scenario>,
    /// Report directory (default: `loadtest-report/<unix time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `lean` agents (default) or `full` tether_agent instances.
    #[arg(long, value_enum, default_value = "lean")]
    pub fleet: fleet::FleetMode,
    /// Agents started per second.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_rate: f64,
    /// UDP sockets the lean fleet shares (default: one per 500 agents).
    #[arg(long)]
    pub sockets: Option<usize>,
    /// Most handshakes in flight across the fleet (0: no limit, as with independent agents).
    #[arg(long, default_value_t = 0)]
    pub max_handshakes: usize,
    /// Heartbeat interval the local gateway announces (`tunnel.heartbeat_interval`).
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub heartbeat: Duration,
    /// Reconnect backoff: ceiling of the first delay (full jitter).
    #[arg(long, value_parser = duration, default_value = "500ms")]
    pub initial_backoff: Duration,
    /// Reconnect backoff cap.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub max_backoff: Duration,
    /// Time allowed for one dial.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// Calls in flight at most (broadcast, commands, soak).
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Northbound connections of the driver.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Sequential unary calls to random agents (broadcast scenario).
    #[arg(long, default_value_t = 2000)]
    pub unary_calls: usize,
    /// Agents that stream bulk data (broadcast scenario; soak streams from random agents).
    #[arg(long, default_value_t = 20)]
    pub bulk_agents: usize,
    /// KiB per bulk stream (64 KiB messages).
    #[arg(long, default_value_t = 1024)]
    pub bulk_kib: u32,
    /// Wait after the ramp before measuring idle CPU and memory.
    #[arg(long, value_parser = duration, default_value = "15s")]
    pub settle: Duration,
    /// Window over which idle CPU is measured.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub idle_window: Duration,
    /// Longest wait for all commands to succeed.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub commands_timeout: Duration,
    /// Longest wait for the fleet to come back after the storm's restart.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub storm_timeout: Duration,
    /// Length of the soak.
    #[arg(long, value_parser = duration, default_value = "10m")]
    pub soak_duration: Duration,
    /// Unary calls per second during the soak (plus `--soak-command-share` of that as
    /// commands, and a bulk stream every 5 s).
    #[arg(long, default_value_t = 1000.0)]
    pub soak_rate: f64,
    /// Commands submitted during the soak, as a share of its unary calls (0: none).
    #[arg(long, default_value_t = 0.01)]
    pub soak_command_share: f64,
    /// Scrape the local gateway's `/metrics` this often, as Prometheus would (0s: never). The
    /// gateway's histograms buffer their samples until a scrape drains them.
    #[arg(long, value_parser = duration, default_value = "0s")]
    pub scrape_every: Duration,
    /// How often the gateway and this process are sampled.
    #[arg(long, value_parser = duration, default_value = "500ms")]
    pub sample_every: Duration,
    /// The `tether-gateway` binary to start (default: next to this one).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// `RUST_LOG` of the started gateway (its log goes to gateway.log in the report directory).
    #[arg(long, default_value = "info")]
    pub gateway_log: String,
    /// Extra gateway config, `KEY=VALUE` (repeatable), passed as `--set`.
    #[arg(long = "gateway-set", value_name = "KEY=VALUE")]
    pub gateway_set: Vec<String>,
    /// An existing gateway's QUIC address instead of starting one (needs --northbound, --pki).
    #[arg(long, requires_all = ["northbound", "pki"])]
    pub gateway: Option<SocketAddr>,
    /// The existing gateway's northbound address.
    #[arg(long)]
    pub northbound: Option<String>,
    /// The existing gateway's PKI directory (`tether-gateway pki init`: ca.pem, ca-key.pem,
    /// trust-domain): agent and driver certificates are issued from it.
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// TLS name of the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// The existing gateway's pid, to sample its RSS and CPU.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
}
