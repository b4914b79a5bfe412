//! The `tether-gateway` binary: config errors exit 64 naming the key; pki writes what it says.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn gw(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether-gateway"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run tether-gateway")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pki_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let o = gw(
        &[
            "pki",
            "init",
            "--dir",
            d.path().to_str().unwrap(),
            "--trust-domain",
            "td.example",
            "--gateway-name",
            "localhost",
            "--gateway-name",
            "127.0.0.1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    d
}

fn config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("gateway.toml");
    std::fs::write(
        &p,
        format!("trust_domain = \"td.example\"\n[tls]\nca = \"ca.pem\"\ncert = \"gateway.pem\"\nkey = \"gateway-key.pem\"\n{extra}"),
    )
    .unwrap();
    p
}

#[test]
fn valid_config_checks_ok() {
    let d = pki_dir();
    let p = config(d.path(), "[tunnel]\nheartbeat_interval = \"5s\"\n");
    let o = gw(
        &["serve", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn unknown_key_exits_64_naming_the_key() {
    let d = pki_dir();
    let o = check_config(d.path(), "[tunnel]\nheartbeat_intervall = \"5s\"\n");
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(
        e.contains("heartbeat_intervall") && e.contains("tunnel"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one readable line: {e}");
}

#[test]
fn invalid_value_exits_64_naming_the_key() {
    let d = pki_dir();
    let o = check_config(d.path(), "[tunnel]\nheartbeat_interval = \"often\"\n");
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("tunnel.heartbeat_interval"),
        "{}",
        stderr(&o)
    );
}

/// `serve --check-config` of a config with `extra` appended.
fn check_config(dir: &std::path::Path, extra: &str) -> Output {
    let p = config(dir, extra);
    gw(
        &["serve", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    )
}

#[test]
fn a_min_version_that_is_not_a_semantic_version_exits_64_naming_the_key() {
    let d = pki_dir();
    let o = check_config(d.path(), "[agents]\nmin_version = \"1.2\"\n");
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("agents.min_version") && e.contains("MAJOR.MINOR.PATCH"),
        "{e}"
    );
    let o = check_config(d.path(), "[agents]\nmin_version = \"0.1.0\"\n");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn invalid_value_from_env_and_flag_exit_64_naming_key_and_source() {
    let d = pki_dir();
    let p = config(d.path(), "");
    let o = gw(
        &["serve", "--config", p.to_str().unwrap(), "--check-config"],
        &[("TETHER_NORTHBOUND_LISTEN", "not-an-address")],
    );
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(
        e.contains("northbound.listen") && e.contains("TETHER_NORTHBOUND_LISTEN"),
        "{e}"
    );
    let o = gw(
        &[
            "serve",
            "--config",
            p.to_str().unwrap(),
            "--check-config",
            "--set",
            "tunnel.heartbeat_interval=1ms",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("tunnel.heartbeat_interval"),
        "{}",
        stderr(&o)
    );
    let o = gw(
        &[
            "serve",
            "--config",
            p.to_str().unwrap(),
            "--check-config",
            "--set",
            "tunnel.nope=1",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("tunnel.nope"), "{}", stderr(&o));
}

#[test]
fn missing_certificate_file_exits_64_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = config(d.path(), "");
    let o = gw(
        &["serve", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("ca.pem"), "{}", stderr(&o));
}

#[test]
fn pki_issues_agent_and_client_certificates_with_private_keys_0600() {
    let d = pki_dir();
    let out = d.path().join("agent-out");
    let o = gw(
        &[
            "pki",
            "issue-agent",
            "--dir",
            d.path().to_str().unwrap(),
            "--tenant",
            "acme",
            "--agent",
            "eu-1",
            "--out",
            out.to_str().unwrap(),
            "--ttl",
            "2h",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let msg = String::from_utf8_lossy(&o.stdout);
    assert!(
        msg.contains("spiffe://td.example/tenant/acme/agent/eu-1") && msg.contains("2h"),
        "{msg}"
    );
    for (f, mode) in [
        ("agent.pem", 0o644),
        ("agent-key.pem", 0o600),
        ("ca.pem", 0o644),
    ] {
        let m = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{f}");
    }
    for f in ["ca-key.pem", "gateway-key.pem"] {
        assert_eq!(
            std::fs::metadata(d.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{f}"
        );
    }
    let out = d.path().join("client-out");
    let o = gw(
        &[
            "pki",
            "issue-client",
            "--dir",
            d.path().to_str().unwrap(),
            "--name",
            "api",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("spiffe://td.example/controlplane/api"));
    assert!(out.join("client.pem").exists());

    let o = gw(
        &[
            "pki",
            "issue-agent",
            "--dir",
            d.path().to_str().unwrap(),
            "--tenant",
            "ac me",
            "--agent",
            "x",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("tenant"), "{}", stderr(&o));
}

#[test]
fn a_second_gateway_on_the_same_data_dir_refuses_to_start_naming_the_first() {
    use std::io::BufRead as _;
    let d = pki_dir();
    let p = config(
        d.path(),
        "[tunnel]\nlisten = \"127.0.0.1:0\"\n[northbound]\nlisten = \"127.0.0.1:0\"\n[ops]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut first = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--config",
            p.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(first.stderr.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("gateway listening"));
    assert!(listening, "the first gateway did not start");
    let second = gw(&["serve", "--config", p.to_str().unwrap()], &[]);
    let _ = first.kill();
    let _ = first.wait();
    assert!(!second.status.success());
    let e = stderr(&second);
    assert!(
        e.contains("in use by another tether-gateway process")
            && e.contains(&format!("pid {}", first.id()))
            && e.contains("store.dsn"),
        "{e}"
    );
    // The first is gone (killed, no clean-up): the directory is free again.
    let mut again = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--config",
            p.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::io::BufReader::new(again.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("gateway listening"));
    let _ = again.kill();
    let _ = again.wait();
    assert!(
        started,
        "a data_dir left by a killed gateway must not block the next"
    );
}

#[test]
fn a_peer_ca_key_that_is_not_a_ca_of_tls_ca_exits_64_naming_the_key() {
    let d = pki_dir();
    let cluster =
        "[store]\ndsn = \"postgres://u:p@127.0.0.1:1/db\"\n[cluster]\nreplica_id = \"r1\"\n";
    // The gateway's own key is no CA key: refused, saying what the key must be.
    let p = config(
        d.path(),
        &format!("{cluster}peer_ca_key = \"gateway-key.pem\"\n"),
    );
    let o = gw(
        &["serve", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("cluster.peer_ca_key") && e.contains("tls.ca"),
        "{e}"
    );
    // The CA's key issues this replica its peer certificate.
    let p = config(
        d.path(),
        &format!("{cluster}peer_ca_key = \"ca-key.pem\"\n"),
    );
    let o = gw(
        &["serve", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}
