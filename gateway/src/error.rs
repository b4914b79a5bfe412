//! The gateway's error at start: why it could not start or serve.

use std::path::PathBuf;

/// Why the gateway could not start or serve. Config and TLS errors are the operator's to fix
/// (`tether-gateway serve` exits 64 on them); IO errors at start (a port in use) likewise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] tether_runtime::config::ConfigError),
    /// Certificates or keys could not be loaded.
    #[error(transparent)]
    TlsMaterial(#[from] tether_runtime::tls::TlsError),
    /// The TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsSetupError),
    /// A listener could not be bound or served.
    #[error("{what}: {source}{}", tether_runtime::report::io_hint(source))]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The command store could not be opened or recovered.
    #[error("command store: data_dir {}: {source}", data_dir.display())]
    Store {
        /// Where it lives.
        data_dir: PathBuf,
        /// What the store said.
        source: crate::commands::store::StoreError,
    },
    /// The identity store (revocations, enrollment tokens) could not be opened.
    #[error("identity store: data_dir {}: {source}", data_dir.display())]
    IdentityStore {
        /// Where it lives.
        data_dir: PathBuf,
        /// What the store said.
        source: crate::identity::db::IdentityDbError,
    },
    /// The cluster's PostgreSQL (`store.dsn`) could not be used: a config error (exit 64)
    /// when [`DbError::is_config`](crate::cluster::db::DbError::is_config).
    #[error(transparent)]
    Cluster(#[from] crate::cluster::db::DbError),
    /// The identity state in PostgreSQL could not be read.
    #[error(transparent)]
    ClusterIdentity(#[from] crate::cluster::identity::IdentityPgError),
    /// `data_dir` is held by another gateway process.
    #[error(transparent)]
    DataDir(#[from] crate::data_dir::LockError),
    /// PKI operation failed.
    #[error(transparent)]
    Pki(#[from] crate::identity::pki::PkiError),
    /// The peer links could not start: a config error (exit 64) when
    /// [`PeerError::is_config`](crate::peer::PeerError::is_config).
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    /// The OTLP exporter (`telemetry.otlp_endpoint`) could not be built.
    #[error("telemetry.otlp_endpoint: {0}")]
    Telemetry(#[from] tether_runtime::telemetry::TelemetryError),
}

impl GatewayError {
    /// True when the operator's configuration is at fault (exit 64): a bad key, TLS material
    /// that cannot load, or a PostgreSQL refusal that names a `store.*` key.
    pub fn is_config(&self) -> bool {
        match self {
            GatewayError::Config(_)
            | GatewayError::TlsMaterial(_)
            | GatewayError::Tls(_)
            | GatewayError::Telemetry(_) => true,
            GatewayError::Cluster(e) => e.is_config(),
            GatewayError::Peer(e) => e.is_config(),
            _ => false,
        }
    }
}
