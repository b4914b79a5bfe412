//! The gRPC half of `scripts/bench-forward`: the demo upstream as a process of its own, and a
//! client that calls it directly and through a running gateway's relay, interleaved, so the
//! ratios of one run cancel most of the machine's noise.
//!
//! ```sh
//! relay_bench upstream 127.0.0.1:PORT [SINK_ADDR]
//! relay_bench client --direct http://127.0.0.1:PORT --northbound 127.0.0.1:NB \
//!     --ca ca.pem --cert client.pem --key client-key.pem --agent tenant/agent \
//!     [--service NAME] [--seconds 4] [--payload 1024] [--chunk 65536] [--cpu-pids GW,AGENT]
//! relay_bench concurrent --streams 1000 --service sink --northbound ... --ca ... --cert ... \
//!     --key ... --agent tenant/agent [--seconds 4]
//! relay_bench udp-delay LISTEN TARGET MS
//! ```
//!
//! `client` prints one line of JSON: unary p50/p99 in µs (direct, relayed) and server-stream
//! bulk in bytes per second (direct, relayed). The relayed calls go over mutual TLS to the
//! northbound listener with `tether-agent` (and `tether-service`) metadata, as a control plane
//! would; the direct ones over plain HTTP/2 to the upstream. Same client code both ways. With
//! `--cpu-pids`, it adds the CPU time those processes (the gateway and the agent) used per
//! relayed unary call and per relayed MB (`/proc/PID/stat`, user + system).
//!
//! `upstream` with a `SINK_ADDR` also serves a TCP sink there: it reads a connection to its end,
//! then answers the number of bytes it read (8 bytes, big-endian). `concurrent` opens that many
//! `tether.v1.Streams/Open` streams at once to the agent's TCP service (the sink), each writing
//! 16 KiB chunks for `--seconds`, and prints one line of JSON: the bytes the sink counted per
//! stream (aggregate, min, median, max, and Jain's fairness index, 1 when all are equal).
//!
//! `udp-delay` forwards UDP datagrams between one client and `TARGET`, holding each for `MS`
//! milliseconds both ways: a long path for the tunnel (this machine's kernel has no netem).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_gateway::tools::ctl::{Target, connect};
use tether_gateway::tools::demo::{EchoService, serve};
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

/// Adds the relay's routing metadata to every call.
#[derive(Clone)]
struct Route {
    agent: MetadataValue<tonic::metadata::Ascii>,
    service: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Interceptor for Route {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("tether-agent", self.agent.clone());
        if let Some(s) = &self.service {
            req.metadata_mut().insert("tether-service", s.clone());
        }
        Ok(req)
    }
}

struct Args {
    direct: String,
    target: Target,
    route: Route,
    seconds: f64,
    payload: usize,
    chunk: u32,
    cpu_pids: Vec<u32>,
}

/// CPU seconds (user + system) used so far by `pids` together.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .sum()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let need = |name: &str| flag(args, name).with_context(|| format!("{name} is required"));
    let num = |name: &str, default: f64| -> anyhow::Result<f64> {
        flag(args, name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("{name} {v:?} is not a number"))
        })
    };
    Ok(Args {
        direct: need("--direct")?,
        target: Target {
            addr: need("--northbound")?,
            ca: need("--ca")?.into(),
            cert: need("--cert")?.into(),
            key: need("--key")?.into(),
            server_name: Some("localhost".into()),
        },
        route: Route {
            agent: need("--agent")?.parse().context("--agent is not ASCII")?,
            service: flag(args, "--service")
                .map(|s| s.parse())
                .transpose()
                .context("--service is not ASCII")?,
        },
        seconds: num("--seconds", 4.0)?,
        payload: num("--payload", 1024.0)? as usize,
        chunk: num("--chunk", 65536.0)? as u32,
        cpu_pids: flag(args, "--cpu-pids")
            .map(|v| {
                v.split(',')
                    .map(|p| p.parse().with_context(|| format!("--cpu-pids: {p:?}")))
                    .collect::<anyhow::Result<Vec<u32>>>()
            })
            .transpose()?
            .unwrap_or_default(),
    })
}

fn quantile(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Bytes per second of server streams of `chunk`-byte messages for about `seconds`.
async fn bulk<T>(client: &mut EchoClient<T>, chunk: u32, seconds: f64) -> anyhow::Result<f64>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let per_call = ((64u64 << 20) / u64::from(chunk.max(1))) as u32;
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let mut stream = client
            .server_stream(EchoRequest {
                message: "b".into(),
                repeat: per_call,
                size: chunk,
                ..Default::default()
            })
            .await?
            .into_inner();
        while let Some(m) = stream.next().await {
            bytes += m?.payload.len() as u64;
        }
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

async fn client(a: Args) -> anyhow::Result<()> {
    let direct_ch = tonic::transport::Endpoint::from_shared(a.direct.clone())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the upstream at {}", a.direct))?;
    let mut direct = EchoClient::new(direct_ch).max_decoding_message_size(16 << 20);
    let relay_ch = connect(&a.target)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut relayed =
        EchoClient::with_interceptor(relay_ch, a.route.clone()).max_decoding_message_size(16 << 20);

    let req = EchoRequest {
        message: "x".into(),
        payload: vec![7u8; a.payload],
        ..Default::default()
    };
    // Warm up both paths (connections, windows, the agent's upstream channel).
    for _ in 0..200 {
        direct.unary(req.clone()).await?;
        relayed.unary(req.clone()).await?;
    }
    let (mut d, mut r) = (Vec::new(), Vec::new());
    let cpu0 = cpu_seconds(&a.cpu_pids);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < a.seconds {
        let s = Instant::now();
        direct.unary(req.clone()).await?;
        d.push(s.elapsed());
        let s = Instant::now();
        relayed.unary(req.clone()).await?;
        r.push(s.elapsed());
    }
    if d.is_empty() {
        bail!("no unary call completed in {} s", a.seconds);
    }
    let calls = d.len();
    let cpu_unary = cpu_seconds(&a.cpu_pids) - cpu0;
    let (d50, d99, r50, r99) = (
        quantile(&mut d, 0.5),
        quantile(&mut d, 0.99),
        quantile(&mut r, 0.5),
        quantile(&mut r, 0.99),
    );
    let direct_bps = bulk(&mut direct, a.chunk, a.seconds).await?;
    let cpu0 = cpu_seconds(&a.cpu_pids);
    let start = Instant::now();
    let relayed_bps = bulk(&mut relayed, a.chunk, a.seconds).await?;
    let relayed_mb = relayed_bps * start.elapsed().as_secs_f64() / 1e6;
    let cpu_stream = cpu_seconds(&a.cpu_pids) - cpu0;
    println!(
        "{}",
        serde_json::json!({
            "unary_calls": calls,
            "unary_payload": a.payload,
            "unary_direct_p50_us": d50, "unary_direct_p99_us": d99,
            "unary_relayed_p50_us": r50, "unary_relayed_p99_us": r99,
            "stream_chunk": a.chunk,
            "stream_direct_bps": direct_bps, "stream_relayed_bps": relayed_bps,
            "cpu_us_per_unary": cpu_unary * 1e6 / calls as f64,
            "cpu_us_per_stream_mb": cpu_stream * 1e6 / relayed_mb.max(1e-9),
        })
    );
    Ok(())
}

/// Reads each connection to its end, then answers the byte count.
async fn sink(l: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
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
}

/// `streams` TCP streams at once through the relay to the sink, each writing for `seconds`:
/// the bytes the sink counted on each.
async fn concurrent(a: &[String]) -> anyhow::Result<()> {
    use tether_api::v1::StreamChunk;
    use tether_api::v1::streams_client::StreamsClient;
    let need = |name: &str| flag(a, name).with_context(|| format!("{name} is required"));
    let target = Target {
        addr: need("--northbound")?,
        ca: need("--ca")?.into(),
        cert: need("--cert")?.into(),
        key: need("--key")?.into(),
        server_name: Some("localhost".into()),
    };
    let route = Route {
        agent: need("--agent")?.parse().context("--agent is not ASCII")?,
        service: Some(
            need("--service")?
                .parse()
                .context("--service is not ASCII")?,
        ),
    };
    let streams: usize = flag(a, "--streams").map_or(Ok(1000), |v| v.parse())?;
    let seconds: f64 = flag(a, "--seconds").map_or(Ok(4.0), |v| v.parse())?;
    // Four northbound connections, as a control plane with a small pool would use.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(connect(&target).await.map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let chunk = bytes::Bytes::from(vec![1u8; 16 * 1024]);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut client =
            StreamsClient::with_interceptor(channels[i % channels.len()].clone(), route.clone());
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<StreamChunk>(2);
            let writer = tokio::spawn(async move {
                while Instant::now() < until {
                    if tx
                        .send(StreamChunk {
                            data: chunk.clone(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let mut inbound = client
                .open(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let mut ack = Vec::new();
            while let Some(m) = inbound.message().await? {
                ack.extend_from_slice(&m.data);
            }
            let _ = writer.await;
            let count: [u8; 8] = ack
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .context("the sink did not answer its byte count")?;
            anyhow::Ok(u64::from_be_bytes(count))
        }));
    }
    let mut per_stream = Vec::with_capacity(streams);
    let mut failed = 0usize;
    for t in tasks {
        match t.await? {
            Ok(n) => per_stream.push(n),
            Err(e) => {
                if failed == 0 {
                    eprintln!("relay_bench: a stream failed: {e:#}");
                }
                failed += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    per_stream.sort_unstable();
    let total: u64 = per_stream.iter().sum();
    let (sum, sum_sq) = per_stream.iter().fold((0f64, 0f64), |(s, q), &n| {
        (s + n as f64, q + (n as f64) * (n as f64))
    });
    let jain = if sum_sq > 0.0 {
        sum * sum / (per_stream.len() as f64 * sum_sq)
    } else {
        0.0
    };
    println!(
        "{}",
        serde_json::json!({
            "streams": streams, "failed": failed, "seconds": elapsed,
            "aggregate_bps": total as f64 / elapsed,
            "min_bytes": per_stream.first(), "median_bytes": per_stream.get(per_stream.len() / 2),
            "max_bytes": per_stream.last(), "starved": per_stream.iter().filter(|&&n| n == 0).count(),
            "jain_fairness": jain,
        })
    );
    Ok(())
}

/// Forwards datagrams between the first client that sends to `listen` and `target`, each held
/// `delay` in both directions.
async fn udp_delay(listen: &str, target: &str, delay: Duration) -> anyhow::Result<()> {
    use std::sync::Arc;
    let front = Arc::new(tokio::net::UdpSocket::bind(listen).await?);
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    back.connect(target).await?;
    let (client_tx, mut client_rx) = tokio::sync::watch::channel(None);
    // Each direction: a reader queueing (due, datagram) and a writer sending at the due time.
    let pipe =
        |from: Arc<tokio::net::UdpSocket>, to: Arc<tokio::net::UdpSocket>, towards_client: bool| {
            let (q_tx, mut q_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
            let client_tx_r = client_tx.clone();
            let client_tx = client_tx.clone();
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let (n, peer) = from.recv_from(&mut buf).await?;
                    if !towards_client {
                        client_tx_r.send_if_modified(|c| {
                            let changed = c.is_none();
                            c.get_or_insert(peer);
                            changed
                        });
                    }
                    if q_tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return anyhow::Ok(());
                    }
                }
            });
            let mut client = client_tx.subscribe();
            let writer = tokio::spawn(async move {
                while let Some((due, d)) = q_rx.recv().await {
                    tokio::time::sleep_until(due.into()).await;
                    if towards_client {
                        let peer = *client.wait_for(Option::is_some).await?;
                        let _ = to.send_to(&d, peer.expect("waited for a client")).await;
                    } else {
                        let _ = to.send(&d).await;
                    }
                }
                anyhow::Ok(())
            });
            (reader, writer)
        };
    let (r1, w1) = pipe(front.clone(), back.clone(), false);
    let (r2, w2) = pipe(back, front, true);
    client_rx.wait_for(Option::is_some).await?;
    let _ = tokio::join!(r1, w1, r2, w2);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tether_runtime::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("upstream") => {
            let addr = args
                .get(1)
                .context("upstream needs an address to listen on")?;
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                if let Some(s) = args.get(2) {
                    let s = tokio::net::TcpListener::bind(s)
                        .await
                        .with_context(|| format!("listening on {s}"))?;
                    tokio::spawn(sink(s));
                }
                serve(l, EchoService::default(), Default::default()).await;
                Ok(())
            })
        }
        Some("client") => rt.block_on(client(parse(&args[1..])?)),
        Some("concurrent") => rt.block_on(concurrent(&args[1..])),
        Some("udp-delay") => {
            let (Some(listen), Some(target), Some(ms)) = (args.get(1), args.get(2), args.get(3))
            else {
                bail!("usage: relay_bench udp-delay LISTEN TARGET MS");
            };
            let ms: u64 = ms.parse().context("MS is not a number")?;
            rt.block_on(udp_delay(listen, target, Duration::from_millis(ms)))
        }
        _ => bail!("usage: relay_bench upstream ADDR | relay_bench client --direct URL ..."),
    }
}
