//! Issue 15, finding 2, measured: a hostile agent (a valid agent certificate, a real session)
//! answers every command with 20 progress lines of 120 KiB, 4 MiB of output and a 120 KiB
//! message; the gateway is a real `tether-gateway serve` process from the same target directory.
//! Prints the gateway's memory and CPU, the command store's size and what a `List` of 1000
//! gives a stock gRPC client (4 MiB messages).
//!
//! ```sh
//! cargo build --release --workspace && cargo run --release -p tether-e2e --example command_flood -- 150
//! ```

use std::time::{Duration, Instant};

use tether_api::v1::{GetCommandRequest, ListCommandsRequest};
use tether_e2e::hostile::{Flood, HostileAgent};
use tether_e2e::*;

/// VmHWM (peak RSS) in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// User + system CPU seconds of a process.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(Ok(150), |a| a.parse())
        .map_err(|e| anyhow::anyhow!("the number of commands: {e}"))?;
    init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let pki = Pki::new();
        let data = tempfile::tempdir()?;
        let gw = GatewayProcess::spawn_with(&pki, data.path(), "127.0.0.1:0".parse()?).await;
        let _evil =
            HostileAgent::connect(&pki.agent("acme/evil"), gw.tunnel, Flood::issue_15()).await;
        let channel = gw.channel(&pki.client("api")).await;
        let mut client = commands_client(channel.clone());
        let pid = gw.pid();
        let (rss0, cpu0) = (rss_kib(pid), cpu_secs(pid));
        let started = Instant::now();
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(
                client
                    .submit(submit_req("acme/evil", "deploy", format!("{i}")))
                    .await?
                    .into_inner()
                    .id,
            );
        }
        let mut failed = 0;
        let mut kept_progress = 0usize;
        for id in &ids {
            let c = wait_final(&mut client, id, Duration::from_secs(1800)).await;
            failed += usize::from(c.state() == tether_api::v1::CommandState::Failed);
            kept_progress = kept_progress.max(c.progress.iter().map(String::len).sum());
        }
        let took = started.elapsed();
        let (rss1, peak, cpu1) = (rss_kib(pid), peak_kib(pid), cpu_secs(pid));
        let store = std::fs::metadata(data.path().join("commands.redb"))?.len();
        let mut stock = tether_api::v1::commands_client::CommandsClient::new(channel);
        let listed = stock
            .list(ListCommandsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await;
        let list = match listed {
            Ok(r) => {
                let r = r.into_inner();
                format!(
                    "ok: {} commands, next_page_token {}",
                    r.commands.len(),
                    if r.next_page_token.is_empty() {
                        "empty"
                    } else {
                        "set"
                    }
                )
            }
            Err(e) => format!("{:?}: {}", e.code(), e.message()),
        };
        let one = client
            .get(GetCommandRequest { id: ids[0].clone() })
            .await?
            .into_inner();
        println!("commands            {n} ({failed} failed) in {took:.1?}");
        println!(
            "gateway RSS         {} MiB -> {} MiB (peak {} MiB)",
            rss0 / 1024,
            rss1 / 1024,
            peak / 1024
        );
        println!("gateway CPU         {:.1} s", cpu1 - cpu0);
        println!(
            "commands.redb       {:.1} MiB",
            store as f64 / f64::from(1 << 20)
        );
        println!("largest progress    {kept_progress} bytes kept per command");
        println!(
            "result message      {} bytes",
            one.result.map_or(0, |r| r.message.len())
        );
        println!("List page_size 1000 {list}");
        Ok(())
    })
}
