//! Feature layer: `tether.v1.Console`, the gRPC side of the console's login.

use std::sync::Arc;
use std::time::SystemTime;

use tether_api::v1;
use tether_api::v1::console_server::{Console, ConsoleServer};
use tonic::{Request, Response, Status};

use crate::console::login::{LoginError, Logins};
use crate::northbound::auth::{CallerKind, TenantScope, caller};
use crate::northbound::listener::PeerCerts;

/// `tether.v1.Console`.
#[derive(Debug, Clone)]
pub struct ConsoleApi {
    logins: Arc<Logins>,
}

impl ConsoleApi {
    /// Mints links into `logins`.
    pub fn new(logins: Arc<Logins>) -> ConsoleApi {
        ConsoleApi { logins }
    }

    /// The tonic service (callers are authenticated by `auth::Authenticated` around it).
    pub fn into_service(self) -> ConsoleServer<ConsoleApi> {
        ConsoleServer::new(self)
    }
}

#[tonic::async_trait]
impl Console for ConsoleApi {
    async fn create_login_link(
        &self,
        req: Request<v1::CreateLoginLinkRequest>,
    ) -> Result<Response<v1::LoginLink>, Status> {
        const METHOD: &str = "tether.v1.Console/CreateLoginLink";
        let caller = caller(&req)?;
        // The certificate it came with (none with a bearer token): revoking it ends the session.
        let fingerprint = match (caller.kind, req.extensions().get::<PeerCerts>()) {
            (CallerKind::Mtls, Some(certs)) => certs
                .0
                .first()
                .map(|c| tether_runtime::digest::sha256_hex(c))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let (code, expires) = self
            .logins
            .mint(&caller, &fingerprint, SystemTime::now())
            .map_err(|e| match e {
                LoginError::TooMany => Status::resource_exhausted(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        let tenants = match &caller.tenants {
            TenantScope::All => vec!["*".to_owned()],
            TenantScope::Set(s) => s.iter().cloned().collect(),
        };
        caller.audit_allowed_on(METHOD, &tenants.join(","), "", "console login link");
        Ok(Response::new(v1::LoginLink {
            path: format!("/ui/login?code={code}"),
            expires_at: Some(expires.into()),
            caller: caller.name,
            tenants,
        }))
    }
}
