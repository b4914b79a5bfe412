//! Issue 17 measured: `Commands/Submit` throughput and latency on the embedded store against one
//! and three replicas on one PostgreSQL (Debian's server, started here as an unprivileged user),
//! real `tether-gateway serve` processes from the same target directory, one real agent
//! connected to every gateway and running each command (so deliveries load the gateways too).
//!
//! For each setup: Submits/s with 64 concurrent callers spread over the replicas for
//! `SECONDS`, then p50/p99 of Submit at a paced 1,000/s (or the setup's maximum, if lower) for
//! `SECONDS`, how long the last accepted command took to succeed, and the CPU time the gateway
//! processes used for all of it per 1,000 commands (user + system, PostgreSQL not counted: a
//! figure that moves less with other load on the machine than the rates do).
//!
//! ```sh
//! cargo build --release --workspace && cargo run --release -p tether-e2e --example replica_submits -- 10 [AGENTS] [PAYLOAD_BYTES]
//! ```
//!
//! `PAYLOAD_BYTES` (default: a few bytes) gives every command a payload of that size (`echo`
//! answers it back as its output).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tether_e2e::*;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};

/// The agent a Submit goes to: the second argument says over how many they are spread (default
/// 1: every Submit for one agent, whose pending-command counter all of them lock in turn).
fn agent(i: usize, agents: usize) -> String {
    format!("bench/a{}", i % agents)
}

struct Setup {
    name: &'static str,
    replicas: usize,
    postgres: bool,
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(10), |a| a.parse())
        .map_err(|e| anyhow::anyhow!("the seconds per phase: {e}"))?;
    let agents: usize = std::env::args()
        .nth(2)
        .map_or(Ok(1), |a| a.parse())
        .map_err(|e| anyhow::anyhow!("the number of agents: {e}"))?;
    let payload: usize = std::env::args()
        .nth(3)
        .map_or(Ok(0), |a| a.parse())
        .map_err(|e| anyhow::anyhow!("the payload bytes: {e}"))?;
    init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let setups = [
        Setup {
            name: "embedded (redb)",
            replicas: 1,
            postgres: false,
        },
        Setup {
            name: "1 replica, PostgreSQL",
            replicas: 1,
            postgres: true,
        },
        Setup {
            name: "3 replicas, PostgreSQL",
            replicas: 3,
            postgres: true,
        },
    ];
    println!(
        "| setup | Submits/s (64 callers) | paced rate | p50 | p99 | last command succeeded after | gateway CPU per 1k commands |"
    );
    println!("|---|---|---|---|---|---|---|");
    for s in setups {
        rt.block_on(run(&s, Duration::from_secs(seconds), agents, payload))?;
    }
    Ok(())
}

/// User + system CPU seconds of a process.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A command's payload: `payload` bytes, or `small` when that is 0.
fn body(payload: usize, small: String) -> Vec<u8> {
    if payload == 0 {
        small.into_bytes()
    } else {
        vec![b'x'; payload]
    }
}

async fn run(s: &Setup, phase: Duration, agents: usize, payload: usize) -> anyhow::Result<()> {
    let pki = Pki::new();
    let pg = if s.postgres {
        Some(
            // fsync on, as the embedded store's commits are: durable figures for both.
            LocalPostgres::start(LocalPostgresOptions {
                fsync: true,
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    } else {
        None
    };
    let mut gws = Vec::new();
    for i in 0..s.replicas {
        let extra = match &pg {
            Some(pg) => format!(
                "[store]\ndsn = \"{}\"\npool_size = 32\n[cluster]\nreplica_id = \"gw-{i}\"\n[limits]\npending_commands_per_agent = 1000000\n",
                pg.dsn()
            ),
            None => "[limits]\npending_commands_per_agent = 1000000\n".to_owned(),
        };
        gws.push(GatewayProcess::spawn_configured(&pki, &extra).await);
    }
    let mut fleet = Vec::new();
    for a in 0..agents {
        let mut cfg = agent_config(&pki.agent(&agent(a, agents)), gws[0].tunnel);
        cfg.gateways = gws.iter().map(|g| g.tunnel.to_string()).collect();
        fleet.push(TestAgent::start_with_handlers(&cfg, test_handlers()));
    }
    let mut clients = Vec::new();
    for g in &gws {
        for a in 0..agents {
            wait_connected(
                g.channel(&pki.client("api")).await,
                &agent(a, agents),
                Duration::from_secs(30),
            )
            .await;
        }
        clients.push(commands_client(g.channel(&pki.client("api")).await));
    }

    let cpu = || gws.iter().map(|g| cpu_secs(g.pid())).sum::<f64>();
    let cpu0 = cpu();

    // Throughput: 64 callers, spread over the replicas, for one phase.
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + phase;
    let mut tasks = Vec::new();
    for c in 0..64 {
        let mut client = clients[c % clients.len()].clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let mut req = submit_req(
                    &agent(c + n as usize, agents),
                    "echo",
                    body(payload, format!("{c}-{n}")),
                );
                req.ordering_key = format!("k{}", c % 16);
                client.submit(req).await.expect("submit");
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / phase.as_secs_f64();

    // Latency at a paced rate: 1,000/s, or 80% of the maximum when that is lower.
    let paced = (rate * 0.8).clamp(1.0, 1000.0);
    let every = Duration::from_secs_f64(1.0 / paced);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < phase {
        tick.tick().await;
        let mut client = clients[i % clients.len()].clone();
        let tx = tx.clone();
        let to = agent(i, agents);
        tokio::spawn(async move {
            let t = Instant::now();
            let id = client
                .submit(submit_req(&to, "echo", body(payload, "paced".into())))
                .await
                .expect("submit")
                .into_inner()
                .id;
            let _ = tx.send((t.elapsed(), id, Instant::now()));
        });
        i += 1;
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut last = None;
    while let Some((d, id, at)) = rx.recv().await {
        lat.push(d);
        last = Some((id, at));
    }
    let (last_id, accepted_at) = last.expect("a paced Submit");
    let mut client = clients[clients.len() - 1].clone();
    wait_final(&mut client, &last_id, Duration::from_secs(600)).await;
    let drained = accepted_at.elapsed();
    let commands = done.load(Ordering::Relaxed) + lat.len();
    let cpu_per_k = (cpu() - cpu0) * 1000.0 / commands as f64;
    println!(
        "| {} | {rate:.0} | {paced:.0}/s | {:.1} ms | {:.1} ms | {:.1} s | {:.2} s |",
        s.name,
        percentile(&mut lat, 0.5).as_secs_f64() * 1e3,
        percentile(&mut lat, 0.99).as_secs_f64() * 1e3,
        drained.as_secs_f64(),
        cpu_per_k
    );
    for a in fleet {
        a.stop().await;
    }
    drop(gws);
    drop(pg);
    Ok(())
}
