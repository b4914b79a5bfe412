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
        "rolling",
        "--agents",
        "--gateway",
        "--replicas",
        "--forwarded",
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

#[test]
fn replica_options_that_cannot_work_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], says: &str| {
        let out = Command::new(BIN)
            .args(["run", "--agents", "1", "--no-progress", "--out"])
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    };
    refused(&["--forwarded", "0.5"], "--replicas 2 or more");
    refused(
        &["--replicas", "3", "--forwarded", "1.5"],
        "between 0 and 1",
    );
    refused(&["--replicas", "0"], "--replicas must be at least 1");
    refused(
        &[
            "--replicas",
            "2",
            "--gateway",
            "127.0.0.1:9",
            "--northbound",
            "127.0.0.1:9",
            "--pki",
            "/nonexistent",
        ],
        "drop --gateway",
    );
    refused(
        &[
            "--scenario",
            "rolling",
            "--gateway",
            "127.0.0.1:9",
            "--northbound",
            "127.0.0.1:9",
            "--pki",
            "/nonexistent",
        ],
        "rolling",
    );
    // Nothing was started: no PKI, no report.
    assert!(!dir.path().join("pki").exists() && !dir.path().join("report.json").exists());
}
