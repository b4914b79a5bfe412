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

pub mod jwks;
pub mod jwt;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderMap;
use rustls_pki_types::CertificateDer;
use tether_runtime::CancellationToken;
use tether_runtime::tls::spiffe_id;
use tonic::Status;
use tunnel_proto::{AgentId, SpiffeId};

use crate::config::{GatewayConfig, PolicyKind};
use crate::error::GatewayError;
use crate::identity::callers::CallerRevocationList;
use crate::northbound::auth::jwt::JwtVerifier;
use crate::northbound::listener::PeerCerts;

/// The tracing target of audit events.
pub const AUDIT_TARGET: &str = "tether::audit";

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
    "tether.v1.Console/CreateLoginLink",
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

    /// The revoked caller certificates it refuses.
    pub fn caller_revocations(&self) -> &Arc<CallerRevocationList> {
        &self.revoked
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
                audit_unauthenticated("", CallerKind::Jwt, method, &reason.to_string());
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
        SpiffeId::Gateway { replica, .. } => Err(Status::permission_denied(format!(
            "gateway replica identity {replica} may not call the northbound API (it is for the peer links between replicas)"
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
}
