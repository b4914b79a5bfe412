//! Transport + wiring: enrolling with a bootstrap token (`enrollment.token`), for an identity
//! kept in `state_dir`.
//!
//! At start, with `identity.source = "files"` and no `tls.cert`/`tls.key`:
//! - `<state_dir>/agent.pem` and `agent-key.pem` exist and no token is configured, or the token
//!   is the one they came from (`enrollment.json` records its SHA-256): run with them;
//! - otherwise, with a token: generate an ECDSA P-256 key (rcgen on aws-lc-rs; it never leaves
//!   this process but to its 0600 file), send a CSR with no name in it (the token decides the
//!   identity) to the gateway's tunnel port over TLS with ALPN `tether-enroll/1` — the gateway
//!   verified against `tls.ca` and `server_name`, through the HTTP CONNECT proxy when one
//!   applies, like the TCP transport — check that the certificate returned carries this key
//!   and chains to `tls.ca` or to the CA bundle that came with it (the gateway's, during a CA
//!   rotation the new CA is only there), then write key, certificate, that bundle
//!   (`gateway-ca.pem`, see [`crate::renew`]) and record (each atomically);
//! - without a token and without a certificate: an error saying what to do.
//!
//! An unreachable gateway is retried with the reconnect backoff, each configured gateway in
//! turn; a refusal (token unknown, used, expired or revoked; CSR refused) or a gateway whose
//! certificate `tls.ca` does not trust ends the agent with a clear error.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tether_api::v1;
use tether_api::v1::enrollment_client::EnrollmentClient;
use tether_runtime::digest::sha256_hex;
use tether_runtime::tls;
use tokio::io::{AsyncRead, AsyncWrite};
use tunnel_proto::{Backoff, ENROLL_ALPN};

use crate::config::{AgentConfig, split_host_port};
use crate::error::AgentError;
use crate::proxy::Proxy;

/// The enrolled certificate inside `state_dir`.
pub const CERT_FILE: &str = "agent.pem";
/// Its private key (mode 0600).
pub const KEY_FILE: &str = "agent-key.pem";
/// Which token the certificate came from (its SHA-256), so a restart does not enroll again.
pub const RECORD_FILE: &str = "enrollment.json";

/// How long one enrollment exchange may take, connection included.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The gateway refused the token or the CSR: a new token is needed (retrying cannot help).
    #[error("gateway {gateway} refused the enrollment: {message}")]
    Refused {
        /// The gateway address.
        gateway: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The gateway's words (token used, expired, revoked, ...).
        message: String,
    },
    /// The gateway's certificate does not chain to `tls.ca` (or not for `server_name`): the
    /// wrong gateway, or the wrong CA bundle. Retrying cannot help.
    #[error(
        "gateway {gateway} is not trusted: {reason} (is tls.ca the CA bundle of this gateway, and server_name its name?)"
    )]
    Untrusted {
        /// The gateway address.
        gateway: String,
        /// What TLS said.
        reason: String,
    },
    /// The gateway could not be reached or did not answer; retried with backoff.
    #[error("gateway {gateway}: {reason}")]
    Unreachable {
        /// The gateway address.
        gateway: String,
        /// What failed.
        reason: String,
    },
    /// What the gateway sent back is not a certificate for this agent's key from `tls.ca`.
    #[error("gateway {gateway} returned an unusable certificate: {reason}")]
    BadCertificate {
        /// The gateway address.
        gateway: String,
        /// What is wrong.
        reason: String,
    },
    /// No certificate in `state_dir` and no token to get one.
    #[error(
        "no certificate in {dir} and no enrollment.token: create a token (`tetherctl tokens create <tenant> <agent>`) and set enrollment.token or TETHER_ENROLLMENT_TOKEN"
    )]
    NoToken {
        /// The state directory.
        dir: PathBuf,
    },
    /// The state directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The key or CSR could not be generated.
    #[error("generating the key and CSR: {0}")]
    Key(String),
}

impl EnrollError {
    /// True when trying again later can help (the gateway was unreachable or unavailable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, EnrollError::Unreachable { .. })
    }
}

/// What `enrollment.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// SHA-256 of the token the certificate came from, hex.
    token_sha256: String,
    /// `<tenant>/<agent>`.
    agent: String,
}

/// Makes sure `state_dir` holds a certificate and key for the agent; see the module docs.
pub async fn ensure(cfg: &AgentConfig) -> Result<(), AgentError> {
    let Some(dir) = cfg.state_dir.as_deref() else {
        return Ok(());
    };
    // A renewal interrupted by a restart is finished first: it is the newer identity.
    crate::renew::recover(cfg)?;
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    let have = cert.exists() && key.exists();
    let token = cfg
        .enrollment
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return if have {
            Ok(())
        } else {
            Err(EnrollError::NoToken {
                dir: dir.to_owned(),
            }
            .into())
        };
    };
    let token_sha256 = sha256_hex(token.as_bytes());
    if have {
        let used = std::fs::read(dir.join(RECORD_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .is_some_and(|r| r.token_sha256 == token_sha256);
        if used {
            tracing::debug!(dir = %dir.display(), "enrolled earlier with this token: using its certificate");
            return Ok(());
        }
        tracing::info!(dir = %dir.display(), "a new enrollment token is configured: enrolling again");
    }
    let client = EnrollClient::new(cfg)?;
    let key_pair = rcgen::KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key_pair)
        .and_then(|c| c.pem())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut backoff = Backoff::new(cfg.reconnect.initial_backoff, cfg.reconnect.max_backoff);
    let (gateway, response) = 'attempts: loop {
        let mut last = None;
        for gateway in &cfg.gateways {
            match client.enroll(gateway, token, &csr).await {
                Ok(r) => break 'attempts (gateway.clone(), r),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "enrollment attempt failed; trying again");
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tracing::info!(?delay, error = ?last.map(|e| e.to_string()), "enrolling again after backoff");
        tokio::time::sleep(delay).await;
    };
    let bad = |reason: String| EnrollError::BadCertificate {
        gateway: gateway.clone(),
        reason,
    };
    let key_pem = key_pair.serialize_pem();
    let mut roots = tls::load_roots(&cfg.tls.ca)?;
    for c in CertificateDer::pem_slice_iter(response.ca_pem.as_bytes()).flatten() {
        let _ = roots.add(c);
    }
    check_issued(&response.certificate_pem, &key_pem, &roots).map_err(bad)?;
    create_dir(dir)?;
    if !response.ca_pem.trim().is_empty() {
        write_file(
            &dir.join(crate::renew::CA_FILE),
            response.ca_pem.as_bytes(),
            false,
        )?;
    }
    write_file(&key, key_pem.as_bytes(), true)?;
    write_file(&cert, response.certificate_pem.as_bytes(), false)?;
    let record = Record {
        token_sha256,
        agent: response.agent.clone(),
    };
    write_file(
        &dir.join(RECORD_FILE),
        &serde_json::to_vec_pretty(&record).expect("record serializes"),
        false,
    )?;
    let not_after = response
        .not_after
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default();
    tracing::info!(agent = %response.agent, %gateway, %not_after, cert = %cert.display(),
        "enrolled: certificate and key written");
    Ok(())
}

/// Checks an issued certificate (PEM chain, leaf first): it chains to `roots` for client
/// authentication and carries the key `key_pem`. Returns the chain.
pub(crate) fn check_issued(
    certificate_pem: &str,
    key_pem: &str,
    roots: &rustls::RootCertStore,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    let leaf = certs.first().ok_or("no certificate")?;
    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots.clone()))
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(leaf, &certs[1..], UnixTime::now())
        .map_err(|e| format!("does not verify against the CA bundle: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    rustls::sign::CertifiedKey::from_der(
        certs.clone(),
        key,
        &rustls::crypto::aws_lc_rs::default_provider(),
    )
    .map_err(|e| format!("it is not for this agent's key: {e}"))?;
    Ok(certs)
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), EnrollError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| EnrollError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Writes beside and renames, so a reader never sees half a file; `secret` files are 0600
/// from creation on.
pub(crate) fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), EnrollError> {
    let io = |source| EnrollError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One enrollment exchange with a gateway; see the module docs.
#[derive(Clone)]
pub struct EnrollClient {
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
    proxy: Option<Proxy>,
}

impl std::fmt::Debug for EnrollClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollClient")
            .field("server_name", &self.server_name)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl EnrollClient {
    /// TLS 1.3 trusting `tls.ca`, no client certificate, ALPN `tether-enroll/1`.
    pub fn new(cfg: &AgentConfig) -> Result<EnrollClient, AgentError> {
        tls::install_crypto_provider();
        let roots = tls::load_roots(&cfg.tls.ca)?;
        let mut tls =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(roots)
                .with_no_client_auth();
        tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
        let proxy = Proxy::from_config(&cfg.proxy, |k| std::env::var(k).ok())
            .map_err(|e| AgentError::Tls(format!("proxy: {e}")))?;
        Ok(EnrollClient {
            tls: Arc::new(tls),
            server_name: cfg.server_name.clone(),
            proxy,
        })
    }

    /// Sends `Enroll {token, csr_pem}` to `gateway` (`host:port`, its tunnel port).
    pub async fn enroll(
        &self,
        gateway: &str,
        token: &str,
        csr_pem: &str,
    ) -> Result<v1::EnrollResponse, EnrollError> {
        let unreachable = |reason: String| EnrollError::Unreachable {
            gateway: gateway.to_owned(),
            reason,
        };
        let exchange = async {
            let io = self.connect(gateway).await?;
            // The connection is ours already: hand it to tonic once.
            let slot = Arc::new(Mutex::new(Some(io)));
            let connector = tower::service_fn(move |_: http::Uri| {
                let io = slot.lock().expect("slot").take();
                async move {
                    io.map(TokioIo::new)
                        .ok_or_else(|| std::io::Error::other("the enrollment connection is gone"))
                }
            });
            let channel = tonic::transport::Endpoint::from_static("http://tether-enroll")
                .connect_with_connector(connector)
                .await
                .map_err(|e| unreachable(format!("HTTP/2: {e}")))?;
            EnrollmentClient::new(channel)
                .enroll(v1::EnrollRequest {
                    token: token.to_owned(),
                    csr_pem: csr_pem.to_owned(),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted => {
                        unreachable(format!("{:?}: {}", s.code(), s.message()))
                    }
                    code => EnrollError::Refused {
                        gateway: gateway.to_owned(),
                        code,
                        message: s.message().to_owned(),
                    },
                })
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {EXCHANGE_TIMEOUT:?}")))?
    }

    /// TCP (through the proxy when one applies) and TLS with the gateway verified.
    async fn connect(
        &self,
        gateway: &str,
    ) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, EnrollError> {
        let unreachable = |reason: String| EnrollError::Unreachable {
            gateway: gateway.to_owned(),
            reason,
        };
        let (host, _) = split_host_port(gateway)
            .ok_or_else(|| unreachable("the address is not host:port".into()))?;
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| EnrollError::Untrusted {
                gateway: gateway.to_owned(),
                reason: format!("server name {name:?}: {e}"),
            })?;
        let io: Box<dyn Io> = match self.proxy.as_ref().filter(|p| p.applies_to(host)) {
            Some(proxy) => Box::new(proxy.connect(gateway).await.map_err(unreachable)?),
            None => {
                let tcp = tokio::net::TcpStream::connect(gateway)
                    .await
                    .map_err(|e| unreachable(format!("TCP: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
        };
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(server_name, io)
            .await
            .map_err(|e| {
                let rustls_error = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .cloned();
                match rustls_error {
                    Some(
                        err @ (rustls::Error::InvalidCertificate(_)
                        | rustls::Error::NoApplicationProtocol),
                    ) => EnrollError::Untrusted {
                        gateway: gateway.to_owned(),
                        reason: err.to_string(),
                    },
                    Some(rustls::Error::AlertReceived(
                        rustls::AlertDescription::NoApplicationProtocol,
                    )) => EnrollError::Untrusted {
                        gateway: gateway.to_owned(),
                        reason: "it does not serve enrollment (ALPN tether-enroll/1)".into(),
                    },
                    _ => unreachable(format!("TLS: {e}")),
                }
            })?;
        Ok(tls)
    }
}
