//! The agent's error type: why it could not start. It wraps the errors of the modules below
//! it (which never import it back), so the import graph has no circle through here.

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Invalid configuration: the operator's to fix.
    #[error(transparent)]
    Config(#[from] tether_runtime::config::ConfigError),
    /// Certificates or keys could not be loaded: the operator's to fix.
    #[error(transparent)]
    TlsMaterial(#[from] tether_runtime::tls::TlsError),
    /// The agent's certificate, key or proxy cannot make a TLS client: the operator's to fix.
    #[error(transparent)]
    Dialer(#[from] crate::dialer::DialerError),
    /// An upstream of `services` cannot be set up: the operator's to fix.
    #[error("TLS: services.{service}: {error}")]
    Upstream {
        /// The service name.
        service: String,
        /// What is wrong.
        #[source]
        error: UpstreamError,
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
    /// The agent's identity is not usable (what `identity.source` points to is not an agent
    /// identity, a certificate file is not an agent certificate, `state_dir` cannot be read):
    /// the operator's to fix.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Enrollment with `enrollment.token` failed for good (the token was refused, the gateway
    /// is not the one `tls.ca` trusts, the state directory cannot be written): the operator's
    /// to fix. Unreachable gateways are retried, not reported here.
    #[error(transparent)]
    Enrollment(#[from] crate::enroll::EnrollError),
    /// The ledger could not be opened (its directory, the agent's key): see
    /// [`crate::ledger::LedgerError`].
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// A local listener or file could not be set up.
    #[error("{what}: {source}{}", tether_runtime::report::io_hint(source))]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Why an upstream of `services` cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The address is not a URI tonic can dial, or its TLS settings are refused.
    #[error("{0}")]
    Endpoint(#[source] tonic::transport::Error),
    /// The `ca` file could not be read.
    #[error("{}: {source}", path.display())]
    Ca {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}
