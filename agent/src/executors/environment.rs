//! `environment.create` and `environment.delete`: one environment is one namespace.
//!
//! An environment's ingress is always denied (`tether-default-deny`). Its egress is open unless
//! the command asks for `egress: "deny"` or the agent's `environments.egress = "deny"` imposes
//! it: then the NetworkPolicy `tether-egress` admits only the cluster DNS and the listed
//! destinations, so a workload the control plane deploys cannot send what it reads (a synced
//! Secret, say) anywhere else.

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
use crate::config::EnvironmentsConfig;
use crate::policy::{Egress, EgressRule};

/// The ResourceQuota an environment gets when its payload has a `quota`.
pub(super) const QUOTA_NAME: &str = "tether-quota";
/// The default-deny NetworkPolicy every environment gets.
pub(super) const POLICY_NAME: &str = "tether-default-deny";
/// The NetworkPolicy that limits an environment's egress, when it is denied.
pub(super) const EGRESS_POLICY_NAME: &str = "tether-egress";
/// Most `egress_allow` entries one command may give.
const MAX_EGRESS_RULES: usize = 100;

/// `environment.create` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    quota: Option<Quota>,
    /// `allow` or `deny` (then only DNS and `egress_allow`); default: `allow`, unless the agent
    /// denies egress (`environments.egress = "deny"`), which a command cannot loosen.
    #[serde(default)]
    egress: Option<Egress>,
    /// With egress denied, where the workloads may send to besides DNS. Under the agent's
    /// `environments.egress = "deny"` each entry must fall within its `egress_allow`.
    #[serde(default)]
    egress_allow: Option<Vec<EgressRule>>,
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
    /// The egress NetworkPolicy's name, when egress is denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    egress_policy: Option<&'static str>,
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
        if let Some(rules) = &self.egress_allow {
            if rules.len() > MAX_EGRESS_RULES {
                return Err(Invalid {
                    field: "egress_allow".into(),
                    value: format!("{} entries", rules.len()),
                    rule: "at most 100 entries",
                });
            }
            for (i, r) in rules.iter().enumerate() {
                if r.check().is_err() {
                    return Err(Invalid {
                        field: format!("egress_allow[{i}].ports"),
                        value: format!("{:?}", r.ports),
                        rule: "a list of ports from 1 to 65535",
                    });
                }
            }
        }
        Ok(())
    }

    /// The egress this environment gets under the agent's `cfg`: `None` for open egress, or
    /// the destinations besides DNS. Decided before any API call, so a refusal changes nothing.
    fn egress_plan(&self, cfg: &EnvironmentsConfig) -> Result<Option<Vec<EgressRule>>, String> {
        match (cfg.egress, self.egress.unwrap_or(cfg.egress)) {
            (Egress::Allow, Egress::Allow) => match self.egress_allow {
                Some(_) => Err(
                    "environment.create: `egress_allow` is used only with `egress`: \"deny\" \
                     (with egress allowed every destination is open); nothing was changed"
                        .into(),
                ),
                None => Ok(None),
            },
            (Egress::Allow, Egress::Deny) => {
                Ok(Some(self.egress_allow.clone().unwrap_or_default()))
            }
            (Egress::Deny, Egress::Allow) => Err(
                "environment.create: `egress`: \"allow\" is refused: this agent denies \
                 environments' egress (its config environments.egress = \"deny\", set by the \
                 cluster's operator, who alone can change it); nothing was changed"
                    .into(),
            ),
            (Egress::Deny, Egress::Deny) => {
                for (i, r) in self.egress_allow.iter().flatten().enumerate() {
                    if !r.within_any(&cfg.egress_allow) {
                        return Err(format!(
                            "environment.create: `egress_allow[{i}]`: {r} is outside what this \
                             agent allows (its config environments.egress_allow, set by the \
                             cluster's operator); nothing was changed"
                        ));
                    }
                }
                // A narrower list could not narrow anything: `deploy` re-applies the operator's
                // list, and NetworkPolicies add up. So every environment gets exactly that list.
                Ok(Some(cfg.egress_allow.clone()))
            }
        }
    }
}

/// Applies `tether-egress` to namespace `ns`: every pod's egress denied except to the cluster
/// DNS (UDP and TCP 53 of the pods `cfg` names) and to `rules`.
pub(super) async fn apply_egress_policy(
    client: &kube::Client,
    ns: &str,
    rules: &[EgressRule],
    cfg: &EnvironmentsConfig,
) -> Result<(), String> {
    let mut egress = vec![json!({
        "to": [{
            "namespaceSelector": {
                "matchLabels": { "kubernetes.io/metadata.name": cfg.dns_namespace },
            },
            "podSelector": { "matchLabels": cfg.dns_pod_labels },
        }],
        "ports": [
            { "protocol": "UDP", "port": 53 },
            { "protocol": "TCP", "port": 53 },
        ],
    })];
    for r in rules {
        let mut rule = json!({ "to": [{ "ipBlock": { "cidr": r.cidr.to_string() } }] });
        let protocol = r.protocol.unwrap_or_default();
        if !r.ports.is_empty() {
            let ports: Vec<_> = r
                .ports
                .iter()
                .map(|p| json!({ "protocol": protocol, "port": p }))
                .collect();
            rule["ports"] = json!(ports);
        } else if r.protocol.is_some() {
            rule["ports"] = json!([{ "protocol": protocol }]);
        }
        egress.push(rule);
    }
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": EGRESS_POLICY_NAME,
            "namespace": ns,
            "labels": { MANAGED_BY: MANAGED_BY_VALUE },
        },
        "spec": { "podSelector": {}, "policyTypes": ["Egress"], "egress": egress },
    });
    Api::<NetworkPolicy>::namespaced(client.clone(), ns)
        .patch(EGRESS_POLICY_NAME, &apply_params(), &Patch::Apply(&policy))
        .await
        .map_err(kube_err(format!("applying egress network policy in {ns}")))?;
    Ok(())
}

pub(super) async fn create(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Create = parse("environment.create", &payload)?;
    req.validate()
        .map_err(|e| format!("environment.create: {e}"))?;
    let egress = req.egress_plan(&b.environments)?;
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
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), name);
    policies
        .patch(POLICY_NAME, &apply_params(), &Patch::Apply(&policy))
        .await
        .map_err(kube_err(format!("applying network policy in {name}")))?;
    progress.report(format!("network policy {POLICY_NAME} applied"));

    let egress_policy = match &egress {
        Some(rules) => {
            apply_egress_policy(&client, name, rules, &b.environments).await?;
            progress.report(format!(
                "network policy {EGRESS_POLICY_NAME} applied: egress only to DNS and {} \
                 destination(s)",
                rules.len()
            ));
            Some(EGRESS_POLICY_NAME)
        }
        None if existing.is_some() => {
            // Declarative, like the quota: re-created with egress allowed, it has no policy.
            match policies
                .delete(EGRESS_POLICY_NAME, &DeleteParams::default())
                .await
            {
                Ok(_) => progress.report(format!("network policy {EGRESS_POLICY_NAME} removed")),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(kube_err(format!(
                        "removing egress network policy in {name}"
                    ))(e));
                }
            }
            None
        }
        None => None,
    };
    output(&Created {
        namespace: name.to_owned(),
        created: existing.is_none(),
        quota,
        network_policy: POLICY_NAME,
        egress_policy,
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
