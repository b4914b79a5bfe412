//! The report directory: `report.json` (everything measured, machine-readable), `report.md`
//! (the same for people, with each target met or missed) and SVG charts drawn here as plain
//! polylines: connected agents, gateway RSS and CPU over time, latency CDFs.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::LoadError;
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
    /// The issue's targets.
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

/// Judges the issue's targets on what was measured. Targets stated for 10,000 agents are
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
        Some(s) => t.push(target(
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
            at_scale(
                s.within_10s >= 0.99
                    && s.within_20s >= 1.0
                    && s.dispatch.calls > 0
                    && s.dispatch.ok == s.dispatch.calls,
            ),
        )),
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
    let _ = writeln!(
        s,
        "\n## Charts\n\n![connected](connected.svg)\n![gateway RSS](gateway-rss.svg)\n![CPU](cpu.svg)\n![latency CDF](latency-cdf.svg)"
    );
    s
}

// === Charts ===

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];

/// A line series: name and points.
type Series<'a> = (&'a str, Vec<(f64, f64)>);

fn charts(r: &Report) -> Vec<(String, String)> {
    let pts = |f: &dyn Fn(&Sample) -> f64| r.series.iter().map(|s| (s.t, f(s))).collect();
    let mut out = vec![
        (
            "connected.svg".to_owned(),
            chart(
                "Connected agents",
                "time (s)",
                "agents",
                &[("connected (fleet)", pts(&|s| s.connected as f64))],
                false,
                &r.marks,
            ),
        ),
        (
            "gateway-rss.svg".to_owned(),
            chart(
                "Gateway RSS",
                "time (s)",
                "MiB",
                &[("gateway RSS", pts(&|s| s.gateway_rss_kib as f64 / 1024.0))],
                false,
                &r.marks,
            ),
        ),
        (
            "cpu.svg".to_owned(),
            chart(
                "CPU (percent of one core)",
                "time (s)",
                "%",
                &[
                    ("gateway", pts(&|s| s.gateway_cpu_pct)),
                    ("fleet + driver", pts(&|s| s.fleet_cpu_pct)),
                ],
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
        cdfs.push(("unary, random agent", cdf(&b.unary_random.latency)));
        cdfs.push(("broadcast", cdf(&b.broadcast.latency)));
    }
    if let Some(c) = &r.commands {
        cdfs.push(("command Submit→Succeeded", cdf(&c.latency)));
    }
    if let Some(s) = &r.soak {
        cdfs.push(("soak unary", cdf(&s.rpc.latency)));
    }
    out.push((
        "latency-cdf.svg".to_owned(),
        chart(
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

fn nice_step(range: f64) -> f64 {
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    step * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart as SVG. With `log_x`, x values must be positive and are drawn on log10.
pub fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    log_x: bool,
    marks: &[(f64, String)],
) -> String {
    let (w, h) = (800.0, 400.0);
    let (l, rt, t, b) = (70.0, 20.0, 40.0, 50.0);
    let fx = |x: f64| if log_x { x.max(1e-3).log10() } else { x };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, y)| (fx(x), y)))
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    if all.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let mut y1 = all.iter().fold(0f64, |a, p| a.max(p.1));
    if log_x {
        x0 = x0.floor();
        x1 = x1.ceil().max(x0 + 1.0);
    } else {
        x0 = x0.min(0.0);
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let ystep = nice_step(y1);
    y1 = (y1 / ystep).ceil() * ystep;
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - rt);
    let py = |y: f64| h - b - y / y1 * (h - t - b);
    // Axes, grid, ticks.
    let _ = writeln!(s, r##"<g stroke="#ccc" stroke-width="1">"##);
    let mut y = 0.0;
    while y <= y1 + ystep / 2.0 {
        let _ = writeln!(
            s,
            r#"<line x1="{l}" y1="{0:.1}" x2="{1}" y2="{0:.1}"/>"#,
            py(y),
            w - rt
        );
        y += ystep;
    }
    let _ = writeln!(s, "</g>");
    let mut y = 0.0;
    while y <= y1 + ystep / 2.0 {
        let label = if ystep < 1.0 {
            format!("{y:.2}")
        } else {
            format!("{y:.0}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#,
            l - 6.0,
            py(y) + 4.0
        );
        y += ystep;
    }
    if log_x {
        let mut e = x0;
        while e <= x1 + 1e-9 {
            let v = 10f64.powf(e);
            let label = if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            };
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text><line x1="{0:.1}" y1="{2}" x2="{0:.1}" y2="{3}" stroke="#ccc"/>"##,
                px(e),
                h - b + 16.0,
                t,
                h - b
            );
            e += 1.0;
        }
    } else {
        let xstep = nice_step(x1 - x0);
        let mut x = (x0 / xstep).ceil() * xstep;
        while x <= x1 + 1e-9 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.0}</text>"#,
                px(x),
                h - b + 16.0
            );
            x += xstep;
        }
    }
    let _ = writeln!(
        s,
        r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/><line x1="{l}" y1="{t}" x2="{l}" y2="{0}" stroke="#333"/>"##,
        h - b,
        w - rt
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (l + w - rt) / 2.0,
        h - 10.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        (t + h - b) / 2.0,
        esc(y_label)
    );
    for (mx, name) in marks {
        let x = px(fx(*mx));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{}" stroke="#999" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#666" font-size="10">{}</text>"##,
            h - b,
            x + 3.0,
            t + 10.0,
            esc(name)
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut d = String::new();
        for &(x, y) in pts {
            let _ = write!(d, "{:.1},{:.1} ", px(fx(x)), py(y));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            d.trim_end()
        );
        let ly = t + 14.0 + i as f64 * 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            w - rt - 190.0,
            ly - 4.0,
            w - rt - 174.0,
            ly,
            esc(name)
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_svg_with_one_polyline_per_series() {
        let svg = chart(
            "t",
            "x",
            "y",
            &[("a", vec![(0.0, 1.0), (1.0, 2.0)]), ("b", vec![(0.5, 3.0)])],
            false,
            &[(0.5, "mark".into())],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        let log = chart(
            "t",
            "x",
            "y",
            &[("a", vec![(0.1, 0.5), (20.0, 1.0)])],
            true,
            &[],
        );
        assert!(log.contains("<polyline"));
    }

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
