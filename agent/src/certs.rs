//! Checks on PEM certificates and keys: a chain, a key that goes with it, an issued
//! certificate that chains to the CA bundle, the agent id in its URI SAN. A leaf: enrollment,
//! renewal, the identity and the state directory all use it, and it imports none of them.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tether_runtime::tls::{self, TlsError};
use tunnel_proto::SpiffeId;

/// Why a certificate (chain) or key is not usable. Never quotes key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    /// The text is not PEM.
    #[error("not PEM: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// No certificate in it.
    #[error("no CERTIFICATE block found")]
    Missing,
    /// The CA bundle cannot verify anything (empty, or unusable roots).
    #[error("the CA bundle is unusable: {0}")]
    Roots(#[source] rustls::server::VerifierBuilderError),
    /// The certificate does not chain to the CA bundle (or is expired, or not for clients).
    #[error("does not verify against the CA bundle: {0}")]
    Untrusted(#[source] rustls::Error),
    /// The key is not a PEM private key (no detail: nothing about its bytes goes into an error).
    #[error("no usable private key")]
    Key,
    /// The key does not go with the certificate.
    #[error("the key does not go with the certificate: {0}")]
    KeyMismatch(#[source] rustls::Error),
    /// The certificate does not parse, or has no single Tether SPIFFE identity.
    #[error(transparent)]
    Identity(#[from] TlsError),
    /// The certificate's identity is not an agent's.
    #[error("{0} is not an agent identity (spiffe://<td>/tenant/<t>/agent/<a>)")]
    NotAnAgent(SpiffeId),
}

/// Every certificate of a PEM bundle; at least one.
pub fn pem_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertificateError::Pem)?;
    if certs.is_empty() {
        return Err(CertificateError::Missing);
    }
    Ok(certs)
}

/// The private key of a PEM text.
pub fn pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertificateError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| CertificateError::Key)
}

/// Checks that `key` goes with the chain `certs` (leaf first).
pub fn check_pair(
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), CertificateError> {
    rustls::sign::CertifiedKey::from_der(
        certs.to_vec(),
        key.clone_key(),
        &rustls::crypto::aws_lc_rs::default_provider(),
    )
    .map(|_| ())
    .map_err(CertificateError::KeyMismatch)
}

/// The certificate chain and key of PEM texts, when they belong together.
pub fn pair(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertificateError> {
    let certs = pem_chain(cert_pem.as_bytes())?;
    let key = pem_key(key_pem.as_bytes())?;
    check_pair(&certs, &key)?;
    Ok((certs, key))
}

/// Checks an issued certificate (PEM chain, leaf first): it chains to `roots` for client
/// authentication and carries the key `key_pem`. Returns the chain.
pub fn check_issued(
    certificate_pem: &str,
    key_pem: &str,
    roots: &rustls::RootCertStore,
) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let certs = pem_chain(certificate_pem.as_bytes())?;
    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots.clone()))
        .build()
        .map_err(CertificateError::Roots)?
        .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
        .map_err(CertificateError::Untrusted)?;
    check_pair(&certs, &pem_key(key_pem.as_bytes())?)?;
    Ok(certs)
}

/// `<tenant>/<agent>` from the leaf certificate's URI SAN.
pub fn agent_id(certs: &[CertificateDer<'_>]) -> Result<String, CertificateError> {
    let leaf = certs.first().ok_or(CertificateError::Missing)?;
    match tls::spiffe_id(leaf)? {
        SpiffeId::Agent { id, .. } => Ok(id.to_string()),
        other => Err(CertificateError::NotAnAgent(other)),
    }
}
