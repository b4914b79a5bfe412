//! Transport layer: the gateway's own TLS material (its certificate chain and key, and the CA
//! bundle peers must chain to), loaded once at start; the tunnel, the northbound listener and
//! the enrollment endpoint build their server configs from it, with what they share (no
//! session resumption) decided here once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tether_runtime::digest::sha256_hex;
use tether_runtime::tls::{self as runtime_tls, TlsError};

use crate::config::TlsConfig;

/// What the gateway reads of a peer's certificate: to refuse a revoked one, to show it in
/// `Agents/Get`, to renew it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// `notBefore`, Unix seconds.
    pub not_before: i64,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl CertFacts {
    /// Reads them from a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Result<CertFacts, TlsError> {
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| TlsError::X509(e.to_string()))?;
        Ok(CertFacts {
            fingerprint: sha256_hex(cert.as_ref()),
            serial: hex::encode(x509.raw_serial()),
            not_before: x509.validity().not_before.timestamp(),
            not_after: x509.validity().not_after.timestamp(),
        })
    }

    /// Whether this certificate was issued at or before `cutoff_ms` (Unix ms), for a
    /// revocation's cut-off: by its issue stamp ([`crate::identity::pki::issue_stamp`]) when
    /// it has one, else by its `notBefore` (whole seconds: one issued in the second of the
    /// cut-off counts as issued before it).
    pub fn issued_by(&self, cutoff_ms: i64) -> bool {
        let stamp = hex::decode(&self.serial)
            .ok()
            .and_then(|s| crate::identity::pki::issue_stamp(&s, self.not_before));
        match stamp {
            Some(ms) => ms <= cutoff_ms,
            None => self.not_before <= cutoff_ms.div_euclid(1000),
        }
    }

    /// `notAfter` as a time.
    pub fn not_after_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.not_after.max(0) as u64)
    }
}

/// A listener whose TLS config is built from [`TlsMaterial`], for the messages that name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The tunnel (QUIC, and TLS + HTTP/2 on TCP).
    Tunnel,
    /// The northbound API.
    Northbound,
    /// Enrollment, on the tunnel's TCP port.
    Enrollment,
}

/// Why a TLS (or QUIC) server config could not be built from material that loaded: the
/// operator's to fix, like a config error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// The client-certificate verifier refused the CA bundle.
    #[error("{}client verifier: {source}", if *.listener == Listener::Northbound { "northbound " } else { "" })]
    Verifier {
        /// Whose verifier.
        listener: Listener,
        /// What rustls said.
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the gateway's certificate or key.
    #[error("{} certificate: {source}", match .listener {
        Listener::Tunnel => "gateway",
        Listener::Northbound => "northbound",
        Listener::Enrollment => "enrollment",
    })]
    Certificate {
        /// Whose config.
        listener: Listener,
        /// What rustls said.
        source: rustls::Error,
    },
    /// QUIC cannot use the TLS config.
    #[error("QUIC TLS config: {0}")]
    Quic(quinn::crypto::rustls::NoInitialCipherSuite),
    /// The QUIC idle timeout derived from `tunnel.heartbeat_interval` is out of range.
    #[error("idle timeout out of range")]
    IdleTimeout,
}

/// The gateway's certificate chain and key, and the CA bundle (`[tls]`).
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    /// `tls.ca` as written: the bundle issued certificates go out with.
    ca_pem: String,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("roots", &self.roots.len())
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads `tls.ca`, `tls.cert` and `tls.key`, in that order; an error names the file.
    pub fn load(files: &TlsConfig) -> Result<TlsMaterial, TlsError> {
        const PKI: &str =
            "`tether-gateway pki init --dir <dir>` writes ca.pem, gateway.pem and gateway-key.pem";
        let roots =
            Arc::new(runtime_tls::load_roots(&files.ca).map_err(|e| e.for_key("tls.ca", PKI))?);
        let ca_pem = std::fs::read_to_string(&files.ca).map_err(|e| {
            TlsError::Pem {
                what: "CA bundle",
                path: files.ca.clone(),
                message: e.to_string(),
            }
            .for_key("tls.ca", PKI)
        })?;
        let certs = runtime_tls::load_certs("certificate", &files.cert)
            .map_err(|e| e.for_key("tls.cert", PKI))?;
        let key = runtime_tls::load_key(&files.key).map_err(|e| e.for_key("tls.key", PKI))?;
        Ok(TlsMaterial {
            roots,
            ca_pem,
            certs,
            key,
        })
    }

    /// `tls.ca` as written (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CAs peers' certificates must chain to.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// A server config presenting the gateway's certificate for `listener`, offering
    /// `versions` and `alpn`, with `verifier` for client certificates (none asked without
    /// one). Sessions are never resumed: a resumed handshake skips the client-certificate
    /// verifier, so a revoked, expired or retired-CA certificate would get back in on its old
    /// session ticket (and enrollment carries one request per connection: nothing to resume).
    pub fn server_config(
        &self,
        listener: Listener,
        versions: &[&'static rustls::SupportedProtocolVersion],
        verifier: Option<Arc<dyn ClientCertVerifier>>,
        alpn: &[u8],
    ) -> Result<rustls::ServerConfig, TlsSetupError> {
        let builder = rustls::ServerConfig::builder_with_protocol_versions(versions);
        let builder = match verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|source| TlsSetupError::Certificate { listener, source })?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        Ok(tls)
    }
}
