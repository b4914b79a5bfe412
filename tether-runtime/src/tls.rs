//! TLS material: PEM loading with errors that name the file, the process crypto provider, and
//! reading the SPIFFE identity out of a certificate's URI SAN.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tunnel_proto::{IdentityError, SpiffeId};

/// Why TLS material could not be loaded or an identity read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {message}")]
    Pem {
        /// What the file should hold (`certificate`, `private key`, `CA bundle`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The certificate is not parseable X.509.
    #[error("certificate does not parse: {0}")]
    X509(String),
    /// The certificate has no URI SAN.
    #[error("certificate has no URI SAN identity")]
    NoIdentity,
    /// The certificate has several URI SANs; exactly one is required.
    #[error("certificate has {0} URI SANs; exactly one identity is allowed")]
    SeveralIdentities(usize),
    /// The URI SAN is not a Tether SPIFFE identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The file a config key names could not be used: names the key, and what to do when the
    /// file is not there.
    #[error("{key}: {source}{}", missing_hint(source, hint))]
    Keyed {
        /// The config key (`tls.cert`).
        key: &'static str,
        /// What to do when the file does not exist.
        hint: &'static str,
        /// What went wrong with the file.
        #[source]
        source: Box<TlsError>,
    },
}

fn missing_hint(e: &TlsError, hint: &str) -> String {
    match e {
        TlsError::Pem { path, .. } if !hint.is_empty() && !path.exists() => {
            format!(" (no such file; {hint})")
        }
        _ => String::new(),
    }
}

impl TlsError {
    /// This error as one of the file config key `key` names, with `hint` for a file that is
    /// not there (what writes it).
    pub fn for_key(self, key: &'static str, hint: &'static str) -> TlsError {
        TlsError::Keyed {
            key,
            hint,
            source: Box::new(self),
        }
    }
}

/// The `[tls]` section both binaries share: a CA bundle (what the peer must chain to), this
/// side's certificate and its private key, as PEM files.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle the peer's certificate must chain to.
    pub ca: PathBuf,
    /// This side's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes relative paths relative to `base` (the config file's directory).
    pub fn resolve(&mut self, base: Option<&Path>) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            *p = crate::config::resolve(base, p);
        }
    }
}

/// Installs [`crypto_provider`] as the process's rustls provider. Idempotent; call first in
/// every `main` and test harness (mixing providers panics at run time otherwise).
pub fn install_crypto_provider() {
    let _ = crypto_provider().install_default();
}

/// aws-lc-rs with TLS 1.3's `TLS_AES_128_GCM_SHA256` first (rustls lists
/// `TLS_AES_256_GCM_SHA384` first); every other suite stays offered, in rustls's order.
///
/// AES-128-GCM is what Go's TLS and most browsers pick too. Its SHA-256 runs on the CPU's SHA
/// extensions, which x86 has for SHA-256 only: with SHA-384 the handshake's key schedule and
/// transcript hashing were 5% of a gateway's CPU during a reconnect storm (`perf`, see
/// docs/PERFORMANCE.md), and AES-128 protects every QUIC packet in fewer rounds.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // Stable: the other suites keep their order.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// The TLS alert the peer sent, when `e` is the error of a socket TLS runs on (rustls's typed
/// error inside the `io::Error` tokio-rustls returns).
pub fn received_alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// The TLS alert a QUIC connection was closed with, if it was: QUIC carries it as the
/// transport error code `CRYPTO_ERROR` (`0x100` + the alert).
pub fn quic_alert(e: &quinn::ConnectionError) -> Option<rustls::AlertDescription> {
    let quinn::ConnectionError::ConnectionClosed(close) = e else {
        return None;
    };
    let code = u64::from(close.error_code);
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| rustls::AlertDescription::from((code - 0x100) as u8))
}

/// All certificates in a PEM file.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// A root store holding every certificate of a PEM bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("CA bundle", path)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            what: "CA bundle",
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A certificate's validity period, `notBefore` and `notAfter`.
pub fn validity(
    cert: &CertificateDer<'_>,
) -> Result<(std::time::SystemTime, std::time::SystemTime), TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let s = t.timestamp();
        let d = std::time::Duration::from_secs(s.unsigned_abs());
        if s >= 0 {
            std::time::UNIX_EPOCH + d
        } else {
            std::time::UNIX_EPOCH - d
        }
    };
    let v = x509.validity();
    Ok((at(v.not_before), at(v.not_after)))
}

/// A certificate's issuer and subject, as distinguished names (`CN=…, O=…`), for a person.
pub fn issuer_and_subject(cert: &CertificateDer<'_>) -> Result<(String, String), TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::X509(e.to_string()))?;
    Ok((x509.issuer().to_string(), x509.subject().to_string()))
}

/// A trust anchor's subject (a distinguished name's content, without its SEQUENCE header, as
/// `RootCertStore` keeps it), for a person.
pub fn anchor_name(subject: &[u8]) -> String {
    let len = subject.len();
    let mut full = Vec::with_capacity(len + 4);
    full.push(0x30);
    if len < 0x80 {
        full.push(len as u8);
    } else if len < 0x100 {
        full.extend([0x81, len as u8]);
    } else {
        full.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    full.extend_from_slice(subject);
    <x509_parser::x509::X509Name as x509_parser::prelude::FromDer<x509_parser::error::X509Error>>::from_der(&full)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|_| "a CA whose name does not parse".into())
}

/// The SPIFFE identity in a certificate's single URI SAN.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let uris: Vec<String> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(TlsError::X509(e.to_string())),
    };
    match uris.as_slice() {
        [] => Err(TlsError::NoIdentity),
        [one] => Ok(SpiffeId::parse(one)?),
        many => Err(TlsError::SeveralIdentities(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_nothing_is_dropped() {
        let ours = crypto_provider();
        let stock = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let names = |p: &rustls::crypto::CryptoProvider| {
            let mut v: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
            v.sort_by_key(|s| u16::from(*s));
            v
        };
        assert_eq!(names(&ours), names(&stock));
        assert_eq!(ours.kx_groups.len(), stock.kx_groups.len());
    }
}

/// Checks a server's certificate as webpki does against a root store, remembering the leaf the
/// server presented and why it was refused: to explain a refusal to a person (which issuer, a
/// TLS-inspecting middlebox, a clock off), as `tetherctl` and `tether-agent doctor` do.
#[derive(Debug)]
pub struct RecordingVerifier {
    inner: std::sync::Arc<rustls::client::WebPkiServerVerifier>,
    presented: std::sync::Mutex<Option<CertificateDer<'static>>>,
    refused: std::sync::Mutex<Option<rustls::CertificateError>>,
}

impl RecordingVerifier {
    /// A verifier trusting `roots`.
    pub fn new(
        roots: std::sync::Arc<RootCertStore>,
    ) -> Result<std::sync::Arc<RecordingVerifier>, rustls::client::VerifierBuilderError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            std::sync::Arc::new(crypto_provider()),
        )
        .build()?;
        Ok(std::sync::Arc::new(RecordingVerifier {
            inner,
            presented: Default::default(),
            refused: Default::default(),
        }))
    }

    /// The leaf certificate the server presented, once it did.
    pub fn presented(&self) -> Option<CertificateDer<'static>> {
        self.presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the presented certificate was refused, if it was.
    pub fn refused(&self) -> Option<rustls::CertificateError> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl rustls::client::danger::ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(end_entity.clone().into_owned());
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(rustls::Error::InvalidCertificate(e)) = &verdict {
            *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
