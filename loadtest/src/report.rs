//! The report directory: `report.json` (everything measured, machine-readable), `report.md`
//! (the same for people, with each target met or missed) and SVG charts ([`crate::chart`]):
//! connected agents, gateway RSS and CPU over time (per replica), latency CDFs.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::LoadError;
use crate::chart::{Series, line_chart};
use crate::procstat::Sample;

// === Figures ===

/// A latency distribution, microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// (latency µs, fraction ≤) points of the CDF, for the chart.
    pub cdf: Vec<(u64, f64)>,
}

impl Latency {
    /// Summarises `h` (microseconds).
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let mut cdf: Vec<(u64, f64)> = h
            .iter_quantiles(4)
            .map(|v| (v.value_iterated_to(), v.quantile_iterated_to()))
            .collect();
        cdf.dedup_by_key(|p| p.0);
        Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            cdf,
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {} · p99 {} · p99.9 {} · max {} ({} calls)",
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.count
        )
    }
}

fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

/// A batch of calls as reported.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Calls {
    /// Calls made.
    pub calls: usize,
    /// Succeeded.
    pub ok: usize,
    /// Failed.
    pub errors: usize,
    /// Failures by gRPC code.
    pub error_codes: std::collections::BTreeMap<String, usize>,
    /// A few failure messages.
    pub error_samples: Vec<String>,
    /// From the first start to the last end, seconds.
    pub duration_s: f64,
    /// Per-call latency.
    pub latency: Latency,
}

impl From<&crate::driver::Batch> for Calls {
    fn from(b: &crate::driver::Batch) -> Calls {
        Calls {
            calls: b.calls,
            ok: b.ok,
            errors: b.failed(),
            error_codes: b.errors.clone(),
            error_samples: b.samples.clone(),
            duration_s: b.elapsed.as_secs_f64(),
            latency: Latency::from_histogram(&b.latency),
        }
    }
}

/// `ramp`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ramp {
    /// Agents in the fleet.
    pub agents: usize,
    /// Agents the fleet had a session for at the end of the ramp.
    pub connected: usize,
    /// Agents the gateway listed as connected (`Agents/List`).
    pub gateway_connected: usize,
    /// From the first agent started to the last connected, seconds.
    pub duration_s: f64,
    /// `agents / duration_s`.
    pub agents_per_s: f64,
    /// The ramp rate asked for.
    pub ramp_rate: f64,
    /// Dials that failed during the ramp.
    pub connect_failures: u64,
    /// A few of their reasons.
    pub failure_samples: Vec<String>,
    /// Gateway RSS with no agent, KiB.
    pub rss_before_kib: u64,
    /// Gateway RSS with every agent connected and idle, KiB.
    pub rss_connected_kib: u64,
    /// `(rss_connected − rss_before) / agents`, bytes.
    pub rss_per_agent_bytes: f64,
    /// How long idle CPU was measured, seconds.
    pub idle_window_s: f64,
    /// Gateway CPU while every agent is connected and only heartbeating, percent of one core.
    pub idle_cpu_pct: f64,
    /// UDP datagrams per second on the machine (fleet ↔ gateway, each counted once) over the
    /// same window; `None` when `/proc/net/snmp` could not be read.
    pub idle_udp_datagrams_per_s: Option<f64>,
    /// The heartbeat interval agents ran with, seconds.
    pub heartbeat_s: f64,
    /// The fleet's own RSS (this process), KiB, when connected.
    pub fleet_rss_kib: u64,
}

/// `broadcast`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Broadcast {
    /// Sequential unary calls, each to a random agent.
    pub unary_random: Calls,
    /// Those of them sent to the replica holding the agent's session.
    pub unary_local: Calls,
    /// Those sent to another replica, which had to forward them (`--forwarded`); `None` when
    /// none were (one replica, or `--forwarded 0`).
    pub unary_forwarded: Option<Calls>,
    /// One unary call to every agent.
    pub broadcast: Calls,
    /// Concurrency of the broadcast.
    pub concurrency: usize,
    /// Server streams of bulk data from a subset of agents.
    pub bulk: Bulk,
    /// Shorthand for `broadcast.errors` (the smoke test reads it).
    pub errors: usize,
}

/// Bulk server streams.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Bulk {
    /// Streams (one per agent of the subset).
    pub streams: usize,
    /// Streams that completed.
    pub ok: usize,
    /// Bytes received in all.
    pub bytes: u64,
    /// Seconds for all of them.
    pub duration_s: f64,
    /// Aggregate MiB/s.
    pub mib_per_s: f64,
    /// Failure messages (first few).
    pub error_samples: Vec<String>,
}

/// `commands`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Commands {
    /// Commands submitted (one per agent).
    pub submitted: usize,
    /// Submits refused.
    pub submit_errors: usize,
    /// Seconds to submit them all.
    pub submit_duration_s: f64,
    /// Commands that reached Succeeded.
    pub succeeded: usize,
    /// Commands that ended otherwise, or were not final at the deadline.
    pub not_succeeded: usize,
    /// True when every submitted command succeeded.
    pub all_succeeded: bool,
    /// From the first Submit to the last command's Succeeded (gateway timestamps), seconds.
    pub all_succeeded_s: f64,
    /// Submit → Succeeded per command (the gateway's `created` → `finished`).
    pub latency: Latency,
}

/// `storm`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Storm {
    /// Agents connected before the kill.
    pub agents: usize,
    /// Seconds from the kill until the new gateway process listened.
    pub restart_s: f64,
    /// Agents back (session with the new gateway) at the end.
    pub reconnected: usize,
    /// Seconds from the restart until 99% were back (None: never).
    pub back_99_s: Option<f64>,
    /// Seconds from the restart until all were back (None: never).
    pub back_100_s: Option<f64>,
    /// Fraction back within 10 s of the restart.
    pub within_10s: f64,
    /// Fraction back within 20 s of the restart.
    pub within_20s: f64,
    /// Seconds from the kill until agents noticed (session ended): p50, p99, max.
    pub detect_s: [f64; 3],
    /// Seconds from noticing (the session ended) to the session slot being up again, per
    /// lost session: p50, p99, max (lean fleet only; None when it was not recorded). The
    /// reconnect itself, without the heartbeat-bound detection.
    pub after_notice_s: Option<[f64; 3]>,
    /// Fraction of the lost sessions up again within 10 s / 20 s of their agent noticing.
    pub after_notice_within: Option<(f64, f64)>,
    /// Reconnect delays the agents chose after the kill, ms: p50, p90, p99, max.
    pub backoff_ms: [f64; 4],
    /// The same delays as a histogram: (bucket upper bound ms, count).
    pub backoff_histogram: Vec<(u64, usize)>,
    /// Dials that failed during the storm.
    pub connect_failures: u64,
    /// A few of their reasons.
    pub failure_samples: Vec<String>,
    /// Datagrams the restarted gateway's tunnel socket dropped, its receive buffer full, until
    /// every agent was back (each a lost Initial or handshake flight: a retransmission timeout
    /// for its agent).
    pub gateway_socket_drops: Option<u64>,
    /// The same for every UDP socket on the machine (the fleet's included).
    pub machine_receive_drops: Option<u64>,
    /// One call to every agent after the storm.
    pub dispatch: Calls,
}

/// `soak`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Soak {
    /// Seconds of steady load.
    pub duration_s: f64,
    /// Unary calls per second asked for.
    pub rate: f64,
    /// The unary calls.
    pub rpc: Calls,
    /// Calls not made because `--concurrency` calls were already in flight.
    pub skipped: usize,
    /// Commands submitted / succeeded.
    pub commands: (usize, usize),
    /// Bulk streams made / completed.
    pub bulk: (usize, usize),
    /// Gateway RSS after the warm-up, KiB.
    pub rss_start_kib: u64,
    /// Gateway RSS at the end, KiB.
    pub rss_end_kib: u64,
    /// Highest RSS seen, KiB.
    pub rss_max_kib: u64,
    /// `(end − start) / start`, percent.
    pub rss_growth_pct: f64,
    /// Gateway CPU over the whole soak, percent of one core.
    pub cpu_avg_pct: f64,
}

/// One replica of the gateway, as measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaReport {
    /// `cluster.replica_id` (`gateway` for a lone gateway).
    pub id: String,
    /// Sessions it held at the end of the ramp, as `Agents/List` reports them.
    pub sessions: usize,
    /// Its RSS with every agent connected and idle, KiB (`None`: not measured).
    pub rss_idle_kib: Option<u64>,
    /// Its CPU while idle, percent of one core (`None`: not measured).
    pub idle_cpu_pct: Option<f64>,
    /// Its highest RSS over the run, KiB.
    pub rss_max_kib: u64,
    /// Its CPU over the whole run, percent of one core (average of the samples).
    pub cpu_avg_pct: f64,
    /// Relayed calls it counted (`tether_gateway_relay_calls_total`) since its last start;
    /// `None` when its `/metrics` could not be read.
    pub relay_calls: Option<f64>,
    /// Streams (relayed calls, TCP streams) it forwarded to a peer replica since its last
    /// start (`tether_gateway_peer_forwarded_streams_total{direction="out"}`); `None` when it
    /// exports no peer-link metric (a gateway without peer links).
    pub forwarded: Option<f64>,
}

/// Calls that reached a replica without the agent's session, as measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Forwarding {
    /// `--forwarded`: the share of relayed calls the driver sent to a replica that did not
    /// hold the agent's session.
    pub share_asked: f64,
    /// The series read from the gateways' `/metrics` for forwarded calls; empty when the
    /// gateways export none.
    pub gateway_metrics: Vec<String>,
    /// Forwarded calls over relayed calls, as the gateways count them, summed over replicas;
    /// `None` when not measured.
    pub gateway_share: Option<f64>,
    /// Why a figure is not measured, when one is not.
    pub not_measured: Vec<String>,
}

/// One replica stopped and started again during `rolling`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Restart {
    /// The replica.
    pub replica: String,
    /// Agents of the fleet with a session on it when it was stopped.
    pub agents_on_it: usize,
    /// From SIGTERM to its exit, seconds.
    pub stop_s: f64,
    /// It did not exit within its drain and 20 s more and was killed.
    pub killed: bool,
    /// From SIGTERM to the new process listening, seconds.
    pub down_s: f64,
}

/// `rolling`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rolling {
    /// Replicas restarted in turn.
    pub restarts: Vec<Restart>,
    /// `--drain-timeout`, seconds.
    pub drain_timeout_s: f64,
    /// Seconds of load, from the first call to the last restart's pause.
    pub duration_s: f64,
    /// Unary calls per second asked for.
    pub rate: f64,
    /// The unary calls made meanwhile (to the replica holding the agent's session when the
    /// call was sent, or another with `--forwarded`).
    pub rpc: Calls,
    /// Calls not made because `--concurrency` calls were already in flight.
    pub skipped: usize,
    /// Commands submitted meanwhile.
    pub commands_submitted: usize,
    /// Submits refused (a failed call; no command was created).
    pub commands_refused: usize,
    /// Accepted commands that reached Succeeded by the end of `--commands-timeout`.
    pub commands_succeeded: usize,
    /// Accepted commands that did not: lost, or late.
    pub commands_lost: usize,
    /// Bulk server streams started meanwhile.
    pub streams: usize,
    /// Those that completed.
    pub streams_completed: usize,
    /// Failures of streams cut (first few).
    pub stream_errors: Vec<String>,
    /// Sessions the agents left when asked to go (`GoAway`), another of theirs being up.
    pub sessions_left: u64,
}

/// Loads of one console page.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsolePage {
    /// Its path and query.
    pub path: String,
    /// Loads timed (after one untimed).
    pub loads: usize,
    /// Loads that failed or did not answer 200.
    pub failed: usize,
    /// Bytes of HTML of the last load.
    pub bytes: usize,
    /// Agents' rows on it (`<tr data-agent=`).
    pub rows: usize,
    /// Gateway CPU over the timed loads per load, milliseconds (the quiet rate of
    /// [`Console::gateway_quiet_cpu_pct`] not taken off).
    pub gateway_cpu_ms_per_load: Option<f64>,
    /// From sending the request to the last byte of the page, over a kept-alive connection.
    pub latency: Latency,
}

/// `console`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Console {
    /// Login: `CreateLoginLink`, then following the link to the session cookie, seconds.
    pub login_s: f64,
    /// Gateway CPU over a quiet second before the page loads (heartbeats of the fleet),
    /// percent of one core.
    pub gateway_quiet_cpu_pct: Option<f64>,
    /// The fleet page, `/ui/`.
    pub fleet_page: ConsolePage,
    /// A page with filters.
    pub filtered_page: ConsolePage,
    /// The fleet page's event stream, as its `data-live` names it.
    pub stream: String,
    /// Agents stopped and started again, one change at a time.
    pub changes: usize,
    /// From an agent's close (`SHUTDOWN`) to its `offline` row arriving on the stream.
    pub disconnect: Latency,
    /// From an agent's session established (the agent read the `Welcome`) to its `online`
    /// row arriving.
    pub connect: Latency,
    /// From an agent's dial to its `online` row arriving (the QUIC handshake included).
    pub connect_from_dial: Latency,
    /// Changes whose row did not arrive within the wait.
    pub missed: usize,
    /// Events read on the stream, by name.
    pub events: std::collections::BTreeMap<String, usize>,
    /// Mean bytes of a `row` event (as `text/event-stream` carries it).
    pub row_event_bytes: f64,
    /// Mean bytes of a `replace` event (the counts).
    pub counts_event_bytes: f64,
    /// Every event's bytes together.
    pub event_bytes: u64,
    /// Gateway CPU while the changes ran (all cores: 100 = one core), percent.
    pub gateway_cpu_pct: Option<f64>,
}

/// One target of the issue, as measured.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What.
    pub name: String,
    /// The bar.
    pub target: String,
    /// What this run measured.
    pub measured: String,
    /// Met, missed, or `None` when this run cannot say (scenario not run, fewer agents).
    pub met: Option<bool>,
}

/// The machine the run was on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores available to this process.
    pub cores: usize,
    /// Total memory, MiB.
    pub mem_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// 1-minute load average when the run started.
    pub load_at_start: f64,
}

impl Machine {
    /// Reads `/proc`.
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Machine {
            cpu: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_mib: read("/proc/meminfo")
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |k| k / 1024),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load_at_start: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        }
    }
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// `tether-loadtest` version.
    pub version: String,
    /// The command line.
    pub command: String,
    /// `git rev-parse --short HEAD` where the tool ran, if any.
    pub commit: Option<String>,
    /// Unix time of the start.
    pub started_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// `local` (a gateway this tool started) or `external`.
    pub gateway: String,
    /// Gateway replicas (1: a lone gateway on its embedded store).
    pub replica_count: usize,
    /// Each replica.
    pub replicas: Vec<ReplicaReport>,
    /// Forwarded calls.
    pub forwarding: Forwarding,
    /// `lean` or `full`.
    pub fleet: String,
    /// Agents in the fleet.
    pub agents: usize,
    /// Scenarios run, in order.
    pub scenarios: Vec<String>,
    /// `ramp`.
    pub ramp: Option<Ramp>,
    /// `broadcast`.
    pub broadcast: Option<Broadcast>,
    /// `commands`.
    pub commands: Option<Commands>,
    /// `storm`.
    pub storm: Option<Storm>,
    /// `soak`.
    pub soak: Option<Soak>,
    /// `rolling`.
    pub rolling: Option<Rolling>,
    /// `console`.
    pub console: Option<Console>,
    /// The targets.
    pub targets: Vec<Target>,
    /// Where each scenario started on the time axis (seconds, name).
    pub marks: Vec<(f64, String)>,
    /// Sampled every `--sample-every`.
    pub series: Vec<Sample>,
}

// === Targets ===

fn target(name: &str, bar: &str, measured: String, met: Option<bool>) -> Target {
    Target {
        name: name.into(),
        target: bar.into(),
        measured,
        met,
    }
}

/// Judges the targets on what was measured. Targets stated for 10,000 agents are
/// judged only when the run had at least that many.
pub fn judge(r: &Report) -> Vec<Target> {
    let full = r.agents >= 10_000;
    let at_scale = |met: bool| if full { Some(met) } else { None };
    let mut t = Vec::new();
    match &r.ramp {
        Some(ramp) => {
            t.push(target(
                "agents connected over mTLS QUIC and heartbeating",
                "10,000",
                format!(
                    "{} of {} (gateway lists {}), {:.0} agents/s",
                    ramp.connected, ramp.agents, ramp.gateway_connected, ramp.agents_per_s
                ),
                at_scale(ramp.connected >= 10_000 && ramp.gateway_connected >= 10_000),
            ));
            t.push(target(
                "gateway memory per connected idle agent",
                "≤ 32 KiB",
                format!(
                    "{:.1} KiB ({} → {} KiB RSS)",
                    ramp.rss_per_agent_bytes / 1024.0,
                    ramp.rss_before_kib,
                    ramp.rss_connected_kib
                ),
                at_scale(ramp.rss_per_agent_bytes <= 32.0 * 1024.0),
            ));
            t.push(target(
                "gateway CPU while idle",
                "≤ 5% of one core",
                format!(
                    "{:.2}% (heartbeat {}s, {:.0} s window)",
                    ramp.idle_cpu_pct, ramp.heartbeat_s, ramp.idle_window_s
                ),
                at_scale(ramp.idle_cpu_pct <= 5.0),
            ));
        }
        None => t.push(target("ramp", "—", "not run".into(), None)),
    }
    match &r.broadcast {
        Some(b) => {
            t.push(target(
                "unary RPC to a random agent, p99",
                "≤ 1 ms",
                b.unary_random.latency.line(),
                at_scale(b.unary_random.latency.p99_us <= 1000 && b.unary_random.errors == 0),
            ));
            t.push(target(
                "broadcast to every agent",
                "≤ 2 s, zero errors",
                format!(
                    "{:.2} s, {} errors; {}",
                    b.broadcast.duration_s,
                    b.broadcast.errors,
                    b.broadcast.latency.line()
                ),
                at_scale(b.broadcast.duration_s <= 2.0 && b.broadcast.errors == 0),
            ));
        }
        None => t.push(target("broadcast", "—", "not run".into(), None)),
    }
    match &r.commands {
        Some(c) => t.push(target(
            "one command per agent, all Succeeded",
            "≤ 5 s",
            format!(
                "{:.2} s, {} of {} succeeded",
                c.all_succeeded_s, c.succeeded, c.submitted
            ),
            at_scale(c.all_succeeded && c.all_succeeded_s <= 5.0),
        )),
        None => t.push(target("commands", "—", "not run".into(), None)),
    }
    match &r.storm {
        Some(s) => {
            let dispatched = s.dispatch.calls > 0 && s.dispatch.ok == s.dispatch.calls;
            t.push(target(
                "storm: back after kill -9 and restart",
                "≥ 99% within 10 s, 100% within 20 s, dispatch 100%",
                format!(
                    "{:.1}% within 10 s, {:.1}% within 20 s (99% at {}, 100% at {}); dispatch {}/{}",
                    s.within_10s * 100.0,
                    s.within_20s * 100.0,
                    s.back_99_s.map_or("never".into(), |v| format!("{v:.1} s")),
                    s.back_100_s.map_or("never".into(), |v| format!("{v:.1} s")),
                    s.dispatch.ok,
                    s.dispatch.calls
                ),
                at_scale(s.within_10s >= 0.99 && s.within_20s >= 1.0 && dispatched),
            ));
            // The reconnect on its own: from each agent noticing the loss (heartbeat-bound,
            // stated in the storm section) to its session being up again.
            if let (Some(w), Some(q)) = (s.after_notice_within, s.after_notice_s) {
                t.push(target(
                    "storm: back after the agent noticed",
                    "≥ 99% within 10 s, 100% within 20 s",
                    format!(
                        "{:.1}% within 10 s, {:.1}% within 20 s (p50 {:.2} s, p99 {:.2} s, max {:.2} s)",
                        w.0 * 100.0,
                        w.1 * 100.0,
                        q[0],
                        q[1],
                        q[2]
                    ),
                    at_scale(w.0 >= 0.99 && w.1 >= 1.0),
                ));
            }
        }
        None => t.push(target("storm", "—", "not run".into(), None)),
    }
    match &r.soak {
        Some(s) => t.push(target(
            "soak at 1,000 RPC/s: gateway RSS growth",
            "< 5% over 10 min",
            format!(
                "{:+.1}% ({} → {} KiB) over {:.0} s at {:.0}/s, {} errors",
                s.rss_growth_pct,
                s.rss_start_kib,
                s.rss_end_kib,
                s.duration_s,
                s.rate,
                s.rpc.errors
            ),
            (full && s.duration_s >= 600.0 && s.rate >= 1000.0).then_some(s.rss_growth_pct < 5.0),
        )),
        None => t.push(target("soak", "—", "not run".into(), None)),
    }
    if let Some(r) = &r.rolling {
        let cut = r.streams - r.streams_completed;
        t.push(target(
            "rolling restart of every replica under load",
            "0 failed unary calls, 0 lost commands (cut streams counted)",
            format!(
                "{} of {} unary calls failed {:?}; {} of {} commands lost, {} Submits refused; {} of {} streams cut; {} replicas restarted",
                r.rpc.errors,
                r.rpc.calls,
                r.rpc.error_codes,
                r.commands_lost,
                r.commands_submitted - r.commands_refused,
                r.commands_refused,
                cut,
                r.streams,
                r.restarts.len()
            ),
            (r.restarts.len() >= 2 && r.rpc.calls > 0)
                .then_some(r.rpc.errors == 0 && r.commands_lost == 0),
        ));
    }
    t
}

// === Writing ===

/// Writes `report.json`, `report.md` and the charts into `dir`.
pub fn write(dir: &Path, r: &Report) -> Result<(), LoadError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| LoadError::Report(format!("{what}: {e}"))
    };
    let json = serde_json::to_string_pretty(r).map_err(|e| LoadError::Report(e.to_string()))?;
    std::fs::write(dir.join("report.json"), json).map_err(io("report.json"))?;
    for (name, svg) in charts(r) {
        std::fs::write(dir.join(&name), svg).map_err(io(&name))?;
    }
    std::fs::write(dir.join("report.md"), markdown(r)).map_err(io("report.md"))?;
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Load test report\n");
    let _ = writeln!(s, "`{}`\n", r.command);
    let m = &r.machine;
    let _ = writeln!(
        s,
        "{} agents ({} fleet), {} gateway; commit {}; {} cores ({}), {} MiB, kernel {}, load {:.2} at start.\n",
        r.agents,
        r.fleet,
        r.gateway,
        r.commit.as_deref().unwrap_or("unknown"),
        m.cores,
        m.cpu,
        m.mem_mib,
        m.kernel,
        m.load_at_start
    );
    let _ = writeln!(
        s,
        "## Targets\n\n| target | bar | measured | verdict |\n|---|---|---|---|"
    );
    for t in &r.targets {
        let v = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "n/a",
        };
        let _ = writeln!(s, "| {} | {} | {} | {} |", t.name, t.target, t.measured, v);
    }
    replicas_md(&mut s, r);
    if let Some(x) = &r.ramp {
        let _ = writeln!(
            s,
            "\n## ramp\n\n- {} of {} connected in {:.2} s ({:.0} agents/s, asked {:.0}/s), {} failed dials; gateway lists {}\n\
             - gateway RSS {} KiB with no agent → {} KiB with all connected: {:.1} KiB per agent\n\
             - gateway CPU idle (heartbeat {} s): {:.2}% of one core over {:.0} s; fleet RSS {} MiB",
            x.connected,
            x.agents,
            x.duration_s,
            x.agents_per_s,
            x.ramp_rate,
            x.connect_failures,
            x.gateway_connected,
            x.rss_before_kib,
            x.rss_connected_kib,
            x.rss_per_agent_bytes / 1024.0,
            x.heartbeat_s,
            x.idle_cpu_pct,
            x.idle_window_s,
            x.fleet_rss_kib / 1024
        );
        if let Some(d) = x.idle_udp_datagrams_per_s.filter(|d| *d > 0.0) {
            let _ = writeln!(
                s,
                "- UDP datagrams while idle: {d:.0}/s (both directions), {:.1} µs of gateway CPU per datagram",
                x.idle_cpu_pct / 100.0 * 1e6 / d
            );
        }
        for e in &x.failure_samples {
            let _ = writeln!(s, "  - failed dial: `{e}`");
        }
    }
    if let Some(b) = &r.broadcast {
        let _ = writeln!(
            s,
            "\n## broadcast\n\n- unary to a random agent, one at a time: {}, {} errors\n\
             - broadcast to all {} (concurrency {}): {:.2} s, {} errors {:?}; {}\n\
             - bulk: {} streams, {} ok, {:.1} MiB in {:.2} s ({:.1} MiB/s)",
            b.unary_random.latency.line(),
            b.unary_random.errors,
            b.broadcast.calls,
            b.concurrency,
            b.broadcast.duration_s,
            b.broadcast.errors,
            b.broadcast.error_codes,
            b.broadcast.latency.line(),
            b.bulk.streams,
            b.bulk.ok,
            b.bulk.bytes as f64 / (1 << 20) as f64,
            b.bulk.duration_s,
            b.bulk.mib_per_s
        );
        for e in b
            .broadcast
            .error_samples
            .iter()
            .chain(&b.bulk.error_samples)
        {
            let _ = writeln!(s, "  - `{e}`");
        }
    }
    if let Some(c) = &r.commands {
        let _ = writeln!(
            s,
            "\n## commands\n\n- {} submitted in {:.2} s ({} refused); {} succeeded, {} not; all Succeeded {:.2} s after the first Submit\n\
             - Submit → Succeeded: {}",
            c.submitted,
            c.submit_duration_s,
            c.submit_errors,
            c.succeeded,
            c.not_succeeded,
            c.all_succeeded_s,
            c.latency.line()
        );
    }
    if let Some(x) = &r.storm {
        let _ = writeln!(
            s,
            "\n## storm\n\n- kill -9 with {} connected; new process listening after {:.2} s\n\
             - back: 99% at {}, 100% at {} after the restart ({:.1}% within 10 s, {:.1}% within 20 s); {} reconnected\n\
             - agents noticed the loss after (from the kill) p50 {:.2} s, p99 {:.2} s, max {:.2} s\n\
             - back after noticing: {}\n\
             - backoff chosen (ms): p50 {:.0}, p90 {:.0}, p99 {:.0}, max {:.0}; {} failed dials\n\
             - dispatch afterwards: {}/{} ok",
            x.agents,
            x.restart_s,
            x.back_99_s.map_or("never".into(), |v| format!("{v:.2} s")),
            x.back_100_s.map_or("never".into(), |v| format!("{v:.2} s")),
            x.within_10s * 100.0,
            x.within_20s * 100.0,
            x.reconnected,
            x.detect_s[0],
            x.detect_s[1],
            x.detect_s[2],
            match (x.after_notice_s, x.after_notice_within) {
                (Some(q), Some(w)) => format!(
                    "p50 {:.2} s, p99 {:.2} s, max {:.2} s ({:.1}% within 10 s, {:.1}% within 20 s)",
                    q[0],
                    q[1],
                    q[2],
                    w.0 * 100.0,
                    w.1 * 100.0
                ),
                _ => "not recorded (full agents)".into(),
            },
            x.backoff_ms[0],
            x.backoff_ms[1],
            x.backoff_ms[2],
            x.backoff_ms[3],
            x.connect_failures,
            x.dispatch.ok,
            x.dispatch.calls
        );
        if let (Some(g), Some(m)) = (x.gateway_socket_drops, x.machine_receive_drops) {
            let _ = writeln!(
                s,
                "- UDP datagrams dropped for a full receive buffer until all were back: {g} by the gateway's socket, {m} on the machine"
            );
        }
        for e in &x.failure_samples {
            let _ = writeln!(s, "  - `{e}`");
        }
    }
    if let Some(x) = &r.soak {
        let _ = writeln!(
            s,
            "\n## soak\n\n- {:.0} s at {:.0} RPC/s: {}, {} errors, {} skipped (concurrency cap)\n\
             - commands {}/{} succeeded, bulk streams {}/{}\n\
             - gateway RSS {} KiB after warm-up → {} KiB at the end ({:+.2}%), max {} KiB; CPU {:.1}%",
            x.duration_s,
            x.rate,
            x.rpc.latency.line(),
            x.rpc.errors,
            x.skipped,
            x.commands.1,
            x.commands.0,
            x.bulk.1,
            x.bulk.0,
            x.rss_start_kib,
            x.rss_end_kib,
            x.rss_growth_pct,
            x.rss_max_kib,
            x.cpu_avg_pct
        );
    }
    if let Some(x) = &r.rolling {
        let _ = writeln!(
            s,
            "\n## rolling\n\n- each replica in turn: SIGTERM (drain {:.1} s), wait for the exit, start again; steady load of {:.0} unary calls/s for {:.1} s\n\
             - unary calls: {} made, {} failed {:?}, {} skipped (concurrency cap); {}\n\
             - commands: {} submitted, {} Submits refused, {} Succeeded, **{} lost** (not Succeeded by the end of --commands-timeout)\n\
             - bulk streams: {} started, {} completed, {} cut\n\
             - sessions left on a GoAway (another of the agent's sessions up): {}\n\n\
             | replica | agents on it | SIGTERM → exit | killed | SIGTERM → listening again |\n|---|---|---|---|---|",
            x.drain_timeout_s,
            x.rate,
            x.duration_s,
            x.rpc.calls,
            x.rpc.errors,
            x.rpc.error_codes,
            x.skipped,
            x.rpc.latency.line(),
            x.commands_submitted,
            x.commands_refused,
            x.commands_succeeded,
            x.commands_lost,
            x.streams,
            x.streams_completed,
            x.streams - x.streams_completed,
            x.sessions_left
        );
        for k in &x.restarts {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} s | {} | {:.2} s |",
                k.replica,
                k.agents_on_it,
                k.stop_s,
                if k.killed { "yes" } else { "no" },
                k.down_s
            );
        }
        for e in x.rpc.error_samples.iter().chain(&x.stream_errors) {
            let _ = writeln!(s, "  - `{e}`");
        }
    }
    if let Some(x) = &r.console {
        console_md(&mut s, x);
    }
    let _ = writeln!(
        s,
        "\n## Charts\n\n![connected](connected.svg)\n![gateway RSS](gateway-rss.svg)\n![CPU](cpu.svg)\n![latency CDF](latency-cdf.svg)"
    );
    s
}

/// p50, p99 and max of `l`, and how many.
fn quantiles(l: &Latency) -> String {
    format!(
        "p50 {} · p99 {} · max {} ({})",
        ms(l.p50_us),
        ms(l.p99_us),
        ms(l.max_us),
        l.count
    )
}

fn console_md(s: &mut String, x: &Console) {
    let _ = writeln!(
        s,
        "\n## console\n\n- login (CreateLoginLink, then the link to the cookie): {:.3} s\n\
         - gateway CPU over a quiet second before the loads: {} % of a core",
        x.login_s,
        opt(x.gateway_quiet_cpu_pct.map(|c| format!("{c:.1}")), "")
    );
    for p in [&x.fleet_page, &x.filtered_page] {
        let _ = writeln!(
            s,
            "- `GET {}`: {} bytes, {} rows, {} failed; {}; gateway CPU {} ms a load",
            p.path,
            p.bytes,
            p.rows,
            p.failed,
            quantiles(&p.latency),
            opt(p.gateway_cpu_ms_per_load.map(|c| format!("{c:.1}")), "")
        );
    }
    let _ = writeln!(
        s,
        "- live updates on `{}`, {} agents stopped and started again one at a time, {} missed:\n  \
         - disconnect (close → `offline` row): {}\n  \
         - connect (session established → `online` row): {}\n  \
         - connect from the dial: {}\n\
         - events {:?}, {} bytes in all; a `row` {:.0} bytes, the counts {:.0} bytes on average\n\
         - gateway CPU during the changes: {}",
        x.stream,
        x.changes,
        x.missed,
        quantiles(&x.disconnect),
        quantiles(&x.connect),
        quantiles(&x.connect_from_dial),
        x.events,
        x.event_bytes,
        x.row_event_bytes,
        x.counts_event_bytes,
        opt(x.gateway_cpu_pct.map(|c| format!("{c:.1}")), " %"),
    );
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or_else(|| "not measured".to_owned(), |v| format!("{v}{unit}"))
}

/// The replicas table and the forwarding figures.
fn replicas_md(s: &mut String, r: &Report) {
    let _ = writeln!(
        s,
        "\n## Replicas\n\n{} gateway replica(s){}.\n\n\
         | replica | sessions after the ramp | RSS idle | CPU idle | RSS max | CPU avg | relayed calls | forwarded calls |\n\
         |---|---|---|---|---|---|---|---|",
        r.replica_count,
        if r.replica_count > 1 {
            " on one local PostgreSQL, agents spread over them round robin"
        } else {
            ""
        }
    );
    for x in &r.replicas {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} MiB | {:.1}% | {} | {} |",
            x.id,
            x.sessions,
            opt(x.rss_idle_kib.map(|k| k / 1024), " MiB"),
            opt(x.idle_cpu_pct.map(|c| format!("{c:.2}")), "%"),
            x.rss_max_kib / 1024,
            x.cpu_avg_pct,
            opt(x.relay_calls.map(|c| format!("{c:.0}")), ""),
            opt(x.forwarded.map(|c| format!("{c:.0}")), ""),
        );
    }
    let f = &r.forwarding;
    let _ = writeln!(s, "\n### Forwarding\n");
    let _ = writeln!(
        s,
        "- share of relayed calls sent to a replica without the agent's session: {:.0}% (--forwarded)",
        f.share_asked * 100.0
    );
    let _ = writeln!(
        s,
        "- share of forwarded calls, as the gateways count them: {}",
        opt(
            f.gateway_share.map(|v| format!(
                "{:.1}% ({})",
                v * 100.0,
                f.gateway_metrics.join(", ")
            )),
            ""
        )
    );
    if let Some(b) = &r.broadcast {
        let _ = writeln!(
            s,
            "- unary, sent to the replica holding the session: {}, {} errors",
            b.unary_local.latency.line(),
            b.unary_local.errors
        );
        match &b.unary_forwarded {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "- unary, sent to another replica (forwarded): {}, {} errors {:?}",
                    c.latency.line(),
                    c.errors,
                    c.error_codes
                );
                for e in &c.error_samples {
                    let _ = writeln!(s, "  - `{e}`");
                }
            }
            None => {
                let _ = writeln!(s, "- unary, forwarded: not measured");
            }
        }
    }
    for why in &f.not_measured {
        let _ = writeln!(s, "- not measured: {why}");
    }
}

// === Charts ===

/// A series name per replica: `r1`, or `gateway` for a lone gateway.
fn replica_names(r: &Report) -> Vec<String> {
    let n = r.series.iter().map(|s| s.replicas.len()).max().unwrap_or(0);
    (0..n)
        .map(|k| {
            r.replicas
                .get(k)
                .map_or_else(|| format!("replica {}", k + 1), |x| x.id.clone())
        })
        .collect()
}

fn charts(r: &Report) -> Vec<(String, String)> {
    let pts = |f: &dyn Fn(&Sample) -> f64| r.series.iter().map(|s| (s.t, f(s))).collect();
    let names = replica_names(r);
    let per_replica = |f: &dyn Fn(&crate::procstat::ReplicaPoint) -> f64| -> Vec<Vec<(f64, f64)>> {
        (0..names.len())
            .map(|k| {
                r.series
                    .iter()
                    .map(|s| (s.t, s.replicas.get(k).map_or(0.0, f)))
                    .collect()
            })
            .collect()
    };
    let several = names.len() > 1;

    let mut connected: Vec<Series<'_>> = vec![("connected (fleet)", pts(&|s| s.connected as f64))];
    let conn_names: Vec<String> = names.iter().map(|n| format!("on {n}")).collect();
    if several {
        for (k, p) in per_replica(&|p| p.connected as f64).into_iter().enumerate() {
            connected.push((conn_names[k].as_str(), p));
        }
    }
    let rss_names: Vec<String> = names.iter().map(|n| format!("{n} RSS")).collect();
    let rss: Vec<Series<'_>> = if several {
        per_replica(&|p| p.rss_kib as f64 / 1024.0)
            .into_iter()
            .enumerate()
            .map(|(k, p)| (rss_names[k].as_str(), p))
            .collect()
    } else {
        vec![("gateway RSS", pts(&|s| s.gateway_rss_kib as f64 / 1024.0))]
    };
    let cpu_names: Vec<String> = names.iter().map(|n| format!("gateway {n}")).collect();
    let mut cpu: Vec<Series<'_>> = if several {
        per_replica(&|p| p.cpu_pct)
            .into_iter()
            .enumerate()
            .map(|(k, p)| (cpu_names[k].as_str(), p))
            .collect()
    } else {
        vec![("gateway", pts(&|s| s.gateway_cpu_pct))]
    };
    cpu.push(("fleet + driver", pts(&|s| s.fleet_cpu_pct)));
    let mut out = vec![
        (
            "connected.svg".to_owned(),
            line_chart(
                "Connected agents",
                "time (s)",
                "agents",
                &connected,
                false,
                &r.marks,
            ),
        ),
        (
            "gateway-rss.svg".to_owned(),
            line_chart("Gateway RSS", "time (s)", "MiB", &rss, false, &r.marks),
        ),
        (
            "cpu.svg".to_owned(),
            line_chart(
                "CPU (percent of one core)",
                "time (s)",
                "%",
                &cpu,
                false,
                &r.marks,
            ),
        ),
    ];
    let mut cdfs: Vec<Series<'_>> = Vec::new();
    let cdf = |l: &Latency| -> Vec<(f64, f64)> {
        l.cdf
            .iter()
            .map(|(us, q)| (*us as f64 / 1000.0, *q))
            .collect()
    };
    if let Some(b) = &r.broadcast {
        match &b.unary_forwarded {
            Some(f) => {
                cdfs.push(("unary, local", cdf(&b.unary_local.latency)));
                cdfs.push(("unary, forwarded", cdf(&f.latency)));
            }
            None => cdfs.push(("unary, random agent", cdf(&b.unary_random.latency))),
        }
        cdfs.push(("broadcast", cdf(&b.broadcast.latency)));
    }
    if let Some(c) = &r.commands {
        cdfs.push(("command Submit→Succeeded", cdf(&c.latency)));
    }
    if let Some(s) = &r.soak {
        cdfs.push(("soak unary", cdf(&s.rpc.latency)));
    }
    if let Some(x) = &r.rolling {
        cdfs.push(("unary during rolling restart", cdf(&x.rpc.latency)));
    }
    out.push((
        "latency-cdf.svg".to_owned(),
        line_chart(
            "Latency CDF",
            "latency (ms, log scale)",
            "fraction of calls ≤ x",
            &cdfs,
            true,
            &[],
        ),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_has_a_monotone_cdf() {
        let mut h = crate::driver::histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 10_000);
        assert!((4_900..=5_100).contains(&l.p50_us));
        assert!(
            l.cdf
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        );
    }
}
