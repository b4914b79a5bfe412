//! Direct vs tunneled, in one process run, so machine noise cancels in the ratios:
//! - unary gRPC round trip, 1 KiB messages: p50 / p99 (target: tunneled p50 ≤ 2× direct);
//! - 64-byte ping-pong over a raw TCP stream (target: ≤ 40 µs added at p50);
//! - 256 MiB bulk over a TCP stream and over gRPC server streaming (target: tunneled ≥ 0.20×
//!   direct loopback TCP).
//!
//! Caller, gateway, agent and upstreams all run in this process on the machine's cores.
//! `cargo bench -p tether-e2e --bench relay -- [ITERATIONS] [BULK_MIB]`

use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::StreamChunk;
use tether_api::v1::streams_client::StreamsClient;
use tether_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

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

fn gso_report() -> String {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    match quinn::udp::UdpSocketState::new((&sock).into()) {
        Ok(s) => format!(
            "UDP GSO max segments {}, GRO segments {}",
            s.max_gso_segments(),
            s.gro_segments()
        ),
        Err(e) => format!("UDP offload state unavailable: {e}"),
    }
}

fn main() {
    let (args, rt) = tether_e2e::bench_setup();
    let iters: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let bulk_mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    rt.block_on(async move {
        let pki = Pki::new();
        let gw = TestGateway::start(&pki).await;
        let upstream = DemoUpstream::start().await;
        let echo_tcp = tcp_echo_server().await;
        let sink = sink_server().await;
        let mut cfg = agent_config(&pki.agent("bench/agent"), gw.handle.tunnel_addr);
        with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
        with_service(&mut cfg, "echo", &echo_tcp.to_string(), ServiceKind::Tcp);
        with_service(&mut cfg, "sink", &sink.to_string(), ServiceKind::Tcp);
        let agent = TestAgent::start(&cfg);
        wait_until("agent connected", Duration::from_secs(20), || gw.sessions_of("bench/agent") == 1).await;
        println!("{}", gso_report());
        println!("iterations {iters}, bulk {bulk_mib} MiB\n");

        // --- unary 1 KiB ---
        let req = EchoRequest { message: "x".into(), payload: vec![7u8; 1024], ..Default::default() };
        let direct_ch = tonic::transport::Endpoint::from_shared(upstream.url()).unwrap().tcp_nodelay(true).connect().await.unwrap();
        let mut direct = EchoClient::new(direct_ch);
        let mut tunneled = echo_via(&gw, &pki, Route::new(Some("bench/agent"), None)).await;
        let mut d = Vec::with_capacity(iters);
        let mut t = Vec::with_capacity(iters);
        for i in 0..iters + 200 {
            let s = Instant::now();
            direct.unary(req.clone()).await.unwrap();
            let dd = s.elapsed();
            let s = Instant::now();
            tunneled.unary(req.clone()).await.unwrap();
            let tt = s.elapsed();
            if i >= 200 {
                d.push(dd);
                t.push(tt);
            }
        }
        let (d50, d99, t50, t99) = (percentile(&mut d, 0.5), percentile(&mut d, 0.99), percentile(&mut t, 0.5), percentile(&mut t, 0.99));
        println!("unary 1 KiB      direct p50 {:>7.1} µs p99 {:>7.1} µs | tunneled p50 {:>7.1} µs p99 {:>7.1} µs | p50 ratio {:.2}× (target ≤ 2×)",
            us(d50), us(d99), us(t50), us(t99), us(t50) / us(d50));

        // --- 64-byte TCP ping-pong ---
        let ping = [42u8; 64];
        let mut direct = tokio::net::TcpStream::connect(echo_tcp).await.unwrap();
        direct.set_nodelay(true).unwrap();
        let ch = gw.channel(&pki.client("bench")).await.unwrap();
        let mut streams = StreamsClient::with_interceptor(ch.clone(), Route::new(Some("bench/agent"), Some("echo")));
        let (tx, rx) = tokio::sync::mpsc::channel::<StreamChunk>(4);
        let mut inbound = streams.open(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let mut d = Vec::with_capacity(iters);
        let mut t = Vec::with_capacity(iters);
        let mut buf = [0u8; 64];
        for i in 0..iters + 200 {
            let s = Instant::now();
            direct.write_all(&ping).await.unwrap();
            direct.read_exact(&mut buf).await.unwrap();
            let dd = s.elapsed();
            let s = Instant::now();
            tx.send(StreamChunk { data: ping.to_vec().into() }).await.unwrap();
            let mut got = 0;
            while got < 64 {
                got += inbound.message().await.unwrap().unwrap().data.len();
            }
            let tt = s.elapsed();
            if i >= 200 {
                d.push(dd);
                t.push(tt);
            }
        }
        let (d50, t50, t99) = (percentile(&mut d, 0.5), percentile(&mut t, 0.5), percentile(&mut t, 0.99));
        println!("tcp ping-pong 64 B direct p50 {:>7.1} µs | tunneled p50 {:>7.1} µs p99 {:>7.1} µs | added at p50 {:.1} µs (target ≤ 40 µs)",
            us(d50), us(t50), us(t99), us(t50) - us(d50));
        drop(tx);

        // --- bulk ---
        let total = bulk_mib << 20;
        let chunk = vec![1u8; 64 * 1024];
        let s = Instant::now();
        let mut direct = tokio::net::TcpStream::connect(sink).await.unwrap();
        for _ in 0..total / chunk.len() {
            direct.write_all(&chunk).await.unwrap();
        }
        direct.shutdown().await.unwrap();
        let mut ack = [0u8; 8];
        direct.read_exact(&mut ack).await.unwrap();
        assert_eq!(u64::from_be_bytes(ack), total as u64);
        let direct_bps = total as f64 / s.elapsed().as_secs_f64();

        let mut streams = StreamsClient::with_interceptor(ch.clone(), Route::new(Some("bench/agent"), Some("sink")));
        let s = Instant::now();
        let n = total / chunk.len();
        let c = bytes::Bytes::from(chunk.clone());
        let reqs = tokio_stream::iter((0..n).map(move |_| StreamChunk { data: c.clone() }));
        let mut inbound = streams.open(reqs).await.unwrap().into_inner();
        let mut ack = Vec::new();
        while let Some(m) = inbound.message().await.unwrap() {
            ack.extend_from_slice(&m.data);
        }
        assert_eq!(u64::from_be_bytes(ack[..8].try_into().unwrap()), total as u64);
        let tcp_bps = total as f64 / s.elapsed().as_secs_f64();

        let s = Instant::now();
        let mut stream = tunneled
            .server_stream(EchoRequest { message: "b".into(), repeat: (total / chunk.len()) as u32, size: chunk.len() as u32, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let mut got = 0usize;
        while let Some(m) = stream.next().await {
            got += m.unwrap().payload.len();
        }
        assert_eq!(got, total);
        let grpc_bps = total as f64 / s.elapsed().as_secs_f64();
        let mib = |b: f64| b / (1 << 20) as f64;
        println!("bulk {bulk_mib} MiB       direct loopback TCP {:>7.1} MiB/s | tunneled TCP {:>7.1} MiB/s ({:.2}×) | tunneled gRPC stream {:>7.1} MiB/s ({:.2}×) (target ≥ 0.20×)",
            mib(direct_bps), mib(tcp_bps), tcp_bps / direct_bps, mib(grpc_bps), grpc_bps / direct_bps);
        agent.stop().await;
        gw.stop().await;
    });
}
