//! The fake Kubernetes API server, driven by kube's real client over real TLS: server-side
//! apply and field ownership, errors as the real server words them, RBAC, test hooks, the
//! deterministic deployment rollout, and namespace deletion.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, ResourceQuota, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use tether_e2e::fake_apiserver::{DEFAULT_USER, FakeApiServer, Rule};

const NS: &str = "team-a";

/// The fake and a kube client loaded from its kubeconfig, as the agent loads one.
async fn start() -> (FakeApiServer, Client) {
    let fake = FakeApiServer::start().await;
    let client = fake.client().await;
    (fake, client)
}

fn ssa(manager: &str) -> PatchParams {
    PatchParams::apply(manager)
}

async fn apply_ns(client: &Client, name: &str) -> Namespace {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &ssa("tether"), &Patch::Apply(ns))
        .await
        .expect("apply namespace")
}

fn deployment(name: &str, replicas: i32, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
        },
    })
}

/// The `kube::Error::Api` status of a failed call.
fn api_error<T: std::fmt::Debug>(r: kube::Result<T>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .expect("resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

fn condition<'a>(
    d: &'a Deployment,
    kind: &str,
) -> Option<&'a k8s_openapi::api::apps::v1::DeploymentCondition> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

fn waiting_reason(p: &Pod) -> Option<String> {
    p.status.as_ref()?.container_statuses.as_ref()?[0]
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

#[tokio::test]
async fn kube_client_from_kubeconfig_speaks_tls_and_bearer_auth_to_the_fake() {
    let fake = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = fake.kubeconfig(dir.path());
    let cfg = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        cfg.cluster_url.to_string().trim_end_matches('/'),
        fake.url()
    );
    assert!(
        cfg.root_cert.is_some(),
        "CA from certificate-authority-data"
    );
    let client = Client::try_from(cfg).unwrap();
    let ns = apply_ns(&client, NS).await;
    assert_eq!(
        ns.status.unwrap().phase.as_deref(),
        Some("Active"),
        "namespaces are created Active"
    );

    // The same kubeconfig with another token is refused with the real 401 Status.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(fake.token(), "not-the-token");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let bad = Client::try_from(cfg).unwrap();
    let s = api_error(Api::<Namespace>::all(bad).get(NS).await);
    assert_eq!(
        (s.code, s.reason.as_str(), s.message.as_str()),
        (401, "Unauthorized", "Unauthorized")
    );
    assert!(
        fake.requests().iter().all(|r| r.verb != "get"),
        "an unauthenticated request is not recorded as an API call"
    );
}

#[tokio::test]
async fn server_side_apply_creates_then_updates_bumping_resource_version_and_generation() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Deployment>::namespaced(client, NS);

    let created = api
        .patch(
            "web",
            &ssa("tether"),
            &Patch::Apply(deployment("web", 2, "nginx:1")),
        )
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.generation, Some(1));
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    let mf = meta.managed_fields.as_ref().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("tether"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    assert_eq!(mf[0].fields_type.as_deref(), Some("FieldsV1"));
    let fields = &mf[0].fields_v1.as_ref().unwrap().0;
    assert_eq!(fields["f:spec"]["f:replicas"], json!({}));

    // The same apply again changes nothing, not even the resourceVersion.
    let again = api
        .patch(
            "web",
            &ssa("tether"),
            &Patch::Apply(deployment("web", 2, "nginx:1")),
        )
        .await
        .unwrap();
    assert_eq!(rv(&again.metadata), rv(meta));

    // A spec change bumps both.
    let scaled = api
        .patch(
            "web",
            &ssa("tether"),
            &Patch::Apply(deployment("web", 3, "nginx:1")),
        )
        .await
        .unwrap();
    assert!(rv(&scaled.metadata) > rv(meta));
    assert_eq!(scaled.metadata.generation, Some(2));
    assert_eq!(scaled.spec.as_ref().unwrap().replicas, Some(3));

    // A metadata-only change bumps the resourceVersion, not the generation; a label the
    // manager no longer applies is removed.
    let mut relabelled = deployment("web", 3, "nginx:1");
    relabelled["metadata"]["labels"] = json!({"tier": "front"});
    let relabelled = api
        .patch("web", &ssa("tether"), &Patch::Apply(relabelled))
        .await
        .unwrap();
    assert!(rv(&relabelled.metadata) > rv(&scaled.metadata));
    assert_eq!(relabelled.metadata.generation, Some(2));
    let labels = relabelled.metadata.labels.unwrap();
    assert_eq!(labels.get("tier").map(String::as_str), Some("front"));
    assert!(
        !labels.contains_key("app"),
        "dropped label removed: {labels:?}"
    );

    // What the API served is what the fake holds.
    let stored = fake.get("deployments", Some(NS), "web").unwrap();
    assert_eq!(
        stored["metadata"]["resourceVersion"],
        json!(relabelled.metadata.resource_version)
    );
}

#[tokio::test]
async fn apply_by_a_second_manager_conflicts_unless_forced() {
    let (_fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Deployment>::namespaced(client, NS);
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 2, "nginx:1")),
    )
    .await
    .unwrap();

    // Same values: shared ownership, no conflict.
    api.patch(
        "web",
        &ssa("kubectl"),
        &Patch::Apply(deployment("web", 2, "nginx:1")),
    )
    .await
    .expect("applying identical values is no conflict");

    let s = api_error(
        api.patch(
            "web",
            &ssa("kubectl"),
            &Patch::Apply(deployment("web", 5, "nginx:1")),
        )
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        "Apply failed with 1 conflict: conflict with \"tether\": .spec.replicas"
    );

    let forced = api
        .patch(
            "web",
            &ssa("kubectl").force(),
            &Patch::Apply(deployment("web", 5, "nginx:1")),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().replicas, Some(5));

    // Now kubectl owns .spec.replicas: tether is the one in conflict.
    let s = api_error(
        api.patch(
            "web",
            &ssa("tether"),
            &Patch::Apply(deployment("web", 2, "nginx:1")),
        )
        .await,
    );
    assert_eq!(
        s.message,
        "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.replicas"
    );
}

#[tokio::test]
async fn merge_patch_owner_shows_in_conflicts_as_an_update_manager() {
    let (_fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Deployment>::namespaced(client, NS);
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 2, "nginx:1")),
    )
    .await
    .unwrap();
    let patched = api
        .patch(
            "web",
            &PatchParams {
                field_manager: Some("kubectl".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"spec": {"replicas": 4, "paused": true}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    let mf = patched.metadata.managed_fields.unwrap();
    let kubectl = mf
        .iter()
        .find(|m| m.manager.as_deref() == Some("kubectl"))
        .unwrap();
    assert_eq!(kubectl.operation.as_deref(), Some("Update"));

    let s = api_error(
        api.patch(
            "web",
            &ssa("tether"),
            &Patch::Apply(deployment("web", 2, "nginx:1")),
        )
        .await,
    );
    assert_eq!(
        s.message,
        "Apply failed with 1 conflict: conflict with \"kubectl\" using apps/v1: .spec.replicas"
    );
}

#[tokio::test]
async fn missing_objects_and_namespaces_are_404_not_found_statuses() {
    let (_fake, client) = start().await;
    let s = api_error(Api::<Namespace>::all(client.clone()).get(NS).await);
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    assert_eq!(s.message, "namespaces \"team-a\" not found");
    let details = s.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        (NS, "namespaces")
    );

    // A write into a namespace that does not exist.
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}});
    let s = api_error(
        Api::<Secret>::namespaced(client.clone(), NS)
            .patch("db", &ssa("tether"), &Patch::Apply(secret))
            .await,
    );
    assert_eq!(
        (s.code, s.message.as_str()),
        (404, "namespaces \"team-a\" not found")
    );

    apply_ns(&client, NS).await;
    let s = api_error(Api::<Deployment>::namespaced(client, NS).get("web").await);
    assert_eq!(s.message, "deployments.apps \"web\" not found");
    assert_eq!(s.details.unwrap().group, "apps");
}

#[tokio::test]
async fn create_of_an_existing_object_is_already_exists() {
    let (_fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Secret>::namespaced(client, NS);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "stringData": {"password": "hunter2"},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &secret).await.unwrap();
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        created.data.unwrap()["password"].0,
        b"hunter2",
        "stringData is folded into data"
    );
    let s = api_error(api.create(&PostParams::default(), &secret).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, "secrets \"db\" already exists");
}

#[tokio::test]
async fn delete_with_stale_preconditions_is_a_conflict_and_keeps_the_object() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Secret>::namespaced(client, NS);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}});
    let live = api
        .patch("db", &ssa("tether"), &Patch::Apply(secret))
        .await
        .unwrap();
    let uid = live.metadata.uid.clone().unwrap();

    let stale = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.clone()),
            resource_version: Some("1".into()),
        }),
        ..Default::default()
    };
    let s = api_error(api.delete("db", &stale).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    let have = live.metadata.resource_version.clone().unwrap();
    assert_eq!(
        s.message,
        format!(
            "Operation cannot be fulfilled on secrets \"db\": Precondition failed: ResourceVersion in precondition: 1, ResourceVersion in object meta: {have}"
        )
    );
    assert!(fake.get("secrets", Some(NS), "db").is_some());

    let current = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.clone()),
            resource_version: Some(have),
        }),
        ..Default::default()
    };
    let status = api
        .delete("db", &current)
        .await
        .unwrap()
        .right()
        .expect("a deleted secret is answered with a Status");
    assert_eq!(status.details.unwrap().uid, uid);
    assert!(fake.get("secrets", Some(NS), "db").is_none());
    let s = api_error(api.delete("db", &DeleteParams::default()).await);
    assert_eq!(s.code, 404);
}

#[tokio::test]
async fn rbac_denies_with_the_real_wording_and_records_every_verb_tried() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    fake.set_rules(vec![
        Rule::new(&["get", "list"], "", &["secrets"]),
        Rule::new(&["*"], "apps", &["deployments"]),
    ]);
    let secrets = Api::<Secret>::namespaced(client.clone(), NS);
    let s = api_error(secrets.get("db").await);
    assert_eq!(
        s.code, 404,
        "get is allowed, so the answer is the object's absence"
    );

    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}});
    let s = api_error(
        secrets
            .patch("db", &ssa("tether"), &Patch::Apply(secret))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        s.message,
        format!(
            "secrets \"db\" is forbidden: User \"{DEFAULT_USER}\" cannot patch resource \"secrets\" in API group \"\" in the namespace \"team-a\""
        )
    );

    let s = api_error(
        Api::<Namespace>::all(client.clone())
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(
        s.message,
        format!(
            "namespaces is forbidden: User \"{DEFAULT_USER}\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
        )
    );
    // A request on namespaces/{name} is in that namespace, as the real request-info has it.
    let s = api_error(Api::<Namespace>::all(client.clone()).get(NS).await);
    assert!(
        s.message.ends_with(
            "cannot get resource \"namespaces\" in API group \"\" in the namespace \"team-a\""
        ),
        "{}",
        s.message
    );

    Api::<Deployment>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("deployments are allowed");

    // Server-side apply that would create the object needs `create` too, as on the real server.
    fake.set_rules(vec![Rule::new(&["patch"], "", &["services"])]);
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}});
    let s = api_error(
        Api::<Service>::namespaced(client, NS)
            .patch("web", &ssa("tether"), &Patch::Apply(svc))
            .await,
    );
    assert!(
        s.code == 403 && s.message.contains("cannot create resource \"services\""),
        "{}",
        s.message
    );

    let used = fake.verbs_used();
    for (verb, group, resource) in [
        ("create", "", "namespaces"),
        ("patch", "", "services"),
        ("create", "", "services"),
        ("patch", "", "namespaces"),
        ("get", "", "secrets"),
        ("patch", "", "secrets"),
        ("list", "", "namespaces"),
        ("get", "", "namespaces"),
        ("list", "apps", "deployments"),
    ] {
        assert!(
            used.contains(&(verb.into(), group.into(), resource.into())),
            "{verb} {group}/{resource} missing from {used:?}"
        );
    }
    assert_eq!(used.len(), 9, "{used:?}");
}

#[tokio::test]
async fn fail_next_fails_exactly_one_matching_request() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Namespace>::all(client);
    fake.fail_next("list", "namespaces", 500, "InternalError", "etcd is down");
    fake.fail_next("get", "namespaces", 403, "Forbidden", "nope");

    let s = api_error(api.get(NS).await);
    assert_eq!(
        (s.code, s.reason.as_str(), s.message.as_str()),
        (403, "Forbidden", "nope")
    );
    api.get(NS)
        .await
        .expect("one-shot: the second get succeeds");
    let s = api_error(api.list(&ListParams::default()).await);
    assert_eq!((s.code, s.message.as_str()), (500, "etcd is down"));
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn requests_are_recorded_until_cleared_and_seeded_objects_are_served() {
    let (fake, client) = start().await;
    fake.insert(
        "namespaces",
        None,
        json!({"metadata": {"name": "kube-system", "labels": {"owner": "cluster"}}}),
    );
    fake.insert(
        "secrets",
        Some("kube-system"),
        json!({"metadata": {"name": "token"}, "data": {"t": "eA=="}}),
    );
    assert!(fake.requests().is_empty(), "insert is not an API call");

    let secret = Api::<Secret>::namespaced(client.clone(), "kube-system")
        .get("token")
        .await
        .unwrap();
    assert_eq!(secret.data.unwrap()["t"].0, b"x");
    let listed = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels("owner=cluster"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let none = Api::<Namespace>::all(client)
        .list(&ListParams::default().labels("owner=cluster,tier!=x,missing"))
        .await
        .unwrap();
    assert!(none.items.is_empty());

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].verb, "get");
    assert_eq!(reqs[0].resource, "secrets");
    assert_eq!(reqs[0].namespace.as_deref(), Some("kube-system"));
    assert_eq!(reqs[0].name.as_deref(), Some("token"));
    assert_eq!(reqs[0].path, "/api/v1/namespaces/kube-system/secrets/token");
    assert_eq!(
        (reqs[1].verb.as_str(), reqs[1].name.as_deref()),
        ("list", None)
    );
    assert!(reqs[1].query.contains("labelSelector=owner%3Dcluster"));
    assert!(reqs.iter().all(|r| !r.is_write()));
    fake.clear_requests();
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn missing_field_manager_on_apply_is_invalid() {
    let (fake, client) = start().await;
    let req = http::Request::patch("/api/v1/namespaces/x")
        .header("content-type", "application/apply-patch+yaml")
        .body(br#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x"}}"#.to_vec())
        .unwrap();
    let s = api_error(client.request_text(req).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
    assert!(fake.get("namespaces", None, "x").is_none());
}

#[tokio::test]
async fn rollout_advances_one_step_per_get_until_complete_and_restarts_on_a_new_template() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Deployment>::namespaced(client.clone(), NS);
    let pods = Api::<Pod>::namespaced(client, NS);
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 2, "nginx:1")),
    )
    .await
    .unwrap();

    let d = api.get("web").await.unwrap();
    let st = d.status.clone().unwrap();
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(
        st.updated_replicas, None,
        "the first step only observes the generation"
    );
    assert_eq!(
        condition(&d, "Progressing").unwrap().reason.as_deref(),
        Some("NewReplicaSetCreated")
    );

    let d = api.get("web").await.unwrap();
    let st = d.status.clone().unwrap();
    assert_eq!(
        (
            st.updated_replicas,
            st.ready_replicas,
            st.available_replicas
        ),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(condition(&d, "Available").unwrap().status, "False");
    assert_eq!(
        condition(&d, "Progressing").unwrap().reason.as_deref(),
        Some("ReplicaSetUpdated")
    );

    let d = api.get("web").await.unwrap();
    let st = d.status.clone().unwrap();
    assert_eq!(
        (st.replicas, st.updated_replicas, st.available_replicas),
        (Some(2), Some(2), Some(2))
    );
    assert_eq!(st.unavailable_replicas, None);
    assert_eq!(condition(&d, "Available").unwrap().status, "True");
    let progressing = condition(&d, "Progressing").unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_deref()),
        ("True", Some("NewReplicaSetAvailable"))
    );

    // Complete: another GET changes nothing.
    let again = api.get("web").await.unwrap();
    assert_eq!(again.metadata.resource_version, d.metadata.resource_version);

    let listed = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);
    let first = &listed.items[0];
    let hash = first.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(
        first.metadata.name.as_deref(),
        Some(format!("web-{hash}-0").as_str())
    );
    assert_eq!(
        first.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(
        first.metadata.owner_references.as_ref().unwrap()[0].name,
        format!("web-{hash}")
    );

    // A new template restarts the rollout; old pods go once new ones are ready.
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 2, "nginx:2")),
    )
    .await
    .unwrap();
    let d = api.get("web").await.unwrap();
    let st = d.status.clone().unwrap();
    assert_eq!(
        (d.metadata.generation, st.observed_generation),
        (Some(2), Some(2))
    );
    assert_eq!((st.updated_replicas, st.replicas), (None, Some(2)));
    let mut steps = 0;
    loop {
        let d = api.get("web").await.unwrap();
        steps += 1;
        if condition(&d, "Progressing").unwrap().reason.as_deref() == Some("NewReplicaSetAvailable")
        {
            break;
        }
        assert!(steps < 5, "rollout did not complete: {:?}", d.status);
    }
    let listed = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);
    assert!(listed.items.iter().all(|p| {
        p.metadata.labels.as_ref().unwrap()["pod-template-hash"] != hash
            && p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("nginx:2")
    }));
    assert!(
        fake.get("pods", Some(NS), &format!("web-{hash}-0"))
            .is_none()
    );
}

#[tokio::test]
async fn image_pull_failure_keeps_pods_pending_in_back_off() {
    let (_fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Deployment>::namespaced(client.clone(), NS);
    let pods = Api::<Pod>::namespaced(client, NS);
    let image = "registry.example/web:does-not-exist";
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 1, image)),
    )
    .await
    .unwrap();
    api.get("web").await.unwrap();
    api.get("web").await.unwrap();

    let pod = &pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items[0];
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert_eq!(waiting_reason(pod).as_deref(), Some("ErrImagePull"));

    let d = api.get("web").await.unwrap();
    let pod = &pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items[0];
    assert_eq!(waiting_reason(pod).as_deref(), Some("ImagePullBackOff"));
    let waiting = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .waiting
        .clone()
        .unwrap();
    assert_eq!(
        waiting.message.unwrap(),
        format!("Back-off pulling image \"{image}\"")
    );
    let st = d.status.clone().unwrap();
    assert_eq!(
        (
            st.updated_replicas,
            st.available_replicas,
            st.unavailable_replicas
        ),
        (Some(1), None, Some(1))
    );
    assert_eq!(condition(&d, "Available").unwrap().status, "False");
    assert_eq!(
        condition(&d, "Progressing").unwrap().reason.as_deref(),
        Some("ReplicaSetUpdated")
    );
}

#[tokio::test]
async fn pods_quota_caps_the_rollout_with_a_replica_failure() {
    let (_fake, client) = start().await;
    apply_ns(&client, NS).await;
    let quota = json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "pods-quota"},
        "spec": {"hard": {"pods": "1"}},
    });
    Api::<ResourceQuota>::namespaced(client.clone(), NS)
        .patch("pods-quota", &ssa("tether"), &Patch::Apply(quota))
        .await
        .unwrap();
    let api = Api::<Deployment>::namespaced(client.clone(), NS);
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 3, "nginx:1")),
    )
    .await
    .unwrap();
    let mut d = api.get("web").await.unwrap();
    for _ in 0..4 {
        d = api.get("web").await.unwrap();
    }
    let pods = Api::<Pod>::namespaced(client, NS)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 1, "the quota allows one pod");
    let st = d.status.clone().unwrap();
    assert_eq!((st.replicas, st.available_replicas), (Some(1), Some(1)));
    let failure = condition(&d, "ReplicaFailure").expect("ReplicaFailure condition");
    assert_eq!(
        (failure.status.as_str(), failure.reason.as_deref()),
        ("True", Some("FailedCreate"))
    );
    let hash = pods.items[0].metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(
        failure.message.as_deref().unwrap(),
        format!(
            "pods \"web-{hash}-1\" is forbidden: exceeded quota: pods-quota, requested: pods=1, used: pods=1, limited: pods=1"
        )
    );
}

#[tokio::test]
async fn a_stuck_image_never_becomes_ready() {
    let (_fake, client) = start().await;
    apply_ns(&client, NS).await;
    let api = Api::<Deployment>::namespaced(client.clone(), NS);
    api.patch(
        "web",
        &ssa("tether"),
        &Patch::Apply(deployment("web", 1, "web:stuck")),
    )
    .await
    .unwrap();
    let mut d = api.get("web").await.unwrap();
    for _ in 0..5 {
        d = api.get("web").await.unwrap();
    }
    let st = d.status.clone().unwrap();
    assert_eq!(
        (
            st.updated_replicas,
            st.ready_replicas,
            st.available_replicas
        ),
        (Some(1), None, None)
    );
    assert_ne!(
        condition(&d, "Progressing").unwrap().reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );
    let pods = Api::<Pod>::namespaced(client, NS)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 1);
    assert_eq!(
        pods.items[0].status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert_eq!(
        waiting_reason(&pods.items[0]).as_deref(),
        Some("ContainerCreating")
    );
}

#[tokio::test]
async fn deleting_a_namespace_removes_everything_in_it() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    apply_ns(&client, "team-b").await;
    for ns in [NS, "team-b"] {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}});
        Api::<Secret>::namespaced(client.clone(), ns)
            .patch("db", &ssa("tether"), &Patch::Apply(secret))
            .await
            .unwrap();
    }
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    deployments
        .patch(
            "web",
            &ssa("tether"),
            &Patch::Apply(deployment("web", 1, "nginx:1")),
        )
        .await
        .unwrap();
    deployments.get("web").await.unwrap();
    deployments.get("web").await.unwrap();
    assert_eq!(
        Api::<Pod>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let gone = Api::<Namespace>::all(client.clone())
        .delete(NS, &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("a deleted namespace is answered with the namespace");
    assert_eq!(gone.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert!(gone.metadata.deletion_timestamp.is_some());

    for (resource, name) in [("secrets", "db"), ("deployments", "web")] {
        assert!(
            fake.get(resource, Some(NS), name).is_none(),
            "{resource} left behind"
        );
    }
    let s = api_error(
        Api::<Secret>::namespaced(client.clone(), NS)
            .get("db")
            .await,
    );
    assert_eq!(s.code, 404);
    let all_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(all_pods.items.is_empty());
    Api::<Secret>::namespaced(client, "team-b")
        .get("db")
        .await
        .expect("other namespaces are untouched");
}

#[tokio::test]
async fn dropping_the_fake_stops_serving() {
    let (fake, client) = start().await;
    apply_ns(&client, NS).await;
    drop(fake);
    let err = Api::<Namespace>::all(client)
        .get(NS)
        .await
        .expect_err("nothing serves after drop");
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
}
