//! Backend: the PostgreSQL connection pool and the schema's migrations.
//!
//! Migrations are SQL files in `gateway/migrations/`, compiled into the binary and applied at
//! start by sqlx's migrator, which holds a PostgreSQL advisory lock while it runs: one replica
//! migrates, the others wait for it, then find nothing to do. A database whose schema is newer
//! than this binary knows is refused before anything touches it.

use std::borrow::Cow;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

use crate::config::{SslMode, StoreConfig, redact_dsn};

/// The schema, in order. A released migration is never edited: add one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "cluster",
        include_str!("../../migrations/0001_cluster.sql"),
    ),
    (
        2,
        "replica_sessions",
        include_str!("../../migrations/0002_replica_sessions.sql"),
    ),
    (
        3,
        "awaiting_approval",
        include_str!("../../migrations/0003_awaiting_approval.sql"),
    ),
];

/// The newest schema version this binary knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Why the store could not be used. Each says what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The configuration cannot work (operator's to fix; exit 64).
    #[error("{key}: {message}")]
    Config {
        /// The key to fix.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// PostgreSQL could not be reached within `store.connect_timeout`.
    #[error(
        "cannot reach PostgreSQL at {target} within {waited:?} (store.connect_timeout): {source}; \
         check that the server runs, the host and port in store.dsn, and the network between"
    )]
    Unreachable {
        /// host:port/database.
        target: String,
        /// How long start-up tried.
        waited: Duration,
        /// The last error.
        source: sqlx::Error,
    },
    /// The database's schema is newer than this binary.
    #[error(
        "the database's schema is version {database}, newer than this binary's {binary} \
         (tether-gateway {release}): run a gateway release that knows schema {database} (every \
         replica must be at least as new as the schema), or restore the database"
    )]
    SchemaTooNew {
        /// What the database has.
        database: i64,
        /// What this binary knows.
        binary: i64,
        /// This binary's version.
        release: &'static str,
    },
    /// A migration failed.
    #[error("migrating the PostgreSQL schema failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("PostgreSQL: {0}")]
    Query(#[from] sqlx::Error),
}

impl DbError {
    /// True when the operator's configuration is at fault (exit 64).
    pub fn is_config(&self) -> bool {
        matches!(self, DbError::Config { .. })
    }
}

/// The connection options `cfg` describes (the password file read, `sslmode` and `ca_file`
/// applied over the DSN's).
pub fn connect_options(cfg: &StoreConfig) -> Result<PgConnectOptions, DbError> {
    let dsn = cfg.dsn.as_deref().ok_or(DbError::Config {
        key: "store.dsn",
        message: "is not set".into(),
    })?;
    crate::config::check_dsn(dsn).map_err(|message| DbError::Config {
        key: "store.dsn",
        message,
    })?;
    let mut opts = PgConnectOptions::from_str(dsn).map_err(|e| DbError::Config {
        key: "store.dsn",
        message: format!("{}: {e}", redact_dsn(dsn)),
    })?;
    if let Some(file) = &cfg.password_file {
        let pw = std::fs::read_to_string(file).map_err(|e| DbError::Config {
            key: "store.password_file",
            message: format!("cannot read {}: {e}", file.display()),
        })?;
        let pw = pw.trim_end_matches(['\n', '\r']);
        if pw.is_empty() {
            return Err(DbError::Config {
                key: "store.password_file",
                message: format!("{} is empty", file.display()),
            });
        }
        opts = opts.password(pw);
    }
    if let Some(mode) = cfg.sslmode {
        opts = opts.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    }
    if let Some(ca) = &cfg.ca_file {
        if !ca.is_file() {
            return Err(DbError::Config {
                key: "store.ca_file",
                message: format!("{} is not a readable file", ca.display()),
            });
        }
        opts = opts.ssl_root_cert(ca);
    }
    let statement_ms = cfg.statement_timeout.as_millis().to_string();
    Ok(opts
        .application_name("tether-gateway")
        .options([("statement_timeout", statement_ms.as_str())]))
}

/// `host:port/database` of `opts`, for messages (no user, no password).
pub fn target(opts: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("")
    )
}

/// Opens the pool: retries while PostgreSQL is unreachable, up to `store.connect_timeout`,
/// and fails at once on what retrying cannot fix (a refused password, a missing database).
pub async fn connect(cfg: &StoreConfig) -> Result<PgPool, DbError> {
    let opts = connect_options(cfg)?;
    let target = target(&opts);
    let start = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(cfg.pool_size)
            .acquire_timeout(cfg.connect_timeout.min(Duration::from_secs(10)))
            .connect_with(opts.clone())
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e) => {
                if let Some(config) = refusal(&e, &opts) {
                    return Err(config);
                }
                if start.elapsed() + wait > cfg.connect_timeout {
                    return Err(DbError::Unreachable {
                        target,
                        waited: start.elapsed(),
                        source: e,
                    });
                }
                tracing::warn!(%target, error = %e, retry_in = ?wait, "PostgreSQL not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A connection error that retrying cannot fix, as the config error it is.
fn refusal(e: &sqlx::Error, opts: &PgConnectOptions) -> Option<DbError> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let user = opts.get_username();
    let (key, message) = match db.code().as_deref() {
        // invalid_password, invalid_authorization_specification
        Some("28P01") | Some("28000") => (
            "store.dsn",
            format!(
                "PostgreSQL at {} refused user {user:?}: {} (check the user and the password in \
                 store.dsn or store.password_file)",
                target(opts),
                db.message()
            ),
        ),
        // invalid_catalog_name: the database does not exist
        Some("3D000") => (
            "store.dsn",
            format!(
                "{} (create the database, or name an existing one in store.dsn)",
                db.message()
            ),
        ),
        _ => return None,
    };
    Some(DbError::Config { key, message })
}

/// Brings the schema to this binary's version under PostgreSQL's advisory lock (concurrent
/// replicas wait for the first), refusing a database whose schema is newer.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let applied: Option<i64> =
        match sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
        {
            Ok(v) => v,
            // No migrations table yet: an empty database.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => None,
            Err(e) => return Err(e.into()),
        };
    if let Some(v) = applied
        && v > schema_version()
    {
        return Err(DbError::SchemaTooNew {
            database: v,
            binary: schema_version(),
            release: env!("CARGO_PKG_VERSION"),
        });
    }
    let migrations: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*name),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(*sql),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations).run(pool).await?;
    Ok(())
}

/// The schema version applied in the database (0: none).
pub async fn applied_version(pool: &PgPool) -> Result<i64, DbError> {
    let v: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    Ok(v.unwrap_or(0))
}
