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
