//! The agent's error type.

/// Why the agent could not start, or why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Invalid configuration: the operator's to fix.
    #[error(transparent)]
    Config(#[from] tether_runtime::config::ConfigError),
    /// Certificates or keys could not be loaded: the operator's to fix.
    #[error(transparent)]
    TlsMaterial(#[from] tether_runtime::tls::TlsError),
    /// The TLS configuration was refused: the operator's to fix.
    #[error("TLS: {0}")]
    Tls(String),
    /// One attempt to reach a gateway failed; the agent retries with backoff.
    #[error("gateway {gateway}: {reason}")]
    Dial {
        /// The address dialed.
        gateway: String,
        /// What failed.
        reason: String,
    },
    /// The agent's identity could not be fetched from where `identity.source` points (not found,
    /// access denied, throttled, unreachable): [`SecretsError::is_retryable`] says whether a
    /// restart later can help.
    ///
    /// [`SecretsError::is_retryable`]: crate::secrets::SecretsError::is_retryable
    #[error("identity.source = \"{identity_source}\": {error}")]
    IdentityFetch {
        /// The configured `identity.source`.
        identity_source: String,
        /// Why the fetch failed.
        #[source]
        error: crate::secrets::SecretsError,
    },
    /// What `identity.source` points to is not a usable agent identity (not the expected JSON,
    /// not PEM, key and certificate do not match, not an agent certificate): the operator's to
    /// fix.
    #[error("identity.source = \"{identity_source}\": {reason}")]
    Identity {
        /// The configured `identity.source`.
        identity_source: String,
        /// What is wrong (never key material).
        reason: String,
    },
    /// Enrollment with `enrollment.token` failed for good (the token was refused, the gateway
    /// is not the one `tls.ca` trusts, the state directory cannot be written): the operator's
    /// to fix. Unreachable gateways are retried, not reported here.
    #[error(transparent)]
    Enrollment(#[from] crate::enroll::EnrollError),
    /// A local listener could not be bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
}
