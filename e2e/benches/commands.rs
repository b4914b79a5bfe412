//! Durable commands, measured (not a timed test): `cargo bench -p tether-e2e --bench commands`.
//!
//! 1. Maximum sustained durable Submit rate: the agent is known but offline, so only Submit runs
//!    (each one fsync'd before it is answered; group commit shares fsyncs between concurrent
//!    Submits). 64 concurrent callers for 5 s.
//! 2. Submit→Succeeded latency at a steady 1,000 commands/s to one connected agent (`echo`, 100
//!    byte payload, 256 ordering keys so lanes run in parallel), for 5 s, measured from just
//!    before Submit to the SUCCEEDED event on an `agent` Watch.
//! 3. Throughput of one lane (one ordering key, so strictly one command at a time).
//!
//! The gateway and the agent run in this process, on loopback, with real QUIC, real TLS and the
//! store on the real disk (under `target/`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_api::v1::{CommandState, WatchCommandsRequest, watch_commands_request};
use tether_e2e::*;

const AGENT: &str = "bench/one";

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let (_, rt) = tether_e2e::bench_setup();
    rt.block_on(run());
}

async fn run() {
    let pki = Pki::new();
    // On the real disk: a tmpfs would make fsync free and the figure meaningless.
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent()?.parent().map(|p| p.to_owned()))
        .unwrap_or_else(std::env::temp_dir);
    let data = tempfile::tempdir_in(&target).expect("data dir");
    let mut cfg = TestGateway::config(&pki);
    cfg.data_dir = Some(data.path().to_owned());
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let acfg = agent_config(&pki.agent(AGENT), gw.handle.tunnel_addr);
    let agent = TestAgent::start(&acfg);
    wait_until("agent connected", Duration::from_secs(20), || {
        gw.sessions_of(AGENT) == 1
    })
    .await;
    agent.stop().await;
    wait_until("agent gone", Duration::from_secs(20), || {
        gw.sessions_of(AGENT) == 0
    })
    .await;

    // 1. Durable Submit rate (agent offline: the commands stay queued).
    let clients: Vec<CommandsClient> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(gw.commands(&pki).await);
        }
        v
    };
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let window = Duration::from_secs(5);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (mut c, stop, count) = (
            clients[i % clients.len()].clone(),
            stop.clone(),
            count.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut r = submit_req(AGENT, "echo", vec![b'x'; 100]);
                r.ordering_key = format!("k{i}");
                c.submit(r).await.expect("submit");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm-up second, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_count = count.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let done = count.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    println!(
        "durable Submit rate: {rate:.0}/s ({done} in {elapsed:.2?}, 64 concurrent callers, 100-byte payloads)"
    );

    // 2. Latency at 1,000/s: a fresh gateway, so the backlog above does not drain into it.
    gw.stop().await;
    let data2 = tempfile::tempdir_in(&target).expect("data dir");
    let mut cfg = TestGateway::config(&pki);
    cfg.data_dir = Some(data2.path().to_owned());
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let acfg = agent_config(&pki.agent(AGENT), gw.handle.tunnel_addr);
    let _agent = TestAgent::start(&acfg);
    wait_until("agent connected", Duration::from_secs(20), || {
        gw.sessions_of(AGENT) == 1
    })
    .await;
    let mut client = gw.commands(&pki).await;
    let mut lat_clients = Vec::new();
    for _ in 0..4 {
        lat_clients.push(gw.commands(&pki).await);
    }
    let ended: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let mut events = client
        .watch(WatchCommandsRequest {
            target: Some(watch_commands_request::Target::Agent(AGENT.into())),
        })
        .await
        .expect("watch")
        .into_inner();
    let e = ended.clone();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = events.message().await {
            if let Some(c) = ev.command
                && c.state() == CommandState::Succeeded
            {
                e.lock().unwrap().insert(c.id, Instant::now());
            }
        }
    });
    let rate = 1000u64;
    let total = rate * 5;
    let started_at: Arc<Mutex<Vec<(String, Instant)>>> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let begin = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let (mut c, s) = (
            lat_clients[i as usize % lat_clients.len()].clone(),
            started_at.clone(),
        );
        tokio::spawn(async move {
            let mut r = submit_req(AGENT, "echo", vec![b'x'; 100]);
            r.ordering_key = format!("k{}", i % 256);
            let t0 = Instant::now();
            if let Ok(resp) = c.submit(r).await {
                s.lock().unwrap().push((resp.into_inner().id, t0));
            }
        });
    }
    let offered = total as f64 / begin.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = started_at.lock().unwrap().len();
        let all_done = {
            let e = ended.lock().unwrap();
            let s = started_at.lock().unwrap();
            s.iter().all(|(id, _)| e.contains_key(id))
        };
        if (n as u64 == total && all_done) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat: Vec<Duration> = {
        let e = ended.lock().unwrap();
        started_at
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, t0)| e.get(id).map(|t1| t1.duration_since(*t0)))
            .collect()
    };
    lat.sort();
    println!(
        "Submit→Succeeded at {offered:.0}/s offered ({} of {total} completed): p50 {:.2?} p99 {:.2?} max {:.2?}",
        lat.len(),
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );

    // 3. One lane (one ordering key): strictly one command at a time, each final (and durable)
    //    before the next is delivered. 1,000 queued at once, time to drain them.
    let n = 1000;
    let mut ids = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let mut r = submit_req(AGENT, "echo", vec![b'x'; 100]);
        r.ordering_key = "one-lane".into();
        ids.push(client.submit(r).await.expect("submit").into_inner().id);
    }
    for id in &ids {
        wait_final(&mut client, id, Duration::from_secs(120)).await;
    }
    let took = t0.elapsed();
    println!(
        "one ordering key: {n} commands in {took:.2?} = {:.0} commands/s through one lane",
        n as f64 / took.as_secs_f64()
    );
}
