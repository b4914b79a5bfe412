//! An independent peer: Python's grpcio (installed by scripts/test into .venv) calls through the
//! relay and checks metadata, trailers and status codes.

use std::path::PathBuf;
use std::time::Duration;

use tether_agent::config::ServiceKind;
use tether_e2e::*;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_TEST_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with grpcio: run the suite with scripts/test, which creates .venv from requirements-test.txt (or set TETHER_TEST_PYTHON)"
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_calls_unary_and_bidi_through_the_relay() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/py"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", Duration::from_secs(20), || {
        gw.sessions_of("acme/py") == 1
    })
    .await;
    let client = pki.client("py");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/relay_client.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .args([
            "--target",
            &gw.handle.northbound_addr.to_string(),
            "--agent",
            "acme/py",
        ])
        .arg("--ca")
        .arg(&client.ca)
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed, 0 failed"), "{stdout}");
    agent.stop().await;
    gw.stop().await;
}
