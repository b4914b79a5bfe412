//! Feature layer: the data-plane command kinds a control plane sends to a BYOC cluster.
//!
//! | kind | does |
//! |---|---|
//! | `environment.create` | Namespace labelled `app.kubernetes.io/managed-by=tether`, optional ResourceQuota, default-deny NetworkPolicy, egress policy when asked or when `environments.egress = "deny"` |
//! | `environment.delete` | deletes a namespace Tether manages (and nothing else) |
//! | `deploy` | Deployment (+ ClusterIP Service) in a managed namespace, waits for the rollout |
//! | `secret.sync` | reads an AWS Secrets Manager secret that `secrets.allow` allows, in the data plane, writes a Kubernetes Secret |
//! | `registry.create` | creates or converges an AWS ECR repository tagged as Tether's (scanning, tag immutability, lifecycle and repository policies) |
//! | `registry.delete` | deletes an ECR repository Tether manages (with its images only when forced) |
//!
//! What the control plane may reach through them is the operator's to decide, in the agent's
//! config ([`crate::policy`]): `secret.sync` reads only secrets `secrets.allow` matches (none by
//! default), checked before any call; `deploy` references only Secrets `secret.sync` wrote from
//! a secret still allowed; with `environments.egress = "deny"` every environment's workloads
//! reach only the cluster DNS and `environments.egress_allow`.
//!
//! Every handler parses a typed payload (unknown fields refused, errors name the field), checks
//! every name against Kubernetes' rules ([`names`]) or ECR's before any API call, writes with
//! server-side apply under the field manager `tether-agent`, and touches only namespaces
//! labelled as managed by Tether (ECR repositories tagged so). Results are typed JSON;
//! `secret.sync` results carry key names and the version id, never a value.
//!
//! The Kubernetes calls go through kube-rs's real client (backend layer); the client is built on
//! first use from `kubernetes.kubeconfig` or the in-cluster service account, so an agent outside
//! any cluster starts fine and these kinds fail with a message saying why.

mod deploy;
mod environment;
pub mod names;
mod registry;
mod secret_sync;

pub use registry::{PULL_ACTIONS, PULL_SID, PUSH_ACTIONS, PUSH_SID};
pub use secret_sync::{SOURCE_ANNOTATION, VERSION_ANNOTATION};

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;

use bytes::Bytes;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::commands::{Handlers, ProgressSink};
use crate::config::{
    AwsConfig, EnvironmentsConfig, KubernetesConfig, RegistryConfig, SecretsConfig,
};
use crate::ecr::Ecr;
use crate::secrets::SecretsManager;

/// The field manager of every server-side apply, and the value of [`MANAGED_BY`].
pub const FIELD_MANAGER: &str = "tether-agent";
/// The label marking what Tether manages.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY`] on what Tether manages.
pub const MANAGED_BY_VALUE: &str = "tether";

/// The command kinds this module adds.
pub const KINDS: &[&str] = &[
    "environment.create",
    "environment.delete",
    "deploy",
    "secret.sync",
    "registry.create",
    "registry.delete",
];

/// What the handlers share: the Kubernetes client (built on first use), the Secrets Manager
/// client (likewise), the ECR client (likewise), and what the operator allows (`[secrets]`,
/// `[environments]`, `[registry]`).
pub struct Backends {
    kubernetes: KubernetesConfig,
    aws: AwsConfig,
    allowed_secrets: SecretsConfig,
    environments: EnvironmentsConfig,
    registry: RegistryConfig,
    kube: tokio::sync::Mutex<Option<kube::Client>>,
    secrets: tokio::sync::OnceCell<SecretsManager>,
    ecr: tokio::sync::OnceCell<Ecr>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("kubernetes", &self.kubernetes)
            .field("aws", &self.aws)
            .field("allowed_secrets", &self.allowed_secrets)
            .field("environments", &self.environments)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// Backends for the agent's `[kubernetes]` and `[aws]` config; nothing is dialed yet. No
    /// secret may be synced and egress is the commands' choice until
    /// [`allow_secrets`](Self::allow_secrets) and [`environments`](Self::environments) say
    /// otherwise.
    pub fn new(kubernetes: KubernetesConfig, aws: AwsConfig) -> Backends {
        Backends {
            kubernetes,
            aws,
            allowed_secrets: SecretsConfig::default(),
            environments: EnvironmentsConfig::default(),
            registry: RegistryConfig::default(),
            kube: tokio::sync::Mutex::new(None),
            secrets: tokio::sync::OnceCell::new(),
            ecr: tokio::sync::OnceCell::new(),
        }
    }

    /// Backends using `secrets` for Secrets Manager (e.g. with credentials of the embedder's
    /// choosing) instead of one built from `[aws]`.
    pub fn with_secrets_manager(kubernetes: KubernetesConfig, secrets: SecretsManager) -> Backends {
        Backends {
            secrets: tokio::sync::OnceCell::from(secrets),
            ..Backends::new(kubernetes, AwsConfig::default())
        }
    }

    /// These backends with the agent's `[registry]` settings (default: any repository name, no
    /// pull principals).
    pub fn with_registry(self, registry: RegistryConfig) -> Backends {
        Backends { registry, ..self }
    }

    /// These backends using `ecr` for ECR (e.g. with credentials of the embedder's choosing)
    /// instead of one built from `[aws]`.
    pub fn with_ecr(self, ecr: Ecr) -> Backends {
        Backends {
            ecr: tokio::sync::OnceCell::from(ecr),
            ..self
        }
    }

    /// The secrets `secret.sync` may read (`[secrets]`; default: none).
    pub fn allow_secrets(mut self, allowed: SecretsConfig) -> Backends {
        self.allowed_secrets = allowed;
        self
    }

    /// The egress of environments (`[environments]`; default: the commands' choice).
    pub fn environments(mut self, environments: EnvironmentsConfig) -> Backends {
        self.environments = environments;
        self
    }

    /// The Kubernetes client, built on first success. A failure is not remembered: the next
    /// command tries again (the kubeconfig may have appeared).
    async fn kube(&self) -> Result<kube::Client, String> {
        let mut slot = self.kube.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = match &self.kubernetes.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    format!(
                        "Kubernetes unavailable: reading kubernetes.kubeconfig {}: {e}",
                        path.display()
                    )
                })?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| {
                        format!(
                            "Kubernetes unavailable: kubernetes.kubeconfig {}: {e}",
                            path.display()
                        )
                    })?
            }
            None => kube::Config::incluster().map_err(|e| {
                format!(
                    "Kubernetes unavailable: not running in a cluster ({e}) and \
                     kubernetes.kubeconfig is not set"
                )
            })?,
        };
        let client = kube::Client::try_from(config)
            .map_err(|e| format!("Kubernetes unavailable: building the client: {e}"))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The Secrets Manager client, built once.
    async fn secrets(&self) -> &SecretsManager {
        self.secrets
            .get_or_init(|| SecretsManager::new(&self.aws))
            .await
    }

    /// The ECR client, built once.
    async fn ecr(&self) -> &Ecr {
        self.ecr.get_or_init(|| Ecr::new(&self.aws)).await
    }
}

/// Registers the data-plane kinds ([`KINDS`]) in `handlers`.
pub fn register(handlers: &Handlers, backends: Arc<Backends>) {
    macro_rules! kind {
        ($name:literal, $f:path) => {{
            let b = backends.clone();
            handlers.register($name, move |payload: Bytes, progress: ProgressSink| {
                let b = b.clone();
                async move { $f(&b, payload, progress).await }
            });
        }};
    }
    kind!("environment.create", environment::create);
    kind!("environment.delete", environment::delete);
    kind!("deploy", deploy::deploy);
    kind!("secret.sync", secret_sync::sync);
    kind!("registry.create", registry::create);
    kind!("registry.delete", registry::delete);
}

/// Parses a payload as `T`, naming the offending field on error.
fn parse<T: DeserializeOwned>(kind: &str, payload: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            format!("{kind}: malformed payload: {inner}")
        } else {
            format!("{kind}: malformed payload: field `{path}`: {inner}")
        }
    })
}

/// The handler's output: its typed result as JSON.
fn output<T: Serialize>(result: &T) -> Result<Bytes, String> {
    serde_json::to_vec(result)
        .map(Bytes::from)
        .map_err(|e| format!("encoding the result: {e}"))
}

/// A Kubernetes error in words: what was being done, the status code and the server's message.
fn kube_err(what: impl Display) -> impl FnOnce(kube::Error) -> String {
    move |e| match e {
        kube::Error::Api(s) => {
            let hint = match s.code {
                401 => "unauthorized: the agent's Kubernetes credentials were refused",
                403 => {
                    "forbidden: the agent's RBAC does not allow this (see the chart's ClusterRole)"
                }
                404 => "not found",
                409 => {
                    "conflict: the object changed or is owned by someone else; retrying the command can help"
                }
                422 => "invalid",
                429 => "throttled by the API server; retrying the command can help",
                500..=599 => "API server error; retrying the command can help",
                _ => "refused",
            };
            format!(
                "{what}: {hint} (HTTP {} {}): {}",
                s.code, s.reason, s.message
            )
        }
        other => format!("{what}: Kubernetes API unreachable: {other}"),
    }
}

/// Server-side apply parameters: field manager `tether-agent`, taking over conflicting fields
/// (the control plane's intent wins, as for any controller).
fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Whether an object's labels mark it as Tether's.
fn is_managed(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(MANAGED_BY))
        .is_some_and(|v| v == MANAGED_BY_VALUE)
}

/// The namespace of environment `name`, which must exist and be managed by Tether.
async fn managed_namespace(client: &kube::Client, name: &str) -> Result<Namespace, String> {
    let ns = Api::<Namespace>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading namespace {name}")))?
        .ok_or_else(|| format!("environment {name:?} does not exist (no namespace {name})"))?;
    if !is_managed(ns.metadata.labels.as_ref()) {
        return Err(not_managed(name));
    }
    if ns.metadata.deletion_timestamp.is_some() {
        return Err(format!("environment {name:?} is being deleted"));
    }
    Ok(ns)
}

fn not_managed(name: &str) -> String {
    format!(
        "namespace {name:?} is not managed by tether (it lacks the label \
         {MANAGED_BY}={MANAGED_BY_VALUE}); nothing was changed"
    )
}
