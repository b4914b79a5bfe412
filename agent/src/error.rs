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
    /// A local listener could not be bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
}
