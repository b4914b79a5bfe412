//! `environment.create` and `environment.delete`: one environment is one namespace.

use std::collections::BTreeMap;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, Preconditions};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::names::{self, Invalid};
use super::{
    Backends, MANAGED_BY, MANAGED_BY_VALUE, apply_params, is_managed, kube_err, not_managed,
    output, parse,
};
use crate::commands::ProgressSink;

/// The ResourceQuota an environment gets when its payload has a `quota`.
pub(super) const QUOTA_NAME: &str = "tether-quota";
/// The default-deny NetworkPolicy every environment gets.
pub(super) const POLICY_NAME: &str = "tether-default-deny";

/// `environment.create` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    quota: Option<Quota>,
}

/// Limits on what the environment's workloads may request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Quota {
    /// Total CPU requests (`requests.cpu`), e.g. `"4"` or `"500m"`.
    #[serde(default)]
    cpu: Option<String>,
    /// Total memory requests (`requests.memory`), e.g. `"8Gi"`.
    #[serde(default)]
    memory: Option<String>,
    /// Number of pods.
    #[serde(default)]
    pods: Option<u32>,
}

/// `environment.create` result.
#[derive(Debug, Serialize)]
struct Created {
    namespace: String,
    /// False when the namespace already existed (the command was re-applied).
    created: bool,
    /// The ResourceQuota's name, when a quota was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<&'static str>,
    network_policy: &'static str,
}

impl Create {
    fn validate(&self) -> Result<(), Invalid> {
        names::dns1123_label("name", &self.name)?;
        for (k, v) in &self.labels {
            names::label_key("labels", k)?;
            names::label_value(&format!("labels.{k}"), v)?;
            if k == MANAGED_BY && v != MANAGED_BY_VALUE {
                return Err(Invalid {
                    field: format!("labels.{k}"),
                    value: v.clone(),
                    rule: "allowed: Tether sets this label to `tether`",
                });
            }
        }
        if let Some(q) = &self.quota {
            if let Some(cpu) = &q.cpu {
                names::quantity("quota.cpu", cpu)?;
            }
            if let Some(mem) = &q.memory {
                names::quantity("quota.memory", mem)?;
            }
        }
        Ok(())
    }
}

pub(super) async fn create(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Create = parse("environment.create", &payload)?;
    req.validate()
        .map_err(|e| format!("environment.create: {e}"))?;
    let client = b.kube().await?;
    let name = req.name.as_str();
    let namespaces = Api::<Namespace>::all(client.clone());
    let existing = namespaces
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading namespace {name}")))?;
    if let Some(ns) = &existing {
        if !is_managed(ns.metadata.labels.as_ref()) {
            return Err(not_managed(name));
        }
        if ns.metadata.deletion_timestamp.is_some() {
            return Err(format!(
                "environment {name:?} is being deleted; create it again once it is gone"
            ));
        }
    }
    let mut labels = req.labels.clone();
    labels.insert(MANAGED_BY.into(), MANAGED_BY_VALUE.into());
    let ns = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": labels },
    });
    namespaces
        .patch(name, &apply_params(), &Patch::Apply(&ns))
        .await
        .map_err(kube_err(format!("applying namespace {name}")))?;
    progress.report(format!("namespace {name} applied"));

    let managed = json!({ MANAGED_BY: MANAGED_BY_VALUE });
    let quotas = Api::<ResourceQuota>::namespaced(client.clone(), name);
    let quota = match &req.quota {
        Some(q) => {
            let mut hard = BTreeMap::new();
            if let Some(cpu) = &q.cpu {
                hard.insert("requests.cpu", cpu.clone());
            }
            if let Some(mem) = &q.memory {
                hard.insert("requests.memory", mem.clone());
            }
            if let Some(pods) = q.pods {
                hard.insert("pods", pods.to_string());
            }
            let rq = json!({
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": { "name": QUOTA_NAME, "namespace": name, "labels": managed },
                "spec": { "hard": hard },
            });
            quotas
                .patch(QUOTA_NAME, &apply_params(), &Patch::Apply(&rq))
                .await
                .map_err(kube_err(format!("applying resource quota in {name}")))?;
            progress.report(format!("resource quota {QUOTA_NAME} applied"));
            Some(QUOTA_NAME)
        }
        None if existing.is_some() => {
            // Declarative: an environment re-created without a quota has none.
            match quotas.delete(QUOTA_NAME, &DeleteParams::default()).await {
                Ok(_) => progress.report(format!("resource quota {QUOTA_NAME} removed")),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(kube_err(format!("removing resource quota in {name}"))(e));
                }
            }
            None
        }
        None => None,
    };

    // Deny all ingress to every pod of the environment: what may reach a workload is opened
    // explicitly, never by default.
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": POLICY_NAME, "namespace": name, "labels": managed },
        "spec": { "podSelector": {}, "policyTypes": ["Ingress"] },
    });
    Api::<NetworkPolicy>::namespaced(client, name)
        .patch(POLICY_NAME, &apply_params(), &Patch::Apply(&policy))
        .await
        .map_err(kube_err(format!("applying network policy in {name}")))?;
    progress.report(format!("network policy {POLICY_NAME} applied"));
    output(&Created {
        namespace: name.to_owned(),
        created: existing.is_none(),
        quota,
        network_policy: POLICY_NAME,
    })
}

/// `environment.delete` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
}

/// `environment.delete` result.
#[derive(Debug, Serialize)]
struct Deleted {
    namespace: String,
    /// False when there was nothing to delete (already gone: the command is idempotent).
    deleted: bool,
}

pub(super) async fn delete(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Delete = parse("environment.delete", &payload)?;
    names::dns1123_label("name", &req.name).map_err(|e| format!("environment.delete: {e}"))?;
    let name = req.name.as_str();
    let client = b.kube().await?;
    let namespaces = Api::<Namespace>::all(client);
    let Some(ns) = namespaces
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading namespace {name}")))?
    else {
        progress.report(format!("namespace {name} does not exist"));
        return output(&Deleted {
            namespace: name.to_owned(),
            deleted: false,
        });
    };
    if !is_managed(ns.metadata.labels.as_ref()) {
        return Err(not_managed(name));
    }
    // Preconditions: if the namespace was relabelled (or replaced) since we looked, the API
    // server refuses with 409 rather than deleting something no longer ours.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: ns.metadata.uid.clone(),
            resource_version: ns.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    namespaces
        .delete(name, &params)
        .await
        .map_err(kube_err(format!("deleting namespace {name}")))?;
    progress.report(format!("namespace {name} is terminating"));
    output(&Deleted {
        namespace: name.to_owned(),
        deleted: true,
    })
}
