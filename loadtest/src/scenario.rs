//! The scenarios, and [`run`], which wires the gateway, the fleet, the driver and the sampler
//! and writes the report.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng;
use tether_api::v1::CommandState;
use tether_gateway::identity::pki::Ca;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};
use tether_runtime::CancellationToken;

use crate::driver::{self, Batch, Driver};
use crate::fleet::{Fleet, FleetMode, FleetSettings};
use crate::gateway::{LocalGateway, LocalSettings, ReplicaSettings};
use crate::identities::{self, TENANT};
use crate::procstat::{self, Sampler};
use crate::report::{self, Calls, Latency, ReplicaReport, Report};
use crate::{LoadError, RunOptions, Scenario};

/// Trust domain of a PKI this tool makes.
const TRUST_DOMAIN: &str = "load.test";
/// Deadline of one relayed call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the scenarios share.
struct Ctx {
    opts: RunOptions,
    fleet: Fleet,
    driver: Arc<Driver>,
    /// The gateways this tool started (empty for an external one).
    gateways: Vec<LocalGateway>,
    /// Replicas out of the driver's rotation (being stopped or restarted), as a Kubernetes
    /// Service drops a Terminating pod from its endpoints: no new call is sent to them.
    out: Vec<std::sync::atomic::AtomicBool>,
    sampler: Sampler,
    progress: MultiProgress,
    agents: Vec<String>,
    marks: Vec<(f64, String)>,
    /// The driver's certificate files (its CA is the gateway's).
    client: identities::ClientFiles,
    /// Each replica's northbound address.
    northbounds: Vec<String>,
}

impl Ctx {
    fn bar(&self, prefix: &str, len: u64) -> ProgressBar {
        let pb = self.progress.add(ProgressBar::new(len));
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>10.bold} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .expect("valid progress template"),
        );
        pb.set_prefix(prefix.to_owned());
        pb
    }

    fn mark(&mut self, name: &str) {
        self.marks.push((self.sampler.now(), name.to_owned()));
    }

    fn n(&self) -> usize {
        self.agents.len()
    }

    fn random_agent(&self) -> usize {
        rand::rng().random_range(0..self.agents.len())
    }

    /// The replica a relayed call to agent `i` goes through, and whether it is one without
    /// the agent's session, so that the gateway forwards it: `--forwarded` of the calls go to
    /// such a replica on purpose (when there is one), the others to one of the replicas
    /// holding the agent's sessions, at random (calls spread over its sessions). A replica out
    /// of rotation is never picked while another is in: with none of the agent's sessions in
    /// rotation, a call goes to any replica that is, which forwards it.
    fn route(&self, i: usize) -> (usize, bool) {
        let n = self.driver.replicas().max(1);
        let is_in = |k: usize| !self.out.get(k).is_some_and(|o| o.load(Ordering::Relaxed));
        let held: Vec<usize> = self.fleet.held(i).into_iter().map(|k| k % n).collect();
        let pick = |v: &[usize]| v[rand::rng().random_range(0..v.len())];
        let share = self.opts.forwarded.clamp(0.0, 1.0);
        if share > 0.0 && rand::rng().random_bool(share) {
            let away: Vec<usize> = (0..n).filter(|k| is_in(*k) && !held.contains(k)).collect();
            if !away.is_empty() {
                return (pick(&away), true);
            }
        }
        let local: Vec<usize> = held.iter().copied().filter(|k| is_in(*k)).collect();
        if !local.is_empty() {
            return (pick(&local), false);
        }
        // None of its sessions is on a replica in rotation: any replica in rotation forwards.
        let any: Vec<usize> = (0..n).filter(|k| is_in(*k)).collect();
        if !any.is_empty() {
            return (pick(&any), true);
        }
        (self.fleet.last_replica(i) % n, false)
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs the load test; returns the report directory.
pub async fn run(opts: RunOptions) -> Result<PathBuf, LoadError> {
    if opts.agents == 0 {
        return Err(LoadError::Usage("--agents must be at least 1".into()));
    }
    if opts.gateway.is_some() && opts.scenario.contains(&Scenario::Storm) {
        return Err(LoadError::Usage(
            "the storm scenario kills and restarts the gateway: it needs a gateway this tool starts (no --gateway)".into(),
        ));
    }
    if opts.gateway.is_some() && opts.scenario.contains(&Scenario::Rolling) {
        return Err(LoadError::Usage(
            "the rolling scenario stops and restarts each replica: it needs replicas this tool starts (--replicas N, no --gateway)".into(),
        ));
    }
    if opts.replicas == 0 {
        return Err(LoadError::Usage("--replicas must be at least 1".into()));
    }
    if opts.fleet == FleetMode::Full && opts.scenario.contains(&Scenario::Console) {
        return Err(LoadError::Usage(
            "the console scenario stops and starts agents one at a time: it needs the lean fleet (--fleet lean)".into(),
        ));
    }
    if opts.replicas > 1 && opts.gateway.is_some() {
        return Err(LoadError::Usage(
            "--replicas starts its own gateway replicas on a local PostgreSQL: drop --gateway, or --replicas".into(),
        ));
    }
    if !(0.0..=1.0).contains(&opts.forwarded) {
        return Err(LoadError::Usage(format!(
            "--forwarded {} is not a share between 0 and 1",
            opts.forwarded
        )));
    }
    if opts.forwarded > 0.0 && opts.replicas < 2 {
        return Err(LoadError::Usage(
            "--forwarded sends calls to a replica without the agent's session: it needs --replicas 2 or more".into(),
        ));
    }
    raise_fd_limit();
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("loadtest-report/{started_unix}")));
    std::fs::create_dir_all(&out)
        .map_err(|e| LoadError::Report(format!("{}: {e}", out.display())))?;
    let mut report = Report {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        commit: commit(),
        started_unix,
        machine: report::Machine::probe(),
        fleet: format!("{:?}", opts.fleet).to_lowercase(),
        agents: opts.agents,
        scenarios: opts.scenario.iter().map(|s| s.name().to_owned()).collect(),
        ..Default::default()
    };
    let progress = MultiProgress::with_draw_target(if opts.no_progress {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });

    // PKI: ours, or the existing gateway's CA.
    let ca = match &opts.pki {
        Some(dir) => Ca::load(dir).map_err(|e| LoadError::Pki(e.to_string()))?,
        None => tether_gateway::identity::pki::init(
            &out.join("pki"),
            TRUST_DOMAIN,
            &["localhost".into(), "127.0.0.1".into()],
            true,
        )
        .map_err(|e| LoadError::Pki(e.to_string()))?,
    };
    let issuing = progress.add(ProgressBar::new_spinner());
    issuing.set_message(format!("issuing {} agent certificates", opts.agents));
    issuing.enable_steady_tick(Duration::from_millis(200));
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ids = {
        let (n, ca_ref) = (opts.agents, &ca);
        tokio::task::block_in_place(|| identities::issue_agents(ca_ref, n, threads))?
    };
    issuing.finish_with_message(format!(
        "issued {} agent certificates in {:.1}s",
        ids.len(),
        t.elapsed().as_secs_f64()
    ));
    let agents: Vec<String> = ids.iter().map(|i| i.id.to_string()).collect();
    let roots = identities::roots(&ca)?;
    let client = identities::issue_client(&ca, &out.join("client"))?;

    // The gateway: an external one, or ours (one, or replicas on a local PostgreSQL).
    report.replica_count = opts.replicas;
    let mut pg = None;
    let (gateways, tunnels, northbounds, pids) = match opts.gateway {
        Some(addr) => {
            report.gateway = "external".into();
            let nb = opts.northbound.clone().expect("clap requires --northbound");
            (
                Vec::new(),
                vec![addr],
                vec![nb],
                vec![opts.gateway_pid.unwrap_or(0)],
            )
        }
        None => {
            report.gateway = "local".into();
            let bin = match &opts.gateway_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("tether-gateway")))
                    .ok_or_else(|| LoadError::Gateway("cannot locate tether-gateway".into()))?,
            };
            let settings = LocalSettings {
                bin,
                dir: out.clone(),
                trust_domain: TRUST_DOMAIN.into(),
                heartbeat: opts.heartbeat,
                log: opts.gateway_log.clone(),
                sets: opts.gateway_set.clone(),
                drain: opts.drain_timeout,
                replica: None,
            };
            let gws = if opts.replicas > 1 {
                let (gws, server) =
                    start_replicas(&settings, &ca, opts.replicas, &progress).await?;
                pg = Some(server);
                gws
            } else {
                vec![LocalGateway::start(settings).await?]
            };
            let tunnels = gws.iter().map(|g| g.addrs.tunnel).collect();
            let nbs = gws.iter().map(|g| g.addrs.northbound.to_string()).collect();
            let pids = gws.iter().map(|g| g.pid().unwrap_or(0)).collect();
            (gws, tunnels, nbs, pids)
        }
    };
    let driver = Arc::new(
        Driver::connect(&northbounds, &opts.server_name, &client, opts.connections).await?,
    );
    let stop_scraping = CancellationToken::new();
    if !opts.scrape_every.is_zero() {
        for ops in gateways.iter().map(|g| g.addrs.ops) {
            tokio::spawn(scrape(ops, opts.scrape_every, stop_scraping.clone()));
        }
    }
    let sampler = Sampler::new(pids);
    let stop_sampling = CancellationToken::new();

    // Memory with no agent: after the driver's connections, before the fleet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = sampler.gateway_now().map_or(0, |r| r.rss_kib);

    let settings = FleetSettings {
        gateways: tunnels,
        server_name: opts.server_name.clone(),
        mode: opts.fleet,
        ramp_rate: opts.ramp_rate,
        sockets: opts
            .sockets
            .unwrap_or(opts.agents.div_ceil(500))
            .clamp(1, 256),
        max_handshakes: opts.max_handshakes,
        initial_backoff: opts.initial_backoff,
        max_backoff: opts.max_backoff,
        connect_timeout: opts.connect_timeout,
        connections: opts.agent_connections.clamp(1, gateways.len().max(1)),
    };
    let ramp_started = Instant::now();
    let fleet = Fleet::start(settings, ids, roots)?;
    tokio::spawn(
        sampler
            .clone()
            .run(opts.sample_every, fleet.counter(), stop_sampling.clone()),
    );
    let out_of_rotation = (0..gateways.len())
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let mut ctx = Ctx {
        opts,
        fleet,
        driver,
        gateways,
        out: out_of_rotation,
        sampler,
        progress,
        agents,
        marks: Vec::new(),
        client,
        northbounds,
    };
    ctx.mark("ramp");
    let measure = ctx.opts.scenario.contains(&Scenario::Ramp);
    let (ramp, replicas) = ramp(&mut ctx, ramp_started, rss_before, measure).await;
    report.replicas = replicas;
    let all_up = ramp.connected == ctx.n();
    if measure {
        report.ramp = Some(ramp);
    }
    if !all_up {
        tracing::warn!("not every agent connected; the scenarios run with those that did");
    }
    for s in ctx.opts.scenario.clone() {
        match s {
            Scenario::Ramp => {}
            Scenario::Broadcast => {
                ctx.mark("broadcast");
                report.broadcast = Some(broadcast(&ctx).await);
            }
            Scenario::Commands => {
                ctx.mark("commands");
                report.commands = Some(commands(&ctx).await);
            }
            Scenario::Storm => {
                ctx.mark("storm");
                report.storm = Some(storm(&mut ctx).await?);
            }
            Scenario::Soak => {
                ctx.mark("soak");
                report.soak = Some(soak(&ctx).await);
            }
            Scenario::Rolling => {
                ctx.mark("rolling");
                report.rolling = Some(rolling(&mut ctx).await?);
            }
            Scenario::Console => {
                ctx.mark("console");
                report.console = Some(console(&ctx).await?);
            }
        }
    }
    report.replicas = replica_reports(&ctx, report.replicas.clone()).await;
    report.forwarding = forwarding(&ctx, &report.replicas);
    ctx.mark("stop");
    // One more sample, then stop everything.
    tokio::time::sleep(ctx.opts.sample_every).await;
    stop_sampling.cancel();
    stop_scraping.cancel();
    report.series = ctx.sampler.samples();
    report.marks = std::mem::take(&mut ctx.marks);
    let Ctx {
        fleet,
        mut gateways,
        ..
    } = ctx;
    fleet.stop().await;
    for gw in &mut gateways {
        gw.stop().await;
    }
    // PostgreSQL goes after the replicas using it.
    drop(pg);
    report.targets = report::judge(&report);
    report::write(&out, &report)?;
    for t in &report.targets {
        let v = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        println!("{v:>7}  {}: {} (target {})", t.name, t.measured, t.target);
    }
    Ok(out)
}

/// GETs `http://ops/metrics` every `every` (and throws the body away), as Prometheus would.
async fn scrape(ops: std::net::SocketAddr, every: Duration, stop: CancellationToken) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(mut s) = tokio::net::TcpStream::connect(ops).await else {
            continue;
        };
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            .await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
    }
}

// === ramp ===

/// The replicas' names, in order (`gateway` for a lone or external gateway).
fn replica_ids(ctx: &Ctx) -> Vec<String> {
    if ctx.gateways.is_empty() {
        vec!["gateway".to_owned()]
    } else {
        ctx.gateways.iter().map(|g| g.name().to_owned()).collect()
    }
}

async fn ramp(
    ctx: &mut Ctx,
    started: Instant,
    rss_before: u64,
    measure: bool,
) -> (report::Ramp, Vec<ReplicaReport>) {
    let n = ctx.n();
    let bar = ctx.bar("connect", n as u64);
    let deadline = started
        + Duration::from_secs_f64(n as f64 / ctx.opts.ramp_rate.max(0.001))
        + ctx.opts.connect_timeout
        + Duration::from_secs(60);
    // Every agent connected (the ramp's duration), then every agent with all its sessions
    // (`--agent-connections`; some are turned away by a replica above its share at first and
    // land on another).
    let mut done_at = None;
    while Instant::now() < deadline {
        let c = ctx.fleet.connected();
        bar.set_position(c as u64);
        bar.set_message(format!("{} failed dials", ctx.fleet.connect_failures()));
        if c >= n && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        if c >= n && ctx.fleet.sessions_up() >= ctx.fleet.sessions_wanted() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = ctx.fleet.connected();
    bar.finish();
    let duration = done_at.unwrap_or_else(Instant::now) - started;
    // Replicas learn of each other's sessions through PostgreSQL, in batches: wait (a little)
    // until the list the driver gets holds every agent and every session the fleet connected.
    let listed_by = Instant::now() + Duration::from_secs(15);
    let sessions = ctx.fleet.sessions_up();
    let listed = || async {
        let agents = ctx.driver.connected_agents(TENANT).await.unwrap_or(0);
        let by = ctx
            .driver
            .sessions_by_replica(TENANT)
            .await
            .unwrap_or_default();
        (agents, by.values().sum::<usize>())
    };
    let (mut gateway_connected, mut gateway_sessions) = listed().await;
    while (gateway_connected < connected || gateway_sessions < sessions)
        && Instant::now() < listed_by
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (gateway_connected, gateway_sessions) = listed().await;
    }
    let mut r = report::Ramp {
        agents: n,
        connected,
        gateway_connected,
        duration_s: duration.as_secs_f64(),
        agents_per_s: connected as f64 / duration.as_secs_f64().max(1e-9),
        ramp_rate: ctx.opts.ramp_rate,
        connect_failures: ctx.fleet.connect_failures(),
        failure_samples: ctx.fleet.with_log(|l| {
            let mut v: Vec<String> = l.failures.iter().map(|(_, w)| w.clone()).collect();
            v.sort();
            v.dedup();
            v.truncate(5);
            v
        }),
        rss_before_kib: rss_before,
        heartbeat_s: ctx.opts.heartbeat.as_secs_f64(),
        ..Default::default()
    };
    let by = ctx
        .driver
        .sessions_by_replica(TENANT)
        .await
        .unwrap_or_default();
    let mut replicas: Vec<ReplicaReport> = replica_ids(ctx)
        .into_iter()
        .map(|id| ReplicaReport {
            sessions: by.get(&id).copied().unwrap_or(0),
            id,
            ..Default::default()
        })
        .collect();
    if !measure {
        return (r, replicas);
    }
    ctx.mark("idle");
    let pb = ctx.progress.add(ProgressBar::new_spinner());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message(format!(
        "settling {:?}, then measuring idle for {:?}",
        ctx.opts.settle, ctx.opts.idle_window
    ));
    tokio::time::sleep(ctx.opts.settle).await;
    if let Some(w) = procstat::measure_window(&ctx.sampler, ctx.opts.idle_window).await {
        for (x, m) in replicas.iter_mut().zip(&w.per_replica) {
            x.idle_cpu_pct = m.map(|m| m.0);
            x.rss_idle_kib = m.map(|m| m.1);
        }
        let rss = w.rss_kib;
        r.idle_cpu_pct = w.cpu_pct;
        r.rss_connected_kib = rss;
        r.idle_udp_datagrams_per_s = w.udp_datagrams_per_s;
        // Per agent the gateway holds a session for (all of them when the ramp completed).
        let held = ctx
            .driver
            .connected_agents(TENANT)
            .await
            .unwrap_or(connected)
            .max(1);
        r.rss_per_agent_bytes = (rss as f64 - rss_before as f64) * 1024.0 / held as f64;
    }
    r.idle_window_s = ctx.opts.idle_window.as_secs_f64();
    r.fleet_rss_kib = procstat::read(std::process::id()).map_or(0, |p| p.rss_kib);
    pb.finish_with_message(format!("idle: gateway CPU {:.2}%", r.idle_cpu_pct));
    (r, replicas)
}

// === broadcast ===

async fn broadcast(ctx: &Ctx) -> report::Broadcast {
    let d = &ctx.driver;
    // Warm-up: connections (to every replica) and code paths.
    for _ in 0..50.min(ctx.opts.unary_calls).max(d.replicas()) {
        let i = ctx.random_agent();
        let _ = d.unary(ctx.route(i).0, &ctx.agents[i], CALL_TIMEOUT).await;
    }
    // One at a time, each to a random agent through the replica `route` picks when it is
    // sent: local and forwarded calls interleave in the same run and are tallied apart.
    let bar = ctx.bar("unary", ctx.opts.unary_calls as u64);
    let (mut unary, mut local, mut forwarded) = (Batch::new(), Batch::new(), Batch::new());
    let started = Instant::now();
    for _ in 0..ctx.opts.unary_calls {
        let i = ctx.random_agent();
        let (via, fwd) = ctx.route(i);
        let t = Instant::now();
        let r = d.unary(via, &ctx.agents[i], CALL_TIMEOUT).await;
        let took = t.elapsed();
        unary.record(took, &r);
        if fwd {
            forwarded.record(took, &r);
        } else {
            local.record(took, &r);
        }
        bar.inc(1);
    }
    unary.elapsed = started.elapsed();
    (local.elapsed, forwarded.elapsed) = (unary.elapsed, unary.elapsed);
    bar.finish();

    let bar = ctx.bar("broadcast", ctx.n() as u64);
    let all = driver::batch(
        (0..ctx.n()).collect(),
        ctx.opts.concurrency,
        |i: usize| async move { d.unary(ctx.route(i).0, &ctx.agents[i], CALL_TIMEOUT).await },
        || bar.inc(1),
    )
    .await;
    bar.finish_with_message(format!("{} errors", all.failed()));

    let k = ctx.opts.bulk_agents.min(ctx.n());
    let step = (ctx.n() / k.max(1)).max(1);
    let subset: Vec<usize> = (0..ctx.n()).step_by(step).take(k).collect();
    let count = (ctx.opts.bulk_kib / 64).max(1);
    let bytes = AtomicU64::new(0);
    let bar = ctx.bar("bulk", subset.len() as u64);
    let bulk = driver::batch(
        subset,
        k.max(1),
        |i: usize| {
            let bytes = &bytes;
            async move {
                let (via, _) = ctx.route(i);
                let got = d
                    .bulk(via, &ctx.agents[i], count, 64 << 10, CALL_TIMEOUT)
                    .await?;
                bytes.fetch_add(got, Ordering::Relaxed);
                Ok(())
            }
        },
        || bar.inc(1),
    )
    .await;
    bar.finish();
    let b = bytes.load(Ordering::Relaxed);
    report::Broadcast {
        unary_random: Calls::from(&unary),
        unary_local: Calls::from(&local),
        unary_forwarded: (forwarded.calls > 0).then(|| Calls::from(&forwarded)),
        errors: all.failed(),
        broadcast: Calls::from(&all),
        concurrency: ctx.opts.concurrency,
        bulk: report::Bulk {
            streams: bulk.calls,
            ok: bulk.ok,
            bytes: b,
            duration_s: bulk.elapsed.as_secs_f64(),
            mib_per_s: b as f64 / (1 << 20) as f64 / bulk.elapsed.as_secs_f64().max(1e-9),
            error_samples: bulk.samples,
        },
    }
}

// === commands ===

fn millis(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ts(t: Option<&prost_types::Timestamp>) -> f64 {
    t.map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

async fn commands(ctx: &Ctx) -> report::Commands {
    let d = &ctx.driver;
    // Created at or after (the store filters on milliseconds).
    let from = SystemTime::now() - Duration::from_millis(1);
    let first = SystemTime::now();
    let bar = ctx.bar("submit", ctx.n() as u64);
    let submitted = driver::batch(
        ctx.agents.clone(),
        ctx.opts.concurrency,
        |a: String| async move { d.submit(&a, "echo", b"load".to_vec()).await.map(|_| ()) },
        || bar.inc(1),
    )
    .await;
    bar.finish();
    let bar = ctx.bar("succeeded", submitted.ok as u64);
    let deadline = Instant::now() + ctx.opts.commands_timeout;
    let mut done = Vec::new();
    loop {
        if let Ok(v) = d.list_commands(from, CommandState::Succeeded).await {
            done = v;
        }
        bar.set_position(done.len() as u64);
        if done.len() >= submitted.ok || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish();
    let mut h = driver::histogram();
    let mut last = 0f64;
    for c in &done {
        let (created, finished) = (ts(c.created.as_ref()), ts(c.finished.as_ref()));
        last = last.max(finished);
        h.saturating_record(((finished - created) * 1e6).max(1.0) as u64);
    }
    let all = done.len() == submitted.ok && submitted.failed() == 0;
    report::Commands {
        submitted: submitted.calls,
        submit_errors: submitted.failed(),
        submit_duration_s: submitted.elapsed.as_secs_f64(),
        succeeded: done.len(),
        not_succeeded: submitted.calls - done.len(),
        all_succeeded: all,
        all_succeeded_s: (last - millis(first)).max(0.0),
        latency: Latency::from_histogram(&h),
    }
}

// === storm ===

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

async fn storm(ctx: &mut Ctx) -> Result<report::Storm, LoadError> {
    // With replicas, the first one dies: its agents (and only they) come back, on the others
    // or on it once restarted.
    let (total, on) = (ctx.fleet.counter())();
    let before = if ctx.gateways.len() > 1 {
        on[0]
    } else {
        ctx.fleet.connected()
    };
    let others = total.saturating_sub(before);
    let Some(gw) = ctx.gateways.first_mut() else {
        return Err(LoadError::Usage("storm needs a local gateway".into()));
    };
    let failures_before = ctx.fleet.connect_failures();
    let drops_before = procstat::udp_receive_buffer_drops();
    let tunnel_port = gw.addrs.tunnel.port();
    let kill_at = Instant::now();
    gw.kill9().await;
    ctx.sampler.set_pid(0, 0);
    gw.restart().await?;
    let restart_at = Instant::now();
    ctx.sampler.set_pid(0, gw.pid().unwrap_or(0));
    ctx.mark("restarted");
    let bar = ctx.bar("back", before as u64);
    let deadline = restart_at + ctx.opts.storm_timeout;
    // Lean agents log when each session came up; full agents are counted by polling the
    // (new) gateway.
    let mut polled: Vec<(f64, usize)> = Vec::new();
    loop {
        let back = match ctx.opts.fleet {
            FleetMode::Lean => ctx
                .fleet
                .with_log(|l| l.ups.iter().filter(|t| **t > kill_at).count()),
            FleetMode::Full => {
                let n = ctx
                    .driver
                    .connected_agents(TENANT)
                    .await
                    .unwrap_or(0)
                    .saturating_sub(others);
                polled.push((restart_at.elapsed().as_secs_f64(), n));
                n
            }
        };
        bar.set_position(back as u64);
        bar.set_message(format!(
            "{} failed dials",
            ctx.fleet.connect_failures() - failures_before
        ));
        if back >= before || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(match ctx.opts.fleet {
            FleetMode::Lean => 50,
            FleetMode::Full => 500,
        }))
        .await;
    }
    bar.finish();
    let mut s = report::Storm {
        agents: before,
        restart_s: (restart_at - kill_at).as_secs_f64(),
        connect_failures: ctx.fleet.connect_failures() - failures_before,
        // The new process's socket counts from its start.
        gateway_socket_drops: procstat::udp_socket_drops(tunnel_port),
        machine_receive_drops: drops_before
            .zip(procstat::udp_receive_buffer_drops())
            .map(|(a, b)| b.saturating_sub(a)),
        ..Default::default()
    };
    let since_restart = |t: Instant| t.saturating_duration_since(restart_at).as_secs_f64();
    let (mut back, mut detect, mut delays, failures, gaps) = ctx.fleet.with_log(|l| {
        (
            l.ups
                .iter()
                .filter(|t| **t > kill_at)
                .map(|t| since_restart(*t))
                .collect::<Vec<f64>>(),
            l.downs
                .iter()
                .filter(|t| **t > kill_at)
                .map(|t| (*t - kill_at).as_secs_f64())
                .collect::<Vec<f64>>(),
            l.delays
                .iter()
                .filter(|(t, _)| *t > kill_at)
                .map(|(_, d)| d.as_secs_f64() * 1000.0)
                .collect::<Vec<f64>>(),
            l.failures
                .iter()
                .filter(|(t, _)| *t > kill_at)
                .take(5)
                .map(|(_, w)| w.clone())
                .collect::<Vec<String>>(),
            l.gaps
                .iter()
                .filter(|(t, _)| *t > kill_at)
                .map(|(_, d)| d.as_secs_f64())
                .collect::<Vec<f64>>(),
        )
    });
    if ctx.opts.fleet == FleetMode::Lean {
        // Sessions lost in the kill that never came back count as not back.
        let lost = before.max(gaps.len()).max(1) as f64;
        let within = |secs: f64| gaps.iter().filter(|d| **d <= secs).count() as f64 / lost;
        s.after_notice_within = Some((within(10.0), within(20.0)));
        let mut all = gaps.clone();
        all.resize(before.max(gaps.len()), f64::INFINITY);
        s.after_notice_s = Some([
            quantile(&mut all, 0.5),
            quantile(&mut all, 0.99),
            quantile(&mut all, 1.0),
        ]);
    }
    s.failure_samples = failures;
    if ctx.opts.fleet == FleetMode::Full {
        // Thresholds from the polled counts; delays from the agents' own record.
        back = Vec::new();
        let mut prev = 0;
        for (t, n) in &polled {
            for _ in prev..*n {
                back.push(*t);
            }
            prev = prev.max(*n);
        }
        delays = ctx
            .fleet
            .full_agent_delays()
            .iter()
            .filter_map(|d| d.last().map(|d| d.as_secs_f64() * 1000.0))
            .collect();
    }
    back.sort_by(f64::total_cmp);
    s.reconnected = back.len().min(before);
    let need = |frac: f64| ((before as f64 * frac).ceil() as usize).max(1);
    s.back_99_s = back.get(need(0.99) - 1).copied();
    s.back_100_s = (back.len() >= before).then(|| back[before - 1]);
    let within =
        |secs: f64| back.iter().filter(|t| **t <= secs).count() as f64 / before.max(1) as f64;
    s.within_10s = within(10.0).min(1.0);
    s.within_20s = within(20.0).min(1.0);
    s.detect_s = [
        quantile(&mut detect, 0.5),
        quantile(&mut detect, 0.99),
        quantile(&mut detect, 1.0),
    ];
    s.backoff_ms = [
        quantile(&mut delays, 0.5),
        quantile(&mut delays, 0.9),
        quantile(&mut delays, 0.99),
        quantile(&mut delays, 1.0),
    ];
    let bounds = [
        50u64,
        100,
        200,
        300,
        400,
        500,
        750,
        1000,
        2000,
        5000,
        10_000,
        30_000,
        u64::MAX,
    ];
    s.backoff_histogram = bounds
        .iter()
        .enumerate()
        .map(|(i, hi)| {
            let lo = if i == 0 { 0 } else { bounds[i - 1] };
            let n = delays
                .iter()
                .filter(|d| **d >= lo as f64 && **d < *hi as f64)
                .count();
            (*hi, n)
        })
        .collect();

    // Dispatch afterwards: one call to every agent. The driver's connections reconnect on
    // their first use; give them a few tries.
    let ctx: &Ctx = ctx;
    let d = &ctx.driver;
    for _ in 0..20 {
        if d.unary(ctx.route(0).0, &ctx.agents[0], CALL_TIMEOUT)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let bar = ctx.bar("dispatch", ctx.n() as u64);
    let all = driver::batch(
        (0..ctx.n()).collect(),
        ctx.opts.concurrency,
        |i: usize| async move { d.unary(ctx.route(i).0, &ctx.agents[i], CALL_TIMEOUT).await },
        || bar.inc(1),
    )
    .await;
    bar.finish_with_message(format!("{} errors", all.failed()));
    s.dispatch = Calls::from(&all);
    Ok(s)
}

// === soak ===

async fn soak(ctx: &Ctx) -> report::Soak {
    let dur = ctx.opts.soak_duration;
    let rate = ctx.opts.soak_rate.max(1.0);
    let warmup = (dur / 10).max(Duration::from_secs(5)).min(dur);
    let bar = ctx.bar("soak", dur.as_secs());
    let hist = Arc::new(Mutex::new(driver::histogram()));
    let ok = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<std::collections::BTreeMap<String, usize>>> = Default::default();
    let samples: Arc<Mutex<Vec<String>>> = Default::default();
    let cmds = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let bulk = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let permits = Arc::new(tokio::sync::Semaphore::new(ctx.opts.concurrency.max(1)));
    let mut skipped = 0usize;
    let start = Instant::now();
    let cpu_start = ctx.sampler.gateway_now();
    let mut rss_start = None;
    let mut rss_max = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut n_sec = 0u64;
    let per_sec_cmds = (rate * ctx.opts.soak_command_share.max(0.0)).round() as usize;
    let bulk_count = (ctx.opts.bulk_kib / 64).max(1);
    while start.elapsed() < dur {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                let i = ctx.random_agent();
                let (d, a, via) = (ctx.driver.clone(), ctx.agents[i].clone(), ctx.route(i).0);
                let (hist, ok, calls, errors, samples) =
                    (hist.clone(), ok.clone(), calls.clone(), errors.clone(), samples.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = d.unary(via, &a, CALL_TIMEOUT).await;
                    hist.lock().expect("hist").saturating_record(t.elapsed().as_micros().max(1) as u64);
                    calls.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(()) => { ok.fetch_add(1, Ordering::Relaxed); }
                        Err(s) => {
                            *errors.lock().expect("errors").entry(format!("{:?}", s.code())).or_default() += 1;
                            let mut v = samples.lock().expect("samples");
                            if v.len() < 5 { v.push(format!("{:?}: {}", s.code(), s.message())); }
                        }
                    }
                    drop(permit);
                });
            }
            _ = second.tick() => {
                n_sec += 1;
                bar.set_position(start.elapsed().as_secs());
                if let Some(r) = ctx.sampler.gateway_now() {
                    rss_max = rss_max.max(r.rss_kib);
                    if rss_start.is_none() && start.elapsed() >= warmup {
                        rss_start = Some(r.rss_kib);
                    }
                }
                for _ in 0..per_sec_cmds {
                    let a = ctx.agents[ctx.random_agent()].clone();
                    let (d, cmds) = (ctx.driver.clone(), cmds.clone());
                    tokio::spawn(async move {
                        cmds.0.fetch_add(1, Ordering::Relaxed);
                        if d.submit(&a, "echo", b"soak".to_vec()).await.is_ok() {
                            cmds.1.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                if n_sec.is_multiple_of(5) {
                    let i = ctx.random_agent();
                    let (a, via) = (ctx.agents[i].clone(), ctx.route(i).0);
                    let (d, bulk) = (ctx.driver.clone(), bulk.clone());
                    tokio::spawn(async move {
                        bulk.0.fetch_add(1, Ordering::Relaxed);
                        if d.bulk(via, &a, bulk_count, 64 << 10, CALL_TIMEOUT).await.is_ok() {
                            bulk.1.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
        }
    }
    // Let the calls in flight finish.
    let _ = tokio::time::timeout(
        CALL_TIMEOUT,
        permits.acquire_many(ctx.opts.concurrency.max(1) as u32),
    )
    .await;
    let elapsed = start.elapsed();
    bar.finish();
    let end = ctx.sampler.gateway_now();
    let rss_end = end.map_or(0, |r| r.rss_kib);
    let rss_start = rss_start.unwrap_or(rss_end);
    let h = hist.lock().expect("hist").clone();
    let calls = calls.load(Ordering::Relaxed);
    let ok = ok.load(Ordering::Relaxed);
    report::Soak {
        duration_s: elapsed.as_secs_f64(),
        rate,
        rpc: Calls {
            calls,
            ok,
            errors: calls - ok,
            error_codes: errors.lock().expect("errors").clone(),
            error_samples: samples.lock().expect("samples").clone(),
            duration_s: elapsed.as_secs_f64(),
            latency: Latency::from_histogram(&h),
        },
        skipped,
        commands: (
            cmds.0.load(Ordering::Relaxed),
            cmds.1.load(Ordering::Relaxed),
        ),
        bulk: (
            bulk.0.load(Ordering::Relaxed),
            bulk.1.load(Ordering::Relaxed),
        ),
        rss_start_kib: rss_start,
        rss_end_kib: rss_end,
        rss_max_kib: rss_max.max(rss_end),
        rss_growth_pct: (rss_end as f64 - rss_start as f64) / rss_start.max(1) as f64 * 100.0,
        cpu_avg_pct: match (cpu_start, end) {
            (Some(a), Some(b)) => (b.cpu_secs - a.cpu_secs) / elapsed.as_secs_f64() * 100.0,
            _ => 0.0,
        },
    }
}

// === console ===

/// Agents stopped and started again on the fleet page's event stream, one at a time.
const CONSOLE_CHANGES: usize = 20;
/// Longest wait for one change's row on the stream.
const CONSOLE_EVENT_WAIT: Duration = Duration::from_secs(30);

async fn console(ctx: &Ctx) -> Result<report::Console, LoadError> {
    use crate::console::{ConsoleClient, live_path};
    let pb = ctx.progress.add(ProgressBar::new_spinner());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message("console: login");
    let t = Instant::now();
    let link = ctx.driver.login_link(0).await.map_err(|s| {
        LoadError::Driver(format!("CreateLoginLink: {:?}: {}", s.code(), s.message()))
    })?;
    let c = ConsoleClient::login(
        &ctx.northbounds[0],
        &ctx.opts.server_name,
        &ctx.client.ca,
        &link,
    )
    .await?;
    let login_s = t.elapsed().as_secs_f64();

    // Pages: the fleet page and a filtered page in the middle of the fleet, each loaded once
    // untimed, then CONSOLE_LOADS times one after another.
    // What the gateway spends with no page asked for (the fleet's heartbeats), to tell a
    // page's own CPU apart.
    let cpu = |r: Option<procstat::ProcReading>| r.map(|r| r.cpu_secs);
    let (c0, t0) = (cpu(ctx.sampler.gateway_now()), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet = c0
        .zip(cpu(ctx.sampler.gateway_now()))
        .map(|(a, b)| (b - a) / t0.elapsed().as_secs_f64() * 100.0);
    let middle = (ctx.n().div_ceil(50) / 2).max(1);
    let filtered = format!(
        "/ui/?tenant={TENANT}&status=online&version={}&page={middle}",
        tether_agent::VERSION
    );
    let mut pages = Vec::new();
    let mut fleet_html = String::new();
    for path in ["/ui/", filtered.as_str()] {
        pb.set_message(format!(
            "console: {} loads of {path}",
            ctx.opts.console_loads
        ));
        let first = c.get(path).await?;
        if first.status != http::StatusCode::OK {
            return Err(LoadError::Driver(format!(
                "console: {path} answered {}",
                first.status
            )));
        }
        let mut h = driver::histogram();
        let (mut failed, mut body) = (0, first.body);
        let c0 = cpu(ctx.sampler.gateway_now());
        for _ in 0..ctx.opts.console_loads {
            match c.get(path).await {
                Ok(p) if p.status == http::StatusCode::OK => {
                    h.saturating_record(p.took.as_micros().max(1) as u64);
                    body = p.body;
                }
                _ => failed += 1,
            }
        }
        let spent = c0.zip(cpu(ctx.sampler.gateway_now())).map(|(a, b)| b - a);
        let html = String::from_utf8_lossy(&body);
        if path == "/ui/" {
            fleet_html = html.clone().into_owned();
        }
        pages.push(report::ConsolePage {
            path: path.to_owned(),
            loads: ctx.opts.console_loads,
            failed,
            gateway_cpu_ms_per_load: spent
                .map(|s| s * 1000.0 / ctx.opts.console_loads.max(1) as f64),
            bytes: body.len(),
            rows: html.matches("<tr data-agent=").count(),
            latency: Latency::from_histogram(&h),
        });
    }
    let filtered_page = pages.pop().expect("two pages");
    let fleet_page = pages.pop().expect("two pages");

    // Live updates: the fleet page's stream, as console.js opens it.
    let stream = live_path(&fleet_html)
        .ok_or_else(|| LoadError::Driver("console: the fleet page names no event stream".into()))?;
    let mut events = c.events(&stream).await?;
    let mut r = report::Console {
        login_s,
        gateway_quiet_cpu_pct: quiet,
        fleet_page,
        filtered_page,
        stream: stream.clone(),
        changes: CONSOLE_CHANGES.min(ctx.n()),
        ..Default::default()
    };
    let (mut down, mut up, mut dial) = (
        driver::histogram(),
        driver::histogram(),
        driver::histogram(),
    );
    let (mut row_bytes, mut rows, mut counts_bytes, mut counts) = (0u64, 0u64, 0u64, 0u64);
    let mut count = |r: &mut report::Console, ev: &crate::console::SseEvent| {
        *r.events.entry(ev.name.clone()).or_default() += 1;
        r.event_bytes += ev.wire_len as u64;
        match ev.name.as_str() {
            "row" => (row_bytes, rows) = (row_bytes + ev.wire_len as u64, rows + 1),
            "replace" if ev.data.starts_with("counts\n") => {
                (counts_bytes, counts) = (counts_bytes + ev.wire_len as u64, counts + 1)
            }
            _ => {}
        }
    };
    let bar = ctx.bar("console", 2 * r.changes as u64);
    let cpu_start = ctx.sampler.gateway_now();
    let started = Instant::now();
    for k in 0..r.changes {
        // Agents spread over the fleet, each stopped then started again.
        let i = k * ctx.n() / r.changes;
        let id = &ctx.agents[i];
        for on in [false, true] {
            // Whatever came before this change (the counts of the last one, keep-alives).
            for ev in events.drain().await {
                count(&mut r, &ev);
            }
            let t0 = Instant::now();
            if on {
                ctx.fleet.start_agent(i)?;
            } else {
                ctx.fleet.stop_agent(i)?;
            }
            let deadline = t0 + CONSOLE_EVENT_WAIT;
            let arrived = loop {
                let Some(ev) = events.next(deadline).await else {
                    if Instant::now() < deadline {
                        return Err(LoadError::Driver(format!(
                            "console: the gateway ended the event stream {stream}"
                        )));
                    }
                    break None;
                };
                count(&mut r, &ev);
                let mine = ev.fleet_row().is_some_and(|(agent, status)| {
                    agent == id
                        && if on {
                            status == "online" || status == "degraded"
                        } else {
                            status == "offline"
                        }
                });
                if mine {
                    break Some(ev.at);
                }
            };
            let Some(at) = arrived else {
                r.missed += 1;
                bar.inc(1);
                continue;
            };
            let us = |d: Duration| d.as_micros().max(1) as u64;
            if on {
                dial.saturating_record(us(at - t0));
                if let Some(established) = ctx.fleet.last_up(i).filter(|u| *u >= t0) {
                    up.saturating_record(us(at.saturating_duration_since(established)));
                }
            } else {
                down.saturating_record(us(at - t0));
            }
            bar.inc(1);
        }
    }
    let elapsed = started.elapsed();
    // The counts event of the last change.
    for ev in events.drain().await {
        count(&mut r, &ev);
    }
    bar.finish();
    let cpu_end = ctx.sampler.gateway_now();
    r.gateway_cpu_pct = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some((b.cpu_secs - a.cpu_secs) / elapsed.as_secs_f64() * 100.0),
        _ => None,
    };
    r.disconnect = Latency::from_histogram(&down);
    r.connect = Latency::from_histogram(&up);
    r.connect_from_dial = Latency::from_histogram(&dial);
    r.row_event_bytes = row_bytes as f64 / rows.max(1) as f64;
    r.counts_event_bytes = counts_bytes as f64 / counts.max(1) as f64;
    pb.finish_with_message(format!(
        "console: page p50 {:.1} ms, live update p50 {:.0} ms",
        r.fleet_page.latency.p50_us as f64 / 1000.0,
        r.disconnect.p50_us as f64 / 1000.0
    ));
    Ok(r)
}

// === replicas ===

/// A local PostgreSQL and `n` replicas on it, `r1` … `rn`, each with its peer listener on a
/// free loopback port (advertised there).
async fn start_replicas(
    base: &LocalSettings,
    ca: &Ca,
    n: usize,
    progress: &MultiProgress,
) -> Result<(Vec<LocalGateway>, LocalPostgres), LoadError> {
    let pb = progress.add(ProgressBar::new_spinner());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message(format!(
        "starting a local PostgreSQL and {n} gateway replicas"
    ));
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(LocalPostgresOptions::default()))
        .await
        .map_err(|e| LoadError::Gateway(e.to_string()))?
        .map_err(|e| LoadError::Gateway(format!("--replicas {n} needs a local PostgreSQL: {e}")))?;
    let mut gws = Vec::new();
    for k in 0..n {
        // A free port for the peer listener (QUIC: UDP); nothing else of this run binds one.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(|e| LoadError::Gateway(format!("a free port for a peer listener: {e}")))?;
        let id = format!("r{}", k + 1);
        // Its peer certificate, spiffe://<trust domain>/gateway/<id>: the peer links need it.
        let issued = ca
            .issue_gateway(&id, tether_gateway::identity::pki::PEER_TTL)
            .map_err(|e| LoadError::Pki(format!("{id}'s peer certificate: {e}")))?;
        let dir = base.dir.join("pki");
        tether_gateway::identity::pki::write_issued(&dir, &format!("{id}-peer"), &issued, ca)
            .map_err(|e| LoadError::Pki(format!("{id}'s peer certificate: {e}")))?;
        let mut s = base.clone();
        s.replica = Some(ReplicaSettings {
            dsn: pg.dsn(),
            peer_tls: (
                dir.join(format!("{id}-peer.pem")),
                dir.join(format!("{id}-peer-key.pem")),
            ),
            id,
            peer,
        });
        gws.push(LocalGateway::start(s).await?);
    }
    pb.finish_with_message(format!(
        "{n} gateway replicas on PostgreSQL 127.0.0.1:{}",
        pg.port()
    ));
    Ok((gws, pg))
}

/// Completes each replica's figures at the end of the run: RSS and CPU over the run from the
/// samples, relayed and forwarded calls from its `/metrics`.
async fn replica_reports(ctx: &Ctx, mut replicas: Vec<ReplicaReport>) -> Vec<ReplicaReport> {
    let ids = replica_ids(ctx);
    if replicas.len() != ids.len() {
        replicas = ids
            .into_iter()
            .map(|id| ReplicaReport {
                id,
                ..Default::default()
            })
            .collect();
    }
    let samples = ctx.sampler.samples();
    for (k, x) in replicas.iter_mut().enumerate() {
        let points: Vec<&crate::procstat::ReplicaPoint> =
            samples.iter().filter_map(|s| s.replicas.get(k)).collect();
        x.rss_max_kib = points.iter().map(|p| p.rss_kib).max().unwrap_or(0);
        x.cpu_avg_pct = points.iter().map(|p| p.cpu_pct).sum::<f64>() / points.len().max(1) as f64;
        let Some(gw) = ctx.gateways.get(k) else {
            continue;
        };
        let Some(text) = crate::gateway::metrics_text(gw.addrs.ops).await else {
            continue;
        };
        // No series yet: nothing relayed since it started.
        x.relay_calls = Some(
            crate::gateway::metric_sums(&text, |n| n == "tether_gateway_relay_calls_total")
                .values()
                .sum(),
        );
        x.forwarded = crate::gateway::forwarded_out(&text);
    }
    replicas
}

/// The forwarding figures, and why any is not measured.
fn forwarding(ctx: &Ctx, replicas: &[ReplicaReport]) -> report::Forwarding {
    let mut f = report::Forwarding {
        share_asked: ctx.opts.forwarded,
        gateway_metrics: if replicas.iter().any(|r| r.forwarded.is_some()) {
            vec![format!(
                "{}{{direction=\"out\"}}",
                crate::gateway::FORWARDED
            )]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let n = ctx.gateways.len().max(1);
    if n < 2 {
        f.not_measured.push(
            "forwarding: one gateway, so no call reaches a replica without the session".into(),
        );
        return f;
    }
    if ctx.opts.forwarded <= 0.0 {
        f.not_measured.push(
            "forwarded vs local latency: --forwarded 0 sent every call to the replica holding the agent's session"
                .into(),
        );
    }
    if f.gateway_metrics.is_empty() {
        f.not_measured.push(
            "share of forwarded calls as the gateways count it: they export no peer-link metric (gateways without peer links)"
                .into(),
        );
    } else {
        let fwd: f64 = replicas.iter().filter_map(|r| r.forwarded).sum();
        let relayed: f64 = replicas.iter().filter_map(|r| r.relay_calls).sum();
        f.gateway_share = (relayed > 0.0).then(|| fwd / relayed);
        if ctx
            .opts
            .scenario
            .iter()
            .any(|s| matches!(s, Scenario::Storm | Scenario::Rolling))
        {
            f.not_measured.push(
                "the gateways' counters restart with their process: after storm or rolling, their share covers the calls since each replica's last start"
                    .into(),
            );
        }
    }
    f
}

// === rolling ===

/// What the load of `rolling` counted.
#[derive(Default)]
struct RollingLoad {
    calls: Batch,
    skipped: usize,
    submitted: Vec<Result<String, tonic::Status>>,
    streams: usize,
    streams_ok: usize,
    stream_errors: Vec<String>,
}

async fn rolling(ctx: &mut Ctx) -> Result<report::Rolling, LoadError> {
    let mut gateways = std::mem::take(&mut ctx.gateways);
    let left_before = ctx.fleet.sessions_left();
    let stop = CancellationToken::new();
    let from = SystemTime::now() - Duration::from_millis(1);
    let started = Instant::now();
    let restarts = {
        let ctx_ref: &Ctx = ctx;
        let load = rolling_load(ctx_ref, stop.clone());
        let restarts = async {
            let mut out = Vec::new();
            let mut marks = Vec::new();
            // The load stops with the restarts, whatever becomes of them.
            let _stop_load = stop.clone().drop_guard();
            tokio::time::sleep(ctx_ref.opts.rolling_pause).await;
            for (k, gw) in gateways.iter_mut().enumerate() {
                let on_it = (ctx_ref.fleet.counter())().1.get(k).copied().unwrap_or(0);
                marks.push((ctx_ref.sampler.now(), format!("stop {}", gw.name())));
                ctx_ref.out[k].store(true, Ordering::Relaxed);
                let t = Instant::now();
                let (took, killed) = gw.stop().await;
                ctx_ref.sampler.set_pid(k, 0);
                let restarted = gw.restart().await;
                ctx_ref.sampler.set_pid(k, gw.pid().unwrap_or(0));
                ctx_ref.out[k].store(false, Ordering::Relaxed);
                out.push(report::Restart {
                    replica: gw.name().to_owned(),
                    agents_on_it: on_it,
                    stop_s: took.as_secs_f64(),
                    killed,
                    down_s: t.elapsed().as_secs_f64(),
                });
                restarted?;
                tokio::time::sleep(ctx_ref.opts.rolling_pause).await;
            }
            Ok::<_, LoadError>((out, marks))
        };
        let (load, restarts) = tokio::join!(load, restarts);
        restarts.map(|(r, marks)| (r, marks, load))
    };
    ctx.gateways = gateways;
    let (restarts, marks, load) = restarts?;
    ctx.marks.extend(marks);
    ctx.marks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let duration = started.elapsed();

    // Every accepted command must succeed: wait for them, through any replica.
    let accepted: std::collections::BTreeSet<String> = load
        .submitted
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let refused = load.submitted.len() - accepted.len();
    let bar = ctx.bar("succeeded", accepted.len() as u64);
    let deadline = Instant::now() + ctx.opts.commands_timeout;
    let mut succeeded = 0;
    loop {
        if let Ok(v) = ctx
            .driver
            .list_commands(from, CommandState::Succeeded)
            .await
        {
            succeeded = v.iter().filter(|c| accepted.contains(&c.id)).count();
        }
        bar.set_position(succeeded as u64);
        if succeeded >= accepted.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish();
    Ok(report::Rolling {
        restarts,
        drain_timeout_s: ctx.opts.drain_timeout.as_secs_f64(),
        duration_s: duration.as_secs_f64(),
        rate: ctx.opts.rolling_rate,
        rpc: Calls::from(&load.calls),
        skipped: load.skipped,
        commands_submitted: load.submitted.len(),
        commands_refused: refused,
        commands_succeeded: succeeded,
        commands_lost: accepted.len() - succeeded,
        streams: load.streams,
        streams_completed: load.streams_ok,
        stream_errors: load.stream_errors,
        sessions_left: ctx.fleet.sessions_left() - left_before,
    })
}

/// Steady load until `stop`: unary calls at `--rolling-rate`, commands at
/// `--soak-command-share` of that, one bulk stream a second; each call routed when it is sent.
async fn rolling_load(ctx: &Ctx, stop: CancellationToken) -> RollingLoad {
    let rate = ctx.opts.rolling_rate.max(1.0);
    let per_sec_cmds = (rate * ctx.opts.soak_command_share.max(0.0)).round() as usize;
    let bulk_count = (ctx.opts.bulk_kib / 64).max(1);
    let permits = Arc::new(tokio::sync::Semaphore::new(ctx.opts.concurrency.max(1)));
    let calls: Arc<Mutex<Batch>> = Default::default();
    let submitted: Arc<Mutex<Vec<Result<String, tonic::Status>>>> = Default::default();
    let streams: Arc<Mutex<(usize, usize, Vec<String>)>> = Default::default();
    let mut skipped = 0;
    let bar = ctx.bar("rolling", 0);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                let i = ctx.random_agent();
                let (d, a, via) = (ctx.driver.clone(), ctx.agents[i].clone(), ctx.route(i).0);
                let calls = calls.clone();
                tasks.spawn(async move {
                    let t = Instant::now();
                    let r = d.unary(via, &a, CALL_TIMEOUT).await;
                    calls.lock().expect("calls").record(t.elapsed(), &r);
                    drop(permit);
                });
            }
            _ = second.tick() => {
                let done = calls.lock().expect("calls");
                bar.set_message(format!(
                    "{:.0} s: {} calls, {} failed",
                    started.elapsed().as_secs_f64(),
                    done.calls,
                    done.failed()
                ));
                drop(done);
                for _ in 0..per_sec_cmds {
                    let a = ctx.agents[ctx.random_agent()].clone();
                    let (d, submitted) = (ctx.driver.clone(), submitted.clone());
                    tasks.spawn(async move {
                        let r = d.submit(&a, "echo", b"rolling".to_vec()).await;
                        submitted.lock().expect("submitted").push(r);
                    });
                }
                let i = ctx.random_agent();
                let (d, a, via) = (ctx.driver.clone(), ctx.agents[i].clone(), ctx.route(i).0);
                let streams = streams.clone();
                tasks.spawn(async move {
                    let r = d.bulk(via, &a, bulk_count, 64 << 10, CALL_TIMEOUT).await;
                    let mut s = streams.lock().expect("streams");
                    s.0 += 1;
                    match r {
                        Ok(_) => s.1 += 1,
                        Err(e) if s.2.len() < 5 => s.2.push(format!("{:?}: {}", e.code(), e.message())),
                        Err(_) => {}
                    }
                });
            }
        }
    }
    // The calls in flight finish (or time out) before the figures are read.
    while tasks.join_next().await.is_some() {}
    bar.finish();
    let mut calls = std::mem::take(&mut *calls.lock().expect("calls"));
    calls.elapsed = started.elapsed();
    let submitted = std::mem::take(&mut *submitted.lock().expect("submitted"));
    let (streams, streams_ok, stream_errors) =
        std::mem::take(&mut *streams.lock().expect("streams"));
    RollingLoad {
        calls,
        skipped,
        submitted,
        streams,
        streams_ok,
        stream_errors,
    }
}
