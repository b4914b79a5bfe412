//! Feature layer: agent enrollment with single-use bootstrap tokens (`tether.v1.Enrollment`).
//!
//! - `CreateToken` (northbound, control-plane callers): a random 256-bit token for one agent
//!   identity, returned once; the gateway stores only its SHA-256 with the identity, expiry and
//!   state ([`IdentityStore`]).
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
//! The CSR is checked by [`check_csr`](crate::identity::csr::check_csr), the agent-facing
//! endpoint is [`EnrollEndpoint`](crate::identity::endpoint::EnrollEndpoint), and renewal over
//! a live session ([`Enrollment::renew`]) is in [`renewal`](crate::identity::renewal): the same
//! checks and the same certificate. Certificates
//! are signed by the CA of `enrollment.ca_key`, and every issued certificate goes out with
//! `tls.ca`, the CA bundle of the trust domain: during a CA rotation it holds the old and the
//! new CA, and agents trust it for the gateway's certificate as well (docs/ca-rotation.md).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::pem::PemObject;
use tether_api::v1;
use tether_api::v1::enrollment_server::{Enrollment as EnrollmentService, EnrollmentServer};
use tonic::{Request, Response, Status};
use tunnel_proto::AgentId;

use crate::config::{EnrollmentConfig, GatewayConfig};
use crate::error::GatewayError;
use crate::identity::csr::{CsrError, check_csr};
use crate::identity::db::{
    IdentityDbError, RedeemError, TokenRecord, TokenRefusal, TooManyPending,
};
use crate::identity::pki::{Ca, LeafSpec, PkiError};
use crate::identity::renewal::RENEW_EVERY;
use crate::identity::store::IdentityStore;
use tether_runtime::digest::sha256_hex;

use crate::identity::revocation::{RevocationList, to_ms};
use crate::metrics::{Limit, count_rejection};
use crate::northbound::agents::{Caller, authenticate};
use crate::quota::{Full, KeyedRate, Shares};

pub use tunnel_proto::ENROLL_ALPN;

/// Token prefix: says what the string is when it turns up in a log or a secret store.
pub const TOKEN_PREFIX: &str = "tet1_";

/// Enrollments being decided at once (token check, CSR check, signing, the store's write),
/// and by one source address: taken only once a whole request has arrived.
const MAX_ISSUING: usize = 64;
const ISSUING_PER_ADDRESS: usize = 16;

/// Certificates are valid from a minute ago: agents' clocks may lag the gateway's. (Or from a
/// quarter of their lifetime ago, when that is shorter: agents renew at two thirds of the
/// lifetime, so a certificate of a few seconds, as in tests, would otherwise be due at once.)
const CLOCK_SKEW: i64 = 60;

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
    Csr(#[from] CsrError),
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
    /// The `result` label of `tether_gateway_enrollments_total` and
    /// `tether_gateway_renewals_total`.
    pub(super) fn label(&self) -> &'static str {
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
    pub(super) db: IdentityStore,
    pub(super) revocations: Arc<RevocationList>,
    pub(super) ca: Option<Ca>,
    pub(super) cfg: EnrollmentConfig,
    /// `tls.ca` (PEM): the CA bundle that goes out with every issued certificate.
    pub(super) bundle: String,
    /// When each agent was last renewed (see [`RENEW_EVERY`]).
    pub(super) renewed: std::sync::Mutex<HashMap<AgentId, Instant>>,
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
    /// Loads the CA named by `enrollment.ca_key` when set (see [`signing_ca`]); `ca_bundle`
    /// is `tls.ca` as written (PEM), which goes out with every issued certificate.
    pub fn new(
        cfg: &GatewayConfig,
        ca_bundle: &str,
        db: impl Into<IdentityStore>,
    ) -> Result<Enrollment, GatewayError> {
        let db = db.into();
        let ca = signing_ca(cfg, ca_bundle)?;
        let bundle = ca_bundle.to_owned();
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
        let stored = self
            .db
            .put_token(sha256_hex(token.as_bytes()), record, self.max_pending)
            .await?;
        if let Err(e) = stored {
            count_rejection(Limit::PendingTokensPerAgent);
            return Err(e.into());
        }
        metrics::counter!("tether_gateway_enrollment_tokens_created_total").increment(1);
        tracing::info!(agent = %id, created_by, ttl = %tether_runtime::duration::human(ttl),
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
        let now = SystemTime::now();
        let redeemed = self
            .db
            .redeem_token(hash, to_ms(now), move |record| {
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
            .await?;
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
    pub(super) fn check(
        &self,
        id: &AgentId,
        csr_pem: &str,
    ) -> Result<rcgen::PublicKey, EnrollError> {
        let ca = self.ca.as_ref().ok_or(EnrollError::Disabled)?;
        Ok(check_csr(csr_pem, &id.to_uri(&ca.trust_domain))?)
    }

    /// A certificate for `id` and `key`, valid from now (or the agent's revocation cut-off).
    pub(super) fn sign(
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
            // Judged by its backdated notBefore: a renewal racing a revocation is refused.
            issued_at: None,
        };
        let pem = ca
            .sign(&spec, key)
            .map_err(|e| EnrollError::Issue(e.to_string()))?;
        Ok((pem, not_after))
    }
}

/// The CA of `enrollment.ca_key` when set (its certificate found in `enrollment.ca_cert`,
/// default `tls.ca`, by the key), which must be one of the CAs of `bundle` (`tls.ca` as
/// written). For the start and `--check-config`.
pub fn signing_ca(cfg: &GatewayConfig, bundle: &str) -> Result<Option<Ca>, PkiError> {
    let Some(key) = &cfg.enrollment.ca_key else {
        return Ok(None);
    };
    let cert = cfg.enrollment.ca_cert.as_ref().unwrap_or(&cfg.tls.ca);
    let ca = Ca::from_files(cert, key, &cfg.trust_domain)?;
    if !crate::identity::pki::bundle_contains(bundle, &ca.cert_pem) {
        return Err(PkiError::CaMismatch {
            cert: cfg.tls.ca.clone(),
            reason: "it does not hold the CA certificate of enrollment.ca_key: the gateway \
                     would refuse every certificate it issues (during a CA rotation tls.ca \
                     holds the old and the new CA)"
                .into(),
        });
    }
    Ok(Some(ca))
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
pub(crate) struct Remote(pub(crate) SocketAddr);

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
            .map_err(Status::from)?;
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
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_prefixed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
    }
}
