//! Feature layer: the web console, served at `/ui/` on the northbound listener.
//!
//! Server-rendered pages (askama templates in `gateway/templates/console/`, checked at compile
//! time) and one small script of our own (`static/console.js`, no framework, no CDN) that
//! follows server-sent events and swaps in the fragments they carry, rendered by the same
//! templates as the page.
//!
//! Who is looking: a session cookie set by a single-use login link (`login.rs`,
//! `tether.v1.Console/CreateLoginLink`), or what the gRPC API accepts (a bearer token, a
//! client certificate), resolved by the same `auth::Authenticator`. What they see and do goes
//! through the gRPC services themselves (`AgentsApi`, `CommandsApi`), called with that
//! [`Caller`] in the request: the same tenant checks, the same audit events, no copy.
//! State-changing requests (POST) must come from the console's own origin (`Origin` checked:
//! CSRF), beside the cookie's `SameSite=Strict`.
//!
//! # Layout
//! - `login.rs`: login links and session cookies;
//! - `api.rs`: `tether.v1.Console`;
//! - `views.rs`: the pages and their forms;
//! - `live.rs`: the event streams behind the live parts of the pages;
//! - `static/`: the script and the style sheet.

pub mod api;
pub mod live;
pub mod login;
pub mod views;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use tower::ServiceExt;

use crate::commands::CommandsApi;
use crate::console::login::Logins;
use crate::northbound::agents::AgentsApi;
use crate::northbound::auth::{Authenticator, Caller};
use crate::northbound::listener::{ConnectionAuth, PeerCerts};

/// What the console's pages are served from.
#[derive(Debug)]
pub struct Console {
    /// `tether.v1.Agents`, called with the viewer as caller.
    pub agents: AgentsApi,
    /// `tether.v1.Commands`, likewise.
    pub commands: CommandsApi,
    /// Resolves bearer tokens and certificates as for the API.
    pub auth: Arc<Authenticator>,
    /// Login links and session cookies.
    pub logins: Arc<Logins>,
    /// The gateway's trust domain (for the enrollment command shown).
    pub trust_domain: String,
    /// Streams open and how relayed calls ended, per agent (shown for the agents the API
    /// lets the viewer see).
    pub relay: Arc<crate::relay::Relay>,
    /// Ends the live streams when the gateway stops.
    pub shutdown: tether_runtime::CancellationToken,
}

/// The shared state of the console's handlers.
pub type State = Arc<Console>;

/// The console's routes, under `/ui`.
pub fn router(console: Arc<Console>) -> axum::Router {
    views::routes().with_state(console)
}

/// Whether a northbound request is for the console: under `/ui`, and not gRPC.
pub fn is_console_request<B>(req: &http::Request<B>) -> bool {
    let path = req.uri().path();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    !grpc && (path == "/ui" || path.starts_with("/ui/"))
}

// === The viewer ===

/// Who is looking at a page: a console session, or an API credential.
#[derive(Clone, Debug)]
pub struct Viewer(pub Caller);

impl axum::extract::FromRequestParts<State> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        console: &State,
    ) -> Result<Self, Self::Rejection> {
        let caller = match login::cookie_of(&parts.headers)
            .and_then(|v| console.logins.session(v, SystemTime::now()))
            .filter(|s| !revoked(&console.auth, s))
        {
            Some(s) => Some(s.caller),
            None => {
                let certs = parts.extensions.get::<PeerCerts>().map(|c| c.0.clone());
                let has_cert = certs.as_ref().is_some_and(|c| !c.is_empty());
                let has_token = parts.headers.contains_key(header::AUTHORIZATION);
                if has_cert || has_token {
                    console
                        .auth
                        .authenticate(
                            certs.as_deref().map(Vec::as_slice),
                            &parts.headers,
                            "console",
                        )
                        .await
                        .ok()
                } else {
                    None
                }
            }
        };
        match caller {
            Some(c) => {
                if let Some(conn) = parts.extensions.get::<ConnectionAuth>() {
                    conn.mark();
                }
                Ok(Viewer(c))
            }
            None => Err(views::login_required()),
        }
    }
}

/// Whether the caller certificate a session was started with has been revoked since
/// (`Callers/Revoke`, by fingerprint or by name).
fn revoked(auth: &Authenticator, s: &login::Session) -> bool {
    if s.caller.kind != crate::northbound::auth::CallerKind::Mtls {
        return false;
    }
    let list = auth.caller_revocations();
    let started_ms = s
        .issued
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    (!s.fingerprint.is_empty() && list.cert(&s.fingerprint).is_some())
        || list
            .name(&s.caller.name)
            .is_some_and(|r| r.revoked_at_ms >= started_ms)
}

/// A state-changing request from the console's own page: its `Origin` is this very host over
/// HTTPS. Anything else (another site, no `Origin` at all) is refused with 403.
#[derive(Debug)]
pub struct SameOrigin;

impl axum::extract::FromRequestParts<State> for SameOrigin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &State,
    ) -> Result<Self, Self::Rejection> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        let origin = parts
            .headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        match (host, origin) {
            (Some(host), Some(origin)) if origin == format!("https://{host}") => Ok(SameOrigin),
            (_, origin) => {
                tracing::warn!(target: crate::northbound::auth::AUDIT_TARGET,
                    origin = origin.unwrap_or(""), path = %parts.uri.path(),
                    decision = "deny", reason = "cross-origin or origin-less console POST",
                    "console request refused");
                Err((
                    StatusCode::FORBIDDEN,
                    "cross-origin request refused: state-changing console requests must come from the console's own pages",
                )
                    .into_response())
            }
        }
    }
}

// === The listener's service ===

/// The northbound service: console requests to the console's router, everything else to
/// `grpc` (the API behind `auth::Authenticated`, and the relay).
#[derive(Clone)]
pub struct WithConsole<S> {
    console: axum::Router,
    grpc: S,
}

impl<S> WithConsole<S> {
    /// `grpc` with the console's `router` beside it.
    pub fn new(console: axum::Router, grpc: S) -> Self {
        WithConsole { console, grpc }
    }
}

impl<S, RB, B> tower::Service<http::Request<RB>> for WithConsole<S>
where
    S: tower::Service<http::Request<RB>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<axum::BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = http::Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<RB>) -> Self::Future {
        if is_console_request(&req) {
            let console = self.console.clone();
            Box::pin(async move {
                let mut resp = console.oneshot(req.map(axum::body::Body::new)).await?;
                security_headers(resp.headers_mut());
                Ok(resp)
            })
        } else {
            let grpc = self.grpc.clone();
            Box::pin(async move {
                let resp = grpc.oneshot(req).await?;
                Ok(resp.map(axum::body::Body::new))
            })
        }
    }
}

/// Headers on every console answer: no framing (clickjacking), scripts and styles only from
/// the console itself, no caching of pages that show the fleet.
fn security_headers(h: &mut http::HeaderMap) {
    let set = |h: &mut http::HeaderMap, k: http::HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // Not no-referrer: under it, browsers send `Origin: null` with same-origin POSTs too.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::CACHE_CONTROL, "no-store");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_grpc_requests_under_ui_reach_the_console() {
        let req = |path: &str, grpc: bool| {
            let mut b = http::Request::builder().uri(path);
            if grpc {
                b = b.header(header::CONTENT_TYPE, "application/grpc+proto");
            }
            b.body(()).unwrap()
        };
        assert!(is_console_request(&req("/ui", false)));
        assert!(is_console_request(&req("/ui/agents/a/b", false)));
        // A relayed service that happens to be called `ui` stays gRPC.
        assert!(!is_console_request(&req("/ui/Method", true)));
        assert!(!is_console_request(&req("/uix", false)));
        assert!(!is_console_request(&req("/tether.v1.Agents/List", true)));
    }
}
