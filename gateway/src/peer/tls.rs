//! Transport layer: mutual TLS on the peer links, and their QUIC transport.
//!
//! Every replica presents its peer certificate (`cluster.peer_cert`, identity
//! `spiffe://<trust_domain>/gateway/<replica_id>`, issued by `tether-gateway pki
//! issue-gateway`) in both directions: it dials some peers and accepts the others. What is
//! checked, on top of the chain to `tls.ca` and the validity period:
//! - accepting: exactly one URI SAN, a *gateway* identity of our trust domain — agent and
//!   control-plane certificates, valid as they are on the other listeners, are refused here
//!   ([`PeerClientVerifier`]);
//! - dialing: the identity of the very replica the cluster state says is at that address
//!   ([`PeerServerVerifier`]), not merely some gateway.
//!
//! No session resumption either way: a resumed handshake skips the verifier.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tether_runtime::tls::{self as runtime_tls, TlsError, spiffe_id};
use tunnel_proto::SpiffeId;

use crate::config::GatewayConfig;
use crate::peer::metrics::{PeerRefusal, count_refusal};
use crate::peer::wire::ALPN;
use crate::peer::{PeerError, PeerSettings};

/// The server name a replica dials its peers with (the certificate is checked by identity,
/// not by name).
pub const SERVER_NAME: &str = "tether-peer";

/// This replica's peer certificate and key, and the CAs peers must chain to.
pub struct PeerTls {
    trust_domain: String,
    roots: Arc<rustls::RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads `cluster.peer_cert` and `cluster.peer_key` and checks the certificate is this
    /// replica's gateway identity (a certificate of another replica, or of an agent, is a
    /// config error naming `cluster.peer_cert`).
    pub fn load(
        cfg: &GatewayConfig,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<PeerTls, PeerError> {
        let (Some(cert), Some(key)) = (&cfg.cluster.peer_cert, &cfg.cluster.peer_key) else {
            return Self::self_issued(cfg, roots);
        };
        let certs = runtime_tls::load_certs("peer certificate", cert)?;
        let key = runtime_tls::load_key(key)?;
        let me = cfg.cluster.replica_id();
        let leaf = certs.first().ok_or_else(|| PeerError::Identity {
            path: cert.clone(),
            reason: "holds no certificate".into(),
        })?;
        let wrong = |reason: String| PeerError::Identity {
            path: cert.clone(),
            reason,
        };
        match spiffe_id(leaf) {
            Ok(SpiffeId::Gateway {
                trust_domain,
                replica,
            }) if trust_domain == cfg.trust_domain && replica == me => {}
            Ok(other) => {
                return Err(wrong(format!(
                    "is for {other}, not {} (this replica's cluster.replica_id in trust domain {}): \
                     issue one with `tether-gateway pki issue-gateway --replica-id {me}`",
                    SpiffeId::gateway_uri(&cfg.trust_domain, &me),
                    cfg.trust_domain
                )));
            }
            Err(e) => return Err(wrong(e.to_string())),
        }
        Ok(PeerTls {
            trust_domain: cfg.trust_domain.clone(),
            roots,
            certs,
            key,
        })
    }

    /// With `cluster.peer_ca_key`: a peer certificate for this replica's identity, issued at
    /// start by that CA (its certificate found in `tls.ca` by the key), valid a year, kept in
    /// memory only; a replica started again gets a new one.
    fn self_issued(
        cfg: &GatewayConfig,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<PeerTls, PeerError> {
        use rustls_pki_types::pem::PemObject;
        let Some(ca_key) = &cfg.cluster.peer_ca_key else {
            return Err(PeerError::NotConfigured);
        };
        let me = cfg.cluster.replica_id();
        let failed = |reason: String| PeerError::SelfIssued {
            path: ca_key.clone(),
            reason,
        };
        let ca = crate::identity::pki::Ca::from_files(&cfg.tls.ca, ca_key, &cfg.trust_domain)
            .map_err(|e| failed(e.to_string()))?;
        let issued = ca
            .issue_gateway(&me, crate::identity::pki::PEER_TTL)
            .map_err(|e| failed(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(format!("the issued certificate does not parse: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .map_err(|e| failed(format!("the issued key does not parse: {e}")))?;
        tracing::info!(
            identity = %SpiffeId::gateway_uri(&cfg.trust_domain, &me),
            "peer certificate issued by cluster.peer_ca_key"
        );
        Ok(PeerTls {
            trust_domain: cfg.trust_domain.clone(),
            roots,
            certs,
            key,
        })
    }

    /// The peer listener's QUIC server config: client certificates required, gateways only.
    pub fn server_config(&self, settings: &PeerSettings) -> Result<quinn::ServerConfig, PeerError> {
        let inner = WebPkiClientVerifier::builder(self.roots.clone())
            .build()
            .map_err(PeerError::Verifier)?;
        let verifier = Arc::new(PeerClientVerifier {
            inner,
            trust_domain: self.trust_domain.clone(),
        });
        let mut tls =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_client_cert_verifier(verifier)
                .with_single_cert(self.certs.clone(), self.key.clone_key())
                .map_err(PeerError::Tls)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        let crypto = QuicServerConfig::try_from(Arc::new(tls)).map_err(PeerError::Quic)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport(settings)?));
        Ok(server)
    }

    /// The QUIC client config for dialing replica `expected`: its identity is required.
    pub fn client_config(
        &self,
        expected: &str,
        settings: &PeerSettings,
    ) -> Result<quinn::ClientConfig, PeerError> {
        let verifier = Arc::new(PeerServerVerifier {
            roots: self.roots.clone(),
            trust_domain: self.trust_domain.clone(),
            expected: expected.to_owned(),
            provider: Arc::new(runtime_tls::crypto_provider()),
        });
        let mut tls =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
                .map_err(PeerError::Tls)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = rustls::client::Resumption::disabled();
        let crypto = QuicClientConfig::try_from(Arc::new(tls)).map_err(PeerError::Quic)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport(settings)?));
        Ok(client)
    }
}

/// What one forwarded stream may have in flight towards this replica: the tunnel's own
/// window, so a forwarded call streams as fast as a local one.
const STREAM_WINDOW: u32 = 1_250_000;
/// What one peer link may have in flight towards this replica, all its streams together: a
/// peer carries many agents' calls at once.
const CONNECTION_WINDOW: u32 = 32 << 20;
/// What this replica keeps written but unacknowledged towards one peer.
const SEND_WINDOW: u64 = 32 << 20;
/// Forwarded streams a peer may have open on one link at once.
const MAX_STREAMS: u32 = 65_536;

/// The peer links' QUIC transport: many concurrent streams, large windows, a keep-alive at
/// the probe interval and an idle timeout a little beyond the probe's own.
fn transport(settings: &PeerSettings) -> Result<quinn::TransportConfig, PeerError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(SEND_WINDOW);
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(Some(settings.probe_interval));
    let idle = settings.down_after * 2 + Duration::from_secs(1);
    t.max_idle_timeout(Some(idle.try_into().map_err(|_| PeerError::IdleTimeout)?));
    Ok(t)
}

/// The replica a certificate names, or why it may not be on a peer link.
fn gateway_of(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<String, (PeerRefusal, String)> {
    match spiffe_id(cert) {
        Ok(SpiffeId::Gateway {
            trust_domain: td,
            replica,
        }) if td == trust_domain => Ok(replica),
        Ok(SpiffeId::Gateway {
            trust_domain: td,
            replica,
        }) => Err((
            PeerRefusal::WrongTrustDomain,
            format!("gateway {replica} is in trust domain {td:?}, not {trust_domain:?}"),
        )),
        Ok(other) => Err((
            PeerRefusal::NotAGateway,
            format!("{other} is not a gateway replica's identity"),
        )),
        Err(e @ (TlsError::NoIdentity | TlsError::SeveralIdentities(_))) => {
            Err((PeerRefusal::NoIdentity, e.to_string()))
        }
        Err(e) => Err((PeerRefusal::NoIdentity, e.to_string())),
    }
}

/// The replica a peer link's other end authenticated as (its certificate, checked by the
/// verifiers here during the handshake).
pub fn peer_replica(conn: &quinn::Connection, trust_domain: &str) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    gateway_of(certs.first()?, trust_domain).ok()
}

fn refused() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// The accepting side's check: a gateway replica of our trust domain, chained to `tls.ca`.
#[derive(Debug)]
pub struct PeerClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for PeerClientVerifier {
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
            count_refusal(PeerRefusal::Certificate, &e.to_string());
            return Err(e);
        }
        match gateway_of(end_entity, &self.trust_domain) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err((reason, detail)) => {
                count_refusal(reason, &detail);
                Err(refused())
            }
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

/// The dialing side's check: the certificate chains to `tls.ca`, is for server use, and is
/// the identity of the replica dialed. Its DNS names are not looked at: replicas are dialed
/// at addresses from the cluster state (`cluster.advertise`), and named by identity.
#[derive(Debug)]
pub struct PeerServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    trust_domain: String,
    expected: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        if let Err(e) = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        ) {
            count_refusal(PeerRefusal::Certificate, &e.to_string());
            return Err(e);
        }
        match gateway_of(end_entity, &self.trust_domain) {
            Ok(r) if r == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(r) => {
                count_refusal(
                    PeerRefusal::WrongReplica,
                    &format!(
                        "dialed replica {} but the certificate is of replica {r}",
                        self.expected
                    ),
                );
                Err(refused())
            }
            Err((reason, detail)) => {
                count_refusal(reason, &detail);
                Err(refused())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Loads what `--check-config` should catch: the peer certificate and key and their identity.
pub fn check(cfg: &GatewayConfig, roots: Arc<rustls::RootCertStore>) -> Result<(), PeerError> {
    if !cfg.cluster.peer_links() {
        return Ok(());
    }
    let tls = PeerTls::load(cfg, roots)?;
    let settings = PeerSettings::from_config(cfg);
    tls.server_config(&settings)?;
    tls.client_config("check", &settings)?;
    Ok(())
}

impl From<TlsError> for PeerError {
    fn from(e: TlsError) -> Self {
        PeerError::Material(e)
    }
}
