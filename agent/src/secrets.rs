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
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_secretsmanager::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_secretsmanager::config::retry::RetryConfig;
use aws_sdk_secretsmanager::config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::config::{
    ConfigBag, Intercept, ProvideCredentials, Region, RuntimeComponents,
};
use aws_sdk_secretsmanager::error::{
    BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError,
};
use aws_sdk_secretsmanager::operation::get_secret_value::{
    GetSecretValueError, GetSecretValueOutput,
};

use crate::config::AwsConfig;

/// How long opening a connection to Secrets Manager may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt (request and response) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take, retries and their backoff included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The key a secret that is not a JSON object of strings is stored under in [`SecretValue::data`].
pub const VALUE_KEY: &str = "value";

/// Error codes that mean the caller's AWS identity may not read the secret.
const DENIED_CODES: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "IncompleteSignature",
    "ExpiredTokenException",
    "MissingAuthenticationToken",
];

/// Error codes AWS answers when a caller goes over its request rate.
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
];

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

    async fn build(cfg: &AwsConfig, mut loader: aws_config::ConfigLoader) -> SecretsManager {
        loader = loader
            .retry_config(RetryConfig::standard().with_max_attempts(cfg.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(CALL_TIMEOUT)
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        SecretsManager {
            client: aws_sdk_secretsmanager::Client::new(&sdk),
        }
    }

    /// The SDK client, for calls this type does not wrap.
    pub fn client(&self) -> &aws_sdk_secretsmanager::Client {
        &self.client
    }

    /// Reads the `AWSCURRENT` version of `secret_id` (a name or an ARN).
    pub async fn get(&self, secret_id: &str) -> Result<SecretValue, SecretsError> {
        if self.client.config().region().is_none() {
            return Err(SecretsError::Other {
                secret_id: secret_id.to_owned(),
                code: None,
                message: "no AWS region: set aws.region or AWS_REGION".into(),
            });
        }
        let attempts = Arc::new(AtomicU32::new(0));
        let result = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .version_stage("AWSCURRENT")
            .customize()
            .interceptor(CountAttempts(attempts.clone()))
            .send()
            .await;
        let attempts = attempts.load(Ordering::Relaxed);
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
                let e = classify(secret_id, e, attempts);
                tracing::debug!(secret_id, attempts, error = %e, "reading secret failed");
                Err(e)
            }
        }
    }
}

/// Counts the requests one call sends (the first attempt and every retry).
#[derive(Debug)]
struct CountAttempts(Arc<AtomicU32>);

impl Intercept for CountAttempts {
    fn name(&self) -> &'static str {
        "CountAttempts"
    }

    fn read_before_transmit(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Maps the SDK's error (after its retries) to ours.
fn classify(secret_id: &str, e: SdkError<GetSecretValueError>, attempts: u32) -> SecretsError {
    let secret_id = secret_id.to_owned();
    let context = DisplayErrorContext(&e).to_string();
    let service = match e {
        SdkError::ServiceError(s) => s,
        SdkError::TimeoutError(_) => {
            return SecretsError::Unavailable {
                secret_id,
                message: format!("no answer in time ({attempts} attempts)"),
            };
        }
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => {
            return SecretsError::Unavailable {
                secret_id,
                message: format!("{context} ({attempts} attempts)"),
            };
        }
        SdkError::ResponseError(r) => {
            return SecretsError::Unavailable {
                secret_id,
                message: format!(
                    "unreadable answer (HTTP {}): {context}",
                    r.raw().status().as_u16()
                ),
            };
        }
        _ => {
            return SecretsError::Other {
                secret_id,
                code: None,
                message: context,
            };
        }
    };
    let status = service.raw().status().as_u16();
    let err = service.err();
    let code = err.code().map(str::to_owned);
    // An answer whose error the SDK could not parse (a proxy, an emulator speaking another
    // protocol) has no code: fall back on the HTTP status and an excerpt of the body.
    let message = match err.message() {
        Some(m) => m.to_owned(),
        None => {
            let body = service.raw().body().bytes().unwrap_or_default();
            let excerpt: String = String::from_utf8_lossy(body)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(300)
                .collect();
            format!("HTTP {status}: {excerpt}")
        }
    };
    let described = match &code {
        Some(c) => format!("{c}: {message}"),
        None => message,
    };
    match code.as_deref() {
        Some("ResourceNotFoundException") => SecretsError::NotFound { secret_id },
        Some(c) if DENIED_CODES.contains(&c) => SecretsError::AccessDenied {
            secret_id,
            message: described,
        },
        Some(c) if THROTTLING_CODES.contains(&c) => SecretsError::Throttled {
            secret_id,
            attempts,
        },
        Some("InternalServiceError" | "ServiceUnavailable" | "ServiceUnavailableException") => {
            SecretsError::Unavailable {
                secret_id,
                message: described,
            }
        }
        Some(_) => SecretsError::Other {
            secret_id,
            code,
            message: described,
        },
        None => match status {
            401 | 403 => SecretsError::AccessDenied {
                secret_id,
                message: described,
            },
            429 => SecretsError::Throttled {
                secret_id,
                attempts,
            },
            500..=599 => SecretsError::Unavailable {
                secret_id,
                message: described,
            },
            _ => SecretsError::Other {
                secret_id,
                code: None,
                message: described,
            },
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
