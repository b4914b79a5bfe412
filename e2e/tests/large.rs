//! Large messages are streamed, not buffered: once a first 64 MiB server stream through real
//! gateway and agent processes has brought them to their working set, a second raises neither's
//! RSS by more than a few MiB, and a slow caller slows the upstream instead of growing buffers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_agent::config::ServiceKind;
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_e2e::*;
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(60);
const MSG: u32 = 64 * 1024;
const COUNT: u32 = 1024; // 64 MiB

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_server_stream_raises_neither_gateway_nor_agent_rss_by_more_than_a_few_mib()
{
    let pki = Pki::new();
    let gw = GatewayProcess::spawn(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/big"), gw.tunnel);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = AgentProcess::spawn(&cfg);
    let ch = gw.channel(&pki.client("api")).await;
    let mut echo = EchoClient::with_interceptor(ch, Route::new(Some("acme/big"), None))
        .max_decoding_message_size(1 << 20);
    // Connected and warmed up: the first relayed stream allocates what every stream shares.
    let warm = EchoRequest {
        message: "w".into(),
        repeat: 32,
        size: MSG,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + T;
    loop {
        match echo.server_stream(warm.clone()).await {
            Ok(s) => {
                let n = s.into_inner().collect::<Vec<_>>().await.len();
                assert_eq!(n, 32);
                break;
            }
            Err(e) if e.code() == tonic::Code::NotFound || e.code() == tonic::Code::Unavailable => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "agent never connected: {e:?}"
                );
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let (gpid, apid) = (gw.pid(), agent.pid());
    // The first slow stream brings each process to its working set for this traffic: the
    // allocator's high-water mark for the chunks in flight, QUIC's receive batches, h2's send
    // buffers. The second must stay within a few MiB of that: what a stream holds is bounded
    // by flow-control windows, not by how much the upstream got ahead of the caller.
    let first = slow_stream(&mut echo, gpid, apid).await;
    eprintln!(
        "first 64 MiB stream: gateway RSS {} -> peak {} KiB, agent {} -> peak {} KiB",
        first.base.0, first.peak.0, first.base.1, first.peak.1
    );
    assert!(
        first.growth().0 < 32 * 1024 && first.growth().1 < 32 * 1024,
        "a 64 MiB stream is buffered, not streamed: {first:?}"
    );
    let second = slow_stream(&mut echo, gpid, apid).await;
    let growth = (
        second
            .peak
            .0
            .saturating_sub(first.peak.0.max(second.base.0)),
        second
            .peak
            .1
            .saturating_sub(first.peak.1.max(second.base.1)),
    );
    eprintln!(
        "RSS growth during a second 64 MiB stream, above the first's peak: gateway {} KiB, agent {} KiB ({second:?})",
        growth.0, growth.1
    );
    assert!(growth.0 < 8 * 1024, "gateway RSS grew {} KiB", growth.0);
    assert!(growth.1 < 8 * 1024, "agent RSS grew {} KiB", growth.1);
}

/// RSS of the gateway and the agent (KiB) before and at the peak of one stream.
#[derive(Debug)]
struct Rss {
    base: (u64, u64),
    peak: (u64, u64),
}

impl Rss {
    fn growth(&self) -> (u64, u64) {
        (
            self.peak.0.saturating_sub(self.base.0),
            self.peak.1.saturating_sub(self.base.1),
        )
    }
}

/// A 64 MiB server stream read by a caller slower than the tunnel, with the processes' RSS
/// sampled every 20 ms.
async fn slow_stream<T>(echo: &mut EchoClient<T>, gpid: u32, apid: u32) -> Rss
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let base = (rss_kib(gpid), rss_kib(apid));
    let peak = Arc::new(std::sync::Mutex::new(base));
    let stop = tether_runtime::CancellationToken::new();
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.is_cancelled() {
                tick.tick().await;
                let mut p = peak.lock().unwrap();
                p.0 = p.0.max(rss_kib(gpid));
                p.1 = p.1.max(rss_kib(apid));
            }
        })
    };
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "big".into(),
            repeat: COUNT,
            size: MSG,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = 0u64;
    let mut n = 0;
    while let Some(m) = stream.next().await {
        bytes += m.unwrap().payload.len() as u64;
        n += 1;
        if n % 64 == 0 {
            // A caller slower than the tunnel: buffers must not absorb the difference.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.cancel();
    sampler.await.unwrap();
    assert_eq!(bytes, u64::from(MSG) * u64::from(COUNT));
    let peak = *peak.lock().unwrap();
    Rss { base, peak }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_caller_stops_the_upstream_within_a_bounded_window() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/slow"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/slow") == 1).await;
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/slow"), None)).await;
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "p".into(),
            repeat: COUNT,
            size: MSG,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    // Paused. Watch the upstream for a while: with end-to-end flow control it stalls once the
    // windows on the way (h2 upstream, QUIC, h2 to the caller) are full, far short of 64 MiB.
    let sent = &upstream.observed.sent;
    let window_end = std::time::Instant::now() + Duration::from_secs(2);
    let mut max_ahead = 0;
    while std::time::Instant::now() < window_end {
        max_ahead = max_ahead.max(sent.load(Ordering::SeqCst).saturating_sub(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "upstream got {max_ahead} messages ({} KiB) ahead of a paused caller",
        max_ahead * u64::from(MSG) / 1024
    );
    assert!(
        max_ahead < 256,
        "upstream ran {max_ahead} messages ahead: buffers are absorbing the stream"
    );
    // Resuming drains everything.
    let rest = stream.collect::<Vec<_>>().await;
    assert_eq!(rest.len() as u32, COUNT - 10);
    assert_eq!(sent.load(Ordering::SeqCst), u64::from(COUNT));
    agent.stop().await;
    gw.stop().await;
}
