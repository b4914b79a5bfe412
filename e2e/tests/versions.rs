//! Fleet versions: `agents.min_version` refuses an older agent at `Hello` with
//! `UPGRADE_REQUIRED` and both versions (counted, and the agent's log and status say to
//! upgrade), and `Agents/List` / `tetherctl agents list` flag each session's version against
//! the gateway's own (the version-skew policy).

use std::time::Duration;

use tether_api::v1::{GetAgentRequest, VersionSkew};
use tether_e2e::hostile::{Flood, HostileAgent};
use tether_e2e::*;

const T: Duration = Duration::from_secs(20);

fn quiet() -> Flood {
    Flood {
        progress_lines: 0,
        line_bytes: 0,
        output_bytes: 0,
        message_bytes: 0,
        fail_first_attempt: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_older_than_min_version_is_refused_with_upgrade_required_and_told_why() {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    // Newer than this build: the real agent is too old for this gateway.
    cfg.agents.min_version = Some("99.0.0".into());
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let refused = || {
        metric(
            "tether_gateway_sessions_turned_away_total",
            &[("reason", "upgrade_required")],
        )
    };
    let before = refused();
    let mut acfg = agent_config(&pki.agent("acme/old"), gw.handle.tunnel_addr);
    acfg.reconnect.max_backoff = Duration::from_secs(60);
    let agent = TestAgent::start(&acfg);
    wait_until("the agent's refusal", T, || {
        agent
            .handle
            .status
            .last_error()
            .is_some_and(|e| e.contains("upgrade_required"))
    })
    .await;
    let err = agent.handle.status.last_error().unwrap();
    // What failed, both versions, the key, and what to do.
    for want in [
        tether_agent::VERSION,
        "99.0.0",
        "agents.min_version",
        "upgrade the agent",
    ] {
        assert!(err.contains(want), "agent's error {err:?} lacks {want:?}");
    }
    assert_eq!(gw.sessions_of("acme/old"), 0);
    assert!(!agent.handle.status.connected());
    assert!(refused() >= before + 1.0, "refusal not counted");
    // Refused, it waits its longest backoff (60 s here) instead of hammering.
    wait_until("the agent's next dial planned", T, || {
        !agent.handle.status.reconnect_delays().is_empty()
    })
    .await;
    let delays = agent.handle.status.reconnect_delays();
    assert_eq!(
        delays.last().copied(),
        Some(Duration::from_secs(60)),
        "delays after the refusal: {delays:?}"
    );
    let probe = gw.client(&pki, "ops").await;
    let a = probe
        .clone()
        .get(GetAgentRequest {
            agent: "acme/old".into(),
        })
        .await;
    assert!(
        a.map_or(true, |a| !a.into_inner().connected),
        "an agent below min_version shows as connected"
    );
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_at_or_above_min_version_connects() {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.agents.min_version = Some(tether_agent::VERSION.into());
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let agent = TestAgent::start(&agent_config(
        &pki.agent("acme/current"),
        gw.handle.tunnel_addr,
    ));
    wait_until("the agent connected", T, || {
        gw.sessions_of("acme/current") == 1
    })
    .await;
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_list_flags_versions_behind_or_outside_the_supported_skew() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let current = TestAgent::start(&agent_config(
        &pki.agent("acme/current"),
        gw.handle.tunnel_addr,
    ));
    // One minor release behind this gateway's, and something that is not a version at all.
    let gw_version = semver_of(env!("CARGO_PKG_VERSION"));
    let behind = if gw_version.1 > 0 {
        format!("{}.{}.0", gw_version.0, gw_version.1 - 1)
    } else {
        // 0.0.x has no minor release before it: "behind" is then impossible, and the
        // test checks the unsupported case twice.
        "0.0.0-older".into()
    };
    let _behind = HostileAgent::connect_as(
        &pki.agent("acme/behind"),
        gw.handle.tunnel_addr,
        quiet(),
        &behind,
    )
    .await;
    let _odd = HostileAgent::connect_as(
        &pki.agent("acme/odd"),
        gw.handle.tunnel_addr,
        quiet(),
        "not-a-version",
    )
    .await;
    wait_until("all connected", T, || {
        ["acme/current", "acme/behind", "acme/odd"]
            .iter()
            .all(|a| gw.sessions_of(a) == 1)
    })
    .await;
    let client = gw.client(&pki, "ops").await;
    let skew = |agent: &'static str| {
        let mut c = client.clone();
        async move {
            let a = c
                .get(GetAgentRequest {
                    agent: agent.into(),
                })
                .await
                .expect("get")
                .into_inner();
            VersionSkew::try_from(a.sessions[0].version_skew).expect("a known skew")
        }
    };
    assert_eq!(skew("acme/current").await, VersionSkew::Current);
    let expect_behind = if gw_version.1 > 0 {
        VersionSkew::Behind
    } else {
        VersionSkew::Unsupported
    };
    assert_eq!(skew("acme/behind").await, expect_behind);
    assert_eq!(skew("acme/odd").await, VersionSkew::Unsupported);

    // tetherctl shows the flags.
    let out = tetherctl(&gw, &pki, &["agents", "list"]);
    let line = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing from:\n{out}"))
            .to_owned()
    };
    assert!(
        !line("acme/current").contains("(behind)")
            && !line("acme/current").contains("(unsupported)"),
        "{out}"
    );
    assert!(
        line("acme/odd").contains("not-a-version (unsupported)"),
        "{out}"
    );
    let flag = if gw_version.1 > 0 {
        "(behind)"
    } else {
        "(unsupported)"
    };
    assert!(line("acme/behind").contains(flag), "{out}");
    let json = tetherctl(&gw, &pki, &["-o", "json", "agents", "list"]);
    assert!(json.contains("\"version_skew\""), "{json}");
    current.stop().await;
    gw.stop().await;
}

fn semver_of(v: &str) -> (u64, u64) {
    let mut it = v
        .split('.')
        .map(|p| p.parse::<u64>().expect("numeric version part"));
    (it.next().unwrap(), it.next().unwrap())
}

/// Runs the built `tetherctl` against `gw` as caller `ops`.
fn tetherctl(gw: &TestGateway, pki: &Pki, args: &[&str]) -> String {
    let out = gw
        .tetherctl(&pki.client("ops"))
        .args(args)
        .output()
        .expect("run tetherctl");
    assert!(
        out.status.success(),
        "tetherctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
