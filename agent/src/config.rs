//! The agent's configuration: TOML file, `TETHER_*` environment, `--set` flags.
//!
//! ```toml
//! gateways = ["gateway.example.com:443"]  # one address: `connections` sessions on distinct
//!                                         # replicas behind it; several: one session to each
//! connections = 2                         # sessions kept behind a single address (1-16)
//! # server_name = "gateway.example.com"  # TLS name to verify; default: each address's host
//! default_service = "default"             # for relayed calls without tether-service
//! [tls]                                   # paths are relative to this file
//! ca = "ca.pem"                           # CA bundle the gateway's certificate chains to
//! cert = "agent.pem"                      # the agent's certificate (identity.source = "files")
//! key = "agent-key.pem"                   # its key (identity.source = "files")
//! [reconnect]
//! initial_backoff = "500ms"
//! max_backoff = "30s"
//! connect_timeout = "5s"
//! [ops]
//! listen = "127.0.0.1:9091"
//! [log]
//! format = "text"
//! level = "info"
//! [labels]
//! region = "eu-west-1"
//! [identity]
//! source = "files"                        # or "aws-secretsmanager:<secret id or ARN>"
//! [enrollment]                            # no tls.cert/tls.key: the identity lives in state_dir
//! token = "tet1_…"                        # or TETHER_ENROLLMENT_TOKEN; used once, at first start
//! [aws]                                   # credentials: the standard chain (IRSA in EKS)
//! region = "eu-west-1"
//! # endpoint_url = "https://vpce-….secretsmanager.eu-west-1.vpce.amazonaws.com"
//! [registry]                              # the registry.create / registry.delete commands (AWS ECR)
//! name_prefix = "tether/"                 # only repositories named so; match the IAM policy's scope
//! pull_principals = ["arn:aws:iam::123456789012:role/eks-nodes"]   # the cluster's nodes pull
//! [transport]
//! mode = "auto"                           # quic, then TCP (TLS + HTTP/2) when UDP is blocked
//! quic_retry = "60s"                      # while on TCP, how often QUIC is tried again
//! [proxy]                                 # HTTP CONNECT, TCP only; else HTTPS_PROXY / NO_PROXY
//! # url = "http://proxy.corp:3128"
//! # no_proxy = ".internal,10.0.0.0/8"
//! [kubernetes]
//! # kubeconfig = "~/.kube/config"         # default: the in-cluster service account
//! poll_interval = "2s"
//! rollout_timeout = "10m"
//! [secrets]                               # what secret.sync may read; empty: nothing
//! allow = ["tether/apps/*"]
//! [environments]
//! egress = "deny"                         # or "allow" (default): the command decides
//! egress_allow = [{ cidr = "10.0.0.0/16", ports = [5432] }]
//! paused = false                          # the kill switch: true refuses every relayed call
//! # pause_reason = "incident 4711"        # and stream, and holds commands (see README)
//! # control_file = "/etc/tether/control/control.toml"  # `paused`/`reason` there too (chart)
//! [approvals]                             # these kinds wait for `tether-agent approve <id>`
//! kinds = []                              # e.g. ["deploy", "environment.delete"]; needs state_dir
//! [ledger]                                # the hash-chained record in state_dir/ledger
//! max_file_bytes = 67108864               # rotated at this size
//! max_files = 16                          # files kept; the oldest goes first
//! [services.default]                      # the allow-list: the agent dials nothing else
//! address = "http://billing.internal:50051"   # gRPC over h2c; https:// needs `ca`
//! [services.db]
//! address = "postgres.internal:5432"
//! kind = "tcp"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_runtime::config::{ConfigError, Keys, Validate};
pub use tether_runtime::logging::LogConfig;

pub use crate::policy::{Egress, EgressRule, SecretPattern};

/// `[tls]`: PEM files, relative to the config file. `cert` and `key` are the agent's identity
/// with `identity.source = "files"` and must be unset otherwise; `ca` (what the gateway's
/// certificate must chain to) is needed unless the identity secret carries its own. An empty
/// path means unset. (The gateway's `[tls]`, `tether_runtime::tls::TlsFiles`, needs all three.)
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA bundle the gateway's certificate must chain to.
    #[serde(skip_serializing_if = "is_unset")]
    pub ca: PathBuf,
    /// The agent's certificate (chain), with `identity.source = "files"`.
    #[serde(skip_serializing_if = "is_unset")]
    pub cert: PathBuf,
    /// Its private key, with `identity.source = "files"`.
    #[serde(skip_serializing_if = "is_unset")]
    pub key: PathBuf,
}

/// Whether a path option was left out (empty).
pub fn is_unset(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl TlsConfig {
    /// Makes the set paths relative to `base` (the config file's directory).
    pub fn resolve(&mut self, base: Option<&Path>) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if !is_unset(p) {
                *p = tether_runtime::config::resolve(base, p);
            }
        }
    }
}

/// Every key, for the environment and `--set`.
pub const KEYS: Keys = &[
    "telemetry.otlp_endpoint",
    "telemetry.sample_ratio",
    "gateways",
    "connections",
    "server_name",
    "instance_id",
    "labels",
    "services",
    "default_service",
    "tls.ca",
    "tls.cert",
    "tls.key",
    "reconnect.initial_backoff",
    "reconnect.max_backoff",
    "reconnect.connect_timeout",
    "ops.listen",
    "log.format",
    "log.level",
    "state_dir",
    "identity.source",
    "aws.region",
    "aws.endpoint_url",
    "aws.max_attempts",
    "registry.name_prefix",
    "registry.pull_principals",
    "kubernetes.kubeconfig",
    "kubernetes.poll_interval",
    "kubernetes.rollout_timeout",
    "transport.mode",
    "transport.quic_retry",
    "proxy.url",
    "proxy.no_proxy",
    "proxy.username",
    "proxy.password",
    "enrollment.token",
    "secrets.allow",
    "environments.egress",
    "environments.egress_allow",
    "environments.dns_namespace",
    "environments.dns_pod_labels",
    "paused",
    "pause_reason",
    "control_file",
    "approvals.kinds",
    "ledger.enabled",
    "ledger.max_file_bytes",
    "ledger.max_files",
    "ledger.checkpoint_records",
    "ledger.checkpoint_interval",
    "ledger.stdout",
];

/// The whole agent config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Gateway addresses, `host:port`. One address (a load balancer in front of gateway
    /// replicas): the agent keeps `connections` sessions on distinct replicas behind it; several:
    /// one session to each.
    pub gateways: Vec<String>,
    /// Sessions kept on distinct gateway replicas behind a single address, at most as many as
    /// there are live replicas: when one replica goes (a crash, a rolling upgrade), calls go on
    /// through the others at once. Ignored with several addresses.
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// TLS server name to verify instead of each address's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Names this agent process among replicas of one agent id; default `$HOSTNAME` or random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Free-form labels shown in `Agents/Get`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The allow-list: service name → upstream. The agent dials nothing else.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// The service a call without `tether-service` goes to.
    #[serde(default = "default_service")]
    pub default_service: String,
    /// Certificates and keys.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Reconnect backoff.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// The ops HTTP listener (loopback).
    #[serde(default)]
    pub ops: OpsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Where the agent keeps its record of completed commands (so a redelivered command is not
    /// run twice across restarts), an enrolled identity, and the certificates it renews over
    /// the tunnel with the CA bundle that came with them (the file layout is `state.rs`'s);
    /// unset: kept in memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Where the agent's own certificate and key come from.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// AWS access (Secrets Manager, ECR): region and endpoint; credentials from the standard
    /// chain.
    #[serde(default)]
    pub aws: AwsConfig,
    /// Kubernetes access for the environment, deploy and secret handlers.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// What the registry commands (AWS ECR) may touch, and who pulls.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// QUIC, or the TLS + HTTP/2 over TCP fallback.
    #[serde(default)]
    pub transport: TransportConfig,
    /// An HTTP CONNECT proxy for the TCP transport (else `HTTPS_PROXY` / `NO_PROXY`).
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Enrollment with a bootstrap token, for an identity kept in `state_dir`.
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    /// Which Secrets Manager secrets `secret.sync` may read (none by default).
    #[serde(default)]
    pub secrets: SecretsConfig,
    /// The egress of environments' workloads.
    #[serde(default)]
    pub environments: EnvironmentsConfig,
    /// OpenTelemetry traces of relayed calls and streams.
    #[serde(default)]
    pub telemetry: tether_runtime::telemetry::TelemetryConfig,
    /// The kill switch: while true every relayed call and TCP stream is refused with
    /// `FAILED_PRECONDITION` and commands stay queued at the gateway. Reloaded live.
    #[serde(default)]
    pub paused: bool,
    /// Why, for the vendor (in every refusal, `AgentInfo` and `/readyz`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pause_reason: String,
    /// A TOML file with `paused` and `reason` (the chart mounts it from a ConfigMap of its own),
    /// read at start and whenever it changes; a pause there is one more reason to be paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_file: Option<PathBuf>,
    /// The ledger of relayed calls, streams and commands in `state_dir/ledger`.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// Command kinds that wait for the data plane owner's approval. Reloaded live.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
}

/// `[approvals]`: the command kinds that wait in the agent for `tether-agent approve <id>` (or
/// `reject`) on its pod; the gateway shows them `AWAITING_APPROVAL` meanwhile.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// The kinds, exactly as submitted (`deploy`, `environment.delete`, …).
    pub kinds: Vec<String>,
}

impl ApprovalsConfig {
    fn validate(&self, state_dir: Option<&Path>) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for k in &self.kinds {
            if k.trim().is_empty() || k.trim() != k {
                return Err(ConfigError::invalid(
                    "approvals.kinds",
                    format!("{k:?} is not a command kind (no blanks, no surrounding spaces)"),
                ));
            }
            if !seen.insert(k) {
                return Err(ConfigError::invalid(
                    "approvals.kinds",
                    format!("{k:?} is listed twice"),
                ));
            }
        }
        if !self.kinds.is_empty() && state_dir.is_none() {
            return Err(ConfigError::invalid(
                "approvals.kinds",
                "needs state_dir: the agent keeps the commands waiting for approval and the decisions there, so that a restart keeps them (set state_dir, or leave approvals.kinds empty)",
            ));
        }
        Ok(())
    }
}

// === [ledger] and the pause switch ===

/// `[ledger]`: the hash-chained record the agent keeps of every relayed call, stream and
/// command (the `ledger` module). Needs `state_dir` to write files; without one only the
/// stdout copy is written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Keep the ledger (default true).
    pub enabled: bool,
    /// A file is closed with a checkpoint and a new one begun once it reaches this size.
    pub max_file_bytes: u64,
    /// Files kept; beyond, the oldest is deleted (the next file's chain starts where the
    /// deleted one ended, which `verify` reports).
    pub max_files: u32,
    /// A signed checkpoint after this many records...
    pub checkpoint_records: u32,
    /// ...or this long after the first record since the last one.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Also write each record as a JSON line on stdout (the logs go to stderr).
    pub stdout: bool,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            enabled: true,
            max_file_bytes: 64 << 20,
            max_files: 16,
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(60),
            stdout: true,
        }
    }
}

impl LedgerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_file_bytes < 4096 {
            return Err(ConfigError::invalid(
                "ledger.max_file_bytes",
                "must be at least 4096 (a file holds at least its opening record and a checkpoint)",
            ));
        }
        if self.max_files < 2 {
            return Err(ConfigError::invalid(
                "ledger.max_files",
                "must be at least 2 (the file being written and the one before)",
            ));
        }
        if self.checkpoint_records == 0 {
            return Err(ConfigError::invalid(
                "ledger.checkpoint_records",
                "must be positive",
            ));
        }
        if self.checkpoint_interval.is_zero() {
            return Err(ConfigError::invalid(
                "ledger.checkpoint_interval",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// The control file (`control_file`): the chart's ConfigMap, which `kubectl edit` changes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// Paused while true.
    #[serde(default)]
    pub paused: bool,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

impl ControlFile {
    /// Reads and parses `path`; the error names the file and the key.
    pub fn read(path: &Path) -> Result<ControlFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(
                "control_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        toml::from_str(&text).map_err(|e| {
            ConfigError::invalid(
                "control_file",
                format!(
                    "{} is not a control file (`paused = true|false`, `reason = \"…\"`): {}",
                    path.display(),
                    e.message()
                ),
            )
        })
    }
}

// === [secrets] and [environments]: what the control plane may reach ===

/// `[secrets]`: the Secrets Manager secrets `secret.sync` may read, as patterns of names or
/// ARNs ([`SecretPattern`] gives the exact semantics). Empty, the default: `secret.sync` is
/// refused for every secret. The agent's own identity secret (`identity.source`) is not
/// subject to it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The patterns; a secret id matching any of them may be synced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<SecretPattern>,
}

impl SecretsConfig {
    /// Whether `secret_id` (a name or an ARN) matches one of the patterns.
    pub fn allows(&self, secret_id: &str) -> bool {
        self.allow.iter().any(|p| p.matches(secret_id))
    }
}

/// `[environments]`: where the workloads of environments may send to.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvironmentsConfig {
    /// `allow` (default): `environment.create`'s `egress` decides, default allow. `deny`: every
    /// environment gets the NetworkPolicy `tether-egress`, admitting only the cluster DNS and
    /// `egress_allow`, and commands cannot loosen it.
    pub egress: Egress,
    /// With `egress = "deny"`: the destinations every environment may reach besides DNS, and
    /// the bound for the ones a command asks for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<EgressRule>,
    /// Namespace of the cluster DNS pods, which an egress policy always admits (UDP and TCP 53).
    pub dns_namespace: String,
    /// Labels of the cluster DNS pods.
    pub dns_pod_labels: BTreeMap<String, String>,
}

impl Default for EnvironmentsConfig {
    fn default() -> Self {
        EnvironmentsConfig {
            egress: Egress::Allow,
            egress_allow: Vec::new(),
            dns_namespace: "kube-system".into(),
            dns_pod_labels: [("k8s-app".to_owned(), "kube-dns".to_owned())].into(),
        }
    }
}

impl EnvironmentsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.egress == Egress::Allow && !self.egress_allow.is_empty() {
            return Err(ConfigError::invalid(
                "environments.egress_allow",
                "only used with environments.egress = \"deny\" (with \"allow\" nothing is \
                 restricted): set environments.egress = \"deny\" or remove it",
            ));
        }
        for (i, r) in self.egress_allow.iter().enumerate() {
            r.check()
                .map_err(|e| ConfigError::invalid(&format!("environments.egress_allow[{i}]"), e))?;
        }
        if self.dns_namespace.is_empty() {
            return Err(ConfigError::invalid(
                "environments.dns_namespace",
                "is empty: the namespace of the cluster DNS pods (e.g. kube-system)",
            ));
        }
        if self.dns_pod_labels.is_empty() {
            return Err(ConfigError::invalid(
                "environments.dns_pod_labels",
                "is empty, which would admit port 53 of every pod in environments.dns_namespace: \
                 give the DNS pods' labels (e.g. { \"k8s-app\" = \"kube-dns\" })",
            ));
        }
        Ok(())
    }
}

/// `[enrollment]`: with `identity.source = "files"` and no `tls.cert`/`tls.key`, the agent's
/// identity is `<state_dir>/agent.pem` and `<state_dir>/agent-key.pem`; when they are missing
/// (or `token` is one this agent has not used yet) the agent generates a key there and enrolls
/// with `token` (the agent's `enroll` module).
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    /// The single-use bootstrap token (`tetherctl tokens create`). Never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for EnrollmentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Which transports the agent uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC; when it cannot connect, TCP (through the proxy if one applies), re-probing QUIC in
    /// the background and moving back to it when it works.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS + HTTP/2 over TCP only.
    Tcp,
}

/// `[transport]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// `auto` (default), `quic` or `tcp`.
    pub mode: TransportMode,
    /// While on TCP in `auto` mode, how often QUIC is tried again.
    #[serde(with = "humantime_serde")]
    pub quic_retry: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            mode: TransportMode::Auto,
            quic_retry: Duration::from_secs(60),
        }
    }
}

/// `[proxy]`: an HTTP CONNECT proxy for the TCP transport. Unset keys fall back to
/// `HTTPS_PROXY` / `https_proxy` and `NO_PROXY` / `no_proxy`. Its `Debug` shows neither the
/// password nor the URL's credentials.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// `http://[user:password@]host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Comma-separated hosts, domains (`.corp`), CIDRs or `*` reached directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
    /// Proxy user (wins over the URL's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Proxy password. Never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("no_proxy", &self.no_proxy)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A proxy URL without the credentials of its user info (`http://***@host:port`), for logs,
/// errors and `Debug`.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.rsplit_once('@').map_or(url, |(_, h)| h).to_owned(),
    }
}

/// The proxy `[proxy]` (or the environment) names, parsed and checked. Its `Debug` shows no
/// credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// The proxy's host.
    pub host: String,
    /// Its port (80 when the URL gives none).
    pub port: u16,
    /// User and password, from `proxy.username`/`proxy.password` or the URL's user info.
    pub credentials: Option<(String, String)>,
    /// Hosts, domains (`.corp`), CIDRs or `*` reached directly, lowercase.
    pub no_proxy: Vec<String>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// Why `[proxy]` (or `HTTPS_PROXY`) names no usable proxy. Never shows credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyConfigError {
    /// The URL's scheme is not `http://`.
    #[error(
        "{from}: {url} is not an http:// proxy (the agent speaks plain HTTP CONNECT to its proxy; the tunnel inside is TLS)"
    )]
    NotHttp {
        /// The key or variable it came from.
        from: &'static str,
        /// The URL, credentials redacted.
        url: String,
    },
    /// The URL has no valid `host:port`.
    #[error("{from}: {url} has no valid host:port")]
    NoHostPort {
        /// The key or variable it came from.
        from: &'static str,
        /// The URL, credentials redacted.
        url: String,
    },
    /// A password without a user.
    #[error("proxy.password is set without proxy.username")]
    PasswordWithoutUsername,
}

impl ProxyConfig {
    /// The proxy configured here, else in the environment (`env` gives a variable's value);
    /// `None` when there is none.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<ProxySettings>, ProxyConfigError> {
        let var = |a: &str, b: &str| env(a).or_else(|| env(b)).filter(|v| !v.trim().is_empty());
        let (url, from) = match &self.url {
            Some(u) => (u.clone(), "proxy.url"),
            None => match (env("HTTPS_PROXY"), env("https_proxy")) {
                (Some(u), _) if !u.trim().is_empty() => (u, "HTTPS_PROXY"),
                (_, Some(u)) if !u.trim().is_empty() => (u, "https_proxy"),
                _ => return Ok(None),
            },
        };
        let no_proxy = self
            .no_proxy
            .clone()
            .or_else(|| var("NO_PROXY", "no_proxy"))
            .unwrap_or_default();
        let url = url.trim();
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.contains("://") {
            return Err(ProxyConfigError::NotHttp {
                from,
                url: redact_url(url),
            });
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = match split_host_port(hostport) {
            Some((h, p)) => (h.to_owned(), p),
            None if !hostport.is_empty() && !hostport.contains(':') => (hostport.to_owned(), 80),
            None => {
                return Err(ProxyConfigError::NoHostPort {
                    from,
                    url: redact_url(url),
                });
            }
        };
        let from_url = userinfo.map(|u| match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user), percent_decode(pass)),
            None => (percent_decode(u), String::new()),
        });
        let credentials = match (&self.username, &self.password) {
            (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
            (None, Some(_)) => return Err(ProxyConfigError::PasswordWithoutUsername),
            (None, None) => from_url,
        };
        Ok(Some(ProxySettings {
            host,
            port,
            credentials,
            no_proxy: no_proxy
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }))
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `[identity]`: where the agent's certificate and key come from.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// `files` (default: `tls.cert` and `tls.key`) or `aws-secretsmanager:<secret id or ARN>`.
    pub source: IdentitySource,
}

/// Where the agent's certificate and key come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum IdentitySource {
    /// PEM files `tls.cert` and `tls.key`.
    #[default]
    Files,
    /// A Secrets Manager secret holding the PEM certificate and key (see `docs/install-agent.md`).
    AwsSecretsManager(String),
}

/// The `identity.source` prefix naming a Secrets Manager secret.
pub const AWS_SECRETS_MANAGER_PREFIX: &str = "aws-secretsmanager:";

impl std::fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentitySource::Files => f.write_str("files"),
            IdentitySource::AwsSecretsManager(id) => write!(f, "{AWS_SECRETS_MANAGER_PREFIX}{id}"),
        }
    }
}

impl std::str::FromStr for IdentitySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "files" {
            return Ok(IdentitySource::Files);
        }
        match s.strip_prefix(AWS_SECRETS_MANAGER_PREFIX) {
            Some(id) if !id.trim().is_empty() => {
                Ok(IdentitySource::AwsSecretsManager(id.to_owned()))
            }
            Some(_) => Err(format!(
                "{s:?} names no secret: {AWS_SECRETS_MANAGER_PREFIX}<secret id or ARN>"
            )),
            None => Err(format!(
                "{s:?} is neither `files` nor `{AWS_SECRETS_MANAGER_PREFIX}<secret id or ARN>`"
            )),
        }
    }
}

impl Serialize for IdentitySource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdentitySource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `[aws]`: how the agent reaches AWS. Credentials always come from the standard chain
/// (environment, profile, web identity / IRSA, container and instance metadata).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region; default: the standard chain (`AWS_REGION`, profile, instance metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint override, e.g. a VPC endpoint or a local emulator; default: the SDK's choice
    /// (which honours `AWS_ENDPOINT_URL`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Attempts per AWS call (Secrets Manager, ECR), throttling and transient errors retried
    /// with backoff.
    pub max_attempts: u32,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            max_attempts: 5,
        }
    }
}

/// `[registry]`: the `registry.create` and `registry.delete` commands (AWS ECR, in the account
/// of the agent's AWS credentials, through `[aws]`). Set by the customer: the gateway cannot
/// widen it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Only repositories whose names start with this are created, converged or deleted (the
    /// others are refused before any AWS call); empty: any. Scope the agent's IAM policy to
    /// the same prefix.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name_prefix: String,
    /// IAM principals the repository policy of every repository the agent manages lets pull:
    /// the cluster's node role(s). Empty: no pull statement (same-account nodes then pull with
    /// their own IAM policy, e.g. `AmazonEC2ContainerRegistryReadOnly`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pull_principals: Vec<PrincipalArn>,
}

/// An IAM principal a resource policy may name: `arn:<partition>:iam::<account>:root`,
/// `…:role/<path/name>` or `…:user/<path/name>`. No wildcards: a policy must not grant
/// everyone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PrincipalArn(String);

impl PrincipalArn {
    /// The ARN.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PrincipalArn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<PrincipalArn> for String {
    fn from(p: PrincipalArn) -> String {
        p.0
    }
}

impl TryFrom<String> for PrincipalArn {
    type Error = String;

    fn try_from(s: String) -> Result<PrincipalArn, String> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && !n.starts_with('/')
                && !n.ends_with('/')
                && !n.contains("//")
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+=,.@_/-".contains(c))
        };
        let ok = s.len() <= 2048
            && match s.split(':').collect::<Vec<_>>()[..] {
                ["arn", partition, "iam", "", account, resource] => {
                    (partition == "aws"
                        || partition.strip_prefix("aws-").is_some_and(|p| {
                            !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                        }))
                        && account.len() == 12
                        && account.bytes().all(|b| b.is_ascii_digit())
                        && (resource == "root"
                            || resource.strip_prefix("role/").is_some_and(name_ok)
                            || resource.strip_prefix("user/").is_some_and(name_ok))
                }
                _ => false,
            };
        if ok {
            Ok(PrincipalArn(s))
        } else {
            Err(format!(
                "{s:?} is not an IAM principal ARN (arn:aws:iam::<12-digit account>:role/<name>, \
                 …:user/<name> or …:root; no wildcards)"
            ))
        }
    }
}

impl std::str::FromStr for PrincipalArn {
    type Err = String;

    fn from_str(s: &str) -> Result<PrincipalArn, String> {
        PrincipalArn::try_from(s.to_owned())
    }
}

/// `[kubernetes]`: how the agent reaches the Kubernetes API.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// A kubeconfig file (its current context) for running outside a cluster; default: the
    /// in-cluster service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// How often `deploy` looks at the rollout.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long `deploy` waits for a rollout when the payload gives no `timeout`.
    #[serde(with = "humantime_serde")]
    pub rollout_timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            poll_interval: Duration::from_secs(2),
            rollout_timeout: Duration::from_secs(600),
        }
    }
}

fn default_service() -> String {
    "default".into()
}

/// What an allow-listed upstream speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// gRPC (HTTP/2): `http://` (h2c) or `https://` addresses.
    #[default]
    Grpc,
    /// Raw TCP: `host:port` addresses.
    Tcp,
}

/// One allow-listed upstream.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `http://host:port`, `https://host:port` (gRPC) or `host:port` (TCP).
    pub address: String,
    /// `grpc` (default) or `tcp`.
    #[serde(default)]
    pub kind: ServiceKind,
    /// CA bundle for an `https://` upstream (default: none, so https needs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// TLS name to verify for an `https://` upstream (default: the address's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Reconnect backoff: full jitter in `[0, min(max, initial · 2ⁿ))`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// Ceiling of the first delay.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of the delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long one dial (QUIC and TLS handshake, then `Welcome`) may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The ops HTTP listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// TCP address; loopback by default, so the agent listens on nothing reachable.
    pub listen: SocketAddr,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: ([127, 0, 0, 1], 9091).into(),
        }
    }
}

/// The most sessions `connections` may ask for behind one address.
pub const MAX_CONNECTIONS: u32 = 16;

fn default_connections() -> u32 {
    2
}

/// Splits `host:port` (or `[v6]:port`) into host and port.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

impl Validate for AgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry
            .check()
            .map_err(|(key, why)| ConfigError::invalid(&format!("telemetry.{key}"), why))?;
        if self.gateways.is_empty() {
            return Err(ConfigError::invalid(
                "gateways",
                "at least one gateway address is required",
            ));
        }
        for g in &self.gateways {
            if split_host_port(g).is_none() {
                return Err(ConfigError::invalid(
                    "gateways",
                    format!("{g:?} is not host:port"),
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(ConfigError::invalid(
                "connections",
                format!(
                    "must be between 1 and {MAX_CONNECTIONS} (sessions kept on distinct gateway replicas behind one address; the default is 2)"
                ),
            ));
        }
        if self.reconnect.initial_backoff.is_zero() {
            return Err(ConfigError::invalid(
                "reconnect.initial_backoff",
                "must be positive",
            ));
        }
        if self.reconnect.max_backoff < self.reconnect.initial_backoff {
            return Err(ConfigError::invalid(
                "reconnect.max_backoff",
                "must be at least reconnect.initial_backoff",
            ));
        }
        if self.reconnect.connect_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "reconnect.connect_timeout",
                "must be positive",
            ));
        }
        for (name, svc) in &self.services {
            let key = format!("services.{name}");
            if name == "agent" {
                return Err(ConfigError::invalid(
                    &key,
                    "the name `agent` is reserved for the agent's built-in service",
                ));
            }
            tunnel_proto::identity::check_name("service", name)
                .map_err(|e| ConfigError::invalid(&key, e.to_string()))?;
            match svc.kind {
                ServiceKind::Grpc => {
                    let rest = svc
                        .address
                        .strip_prefix("http://")
                        .or_else(|| svc.address.strip_prefix("https://"))
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                &format!("{key}.address"),
                                format!(
                                    "{:?} must start with http:// (h2c) or https://",
                                    svc.address
                                ),
                            )
                        })?;
                    if split_host_port(rest.trim_end_matches('/')).is_none() {
                        return Err(ConfigError::invalid(
                            &format!("{key}.address"),
                            format!("{:?} has no host:port", svc.address),
                        ));
                    }
                    if svc.address.starts_with("https://") && svc.ca.is_none() {
                        return Err(ConfigError::invalid(
                            &format!("{key}.ca"),
                            "an https:// upstream needs the CA bundle that signed it",
                        ));
                    }
                }
                ServiceKind::Tcp => {
                    if split_host_port(&svc.address).is_none() {
                        return Err(ConfigError::invalid(
                            &format!("{key}.address"),
                            format!("{:?} is not host:port", svc.address),
                        ));
                    }
                }
            }
        }
        let token = self.enrollment.token.as_deref().map(str::trim);
        if token == Some("") {
            return Err(ConfigError::invalid("enrollment.token", "is empty"));
        }
        match &self.identity.source {
            IdentitySource::Files => {
                if is_unset(&self.tls.ca) {
                    return Err(ConfigError::invalid(
                        "tls.ca",
                        "required with identity.source = \"files\"",
                    ));
                }
                let enrolled = is_unset(&self.tls.cert) && is_unset(&self.tls.key);
                if enrolled && self.state_dir.is_none() {
                    return Err(ConfigError::invalid(
                        if token.is_some() {
                            "state_dir"
                        } else {
                            "tls.cert"
                        },
                        "required with identity.source = \"files\": set tls.cert and tls.key, or state_dir (where an enrolled identity is kept, see enrollment.token)",
                    ));
                }
                if !enrolled {
                    for (key, p) in [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
                        if is_unset(p) {
                            return Err(ConfigError::invalid(
                                key,
                                "required with identity.source = \"files\"",
                            ));
                        }
                    }
                    if token.is_some() {
                        return Err(ConfigError::invalid(
                            "enrollment.token",
                            "not used with tls.cert and tls.key (an enrolled identity lives in state_dir): remove one or the other",
                        ));
                    }
                }
            }
            IdentitySource::AwsSecretsManager(_) => {
                if token.is_some() {
                    return Err(ConfigError::invalid(
                        "enrollment.token",
                        format!(
                            "not used with identity.source = \"{}\": remove it",
                            self.identity.source
                        ),
                    ));
                }
                for (key, p) in [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
                    if !is_unset(p) {
                        return Err(ConfigError::invalid(
                            key,
                            format!(
                                "not used with identity.source = \"{}\" (the certificate and key come from the secret): remove it",
                                self.identity.source
                            ),
                        ));
                    }
                }
            }
        }
        if self.aws.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "aws.max_attempts",
                "must be at least 1",
            ));
        }
        if let Some(url) = &self.aws.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "aws.endpoint_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if self.transport.quic_retry.is_zero() {
            return Err(ConfigError::invalid(
                "transport.quic_retry",
                "must be positive",
            ));
        }
        self.proxy
            .resolve(|k| std::env::var(k).ok())
            .map_err(|e| ConfigError::invalid("proxy", e.to_string()))?;
        let prefix = &self.registry.name_prefix;
        let lower_or_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let prefix_ok = prefix.is_empty()
            || (prefix.len() <= 200
                && prefix.starts_with(lower_or_digit)
                && prefix
                    .chars()
                    .all(|c| lower_or_digit(c) || "._-/".contains(c)));
        if !prefix_ok {
            return Err(ConfigError::invalid(
                "registry.name_prefix",
                format!(
                    "{prefix:?} cannot start an ECR repository name (at most 200 lowercase \
                     letters, digits, '.', '_', '-' and '/', starting with a letter or digit)"
                ),
            ));
        }
        if self.kubernetes.poll_interval.is_zero() {
            return Err(ConfigError::invalid(
                "kubernetes.poll_interval",
                "must be positive",
            ));
        }
        if self.kubernetes.rollout_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "kubernetes.rollout_timeout",
                "must be positive",
            ));
        }
        if let Some(id) = &self.instance_id {
            tunnel_proto::identity::check_name("instance_id", id)
                .map_err(|e| ConfigError::invalid("instance_id", e.to_string()))?;
        }
        self.environments.validate()?;
        self.ledger.validate()?;
        self.approvals.validate(self.state_dir.as_deref())?;
        if let Err(e) = tether_runtime::logging::check_level(&self.log.level) {
            return Err(ConfigError::invalid("log.level", e));
        }
        if self.ops.listen.port() != 0 {
            for (name, s) in &self.services {
                let target = s
                    .address
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/');
                let port = self.ops.listen.port();
                if [
                    format!("127.0.0.1:{port}"),
                    format!("localhost:{port}"),
                    format!("[::1]:{port}"),
                    self.ops.listen.to_string(),
                ]
                .iter()
                .any(|a| a == target)
                {
                    return Err(ConfigError::invalid(
                        &format!("services.{name}.address"),
                        "is the agent's own ops endpoint (ops.listen), where the pod's owner pauses and resumes the agent: the control plane must not reach it",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Loads file, environment and `--set` flags, then validates. Relative TLS paths are taken
    /// from the config file's directory.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig =
            tether_runtime::config::load(KEYS, file, std::env::vars(), sets)?;
        let base = file.and_then(Path::parent);
        cfg.tls.resolve(base);
        for svc in cfg.services.values_mut() {
            if let Some(ca) = &mut svc.ca {
                *ca = tether_runtime::config::resolve(base, ca);
            }
        }
        if let Some(d) = &mut cfg.state_dir {
            *d = tether_runtime::config::resolve(base, d);
        }
        if let Some(k) = &mut cfg.kubernetes.kubeconfig {
            *k = tether_runtime::config::resolve(base, k);
        }
        if let Some(c) = &mut cfg.control_file {
            *c = tether_runtime::config::resolve(base, c);
        }
        Ok(cfg)
    }

    /// True when the identity is enrolled and kept in `state_dir` (files source, no
    /// `tls.cert`/`tls.key`).
    pub fn enrolled_identity(&self) -> bool {
        self.identity.source == IdentitySource::Files
            && is_unset(&self.tls.cert)
            && is_unset(&self.tls.key)
            && self.state_dir.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_the_config_never_shows_proxy_credentials() {
        let cfg: AgentConfig = toml::from_str(
            "gateways = [\"gw:7443\"]\n[tls]\nca = \"ca.pem\"\n[proxy]\nurl = \"http://alice:url-s3cret@proxy.corp:3128\"\nusername = \"bob\"\npassword = \"key-s3cret\"\n",
        )
        .unwrap();
        for text in [
            format!("{cfg:?}"),
            format!("{cfg:#?}"),
            format!("{:?}", cfg.proxy),
        ] {
            assert!(!text.contains("s3cret"), "credentials in {text}");
            assert!(text.contains("proxy.corp:3128"), "{text}");
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("gw.example:443"), Some(("gw.example", 443)));
        assert_eq!(split_host_port("[::1]:7443"), Some(("::1", 7443)));
        assert_eq!(split_host_port("gw.example"), None);
        assert_eq!(split_host_port(":443"), None);
        assert_eq!(split_host_port("gw:http"), None);
    }

    fn parse(extra: &str) -> AgentConfig {
        toml::from_str(&format!("gateways = [\"gw:443\"]\n{extra}")).expect("parses")
    }

    #[test]
    fn approvals_need_state_dir_and_distinct_kinds_naming_the_key() {
        let tls = "[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"k.pem\"\n";
        for (extra, why) in [
            ("[approvals]\nkinds = [\"deploy\"]\n", "needs state_dir"),
            (
                "state_dir = \"s\"\n[approvals]\nkinds = [\"deploy\", \"deploy\"]\n",
                "listed twice",
            ),
            (
                "state_dir = \"s\"\n[approvals]\nkinds = [\" deploy\"]\n",
                "not a command kind",
            ),
        ] {
            let e = parse(&format!("{extra}{tls}")).validate().unwrap_err();
            assert!(
                e.to_string().contains("approvals.kinds") && e.to_string().contains(why),
                "{e}"
            );
        }
        parse(&format!(
            "state_dir = \"s\"\n{tls}[approvals]\nkinds = [\"deploy\", \"environment.delete\"]\n"
        ))
        .validate()
        .expect("valid");
    }

    #[test]
    fn files_identity_needs_every_tls_file() {
        let e = parse("[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("tls.key"), "{e}");
        assert!(
            parse("")
                .validate()
                .unwrap_err()
                .to_string()
                .contains("tls.ca")
        );
        parse("[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"k.pem\"\n")
            .validate()
            .expect("valid");
    }

    #[test]
    fn secrets_manager_identity_needs_no_tls_files_and_refuses_cert_and_key() {
        let sm = "[identity]\nsource = \"aws-secretsmanager:tether/agent\"\n";
        parse(sm).validate().expect("no [tls] needed");
        parse(&format!("{sm}[tls]\nca = \"ca.pem\"\n"))
            .validate()
            .expect("tls.ca may be given");
        let e = parse(&format!("{sm}[tls]\ncert = \"a.pem\"\n"))
            .validate()
            .unwrap_err();
        assert!(
            e.to_string().contains("tls.cert") && e.to_string().contains("remove it"),
            "{e}"
        );
    }

    #[test]
    fn an_enrolled_identity_needs_state_dir_and_excludes_cert_and_key() {
        let tok = "[enrollment]\ntoken = \"tet1_x\"\n";
        let e = parse(&format!("[tls]\nca = \"ca.pem\"\n{tok}"))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("state_dir"), "{e}");
        let cfg = parse(&format!("state_dir = \"s\"\n[tls]\nca = \"ca.pem\"\n{tok}"));
        cfg.validate().expect("valid");
        assert!(cfg.enrolled_identity());
        assert!(
            !format!("{cfg:?}").contains("tet1_x"),
            "the token is never shown"
        );
        let e = parse(&format!(
            "state_dir = \"s\"\n[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"k.pem\"\n{tok}"
        ))
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("enrollment.token"), "{e}");
        // Without a token, a state_dir alone is an enrolled identity too (already enrolled).
        parse("state_dir = \"s\"\n[tls]\nca = \"ca.pem\"\n")
            .validate()
            .expect("valid");
    }

    /// Loads through the one merge point, as the binary does, so errors name the key.
    fn load(sets: &[&str]) -> Result<AgentConfig, ConfigError> {
        let mut all = vec![
            "gateways=[\"gw:443\"]".to_owned(),
            "tls.ca=ca.pem".to_owned(),
            "tls.cert=a.pem".to_owned(),
            "tls.key=k.pem".to_owned(),
        ];
        all.extend(sets.iter().map(|s| (*s).to_owned()));
        tether_runtime::config::load(KEYS, None, std::iter::empty(), &all)
    }

    #[test]
    fn connections_default_to_two_and_bad_values_name_the_key() {
        assert_eq!(load(&[]).expect("valid").connections, 2);
        assert_eq!(load(&["connections=3"]).expect("valid").connections, 3);
        for bad in ["connections=0", "connections=17"] {
            let e = load(&[bad]).unwrap_err();
            assert!(e.to_string().contains("connections"), "{e}");
            assert!(e.to_string().contains("between 1 and 16"), "{e}");
        }
        let e = load(&["connections=\"two\""]).unwrap_err();
        assert!(e.to_string().contains("connections"), "{e}");
    }

    #[test]
    fn no_secret_is_allowed_and_egress_is_the_commands_choice_by_default() {
        let cfg = load(&[]).expect("valid");
        assert!(cfg.secrets.allow.is_empty());
        assert!(!cfg.secrets.allows("anything") && !cfg.secrets.allows("*"));
        assert_eq!(cfg.environments.egress, Egress::Allow);
        let cfg = load(&[
            "secrets.allow=[\"tether/apps/*\", \"arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/*\"]",
            "environments.egress=deny",
            "environments.egress_allow=[{ cidr = \"10.0.0.0/16\", ports = [5432] }]",
        ])
        .expect("valid");
        assert!(cfg.secrets.allows("tether/apps/db"));
        assert!(!cfg.secrets.allows("prod/db"));
        assert_eq!(cfg.environments.egress, Egress::Deny);
        assert_eq!(cfg.environments.egress_allow[0].ports, [5432]);
    }

    #[test]
    fn bad_secret_patterns_and_egress_rules_are_refused_naming_the_key() {
        for (set, key, why) in [
            (
                "secrets.allow=[\"ok/*\", \"bad pattern\"]",
                "secrets.allow[1]",
                "cannot appear",
            ),
            ("secrets.allow=\"tether/*\"", "secrets.allow", "sequence"),
            ("secrets.alow=[]", "secrets.alow", "unknown"),
            (
                "environments.egress=block",
                "environments.egress",
                "unknown variant",
            ),
            (
                "environments.egress_allow=[{ cidr = \"10.0.0.1/8\" }]",
                "environments.egress_allow[0].cidr",
                "did you mean 10.0.0.0/8",
            ),
            (
                "environments.egress_allow=[{ cidr = \"10.0.0.0/8\", port = 5432 }]",
                "environments.egress_allow[0]",
                "unknown field `port`",
            ),
        ] {
            let e = load(&[set]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(why), "{set}: {e}");
        }
        let e = load(&["environments.egress_allow=[{ cidr = \"10.0.0.0/8\" }]"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environments.egress_allow") && e.contains("deny"),
            "{e}"
        );
        let e = load(&[
            "environments.egress=deny",
            "environments.egress_allow=[{ cidr = \"10.0.0.0/8\", ports = [0] }]",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("environments.egress_allow[0]") && e.contains("port 0"),
            "{e}"
        );
        let e = load(&["environments.dns_pod_labels={}"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("environments.dns_pod_labels"), "{e}");
    }

    #[test]
    fn registry_keys_are_checked_and_a_bad_one_is_named() {
        let tls = [
            "tls.ca=ca.pem".to_owned(),
            "tls.cert=a.pem".to_owned(),
            "tls.key=k.pem".to_owned(),
        ];
        let load = |extra: &[&str]| {
            let sets: Vec<String> = tls
                .iter()
                .cloned()
                .chain(std::iter::once("gateways=[\"gw:443\"]".to_owned()))
                .chain(extra.iter().map(|s| (*s).to_owned()))
                .collect();
            tether_runtime::config::load::<AgentConfig>(KEYS, None, std::iter::empty(), &sets)
        };
        let cfg = load(&[
            "registry.name_prefix=tether/",
            r#"registry.pull_principals=["arn:aws:iam::123456789012:role/eks-nodes", "arn:aws-cn:iam::123456789012:root", "arn:aws:iam::123456789012:user/ci/pusher"]"#,
        ])
        .expect("valid");
        assert_eq!(cfg.registry.name_prefix, "tether/");
        assert_eq!(cfg.registry.pull_principals.len(), 3);
        assert_eq!(load(&[]).expect("valid").registry.name_prefix, "");

        for (set, key) in [
            (
                r#"registry.pull_principals=["arn:aws:iam::123456789012:role/*"]"#,
                "registry.pull_principals[0]",
            ),
            (
                r#"registry.pull_principals=["*"]"#,
                "registry.pull_principals[0]",
            ),
            (
                r#"registry.pull_principals=["arn:aws:iam::12345:role/x"]"#,
                "registry.pull_principals[0]",
            ),
            (
                r#"registry.pull_principals=["arn:aws:sts::123456789012:assumed-role/x/y"]"#,
                "registry.pull_principals[0]",
            ),
            ("registry.name_prefix=Tether/", "registry.name_prefix"),
            ("registry.name_prefix=/tether", "registry.name_prefix"),
        ] {
            let e = load(&[set]).expect_err(set).to_string();
            assert!(e.contains(key), "{set}: {e}");
            assert!(
                e.contains("not an IAM principal ARN") || e.contains("cannot start an ECR"),
                "{set}: {e}"
            );
        }
    }

    #[test]
    fn unset_tls_paths_stay_unset_when_resolved() {
        let mut tls = TlsConfig {
            ca: "ca.pem".into(),
            ..Default::default()
        };
        tls.resolve(Some(Path::new("/etc/tether")));
        assert_eq!(tls.ca, Path::new("/etc/tether/ca.pem"));
        assert!(is_unset(&tls.cert) && is_unset(&tls.key));
    }

    #[test]
    fn every_serialized_key_is_listed() {
        let cfg = AgentConfig {
            gateways: vec!["a:1".into()],
            connections: 2,
            server_name: Some("x".into()),
            instance_id: Some("i".into()),
            labels: [("k".to_string(), "v".to_string())].into(),
            services: Default::default(),
            default_service: "default".into(),
            tls: TlsConfig {
                ca: "a".into(),
                cert: "b".into(),
                key: "c".into(),
            },
            reconnect: Default::default(),
            ops: Default::default(),
            log: Default::default(),
            state_dir: Some("s".into()),
            identity: Default::default(),
            aws: AwsConfig {
                region: Some("r".into()),
                endpoint_url: Some("http://e".into()),
                max_attempts: 5,
            },
            kubernetes: KubernetesConfig {
                kubeconfig: Some("k".into()),
                ..Default::default()
            },
            registry: RegistryConfig {
                name_prefix: "tether/".into(),
                pull_principals: vec!["arn:aws:iam::123456789012:role/nodes".parse().unwrap()],
            },
            transport: Default::default(),
            proxy: ProxyConfig {
                url: Some("http://p:1".into()),
                no_proxy: Some("x".into()),
                username: Some("u".into()),
                password: Some("p".into()),
            },
            enrollment: EnrollmentConfig {
                token: Some("t".into()),
            },
            secrets: SecretsConfig {
                allow: vec!["a/*".parse().unwrap()],
            },
            environments: EnvironmentsConfig {
                egress: Egress::Deny,
                egress_allow: vec![EgressRule {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    ports: vec![1],
                    protocol: None,
                }],
                ..Default::default()
            },
            telemetry: tether_runtime::telemetry::TelemetryConfig {
                otlp_endpoint: Some("http://c:4317".into()),
                sample_ratio: 0.5,
            },
            paused: true,
            pause_reason: "r".into(),
            control_file: Some("c".into()),
            ledger: Default::default(),
            approvals: Default::default(),
        };
        let v = toml::Value::try_from(&cfg).unwrap();
        for (k, v) in v.as_table().unwrap() {
            match v.as_table() {
                Some(t) if k != "labels" && k != "services" => {
                    for sub in t.keys() {
                        let key = format!("{k}.{sub}");
                        assert!(KEYS.contains(&key.as_str()), "{key} missing from KEYS");
                    }
                }
                _ => assert!(KEYS.contains(&k.as_str()), "{k} missing from KEYS"),
            }
        }
    }
}
