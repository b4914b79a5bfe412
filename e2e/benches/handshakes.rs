//! Mutual-TLS QUIC session setups per second against one in-process gateway on loopback.
//!
//! Each setup is what a reconnecting agent does: a full QUIC + TLS 1.3 handshake with client
//! certificate verification (ECDSA P-256, no resumption), the control stream, `Hello` →
//! `Welcome`; then the connection is closed. Clients and gateway share this machine's cores, as
//! in a storm after a gateway restart.
//!
//! `cargo bench -p tether-e2e --bench handshakes -- [TOTAL] [CONCURRENCY]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_e2e::{Pki, TestGateway};
use tunnel_proto::frame::FrameDecoder;
use tunnel_proto::message::{Hello, Message};

fn client_config(pki: &Pki, agent: &str) -> quinn::ClientConfig {
    let files = pki.agent(agent);
    let roots = tether_runtime::tls::load_roots(&files.ca).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).unwrap(),
            tether_runtime::tls::load_key(&files.key).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    // Every handshake is a full one, as after a gateway restart.
    tls.resumption = rustls::client::Resumption::disabled();
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

async fn setup(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    gw: std::net::SocketAddr,
) -> Duration {
    let start = Instant::now();
    let conn = endpoint
        .connect_with(cfg.clone(), gw, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(
        &Message::Hello(Hello {
            versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
            ..Default::default()
        })
        .to_bytes(),
    )
    .await
    .unwrap();
    let mut dec = FrameDecoder::new(1 << 16);
    let mut buf = [0u8; 4096];
    loop {
        let n = recv.read(&mut buf).await.unwrap().expect("welcome");
        dec.push(&buf[..n]);
        if let Some(Message::Welcome(_)) = dec.next_message().unwrap() {
            break;
        }
    }
    let took = start.elapsed();
    conn.close(0u32.into(), b"bench done");
    took
}

fn main() {
    let (args, rt) = tether_e2e::bench_setup();
    let total: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(4000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    rt.block_on(async move {
        let pki = Pki::new();
        let gw = TestGateway::start(&pki).await;
        let addr = gw.handle.tunnel_addr;
        let cfgs: Vec<_> = (0..concurrency).map(|i| client_config(&pki, &format!("bench/a{i}"))).collect();
        // Warm-up.
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        for _ in 0..50 {
            setup(&ep, &cfgs[0], addr).await;
        }
        let start = Instant::now();
        let per = total / concurrency;
        let mut tasks = Vec::new();
        for cfg in cfgs {
            tasks.push(tokio::spawn(async move {
                let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    lat.push(setup(&ep, &cfg, addr).await);
                }
                ep.wait_idle().await;
                lat
            }));
        }
        let mut lat: Vec<Duration> = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        let (p50, p99) = (tether_e2e::percentile(&mut lat, 0.50), tether_e2e::percentile(&mut lat, 0.99));
        println!(
            "mTLS QUIC session setups: {} in {:.2}s = {:.0}/s (concurrency {concurrency}); setup latency p50 {:.2}ms p99 {:.2}ms",
            lat.len(),
            secs,
            lat.len() as f64 / secs,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
        );
        gw.stop().await;
    });
}
