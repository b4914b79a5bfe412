//! Transport layer: the client-certificate verifier for the tunnel listener.
//!
//! Wraps rustls' WebPKI verifier (chain to the configured CA, validity period, client-auth
//! purpose) and then requires exactly one URI SAN holding an *agent* identity of our trust
//! domain, whose certificate is not revoked ([`RevocationList`]). Every refusal is logged with its reason and counted in
//! `tether_gateway_handshake_failures_total{reason}`; the handshake fails with a TLS alert and
//! no other session is touched.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tether_runtime::tls::{TlsError, spiffe_id};
use tunnel_proto::SpiffeId;

use crate::identity::revocation::RevocationList;
use crate::metrics::{HandshakeFailure, count_handshake_failure};
use crate::tls::CertFacts;

/// See the module docs.
#[derive(Debug)]
pub struct AgentVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    revocations: Arc<RevocationList>,
}

impl AgentVerifier {
    /// Wraps a WebPKI verifier built on the CA bundle.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: String) -> Self {
        AgentVerifier {
            inner,
            trust_domain,
            revocations: Arc::default(),
        }
    }

    /// Also refuses the certificates `revocations` lists (`reason=HandshakeFailure::Revoked`).
    pub fn with_revocations(mut self, revocations: Arc<RevocationList>) -> Self {
        self.revocations = revocations;
        self
    }
}

/// The metric label for a certificate verification error.
fn reason_of(e: &rustls::Error) -> HandshakeFailure {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                HandshakeFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeFailure::NotYetValid
            }
            CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
            CertificateError::BadSignature => HandshakeFailure::BadSignature,
            CertificateError::Revoked => HandshakeFailure::Revoked,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                HandshakeFailure::WrongPurpose
            }
            _ => HandshakeFailure::InvalidCertificate,
        },
        _ => HandshakeFailure::InvalidCertificate,
    }
}

impl ClientCertVerifier for AgentVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            count_handshake_failure(reason_of(&e), &e.to_string());
            return Err(e);
        }
        let refuse = |reason: HandshakeFailure, detail: String| {
            count_handshake_failure(reason, &detail);
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        };
        match spiffe_id(end_entity) {
            Ok(SpiffeId::Agent { trust_domain, id }) if trust_domain == self.trust_domain => {
                let facts = match CertFacts::of(end_entity) {
                    Ok(f) => f,
                    Err(e) => return refuse(HandshakeFailure::BadIdentity, e.to_string()),
                };
                match self.revocations.refusal(&id, &facts) {
                    None => Ok(ClientCertVerified::assertion()),
                    Some(why) => {
                        count_handshake_failure(HandshakeFailure::Revoked, &why);
                        // The agent sees the `certificate_revoked` alert.
                        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
                    }
                }
            }
            Ok(SpiffeId::Agent { trust_domain, id }) => refuse(
                HandshakeFailure::WrongTrustDomain,
                format!(
                    "agent {id} is in trust domain {trust_domain:?}, not {:?}",
                    self.trust_domain
                ),
            ),
            Ok(other @ SpiffeId::ControlPlane { .. }) => refuse(
                HandshakeFailure::NotAnAgent,
                format!("{other} is a control-plane identity"),
            ),
            Ok(other @ SpiffeId::Gateway { .. }) => refuse(
                HandshakeFailure::NotAnAgent,
                format!("{other} is a gateway replica's identity (for the peer links only)"),
            ),
            Err(e @ (TlsError::NoIdentity | TlsError::SeveralIdentities(_))) => {
                refuse(HandshakeFailure::NoIdentity, e.to_string())
            }
            Err(e) => refuse(HandshakeFailure::BadIdentity, e.to_string()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
