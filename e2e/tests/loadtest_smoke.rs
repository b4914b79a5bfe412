//! Short runs of the load test: `tether-loadtest run` with 200 agents against a debug gateway
//! it starts on loopback ports picked at run time, scenarios ramp, broadcast and commands; and
//! with 60 agents over two replicas on a local PostgreSQL (Debian's `postgresql`), a share of
//! the calls sent to the replica without the agent's session (forwarded), and a rolling restart;
//! and with 30 agents keeping two sessions each over three replicas, a rolling restart under
//! load that fails no unary call and loses no command. The full runs (10,000 agents, storm,
//! soak) are in docs/PERFORMANCE.md, not in the suite.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_over_two_replicas_spreads_agents_reports_each_replica_and_counts_a_rolling_restart()
 {
    let out = tempfile::tempdir().expect("tempdir");
    let r = run_loadtest(
        out.path(),
        &[
            "--agents",
            "60",
            "--replicas",
            "2",
            "--scenario",
            "ramp,broadcast,commands,rolling",
            "--no-progress",
            "--heartbeat",
            "2s",
            "--settle",
            "1s",
            "--idle-window",
            "2s",
            "--sample-every",
            "250ms",
            "--unary-calls",
            "60",
            "--bulk-agents",
            "2",
            "--bulk-kib",
            "128",
            "--drain-timeout",
            "1s",
            "--rolling-rate",
            "40",
            "--rolling-pause",
            "1s",
            "--soak-command-share",
            "0.1",
            "--forwarded",
            "0.3",
            // One session per agent: a replica without it is there to forward to.
            "--agent-connections",
            "1",
        ],
        "the two-replica run",
    )
    .await;
    assert_eq!(r["replica_count"], 2);
    assert_eq!(r["ramp"]["connected"], 60, "{:#}", r["ramp"]);
    // Round robin: 30 sessions on each replica, as the gateways list them, and each replica's
    // memory and CPU measured.
    let replicas = r["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{replicas:#?}");
    for (x, id) in replicas.iter().zip(["r1", "r2"]) {
        assert_eq!(x["id"], id, "{x:#}");
        assert_eq!(x["sessions"], 30, "{x:#}");
        assert!(x["rss_idle_kib"].as_u64().unwrap() > 0, "{x:#}");
        assert!(x["idle_cpu_pct"].as_f64().is_some(), "{x:#}");
        assert!(x["relay_calls"].as_f64().is_some(), "{x:#}");
    }
    let per_sample = r["series"].as_array().expect("series");
    assert!(
        per_sample
            .iter()
            .all(|s| s["replicas"].as_array().unwrap().len() == 2)
    );
    // Before the restarts every call succeeds, the ones sent to the replica holding the agent's
    // session and the ones (--forwarded 0.3) sent to the other, which forwards them over its
    // peer link: their latencies are reported apart.
    let b = &r["broadcast"];
    assert_eq!(b["broadcast"]["ok"], 60, "{:#}", b["broadcast"]);
    assert_eq!(b["unary_local"]["errors"], 0, "{:#}", b["unary_local"]);
    assert!(b["unary_local"]["calls"].as_u64().unwrap() > 0, "{b:#}");
    assert_eq!(
        b["unary_forwarded"]["errors"], 0,
        "{:#}",
        b["unary_forwarded"]
    );
    assert!(b["unary_forwarded"]["calls"].as_u64().unwrap() > 0, "{b:#}");
    assert!(
        b["unary_forwarded"]["latency"]["p50_us"].as_u64().unwrap() > 0,
        "{b:#}"
    );
    assert_eq!(r["commands"]["succeeded"], 60, "{:#}", r["commands"]);
    // The gateways' own count of forwarded streams is read (peer links on), and the report
    // says what it covers after the restarts.
    let f = &r["forwarding"];
    assert_eq!(
        f["gateway_metrics"][0], "tether_gateway_peer_forwarded_streams_total{direction=\"out\"}",
        "{f:#}"
    );
    assert!(
        replicas.iter().all(|x| x["forwarded"].as_f64().is_some()),
        "{replicas:#?}"
    );
    let not_measured = f["not_measured"].as_array().unwrap();
    assert!(
        not_measured
            .iter()
            .any(|w| w.as_str().unwrap().contains("restart with their process")),
        "{not_measured:?}"
    );
    // The rolling restart: both replicas stopped (drained, not killed) and back, under load; every
    // call and command counted one way or the other (the failures are the drain's to remove).
    let x = &r["rolling"];
    let restarts = x["restarts"].as_array().expect("restarts");
    assert_eq!(
        restarts
            .iter()
            .map(|k| k["replica"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["r1", "r2"],
        "{x:#}"
    );
    for k in restarts {
        assert_eq!(k["killed"], false, "{k:#}");
        assert!(
            k["down_s"].as_f64().unwrap() >= k["stop_s"].as_f64().unwrap(),
            "{k:#}"
        );
    }
    let calls = x["rpc"]["calls"].as_u64().unwrap();
    assert!(calls > 40, "{x:#}");
    assert_eq!(
        x["rpc"]["ok"].as_u64().unwrap() + x["rpc"]["errors"].as_u64().unwrap(),
        calls,
        "{x:#}"
    );
    let submitted = x["commands_submitted"].as_u64().unwrap();
    assert!(submitted > 0, "{x:#}");
    assert_eq!(
        x["commands_refused"].as_u64().unwrap()
            + x["commands_succeeded"].as_u64().unwrap()
            + x["commands_lost"].as_u64().unwrap(),
        submitted,
        "{x:#}"
    );
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        md.contains("## Replicas") && md.contains("## rolling"),
        "{md}"
    );
    assert!(
        md.contains("unary, sent to another replica (forwarded)"),
        "{md}"
    );
    for f in [
        "connected.svg",
        "gateway-rss.svg",
        "cpu.svg",
        "latency-cdf.svg",
    ] {
        let svg = std::fs::read_to_string(out.path().join(f)).unwrap();
        // One legend entry per replica; the restarts are marked on the time charts.
        let text = |t: &str| svg.contains(&format!("\n{t}\n</text>"));
        if f != "latency-cdf.svg" {
            assert!(text("stop r1") && text("stop r2"), "{f}");
        }
        if f == "gateway-rss.svg" {
            assert!(text("r1 RSS") && text("r2 RSS"), "{f}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_agents_with_two_sessions_over_three_replicas_fail_no_unary_call_in_a_rolling_restart()
 {
    let out = tempfile::tempdir().expect("tempdir");
    let r = run_loadtest(
        out.path(),
        &[
            "--agents",
            "30",
            "--replicas",
            "3",
            "--agent-connections",
            "2",
            "--scenario",
            "ramp,rolling",
            "--no-progress",
            "--heartbeat",
            "2s",
            "--settle",
            "1s",
            "--idle-window",
            "1s",
            "--sample-every",
            "250ms",
            "--drain-timeout",
            "1s",
            "--rolling-rate",
            "40",
            "--rolling-pause",
            "1s",
            "--soak-command-share",
            "0.1",
            "--forwarded",
            "0.3",
            "--bulk-kib",
            "128",
        ],
        "the three-replica run",
    )
    .await;
    assert_eq!(r["ramp"]["connected"], 30, "{:#}", r["ramp"]);
    // Two sessions per agent on distinct replicas: 60 in all, on every replica (about 20 each:
    // round robin, but a replica above its fair share turns some away and they land on the
    // next).
    let replicas = r["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 3, "{replicas:#?}");
    let sessions: Vec<u64> = replicas
        .iter()
        .map(|x| x["sessions"].as_u64().expect("sessions"))
        .collect();
    assert_eq!(sessions.iter().sum::<u64>(), 60, "{replicas:#?}");
    assert!(sessions.iter().all(|n| *n > 0), "{replicas:#?}");
    // Each replica drained and restarted in turn under steady load: while one is away, calls
    // go through the agents' sessions on the others (or are forwarded to them), so none fails
    // and no accepted command is lost.
    let x = &r["rolling"];
    assert_eq!(
        x["restarts"].as_array().expect("restarts").len(),
        3,
        "{x:#}"
    );
    let calls = x["rpc"]["calls"].as_u64().unwrap();
    assert!(calls > 40, "{x:#}");
    assert_eq!(x["rpc"]["errors"], 0, "{x:#}");
    assert_eq!(x["rpc"]["ok"].as_u64().unwrap(), calls, "{x:#}");
    assert!(x["commands_submitted"].as_u64().unwrap() > 0, "{x:#}");
    assert_eq!(x["commands_lost"], 0, "{x:#}");
    // Agents asked to go by a draining replica left its session (their other one being up).
    assert!(x["sessions_left"].as_u64().unwrap() > 0, "{x:#}");
}

/// Runs `tether-loadtest run ARGS` against debug gateways it starts, its report in `out`, within
/// 150 s (`what` names the run in failures); the report's JSON.
async fn run_loadtest(out: &std::path::Path, args: &[&str], what: &str) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new(binary("tether-loadtest"));
    cmd.arg("run")
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--gateway-bin")
        .arg(binary("tether-gateway"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(150), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} finished within 150s"))
        .expect("tether-loadtest ran");
    assert!(
        run.status.success(),
        "tether-loadtest failed ({what}):\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
        .expect("report.json is JSON")
}
