//! AWS Secrets Manager against a real emulator (moto): reads and rotations, the error mapping
//! (not found, access denied by IAM, throttling retried by the SDK, unreachable), and the
//! agent's identity loaded from a secret, up to a real session with a real gateway.

use std::time::Duration;

use tether_agent::AgentError;
use tether_agent::config::{IdentitySource, TlsConfig};
use tether_agent::identity::Identity;
use tether_agent::secrets::{SecretsError, SecretsManager, VALUE_KEY};
use tether_e2e::moto::{self, Fault, FaultProxy, Moto};
use tether_e2e::*;
use tether_runtime::CancellationToken;

const T: Duration = Duration::from_secs(30);

fn keys(v: &tether_agent::secrets::SecretValue) -> Vec<&str> {
    v.data.keys().map(String::as_str).collect()
}

// === Reads ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_is_read_then_rotation_gives_new_version_and_values() {
    let moto = Moto::start().await;
    let v1 = moto
        .create_secret("app/db", r#"{"username":"app","password":"pw-1"}"#)
        .await;
    let sm = moto::secrets_manager(&moto.aws_config()).await;

    let got = sm.get("app/db").await.expect("read secret");
    assert_eq!(got.version_id, v1);
    assert_eq!(keys(&got), ["password", "username"]);
    assert_eq!(got.get("password"), Some(&b"pw-1"[..]));
    assert_eq!(got.get("username"), Some(&b"app"[..]));

    let v2 = moto
        .client()
        .put_secret_value()
        .secret_id("app/db")
        .secret_string(r#"{"username":"app","password":"pw-2","host":"db.internal"}"#)
        .send()
        .await
        .expect("rotate")
        .version_id()
        .expect("version id")
        .to_owned();
    assert_ne!(v1, v2, "a rotation makes a new version");

    let got = sm.get("app/db").await.expect("read rotated secret");
    assert_eq!(got.version_id, v2);
    assert_eq!(keys(&got), ["host", "password", "username"]);
    assert_eq!(got.get("password"), Some(&b"pw-2"[..]));
    assert!(
        !format!("{got:?}").contains("pw-2"),
        "Debug must not show values: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_binary_secrets_are_one_value() {
    let moto = Moto::start().await;
    moto.create_secret("plain", "just a token").await;
    moto.client()
        .create_secret()
        .name("binary")
        .secret_binary(aws_sdk_secretsmanager::primitives::Blob::new(vec![
            0u8, 1, 254, 255,
        ]))
        .send()
        .await
        .expect("create binary secret");
    let sm = moto::secrets_manager(&moto.aws_config()).await;

    let plain = sm.get("plain").await.expect("read plain");
    assert_eq!(keys(&plain), [VALUE_KEY]);
    assert_eq!(plain.get(VALUE_KEY), Some(&b"just a token"[..]));
    let binary = sm.get("binary").await.expect("read binary");
    assert_eq!(keys(&binary), [VALUE_KEY]);
    assert_eq!(binary.get(VALUE_KEY), Some(&[0u8, 1, 254, 255][..]));
}

// === Errors ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_is_not_found() {
    let moto = Moto::start().await;
    let sm = moto::secrets_manager(&moto.aws_config()).await;
    let e = sm.get("no/such/secret").await.expect_err("not found");
    assert!(
        matches!(&e, SecretsError::NotFound { secret_id } if secret_id == "no/such/secret"),
        "{e:?}"
    );
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_policy_without_get_secret_value_is_access_denied() {
    let moto = Moto::start_with_iam().await;
    moto.create_secret("guarded", r#"{"k":"v"}"#).await;
    let cfg = moto.aws_config();

    // The same secret is readable by a user whose policy allows it: the denial below is the
    // policy's, not a signature or setup problem.
    let reader = SecretsManager::with_credentials(&cfg, moto.users().reader.clone()).await;
    assert_eq!(
        reader.get("guarded").await.expect("reader reads").get("k"),
        Some(&b"v"[..])
    );

    let denied = SecretsManager::with_credentials(&cfg, moto.users().denied.clone()).await;
    let e = denied.get("guarded").await.expect_err("denied");
    match &e {
        SecretsError::AccessDenied { secret_id, message } => {
            assert_eq!(secret_id, "guarded");
            assert!(
                message.contains("secretsmanager:GetSecretValue"),
                "AWS's reason is kept: {message}"
            );
        }
        other => panic!("expected AccessDenied, got {other:?}"),
    }
    assert!(!e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_exception_is_access_denied_and_not_retried() {
    let moto = Moto::start().await;
    moto.create_secret("s", "x").await;
    let proxy = FaultProxy::start(moto.addr(), Fault::AccessDenied, None).await;
    let sm = moto::secrets_manager(&moto::aws_config_for(&proxy.endpoint())).await;
    let e = sm.get("s").await.expect_err("denied");
    match &e {
        SecretsError::AccessDenied { message, .. } => {
            assert!(message.starts_with("AccessDeniedException: "), "{message}")
        }
        other => panic!("expected AccessDenied, got {other:?}"),
    }
    assert_eq!(proxy.requests(), 1, "access denied is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_twice_then_answered_succeeds_on_the_third_request() {
    let moto = Moto::start().await;
    let version = moto.create_secret("busy", r#"{"a":"1"}"#).await;
    let proxy = FaultProxy::start(moto.addr(), Fault::Throttling, Some(2)).await;
    let sm = moto::secrets_manager(&moto::aws_config_for(&proxy.endpoint())).await;
    let got = sm
        .get("busy")
        .await
        .expect("the SDK retried the throttled calls");
    assert_eq!(got.version_id, version);
    assert_eq!(got.get("a"), Some(&b"1"[..]));
    assert_eq!(
        proxy.requests(),
        3,
        "two throttled requests, then one forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_throttled_is_throttled_after_max_attempts() {
    let moto = Moto::start().await;
    moto.create_secret("busy", "x").await;
    let proxy = FaultProxy::start(moto.addr(), Fault::Throttling, None).await;
    let mut cfg = moto::aws_config_for(&proxy.endpoint());
    cfg.max_attempts = 3;
    let sm = moto::secrets_manager(&cfg).await;
    let e = sm.get("busy").await.expect_err("throttled");
    assert!(
        matches!(&e, SecretsError::Throttled { secret_id, attempts: 3 } if secret_id == "busy"),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert!(e.to_string().contains("retrying later can help"), "{e}");
    assert_eq!(proxy.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_unavailable() {
    init();
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cfg = moto::aws_config_for(&format!("http://127.0.0.1:{port}"));
    cfg.max_attempts = 2;
    let sm = moto::secrets_manager(&cfg).await;
    let e = sm.get("any").await.expect_err("nothing listens");
    assert!(matches!(e, SecretsError::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable());
}

// === Agent identity from Secrets Manager ===

/// The JSON an identity secret holds, from the PEM files `files` names.
fn identity_json(files: &CertFiles, with_ca: bool) -> String {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("read PEM");
    let mut v = serde_json::json!({
        "certificate": read(&files.cert),
        "private_key": read(&files.key),
    });
    if with_ca {
        v["ca"] = read(&files.ca).into();
    }
    v.to_string()
}

/// `base` reading its identity from secret `secret_id` of `moto`, with no `[tls]` files.
fn secret_identity_config(
    base: &tether_agent::AgentConfig,
    moto: &Moto,
    secret_id: &str,
) -> tether_agent::AgentConfig {
    let mut cfg = base.clone();
    cfg.tls = TlsConfig::default();
    cfg.identity.source = IdentitySource::AwsSecretsManager(secret_id.to_owned());
    cfg.aws = moto.aws_config();
    cfg
}

/// Runs the real `tether-agent` binary on `cfg`, with credentials in its environment (the
/// standard chain's first source).
fn spawn_agent(cfg: &tether_agent::AgentConfig) -> (tokio::process::Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = cfg.clone();
    cfg.ops.listen = "127.0.0.1:0".parse().expect("addr");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("serialize config")).expect("write");
    let child = tokio::process::Command::new(binary("tether-agent"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tether-agent");
    (child, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_process_with_identity_from_secrets_manager_connects() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let moto = Moto::start().await;
    let files = pki.agent("acme/from-aws");
    moto.create_secret("tether/agent", &identity_json(&files, true))
        .await;
    let cfg = secret_identity_config(
        &agent_config(&files, gw.handle.tunnel_addr),
        &moto,
        "tether/agent",
    );
    let (mut child, _dir) = spawn_agent(&cfg);
    wait_until("agent registered", T, || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tether-agent exited with {status}");
        }
        gw.sessions_of("acme/from-aws") == 1
    })
    .await;
    child.kill().await.expect("kill agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_secret_without_ca_uses_tls_ca_and_connects() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let moto = Moto::start().await;
    let files = pki.agent("acme/no-ca");
    moto.create_secret("tether/agent", &identity_json(&files, false))
        .await;
    let mut cfg = secret_identity_config(
        &agent_config(&files, gw.handle.tunnel_addr),
        &moto,
        "tether/agent",
    );
    cfg.tls.ca = files.ca.clone();
    let sm = moto::secrets_manager(&cfg.aws).await;
    let identity = Identity::load_with(&cfg, &sm).await.expect("identity");
    assert_eq!(identity.agent, "acme/no-ca");
    assert!(!format!("{identity:?}").contains("PRIVATE"), "{identity:?}");
    let shutdown = CancellationToken::new();
    let handle = tether_agent::start_with_identity(
        &cfg,
        identity,
        None,
        shutdown.clone(),
        std::sync::Arc::new(Handlers::with_builtins()),
    )
    .expect("agent start");
    wait_until("agent registered", T, || gw.sessions_of("acme/no-ca") == 1).await;
    shutdown.cancel();
    handle.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_identity_secret_fails_the_agent_process_start() {
    let pki = Pki::new();
    let moto = Moto::start().await;
    let files = pki.agent("acme/broken");
    moto.create_secret(
        "tether/broken",
        r#"{"certificate":"not PEM at all","private_key":"x"}"#,
    )
    .await;
    let cfg = secret_identity_config(
        &agent_config(&files, "127.0.0.1:9".parse().expect("addr")),
        &moto,
        "tether/broken",
    );
    let (child, _dir) = spawn_agent(&cfg);
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("agent exits")
        .expect("agent output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("identity.source = \"aws-secretsmanager:tether/broken\"")
            && stderr.contains("`certificate`"),
        "the error names identity.source and what is wrong: {stderr}"
    );
}

/// Loads the identity `secret` holds (as secret `id`), expecting an error.
async fn identity_error(moto: &Moto, base: &tether_agent::AgentConfig, id: &str) -> AgentError {
    let cfg = secret_identity_config(base, moto, id);
    let sm = moto::secrets_manager(&cfg.aws).await;
    Identity::load_with(&cfg, &sm)
        .await
        .expect_err("identity must not load")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_identity_secrets_give_errors_naming_the_source() {
    let pki = Pki::new();
    let moto = Moto::start().await;
    let a = pki.agent("acme/a");
    let b = pki.agent("acme/b");
    let base = agent_config(&a, "127.0.0.1:9".parse().expect("addr"));
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("read PEM");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not-json",
            "-----BEGIN CERTIFICATE-----".into(),
            "has no `certificate`",
        ),
        (
            "no-key",
            serde_json::json!({"certificate": read(&a.cert), "ca": read(&a.ca)}).to_string(),
            "has no `private_key`",
        ),
        (
            "bad-key",
            serde_json::json!({
                "certificate": read(&a.cert), "private_key": "secret-bytes", "ca": read(&a.ca)
            })
            .to_string(),
            "`private_key` is not a PEM private key",
        ),
        (
            "mismatched-key",
            serde_json::json!({
                "certificate": read(&a.cert), "private_key": read(&b.key), "ca": read(&a.ca)
            })
            .to_string(),
            "does not go with `certificate`",
        ),
        (
            "not-an-agent",
            identity_json(&pki.client("api"), true),
            "is not an agent identity",
        ),
        (
            "no-ca-anywhere",
            identity_json(&a, false),
            "tls.ca is not set",
        ),
    ];
    for (id, value, want) in cases {
        moto.create_secret(id, &value).await;
        let e = identity_error(&moto, &base, id).await;
        let text = e.to_string();
        assert!(
            matches!(e, AgentError::Identity { .. }),
            "{id}: expected an Identity error, got {e:?}"
        );
        assert!(
            text.starts_with(&format!("identity.source = \"aws-secretsmanager:{id}\": ")),
            "{id}: {text}"
        );
        assert!(text.contains(want), "{id}: {text}");
        assert!(
            !text.contains("secret-bytes"),
            "{id}: key material in {text}"
        );
    }

    let e = identity_error(&moto, &base, "tether/missing").await;
    assert!(
        matches!(
            &e,
            AgentError::IdentityFetch { error: SecretsError::NotFound { secret_id }, .. }
                if secret_id == "tether/missing"
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("identity.source = \"aws-secretsmanager:tether/missing\": secret \"tether/missing\" not found"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_start_refuses_a_secrets_manager_identity() {
    let pki = Pki::new();
    let files = pki.agent("acme/sync");
    let mut cfg = agent_config(&files, "127.0.0.1:9".parse().expect("addr"));
    cfg.identity.source = IdentitySource::AwsSecretsManager("x".into());
    let e = tether_agent::start(&cfg, None, CancellationToken::new()).expect_err("refused");
    assert!(e.to_string().contains("run()"), "{e}");
}
