//! The first hour (issue 22): the failures a newcomer meets say what happened and what to do,
//! and exit codes tell scripts the truth. Real binaries, real gateways, real TLS and QUIC.

use std::process::Output;
use std::time::Duration;

use tether_agent::config::ServiceKind;
use tether_api::v1::RevokeAgentRequest;
use tether_e2e::*;

const T: Duration = Duration::from_secs(20);

/// Runs `tetherctl` with `args` (no dev.json), within [`T`].
async fn tetherctl(args: &[&str]) -> Output {
    tokio::time::timeout(
        T,
        tokio::process::Command::new(binary("tetherctl"))
            .args(["--dev-json", "/nonexistent"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("tetherctl finishes")
    .expect("run tetherctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The connection flags for `files` at `addr`.
fn conn<'a>(addr: &'a str, files: &'a CertFiles) -> Vec<&'a str> {
    vec![
        "--northbound",
        addr,
        "--ca",
        files.ca.to_str().unwrap(),
        "--cert",
        files.cert.to_str().unwrap(),
        "--key",
        files.key.to_str().unwrap(),
    ]
}

// === Item 1: tetherctl says why it cannot connect ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_says_why_it_cannot_reach_the_northbound_api() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let files = pki.client("api");
    let nb = gw.handle.northbound_addr.to_string();

    // The right flags work (the baseline for every case below).
    let mut args = conn(&nb, &files);
    args.extend(["agents", "list"]);
    let o = tetherctl(&args).await;
    assert!(o.status.success(), "{}", stderr(&o));

    // A CA that did not issue the gateway's certificate: which CA did, and which was given.
    let other = Pki::new();
    let other_ca = other.dir.path().join("ca.pem");
    let mut args = conn(&nb, &files);
    args[3] = other_ca.to_str().unwrap();
    args.extend(["agents", "list"]);
    let e = stderr(&tetherctl(&args).await);
    assert!(e.contains("not trusted"), "{e}");
    assert!(e.contains("CN=Tether CA test.local"), "{e}");
    assert!(
        e.contains("holds \"O=Tether, CN=Tether CA test.local"),
        "{e}"
    );
    assert!(e.contains(other_ca.to_str().unwrap()), "{e}");
    assert!(!e.ends_with("transport error\n"), "{e}");

    // A name the certificate does not carry: the names it does, and --server-name.
    let mut args = conn(&nb, &files);
    args.extend(["--server-name", "gateway.example", "agents", "list"]);
    let e = stderr(&tetherctl(&args).await);
    assert!(
        e.contains("not valid for the name \"gateway.example\""),
        "{e}"
    );
    assert!(e.contains("localhost, 127.0.0.1"), "{e}");
    assert!(e.contains("--server-name localhost"), "{e}");

    // Nothing listening: refused, and where the northbound port usually is.
    let closed = closed_port().to_string();
    let mut args = conn(&closed, &files);
    args.extend(["agents", "list"]);
    let e = stderr(&tetherctl(&args).await);
    assert!(e.contains("connection refused"), "{e}");
    assert!(e.contains("7444"), "{e}");

    // The tunnel port (TLS, but ALPN tether/1): the wrong port, said so.
    let tunnel = gw.handle.tunnel_addr.to_string();
    let mut args = conn(&tunnel, &files);
    args.extend(["agents", "list"]);
    let e = stderr(&tetherctl(&args).await);
    assert!(e.contains("tunnel port"), "{e}");

    // The ops port (plain HTTP): not TLS at all.
    let ops = gw.handle.ops_addr.to_string();
    let mut args = conn(&ops, &files);
    args.extend(["agents", "list"]);
    let e = stderr(&tetherctl(&args).await);
    assert!(e.contains("does not speak TLS"), "{e}");
    gw.stop().await;
}

// === Item 2: revocation and re-issue agree ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_right_after_a_revocation_is_accepted_and_one_issued_before_is_not() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let api = pki.client("api");
    let old = pki.agent("acme/again");
    let agent = TestAgent::start(&agent_config(&old, gw.handle.tunnel_addr));
    wait_until("agent connected", T, || gw.sessions_of("acme/again") == 1).await;
    // Issued before the revocation, never presented: refused by the cut-off alone.
    let before = pki.agent("acme/again");
    gw.channel(&api)
        .await
        .map(tether_api::v1::agents_client::AgentsClient::new)
        .unwrap()
        .revoke(RevokeAgentRequest {
            agent: "acme/again".into(),
            reason: "laptop lost".into(),
        })
        .await
        .expect("revoke");
    agent.stop().await;
    // At once, with the operator's tool, as the agent's log says to.
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(binary("tether-gateway"))
        .args(["pki", "issue-agent", "--dir"])
        .arg(pki.dir.path())
        .args(["--tenant", "acme", "--agent", "again", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let fresh = CertFiles {
        ca: out.path().join("ca.pem"),
        cert: out.path().join("agent.pem"),
        key: out.path().join("agent-key.pem"),
    };
    let agent = TestAgent::start(&agent_config(&fresh, gw.handle.tunnel_addr));
    wait_until("the freshly issued certificate connects", T, || {
        gw.sessions_of("acme/again") == 1
    })
    .await;
    agent.stop().await;
    let stale = TestAgent::start(&agent_config(&before, gw.handle.tunnel_addr));
    wait_until("the certificate issued before is refused", T, || {
        stale
            .handle
            .status
            .last_error()
            .is_some_and(|e| e.contains("Revoked"))
    })
    .await;
    assert_eq!(gw.sessions_of("acme/again"), 0);
    stale.stop().await;
    gw.stop().await;
}

// === Item 4: a wrong gateway address gets the right advice ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pointed_at_a_closed_port_says_nothing_listens_there_at_once() {
    let pki = Pki::new();
    let mut cfg = agent_config(&pki.agent("acme/lost"), closed_port());
    // Far longer than the test waits: the answer must come from the ICMP refusal.
    cfg.reconnect.connect_timeout = Duration::from_secs(60);
    let agent = AgentProcess::spawn(&cfg);
    wait_until(
        "the agent says nothing listens there",
        Duration::from_secs(15),
        || agent.logs().contains("nothing listens on UDP"),
    )
    .await;
    let logs = agent.logs();
    assert!(logs.contains("tunnel port"), "{logs}");
    assert!(!logs.contains("firewall?"), "{logs}");
    assert!(!logs.contains("sendmsg error"), "{logs}");
    // Logs to a pipe carry no colour codes.
    assert!(!logs.contains('\u{1b}'), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pointed_at_the_northbound_port_is_told_it_is_the_wrong_port() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut cfg = agent_config(&pki.agent("acme/lost"), gw.handle.northbound_addr);
    cfg.reconnect.connect_timeout = Duration::from_secs(60);
    let agent = AgentProcess::spawn(&cfg);
    wait_until(
        "the agent names the wrong port",
        Duration::from_secs(15),
        || agent.logs().contains("northbound port"),
    )
    .await;
    let logs = agent.logs();
    assert!(logs.contains("NoApplicationProtocol"), "{logs}");
    assert!(logs.contains("7443"), "{logs}");
    drop(agent);
    gw.stop().await;
}

// === Item 5: exit codes and checks agree ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_submit_watch_exits_3_when_the_command_fails() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let agent = TestAgent::start_with_handlers(
        &agent_config(&pki.agent("acme/w"), gw.handle.tunnel_addr),
        test_handlers(),
    );
    wait_until("agent connected", T, || gw.sessions_of("acme/w") == 1).await;
    let files = pki.client("api");
    let nb = gw.handle.northbound_addr.to_string();
    let run = |kind: &'static str, payload: &'static str| {
        let mut args = conn(&nb, &files);
        args.extend(["commands", "submit", "acme/w", kind, payload, "--watch"]);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let args = run("panic", "boom");
    let o = tetherctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("ended FAILED"), "{}", stderr(&o));
    let args = run("echo", "hi");
    let o = tetherctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_check_config_fails_like_run_when_the_certificate_is_missing() {
    let pki = Pki::new();
    let files = pki.agent("acme/c");
    let mut cfg = agent_config(&files, closed_port());
    let dir = tempfile::tempdir().unwrap();
    let check = |cfg: &tether_agent::AgentConfig| {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
        std::process::Command::new(binary("tether-agent"))
            .args(["run", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let o = check(&cfg);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("acme/c"));
    cfg.tls.cert = dir.path().join("missing.pem");
    let o = check(&cfg);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("tls.cert") && e.contains("missing.pem"), "{e}");
    assert!(e.contains("pki issue-agent"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_missing_certificate_names_the_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "trust_domain = \"{TD}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.dir.path().join("ca.pem").display(),
            dir.path().join("nope.pem").display(),
            pki.dir.path().join("gateway-key.pem").display(),
        ),
    )
    .unwrap();
    let o = std::process::Command::new(binary("tether-gateway"))
        .args(["serve", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("tls.cert") && e.contains("nope.pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_forward_refuses_a_service_that_is_not_allow_listed_or_not_tcp() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut cfg = agent_config(&pki.agent("acme/f"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "db", "127.0.0.1:1", ServiceKind::Tcp);
    with_service(&mut cfg, "api", "http://127.0.0.1:1", ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/f") == 1).await;
    let files = pki.client("api");
    let nb = gw.handle.northbound_addr.to_string();

    let mut args = conn(&nb, &files);
    args.extend(["forward", "acme/f", "nope", "0"]);
    let o = tetherctl(&args).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("no service \"nope\""), "{e}");
    assert!(e.contains("api (grpc), db (tcp)"), "{e}");

    let mut args = conn(&nb, &files);
    args.extend(["forward", "acme/f", "api", "0"]);
    let o = tetherctl(&args).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is grpc"), "{}", stderr(&o));

    agent.stop().await;
    gw.stop().await;
}

// === Item 6: smaller things ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_read_as_written_and_rtt_shows_from_the_start() {
    let pki = Pki::new();
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(binary("tether-gateway"))
        .args(["pki", "issue-client", "--dir"])
        .arg(pki.dir.path())
        .args(["--name", "ops", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(said.contains("valid for 90d"), "{said}");
    assert!(said.contains("ca.pem"), "{said}");

    // A heartbeat far in the future: the RTT shown is the handshake's, QUIC's estimate or,
    // over the TCP fallback, how long the TLS handshake took.
    let mut gcfg = TestGateway::config(&pki);
    gcfg.tunnel.heartbeat_interval = Duration::from_secs(600);
    let gw = TestGateway::start_with(gcfg, "127.0.0.1:0".parse().unwrap()).await;
    let agent = TestAgent::start(&agent_config(&pki.agent("acme/r"), gw.handle.tunnel_addr));
    let mut tcp_cfg = agent_config(&pki.agent("acme/t"), gw.handle.tunnel_addr);
    tcp_cfg.transport.mode = tether_agent::config::TransportMode::Tcp;
    let tcp_agent = TestAgent::start(&tcp_cfg);
    wait_until("agents connected", T, || {
        gw.sessions_of("acme/r") == 1 && gw.sessions_of("acme/t") == 1
    })
    .await;
    let files = pki.client("api");
    let nb = gw.handle.northbound_addr.to_string();
    let mut args = conn(&nb, &files);
    args.extend(["agents", "list"]);
    let o = tetherctl(&args).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    for (agent, transport) in [("acme/r", "quic"), ("acme/t", "tcp")] {
        let row = table
            .lines()
            .find(|l| l.starts_with(agent))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(
            row.contains("ms "),
            "no RTT for the {transport} session before its first heartbeat: {table}"
        );
    }
    tcp_agent.stop().await;
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_reported_with_each_cause_once() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut cfg = agent_config(&pki.agent("acme/u"), gw.handle.tunnel_addr);
    let closed = closed_port();
    with_service(
        &mut cfg,
        "echo",
        &format!("http://{closed}"),
        ServiceKind::Grpc,
    );
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/u") == 1).await;
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/u"), Some("echo"))).await;
    let s = echo
        .unary(echo_req("hi"))
        .await
        .expect_err("nothing listens");
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    assert!(s.message().contains("tcp connect error"), "{s:?}");
    assert!(
        !s.message().contains("tcp connect error: tcp connect error"),
        "{s:?}"
    );
    agent.stop().await;
    gw.stop().await;
}

// === Item 7: tetherctl call, through reflection and the tunnel ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_call_sends_json_and_prints_json_replies_through_the_tunnel() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/c"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "demo", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/c") == 1).await;
    let files = pki.client("api");
    let nb = gw.handle.northbound_addr.to_string();

    let mut args = conn(&nb, &files);
    args.extend([
        "-o",
        "json",
        "call",
        "acme/c",
        "tether.demo.v1.Echo/ServerStream",
        "--service",
        "demo",
        "--data",
        r#"{"message":"hi","repeat":3}"#,
    ]);
    let o = tetherctl(&args).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let replies: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {out}")))
        .collect();
    assert_eq!(replies.len(), 3, "{out}");
    assert!(replies.iter().all(|r| r["message"] == "hi"), "{out}");

    // A request that does not fit the message says which fields it has.
    let mut args = conn(&nb, &files);
    args.extend([
        "call",
        "acme/c",
        "tether.demo.v1.Echo/Unary",
        "--service",
        "demo",
        "--data",
        r#"{"mesage":"hi"}"#,
    ]);
    let o = tetherctl(&args).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("message, repeat"), "{}", stderr(&o));

    // The status of a failing call comes back as it is.
    let mut args = conn(&nb, &files);
    args.extend([
        "call",
        "acme/c",
        "tether.demo.v1.Echo/Unary",
        "--service",
        "demo",
        "--data",
        r#"{"message":"nope","failWithCode":5}"#,
    ]);
    let o = tetherctl(&args).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NotFound: nope"), "{}", stderr(&o));
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_call_falls_back_to_v1alpha_reflection_and_says_when_there_is_none() {
    use tether_api::demo::v1::echo_server::EchoServer;
    // Two upstreams without v1 reflection: one serving only v1alpha (as older gRPC servers
    // do), one serving no reflection at all.
    async fn upstream(v1alpha: bool) -> (std::net::SocketAddr, tether_runtime::CancellationToken) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = tether_runtime::CancellationToken::new();
        let reflection = v1alpha.then(|| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tether_api::FILE_DESCRIPTOR_SET)
                .build_v1alpha()
                .unwrap()
        });
        let router = tonic::transport::Server::builder()
            .add_optional_service(reflection)
            .add_service(EchoServer::new(EchoService::default()));
        let s = stop.clone();
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    s.cancelled_owned(),
                )
                .await
                .unwrap()
        });
        (addr, stop)
    }
    let (alpha, stop_alpha) = upstream(true).await;
    let (none, stop_none) = upstream(false).await;
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut cfg = agent_config(&pki.agent("acme/old"), gw.handle.tunnel_addr);
    with_service(
        &mut cfg,
        "alpha",
        &format!("http://{alpha}"),
        ServiceKind::Grpc,
    );
    with_service(
        &mut cfg,
        "none",
        &format!("http://{none}"),
        ServiceKind::Grpc,
    );
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/old") == 1).await;
    let files = pki.client("api");
    let nb = gw.handle.northbound_addr.to_string();
    let call = |service: &'static str| {
        let mut args = conn(&nb, &files);
        args.extend([
            "-o",
            "json",
            "call",
            "acme/old",
            "tether.demo.v1.Echo/Unary",
            "--service",
            service,
            "--data",
            r#"{"message":"old"}"#,
        ]);
        args
    };
    let o = tetherctl(&call("alpha")).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let reply: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    assert_eq!(reply["message"], "old", "{reply}");

    let o = tetherctl(&call("none")).await;
    assert_eq!(o.status.code(), Some(1));
    let said = stderr(&o);
    assert!(
        said.contains("neither grpc.reflection.v1 nor v1alpha") && said.contains("grpcurl"),
        "{said}"
    );
    agent.stop().await;
    gw.stop().await;
    stop_alpha.cancel();
    stop_none.cancel();
}

// === Other errors a person reads ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_names_the_key_and_what_to_do() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\n[northbound]\nlisten = \"{}\"\n[ops]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display(),
            pki.dir.path().join("ca.pem").display(),
            pki.dir.path().join("gateway.pem").display(),
            pki.dir.path().join("gateway-key.pem").display(),
            taken.local_addr().unwrap(),
        ),
    )
    .unwrap();
    let o = tokio::time::timeout(
        T,
        tokio::process::Command::new(binary("tether-gateway"))
            .args(["serve", "--config"])
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the gateway exits")
    .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("northbound.listen"), "{e}");
    assert!(e.contains("another process listens there"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_log_pipe_closed_still_stops_on_sigterm() {
    let pki = Pki::new();
    let mut cfg = agent_config(&pki.agent("acme/pipe"), closed_port());
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.ops.listen = ops.local_addr().unwrap();
    drop(ops);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let mut child = tokio::process::Command::new(binary("tether-agent"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Whoever read the log is gone: every line the agent writes from now on meets a broken pipe.
    drop(child.stderr.take());
    wait_until("the agent's ops endpoint answers", T, || {
        tether_runtime::ops::probe(cfg.ops.listen, "/healthz", Duration::from_secs(1))
            .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the agent stops on SIGTERM though it cannot log")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
