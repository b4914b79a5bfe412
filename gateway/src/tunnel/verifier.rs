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

use crate::identity::revocation::{CertFacts, RevocationList};

/// Metric: refused agent handshakes by reason.
pub const HANDSHAKE_FAILURES: &str = "tether_gateway_handshake_failures_total";

/// Counts and logs one refused handshake.
pub fn count_refusal(reason: &'static str, detail: &str) {
    metrics::counter!(HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    tracing::warn!(reason, detail, "agent handshake refused");
}

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

    /// Also refuses the certificates `revocations` lists (`reason="revoked"`).
    pub fn with_revocations(mut self, revocations: Arc<RevocationList>) -> Self {
        self.revocations = revocations;
        self
    }
}

/// A stable metric label for a certificate verification error.
fn reason_of(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::Revoked => "revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            _ => "invalid_certificate",
        },
        _ => "invalid_certificate",
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
            count_refusal(reason_of(&e), &e.to_string());
            return Err(e);
        }
        let refuse = |reason: &'static str, detail: String| {
            count_refusal(reason, &detail);
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        };
        match spiffe_id(end_entity) {
            Ok(SpiffeId::Agent { trust_domain, id }) if trust_domain == self.trust_domain => {
                let facts = match CertFacts::of(end_entity) {
                    Ok(f) => f,
                    Err(e) => return refuse("bad_identity", e),
                };
                match self.revocations.refusal(&id, &facts) {
                    None => Ok(ClientCertVerified::assertion()),
                    Some(why) => {
                        count_refusal("revoked", &why);
                        // The agent sees the `certificate_revoked` alert.
                        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
                    }
                }
            }
            Ok(SpiffeId::Agent { trust_domain, id }) => refuse(
                "wrong_trust_domain",
                format!(
                    "agent {id} is in trust domain {trust_domain:?}, not {:?}",
                    self.trust_domain
                ),
            ),
            Ok(other @ SpiffeId::ControlPlane { .. }) => refuse(
                "not_an_agent",
                format!("{other} is a control-plane identity"),
            ),
            Err(e @ (TlsError::NoIdentity | TlsError::SeveralIdentities(_))) => {
                refuse("no_identity", e.to_string())
            }
            Err(e) => refuse("bad_identity", e.to_string()),
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
