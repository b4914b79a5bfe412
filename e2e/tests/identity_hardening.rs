//! Issue 15's identity, enrollment and northbound-auth findings, each attack run against a real
//! gateway: random tenants in relay metadata do not grow `/metrics` (3); idle enrollment
//! connections from one address do not keep a real agent out (4); `CreateToken` is capped per
//! agent and rate-limited per caller (7); the northbound TLS never resumes a session, and a
//! revoked caller certificate is refused on its next call with its open connection closed,
//! also after a restart (9); the data directory and its files are private to the gateway's
//! user (10).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_agent::enroll::EnrollClient;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::agents_client::AgentsClient;
use tether_api::v1::callers_client::CallersClient;
use tether_api::v1::enrollment_client::EnrollmentClient;
use tether_api::v1::{
    CreateTokenRequest, ListAgentsRequest, RevokeCallerRequest, WatchAgentsRequest,
};
use tether_e2e::*;
use tonic::Code;

const T: Duration = Duration::from_secs(20);

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// `[auth]`: `admin` acts for every tenant, the others for `acme` only.
const AUTH: &str = "[auth]\n\
    [[auth.callers]]\nname = \"admin\"\ntenants = [\"*\"]\n\
    [[auth.callers]]\nname = \"acme-app\"\ntenants = [\"acme\"]\n\
    [[auth.callers]]\nname = \"victim\"\ntenants = [\"acme\"]\n\
    [[auth.callers]]\nname = \"second\"\ntenants = [\"acme\"]\n";

/// `/metrics` of a gateway process, whole (an HTTP/1.0 GET read to the end).
fn scrape(ops: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(ops).expect("ops");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).expect("metrics");
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    body.to_owned()
}

/// The series (label sets) of `name` in a `/metrics` text.
fn series<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(s, _)| s))
        .filter(|s| s.split('{').next() == Some(name))
        .collect()
}

/// A pseudo-random lowercase name of `len` characters (SplitMix64; no dependency).
fn name(seed: u64, len: usize) -> String {
    let mut z = seed;
    (0..len)
        .map(|_| {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (b'a' + ((x ^ (x >> 31)) % 26) as u8) as char
        })
        .collect()
}

async fn echo_with_agent(
    echo: &mut EchoClient<tonic::transport::Channel>,
    agent: &str,
) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(echo_req("hi"));
    req.metadata_mut()
        .insert("tether-agent", agent.parse().expect("ascii metadata"));
    echo.unary(req).await.map(|_| ())
}

// === Finding 3: metric series from caller input ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tenants_in_relay_metadata_do_not_grow_the_metrics() {
    // Rounds of three refused calls; TETHER_E2E_ATTACK_ROUNDS makes it larger for a
    // measurement (docs/PERFORMANCE.md).
    let calls: u64 = std::env::var("TETHER_E2E_ATTACK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let pki = Pki::new();
    let gw = GatewayProcess::spawn_configured(&pki, AUTH).await;
    let upstream = DemoUpstream::start().await;
    let mut acfg = agent_config(&pki.agent("acme/a"), gw.tunnel);
    with_service(&mut acfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&acfg);
    let admin = gw.channel(&pki.client("admin")).await;
    wait_connected(admin.clone(), "acme/a", T).await;
    let mut as_admin = EchoClient::new(admin);
    let mut as_acme = EchoClient::new(gw.channel(&pki.client("acme-app")).await);
    // A real call first: its tenant is a label, as it should be.
    echo_with_agent(&mut as_admin, "acme/a")
        .await
        .expect("relayed");
    let before = scrape(gw.ops);
    let series_before = series(&before, "tether_gateway_relay_calls_total").len();
    let rss_before = rss_kib(gw.pid());

    for i in 0..calls {
        // Malformed: an 8 KB tenant (INVALID_ARGUMENT).
        let e = echo_with_agent(&mut as_admin, &format!("{}/a", name(i, 8 << 10)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        // Well-formed, unknown to the gateway (NOT_FOUND).
        let e = echo_with_agent(&mut as_admin, &format!("{}/a", name(i + calls, 40)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        // Another tenant than the caller's (PERMISSION_DENIED).
        let e = echo_with_agent(&mut as_acme, &format!("{}/a", name(i + 2 * calls, 40)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }

    let after = scrape(gw.ops);
    let rss_after = rss_kib(gw.pid());
    let relay_series = series(&after, "tether_gateway_relay_calls_total");
    eprintln!(
        "{} refused calls with random tenants: relay_calls_total series {} -> {}, /metrics {} -> {} bytes, gateway RSS {} -> {} KiB",
        3 * calls,
        series_before,
        relay_series.len(),
        before.len(),
        after.len(),
        rss_before,
        rss_after
    );
    for s in &relay_series {
        assert!(
            s.contains("tenant=\"acme\"") || s.contains("tenant=\"-\""),
            "a label from caller input: {s:.200}"
        );
    }
    // At most one series per refusal code, whatever the number of tenants tried.
    assert!(
        relay_series.len() <= series_before + 3,
        "{} series after {} calls",
        relay_series.len(),
        3 * calls
    );
    assert!(
        after.len() < before.len() + 4096,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    agent.stop().await;
}

// === Finding 4: enrollment slots ===

/// A gateway that can enroll agents (its CA key configured).
async fn enrolling_gateway(
    pki: &Pki,
    edit: impl FnOnce(&mut tether_gateway::GatewayConfig),
) -> TestGateway {
    let mut cfg = TestGateway::config(pki);
    cfg.enrollment.ca_key = Some(pki.dir.path().join("ca-key.pem"));
    edit(&mut cfg);
    TestGateway::start_with(cfg, any()).await
}

/// A TLS connection to the enrollment side door from `from`, handshake done, sending nothing;
/// `None` when the gateway refused it before or during TLS.
async fn idle_enroll_connection(
    to: SocketAddr,
    from: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap())
        .expect("bind (127.0.0.2 is loopback on Linux)");
    let tcp = sock.connect(to).await.ok()?;
    let connect =
        tokio_rustls::TlsConnector::from(tls).connect("localhost".try_into().unwrap(), tcp);
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .ok()?
        .ok()
}

/// Waits until the peer closes `s` (or `limit` passes); how long it took.
async fn closed_within(
    mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_enrollment_connections_from_one_address_do_not_keep_a_real_agent_out() {
    const IDLE: usize = 100;
    let pki = Pki::new();
    let gw = enrolling_gateway(&pki, |_| {}).await;
    let tunnel = gw.handle.tunnel_addr;
    let roots = tether_runtime::tls::load_roots(&pki.dir.path().join("ca.pem")).unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tether_gateway::identity::enrollment::ENROLL_ALPN.to_vec()];
    let tls = Arc::new(tls);

    // The attack: idle enrollment connections from one address, TLS done, never a request.
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        if let Some(c) = idle_enroll_connection(tunnel, "127.0.0.2", tls.clone()).await {
            idle.push(c);
        }
    }
    eprintln!(
        "{} of {IDLE} idle enrollment connections from 127.0.0.2 finished TLS",
        idle.len()
    );

    // A real agent's enrollment client, from another address, with a valid token.
    let token = EnrollmentClient::new(gw.channel(&pki.client("ops")).await.unwrap())
        .create_token(CreateTokenRequest {
            tenant: "acme".into(),
            agent: "new".into(),
            ttl: None,
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let state = tempfile::tempdir().unwrap();
    let acfg: tether_agent::AgentConfig = toml::from_str(&format!(
        "gateways = [\"{tunnel}\"]\nserver_name = \"localhost\"\nstate_dir = \"{}\"\n[tls]\nca = \"{}\"\n",
        state.path().display(),
        pki.dir.path().join("ca.pem").display()
    ))
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let enrolled = EnrollClient::new(&acfg)
        .unwrap()
        .enroll(&tunnel.to_string(), &token, &csr)
        .await
        .expect("the real agent enrolls while the idle connections are open");
    assert_eq!(enrolled.agent, "acme/new");

    // The idle ones are closed at the first-request deadline, not kept for a lifetime.
    let deadline =
        tether_gateway::identity::endpoint::FIRST_REQUEST_TIMEOUT + Duration::from_secs(8);
    let n = idle.len();
    for c in idle {
        let left = deadline.saturating_sub(started.elapsed()) + Duration::from_secs(1);
        assert!(
            closed_within(c, left).await.is_some(),
            "an idle enrollment connection outlived the first-request deadline"
        );
    }
    let share = tether_gateway::identity::endpoint::CONNECTIONS_PER_ADDRESS;
    assert!(
        n <= share,
        "{n} idle connections of one address were served (share {share})"
    );
    gw.stop().await;
}

// === Finding 7: CreateToken caps ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_token_beyond_the_pending_cap_or_the_callers_rate_is_resource_exhausted() {
    let pki = Pki::new();
    let extra = format!(
        "[enrollment]\nca_key = \"{}\"\n[limits]\npending_tokens_per_agent = 2\ntoken_creations_per_minute = 5\n",
        pki.dir.path().join("ca-key.pem").display()
    );
    let gw = GatewayProcess::spawn_configured(&pki, &extra).await;
    let rejections = |limit: &str| {
        series(&scrape(gw.ops), "tether_gateway_limit_rejections_total")
            .iter()
            .filter(|s| s.contains(&format!("limit=\"{limit}\"")))
            .count()
    };
    let mut ops = EnrollmentClient::new(gw.channel(&pki.client("ops")).await);
    let create = |agent: &str| CreateTokenRequest {
        tenant: "acme".into(),
        agent: agent.into(),
        ttl: None,
    };
    ops.create_token(create("a")).await.expect("first");
    ops.create_token(create("a")).await.expect("second");
    let e = ops.create_token(create("a")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("limits.pending_tokens_per_agent"),
        "{e:?}"
    );
    assert_eq!(rejections("pending_tokens_per_agent"), 1);
    // Another agent is not held back by the cap; the caller's rate is (5 calls a minute).
    ops.create_token(create("b")).await.expect("another agent");
    ops.create_token(create("c")).await.expect("another agent");
    let e = ops.create_token(create("d")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("limits.token_creations_per_minute"),
        "{e:?}"
    );
    assert_eq!(rejections("token_creations_per_minute"), 1);
    // Another caller has its own rate.
    EnrollmentClient::new(gw.channel(&pki.client("ops2")).await)
        .create_token(create("d"))
        .await
        .expect("another caller");
}

// === Finding 9: northbound resumption and caller revocation ===

/// A TLS client config with a client certificate and rustls's default session cache.
fn caller_tls(files: &CertFiles) -> Arc<rustls::ClientConfig> {
    let roots = tether_runtime::tls::load_roots(&files.ca).unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).unwrap(),
            tether_runtime::tls::load_key(&files.key).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(tls)
}

/// Connects with `tls`, makes one `Agents/List` call (which reads whatever session tickets
/// the gateway sends), and says how the handshake went.
async fn connect_and_call(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> rustls::HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS");
    let kind = stream.get_ref().1.handshake_kind().expect("handshake done");
    let (mut client, conn) = h2::client::handshake(stream).await.expect("h2");
    let conn = tokio::spawn(conn);
    let req = http::Request::post("https://localhost/tether.v1.Agents/List")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(vec![0u8, 0, 0, 0, 0].into(), true).unwrap();
    let resp = resp.await.expect("response");
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("body");
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    drop(client);
    conn.abort();
    kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_northbound_connection_gets_a_full_handshake_not_a_resumed_session() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let tls = caller_tls(&pki.client("api"));
    let first = connect_and_call(gw.handle.northbound_addr, tls.clone()).await;
    let second = connect_and_call(gw.handle.northbound_addr, tls).await;
    assert_eq!(first, rustls::HandshakeKind::Full);
    assert_eq!(
        second,
        rustls::HandshakeKind::Full,
        "the client resumed: its certificate was not checked again"
    );
    gw.stop().await;
}

async fn scoped_gateway(pki: &Pki, data: &Path) -> GatewayProcess {
    GatewayProcess::spawn_configured_in(pki, data, AUTH).await
}

fn fingerprint(files: &CertFiles) -> String {
    let der = tether_runtime::tls::load_certs("cert", &files.cert).unwrap();
    tether_runtime::digest::sha256_hex(der[0].as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_caller_is_refused_on_its_next_call_and_its_open_connection_closed() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = scoped_gateway(&pki, data.path()).await;
    let victim_files = pki.client("victim");
    let victim = gw.channel(&victim_files).await;
    let mut victim_agents = AgentsClient::new(victim.clone());
    victim_agents
        .list(ListAgentsRequest::default())
        .await
        .expect("the victim calls before its revocation");
    // A long-lived call open on the victim's connection.
    let mut watch = victim_agents
        .watch(WatchAgentsRequest::default())
        .await
        .expect("watch")
        .into_inner();

    // A caller scoped to some tenants may not revoke callers.
    let mut scoped = CallersClient::new(gw.channel(&pki.client("acme-app")).await);
    let e = scoped
        .revoke(RevokeCallerRequest {
            name: "victim".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let mut admin = CallersClient::new(gw.channel(&pki.client("admin")).await);
    let r = admin
        .revoke(RevokeCallerRequest {
            name: "victim".into(),
            reason: "key leaked".into(),
            ..Default::default()
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(r.connections_closed, 1, "{r:?}");
    assert_eq!(r.closed_fingerprints, vec![fingerprint(&victim_files)]);
    // The open call ends with its connection.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the revoked caller's watch is still open");
    // Its next call, on a new connection, is refused.
    let e = victim_agents
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    let e = if e.code() == Code::Unavailable {
        // The client may see its closed connection once before it reconnects.
        victim_agents
            .list(ListAgentsRequest::default())
            .await
            .unwrap_err()
    } else {
        e
    };
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("key leaked"), "{e:?}");

    // By fingerprint, with tetherctl: that certificate only; a new one of the same caller works.
    let second_files = pki.client("second");
    let mut second = AgentsClient::new(gw.channel(&second_files).await);
    second
        .list(ListAgentsRequest::default())
        .await
        .expect("before");
    let admin_files = pki.client("admin");
    let out = tokio::process::Command::new(binary("tetherctl"))
        .arg("--northbound")
        .arg(gw.northbound.to_string())
        .arg("--ca")
        .arg(&admin_files.ca)
        .arg("--cert")
        .arg(&admin_files.cert)
        .arg("--key")
        .arg(&admin_files.key)
        .args([
            "--server-name",
            "localhost",
            "callers",
            "revoke",
            "--fingerprint",
        ])
        .arg(fingerprint(&second_files))
        .args(["--reason", "rotated"])
        .output()
        .await
        .expect("tetherctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its open connection is among those closed (the victim's reconnected one may be too).
    assert!(
        stdout.contains(&format!(
            "closed a connection of certificate sha256:{}",
            fingerprint(&second_files)
        )),
        "{stdout}"
    );
    let refused = AgentsClient::new(gw.channel(&second_files).await)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    AgentsClient::new(gw.channel(&pki.client("second")).await)
        .list(ListAgentsRequest::default())
        .await
        .expect("a new certificate of the caller works");

    // Durable: the same refusal after a restart on the same data_dir.
    let mut gw = gw;
    gw.child.kill().await.expect("stop the gateway");
    let gw = scoped_gateway(&pki, data.path()).await;
    let e = AgentsClient::new(gw.channel(&victim_files).await)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    drop(gw);
}

// === Finding 10: file permissions ===

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_its_files_are_private_also_when_an_older_gateway_left_them_open() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();

    // A new data_dir.
    let fresh = root.path().join("fresh");
    let gw = GatewayProcess::spawn_with(&pki, &fresh, any()).await;
    assert_eq!(mode(&fresh), 0o700);
    for f in ["commands.redb", "identity.redb", "quic-reset-key"] {
        assert_eq!(mode(&fresh.join(f)), 0o600, "{f}");
    }
    drop(gw);

    // One an older gateway left world-readable.
    let old = root.path().join("old");
    std::fs::create_dir(&old).unwrap();
    drop(tether_gateway::identity::db::IdentityDb::open(&old).unwrap());
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = old.join("identity.redb");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let gw = GatewayProcess::spawn_with(&pki, &old, any()).await;
    assert_eq!(mode(&old), 0o700);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&old.join("commands.redb")), 0o600);
    let logs = gw.logs();
    assert!(
        logs.contains("tightened the permissions") && logs.contains("identity.redb"),
        "{logs}"
    );
}
