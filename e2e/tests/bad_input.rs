//! Bad certificates and bad bytes: each refused with its reason logged and counted, the
//! offending connection closed with a protocol error code, every other session untouched.

use std::time::Duration;

use tether_e2e::*;
use tether_gateway::identity::pki::LeafSpec;
use tunnel_proto::ErrorCode;
use tunnel_proto::message::{Hello, Message};

const T: Duration = Duration::from_secs(15);

/// A gateway with one well-behaved agent connected, to prove bystanders are unaffected.
struct Scene {
    pki: Pki,
    gw: TestGateway,
    bystander: TestAgent,
    session: String,
}

impl Scene {
    async fn new() -> Scene {
        let pki = Pki::new();
        let gw = TestGateway::start(&pki).await;
        let bystander = TestAgent::start(&agent_config(
            &pki.agent("good/bystander"),
            gw.handle.tunnel_addr,
        ));
        wait_until("bystander connected", T, || {
            gw.sessions_of("good/bystander") == 1
        })
        .await;
        let session = gw.session_ids("good/bystander")[0].clone();
        Scene {
            pki,
            gw,
            bystander,
            session,
        }
    }

    /// The bystander still has the very same session, and heartbeats kept flowing.
    async fn assert_bystander_untouched(self) {
        // Two more heartbeat round trips prove the session is alive, not just registered.
        let before = metric("tether_gateway_heartbeat_rtt_seconds_count", &[]);
        wait_until("heartbeats continue", T, || {
            metric("tether_gateway_heartbeat_rtt_seconds_count", &[]) >= before + 2.0
        })
        .await;
        assert_eq!(
            self.gw.session_ids("good/bystander"),
            vec![self.session.clone()]
        );
        assert!(self.bystander.handle.status.connected());
        self.bystander.stop().await;
        self.gw.stop().await;
    }

    /// Presents `files` as an agent; asserts the handshake is refused with `reason` counted.
    async fn assert_refused(&self, files: &CertFiles, reason: &str) {
        let before = metric(
            "tether_gateway_handshake_failures_total",
            &[("reason", reason)],
        );
        let raw = RawAgent::new(files, true, tunnel_proto::ALPN);
        let hello = Message::Hello(Hello::default()).to_bytes();
        // In QUIC the client's handshake can complete before the server has judged its
        // certificate; the refusal shows at the first stream operation.
        match raw
            .send_and_wait_close(self.gw.handle.tunnel_addr, &hello)
            .await
        {
            Err(e) => assert!(e.contains("handshake") || e.contains("open_bi"), "{e}"),
            Ok(e) => assert!(
                matches!(
                    e,
                    quinn::ConnectionError::TransportError(_)
                        | quinn::ConnectionError::ConnectionClosed(_)
                ),
                "expected a TLS refusal, got {e:?}"
            ),
        }
        assert_eq!(
            self.gw.handle.registry.session_count(),
            1,
            "nothing but the bystander registered"
        );
        wait_until(&format!("metric reason={reason}"), T, || {
            metric(
                "tether_gateway_handshake_failures_total",
                &[("reason", reason)],
            ) >= before + 1.0
        })
        .await;
    }
}

fn spec(uri: Option<&str>, from_now: (i64, i64)) -> LeafSpec {
    let now = time::OffsetDateTime::now_utc();
    LeafSpec {
        common_name: "bad".into(),
        uris: uri.into_iter().map(str::to_owned).collect(),
        names: Vec::new(),
        not_before: now + time::Duration::hours(from_now.0),
        not_after: now + time::Duration::hours(from_now.1),
        server: false,
        issued_at: None,
    }
}

const GOOD_URI: &str = "spiffe://test.local/tenant/bad/agent/x";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_from_another_ca_is_refused() {
    let s = Scene::new().await;
    // Trust our gateway (so the agent side is not what fails), present the foreign cert.
    let other = Pki::with_trust_domain("other.local");
    let mut files = other.agent("bad/x");
    files.ca = s.pki.dir.path().join("ca.pem");
    s.assert_refused(&files, "unknown_ca").await;
    // A foreign CA that copies our CA's name is caught by the signature check.
    let impostor = Pki::impostor(&s.pki);
    let mut files = impostor.agent("bad/x");
    files.ca = s.pki.dir.path().join("ca.pem");
    s.assert_refused(&files, "bad_signature").await;
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_agent_certificate_is_refused() {
    let s = Scene::new().await;
    let files = s.pki.leaf(&spec(Some(GOOD_URI), (-48, -24)));
    s.assert_refused(&files, "expired").await;
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_agent_certificate_is_refused() {
    let s = Scene::new().await;
    let files = s.pki.leaf(&spec(Some(GOOD_URI), (24, 48)));
    s.assert_refused(&files, "not_yet_valid").await;
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_without_identity_uri_is_refused() {
    let s = Scene::new().await;
    let files = s.pki.leaf(&spec(None, (-1, 24)));
    s.assert_refused(&files, "no_identity").await;
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_with_malformed_identity_uri_is_refused() {
    let s = Scene::new().await;
    for uri in [
        "spiffe://test.local/tenant/a/agent/",
        "spiffe://test.local/team/a",
        "https://test.local/tenant/a/agent/b",
    ] {
        let files = s.pki.leaf(&spec(Some(uri), (-1, 24)));
        s.assert_refused(&files, "bad_identity").await;
    }
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_foreign_trust_domain_identities_cannot_be_agents() {
    let s = Scene::new().await;
    let files = s.pki.client("api");
    s.assert_refused(&files, "not_an_agent").await;
    let files = s
        .pki
        .leaf(&spec(Some("spiffe://elsewhere/tenant/a/agent/b"), (-1, 24)));
    s.assert_refused(&files, "wrong_trust_domain").await;
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_client_certificate_is_refused() {
    let s = Scene::new().await;
    let files = s.pki.agent("bad/x");
    let before = metric(
        "tether_gateway_handshake_failures_total",
        &[("reason", "no_client_certificate")],
    );
    let raw = RawAgent::new(&files, false, tunnel_proto::ALPN);
    let r = raw
        .send_and_wait_close(
            s.gw.handle.tunnel_addr,
            &Message::Hello(Hello::default()).to_bytes(),
        )
        .await;
    assert!(
        !matches!(r, Ok(quinn::ConnectionError::ApplicationClosed(_))),
        "{r:?}"
    );
    wait_until("counted", T, || {
        metric(
            "tether_gateway_handshake_failures_total",
            &[("reason", "no_client_certificate")],
        ) >= before + 1.0
    })
    .await;
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_alpn_is_refused() {
    let s = Scene::new().await;
    let files = s.pki.agent("bad/alpn");
    let before = metric(
        "tether_gateway_handshake_failures_total",
        &[("reason", "alpn_mismatch")],
    );
    let raw = RawAgent::new(&files, true, b"h3");
    let r = raw
        .send_and_wait_close(s.gw.handle.tunnel_addr, b"hello")
        .await;
    assert!(
        r.is_err() || !matches!(r, Ok(quinn::ConnectionError::ApplicationClosed(_))),
        "{r:?}"
    );
    wait_until("counted", T, || {
        metric(
            "tether_gateway_handshake_failures_total",
            &[("reason", "alpn_mismatch")],
        ) >= before + 1.0
    })
    .await;
    assert_eq!(s.gw.sessions_of("bad/alpn"), 0);
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_control_stream_closes_that_connection_with_protocol_error() {
    let s = Scene::new().await;
    let raw = RawAgent::new(&s.pki.agent("bad/garbage"), true, tunnel_proto::ALPN);
    let e = raw
        .send_and_wait_close(
            s.gw.handle.tunnel_addr,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("connection closed by the gateway");
    assert_eq!(
        app_close_code(&e),
        Some(ErrorCode::PROTOCOL_ERROR.0 as u64),
        "{e:?}"
    );
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_on_the_control_stream_closes_with_frame_too_large() {
    let s = Scene::new().await;
    let raw = RawAgent::new(&s.pki.agent("bad/big"), true, tunnel_proto::ALPN);
    // A Hello frame header announcing 16 MiB: refused from the header, before the payload.
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&(16u32 << 20).to_be_bytes());
    bytes.extend_from_slice(&[0u8; 1024]);
    let e = raw
        .send_and_wait_close(s.gw.handle.tunnel_addr, &bytes)
        .await
        .expect("closed");
    assert_eq!(
        app_close_code(&e),
        Some(ErrorCode::FRAME_TOO_LARGE.0 as u64),
        "{e:?}"
    );
    s.assert_bystander_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_version_is_refused_with_its_code() {
    let s = Scene::new().await;
    let raw = RawAgent::new(&s.pki.agent("bad/version"), true, tunnel_proto::ALPN);
    let hello = Message::Hello(Hello {
        versions: vec![99],
        ..Default::default()
    })
    .to_bytes();
    let e = raw
        .send_and_wait_close(s.gw.handle.tunnel_addr, &hello)
        .await
        .expect("closed");
    assert_eq!(
        app_close_code(&e),
        Some(ErrorCode::UNSUPPORTED_VERSION.0 as u64),
        "{e:?}"
    );
    s.assert_bystander_untouched().await;
}
