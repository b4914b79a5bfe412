//! The northbound port against callers that only want to hold it (issue 15, finding 5):
//! connections are capped per source address and in total, and the refusals counted, while a
//! caller from elsewhere stays served; a connection whose caller never authenticates is closed
//! at `limits.northbound_unauthenticated_timeout`, also when certificates are optional (bearer
//! tokens on); and a gateway out of file descriptors neither spins nor floods its log, and
//! serves again once connections go.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_api::v1::ListAgentsRequest;
use tether_api::v1::agents_client::AgentsClient;
use tether_e2e::*;
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(20);

fn rejections(limit: &str) -> f64 {
    metric("tether_gateway_limit_rejections_total", &[("limit", limit)])
}

fn idle_timeouts(place: &str) -> f64 {
    metric("tether_gateway_idle_timeouts_total", &[("where", place)])
}

fn client_tls(files: &CertFiles, with_cert: bool) -> Arc<rustls::ClientConfig> {
    let roots = tether_runtime::tls::load_roots(&files.ca).unwrap();
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut tls = if with_cert {
        b.with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).unwrap(),
            tether_runtime::tls::load_key(&files.key).unwrap(),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    };
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(tls)
}

/// A TCP connection to `to` from local address `from`.
async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(to).await
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS to the northbound listener from `from`; an error when the gateway closed the
/// connection instead.
async fn tls_from(
    from: IpAddr,
    to: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Tls, String> {
    let tcp = tcp_from(from, to).await.map_err(|e| format!("TCP: {e}"))?;
    let connect =
        tokio_rustls::TlsConnector::from(tls.clone()).connect("localhost".try_into().unwrap(), tcp);
    match tokio::time::timeout(T, connect).await {
        Ok(r) => r.map_err(|e| format!("TLS: {e}")),
        Err(_) => Err("TLS did not finish".into()),
    }
}

/// Reads `r` until the peer closes it; how long that took from `start`.
async fn closed_after(mut r: impl tokio::io::AsyncRead + Unpin, start: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(T, read_all)
        .await
        .expect("the gateway closed the connection");
    start.elapsed()
}

async fn list_agents(gw: &TestGateway, pki: &Pki) -> Result<(), String> {
    let ch = gw.channel(&pki.client("api")).await?;
    AgentsClient::new(ch)
        .list(ListAgentsRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn northbound_connections_are_capped_per_address_and_in_total_and_others_stay_served() {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.limits.northbound_connections_per_address = 8;
    cfg.limits.northbound_connections = 12;
    // Held connections must outlive the test's steps.
    cfg.limits.northbound_unauthenticated_timeout = Duration::from_secs(120);
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let nb = gw.handle.northbound_addr;
    let tls = client_tls(&pki.client("api"), true);
    let one: IpAddr = [127, 0, 0, 2].into();
    let other: IpAddr = [127, 0, 0, 3].into();

    // Idle TLS connections from one address: eight get through, the rest are closed at once.
    let before = rejections("northbound_connections_per_address");
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match tls_from(one, nb, &tls).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (8, 12));
    assert_eq!(
        rejections("northbound_connections_per_address"),
        before + 12.0
    );
    // A caller from another address is served meanwhile (its connection is the ninth).
    let mut caller = AgentsClient::new(gw.channel(&pki.client("api")).await.unwrap());
    caller
        .list(ListAgentsRequest::default())
        .await
        .expect("a caller from 127.0.0.1 is served");

    // Across addresses the total holds: 9 open, 3 more fit.
    let before = rejections("northbound_connections");
    let mut refused = 0;
    for _ in 0..8 {
        match tls_from(other, nb, &tls).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (11, 5));
    assert_eq!(rejections("northbound_connections"), before + 5.0);
    assert!(
        list_agents(&gw, &pki).await.is_err(),
        "a connection beyond limits.northbound_connections is refused"
    );
    caller
        .list(ListAgentsRequest::default())
        .await
        .expect("a caller connected before keeps being served");

    // Connections that go free their slots.
    drop(held);
    let deadline = Instant::now() + T;
    while let Err(e) = list_agents(&gw, &pki).await {
        assert!(Instant::now() < deadline, "still refused: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

/// A JWKS file with one ES256 key, so the northbound accepts bearer tokens and no longer
/// requires a client certificate.
fn jwks_file(dir: &std::path::Path) -> std::path::PathBuf {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der());
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let set = jsonwebtoken::jwk::JwkSet { keys: vec![jwk] };
    let path = dir.join("jwks.json");
    std::fs::write(&path, serde_json::to_string(&set).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_caller_never_authenticates_is_closed_at_the_short_timeout() {
    const SHORT: Duration = Duration::from_secs(2);
    // Scheduling slack on a loaded machine, plus the 1 s a GOAWAY gets to finish.
    const MARGIN: Duration = Duration::from_secs(5);
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    let jwks = jwks_file(pki.dir.path());
    cfg.auth = Some(
        toml::from_str(&format!(
            "jwks_file = {:?}\nissuer = \"https://idp.test/\"\naudience = \"tether-gateway\"\n\
             [[callers]]\nname = \"api\"\ntenants = [\"*\"]\n",
            jwks.display().to_string()
        ))
        .unwrap(),
    );
    cfg.limits.northbound_unauthenticated_timeout = SHORT;
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let nb = gw.handle.northbound_addr;
    let local: IpAddr = [127, 0, 0, 1].into();
    let anonymous = client_tls(&pki.client("api"), false);
    let before = idle_timeouts("northbound_unauthenticated");

    // No certificate (tokens are on, so TLS lets it in), and nothing sent.
    let start = Instant::now();
    let tls = tls_from(local, nb, &anonymous)
        .await
        .expect("TLS without a certificate");
    let took = closed_after(tls, start).await;
    assert!(
        took >= SHORT && took < SHORT + MARGIN,
        "silent connection closed after {took:?}"
    );
    wait_until("counted", T, || {
        idle_timeouts("northbound_unauthenticated") == before + 1.0
    })
    .await;

    // No certificate, and calls without credentials, one after another: each is
    // UNAUTHENTICATED, and none keeps the connection open past the short timeout.
    let start = Instant::now();
    let tls = tls_from(local, nb, &anonymous).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.expect("h2");
    let conn = tokio::spawn(conn);
    let mut statuses = Vec::new();
    loop {
        let req = http::Request::post("https://localhost/tether.v1.Agents/List")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let Ok(mut ready) = client.clone().ready().await else {
            break;
        };
        let Ok((resp, mut body)) = ready.send_request(req, false) else {
            break;
        };
        let _ = body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        let Ok(resp) = resp.await else { break };
        statuses.push(
            resp.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        assert!(
            start.elapsed() < SHORT + MARGIN,
            "still open after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.await;
    let took = start.elapsed();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|s| s.as_deref() == Some("16")),
        "every call UNAUTHENTICATED: {statuses:?}"
    );
    assert!(
        took >= SHORT && took < SHORT + MARGIN,
        "calling without credentials, closed after {took:?}"
    );
    wait_until("counted", T, || {
        idle_timeouts("northbound_unauthenticated") == before + 2.0
    })
    .await;

    // A caller that authenticated keeps its connection past the short timeout (only the
    // 5-minute idle timeout applies to it): a silent connection opened after its call is
    // closed, and the caller's is not.
    let mut agents = gw.client(&pki, "api").await;
    agents
        .list(ListAgentsRequest::default())
        .await
        .expect("authenticated call");
    let start = Instant::now();
    let silent = tls_from(local, nb, &anonymous).await.unwrap();
    closed_after(silent, start).await;
    wait_until("counted", T, || {
        idle_timeouts("northbound_unauthenticated") == before + 3.0
    })
    .await;
    agents
        .list(ListAgentsRequest::default())
        .await
        .expect("the authenticated connection still serves");
    assert_eq!(
        idle_timeouts("northbound_unauthenticated"),
        before + 3.0,
        "the authenticated caller's connection was not closed as unauthenticated"
    );
    gw.stop().await;
}

// === Out of file descriptors ===

/// File descriptors the gateway process may hold (`prlimit --nofile`, soft and hard).
const NOFILE: u64 = 96;

/// Warnings about failed accepts in a gateway's JSON log.
fn accept_warnings(logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("\"WARN\"") && l.to_lowercase().contains("accept"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_gateway_neither_spins_nor_floods_its_log_and_recovers() {
    let pki = Pki::new();
    // Connections held in TLS for the whole test: only their number matters.
    let gw = GatewayProcess::spawn_limited(
        &pki,
        "[limits]\nnorthbound_handshake_timeout = \"300s\"\n",
        NOFILE,
    )
    .await;
    let pid = gw.pid();
    let idle_fds = open_fds(pid);
    assert!(
        idle_fds + 16 < NOFILE as usize,
        "the gateway holds {idle_fds} descriptors idle: raise NOFILE"
    );

    // Take every descriptor left through the northbound port, then queue more on every
    // listener: each accept loop has a connection waiting that it cannot take.
    let mut held = Vec::new();
    let deadline = Instant::now() + T;
    while open_fds(pid) < NOFILE as usize {
        assert!(
            Instant::now() < deadline,
            "the gateway never ran out of descriptors"
        );
        held.push(tokio::net::TcpStream::connect(gw.northbound).await.unwrap());
        let want = held.len() + idle_fds;
        // Wait for it to be accepted (or for the limit), so the count is the gateway's.
        let taken = Instant::now() + Duration::from_secs(5);
        while open_fds(pid) < want.min(NOFILE as usize) && Instant::now() < taken {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for to in [gw.northbound, gw.ops, gw.tunnel] {
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(to).await.unwrap());
        }
    }

    // A window of starvation: the process stays nearly idle and its log nearly silent.
    const WINDOW: Duration = Duration::from_secs(4);
    let (cpu0, logs0) = (cpu_ticks(pid), accept_warnings(&gw.logs()).len());
    tokio::time::sleep(WINDOW).await;
    let (cpu1, logs1) = (cpu_ticks(pid), accept_warnings(&gw.logs()).len());
    // Linux reports CPU time in USER_HZ, which is 100 on every architecture it runs on.
    let cpu = Duration::from_millis((cpu1 - cpu0) * 10);
    let warnings = accept_warnings(&gw.logs());
    eprintln!(
        "out of descriptors ({} held by the test): gateway CPU {cpu:?} in {WINDOW:?}; \
         {} accept warnings in the window, {} in all; first: {}",
        held.len(),
        logs1 - logs0,
        warnings.len(),
        warnings.first().map(String::as_str).unwrap_or("none")
    );
    assert!(
        cpu < WINDOW / 5,
        "the gateway used {cpu:?} of CPU in {WINDOW:?} while out of descriptors"
    );
    assert!(
        logs1 - logs0 <= 3,
        "{} accept warnings in {WINDOW:?}",
        logs1 - logs0
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("northbound") && w.contains("limits.northbound_connections")),
        "the northbound warning says what to do: {warnings:?}"
    );

    // The connections go: the gateway serves again.
    drop(held);
    let api = pki.client("api");
    let deadline = Instant::now() + T;
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            let ch = tether_gateway::tools::ctl::connect(&tether_gateway::tools::ctl::Target {
                addr: gw.northbound.to_string(),
                ca: api.ca.clone(),
                cert: api.cert.clone(),
                key: api.key.clone(),
                server_name: Some("localhost".into()),
            })
            .await?;
            AgentsClient::new(ch)
                .list(ListAgentsRequest::default())
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        if matches!(ok, Ok(Ok(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "not served again: {ok:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) =
        tether_runtime::ops::probe(gw.ops, "/healthz", Duration::from_secs(5)).expect("ops");
    assert_eq!(status, 200);
    wait_until("recovery logged", T, || {
        gw.logs().contains("accepting connections again")
    })
    .await;
}
