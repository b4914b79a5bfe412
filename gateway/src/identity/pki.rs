//! PKI with rcgen (backend layer): a CA, the gateway's server certificate, agent and
//! control-plane client certificates, and the replicas' peer certificates. ECDSA P-256
//! everywhere: small and fast to verify.
//!
//! Directory layout written by `pki init` (keys mode 0600):
//! `ca.pem`, `ca-key.pem`, `gateway.pem`, `gateway-key.pem`, `trust-domain`.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use tunnel_proto::identity::{check_name, check_trust_domain};
use tunnel_proto::{AgentId, SpiffeId};

/// Why a PKI operation failed. All are the operator's to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `pki init` would overwrite an existing CA.
    #[error(
        "{0} already holds a CA; pass --force to replace it (every issued certificate becomes useless)"
    )]
    Exists(PathBuf),
    /// rcgen refused the parameters or the stored material.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name, tenant or trust domain is not valid in an identity.
    #[error(transparent)]
    Identity(#[from] tunnel_proto::IdentityError),
    /// A gateway name is neither a DNS name nor an IP address.
    #[error("gateway name {0:?} is neither a DNS name nor an IP address")]
    GatewayName(String),
    /// `--dir` holds no CA (`pki init` writes one).
    #[error(
        "{} holds no CA ({} is missing): create one with `tether-gateway pki init --dir {}`, or pass the --dir `pki init` wrote to",
        .0.display(), .1, .0.display()
    )]
    NoCa(PathBuf, &'static str),
    /// The CA certificate does not belong to the CA key.
    #[error("{cert}: {reason}")]
    CaMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// What does not match.
        reason: String,
    },
}

/// A certificate and its private key, PEM. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Common name, for humans.
    pub common_name: String,
    /// URI SANs (the SPIFFE identity).
    pub uris: Vec<String>,
    /// DNS names and IPs, for server certificates.
    pub names: Vec<String>,
    /// Valid from.
    pub not_before: OffsetDateTime,
    /// Valid until.
    pub not_after: OffsetDateTime,
    /// Server (true) or client (false) usage.
    pub server: bool,
    /// When the certificate counts as issued for revocation (see [`issue_stamp`]): stamped
    /// into its serial number. `None`: no stamp, and a revocation cut-off judges it by its
    /// `notBefore` (the gateway's own issuance, whose backdated `notBefore` is what refuses a
    /// renewal racing a revocation).
    pub issued_at: Option<OffsetDateTime>,
}

/// First byte of a serial number that carries the moment of issue: `0x54`, then the Unix
/// time in milliseconds (8 bytes, big-endian), then 8 random bytes.
const ISSUE_STAMP_TAG: u8 = 0x54;

/// The serial number of a certificate issued at `at_ms` (Unix ms).
fn stamped_serial(at_ms: i64) -> Vec<u8> {
    let mut serial = Vec::with_capacity(17);
    serial.push(ISSUE_STAMP_TAG);
    serial.extend_from_slice(&at_ms.to_be_bytes());
    serial.extend_from_slice(&rand::random::<[u8; 8]>());
    serial
}

/// The moment of issue (Unix ms) a certificate with this serial number and `notBefore` (Unix
/// seconds) was stamped with by `pki issue-agent` / `issue-client`, if it was.
///
/// Why: a revocation refuses the certificates of an agent *issued until then*. `notBefore`
/// cannot say when that was (it is backdated a minute for clock skew, and has one-second
/// resolution), so a certificate issued right after a revocation would count as issued
/// before it. The stamp says it to the millisecond. It is believed only when it agrees with
/// `notBefore` (a stamped certificate is valid from one minute before its issue), so no
/// serial number of another issuer is ever read as one.
pub fn issue_stamp(serial: &[u8], not_before: i64) -> Option<i64> {
    if serial.len() != 17 || serial[0] != ISSUE_STAMP_TAG {
        return None;
    }
    let ms = i64::from_be_bytes(serial[1..9].try_into().ok()?);
    let from = not_before.checked_mul(1000)?;
    (from..=from + 120_000).contains(&ms).then_some(ms)
}

impl LeafSpec {
    /// A client certificate for `uri`, valid from a minute ago (clock skew) for `ttl`, stamped
    /// as issued now ([`issue_stamp`]).
    pub fn client(common_name: &str, uri: String, ttl: Duration) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: common_name.to_owned(),
            uris: vec![uri],
            names: Vec::new(),
            not_before: now - time::Duration::minutes(1),
            not_after: now + ttl,
            server: false,
            issued_at: Some(now),
        }
    }
}

/// A loaded certificate authority.
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    key: KeyPair,
    /// The trust domain identities are issued in.
    pub trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Default lifetime of agent certificates.
pub const AGENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of control-plane client certificates.
pub const CLIENT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default lifetime of a replica's peer certificate (read at start: a new one takes a restart).
pub const PEER_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl Ca {
    /// A new self-signed CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Ca, PkiError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        // Named for its key too: during a CA rotation old and new CA are told apart by name
        // (in tools, and when a verifier looks for a certificate's issuer).
        let id = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key_raw());
        let id = hex::encode(&id.as_ref()[..4]);
        params.distinguished_name = dn(&format!("Tether CA {trust_domain} {id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + CA_TTL;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Loads the CA written by [`init`] in `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        for file in ["ca.pem", "ca-key.pem", "trust-domain"] {
            if !dir.join(file).exists() {
                return Err(PkiError::NoCa(dir.to_owned(), file));
            }
        }
        let cert_pem = read(&dir.join("ca.pem"))?;
        let key = KeyPair::from_pem(&read(&dir.join("ca-key.pem"))?)?;
        let trust_domain = read(&dir.join("trust-domain"))?.trim().to_owned();
        check_trust_domain(&trust_domain)?;
        Ok(Ca {
            cert_pem,
            key,
            trust_domain,
        })
    }

    /// Loads a CA from its key file and the certificate of that key, found in `cert` (a PEM
    /// bundle: during a CA rotation `tls.ca` holds the old and the new CA, and the key says
    /// which one signs).
    pub fn from_files(cert: &Path, key: &Path, trust_domain: &str) -> Result<Ca, PkiError> {
        check_trust_domain(trust_domain)?;
        let bundle = read(cert)?;
        let mismatch = |reason: String| PkiError::CaMismatch {
            cert: cert.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&read(key)?)?;
        let blocks = pem_certificates(&bundle);
        if blocks.is_empty() {
            return Err(mismatch("no CERTIFICATE block".into()));
        }
        for pem in blocks {
            let der = pem_block_der(&pem).ok_or_else(|| mismatch("not PEM".into()))?;
            let (_, x509) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| mismatch(format!("does not parse: {e}")))?;
            if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                continue;
            }
            if !x509.is_ca() {
                return Err(mismatch(
                    "the certificate of the CA key is not a CA certificate".into(),
                ));
            }
            return Ok(Ca {
                cert_pem: pem,
                key,
                trust_domain: trust_domain.to_owned(),
            });
        }
        Err(mismatch(
            "no certificate in it is the certificate of the CA key".into(),
        ))
    }

    /// Signs a leaf certificate for a public key the holder generated (and keeps).
    pub fn sign(
        &self,
        spec: &LeafSpec,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, PkiError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(leaf_params(spec)?.signed_by(public_key, &issuer)?.pem())
    }

    /// Issues a leaf certificate with a fresh key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let cert = leaf_params(spec)?.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// An agent certificate for `id`.
    pub fn issue_agent(&self, id: &AgentId, ttl: Duration) -> Result<Issued, PkiError> {
        self.issue(&LeafSpec::client(
            &id.to_string(),
            id.to_uri(&self.trust_domain),
            ttl,
        ))
    }

    /// A control-plane caller certificate for `name`.
    pub fn issue_client(&self, name: &str, ttl: Duration) -> Result<Issued, PkiError> {
        check_name("name", name)?;
        self.issue(&LeafSpec::client(
            name,
            SpiffeId::controlplane_uri(&self.trust_domain, name),
            ttl,
        ))
    }

    /// A gateway replica's peer certificate: `spiffe://<td>/gateway/<replica>` as its only URI
    /// SAN, for client *and* server authentication (each replica both dials and accepts peer
    /// links), valid from a minute ago for `ttl`. Agents and callers are refused where it is
    /// accepted, and it is refused where they are.
    pub fn issue_gateway(&self, replica: &str, ttl: Duration) -> Result<Issued, PkiError> {
        tunnel_proto::identity::check_replica(replica)?;
        let spec = LeafSpec::client(
            &format!("gateway {replica}"),
            SpiffeId::gateway_uri(&self.trust_domain, replica),
            ttl,
        );
        let mut params = leaf_params(&spec)?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The gateway's server certificate for the given DNS names and IPs.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.issue(&LeafSpec {
            common_name: names
                .first()
                .cloned()
                .unwrap_or_else(|| "tether-gateway".into()),
            uris: Vec::new(),
            names: names.to_vec(),
            not_before: now - time::Duration::minutes(1),
            not_after: now + SERVER_TTL,
            server: true,
            issued_at: None,
        })
    }
}

/// The parameters of a leaf certificate: `spec`'s names and dates, digital signature only,
/// client or server authentication, never a CA.
fn leaf_params(spec: &LeafSpec) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&spec.common_name);
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    if let Some(at) = spec.issued_at {
        let ms = (at.unix_timestamp_nanos() / 1_000_000) as i64;
        params.serial_number = Some(rcgen::SerialNumber::from(stamped_serial(ms)));
    }
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if spec.server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    for u in &spec.uris {
        params
            .subject_alt_names
            .push(SanType::URI(u.as_str().try_into()?));
    }
    for n in &spec.names {
        params.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.as_str()
                    .try_into()
                    .map_err(|_| PkiError::GatewayName(n.clone()))?,
            ),
        });
    }
    Ok(params)
}

/// Every `CERTIFICATE` block of a PEM bundle, each as PEM.
pub fn pem_certificates(bundle: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    out
}

/// True when `bundle` (PEM) holds the certificate `cert_pem` (compared as DER).
pub fn bundle_contains(bundle: &str, cert_pem: &str) -> bool {
    let Some(want) = pem_block_der(cert_pem) else {
        return false;
    };
    pem_certificates(bundle)
        .iter()
        .any(|c| pem_block_der(c).as_ref() == Some(&want))
}

/// The DER inside one PEM block.
fn pem_block_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether");
    dn.push(DnType::CommonName, cn);
    dn
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path`; `secret` files get mode 0600 from creation on.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    // Write beside and rename, so a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// `pki init`: a CA and the gateway's server certificate in `dir`.
pub fn init(dir: &Path, trust_domain: &str, names: &[String], force: bool) -> Result<Ca, PkiError> {
    if dir.join("ca-key.pem").exists() && !force {
        return Err(PkiError::Exists(dir.to_owned()));
    }
    let ca = Ca::generate(trust_domain)?;
    let server = ca.issue_server(names)?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem, false)?;
    write_file(&dir.join("ca-key.pem"), &ca.key.serialize_pem(), true)?;
    write_file(&dir.join("gateway.pem"), &server.cert_pem, false)?;
    write_file(&dir.join("gateway-key.pem"), &server.key_pem, true)?;
    write_file(
        &dir.join("trust-domain"),
        &format!("{trust_domain}\n"),
        false,
    )?;
    Ok(ca)
}

/// Writes an issued pair plus the CA bundle into `out` as `<stem>.pem`, `<stem>-key.pem`, `ca.pem`.
pub fn write_issued(out: &Path, stem: &str, issued: &Issued, ca: &Ca) -> Result<(), PkiError> {
    write_file(&out.join(format!("{stem}.pem")), &issued.cert_pem, false)?;
    write_file(&out.join(format!("{stem}-key.pem")), &issued.key_pem, true)?;
    write_file(&out.join("ca.pem"), &ca.cert_pem, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_an_issued_certificate_never_shows_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), "td", &["localhost".into()], false).unwrap();
        let issued = ca.issue_client("api", CLIENT_TTL).unwrap();
        let text = format!("{issued:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(text.contains("BEGIN CERTIFICATE"), "{text}");
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_keys_with_mode_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            "td.example",
            &["localhost".into(), "127.0.0.1".into()],
            false,
        )
        .unwrap();
        for key in ["ca-key.pem", "gateway-key.pem"] {
            let mode = fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(matches!(
            init(dir.path(), "td.example", &["x".into()], false),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn issued_agent_certificate_carries_the_identity_uri() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "td.example", &["localhost".into()], false).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let id: AgentId = "acme/eu-1".parse().unwrap();
        let issued = ca.issue_agent(&id, AGENT_TTL).unwrap();
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let got = tether_runtime::tls::spiffe_id(&der).unwrap();
        assert_eq!(
            got,
            SpiffeId::Agent {
                trust_domain: "td.example".into(),
                id
            }
        );
    }

    #[test]
    fn a_peer_certificate_carries_the_gateway_identity_for_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), "td.example", &["localhost".into()], false).unwrap();
        let issued = ca.issue_gateway("gw-1", PEER_TTL).unwrap();
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            tether_runtime::tls::spiffe_id(&der).unwrap(),
            SpiffeId::Gateway {
                trust_domain: "td.example".into(),
                replica: "gw-1".into()
            }
        );
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth, "{eku:?}");
        assert!(ca.issue_gateway("..", PEER_TTL).is_err());
        assert!(ca.issue_gateway("a/b", PEER_TTL).is_err());
    }

    #[test]
    fn the_signing_ca_is_found_in_a_bundle_by_its_key() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(old.path(), "td.example", &["localhost".into()], false).unwrap();
        init(new.path(), "td.example", &["localhost".into()], false).unwrap();
        let bundle = format!(
            "{}{}",
            read(&old.path().join("ca.pem")).unwrap(),
            read(&new.path().join("ca.pem")).unwrap()
        );
        let path = old.path().join("bundle.pem");
        write_file(&path, &bundle, false).unwrap();
        for dir in [&old, &new] {
            let ca = Ca::from_files(&path, &dir.path().join("ca-key.pem"), "td.example").unwrap();
            assert_eq!(ca.cert_pem, read(&dir.path().join("ca.pem")).unwrap());
            assert!(bundle_contains(&bundle, &ca.cert_pem));
        }
        let third = tempfile::tempdir().unwrap();
        init(third.path(), "td.example", &["localhost".into()], false).unwrap();
        let e = Ca::from_files(&path, &third.path().join("ca-key.pem"), "td.example").unwrap_err();
        assert!(e.to_string().contains("no certificate in it"), "{e}");
        let other = read(&third.path().join("ca.pem")).unwrap();
        assert!(!bundle_contains(&bundle, &other));
        assert_eq!(pem_certificates(&bundle).len(), 2);
    }

    use rustls_pki_types::pem::PemObject;
}
