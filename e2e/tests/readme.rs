//! The README's "Running it for real", as written: its PKI commands, its `gateway.toml` and
//! `agent.toml` examples and its `tetherctl` lines, run with the real binaries on loopback. Only
//! what the README itself says to change for one machine is changed (the gateway's names, the
//! addresses and ports, `state_dir`, and the services' addresses); so the README cannot drift
//! from what the binaries accept.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use tether_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first fenced block of `lang` after the line `after` in `text`.
fn block(text: &str, after: &str, lang: &str) -> String {
    let rest = &text[text
        .find(after)
        .unwrap_or_else(|| panic!("the README has no {after:?}"))..];
    let open = format!("```{lang}\n");
    let start = rest
        .find(&open)
        .unwrap_or_else(|| panic!("no ```{lang} block after {after:?}"))
        + open.len();
    let end = rest[start..].find("```\n").expect("the block ends") + start;
    rest[start..end].to_owned()
}

/// The shell lines of `sh` starting with `prefix`, continuations joined, comments dropped,
/// split into words.
fn commands(sh: &str, prefix: &str) -> Vec<Vec<String>> {
    let joined = sh.replace("\\\n", " ");
    joined
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim())
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Replaces `from` (which must be there) by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the README's example no longer has {from:?}:\n{text}"
    );
    text.replace(from, to)
}

async fn run(bin: &str, args: &[String], dir: &Path) -> Output {
    tokio::time::timeout(
        T,
        tokio::process::Command::new(binary(bin))
            .args(args)
            .current_dir(dir)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{bin} {args:?} did not finish"))
    .expect("run")
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A long-running binary, its output in `dir/<log>`.
fn spawn(bin: &str, args: &[&str], dir: &Path, log: &str) -> tokio::process::Child {
    let out = std::fs::File::create(dir.join(log)).expect("log file");
    tokio::process::Command::new(binary(bin))
        .args(args)
        .current_dir(dir)
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"))
}

fn free_tcp() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_it_for_real_works_as_the_readme_writes_it() {
    let text = readme();
    let sh = block(&text, "## Running it for real", "sh");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // 1. PKI, naming the loopback addresses as the README's comment says for one machine.
    let pki = commands(&sh, "tether-gateway pki");
    assert!(pki.len() >= 3, "the README's PKI lines: {pki:?}");
    for mut cmd in pki {
        let line = cmd.join(" ");
        if cmd[2] == "init" {
            assert!(line.contains("--gateway-name"), "{line}");
            cmd.retain({
                let mut skip = false;
                move |w| {
                    if skip {
                        skip = false;
                        return false;
                    }
                    if w == "--gateway-name" {
                        skip = true;
                        return false;
                    }
                    true
                }
            });
            cmd.extend(
                ["--gateway-name", "localhost", "--gateway-name", "127.0.0.1"].map(String::from),
            );
        }
        let o = run("tether-gateway", &cmd[1..], d).await;
        assert!(o.status.success(), "{line}: {}", said(&o));
    }

    // 2. The gateway, on the README's gateway.toml (free loopback ports instead of 7443, 7444
    //    and 9090).
    let tunnel = restartable_port(std::net::Ipv4Addr::LOCALHOST.into());
    let northbound = free_tcp();
    let ops = free_tcp();
    let mut gw_toml = block(&text, "`gateway.toml`:", "toml");
    gw_toml = edit(&gw_toml, "\"0.0.0.0:7443\"", &format!("\"{tunnel}\""));
    gw_toml = edit(&gw_toml, "\"0.0.0.0:7444\"", &format!("\"{northbound}\""));
    gw_toml = edit(&gw_toml, "\"127.0.0.1:9090\"", &format!("\"{ops}\""));
    std::fs::write(d.join("gateway.toml"), &gw_toml).unwrap();
    let serve = commands(&sh, "tether-gateway serve");
    assert_eq!(serve.len(), 1, "{sh}");
    let mut check = serve[0][1..].to_vec();
    check.push("--check-config".into());
    let o = run("tether-gateway", &check, d).await;
    assert!(o.status.success(), "gateway --check-config: {}", said(&o));
    let serve_args: Vec<&str> = serve[0][1..].iter().map(String::as_str).collect();
    let mut gateway = spawn("tether-gateway", &serve_args, d, "gateway.log");

    // 3. The agent, on the README's agent.toml, next to the files issue-agent wrote; its
    //    services pointed at what runs here (a TCP echo as `db`).
    let agent_dir = d.join("acme-eu-1");
    let echo = tcp_echo_server().await;
    let state = d.join("state");
    let mut agent_toml = block(&text, "`agent.toml`:", "toml");
    agent_toml = edit(
        &agent_toml,
        "[\"gw.example.com:7443\"]",
        &format!("[\"{tunnel}\"]"),
    );
    agent_toml = edit(
        &agent_toml,
        "\"/var/lib/tether\"",
        &format!("\"{}\"", state.display()),
    );
    agent_toml = edit(
        &agent_toml,
        "\"127.0.0.1:9091\"",
        &format!("\"{}\"", free_tcp()),
    );
    agent_toml = edit(
        &agent_toml,
        "\"postgres.internal:5432\"",
        &format!("\"{echo}\""),
    );
    // The payments service's own CA, which the example names: any CA bundle will do here.
    std::fs::copy(agent_dir.join("ca.pem"), agent_dir.join("payments-ca.pem")).unwrap();
    std::fs::write(agent_dir.join("agent.toml"), &agent_toml).unwrap();
    let run_agent = commands(&sh, "tether-agent run");
    assert_eq!(run_agent.len(), 1, "{sh}");
    let mut check = run_agent[0][1..].to_vec();
    check.push("--check-config".into());
    let o = run("tether-agent", &check, &agent_dir).await;
    assert!(o.status.success(), "agent --check-config: {}", said(&o));
    let agent_args: Vec<&str> = run_agent[0][1..].iter().map(String::as_str).collect();
    let mut agent = spawn("tether-agent", &agent_args, &agent_dir, "agent.log");

    // 4. The control plane: the README's tetherctl line, at the loopback address.
    let ctl = commands(&sh, "tetherctl --northbound");
    assert_eq!(ctl.len(), 1, "{sh}");
    let mut flags = ctl[0][1..].to_vec();
    let at = flags.iter().position(|w| w == "--northbound").unwrap() + 1;
    flags[at] = northbound.to_string();
    assert_eq!(flags.last().map(String::as_str), Some("list"), "{flags:?}");
    let base: Vec<String> = flags[..flags.len() - 2].to_vec();
    let ctl_args = |rest: &[&str]| -> Vec<String> {
        let mut a = vec!["--dev-json".to_owned(), "/nonexistent".to_owned()];
        a.extend(base.iter().cloned());
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    };
    let deadline = Instant::now() + T;
    loop {
        let o = run("tetherctl", &ctl_args(&["agents", "list"]), d).await;
        if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("acme/eu-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acme/eu-1 never listed: {}\ngateway: {}\nagent: {}",
            said(&o),
            std::fs::read_to_string(d.join("gateway.log")).unwrap_or_default(),
            std::fs::read_to_string(agent_dir.join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The README's doctor line, next to the agent: it can connect.
    let doctor = commands(&sh, "tether-agent doctor");
    assert_eq!(doctor.len(), 1, "{sh}");
    let o = run("tether-agent", &doctor[0][1..], &agent_dir).await;
    assert!(o.status.success(), "tether-agent doctor: {}", said(&o));
    assert!(
        said(&o).contains("result: the agent can connect"),
        "{}",
        said(&o)
    );

    // `forward acme/eu-1 db <port>`, as the README shows it (another local port).
    let fwd_line = commands(&sh, "tetherctl ... forward");
    assert_eq!(fwd_line.len(), 1, "{sh}");
    assert_eq!(&fwd_line[0][2..5], ["forward", "acme/eu-1", "db"]);
    let local = free_tcp();
    let fwd_args = ctl_args(&["forward", "acme/eu-1", "db", &local.port().to_string()]);
    let fwd_args: Vec<&str> = fwd_args.iter().map(String::as_str).collect();
    let mut forward = spawn("tetherctl", &fwd_args, d, "forward.log");
    let deadline = Instant::now() + T;
    let mut conn = loop {
        if let Ok(c) = tokio::net::TcpStream::connect(local).await {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "forward never listened: {}",
            std::fs::read_to_string(d.join("forward.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    conn.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    tokio::time::timeout(T, conn.read_exact(&mut back))
        .await
        .expect("the echo answers")
        .expect("read");
    assert_eq!(&back, b"through the tunnel");
    drop(conn);
    let _ = forward.start_kill();

    // A command, as the Commands section writes it (to this agent).
    let o = run(
        "tetherctl",
        &ctl_args(&["commands", "submit", "acme/eu-1", "echo", "hi", "-w"]),
        d,
    )
    .await;
    assert!(o.status.success(), "commands submit -w: {}", said(&o));

    // Revocation, last: the agent's session closes.
    let o = run(
        "tetherctl",
        &ctl_args(&["agents", "revoke", "acme/eu-1", "--reason", "key leaked"]),
        d,
    )
    .await;
    assert!(o.status.success(), "agents revoke: {}", said(&o));

    let _ = agent.start_kill();
    let _ = gateway.start_kill();
    let _ = agent.wait().await;
    let _ = gateway.wait().await;
}
