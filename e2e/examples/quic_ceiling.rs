//! What the tunnel's transports can carry on this machine, without Tether: one stream of bulk
//! and a 64-byte ping-pong over plain TCP, TLS 1.3 over TCP (tokio-rustls, the northbound's
//! stack) and QUIC (quinn, with the tunnel's transport settings and crypto provider), each
//! between two tokio runtimes of two workers (as two processes would have), interleaved in one
//! run; QUIC twice, with quinn's default MTU discovery (up to 1,452-byte datagrams) and up to
//! jumbo frames (8,952). `tetherctl forward` crosses one TLS leg and one QUIC leg, so these are its ceilings on
//! this machine: the data path cannot be faster than the slower of the two, and both legs share
//! the same cores.
//!
//! ```text
//! cargo run --release -p tether-e2e --example quic_ceiling -- [SECONDS] [ROUNDS]
//! ```
//!
//! Prints one line per measurement with the rounds and their median, and ratios to plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

const CHUNK: usize = 64 * 1024;
const MSG: usize = 64;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

struct Pki {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn pki() -> Result<Pki> {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    Ok(Pki {
        cert: c.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()),
    })
}

fn tls_configs(pki: &Pki, alpn: &[u8]) -> Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let provider = Arc::new(tether_runtime::tls::crypto_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.clone()],
            PrivateKeyDer::Pkcs8(pki.key.clone_key()),
        )?;
    server.alpn_protocols = vec![alpn.to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.cert.clone())?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![alpn.to_vec()];
    Ok((server, client))
}

/// Bulk: the sender writes CHUNK-sized buffers for `secs`, the receiver counts; Gbit/s.
async fn send_bulk<W: AsyncWrite + Unpin>(mut w: W, secs: f64) -> Result<u64> {
    let buf = vec![0x5au8; CHUNK];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        w.write_all(&buf).await?;
        n += CHUNK as u64;
    }
    w.shutdown().await?;
    Ok(n)
}

async fn sink<R: AsyncRead + Unpin>(mut r: R) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

async fn echo<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W) -> Result<()> {
    let mut buf = [0u8; MSG];
    loop {
        if r.read_exact(&mut buf).await.is_err() {
            return Ok(());
        }
        w.write_all(&buf).await?;
        w.flush().await?;
    }
}

/// Ping-pong of MSG bytes for `secs`: the half round trip at p50, µs.
async fn ping<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    secs: f64,
) -> Result<f64> {
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut rtts = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let t = Instant::now();
        w.write_all(&msg).await?;
        w.flush().await?;
        r.read_exact(&mut back).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts[rtts.len() / 2])
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Tls,
    /// QUIC with MTU discovery up to this UDP payload (quinn's default: 1452).
    Quic(u16),
}

/// One measurement: bulk (Gbit/s) or ping-pong (µs), server on `srv`, client on `cli`.
fn measure(
    kind: Kind,
    bulk: bool,
    secs: f64,
    pki: &Pki,
    srv: &Runtime,
    cli: &Runtime,
) -> Result<f64> {
    match kind {
        Kind::Tcp | Kind::Tls => {
            let (scfg, ccfg) = tls_configs(pki, b"bench")?;
            let (scfg, ccfg) = (Arc::new(scfg), Arc::new(ccfg));
            let listener = srv.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let addr = listener.local_addr()?;
            let tls = matches!(kind, Kind::Tls);
            let server = srv.spawn(async move {
                let (s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                if tls {
                    let s = tokio_rustls::TlsAcceptor::from(scfg).accept(s).await?;
                    let (r, w) = tokio::io::split(s);
                    if bulk {
                        sink(r).await.map(|_| ())
                    } else {
                        echo(r, w).await
                    }
                } else {
                    let (r, w) = s.into_split();
                    if bulk {
                        sink(r).await.map(|_| ())
                    } else {
                        echo(r, w).await
                    }
                }
            });
            let out = cli.block_on(async move {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let t = Instant::now();
                if tls {
                    let name = ServerName::try_from("localhost")?;
                    let s = tokio_rustls::TlsConnector::from(ccfg)
                        .connect(name, s)
                        .await?;
                    let (r, w) = tokio::io::split(s);
                    if bulk {
                        let n = send_bulk(w, secs).await?;
                        // Read what the server sent (its session tickets) until it closes, so
                        // no unread byte turns the close into a reset.
                        let _ = sink(r).await;
                        Ok::<f64, anyhow::Error>(n as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
                    } else {
                        ping(r, w, secs).await
                    }
                } else {
                    let (r, w) = s.into_split();
                    if bulk {
                        let n = send_bulk(w, secs).await?;
                        Ok(n as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
                    } else {
                        ping(r, w, secs).await
                    }
                }
            })?;
            srv.block_on(server)??;
            Ok(out)
        }
        Kind::Quic(upper) => {
            // The tunnel's settings: the gateway (here the QUIC server) opens the stream and
            // sends, the agent (the client) reads, as a `forward` caller's bytes flow.
            let (scfg, ccfg) = tls_configs(pki, tunnel_proto::ALPN)?;
            let mut server =
                quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(scfg)?));
            let mut t = quinn::TransportConfig::default();
            t.max_concurrent_bidi_streams(1u32.into());
            t.max_concurrent_uni_streams(0u32.into());
            t.stream_receive_window(tether_gateway::tunnel::tls::STREAM_WINDOW.into());
            t.receive_window(tether_gateway::tunnel::tls::CONNECTION_WINDOW.into());
            t.send_window(tether_gateway::tunnel::tls::SEND_WINDOW);
            let mtu = |t: &mut quinn::TransportConfig| {
                let mut m = quinn::MtuDiscoveryConfig::default();
                m.upper_bound(upper);
                t.mtu_discovery_config(Some(m));
            };
            mtu(&mut t);
            server.transport_config(Arc::new(t));
            let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(ccfg)?));
            let mut t = quinn::TransportConfig::default();
            t.max_concurrent_bidi_streams(1024u32.into());
            t.max_concurrent_uni_streams(0u32.into());
            mtu(&mut t);
            client.transport_config(Arc::new(t));
            let ep = {
                let _g = srv.enter();
                quinn::Endpoint::server(server, SocketAddr::from(([127, 0, 0, 1], 0)))?
            };
            let addr = ep.local_addr()?;
            let server = srv.spawn(async move {
                let conn = ep.accept().await.context("no connection")?.await?;
                let (mut w, r) = conn.open_bi().await?;
                if bulk {
                    let t = Instant::now();
                    let n = send_bulk(&mut w, secs).await?;
                    // Until the reader has it all.
                    let _ = conn.closed().await;
                    Ok::<f64, anyhow::Error>(n as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
                } else {
                    let v = ping(r, w, secs).await?;
                    conn.close(0u32.into(), b"done");
                    Ok(v)
                }
            });
            cli.block_on(async move {
                let ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                let conn = ep.connect_with(client, addr, "localhost")?.await?;
                let (w, r) = conn.accept_bi().await?;
                if bulk {
                    sink(r).await?;
                    conn.close(0u32.into(), b"done");
                } else {
                    echo(r, w).await?;
                }
                ep.wait_idle().await;
                Ok::<(), anyhow::Error>(())
            })?;
            srv.block_on(server)?
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args
        .next()
        .map_or(Ok(3.0), |s| s.parse())
        .context("SECONDS")?;
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse()).context("ROUNDS")?;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = pki()?;
    let (srv, cli) = (runtime(), runtime());
    let kinds = [
        ("tcp", Kind::Tcp),
        ("tls", Kind::Tls),
        ("quic", Kind::Quic(1452)),
        ("quic, MTU discovery to 8952", Kind::Quic(8952)),
    ];
    let mut bulk = vec![Vec::new(); kinds.len()];
    let mut lat = vec![Vec::new(); kinds.len()];
    for r in 0..rounds {
        for (i, (_, k)) in kinds.iter().enumerate() {
            bulk[i].push(measure(*k, true, secs, &pki, &srv, &cli)?);
            lat[i].push(measure(*k, false, secs, &pki, &srv, &cli)?);
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    let (bt, lt) = (median(&mut bulk[0].clone()), median(&mut lat[0].clone()));
    println!("transport ceilings, one stream, {rounds} interleaved rounds of {secs} s, medians");
    for (i, (name, _)) in kinds.iter().enumerate() {
        let b = median(&mut bulk[i]);
        let l = median(&mut lat[i]);
        println!(
            "{name:28} bulk {b:7.3} Gbit/s ({:.3}x tcp)   64 B half round trip p50 {l:7.1} us (+{:.1} us over tcp)   rounds {:?} / {:?}",
            b / bt,
            l - lt,
            bulk[i]
                .iter()
                .map(|x| (x * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            lat[i]
                .iter()
                .map(|x| (x * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
        );
    }
    Ok(())
}
