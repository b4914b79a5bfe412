//! The northbound client used by `tetherctl` and `tether-gateway dev --check`: mutual TLS with a
//! control-plane certificate, endpoint details from flags or from `./.tether/dev.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// What `tether-gateway dev` writes for clients (`./.tether/dev.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevJson {
    /// Northbound gRPC `host:port`.
    pub northbound: String,
    /// Ops HTTP `host:port`.
    pub ops: String,
    /// CA bundle path.
    pub ca: PathBuf,
    /// Control-plane client certificate path.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// The dev agent's id.
    pub agent: String,
}

/// Default location of `dev.json`.
pub const DEV_JSON: &str = ".tether/dev.json";

impl DevJson {
    /// Reads a `dev.json`.
    pub fn read(path: &Path) -> Result<DevJson, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Where and how to reach the northbound API.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// CA bundle.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
    /// TLS name to verify; default: the host of `addr`.
    pub server_name: Option<String>,
}

impl From<&DevJson> for Target {
    fn from(d: &DevJson) -> Target {
        Target {
            addr: d.northbound.clone(),
            ca: d.ca.clone(),
            cert: d.client_cert.clone(),
            key: d.client_key.clone(),
            server_name: None,
        }
    }
}

/// Connects to the northbound API.
pub async fn connect(t: &Target) -> Result<Channel, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let host = t
        .addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(&t.addr);
    let name = t.server_name.clone().unwrap_or_else(|| host.to_owned());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&t.ca)?))
        .identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?))
        .domain_name(name);
    Channel::from_shared(format!("https://{}", t.addr))
        .map_err(|e| format!("northbound address {:?}: {e}", t.addr))?
        .tls_config(tls)
        .map_err(|e| format!("TLS: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach the northbound API at {}: {e}", t.addr))
}
