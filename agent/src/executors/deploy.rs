//! `deploy`: a Deployment (and a ClusterIP Service when it has ports) in a managed environment,
//! then a wait for the rollout that reports progress and ends with why it failed, if it did.
//!
//! The control plane chooses the image, so what a workload can read and where it can send it
//! is bounded here: `secret_env` may reference only Secrets `secret.sync` wrote from a secret
//! the agent's `secrets.allow` still allows, and with `environments.egress = "deny"` the
//! environment's egress policy is (re-)applied before the workload starts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use super::environment::{EGRESS_POLICY_NAME, apply_egress_policy};
use super::names::{self, Invalid};
use super::secret_sync::SOURCE_ANNOTATION;
use super::{
    Backends, MANAGED_BY, MANAGED_BY_VALUE, apply_params, is_managed, kube_err, managed_namespace,
    output, parse,
};
use crate::commands::ProgressSink;
use crate::policy::Egress;

/// The label naming the workload; with [`MANAGED_BY`] it is the Deployment's selector.
const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Most replicas one `deploy` may ask for.
const MAX_REPLICAS: u32 = 1000;

/// `deploy` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deploy {
    environment: String,
    name: String,
    image: String,
    #[serde(default = "one")]
    replicas: u32,
    /// Plain environment variables.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Environment variables from a Secret of the same environment (e.g. one `secret.sync`
    /// wrote): `{"DB_PASSWORD": {"secret": "db", "key": "password"}}`.
    #[serde(default)]
    secret_env: BTreeMap<String, SecretRef>,
    /// Container ports; a ClusterIP Service named like the deployment exposes them.
    #[serde(default)]
    ports: Vec<Port>,
    /// CPU and memory, set as both request and limit.
    #[serde(default)]
    resources: Option<Resources>,
    /// How long to wait for the rollout (default `kubernetes.rollout_timeout`), e.g. `"5m"`.
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretRef {
    secret: String,
    key: String,
}

/// A port: `8080` or `{"port": 8080, "name": "http", "protocol": "TCP"}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Port {
    Number(u16),
    Spec(PortSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    port: u16,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<Protocol>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    #[serde(default)]
    cpu: Option<String>,
    #[serde(default)]
    memory: Option<String>,
}

/// `deploy` result.
#[derive(Debug, Serialize)]
struct Deployed {
    environment: String,
    deployment: String,
    generation: i64,
    replicas: u32,
    available: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
}

impl Deploy {
    fn validate(&self) -> Result<(), Invalid> {
        names::dns1123_label("environment", &self.environment)?;
        // The name also names the Service and the container: DNS-1035 fits all three.
        names::dns1035_label("name", &self.name)?;
        names::image("image", &self.image)?;
        if self.replicas > MAX_REPLICAS {
            return Err(Invalid {
                field: "replicas".into(),
                value: self.replicas.to_string(),
                rule: "at most 1000",
            });
        }
        for k in self.env.keys() {
            names::env_name(&format!("env.{k}"), k)?;
        }
        for (k, r) in &self.secret_env {
            names::env_name(&format!("secret_env.{k}"), k)?;
            if self.env.contains_key(k) {
                return Err(Invalid {
                    field: format!("secret_env.{k}"),
                    value: k.clone(),
                    rule: "unique: it is also in `env`",
                });
            }
            names::dns1123_subdomain(&format!("secret_env.{k}.secret"), &r.secret)?;
            names::secret_key(&format!("secret_env.{k}.key"), &r.key)?;
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.ports().iter().enumerate() {
            if p.port == 0 {
                return Err(Invalid {
                    field: format!("ports[{i}].port"),
                    value: "0".into(),
                    rule: "a port number from 1 to 65535",
                });
            }
            if !seen.insert((p.port, p.protocol)) {
                return Err(Invalid {
                    field: format!("ports[{i}].port"),
                    value: p.port.to_string(),
                    rule: "unique among the ports",
                });
            }
            if let Some(n) = &p.name {
                names::dns1035_label(&format!("ports[{i}].name"), n)?;
                if n.len() > 15 {
                    return Err(Invalid {
                        field: format!("ports[{i}].name"),
                        value: n.clone(),
                        rule: "at most 15 characters (IANA service name)",
                    });
                }
            }
        }
        if let Some(r) = &self.resources {
            if let Some(cpu) = &r.cpu {
                names::quantity("resources.cpu", cpu)?;
            }
            if let Some(m) = &r.memory {
                names::quantity("resources.memory", m)?;
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Invalid {
                field: "timeout".into(),
                value: "0s".into(),
                rule: "positive",
            });
        }
        Ok(())
    }

    fn ports(&self) -> Vec<PortSpec> {
        self.ports
            .iter()
            .map(|p| match p {
                Port::Number(n) => PortSpec {
                    port: *n,
                    name: None,
                    protocol: None,
                },
                Port::Spec(s) => PortSpec {
                    port: s.port,
                    name: s.name.clone(),
                    protocol: s.protocol,
                },
            })
            .collect()
    }

    fn labels(&self) -> serde_json::Value {
        json!({ NAME_LABEL: self.name, MANAGED_BY: MANAGED_BY_VALUE })
    }

    fn deployment(&self) -> serde_json::Value {
        let mut env: Vec<serde_json::Value> = self
            .env
            .iter()
            .map(|(k, v)| json!({ "name": k, "value": v }))
            .collect();
        env.extend(self.secret_env.iter().map(|(k, r)| {
            json!({ "name": k, "valueFrom": { "secretKeyRef": { "name": r.secret, "key": r.key } } })
        }));
        let ports: Vec<serde_json::Value> = self
            .ports()
            .iter()
            .map(|p| {
                let mut v = json!({
                    "containerPort": p.port,
                    "protocol": p.protocol.unwrap_or_default(),
                });
                if let Some(n) = &p.name {
                    v["name"] = json!(n);
                }
                v
            })
            .collect();
        let mut container = json!({
            "name": self.name,
            "image": self.image,
            "env": env,
            "ports": ports,
        });
        if let Some(r) = &self.resources {
            let mut q = serde_json::Map::new();
            if let Some(cpu) = &r.cpu {
                q.insert("cpu".into(), json!(cpu));
            }
            if let Some(m) = &r.memory {
                q.insert("memory".into(), json!(m));
            }
            container["resources"] = json!({ "requests": q, "limits": q });
        }
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": self.name, "namespace": self.environment, "labels": self.labels() },
            "spec": {
                "replicas": self.replicas,
                "selector": { "matchLabels": self.labels() },
                "template": {
                    "metadata": { "labels": self.labels() },
                    "spec": { "containers": [container] },
                },
            },
        })
    }

    fn service(&self) -> serde_json::Value {
        let ports: Vec<serde_json::Value> = self
            .ports()
            .iter()
            .map(|p| {
                let proto = p.protocol.unwrap_or_default();
                let name = p.name.clone().unwrap_or_else(|| {
                    format!("{}-{}", format!("{proto:?}").to_lowercase(), p.port)
                });
                json!({ "name": name, "port": p.port, "targetPort": p.port, "protocol": proto })
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": self.name, "namespace": self.environment, "labels": self.labels() },
            "spec": { "type": "ClusterIP", "selector": self.labels(), "ports": ports },
        })
    }
}

pub(super) async fn deploy(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Deploy = parse("deploy", &payload)?;
    req.validate().map_err(|e| format!("deploy: {e}"))?;
    let client = b.kube().await?;
    let (env, name) = (req.environment.as_str(), req.name.as_str());
    managed_namespace(&client, env).await?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), env);
    if let Some(d) = deployments
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading deployment {env}/{name}")))?
        && !is_managed(d.metadata.labels.as_ref())
    {
        return Err(format!(
            "deployment {env}/{name} exists and is not managed by tether; nothing was changed"
        ));
    }
    let services = Api::<Service>::namespaced(client.clone(), env);
    let existing = services
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading service {env}/{name}")))?;
    let ours = existing
        .as_ref()
        .map(|s| is_managed(s.metadata.labels.as_ref()));
    if ours == Some(false) && !req.ports.is_empty() {
        return Err(format!(
            "service {env}/{name} exists and is not managed by tether; nothing was changed"
        ));
    }
    check_secret_env(b, &client, &req).await?;
    if b.environments.egress == Egress::Deny {
        // Re-applied on every deploy: an environment created before the operator denied egress,
        // or under an older egress_allow, gets today's policy before the workload runs.
        apply_egress_policy(&client, env, &b.environments.egress_allow, &b.environments).await?;
        progress.report(format!(
            "network policy {EGRESS_POLICY_NAME} applied (the agent's environments.egress = \"deny\")"
        ));
    }
    let applied = deployments
        .patch(name, &apply_params(), &Patch::Apply(&req.deployment()))
        .await
        .map_err(kube_err(format!("applying deployment {env}/{name}")))?;
    let generation = applied.metadata.generation.unwrap_or(0);
    progress.report(format!(
        "deployment {env}/{name} applied (generation {generation}, image {})",
        req.image
    ));

    let service = if req.ports.is_empty() {
        // Declarative: a deployment without ports has no Service (remove ours if there was one).
        if ours == Some(true) {
            services
                .delete(name, &DeleteParams::default())
                .await
                .map_err(kube_err(format!("removing service {env}/{name}")))?;
            progress.report(format!("service {env}/{name} removed (no ports)"));
        }
        None
    } else {
        services
            .patch(name, &apply_params(), &Patch::Apply(&req.service()))
            .await
            .map_err(kube_err(format!("applying service {env}/{name}")))?;
        progress.report(format!("service {env}/{name} applied"));
        Some(name.to_owned())
    };

    let timeout = req.timeout.unwrap_or(b.kubernetes.rollout_timeout);
    let available = wait_for_rollout(
        &client,
        &req,
        generation,
        timeout,
        b.kubernetes.poll_interval,
        &progress,
    )
    .await?;
    output(&Deployed {
        environment: env.to_owned(),
        deployment: name.to_owned(),
        generation,
        replicas: req.replicas,
        available,
        service,
    })
}

/// Every Secret `secret_env` references must exist in the environment, be one `secret.sync`
/// wrote (Tether's label), come from a secret `secrets.allow` allows now, and hold the key:
/// otherwise a workload could read a Secret someone else put in the namespace, or one synced
/// before the operator narrowed the list.
async fn check_secret_env(b: &Backends, client: &kube::Client, req: &Deploy) -> Result<(), String> {
    let env = req.environment.as_str();
    let secrets = Api::<Secret>::namespaced(client.clone(), env);
    let mut seen: BTreeMap<&str, Secret> = BTreeMap::new();
    for (var, r) in &req.secret_env {
        let what = format!("deploy: `secret_env.{var}`: secret {env}/{}", r.secret);
        if !seen.contains_key(r.secret.as_str()) {
            let s = secrets
                .get_opt(&r.secret)
                .await
                .map_err(kube_err(format!("reading secret {env}/{}", r.secret)))?
                .ok_or_else(|| {
                    format!(
                        "{what} does not exist: sync it first (secret.sync); nothing was changed"
                    )
                })?;
            seen.insert(&r.secret, s);
        }
        let s = &seen[r.secret.as_str()];
        if !is_managed(s.metadata.labels.as_ref()) {
            return Err(format!(
                "{what} is not managed by tether: only Secrets written by secret.sync may be \
                 referenced; nothing was changed"
            ));
        }
        let source = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_ANNOTATION));
        match source {
            Some(id) if b.allowed_secrets.allows(id) => {}
            Some(id) => {
                return Err(format!(
                    "{what} was synced from {id:?}, which the agent's secrets.allow does not \
                     allow; nothing was changed"
                ));
            }
            None => {
                return Err(format!(
                    "{what} has no {SOURCE_ANNOTATION} annotation, so it was not written by \
                     secret.sync; nothing was changed"
                ));
            }
        }
        if !s.data.as_ref().is_some_and(|d| d.contains_key(&r.key)) {
            return Err(format!(
                "{what} has no key {:?}; nothing was changed",
                r.key
            ));
        }
    }
    Ok(())
}

/// Where a rollout stands, judged as `kubectl rollout status` does.
#[derive(Debug, PartialEq)]
enum Rollout {
    Complete { available: i32 },
    InProgress(String),
    Failed(String),
}

fn rollout_state(d: &Deployment, generation: i64) -> Rollout {
    let Some(status) = &d.status else {
        return Rollout::InProgress("waiting for the deployment controller".into());
    };
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    for c in status.conditions.iter().flatten() {
        let message = c.message.clone().unwrap_or_default();
        if c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            return Rollout::Failed(format!("progress deadline exceeded: {message}"));
        }
        if c.type_ == "ReplicaFailure" && c.status == "True" {
            let reason = c.reason.clone().unwrap_or_default();
            return Rollout::Failed(if message.contains("exceeded quota") {
                format!("quota exceeded: {message}")
            } else {
                format!("replica failure ({reason}): {message}")
            });
        }
    }
    if status.observed_generation.unwrap_or(0) < generation {
        return Rollout::InProgress(format!(
            "waiting for the deployment controller to observe generation {generation}"
        ));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < desired {
        return Rollout::InProgress(format!(
            "rollout: {updated} of {desired} replicas updated, {available} available"
        ));
    }
    if replicas > updated {
        return Rollout::InProgress(format!(
            "rollout: {} old replicas pending termination",
            replicas - updated
        ));
    }
    if available < updated {
        return Rollout::InProgress(format!(
            "rollout: {available} of {updated} updated replicas available"
        ));
    }
    Rollout::Complete { available }
}

/// Container states that will not fix themselves: the rollout has failed.
const FATAL_WAITING: &[(&str, &str)] = &[
    ("ErrImagePull", "image pull error"),
    ("ImagePullBackOff", "image pull error"),
    ("InvalidImageName", "invalid image name"),
    ("ErrImageNeverPull", "image pull error"),
    (
        "CreateContainerConfigError",
        "container configuration error",
    ),
    ("CrashLoopBackOff", "container crash loop"),
];

/// Why a pod of the new template cannot start, if it cannot.
fn pod_failure(pods: &[Pod], image: &str) -> Option<String> {
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let statuses = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten());
        for cs in statuses {
            if cs.image != image {
                continue;
            }
            let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or("");
            if let Some((_, what)) = FATAL_WAITING.iter().find(|(r, _)| *r == reason) {
                let msg = waiting.message.as_deref().unwrap_or("");
                return Some(format!("{what}: pod {name}: {reason}: {msg}"));
            }
        }
    }
    None
}

async fn wait_for_rollout(
    client: &kube::Client,
    req: &Deploy,
    generation: i64,
    timeout: Duration,
    poll: Duration,
    progress: &ProgressSink,
) -> Result<i32, String> {
    let (env, name) = (req.environment.as_str(), req.name.as_str());
    let deployments = Api::<Deployment>::namespaced(client.clone(), env);
    let pods = Api::<Pod>::namespaced(client.clone(), env);
    let selector = format!("{NAME_LABEL}={name},{MANAGED_BY}={MANAGED_BY_VALUE}");
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let d = deployments
            .get_opt(name)
            .await
            .map_err(kube_err(format!("reading deployment {env}/{name}")))?
            .ok_or_else(|| format!("deployment {env}/{name} was deleted during its rollout"))?;
        if d.metadata.generation.unwrap_or(0) > generation {
            return Err(format!(
                "deployment {env}/{name} was changed again (generation {}) during this rollout",
                d.metadata.generation.unwrap_or(0)
            ));
        }
        let state = rollout_state(&d, generation);
        match state {
            Rollout::Complete { available } => {
                progress.report(format!(
                    "rollout complete: {available} of {} replicas available",
                    req.replicas
                ));
                return Ok(available);
            }
            Rollout::Failed(why) => {
                return Err(format!("deploy {env}/{name}: rollout failed: {why}"));
            }
            Rollout::InProgress(line) => {
                if line != last {
                    progress.report(line.clone());
                    last = line;
                }
            }
        }
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err(format!("listing pods of {env}/{name}")))?;
        if let Some(why) = pod_failure(&list.items, &req.image) {
            return Err(format!("deploy {env}/{name}: rollout failed: {why}"));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "deploy {env}/{name}: rollout timed out after {}: {last}",
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(payload: serde_json::Value) -> Result<Deploy, String> {
        let d: Deploy = parse("deploy", payload.to_string().as_bytes())?;
        d.validate().map_err(|e| e.to_string())?;
        Ok(d)
    }

    #[test]
    fn payload_errors_name_the_field() {
        let e = req(json!({"environment": "e", "name": "web"})).unwrap_err();
        assert!(e.contains("missing field `image`"), "{e}");
        let e = req(json!({"environment": "e", "name": "web", "image": "x", "replicas": "3"}))
            .unwrap_err();
        assert!(e.contains("field `replicas`"), "{e}");
        let e =
            req(json!({"environment": "e", "name": "web", "image": "x", "colour": 1})).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = req(json!({"environment": "E", "name": "web", "image": "x"})).unwrap_err();
        assert!(e.contains("`environment`") && e.contains("DNS-1123"), "{e}");
        let e = req(json!({"environment": "e", "name": "web", "image": "x",
            "secret_env": {"A": {"secret": "Bad_Name", "key": "k"}}}))
        .unwrap_err();
        assert!(e.contains("secret_env.A.secret"), "{e}");
        let e = req(json!({"environment": "e", "name": "web", "image": "x", "ports": [80, 80]}))
            .unwrap_err();
        assert!(e.contains("ports[1].port"), "{e}");
    }

    #[test]
    fn the_deployment_and_service_carry_what_was_asked() {
        let d = req(json!({
            "environment": "team-a", "name": "web", "image": "nginx:1.27", "replicas": 3,
            "env": {"MODE": "prod"}, "secret_env": {"DB_PASSWORD": {"secret": "db", "key": "password"}},
            "ports": [8080, {"port": 9090, "name": "metrics"}],
            "resources": {"cpu": "250m", "memory": "256Mi"}, "timeout": "90s",
        }))
        .unwrap();
        assert_eq!(d.timeout, Some(Duration::from_secs(90)));
        let dep = d.deployment();
        assert_eq!(dep["spec"]["replicas"], 3);
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "nginx:1.27");
        assert_eq!(c["env"][1]["valueFrom"]["secretKeyRef"]["key"], "password");
        assert_eq!(c["ports"][1]["name"], "metrics");
        assert_eq!(c["resources"]["limits"]["cpu"], "250m");
        assert_eq!(
            dep["spec"]["selector"]["matchLabels"],
            dep["spec"]["template"]["metadata"]["labels"]
        );
        let svc = d.service();
        assert_eq!(svc["spec"]["ports"][0]["name"], "tcp-8080");
        assert_eq!(svc["spec"]["ports"][1]["targetPort"], 9090);
    }

    fn deployment(status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 3, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn rollout_states_follow_kubectl() {
        let s = |v| rollout_state(&deployment(v), 2);
        assert!(matches!(
            s(json!({"observedGeneration": 1})),
            Rollout::InProgress(_)
        ));
        assert!(matches!(
            s(json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1})),
            Rollout::InProgress(l) if l.contains("1 of 3")
        ));
        assert!(matches!(
            s(json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3})),
            Rollout::InProgress(l) if l.contains("old replicas")
        ));
        assert_eq!(
            s(
                json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3})
            ),
            Rollout::Complete { available: 3 }
        );
        assert!(matches!(
            s(json!({"conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                "message": "pods \"web-1\" is forbidden: exceeded quota: q"}]})),
            Rollout::Failed(m) if m.starts_with("quota exceeded")
        ));
        assert!(matches!(
            s(json!({"conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "took too long"}]})),
            Rollout::Failed(m) if m.contains("deadline")
        ));
    }
}
