//! Fake Kubernetes API server (backend layer, tests only): no real API server can run on this
//! machine, so the agent's Kubernetes handlers, which use the real `kube::Client`, are tested
//! against this in-process HTTPS server on `127.0.0.1:0`. Only the server is fake.
//!
//! # What it reproduces
//! - **Transport**: HTTPS (rustls, aws-lc-rs) with a certificate from a throwaway CA, HTTP/1.1,
//!   `Authorization: Bearer <token>` (401 `Unauthorized` Status otherwise); a kubeconfig that
//!   kube's own loader accepts ([`FakeApiServer::kubeconfig`]).
//! - **Paths and verbs** of core/v1 `namespaces` (cluster-scoped), `resourcequotas`,
//!   `services`, `secrets`, `configmaps`, `serviceaccounts`, `pods`,
//!   `networking.k8s.io/v1 networkpolicies` and `apps/v1 deployments`: get, list (also across
//!   namespaces; `labelSelector` with `=`, `==`, `!=`, `k`, `!k`; `fieldSelector` on
//!   `metadata.name`/`metadata.namespace`), create (POST), update (PUT, `resourceVersion`
//!   required and checked), delete (with `preconditions`), JSON merge patch, and server-side
//!   apply.
//! - **Server-side apply**: `fieldManager` required (422 `Invalid`, the real wording), `force`;
//!   per-manager ownership of leaf field paths; the applied object merged over the live one;
//!   fields a manager stops applying are removed unless another manager owns them; conflicts
//!   (409, `Apply failed with 1 conflict: conflict with "m": .spec.replicas`, and the real
//!   multi-conflict and `using apps/v1` forms for Update managers); `force` takes ownership; an
//!   Update (create, merge patch, PUT) takes ownership of the fields it changes; a no-op write
//!   leaves `resourceVersion` alone.
//! - **Metadata**: `uid`, `resourceVersion` (one global counter), `creationTimestamp`,
//!   `generation` (bumped when `.spec` changes), `managedFields` (manager, operation,
//!   apiVersion, time, `FieldsV1`). Writes cannot change `.status`. Defaults the handlers may
//!   read: namespaces get `status.phase: Active`, `spec.finalizers: [kubernetes]` and the
//!   `kubernetes.io/metadata.name` label; deployments `spec.replicas: 1`,
//!   `revisionHistoryLimit`, `progressDeadlineSeconds`; secrets `type: Opaque` and
//!   `stringData` folded into `data`; services `spec.type: ClusterIP`.
//! - **Errors** as `Status` objects with the real reasons, codes, `details` and wording
//!   (`deployments.apps "web" not found`, `namespaces "x" not found` on writes into a missing
//!   namespace, `already exists`, `Operation cannot be fulfilled on ...: Precondition failed:
//!   ...`, the RBAC `... is forbidden: User "..." cannot patch resource "secrets" in API group ""
//!   in the namespace "team-a"` / `at the cluster scope`).
//! - **RBAC** from ClusterRole-like [`Rule`]s (default: allow all), with the real verb mapping
//!   (get, list, watch, create, update, patch, delete), the request-info rule that a request on
//!   `namespaces/{name}` is in namespace `{name}`, and server-side apply of an absent object
//!   needing `create` as well as `patch`.
//! - **Garbage collection, simplified**: deleting a namespace removes everything in it at once
//!   and answers with the namespace in phase `Terminating`; deleting a deployment removes its
//!   pods.
//! - **Deployment controller, deterministic**: one step per GET of the deployment (see
//!   [`FakeApiServer`]): `observedGeneration`, one more pod per step, `replicas`,
//!   `updatedReplicas`, `readyReplicas`, `availableReplicas`, `unavailableReplicas` (zeros
//!   omitted, as the real server does), conditions `Available` / `Progressing`
//!   (`NewReplicaSetCreated`, `ReplicaSetUpdated`, `NewReplicaSetAvailable`) /
//!   `ReplicaFailure` (`FailedCreate` on a pods quota, the real message), a rolling update
//!   that keeps old pods until new ones are ready, pods named `<deploy>-<hash>-<n>` with the
//!   template's labels plus `pod-template-hash` and an owner reference to the ReplicaSet.
//!   Images containing `does-not-exist` fail to pull (`ErrImagePull`, then
//!   `ImagePullBackOff`); images containing `stuck` stay `ContainerCreating`. A pods
//!   `ResourceQuota` (`spec.hard.pods`) also refuses direct pod creation (403).
//!
//! # What it does not
//! Discovery, watches that stay open (a watch answers the current objects as `ADDED` and
//! ends), pagination, strategic merge and JSON patch (415), subresources (`/status`,
//! `/scale`), set-based selectors (400), admission and validation beyond the above,
//! ReplicaSet objects, timers (no `ProgressDeadlineExceeded`, no graceful deletion: a deleted
//! pod or namespace is gone at once), quota `status`, service IP allocation, most defaulting.
//! Lists and arrays are leaves for apply ownership: the real server merges associative lists
//! such as `containers` by key, so its conflict paths read `.spec.template.spec.containers[name="app"].image`
//! where this one says `.spec.template.spec.containers`.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The user the fake says a request came from in RBAC denials (the agent's service account in
/// the chart), until [`FakeApiServer::set_user`].
pub const DEFAULT_USER: &str = "system:serviceaccount:tether:tether-agent";

/// One RBAC rule, like a ClusterRole rule: `*` matches anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Verbs: get, list, watch, create, update, patch, delete.
    pub verbs: Vec<String>,
    /// API group: `""` for core, `apps`, `networking.k8s.io`.
    pub api_group: String,
    /// Resources (plural).
    pub resources: Vec<String>,
}

impl Rule {
    /// A rule from string slices.
    pub fn new(verbs: &[&str], api_group: &str, resources: &[&str]) -> Rule {
        Rule {
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            api_group: api_group.to_owned(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn allows(&self, verb: &str, group: &str, resource: &str) -> bool {
        let any = |list: &[String], x: &str| list.iter().any(|v| v == "*" || v == x);
        any(&self.verbs, verb)
            && (self.api_group == "*" || self.api_group == group)
            && any(&self.resources, resource)
    }
}

/// One request the fake received (after authentication).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string (still percent-encoded).
    pub query: String,
    /// RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`); empty when
    /// the path is not one the fake serves.
    pub verb: String,
    /// Resource (plural); empty when the path is not one the fake serves.
    pub resource: String,
    /// Namespace of a namespaced request (`None` for namespaces themselves and lists across
    /// namespaces).
    pub namespace: Option<String>,
    /// Object name from the path.
    pub name: Option<String>,
}

impl Recorded {
    /// Whether this request asked to change something.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// The fake API server. Serves until dropped.
///
/// Deployment rollouts advance one step on each GET of the deployment (the handlers poll it):
/// the first GET after a spec change records `observedGeneration` (a template change restarts
/// the rollout: `updatedReplicas` back to 0); each further GET creates one pod of the current
/// template (quota permitting), moves `ErrImagePull` pods to `ImagePullBackOff`, retires old
/// pods once new ones are ready, and recomputes status and conditions. No timers.
pub struct FakeApiServer {
    addr: SocketAddr,
    ca_pem: String,
    token: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a fake on `127.0.0.1:0` with a fresh CA and token.
    pub async fn start() -> FakeApiServer {
        tether_runtime::tls::install_crypto_provider();
        let ca =
            tether_gateway::identity::pki::Ca::generate("fake-apiserver.test").expect("fake CA");
        let leaf = ca
            .issue_server(&["127.0.0.1".into(), "localhost".into()])
            .expect("fake API server certificate");
        let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key PEM");
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server TLS config");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API server");
        let addr = listener.local_addr().expect("local addr");
        let token = format!("{:016x}{:016x}", random_u64(), random_u64());
        let state = Arc::new(Mutex::new(State::new()));
        let task = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            state.clone(),
            Arc::from(format!("Bearer {token}")),
        ));
        FakeApiServer {
            addr,
            ca_pem: ca.cert_pem,
            token,
            state,
            task,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The bearer token it accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The CA certificate (PEM) its server certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes `dir/kubeconfig` (server, CA data, token, current context) and returns its path.
    /// kube honours a custom CA only through `certificate-authority-data` or `-authority`, so the
    /// CA goes there.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: fake\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\n\
             users:\n- name: tether-agent\n  user:\n    token: {token}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tether-agent\n\
             current-context: fake\n",
            url = self.url(),
            ca = base64(self.ca_pem.as_bytes()),
            token = self.token,
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A real kube client for this fake, loaded from a kubeconfig like the agent loads it.
    pub async fn client(&self) -> kube::Client {
        let dir = tempfile::tempdir().expect("tempdir");
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig(dir.path()))
            .expect("read kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        kube::Client::try_from(cfg).expect("kube client")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake API server state")
    }

    /// Replaces the RBAC rules: from now on only what a rule allows is served (403 otherwise).
    pub fn set_rules(&self, rules: Vec<Rule>) {
        self.state().rules = Some(rules);
    }

    /// Allows everything again (the default).
    pub fn allow_all(&self) {
        self.state().rules = None;
    }

    /// The user named in RBAC denials.
    pub fn set_user(&self, user: &str) {
        self.state().user = user.to_owned();
    }

    /// Every (verb, API group, resource) requested so far, allowed or not.
    pub fn verbs_used(&self) -> BTreeSet<(String, String, String)> {
        self.state().used.clone()
    }

    /// Every authenticated request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Forgets the recorded requests (not [`verbs_used`](Self::verbs_used)).
    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// The next request with this verb on this resource fails with this Status, once.
    pub fn fail_next(&self, verb: &str, resource: &str, code: u16, reason: &str, message: &str) {
        self.state().failures.push(Failure {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            code,
            reason: reason.to_owned(),
            message: message.to_owned(),
        });
    }

    /// The stored object, as the API would return it (without advancing a rollout).
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&key(resource, namespace.unwrap_or(""), name))
            .map(|s| s.obj.clone())
    }

    /// Stores `obj` as if someone else had created it (no field manager), keeping its
    /// `status`; fills in `apiVersion`, `kind` and server metadata. Returns the stored object.
    /// Panics on an unknown resource or a missing `metadata.name`.
    pub fn insert(&self, resource: &str, namespace: Option<&str>, obj: Value) -> Value {
        let r = resource_named(resource).unwrap_or_else(|| panic!("unknown resource {resource}"));
        assert_eq!(
            r.namespaced,
            namespace.is_some(),
            "{resource}: a namespace for namespaced resources only"
        );
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let status = obj.get("status").cloned();
        let mut st = self.state();
        st.commit(
            r,
            namespace.unwrap_or(""),
            &name,
            user_content(&obj),
            status,
            BTreeMap::new(),
        )
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

// === serving ===

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<Mutex<State>>,
    auth: Arc<str>,
) {
    // Connections live in the JoinSet so that aborting this task (on drop) closes them too.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, state, auth) = (acceptor.clone(), state.clone(), auth.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req| {
                        serve(state.clone(), auth.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve(
    state: Arc<Mutex<State>>,
    auth: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: hyper::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let rq = Req {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        authorized: header(hyper::header::AUTHORIZATION) == &*auth,
        content_type: header(hyper::header::CONTENT_TYPE),
        body: &body,
    };
    let (code, text) = state.lock().expect("fake API server state").handle(&rq);
    Ok(Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("response"))
}

struct Req<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a str,
    authorized: bool,
    content_type: &'a str,
    body: &'a [u8],
}

// === resources ===

struct Res {
    resource: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    namespaced: bool,
    has_spec: bool,
}

impl Res {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `secrets`, `deployments.apps`: how the real server names a resource in messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

const fn res(
    resource: &'static str,
    group: &'static str,
    kind: &'static str,
    namespaced: bool,
    has_spec: bool,
) -> Res {
    Res {
        resource,
        group,
        version: "v1",
        kind,
        namespaced,
        has_spec,
    }
}

static RESOURCES: &[Res] = &[
    res("namespaces", "", "Namespace", false, true),
    res("resourcequotas", "", "ResourceQuota", true, true),
    res("services", "", "Service", true, true),
    res("secrets", "", "Secret", true, false),
    res("configmaps", "", "ConfigMap", true, false),
    res("serviceaccounts", "", "ServiceAccount", true, false),
    res("pods", "", "Pod", true, true),
    res(
        "networkpolicies",
        "networking.k8s.io",
        "NetworkPolicy",
        true,
        true,
    ),
    res("deployments", "apps", "Deployment", true, true),
];

fn resource_named(resource: &str) -> Option<&'static Res> {
    RESOURCES.iter().find(|r| r.resource == resource)
}

struct Route {
    res: &'static Res,
    /// Namespace from the path (`None` for cluster-scoped objects and all-namespace lists).
    ns: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |name: &str| {
        RESOURCES
            .iter()
            .find(|r| r.resource == name && r.group == group && r.version == version)
    };
    let (res, ns, name) = match rest {
        [r] => (find(r)?, None, None),
        [r, name] => (find(r).filter(|r| !r.namespaced)?, None, Some(*name)),
        ["namespaces", ns, r] => (find(r).filter(|r| r.namespaced)?, Some(*ns), None),
        ["namespaces", ns, r, name] => (find(r).filter(|r| r.namespaced)?, Some(*ns), Some(*name)),
        _ => return None,
    };
    Some(Route {
        res,
        ns: ns.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

// === errors ===

struct ApiError {
    code: u16,
    reason: String,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &str, message: String, details: Option<Value>) -> ApiError {
        ApiError {
            code,
            reason: reason.to_owned(),
            message,
            details,
        }
    }

    fn json(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    fn not_found(r: &Res, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
            Some(details(r, name)),
        )
    }

    fn namespace_not_found(ns: &str) -> ApiError {
        ApiError::not_found(&RESOURCES[0], ns)
    }

    fn already_exists(r: &Res, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
            Some(details(r, name)),
        )
    }

    fn conflict(r: &Res, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                r.qualified()
            ),
            Some(details(r, name)),
        )
    }

    fn modified(r: &Res, name: &str) -> ApiError {
        ApiError::conflict(
            r,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn bad_request(message: String) -> ApiError {
        ApiError::new(400, "BadRequest", message, None)
    }

    /// `<Kind>.<group> "<name>" is invalid: <field>: <what>`.
    fn invalid(kind: &str, group: &str, name: &str, field_error: &str) -> ApiError {
        let qualified = if group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{group}")
        };
        let mut d = json!({"name": name, "kind": kind});
        if !group.is_empty() {
            d["group"] = group.into();
        }
        if name.is_empty() {
            d.as_object_mut().expect("object").remove("name");
        }
        ApiError::new(
            422,
            "Invalid",
            format!("{qualified} \"{name}\" is invalid: {field_error}"),
            Some(d),
        )
    }

    fn path_not_found() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(json!({})),
        )
    }
}

/// `details` as the real server fills it: the resource (plural) goes in `kind`.
fn details(r: &Res, name: &str) -> Value {
    let mut d = Map::new();
    if !name.is_empty() {
        d.insert("name".into(), name.into());
    }
    if !r.group.is_empty() {
        d.insert("group".into(), r.group.into());
    }
    d.insert("kind".into(), r.resource.into());
    Value::Object(d)
}

// === state ===

type Key = (String, String, String);
type FieldPath = Vec<String>;

fn key(resource: &str, ns: &str, name: &str) -> Key {
    (resource.to_owned(), ns.to_owned(), name.to_owned())
}

#[derive(Clone)]
struct Stored {
    obj: Value,
    managers: BTreeMap<String, Manager>,
}

#[derive(Clone)]
struct Manager {
    operation: &'static str,
    api_version: String,
    time: String,
    fields: BTreeSet<FieldPath>,
}

impl Manager {
    fn same(&self, other: &Manager) -> bool {
        self.operation == other.operation
            && self.api_version == other.api_version
            && self.fields == other.fields
    }

    /// How the real server names this manager in a conflict.
    fn describe(&self, name: &str) -> String {
        if self.operation == "Update" {
            format!("\"{name}\" using {}", self.api_version)
        } else {
            format!("\"{name}\"")
        }
    }
}

struct Failure {
    verb: String,
    resource: String,
    code: u16,
    reason: String,
    message: String,
}

struct State {
    objects: BTreeMap<Key, Stored>,
    rv: u64,
    rules: Option<Vec<Rule>>,
    user: String,
    requests: Vec<Recorded>,
    used: BTreeSet<(String, String, String)>,
    failures: Vec<Failure>,
}

impl State {
    fn new() -> State {
        State {
            objects: BTreeMap::new(),
            rv: 1000,
            rules: None,
            user: DEFAULT_USER.to_owned(),
            requests: Vec::new(),
            used: BTreeSet::new(),
            failures: Vec::new(),
        }
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&key("namespaces", "", ns))
    }

    fn handle(&mut self, rq: &Req<'_>) -> (u16, String) {
        match self.dispatch(rq) {
            Ok(ok) => ok,
            Err(e) => (e.code, e.json().to_string()),
        }
    }

    fn dispatch(&mut self, rq: &Req<'_>) -> Result<(u16, String), ApiError> {
        if !rq.authorized {
            return Err(ApiError::new(
                401,
                "Unauthorized",
                "Unauthorized".into(),
                None,
            ));
        }
        let q = query_params(rq.query);
        let route = route(rq.path);
        let verb = route.as_ref().and_then(|r| verb_of(rq.method, r, &q));
        self.requests.push(Recorded {
            method: rq.method.to_string(),
            path: rq.path.to_owned(),
            query: rq.query.to_owned(),
            verb: verb.unwrap_or("").to_owned(),
            resource: route
                .as_ref()
                .map(|r| r.res.resource.to_owned())
                .unwrap_or_default(),
            namespace: route.as_ref().and_then(|r| r.ns.clone()),
            name: route.as_ref().and_then(|r| r.name.clone()),
        });
        let Some(route) = route else {
            return Err(ApiError::path_not_found());
        };
        let Some(verb) = verb else {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".into(),
                Some(json!({})),
            ));
        };
        let r = route.res;
        self.used
            .insert((verb.to_owned(), r.group.to_owned(), r.resource.to_owned()));
        self.authorize(verb, &route)?;
        // Server-side apply of an object that does not exist creates it, and the real server
        // then also requires the `create` verb.
        let applies = rq.content_type.starts_with("application/apply-patch+yaml");
        if verb == "patch" && applies {
            let absent = !self.objects.contains_key(&key(
                r.resource,
                route.ns.as_deref().unwrap_or(""),
                route.name.as_deref().unwrap_or(""),
            ));
            if absent {
                self.used.insert((
                    "create".to_owned(),
                    r.group.to_owned(),
                    r.resource.to_owned(),
                ));
                self.authorize("create", &route)?;
            }
        }
        if let Some(i) = self
            .failures
            .iter()
            .position(|f| f.verb == verb && f.resource == r.resource)
        {
            let f = self.failures.remove(i);
            let name = route.name.as_deref().unwrap_or("");
            return Err(ApiError::new(
                f.code,
                &f.reason,
                f.message,
                Some(details(r, name)),
            ));
        }
        let ns = route.ns.clone().unwrap_or_default();
        let name = route.name.clone().unwrap_or_default();
        match verb {
            "get" => {
                if r.resource == "deployments" {
                    self.step_rollout(&ns, &name);
                }
                let s = self
                    .objects
                    .get(&key(r.resource, &ns, &name))
                    .ok_or_else(|| ApiError::not_found(r, &name))?;
                Ok((200, s.obj.to_string()))
            }
            "list" | "watch" => self.list(r, route.ns.as_deref(), &q, verb == "watch"),
            "create" => self.create(r, &ns, rq, &q),
            "patch" => match rq.content_type.split(';').next().unwrap_or("").trim() {
                "application/apply-patch+yaml" => self.apply(r, &ns, &name, rq, &q),
                "application/merge-patch+json" => self.merge_patch(r, &ns, &name, rq, &q),
                _ => Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/apply-patch+yaml (the fake does not serve {:?})",
                        rq.content_type
                    ),
                    None,
                )),
            },
            "update" => self.update(r, &ns, &name, rq, &q),
            "delete" => self.delete(r, &ns, &name, rq),
            _ => unreachable!("verb_of returns only the verbs above"),
        }
    }

    fn authorize(&self, verb: &str, route: &Route) -> Result<(), ApiError> {
        let r = route.res;
        let Some(rules) = &self.rules else {
            return Ok(());
        };
        if rules
            .iter()
            .any(|rule| rule.allows(verb, r.group, r.resource))
        {
            return Ok(());
        }
        // The real request-info puts a request on `namespaces/{name}` in namespace `{name}`.
        let ns = match (&route.ns, r.resource, &route.name) {
            (Some(ns), _, _) => Some(ns.as_str()),
            (None, "namespaces", Some(name)) => Some(name.as_str()),
            _ => None,
        };
        let scope = match ns {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        let why = format!(
            "User \"{}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
            self.user, r.resource, r.group
        );
        let name = route.name.as_deref().unwrap_or("");
        let message = if name.is_empty() {
            format!("{} is forbidden: {why}", r.qualified())
        } else {
            format!("{} \"{name}\" is forbidden: {why}", r.qualified())
        };
        Err(ApiError::new(
            403,
            "Forbidden",
            message,
            Some(details(r, name)),
        ))
    }

    // === verbs ===

    fn list(
        &self,
        r: &Res,
        ns: Option<&str>,
        q: &BTreeMap<String, String>,
        watch: bool,
    ) -> Result<(u16, String), ApiError> {
        let labels = parse_label_selector(q.get("labelSelector").map_or("", |s| s))?;
        let fields = parse_field_selector(q.get("fieldSelector").map_or("", |s| s))?;
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((res, n, _), _)| res == r.resource && ns.is_none_or(|ns| ns == n))
            .map(|(_, s)| &s.obj)
            .filter(|o| labels.iter().all(|t| t.matches(&o["metadata"]["labels"])))
            .filter(|o| fields.iter().all(|t| t.matches_fields(o)))
            .cloned()
            .collect();
        if watch {
            let mut out = String::new();
            for o in items {
                out.push_str(&json!({"type": "ADDED", "object": o}).to_string());
                out.push('\n');
            }
            return Ok((200, out));
        }
        let list = json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        });
        Ok((200, list.to_string()))
    }

    fn create(
        &mut self,
        r: &'static Res,
        ns: &str,
        rq: &Req<'_>,
        q: &BTreeMap<String, String>,
    ) -> Result<(u16, String), ApiError> {
        if r.namespaced && ns.is_empty() {
            return Err(ApiError::path_not_found());
        }
        let body = parse_body(rq.body)?;
        let meta = &body["metadata"];
        let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                format!(
                    "{prefix}{}",
                    safe_encode(&(random_u64() % 100_000).to_string())
                )
            }
            _ => {
                return Err(ApiError::invalid(
                    r.kind,
                    r.group,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        self.check_namespace(r, ns, meta)?;
        if self.objects.contains_key(&key(r.resource, ns, &name)) {
            return Err(ApiError::already_exists(r, &name));
        }
        if r.resource == "pods" {
            self.check_pod_quota(ns, &name)?;
        }
        let content = user_content(&body);
        let mut managers = BTreeMap::new();
        take_update_ownership(
            &mut managers,
            &update_manager(q),
            &api_version_of(&body, r),
            &json!({}),
            &content,
        );
        let obj = self.commit(r, ns, &name, content, None, managers);
        Ok((201, obj.to_string()))
    }

    fn apply(
        &mut self,
        r: &'static Res,
        ns: &str,
        name: &str,
        rq: &Req<'_>,
        q: &BTreeMap<String, String>,
    ) -> Result<(u16, String), ApiError> {
        let manager = match q.get("fieldManager") {
            Some(m) if !m.is_empty() => m.clone(),
            _ => {
                return Err(ApiError::invalid(
                    "PatchOptions",
                    "meta.k8s.io",
                    "",
                    "fieldManager: Required value: is required for apply patch",
                ));
            }
        };
        let force = q.get("force").is_some_and(|f| f == "true");
        // kube sends JSON, which is YAML; YAML proper is not accepted here.
        let body = parse_body(rq.body)?;
        let meta = &body["metadata"];
        if let Some(n) = meta["name"].as_str().filter(|n| *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        self.check_namespace(r, ns, meta)?;
        let old = self.objects.get(&key(r.resource, ns, name)).cloned();
        check_resource_version(r, name, meta, old.as_ref())?;
        if old.is_none() && r.resource == "pods" {
            self.check_pod_quota(ns, name)?;
        }
        let intent = user_content(&body);
        let mut live = old
            .as_ref()
            .map_or_else(|| json!({}), |o| user_content(&o.obj));
        let mut managers = old.as_ref().map(|o| o.managers.clone()).unwrap_or_default();
        let applied = leaves(&intent);

        let mut conflicts: Vec<(String, FieldPath)> = Vec::new();
        for (m, owner) in &managers {
            if *m == manager {
                continue;
            }
            for (path, value) in &applied {
                if owner.fields.contains(path) && get_path(&live, path) != Some(value) {
                    conflicts.push((m.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !force {
                return Err(apply_conflict(&conflicts, &managers));
            }
            for (m, path) in &conflicts {
                if let Some(owner) = managers.get_mut(m) {
                    owner.fields.remove(path);
                }
            }
        }

        merge_applied(&mut live, &intent);
        let previous = managers
            .get(&manager)
            .map(|m| m.fields.clone())
            .unwrap_or_default();
        for path in previous {
            let owned_elsewhere = managers
                .iter()
                .any(|(m, o)| *m != manager && o.fields.contains(&path));
            if !applied.contains_key(&path) && !owned_elsewhere {
                remove_path(&mut live, &path);
            }
        }
        managers.insert(
            manager,
            Manager {
                operation: "Apply",
                api_version: api_version_of(&body, r),
                time: now(),
                fields: applied.into_keys().collect(),
            },
        );
        managers.retain(|_, m| !m.fields.is_empty());
        let obj = self.commit(r, ns, name, live, None, managers);
        Ok((if old.is_some() { 200 } else { 201 }, obj.to_string()))
    }

    fn merge_patch(
        &mut self,
        r: &'static Res,
        ns: &str,
        name: &str,
        rq: &Req<'_>,
        q: &BTreeMap<String, String>,
    ) -> Result<(u16, String), ApiError> {
        let old = self
            .objects
            .get(&key(r.resource, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))?;
        let mut patch = parse_body(rq.body)?;
        check_resource_version(r, name, &patch["metadata"], Some(&old))?;
        strip_system(&mut patch);
        let live = user_content(&old.obj);
        let mut new = live.clone();
        json_merge_patch(&mut new, &patch);
        let mut managers = old.managers.clone();
        take_update_ownership(
            &mut managers,
            &update_manager(q),
            &r.api_version(),
            &live,
            &new,
        );
        let obj = self.commit(r, ns, name, new, None, managers);
        Ok((200, obj.to_string()))
    }

    fn update(
        &mut self,
        r: &'static Res,
        ns: &str,
        name: &str,
        rq: &Req<'_>,
        q: &BTreeMap<String, String>,
    ) -> Result<(u16, String), ApiError> {
        let old = self
            .objects
            .get(&key(r.resource, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))?;
        let body = parse_body(rq.body)?;
        if body["metadata"]["resourceVersion"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::invalid(
                r.kind,
                r.group,
                name,
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            ));
        }
        check_resource_version(r, name, &body["metadata"], Some(&old))?;
        let live = user_content(&old.obj);
        let new = user_content(&body);
        let mut managers = old.managers.clone();
        take_update_ownership(
            &mut managers,
            &update_manager(q),
            &api_version_of(&body, r),
            &live,
            &new,
        );
        let obj = self.commit(r, ns, name, new, None, managers);
        Ok((200, obj.to_string()))
    }

    fn delete(
        &mut self,
        r: &'static Res,
        ns: &str,
        name: &str,
        rq: &Req<'_>,
    ) -> Result<(u16, String), ApiError> {
        let k = key(r.resource, ns, name);
        let old = self
            .objects
            .get(&k)
            .ok_or_else(|| ApiError::not_found(r, name))?;
        let options = if rq.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            parse_body(rq.body)?
        };
        let pre = &options["preconditions"];
        let meta = &old.obj["metadata"];
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = pre[field].as_str() {
                let have = meta[field].as_str().unwrap_or("");
                if want != have {
                    return Err(ApiError::conflict(
                        r,
                        name,
                        &format!(
                            "Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"
                        ),
                    ));
                }
            }
        }
        let mut gone = self.objects.remove(&k).expect("checked above").obj;
        let rv = self.next_rv();
        match r.resource {
            "namespaces" => self.objects.retain(|(_, n, _), _| n != name),
            "deployments" => {
                for pod in self.pods_of(ns, name) {
                    self.objects.remove(&key("pods", ns, &pod));
                }
            }
            _ => {}
        }
        // Graceful-deletion resources answer with the object being deleted, others with a
        // success Status.
        if matches!(r.resource, "namespaces" | "pods") {
            gone["metadata"]["deletionTimestamp"] = now().into();
            gone["metadata"]["resourceVersion"] = rv.into();
            if r.resource == "namespaces" {
                gone["status"]["phase"] = "Terminating".into();
            }
            return Ok((200, gone.to_string()));
        }
        let mut d = details(r, name);
        d["uid"] = gone["metadata"]["uid"].clone();
        let status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": d,
        });
        Ok((200, status.to_string()))
    }

    fn check_namespace(&self, r: &Res, ns: &str, meta: &Value) -> Result<(), ApiError> {
        if !r.namespaced {
            return Ok(());
        }
        if meta["namespace"].as_str().is_some_and(|n| n != ns) {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        if !self.namespace_exists(ns) {
            return Err(ApiError::namespace_not_found(ns));
        }
        Ok(())
    }

    /// The quota admission for one more pod in `ns`: `(quota, used, hard)` of the first quota
    /// it would exceed.
    fn pod_quota_exceeded(&self, ns: &str) -> Option<(String, u64, u64)> {
        let used = self
            .objects
            .keys()
            .filter(|(r, n, _)| r == "pods" && n == ns)
            .count() as u64;
        self.objects
            .iter()
            .filter(|((r, n, _), _)| r == "resourcequotas" && n == ns)
            .find_map(|((_, _, name), s)| {
                let hard = quantity(&s.obj["spec"]["hard"]["pods"])?;
                (used + 1 > hard).then(|| (name.clone(), used, hard))
            })
    }

    fn check_pod_quota(&self, ns: &str, pod: &str) -> Result<(), ApiError> {
        match self.pod_quota_exceeded(ns) {
            None => Ok(()),
            Some(exceeded) => Err(ApiError::new(
                403,
                "Forbidden",
                quota_message(pod, &exceeded),
                Some(details(resource_named("pods").expect("pods"), pod)),
            )),
        }
    }

    /// Stores `content` (user fields) as `r`/`ns`/`name`, keeping or creating the server's
    /// metadata, keeping the live status unless `status` is given, applying defaults and
    /// bumping `generation` on a spec change. A write that changes nothing keeps the old
    /// `resourceVersion`. Returns the stored object.
    fn commit(
        &mut self,
        r: &Res,
        ns: &str,
        name: &str,
        content: Value,
        status: Option<Value>,
        managers: BTreeMap<String, Manager>,
    ) -> Value {
        let k = key(r.resource, if r.namespaced { ns } else { "" }, name);
        let old = self.objects.get(&k);
        let mut obj = match content {
            Value::Object(m) => Value::Object(m),
            _ => json!({}),
        };
        obj["apiVersion"] = r.api_version().into();
        obj["kind"] = r.kind.into();
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        obj["metadata"]["name"] = name.into();
        if r.namespaced {
            obj["metadata"]["namespace"] = ns.into();
        }
        match old {
            Some(o) => {
                for f in ["uid", "creationTimestamp", "generation"] {
                    if let Some(v) = o.obj["metadata"].get(f) {
                        obj["metadata"][f] = v.clone();
                    }
                }
                if let Some(s) = o.obj.get("status") {
                    obj["status"] = s.clone();
                }
            }
            None => {
                obj["metadata"]["uid"] = new_uid().into();
                obj["metadata"]["creationTimestamp"] = now().into();
                if r.has_spec {
                    obj["metadata"]["generation"] = 1.into();
                }
                match r.resource {
                    "namespaces" => obj["status"] = json!({"phase": "Active"}),
                    "pods" => obj["status"] = json!({"phase": "Pending"}),
                    _ => {}
                }
            }
        }
        if let Some(s) = status {
            obj["status"] = s;
        }
        defaults(r, &mut obj);
        if let Some(o) = old {
            if r.has_spec && o.obj.get("spec") != obj.get("spec") {
                let g = o.obj["metadata"]["generation"].as_i64().unwrap_or(0);
                obj["metadata"]["generation"] = (g + 1).into();
            }
            let mut before = o.obj.clone();
            if let Some(m) = before["metadata"].as_object_mut() {
                m.remove("resourceVersion");
                m.remove("managedFields");
            }
            let same_managers = o.managers.len() == managers.len()
                && o.managers
                    .iter()
                    .zip(&managers)
                    .all(|((a, x), (b, y))| a == b && x.same(y));
            if before == obj && same_managers {
                return o.obj.clone();
            }
        }
        obj["metadata"]["resourceVersion"] = self.next_rv().into();
        if !managers.is_empty() {
            obj["metadata"]["managedFields"] = managed_fields(&managers);
        }
        self.objects.insert(
            k,
            Stored {
                obj: obj.clone(),
                managers,
            },
        );
        obj
    }

    // === deployment controller ===

    /// Names of the pods that belong to deployment `deploy` (through its ReplicaSets).
    fn pods_of(&self, ns: &str, deploy: &str) -> Vec<String> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| r == "pods" && n == ns)
            .filter(|(_, s)| {
                let meta = &s.obj["metadata"];
                let hash = meta["labels"]["pod-template-hash"].as_str().unwrap_or("");
                meta["ownerReferences"][0]["name"].as_str()
                    == Some(format!("{deploy}-{hash}").as_str())
            })
            .map(|((_, _, name), _)| name.clone())
            .collect()
    }

    fn pod(&self, ns: &str, name: &str) -> Value {
        self.objects[&key("pods", ns, name)].obj.clone()
    }

    fn step_rollout(&mut self, ns: &str, name: &str) {
        let Some(d) = self.objects.get(&key("deployments", ns, name)) else {
            return;
        };
        let (d, managers) = (d.obj.clone(), d.managers.clone());
        let generation = d["metadata"]["generation"].as_i64().unwrap_or(1);
        let desired = d["spec"]["replicas"].as_u64().unwrap_or(1);
        let template = d["spec"]["template"].clone();
        let hash = template_hash(&template);
        let rs = format!("{name}-{hash}");
        let mut status = match &d["status"] {
            Value::Object(m) => Value::Object(m.clone()),
            _ => json!({}),
        };
        let first_step = status["observedGeneration"].as_i64() != Some(generation);
        let is_new = |p: &Value| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str();
        let pods_by_age = |st: &State| {
            let mut pods: Vec<Value> = st.pods_of(ns, name).iter().map(|p| st.pod(ns, p)).collect();
            pods.sort_by_key(pod_index);
            pods
        };

        let mut replica_failure = None;
        if first_step {
            status["observedGeneration"] = generation.into();
        } else {
            for p in pods_by_age(self).iter().filter(|p| is_new(p)) {
                if let Some(s) = back_off(&p["status"]) {
                    let pod_name = p["metadata"]["name"].as_str().unwrap_or("").to_owned();
                    self.commit(
                        resource_named("pods").expect("pods"),
                        ns,
                        &pod_name,
                        user_content(p),
                        Some(s),
                        BTreeMap::new(),
                    );
                }
            }
            let pods = pods_by_age(self);
            let (new, old): (Vec<&Value>, Vec<&Value>) = pods.iter().partition(|p| is_new(p));
            // Surge one not-ready pod at a time while old pods still serve.
            let may_surge = old.is_empty() || new.iter().all(|p| pod_ready(p));
            if (new.len() as u64) < desired && may_surge {
                let used: BTreeSet<u64> = new.iter().map(|p| pod_index(p)).collect();
                let idx = (0..).find(|i| !used.contains(i)).expect("free index");
                let pod_name = format!("{rs}-{idx}");
                match self.pod_quota_exceeded(ns) {
                    Some(exceeded) => replica_failure = Some(quota_message(&pod_name, &exceeded)),
                    None => {
                        let (pod, pod_status) = new_pod(&d, &rs, &hash);
                        self.commit(
                            resource_named("pods").expect("pods"),
                            ns,
                            &pod_name,
                            pod,
                            Some(pod_status),
                            BTreeMap::new(),
                        );
                    }
                }
            }
        }

        // Scale the new ReplicaSet down to `desired`, then retire old pods while the rest
        // would still be more than `desired`.
        let pods = pods_by_age(self);
        let (new, old): (Vec<&Value>, Vec<&Value>) = pods.iter().partition(|p| is_new(p));
        let mut remove: Vec<String> = new
            .iter()
            .skip(desired as usize)
            .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_owned())
            .collect();
        let ready_new = new
            .iter()
            .take(desired as usize)
            .filter(|p| pod_ready(p))
            .count();
        let mut old_left = old.len();
        for p in &old {
            if ready_new + old_left <= desired as usize {
                break;
            }
            remove.push(p["metadata"]["name"].as_str().unwrap_or("").to_owned());
            old_left -= 1;
        }
        if !remove.is_empty() {
            for p in &remove {
                self.objects.remove(&key("pods", ns, p));
            }
            self.next_rv();
        }

        let pods = pods_by_age(self);
        let count = |f: &dyn Fn(&Value) -> bool| pods.iter().filter(|p| f(p)).count() as u64;
        let replicas = pods.len() as u64;
        let updated = count(&|p| is_new(p));
        let ready = count(&|p| pod_ready(p));
        let available = ready;
        for (field, n) in [
            ("replicas", replicas),
            ("updatedReplicas", updated),
            ("readyReplicas", ready),
            ("availableReplicas", available),
            ("unavailableReplicas", desired.saturating_sub(available)),
        ] {
            match status.as_object_mut() {
                Some(s) if n == 0 => {
                    s.remove(field);
                }
                Some(s) => {
                    s.insert(field.into(), n.into());
                }
                None => {}
            }
        }

        let complete = updated == desired && replicas == desired && available == desired;
        let max_unavailable = desired / 4;
        let old_conditions = status["conditions"].clone();
        let mut conditions = vec![if available + max_unavailable >= desired {
            condition(
                &old_conditions,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            )
        } else {
            condition(
                &old_conditions,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            )
        }];
        conditions.push(if complete {
            condition(
                &old_conditions,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{rs}\" has successfully progressed."),
            )
        } else if first_step && updated == 0 {
            condition(
                &old_conditions,
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                format!("Created new replica set \"{rs}\""),
            )
        } else {
            condition(
                &old_conditions,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{rs}\" is progressing."),
            )
        });
        if let Some(message) = replica_failure {
            conditions.push(condition(
                &old_conditions,
                "ReplicaFailure",
                "True",
                "FailedCreate",
                message,
            ));
        }
        status["conditions"] = conditions.into();
        self.commit(
            resource_named("deployments").expect("deployments"),
            ns,
            name,
            user_content(&d),
            Some(status),
            managers,
        );
    }
}

// === deployment controller helpers ===

fn quota_message(pod: &str, (quota, used, hard): &(String, u64, u64)) -> String {
    format!(
        "pods \"{pod}\" is forbidden: exceeded quota: {quota}, requested: pods=1, used: pods={used}, limited: pods={hard}"
    )
}

/// A plain integer quantity (`"1"`, `1`); others are not reproduced.
fn quantity(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// The ReplicaSet hash of a pod template: FNV-1a of its JSON, encoded like
/// `rand.SafeEncodeString` (the real controller hashes the Go struct instead).
fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    safe_encode(&h.to_string())
}

fn safe_encode(s: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    s.bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

fn pod_index(p: &Value) -> u64 {
    p["metadata"]["name"]
        .as_str()
        .and_then(|n| n.rsplit('-').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or(u64::MAX)
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["containerStatuses"]
            .as_array()
            .is_some_and(|cs| cs.iter().all(|c| c["ready"] == true))
}

/// A pod of ReplicaSet `rs` for deployment `d`: its user content and its status.
fn new_pod(d: &Value, rs: &str, hash: &str) -> (Value, Value) {
    let template = &d["spec"]["template"];
    let mut labels = match &template["metadata"]["labels"] {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    labels.insert("pod-template-hash".into(), hash.into());
    let mut meta = json!({
        "generateName": format!("{rs}-"),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": rs,
            "uid": new_uid(),
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    });
    if let Some(a) = template["metadata"].get("annotations") {
        meta["annotations"] = a.clone();
    }
    let spec = template["spec"].clone();
    let now = now();
    let statuses: Vec<Value> = spec["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let image = c["image"].as_str().unwrap_or("");
            let state = if image.contains("does-not-exist") {
                json!({"waiting": {
                    "reason": "ErrImagePull",
                    "message": format!(
                        "rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": {image}: not found"
                    ),
                }})
            } else if image.contains("stuck") {
                json!({"waiting": {"reason": "ContainerCreating"}})
            } else {
                json!({"running": {"startedAt": now}})
            };
            let running = state.get("running").is_some();
            json!({
                "name": c["name"],
                "image": image,
                "imageID": "",
                "ready": running,
                "started": running,
                "restartCount": 0,
                "state": state,
            })
        })
        .collect();
    let all_running = statuses.iter().all(|c| c["ready"] == true);
    let not_ready: Vec<&str> = statuses
        .iter()
        .filter(|c| c["ready"] != true)
        .filter_map(|c| c["name"].as_str())
        .collect();
    let ready = if all_running {
        json!({"type": "Ready", "status": "True", "lastTransitionTime": now})
    } else {
        json!({
            "type": "Ready",
            "status": "False",
            "reason": "ContainersNotReady",
            "message": format!("containers with unready status: [{}]", not_ready.join(" ")),
            "lastTransitionTime": now,
        })
    };
    let status = json!({
        "phase": if all_running { "Running" } else { "Pending" },
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ready,
        ],
        "containerStatuses": statuses,
        "hostIP": "10.0.0.1",
        "startTime": now,
    });
    (json!({"metadata": meta, "spec": spec}), status)
}

/// The next image-pull state of a pod: `ErrImagePull` becomes `ImagePullBackOff`.
fn back_off(status: &Value) -> Option<Value> {
    let mut status = status.clone();
    let mut changed = false;
    for c in status["containerStatuses"].as_array_mut()? {
        if c["state"]["waiting"]["reason"] == "ErrImagePull" {
            let image = c["image"].as_str().unwrap_or("").to_owned();
            c["state"]["waiting"] = json!({
                "reason": "ImagePullBackOff",
                "message": format!("Back-off pulling image \"{image}\""),
            });
            changed = true;
        }
    }
    changed.then_some(status)
}

/// A deployment condition, keeping its timestamps when nothing about it changed.
fn condition(old: &Value, kind: &str, status: &str, reason: &str, message: String) -> Value {
    let prev = old
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind));
    let now = now();
    let transition = match prev {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => now.clone().into(),
    };
    let update = match prev {
        Some(p) if p["status"] == status && p["reason"] == reason && p["message"] == *message => {
            p["lastUpdateTime"].clone()
        }
        _ => now.into(),
    };
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": update,
        "lastTransitionTime": transition,
    })
}

// === apply and field ownership ===

/// The fields a writer controls: without `apiVersion`, `kind`, `status`, server-set metadata
/// and nulls.
fn user_content(obj: &Value) -> Value {
    let mut v = obj.clone();
    strip_system(&mut v);
    strip_nulls(&mut v);
    if v["metadata"].as_object().is_some_and(Map::is_empty) {
        v.as_object_mut().expect("object").remove("metadata");
    }
    if !v.is_object() {
        v = json!({});
    }
    v
}

fn strip_system(v: &mut Value) {
    let Some(m) = v.as_object_mut() else { return };
    for f in ["apiVersion", "kind", "status"] {
        m.remove(f);
    }
    if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in [
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta.remove(f);
        }
    }
}

fn strip_nulls(v: &mut Value) {
    if let Some(m) = v.as_object_mut() {
        m.retain(|_, v| !v.is_null());
        m.values_mut().for_each(strip_nulls);
    }
}

/// Leaf field paths and their values: objects recurse, arrays, scalars and empty objects are
/// leaves.
fn leaves(v: &Value) -> BTreeMap<FieldPath, Value> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeMap<FieldPath, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    path.push(k.clone());
                    walk(v, path, out);
                    path.pop();
                }
            }
            _ if !path.is_empty() => {
                out.insert(path.clone(), v.clone());
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.as_object()?.get(k))
}

/// Removes a leaf, then its parents that became empty (top-level fields stay). A path that
/// now holds a non-empty object is someone else's content and stays.
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = &mut *v;
    for k in parents {
        match cur.as_object_mut().and_then(|m| m.get_mut(k)) {
            Some(next) => cur = next,
            None => return,
        }
    }
    let Some(m) = cur.as_object_mut() else { return };
    if m.get(last)
        .and_then(Value::as_object)
        .is_some_and(|o| !o.is_empty())
    {
        return;
    }
    m.remove(last);
    if m.is_empty() && parents.len() > 1 {
        remove_path(v, parents);
    }
}

/// Apply's merge: objects merge key by key, anything else replaces.
fn merge_applied(live: &mut Value, applied: &Value) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                merge_applied(l.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (l, a) => *l = a.clone(),
    }
}

/// RFC 7386 JSON merge patch.
fn json_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            json_merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// An Update (create, merge patch, PUT) owns the fields it changed, taking them from others;
/// fields it removed are owned by no one.
fn take_update_ownership(
    managers: &mut BTreeMap<String, Manager>,
    manager: &str,
    api_version: &str,
    before: &Value,
    after: &Value,
) {
    let old = leaves(before);
    let new = leaves(after);
    let changed: BTreeSet<FieldPath> = new
        .iter()
        .filter(|(p, v)| old.get(*p) != Some(v))
        .map(|(p, _)| p.clone())
        .collect();
    let removed: BTreeSet<FieldPath> = old
        .keys()
        .filter(|p| !new.contains_key(*p))
        .cloned()
        .collect();
    for m in managers.values_mut() {
        m.fields
            .retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    if !changed.is_empty() {
        let entry = managers
            .entry(manager.to_owned())
            .or_insert_with(|| Manager {
                operation: "Update",
                api_version: api_version.to_owned(),
                time: String::new(),
                fields: BTreeSet::new(),
            });
        entry.operation = "Update";
        entry.api_version = api_version.to_owned();
        entry.time = now();
        entry.fields.extend(changed);
    }
    managers.retain(|_, m| !m.fields.is_empty());
}

fn apply_conflict(
    conflicts: &[(String, FieldPath)],
    managers: &BTreeMap<String, Manager>,
) -> ApiError {
    let show = |p: &FieldPath| format!(".{}", p.join("."));
    let who = |m: &str| managers[m].describe(m);
    let message = if let [(m, p)] = conflicts {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            who(m),
            show(p)
        )
    } else {
        let mut by_manager: BTreeMap<&str, Vec<&FieldPath>> = BTreeMap::new();
        for (m, p) in conflicts {
            by_manager.entry(m).or_default().push(p);
        }
        let mut lines = Vec::new();
        for (m, paths) in by_manager {
            lines.push(format!("conflicts with {}:", who(m)));
            lines.extend(paths.into_iter().map(|p| format!("- {}", show(p))));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, p)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", who(m)),
                "field": show(p),
            })
        })
        .collect();
    ApiError::new(409, "Conflict", message, Some(json!({"causes": causes})))
}

/// `managedFields` as the real server renders it (fields as `f:` trees; lists are leaves).
fn managed_fields(managers: &BTreeMap<String, Manager>) -> Value {
    managers
        .iter()
        .map(|(name, m)| {
            let mut tree = json!({});
            for path in &m.fields {
                let mut cur = &mut tree;
                for k in path {
                    cur = cur
                        .as_object_mut()
                        .expect("object")
                        .entry(format!("f:{k}"))
                        .or_insert_with(|| json!({}));
                }
            }
            json!({
                "manager": name,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": tree,
            })
        })
        .collect()
}

fn check_resource_version(
    r: &Res,
    name: &str,
    meta: &Value,
    old: Option<&Stored>,
) -> Result<(), ApiError> {
    match (meta["resourceVersion"].as_str(), old) {
        (Some(want), Some(o))
            if !want.is_empty() && o.obj["metadata"]["resourceVersion"] != want =>
        {
            Err(ApiError::modified(r, name))
        }
        _ => Ok(()),
    }
}

fn defaults(r: &Res, obj: &mut Value) {
    let spec_default = |obj: &mut Value, field: &str, v: Value| {
        if obj["spec"].get(field).is_none() {
            obj["spec"][field] = v;
        }
    };
    match r.resource {
        "namespaces" => {
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            spec_default(obj, "finalizers", json!(["kubernetes"]));
        }
        "deployments" => {
            spec_default(obj, "replicas", 1.into());
            spec_default(obj, "revisionHistoryLimit", 10.into());
            spec_default(obj, "progressDeadlineSeconds", 600.into());
        }
        "services" => spec_default(obj, "type", "ClusterIP".into()),
        "secrets" => {
            if obj.get("type").is_none() {
                obj["type"] = "Opaque".into();
            }
            if let Some(Value::Object(sd)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                for (k, v) in sd {
                    obj["data"][k] = base64(v.as_str().unwrap_or("").as_bytes()).into();
                }
            }
        }
        _ => {}
    }
}

// === small parsers and encoders ===

fn verb_of(method: &Method, route: &Route, q: &BTreeMap<String, String>) -> Option<&'static str> {
    let named = route.name.is_some();
    Some(match *method {
        Method::GET if named => "get",
        Method::GET if q.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        Method::GET => "list",
        Method::POST if !named => "create",
        Method::PUT if named => "update",
        Method::PATCH if named => "patch",
        Method::DELETE if named => "delete",
        _ => return None,
    })
}

fn update_manager(q: &BTreeMap<String, String>) -> String {
    q.get("fieldManager")
        .filter(|m| !m.is_empty())
        .cloned()
        .unwrap_or_else(|| "unknown".into())
}

fn api_version_of(body: &Value, r: &Res) -> String {
    body["apiVersion"]
        .as_str()
        .map_or_else(|| r.api_version(), str::to_owned)
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::bad_request(
            "the request body is not a JSON object".into(),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the fake API server accepts JSON bodies only: {e}"
        ))),
    }
}

fn query_params(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Term {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::Ne(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
        }
    }

    fn matches_fields(&self, obj: &Value) -> bool {
        let field = |k: &str| match k {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            _ => obj["metadata"]["namespace"].as_str(),
        };
        match self {
            Term::Eq(k, v) => field(k) == Some(v.as_str()),
            Term::Ne(k, v) => field(k) != Some(v.as_str()),
            Term::Exists(_) | Term::Absent(_) => true,
        }
    }
}

fn parse_terms(s: &str) -> Result<Vec<Term>, ApiError> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let owned = |k: &str, v: &str| (k.trim().to_owned(), v.trim().to_owned());
            if t.contains('(') || t.contains(" in ") || t.contains(" notin ") {
                return Err(ApiError::bad_request(format!(
                    "set-based selector {t:?} is not reproduced by the fake API server"
                )));
            }
            Ok(if let Some((k, v)) = t.split_once("!=") {
                let (k, v) = owned(k, v);
                Term::Ne(k, v)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                let (k, v) = owned(k, v);
                Term::Eq(k, v)
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Absent(k.trim().to_owned())
            } else {
                Term::Exists(t.to_owned())
            })
        })
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<Term>, ApiError> {
    parse_terms(s)
}

fn parse_field_selector(s: &str) -> Result<Vec<Term>, ApiError> {
    let terms = parse_terms(s)?;
    for t in &terms {
        let k = match t {
            Term::Eq(k, _) | Term::Ne(k, _) | Term::Exists(k) | Term::Absent(k) => k,
        };
        if k != "metadata.name" && k != "metadata.namespace" {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {k}"
            )));
        }
    }
    Ok(terms)
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn random_u64() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(N.fetch_add(1, Ordering::Relaxed))
}

fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// RFC 3339 in UTC, seconds precision, as the real server writes timestamps.
fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The agent's RBAC as documented in ARCHITECTURE.md (`## Kubernetes RBAC (agent)`), as
/// (verb, API group, resource), the shape of [`FakeApiServer::verbs_used`].
pub fn architecture_rbac() -> BTreeSet<(String, String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md"))
        .expect("read ARCHITECTURE.md");
    let section = text
        .split("## Kubernetes RBAC (agent)")
        .nth(1)
        .expect("RBAC section");
    let mut out = BTreeSet::new();
    for row in section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
    {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let ticks = |s: &str| -> Vec<String> {
            s.split('`')
                .skip(1)
                .step_by(2)
                .map(|g| {
                    if g == "\"\"" {
                        String::new()
                    } else {
                        g.to_owned()
                    }
                })
                .collect()
        };
        for g in ticks(cells[0]) {
            for r in ticks(cells[1]) {
                for v in cells[2].split(',') {
                    out.insert((v.trim().to_owned(), g.clone(), r.clone()));
                }
            }
        }
    }
    assert!(
        out.len() > 10,
        "parsed too little of the RBAC table: {out:?}"
    );
    out
}

/// [`Rule`]s granting exactly `table` (see [`architecture_rbac`]).
pub fn rules_of(table: &BTreeSet<(String, String, String)>) -> Vec<Rule> {
    table
        .iter()
        .map(|(v, g, r)| Rule::new(&[v.as_str()], g, &[r.as_str()]))
        .collect()
}
