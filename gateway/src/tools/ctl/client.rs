//! The northbound client used by `tetherctl` and `tether-gateway dev --check`: mutual TLS with a
//! control-plane certificate and/or a bearer token, endpoint details from flags or from
//! `./.tether/dev.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::tools::ctl::diagnose;

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
    channel(t, Some(read_identity(t)?)).await
}

/// Sends a bearer token as `authorization` metadata on every call. Its `Debug` hides the token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<token>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// `token`, or nothing to send.
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        token
            .map(|t| {
                let mut v: MetadataValue<Ascii> = format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| "the token is not printable ASCII".to_string())?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()
            .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A northbound connection that sends a bearer token (or none) with every call.
pub type Conn = InterceptedService<Channel, Bearer>;

/// Connects with `token` on every call, and `t`'s client certificate unless `t.cert` is empty
/// (a caller with a token may present none).
pub async fn connect_with_token(t: &Target, token: Option<&str>) -> Result<Conn, String> {
    let bearer = Bearer::new(token)?;
    let identity = if t.cert.as_os_str().is_empty() {
        None
    } else {
        Some(read_identity(t)?)
    };
    Ok(InterceptedService::new(channel(t, identity).await?, bearer))
}

/// The client certificate and key files of `t`.
fn read_identity(t: &Target) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).map_err(|e| {
            format!(
                "the client {what} {} (--{what}): {e}{}",
                p.display(),
                if e.kind() == std::io::ErrorKind::NotFound {
                    "; `tether-gateway pki issue-client <name>` writes one"
                } else {
                    ""
                }
            )
        })
    };
    Ok((read(&t.cert, "cert")?, read(&t.key, "key")?))
}

async fn channel(t: &Target, identity: Option<(Vec<u8>, Vec<u8>)>) -> Result<Channel, String> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| format!("the CA bundle {} (--ca): {e}", p.display()))
    };
    let host = t
        .addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(&t.addr);
    let name = t.server_name.clone().unwrap_or_else(|| host.to_owned());
    let ca = read(&t.ca)?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name(name.clone());
    if let Some((cert, key)) = &identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let connected = Channel::from_shared(format!("https://{}", t.addr))
        .map_err(|e| format!("northbound address {:?} is not host:port: {e}", t.addr))?
        // HTTP/2 frames as large as the gateway's (fewer frames, and wake-ups, per byte).
        .max_frame_size(crate::northbound::listener::MAX_FRAME_SIZE)
        .connect_timeout(diagnose::CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| format!("TLS: {}", tether_runtime::report::chain(&e)))?
        .connect()
        .await;
    match connected {
        Ok(c) => Ok(c),
        Err(e) => {
            let why = diagnose::diagnose(
                t,
                &name,
                &ca,
                identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
            )
            .await
            .unwrap_or_else(|| tether_runtime::report::chain(&e));
            Err(format!(
                "cannot reach the northbound API at {}: {why}",
                t.addr
            ))
        }
    }
}
