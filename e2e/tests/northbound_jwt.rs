//! Bearer-token (JWT) callers of the northbound API: ES256 and RS256 tokens checked against a
//! JWKS file or URL (keys generated here), scoped to their tenant claim; every forged, expired
//! or unfit token is UNAUTHENTICATED and audited; a rotated key set is picked up; the token is
//! never relayed to an agent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tether_agent::config::ServiceKind;
use tether_api::v1::agents_client::AgentsClient;
use tether_api::v1::{GetAgentRequest, ListAgentsRequest};
use tether_e2e::*;
use tether_gateway::tools::ctl::{self, Target};
use tonic::Code;

const T: Duration = Duration::from_secs(20);
const ISS: &str = "https://idp.test/";
const AUD: &str = "tether-gateway";

// === Keys and tokens ===

/// A signing key and its public JWK.
struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

impl Signer {
    fn es256(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Signer::new(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_der(&kp.serialize_der()),
        )
    }

    fn rs256(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        Signer::new(
            kid,
            Algorithm::RS256,
            EncodingKey::from_rsa_der(&pkcs1(&kp.serialize_der())),
        )
    }

    fn new(kid: &str, alg: Algorithm, key: EncodingKey) -> Signer {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Signer {
            kid: kid.to_owned(),
            alg,
            key,
            jwk,
        }
    }

    fn token(&self, claims: &serde_json::Value) -> String {
        self.token_as(&self.kid, claims)
    }

    /// Signed with this key, but naming key `kid`.
    fn token_as(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }
}

/// The RSAPrivateKey (PKCS#1) inside a PKCS#8 PrivateKeyInfo: rcgen writes PKCS#8, the RS256
/// signer reads PKCS#1.
fn pkcs1(der: &[u8]) -> Vec<u8> {
    // (tag, header length, content length) of the DER element at the start of `b`.
    fn tlv(b: &[u8]) -> (u8, usize, usize) {
        let (tag, first) = (b[0], b[1] as usize);
        if first < 0x80 {
            return (tag, 2, first);
        }
        let n = first & 0x7f;
        let len = b[2..2 + n]
            .iter()
            .fold(0usize, |a, x| (a << 8) | *x as usize);
        (tag, 2 + n, len)
    }
    let (tag, h, _) = tlv(der);
    assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
    let mut rest = &der[h..];
    for _ in 0..2 {
        // version INTEGER, then the AlgorithmIdentifier SEQUENCE
        let (_, h, len) = tlv(rest);
        rest = &rest[h + len..];
    }
    let (tag, h, len) = tlv(rest);
    assert_eq!(tag, 0x04, "privateKey is an OCTET STRING");
    rest[h..h + len].to_vec()
}

fn jwks(signers: &[&Signer]) -> String {
    serde_json::to_string(&JwkSet {
        keys: signers.iter().map(|s| s.jwk.clone()).collect(),
    })
    .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, tenants: serde_json::Value) -> serde_json::Value {
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": sub,
        "iat": now(),
        "exp": now() + 600,
        "tenants": tenants,
    })
}

// === Gateway and clients ===

/// A gateway accepting tokens per `auth` (TOML of the `[auth]` table), with agents `acme/a1`
/// and `globex/g1` connected, the demo upstream as their default service.
struct Scene {
    pki: Pki,
    gw: TestGateway,
    agents: Vec<TestAgent>,
    _upstream: DemoUpstream,
}

async fn scene(auth: &str) -> Scene {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.auth = Some(toml::from_str(auth).expect("auth config"));
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let upstream = DemoUpstream::start().await;
    let mut agents = Vec::new();
    for id in ["acme/a1", "globex/g1"] {
        let mut cfg = agent_config(&pki.agent(id), gw.handle.tunnel_addr);
        with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
        agents.push(TestAgent::start(&cfg));
        wait_until("agent connected", T, || gw.sessions_of(id) == 1).await;
    }
    Scene {
        pki,
        gw,
        agents,
        _upstream: upstream,
    }
}

fn file_auth(jwks_file: &Path) -> String {
    format!(
        "jwks_file = \"{}\"\nissuer = \"{ISS}\"\naudience = \"{AUD}\"\n",
        jwks_file.display()
    )
}

impl Scene {
    fn target(&self, cert: Option<&CertFiles>) -> Target {
        Target {
            addr: self.gw.handle.northbound_addr.to_string(),
            ca: self.pki.dir.path().join("ca.pem"),
            cert: cert.map_or_else(PathBuf::new, |c| c.cert.clone()),
            key: cert.map_or_else(PathBuf::new, |c| c.key.clone()),
            server_name: Some("localhost".into()),
        }
    }

    /// A connection with no client certificate that sends `token`.
    async fn with_token(&self, token: &str) -> ctl::Conn {
        ctl::connect_with_token(&self.target(None), Some(token))
            .await
            .expect("connect")
    }

    /// `Agents/Get` of `agent` with `token`.
    async fn get(&self, token: &str, agent: &str) -> Result<(), tonic::Status> {
        AgentsClient::new(self.with_token(token).await)
            .get(GetAgentRequest {
                agent: agent.into(),
            })
            .await
            .map(drop)
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        self.gw.stop().await;
    }
}

fn code(r: Result<(), tonic::Status>) -> (Code, String) {
    match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(e) => (e.code(), e.message().to_owned()),
    }
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_and_rs256_tokens_act_for_their_tenants_only() {
    let audit = AuditLog::install();
    let dir = tempfile::tempdir().unwrap();
    let (ec, rsa) = (Signer::es256("ec-1"), Signer::rs256("rsa-1"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&ec, &rsa])).unwrap();
    // `deployer`'s claim is narrowed by the policy; other subjects get their claim.
    let auth = format!(
        "{}[[callers]]\nname = \"deployer\"\nkind = \"jwt\"\ntenants = [\"acme\"]\n",
        file_auth(&path)
    );
    let s = scene(&auth).await;

    for signer in [&ec, &rsa] {
        let token = signer.token(&claims("svc-acme", json!(["acme"])));
        s.get(&token, "acme/a1").await.expect("own tenant");
        let list = AgentsClient::new(s.with_token(&token).await)
            .list(ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<_> = list.agents.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["acme/a1"], "{:?}", signer.alg);
        let (c, msg) = code(s.get(&token, "globex/g1").await);
        assert_eq!(c, Code::PermissionDenied, "{:?}: {msg}", signer.alg);
        assert!(msg.contains("\"globex\""), "{msg}");
    }
    // A string claim is one tenant.
    let token = ec.token(&claims("svc-globex", json!("globex")));
    s.get(&token, "globex/g1").await.expect("string claim");
    assert_eq!(
        code(s.get(&token, "acme/a1").await).0,
        Code::PermissionDenied
    );
    // The policy entry for `deployer` takes globex away from its claim.
    let token = rsa.token(&claims("deployer", json!(["acme", "globex"])));
    s.get(&token, "acme/a1").await.expect("acme is in both");
    assert_eq!(
        code(s.get(&token, "globex/g1").await).0,
        Code::PermissionDenied
    );
    // A token granting no tenant can do nothing.
    let token = ec.token(&claims("nobody", json!([])));
    assert_eq!(
        code(s.get(&token, "acme/a1").await).0,
        Code::PermissionDenied
    );

    // The relay takes the token off: the agent's upstream never sees it.
    let token = ec.token(&claims("svc-acme", json!(["acme"])));
    let (addr, seen) = header_recorder().await;
    let mut cfg = agent_config(&s.pki.agent("acme/rec"), s.gw.handle.tunnel_addr);
    with_service(
        &mut cfg,
        "default",
        &format!("http://{addr}"),
        ServiceKind::Grpc,
    );
    let rec = TestAgent::start(&cfg);
    wait_until("recorder agent", T, || s.gw.sessions_of("acme/rec") == 1).await;
    let mut echo = tether_api::demo::v1::echo_client::EchoClient::new(s.with_token(&token).await);
    let mut req = tonic::Request::new(tether_api::demo::v1::EchoRequest::default());
    req.metadata_mut()
        .insert("tether-agent", "acme/rec".parse().unwrap());
    req.metadata_mut().insert("x-probe", "1".parse().unwrap());
    let e = echo.unary(req).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unimplemented,
        "the recorder answered: {e:?}"
    );
    let headers = seen.lock().unwrap().clone();
    assert_eq!(headers.len(), 1);
    assert_eq!(
        headers[0].get("x-probe").map(String::as_str),
        Some("1"),
        "{headers:?}"
    );
    assert!(!headers[0].contains_key("authorization"), "{headers:?}");
    rec.stop().await;

    let denials = audit.matching(&[("kind", "jwt"), ("decision", "deny")]);
    assert!(
        denials
            .iter()
            .any(|e| e["caller"] == "svc-acme" && e["tenant"] == "globex"),
        "{denials:#?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_unfit_tokens_are_unauthenticated() {
    let audit = AuditLog::install();
    let dir = tempfile::tempdir().unwrap();
    let (ec, rsa) = (Signer::es256("ec-1"), Signer::rs256("rsa-1"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&ec, &rsa])).unwrap();
    let s = scene(&file_auth(&path)).await;
    let good = claims("svc", json!(["acme"]));
    s.get(&ec.token(&good), "acme/a1")
        .await
        .expect("the good token");

    let with = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = good.as_object().unwrap().clone();
        edit(&mut c);
        serde_json::Value::Object(c)
    };
    let forger = Signer::es256("ec-1");
    let rsa_forger = Signer::rs256("rsa-1");
    let payload = ec.token(&good).split('.').nth(1).unwrap().to_owned();
    // {"alg":"none","typ":"JWT"}
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    // {"alg":"none","kid":"ec-1"}, with the real signature left on.
    let none_kid = format!(
        "eyJhbGciOiJub25lIiwia2lkIjoiZWMtMSJ9.{payload}.{}",
        ec.token(&good).split('.').nth(2).unwrap()
    );
    let hmac = |secret: &[u8]| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("ec-1".into());
        jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(secret)).unwrap()
    };
    // Key confusion: HS256 keyed with the public key as published.
    let public = serde_json::to_vec(&ec.jwk).unwrap();
    // ES256, naming the RS256 key: the algorithm must be the key's.
    let swapped = ec.token_as("rsa-1", &good);
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad signature", forger.token(&good), "bad signature"),
        (
            "bad RS256 signature",
            rsa_forger.token(&good),
            "bad signature",
        ),
        (
            "wrong audience",
            ec.token(&with(&|c| {
                c.insert("aud".into(), json!("someone-else"));
            })),
            "wrong audience",
        ),
        (
            "wrong issuer",
            ec.token(&with(&|c| {
                c.insert("iss".into(), json!("https://evil.test/"));
            })),
            "wrong issuer",
        ),
        (
            "expired",
            ec.token(&with(&|c| {
                c.insert("exp".into(), json!(now() - 120));
            })),
            "expired",
        ),
        (
            "no exp",
            ec.token(&with(&|c| {
                c.remove("exp");
            })),
            "\"exp\" is missing",
        ),
        (
            "not valid yet",
            ec.token(&with(&|c| {
                c.insert("nbf".into(), json!(now() + 3600));
            })),
            "nbf",
        ),
        ("alg none", none, "\"none\" is not accepted"),
        ("alg none with a kid", none_kid, "\"none\" is not accepted"),
        (
            "HS256",
            hmac(b"a shared secret"),
            "\"HS256\" is not accepted",
        ),
        (
            "HS256 keyed with the public key",
            hmac(&public),
            "\"HS256\" is not accepted",
        ),
        ("algorithm of another key", swapped, "does not match"),
        ("unknown kid", ec.token_as("nope", &good), "unknown key id"),
        ("not a JWT", "garbage".into(), "not a JWT"),
    ];
    for (what, token, want) in &cases {
        let (c, msg) = code(s.get(token, "acme/a1").await);
        assert_eq!(c, Code::Unauthenticated, "{what}: {msg}");
        assert!(msg.contains(want), "{what}: want {want:?} in {msg:?}");
    }
    let audited = audit.matching(&[("kind", "jwt"), ("decision", "deny")]);
    for (what, _, want) in &cases {
        assert!(
            audited.iter().any(|e| e["reason"].contains(want)),
            "{what} not audited: {audited:#?}"
        );
    }
    assert!(
        metric(
            "tether_gateway_authn_failures_total",
            &[("method", "tether.v1.Agents/Get")]
        ) >= cases.len() as f64
    );

    // Neither a certificate nor a token; a malformed authorization header.
    let ch = ctl::connect_with_token(&s.target(None), None)
        .await
        .unwrap();
    let e = AgentsClient::new(ch)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut req = tonic::Request::new(ListAgentsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    let e = AgentsClient::new(
        ctl::connect_with_token(&s.target(None), None)
            .await
            .unwrap(),
    )
    .list(req)
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A bad token is not rescued by a good certificate; a good token does not rescue an agent
    // certificate.
    let api = s.pki.client("api");
    let ch = ctl::connect_with_token(&s.target(Some(&api)), Some(&forger.token(&good)))
        .await
        .unwrap();
    let e = AgentsClient::new(ch)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let agent = s.pki.agent("acme/a1");
    let ch = ctl::connect_with_token(&s.target(Some(&agent)), Some(&ec.token(&good)))
        .await
        .unwrap();
    let e = AgentsClient::new(ch)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_file_changes_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Signer::es256("2024"), Signer::rs256("2025"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&old])).unwrap();
    let s = scene(&file_auth(&path)).await;
    let c = claims("svc", json!(["acme"]));
    s.get(&old.token(&c), "acme/a1").await.expect("old key");
    assert_eq!(
        code(s.get(&new.token(&c), "acme/a1").await).0,
        Code::Unauthenticated
    );

    // Rotate: write the new set beside and rename over, as a deploy would.
    let tmp = dir.path().join("jwks.json.new");
    std::fs::write(&tmp, jwks(&[&new])).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    s.get(&new.token(&c), "acme/a1")
        .await
        .expect("a token of the new key right after the change");
    let mut old_refused = false;
    for _ in 0..300 {
        if code(s.get(&old.token(&c), "acme/a1").await).0 == Code::Unauthenticated {
            old_refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(old_refused, "the removed key still verifies");

    // A broken file keeps the keys loaded before.
    std::fs::write(&path, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.get(&new.token(&c), "acme/a1")
        .await
        .expect("keys kept over a broken file");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_over_https_is_fetched_and_rotation_picked_up() {
    let (k1, k2) = (Signer::es256("k1"), Signer::rs256("k2"));
    let pki_for_server = Pki::new();
    let server = JwksServer::start(&pki_for_server, jwks(&[&k1])).await;
    let auth = format!(
        "jwks_url = \"https://127.0.0.1:{}/.well-known/jwks.json\"\njwks_ca = \"{}\"\njwks_refresh = \"1h\"\nissuer = \"{ISS}\"\naudience = \"{AUD}\"\n",
        server.port,
        pki_for_server.dir.path().join("ca.pem").display()
    );
    let s = scene(&auth).await;
    let c = claims("svc", json!(["acme"]));
    // The first fetch may still be on its way: the gateway waits for it.
    s.get(&k1.token(&c), "acme/a1")
        .await
        .expect("k1 from the URL");
    assert!(server.fetches() >= 1);

    // Rotation: the IdP publishes k2 and drops k1. A token naming the unknown kid makes the
    // gateway fetch again (at most every 5 s; the refresh itself is an hour away).
    server.set(jwks(&[&k2]));
    let deadline = std::time::Instant::now() + T;
    loop {
        match code(s.get(&k2.token(&c), "acme/a1").await) {
            (Code::Ok, _) => break,
            (Code::Unauthenticated, msg) if msg.contains("unknown key id") => {}
            other => panic!("{other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "k2 never picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (c1, msg) = code(s.get(&k1.token(&c), "acme/a1").await);
    assert_eq!(c1, Code::Unauthenticated, "k1 was dropped: {msg}");
    // Unknown kids do not hammer the IdP.
    let before = server.fetches();
    for i in 0..20 {
        let _ = s.get(&k2.token_as(&format!("x{i}"), &c), "acme/a1").await;
    }
    assert!(
        server.fetches() - before <= 1,
        "{} fetches",
        server.fetches() - before
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_refresh_follows_the_idp_and_survives_its_outage() {
    let k1 = Signer::es256("k1");
    let k2 = Signer::es256("k2");
    let server_pki = Pki::new();
    let server = JwksServer::start(&server_pki, jwks(&[&k1])).await;
    let auth = format!(
        "jwks_url = \"https://127.0.0.1:{}/jwks\"\njwks_ca = \"{}\"\njwks_refresh = \"200ms\"\nissuer = \"{ISS}\"\naudience = \"{AUD}\"\n",
        server.port,
        server_pki.dir.path().join("ca.pem").display()
    );
    let s = scene(&auth).await;
    let c = claims("svc", json!(["acme"]));
    s.get(&k1.token(&c), "acme/a1").await.expect("k1");
    // The IdP fails for a while: the keys loaded stay.
    server.fail(true);
    let f = server.fetches();
    wait_until("refreshes during the outage", T, || {
        server.fetches() >= f + 3
    })
    .await;
    s.get(&k1.token(&c), "acme/a1").await.expect("k1 kept");
    // Back, with both keys: picked up by the periodic refresh.
    server.set(jwks(&[&k1, &k2]));
    server.fail(false);
    let f = server.fetches();
    wait_until("a refresh after the outage", T, || {
        server.fetches() >= f + 2
    })
    .await;
    s.get(&k2.token(&c), "acme/a1").await.expect("k2");
    s.get(&k1.token(&c), "acme/a1").await.expect("k1 still");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_sends_the_token_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let ec = Signer::es256("ec-1");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&ec])).unwrap();
    let s = scene(&file_auth(&path)).await;
    let out = tetherctl_list(&s, dir.path(), ec.token(&claims("cli", json!(["globex"])))).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("globex/g1"), "{stdout}");
    assert!(!stdout.contains("acme/a1"), "{stdout}");
    let forged = Signer::es256("ec-1").token(&claims("cli", json!(["globex"])));
    let out = tetherctl_list(&s, dir.path(), forged).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(
        !stderr.contains("eyJ"),
        "the token is never printed: {stderr}"
    );
    s.stop().await;
}

/// `tetherctl -o json agents list` against `s` with `TETHER_TOKEN` and no client certificate.
async fn tetherctl_list(s: &Scene, dir: &Path, token: String) -> std::process::Output {
    tokio::process::Command::new(binary("tetherctl"))
        .args(["--northbound", &s.gw.handle.northbound_addr.to_string()])
        .arg("--ca")
        .arg(s.pki.dir.path().join("ca.pem"))
        .args(["--server-name", "localhost", "--dev-json"])
        .arg(dir.join("no-dev.json"))
        .args(["-o", "json", "agents", "list"])
        .env("TETHER_TOKEN", token)
        .env_remove("TETHER_CLIENT_CERT")
        .env_remove("TETHER_CLIENT_KEY")
        .output()
        .await
        .expect("run tetherctl")
}

// === Test servers ===

/// An HTTPS server on 127.0.0.1 answering every GET with the current JWKS (or 503 while
/// failing), with a certificate from `pki`.
struct JwksServer {
    port: u16,
    body: Arc<Mutex<String>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(pki: &Pki, body: String) -> JwksServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tls = pki.gateway_tls();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                tether_runtime::tls::load_certs("cert", &tls.cert).unwrap(),
                tether_runtime::tls::load_key(&tls.key).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = JwksServer {
            port,
            body: Arc::new(Mutex::new(body)),
            failing: Default::default(),
            fetches: Default::default(),
        };
        let (body, failing, fetches) = (
            server.body.clone(),
            server.failing.clone(),
            server.fetches.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (acceptor, body, failing, fetches) = (
                    acceptor.clone(),
                    body.clone(),
                    failing.clone(),
                    fetches.clone(),
                );
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let resp = if failing.load(Ordering::SeqCst) {
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
                    } else {
                        let body = body.lock().unwrap().clone();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        server
    }

    fn set(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}
