//! Backend layer: container repositories in AWS ECR (Elastic Container Registry).
//!
//! One [`Ecr`] wraps the SDK client built from `[aws]`, exactly as [`crate::secrets`] does for
//! Secrets Manager (`aws::sdk_config`: the standard credential chain, the region, the
//! endpoint override, standard retries with `aws.max_attempts`, throttling retried with
//! exponential backoff and jitter). Each method is one ECR call in the agent's own account and
//! maps its failure to an [`EcrError`] naming the repository and the IAM action the call needs,
//! and saying whether retrying can help. The answers callers expect (no such repository, no
//! policy yet, already exists) are values, not errors.
//!
//! The calls the registry commands make are exactly [`IAM_ACTIONS`]; docs/install-agent.md
//! ("IAM for the registry commands") grants exactly those, and `e2e/tests/registry.rs` checks
//! both against what the commands send.

use std::collections::BTreeMap;

use aws_sdk_ecr::config::ProvideCredentials;
use aws_sdk_ecr::operation::create_repository::CreateRepositoryError;
use aws_sdk_ecr::types::{ImageScanningConfiguration, ImageTagMutability, Tag};
use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::retries::classifiers::{ClassifyRetry, RetryAction};

use crate::aws::{self, Attempts, Failure, FailureKind};
use crate::config::AwsConfig;

/// `ecr:DescribeRepositories`: does the repository exist, and its settings.
pub const DESCRIBE_REPOSITORIES: &str = "ecr:DescribeRepositories";
/// `ecr:ListTagsForResource`: is the repository Tether's.
pub const LIST_TAGS_FOR_RESOURCE: &str = "ecr:ListTagsForResource";
/// `ecr:CreateRepository` (with its tags: no `ecr:TagResource` needed for them).
pub const CREATE_REPOSITORY: &str = "ecr:CreateRepository";
/// `ecr:TagResource`: the payload's tags on an existing repository.
pub const TAG_RESOURCE: &str = "ecr:TagResource";
/// `ecr:PutImageScanningConfiguration`: `scan_on_push` changed.
pub const PUT_IMAGE_SCANNING_CONFIGURATION: &str = "ecr:PutImageScanningConfiguration";
/// `ecr:PutImageTagMutability`: `immutable_tags` changed.
pub const PUT_IMAGE_TAG_MUTABILITY: &str = "ecr:PutImageTagMutability";
/// `ecr:GetLifecyclePolicy`: the lifecycle policy to compare with.
pub const GET_LIFECYCLE_POLICY: &str = "ecr:GetLifecyclePolicy";
/// `ecr:PutLifecyclePolicy`: `keep_last` set or changed.
pub const PUT_LIFECYCLE_POLICY: &str = "ecr:PutLifecyclePolicy";
/// `ecr:DeleteLifecyclePolicy`: `keep_last` removed.
pub const DELETE_LIFECYCLE_POLICY: &str = "ecr:DeleteLifecyclePolicy";
/// `ecr:GetRepositoryPolicy`: the repository policy to merge into.
pub const GET_REPOSITORY_POLICY: &str = "ecr:GetRepositoryPolicy";
/// `ecr:SetRepositoryPolicy`: who may push and pull changed.
pub const SET_REPOSITORY_POLICY: &str = "ecr:SetRepositoryPolicy";
/// `ecr:DeleteRepositoryPolicy`: nobody left to grant.
pub const DELETE_REPOSITORY_POLICY: &str = "ecr:DeleteRepositoryPolicy";
/// `ecr:DeleteRepository` (with `force`, its images too: no `ecr:BatchDeleteImage` needed).
pub const DELETE_REPOSITORY: &str = "ecr:DeleteRepository";

/// Every IAM action the `registry.*` commands use, and no other.
pub const IAM_ACTIONS: &[&str] = &[
    DESCRIBE_REPOSITORIES,
    LIST_TAGS_FOR_RESOURCE,
    CREATE_REPOSITORY,
    TAG_RESOURCE,
    PUT_IMAGE_SCANNING_CONFIGURATION,
    PUT_IMAGE_TAG_MUTABILITY,
    GET_LIFECYCLE_POLICY,
    PUT_LIFECYCLE_POLICY,
    DELETE_LIFECYCLE_POLICY,
    GET_REPOSITORY_POLICY,
    SET_REPOSITORY_POLICY,
    DELETE_REPOSITORY_POLICY,
    DELETE_REPOSITORY,
];

// === EcrError ===

/// Why an ECR call failed. Each variant names the repository and the IAM action, says whose it
/// is to fix and whether retrying can help ([`EcrError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EcrError {
    /// A delete without `force` of a repository that holds images: the control plane's call.
    #[error(
        "repository {repository:?} holds images; nothing was deleted; send force: true to delete it with its images"
    )]
    NotEmpty {
        /// The repository.
        repository: String,
    },
    /// The repository went away between two calls (deleted meanwhile): retrying the command
    /// can help.
    #[error(
        "repository {repository:?} disappeared during {action} (deleted meanwhile?); retrying the command can help"
    )]
    NotFound {
        /// The IAM action of the call.
        action: &'static str,
        /// The repository.
        repository: String,
    },
    /// The agent's AWS identity may not make the call: the operator's to fix.
    #[error(
        "repository {repository:?}: access denied: the agent's AWS identity needs {action} on it \
         (docs/install-agent.md, \"IAM for the registry commands\"); AWS said: {message}; \
         retrying will not help until then"
    )]
    AccessDenied {
        /// The IAM action refused.
        action: &'static str,
        /// The repository.
        repository: String,
        /// What AWS said.
        message: String,
    },
    /// An ECR quota was reached (repositories per region, tags per repository, policy size):
    /// the operator's to raise, or the control plane's to clean up.
    #[error(
        "repository {repository:?}: {action} exceeded an ECR quota: {message}; raise it in \
         Service Quotas (Amazon Elastic Container Registry) or remove unused repositories; \
         retrying will not help until then"
    )]
    LimitExceeded {
        /// The IAM action of the call.
        action: &'static str,
        /// The repository.
        repository: String,
        /// What AWS said.
        message: String,
    },
    /// ECR refused the request as invalid (e.g. a principal in the repository policy that does
    /// not exist): the payload's or the config's to fix.
    #[error(
        "repository {repository:?}: ECR refused {action} as invalid: {message}; retrying will not help"
    )]
    Invalid {
        /// The IAM action of the call.
        action: &'static str,
        /// The repository.
        repository: String,
        /// What AWS said.
        message: String,
    },
    /// ECR still throttled the call when the attempts ran out: retrying later can help.
    #[error(
        "repository {repository:?}: ECR throttled all {attempts} attempts of {action}; retrying later can help"
    )]
    Throttled {
        /// The IAM action of the call.
        action: &'static str,
        /// The repository.
        repository: String,
        /// How many requests were sent (the SDK retried the others with backoff).
        attempts: u32,
    },
    /// ECR could not be reached or failed on its side (network, timeout, 5xx) on every
    /// attempt: retrying later can help.
    #[error(
        "repository {repository:?}: ECR unavailable for {action}: {message}; retrying later can help"
    )]
    Unavailable {
        /// The IAM action of the call.
        action: &'static str,
        /// The repository.
        repository: String,
        /// What failed.
        message: String,
    },
    /// Any other failure (no credentials or region found, an unexpected answer): retrying is
    /// unlikely to help.
    #[error("repository {repository:?}: {action} failed: {message}; retrying is unlikely to help")]
    Other {
        /// The IAM action of the call.
        action: &'static str,
        /// The repository.
        repository: String,
        /// The AWS error code, when there was one.
        code: Option<String>,
        /// What failed.
        message: String,
    },
}

impl EcrError {
    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EcrError::NotFound { .. } | EcrError::Throttled { .. } | EcrError::Unavailable { .. }
        )
    }

    fn of(action: &'static str, repository: &str, f: Failure) -> EcrError {
        let repository = repository.to_owned();
        let message = f.message;
        match f.code.as_deref() {
            Some("RepositoryNotEmptyException") => return EcrError::NotEmpty { repository },
            Some("RepositoryNotFoundException") => {
                return EcrError::NotFound { action, repository };
            }
            Some("LimitExceededException" | "TooManyTagsException") => {
                return EcrError::LimitExceeded {
                    action,
                    repository,
                    message,
                };
            }
            Some(
                "InvalidParameterException"
                | "InvalidTagParameterException"
                | "ValidationException",
            ) => {
                return EcrError::Invalid {
                    action,
                    repository,
                    message,
                };
            }
            _ => {}
        }
        match f.kind {
            FailureKind::Denied => EcrError::AccessDenied {
                action,
                repository,
                message,
            },
            FailureKind::Throttled => EcrError::Throttled {
                action,
                repository,
                attempts: f.attempts,
            },
            FailureKind::Unavailable => EcrError::Unavailable {
                action,
                repository,
                message,
            },
            FailureKind::Other => EcrError::Other {
                action,
                repository,
                code: f.code,
                message,
            },
        }
    }
}

// === Repository ===

/// A repository as ECR describes it: what the registry commands compare with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repository {
    /// The repository's name.
    pub name: String,
    /// `arn:aws:ecr:<region>:<account>:repository/<name>`.
    pub arn: String,
    /// `<account>.dkr.ecr.<region>.amazonaws.com/<name>`: what `docker push` is given.
    pub uri: String,
    /// Whether images are scanned when pushed.
    pub scan_on_push: bool,
    /// `MUTABLE`, `IMMUTABLE`, or one of ECR's `*_WITH_EXCLUSION` forms.
    pub tag_mutability: String,
}

impl Repository {
    fn from_sdk(
        r: &aws_sdk_ecr::types::Repository,
        action: &'static str,
    ) -> Result<Repository, EcrError> {
        let name = r.repository_name().unwrap_or_default().to_owned();
        let missing = |field: &str| EcrError::Other {
            action,
            repository: name.clone(),
            code: None,
            message: format!("ECR's answer has no {field}"),
        };
        Ok(Repository {
            arn: r
                .repository_arn()
                .ok_or_else(|| missing("repositoryArn"))?
                .to_owned(),
            uri: r
                .repository_uri()
                .ok_or_else(|| missing("repositoryUri"))?
                .to_owned(),
            scan_on_push: r
                .image_scanning_configuration()
                .is_some_and(ImageScanningConfiguration::scan_on_push),
            tag_mutability: r
                .image_tag_mutability()
                .map_or("MUTABLE", ImageTagMutability::as_str)
                .to_owned(),
            name,
        })
    }

    /// Whether pushing an existing tag again is refused.
    pub fn immutable_tags(&self) -> bool {
        self.tag_mutability == ImageTagMutability::Immutable.as_str()
    }
}

/// What a repository is created with.
#[derive(Clone, Debug)]
pub struct NewRepository<'a> {
    /// The repository's name.
    pub name: &'a str,
    /// Scan images when pushed.
    pub scan_on_push: bool,
    /// Refuse pushing an existing tag again.
    pub immutable_tags: bool,
    /// Its tags (Tether's management tag among them).
    pub tags: &'a BTreeMap<String, String>,
}

fn mutability(immutable: bool) -> ImageTagMutability {
    if immutable {
        ImageTagMutability::Immutable
    } else {
        ImageTagMutability::Mutable
    }
}

fn sdk_tags(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .expect("key and value are both set")
        })
        .collect()
}

// === Ecr ===

/// The SDK takes `LimitExceededException` for throttling (other services answer it to a caller
/// going too fast) and retries it with backoff; from `CreateRepository` it means the account's
/// repository quota is reached, which no retry changes: retrying would only delay the answer.
#[derive(Debug)]
struct QuotaIsNotThrottling;

impl ClassifyRetry for QuotaIsNotThrottling {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let quota = ctx
            .output_or_error()
            .and_then(Result::err)
            .and_then(|e| e.as_operation_error())
            .and_then(|e| e.downcast_ref::<CreateRepositoryError>())
            .is_some_and(CreateRepositoryError::is_limit_exceeded_exception);
        if quota {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "ECR quota is not throttling"
    }
}

/// Sends one call with an attempt counter; `Err` is a [`Failure`] the caller reads.
macro_rules! send {
    ($self:ident, $request:expr) => {{
        if $self.client.config().region().is_none() {
            Err(Failure::no_region())
        } else {
            let attempts = Attempts::default();
            let result = $request
                .customize()
                .interceptor(attempts.interceptor())
                .send()
                .await;
            result.map_err(|e| Failure::of(e, attempts.get()))
        }
    }};
}

/// An ECR client configured from `[aws]`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Ecr {
    client: aws_sdk_ecr::Client,
}

impl Ecr {
    /// A client using the standard credential chain and `[aws]` (see [`crate::aws`]).
    pub async fn new(cfg: &AwsConfig) -> Ecr {
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
    ) -> Ecr {
        Self::build(
            cfg,
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .credentials_provider(credentials),
        )
        .await
    }

    async fn build(cfg: &AwsConfig, loader: aws_config::ConfigLoader) -> Ecr {
        let conf = aws_sdk_ecr::config::Builder::from(&aws::sdk_config(cfg, loader).await)
            .retry_classifier(QuotaIsNotThrottling)
            .build();
        Ecr {
            client: aws_sdk_ecr::Client::from_conf(conf),
        }
    }

    /// The SDK client, for calls this type does not wrap.
    pub fn client(&self) -> &aws_sdk_ecr::Client {
        &self.client
    }

    /// The repository `name` of the agent's account, if it exists.
    pub async fn describe(&self, name: &str) -> Result<Option<Repository>, EcrError> {
        let action = DESCRIBE_REPOSITORIES;
        match send!(
            self,
            self.client.describe_repositories().repository_names(name)
        ) {
            Ok(out) => out
                .repositories()
                .iter()
                .find(|r| r.repository_name() == Some(name))
                .map(|r| Repository::from_sdk(r, action))
                .transpose(),
            Err(f) if f.is("RepositoryNotFoundException") => Ok(None),
            Err(f) => Err(EcrError::of(action, name, f)),
        }
    }

    /// The tags of `repo`.
    pub async fn tags(&self, repo: &Repository) -> Result<BTreeMap<String, String>, EcrError> {
        let out = send!(
            self,
            self.client.list_tags_for_resource().resource_arn(&repo.arn)
        )
        .map_err(|f| EcrError::of(LIST_TAGS_FOR_RESOURCE, &repo.name, f))?;
        Ok(out
            .tags()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect())
    }

    /// Creates a repository; `None` when one of that name already exists (made meanwhile by
    /// someone else, or by an earlier delivery of the same command).
    pub async fn create(&self, new: &NewRepository<'_>) -> Result<Option<Repository>, EcrError> {
        let action = CREATE_REPOSITORY;
        let scanning = ImageScanningConfiguration::builder()
            .scan_on_push(new.scan_on_push)
            .build();
        match send!(
            self,
            self.client
                .create_repository()
                .repository_name(new.name)
                .image_scanning_configuration(scanning)
                .image_tag_mutability(mutability(new.immutable_tags))
                .set_tags(Some(sdk_tags(new.tags)))
        ) {
            Ok(out) => {
                let repo = out.repository().ok_or_else(|| EcrError::Other {
                    action,
                    repository: new.name.to_owned(),
                    code: None,
                    message: "ECR's answer has no repository".into(),
                })?;
                Repository::from_sdk(repo, action).map(Some)
            }
            Err(f) if f.is("RepositoryAlreadyExistsException") => Ok(None),
            Err(f) => Err(EcrError::of(action, new.name, f)),
        }
    }

    /// Adds or updates `tags` on `repo` (other tags are left alone).
    pub async fn tag(
        &self,
        repo: &Repository,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), EcrError> {
        send!(
            self,
            self.client
                .tag_resource()
                .resource_arn(&repo.arn)
                .set_tags(Some(sdk_tags(tags)))
        )
        .map(drop)
        .map_err(|f| EcrError::of(TAG_RESOURCE, &repo.name, f))
    }

    /// Turns scanning on push on or off.
    pub async fn set_scan_on_push(&self, name: &str, on: bool) -> Result<(), EcrError> {
        let scanning = ImageScanningConfiguration::builder()
            .scan_on_push(on)
            .build();
        send!(
            self,
            self.client
                .put_image_scanning_configuration()
                .repository_name(name)
                .image_scanning_configuration(scanning)
        )
        .map(drop)
        .map_err(|f| EcrError::of(PUT_IMAGE_SCANNING_CONFIGURATION, name, f))
    }

    /// Makes tags immutable (`true`) or mutable.
    pub async fn set_immutable_tags(&self, name: &str, immutable: bool) -> Result<(), EcrError> {
        send!(
            self,
            self.client
                .put_image_tag_mutability()
                .repository_name(name)
                .image_tag_mutability(mutability(immutable))
        )
        .map(drop)
        .map_err(|f| EcrError::of(PUT_IMAGE_TAG_MUTABILITY, name, f))
    }

    /// The lifecycle policy's JSON text, if the repository has one.
    pub async fn lifecycle_policy(&self, name: &str) -> Result<Option<String>, EcrError> {
        match send!(
            self,
            self.client.get_lifecycle_policy().repository_name(name)
        ) {
            Ok(out) => Ok(out.lifecycle_policy_text().map(str::to_owned)),
            Err(f) if f.is("LifecyclePolicyNotFoundException") => Ok(None),
            Err(f) => Err(EcrError::of(GET_LIFECYCLE_POLICY, name, f)),
        }
    }

    /// Sets the lifecycle policy (replacing any).
    pub async fn put_lifecycle_policy(&self, name: &str, text: &str) -> Result<(), EcrError> {
        send!(
            self,
            self.client
                .put_lifecycle_policy()
                .repository_name(name)
                .lifecycle_policy_text(text)
        )
        .map(drop)
        .map_err(|f| EcrError::of(PUT_LIFECYCLE_POLICY, name, f))
    }

    /// Removes the lifecycle policy; none there is a success.
    pub async fn delete_lifecycle_policy(&self, name: &str) -> Result<(), EcrError> {
        match send!(
            self,
            self.client.delete_lifecycle_policy().repository_name(name)
        ) {
            Ok(_) => Ok(()),
            Err(f) if f.is("LifecyclePolicyNotFoundException") => Ok(()),
            Err(f) => Err(EcrError::of(DELETE_LIFECYCLE_POLICY, name, f)),
        }
    }

    /// The repository policy's JSON text, if the repository has one.
    pub async fn repository_policy(&self, name: &str) -> Result<Option<String>, EcrError> {
        match send!(
            self,
            self.client.get_repository_policy().repository_name(name)
        ) {
            Ok(out) => Ok(out.policy_text().map(str::to_owned)),
            Err(f) if f.is("RepositoryPolicyNotFoundException") => Ok(None),
            Err(f) => Err(EcrError::of(GET_REPOSITORY_POLICY, name, f)),
        }
    }

    /// Sets the repository policy (replacing any).
    pub async fn set_repository_policy(&self, name: &str, text: &str) -> Result<(), EcrError> {
        send!(
            self,
            self.client
                .set_repository_policy()
                .repository_name(name)
                .policy_text(text)
        )
        .map(drop)
        .map_err(|f| EcrError::of(SET_REPOSITORY_POLICY, name, f))
    }

    /// Removes the repository policy; none there is a success.
    pub async fn delete_repository_policy(&self, name: &str) -> Result<(), EcrError> {
        match send!(
            self,
            self.client.delete_repository_policy().repository_name(name)
        ) {
            Ok(_) => Ok(()),
            Err(f) if f.is("RepositoryPolicyNotFoundException") => Ok(()),
            Err(f) => Err(EcrError::of(DELETE_REPOSITORY_POLICY, name, f)),
        }
    }

    /// Deletes the repository (with `force`, its images too; without, a repository holding
    /// images is [`EcrError::NotEmpty`], decided by ECR atomically). `false`: it was already
    /// gone.
    pub async fn delete(&self, name: &str, force: bool) -> Result<bool, EcrError> {
        match send!(
            self,
            self.client
                .delete_repository()
                .repository_name(name)
                .force(force)
        ) {
            Ok(_) => Ok(true),
            Err(f) if f.is("RepositoryNotFoundException") => Ok(false),
            Err(f) => Err(EcrError::of(DELETE_REPOSITORY, name, f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind, code: Option<&str>) -> Failure {
        Failure {
            kind,
            code: code.map(str::to_owned),
            message: format!("{}: AWS says no", code.unwrap_or("HTTP 403")),
            attempts: 3,
        }
    }

    #[test]
    fn errors_name_the_repository_and_the_iam_action_and_say_whether_to_retry() {
        let cases = [
            (FailureKind::Denied, None, "access denied", false),
            (
                FailureKind::Other,
                Some("LimitExceededException"),
                "exceeded an ECR quota",
                false,
            ),
            (
                FailureKind::Other,
                Some("TooManyTagsException"),
                "exceeded an ECR quota",
                false,
            ),
            (
                FailureKind::Other,
                Some("InvalidParameterException"),
                "refused ecr:CreateRepository as invalid",
                false,
            ),
            (
                FailureKind::Throttled,
                Some("ThrottlingException"),
                "throttled all 3 attempts of ecr:CreateRepository",
                true,
            ),
            (
                FailureKind::Unavailable,
                Some("ServerException"),
                "ECR unavailable",
                true,
            ),
            (
                FailureKind::Other,
                Some("RepositoryNotFoundException"),
                "disappeared during ecr:CreateRepository",
                true,
            ),
            (
                FailureKind::Other,
                Some("KmsException"),
                "retrying is unlikely to help",
                false,
            ),
        ];
        for (kind, code, want, retryable) in cases {
            let e = EcrError::of(CREATE_REPOSITORY, "tether/web", failure(kind, code));
            let text = e.to_string();
            assert!(text.contains(want), "{code:?}: {text}");
            assert!(text.contains("\"tether/web\""), "{text}");
            assert_eq!(e.is_retryable(), retryable, "{code:?}: {text}");
        }
        let denied = EcrError::of(
            SET_REPOSITORY_POLICY,
            "r",
            failure(FailureKind::Denied, None),
        );
        assert!(
            denied
                .to_string()
                .contains("needs ecr:SetRepositoryPolicy on it"),
            "{denied}"
        );
        let not_empty = EcrError::of(
            DELETE_REPOSITORY,
            "r",
            failure(FailureKind::Other, Some("RepositoryNotEmptyException")),
        );
        assert!(
            matches!(not_empty, EcrError::NotEmpty { .. }),
            "{not_empty:?}"
        );
        assert!(not_empty.to_string().contains("force: true"), "{not_empty}");
    }

    #[test]
    fn iam_actions_are_distinct_ecr_actions() {
        let mut seen = std::collections::BTreeSet::new();
        for a in IAM_ACTIONS {
            assert!(a.starts_with("ecr:"), "{a}");
            assert!(seen.insert(a), "{a} listed twice");
        }
    }
}
