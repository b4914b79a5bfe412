//! The gateway's configuration: TOML file, `TETHER_*` environment, `--set` flags.
//!
//! ```toml
//! trust_domain = "tether.local"
//! [tls]                       # paths are relative to this file
//! ca = "pki/ca.pem"           # trusted for agent and control-plane client certificates
//! cert = "pki/gateway.pem"
//! key = "pki/gateway-key.pem"
//! [tunnel]
//! listen = "0.0.0.0:7443"     # UDP (QUIC)
//! heartbeat_interval = "10s"
//! handshake_timeout = "10s"
//! drain_timeout = "15s"
//! [northbound]
//! listen = "0.0.0.0:7444"     # gRPC over TLS
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
//! [enrollment]                # agents enroll with a token on the tunnel's TCP port
//! ca_key = "pki/ca-key.pem"   # unset: enrollment is off
//! # ca_cert = "pki/ca.pem"    # the certificate of ca_key; default tls.ca
//! cert_ttl = "24h"            # lifetime of enrolled agents' certificates
//! token_ttl = "1h"            # default lifetime of a token
//! max_token_ttl = "7d"
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
    "northbound.listen",
    "ops.listen",
    "log.format",
    "log.level",
    "data_dir",
    "commands.max_payload",
    "commands.max_attempts",
    "commands.retry_backoff",
    "commands.max_retry_backoff",
    "commands.max_in_flight",
    "enrollment.ca_key",
    "enrollment.ca_cert",
    "enrollment.cert_ttl",
    "enrollment.token_ttl",
    "enrollment.max_token_ttl",
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
}

/// `[enrollment]`: tokens and the certificates they are redeemed for.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    /// The CA's private key (PEM) enrolled agents' certificates are signed with; unset:
    /// enrollment is off (`CreateToken` is FAILED_PRECONDITION).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<PathBuf>,
    /// The certificate of `ca_key` (PEM, first in the file); default `tls.ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Lifetime of an enrolled agent's certificate.
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
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            max_payload: 4 << 20,
            max_attempts: 10,
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(30),
            max_in_flight: 256,
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
    /// a session whose probe fails is closed even if its connection looks alive.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long a probe may take.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
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
        }
    }
}

/// The northbound gRPC listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NorthboundConfig {
    /// TCP address.
    pub listen: SocketAddr,
}

impl Default for NorthboundConfig {
    fn default() -> Self {
        NorthboundConfig {
            listen: ([0, 0, 0, 0], 7444).into(),
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
        let e = &self.enrollment;
        if e.cert_ttl < Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "enrollment.cert_ttl",
                "must be at least 1m",
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
        Ok(())
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
        let data = cfg.data_dir.take().unwrap_or_else(|| PathBuf::from("data"));
        cfg.data_dir = Some(tether_runtime::config::resolve(base, &data));
        for p in [&mut cfg.enrollment.ca_key, &mut cfg.enrollment.ca_cert]
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
            enrollment: EnrollmentConfig {
                ca_key: Some("k".into()),
                ca_cert: Some("c".into()),
                ..Default::default()
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
}
