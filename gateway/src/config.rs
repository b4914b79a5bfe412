//! The gateway's configuration: TOML file, `TETHER_*` environment, `--set` flags.
//!
//! ```toml
//! trust_domain = "tether.local"
//! [tls]                       # paths are relative to this file
//! ca = "pki/ca.pem"           # trusted for agent and control-plane client certificates; may
//!                             # hold several CAs (old and new during a CA rotation)
//! cert = "pki/gateway.pem"
//! key = "pki/gateway-key.pem"
//! [tunnel]
//! listen = "0.0.0.0:7443"     # UDP (QUIC)
//! heartbeat_interval = "10s"
//! handshake_timeout = "10s"
//! drain_timeout = "15s"
//! fair_share_margin = 0.25    # refuse new sessions above the fleet's mean per replica by this
//! rebalance_interval = "30s"  # ask agents above the share to move, at most this often; 0s: never
//! [northbound]
//! listen = "0.0.0.0:7444"     # gRPC over TLS, and the web console at /ui/
//! console_session_ttl = "8h"  # how long a console login lasts
//! [ops]
//! listen = "127.0.0.1:9090"   # /metrics /healthz /readyz
//! [log]
//! format = "text"             # or json
//! level = "info"
//! [commands]
//! max_payload = 4194304       # bytes
//! max_attempts = 10           # deliveries before a command fails
//! retry_backoff = "200ms"     # doubled per failed delivery, capped at max_retry_backoff
//! max_retry_backoff = "30s"
//! max_in_flight = 256         # concurrent deliveries per agent
//! max_output = 1048576        # bytes of result output an agent may report per command
//! retention = "7d"            # finished commands are deleted this long after they finished
//! retention_max = 1000000     # ...or sooner, oldest first, beyond this many
//! [enrollment]                # agents enroll with a token on the tunnel's TCP port
//! ca_key = "pki/ca-key.pem"   # signs enrollments and renewals; unset: both are off
//! # ca_cert = "pki/ca.pem"    # holds the certificate of ca_key (found by key); default tls.ca
//! cert_ttl = "24h"            # lifetime of enrolled and renewed agents' certificates
//! token_ttl = "1h"            # default lifetime of a token
//! max_token_ttl = "7d"
//! [limits]                    # against abuse; each refusal counted in
//!                             # tether_gateway_limit_rejections_total{limit}
//! streams_per_agent = 1024    # relayed calls + TCP streams in flight to one agent
//! pending_commands_per_agent = 10000 # commands not yet final, per agent
//! command_watches_per_caller = 64 # Commands/Watch streams one caller holds open
//! agent_watches_per_caller = 64 # Agents/Watch streams one caller holds open
//! max_message_size = 4194304  # northbound gRPC messages (tether.v1.*), each way
//! max_header_list_size = 16384 # northbound HTTP/2 request headers
//! max_control_message = 65536 # a frame on an agent's control stream
//! northbound_handshake_timeout = "10s" # a northbound TLS handshake
//! northbound_idle_timeout = "5m" # a northbound connection with no call open
//! northbound_unauthenticated_timeout = "10s" # a northbound connection with no caller
//!                             # authenticated on it yet
//! northbound_connections = 4096 # northbound connections open at once, in total
//! northbound_connections_per_address = 256 # ...and from one source address
//! sessions_per_agent = 8      # tunnel connections of one agent identity, all its instances
//! handshakes_per_second = 50  # new tunnel handshakes per source address (token bucket)
//! handshake_burst = 100
//! retry_above = 1000          # gateway-wide QUIC handshakes/s above which QUIC Retry
//!                             # validates source addresses first
//! new_sessions_per_second = 1000 # sessions this gateway admits per second; beyond it agents
//!                             # are turned away with a retry-after (0: no budget)
//! pending_tokens_per_agent = 16 # enrollment tokens pending at once for one agent
//! token_creations_per_minute = 60 # CreateToken calls per caller
//! [auth]                      # without it: every control-plane caller may act for every tenant
//! jwks_file = "jwks.json"     # or jwks_url = "https://idp.example.com/.well-known/jwks.json"
//! issuer = "https://idp.example.com/"
//! audience = "tether"
//! tenant_claim = "tenants"    # a string or an array of strings in the token
//! [[auth.callers]]            # mTLS caller spiffe://<td>/controlplane/billing
//! name = "billing"
//! tenants = ["acme", "globex"] # or ["*"] for every tenant
//! [[auth.callers]]            # a JWT subject: its tenant claim, intersected with these
//! name = "svc-deployer"
//! kind = "jwt"
//! tenants = ["acme"]
//! ```
//!
//! `data_dir` (top level, default `data` next to the config file) holds the command store
//! (`commands.redb`) and the identity store (`identity.redb`: revocations, enrollment tokens).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_runtime::config::{ConfigError, Keys, Validate};
pub use tether_runtime::logging::LogConfig;
/// Certificates and keys (PEM files): `[tls] ca cert key`.
pub use tether_runtime::tls::TlsFiles as TlsConfig;

/// Every key, for the environment and `--set`.
pub const KEYS: Keys = &[
    "trust_domain",
    "tls.ca",
    "tls.cert",
    "tls.key",
    "tunnel.listen",
    "tunnel.heartbeat_interval",
    "tunnel.handshake_timeout",
    "tunnel.drain_timeout",
    "tunnel.max_concurrent_streams",
    "tunnel.tcp_fallback",
    "tunnel.probe_interval",
    "tunnel.probe_timeout",
    "tunnel.fair_share_margin",
    "tunnel.rebalance_interval",
    "northbound.listen",
    "northbound.console_session_ttl",
    "ops.listen",
    "log.format",
    "log.level",
    "data_dir",
    "commands.max_payload",
    "commands.max_attempts",
    "commands.retry_backoff",
    "commands.max_retry_backoff",
    "commands.max_in_flight",
    "commands.max_output",
    "commands.retention",
    "commands.retention_max",
    "enrollment.ca_key",
    "enrollment.ca_cert",
    "enrollment.cert_ttl",
    "enrollment.token_ttl",
    "enrollment.max_token_ttl",
    "limits.streams_per_agent",
    "limits.pending_commands_per_agent",
    "limits.command_watches_per_caller",
    "limits.agent_watches_per_caller",
    "limits.max_message_size",
    "limits.max_header_list_size",
    "limits.max_control_message",
    "limits.northbound_handshake_timeout",
    "limits.northbound_idle_timeout",
    "limits.handshakes_per_second",
    "limits.handshake_burst",
    "limits.retry_above",
    "limits.pending_tokens_per_agent",
    "limits.token_creations_per_minute",
    "limits.sessions_per_agent",
    "limits.northbound_connections",
    "limits.northbound_connections_per_address",
    "limits.northbound_unauthenticated_timeout",
    "limits.new_sessions_per_second",
    "auth.callers",
    "auth.jwks_file",
    "auth.jwks_url",
    "auth.jwks_ca",
    "auth.jwks_refresh",
    "auth.issuer",
    "auth.audience",
    "auth.tenant_claim",
    "auth.leeway",
    "store.dsn",
    "store.password_file",
    "store.sslmode",
    "store.ca_file",
    "store.pool_size",
    "store.connect_timeout",
    "store.statement_timeout",
    "cluster.replica_id",
    "cluster.advertise",
    "cluster.peer_listen",
    "cluster.heartbeat_interval",
    "cluster.liveness_timeout",
    "cluster.peer_cert",
    "cluster.peer_key",
    "cluster.peer_ca_key",
    "agents.min_version",
    "telemetry.otlp_endpoint",
    "telemetry.sample_ratio",
];

/// The whole gateway config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The SPIFFE trust domain agents and callers must belong to.
    pub trust_domain: String,
    /// Certificates and keys.
    pub tls: TlsConfig,
    /// The agent-facing listener.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// The control-plane-facing gRPC listener.
    #[serde(default)]
    pub northbound: NorthboundConfig,
    /// The ops HTTP listener.
    #[serde(default)]
    pub ops: OpsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Where durable state (the command store) lives; default `data` next to the config file
    /// (or in the working directory without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Durable commands.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// Agent enrollment with bootstrap tokens.
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    /// Limits against abuse.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Northbound caller authentication and tenant scoping. Without it every control-plane
    /// (mTLS) caller may act for every tenant and bearer tokens are not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Where durable state lives: PostgreSQL with `store.dsn` (replicas), else the embedded
    /// store in `data_dir` (one replica).
    #[serde(default)]
    pub store: StoreConfig,
    /// This replica among several (with `store.dsn`).
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Which agents may hold sessions.
    #[serde(default)]
    pub agents: AgentsConfig,
    /// OpenTelemetry traces of relayed calls and streams.
    #[serde(default)]
    pub telemetry: tether_runtime::telemetry::TelemetryConfig,
}

/// `[agents]`: which agents may hold sessions.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// The oldest agent version admitted (a semantic version, e.g. `"0.4.0"`): an agent
    /// announcing an older one (or none that parses) is refused at `Hello` with
    /// `UPGRADE_REQUIRED` and both versions. Unset: every version is admitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
}

impl AgentsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(v) = &self.min_version
            && let Err(e) = semver::Version::parse(v)
        {
            return Err(ConfigError::invalid(
                "agents.min_version",
                format!(
                    "{v:?} is not a semantic version ({e}): write it as MAJOR.MINOR.PATCH, e.g. \"0.4.0\""
                ),
            ));
        }
        Ok(())
    }
}

/// `[store]`: PostgreSQL for every durable thing (commands, identity, the cluster state), shared
/// by every replica. Without `dsn`, the embedded store in `data_dir` (one replica only).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user[:password]@host[:port]/database[?sslmode=…]` (env `TETHER_STORE_DSN`).
    /// Never logged with its password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn: Option<String>,
    /// A file holding the password (e.g. a mounted Secret); wins over one in `dsn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS to PostgreSQL, as libpq's `sslmode`: `disable`, `prefer`, `require`, `verify-ca`,
    /// `verify-full`; wins over the DSN's. Default: the DSN's, else `prefer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// CA bundle for `verify-ca`/`verify-full` (libpq's `sslrootcert`); default: the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Connections this replica keeps to PostgreSQL at most.
    pub pool_size: u32,
    /// How long start-up waits for PostgreSQL (retrying), and a connection attempt at most.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest a statement may run before PostgreSQL cancels it; a hung store fails a Submit
    /// instead of holding it.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dsn: None,
            password_file: None,
            sslmode: None,
            ca_file: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("dsn", &self.dsn.as_deref().map(redact_dsn))
            .field("password_file", &self.password_file)
            .field("sslmode", &self.sslmode)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

/// `dsn` with its password, if any, replaced by `***` (for logs and errors).
pub fn redact_dsn(dsn: &str) -> String {
    // postgres://user:password@host…: the password is between the first ':' after the scheme
    // and the last '@' of the authority.
    let Some((scheme, rest)) = dsn.split_once("://") else {
        return dsn.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => dsn.to_owned(),
        },
        None => dsn.to_owned(),
    }
}

/// Checks `dsn` is a PostgreSQL URL; the error never shows its password.
pub fn check_dsn(dsn: &str) -> Result<(), String> {
    let scheme_ok = dsn.starts_with("postgres://") || dsn.starts_with("postgresql://");
    let parsed = dsn.parse::<sqlx::postgres::PgConnectOptions>();
    match (scheme_ok, parsed) {
        (true, Ok(_)) => Ok(()),
        (_, Err(e)) => Err(format!(
            "{} is not a PostgreSQL URL (postgres://user@host:5432/database): {e}",
            redact_dsn(dsn)
        )),
        (false, Ok(_)) => Err(format!(
            "{} is not a PostgreSQL URL: it must start with postgres:// (postgres://user@host:5432/database)",
            redact_dsn(dsn)
        )),
    }
}

/// libpq's `sslmode` values Tether supports.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, unverified.
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the server's certificate chained to `store.ca_file` (or the system's roots).
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host.
    VerifyFull,
}

/// `[cluster]`: this replica among the gateway's replicas (used with `store.dsn`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This replica's name, unique in the cluster; default: the host name (a pod's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// `host:port` other replicas dial this one's peer listener at; default: the host name
    /// and `peer_listen`'s port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The peer listener (replica to replica): QUIC over UDP, mutual TLS with `peer_cert`.
    pub peer_listen: SocketAddr,
    /// This replica's peer certificate (PEM), identity `spiffe://<trust_domain>/gateway/<replica_id>`
    /// (`tether-gateway pki issue-gateway`). With `peer_key` it turns on the peer links: calls
    /// that land here for an agent whose sessions are on other replicas are forwarded there.
    /// Without them a replica serves only the agents connected to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_cert: Option<PathBuf>,
    /// The private key of `peer_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_key: Option<PathBuf>,
    /// Instead of `peer_cert` and `peer_key`: the key of a CA whose certificate is in `tls.ca`.
    /// At start the replica issues itself a peer certificate for its own identity (valid a
    /// year, kept in memory only), so that every replica of a fleet gets its identity without
    /// a certificate per replica (what the Helm chart does). It also turns on the peer links.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_ca_key: Option<PathBuf>,
    /// How often this replica renews its liveness in PostgreSQL (jittered ±20%).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A replica whose liveness is older than this is dead for every purpose (its command
    /// leases are taken over, its sessions ignored); it also stops delivering commands itself
    /// once it could not renew for this long.
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replica_id: None,
            advertise: None,
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 7445)),
            peer_cert: None,
            peer_key: None,
            peer_ca_key: None,
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(6),
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(dsn) = &self.dsn {
            check_dsn(dsn).map_err(|e| ConfigError::invalid("store.dsn", e))?;
        } else {
            for (key, set) in [
                ("store.password_file", self.password_file.is_some()),
                ("store.sslmode", self.sslmode.is_some()),
                ("store.ca_file", self.ca_file.is_some()),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        key,
                        "is set but store.dsn is not: set store.dsn (PostgreSQL) or remove it",
                    ));
                }
            }
        }
        if self.pool_size < 2 {
            return Err(ConfigError::invalid(
                "store.pool_size",
                "must be at least 2 (one connection listens for notifications)",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "store.connect_timeout",
                "must be positive",
            ));
        }
        if self.statement_timeout < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "store.statement_timeout",
                "must be at least 100ms",
            ));
        }
        Ok(())
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.replica_id {
            check_replica_id(id).map_err(|e| ConfigError::invalid("cluster.replica_id", e))?;
        }
        match (&self.peer_cert, &self.peer_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "cluster.peer_key",
                    "must be set with cluster.peer_cert (the key of the peer certificate)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "cluster.peer_cert",
                    "must be set with cluster.peer_key (tether-gateway pki issue-gateway writes both)",
                ));
            }
            _ => {}
        }
        if self.peer_ca_key.is_some() && self.peer_cert.is_some() {
            return Err(ConfigError::invalid(
                "cluster.peer_ca_key",
                "set either cluster.peer_ca_key (the replica issues its own peer certificate) or cluster.peer_cert and cluster.peer_key, not both",
            ));
        }
        if let Some(a) = &self.advertise
            && a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(ConfigError::invalid(
                "cluster.advertise",
                format!("{a:?} is not host:port"),
            ));
        }
        if self.heartbeat_interval < Duration::from_millis(50) {
            return Err(ConfigError::invalid(
                "cluster.heartbeat_interval",
                "must be at least 50ms",
            ));
        }
        if self.liveness_timeout < self.heartbeat_interval * 3 {
            return Err(ConfigError::invalid(
                "cluster.liveness_timeout",
                "must be at least 3 times cluster.heartbeat_interval (a replica must survive a lost heartbeat or two)",
            ));
        }
        Ok(())
    }

    /// `replica_id`, else the host name.
    pub fn replica_id(&self) -> String {
        self.replica_id.clone().unwrap_or_else(host_name)
    }

    /// `advertise`, else the host name and `peer_listen`'s port.
    pub fn advertise(&self) -> String {
        self.advertise_for(self.peer_listen)
    }

    /// Where peers dial this replica once its peer listener is bound at `bound`: `advertise`
    /// (its port 0 meaning `bound`'s port); without it, `bound` when it is a specific address,
    /// else the host name and `bound`'s port.
    pub fn advertise_for(&self, bound: SocketAddr) -> String {
        match &self.advertise {
            Some(a) => match a.rsplit_once(':') {
                Some((host, "0")) => format!("{host}:{}", bound.port()),
                _ => a.clone(),
            },
            None if !bound.ip().is_unspecified() => bound.to_string(),
            None => format!("{}:{}", host_name(), bound.port()),
        }
    }

    /// True when this replica runs peer links (`peer_cert` and `peer_key` set, or
    /// `peer_ca_key`).
    pub fn peer_links(&self) -> bool {
        (self.peer_cert.is_some() && self.peer_key.is_some()) || self.peer_ca_key.is_some()
    }
}

/// A replica id: 1 to 128 characters of `[A-Za-z0-9._-]` (it names the replica in URIs and
/// metric labels).
pub fn check_replica_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("{id:?} must be 1 to 128 characters"));
    }
    if id == "." || id == ".." {
        return Err(format!(
            "{id:?} cannot name a replica (it is a path segment in the replica's identity URI)"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{id:?} has {c:?}: use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// The host name (`$HOSTNAME`, else the kernel's), or `gateway` when neither is usable.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|h| check_replica_id(h).is_ok())
        .unwrap_or_else(|| "gateway".to_owned())
}

/// `[limits]`: bounds on what one agent, caller or source address can make the gateway hold
/// or do. Each refusal is counted in `tether_gateway_limit_rejections_total{limit}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Relayed calls and TCP streams in flight to one agent (all its sessions together); beyond
    /// it a call is RESOURCE_EXHAUSTED at once.
    pub streams_per_agent: u32,
    /// Commands of one agent not yet in a final state; beyond it Submit is RESOURCE_EXHAUSTED
    /// and nothing is stored.
    pub pending_commands_per_agent: u32,
    /// `Commands/Watch` streams one northbound caller (a certificate's name or a token's
    /// subject) holds open at once; beyond it Watch is RESOURCE_EXHAUSTED.
    pub command_watches_per_caller: u32,
    /// `Agents/Watch` streams one northbound caller holds open at once; beyond it Watch is
    /// RESOURCE_EXHAUSTED.
    pub agent_watches_per_caller: u32,
    /// Largest northbound gRPC message (`tether.v1.*` services), received or sent, in bytes;
    /// `Commands` allows at least `commands.max_payload`.
    pub max_message_size: u64,
    /// Largest HTTP/2 request header list (names, values and 32 bytes each) a northbound call
    /// may carry; above it RESOURCE_EXHAUSTED (and, at twice it, HTTP/2's own refusal). The
    /// tunnel's TCP fallback carries no metadata in headers and caps them at 16 KiB.
    pub max_header_list_size: u32,
    /// Largest frame accepted on an agent's control stream, in bytes (announced in `Welcome`).
    pub max_control_message: u32,
    /// Time a northbound caller has to complete TLS.
    #[serde(with = "humantime_serde")]
    pub northbound_handshake_timeout: Duration,
    /// A northbound connection with no call open for this long is closed (gracefully: the
    /// client reconnects on its next call); this also ends a connection that never sends one.
    #[serde(with = "humantime_serde")]
    pub northbound_idle_timeout: Duration,
    /// New tunnel handshakes per second per source IP address (refilled continuously); beyond
    /// it, and the burst, a connection is refused before any cryptography.
    pub handshakes_per_second: u32,
    /// Handshakes one source address may start at once before `handshakes_per_second` paces it.
    pub handshake_burst: u32,
    /// Gateway-wide new QUIC handshakes per second above which an Initial from an unvalidated
    /// address is answered with a stateless Retry (proof of address, one extra round trip)
    /// instead of a handshake; 0: always.
    pub retry_above: u32,
    /// Enrollment tokens of one agent pending (not used, not expired) at once; beyond it
    /// `CreateToken` is RESOURCE_EXHAUSTED.
    pub pending_tokens_per_agent: u32,
    /// `CreateToken` calls per minute per caller (a token bucket with a burst as large);
    /// beyond it RESOURCE_EXHAUSTED.
    pub token_creations_per_minute: u32,
    /// Tunnel connections one agent identity may hold on this gateway, all its instances and
    /// transports together, counted from the TLS handshake to the connection's end; beyond it
    /// a connection is closed with `TOO_MANY_SESSIONS`. Leaves room for make-before-break: each
    /// instance briefly holds one more session per gateway address while it moves.
    pub sessions_per_agent: u32,
    /// Northbound connections open at once; beyond it a new one is closed at once, before TLS.
    /// Keep it below the process's open-file limit, leaving room for agents on the TCP
    /// fallback.
    pub northbound_connections: u32,
    /// Northbound connections open at once from one source IP address.
    pub northbound_connections_per_address: u32,
    /// A northbound connection on which no call has passed authentication this long after its
    /// TLS handshake is closed. With bearer tokens on, TLS lets anyone in without a
    /// certificate: this bounds how long they hold a connection, where
    /// `northbound_idle_timeout` is for callers the gateway knows.
    #[serde(with = "humantime_serde")]
    pub northbound_unauthenticated_timeout: Duration,
    /// New agent sessions this gateway admits per second (its handshake budget, counted over
    /// the current and the last second); beyond it a session is turned away before it is
    /// registered (`BUSY`, with a retry-after that grows with the excess, which agents honour
    /// with jitter), so a reconnect storm is spread out instead of piling up. 0: no budget.
    pub new_sessions_per_second: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            streams_per_agent: 1024,
            pending_commands_per_agent: 10_000,
            command_watches_per_caller: 64,
            agent_watches_per_caller: 64,
            max_message_size: 4 << 20,
            max_header_list_size: 16 << 10,
            max_control_message: 64 << 10,
            northbound_handshake_timeout: Duration::from_secs(10),
            northbound_idle_timeout: Duration::from_secs(300),
            handshakes_per_second: 50,
            handshake_burst: 100,
            retry_above: 1000,
            pending_tokens_per_agent: 16,
            token_creations_per_minute: 60,
            sessions_per_agent: 8,
            northbound_connections: 4096,
            northbound_connections_per_address: 256,
            northbound_unauthenticated_timeout: Duration::from_secs(10),
            new_sessions_per_second: 1000,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |key: &str, v: u64, min: u64| {
            if v < min {
                Err(ConfigError::invalid(key, format!("must be at least {min}")))
            } else {
                Ok(())
            }
        };
        at_least("limits.streams_per_agent", self.streams_per_agent.into(), 1)?;
        at_least(
            "limits.pending_commands_per_agent",
            self.pending_commands_per_agent.into(),
            1,
        )?;
        at_least(
            "limits.command_watches_per_caller",
            self.command_watches_per_caller.into(),
            1,
        )?;
        at_least(
            "limits.agent_watches_per_caller",
            self.agent_watches_per_caller.into(),
            1,
        )?;
        at_least("limits.max_message_size", self.max_message_size, 1024)?;
        at_least(
            "limits.max_header_list_size",
            self.max_header_list_size.into(),
            1024,
        )?;
        at_least(
            "limits.max_control_message",
            self.max_control_message.into(),
            1024,
        )?;
        if self.max_control_message > 16 << 20 {
            return Err(ConfigError::invalid(
                "limits.max_control_message",
                "must be at most 16777216",
            ));
        }
        at_least(
            "limits.handshakes_per_second",
            self.handshakes_per_second.into(),
            1,
        )?;
        at_least("limits.handshake_burst", self.handshake_burst.into(), 1)?;
        at_least(
            "limits.pending_tokens_per_agent",
            self.pending_tokens_per_agent.into(),
            1,
        )?;
        at_least(
            "limits.token_creations_per_minute",
            self.token_creations_per_minute.into(),
            1,
        )?;
        at_least(
            "limits.sessions_per_agent",
            self.sessions_per_agent.into(),
            1,
        )?;
        at_least(
            "limits.northbound_connections",
            self.northbound_connections.into(),
            1,
        )?;
        at_least(
            "limits.northbound_connections_per_address",
            self.northbound_connections_per_address.into(),
            1,
        )?;
        for (key, d) in [
            (
                "limits.northbound_handshake_timeout",
                self.northbound_handshake_timeout,
            ),
            (
                "limits.northbound_idle_timeout",
                self.northbound_idle_timeout,
            ),
            (
                "limits.northbound_unauthenticated_timeout",
                self.northbound_unauthenticated_timeout,
            ),
        ] {
            if d < Duration::from_millis(100) {
                return Err(ConfigError::invalid(key, "must be at least 100ms"));
            }
        }
        Ok(())
    }
}

/// `[auth]`: who may call the northbound API and for which tenants.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The tenants of each mTLS caller (by the `<name>` of `spiffe://<td>/controlplane/<name>`)
    /// and, optionally, of each JWT subject. An mTLS caller not listed is refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<CallerPolicy>,
    /// A JWKS (JSON Web Key Set) file with the keys bearer tokens are signed with; re-read when
    /// it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`https://`, or `http://` on a loopback address), fetched at start, every
    /// `jwks_refresh`, and when a token names a key id the gateway does not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// CA bundle for the `jwks_url` server; default: the system's trust store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_ca: Option<PathBuf>,
    /// How often `jwks_url` is fetched again.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// The `iss` every token must carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The audience (`aud`) every token must include.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// The claim listing the tenants a token may act for (a string or an array of strings).
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            callers: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_ca: None,
            jwks_refresh: Duration::from_secs(300),
            issuer: None,
            audience: None,
            tenant_claim: "tenants".into(),
            leeway: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// True when bearer tokens are accepted.
    pub fn jwt_enabled(&self) -> bool {
        self.jwks_file.is_some() || self.jwks_url.is_some()
    }
}

/// One `[[auth.callers]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallerPolicy {
    /// The mTLS caller's name, or the JWT's `sub`.
    pub name: String,
    /// Which kind of caller `name` is.
    #[serde(default)]
    pub kind: PolicyKind,
    /// Tenants it may act for; `["*"]` for all of them (mTLS callers only).
    pub tenants: Vec<String>,
}

/// How a `[[auth.callers]]` entry's caller authenticates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// A client certificate `spiffe://<td>/controlplane/<name>`.
    #[default]
    Mtls,
    /// A bearer token whose `sub` is `name`: its tenants are the token's tenant claim
    /// intersected with this entry's.
    Jwt,
}

/// `[enrollment]`: tokens and the certificates they are redeemed for.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    /// The CA's private key (PEM) enrolled and renewed agents' certificates are signed with;
    /// unset: enrollment and renewal are off (`CreateToken` is FAILED_PRECONDITION). Its CA
    /// must be one of `tls.ca`'s; during a CA rotation, the new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<PathBuf>,
    /// A PEM file holding the certificate of `ca_key` (found by its key, so a bundle of old
    /// and new CA will do); default `tls.ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Lifetime of an enrolled or renewed agent's certificate (agents renew at two thirds).
    #[serde(with = "humantime_serde")]
    pub cert_ttl: Duration,
    /// Lifetime of a token when `CreateToken` gives none.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Longest lifetime `CreateToken` may ask for.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        EnrollmentConfig {
            ca_key: None,
            ca_cert: None,
            cert_ttl: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(3600),
            max_token_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Durable commands: limits and redelivery.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Largest payload a Submit may carry, in bytes.
    pub max_payload: u64,
    /// Deliveries (first one included) before a command whose stream keeps failing is Failed.
    pub max_attempts: u32,
    /// Wait before the first redelivery; doubled each time.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Cap of the redelivery wait.
    #[serde(with = "humantime_serde")]
    pub max_retry_backoff: Duration,
    /// Commands delivered to one agent at the same time (one per ordering key at most); keep it
    /// below `tunnel.max_concurrent_streams` so relayed calls always find a stream.
    pub max_in_flight: u32,
    /// Largest result output an agent may report for one command, in bytes; a larger one ends
    /// the command Failed. The gateway holds an output in memory until it is stored (at most
    /// `max_in_flight` of them per agent) and keeps it for `retention`, so this bounds what an
    /// agent can make it hold. Agents are told the limit with each delivery.
    pub max_output: u64,
    /// Finished commands (with their payload, output and idempotency key) are deleted this long
    /// after they finished.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// At most this many finished commands are kept: beyond it the oldest finished are deleted
    /// sooner than `retention`.
    pub retention_max: u64,
}

/// The largest `commands.max_output`: what one delivery may make the gateway buffer.
pub const MAX_OUTPUT_CEILING: u64 = 64 << 20;

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            max_payload: 4 << 20,
            max_attempts: 10,
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(30),
            max_in_flight: 256,
            max_output: 1 << 20,
            retention: Duration::from_secs(7 * 24 * 3600),
            retention_max: 1_000_000,
        }
    }
}

/// The agent-facing QUIC listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    /// Heartbeat interval announced to agents; 3 missed intervals end a session.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Time allowed for TLS plus `Hello`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// On shutdown, how long agents get to move away after `GoAway` before sessions are closed.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Gateway-opened streams an agent must accept concurrently.
    pub max_concurrent_streams: u32,
    /// Also listen on TCP, same address and port, for agents whose network blocks UDP (TLS +
    /// HTTP/2, the agent as HTTP/2 server).
    pub tcp_fallback: bool,
    /// How often each session is probed end to end (a stream opened, answered by the agent);
    /// a session whose probe fails is closed even if its connection looks alive. Each probe goes
    /// out with the answer to the heartbeat nearest its due time (up to half a heartbeat
    /// interval, or half this interval when shorter, early or late), written in the same turn
    /// of the session task, so that it usually shares that answer's packet.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long a probe may take.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// With replicas: a replica holding more than the fleet's mean sessions per live replica
    /// times `1 + fair_share_margin` (plus 2) turns new sessions away (`BUSY`, retry-after) from
    /// agents that hold a session elsewhere; an agent with none is always admitted.
    pub fair_share_margin: f64,
    /// With replicas: how often a replica above its share (as above) asks some of its agents to
    /// move (`GoAway` of kind `rebalance`, make-before-break), at most a twentieth of its
    /// sessions each time: how the fleet evens out after a scale-out. 0s: never.
    #[serde(with = "humantime_serde")]
    pub rebalance_interval: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            listen: ([0, 0, 0, 0], 7443).into(),
            heartbeat_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            max_concurrent_streams: 1024,
            tcp_fallback: true,
            probe_interval: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(10),
            fair_share_margin: 0.25,
            rebalance_interval: Duration::from_secs(30),
        }
    }
}

/// The northbound gRPC listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NorthboundConfig {
    /// TCP address.
    pub listen: SocketAddr,
    /// How long a console session (the cookie a login link sets) lasts.
    #[serde(with = "humantime_serde")]
    pub console_session_ttl: Duration,
}

impl Default for NorthboundConfig {
    fn default() -> Self {
        NorthboundConfig {
            listen: ([0, 0, 0, 0], 7444).into(),
            console_session_ttl: Duration::from_secs(8 * 3600),
        }
    }
}

/// The ops HTTP listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// TCP address; loopback by default.
    pub listen: SocketAddr,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: ([127, 0, 0, 1], 9090).into(),
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        tunnel_proto::identity::check_trust_domain(&self.trust_domain)
            .map_err(|e| ConfigError::invalid("trust_domain", e.to_string()))?;
        let t = &self.tunnel;
        if t.heartbeat_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "tunnel.heartbeat_interval",
                "must be at least 100ms",
            ));
        }
        if t.handshake_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "tunnel.handshake_timeout",
                "must be positive",
            ));
        }
        if t.probe_interval.is_zero() {
            return Err(ConfigError::invalid(
                "tunnel.probe_interval",
                "must be positive",
            ));
        }
        if t.probe_timeout.is_zero() || t.probe_timeout > t.probe_interval {
            return Err(ConfigError::invalid(
                "tunnel.probe_timeout",
                "must be positive and at most tunnel.probe_interval",
            ));
        }
        if !(0.0..=10.0).contains(&t.fair_share_margin) {
            return Err(ConfigError::invalid(
                "tunnel.fair_share_margin",
                "must be between 0 and 10 (a fraction of the mean: 0.25 is 25% above it)",
            ));
        }
        if !t.rebalance_interval.is_zero() && t.rebalance_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "tunnel.rebalance_interval",
                "must be 0s (never) or at least 1s",
            ));
        }
        if self.commands.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "commands.max_attempts",
                "must be at least 1",
            ));
        }
        if self.commands.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "commands.max_in_flight",
                "must be at least 1",
            ));
        }
        if self.commands.max_payload == 0 {
            return Err(ConfigError::invalid(
                "commands.max_payload",
                "must be at least 1",
            ));
        }
        if self.commands.max_output == 0 || self.commands.max_output > MAX_OUTPUT_CEILING {
            return Err(ConfigError::invalid(
                "commands.max_output",
                format!("must be between 1 and {MAX_OUTPUT_CEILING} bytes"),
            ));
        }
        if self.commands.retention < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "commands.retention",
                "must be at least 1s",
            ));
        }
        if self.commands.retention_max == 0 {
            return Err(ConfigError::invalid(
                "commands.retention_max",
                "must be at least 1",
            ));
        }
        let e = &self.enrollment;
        // Seconds are for tests of renewal; agents renew at two thirds of the lifetime.
        if e.cert_ttl < Duration::from_secs(3) {
            return Err(ConfigError::invalid(
                "enrollment.cert_ttl",
                "must be at least 3s",
            ));
        }
        if e.token_ttl.is_zero() || e.token_ttl > e.max_token_ttl {
            return Err(ConfigError::invalid(
                "enrollment.token_ttl",
                "must be positive and at most enrollment.max_token_ttl",
            ));
        }
        if t.max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                "tunnel.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        self.limits.validate()?;
        self.store.validate()?;
        self.cluster.validate()?;
        self.agents.validate()?;
        if self.northbound.console_session_ttl.is_zero() {
            return Err(ConfigError::invalid(
                "northbound.console_session_ttl",
                "must be above zero (e.g. \"8h\")".to_owned(),
            ));
        }
        self.telemetry
            .check()
            .map_err(|(key, why)| ConfigError::invalid(&format!("telemetry.{key}"), why))?;
        if let Some(auth) = &self.auth {
            auth.validate()?;
        }
        Ok(())
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        use tunnel_proto::identity::check_name;
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.callers.iter().enumerate() {
            let key = |field: &str| format!("auth.callers[{i}].{field}");
            match c.kind {
                PolicyKind::Mtls => check_name("control-plane caller name", &c.name)
                    .map_err(|e| ConfigError::invalid(&key("name"), e.to_string()))?,
                PolicyKind::Jwt if c.name.is_empty() => {
                    return Err(ConfigError::invalid(&key("name"), "is empty"));
                }
                PolicyKind::Jwt => {}
            }
            if !seen.insert((c.kind, c.name.as_str())) {
                return Err(ConfigError::invalid(
                    &key("name"),
                    format!("{:?} is listed twice", c.name),
                ));
            }
            if c.tenants.is_empty() {
                return Err(ConfigError::invalid(
                    &key("tenants"),
                    "is empty: list tenants, or \"*\" for all of them",
                ));
            }
            if c.tenants.iter().any(|t| t == "*") {
                if c.tenants.len() > 1 {
                    return Err(ConfigError::invalid(
                        &key("tenants"),
                        "\"*\" (every tenant) must stand alone",
                    ));
                }
            } else {
                for t in &c.tenants {
                    check_name("tenant", t)
                        .map_err(|e| ConfigError::invalid(&key("tenants"), e.to_string()))?;
                }
            }
        }
        if self.jwks_file.is_some() && self.jwks_url.is_some() {
            return Err(ConfigError::invalid(
                "auth.jwks_url",
                "set auth.jwks_file or auth.jwks_url, not both",
            ));
        }
        if let Some(url) = &self.jwks_url {
            check_jwks_url(url).map_err(|e| ConfigError::invalid("auth.jwks_url", e))?;
        }
        if self.jwks_ca.is_some() && self.jwks_url.is_none() {
            return Err(ConfigError::invalid(
                "auth.jwks_ca",
                "is only used with auth.jwks_url",
            ));
        }
        if self.jwt_enabled() {
            for (key, v) in [
                ("auth.issuer", &self.issuer),
                ("auth.audience", &self.audience),
            ] {
                if v.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid(
                        key,
                        "is required when bearer tokens are accepted (auth.jwks_file or auth.jwks_url)",
                    ));
                }
            }
        } else {
            for (key, set) in [
                ("auth.issuer", self.issuer.is_some()),
                ("auth.audience", self.audience.is_some()),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        key,
                        "is set but no keys are: add auth.jwks_file or auth.jwks_url",
                    ));
                }
            }
            if let Some(c) = self.callers.iter().find(|c| c.kind == PolicyKind::Jwt) {
                return Err(ConfigError::invalid(
                    "auth.callers",
                    format!(
                        "{:?} is a jwt caller but no keys are configured: add auth.jwks_file or auth.jwks_url",
                        c.name
                    ),
                ));
            }
        }
        if self.tenant_claim.is_empty() {
            return Err(ConfigError::invalid("auth.tenant_claim", "is empty"));
        }
        if self.jwks_refresh < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "auth.jwks_refresh",
                "must be at least 100ms",
            ));
        }
        if self.leeway > Duration::from_secs(300) {
            return Err(ConfigError::invalid(
                "auth.leeway",
                "must be at most 5m: tokens outlive their expiry by this much",
            ));
        }
        Ok(())
    }
}

/// `https://host[:port]/path`, or `http://` to a loopback host (keys in clear text can be
/// swapped by anyone on the path).
fn check_jwks_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http")
            if host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()) =>
        {
            Ok(())
        }
        Some("http") => Err(format!(
            "{url:?}: http:// is only allowed to a loopback address; use https://"
        )),
        _ => Err(format!("{url:?} is not an https:// URL")),
    }
}

impl GatewayConfig {
    /// Loads file, environment and `--set` flags, then validates. Relative TLS paths are taken
    /// from the config file's directory.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<GatewayConfig, ConfigError> {
        let mut cfg: GatewayConfig =
            tether_runtime::config::load(KEYS, file, std::env::vars(), sets)?;
        let base = file.and_then(Path::parent);
        cfg.tls.resolve(base);
        if let Some(auth) = &mut cfg.auth {
            for p in [&mut auth.jwks_file, &mut auth.jwks_ca]
                .into_iter()
                .flatten()
            {
                *p = tether_runtime::config::resolve(base, p);
            }
        }
        let data = cfg.data_dir.take().unwrap_or_else(|| PathBuf::from("data"));
        cfg.data_dir = Some(tether_runtime::config::resolve(base, &data));
        for p in [
            &mut cfg.enrollment.ca_key,
            &mut cfg.enrollment.ca_cert,
            &mut cfg.store.password_file,
            &mut cfg.store.ca_file,
            &mut cfg.cluster.peer_cert,
            &mut cfg.cluster.peer_key,
            &mut cfg.cluster.peer_ca_key,
        ]
        .into_iter()
        .flatten()
        {
            *p = tether_runtime::config::resolve(base, p);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(auth: &str) -> Result<(), ConfigError> {
        let mut cfg: GatewayConfig =
            toml::from_str("trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
                .unwrap();
        cfg.auth =
            Some(toml::from_str(auth).map_err(|e| ConfigError::invalid("auth", e.to_string()))?);
        cfg.validate()
    }

    #[test]
    fn auth_errors_name_the_key() {
        let jwt = "jwks_file = \"j\"\nissuer = \"i\"\naudience = \"a\"\n";
        let cases = [
            (
                "[[callers]]\nname = \"b\"\ntenants = []\n",
                "auth.callers[0].tenants",
            ),
            (
                "[[callers]]\nname = \"b\"\ntenants = [\"*\", \"x\"]\n",
                "auth.callers[0].tenants",
            ),
            (
                "[[callers]]\nname = \"b\"\ntenants = [\"no/slash\"]\n",
                "auth.callers[0].tenants",
            ),
            (
                "[[callers]]\nname = \"bad name\"\ntenants = [\"x\"]\n",
                "auth.callers[0].name",
            ),
            (
                "[[callers]]\nname = \"b\"\ntenants = [\"x\"]\n[[callers]]\nname = \"b\"\ntenants = [\"y\"]\n",
                "auth.callers[1].name",
            ),
            (
                "[[callers]]\nname = \"s\"\nkind = \"jwt\"\ntenants = [\"x\"]\n",
                "auth.callers",
            ),
            ("issuer = \"i\"\n", "auth.issuer"),
            ("jwks_file = \"j\"\naudience = \"a\"\n", "auth.issuer"),
            ("jwks_file = \"j\"\nissuer = \"i\"\n", "auth.audience"),
            (
                "jwks_file = \"j\"\njwks_url = \"https://x/\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwks_url",
            ),
            (
                "jwks_url = \"http://idp.example.com/\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwks_url",
            ),
            (
                "jwks_url = \"ftp://idp/\"\nissuer = \"i\"\naudience = \"a\"\n",
                "auth.jwks_url",
            ),
            ("jwks_ca = \"ca.pem\"\n", "auth.jwks_ca"),
        ];
        for (auth, key) in cases {
            let e = with_auth(auth).expect_err(auth).to_string();
            assert!(e.contains(key), "{auth}: want {key} in {e}");
        }
        assert!(
            with_auth(&format!("{jwt}leeway = \"10m\"\n"))
                .unwrap_err()
                .to_string()
                .contains("auth.leeway")
        );
        with_auth(jwt).unwrap();
        with_auth("jwks_url = \"http://127.0.0.1:8080/jwks\"\nissuer = \"i\"\naudience = \"a\"\n")
            .unwrap();
        with_auth("jwks_url = \"http://[::1]:8080/jwks\"\nissuer = \"i\"\naudience = \"a\"\n")
            .unwrap();
        with_auth("[[callers]]\nname = \"b\"\ntenants = [\"*\"]\n").unwrap();
        with_auth(&format!("{jwt}[[callers]]\nname = \"b\"\ntenants = [\"x\"]\n[[callers]]\nname = \"b\"\nkind = \"jwt\"\ntenants = [\"x\"]\n")).unwrap();
    }

    #[test]
    fn commands_errors_name_the_key() {
        let base =
            "trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[commands]\n";
        for (commands, key) in [
            ("max_output = 0", "commands.max_output"),
            ("max_output = 67108865", "commands.max_output"),
            ("retention = \"500ms\"", "commands.retention"),
            ("retention_max = 0", "commands.retention_max"),
        ] {
            let cfg: GatewayConfig = toml::from_str(&format!("{base}{commands}\n")).unwrap();
            let e = cfg.validate().expect_err(commands).to_string();
            assert!(e.contains(key), "{commands}: want {key} in {e}");
        }
        let ok: GatewayConfig = toml::from_str(&format!(
            "{base}max_output = 67108864\nretention = \"30d\"\nretention_max = 1\n"
        ))
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.commands.retention, Duration::from_secs(30 * 24 * 3600));
    }

    #[test]
    fn limits_errors_name_the_key() {
        let base =
            "trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[limits]\n";
        for (limits, key) in [
            ("streams_per_agent = 0", "limits.streams_per_agent"),
            (
                "command_watches_per_caller = 0",
                "limits.command_watches_per_caller",
            ),
            (
                "agent_watches_per_caller = 0",
                "limits.agent_watches_per_caller",
            ),
            (
                "pending_commands_per_agent = 0",
                "limits.pending_commands_per_agent",
            ),
            ("max_message_size = 10", "limits.max_message_size"),
            ("max_header_list_size = 10", "limits.max_header_list_size"),
            (
                "max_control_message = 100000000",
                "limits.max_control_message",
            ),
            (
                "northbound_idle_timeout = \"1ms\"",
                "limits.northbound_idle_timeout",
            ),
            (
                "northbound_handshake_timeout = \"0s\"",
                "limits.northbound_handshake_timeout",
            ),
            ("handshakes_per_second = 0", "limits.handshakes_per_second"),
            ("handshake_burst = 0", "limits.handshake_burst"),
            (
                "pending_tokens_per_agent = 0",
                "limits.pending_tokens_per_agent",
            ),
            (
                "token_creations_per_minute = 0",
                "limits.token_creations_per_minute",
            ),
            ("sessions_per_agent = 0", "limits.sessions_per_agent"),
            (
                "northbound_connections = 0",
                "limits.northbound_connections",
            ),
            (
                "northbound_connections_per_address = 0",
                "limits.northbound_connections_per_address",
            ),
            (
                "northbound_unauthenticated_timeout = \"10ms\"",
                "limits.northbound_unauthenticated_timeout",
            ),
        ] {
            let cfg: GatewayConfig = toml::from_str(&format!("{base}{limits}\n")).unwrap();
            let e = cfg.validate().expect_err(limits).to_string();
            assert!(e.contains(key), "{limits}: want {key} in {e}");
        }
        let unknown = toml::from_str::<GatewayConfig>(&format!("{base}streams = 3\n"));
        assert!(unknown.unwrap_err().to_string().contains("streams"));
        let ok: GatewayConfig = toml::from_str(&format!("{base}retry_above = 0\n")).unwrap();
        ok.validate().unwrap();
    }

    #[test]
    fn every_serialized_key_is_listed() {
        let cfg = GatewayConfig {
            trust_domain: "td".into(),
            tls: TlsConfig {
                ca: "a".into(),
                cert: "b".into(),
                key: "c".into(),
            },
            tunnel: Default::default(),
            northbound: Default::default(),
            ops: Default::default(),
            log: Default::default(),
            data_dir: Some("d".into()),
            commands: Default::default(),
            limits: Default::default(),
            enrollment: EnrollmentConfig {
                ca_key: Some("k".into()),
                ca_cert: Some("c".into()),
                ..Default::default()
            },
            auth: Some(AuthConfig {
                callers: vec![CallerPolicy {
                    name: "n".into(),
                    kind: PolicyKind::Mtls,
                    tenants: vec!["*".into()],
                }],
                jwks_url: Some("https://idp/jwks".into()),
                jwks_ca: Some("ca".into()),
                issuer: Some("i".into()),
                audience: Some("a".into()),
                ..Default::default()
            }),
            store: StoreConfig {
                dsn: Some("postgres://u@h/d".into()),
                password_file: Some("p".into()),
                sslmode: Some(SslMode::VerifyFull),
                ca_file: Some("ca".into()),
                ..Default::default()
            },
            cluster: ClusterConfig {
                replica_id: Some("r".into()),
                advertise: Some("r:7445".into()),
                ..Default::default()
            },
            agents: AgentsConfig {
                min_version: Some("0.1.0".into()),
            },
            telemetry: tether_runtime::telemetry::TelemetryConfig {
                otlp_endpoint: Some("http://c:4317".into()),
                sample_ratio: 0.5,
            },
        };
        let v = toml::Value::try_from(&cfg).unwrap();
        let mut leaves = Vec::new();
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&p, v, out);
                    }
                }
                _ => out.push(prefix.to_owned()),
            }
        }
        walk("", &v, &mut leaves);
        for leaf in leaves {
            assert!(KEYS.contains(&leaf.as_str()), "{leaf} missing from KEYS");
        }
    }

    #[test]
    fn store_and_cluster_keys_are_checked_and_the_dsn_password_never_shows() {
        let base = "trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let check = |extra: &str| {
            let cfg: GatewayConfig = toml::from_str(&format!("{base}{extra}")).unwrap();
            cfg.validate()
        };
        check("[store]\ndsn = \"postgres://tether:pw@db:5432/tether?sslmode=require\"\n").unwrap();
        let e = check("[store]\ndsn = \"mysql://tether:s3cret@db/tether\"\n").unwrap_err();
        assert!(e.to_string().contains("store.dsn"), "{e}");
        assert!(
            !e.to_string().contains("s3cret"),
            "the password leaked: {e}"
        );
        let e = check("[store]\nsslmode = \"require\"\n").unwrap_err();
        assert!(e.to_string().contains("store.sslmode"), "{e}");
        assert!(
            toml::from_str::<GatewayConfig>(&format!("{base}[store]\nsslmode = \"verify\"\n"))
                .is_err()
        );
        let e = check("[cluster]\nreplica_id = \"a b\"\n").unwrap_err();
        assert!(e.to_string().contains("cluster.replica_id"), "{e}");
        let e = check("[cluster]\nheartbeat_interval = \"1s\"\nliveness_timeout = \"2s\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("cluster.liveness_timeout"), "{e}");
        let e = check("[cluster]\nadvertise = \"gw-1\"\n").unwrap_err();
        assert!(e.to_string().contains("cluster.advertise"), "{e}");
        let e = check("[cluster]\nreplica_id = \"..\"\n").unwrap_err();
        assert!(e.to_string().contains("cluster.replica_id"), "{e}");
        let e = check("[cluster]\npeer_cert = \"peer.pem\"\n").unwrap_err();
        assert!(e.to_string().contains("cluster.peer_key"), "{e}");
        let e = check("[cluster]\npeer_key = \"peer-key.pem\"\n").unwrap_err();
        assert!(e.to_string().contains("cluster.peer_cert"), "{e}");
        check("[cluster]\npeer_cert = \"p.pem\"\npeer_key = \"k.pem\"\n").unwrap();
        check("[cluster]\npeer_ca_key = \"ca-key.pem\"\n").unwrap();
        let e = check(
            "[cluster]\npeer_cert = \"p.pem\"\npeer_key = \"k.pem\"\npeer_ca_key = \"c.pem\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("cluster.peer_ca_key"), "{e}");
        let cfg = StoreConfig {
            dsn: Some("postgres://tether:s3cret@db:5432/tether".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("tether:***@db:5432"),
            "{shown}"
        );
        assert_eq!(redact_dsn("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact_dsn("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(
            redact_dsn("postgres://u:p@ss@db/x"),
            "postgres://u:***@db/x"
        );
    }
}
