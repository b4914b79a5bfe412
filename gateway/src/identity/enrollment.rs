//! Feature layer: agent enrollment with single-use bootstrap tokens (`tether.v1.Enrollment`).
//!
//! - `CreateToken` (northbound, control-plane callers): a random 256-bit token for one agent
//!   identity, returned once; the gateway stores only its SHA-256 with the identity, expiry and
//!   state ([`IdentityDb`]).
//! - `Enroll` (agent-facing): served on the tunnel's **TCP port**, the one egress rule the
//!   customer already has, to connections whose ClientHello offers ALPN `tether-enroll/1`
//!   ([`ENROLL_ALPN`]; the tunnel's accept loop picks the TLS config from the ClientHello). That
//!   TLS is server-authenticated only: the agent verifies the gateway against its CA bundle and
//!   holds no certificate yet. The token is redeemed inside one write transaction together with
//!   the issuance, so it is used at most once and only when a certificate came out of it.
//!
//! **What is issued.** The gateway decides the certificate: the token's identity as the only
//! URI SAN, digital signature, client authentication, not a CA, valid `enrollment.cert_ttl`
//! (24 h by default) and, for a revoked agent, from after its revocation cut-off. The CSR
//! contributes its public key (ECDSA P-256 or Ed25519) and nothing else: a CSR that asks for
//! any other SAN, more than one, CA rights or certificate signing is **refused** (rather than
//! silently ignored), so a confused or malicious requester learns exactly why. A refused CSR
//! leaves the token unused.
//!
//! **Renewal** ([`Enrollment::renew`]): an agent sends a `RenewRequest` (a CSR for a key it has
//! just made) on the control stream of a live session; the tunnel's session driver hands it
//! here with the identity of the certificate that session authenticated with. The same CSR
//! checks and the same certificate as enrollment, for exactly that identity, unless that
//! certificate or its agent is revoked, or that certificate has expired (a session outlives
//! its certificate; renewing over it would extend a stolen key for ever), and at most one
//! certificate per agent every [`RENEW_EVERY`] however many sessions it holds. Certificates
//! are signed by the CA of `enrollment.ca_key`, and every issued certificate goes out with
//! `tls.ca`, the CA bundle of the trust domain: during a CA rotation it holds the old and the
//! new CA, and agents trust it for the gateway's certificate as well (docs/ca-rotation.md).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use tether_api::v1;
use tether_api::v1::enrollment_server::{Enrollment as EnrollmentService, EnrollmentServer};
use tokio::net::TcpStream;
use tonic::{Request, Response, Status};
use tower::ServiceExt;
use tunnel_proto::AgentId;
use tunnel_proto::message::{RenewRequest, RenewResponse};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;

use crate::config::{EnrollmentConfig, GatewayConfig};
use crate::error::GatewayError;
use crate::identity::db::{
    IdentityDb, IdentityDbError, RedeemError, TokenRecord, TokenRefusal, TooManyPending,
};
use crate::identity::pki::{Ca, LeafSpec, PkiError};
use crate::identity::revocation::{CertFacts, RevocationList, from_ms, sha256_hex, to_ms};
use crate::metrics::{IdleIn, Limit, count_idle_timeout, count_rejection};
use crate::northbound::agents::{Caller, authenticate};
use crate::quota::{Full, KeyedRate, Shares};

pub use tunnel_proto::ENROLL_ALPN;

/// Token prefix: says what the string is when it turns up in a log or a secret store.
pub const TOKEN_PREFIX: &str = "tet1_";

/// Largest `Enroll` request accepted (a CSR is well under 2 KiB).
const MAX_REQUEST: usize = 16 * 1024;

/// Enrollment connections open at once, idle ones included; more are dropped at the
/// ClientHello (`tether_gateway_limit_rejections_total{limit="enrollment_connections"}`).
const MAX_CONNECTIONS: usize = 1024;

/// Enrollment connections one source address may have open at once: an address cannot take
/// the places of others (and agents behind one NAT still enroll many at a time; one refused
/// retries with its backoff).
pub const CONNECTIONS_PER_ADDRESS: usize = 32;

/// Time a connection has, once TLS is done, to send its request; then it is closed.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Time the one request of a connection has to arrive whole and be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Enrollments being decided at once (token check, CSR check, signing, the store's write),
/// and by one source address: taken only once a whole request has arrived.
const MAX_ISSUING: usize = 64;
const ISSUING_PER_ADDRESS: usize = 16;

/// Certificates are valid from a minute ago: agents' clocks may lag the gateway's. (Or from a
/// quarter of their lifetime ago, when that is shorter: agents renew at two thirds of the
/// lifetime, so a certificate of a few seconds, as in tests, would otherwise be due at once.)
const CLOCK_SKEW: i64 = 60;

/// Renewals of one agent are signed at most this often, across all its sessions (each session
/// also refuses a second request within a second: `GatewaySessionConfig::renew_min_interval`).
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Agents whose last renewal is remembered; beyond this, entries older than [`RENEW_EVERY`]
/// are dropped.
const RENEWED_KEPT: usize = 4096;

/// Why an enrollment operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The gateway has no CA key (`enrollment.ca_key`): the operator's to fix.
    #[error("enrollment is not enabled on this gateway (set enrollment.ca_key)")]
    Disabled,
    /// A tenant or agent name is malformed (the caller's mistake).
    #[error("{0}")]
    BadIdentity(tunnel_proto::IdentityError),
    /// The requested token lifetime is out of bounds (the caller's mistake).
    #[error("ttl {ttl:?} is out of range: it must be positive and at most {max:?}")]
    BadTtl {
        /// What was asked.
        ttl: Duration,
        /// `enrollment.max_token_ttl`.
        max: Duration,
    },
    /// The token cannot be used (the agent's operator needs a new one).
    #[error(transparent)]
    Token(#[from] TokenRefusal),
    /// The CSR is refused (the agent's mistake; the token stays unused).
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    /// A renewal for a revoked certificate or agent (a new enrollment is needed).
    #[error("{0}")]
    Revoked(String),
    /// A renewal over a session whose certificate has expired (a new enrollment is needed).
    #[error(
        "this session's certificate expired at {0}: it cannot be renewed; enrol the agent again"
    )]
    Expired(String),
    /// The agent has `limits.pending_tokens_per_agent` tokens pending already.
    #[error(transparent)]
    TooManyPending(#[from] TooManyPending),
    /// The caller created `limits.token_creations_per_minute` tokens in the last minute.
    #[error(
        "caller {0:?} is creating enrollment tokens faster than limits.token_creations_per_minute allows; retry in a few seconds"
    )]
    CreationRate(String),
    /// Too many enrollments are being decided, gateway-wide or (`true`) from the requester's
    /// address; retrying in a moment helps.
    #[error("the gateway is busy with other enrollments{}; retry in a moment", if *.0 { " from this address" } else { "" })]
    Busy(bool),
    /// A renewal sooner than [`RENEW_EVERY`] after the agent's previous one.
    #[error("agent {0} was issued a certificate less than {RENEW_EVERY:?} ago; try again later")]
    TooSoon(AgentId),
    /// The identity store failed (the gateway's fault; retrying may help).
    #[error(transparent)]
    Store(#[from] IdentityDbError),
    /// Signing failed (the gateway's fault).
    #[error("issuing the certificate failed: {0}")]
    Issue(String),
}

impl EnrollError {
    /// The gRPC status, decided here for every caller.
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            EnrollError::Disabled => Status::failed_precondition(msg),
            EnrollError::BadIdentity(_) | EnrollError::BadTtl { .. } | EnrollError::Csr(_) => {
                Status::invalid_argument(msg)
            }
            EnrollError::Token(_) => Status::unauthenticated(msg),
            EnrollError::Revoked(_) => Status::permission_denied(msg),
            EnrollError::Expired(_) => Status::unauthenticated(msg),
            EnrollError::TooSoon(_)
            | EnrollError::Busy(_)
            | EnrollError::TooManyPending(_)
            | EnrollError::CreationRate(_) => Status::resource_exhausted(msg),
            EnrollError::Store(_) => Status::unavailable(msg),
            EnrollError::Issue(_) => Status::internal(msg),
        }
    }

    /// The `result` label of `tether_gateway_enrollments_total` and
    /// `tether_gateway_renewals_total`.
    fn label(&self) -> &'static str {
        match self {
            EnrollError::Token(TokenRefusal::Unknown) => "token_unknown",
            EnrollError::Token(TokenRefusal::Used) => "token_used",
            EnrollError::Token(TokenRefusal::Expired) => "token_expired",
            EnrollError::Token(TokenRefusal::Revoked(_)) => "token_revoked",
            EnrollError::Csr(_) => "bad_csr",
            EnrollError::Revoked(_) => "revoked",
            EnrollError::Expired(_) => "expired",
            EnrollError::TooSoon(_) => "rate_limited",
            EnrollError::Disabled => "disabled",
            EnrollError::Busy(_) => "busy",
            _ => "error",
        }
    }
}

/// Tokens and issuance; shared by both faces of the service.
pub struct Enrollment {
    db: Arc<IdentityDb>,
    revocations: Arc<RevocationList>,
    ca: Option<Ca>,
    cfg: EnrollmentConfig,
    /// `tls.ca` (PEM): the CA bundle that goes out with every issued certificate.
    bundle: String,
    /// When each agent was last renewed (see [`RENEW_EVERY`]).
    renewed: std::sync::Mutex<HashMap<AgentId, Instant>>,
    /// `limits.pending_tokens_per_agent`.
    max_pending: u32,
    /// `CreateToken` calls per caller (`limits.token_creations_per_minute`).
    creations: KeyedRate<String>,
    /// Enrollments being decided, per source address ([`MAX_ISSUING`]).
    issuing: Arc<Shares<IpAddr>>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("enabled", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl Enrollment {
    /// Loads the CA named by `enrollment.ca_key` when set; see [`signing_ca`].
    pub fn new(cfg: &GatewayConfig, db: Arc<IdentityDb>) -> Result<Enrollment, GatewayError> {
        let (ca, bundle) = signing_ca(cfg)?;
        Ok(Enrollment {
            revocations: db.revocations(),
            db,
            ca,
            cfg: cfg.enrollment.clone(),
            bundle,
            renewed: Default::default(),
            max_pending: cfg.limits.pending_tokens_per_agent,
            creations: KeyedRate::per_minute(cfg.limits.token_creations_per_minute),
            issuing: Shares::new(MAX_ISSUING, ISSUING_PER_ADDRESS),
        })
    }

    /// True when tokens can be created and redeemed.
    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }

    /// A new token for `tenant/agent`, created by the caller named `created_by` (`rate_key`
    /// names it for `limits.token_creations_per_minute`); see the module docs.
    pub async fn create_token(
        &self,
        created_by: &str,
        rate_key: &str,
        tenant: &str,
        agent: &str,
        ttl: Option<Duration>,
    ) -> Result<v1::CreateTokenResponse, EnrollError> {
        if self.ca.is_none() {
            return Err(EnrollError::Disabled);
        }
        if !self.creations.take(&rate_key.to_owned(), Instant::now()) {
            count_rejection(Limit::TokenCreationsPerMinute);
            return Err(EnrollError::CreationRate(created_by.to_owned()));
        }
        let id = AgentId::new(tenant, agent).map_err(EnrollError::BadIdentity)?;
        let ttl = ttl.unwrap_or(self.cfg.token_ttl);
        if ttl.is_zero() || ttl > self.cfg.max_token_ttl {
            return Err(EnrollError::BadTtl {
                ttl,
                max: self.cfg.max_token_ttl,
            });
        }
        let token = new_token();
        let now = SystemTime::now();
        let expires = now + ttl;
        let record = TokenRecord {
            agent: id.to_string(),
            created_ms: to_ms(now),
            expires_ms: to_ms(expires),
            state: crate::identity::db::TokenState::Pending,
            changed_ms: None,
            created_by: created_by.to_owned(),
            certificate: None,
        };
        let (db, hash, max) = (
            self.db.clone(),
            sha256_hex(token.as_bytes()),
            self.max_pending,
        );
        let stored = tokio::task::spawn_blocking(move || db.put_token(&hash, &record, max))
            .await
            .map_err(|e| IdentityDbError::Backend(e.to_string()))??;
        if let Err(e) = stored {
            count_rejection(Limit::PendingTokensPerAgent);
            return Err(e.into());
        }
        metrics::counter!("tether_gateway_enrollment_tokens_created_total").increment(1);
        tracing::info!(agent = %id, created_by, ttl = %humantime::format_duration(ttl),
            "enrollment token created");
        Ok(v1::CreateTokenResponse {
            token,
            agent: id.to_string(),
            expires_at: Some(expires.into()),
            certificate_ttl: prost_types::Duration::try_from(self.cfg.cert_ttl).ok(),
        })
    }

    /// Redeems `token` for a certificate of its identity with the CSR's public key.
    pub async fn enroll(
        self: &Arc<Self>,
        token: &str,
        csr_pem: &str,
        remote: Option<SocketAddr>,
    ) -> Result<v1::EnrollResponse, EnrollError> {
        let ip = remote.map_or(IpAddr::from([0, 0, 0, 0]), |r| r.ip());
        let result = match self.issuing.take(&ip) {
            Ok(_share) => self.enroll_inner(token, csr_pem).await,
            Err(full) => {
                count_rejection(Limit::EnrollmentsInProgress);
                Err(EnrollError::Busy(full == Full::Key))
            }
        };
        let label = match &result {
            Ok(_) => "issued",
            Err(e) => e.label(),
        };
        metrics::counter!("tether_gateway_enrollments_total", "result" => label).increment(1);
        match &result {
            Ok(r) => tracing::info!(agent = %r.agent, ?remote, "agent enrolled"),
            Err(e) => tracing::warn!(?remote, error = %e, "enrollment refused"),
        }
        result
    }

    async fn enroll_inner(
        self: &Arc<Self>,
        token: &str,
        csr_pem: &str,
    ) -> Result<v1::EnrollResponse, EnrollError> {
        if self.ca.is_none() {
            return Err(EnrollError::Disabled);
        }
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return Err(TokenRefusal::Unknown.into());
        }
        let hash = sha256_hex(token.as_bytes());
        let (this, csr) = (self.clone(), csr_pem.to_owned());
        let redeemed = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            this.db.redeem_token(&hash, to_ms(now), |record| {
                let id: AgentId = record.agent.parse().map_err(|e| {
                    EnrollError::Store(IdentityDbError::Corrupt {
                        key: "token".into(),
                        detail: format!("{e}"),
                    })
                })?;
                let (pem, not_after) = this.issue(&id, &csr, now)?;
                let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| EnrollError::Issue(e.to_string()))?;
                Ok::<_, EnrollError>(((pem, not_after), sha256_hex(der.as_ref())))
            })
        })
        .await
        .map_err(|e| IdentityDbError::Backend(e.to_string()))??;
        let (record, (certificate_pem, not_after)) = match redeemed {
            Ok(r) => r,
            Err(RedeemError::Refused(r)) => return Err(r.into()),
            Err(RedeemError::Issue(e)) => return Err(e),
        };
        Ok(v1::EnrollResponse {
            certificate_pem,
            ca_pem: self.bundle.clone(),
            agent: record.agent,
            not_after: Some(not_after.into()),
        })
    }

    /// Renews the certificate of a live session: signs `req`'s CSR for exactly `agent`, the
    /// identity of `cert`, the certificate the session authenticated with (see the module
    /// docs). Never fails: a refusal is an answer with a gRPC code and the reason.
    pub fn renew(&self, agent: &AgentId, cert: &CertFacts, req: &RenewRequest) -> RenewResponse {
        let result = self.renew_inner(agent, cert, &req.csr_pem);
        let label = match &result {
            Ok(_) => "issued",
            Err(e) => e.label(),
        };
        metrics::counter!("tether_gateway_renewals_total", "result" => label).increment(1);
        match result {
            Ok((certificate_pem, not_after)) => {
                let issued =
                    rustls_pki_types::CertificateDer::from_pem_slice(certificate_pem.as_bytes())
                        .ok()
                        .and_then(|d| CertFacts::of(&d).ok());
                tracing::info!(%agent, old_serial = %cert.serial,
                    serial = %issued.map(|f| f.serial).unwrap_or_default(),
                    not_after = %humantime::format_rfc3339_seconds(not_after),
                    "agent certificate renewed");
                RenewResponse {
                    id: req.id,
                    certificate_pem,
                    ca_pem: self.bundle.clone(),
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::warn!(%agent, serial = %cert.serial, error = %e, "renewal refused");
                RenewResponse {
                    id: req.id,
                    code: e.status().code() as i32,
                    message: e.to_string(),
                    ..Default::default()
                }
            }
        }
    }

    fn renew_inner(
        &self,
        agent: &AgentId,
        cert: &CertFacts,
        csr_pem: &str,
    ) -> Result<(String, SystemTime), EnrollError> {
        if self.ca.is_none() {
            return Err(EnrollError::Disabled);
        }
        if let Some(why) = self.revocations.refusal(agent, cert) {
            return Err(EnrollError::Revoked(why));
        }
        let now = SystemTime::now();
        if cert.not_after <= to_ms(now) / 1000 {
            let at = humantime::format_rfc3339_seconds(from_ms(cert.not_after * 1000));
            return Err(EnrollError::Expired(at.to_string()));
        }
        let key = self.check(agent, csr_pem)?;
        // Held while signing, so that two sessions of one agent cannot both pass.
        let mut renewed = self.renewed.lock().expect("renewal times");
        let started = Instant::now();
        if renewed
            .get(agent)
            .is_some_and(|t| started.duration_since(*t) < RENEW_EVERY)
        {
            return Err(EnrollError::TooSoon(agent.clone()));
        }
        let issued = self.sign(agent, &key, now)?;
        if renewed.len() >= RENEWED_KEPT {
            renewed.retain(|_, t| started.duration_since(*t) < RENEW_EVERY);
        }
        renewed.insert(agent.clone(), started);
        Ok(issued)
    }

    /// Checks the CSR against the identity `id` and signs its key.
    fn issue(
        &self,
        id: &AgentId,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<(String, SystemTime), EnrollError> {
        let key = self.check(id, csr_pem)?;
        self.sign(id, &key, now)
    }

    /// The key of a CSR that asks for nothing beyond the identity `id`.
    fn check(&self, id: &AgentId, csr_pem: &str) -> Result<rcgen::PublicKey, EnrollError> {
        let ca = self.ca.as_ref().ok_or(EnrollError::Disabled)?;
        check_csr(csr_pem, &id.to_uri(&ca.trust_domain)).map_err(EnrollError::Csr)
    }

    /// A certificate for `id` and `key`, valid from now (or the agent's revocation cut-off).
    fn sign(
        &self,
        id: &AgentId,
        key: &rcgen::PublicKey,
        now: SystemTime,
    ) -> Result<(String, SystemTime), EnrollError> {
        let ca = self.ca.as_ref().ok_or(EnrollError::Disabled)?;
        let uri = id.to_uri(&ca.trust_domain);
        let now_s = to_ms(now) / 1000;
        let skew = CLOCK_SKEW.min(self.cfg.cert_ttl.as_secs() as i64 / 4);
        let not_before = self.revocations.not_before(id, now_s - skew);
        let not_after = now + self.cfg.cert_ttl;
        let ts = |s: i64| {
            time::OffsetDateTime::from_unix_timestamp(s)
                .map_err(|e| EnrollError::Issue(e.to_string()))
        };
        let spec = LeafSpec {
            common_name: id.to_string(),
            uris: vec![uri],
            names: Vec::new(),
            not_before: ts(not_before)?,
            not_after: ts(to_ms(not_after) / 1000)?,
            server: false,
        };
        let pem = ca
            .sign(&spec, key)
            .map_err(|e| EnrollError::Issue(e.to_string()))?;
        Ok((pem, not_after))
    }
}

/// The CA of `enrollment.ca_key` when set (its certificate found in `enrollment.ca_cert`,
/// default `tls.ca`, by the key), which must be one of the CAs `tls.ca` trusts; and `tls.ca`
/// itself (PEM), the bundle that goes out with every issued certificate. For the start and
/// `--check-config`.
pub fn signing_ca(cfg: &GatewayConfig) -> Result<(Option<Ca>, String), GatewayError> {
    let bundle = std::fs::read_to_string(&cfg.tls.ca).map_err(|source| PkiError::Io {
        path: cfg.tls.ca.clone(),
        source,
    })?;
    let Some(key) = &cfg.enrollment.ca_key else {
        return Ok((None, bundle));
    };
    let cert = cfg.enrollment.ca_cert.as_ref().unwrap_or(&cfg.tls.ca);
    let ca = Ca::from_files(cert, key, &cfg.trust_domain)?;
    if !crate::identity::pki::bundle_contains(&bundle, &ca.cert_pem) {
        return Err(PkiError::CaMismatch {
            cert: cfg.tls.ca.clone(),
            reason: "it does not hold the CA certificate of enrollment.ca_key: the gateway \
                     would refuse every certificate it issues (during a CA rotation tls.ca \
                     holds the old and the new CA)"
                .into(),
        }
        .into());
    }
    Ok((Some(ca), bundle))
}

/// A new token: [`TOKEN_PREFIX`] and 256 random bits, base64url.
fn new_token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("system randomness");
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Checks a PEM CSR against the module docs' rules for `identity` (the token's URI); returns
/// its verified public key.
pub fn check_csr(csr_pem: &str, identity: &str) -> Result<rcgen::PublicKey, String> {
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate request: {e}"))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("does not parse as PKCS#10: {e}"))?;
    let spki = &csr.certification_request_info.subject_pki.algorithm;
    let curve = spki
        .parameters
        .clone()
        .and_then(|p| x509_parser::oid_registry::Oid::try_from(p).ok());
    let key_ok = (spki.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256))
        || spki.algorithm == OID_SIG_ED25519;
    if !key_ok {
        return Err(format!(
            "key type {}{} is not allowed: use ECDSA P-256 or Ed25519",
            spki.algorithm,
            curve.map(|c| format!(" ({c})")).unwrap_or_default()
        ));
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
                    return Err(format!(
                        "it asks for the subject alternative name(s) {asked:?}; this token is for {identity} only (ask for it, or for no SAN)"
                    ));
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err("it asks for a CA certificate".into());
            }
            ParsedExtension::BasicConstraints(_) | ParsedExtension::ExtendedKeyUsage(_) => {}
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err("it asks for certificate or CRL signing".into());
            }
            ParsedExtension::KeyUsage(_) => {}
            ParsedExtension::UnsupportedExtension { oid } => {
                return Err(format!("it asks for an unsupported extension {oid}"));
            }
            other => {
                return Err(format!(
                    "it asks for an extension not allowed here: {other:?}"
                ));
            }
        }
    }
    let params = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "its signature does not verify".to_owned()
        }
        other => format!("it cannot be used: {other}"),
    })?;
    // rcgen infers the key's algorithm from the signature's: they must agree with the key.
    let alg = rcgen::PublicKeyData::algorithm(&params.public_key);
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ED25519 {
        return Err(
            "its signature algorithm does not go with its key (ECDSA P-256 signs with SHA-256)"
                .into(),
        );
    }
    Ok(params.public_key)
}

// === The gRPC service ===

/// Which listener an [`EnrollmentApi`] serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Face {
    /// The northbound API: `CreateToken` for control-plane callers.
    ControlPlane,
    /// The tunnel's TCP port (ALPN `tether-enroll/1`): `Enroll` for agents.
    Agent,
}

/// `tether.v1.Enrollment`, one face of it.
#[derive(Clone, Debug)]
pub struct EnrollmentApi {
    inner: Arc<Enrollment>,
    face: Face,
}

/// The enrolling peer's address, in request extensions on the agent face.
#[derive(Clone, Copy, Debug)]
struct Remote(SocketAddr);

impl EnrollmentApi {
    /// The service on `face`.
    pub fn new(inner: Arc<Enrollment>, face: Face) -> Self {
        EnrollmentApi { inner, face }
    }

    /// The northbound face with caller authentication.
    pub fn into_northbound_service(
        inner: Arc<Enrollment>,
        trust_domain: String,
    ) -> tonic::service::interceptor::InterceptedService<
        EnrollmentServer<EnrollmentApi>,
        impl tonic::service::Interceptor + Clone,
    > {
        EnrollmentServer::with_interceptor(
            EnrollmentApi::new(inner, Face::ControlPlane),
            move |req| authenticate(&trust_domain, req),
        )
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        if self.face != Face::ControlPlane {
            return Err(Status::permission_denied(
                "CreateToken is a control-plane call: use the northbound API",
            ));
        }
        const METHOD: &str = "tether.v1.Enrollment/CreateToken";
        let caller: Caller = crate::northbound::auth::caller(&req)?;
        let r = req.into_inner();
        // A token enrolls an agent of the tenant: only a caller acting for it may mint one.
        let agent = format!("{}/{}", r.tenant, r.agent);
        caller.authorize_tenant(METHOD, &r.tenant, &agent)?;
        let ttl = match r.ttl {
            None => None,
            Some(d) => Some(
                Duration::try_from(d).map_err(|e| Status::invalid_argument(format!("ttl: {e}")))?,
            ),
        };
        let created = self
            .inner
            .create_token(
                &caller.name,
                &format!("{}:{}", caller.kind.as_str(), caller.name),
                &r.tenant,
                &r.agent,
                ttl,
            )
            .await
            .map_err(|e| e.status())?;
        if let Ok(id) = AgentId::new(&r.tenant, &r.agent) {
            caller.audit_allowed(METHOD, &id, "enrollment token created");
        }
        Ok(Response::new(created))
    }

    async fn enroll(
        &self,
        req: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        if self.face != Face::Agent {
            return Err(Status::unimplemented(
                "Enroll is served on the gateway's tunnel port (TCP, ALPN tether-enroll/1), not on the northbound API",
            ));
        }
        let remote = req.extensions().get::<Remote>().map(|r| r.0);
        let r = req.into_inner();
        self.inner
            .enroll(&r.token, &r.csr_pem, remote)
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }
}

// === The agent-facing endpoint on the tunnel's TCP port ===

/// Serves `Enroll` on TLS connections the tunnel's TCP accept loop hands over (their
/// ClientHello offered [`ENROLL_ALPN`]).
///
/// Nothing an idle connection holds can keep a real agent out: a connection takes one of
/// [`MAX_CONNECTIONS`] places, at most [`CONNECTIONS_PER_ADDRESS`] per source address; once TLS
/// is done it must send its request within [`FIRST_REQUEST_TIMEOUT`]; it carries one request
/// ([`REQUEST_TIMEOUT`] to arrive and be answered) and is then closed; and the work of an
/// enrollment is admitted only once its request is whole ([`MAX_ISSUING`], per address
/// [`ISSUING_PER_ADDRESS`]).
pub struct EnrollEndpoint {
    tls: Arc<rustls::ServerConfig>,
    routes: tonic::service::Routes,
    connections: Arc<Shares<IpAddr>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for EnrollEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollEndpoint").finish_non_exhaustive()
    }
}

impl EnrollEndpoint {
    /// TLS 1.3 with the gateway's certificate, no client certificate, ALPN `tether-enroll/1`.
    pub fn new(cfg: &GatewayConfig, inner: Arc<Enrollment>) -> Result<Self, GatewayError> {
        let certs = tether_runtime::tls::load_certs("certificate", &cfg.tls.cert)?;
        let key = tether_runtime::tls::load_key(&cfg.tls.key)?;
        let mut tls =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| GatewayError::Tls(format!("enrollment certificate: {e}")))?;
        tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
        // One request per connection: nothing to resume.
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        let svc = EnrollmentServer::new(EnrollmentApi::new(inner, Face::Agent))
            .max_decoding_message_size(MAX_REQUEST);
        Ok(EnrollEndpoint {
            tls: Arc::new(tls),
            routes: tonic::service::Routes::new(svc).prepare(),
            connections: Shares::new(MAX_CONNECTIONS, CONNECTIONS_PER_ADDRESS),
            handshake_timeout: cfg.tunnel.handshake_timeout,
        })
    }

    /// Enrollment connections open now.
    pub fn connections(&self) -> usize {
        self.connections.taken()
    }

    /// Completes the TLS handshake and serves one HTTP/2 (gRPC) request on it; see the type's
    /// docs for the bounds.
    pub async fn serve(
        self: Arc<Self>,
        start: tokio_rustls::StartHandshake<TcpStream>,
        remote: SocketAddr,
    ) {
        let _place = match self.connections.take(&remote.ip()) {
            Ok(p) => p,
            Err(full) => {
                count_rejection(Limit::EnrollmentConnections);
                metrics::counter!("tether_gateway_enrollments_total", "result" => "busy")
                    .increment(1);
                tracing::debug!(%remote, per_address = (full == Full::Key),
                    "too many enrollment connections; dropping one");
                return;
            }
        };
        let tls =
            match tokio::time::timeout(self.handshake_timeout, start.into_stream(self.tls.clone()))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "enrollment TLS handshake failed");
                    return;
                }
                Err(_) => {
                    count_idle_timeout(IdleIn::Enrollment);
                    tracing::info!(%remote, "enrollment TLS handshake timed out");
                    return;
                }
            };
        let routes = self.routes.clone();
        let (arrived, mut first) = tokio::sync::watch::channel(false);
        let svc =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                if arrived.send_replace(true) {
                    count_rejection(Limit::EnrollmentRequestsPerConnection);
                    let status =
                        Status::resource_exhausted("one request per enrollment connection");
                    return futures::future::Either::Left(std::future::ready(Ok(
                        status.into_http()
                    )));
                }
                req.extensions_mut().insert(Remote(remote));
                futures::future::Either::Right(routes.clone().oneshot(req))
            });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.max_concurrent_streams(1);
        let conn = builder.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let waited = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, first.wait_for(|a| *a));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "enrollment connection ended");
                }
                return;
            }
            w = waited => {
                if !matches!(w, Ok(Ok(_))) {
                    count_idle_timeout(IdleIn::Enrollment);
                    tracing::debug!(%remote, "no enrollment request in {FIRST_REQUEST_TIMEOUT:?}; closing");
                    return;
                }
            }
        }
        // The one request (a second one is refused above): it has this long, and then the
        // connection goes, whatever the client does.
        match tokio::time::timeout(REQUEST_TIMEOUT, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%remote, error = %e, "enrollment connection ended"),
            Err(_) => {
                count_idle_timeout(IdleIn::Enrollment);
                tracing::debug!(%remote, "enrollment request not done in {REQUEST_TIMEOUT:?}; closed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://td/tenant/acme/agent/a";

    fn csr(params: rcgen::CertificateParams, key: &rcgen::KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn with_uris(uris: &[&str]) -> rcgen::CertificateParams {
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
        let e = check_csr(&csr(with_uris(&[other]), &key), ID).unwrap_err();
        assert!(e.contains("globex"), "{e}");
        let e = check_csr(&csr(with_uris(&[ID, other]), &key), ID).unwrap_err();
        assert!(e.contains("subject alternative name"), "{e}");
        let mut dns = with_uris(&[ID]);
        dns.subject_alt_names
            .push(rcgen::SanType::DnsName("evil.example".try_into().unwrap()));
        assert!(check_csr(&csr(dns, &key), ID).is_err());
        let mut ca = with_uris(&[ID]);
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let e = check_csr(&csr(ca, &key), ID).unwrap_err();
        assert!(e.contains("CA"), "{e}");
        let mut signing = with_uris(&[]);
        signing.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        assert!(check_csr(&csr(signing, &key), ID).is_err());
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = check_csr(&csr(with_uris(&[ID]), &p384), ID).unwrap_err();
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
        let e = check_csr(&pem, ID).unwrap_err();
        assert!(e.contains("signature"), "{e}");
    }

    /// An enrollment service on a fresh PKI in `dir` (signing when `signing`), its store there.
    fn service(dir: &std::path::Path, signing: bool) -> (Enrollment, Arc<IdentityDb>) {
        crate::identity::pki::init(&dir.join("pki"), "td", &["localhost".into()], false).unwrap();
        let mut cfg: GatewayConfig =
            toml::from_str("trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
                .unwrap();
        cfg.tls.ca = dir.join("pki/ca.pem");
        if signing {
            cfg.enrollment.ca_key = Some(dir.join("pki/ca-key.pem"));
        }
        let db = Arc::new(IdentityDb::open(dir).unwrap());
        (Enrollment::new(&cfg, db.clone()).unwrap(), db)
    }

    fn facts(not_before: i64) -> CertFacts {
        CertFacts {
            fingerprint: "ab".repeat(32),
            serial: "01".into(),
            not_before,
            not_after: not_before + 24 * 3600,
        }
    }

    fn renew_req(csr_pem: String) -> RenewRequest {
        RenewRequest { id: 5, csr_pem }
    }

    /// What the renewal tests share: a signing service in a fresh directory, agent `acme/a`,
    /// the time (Unix seconds) and a key for CSRs.
    struct Renewing {
        svc: Enrollment,
        db: Arc<IdentityDb>,
        agent: AgentId,
        now: i64,
        key: rcgen::KeyPair,
        _dir: tempfile::TempDir,
    }

    fn renewing() -> Renewing {
        tether_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (svc, db) = service(dir.path(), true);
        Renewing {
            svc,
            db,
            agent: "acme/a".parse().unwrap(),
            now: to_ms(SystemTime::now()) / 1000,
            key: rcgen::KeyPair::generate().unwrap(),
            _dir: dir,
        }
    }

    #[test]
    fn a_session_renews_for_exactly_its_own_identity() {
        let Renewing {
            svc,
            agent,
            now,
            key,
            _dir: dir,
            ..
        } = renewing();
        let r = svc.renew(
            &agent,
            &facts(now - 100),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!((r.id, r.code), (5, 0), "{}", r.message);
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(r.certificate_pem.as_bytes()).unwrap();
        assert_eq!(
            tether_runtime::tls::spiffe_id(&der).unwrap().to_string(),
            "spiffe://td/tenant/acme/agent/a"
        );
        let (nb, na) = tether_runtime::tls::validity(&der).unwrap();
        assert_eq!(
            na.duration_since(nb).unwrap(),
            Duration::from_secs(24 * 3600 + 60)
        );
        assert_eq!(
            r.ca_pem,
            std::fs::read_to_string(dir.path().join("pki/ca.pem")).unwrap()
        );
        // Another identity, or more than its own, is refused with the reason.
        for uris in [
            &["spiffe://td/tenant/globex/agent/a"][..],
            &[
                "spiffe://td/tenant/acme/agent/a",
                "spiffe://td/tenant/acme/agent/b",
            ][..],
        ] {
            let r = svc.renew(
                &agent,
                &facts(now - 100),
                &renew_req(csr(with_uris(uris), &key)),
            );
            assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{uris:?}");
            assert!(r.certificate_pem.is_empty());
            assert!(
                r.message.contains("subject alternative name"),
                "{}",
                r.message
            );
        }
    }

    #[test]
    fn a_revoked_certificate_or_agent_is_not_renewed() {
        let Renewing {
            svc,
            db,
            agent,
            now,
            key,
            _dir,
        } = renewing();
        db.revoke(&agent, "key leaked", Vec::new(), now * 1000)
            .unwrap();
        let r = svc.renew(
            &agent,
            &facts(now - 100),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!(r.code, tonic::Code::PermissionDenied as i32);
        assert!(r.message.contains("key leaked"), "{}", r.message);
        assert!(r.certificate_pem.is_empty());
        // A certificate issued after the cut-off (the agent enrolled again) renews.
        let r = svc.renew(
            &agent,
            &facts(now + 1),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!(r.code, 0, "{}", r.message);
    }

    #[test]
    fn an_expired_certificate_is_not_renewed() {
        let Renewing {
            svc,
            agent,
            now,
            key,
            _dir,
            ..
        } = renewing();
        let mut expired = facts(now - 100);
        expired.not_after = now - 1;
        let r = svc.renew(&agent, &expired, &renew_req(csr(with_uris(&[]), &key)));
        assert_eq!(r.code, tonic::Code::Unauthenticated as i32, "{}", r.message);
        assert!(r.message.contains("expired at"), "{}", r.message);
        assert!(r.certificate_pem.is_empty());
        // The same session a little earlier, before its certificate expired, is renewed.
        expired.not_after = now + 60;
        let r = svc.renew(&agent, &expired, &renew_req(csr(with_uris(&[]), &key)));
        assert_eq!(r.code, 0, "{}", r.message);
    }

    #[test]
    fn an_agent_is_renewed_at_most_once_a_second_whatever_its_sessions() {
        let Renewing {
            svc,
            agent: a,
            now,
            key,
            _dir,
            ..
        } = renewing();
        let b: AgentId = "acme/b".parse().unwrap();
        let req = renew_req(csr(with_uris(&[]), &key));
        let started = Instant::now();
        assert_eq!(svc.renew(&a, &facts(now - 100), &req).code, 0);
        // Another session of the same agent (another certificate) asking at once.
        let mut other = facts(now - 50);
        other.fingerprint = "cd".repeat(32);
        let r = svc.renew(&a, &other, &req);
        if started.elapsed() < RENEW_EVERY {
            assert_eq!(
                r.code,
                tonic::Code::ResourceExhausted as i32,
                "{}",
                r.message
            );
            assert!(r.message.contains("acme/a"), "{}", r.message);
            assert!(r.certificate_pem.is_empty());
        }
        // Other agents are not held back.
        assert_eq!(svc.renew(&b, &facts(now - 100), &req).code, 0);
    }

    #[test]
    fn without_a_ca_key_renewal_is_refused_and_a_foreign_signing_ca_is_a_start_error() {
        tether_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (svc, _db) = service(dir.path(), false);
        let key = rcgen::KeyPair::generate().unwrap();
        let r = svc.renew(
            &"acme/a".parse().unwrap(),
            &facts(0),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!(r.code, tonic::Code::FailedPrecondition as i32);
        // enrollment.ca_key of a CA that tls.ca does not hold: refused at start.
        let other = tempfile::tempdir().unwrap();
        crate::identity::pki::init(other.path(), "td", &["localhost".into()], false).unwrap();
        let mut cfg: GatewayConfig =
            toml::from_str("trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
                .unwrap();
        cfg.tls.ca = dir.path().join("pki/ca.pem");
        cfg.enrollment.ca_key = Some(other.path().join("ca-key.pem"));
        cfg.enrollment.ca_cert = Some(other.path().join("ca.pem"));
        let db = Arc::new(IdentityDb::open(other.path()).unwrap());
        let e = Enrollment::new(&cfg, db).unwrap_err().to_string();
        assert!(e.contains("does not hold the CA certificate"), "{e}");
    }

    #[test]
    fn tokens_are_long_random_and_prefixed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
    }
}
