//! Feature layer: the check of a certificate signing request, for enrollment and renewal
//! alike. The CSR contributes its public key (ECDSA P-256 or Ed25519, signature verified) and
//! may ask for the identity it is for, or for no SAN; anything else it asks for (another or a
//! further SAN, CA rights, certificate signing, an unknown extension) is refused with the
//! reason rather than silently dropped.

use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;

/// Why a CSR is refused: always the requester's doing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The text is not a PEM `CERTIFICATE REQUEST`.
    #[error("not a PEM certificate request: {0}")]
    NotPem(rustls_pki_types::pem::Error),
    /// The DER is not a PKCS#10 request.
    #[error("does not parse as PKCS#10: {0}")]
    NotPkcs10(x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The key is neither ECDSA P-256 nor Ed25519.
    #[error("key type {algorithm}{} is not allowed: use ECDSA P-256 or Ed25519", .curve.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    KeyType {
        /// The key's algorithm OID.
        algorithm: String,
        /// Its curve OID, when it names one.
        curve: Option<String>,
    },
    /// It asks for another identity than the one it is for, or for more than one.
    #[error(
        "it asks for the subject alternative name(s) {asked:?}; this token is for {identity} only (ask for it, or for no SAN)"
    )]
    OtherNames {
        /// The names it asks for.
        asked: Vec<String>,
        /// The identity it is for.
        identity: String,
    },
    /// It asks for CA rights.
    #[error("it asks for a CA certificate")]
    Ca,
    /// It asks for certificate or CRL signing.
    #[error("it asks for certificate or CRL signing")]
    Signing,
    /// It asks for an extension this check does not know.
    #[error("it asks for an unsupported extension {0}")]
    UnsupportedExtension(String),
    /// It asks for a known extension that has no place in an agent certificate.
    #[error("it asks for an extension not allowed here: {0}")]
    ExtensionNotAllowed(String),
    /// Its signature does not verify.
    #[error("its signature does not verify")]
    BadSignature,
    /// rcgen cannot use it.
    #[error("it cannot be used: {0}")]
    Unusable(rcgen::Error),
    /// Its signature algorithm is not the one of its key.
    #[error("its signature algorithm does not go with its key (ECDSA P-256 signs with SHA-256)")]
    SignatureAlgorithm,
}

/// Checks a PEM CSR against the module docs' rules for `identity` (the token's URI); returns
/// its verified public key.
pub fn check_csr(csr_pem: &str, identity: &str) -> Result<rcgen::PublicKey, CsrError> {
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(CsrError::NotPem)?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(CsrError::NotPkcs10)?;
    let spki = &csr.certification_request_info.subject_pki.algorithm;
    let curve = spki
        .parameters
        .clone()
        .and_then(|p| x509_parser::oid_registry::Oid::try_from(p).ok());
    let key_ok = (spki.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256))
        || spki.algorithm == OID_SIG_ED25519;
    if !key_ok {
        return Err(CsrError::KeyType {
            algorithm: spki.algorithm.to_string(),
            curve: curve.map(|c| c.to_string()),
        });
    }
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                let asked: Vec<String> = san
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::URI(u) => (*u).to_owned(),
                        other => other.to_string(),
                    })
                    .collect();
                if asked.len() > 1 || asked.iter().any(|a| a != identity) {
                    return Err(CsrError::OtherNames {
                        asked,
                        identity: identity.to_owned(),
                    });
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::Ca),
            ParsedExtension::BasicConstraints(_) | ParsedExtension::ExtendedKeyUsage(_) => {}
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(CsrError::Signing);
            }
            ParsedExtension::KeyUsage(_) => {}
            ParsedExtension::UnsupportedExtension { oid } => {
                return Err(CsrError::UnsupportedExtension(oid.to_string()));
            }
            other => return Err(CsrError::ExtensionNotAllowed(format!("{other:?}"))),
        }
    }
    let params = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        other => CsrError::Unusable(other),
    })?;
    // rcgen infers the key's algorithm from the signature's: they must agree with the key.
    let alg = rcgen::PublicKeyData::algorithm(&params.public_key);
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ED25519 {
        return Err(CsrError::SignatureAlgorithm);
    }
    Ok(params.public_key)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ID: &str = "spiffe://td/tenant/acme/agent/a";

    pub(crate) fn csr(params: rcgen::CertificateParams, key: &rcgen::KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    pub(crate) fn with_uris(uris: &[&str]) -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::default();
        for u in uris {
            p.subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        p
    }

    #[test]
    fn csr_for_the_identity_or_for_nothing_is_accepted() {
        let key = rcgen::KeyPair::generate().unwrap();
        check_csr(&csr(with_uris(&[ID]), &key), ID).unwrap();
        check_csr(&csr(with_uris(&[]), &key), ID).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        check_csr(&csr(with_uris(&[ID]), &ed), ID).unwrap();
    }

    #[test]
    fn csr_asking_for_more_or_other_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = "spiffe://td/tenant/globex/agent/a";
        let e = check_csr(&csr(with_uris(&[other]), &key), ID)
            .unwrap_err()
            .to_string();
        assert!(e.contains("globex"), "{e}");
        let e = check_csr(&csr(with_uris(&[ID, other]), &key), ID)
            .unwrap_err()
            .to_string();
        assert!(e.contains("subject alternative name"), "{e}");
        let mut dns = with_uris(&[ID]);
        dns.subject_alt_names
            .push(rcgen::SanType::DnsName("evil.example".try_into().unwrap()));
        assert!(check_csr(&csr(dns, &key), ID).is_err());
        let mut ca = with_uris(&[ID]);
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let e = check_csr(&csr(ca, &key), ID).unwrap_err().to_string();
        assert!(e.contains("CA"), "{e}");
        let mut signing = with_uris(&[]);
        signing.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        assert!(check_csr(&csr(signing, &key), ID).is_err());
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = check_csr(&csr(with_uris(&[ID]), &p384), ID)
            .unwrap_err()
            .to_string();
        assert!(e.contains("P-256"), "{e}");
        assert!(check_csr("not pem", ID).is_err());
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        use base64::Engine as _;
        let key = rcgen::KeyPair::generate().unwrap();
        let req = with_uris(&[ID]).serialize_request(&key).unwrap();
        let mut der = req.der().to_vec();
        let n = der.len();
        der[n - 10] ^= 0x01; // inside the signature
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        let e = check_csr(&pem, ID).unwrap_err().to_string();
        assert!(e.contains("signature"), "{e}");
    }
}
