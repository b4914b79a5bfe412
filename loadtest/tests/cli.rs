//! The binary's command line (this test also makes `cargo test --workspace` build the binary
//! that `e2e/tests/loadtest_smoke.rs` runs).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tether-loadtest");

#[test]
fn run_help_lists_every_scenario() {
    let out = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "ramp",
        "broadcast",
        "commands",
        "storm",
        "soak",
        "--agents",
        "--gateway",
    ] {
        assert!(help.contains(s), "{s} missing from:\n{help}");
    }
}

#[test]
fn storm_against_an_existing_gateway_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "run",
            "--agents",
            "1",
            "--scenario",
            "storm",
            "--no-progress",
        ])
        .args([
            "--gateway",
            "127.0.0.1:9",
            "--northbound",
            "127.0.0.1:9",
            "--pki",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storm"), "{err}");
}
