//! Raw TCP streams: `tether.v1.Streams/Open` and `tetherctl forward`, bytes intact both ways,
//! half-close propagated, errors with their status codes.

use std::hash::Hasher;
use std::time::Duration;

use tether_agent::config::ServiceKind;
use tether_api::v1::StreamChunk;
use tether_api::v1::streams_client::StreamsClient;
use tether_e2e::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const T: Duration = Duration::from_secs(60);

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hash(b: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(b);
    h.finish()
}

struct Scene {
    pki: Pki,
    gw: TestGateway,
    agent: TestAgent,
    _upstream: DemoUpstream,
}

async fn scene() -> Scene {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let echo = tcp_echo_server().await;
    let upstream = DemoUpstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut cfg = agent_config(&pki.agent("acme/db"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "echo", &echo.to_string(), ServiceKind::Tcp);
    with_service(&mut cfg, "down", &dead_addr.to_string(), ServiceKind::Tcp);
    with_service(&mut cfg, "grpc", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/db") == 1).await;
    Scene {
        pki,
        gw,
        agent,
        _upstream: upstream,
    }
}

async fn open(s: &Scene, service: &str, chunks: Vec<Vec<u8>>) -> Result<Vec<u8>, tonic::Status> {
    let ch = s.gw.channel(&s.pki.client("api")).await.unwrap();
    let mut client =
        StreamsClient::with_interceptor(ch, Route::new(Some("acme/db"), Some(service)));
    let reqs = tokio_stream::iter(
        chunks
            .into_iter()
            .map(|data| StreamChunk { data: data.into() }),
    );
    let mut inbound = client.open(reqs).await?.into_inner();
    let mut got = Vec::new();
    while let Some(c) = inbound.message().await? {
        got.extend_from_slice(&c.data);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_echoes_bytes_and_half_close_ends_the_stream() {
    let s = scene().await;
    let data = pattern(4 << 20, 7);
    let chunks: Vec<Vec<u8>> = data.chunks(100_000).map(<[u8]>::to_vec).collect();
    // The echo server only closes after it sees our half-close, so the response stream ending
    // proves half-close went through in both directions.
    let got = tokio::time::timeout(T, open(&s, "echo", chunks))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(hash(&got), hash(&data));
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_errors_have_their_status_codes() {
    let s = scene().await;
    let e = open(&s, "nope", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = open(&s, "grpc", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = open(&s, "down", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("\"down\""), "{}", e.message());
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_forward_carries_100_mib_intact_with_half_close() {
    let s = scene().await;
    let client = s.pki.client("api");
    let mut child = tokio::process::Command::new(binary("tetherctl"))
        .arg("--northbound")
        .arg(s.gw.handle.northbound_addr.to_string())
        .arg("--ca")
        .arg(&client.ca)
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .args([
            "--server-name",
            "localhost",
            "--dev-json",
            "/nonexistent",
            "forward",
            "acme/db",
            "echo",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tetherctl");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(T, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("tetherctl prints its port");
    let local: std::net::SocketAddr = line
        .strip_prefix("forwarding ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));

    let data = pattern(100 << 20, 42);
    let expected = hash(&data);
    let conn = tokio::net::TcpStream::connect(local).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap(); // half-close: the echo server then closes its side
    });
    let mut got = Vec::with_capacity(100 << 20);
    tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut got))
        .await
        .expect("EOF arrives: half-close propagated")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), 100 << 20);
    assert_eq!(hash(&got), expected);
    let _ = child.kill().await;
    s.agent.stop().await;
    s.gw.stop().await;
}
