//! The web console in a real browser: Debian's Chromium, headless, driven by playwright-core
//! (`e2e/browser/console.mjs`, installed from its lockfile by `scripts/test`), against a real
//! `tether-gateway serve` process and real `tether-agent` processes. Each test logs in
//! through a link from `tetherctl console`; the script asks this test to start or stop agents
//! when the page must see the world change (`STEP`), and every check it passes prints
//! `PASS`. The screenshots in `docs/console/` come from these runs (with `TETHER_CONSOLE_SHOTS`,
//! see [`shots`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tether_agent::config::{AgentConfig, ServiceConfig, ServiceKind};
use tether_api::v1;
use tether_e2e::{
    AgentProcess, CertFiles, GatewayProcess, Pki, Route, agent_config, init, tetherctl_at,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const T: Duration = Duration::from_secs(30);

const AUTH: &str = r#"
[auth]
[[auth.callers]]
name = "ops"
tenants = ["*"]
[[auth.callers]]
name = "acme-ops"
tenants = ["acme"]
"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `console.mjs` running one scenario.
struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    passed: Vec<String>,
}

impl Browser {
    /// Starts `scenario` with `cfg` (the script's CONSOLE_TEST); panics saying what is missing
    /// (Node.js, the npm packages, Chromium).
    fn start(scenario: &str, cfg: serde_json::Value) -> Browser {
        let dir = repo().join("e2e/browser");
        assert!(
            dir.join("node_modules/playwright-core/package.json")
                .exists(),
            "playwright-core is missing from e2e/browser/node_modules: run `npm ci --prefix e2e/browser` (scripts/test does)"
        );
        assert!(
            Path::new("/usr/bin/chromium").exists(),
            "/usr/bin/chromium is missing: apt-get install chromium (scripts/test does)"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join("console.mjs"))
            .arg(scenario)
            .env("CONSOLE_TEST", cfg.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is missing: install Debian's nodejs (Node.js 20 or newer)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Browser {
            child,
            stdin,
            stdout,
            passed: Vec::new(),
        }
    }

    /// The next step the page waits for, or `None` when the script is done.
    async fn next_step(&mut self) -> Option<String> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(120), self.stdout.next_line())
                .await
                .expect("the browser script printed nothing for 2 minutes")
                .expect("read the browser script's output")?;
            eprintln!("browser: {line}");
            if let Some(step) = line.strip_prefix("STEP ") {
                return Some(step.to_owned());
            }
            if let Some(p) = line.strip_prefix("PASS ") {
                self.passed.push(p.to_owned());
            }
        }
    }

    async fn ok(&mut self, value: &str) {
        self.stdin
            .write_all(format!("OK {value}\n").as_bytes())
            .await
            .expect("answer the browser script");
    }

    /// Waits for the script to end; panics with its error unless every check passed.
    async fn finish(mut self) -> Vec<String> {
        if let Some(step) = self.next_step().await {
            panic!("the browser script asked for a step this test does not know: {step}");
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .expect("the browser script exits")
            .expect("wait for node");
        assert!(
            status.success(),
            "the browser script failed ({status}):\n{err}\npassed before: {:#?}",
            self.passed
        );
        self.passed
    }
}

/// A gateway process with two callers (`ops` for every tenant, `acme-ops` for `acme`).
async fn gateway(pki: &Pki, env: &[(&str, &str)]) -> GatewayProcess {
    let any = "127.0.0.1:0".parse().expect("addr");
    GatewayProcess::spawn_env_at(pki, any, AUTH, env).await
}

/// `tetherctl console` as `files`: the link it prints.
fn login_link(gw: &GatewayProcess, files: &CertFiles) -> String {
    let out = tetherctl_at(gw.northbound, files)
        .args(["console", "--no-browser"])
        .env_remove("BROWSER")
        .output()
        .expect("run tetherctl console");
    assert!(
        out.status.success(),
        "tetherctl console: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    assert!(
        link.starts_with(&format!("https://{}/ui/login?code=", gw.northbound)),
        "{link}"
    );
    link
}

/// Where the browser writes its screenshots: `target/console-shots`, or the directory named by
/// `TETHER_CONSOLE_SHOTS` (relative to the repository). The docs' own are refreshed with
/// `TETHER_CONSOLE_SHOTS=docs/console cargo nextest run -p tether-e2e --test console`, so that a
/// test run does not rewrite files in the source tree.
fn shots() -> String {
    let dir = match std::env::var("TETHER_CONSOLE_SHOTS") {
        Ok(d) if !d.is_empty() => repo().join(d),
        _ => repo().join("target/console-shots"),
    };
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir.display().to_string()
}

async fn agents(
    gw: &GatewayProcess,
    pki: &Pki,
) -> tether_api::v1::agents_client::AgentsClient<tonic::transport::Channel> {
    v1::agents_client::AgentsClient::new(gw.channel(&pki.client("ops")).await)
}

async fn wait_connected(gw: &GatewayProcess, pki: &Pki, id: &str, connected: bool) {
    let mut client = agents(gw, pki).await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let now = client
            .get(v1::GetAgentRequest { agent: id.into() })
            .await
            .map(|a| a.into_inner().connected)
            .unwrap_or(false);
        if now == connected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} connected={connected} within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config_of(gw: &GatewayProcess, pki: &Pki, id: &str) -> AgentConfig {
    let mut cfg = agent_config(&pki.agent(id), gw.tunnel);
    cfg.labels.insert("region".into(), "eu-west".into());
    cfg
}

async fn spawn_agent(gw: &GatewayProcess, pki: &Pki, id: &str) -> AgentProcess {
    spawn_with(gw, pki, id, &config_of(gw, pki, id)).await
}

async fn spawn_with(gw: &GatewayProcess, pki: &Pki, id: &str, cfg: &AgentConfig) -> AgentProcess {
    let a = AgentProcess::spawn(cfg);
    wait_connected(gw, pki, id, true).await;
    a
}

/// Allow-lists `name` (`kind`) at an address nothing listens on: the console shows names and
/// kinds only, and no call goes there.
fn allow(cfg: &mut AgentConfig, name: &str, kind: ServiceKind) {
    let address = match kind {
        ServiceKind::Grpc => "http://127.0.0.1:9".to_owned(),
        ServiceKind::Tcp => "127.0.0.1:9".to_owned(),
    };
    cfg.services.insert(
        name.into(),
        ServiceConfig {
            address,
            kind,
            ca: None,
            server_name: None,
        },
    );
}

/// `Agents/Get` of `id`.
async fn get_agent(gw: &GatewayProcess, pki: &Pki, id: &str) -> v1::Agent {
    agents(gw, pki)
        .await
        .get(v1::GetAgentRequest { agent: id.into() })
        .await
        .expect("get agent")
        .into_inner()
}

/// The services `Agents/Get` says `id` allow-lists, `name (kind)`, sorted.
async fn services_of(gw: &GatewayProcess, pki: &Pki, id: &str) -> Vec<String> {
    let a = get_agent(gw, pki, id).await;
    let mut s: Vec<String> = a
        .sessions
        .iter()
        .flat_map(|s| {
            s.services
                .iter()
                .map(|e| format!("{} ({})", e.name, e.kind))
        })
        .collect();
    s.sort();
    s.dedup();
    s
}

/// Relayed calls and bytes each way `Agents/Get` reports for `id`.
async fn traffic_of(gw: &GatewayProcess, pki: &Pki, id: &str) -> (u64, u64, u64) {
    let a = get_agent(gw, pki, id).await;
    (
        a.relayed_calls,
        a.relayed_bytes_to_agent,
        a.relayed_bytes_from_agent,
    )
}

/// One relayed `AgentInfo/Get` to `service` of `agent` as `ops`; whether it was answered.
async fn call(gw: &GatewayProcess, pki: &Pki, agent: &str, service: &str) -> bool {
    let ch = gw.channel(&pki.client("ops")).await;
    let mut info = tether_api::agent::v1::agent_info_client::AgentInfoClient::with_interceptor(
        ch,
        Route::new(Some(agent), Some(service)),
    );
    info.get(tether_api::agent::v1::GetAgentInfoRequest {})
        .await
        .is_ok()
}

async fn stop_agent(mut a: AgentProcess) {
    a.signal(nix::sys::signal::Signal::SIGTERM);
    a.exit_within(T).await;
}

async fn submit(gw: &GatewayProcess, pki: &Pki, agent: &str) -> String {
    v1::commands_client::CommandsClient::new(gw.channel(&pki.client("ops")).await)
        .submit(v1::SubmitCommandRequest {
            agent: agent.into(),
            kind: "echo".into(),
            payload: b"hi".to_vec(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .id
}

#[tokio::test]
async fn console_login_live_fleet_command_progress_and_revoke_in_chromium() {
    init();
    let pki = Pki::new();
    let gw = gateway(&pki, &[]).await;
    let mut running = Vec::new();
    // acme/eu-1 allow-lists two services (a reload adds a third, below).
    let mut eu1 = config_of(&gw, &pki, "acme/eu-1");
    allow(&mut eu1, "billing", ServiceKind::Grpc);
    allow(&mut eu1, "db", ServiceKind::Tcp);
    running.push(spawn_with(&gw, &pki, "acme/eu-1", &eu1).await);
    for id in ["acme/eu-2", "beta/us-1"] {
        running.push(spawn_agent(&gw, &pki, id).await);
    }
    // acme/two-ways dials two gateway addresses, one where nothing answers: it wants two
    // sessions and holds one.
    let nothing = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a silent port");
    let mut two = config_of(&gw, &pki, "acme/two-ways");
    two.gateways
        .push(nothing.local_addr().expect("addr").to_string());
    running.push(spawn_with(&gw, &pki, "acme/two-ways", &two).await);
    // Two relayed calls to acme/eu-1: one answered, one to a service it does not allow-list.
    for (service, ok) in [("agent", true), ("nope", false)] {
        assert_eq!(call(&gw, &pki, "acme/eu-1", service).await, ok, "{service}");
    }
    let (calls, to, from) = traffic_of(&gw, &pki, "acme/eu-1").await;
    assert_eq!(calls, 2, "Agents/Get counts the relayed calls");
    assert!(
        to > 0 && from > 0,
        "and their bytes each way: {to} to, {from} from"
    );
    let base = format!("https://{}", gw.northbound);
    let link = login_link(&gw, &pki.client("ops"));
    let mut b = Browser::start(
        "ops",
        serde_json::json!({"base": base, "link": link, "shots": shots()}),
    );
    let mut new_agent = None;
    let mut command = String::new();
    while let Some(step) = b.next_step().await {
        match step.as_str() {
            "start acme/new-1" => new_agent = Some(spawn_agent(&gw, &pki, "acme/new-1").await),
            "stop acme/new-1" => {
                stop_agent(new_agent.take().expect("started")).await;
                wait_connected(&gw, &pki, "acme/new-1", false).await;
            }
            s if s.starts_with("command ") => command = s["command ".len()..].to_owned(),
            "call acme/eu-1" => assert!(call(&gw, &pki, "acme/eu-1", "agent").await),
            "reload acme/eu-1" => {
                // The allow-list grows by `ledger`: the gateway hears of it in a heartbeat.
                allow(&mut eu1, "ledger", ServiceKind::Grpc);
                running[0].rewrite_config(&eu1);
                running[0].signal(nix::sys::signal::Signal::SIGHUP);
                let want = ["billing (grpc)", "db (tcp)", "ledger (grpc)"];
                let deadline = tokio::time::Instant::now() + T;
                while services_of(&gw, &pki, "acme/eu-1").await != want {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "Agents/Get lists the reloaded allow-list within {T:?}: {:?}",
                        services_of(&gw, &pki, "acme/eu-1").await
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            "submit acme/eu-1" => {
                let id = submit(&gw, &pki, "acme/eu-1").await;
                b.ok(&id).await;
                continue;
            }
            "revoked acme/eu-2" => {}
            other => panic!("unknown step {other}"),
        }
        b.ok("").await;
    }
    let passed = b.finish().await;
    assert!(passed.len() >= 22, "{passed:#?}");
    drop(nothing);

    // What the page did went through the API's own methods, audited as theirs.
    let c = v1::commands_client::CommandsClient::new(gw.channel(&pki.client("ops")).await)
        .get(v1::GetCommandRequest {
            id: command.clone(),
        })
        .await
        .expect("the command the page submitted")
        .into_inner();
    assert_eq!(c.state, v1::CommandState::Succeeded as i32);
    assert_eq!(c.agent, "acme/eu-1");
    let logs = gw.logs();
    let audited = |method: &str, needle: &str| {
        logs.lines().any(|l| {
            l.contains("tether::audit")
                && l.contains(method)
                && l.contains(needle)
                && l.contains("\"caller\":\"ops\"")
        })
    };
    assert!(
        audited("tether.v1.Commands/Submit", &command),
        "submit audited"
    );
    assert!(
        audited("tether.v1.Agents/Revoke", "key leaked (console test)"),
        "revoke audited like its gRPC twin:\n{logs}"
    );
    wait_connected(&gw, &pki, "acme/eu-2", false).await;
    for a in running {
        stop_agent(a).await;
    }
}

#[tokio::test]
async fn forged_and_replayed_links_cross_origin_posts_and_revoked_callers_are_refused_in_chromium()
{
    init();
    let pki = Pki::new();
    let gw = gateway(&pki, &[]).await;
    let agent = spawn_agent(&gw, &pki, "acme/eu-1").await;
    let base = format!("https://{}", gw.northbound);
    let link = login_link(&gw, &pki.client("ops"));
    let link2 = login_link(&gw, &pki.client("acme-ops"));
    let mut b = Browser::start(
        "refusals",
        serde_json::json!({"base": base, "link": link, "link2": link2, "shots": shots()}),
    );
    while let Some(step) = b.next_step().await {
        assert_eq!(step, "revoke acme-ops");
        v1::callers_client::CallersClient::new(gw.channel(&pki.client("ops")).await)
            .revoke(v1::RevokeCallerRequest {
                name: "acme-ops".into(),
                reason: "console test".into(),
                ..Default::default()
            })
            .await
            .expect("revoke acme-ops");
        b.ok("").await;
    }
    let passed = b.finish().await;
    assert!(
        passed
            .iter()
            .any(|p| p.contains("replayed login link is refused"))
    );
    assert!(
        passed
            .iter()
            .any(|p| p.contains("cross-origin POST is refused"))
    );
    stop_agent(agent).await;
}

#[tokio::test]
async fn an_expired_console_cookie_is_refused_in_chromium() {
    init();
    let pki = Pki::new();
    // Long enough that the login's own redirect is surely inside it on a loaded machine.
    let gw = gateway(&pki, &[("TETHER_NORTHBOUND_CONSOLE_SESSION_TTL", "5s")]).await;
    let base = format!("https://{}", gw.northbound);
    let link = login_link(&gw, &pki.client("ops"));
    let passed = Browser::start("expiry", serde_json::json!({"base": base, "link": link}))
        .finish()
        .await;
    assert!(passed.iter().any(|p| p == "an expired cookie is refused"));
}

#[tokio::test]
async fn a_caller_scoped_to_one_tenant_sees_only_its_agents_commands_and_counts_in_chromium() {
    init();
    let pki = Pki::new();
    let gw = gateway(&pki, &[]).await;
    let mut running = Vec::new();
    for id in ["acme/eu-1", "beta/us-1", "beta/us-2"] {
        running.push(spawn_agent(&gw, &pki, id).await);
    }
    let own = submit(&gw, &pki, "acme/eu-1").await;
    let other = submit(&gw, &pki, "beta/us-1").await;
    let base = format!("https://{}", gw.northbound);
    let link = login_link(&gw, &pki.client("acme-ops"));
    let mut b = Browser::start(
        "scoped",
        serde_json::json!({"base": base, "link": link, "shots": shots(),
            "own_command": own, "other_command": other}),
    );
    while let Some(step) = b.next_step().await {
        match step.as_str() {
            "start beta/late then acme/late" => {
                running.push(spawn_agent(&gw, &pki, "beta/late").await);
                running.push(spawn_agent(&gw, &pki, "acme/late").await);
            }
            other => panic!("unknown step {other}"),
        }
        b.ok("").await;
    }
    let passed = b.finish().await;
    assert!(
        passed.iter().any(|p| p.contains("never shows")),
        "{passed:#?}"
    );
    for a in running {
        stop_agent(a).await;
    }
}
