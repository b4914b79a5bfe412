//! `secret.sync`: copies an AWS Secrets Manager secret into a Kubernetes Secret of a managed
//! environment, inside the data plane.
//!
//! The value goes from Secrets Manager to the Kubernetes API server and nowhere else: it never
//! crosses the tunnel (the result carries the version id and key names only), is never logged and
//! never reaches the gateway or its store.
//!
//! Which secrets: only those the agent's `secrets.allow` matches, checked before any call to
//! Kubernetes or AWS. The agent's IAM role may read more (its own identity, say); the control
//! plane names the secret, so without this list it could copy anything the role can read into
//! an environment and deploy a workload that sends it out.

use std::collections::BTreeMap;

use bytes::Bytes;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::names::{self, Invalid};
use super::{
    Backends, MANAGED_BY, MANAGED_BY_VALUE, apply_params, is_managed, kube_err, managed_namespace,
    output, parse,
};
use crate::commands::ProgressSink;
use crate::config::SecretsConfig;

/// Annotation: the Secrets Manager secret a Kubernetes Secret was synced from.
pub const SOURCE_ANNOTATION: &str = "tether.dev/secret-id";
/// Annotation: the Secrets Manager version synced.
pub const VERSION_ANNOTATION: &str = "tether.dev/secret-version-id";

/// `secret.sync` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sync {
    /// Secret name or ARN in Secrets Manager.
    secret_id: String,
    environment: String,
    /// The Kubernetes Secret's name.
    name: String,
    /// Only these keys of the secret (default: all).
    #[serde(default)]
    keys: Option<Vec<String>>,
}

/// `secret.sync` result: names and versions, never values.
#[derive(Debug, Serialize)]
struct Synced {
    environment: String,
    name: String,
    secret_id: String,
    version_id: String,
    keys: Vec<String>,
}

impl Sync {
    fn validate(&self) -> Result<(), Invalid> {
        if self.secret_id.is_empty()
            || self.secret_id.len() > 2048
            || self.secret_id.chars().any(char::is_whitespace)
        {
            return Err(Invalid {
                field: "secret_id".into(),
                value: self.secret_id.clone(),
                rule: "a Secrets Manager secret name or ARN (1 to 2048 characters, no whitespace)",
            });
        }
        names::dns1123_label("environment", &self.environment)?;
        names::dns1123_subdomain("name", &self.name)?;
        for (i, k) in self.keys.iter().flatten().enumerate() {
            names::secret_key(&format!("keys[{i}]"), k)?;
        }
        Ok(())
    }
}

/// Refuses a secret the operator did not allow, saying which config key decides.
pub(super) fn check_allowed(allowed: &SecretsConfig, secret_id: &str) -> Result<(), String> {
    if allowed.allow.is_empty() {
        return Err(format!(
            "secret.sync: refused: this agent allows no secret to be synced, so {secret_id:?} \
             was not read; the cluster's operator lists the secrets the control plane may sync \
             in the agent's config key secrets.allow (Helm value secrets.allow)"
        ));
    }
    if !allowed.allows(secret_id) {
        return Err(format!(
            "secret.sync: refused: secret_id {secret_id:?} matches no pattern of the agent's \
             secrets.allow, so it was not read; the cluster's operator can add it there (names \
             match name patterns, ARNs match arn: patterns)"
        ));
    }
    Ok(())
}

pub(super) async fn sync(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Sync = parse("secret.sync", &payload)?;
    req.validate().map_err(|e| format!("secret.sync: {e}"))?;
    check_allowed(&b.allowed_secrets, &req.secret_id)?;
    let client = b.kube().await?;
    let (env, name) = (req.environment.as_str(), req.name.as_str());
    managed_namespace(&client, env).await?;
    let secrets = Api::<Secret>::namespaced(client, env);
    if let Some(s) = secrets
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading secret {env}/{name}")))?
        && !is_managed(s.metadata.labels.as_ref())
    {
        return Err(format!(
            "secret {env}/{name} exists and is not managed by tether; nothing was changed"
        ));
    }

    let value = b
        .secrets()
        .await
        .get(&req.secret_id)
        .await
        .map_err(|e| format!("secret.sync: {e}"))?;
    progress.report(format!(
        "read {} version {} from Secrets Manager",
        req.secret_id, value.version_id
    ));
    let mut data: BTreeMap<String, ByteString> = BTreeMap::new();
    match &req.keys {
        None => {
            for (k, v) in &value.data {
                names::secret_key("secret key", k).map_err(|_| {
                    format!(
                        "secret.sync: secret {} has key {k:?}, which is not a valid Kubernetes \
                         Secret key (letters, digits, '-', '_', '.'); list the keys to copy in `keys`",
                        req.secret_id
                    )
                })?;
                data.insert(k.clone(), ByteString(v.clone()));
            }
        }
        Some(keys) => {
            for k in keys {
                let v = value.data.get(k).ok_or_else(|| {
                    let has: Vec<&str> = value.data.keys().map(String::as_str).collect();
                    format!(
                        "secret.sync: `keys`: secret {} (version {}) has no key {k:?}; it has: {}",
                        req.secret_id,
                        value.version_id,
                        has.join(", ")
                    )
                })?;
                data.insert(k.clone(), ByteString(v.clone()));
            }
        }
    }
    let keys: Vec<String> = data.keys().cloned().collect();
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": env,
            "labels": { MANAGED_BY: MANAGED_BY_VALUE },
            "annotations": {
                SOURCE_ANNOTATION: req.secret_id,
                VERSION_ANNOTATION: value.version_id,
            },
        },
        "data": data,
    });
    drop(value);
    secrets
        .patch(name, &apply_params(), &Patch::Apply(&secret))
        .await
        .map_err(kube_err(format!("applying secret {env}/{name}")))?;
    let version_id = secret["metadata"]["annotations"][VERSION_ANNOTATION]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    progress.report(format!(
        "secret {env}/{name} written with keys {}",
        keys.join(", ")
    ));
    output(&Synced {
        environment: env.to_owned(),
        name: name.to_owned(),
        secret_id: req.secret_id.clone(),
        version_id,
        keys,
    })
}
