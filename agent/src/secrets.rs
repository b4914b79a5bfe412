//! Backend layer: reading secrets from AWS Secrets Manager.
//!
//! One [`SecretsManager`] wraps the SDK client built from `[aws]`: the standard credential chain
//! (environment, profile, web identity / IRSA, container and instance metadata), standard retry
//! mode with `aws.max_attempts` (throttling, 5xx and network errors retried by the SDK with
//! exponential backoff and jitter), bounded connect and call timeouts. [`SecretsManager::get`]
//! reads the `AWSCURRENT` version and maps every failure to a [`SecretsError`] that says whether
//! retrying can help.
//!
//! Secret values are never logged: [`SecretValue`]'s `Debug` shows the key names and the
//! version only, and no error carries a value.

use std::collections::BTreeMap;

use aws_sdk_secretsmanager::config::ProvideCredentials;
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueOutput;

use crate::aws::{self, Attempts, Failure, FailureKind};
use crate::config::AwsConfig;

/// The key a secret that is not a JSON object of strings is stored under in [`SecretValue::data`].
pub const VALUE_KEY: &str = "value";

// === SecretsError ===

/// Why a secret could not be read. Each variant says whose it is to fix and whether retrying
/// can help ([`SecretsError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    /// The secret (or its `AWSCURRENT` version) does not exist: the operator's to create.
    #[error(
        "secret {secret_id:?} not found in AWS Secrets Manager (or it has no AWSCURRENT version); retrying will not help until it is created"
    )]
    NotFound {
        /// The secret id or ARN asked for.
        secret_id: String,
    },
    /// The agent's AWS identity may not read the secret (IAM or resource policy, invalid or
    /// expired credentials): the operator's to fix.
    #[error(
        "access to secret {secret_id:?} denied: {message}; the agent's AWS identity needs secretsmanager:GetSecretValue on it (and kms:Decrypt on its key); retrying will not help until then"
    )]
    AccessDenied {
        /// The secret id or ARN asked for.
        secret_id: String,
        /// What AWS said.
        message: String,
    },
    /// Secrets Manager still throttled the call when the attempts ran out: retrying later can
    /// help.
    #[error(
        "secret {secret_id:?}: AWS Secrets Manager throttled all {attempts} attempts; retrying later can help"
    )]
    Throttled {
        /// The secret id or ARN asked for.
        secret_id: String,
        /// How many requests were sent (the SDK retried the others with backoff).
        attempts: u32,
    },
    /// Secrets Manager could not be reached or failed on its side (network, timeout, 5xx) on
    /// every attempt: retrying later can help.
    #[error(
        "secret {secret_id:?}: AWS Secrets Manager unavailable: {message}; retrying later can help"
    )]
    Unavailable {
        /// The secret id or ARN asked for.
        secret_id: String,
        /// What failed.
        message: String,
    },
    /// The secret was read but its value is not in the expected shape: the operator's to fix.
    #[error(
        "secret {secret_id:?} is malformed: {message}; retrying will not help until it is fixed"
    )]
    Malformed {
        /// The secret id or ARN asked for.
        secret_id: String,
        /// What is wrong with it (never the value itself).
        message: String,
    },
    /// Any other failure (invalid request, no credentials or region found, ...): retrying is
    /// unlikely to help.
    #[error(
        "secret {secret_id:?}: AWS Secrets Manager call failed: {message}; retrying is unlikely to help"
    )]
    Other {
        /// The secret id or ARN asked for.
        secret_id: String,
        /// The AWS error code, when there was one.
        code: Option<String>,
        /// What failed.
        message: String,
    },
}

impl SecretsError {
    /// The secret the failed call asked for.
    pub fn secret_id(&self) -> &str {
        match self {
            SecretsError::NotFound { secret_id }
            | SecretsError::AccessDenied { secret_id, .. }
            | SecretsError::Throttled { secret_id, .. }
            | SecretsError::Unavailable { secret_id, .. }
            | SecretsError::Malformed { secret_id, .. }
            | SecretsError::Other { secret_id, .. } => secret_id,
        }
    }

    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SecretsError::Throttled { .. } | SecretsError::Unavailable { .. }
        )
    }
}

// === SecretValue ===

/// One version of a secret, split into named values.
///
/// A `SecretString` holding a JSON object whose values are all strings gives one entry per key;
/// any other `SecretString`, and a `SecretBinary`, give one entry under [`VALUE_KEY`].
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue {
    /// The version read (`VersionId`): changes on every rotation.
    pub version_id: String,
    /// The values by key.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for SecretValue {
    // Key names and version only: values must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretValue")
            .field("version_id", &self.version_id)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretValue {
    /// Splits a `SecretString` into values: one per key of a JSON object of strings, otherwise
    /// the whole string under [`VALUE_KEY`].
    pub fn from_secret_string(version_id: impl Into<String>, s: &str) -> SecretValue {
        let object = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s)
            .ok()
            .and_then(|m| {
                m.into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => Some((k, s.into_bytes())),
                        _ => None,
                    })
                    .collect::<Option<BTreeMap<_, _>>>()
            });
        SecretValue {
            version_id: version_id.into(),
            data: object
                .unwrap_or_else(|| BTreeMap::from([(VALUE_KEY.to_owned(), s.as_bytes().to_vec())])),
        }
    }

    /// A `SecretBinary`, stored under [`VALUE_KEY`].
    pub fn from_secret_binary(version_id: impl Into<String>, b: &[u8]) -> SecretValue {
        SecretValue {
            version_id: version_id.into(),
            data: BTreeMap::from([(VALUE_KEY.to_owned(), b.to_vec())]),
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }

    fn from_output(
        secret_id: &str,
        out: &GetSecretValueOutput,
    ) -> Result<SecretValue, SecretsError> {
        let malformed = |message: &str| SecretsError::Malformed {
            secret_id: secret_id.to_owned(),
            message: message.to_owned(),
        };
        let version_id = out
            .version_id()
            .ok_or_else(|| malformed("the answer has no VersionId"))?;
        if let Some(s) = out.secret_string() {
            Ok(SecretValue::from_secret_string(version_id, s))
        } else if let Some(b) = out.secret_binary() {
            Ok(SecretValue::from_secret_binary(version_id, b.as_ref()))
        } else {
            Err(malformed(
                "the version holds neither SecretString nor SecretBinary",
            ))
        }
    }
}

// === SecretsManager ===

/// A Secrets Manager client configured from `[aws]`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SecretsManager {
    client: aws_sdk_secretsmanager::Client,
}

impl SecretsManager {
    /// A client using the standard credential chain, the region from `cfg` or the chain, the
    /// endpoint override from `cfg` (the SDK also honours `AWS_ENDPOINT_URL`), standard retries
    /// with `cfg.max_attempts`, and the timeouts above.
    pub async fn new(cfg: &AwsConfig) -> SecretsManager {
        Self::build(
            cfg,
            aws_config::defaults(aws_config::BehaviorVersion::latest()),
        )
        .await
    }

    /// As [`new`](Self::new), with credentials from `credentials` instead of the standard chain
    /// (static test credentials, or an embedder's own provider).
    pub async fn with_credentials(
        cfg: &AwsConfig,
        credentials: impl ProvideCredentials + 'static,
    ) -> SecretsManager {
        Self::build(
            cfg,
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .credentials_provider(credentials),
        )
        .await
    }

    async fn build(cfg: &AwsConfig, loader: aws_config::ConfigLoader) -> SecretsManager {
        SecretsManager {
            client: aws_sdk_secretsmanager::Client::new(&aws::sdk_config(cfg, loader).await),
        }
    }

    /// The SDK client, for calls this type does not wrap.
    pub fn client(&self) -> &aws_sdk_secretsmanager::Client {
        &self.client
    }

    /// Reads the `AWSCURRENT` version of `secret_id` (a name or an ARN).
    pub async fn get(&self, secret_id: &str) -> Result<SecretValue, SecretsError> {
        if self.client.config().region().is_none() {
            return Err(classify(secret_id, Failure::no_region()));
        }
        let counter = Attempts::default();
        let result = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .version_stage("AWSCURRENT")
            .customize()
            .interceptor(counter.interceptor())
            .send()
            .await;
        let attempts = counter.get();
        match result {
            Ok(out) => {
                let value = SecretValue::from_output(secret_id, &out)?;
                tracing::debug!(
                    secret_id,
                    version_id = %value.version_id,
                    keys = ?value.data.keys().collect::<Vec<_>>(),
                    attempts,
                    "read secret"
                );
                Ok(value)
            }
            Err(e) => {
                let e = classify(secret_id, Failure::of(e, attempts));
                tracing::debug!(secret_id, attempts, error = %e, "reading secret failed");
                Err(e)
            }
        }
    }
}

/// Maps a failed call (after the SDK's retries) to ours.
fn classify(secret_id: &str, f: Failure) -> SecretsError {
    let secret_id = secret_id.to_owned();
    if f.is("ResourceNotFoundException") {
        return SecretsError::NotFound { secret_id };
    }
    match f.kind {
        FailureKind::Denied => SecretsError::AccessDenied {
            secret_id,
            message: f.message,
        },
        FailureKind::Throttled => SecretsError::Throttled {
            secret_id,
            attempts: f.attempts,
        },
        FailureKind::Unavailable => SecretsError::Unavailable {
            secret_id,
            message: f.message,
        },
        FailureKind::Other => SecretsError::Other {
            secret_id,
            code: f.code,
            message: f.message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &SecretValue) -> Vec<&str> {
        v.data.keys().map(String::as_str).collect()
    }

    #[test]
    fn json_object_of_strings_gives_one_entry_per_key() {
        let v = SecretValue::from_secret_string("v1", r#"{"user":"app","password":"hunter2"}"#);
        assert_eq!(v.version_id, "v1");
        assert_eq!(keys(&v), ["password", "user"]);
        assert_eq!(v.get("password"), Some(&b"hunter2"[..]));
        assert_eq!(v.get("user"), Some(&b"app"[..]));
    }

    #[test]
    fn any_other_secret_string_is_one_value() {
        for s in [
            "plain text",
            r#"{"n": 1, "s": "x"}"#,
            r#"["a","b"]"#,
            r#""quoted""#,
            "{not json",
            "",
        ] {
            let v = SecretValue::from_secret_string("v", s);
            assert_eq!(keys(&v), [VALUE_KEY], "{s:?}");
            assert_eq!(v.get(VALUE_KEY), Some(s.as_bytes()), "{s:?}");
        }
    }

    #[test]
    fn empty_json_object_has_no_keys() {
        assert!(SecretValue::from_secret_string("v", "{}").data.is_empty());
    }

    #[test]
    fn secret_binary_is_one_value() {
        let v = SecretValue::from_secret_binary("v", &[0, 159, 146, 150]);
        assert_eq!(v.get(VALUE_KEY), Some(&[0u8, 159, 146, 150][..]));
    }

    #[test]
    fn debug_shows_keys_and_version_but_no_value() {
        let v = SecretValue::from_secret_string(
            "ver-42",
            r#"{"password":"hunter2-very-secret","token":"tok-very-secret"}"#,
        );
        let d = format!("{v:?} {v:#?}");
        assert!(
            d.contains("ver-42") && d.contains("password") && d.contains("token"),
            "{d}"
        );
        assert!(!d.contains("very-secret"), "a value leaked into Debug: {d}");
        let plain = SecretValue::from_secret_string("v", "plain-very-secret");
        assert!(!format!("{plain:?}").contains("very-secret"));
    }

    #[test]
    fn only_throttling_and_unavailable_are_retryable() {
        let id = || "s".to_owned();
        assert!(
            SecretsError::Throttled {
                secret_id: id(),
                attempts: 3
            }
            .is_retryable()
        );
        assert!(
            SecretsError::Unavailable {
                secret_id: id(),
                message: "x".into()
            }
            .is_retryable()
        );
        assert!(!SecretsError::NotFound { secret_id: id() }.is_retryable());
        let denied = SecretsError::AccessDenied {
            secret_id: id(),
            message: "no".into(),
        };
        assert!(!denied.is_retryable());
        assert!(
            denied.to_string().contains("retrying will not help"),
            "{denied}"
        );
        assert_eq!(denied.secret_id(), "s");
    }
}
