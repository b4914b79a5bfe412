//! The customer's controls (issue 21), through the real `tether-agent` binary and a real
//! gateway: the kill switch (`tether-agent pause|resume`, `paused` in the config, the control
//! file), approvals (`tether-agent approvals|approve|reject`), live reload of the allow-list, and
//! the ledger with `tether-agent ledger verify`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_api::agent::v1::GetAgentInfoRequest;
use tether_api::agent::v1::agent_info_client::AgentInfoClient;
use tether_api::v1::streams_client::StreamsClient;
use tether_api::v1::{CommandState, StreamChunk};
use tether_e2e::*;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const AGENT: &str = "acme/ctl";

struct Scene {
    pki: Pki,
    gw: TestGateway,
    cfg: tether_agent::AgentConfig,
    agent: AgentProcess,
    state: tempfile::TempDir,
    _upstreams: Vec<DemoUpstream>,
}

/// A gateway and an agent process with a state directory, gRPC services `a` and `b` (two demo
/// upstreams) and the TCP service `echo`.
async fn scene() -> Scene {
    scene_with(|_| {}).await
}

/// [`scene`], with the agent's config changed by `edit` first.
async fn scene_with(edit: impl FnOnce(&mut tether_agent::AgentConfig)) -> Scene {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let (a, b) = (DemoUpstream::start().await, DemoUpstream::start().await);
    let echo = tcp_echo_server().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&pki.agent(AGENT), gw.handle.tunnel_addr);
    cfg.state_dir = Some(state.path().to_owned());
    cfg.ledger.stdout = true;
    cfg.default_service = "a".into();
    with_service(&mut cfg, "a", &a.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "b", &b.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "echo", &echo.to_string(), ServiceKind::Tcp);
    edit(&mut cfg);
    let agent = AgentProcess::spawn_env(&cfg, &[("RUST_LOG", "info")]);
    wait_until("agent connected", T, || gw.sessions_of(AGENT) >= 1).await;
    wait_until("ops address written", T, || {
        state.path().join(tether_agent::OPS_ADDR_FILE).exists()
    })
    .await;
    Scene {
        pki,
        gw,
        cfg,
        agent,
        state,
        _upstreams: vec![a, b],
    }
}

impl Scene {
    async fn echo(&self, service: &str) -> tether_api::demo::v1::echo_client::EchoClient<Routed> {
        echo_via(&self.gw, &self.pki, Route::new(Some(AGENT), Some(service))).await
    }

    /// Runs `tether-agent <args> --config <its config>`.
    async fn cli(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(binary("tether-agent"))
            .args(args)
            .arg("--config")
            .arg(self.agent.config_path())
            .output()
            .await
            .expect("run tether-agent")
    }

    fn ops(&self) -> std::net::SocketAddr {
        std::fs::read_to_string(self.state.path().join(tether_agent::OPS_ADDR_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn ledger_dir(&self) -> PathBuf {
        self.state.path().join(tether_agent::ledger::DIR)
    }

    async fn open_tcp(
        &self,
        service: &str,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<StreamChunk>,
            tonic::Streaming<StreamChunk>,
        ),
        tonic::Status,
    > {
        let ch = self.gw.channel(&self.pki.client("api")).await.unwrap();
        let mut client =
            StreamsClient::with_interceptor(ch, Route::new(Some(AGENT), Some(service)));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let inbound = client
            .open(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, inbound))
    }

    /// Stops the agent (SIGTERM) and the gateway; the state directory is kept for the caller.
    async fn stop(mut self) -> tempfile::TempDir {
        self.agent.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.agent.exit_within(T).await;
        assert!(
            status.success(),
            "agent exit: {status}\n{}",
            self.agent.logs()
        );
        self.gw.stop().await;
        self.state
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One finished call of the load: when it started and ended, and how it ended.
type Outcome = (Instant, Instant, Result<(), tonic::Status>);

/// Unary calls to `service`, one after another, until `stop`; every outcome kept.
fn load(
    mut echo: tether_api::demo::v1::echo_client::EchoClient<Routed>,
    stop: tether_runtime::CancellationToken,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<Outcome>>>) {
    let seen: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.is_cancelled() {
            i += 1;
            let started = Instant::now();
            let r = echo
                .unary(echo_req(&format!("load {i}")))
                .await
                .map(|r| assert_eq!(r.into_inner().message, format!("load {i}")));
            s.lock().unwrap().push((started, Instant::now(), r));
        }
    });
    (task, seen)
}

async fn states(client: &mut CommandsClient, ids: &[String]) -> Vec<CommandState> {
    let mut v = Vec::new();
    for id in ids {
        let c = client
            .get(tether_api::v1::GetCommandRequest { id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        v.push(CommandState::try_from(c.state).unwrap());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_refuses_every_call_and_stream_with_the_reason_holds_commands_and_resume_runs_them_all()
 {
    let s = scene().await;
    let stop = tether_runtime::CancellationToken::new();
    let (task, seen) = load(s.echo("a").await, stop.clone());
    wait_until("load running", T, || {
        seen.lock().unwrap().iter().filter(|o| o.2.is_ok()).count() >= 20
    })
    .await;
    // A TCP stream open before the pause is ended by it.
    let (tx, mut open_before) = s.open_tcp("echo").await.expect("stream opens");
    tx.send(StreamChunk {
        data: b"ping".to_vec().into(),
    })
    .await
    .unwrap();
    let got = open_before.message().await.unwrap().unwrap();
    assert_eq!(&got.data[..], b"ping");

    let o = s.cli(&["pause", "--reason", "incident 7"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let paused_at = Instant::now();
    assert!(text(&o).contains("paused"), "{}", text(&o));

    // The open stream ends; a new call, a new stream are refused with the reason.
    let ended = tokio::time::timeout(T, async {
        loop {
            match open_before.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the open stream ends when the agent pauses");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    let e = s.echo("b").await.unary(echo_req("x")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(e.message(), "paused by the data plane's owner: incident 7");
    let e = s.open_tcp("echo").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("paused by the data plane's owner: incident 7"),
        "{e:?}"
    );

    // The vendor sees it: AgentInfo (the built-in service answers while paused), /readyz.
    let ch = s.gw.channel(&s.pki.client("api")).await.unwrap();
    let info = AgentInfoClient::with_interceptor(ch, Route::new(Some(AGENT), Some("agent")))
        .get(GetAgentInfoRequest {})
        .await
        .expect("AgentInfo answers while paused")
        .into_inner();
    assert!(info.paused);
    assert_eq!(info.pause_reason, "incident 7");
    let (code, body) =
        tether_runtime::ops::probe(s.ops(), "/readyz", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["paused"], true, "{body}");
    assert_eq!(ready["pause_reason"], "incident 7", "{body}");
    assert_eq!(s.gw.sessions_of(AGENT), 1, "the session stays up");
    // And Agents/Get: the agent tells the gateway at once, in a heartbeat ahead of its time.
    let mut agents = s.gw.client(&s.pki, "api").await;
    let deadline = Instant::now() + T;
    loop {
        let a = agents
            .get(tether_api::v1::GetAgentRequest {
                agent: AGENT.into(),
            })
            .await
            .expect("Agents/Get")
            .into_inner();
        if a.paused {
            assert_eq!(a.sessions[0].pause_reason, "incident 7");
            assert!(a.sessions[0].paused);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Agents/Get never said paused: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // tetherctl shows it too.
    let out =
        s.gw.tetherctl(&s.pki.client("ops"))
            .args(["-o", "json", "agents", "get", AGENT])
            .output()
            .expect("run tetherctl");
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&json).expect("tetherctl's JSON");
    assert_eq!(json["paused"], true, "{json}");
    assert_eq!(json["sessions"][0]["pause_reason"], "incident 7", "{json}");
    // And the allow-list the agent announced (names and kinds), and that it dials directly.
    let services: Vec<&str> = json["sessions"][0]["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(services, ["a", "b", "echo"], "{json}");
    assert_eq!(json["sessions"][0]["proxy"], "direct", "{json}");

    // Commands submitted while paused are delivered but neither acknowledged nor run.
    let mut commands = s.gw.commands(&s.pki).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = commands
            .submit(submit_req(AGENT, "echo", format!("held {i}")))
            .await
            .expect("submit")
            .into_inner()
            .id;
        ids.push(id);
    }
    let deadline = Instant::now() + T;
    loop {
        let st = states(&mut commands, &ids).await;
        assert!(
            st.iter()
                .all(|s| matches!(s, CommandState::Queued | CommandState::Delivered)),
            "a command ran while paused: {st:?}"
        );
        if st.contains(&CommandState::Delivered) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery reached the agent: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A pause made in the pod survives nothing but `resume`: the load saw no success since.
    // Calls are checked up to the moment the resume is asked for: it takes effect before
    // the CLI's exit is seen here.
    let resumed_at = Instant::now();
    let o = s.cli(&["resume"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + T;
    while agents
        .get(tether_api::v1::GetAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .expect("Agents/Get")
        .into_inner()
        .paused
    {
        assert!(Instant::now() < deadline, "Agents/Get still says paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until("calls succeed again", T, || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|o| o.0 > resumed_at && o.2.is_ok())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let during: Vec<_> = seen
        .iter()
        .filter(|o| o.0 > paused_at && o.1 < resumed_at)
        .collect();
    assert!(!during.is_empty(), "the load made no call while paused");
    for (_, _, r) in &during {
        let e = r.as_ref().expect_err("no call succeeds while paused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(e.message(), "paused by the data plane's owner: incident 7");
    }
    // Every held command runs after the resume, none lost, none failed.
    let deadline = Instant::now() + T;
    loop {
        let st = states(&mut commands, &ids).await;
        if st.iter().all(|s| *s == CommandState::Succeeded) {
            break;
        }
        assert!(
            !st.iter()
                .any(|s| matches!(s, CommandState::Failed | CommandState::Expired)),
            "{st:?}"
        );
        assert!(
            Instant::now() < deadline,
            "commands not all run after resume: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, id) in ids.iter().enumerate() {
        let c = commands
            .get(tether_api::v1::GetCommandRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            c.result.expect("a result").output,
            format!("held {i}").into_bytes()
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_in_the_config_or_the_control_file_is_applied_live_and_resume_cannot_undo_it() {
    let mut s = scene().await;
    let mut echo = s.echo("a").await;
    echo.unary(echo_req("before")).await.expect("serves");

    // `paused = true` in the config file, reloaded live.
    s.cfg.paused = true;
    s.cfg.pause_reason = "quarterly audit".into();
    s.agent.rewrite_config(&s.cfg);
    let deadline = Instant::now() + T;
    let e = loop {
        match echo.unary(echo_req("x")).await {
            Err(e) => break e,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the config's pause was not applied"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        e.message(),
        "paused by the data plane's owner: quarterly audit"
    );
    let o = s.cli(&["resume"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("config") && text(&o).contains("paused = false"),
        "{}",
        text(&o)
    );
    assert_eq!(
        echo.unary(echo_req("x")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // The control file (the chart's ConfigMap) instead.
    let control = s.state.path().join("control.toml");
    std::fs::write(&control, "paused = false\nreason = \"\"\n").unwrap();
    s.cfg.paused = false;
    s.cfg.pause_reason.clear();
    s.cfg.control_file = Some(control.clone());
    s.agent.rewrite_config(&s.cfg);
    wait_for_call(&mut echo, true).await.unwrap();
    write_atomically(&control, "paused = true\nreason = \"kubectl edit\"\n");
    let e = wait_for_call(&mut echo, false).await.unwrap_err();
    assert_eq!(
        e.message(),
        "paused by the data plane's owner: kubectl edit"
    );
    // An invalid control file is refused naming it; the pause holds.
    write_atomically(&control, "paused = \"yes\"\n");
    wait_until("the refusal is logged", T, || {
        s.agent.logs().contains("control file is refused")
            && s.agent.logs().contains("control_file")
    })
    .await;
    assert_eq!(
        echo.unary(echo_req("x")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    write_atomically(&control, "paused = false\n");
    wait_for_call(&mut echo, true).await.unwrap();
    s.stop().await;
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Calls until one succeeds (`ok`) or fails (`!ok`), within the deadline; returns that call.
async fn wait_for_call(
    echo: &mut tether_api::demo::v1::echo_client::EchoClient<Routed>,
    ok: bool,
) -> Result<(), tonic::Status> {
    let deadline = Instant::now() + T;
    loop {
        let r = echo.unary(echo_req("probe")).await.map(|_| ());
        if r.is_ok() == ok {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "the change was not applied: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_services_under_load_and_refuses_an_invalid_config_naming_the_key()
{
    let mut s = scene().await;
    let stop = tether_runtime::CancellationToken::new();
    let (task, seen) = load(s.echo("a").await, stop.clone());
    wait_until("load running", T, || seen.lock().unwrap().len() >= 20).await;
    let (tx, mut stream) = s.open_tcp("echo").await.expect("stream opens");
    tx.send(StreamChunk {
        data: b"ping".to_vec().into(),
    })
    .await
    .unwrap();
    assert_eq!(&stream.message().await.unwrap().unwrap().data[..], b"ping");
    let mut b = s.echo("b").await;
    b.unary(echo_req("b")).await.expect("b serves");

    // Remove `b` and `echo`, add `c`.
    let c_upstream = DemoUpstream::start().await;
    s.cfg.services.remove("b");
    s.cfg.services.remove("echo");
    with_service(&mut s.cfg, "c", &c_upstream.url(), ServiceKind::Grpc);
    s.agent.rewrite_config(&s.cfg);
    let mut c = s.echo("c").await;
    let deadline = Instant::now() + T;
    while c.unary(echo_req("c")).await.is_err() {
        assert!(Instant::now() < deadline, "service c never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = b.unary(echo_req("b")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The removed TCP service's open stream was ended.
    let ended = tokio::time::timeout(T, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the removed service's stream ends");
    assert!(!matches!(ended, Ok(Some(_))));
    drop(tx);

    // An invalid config: refused naming the key, the running one kept.
    let good = std::fs::read_to_string(s.agent.config_path()).unwrap();
    let bad = good.replace("kind = \"grpc\"", "kind = \"udp\"");
    assert_ne!(bad, good);
    write_atomically(&s.agent.config_path(), &bad);
    wait_until("the refusal is logged", T, || {
        s.agent
            .logs()
            .lines()
            .any(|l| l.contains("config reload refused") && l.contains("services"))
    })
    .await;
    c.unary(echo_req("c")).await.expect("c still served");
    assert_eq!(
        b.unary(echo_req("b")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut load_until = seen.lock().unwrap().len() + 20;
    wait_until("more load", T, || seen.lock().unwrap().len() >= load_until).await;
    // SIGHUP reloads too: `b` back.
    write_atomically(&s.agent.config_path(), &good);
    s.cfg
        .services
        .insert("b".into(), s.cfg.services["c"].clone());
    s.agent.rewrite_config(&s.cfg);
    s.agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_call(&mut b, true).await.unwrap();
    load_until = seen.lock().unwrap().len() + 20;
    wait_until("more load", T, || seen.lock().unwrap().len() >= load_until).await;

    stop.cancel();
    task.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let failed: Vec<_> = seen.iter().filter_map(|o| o.2.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "calls to the service that stayed failed: {failed:?}"
    );
    assert!(seen.len() >= 60);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_holds_exactly_the_calls_streams_and_commands_and_verify_finds_each_tampering() {
    let s = scene().await;
    let mut a = s.echo("a").await;
    for i in 0..7 {
        a.unary(echo_req(&format!("secret-payload-{i}")))
            .await
            .unwrap();
    }
    let e = s.echo("nope").await.unary(echo_req("x")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    for _ in 0..2 {
        let (tx, mut inbound) = s.open_tcp("echo").await.unwrap();
        tx.send(StreamChunk {
            data: b"0123456789".to_vec().into(),
        })
        .await
        .unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(c) = inbound.message().await.unwrap() {
            got.extend_from_slice(&c.data);
        }
        assert_eq!(got, b"0123456789");
    }
    let mut commands = s.gw.commands(&s.pki).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = commands
            .submit(submit_req(AGENT, "echo", format!("command-secret-{i}")))
            .await
            .unwrap()
            .into_inner()
            .id;
        ids.push(id);
    }
    wait_until_async(&mut commands, &ids).await;
    // The agent's config outlives it here, for `ledger verify --config` (as in its pod).
    let (config, dir) = (s.state.path().join("agent-config.toml"), s.ledger_dir());
    std::fs::copy(s.agent.config_path(), &config).unwrap();
    let stdout = s.agent.stdout.clone();
    // Stopping writes the last checkpoint.
    let _state = s.stop().await;
    stdout.ended().await;

    let records: Vec<serde_json::Value> = tether_agent::ledger::list(&dir)
        .unwrap()
        .iter()
        .flat_map(|(_, p)| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| tether_agent::ledger::parse_line(l).unwrap().value)
                .collect::<Vec<_>>()
        })
        .collect();
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["kind"] == kind).collect()
    };
    let calls = of("call");
    assert_eq!(calls.len(), 8, "{calls:#?}");
    assert_eq!(
        calls
            .iter()
            .filter(|c| c["status"] == "Ok" && c["service"] == "a")
            .count(),
        7
    );
    assert!(
        calls
            .iter()
            .any(|c| c["status"] == "PermissionDenied" && c["service"] == "nope")
    );
    for c in &calls {
        assert_eq!(c["caller"], "mtls:api");
        assert_eq!(c["tenant"], "acme");
        assert_eq!(c["method"], "/tether.demo.v1.Echo/Unary");
    }
    assert!(
        calls
            .iter()
            .filter(|c| c["status"] == "Ok")
            .all(|c| c["bytes_in"].as_u64() > Some(0) && c["bytes_out"].as_u64() > Some(0))
    );
    let streams = of("stream");
    assert_eq!(streams.len(), 2, "{streams:#?}");
    for st in &streams {
        assert_eq!(
            (st["bytes_in"].as_u64(), st["bytes_out"].as_u64()),
            (Some(10), Some(10))
        );
        assert_eq!(st["status"], "Ok");
    }
    let cmds = of("command");
    assert_eq!(cmds.len(), 3, "{records:#?}");
    for (i, id) in ids.iter().enumerate() {
        let c = cmds
            .iter()
            .find(|c| c["id"] == id.as_str())
            .expect("recorded");
        assert_eq!(c["command_kind"], "echo");
        assert_eq!(c["outcome"], "succeeded");
        assert_eq!(c["attempt"], 1);
        assert_eq!(
            c["payload_sha256"],
            tether_agent::ledger::sha256_hex(format!("command-secret-{i}").as_bytes())
        );
    }
    assert!(!of("checkpoint").is_empty());
    // No payload, in the files or on stdout.
    let all_files: String = tether_agent::ledger::list(&dir)
        .unwrap()
        .iter()
        .map(|(_, p)| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(!all_files.contains("secret-payload") && !all_files.contains("command-secret"));
    // The stdout copy is the same lines.
    assert_eq!(stdout.text().trim_end(), all_files.trim_end());

    let verify = || {
        std::process::Command::new(binary("tether-agent"))
            .args(["ledger", "verify", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let o = verify();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ledger intact"), "{}", text(&o));
    let tail = std::process::Command::new(binary("tether-agent"))
        .args(["ledger", "tail", "-n", "3", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(tail.status.success());
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 3);

    // Each kind of tampering, on the file as it was.
    let (_, file) = tether_agent::ledger::list(&dir).unwrap().remove(0);
    let orig: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let at = |kind: &str| {
        orig.iter()
            .position(|l| l.contains(&format!("\"kind\":\"{kind}\"")))
            .unwrap()
    };
    let name = file.display().to_string();
    let call = at("call");
    let cp = at("checkpoint");
    type Tamper = Box<dyn Fn(&mut Vec<String>)>;
    let cases: Vec<(&str, Tamper, usize)> = vec![
        (
            "delete",
            Box::new(move |v: &mut Vec<String>| {
                v.remove(call);
            }),
            call + 1,
        ),
        (
            "edit",
            Box::new(move |v: &mut Vec<String>| {
                v[call] = v[call].replace("\"status\":\"Ok\"", "\"status\":\"NotFound\"")
            }),
            call + 1,
        ),
        (
            "reorder",
            Box::new(move |v: &mut Vec<String>| v.swap(call, call + 1)),
            call + 1,
        ),
        (
            "truncated checkpoint",
            Box::new(move |v: &mut Vec<String>| {
                let half = v[cp].len() / 2;
                v[cp].truncate(half);
            }),
            cp + 1,
        ),
    ];
    for (what, tamper, line) in cases {
        let mut v = orig.clone();
        tamper(&mut v);
        std::fs::write(&file, v.join("\n") + "\n").unwrap();
        let o = verify();
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
        let want = format!("BROKEN: {name}: record {line}");
        assert!(
            text(&o).contains(&format!("{want} ")) || text(&o).contains(&format!("{want}:")),
            "{what}: want {want:?} in\n{}",
            text(&o)
        );
    }
    std::fs::write(&file, orig.join("\n") + "\n").unwrap();
    assert!(verify().status.success());
}

async fn wait_until_async(commands: &mut CommandsClient, ids: &[String]) {
    let deadline = Instant::now() + T;
    loop {
        let st = states(commands, ids).await;
        if st.iter().all(|s| *s == CommandState::Succeeded) {
            return;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits `kind` with `payload` on its own lane (`key`), with a TTL when given.
async fn submit_on(
    commands: &mut CommandsClient,
    kind: &str,
    payload: &str,
    key: &str,
    ttl: Option<Duration>,
) -> String {
    let mut req = submit_req(AGENT, kind, payload);
    req.ordering_key = key.into();
    req.ttl = ttl.map(|t| t.try_into().unwrap());
    commands.submit(req).await.expect("submit").into_inner().id
}

async fn wait_state(
    commands: &mut CommandsClient,
    id: &str,
    state: CommandState,
) -> tether_api::v1::Command {
    wait_command_state(commands, id, state, T).await
}

/// The commands waiting in the agent, as `tether-agent approvals --json` prints them (`None`
/// when it fails).
fn waits_listed(s: &Scene) -> Option<String> {
    let o = std::process::Command::new(binary("tether-agent"))
        .args(["approvals", "--json", "--config"])
        .arg(s.agent.config_path())
        .output()
        .unwrap();
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn result_message(c: &tether_api::v1::Command) -> String {
    c.result
        .as_ref()
        .map(|r| r.message.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_hold_their_kinds_until_approved_rejected_or_expired_across_restarts_and_reloads()
{
    let mut s = scene_with(|c| c.approvals.kinds = vec!["echo".into()]).await;
    let mut commands = s.gw.commands(&s.pki).await;

    // Three echo commands wait, each on its own lane; a kind not listed runs meanwhile (the
    // waits hold no delivery permit).
    let approve = submit_on(&mut commands, "echo", "ship it", "a", None).await;
    let reject = submit_on(&mut commands, "echo", "drop prod", "b", None).await;
    let expire = submit_on(
        &mut commands,
        "echo",
        "late",
        "c",
        Some(Duration::from_secs(8)),
    )
    .await;
    let free = submit_on(&mut commands, "sleep", "10", "d", None).await;
    let waiting = wait_state(&mut commands, &approve, CommandState::AwaitingApproval).await;
    assert!(
        waiting
            .progress
            .iter()
            .any(|l| l.contains(&format!("tether-agent approve {approve}"))),
        "the vendor is told what the owner runs: {:?}",
        waiting.progress
    );
    wait_state(&mut commands, &reject, CommandState::AwaitingApproval).await;
    wait_state(&mut commands, &expire, CommandState::AwaitingApproval).await;
    wait_state(&mut commands, &free, CommandState::Succeeded).await;
    // Nothing of theirs ran.
    assert_eq!(
        states(&mut commands, &[approve.clone(), reject.clone()]).await,
        vec![CommandState::AwaitingApproval; 2]
    );

    // The owner sees them in the pod, with what would run (the payload's SHA-256).
    let o = s.cli(&["approvals", "--json"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for id in [&approve, &reject, &expire] {
        assert!(listed.contains(&id.as_str()), "{id} not in {list}");
    }
    let sha = tether_agent::ledger::sha256_hex(b"ship it");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == approve.as_str()
                && r["payload_sha256"] == sha.as_str()
                && r["kind"] == "echo"
                && r["decision"] == "pending"),
        "{list}"
    );
    let table = s.cli(&["approvals"]).await;
    assert!(
        text(&table).contains(&approve) && text(&table).contains("pending"),
        "{}",
        text(&table)
    );

    // Approved: it runs.
    let o = s.cli(&["approve", &approve, "--by", "alice"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let done = wait_state(&mut commands, &approve, CommandState::Succeeded).await;
    assert_eq!(done.result.unwrap().output, b"ship it");

    // A rejection needs a reason; then it ends FAILED with it, never run.
    let o = s.cli(&["reject", &reject]).await;
    assert_eq!(o.status.code(), Some(2), "clap refuses: {}", text(&o));
    let o = s
        .cli(&[
            "reject",
            &reject,
            "--reason",
            "change freeze",
            "--by",
            "bob",
        ])
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let failed = wait_state(&mut commands, &reject, CommandState::Failed).await;
    assert_eq!(
        result_message(&failed),
        "rejected by the data plane's owner: change freeze"
    );
    assert!(failed.result.unwrap().output.is_empty());
    // Decided once: a second decision is refused, naming how to list what waits.
    let o = s.cli(&["approve", &reject]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("tether-agent approvals"), "{}", text(&o));

    // Not decided before its TTL: EXPIRED, and forgotten by the agent.
    let expired = wait_state(&mut commands, &expire, CommandState::Expired).await;
    assert!(
        result_message(&expired).contains("not approved in the data plane before its TTL"),
        "{expired:?}"
    );
    wait_until("the agent forgets the expired wait", T, || {
        waits_listed(&s).is_some_and(|w| !w.contains(&expire))
    })
    .await;

    // The vendor cancels a waiting command: CANCELLED, and the agent forgets the wait at once.
    let cancelled = submit_on(&mut commands, "echo", "never mind", "g", None).await;
    wait_state(&mut commands, &cancelled, CommandState::AwaitingApproval).await;
    let c = commands
        .cancel(tether_api::v1::CancelCommandRequest {
            id: cancelled.clone(),
        })
        .await
        .expect("a command awaiting approval can be cancelled")
        .into_inner();
    assert_eq!(c.state(), CommandState::Cancelled);
    assert_eq!(
        result_message(&c),
        "cancelled while awaiting the data plane owner's approval"
    );
    wait_until("the agent forgets the cancelled wait", T, || {
        waits_listed(&s).is_some_and(|w| !w.contains(&cancelled))
    })
    .await;
    let o = s.cli(&["approve", &cancelled]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // A wait survives the agent's restart (and the redeliveries it causes): it is still the
    // same wait, and approving it then runs it once.
    let kept = submit_on(&mut commands, "echo", "after restart", "e", None).await;
    wait_state(&mut commands, &kept, CommandState::AwaitingApproval).await;
    s.agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(s.agent.exit_within(T).await.success(), "{}", s.agent.logs());
    s.agent = AgentProcess::spawn_env(&s.cfg, &[("RUST_LOG", "info")]);
    wait_until("agent reconnected", T, || s.gw.sessions_of(AGENT) >= 1).await;
    let again = wait_state(&mut commands, &kept, CommandState::AwaitingApproval).await;
    let o = s.cli(&["approve", &kept, "--by", "carol"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let done = wait_state(&mut commands, &kept, CommandState::Succeeded).await;
    assert_eq!(done.result.unwrap().output, b"after restart");
    assert!(again.attempts >= 1);

    // A kind taken off `approvals.kinds` by a live reload runs what waited.
    let freed = submit_on(&mut commands, "echo", "freed", "f", None).await;
    wait_state(&mut commands, &freed, CommandState::AwaitingApproval).await;
    s.cfg.approvals.kinds.clear();
    s.agent.rewrite_config(&s.cfg);
    wait_state(&mut commands, &freed, CommandState::Succeeded).await;

    // The ledger has each wait and decision, with who and why, and verifies.
    let tail = s.cli(&["ledger", "tail", "-n", "200"]).await;
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] == "approval")
        .collect();
    let decision = |id: &str, d: &str| {
        records
            .iter()
            .find(|r| r["id"] == id && r["decision"] == d)
            .cloned()
            .unwrap_or_else(|| panic!("no {d} record of {id} in {records:?}"))
    };
    assert_eq!(decision(&approve, "approved")["by"], "alice");
    assert_eq!(
        decision(&approve, "awaiting")["payload_sha256"],
        sha.as_str()
    );
    let r = decision(&reject, "rejected");
    assert_eq!(
        (r["by"].as_str(), r["reason"].as_str()),
        (Some("bob"), Some("change freeze"))
    );
    decision(&expire, "expired");
    decision(&cancelled, "withdrawn");
    assert_eq!(decision(&kept, "approved")["by"], "carol");
    assert_eq!(
        records
            .iter()
            .filter(|r| r["id"] == kept.as_str() && r["decision"] == "awaiting")
            .count(),
        1,
        "one wait across the restart: {records:?}"
    );
    let verify = s.cli(&["ledger", "verify"]).await;
    assert!(verify.status.success(), "{}", text(&verify));
    s.stop().await;
}
