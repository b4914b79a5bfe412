//! Enrollment end to end: `tetherctl tokens create`, then a real `tether-agent` with only the
//! token and the CA bundle generates its key, enrolls over the tunnel's TCP port and connects
//! with exactly the token's identity; and each bad input refused: a reused token, an expired
//! one, a token of one tenant claiming another tenant's identity, CSRs asking for more than the
//! identity or for CA rights, tokens of a revoked agent, the wrong gateway.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tether_agent::AgentConfig;
use tether_agent::enroll::{EnrollClient, EnrollError};
use tether_api::v1::enrollment_client::EnrollmentClient;
use tether_api::v1::{CreateTokenRequest, EnrollResponse, RevokeAgentRequest};
use tether_e2e::*;

const T: Duration = Duration::from_secs(20);

/// A gateway that can enroll agents (its CA key configured), its identity store in `data`.
async fn enrolling_gateway(pki: &Pki, data: &Path) -> TestGateway {
    let mut cfg = TestGateway::config(pki);
    cfg.enrollment.ca_key = Some(pki.dir.path().join("ca-key.pem"));
    cfg.data_dir = Some(data.to_owned());
    TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await
}

async fn create_token(
    gw: &TestGateway,
    pki: &Pki,
    tenant: &str,
    agent: &str,
    ttl: Option<Duration>,
) -> Result<String, tonic::Status> {
    let ch = gw.channel(&pki.client("ops")).await.expect("connect");
    EnrollmentClient::new(ch)
        .create_token(CreateTokenRequest {
            tenant: tenant.into(),
            agent: agent.into(),
            ttl: ttl.map(|t| t.try_into().unwrap()),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// An agent config with no certificate: `state_dir`, `tls.ca` and (optionally) a token.
fn enroll_config(pki: &Pki, gw: &TestGateway, state: &Path, token: Option<&str>) -> AgentConfig {
    let mut text = format!(
        "gateways = [\"{}\"]\nserver_name = \"localhost\"\nstate_dir = \"{}\"\n[tls]\nca = \"{}\"\n[reconnect]\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\nconnect_timeout = \"1s\"\n",
        gw.handle.tunnel_addr,
        state.display(),
        pki.dir.path().join("ca.pem").display()
    );
    if let Some(t) = token {
        text.push_str(&format!("[enrollment]\ntoken = \"{t}\"\n"));
    }
    toml::from_str(&text).expect("agent config")
}

fn csr(params: rcgen::CertificateParams, key: &rcgen::KeyPair) -> String {
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn csr_with_uris(uris: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    for u in uris {
        p.subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    csr(p, &key)
}

async fn enroll(
    pki: &Pki,
    gw: &TestGateway,
    token: &str,
    csr_pem: &str,
) -> Result<EnrollResponse, EnrollError> {
    let state = tempfile::tempdir().unwrap();
    let client = EnrollClient::new(&enroll_config(pki, gw, state.path(), None)).unwrap();
    client
        .enroll(&gw.handle.tunnel_addr.to_string(), token, csr_pem)
        .await
}

fn refused(r: Result<EnrollResponse, EnrollError>, code: tonic::Code, words: &str) {
    match r {
        Err(EnrollError::Refused {
            code: got, message, ..
        }) => {
            assert_eq!(got, code, "{message}");
            assert!(message.contains(words), "{message:?} lacks {words:?}");
        }
        other => panic!("expected a refusal ({code:?}, {words:?}), got {other:?}"),
    }
}

/// The URI SAN and validity of a PEM certificate.
fn describe(pem: &str) -> (String, SystemTime, SystemTime) {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let id = tether_runtime::tls::spiffe_id(&der).unwrap().to_string();
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let t = |ts: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(ts as u64);
    (
        id,
        t(x509.validity().not_before.timestamp()),
        t(x509.validity().not_after.timestamp()),
    )
}

/// Writes an enrolled certificate and its key as files for an in-process agent.
fn files_of(pki: &Pki, dir: &Path, cert_pem: &str, key: &rcgen::KeyPair) -> CertFiles {
    std::fs::write(dir.join("c.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
    CertFiles {
        ca: pki.dir.path().join("ca.pem"),
        cert: dir.join("c.pem"),
        key: dir.join("k.pem"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_with_a_token_then_connects_with_exactly_that_identity() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    // The operator's side: tetherctl prints the token (and only the token) on stdout.
    let api = pki.client("ops");
    let out = tokio::process::Command::new(binary("tetherctl"))
        .arg("--northbound")
        .arg(gw.handle.northbound_addr.to_string())
        .arg("--ca")
        .arg(&api.ca)
        .arg("--cert")
        .arg(&api.cert)
        .arg("--key")
        .arg(&api.key)
        .args([
            "--server-name",
            "localhost",
            "tokens",
            "create",
            "acme",
            "eu-1",
        ])
        .args(["--ttl", "10m"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("tet1_") && token.len() > 40, "{token}");

    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("agent");
    let cfg = enroll_config(&pki, &gw, &state_dir, Some(&token));
    let started = Instant::now();
    let mut agent = AgentProcess::spawn_env(&cfg, &[("RUST_LOG", "info")]);
    wait_until("enrolled agent connected", T, || {
        gw.sessions_of("acme/eu-1") == 1
    })
    .await;
    eprintln!("enrolled and connected in {:?}", started.elapsed());

    // The key was made there, 0600; the certificate is exactly the token's identity, 24 h.
    let key_mode = std::fs::metadata(state_dir.join("agent-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(state_dir.join("agent.pem")).unwrap();
    let (id, not_before, not_after) = describe(&pem);
    assert_eq!(id, "spiffe://test.local/tenant/acme/agent/eu-1");
    let ttl = not_after.duration_since(not_before).unwrap();
    assert!(
        ttl > Duration::from_secs(24 * 3600) && ttl < Duration::from_secs(24 * 3600 + 120),
        "certificate lifetime {ttl:?}"
    );
    assert_eq!(
        metric("tether_gateway_enrollments_total", &[("result", "issued")]),
        1.0
    );
    // Stored hashed: the token is nowhere in the identity store, its SHA-256 is.
    let db = std::fs::read(data.path().join("identity.redb")).unwrap();
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(token.as_bytes()), "the token is stored in clear");
    let hash = tether_runtime::digest::sha256_hex(token.as_bytes());
    assert!(contains(hash.as_bytes()), "the token's hash is stored");
    assert!(!agent.logs().contains(&token), "the agent logged its token");

    // A restart with the same (now used) token just runs with the certificate it has.
    agent.child.start_kill().unwrap();
    agent.child.wait().await.unwrap();
    wait_until("agent gone", T, || gw.sessions_of("acme/eu-1") == 0).await;
    let agent = AgentProcess::spawn_env(&cfg, &[("RUST_LOG", "info")]);
    wait_until("agent back", T, || gw.sessions_of("acme/eu-1") == 1).await;
    assert_eq!(
        metric("tether_gateway_enrollments_total", &[("result", "issued")]),
        1.0,
        "no second enrollment"
    );
    assert_eq!(
        std::fs::read_to_string(state_dir.join("agent.pem")).unwrap(),
        pem
    );
    drop(agent);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_token_is_refused() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    let token = create_token(&gw, &pki, "acme", "eu-1", None).await.unwrap();
    enroll(&pki, &gw, &token, &csr_with_uris(&[]))
        .await
        .expect("first use");
    refused(
        enroll(&pki, &gw, &token, &csr_with_uris(&[])).await,
        tonic::Code::Unauthenticated,
        "already used",
    );
    // Racing redemptions of one fresh token: exactly one certificate.
    let raced = create_token(&gw, &pki, "acme", "eu-2", None).await.unwrap();
    let csrs: Vec<String> = (0..8).map(|_| csr_with_uris(&[])).collect();
    let tries = csrs.iter().map(|c| enroll(&pki, &gw, &raced, c));
    let results = futures::future::join_all(tries).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for r in results.into_iter().filter(Result::is_err) {
        refused(r, tonic::Code::Unauthenticated, "already used");
    }
    // An agent with that used token and no certificate stops, saying so.
    let state = tempfile::tempdir().unwrap();
    let mut agent = AgentProcess::spawn(&enroll_config(&pki, &gw, state.path(), Some(&token)));
    let status = agent.exit_within(T).await;
    assert_eq!(status.code(), Some(64));
    assert!(agent.logs().contains("already used"), "{}", agent.logs());
    assert!(!state.path().join("agent.pem").exists());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    let token = create_token(&gw, &pki, "acme", "eu-1", Some(Duration::from_secs(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    refused(
        enroll(&pki, &gw, &token, &csr_with_uris(&[])).await,
        tonic::Code::Unauthenticated,
        "expired",
    );
    refused(
        enroll(&pki, &gw, "tet1_not-a-token", &csr_with_uris(&[])).await,
        tonic::Code::Unauthenticated,
        "unknown",
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_tenant_cannot_claim_another_tenants_identity() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    let token = create_token(&gw, &pki, "acme", "eu-1", None).await.unwrap();
    for other in [
        "spiffe://test.local/tenant/globex/agent/eu-1",
        "spiffe://test.local/tenant/acme/agent/eu-2",
        "spiffe://other.td/tenant/acme/agent/eu-1",
    ] {
        refused(
            enroll(&pki, &gw, &token, &csr_with_uris(&[other])).await,
            tonic::Code::InvalidArgument,
            "this token is for spiffe://test.local/tenant/acme/agent/eu-1 only",
        );
    }
    // The refusals left the token unused; whatever the CSR's subject says, the certificate is
    // for the token's identity.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "globex/eu-1");
    let r = enroll(&pki, &gw, &token, &csr(p, &key)).await.unwrap();
    assert_eq!(r.agent, "acme/eu-1");
    let (id, _, _) = describe(&r.certificate_pem);
    assert_eq!(id, "spiffe://test.local/tenant/acme/agent/eu-1");
    // And it connects as exactly that.
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(&agent_config(
        &files_of(&pki, dir.path(), &r.certificate_pem, &key),
        gw.handle.tunnel_addr,
    ));
    wait_until("connected as acme/eu-1", T, || {
        gw.sessions_of("acme/eu-1") == 1
    })
    .await;
    assert_eq!(gw.sessions_of("globex/eu-1"), 0);
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_with_extra_sans_or_a_ca_flag_is_refused() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    let token = create_token(&gw, &pki, "acme", "eu-1", None).await.unwrap();
    let me = "spiffe://test.local/tenant/acme/agent/eu-1";
    let key = rcgen::KeyPair::generate().unwrap();
    let mut extra_dns = rcgen::CertificateParams::default();
    extra_dns.subject_alt_names = vec![
        rcgen::SanType::URI(me.try_into().unwrap()),
        rcgen::SanType::DnsName("gateway.example".try_into().unwrap()),
    ];
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cases = [
        (csr_with_uris(&[me, me]), "subject alternative name"),
        (csr(extra_dns, &key), "subject alternative name"),
        (csr(ca, &key), "CA certificate"),
        (
            csr(rcgen::CertificateParams::default(), &p384),
            "ECDSA P-256 or Ed25519",
        ),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            "PKCS#10",
        ),
    ];
    for (pem, words) in &cases {
        refused(
            enroll(&pki, &gw, &token, pem).await,
            tonic::Code::InvalidArgument,
            words,
        );
    }
    assert_eq!(
        metric("tether_gateway_enrollments_total", &[("result", "bad_csr")]),
        cases.len() as f64
    );
    // Still unused: a proper CSR (asking for exactly the identity, Ed25519) gets its certificate.
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut mine = rcgen::CertificateParams::default();
    mine.subject_alt_names = vec![rcgen::SanType::URI(me.try_into().unwrap())];
    let r = enroll(&pki, &gw, &token, &csr(mine, &ed)).await.unwrap();
    assert_eq!(describe(&r.certificate_pem).0, me);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_agent_invalidates_its_pending_tokens_and_a_new_token_enrolls_it_again() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    let first = create_token(&gw, &pki, "acme", "x", None).await.unwrap();
    let pending = create_token(&gw, &pki, "acme", "x", None).await.unwrap();
    let other = create_token(&gw, &pki, "acme", "y", None).await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let r = enroll(&pki, &gw, &first, &csr(Default::default(), &key))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(&agent_config(
        &files_of(&pki, dir.path(), &r.certificate_pem, &key),
        gw.handle.tunnel_addr,
    ));
    wait_until("acme/x connected", T, || gw.sessions_of("acme/x") == 1).await;

    let mut agents = gw.client(&pki, "ops").await;
    let rev = agents
        .revoke(RevokeAgentRequest {
            agent: "acme/x".into(),
            reason: "compromised".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rev.sessions_closed, rev.tokens_invalidated), (1, 1));
    refused(
        enroll(&pki, &gw, &pending, &csr_with_uris(&[])).await,
        tonic::Code::Unauthenticated,
        "revoked",
    );
    // Another agent's token is untouched.
    enroll(&pki, &gw, &other, &csr_with_uris(&[]))
        .await
        .unwrap();
    agent.stop().await;

    // A token created after the revocation enrolls the agent again; its new certificate starts
    // after the revocation and is accepted (the old one stays refused).
    let again = create_token(&gw, &pki, "acme", "x", None).await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let r = enroll(&pki, &gw, &again, &csr(Default::default(), &key))
        .await
        .unwrap();
    let revoked_at = SystemTime::try_from(rev.revoked_at.unwrap()).unwrap();
    let (_, not_before, _) = describe(&r.certificate_pem);
    assert!(not_before > revoked_at - Duration::from_secs(1));
    let dir2 = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(&agent_config(
        &files_of(&pki, dir2.path(), &r.certificate_pem, &key),
        gw.handle.tunnel_addr,
    ));
    wait_until("re-enrolled acme/x connected", T, || {
        gw.sessions_of("acme/x") == 1
    })
    .await;
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_requests_and_the_wrong_gateway_are_refused() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = enrolling_gateway(&pki, data.path()).await;
    for (tenant, agent, ttl) in [
        ("Bad Tenant", "a", None),
        ("acme", "", None),
        ("acme", "a", Some(Duration::from_secs(30 * 24 * 3600))),
        ("acme", "a", Some(Duration::ZERO)),
    ] {
        let e = create_token(&gw, &pki, tenant, agent, ttl)
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{tenant}/{agent}: {e:?}"
        );
    }
    // Only control-plane callers create tokens; agents enroll on the tunnel port only.
    let ch = gw.channel(&pki.agent("acme/a")).await.unwrap();
    let e = EnrollmentClient::new(ch)
        .create_token(CreateTokenRequest {
            tenant: "acme".into(),
            agent: "b".into(),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let ch = gw.channel(&pki.client("ops")).await.unwrap();
    let e = EnrollmentClient::new(ch)
        .enroll(tether_api::v1::EnrollRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);

    // An agent trusting another CA refuses this gateway before sending its token.
    let token = create_token(&gw, &pki, "acme", "a", None).await.unwrap();
    let other = Pki::with_trust_domain("other.local");
    let state = tempfile::tempdir().unwrap();
    let mut cfg = enroll_config(&pki, &gw, state.path(), Some(&token));
    cfg.tls.ca = other.dir.path().join("ca.pem");
    let client = EnrollClient::new(&cfg).unwrap();
    let e = client
        .enroll(
            &gw.handle.tunnel_addr.to_string(),
            &token,
            &csr_with_uris(&[]),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::Untrusted { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert_eq!(
        metric("tether_gateway_enrollments_total", &[("result", "issued")]),
        0.0
    );
    gw.stop().await;

    // A gateway without enrollment.ca_key says so.
    let plain = TestGateway::start(&pki).await;
    let e = create_token(&plain, &pki, "acme", "a", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    plain.stop().await;
}
