//! Feature layer: who is calling the northbound API, and which tenants it may act for.
//!
//! A caller is resolved once per request, before routing ([`Authenticated`] wraps every
//! northbound service, the relay included), from:
//! - its client certificate: `spiffe://<our td>/controlplane/<name>` (agent identities chain to
//!   the same CA and are refused);
//! - or, when `[auth]` names a JWKS, an `authorization: Bearer <jwt>` header: ES256 or RS256
//!   only (`none` and HMAC are refused), signature checked against the key its `kid` names,
//!   `iss` and `aud` checked, `exp` required and `nbf` honoured (with `auth.leeway`), tenants
//!   from `auth.tenant_claim`. A token wins over the certificate that carries it, and is never
//!   forwarded to agents.
//!
//! Each caller gets a [`TenantScope`]: without an `[auth]` section, every control-plane
//! certificate may act for every tenant (scoping off, logged at start). With one, an mTLS caller
//! gets the tenants its `[[auth.callers]]` entry lists (unlisted: refused), and a JWT caller the
//! tenants of its claim, intersected with the entry for its `sub` when there is one.
//!
//! Every method then checks the tenant of what it touches ([`Caller::authorize`]). A denial is
//! `PERMISSION_DENIED` naming the tenant the caller asked for (never whether the agent exists),
//! an audit event (target `tether::audit`) and `tether_gateway_authz_denials_total{method}`;
//! a refused credential is `UNAUTHENTICATED`, audited too.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::CertificateDer;
use tether_runtime::CancellationToken;
use tether_runtime::config::ConfigError;
use tether_runtime::tls::spiffe_id;
use tonic::Status;
use tunnel_proto::{AgentId, SpiffeId};

use crate::config::{AuthConfig, GatewayConfig, PolicyKind};
use crate::error::GatewayError;
use crate::identity::callers::CallerRevocationList;
use crate::northbound::listener::PeerCerts;

/// The tracing target of audit events.
pub const AUDIT_TARGET: &str = "tether::audit";

/// Largest JWKS document accepted.
const JWKS_MAX_BYTES: usize = 1 << 20;
/// Time allowed for one JWKS fetch, connection included.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `auth.jwks_file` is checked for changes.
const JWKS_FILE_CHECK: Duration = Duration::from_secs(1);
/// Longest wait between fetches of a `jwks_url` that has not given us keys yet.
const JWKS_RETRY: Duration = Duration::from_secs(5);

// === Callers ===

/// How a caller authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// A control-plane client certificate.
    Mtls,
    /// A bearer token (JWT).
    Jwt,
}

impl CallerKind {
    /// `mtls` or `jwt`.
    pub fn as_str(self) -> &'static str {
        match self {
            CallerKind::Mtls => "mtls",
            CallerKind::Jwt => "jwt",
        }
    }
}

/// The tenants a caller may act for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant.
    All,
    /// These tenants.
    Set(BTreeSet<String>),
}

impl TenantScope {
    /// Whether `tenant` is in scope.
    pub fn contains(&self, tenant: &str) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Set(s) => s.contains(tenant),
        }
    }

    fn intersect(self, other: &TenantScope) -> TenantScope {
        match (self, other) {
            (TenantScope::All, o) => o.clone(),
            (s, TenantScope::All) => s,
            (TenantScope::Set(a), TenantScope::Set(b)) => {
                TenantScope::Set(a.intersection(b).cloned().collect())
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, TenantScope::Set(s) if s.is_empty())
    }

    fn from_list(tenants: &[String]) -> TenantScope {
        if tenants.iter().any(|t| t == "*") {
            TenantScope::All
        } else {
            TenantScope::Set(tenants.iter().cloned().collect())
        }
    }
}

/// An authenticated northbound caller, in every request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The certificate's `<name>`, or the token's `sub`.
    pub name: String,
    /// How it authenticated.
    pub kind: CallerKind,
    /// What it may act for.
    pub tenants: TenantScope,
}

impl Caller {
    /// Whether this caller may act for `tenant`.
    pub fn may_act_for(&self, tenant: &str) -> bool {
        self.tenants.contains(tenant)
    }

    /// Allows `method` on `agent`, or audits the denial and says `PERMISSION_DENIED`.
    pub fn authorize(&self, method: &'static str, agent: &AgentId) -> Result<(), Status> {
        self.authorize_tenant(method, agent.tenant(), &agent.to_string())
    }

    /// Allows `method` on `tenant` (`agent` for the audit event, may be empty).
    pub fn authorize_tenant(
        &self,
        method: &'static str,
        tenant: &str,
        agent: &str,
    ) -> Result<(), Status> {
        if self.may_act_for(tenant) {
            return Ok(());
        }
        let reason = "tenant not in the caller's scope";
        audit_denied(&self.name, self.kind, method, tenant, agent, "", reason);
        Err(Status::permission_denied(format!(
            "caller {:?} may not act for tenant {tenant:?}",
            self.name
        )))
    }

    /// Allows `method` on command `id` of `agent`. The denial does not name the tenant: the
    /// caller named only the id.
    pub fn authorize_command(
        &self,
        method: &'static str,
        id: &str,
        agent: &str,
    ) -> Result<(), Status> {
        let tenant = agent.split_once('/').map_or(agent, |(t, _)| t);
        if self.may_act_for(tenant) {
            return Ok(());
        }
        let reason = "command of a tenant not in the caller's scope";
        audit_denied(&self.name, self.kind, method, tenant, agent, id, reason);
        Err(Status::permission_denied(format!(
            "caller {:?} may not act for the tenant of command {id}",
            self.name
        )))
    }

    /// Allows `method` only to a caller acting for every tenant (calls whose effect is not
    /// confined to tenants, such as revoking another caller), or audits the denial and says
    /// `PERMISSION_DENIED`.
    pub fn authorize_every_tenant(&self, method: &'static str) -> Result<(), Status> {
        if self.tenants == TenantScope::All {
            return Ok(());
        }
        let reason = "only a caller acting for every tenant may do this";
        audit_denied(&self.name, self.kind, method, "*", "", "", reason);
        Err(Status::permission_denied(format!(
            "caller {:?} may not call {method}: {reason}",
            self.name
        )))
    }

    /// Audits a successful mutating call (`detail`: the command id, say).
    pub fn audit_allowed(&self, method: &'static str, agent: &AgentId, detail: &str) {
        self.audit_allowed_on(method, agent.tenant(), &agent.to_string(), detail);
    }

    /// Audits a successful mutating call on `tenant`/`agent` (either may be empty).
    pub fn audit_allowed_on(&self, method: &'static str, tenant: &str, agent: &str, detail: &str) {
        tracing::info!(
            target: AUDIT_TARGET,
            caller = %self.name,
            kind = self.kind.as_str(),
            method,
            tenant,
            agent,
            detail,
            decision = "allow",
            reason = "",
            "northbound call allowed"
        );
    }
}

/// The caller [`Authenticated`] resolved for this request.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

fn audit_denied(
    caller: &str,
    kind: CallerKind,
    method: &'static str,
    tenant: &str,
    agent: &str,
    detail: &str,
    reason: &str,
) {
    tracing::warn!(
        target: AUDIT_TARGET,
        caller,
        kind = kind.as_str(),
        method,
        tenant,
        agent,
        detail,
        decision = "deny",
        reason,
        "northbound call denied"
    );
    metrics::counter!("tether_gateway_authz_denials_total", "method" => method).increment(1);
}

fn audit_unauthenticated(caller: &str, kind: CallerKind, method: &'static str, reason: &str) {
    tracing::warn!(
        target: AUDIT_TARGET,
        caller,
        kind = kind.as_str(),
        method,
        tenant = "",
        agent = "",
        detail = "",
        decision = "deny",
        reason,
        "northbound caller not authenticated"
    );
    metrics::counter!("tether_gateway_authn_failures_total", "method" => method).increment(1);
}

/// The gRPC methods of the northbound API, for audit events and metric labels; anything else
/// is relayed to an agent and labelled `relay`.
const METHODS: &[&str] = &[
    "tether.v1.Agents/List",
    "tether.v1.Agents/Get",
    "tether.v1.Agents/Watch",
    "tether.v1.Agents/Revoke",
    "tether.v1.Commands/Submit",
    "tether.v1.Commands/Get",
    "tether.v1.Commands/List",
    "tether.v1.Commands/Watch",
    "tether.v1.Commands/Cancel",
    "tether.v1.Streams/Open",
    "tether.v1.Enrollment/CreateToken",
    "tether.v1.Enrollment/Enroll",
    "tether.v1.Callers/Revoke",
];

/// The method label of a request path (a bounded set: paths are the caller's to choose).
pub fn method_of(path: &str) -> &'static str {
    let m = path.trim_start_matches('/');
    match METHODS.iter().find(|k| **k == m) {
        Some(k) => k,
        None if m.starts_with("tether.v1.") => "tether.v1.unknown",
        None => "relay",
    }
}

// === Authentication ===

/// Resolves callers: certificates, bearer tokens, and the tenant policy.
#[derive(Debug)]
pub struct Authenticator {
    trust_domain: String,
    /// Revoked caller certificates (`tether.v1.Callers/Revoke`).
    revoked: Arc<CallerRevocationList>,
    /// `None`: no `[auth]` section, every control-plane certificate acts for every tenant.
    policy: Option<Policy>,
    jwt: Option<Arc<JwtVerifier>>,
}

#[derive(Debug, Default)]
struct Policy {
    mtls: HashMap<String, TenantScope>,
    jwt: HashMap<String, TenantScope>,
}

impl Authenticator {
    /// From `cfg`: the policy, and the JWKS file's keys (read now: a bad file is a config error).
    /// A `jwks_url` is fetched by [`run_refresh`](Self::run_refresh).
    pub fn new(cfg: &GatewayConfig) -> Result<Arc<Authenticator>, GatewayError> {
        Self::with_revocations(cfg, Arc::default())
    }

    /// As [`new`](Self::new), refusing the caller certificates `revoked` lists.
    pub fn with_revocations(
        cfg: &GatewayConfig,
        revoked: Arc<CallerRevocationList>,
    ) -> Result<Arc<Authenticator>, GatewayError> {
        let (policy, jwt) = match &cfg.auth {
            None => (None, None),
            Some(a) => {
                let mut p = Policy::default();
                for c in &a.callers {
                    let scope = TenantScope::from_list(&c.tenants);
                    match c.kind {
                        PolicyKind::Mtls => p.mtls.insert(c.name.clone(), scope),
                        PolicyKind::Jwt => p.jwt.insert(c.name.clone(), scope),
                    };
                }
                let jwt = if a.jwt_enabled() {
                    Some(Arc::new(JwtVerifier::new(a)?))
                } else {
                    None
                };
                (Some(p), jwt)
            }
        };
        Ok(Arc::new(Authenticator {
            trust_domain: cfg.trust_domain.clone(),
            revoked,
            policy,
            jwt,
        }))
    }

    /// Whether callers may come without a client certificate (they bring a token instead).
    pub fn accepts_tokens(&self) -> bool {
        self.jwt.is_some()
    }

    /// Whether tenant scoping is on (an `[auth]` section exists).
    pub fn scoping(&self) -> bool {
        self.policy.is_some()
    }

    /// Keeps the JWKS fresh until `shutdown`: re-reads the file when it changes, fetches the URL
    /// every `auth.jwks_refresh`. Returns at once when no keys are configured.
    pub async fn run_refresh(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(jwt) = self.jwt.clone() else { return };
        jwt.run_refresh(shutdown).await;
    }

    /// The caller of a request for `method`, or why it may not call (audited).
    pub async fn authenticate(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        headers: &HeaderMap,
        method: &'static str,
    ) -> Result<Caller, Status> {
        let name = match certs.and_then(|c| c.first()) {
            Some(cert) => match caller_from_cert(&self.trust_domain, cert) {
                // A revoked certificate is refused even when a token comes with it.
                Ok(name) => match self.revoked.refusal_of(cert) {
                    None => Some(name),
                    Some(why) => {
                        audit_unauthenticated(&name, CallerKind::Mtls, method, &why);
                        return Err(Status::unauthenticated(format!(
                            "{why}; ask for a new certificate"
                        )));
                    }
                },
                Err(status) => {
                    audit_unauthenticated("", CallerKind::Mtls, method, status.message());
                    return Err(status);
                }
            },
            None => None,
        };
        let token = match &self.jwt {
            Some(_) => bearer(headers).inspect_err(|s| {
                audit_unauthenticated("", CallerKind::Jwt, method, s.message());
            })?,
            None => None,
        };
        if let (Some(token), Some(jwt)) = (token, &self.jwt) {
            return self.jwt_caller(jwt, token, method).await;
        }
        let Some(name) = name else {
            let msg = if self.jwt.is_some() {
                "a client certificate or a bearer token is required"
            } else {
                "a client certificate is required"
            };
            audit_unauthenticated("", CallerKind::Mtls, method, msg);
            return Err(Status::unauthenticated(msg));
        };
        let tenants = match &self.policy {
            None => TenantScope::All,
            Some(p) => match p.mtls.get(&name) {
                Some(s) => s.clone(),
                None => {
                    let reason = "control-plane caller not listed in auth.callers";
                    audit_denied(&name, CallerKind::Mtls, method, "", "", "", reason);
                    return Err(Status::permission_denied(format!(
                        "control-plane caller {name:?} may not act for any tenant (not in auth.callers)"
                    )));
                }
            },
        };
        Ok(Caller {
            name,
            kind: CallerKind::Mtls,
            tenants,
        })
    }

    async fn jwt_caller(
        &self,
        jwt: &JwtVerifier,
        token: &str,
        method: &'static str,
    ) -> Result<Caller, Status> {
        let claims = match jwt.verify(token).await {
            Ok(c) => c,
            Err(reason) => {
                audit_unauthenticated("", CallerKind::Jwt, method, &reason);
                return Err(Status::unauthenticated(format!(
                    "bearer token refused: {reason}"
                )));
            }
        };
        let mut tenants = TenantScope::Set(claims.tenants);
        if let Some(entry) = self.policy.as_ref().and_then(|p| p.jwt.get(&claims.sub)) {
            tenants = tenants.intersect(entry);
        }
        if tenants.is_empty() {
            let reason = "token grants no tenant";
            audit_denied(&claims.sub, CallerKind::Jwt, method, "", "", "", reason);
            return Err(Status::permission_denied(format!(
                "token subject {:?} may not act for any tenant",
                claims.sub
            )));
        }
        Ok(Caller {
            name: claims.sub,
            kind: CallerKind::Jwt,
            tenants,
        })
    }
}

/// The name of the control-plane caller a client certificate identifies, or why it may not
/// call: only `spiffe://<trust_domain>/controlplane/<name>` may; agents may not.
pub fn caller_from_cert(trust_domain: &str, cert: &CertificateDer<'_>) -> Result<String, Status> {
    let id = spiffe_id(cert)
        .map_err(|e| Status::unauthenticated(format!("client certificate identity: {e}")))?;
    match id {
        SpiffeId::ControlPlane {
            trust_domain: td,
            name,
        } if td == trust_domain => Ok(name),
        SpiffeId::ControlPlane {
            trust_domain: td, ..
        } => Err(Status::permission_denied(format!(
            "caller trust domain {td:?} is not {trust_domain:?}"
        ))),
        SpiffeId::Agent { id, .. } => Err(Status::permission_denied(format!(
            "agent identity {id} may not call the northbound API"
        ))),
    }
}

/// The token of `authorization: Bearer <token>`, if the header is there.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Status> {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not text"))?;
    match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err(Status::unauthenticated(
            "authorization metadata must be \"Bearer <token>\"",
        )),
    }
}

// === The layer ===

/// Wraps the northbound services: resolves the [`Caller`] of each request into its extensions
/// (and takes the bearer token out of the headers), or answers with the refusal.
#[derive(Clone, Debug)]
pub struct Authenticated<S> {
    auth: Arc<Authenticator>,
    inner: S,
}

impl<S> Authenticated<S> {
    /// `inner` behind `auth`.
    pub fn new(auth: Arc<Authenticator>, inner: S) -> Self {
        Authenticated { auth, inner }
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is not necessarily ready: take the one that is.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let method = method_of(req.uri().path());
            let certs = req.extensions().get::<PeerCerts>().map(|c| c.0.clone());
            let caller = auth
                .authenticate(certs.as_deref().map(Vec::as_slice), req.headers(), method)
                .await;
            match caller {
                Ok(caller) => {
                    if auth.accepts_tokens() {
                        // The gateway's credential: never relayed to an agent.
                        req.headers_mut().remove(http::header::AUTHORIZATION);
                    }
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

// === JWT ===

/// What a verified token says.
#[derive(Debug)]
struct Claims {
    sub: String,
    tenants: BTreeSet<String>,
}

/// One usable signing key.
#[derive(Clone)]
struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys of one JWKS document.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid`: usable only by tokens without one, when they are the only key.
    anonymous: Vec<Key>,
}

impl KeySet {
    /// The ES256 (P-256) and RS256 signature keys of a JWKS document; others are skipped.
    fn parse(json: &[u8]) -> Result<KeySet, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut out = KeySet::default();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let Some(key) = usable(jwk) else {
                tracing::debug!(kid = ?kid, "JWKS key skipped: not an ES256 or RS256 signature key");
                continue;
            };
            match kid {
                Some(kid) => {
                    out.by_kid.entry(kid).or_insert(key);
                }
                None => out.anonymous.push(key),
            }
        }
        if out.len() == 0 {
            return Err("no ES256 (P-256) or RS256 signature key in the JWKS".into());
        }
        Ok(out)
    }

    fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None if self.len() == 1 => self.by_kid.values().chain(&self.anonymous).next(),
            None => None,
        }
    }

    fn kids(&self) -> BTreeSet<&str> {
        self.by_kid.keys().map(String::as_str).collect()
    }
}

fn usable(jwk: &Jwk) -> Option<Key> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        _ => return None,
    };
    // A key published for another algorithm is not ours to use with this one.
    let declared = &jwk.common.key_algorithm;
    let fits = match alg {
        Algorithm::ES256 => matches!(declared, None | Some(KeyAlgorithm::ES256)),
        _ => matches!(declared, None | Some(KeyAlgorithm::RS256)),
    };
    if !fits {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { alg, key })
}

/// Where the keys come from.
#[derive(Debug)]
enum JwksSource {
    File(PathBuf),
    Url {
        uri: http::Uri,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// Verifies bearer tokens against a JWKS that it keeps fresh.
struct JwtVerifier {
    issuer: String,
    audience: String,
    tenant_claim: String,
    leeway: Duration,
    refresh: Duration,
    source: JwksSource,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped at each successful load, so a request that waited for a fetch in progress sees
    /// that it happened.
    generation: AtomicU64,
    /// One fetch at a time; when the last one started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// `jwks_file`'s modification time and length when last read.
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    fn new(a: &AuthConfig) -> Result<JwtVerifier, GatewayError> {
        let source = match (&a.jwks_file, &a.jwks_url) {
            (Some(path), _) => JwksSource::File(path.clone()),
            (None, Some(url)) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| ConfigError::invalid("auth.jwks_url", format!("{e}")))?;
                JwksSource::Url {
                    uri,
                    tls: jwks_tls(a)?,
                }
            }
            (None, None) => {
                return Err(ConfigError::invalid("auth", "no jwks_file or jwks_url").into());
            }
        };
        let v = JwtVerifier {
            issuer: a.issuer.clone().unwrap_or_default(),
            audience: a.audience.clone().unwrap_or_default(),
            tenant_claim: a.tenant_claim.clone(),
            leeway: a.leeway,
            refresh: a.jwks_refresh,
            source,
            keys: RwLock::new(Arc::new(KeySet::default())),
            generation: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(None),
            file_stamp: Mutex::new(None),
        };
        if let JwksSource::File(path) = &v.source {
            let (stamp, set) =
                read_jwks_file(path).map_err(|e| ConfigError::invalid("auth.jwks_file", e))?;
            tracing::info!(file = %path.display(), keys = set.len(), kids = ?set.kids(), "JWKS loaded");
            *v.file_stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
            v.install(set);
        }
        Ok(v)
    }

    fn install(&self, set: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn run_refresh(&self, shutdown: CancellationToken) {
        if let JwksSource::Url { .. } = &self.source {
            self.fetch(Duration::ZERO).await;
        }
        loop {
            let wait = match &self.source {
                JwksSource::File(_) => JWKS_FILE_CHECK.min(self.refresh),
                // Never loaded: try again soon.
                JwksSource::Url { .. } if self.current().len() == 0 => JWKS_RETRY.min(self.refresh),
                JwksSource::Url { .. } => self.refresh,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match &self.source {
                JwksSource::File(path) => self.reload_file(path),
                JwksSource::Url { .. } => {
                    self.fetch(Duration::ZERO).await;
                }
            }
        }
    }

    /// Re-reads the file when its modification time or length changed; a bad new version is
    /// logged and the old keys stay.
    fn reload_file(&self, path: &std::path::Path) {
        let stamp = match file_stamp(path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "JWKS file unreadable; keeping the keys loaded before");
                return;
            }
        };
        {
            let mut last = self.file_stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == Some(stamp) {
                return;
            }
            *last = Some(stamp);
        }
        match read_jwks_file(path) {
            Ok((_, set)) => {
                tracing::info!(file = %path.display(), keys = set.len(), kids = ?set.kids(), "JWKS reloaded");
                self.install(set);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "JWKS file changed but is not usable; keeping the keys loaded before");
            }
        }
    }

    /// Fetches the URL unless a fetch started less than `min_gap` ago. True when keys were
    /// loaded (by this call or by the fetch it waited for).
    async fn fetch(&self, min_gap: Duration) -> bool {
        let JwksSource::Url { uri, tls } = &self.source else {
            return false;
        };
        let before = self.generation.load(Ordering::SeqCst);
        let mut last = self.fetching.lock().await;
        if self.generation.load(Ordering::SeqCst) != before {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < min_gap) {
            return false;
        }
        *last = Some(Instant::now());
        let got = tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch_url(uri, tls))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {JWKS_FETCH_TIMEOUT:?}")))
            .and_then(|body| KeySet::parse(&body));
        match got {
            Ok(set) => {
                let changed = set.kids() != self.current().kids();
                if changed {
                    tracing::info!(url = %uri, keys = set.len(), kids = ?set.kids(), "JWKS loaded");
                }
                self.install(set);
                true
            }
            Err(e) => {
                tracing::warn!(url = %uri, error = %e, "JWKS fetch failed; keeping the keys loaded before");
                false
            }
        }
    }

    /// The key for `kid`, fetching the JWKS again (at most every few seconds) when it is not
    /// known: that is how a rotation shows up before the next refresh.
    async fn key_for(&self, kid: Option<&str>) -> Result<Key, String> {
        if let Some(k) = self.current().find(kid) {
            return Ok(k.clone());
        }
        // Not known (yet): a rotation shows up here before the next refresh.
        match &self.source {
            JwksSource::Url { .. } => {
                if self.fetch(JWKS_RETRY.min(self.refresh)).await {
                    let keys = self.current();
                    if let Some(k) = keys.find(kid) {
                        return Ok(k.clone());
                    }
                }
            }
            JwksSource::File(path) => {
                self.reload_file(path);
                let keys = self.current();
                if let Some(k) = keys.find(kid) {
                    return Ok(k.clone());
                }
            }
        }
        let keys = self.current();
        Err(match kid {
            _ if keys.len() == 0 => {
                "no signing keys are loaded (the JWKS could not be read)".into()
            }
            Some(kid) => format!("unknown key id {kid:?}"),
            None => "the token has no kid and the JWKS has several keys".into(),
        })
    }

    async fn verify(&self, token: &str) -> Result<Claims, String> {
        let header = token_header(token)?;
        let alg = match header.get("alg").and_then(|a| a.as_str()) {
            Some("ES256") => Algorithm::ES256,
            Some("RS256") => Algorithm::RS256,
            Some(other) => {
                return Err(format!(
                    "algorithm {other:?} is not accepted (ES256 or RS256)"
                ));
            }
            None => return Err("the token header has no alg".into()),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(serde_json::Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err("kid is not a string".into()),
        };
        let key = self.key_for(kid).await?;
        if key.alg != alg {
            return Err(format!(
                "algorithm {alg:?} does not match the key's ({:?})",
                key.alg
            ));
        }
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = self.leeway.as_secs();
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &v)
                .map_err(|e| token_error(&e))?;
        let claims = data.claims;
        let sub = match claims.get("sub") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err("sub is not a non-empty string".into()),
        };
        let claim = &self.tenant_claim;
        let tenants: Vec<&str> = match claims.get(claim) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| format!("claim {claim:?} holds a non-string"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(format!(
                    "claim {claim:?} is neither a string nor an array of strings"
                ));
            }
        };
        for t in &tenants {
            tunnel_proto::identity::check_name("tenant", t)
                .map_err(|e| format!("claim {claim:?}: {e}"))?;
        }
        Ok(Claims {
            sub,
            tenants: tenants.into_iter().map(str::to_owned).collect(),
        })
    }
}

/// The JOSE header, read before anything else so `alg: none` and HMAC are refused by name.
fn token_header(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (three dot-separated parts)".into());
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| "the token header is not base64url".to_string())?;
    serde_json::from_slice(&raw).map_err(|_| "the token header is not a JSON object".into())
}

fn token_error(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => "bad signature".into(),
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::MissingRequiredClaim(c) => format!("claim {c:?} is missing"),
        K::InvalidAlgorithm => "algorithm not accepted".into(),
        _ => format!("invalid token: {e}"),
    }
}

fn file_stamp(path: &std::path::Path) -> std::io::Result<(SystemTime, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified()?, m.len()))
}

fn read_jwks_file(path: &std::path::Path) -> Result<((SystemTime, u64), KeySet), String> {
    let stamp = file_stamp(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > JWKS_MAX_BYTES {
        return Err(format!("{}: larger than 1 MiB", path.display()));
    }
    let set = KeySet::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((stamp, set))
}

/// TLS for fetching the JWKS: `auth.jwks_ca`, or the system's trust store.
fn jwks_tls(a: &AuthConfig) -> Result<Arc<rustls::ClientConfig>, GatewayError> {
    let roots = match &a.jwks_ca {
        Some(ca) => tether_runtime::tls::load_roots(ca)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "system trust store");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0
                && a.jwks_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https:"))
            {
                return Err(ConfigError::invalid(
                    "auth.jwks_ca",
                    "the system trust store is empty: set auth.jwks_ca to the JWKS server's CA bundle",
                )
                .into());
            }
            roots
        }
    };
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// `GET uri` over HTTP/1.1 (TLS for `https`), the 200 body up to [`JWKS_MAX_BYTES`].
async fn fetch_url(uri: &http::Uri, tls: &Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let host = uri
        .host()
        .ok_or("no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "tether-gateway")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("server name {host:?}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        http_get(stream, req).await
    } else {
        http_get(tcp, req).await
    }
}

async fn http_get<IO>(
    io: IO,
    req: http::Request<http_body_util::Empty<Bytes>>,
) -> Result<Vec<u8>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status();
    if status != http::StatusCode::OK {
        conn.abort();
        return Err(format!("HTTP status {status}"));
    }
    let body = http_body_util::Limited::new(resp.into_body(), JWKS_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    conn.abort();
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_of("/tether.v1.Agents/Get"), "tether.v1.Agents/Get");
        assert_eq!(method_of("/tether.v1.Agents/Nope"), "tether.v1.unknown");
        assert_eq!(method_of("/demo.v1.Echo/Unary"), "relay");
    }

    #[test]
    fn scopes_intersect() {
        let set = |v: &[&str]| TenantScope::Set(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(set(&["a", "b"]).intersect(&set(&["b", "c"])), set(&["b"]));
        assert_eq!(set(&["a"]).intersect(&TenantScope::All), set(&["a"]));
        assert_eq!(TenantScope::All.intersect(&set(&["a"])), set(&["a"]));
        assert!(set(&["a"]).intersect(&set(&["b"])).is_empty());
        assert!(!TenantScope::All.is_empty());
    }

    #[test]
    fn bearer_header_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h).unwrap(), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn header_of_alg_none_token_is_read() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"x"}"#));
        assert_eq!(token_header(&t).unwrap()["alg"], "none");
        assert!(token_header("a.b").is_err());
    }

    #[test]
    fn jwks_without_usable_keys_is_refused() {
        let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(KeySet::parse(oct).is_err());
        assert!(KeySet::parse(b"{}").is_err());
    }
}
