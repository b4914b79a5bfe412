//! A short run of the load test: `tether-loadtest run` with 200 agents against a debug gateway
//! it starts on loopback ports picked at run time, scenarios ramp, broadcast and commands. The
//! full runs (10,000 agents, storm, soak) are in docs/PERFORMANCE.md, not in the suite.

use std::time::Duration;

use tether_e2e::binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_with_200_agents_connects_all_broadcasts_without_errors_and_runs_every_command() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = tokio::process::Command::new(binary("tether-loadtest"));
    cmd.args([
        "run",
        "--agents",
        "200",
        "--scenario",
        "ramp,broadcast,commands",
    ])
    .args([
        "--no-progress",
        "--heartbeat",
        "2s",
        "--settle",
        "1s",
        "--idle-window",
        "2s",
    ])
    .args([
        "--unary-calls",
        "100",
        "--bulk-agents",
        "4",
        "--bulk-kib",
        "256",
    ])
    .arg("--out")
    .arg(out.path())
    .arg("--gateway-bin")
    .arg(binary("tether-gateway"))
    .env("RUST_LOG", "warn")
    .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(50), cmd.output())
        .await
        .expect("the smoke run finished within 50s")
        .expect("tether-loadtest ran");
    assert!(
        run.status.success(),
        "tether-loadtest failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for f in [
        "report.json",
        "report.md",
        "connected.svg",
        "latency-cdf.svg",
        "gateway-rss.svg",
        "cpu.svg",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing from the report");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .expect("report.json is JSON");
    assert_eq!(r["ramp"]["connected"], 200, "{:#}", r["ramp"]);
    assert_eq!(r["ramp"]["gateway_connected"], 200, "{:#}", r["ramp"]);
    assert!(r["ramp"]["rss_connected_kib"].as_u64().unwrap() > 0);
    let b = &r["broadcast"];
    assert_eq!(b["errors"], 0, "{:#}", b["broadcast"]);
    assert_eq!(b["broadcast"]["ok"], 200, "{:#}", b["broadcast"]);
    assert_eq!(b["unary_random"]["errors"], 0, "{:#}", b["unary_random"]);
    assert_eq!(b["bulk"]["ok"], 4, "{:#}", b["bulk"]);
    let c = &r["commands"];
    assert_eq!(c["submitted"], 200, "{c:#}");
    assert_eq!(c["succeeded"], 200, "{c:#}");
    assert_eq!(c["all_succeeded"], true, "{c:#}");
    assert!(r["series"].as_array().is_some_and(|s| !s.is_empty()));
}
