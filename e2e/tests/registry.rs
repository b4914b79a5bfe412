//! `registry.create` and `registry.delete` against a real ECR emulator (moto's server, through
//! a proxy that records every operation it forwards), then end to end: control plane → real
//! gateway process → real agent process → ECR.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tether_agent::commands::{Handlers, ProgressSink};
use tether_agent::config::{AwsConfig, KubernetesConfig, RegistryConfig};
use tether_agent::ecr::{Ecr, IAM_ACTIONS};
use tether_agent::executors::{self, Backends, PULL_ACTIONS, PULL_SID, PUSH_ACTIONS, PUSH_SID};
use tether_api::v1::CommandState;
use tether_e2e::moto::{Fault, FaultProxy, Moto, aws_config_for, ecr};
use tether_e2e::{
    AgentProcess, GatewayProcess, Pki, agent_config, commands_client, submit_req, wait_connected,
    wait_final,
};

const T: Duration = Duration::from_secs(60);

/// The cluster's node role: what `registry.pull_principals` names.
const NODES: &str = "arn:aws:iam::123456789012:role/eks-nodes";
/// The vendor's CI roles, in another account.
const CI: &str = "arn:aws:iam::111122223333:role/vendor-ci";
const CI_2: &str = "arn:aws:iam::111122223333:role/vendor-ci-2";
/// moto's account and region.
const ARN_PREFIX: &str = "arn:aws:ecr:us-east-1:123456789012:repository/";

fn registry_config(pull: &[&str]) -> RegistryConfig {
    RegistryConfig {
        name_prefix: "tether/".into(),
        pull_principals: pull.iter().map(|p| p.parse().expect("ARN")).collect(),
    }
}

/// The registry kinds on `ecr` with `registry`.
fn handlers(ecr: Ecr, registry: RegistryConfig) -> Handlers {
    let h = Handlers::empty();
    executors::register(
        &h,
        Arc::new(
            Backends::new(KubernetesConfig::default(), AwsConfig::default())
                .with_registry(registry)
                .with_ecr(ecr),
        ),
    );
    h
}

/// Runs `kind`; gives the result as JSON (or the failure) and the progress lines.
async fn run(h: &Handlers, kind: &str, payload: Value) -> (Result<Value, String>, Vec<String>) {
    let (sink, mut rx) = ProgressSink::channel(1024);
    let out = h
        .get(kind)
        .expect("kind")
        .run(payload.to_string().into(), sink)
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON result"));
    let mut progress = Vec::new();
    while let Ok(l) = rx.try_recv() {
        progress.push(l);
    }
    (out, progress)
}

/// moto, a recording proxy in front of it, and the registry kinds calling ECR through the
/// proxy with `pull` as `registry.pull_principals`.
struct Rig {
    moto: Moto,
    proxy: FaultProxy,
    handlers: Handlers,
}

impl Rig {
    async fn start(pull: &[&str]) -> Rig {
        let moto = Moto::start().await;
        let proxy = FaultProxy::recording(moto.addr()).await;
        let handlers = handlers(
            ecr(&aws_config_for(&proxy.endpoint())).await,
            registry_config(pull),
        );
        Rig {
            moto,
            proxy,
            handlers,
        }
    }

    async fn run(&self, kind: &str, payload: Value) -> (Result<Value, String>, Vec<String>) {
        run(&self.handlers, kind, payload).await
    }

    /// The operations the proxy forwarded from index `from` on.
    fn operations_since(&self, from: usize) -> Vec<String> {
        self.proxy.operations()[from..].to_vec()
    }
}

// === Reading ECR back (the test's own admin client) ===

/// What ECR holds for a repository, read with the admin client.
#[derive(Debug, PartialEq)]
struct Snapshot {
    scan_on_push: bool,
    mutability: String,
    tags: BTreeMap<String, String>,
    lifecycle: Option<Value>,
    policy: Option<Value>,
    images: usize,
}

async fn snapshot(moto: &Moto, name: &str) -> Option<Snapshot> {
    let c = moto.ecr_client();
    let repo = match c
        .describe_repositories()
        .repository_names(name)
        .send()
        .await
    {
        Ok(out) => out.repositories()[0].clone(),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_repository_not_found_exception()) =>
        {
            return None;
        }
        Err(e) => panic!("describe {name}: {e:?}"),
    };
    let tags = c
        .list_tags_for_resource()
        .resource_arn(repo.repository_arn().expect("arn"))
        .send()
        .await
        .expect("tags")
        .tags()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().to_owned()))
        .collect();
    let lifecycle = c
        .get_lifecycle_policy()
        .repository_name(name)
        .send()
        .await
        .ok()
        .map(|o| serde_json::from_str(o.lifecycle_policy_text().expect("text")).expect("JSON"));
    let policy = c
        .get_repository_policy()
        .repository_name(name)
        .send()
        .await
        .ok()
        .map(|o| serde_json::from_str(o.policy_text().expect("text")).expect("JSON"));
    let images = c
        .list_images()
        .repository_name(name)
        .send()
        .await
        .expect("images")
        .image_ids()
        .len();
    Some(Snapshot {
        scan_on_push: repo
            .image_scanning_configuration()
            .expect("scanning")
            .scan_on_push(),
        mutability: repo
            .image_tag_mutability()
            .expect("mutability")
            .as_str()
            .to_owned(),
        tags,
        lifecycle,
        policy,
        images,
    })
}

/// The statement of `policy` with `sid`.
fn statement<'a>(policy: &'a Value, sid: &str) -> Option<&'a Value> {
    policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find(|s| s["Sid"] == sid)
}

/// A statement's principals or actions, as a set (a one-element list may be a string).
fn set_of(v: &Value) -> BTreeSet<String> {
    match v {
        Value::String(s) => BTreeSet::from([s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|s| s.as_str().expect("string").to_owned())
            .collect(),
        other => panic!("not a string or list: {other}"),
    }
}

fn strings(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Pushes an image manifest to `name` with the admin client (moto needs no layers for it).
async fn put_image(moto: &Moto, name: &str, tag: &str) {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 7023,
            "digest": format!("sha256:{}", "a".repeat(64)),
        },
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 32654,
            "digest": format!("sha256:{}", "b".repeat(64)),
        }],
    });
    moto.ecr_client()
        .put_image()
        .repository_name(name)
        .image_manifest(manifest.to_string())
        .image_tag(tag)
        .send()
        .await
        .expect("put image");
}

// === Create and converge ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_a_tagged_repository_whose_settings_and_policies_read_back_from_ecr() {
    let r = Rig::start(&[NODES]).await;
    let (out, progress) = r
        .run(
            "registry.create",
            json!({"name": "tether/web", "keep_last": 30, "push_principals": [CI],
                   "tags": {"team": "shop"}}),
        )
        .await;
    let out = out.expect("registry.create");
    assert_eq!(
        out,
        json!({"name": "tether/web",
               "repository_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/tether/web",
               "repository_arn": format!("{ARN_PREFIX}tether/web"),
               "created": true, "changed": ["lifecycle_policy", "repository_policy"]})
    );
    assert!(
        progress[0].starts_with("created repository tether/web"),
        "{progress:?}"
    );

    let s = snapshot(&r.moto, "tether/web")
        .await
        .expect("repository exists");
    assert!(s.scan_on_push, "scan on push is on by default");
    assert_eq!(s.mutability, "IMMUTABLE", "tags are immutable by default");
    assert_eq!(
        s.tags,
        BTreeMap::from([
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "tether".to_owned()
            ),
            ("team".to_owned(), "shop".to_owned()),
        ])
    );
    let lifecycle = s.lifecycle.expect("lifecycle policy");
    let rules = lifecycle["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "{lifecycle}");
    assert_eq!(
        rules[0]["selection"],
        json!({"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 30})
    );
    assert_eq!(rules[0]["action"], json!({"type": "expire"}));
    let policy = s.policy.expect("repository policy");
    let push = statement(&policy, PUSH_SID).expect("push statement");
    assert_eq!(push["Effect"], "Allow");
    assert_eq!(set_of(&push["Principal"]["AWS"]), strings(&[CI]));
    assert_eq!(set_of(&push["Action"]), strings(PUSH_ACTIONS));
    let pull = statement(&policy, PULL_SID).expect("pull statement");
    assert_eq!(set_of(&pull["Principal"]["AWS"]), strings(&[NODES]));
    assert_eq!(set_of(&pull["Action"]), strings(PULL_ACTIONS));
    assert!(
        !set_of(&pull["Action"]).contains("ecr:PutImage"),
        "nodes only pull"
    );

    // A new repository has no policies to read first: four calls.
    assert_eq!(
        r.operations_since(0),
        [
            "DescribeRepositories",
            "CreateRepository",
            "PutLifecyclePolicy",
            "SetRepositoryPolicy"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_again_changes_nothing_and_changed_settings_converge_keeping_the_customers_own() {
    let r = Rig::start(&[NODES]).await;
    let first = json!({"name": "tether/web", "scan_on_push": false, "immutable_tags": false,
                       "keep_last": 30, "push_principals": [CI], "tags": {"team": "shop"}});
    r.run("registry.create", first.clone())
        .await
        .0
        .expect("create");
    let created = snapshot(&r.moto, "tether/web").await.expect("exists");
    assert!(!created.scan_on_push);
    assert_eq!(created.mutability, "MUTABLE");

    // The same intent again: reads only, nothing written, nothing changed.
    let before = r.proxy.requests();
    let (out, progress) = r.run("registry.create", first.clone()).await;
    let out = out.expect("again");
    assert_eq!(out["created"], false);
    assert_eq!(out["changed"], json!([]));
    assert!(
        progress.iter().any(|p| p.contains("nothing changed")),
        "{progress:?}"
    );
    assert_eq!(
        r.operations_since(before),
        [
            "DescribeRepositories",
            "ListTagsForResource",
            "GetLifecyclePolicy",
            "GetRepositoryPolicy"
        ]
    );
    assert_eq!(
        snapshot(&r.moto, "tether/web").await.as_ref(),
        Some(&created)
    );

    // The customer adds a tag and a statement of their own.
    let c = r.moto.ecr_client();
    c.tag_resource()
        .resource_arn(format!("{ARN_PREFIX}tether/web"))
        .tags(
            aws_sdk_ecr::types::Tag::builder()
                .key("cost-center")
                .value("42")
                .build()
                .expect("tag"),
        )
        .send()
        .await
        .expect("their tag");
    let theirs = json!({"Sid": "LambdaPull", "Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]});
    let mut policy = created.policy.clone().expect("policy");
    policy["Statement"]
        .as_array_mut()
        .expect("statements")
        .push(theirs.clone());
    c.set_repository_policy()
        .repository_name("tether/web")
        .policy_text(policy.to_string())
        .send()
        .await
        .expect("their statement");

    // Every setting changed: each converges, the customer's tag and statement stay.
    let (out, progress) = r
        .run(
            "registry.create",
            json!({"name": "tether/web", "scan_on_push": true, "immutable_tags": true,
                   "keep_last": 5, "push_principals": [CI_2], "tags": {"team": "checkout"}}),
        )
        .await;
    let out = out.expect("converge");
    assert_eq!(out["created"], false);
    assert_eq!(
        out["changed"],
        json!([
            "scan_on_push",
            "immutable_tags",
            "tags",
            "lifecycle_policy",
            "repository_policy"
        ]),
        "{progress:?}"
    );
    let s = snapshot(&r.moto, "tether/web").await.expect("exists");
    assert!(s.scan_on_push);
    assert_eq!(s.mutability, "IMMUTABLE");
    assert_eq!(s.tags["team"], "checkout");
    assert_eq!(s.tags["cost-center"], "42", "the customer's tag is kept");
    assert_eq!(s.tags["app.kubernetes.io/managed-by"], "tether");
    assert_eq!(
        s.lifecycle.as_ref().expect("lifecycle")["rules"][0]["selection"]["countNumber"],
        5
    );
    let policy = s.policy.expect("policy");
    assert_eq!(
        statement(&policy, "LambdaPull"),
        Some(&theirs),
        "theirs is kept as it was"
    );
    assert_eq!(
        set_of(&statement(&policy, PUSH_SID).expect("push")["Principal"]["AWS"]),
        strings(&[CI_2]),
        "the old pusher lost access"
    );
    assert!(statement(&policy, PULL_SID).is_some());

    // No keep_last, no pushers: the lifecycle policy and Tether's push statement go.
    let (out, _) = r
        .run("registry.create", json!({"name": "tether/web"}))
        .await;
    let out = out.expect("converge again");
    assert_eq!(
        out["changed"],
        json!(["lifecycle_policy", "repository_policy"])
    );
    let s = snapshot(&r.moto, "tether/web").await.expect("exists");
    assert_eq!(s.lifecycle, None, "every image is kept");
    let policy = s.policy.expect("policy");
    assert!(statement(&policy, PUSH_SID).is_none(), "{policy}");
    assert!(statement(&policy, PULL_SID).is_some() && statement(&policy, "LambdaPull").is_some());

    // Scanning and immutability off again. The SDK sends scanOnPush = false as an empty
    // configuration (false is the model's default, so smithy-rs leaves it out); ECR reads
    // that as false, moto 5.2.5 ignores it, so only the call is checked here.
    let before = r.proxy.requests();
    let (out, _) = r
        .run(
            "registry.create",
            json!({"name": "tether/web", "scan_on_push": false, "immutable_tags": false}),
        )
        .await;
    assert_eq!(
        out.expect("off")["changed"],
        json!(["scan_on_push", "immutable_tags"])
    );
    let ops = r.operations_since(before);
    assert!(
        ops.iter().any(|o| o == "PutImageScanningConfiguration")
            && ops.iter().any(|o| o == "PutImageTagMutability"),
        "{ops:?}"
    );
    assert_eq!(
        snapshot(&r.moto, "tether/web")
            .await
            .expect("exists")
            .mutability,
        "MUTABLE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_policy_with_no_statement_left_is_removed() {
    let r = Rig::start(&[]).await;
    r.run(
        "registry.create",
        json!({"name": "tether/api", "push_principals": [CI]}),
    )
    .await
    .0
    .expect("create");
    let s = snapshot(&r.moto, "tether/api").await.expect("exists");
    assert!(statement(&s.policy.expect("policy"), PUSH_SID).is_some());
    let (out, _) = r
        .run("registry.create", json!({"name": "tether/api"}))
        .await;
    assert_eq!(
        out.expect("converge")["changed"],
        json!(["repository_policy"])
    );
    assert_eq!(
        snapshot(&r.moto, "tether/api")
            .await
            .expect("exists")
            .policy,
        None
    );

    // Created with nobody to grant: no policy is ever written.
    let before = r.proxy.requests();
    r.run("registry.create", json!({"name": "tether/bare"}))
        .await
        .0
        .expect("create");
    assert_eq!(
        r.operations_since(before),
        ["DescribeRepositories", "CreateRepository"]
    );
    assert_eq!(
        snapshot(&r.moto, "tether/bare")
            .await
            .expect("exists")
            .policy,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_without_tethers_tag_is_refused_and_left_exactly_as_it_was() {
    let r = Rig::start(&[NODES]).await;
    let c = r.moto.ecr_client();
    let tag = |k: &str, v: &str| {
        aws_sdk_ecr::types::Tag::builder()
            .key(k)
            .value(v)
            .build()
            .expect("tag")
    };
    // Theirs: no management tag; and one managed by someone else.
    for (name, tags) in [
        ("tether/theirs", vec![tag("owner", "platform-team")]),
        (
            "tether/other-tool",
            vec![tag("app.kubernetes.io/managed-by", "terraform")],
        ),
    ] {
        c.create_repository()
            .repository_name(name)
            .set_tags(Some(tags))
            .send()
            .await
            .expect("their repository");
        c.put_lifecycle_policy()
            .repository_name(name)
            .lifecycle_policy_text(
                json!({"rules": [{"rulePriority": 1, "selection": {"tagStatus": "any",
                        "countType": "imageCountMoreThan", "countNumber": 999},
                        "action": {"type": "expire"}}]})
                .to_string(),
            )
            .send()
            .await
            .expect("their lifecycle policy");
        put_image(&r.moto, name, "v1").await;
    }
    let before = [
        snapshot(&r.moto, "tether/theirs").await.expect("exists"),
        snapshot(&r.moto, "tether/other-tool")
            .await
            .expect("exists"),
    ];
    let requests = r.proxy.requests();

    for name in ["tether/theirs", "tether/other-tool"] {
        for (kind, payload) in [
            (
                "registry.create",
                json!({"name": name, "keep_last": 3, "push_principals": [CI],
                       "scan_on_push": false, "tags": {"team": "x"}}),
            ),
            ("registry.delete", json!({"name": name, "force": true})),
        ] {
            let e = r.run(kind, payload).await.0.expect_err("refused");
            assert_eq!(
                e,
                format!(
                    "{kind}: repository {name:?} is not managed by tether (it lacks the tag \
                     app.kubernetes.io/managed-by=tether); nothing was changed"
                )
            );
        }
    }
    assert_eq!(
        [
            snapshot(&r.moto, "tether/theirs")
                .await
                .expect("still there"),
            snapshot(&r.moto, "tether/other-tool")
                .await
                .expect("still there"),
        ],
        before
    );
    let ops: BTreeSet<String> = r.operations_since(requests).into_iter().collect();
    assert_eq!(
        ops,
        strings(&["DescribeRepositories", "ListTagsForResource"]),
        "only reads were sent"
    );
}

// === Delete ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_refuses_a_repository_holding_images_unless_forced_and_is_idempotent() {
    let r = Rig::start(&[NODES]).await;
    r.run("registry.create", json!({"name": "tether/api"}))
        .await
        .0
        .expect("create");
    put_image(&r.moto, "tether/api", "1.0").await;

    let e = r
        .run("registry.delete", json!({"name": "tether/api"}))
        .await
        .0
        .expect_err("holds an image");
    assert_eq!(
        e,
        "registry.delete: repository \"tether/api\" holds images; nothing was deleted; send \
         force: true to delete it with its images"
    );
    assert_eq!(
        snapshot(&r.moto, "tether/api").await.expect("kept").images,
        1
    );

    let (out, progress) = r
        .run(
            "registry.delete",
            json!({"name": "tether/api", "force": true}),
        )
        .await;
    assert_eq!(
        out.expect("forced"),
        json!({"name": "tether/api", "deleted": true})
    );
    assert!(
        progress.iter().any(|p| p.contains("with its images")),
        "{progress:?}"
    );
    assert_eq!(snapshot(&r.moto, "tether/api").await, None);

    // Already gone: a success that deleted nothing (a redelivered delete).
    let (out, _) = r
        .run(
            "registry.delete",
            json!({"name": "tether/api", "force": true}),
        )
        .await;
    assert_eq!(
        out.expect("gone"),
        json!({"name": "tether/api", "deleted": false})
    );

    // Empty: no force needed.
    r.run("registry.create", json!({"name": "tether/empty"}))
        .await
        .0
        .expect("create");
    let (out, _) = r
        .run("registry.delete", json!({"name": "tether/empty"}))
        .await;
    assert_eq!(
        out.expect("empty"),
        json!({"name": "tether/empty", "deleted": true})
    );
    assert_eq!(snapshot(&r.moto, "tether/empty").await, None);
}

// === Bad input ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payloads_are_refused_before_any_aws_call() {
    let r = Rig::start(&[NODES]).await;
    let cases = [
        (
            "registry.create",
            json!({"name": "tether/Web"}),
            "`name`: \"tether/Web\" is not a valid ECR repository name",
        ),
        (
            "registry.create",
            json!({"name": "tether//web"}),
            "is not a valid ECR repository name",
        ),
        (
            "registry.create",
            json!({"name": "tether/web-"}),
            "is not a valid ECR repository name",
        ),
        (
            "registry.create",
            json!({"name": "tether/we b"}),
            "is not a valid ECR repository name",
        ),
        (
            "registry.create",
            json!({"name": format!("tether/{}", "a".repeat(250))}),
            "is not a valid ECR repository name",
        ),
        (
            "registry.create",
            json!({"name": "shop/web"}),
            "does not start with \"tether/\": this agent's registry.name_prefix",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "push_principals": ["*"]}),
            "field `push_principals[0]`: \"*\" is not an IAM principal ARN",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "push_principals": ["arn:aws:iam::111122223333:role/ci-*"]}),
            "is not an IAM principal ARN",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "push_principals": ["111122223333"]}),
            "is not an IAM principal ARN",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "keep_last": 0}),
            "`keep_last`",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "tags": {"aws:cloudformation:stack-name": "x"}}),
            "is not a valid tag key",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "tags": {"app.kubernetes.io/managed-by": "me"}}),
            "Tether sets this tag",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "tags": {"team": "a;b"}}),
            "`tags.team`",
        ),
        (
            "registry.create",
            json!({"name": "tether/web", "scan": true}),
            "unknown field `scan`",
        ),
        (
            "registry.create",
            json!({"scan_on_push": true}),
            "missing field `name`",
        ),
        ("registry.create", json!("tether/web"), "malformed payload"),
        (
            "registry.delete",
            json!({"name": "Tether"}),
            "registry.delete: `name`",
        ),
        (
            "registry.delete",
            json!({"name": "other/web"}),
            "registry.name_prefix",
        ),
        (
            "registry.delete",
            json!({"name": "tether/web", "force": "yes"}),
            "field `force`",
        ),
    ];
    for (kind, payload, want) in cases {
        let e = r.run(kind, payload.clone()).await.0.expect_err("refused");
        assert!(e.starts_with(&format!("{kind}: ")), "{payload}: {e}");
        assert!(e.contains(want), "{payload}: {e}");
    }
    assert_eq!(
        r.proxy.requests(),
        0,
        "a call reached ECR: {:?}",
        r.proxy.operations()
    );

    // Positive control: the same rig's calls do go through the proxy.
    let (out, _) = r
        .run("registry.delete", json!({"name": "tether/web"}))
        .await;
    assert_eq!(out.expect("nothing to delete")["deleted"], false);
    assert_eq!(r.proxy.operations(), ["DescribeRepositories"]);
}

// === IAM ===

/// The `Allow` actions of the first JSON policy under "IAM for the registry commands" in
/// docs/install-agent.md: what the guide tells customers to grant.
fn documented_actions() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/install-agent.md");
    let doc = std::fs::read_to_string(path).expect("read docs/install-agent.md");
    let section = doc
        .split_once("### IAM for the registry commands")
        .expect("the section is in docs/install-agent.md")
        .1;
    let block = section
        .split_once("```json")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a JSON policy in the section")
        .0;
    let policy: Value = serde_json::from_str(block).expect("the documented policy is JSON");
    policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| set_of(&s["Action"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_iam_policy_is_exactly_what_the_registry_commands_use() {
    let documented = documented_actions();
    assert_eq!(
        documented,
        strings(IAM_ACTIONS),
        "docs and ecr::IAM_ACTIONS disagree"
    );
    let actions: Vec<&str> = documented.iter().map(String::as_str).collect();
    // moto checks actions, not resources, for ECR: the policy's actions on every repository.
    let moto = Moto::start_with_iam_users(&[("agent", &actions)]).await;
    let proxy = FaultProxy::recording(moto.addr()).await;
    let agent = Ecr::with_credentials(&aws_config_for(&proxy.endpoint()), moto.user("agent")).await;
    // No pull principals, so that removing the pushers removes the whole policy.
    let h = handlers(agent, registry_config(&[]));
    let ok = async |kind: &str, payload: Value| {
        run(&h, kind, payload.clone())
            .await
            .0
            .unwrap_or_else(|e| panic!("{kind} {payload} under the documented policy: {e}"))
    };

    ok(
        "registry.create",
        json!({"name": "tether/web", "keep_last": 10, "push_principals": [CI]}),
    )
    .await;
    ok(
        "registry.create",
        json!({"name": "tether/web", "scan_on_push": false, "immutable_tags": false,
               "keep_last": 20, "push_principals": [CI_2], "tags": {"team": "shop"}}),
    )
    .await;
    ok("registry.create", json!({"name": "tether/web"})).await;
    put_image(&moto, "tether/web", "1.0").await;
    let e = run(&h, "registry.delete", json!({"name": "tether/web"}))
        .await
        .0
        .expect_err("holds an image");
    assert!(e.contains("holds images"), "{e}");
    ok(
        "registry.delete",
        json!({"name": "tether/web", "force": true}),
    )
    .await;
    assert_eq!(snapshot(&moto, "tether/web").await, None);

    let used: BTreeSet<String> = proxy
        .operations()
        .into_iter()
        .map(|op| format!("ecr:{op}"))
        .collect();
    assert_eq!(
        used, documented,
        "the commands use exactly the documented actions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_by_iam_names_the_missing_action_and_changes_nothing() {
    let without = |missing: &str| -> Vec<&'static str> {
        IAM_ACTIONS
            .iter()
            .copied()
            .filter(|a| *a != missing)
            .collect()
    };
    let (no_create, no_delete) = (
        without("ecr:CreateRepository"),
        without("ecr:DeleteRepository"),
    );
    let moto =
        Moto::start_with_iam_users(&[("no-create", &no_create), ("no-delete", &no_delete)]).await;
    let as_user = async |user: &str| {
        handlers(
            Ecr::with_credentials(&moto.aws_config(), moto.user(user)).await,
            registry_config(&[NODES]),
        )
    };

    let h = as_user("no-create").await;
    let e = run(
        &h,
        "registry.create",
        json!({"name": "tether/web", "push_principals": [CI]}),
    )
    .await
    .0
    .expect_err("denied");
    assert!(
        e.starts_with(
            "registry.create: repository \"tether/web\": access denied: the agent's AWS identity \
             needs ecr:CreateRepository on it"
        ),
        "{e}"
    );
    assert!(e.contains("retrying will not help"), "{e}");
    // AWS's own words are kept: moto names the user and the action it refused.
    assert!(
        e.contains("not authorized to perform: ecr:CreateRepository"),
        "{e}"
    );
    assert_eq!(snapshot(&moto, "tether/web").await, None);

    let h = as_user("no-delete").await;
    run(&h, "registry.create", json!({"name": "tether/web"}))
        .await
        .0
        .expect("no-delete may create");
    let e = run(
        &h,
        "registry.delete",
        json!({"name": "tether/web", "force": true}),
    )
    .await
    .0
    .expect_err("denied");
    assert!(e.contains("needs ecr:DeleteRepository on it"), "{e}");
    assert!(snapshot(&moto, "tether/web").await.is_some(), "still there");
}

// === Throttling and quotas ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_with_backoff_then_reported_as_retryable() {
    let moto = Moto::start().await;
    let twice = FaultProxy::start(moto.addr(), Fault::Throttling, Some(2)).await;
    let h = handlers(
        ecr(&aws_config_for(&twice.endpoint())).await,
        registry_config(&[]),
    );
    let (out, _) = run(&h, "registry.create", json!({"name": "tether/busy"})).await;
    assert_eq!(out.expect("retried, then created")["created"], true);
    assert_eq!(
        twice.operations(),
        [
            "DescribeRepositories",
            "DescribeRepositories",
            "DescribeRepositories",
            "CreateRepository"
        ],
        "two throttled, retried by the SDK"
    );

    let always = FaultProxy::start(moto.addr(), Fault::Throttling, None).await;
    let h = handlers(
        ecr(&aws_config_for(&always.endpoint())).await,
        registry_config(&[]),
    );
    let e = run(&h, "registry.create", json!({"name": "tether/busier"}))
        .await
        .0
        .expect_err("throttled");
    assert_eq!(
        e,
        "registry.create: repository \"tether/busier\": ECR throttled all 3 attempts of \
         ecr:DescribeRepositories; retrying later can help"
    );
    assert_eq!(always.requests(), 3, "aws.max_attempts = 3");
    assert_eq!(snapshot(&moto, "tether/busier").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_quota_reached_is_reported_readably_and_not_retried() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start_for(moto.addr(), Fault::LimitExceeded, "CreateRepository").await;
    let h = handlers(
        ecr(&aws_config_for(&proxy.endpoint())).await,
        registry_config(&[]),
    );
    let e = run(
        &h,
        "registry.create",
        json!({"name": "tether/one-too-many"}),
    )
    .await
    .0
    .expect_err("quota");
    assert!(
        e.starts_with(
            "registry.create: repository \"tether/one-too-many\": ecr:CreateRepository exceeded \
             an ECR quota: LimitExceededException: "
        ),
        "{e}"
    );
    assert!(
        e.contains("Service Quotas") && e.contains("retrying will not help"),
        "{e}"
    );
    assert_eq!(
        proxy.operations(),
        ["DescribeRepositories", "CreateRepository"]
    );
}

// === End to end ===

/// A value nobody could find by accident.
fn unique(what: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{what}{:016x}", h.finish())
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
async fn registry_commands_through_the_gateway_create_converge_refuse_and_delete() {
    tether_e2e::init();
    let moto = Moto::start().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("gateway-data");
    let gw = GatewayProcess::spawn_logging(
        &pki,
        &data_dir,
        "127.0.0.1:0".parse().expect("addr"),
        "debug,h2=info,hyper=info,quinn=info,rustls=info",
    )
    .await;
    let mut cfg = agent_config(&pki.agent("acme/edge"), gw.tunnel);
    cfg.aws = moto.aws_config();
    cfg.registry = registry_config(&[NODES]);
    // The agent's AWS credentials (moto without IAM takes any): they must stay in the data plane.
    let (key_id, secret_key) = (unique("AKIATETHER"), unique("secret-"));
    let agent = AgentProcess::spawn_env(
        &cfg,
        &[
            (
                "RUST_LOG",
                "debug,h2=info,hyper=info,quinn=info,rustls=info",
            ),
            ("AWS_ACCESS_KEY_ID", &key_id),
            ("AWS_SECRET_ACCESS_KEY", &secret_key),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let api = pki.client("api");
    wait_connected(gw.channel(&api).await, "acme/edge", T).await;
    let mut client = commands_client(gw.channel(&api).await);
    let mut submit = async |kind: &str, payload: Value| {
        let mut req = submit_req("acme/edge", kind, payload.to_string());
        req.content_type = "application/json".into();
        let id = client.submit(req).await.expect("submit").into_inner().id;
        let done = wait_final(&mut client, &id, T).await;
        let output = done
            .result
            .as_ref()
            .map(|r| (r.message.clone(), r.output.clone()))
            .unwrap_or_default();
        (done.state(), output.0, output.1)
    };

    let (state, message, output) = submit(
        "registry.create",
        json!({"name": "tether/web", "keep_last": 30, "push_principals": [CI]}),
    )
    .await;
    assert_eq!(state, CommandState::Succeeded, "{message}");
    let out: Value = serde_json::from_slice(&output).expect("JSON result");
    assert_eq!(out["created"], true);
    assert_eq!(
        out["repository_uri"],
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/tether/web"
    );
    let s = snapshot(&moto, "tether/web").await.expect("created in ECR");
    assert_eq!(s.tags["app.kubernetes.io/managed-by"], "tether");
    assert!(
        statement(&s.policy.expect("policy"), PULL_SID).is_some(),
        "nodes from [registry]"
    );

    let (state, message, output) = submit(
        "registry.create",
        json!({"name": "tether/web", "keep_last": 10, "push_principals": [CI]}),
    )
    .await;
    assert_eq!(state, CommandState::Succeeded, "{message}");
    let out: Value = serde_json::from_slice(&output).expect("JSON result");
    assert_eq!(
        (&out["created"], &out["changed"]),
        (&json!(false), &json!(["lifecycle_policy"]))
    );
    assert_eq!(
        snapshot(&moto, "tether/web")
            .await
            .expect("exists")
            .lifecycle
            .expect("lifecycle")["rules"][0]["selection"]["countNumber"],
        10
    );

    // A repository the customer made themselves: FAILED, with the reason, nothing touched.
    moto.ecr_client()
        .create_repository()
        .repository_name("tether/theirs")
        .send()
        .await
        .expect("their repository");
    let theirs = snapshot(&moto, "tether/theirs").await;
    let (state, message, _) = submit(
        "registry.delete",
        json!({"name": "tether/theirs", "force": true}),
    )
    .await;
    assert_eq!(state, CommandState::Failed);
    assert!(
        message.contains("is not managed by tether") && message.contains("nothing was changed"),
        "{message}"
    );
    assert_eq!(snapshot(&moto, "tether/theirs").await, theirs);

    put_image(&moto, "tether/web", "1.0").await;
    let (state, message, output) = submit(
        "registry.delete",
        json!({"name": "tether/web", "force": true}),
    )
    .await;
    assert_eq!(state, CommandState::Succeeded, "{message}");
    assert_eq!(
        serde_json::from_slice::<Value>(&output).expect("JSON result"),
        json!({"name": "tether/web", "deleted": true})
    );
    assert_eq!(snapshot(&moto, "tether/web").await, None);

    // The agent's credentials did not leave the data plane: neither the key id nor the secret
    // is in the gateway's store or log. In the agent's own log (inside the data plane) the
    // SDK's debug lines show the key id, never the secret.
    let store = files_under(&data_dir);
    assert!(
        store.iter().any(|(_, b)| contains(b, b"tether/web")),
        "positive control: the store holds the command payloads"
    );
    let (gw_log, agent_log) = (gw.logs(), agent.logs());
    assert!(
        gw_log.contains("acme/edge") && agent_log.contains("ECR.CreateRepository"),
        "logs were not captured:\n{gw_log}\n{agent_log}"
    );
    let outside = store
        .iter()
        .map(|(p, b)| (p.display().to_string(), b.as_slice()))
        .chain([("gateway log".to_owned(), gw_log.as_bytes())]);
    for (what, bytes) in outside {
        for needle in [&key_id, &secret_key] {
            assert!(!contains(bytes, needle.as_bytes()), "{needle} is in {what}");
        }
    }
    assert!(
        !agent_log.contains(&secret_key),
        "the secret access key is in the agent's log"
    );
    drop(agent);
}
