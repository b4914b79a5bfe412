//! `tether-gateway dev --check` on a fresh directory: real binaries, real PKI, exit 0.

use std::process::Command;

use tether_e2e::binary;

#[test]
fn dev_check_passes_on_a_fresh_directory_and_tetherctl_reads_dev_json() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(".tether");
    let out = Command::new(binary("tether-gateway"))
        .args(["dev", "--check", "--any-port", "--dir"])
        .arg(&state)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tether-gateway dev --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dev --check failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("agent dev/local is connected"), "{stdout}");
    assert!(stdout.contains("a call relayed to it answered"), "{stdout}");
    assert!(stdout.contains("dev check passed"), "{stdout}");

    let dev: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("dev.json")).unwrap()).unwrap();
    for key in [
        "northbound",
        "ops",
        "ca",
        "client_cert",
        "client_key",
        "agent",
    ] {
        assert!(dev.get(key).is_some(), "dev.json lacks {key}: {dev}");
    }
    assert_eq!(dev["agent"], "dev/local");

    // A second run reuses the PKI it created.
    let ca_before = std::fs::read(state.join("pki/ca.pem")).unwrap();
    let out = Command::new(binary("tether-gateway"))
        .args(["dev", "--check", "--any-port", "--dir"])
        .arg(&state)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(state.join("pki/ca.pem")).unwrap(), ca_before);

    // tetherctl reports the gateway is gone once dev has exited, naming the address.
    let out = Command::new(binary("tetherctl"))
        .args(["--dev-json"])
        .arg(state.join("dev.json"))
        .args(["agents", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the northbound API"), "{err}");
}

/// `dev --replicas 3 --check`: a local PostgreSQL, three replicas, the agent on each; the check
/// itself calls through each replica (Agents/Get showing all three sessions, and a relayed
/// Echo) and fails otherwise; this checks it passed, what it printed and wrote.
#[test]
fn dev_replicas_three_answers_through_each_replica() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(".tether");
    let out = Command::new(binary("tether-gateway"))
        .args(["dev", "--check", "--any-port", "--replicas", "3", "--dir"])
        .arg(&state)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tether-gateway dev --replicas 3 --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dev --replicas 3 --check failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 gateway replicas on PostgreSQL")
            && stdout.contains("a call relayed through each answered"),
        "{stdout}"
    );
    for i in 1..=3 {
        assert!(
            stdout.contains(&format!("replica dev-{i}  tunnel")),
            "replica dev-{i}'s addresses not printed: {stdout}"
        );
    }
    // The agent row lists the replica of each of its three sessions.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("dev/local"))
        .unwrap_or_else(|| panic!("no agent row: {stdout}"));
    for i in 1..=3 {
        assert!(row.contains(&format!("dev-{i}")), "{row}");
    }
    assert!(stdout.contains("dev check passed"), "{stdout}");
    for name in ["dev.json", "dev-2.json", "dev-3.json"] {
        assert!(state.join(name).exists(), "{name} not written");
    }
    // No PostgreSQL password in what it wrote for reference.
    let toml = std::fs::read_to_string(state.join("gateway-1.toml")).unwrap();
    assert!(
        toml.contains("dsn = \"postgres://tether@127.0.0.1:"),
        "{toml}"
    );
}
