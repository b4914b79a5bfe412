//! `tether-agent doctor`, the network preflight, against real gateways and real broken networks
//! (network namespaces and nftables, Debian's tinyproxy, a TLS-inspecting proxy that re-signs
//! with its own CA, a clock ten minutes off through Debian's libfaketime): each fault is named,
//! and the exit code is 0 only when the agent can connect. And the agent's own preflight at
//! start, in `/readyz`'s state.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::AgentConfig;
use tether_e2e::netns::{Egress, Netns, Tinyproxy, Topology};
use tether_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

/// What `tether-agent doctor` printed and how it exited.
struct Doctor {
    code: Option<i32>,
    out: String,
}

impl Doctor {
    /// The line of check `name` (e.g. `quic`, the gateway's address omitted), or a panic
    /// showing the whole report.
    fn line(&self, name: &str) -> &str {
        self.out
            .lines()
            .find(|l| {
                let mut words = l.split_whitespace();
                let _verdict = words.next();
                let first = words.next().unwrap_or("");
                let second = words.next().unwrap_or("");
                first == name || (first.contains(':') && second == name)
            })
            .unwrap_or_else(|| panic!("no {name} line in the report:\n{}", self.out))
    }

    fn verdict(&self, name: &str) -> &str {
        self.line(name).split_whitespace().next().unwrap_or("")
    }
}

/// Runs `tether-agent doctor` on `cfg` (in `ns` when given; behind `wrapper`, e.g. faketime).
async fn doctor(
    cfg: &AgentConfig,
    ns: Option<&Netns>,
    wrapper: &[&str],
    env: &[(&str, &str)],
) -> Doctor {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
    let bin = binary("tether-agent");
    let (program, mut args): (std::ffi::OsString, Vec<std::ffi::OsString>) = match wrapper {
        [] => (bin.into(), Vec::new()),
        [w, rest @ ..] => {
            let mut a: Vec<std::ffi::OsString> = rest.iter().map(Into::into).collect();
            a.push(bin.into());
            ((*w).into(), a)
        }
    };
    args.extend(["doctor".into(), "--config".into(), path.into()]);
    let mut cmd = match ns {
        Some(ns) => ns.command(&program),
        None => tokio::process::Command::new(&program),
    };
    let o = tokio::time::timeout(
        T,
        cmd.args(&args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("doctor finishes")
    .unwrap_or_else(|e| panic!("run {program:?}: {e}"));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("--- doctor (exit {:?}):\n{out}", o.status.code());
    Doctor {
        code: o.status.code(),
        out,
    }
}

fn state_dir(mode: u32) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_against_a_working_gateway_and_names_each_broken_piece() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let files = pki.agent("acme/doc");
    let state = state_dir(0o700);
    let mut cfg = agent_config(&files, gw.handle.tunnel_addr);
    cfg.state_dir = Some(state.path().to_owned());

    // Everything works: each check ok, a session over both transports, the clock agrees.
    let d = doctor(&cfg, None, &[], &[]).await;
    assert_eq!(d.code, Some(0), "{}", d.out);
    for check in ["certificate", "state_dir", "dns", "quic", "tcp", "clock"] {
        assert_eq!(d.verdict(check), "ok", "{check}: {}", d.out);
    }
    assert!(d.line("certificate").contains("acme/doc"), "{}", d.out);
    assert!(d.line("quic").contains("session accepted"), "{}", d.out);
    assert!(d.line("tcp").contains("session accepted"), "{}", d.out);
    assert!(d.out.contains("result: the agent can connect"), "{}", d.out);
    // The doctor's sessions left at once: none stays behind.
    wait_until(
        "the doctor's sessions gone",
        Duration::from_secs(10),
        || gw.sessions_of("acme/doc") == 0,
    )
    .await;

    // A state_dir open to others: a warning, not a failure.
    let open = state_dir(0o755);
    let mut c = cfg.clone();
    c.state_dir = Some(open.path().to_owned());
    let d = doctor(&c, None, &[], &[]).await;
    assert_eq!(d.code, Some(0), "{}", d.out);
    assert_eq!(d.verdict("state_dir"), "WARN", "{}", d.out);
    assert!(d.line("state_dir").contains("chmod 700"), "{}", d.out);

    // Nothing listens there: said at once for UDP and TCP.
    let mut c = cfg.clone();
    c.gateways = vec![closed_port().to_string()];
    let d = doctor(&c, None, &[], &[]).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    assert!(
        d.line("quic").contains("nothing listens on UDP"),
        "{}",
        d.out
    );
    assert!(d.line("tcp").contains("connection refused"), "{}", d.out);
    assert!(d.out.contains("cannot connect to any gateway"), "{}", d.out);

    // A name that does not resolve.
    let mut c = cfg.clone();
    c.gateways = vec!["gateway.invalid:7443".into()];
    let d = doctor(&c, None, &[], &[]).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    assert_eq!(d.verdict("dns"), "FAIL", "{}", d.out);
    assert!(
        d.line("dns").contains("cannot resolve gateway.invalid"),
        "{}",
        d.out
    );

    // tls.ca of another PKI: the issuer presented and the CAs trusted are both named.
    let other = Pki::new();
    let mut c = cfg.clone();
    c.tls.ca = other.agent("acme/doc").ca;
    let d = doctor(&c, None, &[], &[]).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    for t in ["quic", "tcp"] {
        let l = d.line(t);
        assert!(
            l.contains("is issued by") && l.contains("not a CA in tls.ca"),
            "{t}: {}",
            d.out
        );
    }

    // A revoked agent: the network is fine, the gateway refuses the session, and says so.
    let mut agents = gw.client(&pki, "ops").await;
    agents
        .revoke(tether_api::v1::RevokeAgentRequest {
            agent: "acme/doc".into(),
            reason: "doctor test".into(),
        })
        .await
        .expect("revoke");
    let d = doctor(&cfg, None, &[], &[]).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    assert_eq!(d.verdict("quic"), "FAIL", "{}", d.out);
    assert!(
        d.line("quic").to_lowercase().contains("revoked"),
        "{}",
        d.out
    );

    // A config that does not parse: 64, the key named.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("agent.toml");
    std::fs::write(&bad, "gateways = 7\n").unwrap();
    let o = tokio::process::Command::new(binary("tether-agent"))
        .args(["doctor", "--config"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("gateways"),
        "{o:?}"
    );
    gw.stop().await;
}

/// An agent config for the data plane of `topo`, dialing `gw`.
fn dp_config(pki: &Pki, gw: SocketAddr, state: &std::path::Path) -> AgentConfig {
    let mut cfg = agent_config(&pki.agent("acme/net"), gw);
    cfg.state_dir = Some(state.to_owned());
    cfg.reconnect.connect_timeout = Duration::from_secs(2);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_blocked_udp_a_closed_network_and_a_proxy_that_wants_credentials() {
    let topo = Topology::new().unwrap_or_else(|e| panic!("{e:#}"));
    let pki = Pki::new();
    let gw = GatewayProcess::spawn_netns(
        &pki,
        &topo.cp,
        SocketAddr::new(topo.cp_addr.into(), 0),
        topo.api_addr.into(),
    )
    .await;
    let state = state_dir(0o700);
    let cfg = dp_config(&pki, gw.tunnel, state.path());

    // The firewall lets UDP and TCP to the gateway out: both work.
    topo.firewall(gw.tunnel).expect("firewall");
    let d = doctor(&cfg, Some(&topo.dp), &[], &[]).await;
    assert_eq!(d.code, Some(0), "{}", d.out);
    assert_eq!(d.verdict("quic"), "ok", "{}", d.out);
    assert_eq!(d.verdict("tcp"), "ok", "{}", d.out);

    // UDP dropped on the way: QUIC is named as blocked, TCP carries the agent (exit 0).
    topo.block_udp().expect("block UDP");
    let d = doctor(&cfg, Some(&topo.dp), &[], &[]).await;
    assert_eq!(d.code, Some(0), "{}", d.out);
    let quic = d.line("quic");
    assert!(
        quic.starts_with("FAIL") && quic.contains("no answer over UDP") && quic.contains("blocked"),
        "{}",
        d.out
    );
    assert_eq!(d.verdict("tcp"), "ok", "{}", d.out);
    assert!(d.out.contains("over tcp"), "{}", d.out);
    topo.unblock_udp().expect("unblock UDP");

    // Nothing allowed out: both named, exit 1.
    topo.firewall_egress(&[]).expect("firewall");
    let d = doctor(&cfg, Some(&topo.dp), &[], &[]).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    assert!(d.line("quic").contains("no answer over UDP"), "{}", d.out);
    assert!(d.line("tcp").contains("no answer over TCP"), "{}", d.out);

    // Only a proxy, which wants credentials: asked without, the proxy line says so; with
    // them, the agent connects through it.
    let dp_net = Ipv4Addr::from(u32::from(topo.dp_addr) & !3);
    let proxy = Tinyproxy::start(
        &topo.cp,
        SocketAddr::new(topo.cp_addr.into(), 0),
        &format!("{dp_net}/30"),
        gw.tunnel.port(),
        "tether",
        "s3cret",
    )
    .await
    .unwrap_or_else(|e| panic!("cannot start the HTTP CONNECT proxy: {e:#}"));
    topo.firewall_egress(&[Egress::Tcp(proxy.addr)])
        .expect("firewall");
    let mut c = cfg.clone();
    c.proxy.url = Some(format!("http://{}", proxy.addr));
    let d = doctor(&c, Some(&topo.dp), &[], &[]).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    let p = d.line("proxy");
    assert!(
        p.starts_with("FAIL") && p.contains("requires authentication"),
        "{}",
        d.out
    );
    c.proxy.url = Some(format!("http://tether:wrong@{}", proxy.addr));
    let d = doctor(&c, Some(&topo.dp), &[], &[]).await;
    assert!(
        d.line("proxy").contains("refused the credentials"),
        "{}",
        d.out
    );
    c.proxy.url = Some(format!("http://tether:s3cret@{}", proxy.addr));
    let d = doctor(&c, Some(&topo.dp), &[], &[]).await;
    assert_eq!(d.code, Some(0), "{}", d.out);
    assert_eq!(d.verdict("proxy"), "ok", "{}", d.out);
    assert_eq!(d.verdict("tcp"), "ok", "{}", d.out);
}

/// A CONNECT proxy that inspects TLS: it answers every CONNECT with 200 and terminates TLS
/// itself with a certificate for `localhost` from its own CA ("Corp TLS Inspection CA").
async fn inspecting_proxy() -> SocketAddr {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "Corp TLS Inspection CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    tether_runtime::tls::install_crypto_provider();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"tether/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    req.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.read(&mut [0u8; 1]).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_a_tls_inspecting_middlebox_by_the_issuer_it_re_signs_with() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let proxy = inspecting_proxy().await;
    let state = state_dir(0o700);
    let mut cfg = agent_config(&pki.agent("acme/mitm"), gw.handle.tunnel_addr);
    cfg.state_dir = Some(state.path().to_owned());
    cfg.proxy.url = Some(format!("http://{proxy}"));
    let d = doctor(&cfg, None, &[], &[]).await;
    // QUIC goes around the proxy and works; TCP through it meets the inspection CA.
    assert_eq!(d.code, Some(0), "{}", d.out);
    assert_eq!(d.verdict("quic"), "ok", "{}", d.out);
    let tcp = d.line("tcp");
    assert!(
        tcp.starts_with("FAIL") && tcp.contains("Corp TLS Inspection CA"),
        "{}",
        d.out
    );
    let mb = d.line("middlebox");
    assert!(
        mb.starts_with("FAIL") && mb.contains("Corp TLS Inspection CA") && mb.contains("exempt"),
        "{}",
        d.out
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_a_clock_ten_minutes_off() {
    let faketime = ["/usr/bin/faketime"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("this test needs Debian's faketime (libfaketime) to run the doctor with a clock ten minutes off: apt-get install faketime (scripts/test installs it when run as root)")
        });
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let state = state_dir(0o700);
    let mut cfg = agent_config(&pki.agent("acme/clock"), gw.handle.tunnel_addr);
    cfg.state_dir = Some(state.path().to_owned());
    // Only the wall clock moves; timers keep the real monotonic clock.
    let env = [("FAKETIME_DONT_FAKE_MONOTONIC", "1")];

    // Ten minutes behind: the certificates issued a moment ago are not valid yet here, and
    // the doctor says the clock is the likely cause.
    let d = doctor(&cfg, None, &[faketime, "-f", "-10m"], &env).await;
    assert_eq!(d.code, Some(1), "{}", d.out);
    let cert = d.line("certificate");
    assert!(
        cert.starts_with("FAIL") && cert.contains("clock is behind"),
        "{}",
        d.out
    );
    assert!(
        d.line("quic")
            .contains("not valid yet by this machine's clock"),
        "{}",
        d.out
    );

    // Ten minutes ahead: everything is still valid and the session works, but the clock
    // check measures the offset against the gateway's and fails.
    let d = doctor(&cfg, None, &[faketime, "-f", "+10m"], &env).await;
    let clock = d.line("clock");
    assert!(
        clock.starts_with("FAIL")
            && (clock.contains("10m") || clock.contains("9m 5"))
            && clock.contains("ahead of the gateway"),
        "{}",
        d.out
    );
    assert_eq!(d.code, Some(0), "{}", d.out);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_connect_after_start_runs_the_preflight_and_shows_it() {
    let pki = Pki::new();
    let closed = closed_port();
    let mut cfg = agent_config(&pki.agent("acme/pre"), closed);
    cfg.reconnect.connect_timeout = Duration::from_millis(500);
    let agent = TestAgent::start(&cfg);
    let deadline = Instant::now() + T;
    let report = loop {
        if let Some(r) = agent.handle.status.preflight() {
            break r;
        }
        assert!(Instant::now() < deadline, "no preflight after {T:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!report.can_connect());
    let failures = report.failures().join("\n");
    assert!(failures.contains("nothing listens on UDP"), "{failures}");
    // /readyz's detail carries them.
    let ready = agent.handle.status.readiness();
    assert!(!ready.ready);
    let text = ready.detail["preflight"]["failures"].to_string();
    assert!(text.contains("nothing listens on UDP"), "{}", ready.detail);
    agent.stop().await;
}
