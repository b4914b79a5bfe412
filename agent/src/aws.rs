//! Backend layer: what the agent's AWS clients (Secrets Manager in [`crate::secrets`], ECR in
//! [`crate::ecr`]) share.
//!
//! One way to load the SDK configuration from `[aws]` (the standard credential chain, the
//! region, the endpoint override, standard retries with `aws.max_attempts`, bounded timeouts),
//! an interceptor counting the requests a call sent, and one reading of a failed call
//! (`Failure`): whose fault it is and whether retrying can help. Each client maps a
//! `Failure` to its own typed error, adding what only it knows (the secret, the repository,
//! the IAM action).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_config::Region;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::config::AwsConfig;

/// How long opening a connection to an AWS endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt (request and response) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take, retries and their backoff included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Error codes that mean the caller's AWS identity may not make the call.
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

/// Error codes of a failure on AWS's side.
const UNAVAILABLE_CODES: &[&str] = &[
    "InternalServiceError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ServerException",
];

/// The SDK configuration for `[aws]`: the region from `cfg` or the chain, the endpoint override
/// from `cfg` (the SDK also honours `AWS_ENDPOINT_URL`), standard retries with
/// `cfg.max_attempts`, and the timeouts above. `loader` brings the credentials: the standard
/// chain (`aws_config::defaults`) or a provider of the embedder's choosing.
pub(crate) async fn sdk_config(
    cfg: &AwsConfig,
    mut loader: aws_config::ConfigLoader,
) -> aws_config::SdkConfig {
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
    loader.load().await
}

// === Attempts ===

/// Counts the requests one call sends (the first attempt and every retry): attach
/// [`interceptor`](Self::interceptor) to the call, read [`get`](Self::get) after it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Attempts(Arc<AtomicU32>);

impl Attempts {
    /// The interceptor that counts into this.
    pub(crate) fn interceptor(&self) -> CountAttempts {
        CountAttempts(self.0.clone())
    }

    /// Requests sent so far.
    pub(crate) fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// See [`Attempts`].
#[derive(Debug)]
pub(crate) struct CountAttempts(Arc<AtomicU32>);

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

// === Failure ===

/// Whose a failed call's fault is, and whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The caller's AWS identity may not make the call (policy, invalid or expired
    /// credentials): the operator's to fix.
    Denied,
    /// Still throttled when the attempts ran out: retrying later can help.
    Throttled,
    /// Unreachable, timed out, or failed on AWS's side on every attempt: retrying later can
    /// help.
    Unavailable,
    /// Anything else (a service error code the caller interprets, no credentials or region
    /// found, ...).
    Other,
}

/// A failed AWS call, after the SDK's retries.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    /// How to take it.
    pub(crate) kind: FailureKind,
    /// The AWS error code, when the service answered with one.
    pub(crate) code: Option<String>,
    /// What failed, in words: `Code: message` for a service error.
    pub(crate) message: String,
    /// Requests sent, retries included.
    pub(crate) attempts: u32,
}

impl Failure {
    /// Reads the SDK's error for a call that sent `attempts` requests.
    pub(crate) fn of<E>(e: SdkError<E, HttpResponse>, attempts: u32) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let context = DisplayErrorContext(&e).to_string();
        let plain = |kind, message| Failure {
            kind,
            code: None,
            message,
            attempts,
        };
        let service = match e {
            SdkError::ServiceError(s) => s,
            SdkError::TimeoutError(_) => {
                return plain(
                    FailureKind::Unavailable,
                    format!("no answer in time ({attempts} attempts)"),
                );
            }
            SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => {
                return plain(
                    FailureKind::Unavailable,
                    format!("{context} ({attempts} attempts)"),
                );
            }
            SdkError::ResponseError(r) => {
                return plain(
                    FailureKind::Unavailable,
                    format!(
                        "unreadable answer (HTTP {}): {context}",
                        r.raw().status().as_u16()
                    ),
                );
            }
            _ => return plain(FailureKind::Other, context),
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
        let message = match &code {
            Some(c) => format!("{c}: {message}"),
            None => message,
        };
        let kind = match code.as_deref() {
            Some(c) if DENIED_CODES.contains(&c) => FailureKind::Denied,
            Some(c) if THROTTLING_CODES.contains(&c) => FailureKind::Throttled,
            Some(c) if UNAVAILABLE_CODES.contains(&c) => FailureKind::Unavailable,
            Some(_) => FailureKind::Other,
            None => match status {
                401 | 403 => FailureKind::Denied,
                429 => FailureKind::Throttled,
                500..=599 => FailureKind::Unavailable,
                _ => FailureKind::Other,
            },
        };
        Failure {
            kind,
            code,
            message,
            attempts,
        }
    }

    /// A call not sent because no region is configured anywhere.
    pub(crate) fn no_region() -> Failure {
        Failure {
            kind: FailureKind::Other,
            code: None,
            message: "no AWS region: set aws.region or AWS_REGION".into(),
            attempts: 0,
        }
    }

    /// Whether AWS answered with error code `code`.
    pub(crate) fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}
