//! Certificate renewal over the tunnel, and CA rotation, end to end.
//!
//! - An agent with a short-lived certificate renews it at two thirds of its lifetime over its
//!   live session, moves to a new session with the new certificate (make-before-break) and
//!   retires the old one, again and again, while a steady load of relayed calls runs: not one
//!   fails. The renewed certificate and key are in `state_dir` (key 0600), and an agent process
//!   restarted from that state presents it.
//! - Over the tunnel, the gateway signs only for the session's own identity: a CSR for another
//!   identity, an extra SAN or CA rights is refused, and so is a renewal request sooner than a
//!   second after the previous one; a revoked agent gets no certificate.
//! - CA rotation with overlap: the gateway trusts the old and the new CA and signs with the new;
//!   an agent holding an old-CA certificate connects, renews to a new-CA certificate and learns
//!   the new CA; then the gateway drops the old CA and moves its own certificate to the new
//!   one: an old-CA agent is refused, the renewed agent (and its restart from state) connects.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tether_agent::config::ServiceKind;
use tether_e2e::*;
use tether_gateway::config::GatewayConfig;
use tether_gateway::identity::pki::LeafSpec;
use tether_gateway::tunnel::registry::{RegistryEvent, SessionInfo};
use tether_runtime::digest::sha256_hex;
use tunnel_proto::AgentId;
use tunnel_proto::message::{Hello, RenewResponse};
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};

const T: Duration = Duration::from_secs(30);

/// A gateway that signs renewals with `pki`'s CA, certificates living `cert_ttl`.
fn renewing_config(pki: &Pki, cert_ttl: Duration) -> GatewayConfig {
    let mut cfg = TestGateway::config(pki);
    cfg.enrollment.ca_key = Some(pki.dir.path().join("ca-key.pem"));
    cfg.enrollment.cert_ttl = cert_ttl;
    cfg
}

/// A certificate for `id` from `pki`'s CA valid from `age` ago until `left` from now.
fn cert_for(pki: &Pki, id: &str, age: Duration, left: Duration) -> CertFiles {
    let agent: AgentId = id.parse().unwrap();
    let now = time::OffsetDateTime::now_utc();
    pki.leaf(&LeafSpec {
        common_name: id.into(),
        uris: vec![agent.to_uri(&pki.ca.trust_domain)],
        names: Vec::new(),
        not_before: now - age,
        not_after: now + left,
        server: false,
        issued_at: None,
    })
}

/// The first certificate of a PEM file.
fn leaf_of(path: &Path) -> CertificateDer<'static> {
    tether_runtime::tls::load_certs("certificate", path).unwrap()[0].clone()
}

/// True when `cert` chains to the CA bundle `ca` (as a client certificate).
fn chains_to(cert: &Path, ca: &Path) -> bool {
    let roots = tether_runtime::tls::load_roots(ca).unwrap();
    let certs = tether_runtime::tls::load_certs("certificate", cert).unwrap();
    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap()
        .verify_client_cert(&certs[0], &certs[1..], rustls_pki_types::UnixTime::now())
        .is_ok()
}

/// What the gateway saw of one session (not the session itself: that would keep its
/// connection, and the gateway's socket, alive).
#[derive(Clone, Debug)]
struct Seen {
    session_id: String,
    cert_fingerprint: String,
    cert_serial: String,
    cert_not_after: SystemTime,
    connected_at: SystemTime,
}

impl Seen {
    fn of(s: &SessionInfo) -> Seen {
        Seen {
            session_id: s.session_id.clone(),
            cert_fingerprint: s.cert_fingerprint.clone(),
            cert_serial: s.cert_serial.clone(),
            cert_not_after: s.cert_not_after,
            connected_at: s.connected_at,
        }
    }
}

/// Every session the gateway registers for `agent`, in order: its registry feed, collected.
#[derive(Clone, Default)]
struct Sessions(Arc<Mutex<Vec<Seen>>>);

impl Sessions {
    fn watch(gw: &TestGateway, agent: &str) -> Sessions {
        let agent: AgentId = agent.parse().unwrap();
        let (live, mut feed) = gw.handle.registry.subscribe();
        let seen = Sessions::default();
        seen.0.lock().unwrap().extend(
            live.iter()
                .filter(|s| s.agent == agent)
                .map(|s| Seen::of(s)),
        );
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Ok(ev) = feed.recv().await {
                if let RegistryEvent::Connected(s) = &ev
                    && s.agent == agent
                {
                    sink.0.lock().unwrap().push(Seen::of(s));
                }
            }
        });
        seen
    }

    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn renewed() -> f64 {
    metric("tether_agent_renewals_total", &[("result", "renewed")])
}

/// A steady load of relayed unary calls: `callers` callers, one call each every 20 ms, each
/// with a 5 s deadline, until stopped. Returns (calls that succeeded, failures described).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    async fn start(gw: &TestGateway, pki: &Pki, agent: &str, callers: usize) -> Load {
        let echo = echo_via(gw, pki, Route::new(Some(agent), None)).await;
        let (stop, ok) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let started = Instant::now();
        let tasks = (0..callers)
            .map(|c| {
                let (mut echo, stop, ok) = (echo.clone(), stop.clone(), ok.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        n += 1;
                        let msg = format!("load-{c}-{n}");
                        let mut req = tonic::Request::new(echo_req(&msg));
                        req.set_timeout(Duration::from_secs(5));
                        let at = started.elapsed();
                        match tokio::time::timeout(Duration::from_secs(7), echo.unary(req)).await {
                            Ok(Ok(r)) if r.get_ref().message == msg => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Ok(r)) => failures
                                .push(format!("{msg} at {at:?}: answer {:?}", r.into_inner())),
                            Ok(Err(e)) => failures.push(format!(
                                "{msg} at {at:?}: {:?} {}",
                                e.code(),
                                e.message()
                            )),
                            Err(_) => failures.push(format!("{msg} at {at:?}: no answer")),
                        }
                    }
                    failures
                })
            })
            .collect();
        Load { stop, ok, tasks }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(t.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_at_two_thirds_and_no_call_fails_across_the_switches()
{
    const AGENT: &str = "acme/renewer";
    const TTL: Duration = Duration::from_secs(6);
    let pki = Pki::new();
    let gw =
        TestGateway::start_with(renewing_config(&pki, TTL), "127.0.0.1:0".parse().unwrap()).await;
    let upstream = DemoUpstream::start().await;
    // Its first certificate is as short-lived as the ones the gateway issues.
    let first = cert_for(&pki, AGENT, Duration::from_secs(1), TTL);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&first, gw.handle.tunnel_addr);
    cfg.state_dir = Some(state.path().to_owned());
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    let sessions = Sessions::watch(&gw, AGENT);
    let agent = TestAgent::start(&cfg);
    wait_until("connected", T, || gw.sessions_of(AGENT) == 1).await;
    let first_fp = sha256_hex(leaf_of(&first.cert).as_ref());
    assert_eq!(sessions.all()[0].cert_fingerprint, first_fp);

    let load = Load::start(&gw, &pki, AGENT, 4).await;
    wait_until("three renewals", T, || {
        renewed() >= 3.0 && sessions.len() >= 4
    })
    .await;
    // And the last new session alone, the old one drained.
    wait_until("one session left", T, || gw.sessions_of(AGENT) == 1).await;
    let (ok, failures) = load.finish().await;
    eprintln!("{ok} relayed calls across the renewals");
    assert!(
        failures.is_empty(),
        "{} of {} calls failed across the renewals: {failures:#?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok >= 100, "only {ok} calls in the load");

    // Each renewal is a new session with a new certificate, made about two thirds into the old
    // certificate's lifetime and before it expired. Every certificate here lives 7 s (the
    // gateway backdates by a quarter of `cert_ttl`, at most a minute; the first one is made
    // alike), so the renewal is due between 2/3 − 5% and 2/3 of it: 2.68 to 2.33 s before the
    // old certificate's `notAfter`. (Sessions that reconnect on the same certificate, e.g. a
    // TCP fallback moving to QUIC on a loaded machine, are not renewals: one per certificate.)
    let mut seen = sessions.all();
    seen.dedup_by(|next, prev| next.cert_fingerprint == prev.cert_fingerprint);
    assert!(seen.len() >= 4, "{seen:#?}");
    let life = TTL + Duration::from_secs(1);
    for pair in seen.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        assert_ne!(old.session_id, new.session_id);
        assert_ne!(old.cert_serial, new.cert_serial);
        let expiry = old.cert_not_after;
        let due = expiry - life.mul_f64(1.0 / 3.0 + 0.05);
        assert!(
            new.connected_at >= due - Duration::from_millis(20) && new.connected_at < expiry,
            "renewed {:?} before the old certificate's expiry; due from {:?} before it",
            expiry.duration_since(new.connected_at).ok(),
            expiry.duration_since(due).unwrap_or_default()
        );
    }
    assert!(metric("tether_gateway_renewals_total", &[("result", "issued")]) >= 3.0);
    assert_eq!(
        metric("tether_agent_renewals_total", &[("result", "failed")]),
        0.0
    );

    // Stop right after a renewal: the state then holds a certificate with most of its life.
    let before = renewed();
    wait_until("another renewal", T, || renewed() > before).await;
    agent.stop().await;
    let cert_path = state.path().join("agent.pem");
    let key_mode = std::fs::metadata(state.path().join("agent-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(!state.path().join("renewed.pem").exists());
    let kept = leaf_of(&cert_path);
    let kept_fp = sha256_hex(kept.as_ref());
    assert_ne!(kept_fp, first_fp);
    let (_, not_after) = tether_runtime::tls::validity(&kept).unwrap();
    let expiry = metric("tether_agent_certificate_expiry_seconds", &[]);
    assert_eq!(
        expiry,
        not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
        "the state holds the certificate in use"
    );
    assert_eq!(
        std::fs::read_to_string(state.path().join("gateway-ca.pem")).unwrap(),
        std::fs::read_to_string(pki.dir.path().join("ca.pem")).unwrap()
    );

    // A real agent process restarted from that state presents the kept certificate (its
    // configured one has expired by now).
    let restarted_from = sessions.len();
    let process = AgentProcess::spawn(&cfg);
    wait_until("restarted agent connected", T, || {
        sessions.len() > restarted_from
    })
    .await;
    assert_eq!(sessions.all()[restarted_from].cert_fingerprint, kept_fp);
    drop(process);
    gw.stop().await;
}

// === A raw agent: the protocol by hand, to ask for what a well-behaved agent never would ===

/// One session driven by hand over QUIC.
struct RawSession {
    session: AgentSession,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _conn: quinn::Connection,
    _client: RawAgent,
}

impl RawSession {
    async fn open(files: &CertFiles, gateway: SocketAddr) -> RawSession {
        let client = RawAgent::new(files, true, tunnel_proto::ALPN);
        let conn = client
            .endpoint
            .connect(gateway, "localhost")
            .unwrap()
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("control stream");
        let hello = Hello {
            agent_version: "raw".into(),
            ..Default::default()
        };
        let mut raw = RawSession {
            session: AgentSession::new(AgentSessionConfig::new(hello), Instant::now()),
            send,
            recv,
            _conn: conn,
            _client: client,
        };
        raw.until(|e| matches!(e, AgentEvent::Established(_))).await;
        raw
    }

    /// Runs the session until an event matching `want`, which it returns.
    async fn until(&mut self, mut want: impl FnMut(&AgentEvent) -> bool) -> AgentEvent {
        let deadline = tokio::time::Instant::now() + T;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(b) = self.session.poll_transmit() {
                self.send.write_all(&b).await.expect("write");
            }
            while let Some(e) = self.session.poll_event() {
                if want(&e) {
                    return e;
                }
                assert!(!matches!(e, AgentEvent::Closed(_)), "session closed: {e:?}");
            }
            let at = self
                .session
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + T);
            tokio::select! {
                r = self.recv.read(&mut buf) => match r.expect("read") {
                    Some(n) => self.session.handle_input(&buf[..n], Instant::now()),
                    None => self.session.handle_eof(Instant::now()),
                },
                _ = tokio::time::sleep_until(at.into()) => self.session.handle_timeout(Instant::now()),
                _ = tokio::time::sleep_until(deadline) => panic!("no such event within {T:?}"),
            }
        }
    }

    async fn renew(&mut self, csr_pem: String) -> RenewResponse {
        let id = self
            .session
            .renew(csr_pem)
            .expect("the gateway offers renewal");
        match self
            .until(|e| matches!(e, AgentEvent::Renewed(r) if r.id == id))
            .await
        {
            AgentEvent::Renewed(r) => r,
            _ => unreachable!(),
        }
    }
}

fn csr(params: rcgen::CertificateParams) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn with_sans(sans: Vec<rcgen::SanType>) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans;
    p
}

fn uri(u: &str) -> rcgen::SanType {
    rcgen::SanType::URI(u.try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_tunnel_the_gateway_renews_only_the_sessions_own_identity() {
    let pki = Pki::new();
    let gw = TestGateway::start_with(
        renewing_config(&pki, Duration::from_secs(3600)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let files = pki.agent("acme/raw");
    let me = "spiffe://test.local/tenant/acme/agent/raw";
    let mut ca = with_sans(vec![uri(me)]);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let mut signing = with_sans(Vec::new());
    signing.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let refused = [
        (
            "another tenant's identity",
            with_sans(vec![uri("spiffe://test.local/tenant/globex/agent/raw")]),
            "globex",
        ),
        (
            "another agent's identity",
            with_sans(vec![uri("spiffe://test.local/tenant/acme/agent/other")]),
            "agent/other",
        ),
        (
            "its identity and another",
            with_sans(vec![
                uri(me),
                uri("spiffe://test.local/tenant/acme/agent/other"),
            ]),
            "subject alternative name",
        ),
        (
            "an extra DNS name",
            with_sans(vec![
                uri(me),
                rcgen::SanType::DnsName("gateway.example".try_into().unwrap()),
            ]),
            "gateway.example",
        ),
        ("CA rights", ca, "CA certificate"),
        ("certificate signing", signing, "signing"),
    ];
    // Each on its own session: a session may renew once a second.
    for (what, params, words) in refused {
        let mut raw = RawSession::open(&files, gw.handle.tunnel_addr).await;
        let r = raw.renew(csr(params)).await;
        assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{what}");
        assert!(r.certificate_pem.is_empty(), "{what}");
        assert!(r.message.contains(words), "{what}: {:?}", r.message);
    }
    assert_eq!(
        metric("tether_gateway_renewals_total", &[("result", "bad_csr")]),
        6.0
    );

    // Its own identity, or no name at all (two agents: one agent is issued at most one
    // certificate a second): a certificate for exactly the session's identity, from the CA,
    // with the CA bundle. A second request at once, on that session or on another session of
    // the agent, is refused, and the session stays up: refusals are answers, not protocol
    // errors.
    let other = "spiffe://test.local/tenant/acme/agent/raw2";
    let mut limited = 0.0;
    for (files, id, params) in [
        (&files, me, with_sans(vec![uri(me)])),
        (&pki.agent("acme/raw2"), other, with_sans(Vec::new())),
    ] {
        let mut raw = RawSession::open(files, gw.handle.tunnel_addr).await;
        let mut second = RawSession::open(files, gw.handle.tunnel_addr).await;
        let r = raw.renew(csr(params)).await;
        let issued = Instant::now();
        assert_eq!(r.code, 0, "{}", r.message);
        let der = CertificateDer::from_pem_slice(r.certificate_pem.as_bytes()).unwrap();
        assert_eq!(
            tether_runtime::tls::spiffe_id(&der).unwrap().to_string(),
            id
        );
        assert_eq!(
            r.ca_pem,
            std::fs::read_to_string(pki.dir.path().join("ca.pem")).unwrap()
        );
        let again = raw.renew(csr(with_sans(Vec::new()))).await;
        let elsewhere = second.renew(csr(with_sans(Vec::new()))).await;
        // (Asserted when this machine answered within the second, as it does but under
        // extreme load.)
        if issued.elapsed() < Duration::from_millis(900) {
            assert_eq!(again.code, tonic::Code::ResourceExhausted as i32);
            assert!(again.message.contains("too often"), "{}", again.message);
            assert_eq!(elsewhere.code, tonic::Code::ResourceExhausted as i32);
            assert!(
                elsewhere.message.contains("less than 1s ago"),
                "{}",
                elsewhere.message
            );
            limited += 1.0;
        }
        assert!(raw.session.is_established() && second.session.is_established());
    }
    assert!(
        metric(
            "tether_gateway_renewals_total",
            &[("result", "rate_limited")]
        ) >= limited
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_not_renewed() {
    // The check the session driver makes before signing, against the real identity store.
    init();
    // Metrics recorded before the recorder is installed are lost.
    tether_runtime::ops::metrics_handle();
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = renewing_config(&pki, Duration::from_secs(3600));
    cfg.data_dir = Some(data.path().to_owned());
    let db = Arc::new(tether_gateway::identity::db::IdentityDb::open(data.path()).unwrap());
    let bundle = std::fs::read_to_string(&cfg.tls.ca).unwrap();
    let enrollment =
        tether_gateway::identity::enrollment::Enrollment::new(&cfg, &bundle, db.clone()).unwrap();
    let files = pki.agent("acme/victim");
    let facts = tether_gateway::tls::CertFacts::of(&leaf_of(&files.cert)).unwrap();
    let agent: AgentId = "acme/victim".parse().unwrap();
    let req = |id| tunnel_proto::message::RenewRequest {
        id,
        csr_pem: csr(with_sans(Vec::new())),
    };
    assert_eq!(enrollment.renew(&agent, &facts, &req(1)).code, 0);
    db.revoke(
        &agent,
        "key leaked",
        Vec::new(),
        tether_gateway::identity::revocation::to_ms(SystemTime::now()),
    )
    .unwrap();
    let r = enrollment.renew(&agent, &facts, &req(2));
    assert_eq!(r.code, tonic::Code::PermissionDenied as i32);
    assert!(r.certificate_pem.is_empty());
    assert!(
        r.message.contains("revoked") && r.message.contains("key leaked"),
        "{}",
        r.message
    );
    assert_eq!(
        metric("tether_gateway_renewals_total", &[("result", "revoked")]),
        1.0
    );

    // Live: a revoked agent's sessions are closed and it gets no certificate after that.
    let gw = TestGateway::start_with(
        renewing_config(&pki, Duration::from_secs(5)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let mut acfg = agent_config(
        &cert_for(
            &pki,
            "acme/live",
            Duration::from_secs(1),
            Duration::from_secs(5),
        ),
        gw.handle.tunnel_addr,
    );
    acfg.state_dir = Some(state.path().to_owned());
    let agent = TestAgent::start(&acfg);
    wait_until("renewed once", T, || renewed() >= 1.0).await;
    let mut api = gw.client(&pki, "ops").await;
    api.revoke(tether_api::v1::RevokeAgentRequest {
        agent: "acme/live".into(),
        reason: "gone rogue".into(),
    })
    .await
    .unwrap();
    wait_until("revoked agent gone", T, || gw.sessions_of("acme/live") == 0).await;
    let issued = metric("tether_gateway_renewals_total", &[("result", "issued")]);
    let kept = std::fs::read(state.path().join("agent.pem")).unwrap();
    // It keeps trying to come back, refused at the handshake; once its certificate is past
    // due and it has been refused again, still nothing was issued for it.
    let cert = CertificateDer::from_pem_slice(&kept).unwrap();
    let (nb, na) = tether_runtime::tls::validity(&cert).unwrap();
    let due = tether_agent::renew::due(nb, na, 0.0);
    let refusals = || {
        metric(
            "tether_gateway_handshake_failures_total",
            &[("reason", "revoked")],
        )
    };
    wait_until("past due", T, || SystemTime::now() > due).await;
    let at_due = refusals();
    wait_until("refused again after it was due", T, || refusals() > at_due).await;
    assert_eq!(
        metric("tether_gateway_renewals_total", &[("result", "issued")]),
        issued
    );
    assert_eq!(std::fs::read(state.path().join("agent.pem")).unwrap(), kept);
    assert_eq!(gw.sessions_of("acme/live"), 0);
    agent.stop().await;
    gw.stop().await;
}

// === CA rotation ===

/// The gateway's config for one phase of a CA rotation.
fn rotation_config(ca_bundle: &Path, server: &Pki, signer: &Pki) -> GatewayConfig {
    let mut cfg = TestGateway::config(server);
    cfg.tls.ca = ca_bundle.to_owned();
    cfg.enrollment.ca_key = Some(signer.dir.path().join("ca-key.pem"));
    cfg.enrollment.cert_ttl = Duration::from_secs(3600);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_old_and_new_ca_overlap_then_the_old_one_is_refused() {
    const AGENT: &str = "acme/rotor";
    let (old, new) = (Pki::new(), Pki::new());
    let data = tempfile::tempdir().unwrap();
    let bundle = data.path().join("ca-bundle.pem");
    let old_ca = old.dir.path().join("ca.pem");
    let new_ca = new.dir.path().join("ca.pem");
    std::fs::write(
        &bundle,
        format!(
            "{}{}",
            std::fs::read_to_string(&new_ca).unwrap(),
            std::fs::read_to_string(&old_ca).unwrap()
        ),
    )
    .unwrap();

    // Overlap: the gateway trusts both CAs, signs with the new one, and still presents its
    // old-CA certificate (agents know only the old CA so far).
    // Restarted on the same address below: one below the ephemeral range (`restartable_port`).
    let overlap = TestGateway::start_with(
        rotation_config(&bundle, &old, &new),
        restartable_port([127, 0, 0, 1].into()),
    )
    .await;
    let tunnel = overlap.handle.tunnel_addr;
    // An agent of the old CA whose certificate is due for renewal at once.
    let first = cert_for(
        &old,
        AGENT,
        Duration::from_secs(60),
        Duration::from_secs(20),
    );
    let state = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&first, tunnel);
    cfg.state_dir = Some(state.path().to_owned());
    let sessions = Sessions::watch(&overlap, AGENT);
    let agent = TestAgent::start(&cfg);
    wait_until("renewed under the new CA, on a new session", T, || {
        renewed() >= 1.0 && sessions.len() >= 2 && overlap.sessions_of(AGENT) == 1
    })
    .await;
    let kept = state.path().join("agent.pem");
    assert!(
        chains_to(&kept, &new_ca),
        "the renewed certificate is the new CA's"
    );
    assert!(!chains_to(&kept, &old_ca));
    assert!(chains_to(&first.cert, &old_ca));
    let seen = sessions.all();
    assert_eq!(
        seen[0].cert_fingerprint,
        sha256_hex(leaf_of(&first.cert).as_ref())
    );
    assert_eq!(
        seen.last().unwrap().cert_fingerprint,
        sha256_hex(leaf_of(&kept).as_ref())
    );
    // The agent learned the bundle: old and new CA.
    assert_eq!(
        std::fs::read_to_string(state.path().join("gateway-ca.pem")).unwrap(),
        std::fs::read_to_string(&bundle).unwrap()
    );
    overlap.stop().await;
    wait_until("the agent notices", T, || !agent.handle.status.connected()).await;

    // The end of the overlap: the gateway trusts only the new CA and presents a certificate
    // of the new CA, on the same address.
    let after = TestGateway::start_with(rotation_config(&new_ca, &new, &new), tunnel).await;
    // The renewed agent comes back on its own (the gateway registers the session before its
    // Welcome reaches the agent: wait for both ends).
    wait_until("renewed agent reconnected", T, || {
        after.sessions_of(AGENT) == 1 && agent.handle.status.connected()
    })
    .await;

    // An agent with only an old-CA certificate is refused by the gateway (it trusts the
    // gateway's new certificate, so the refusal is the gateway's).
    let refused_before = metric(
        "tether_gateway_handshake_failures_total",
        &[("reason", "unknown_ca")],
    );
    let stale = old.agent("acme/stale");
    let stale_files = CertFiles {
        ca: bundle.clone(),
        ..stale
    };
    let stale_agent = TestAgent::start(&agent_config(&stale_files, tunnel));
    wait_until("the old-CA agent refused", T, || {
        metric(
            "tether_gateway_handshake_failures_total",
            &[("reason", "unknown_ca")],
        ) > refused_before
    })
    .await;
    assert_eq!(after.sessions_of("acme/stale"), 0);
    assert!(!stale_agent.handle.status.connected());
    stale_agent.stop().await;

    // Restarted from its state (its config still names only the old CA and the old
    // certificate), the renewed agent connects: the kept certificate and the kept bundle.
    agent.stop().await;
    wait_until("agent gone", T, || after.sessions_of(AGENT) == 0).await;
    let process = AgentProcess::spawn(&cfg);
    wait_until("restarted agent connected", T, || {
        after.sessions_of(AGENT) == 1
    })
    .await;
    let live = after.handle.registry.get(&AGENT.parse().unwrap()).unwrap();
    assert_eq!(
        live.sessions[0].cert_fingerprint,
        sha256_hex(leaf_of(&kept).as_ref())
    );
    drop(process);
    after.stop().await;
}
