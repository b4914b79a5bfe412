//! The agent's Kubernetes command handlers (`environment.*`, `deploy`) driven through kube-rs's
//! real client against `fake_apiserver` (no Kubernetes API server can run on this machine; the
//! HTTP server is the only fake), under the agent's `[secrets]` and `[environments]` policy.
//! `secret.sync` and the path through the real gateway are in `data_plane.rs`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tether_agent::commands::{Handlers, ProgressSink};
use tether_agent::config::{
    AwsConfig, Egress, EgressRule, EnvironmentsConfig, KubernetesConfig, SecretsConfig,
};
use tether_agent::executors::{self, Backends};
use tether_e2e::fake_apiserver::{FakeApiServer, Rule};

struct Cluster {
    fake: FakeApiServer,
    handlers: Handlers,
    _dir: tempfile::TempDir,
}

/// What one handler run gave: its result (parsed JSON output, or the failure message) and the
/// progress lines it reported.
struct Run {
    result: Result<Value, String>,
    progress: Vec<String>,
}

impl Run {
    #[track_caller]
    fn ok(&self) -> &Value {
        match &self.result {
            Ok(v) => v,
            Err(e) => panic!("expected success, got: {e}"),
        }
    }

    #[track_caller]
    fn err(&self) -> &str {
        match &self.result {
            Ok(v) => panic!("expected a failure, got: {v}"),
            Err(e) => e,
        }
    }
}

/// The `[secrets]` of these tests' agent: the secrets under `prod/`.
fn allowed_secrets() -> SecretsConfig {
    SecretsConfig {
        allow: vec!["prod/*".parse().expect("pattern")],
    }
}

/// `[environments]` denying egress except to `rules` (given as JSON, as in the config).
fn deny_egress(rules: Value) -> EnvironmentsConfig {
    EnvironmentsConfig {
        egress: Egress::Deny,
        egress_allow: serde_json::from_value::<Vec<EgressRule>>(rules).expect("rules"),
        ..EnvironmentsConfig::default()
    }
}

impl Cluster {
    async fn start() -> Cluster {
        Self::with_timeout(Duration::from_secs(30)).await
    }

    async fn with_timeout(rollout_timeout: Duration) -> Cluster {
        Self::with(rollout_timeout, EnvironmentsConfig::default()).await
    }

    async fn with(rollout_timeout: Duration, environments: EnvironmentsConfig) -> Cluster {
        tether_e2e::init();
        let fake = FakeApiServer::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let handlers = handlers_for(&fake, dir.path(), rollout_timeout, environments);
        Cluster {
            fake,
            handlers,
            _dir: dir,
        }
    }

    async fn run(&self, kind: &str, payload: impl Into<Bytes>) -> Run {
        let (sink, mut rx) = ProgressSink::channel(1024);
        let handler = self.handlers.get(kind).expect("kind registered");
        let result = handler
            .run(payload.into(), sink)
            .await
            .map(|out| serde_json::from_slice(&out).expect("handler output is JSON"));
        let mut progress = Vec::new();
        while let Ok(line) = rx.try_recv() {
            progress.push(line);
        }
        Run { result, progress }
    }

    async fn run_json(&self, kind: &str, payload: Value) -> Run {
        self.run(kind, payload.to_string()).await
    }

    fn writes(&self) -> Vec<String> {
        self.fake
            .requests()
            .iter()
            .filter(|r| r.is_write())
            .map(|r| format!("{} {}", r.verb, r.path))
            .collect()
    }
}

/// Handlers of an agent on `fake` with `environments` (several agents' configs can share one
/// API server: the operator changing the config between commands).
fn handlers_for(
    fake: &FakeApiServer,
    dir: &std::path::Path,
    rollout_timeout: Duration,
    environments: EnvironmentsConfig,
) -> Handlers {
    let kubernetes = KubernetesConfig {
        kubeconfig: Some(fake.kubeconfig(dir)),
        poll_interval: Duration::from_millis(5),
        rollout_timeout,
    };
    let handlers = Handlers::empty();
    executors::register(
        &handlers,
        Arc::new(
            Backends::new(kubernetes, AwsConfig::default())
                .allow_secrets(allowed_secrets())
                .environments(environments),
        ),
    );
    handlers
}

/// A Secret as `secret.sync` writes it: Tether's label, the source annotation, `data`.
fn synced_secret(ns: &str, name: &str, source: &str, keys: &[&str]) -> Value {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| ((*k).to_owned(), json!("c2VjcmV0")))
        .collect();
    json!({"metadata": {"name": name, "namespace": ns,
                        "labels": {"app.kubernetes.io/managed-by": "tether"},
                        "annotations": {"tether.dev/secret-id": source}},
           "data": data})
}

fn label<'a>(obj: &'a Value, key: &str) -> &'a Value {
    &obj["metadata"]["labels"][key]
}

#[tokio::test]
async fn environment_create_applies_namespace_quota_and_default_deny_policy_idempotently() {
    let c = Cluster::start().await;
    let payload = json!({
        "name": "team-a",
        "labels": {"tether.dev/tenant": "acme"},
        "quota": {"cpu": "4", "memory": "8Gi", "pods": 20},
    });
    let first = c.run_json("environment.create", payload.clone()).await;
    assert_eq!(
        first.ok(),
        &json!({"namespace": "team-a", "created": true, "quota": "tether-quota",
                "network_policy": "tether-default-deny"})
    );
    assert_eq!(first.progress.len(), 3, "{:?}", first.progress);

    let ns = c.fake.get("namespaces", None, "team-a").expect("namespace");
    assert_eq!(label(&ns, "app.kubernetes.io/managed-by"), "tether");
    assert_eq!(label(&ns, "tether.dev/tenant"), "acme");
    assert_eq!(
        ns["metadata"]["managedFields"][0]["manager"],
        "tether-agent"
    );
    assert_eq!(ns["metadata"]["managedFields"][0]["operation"], "Apply");
    let quota = c
        .fake
        .get("resourcequotas", Some("team-a"), "tether-quota")
        .expect("quota");
    assert_eq!(
        quota["spec"]["hard"],
        json!({"requests.cpu": "4", "requests.memory": "8Gi", "pods": "20"})
    );
    let policy = c
        .fake
        .get("networkpolicies", Some("team-a"), "tether-default-deny")
        .expect("policy");
    assert_eq!(
        policy["spec"],
        json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    );

    // The same command again changes nothing: same resourceVersions, `created: false`.
    let versions = |c: &Cluster| {
        [
            c.fake.get("namespaces", None, "team-a"),
            c.fake.get("resourcequotas", Some("team-a"), "tether-quota"),
            c.fake
                .get("networkpolicies", Some("team-a"), "tether-default-deny"),
        ]
        .map(|o| o.expect("object")["metadata"]["resourceVersion"].clone())
    };
    let before = versions(&c);
    let again = c.run_json("environment.create", payload).await;
    assert_eq!(again.ok()["created"], false);
    assert_eq!(
        versions(&c),
        before,
        "re-applying the same environment changed it"
    );

    // Re-created without a quota: the quota goes (declarative), the rest stays.
    let bare = c
        .run_json("environment.create", json!({"name": "team-a"}))
        .await;
    assert!(bare.ok().get("quota").is_none());
    assert!(
        c.fake
            .get("resourcequotas", Some("team-a"), "tether-quota")
            .is_none()
    );
    let ns = c.fake.get("namespaces", None, "team-a").expect("namespace");
    assert!(
        label(&ns, "tether.dev/tenant").is_null(),
        "a label no longer applied stays: {ns}"
    );
}

#[tokio::test]
async fn a_namespace_tether_does_not_manage_is_refused_and_left_unchanged() {
    let c = Cluster::start().await;
    c.fake.insert(
        "namespaces",
        None,
        json!({"metadata": {"name": "kube-system", "labels": {"team": "platform"}}}),
    );
    let before = c.fake.get("namespaces", None, "kube-system").unwrap();
    for (kind, payload) in [
        ("environment.create", json!({"name": "kube-system"})),
        ("environment.delete", json!({"name": "kube-system"})),
        (
            "deploy",
            json!({"environment": "kube-system", "name": "web", "image": "nginx"}),
        ),
    ] {
        let run = c.run_json(kind, payload).await;
        assert!(
            run.err().contains("not managed by tether") && run.err().contains("nothing"),
            "{kind}: {}",
            run.err()
        );
    }
    assert_eq!(c.writes(), Vec::<String>::new(), "something was written");
    assert_eq!(
        c.fake.get("namespaces", None, "kube-system").unwrap(),
        before
    );
}

#[tokio::test]
async fn invalid_names_fail_with_the_field_and_rule_before_any_api_call() {
    let c = Cluster::start().await;
    let cases = [
        (
            "environment.create",
            json!({"name": "Team_A"}),
            "`name`",
            "DNS-1123 label",
        ),
        (
            "environment.create",
            json!({"name": "a", "labels": {"bad key!": "x"}}),
            "`labels`",
            "label key",
        ),
        (
            "environment.create",
            json!({"name": "a", "quota": {"memory": "8 GB"}}),
            "`quota.memory`",
            "quantity",
        ),
        (
            "environment.delete",
            json!({"name": "-x"}),
            "`name`",
            "DNS-1123 label",
        ),
        (
            "deploy",
            json!({"environment": "e", "name": "9web", "image": "nginx"}),
            "`name`",
            "DNS-1035 label",
        ),
        (
            "deploy",
            json!({"environment": "e", "name": "web", "image": "nginx", "env": {"1X": "v"}}),
            "`env.1X`",
            "environment variable name",
        ),
        (
            "deploy",
            json!({"environment": "e", "name": "web", "image": "ng inx"}),
            "`image`",
            "image reference",
        ),
        (
            "secret.sync",
            json!({"secret_id": "db", "environment": "e", "name": "DB"}),
            "`name`",
            "DNS-1123 subdomain",
        ),
        (
            "secret.sync",
            json!({"secret_id": "db", "environment": "e", "name": "db", "keys": ["a/b"]}),
            "`keys[0]`",
            "Secret key",
        ),
    ];
    for (kind, payload, field, rule) in cases {
        let run = c.run_json(kind, payload).await;
        let e = run.err();
        assert!(e.contains(field) && e.contains(rule), "{kind}: {e}");
    }
    assert!(c.fake.requests().is_empty(), "an API call was made");
}

#[tokio::test]
async fn a_malformed_payload_fails_naming_the_field() {
    let c = Cluster::start().await;
    let cases: [(&str, &str, &str); 5] = [
        ("environment.create", "{not json", "malformed payload"),
        (
            "environment.create",
            r#"{"labels": {}}"#,
            "missing field `name`",
        ),
        (
            "deploy",
            r#"{"environment": "e", "name": "web", "image": "x", "replicas": "three"}"#,
            "field `replicas`",
        ),
        (
            "deploy",
            r#"{"environment": "e", "name": "web", "image": "x", "timeout": "soon"}"#,
            "field `timeout`",
        ),
        (
            "environment.create",
            r#"{"name": "a", "quota": {"pods": 1, "gpus": 2}}"#,
            "field `quota.gpus`",
        ),
    ];
    for (kind, payload, want) in cases {
        let run = c.run(kind, payload).await;
        assert!(run.err().contains(want), "{kind} {payload}: {}", run.err());
        assert!(run.err().starts_with(kind), "{}", run.err());
    }
    assert!(c.fake.requests().is_empty(), "an API call was made");
}

#[tokio::test]
async fn environment_delete_deletes_only_a_managed_namespace_and_is_idempotent() {
    let c = Cluster::start().await;
    c.run_json("environment.create", json!({"name": "gone-soon"}))
        .await
        .ok();
    let run = c
        .run_json("environment.delete", json!({"name": "gone-soon"}))
        .await;
    assert_eq!(
        run.ok(),
        &json!({"namespace": "gone-soon", "deleted": true})
    );
    assert!(c.fake.get("namespaces", None, "gone-soon").is_none());
    assert!(
        c.fake
            .get("networkpolicies", Some("gone-soon"), "tether-default-deny")
            .is_none()
    );
    // Redelivered after success: nothing to do, still a success.
    let again = c
        .run_json("environment.delete", json!({"name": "gone-soon"}))
        .await;
    assert_eq!(again.ok()["deleted"], false);
    // The delete carries a uid + resourceVersion precondition.
    let delete = c
        .fake
        .requests()
        .into_iter()
        .find(|r| r.verb == "delete")
        .expect("a delete");
    assert_eq!(delete.name.as_deref(), Some("gone-soon"));
}

#[tokio::test]
async fn kubernetes_403_404_and_409_become_readable_failures() {
    let c = Cluster::start().await;
    c.run_json("environment.create", json!({"name": "team-a"}))
        .await
        .ok();

    // 403: RBAC without deployments.
    c.fake.set_rules(vec![Rule::new(
        &["get", "create", "patch", "delete"],
        "",
        &["namespaces", "services"],
    )]);
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx"}),
        )
        .await;
    let e = run.err();
    assert!(
        e.contains("forbidden") && e.contains("RBAC") && e.contains("HTTP 403"),
        "{e}"
    );
    assert!(
        e.contains(r#"cannot get resource "deployments" in API group "apps""#),
        "the API server's own words are kept: {e}"
    );
    c.fake.allow_all();

    // 404: the namespace vanished between the check and the write.
    c.fake.fail_next(
        "patch",
        "deployments",
        404,
        "NotFound",
        r#"namespaces "team-a" not found"#,
    );
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx"}),
        )
        .await;
    assert!(
        run.err().contains("not found (HTTP 404 NotFound)")
            && run.err().contains(r#"namespaces "team-a" not found"#),
        "{}",
        run.err()
    );

    // 409: the namespace changed between the read and the delete (its precondition failed).
    c.fake.fail_next(
        "delete",
        "namespaces",
        409,
        "Conflict",
        "Operation cannot be fulfilled on namespaces \"team-a\": Precondition failed: \
         ResourceVersion in precondition: 7, ResourceVersion in object meta: 9",
    );
    let run = c
        .run_json("environment.delete", json!({"name": "team-a"}))
        .await;
    assert!(
        run.err().contains("conflict") && run.err().contains("Precondition failed"),
        "{}",
        run.err()
    );
    assert!(c.fake.get("namespaces", None, "team-a").is_some());
}

#[tokio::test]
async fn deploy_applies_deployment_and_service_reports_progress_and_succeeds() {
    let c = Cluster::start().await;
    c.run_json("environment.create", json!({"name": "team-a"}))
        .await
        .ok();
    c.fake.insert(
        "secrets",
        Some("team-a"),
        synced_secret("team-a", "db", "prod/db", &["password"]),
    );
    let run = c
        .run_json(
            "deploy",
            json!({
                "environment": "team-a", "name": "web", "image": "registry.example.com/web:1.0",
                "replicas": 3, "env": {"MODE": "prod"},
                "secret_env": {"DB_PASSWORD": {"secret": "db", "key": "password"}},
                "ports": [8080],
            }),
        )
        .await;
    assert_eq!(
        run.ok(),
        &json!({"environment": "team-a", "deployment": "web", "generation": 1, "replicas": 3,
                "available": 3, "service": "web"})
    );
    let p = run.progress.join("\n");
    assert!(
        p.contains("deployment team-a/web applied (generation 1"),
        "{p}"
    );
    assert!(p.contains("service team-a/web applied"), "{p}");
    assert!(p.contains("1 of 3 replicas updated"), "{p}");
    assert!(p.contains("rollout complete: 3 of 3"), "{p}");

    let d = c
        .fake
        .get("deployments", Some("team-a"), "web")
        .expect("deployment");
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example.com/web:1.0");
    assert_eq!(
        container["env"][1]["valueFrom"]["secretKeyRef"],
        json!({"name": "db", "key": "password"})
    );
    let svc = c.fake.get("services", Some("team-a"), "web").expect("svc");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);

    // A new image is a new generation, rolled out again; without ports the Service goes.
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web",
                   "image": "registry.example.com/web:1.1", "replicas": 3}),
        )
        .await;
    assert_eq!(run.ok()["generation"], 2);
    assert!(c.fake.get("services", Some("team-a"), "web").is_none());
}

#[tokio::test]
async fn deploy_fails_with_the_image_pull_error() {
    let c = Cluster::start().await;
    c.run_json("environment.create", json!({"name": "team-a"}))
        .await
        .ok();
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web",
                   "image": "registry.example.com/does-not-exist:1"}),
        )
        .await;
    let e = run.err();
    assert!(
        e.contains("rollout failed: image pull error") && e.contains("ErrImagePull"),
        "{e}"
    );
}

#[tokio::test]
async fn deploy_fails_with_the_quota_that_refused_its_pods() {
    let c = Cluster::start().await;
    c.run_json(
        "environment.create",
        json!({"name": "small", "quota": {"pods": 1}}),
    )
    .await
    .ok();
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "small", "name": "web", "image": "nginx", "replicas": 3}),
        )
        .await;
    let e = run.err();
    assert!(
        e.contains("rollout failed: quota exceeded") && e.contains("exceeded quota: tether-quota"),
        "{e}"
    );
}

#[tokio::test]
async fn deploy_times_out_saying_what_it_waited_for() {
    let c = Cluster::with_timeout(Duration::from_millis(300)).await;
    c.run_json("environment.create", json!({"name": "team-a"}))
        .await
        .ok();
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx:stuck"}),
        )
        .await;
    let e = run.err();
    assert!(
        e.contains("rollout timed out after 300ms") && e.contains("0 of 1"),
        "{e}"
    );
    // A payload timeout wins over the configured one.
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx:stuck",
                   "timeout": "50ms"}),
        )
        .await;
    assert!(run.err().contains("timed out after 50ms"), "{}", run.err());
}

#[tokio::test]
async fn deploy_never_overwrites_workloads_tether_does_not_manage() {
    let c = Cluster::start().await;
    c.run_json("environment.create", json!({"name": "team-a"}))
        .await
        .ok();
    c.fake.insert(
        "services",
        Some("team-a"),
        json!({"metadata": {"name": "web", "namespace": "team-a"},
               "spec": {"ports": [{"port": 80}]}}),
    );
    c.fake.clear_requests();
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx", "ports": [80]}),
        )
        .await;
    assert!(
        run.err()
            .contains("service team-a/web exists and is not managed by tether"),
        "{}",
        run.err()
    );
    assert_eq!(c.writes(), Vec::<String>::new());
}

#[tokio::test]
async fn outside_a_cluster_without_a_kubeconfig_the_kinds_fail_saying_so() {
    tether_e2e::init();
    // SAFETY-free: this test process never sets these; nextest runs each test in its own process.
    assert!(
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_none(),
        "this test expects not to run inside a Kubernetes pod"
    );
    let handlers = Handlers::empty();
    executors::register(
        &handlers,
        Arc::new(Backends::new(
            KubernetesConfig::default(),
            AwsConfig::default(),
        )),
    );
    let (sink, _rx) = ProgressSink::channel(8);
    let e = handlers
        .get("environment.create")
        .unwrap()
        .run(Bytes::from_static(br#"{"name": "a"}"#), sink)
        .await
        .unwrap_err();
    assert!(
        e.contains("Kubernetes unavailable: not running in a cluster")
            && e.contains("kubernetes.kubeconfig is not set"),
        "{e}"
    );
}

#[tokio::test]
async fn the_kubernetes_handlers_work_under_exactly_the_documented_rbac() {
    let c = Cluster::start().await;
    let table = tether_e2e::fake_apiserver::architecture_rbac();
    c.fake
        .set_rules(tether_e2e::fake_apiserver::rules_of(&table));
    let steps = [
        (
            "environment.create",
            json!({"name": "team-a", "quota": {"pods": 5}, "egress": "deny",
                   "egress_allow": [{"cidr": "10.0.0.0/16", "ports": [5432]}]}),
        ),
        // Without quota and egress: both removed.
        ("environment.create", json!({"name": "team-a"})),
        (
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx", "ports": [80]}),
        ),
        (
            "deploy",
            json!({"environment": "team-a", "name": "web", "image": "nginx:2"}),
        ),
        ("environment.delete", json!({"name": "team-a"})),
    ];
    for (kind, payload) in steps {
        let run = c.run_json(kind, payload.clone()).await;
        assert!(run.result.is_ok(), "{kind} {payload}: {:?}", run.result);
    }
    let used = c.fake.verbs_used();
    let extra: Vec<_> = used.difference(&table).collect();
    assert!(extra.is_empty(), "used but not in the table: {extra:?}");
    // Everything in the table but the secrets rows is used here (secret.sync needs Secrets
    // Manager: data_plane.rs checks those rows).
    let unused: Vec<_> = table
        .iter()
        .filter(|(_, _, r)| r != "secrets")
        .filter(|t| !used.contains(*t))
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
}

#[tokio::test]
async fn environment_create_with_egress_deny_admits_only_dns_and_the_listed_destinations() {
    let c = Cluster::start().await;
    let run = c
        .run_json(
            "environment.create",
            json!({"name": "team-a", "egress": "deny", "egress_allow": [
                {"cidr": "10.0.0.0/16", "ports": [5432, 6432]},
                {"cidr": "fd00::/8", "protocol": "UDP"},
                {"cidr": "192.0.2.10/32"},
            ]}),
        )
        .await;
    assert_eq!(
        run.ok(),
        &json!({"namespace": "team-a", "created": true, "network_policy": "tether-default-deny",
                "egress_policy": "tether-egress"})
    );
    let policy = c
        .fake
        .get("networkpolicies", Some("team-a"), "tether-egress")
        .expect("egress policy");
    assert_eq!(label(&policy, "app.kubernetes.io/managed-by"), "tether");
    assert_eq!(
        policy["spec"],
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
                 "ports": [{"protocol": "TCP", "port": 5432}, {"protocol": "TCP", "port": 6432}]},
                {"to": [{"ipBlock": {"cidr": "fd00::/8"}}], "ports": [{"protocol": "UDP"}]},
                {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}]},
            ],
        })
    );
    // The ingress policy is unchanged beside it.
    assert_eq!(
        c.fake
            .get("networkpolicies", Some("team-a"), "tether-default-deny")
            .expect("ingress policy")["spec"],
        json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    );

    // Re-created without `egress`: open again, the policy removed (declarative).
    let open = c
        .run_json("environment.create", json!({"name": "team-a"}))
        .await;
    assert!(open.ok().get("egress_policy").is_none(), "{}", open.ok());
    assert!(
        c.fake
            .get("networkpolicies", Some("team-a"), "tether-egress")
            .is_none()
    );
    assert!(
        open.progress
            .iter()
            .any(|p| p.contains("tether-egress removed")),
        "{:?}",
        open.progress
    );

    // Bad entries fail naming the field, before any API call.
    c.fake.clear_requests();
    for (payload, want) in [
        (
            json!({"name": "team-a", "egress_allow": [{"cidr": "10.0.0.0/16"}]}),
            "`egress_allow` is used only with `egress`: \"deny\"",
        ),
        (
            json!({"name": "team-a", "egress": "deny", "egress_allow": [{"cidr": "10.0.0.1/16"}]}),
            "field `egress_allow[0].cidr`",
        ),
        (
            json!({"name": "team-a", "egress": "deny", "egress_allow": [{"cidr": "10.0.0.0/16", "ports": [0]}]}),
            "`egress_allow[0].ports`",
        ),
        (
            json!({"name": "team-a", "egress": "closed"}),
            "field `egress`",
        ),
    ] {
        let run = c.run_json("environment.create", payload.clone()).await;
        assert!(run.err().contains(want), "{payload}: {}", run.err());
    }
    assert!(c.fake.requests().is_empty(), "{:?}", c.fake.requests());
}

#[tokio::test]
async fn an_agent_denying_egress_gives_every_environment_its_policy_and_no_command_loosens_it() {
    let operator = json!([{"cidr": "10.0.0.0/16", "ports": [5432]}]);
    let c = Cluster::with(Duration::from_secs(30), deny_egress(operator)).await;
    let expected_egress = json!([
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 5432}]},
    ]);
    let egress_of = |c: &Cluster, ns: &str| {
        c.fake
            .get("networkpolicies", Some(ns), "tether-egress")
            .map(|p| p["spec"]["egress"].clone())
    };

    // No `egress` in the command: denied all the same.
    let run = c
        .run_json("environment.create", json!({"name": "team-a"}))
        .await;
    assert_eq!(run.ok()["egress_policy"], "tether-egress");
    assert_eq!(egress_of(&c, "team-a"), Some(expected_egress.clone()));

    // The attack: a command asking for open egress, or for a destination beyond the operator's.
    c.fake.clear_requests();
    for (payload, want) in [
        (
            json!({"name": "team-a", "egress": "allow"}),
            "this agent denies environments' egress (its config environments.egress = \"deny\"",
        ),
        (
            json!({"name": "team-a", "egress": "deny", "egress_allow": [{"cidr": "0.0.0.0/0"}]}),
            "`egress_allow[0]`: 0.0.0.0/0 (all ports) is outside what this agent allows",
        ),
        (
            json!({"name": "team-a", "egress_allow": [{"cidr": "10.0.1.0/24", "ports": [22]}]}),
            "outside what this agent allows (its config environments.egress_allow",
        ),
    ] {
        let run = c.run_json("environment.create", payload.clone()).await;
        assert!(
            run.err().contains(want) && run.err().contains("nothing was changed"),
            "{payload}: {}",
            run.err()
        );
    }
    assert!(c.fake.requests().is_empty(), "{:?}", c.fake.requests());
    assert_eq!(egress_of(&c, "team-a"), Some(expected_egress.clone()));

    // Within the operator's list: accepted, and the environment keeps the operator's list.
    let run = c
        .run_json(
            "environment.create",
            json!({"name": "team-a", "egress": "deny",
                   "egress_allow": [{"cidr": "10.0.1.0/24", "ports": [5432]}]}),
        )
        .await;
    run.ok();
    assert_eq!(egress_of(&c, "team-a"), Some(expected_egress.clone()));

    // An environment made while the agent allowed egress has no policy; a deploy by the agent
    // that now denies it applies the policy before the workload.
    let dir = tempfile::tempdir().expect("tempdir");
    let before = handlers_for(
        &c.fake,
        dir.path(),
        Duration::from_secs(30),
        EnvironmentsConfig::default(),
    );
    let (sink, _rx) = ProgressSink::channel(64);
    before
        .get("environment.create")
        .expect("kind")
        .run(Bytes::from_static(br#"{"name": "old"}"#), sink)
        .await
        .expect("environment made with egress allowed");
    assert_eq!(egress_of(&c, "old"), None);
    c.fake.clear_requests();
    let run = c
        .run_json(
            "deploy",
            json!({"environment": "old", "name": "web", "image": "nginx"}),
        )
        .await;
    run.ok();
    assert_eq!(egress_of(&c, "old"), Some(expected_egress));
    let writes = c.writes();
    let policy = writes
        .iter()
        .position(|w| w.contains("/networkpolicies/tether-egress"))
        .expect("the policy was applied");
    let deployment = writes
        .iter()
        .position(|w| w.contains("/deployments/web"))
        .expect("the deployment was applied");
    assert!(policy < deployment, "{writes:?}");
    assert!(
        run.progress
            .iter()
            .any(|p| p.contains("tether-egress applied (the agent's environments.egress")),
        "{:?}",
        run.progress
    );
}

#[tokio::test]
async fn deploy_references_only_secrets_synced_from_an_allowed_secret() {
    let c = Cluster::start().await;
    c.run_json("environment.create", json!({"name": "team-a"}))
        .await
        .ok();
    // What secret.sync wrote from an allowed secret: usable.
    c.fake.insert(
        "secrets",
        Some("team-a"),
        synced_secret("team-a", "db", "prod/db", &["password"]),
    );
    // Put there by someone else, or synced before the operator narrowed secrets.allow.
    c.fake.insert(
        "secrets",
        Some("team-a"),
        json!({"metadata": {"name": "theirs", "namespace": "team-a"}, "data": {"password": "eA=="}}),
    );
    c.fake.insert(
        "secrets",
        Some("team-a"),
        synced_secret("team-a", "legacy", "legacy/db", &["password"]),
    );
    let mut unannotated = synced_secret("team-a", "bare", "prod/db", &["password"]);
    unannotated["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    c.fake.insert("secrets", Some("team-a"), unannotated);
    c.fake.clear_requests();
    let deploy = |secret: &str, key: &str| {
        json!({"environment": "team-a", "name": "web", "image": "nginx",
               "secret_env": {"DB_PASSWORD": {"secret": secret, "key": key}}})
    };
    for ((secret, key), want) in [
        (
            ("absent", "password"),
            "secret team-a/absent does not exist: sync it first",
        ),
        (
            ("theirs", "password"),
            "secret team-a/theirs is not managed by tether",
        ),
        (
            ("legacy", "password"),
            "secret team-a/legacy was synced from \"legacy/db\", which the agent's secrets.allow does not allow",
        ),
        (
            ("bare", "password"),
            "has no tether.dev/secret-id annotation",
        ),
        (("db", "user"), "secret team-a/db has no key \"user\""),
    ] {
        let run = c.run_json("deploy", deploy(secret, key)).await;
        let e = run.err();
        assert!(
            e.contains("`secret_env.DB_PASSWORD`")
                && e.contains(want)
                && e.contains("nothing was changed"),
            "{secret}/{key}: {e}"
        );
    }
    assert_eq!(c.writes(), Vec::<String>::new(), "something was written");
    let run = c.run_json("deploy", deploy("db", "password")).await;
    assert_eq!(run.ok()["available"], 1);
}
