//! `Agents/Revoke` end to end: live sessions (QUIC and TCP) closed within a second, the
//! certificate refused on reconnect (counted as `reason="revoked"`) also after a gateway restart
//! on the same data_dir, the agent backing off instead of hammering, bystanders untouched, and
//! the API's refusals.

use std::time::{Duration, Instant};

use tether_api::v1::{GetAgentRequest, RevokeAgentRequest};
use tether_e2e::*;
use tether_gateway::identity::pki::LeafSpec;

const T: Duration = Duration::from_secs(20);

fn revoke_req(agent: &str, reason: &str) -> RevokeAgentRequest {
    RevokeAgentRequest {
        agent: agent.into(),
        reason: reason.into(),
    }
}

/// `tether_gateway_handshake_failures_total{reason="revoked"}` of a gateway process.
fn process_metric(ops: std::net::SocketAddr, name: &str, reason: &str) -> f64 {
    let (status, body) =
        tether_runtime::ops::probe(ops, "/metrics", Duration::from_secs(2)).expect("scrape");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_disconnected_within_one_second() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let victim_files = pki.agent("acme/victim");
    // The same agent id twice: one replica on QUIC, one on the TCP fallback.
    let mut quic_cfg = agent_config(&victim_files, gw.handle.tunnel_addr);
    quic_cfg.instance_id = Some("quic-replica".into());
    // Refused as revoked, an agent waits max_backoff before each new attempt.
    quic_cfg.reconnect.max_backoff = Duration::from_secs(2);
    let mut tcp_cfg = quic_cfg.clone();
    tcp_cfg.instance_id = Some("tcp-replica".into());
    tcp_cfg.transport.mode = tether_agent::config::TransportMode::Tcp;
    let victim_quic = TestAgent::start(&quic_cfg);
    let victim_tcp = TestAgent::start(&tcp_cfg);
    let bystander = TestAgent::start(&agent_config(
        &pki.agent("acme/bystander"),
        gw.handle.tunnel_addr,
    ));
    wait_until("agents connected", T, || {
        gw.sessions_of("acme/victim") == 2 && gw.sessions_of("acme/bystander") == 1
    })
    .await;
    let bystander_session = gw.session_ids("acme/bystander");
    let mut client = gw.client(&pki, "ops").await;

    let started = Instant::now();
    let r = client
        .revoke(revoke_req("acme/victim", "key leaked"))
        .await
        .expect("revoke")
        .into_inner();
    let answered = started.elapsed();
    wait_until("victim sessions gone", T, || {
        gw.sessions_of("acme/victim") == 0
    })
    .await;
    let gone = started.elapsed();
    eprintln!("revocation: answered after {answered:?}, sessions gone after {gone:?}");
    assert!(
        gone < Duration::from_secs(1),
        "sessions closed after {gone:?}"
    );
    assert_eq!(r.agent, "acme/victim");
    assert_eq!(r.sessions_closed, 2);
    // Both replicas present the same certificate: one fingerprint, the certificate's SHA-256.
    let der = tether_runtime::tls::load_certs("cert", &victim_files.cert).unwrap();
    assert_eq!(r.certificates.len(), 1, "{:?}", r.certificates);
    assert_eq!(
        r.certificates[0].sha256_fingerprint,
        tether_runtime::digest::sha256_hex(der[0].as_ref())
    );
    assert!(r.revoked_at.is_some());

    // The agents saw REVOKED, and are not back.
    wait_until("victims see the disconnect", T, || {
        !victim_quic.handle.status.connected() && !victim_tcp.handle.status.connected()
    })
    .await;
    // Each replica tries again after max_backoff (2 s), is refused at the handshake, and waits
    // another 2 s: one refusal each in the next 3.5 s, over QUIC and over TCP alike.
    let refused = || {
        metric(
            "tether_gateway_handshake_failures_total",
            &[("reason", "revoked")],
        )
    };
    let before = refused();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        gw.sessions_of("acme/victim"),
        0,
        "a revoked agent came back"
    );
    let attempts = refused() - before;
    assert!(
        (1.0..=2.0).contains(&attempts),
        "{attempts} refused attempts of two revoked replicas in 3.5 s with max_backoff 2 s"
    );
    assert!(
        metric(
            "tether_gateway_session_closes_total",
            &[("code", "revoked")]
        ) >= 2.0
    );
    // The bystander kept its very session.
    assert_eq!(gw.session_ids("acme/bystander"), bystander_session);
    assert!(bystander.handle.status.connected());
    for a in [victim_quic, victim_tcp, bystander] {
        a.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_reconnecting_is_refused_also_after_a_gateway_restart() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::spawn_with(&pki, data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let tunnel = gw.tunnel;
    let api = pki.client("ops");
    let mut victim_cfg = agent_config(&pki.agent("acme/victim"), tunnel);
    // A revoked agent waits max_backoff between attempts.
    victim_cfg.reconnect.max_backoff = Duration::from_secs(3);
    let victim = AgentProcess::spawn_env(&victim_cfg, &[("RUST_LOG", "info")]);
    let bystander = AgentProcess::spawn(&agent_config(&pki.agent("acme/bystander"), tunnel));
    wait_connected(gw.channel(&api).await, "acme/victim", T).await;
    wait_connected(gw.channel(&api).await, "acme/bystander", T).await;

    let mut client = tether_api::v1::agents_client::AgentsClient::new(gw.channel(&api).await);
    let r = client
        .revoke(revoke_req("acme/victim", "decommissioned"))
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(r.sessions_closed, 1);
    // The agent reconnects once (its first backoff is short) and is refused: counted.
    let deadline = Instant::now() + T;
    while process_metric(gw.ops, "tether_gateway_handshake_failures_total", "revoked") < 1.0 {
        assert!(Instant::now() < deadline, "no revoked refusal counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and then waits max_backoff (3 s) between attempts instead of hammering.
    let counted = process_metric(gw.ops, "tether_gateway_handshake_failures_total", "revoked");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = process_metric(gw.ops, "tether_gateway_handshake_failures_total", "revoked");
    assert!(
        later - counted <= 2.0,
        "{} refused attempts in 4 s with max_backoff 3 s",
        later - counted
    );
    let agent_log = victim.logs();
    assert!(
        agent_log.contains("ERROR") && agent_log.contains("revoked"),
        "the agent logs the revocation as an error:\n{agent_log}"
    );

    // Restart the gateway on the same data_dir and tunnel address.
    let mut gw = gw;
    gw.child.start_kill().unwrap();
    gw.child.wait().await.unwrap();
    let gw2 = GatewayProcess::spawn_with(&pki, data.path(), tunnel).await;
    wait_connected(gw2.channel(&api).await, "acme/bystander", T).await;
    let deadline = Instant::now() + T;
    while process_metric(
        gw2.ops,
        "tether_gateway_handshake_failures_total",
        "revoked",
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the restarted gateway counted no revoked refusal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = tether_api::v1::agents_client::AgentsClient::new(gw2.channel(&api).await);
    let victim_state = client
        .get(GetAgentRequest {
            agent: "acme/victim".into(),
        })
        .await;
    assert!(
        victim_state.is_err() || !victim_state.unwrap().into_inner().connected,
        "the revoked agent connected to the restarted gateway"
    );
    // The revocation is remembered: revoking again is not NOT_FOUND.
    client
        .revoke(revoke_req("acme/victim", "again"))
        .await
        .expect("a revoked agent is known after a restart");
    // A certificate issued after the revocation (a new enrollment) is accepted.
    let now = time::OffsetDateTime::now_utc();
    let fresh = pki.leaf(&LeafSpec {
        not_before: now + time::Duration::seconds(2),
        ..LeafSpec::client(
            "acme/victim",
            "spiffe://test.local/tenant/acme/agent/victim".into(),
            Duration::from_secs(3600),
        )
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = AgentProcess::spawn(&agent_config(&fresh, tunnel));
    wait_connected(gw2.channel(&api).await, "acme/victim", T).await;
    drop((victim, bystander, renewed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_of_an_unknown_agent_is_not_found_and_a_bad_id_invalid_argument() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut client = gw.client(&pki, "ops").await;
    let e = client
        .revoke(revoke_req("acme/never-seen", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    for bad in ["", "no-slash", "acme/Bad Name", "a/b/c"] {
        let e = client.revoke(revoke_req(bad, "")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    // An agent's certificate cannot revoke anyone.
    let agent_files = pki.agent("acme/a");
    let ch = gw.channel(&agent_files).await.expect("connect");
    let e = tether_api::v1::agents_client::AgentsClient::new(ch)
        .revoke(revoke_req("acme/a", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    gw.stop().await;
}
