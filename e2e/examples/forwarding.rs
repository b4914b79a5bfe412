//! Issue 18 measured: forwarded vs local, in one run, so machine noise hits both alike. Two
//! real `tether-gateway serve` replica processes (from the same target directory) on one local
//! PostgreSQL, linked over their peer link; one agent (in this process) with a session on `r1`
//! only; callers in this process at `r1` (local) and at `r2` (forwarded over the link to `r1`).
//!
//! - unary Echo with a 1 KiB payload: p50 / p99 over ITERATIONS sequential calls each way,
//!   local and forwarded calls alternating;
//! - bulk: a BULK_MIB gRPC server stream (64 KiB messages) and BULK_MIB up a `Streams/Open`
//!   TCP stream to a sink, each local then forwarded: MiB/s.
//!
//! ```sh
//! cargo build --release -p tether-gateway --bins && \
//!   nice cargo run --release -p tether-e2e --example forwarding -- [ITERATIONS] [BULK_MIB]
//! ```

use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::StreamChunk;
use tether_api::v1::streams_client::StreamsClient;
use tether_e2e::*;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

const AGENT: &str = "bench/agent";

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Reads until EOF, then answers the byte count (8 bytes) and closes.
async fn sink_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn echo_at(gw: &GatewayProcess, pki: &Pki) -> EchoClient<Routed> {
    let ch = gw.channel(&pki.client("bench")).await;
    EchoClient::with_interceptor(ch, Route::new(Some(AGENT), None))
        .max_decoding_message_size(16 << 20)
}

/// MiB/s of a BULK server stream through `echo`.
async fn grpc_bulk(echo: &mut EchoClient<Routed>, total: usize) -> f64 {
    let chunk = 64 * 1024;
    let s = Instant::now();
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "b".into(),
            repeat: (total / chunk) as u32,
            size: chunk as u32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0usize;
    while let Some(m) = stream.next().await {
        got += m.unwrap().payload.len();
    }
    assert_eq!(got, total);
    total as f64 / s.elapsed().as_secs_f64() / f64::from(1 << 20)
}

/// MiB/s of `total` bytes up a TCP stream to the sink through `gw`.
async fn tcp_bulk(gw: &GatewayProcess, pki: &Pki, total: usize) -> f64 {
    let ch = gw.channel(&pki.client("bench")).await;
    let mut streams = StreamsClient::with_interceptor(ch, Route::new(Some(AGENT), Some("sink")));
    let chunk = bytes::Bytes::from(vec![1u8; 64 * 1024]);
    let n = total / chunk.len();
    let s = Instant::now();
    let reqs = tokio_stream::iter((0..n).map(move |_| StreamChunk {
        data: chunk.clone(),
    }));
    let mut inbound = streams.open(reqs).await.unwrap().into_inner();
    let mut ack = Vec::new();
    while let Some(m) = inbound.message().await.unwrap() {
        ack.extend_from_slice(&m.data);
    }
    assert_eq!(
        u64::from_be_bytes(ack[..8].try_into().unwrap()),
        total as u64
    );
    total as f64 / s.elapsed().as_secs_f64() / f64::from(1 << 20)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iters: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let bulk_mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pki = Pki::new();
        let pg = LocalPostgres::start(LocalPostgresOptions::default())
            .unwrap_or_else(|e| panic!("this bench needs a local PostgreSQL: {e}"));
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        let r1 = GatewayProcess::spawn_configured(&pki, &peer_replica_config(&pg.dsn(), "r1", &pki, lo)).await;
        let r2 = GatewayProcess::spawn_configured(&pki, &peer_replica_config(&pg.dsn(), "r2", &pki, lo)).await;
        wait_until("peer link up", Duration::from_secs(30), || r1.peer_up("r2") && r2.peer_up("r1")).await;
        let upstream = DemoUpstream::start().await;
        let sink = sink_server().await;
        let mut cfg = agent_config(&pki.agent(AGENT), r1.tunnel);
        with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
        with_service(&mut cfg, "sink", &sink.to_string(), ServiceKind::Tcp);
        let agent = TestAgent::start(&cfg);
        let mut local = echo_at(&r1, &pki).await;
        let mut forwarded = echo_at(&r2, &pki).await;
        // Presence reaches r2 a moment after the session registers at r1.
        let deadline = Instant::now() + Duration::from_secs(30);
        while forwarded.unary(EchoRequest::default()).await.is_err() {
            assert!(Instant::now() < deadline, "r2 never reached the agent");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("iterations {iters}, bulk {bulk_mib} MiB; r1 holds the agent's session, r2 forwards to r1\n");

        let req = EchoRequest {
            message: "x".into(),
            payload: vec![7u8; 1024],
            ..Default::default()
        };
        let (mut l, mut f) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for i in 0..iters + 200 {
            let s = Instant::now();
            local.unary(req.clone()).await.unwrap();
            let ll = s.elapsed();
            let s = Instant::now();
            forwarded.unary(req.clone()).await.unwrap();
            let ff = s.elapsed();
            if i >= 200 {
                l.push(ll);
                f.push(ff);
            }
        }
        let (l50, l99) = (percentile(&mut l, 0.5), percentile(&mut l, 0.99));
        let (f50, f99) = (percentile(&mut f, 0.5), percentile(&mut f, 0.99));
        println!(
            "unary 1 KiB      local p50 {:>7.1} µs p99 {:>7.1} µs | forwarded p50 {:>7.1} µs p99 {:>7.1} µs | added at p50 {:.1} µs, at p99 {:.1} µs",
            us(l50), us(l99), us(f50), us(f99), us(f50) - us(l50), us(f99) - us(l99)
        );

        let total = bulk_mib << 20;
        let (gl, gf) = (grpc_bulk(&mut local, total).await, grpc_bulk(&mut forwarded, total).await);
        println!(
            "gRPC stream {bulk_mib} MiB  local {gl:>7.1} MiB/s | forwarded {gf:>7.1} MiB/s ({:.2}×)",
            gf / gl
        );
        let (tl, tf) = (tcp_bulk(&r1, &pki, total).await, tcp_bulk(&r2, &pki, total).await);
        println!(
            "TCP stream {bulk_mib} MiB   local {tl:>7.1} MiB/s | forwarded {tf:>7.1} MiB/s ({:.2}×)",
            tf / tl
        );
        let cpu = |g: &GatewayProcess| cpu_ticks(g.pid());
        println!("\nCPU ticks used: r1 (holder) {}, r2 (forwarder) {}", cpu(&r1), cpu(&r2));
        agent.stop().await;
        drop((r1, r2));
        drop(pg);
    });
}
