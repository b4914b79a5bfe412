//! `secret.sync` against a real Secrets Manager emulator (moto) and `fake_apiserver`, and the
//! three data-plane kinds end to end: control plane → real gateway process → real agent process
//! → Secrets Manager and Kubernetes, with a search for the secret's value everywhere it must not
//! be. Every Secrets Manager request of the in-process rigs goes through a counting proxy, so a
//! test can show that a refused `secret.sync` read nothing.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tether_agent::commands::{Handlers, ProgressSink};
use tether_agent::config::{KubernetesConfig, SecretsConfig};
use tether_agent::executors::{self, Backends, VERSION_ANNOTATION};
use tether_agent::secrets::SecretsManager;
use tether_api::v1::{Command, CommandState, WatchCommandsRequest, watch_commands_request};
use tether_e2e::fake_apiserver::{FakeApiServer, architecture_rbac, rules_of};
use tether_e2e::moto::{Fault, FaultProxy, Moto, aws_config_for, secrets_manager};
use tether_e2e::{
    AgentProcess, GatewayProcess, Pki, agent_config, commands_client, submit_req, wait_connected,
    wait_until,
};
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(30);

/// A value nobody could find by accident.
fn unique_secret() -> String {
    format!(
        "pw-{:016x}{:016x}",
        rand_u64(),
        std::process::id() as u64 ^ rand_u64()
    )
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// Decodes a Secret's `data` entry (base64) as Kubernetes clients do.
fn secret_value(secret: &Value, key: &str) -> String {
    let b: k8s_openapi::ByteString =
        serde_json::from_value(secret["data"][key].clone()).expect("base64 data");
    String::from_utf8(b.0).expect("utf-8")
}

/// `[secrets]` allowing `patterns`.
fn allow(patterns: &[&str]) -> SecretsConfig {
    SecretsConfig {
        allow: patterns
            .iter()
            .map(|p| p.parse().expect("pattern"))
            .collect(),
    }
}

struct Rig {
    moto: Moto,
    /// Between the agent's Secrets Manager client and moto: counts what reached it.
    aws: FaultProxy,
    fake: FakeApiServer,
    handlers: Handlers,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// An agent allowing the secrets under `prod/`.
    async fn start() -> Rig {
        Self::allowing(&["prod/*"]).await
    }

    async fn allowing(patterns: &[&str]) -> Rig {
        let moto = Moto::start().await;
        let aws = FaultProxy::counting(moto.addr()).await;
        let fake = FakeApiServer::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let kubernetes = KubernetesConfig {
            kubeconfig: Some(fake.kubeconfig(dir.path())),
            poll_interval: Duration::from_millis(5),
            ..KubernetesConfig::default()
        };
        let handlers = Handlers::empty();
        executors::register(
            &handlers,
            Arc::new(
                Backends::with_secrets_manager(
                    kubernetes,
                    secrets_manager(&aws_config_for(&aws.endpoint())).await,
                )
                .allow_secrets(allow(patterns)),
            ),
        );
        Rig {
            moto,
            aws,
            fake,
            handlers,
            _dir: dir,
        }
    }

    /// Runs `kind`; gives the result (or failure) and the progress lines, as text.
    async fn run(&self, kind: &str, payload: Value) -> (Result<String, String>, String) {
        let (sink, mut rx) = ProgressSink::channel(1024);
        let out = self
            .handlers
            .get(kind)
            .expect("kind")
            .run(payload.to_string().into(), sink)
            .await
            .map(|b| String::from_utf8(b.to_vec()).expect("utf-8 output"));
        let mut progress = Vec::new();
        while let Ok(l) = rx.try_recv() {
            progress.push(l);
        }
        (out, progress.join("\n"))
    }
}

#[tokio::test]
async fn secret_sync_copies_keys_and_follows_rotation_and_returns_no_value() {
    let r = Rig::start().await;
    let (pw1, pw2) = (unique_secret(), unique_secret());
    let v1 = r
        .moto
        .create_secret(
            "prod/db",
            &json!({"username": "app", "password": pw1}).to_string(),
        )
        .await;
    r.run("environment.create", json!({"name": "team-a"}))
        .await
        .0
        .expect("environment");

    // Under exactly the documented RBAC; the secrets rows are what secret.sync needs.
    let table = architecture_rbac();
    r.fake.set_rules(rules_of(&table));
    let sync = json!({"secret_id": "prod/db", "environment": "team-a", "name": "db"});
    let (out, progress) = r.run("secret.sync", sync.clone()).await;
    let out = out.expect("secret.sync");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"environment": "team-a", "name": "db", "secret_id": "prod/db",
               "version_id": v1, "keys": ["password", "username"]})
    );
    assert!(!out.contains(&pw1) && !progress.contains(&pw1));
    let s = r.fake.get("secrets", Some("team-a"), "db").expect("secret");
    assert_eq!(secret_value(&s, "password"), pw1);
    assert_eq!(secret_value(&s, "username"), "app");
    assert_eq!(s["metadata"]["annotations"][VERSION_ANNOTATION], v1);
    assert_eq!(
        s["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "tether"
    );

    // Rotation: a new version in Secrets Manager, synced again.
    let v2 = r
        .moto
        .client()
        .put_secret_value()
        .secret_id("prod/db")
        .secret_string(json!({"username": "app", "password": pw2}).to_string())
        .send()
        .await
        .expect("rotate")
        .version_id()
        .expect("version")
        .to_owned();
    assert_ne!(v1, v2);
    let (out, _) = r.run("secret.sync", sync).await;
    let out: Value = serde_json::from_str(&out.expect("sync after rotation")).unwrap();
    assert_eq!(out["version_id"], v2);
    let s = r.fake.get("secrets", Some("team-a"), "db").expect("secret");
    assert_eq!(secret_value(&s, "password"), pw2);
    assert_eq!(s["metadata"]["annotations"][VERSION_ANNOTATION], v2);

    // Only the keys asked for; the ones no longer copied leave the Secret.
    let (out, _) = r
        .run(
            "secret.sync",
            json!({"secret_id": "prod/db", "environment": "team-a", "name": "db",
                   "keys": ["password"]}),
        )
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&out.unwrap()).unwrap()["keys"],
        json!(["password"])
    );
    let s = r.fake.get("secrets", Some("team-a"), "db").expect("secret");
    assert!(s["data"].get("username").is_none(), "{}", s["data"]);
    let used = r.fake.verbs_used();
    assert!(used.is_subset(&table), "{used:?}");
    for verb in ["get", "create", "patch"] {
        let row = (verb.to_owned(), String::new(), "secrets".to_owned());
        assert!(used.contains(&row), "{row:?} granted but unused");
    }
}

#[tokio::test]
async fn secrets_manager_denial_and_throttling_fail_the_command_after_retrying_throttling() {
    tether_e2e::init();
    let fake = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubernetes = KubernetesConfig {
        kubeconfig: Some(fake.kubeconfig(dir.path())),
        ..KubernetesConfig::default()
    };
    let handlers = |secrets| {
        let h = Handlers::empty();
        executors::register(
            &h,
            Arc::new(
                Backends::with_secrets_manager(kubernetes.clone(), secrets)
                    .allow_secrets(allow(&["guarded"])),
            ),
        );
        h
    };
    let run = async |h: &Handlers, payload: Value| {
        let (sink, _rx) = ProgressSink::channel(64);
        h.get(kind_of(&payload))
            .expect("kind")
            .run(payload.to_string().into(), sink)
            .await
    };
    // (environment.create never calls Secrets Manager: any endpoint will do.)
    let env = handlers(secrets_manager(&aws_config_for("http://127.0.0.1:9")).await);
    run(&env, json!({"name": "team-a"}))
        .await
        .expect("environment");
    let sync = json!({"secret_id": "guarded", "environment": "team-a", "name": "db"});

    // Denied by moto's own IAM enforcement: a user whose policy lacks GetSecretValue.
    let moto = Moto::start_with_iam().await;
    moto.create_secret("guarded", r#"{"k": "v"}"#).await;
    let denied =
        SecretsManager::with_credentials(&moto.aws_config(), moto.users().denied.clone()).await;
    let e = run(&handlers(denied), sync.clone()).await.unwrap_err();
    assert!(
        e.contains("access denied") || e.contains("AccessDenied"),
        "{e}"
    );
    assert!(e.contains("guarded"), "{e}");

    // Throttled twice, then answered: retried with backoff, succeeds.
    let plain = Moto::start().await;
    plain.create_secret("guarded", r#"{"k": "v"}"#).await;
    let twice = FaultProxy::start(plain.addr(), Fault::Throttling, Some(2)).await;
    let ok = run(
        &handlers(secrets_manager(&aws_config_for(&twice.endpoint())).await),
        sync.clone(),
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(twice.requests(), 3);

    let written = fake.get("secrets", Some("team-a"), "db").expect("synced");

    // Throttled on every attempt: Failed, saying so, after the configured attempts.
    let always = FaultProxy::start(plain.addr(), Fault::Throttling, None).await;
    let e = run(
        &handlers(secrets_manager(&aws_config_for(&always.endpoint())).await),
        sync,
    )
    .await
    .unwrap_err();
    assert!(e.contains("throttl"), "{e}");
    assert_eq!(always.requests(), 3, "max_attempts = 3");
    assert_eq!(fake.get("secrets", Some("team-a"), "db"), Some(written));
}

fn kind_of(payload: &Value) -> &'static str {
    if payload.get("secret_id").is_some() {
        "secret.sync"
    } else {
        "environment.create"
    }
}

#[tokio::test]
async fn secret_sync_failures_are_readable_and_write_nothing() {
    let r = Rig::start().await;
    let pw = unique_secret();
    r.moto
        .create_secret("prod/db", &json!({"password": pw}).to_string())
        .await;
    r.run("environment.create", json!({"name": "team-a"}))
        .await
        .0
        .expect("environment");
    r.fake.insert(
        "secrets",
        Some("team-a"),
        json!({"metadata": {"name": "theirs", "namespace": "team-a"}, "data": {}}),
    );
    r.fake.insert(
        "namespaces",
        None,
        json!({"metadata": {"name": "unmanaged"}}),
    );
    r.fake.clear_requests();
    let cases = [
        (
            json!({"secret_id": "prod/nope", "environment": "team-a", "name": "db"}),
            "not found",
        ),
        (
            json!({"secret_id": "prod/db", "environment": "team-a", "name": "db", "keys": ["token"]}),
            "has no key \"token\"; it has: password",
        ),
        (
            json!({"secret_id": "prod/db", "environment": "team-a", "name": "theirs"}),
            "secret team-a/theirs exists and is not managed by tether",
        ),
        (
            json!({"secret_id": "prod/db", "environment": "unmanaged", "name": "db"}),
            "not managed by tether",
        ),
        (
            json!({"secret_id": "prod/db", "environment": "absent", "name": "db"}),
            "environment \"absent\" does not exist",
        ),
        (
            json!({"secret_id": "prod/db", "environment": "team-a"}),
            "missing field `name`",
        ),
    ];
    for (payload, want) in cases {
        let (out, progress) = r.run("secret.sync", payload.clone()).await;
        let e = out.expect_err("should fail");
        assert!(e.contains(want), "{payload}: {e}");
        assert!(!e.contains(&pw) && !progress.contains(&pw));
    }
    let writes: Vec<_> = r
        .fake
        .requests()
        .into_iter()
        .filter(|q| q.is_write())
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

/// The ARN moto gave a secret (`arn:aws:secretsmanager:us-east-1:123456789012:secret:<name>-XXXXXX`).
async fn arn_of(moto: &Moto, name: &str) -> String {
    moto.client()
        .describe_secret()
        .secret_id(name)
        .send()
        .await
        .expect("describe secret")
        .arn()
        .expect("arn")
        .to_owned()
}

#[tokio::test]
async fn secret_sync_outside_the_allow_list_is_refused_before_any_call_and_inside_it_works() {
    let r = Rig::allowing(&[
        "prod/app/*",
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/app/*",
    ])
    .await;
    let (outside, inside) = (unique_secret(), unique_secret());
    r.moto
        .create_secret("prod/db", &json!({"password": outside}).to_string())
        .await;
    r.moto
        .create_secret("prod/app/api", &json!({"token": inside}).to_string())
        .await;
    let (outside_arn, inside_arn) = (
        arn_of(&r.moto, "prod/db").await,
        arn_of(&r.moto, "prod/app/api").await,
    );
    r.run("environment.create", json!({"name": "team-a"}))
        .await
        .0
        .expect("environment");
    r.fake.clear_requests();
    let before = r.aws.requests();

    // The attack: name a secret the agent's role can read but the operator did not allow, by
    // name, by ARN, or by an allowed name in another account's ARN.
    for id in [
        "prod/db".to_owned(),
        outside_arn.clone(),
        "prod/app".to_owned(),
        inside_arn.replace("123456789012", "999999999999"),
        inside_arn.replace(":us-east-1:", ":eu-west-1:"),
    ] {
        let (out, progress) = r
            .run(
                "secret.sync",
                json!({"secret_id": id, "environment": "team-a", "name": "stolen"}),
            )
            .await;
        let e = out.expect_err("a secret outside secrets.allow must be refused");
        assert!(
            e.contains("matches no pattern of the agent's secrets.allow") && e.contains("not read"),
            "{id}: {e}"
        );
        assert!(progress.is_empty(), "{id}: {progress}");
    }
    assert_eq!(
        r.aws.requests(),
        before,
        "a refused secret.sync reached Secrets Manager"
    );
    assert!(
        r.fake.requests().is_empty(),
        "a refused secret.sync called Kubernetes: {:?}",
        r.fake.requests()
    );
    assert!(r.fake.get("secrets", Some("team-a"), "stolen").is_none());

    // Inside the list, by name and by ARN: synced as before.
    for (id, name) in [("prod/app/api", "api"), (inside_arn.as_str(), "api-by-arn")] {
        let (out, _) = r
            .run(
                "secret.sync",
                json!({"secret_id": id, "environment": "team-a", "name": name}),
            )
            .await;
        let out: Value = serde_json::from_str(&out.expect("an allowed secret syncs")).unwrap();
        assert_eq!(out["keys"], json!(["token"]));
        let s = r.fake.get("secrets", Some("team-a"), name).expect("synced");
        assert_eq!(secret_value(&s, "token"), inside);
    }
    assert!(
        r.aws.requests() > before,
        "positive control: the allowed syncs went through the counting proxy"
    );
}

#[tokio::test]
async fn secret_sync_is_refused_for_every_secret_when_the_agent_allows_none() {
    // `Backends` as an embedder or the agent gets it without `[secrets]`: nothing allowed.
    let r = Rig::allowing(&[]).await;
    r.moto
        .create_secret("prod/db", &json!({"password": unique_secret()}).to_string())
        .await;
    r.run("environment.create", json!({"name": "team-a"}))
        .await
        .0
        .expect("environment");
    let before = r.aws.requests();
    for id in [
        "prod/db",
        "*",
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db",
    ] {
        let (out, _) = r
            .run(
                "secret.sync",
                json!({"secret_id": id, "environment": "team-a", "name": "db"}),
            )
            .await;
        let e = out.expect_err("no secret is allowed by default");
        assert!(
            e.contains("allows no secret to be synced")
                && e.contains("config key secrets.allow")
                && e.contains("not read"),
            "{e}"
        );
    }
    assert_eq!(r.aws.requests(), before, "Secrets Manager was called");
    assert!(r.fake.get("secrets", Some("team-a"), "db").is_none());
}

/// Everything a watch of `id` shows, to the final state.
async fn watch_to_end(client: &mut tether_e2e::CommandsClient, id: &str) -> Vec<Command> {
    let mut events = client
        .watch(WatchCommandsRequest {
            target: Some(watch_commands_request::Target::Id(id.to_owned())),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(T, events.next())
        .await
        .expect("watch event in time")
    {
        seen.push(ev.expect("event").command.expect("command"));
    }
    seen
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).expect("read file")));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_secret_and_deploy_through_the_gateway_leave_no_secret_value_behind() {
    tether_e2e::init();
    let moto = Moto::start().await;
    let fake = FakeApiServer::start().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("gateway-data");
    let pw = unique_secret();
    moto.create_secret(
        "prod/db",
        &json!({"username": "app", "password": pw}).to_string(),
    )
    .await;
    // Readable by the agent's credentials, not allowed by its secrets.allow.
    let other = unique_secret();
    moto.create_secret("prod/other", &json!({"password": other}).to_string())
        .await;

    let gw = GatewayProcess::spawn_logging(
        &pki,
        &data_dir,
        "127.0.0.1:0".parse().unwrap(),
        "debug,h2=info,hyper=info,quinn=info,rustls=info",
    )
    .await;
    let mut cfg = agent_config(&pki.agent("acme/edge"), gw.tunnel);
    cfg.kubernetes.kubeconfig = Some(fake.kubeconfig(dir.path()));
    cfg.kubernetes.poll_interval = Duration::from_millis(20);
    cfg.aws = moto.aws_config();
    cfg.secrets = allow(&["prod/db"]);
    cfg.state_dir = Some(dir.path().join("agent-state"));
    let agent = AgentProcess::spawn_env(
        &cfg,
        &[
            (
                "RUST_LOG",
                "debug,h2=info,hyper=info,quinn=info,rustls=info",
            ),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let api = pki.client("api");
    wait_connected(gw.channel(&api).await, "acme/edge", T).await;
    let mut client = commands_client(gw.channel(&api).await);

    let mut submit = async |kind: &str, payload: Value| -> String {
        let mut req = submit_req("acme/edge", kind, payload.to_string());
        req.content_type = "application/json".into();
        client.submit(req).await.expect("submit").into_inner().id
    };
    // Submitted back to back: delivered in order (one lane per agent), each waiting for the last.
    let env = submit(
        "environment.create",
        json!({"name": "shop", "quota": {"pods": 10}}),
    )
    .await;
    let sync = submit(
        "secret.sync",
        json!({"secret_id": "prod/db", "environment": "shop", "name": "db"}),
    )
    .await;
    let deploy = submit(
        "deploy",
        json!({"environment": "shop", "name": "web", "image": "registry.example.com/web:1.0",
               "replicas": 3, "ports": [8080],
               "secret_env": {"DB_PASSWORD": {"secret": "db", "key": "password"}}}),
    )
    .await;
    let refused = submit(
        "secret.sync",
        json!({"secret_id": "prod/other", "environment": "shop", "name": "other"}),
    )
    .await;

    let mut finals = Vec::new();
    for id in [&env, &sync, &deploy] {
        let seen = watch_to_end(&mut client, id).await;
        let last = seen.last().expect("events").clone();
        assert_eq!(
            last.state(),
            CommandState::Succeeded,
            "{} failed: {:?}",
            last.kind,
            last.result.as_ref().map(|r| &r.message)
        );
        finals.push((seen, last));
    }
    // A secret outside the agent's secrets.allow: FAILED, saying which key decides, and never
    // copied into the cluster.
    let last = watch_to_end(&mut client, &refused)
        .await
        .pop()
        .expect("events");
    assert_eq!(last.state(), CommandState::Failed);
    let reason = &last.result.as_ref().expect("result").message;
    assert!(
        reason.contains("\"prod/other\" matches no pattern of the agent's secrets.allow"),
        "{reason}"
    );
    assert!(fake.get("secrets", Some("shop"), "other").is_none());
    // Watch showed the deploy's rollout progress while it ran, then Succeeded.
    let (deploy_events, deploy_final) = &finals[2];
    let progress_while_running = deploy_events
        .iter()
        .filter(|c| c.state() == CommandState::Running && !c.progress.is_empty())
        .count();
    assert!(
        progress_while_running >= 2,
        "{progress_while_running} progress events"
    );
    assert!(
        deploy_final
            .progress
            .iter()
            .any(|p| p.contains("rollout complete: 3 of 3")),
        "{:?}",
        deploy_final.progress
    );
    let sync_out: Value =
        serde_json::from_slice(&finals[1].1.result.as_ref().unwrap().output).unwrap();
    assert_eq!(sync_out["keys"], json!(["password", "username"]));

    // The value reached Kubernetes, in the data plane…
    let s = fake.get("secrets", Some("shop"), "db").expect("secret");
    assert_eq!(secret_value(&s, "password"), pw);
    let d = fake
        .get("deployments", Some("shop"), "web")
        .expect("deploy");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"],
        json!({"name": "db", "key": "password"})
    );

    // …and nowhere else: not in the gateway's store, nor its log, nor the agent's log, nor the
    // agent's state, in clear or base64.
    wait_until("the agent logged its work", T, || {
        agent.logs().matches("command succeeded").count() >= 3
    })
    .await;
    let b64 = serde_json::to_value(k8s_openapi::ByteString(pw.as_bytes().to_vec())).unwrap();
    let other_b64 =
        serde_json::to_value(k8s_openapi::ByteString(other.as_bytes().to_vec())).unwrap();
    let needles = [
        pw.as_bytes().to_vec(),
        b64.as_str().unwrap().as_bytes().to_vec(),
        other.as_bytes().to_vec(),
        other_b64.as_str().unwrap().as_bytes().to_vec(),
    ];
    let store = files_under(&data_dir);
    assert!(
        !store.is_empty(),
        "the gateway wrote no store under {data_dir:?}"
    );
    assert!(
        store.iter().any(|(_, b)| contains(b, b"prod/db")),
        "positive control: the store holds the command payloads, so a value would be found"
    );
    let state = files_under(&dir.path().join("agent-state"));
    let logs = [
        ("gateway log", gw.logs().into_bytes()),
        ("agent log", agent.logs().into_bytes()),
    ];
    // Positive controls: both logs were captured and speak of this agent and its commands.
    assert!(
        contains(&logs[0].1, b"acme/edge") && contains(&logs[1].1, b"command succeeded"),
        "logs were not captured:\n{}\n{}",
        String::from_utf8_lossy(&logs[0].1),
        String::from_utf8_lossy(&logs[1].1)
    );
    for (what, bytes) in store
        .iter()
        .chain(state.iter())
        .map(|(p, b)| (p.display().to_string(), b.clone()))
        .chain(logs.iter().map(|(w, b)| ((*w).to_owned(), b.clone())))
    {
        for n in &needles {
            assert!(!contains(&bytes, n), "the secret's value is in {what}");
        }
    }
    drop(agent);
}
