//! Feature layer: console logins. Single-use login links (minted by
//! `tether.v1.Console/CreateLoginLink` for an authenticated caller) and the session cookies
//! they are exchanged for.
//!
//! A link's code is 32 random bytes; only its SHA-256 is kept, with the caller and its
//! tenants, for 60 seconds, and it is forgotten when used. A session cookie carries the caller,
//! its tenants and its expiry, signed with HMAC-SHA256 under a key drawn when the gateway
//! starts and never written anywhere: restarting the gateway ends every console session.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use crate::northbound::auth::{Caller, CallerKind, TenantScope};

/// How long a login link may be used.
pub const LINK_TTL: Duration = Duration::from_secs(60);

/// Login links not yet used that one gateway keeps at most (each ~200 bytes); beyond, minting
/// is refused until some expire.
pub const MAX_PENDING: usize = 10_000;

/// The session cookie's name.
pub const COOKIE: &str = "tether_console";

/// Why a login link or a cookie was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginError {
    /// The code was never minted here, was used already, or expired.
    #[error(
        "this login link is unknown, already used or expired: run `tetherctl console` for a new one"
    )]
    UnknownLink,
    /// Too many links are pending.
    #[error("too many console login links are pending ({MAX_PENDING}); retry in a minute")]
    TooMany,
}

struct Pending {
    caller: Caller,
    fingerprint: String,
    expires: SystemTime,
}

/// A console session, from its cookie.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it acts as, with the tenants it was minted with.
    pub caller: Caller,
    /// SHA-256 of the client certificate the login link was asked for with (empty for a
    /// bearer token): a session ends when that certificate is revoked.
    pub fingerprint: String,
    /// When it started (whole seconds): a revocation of the caller's name after this ends it.
    pub issued: SystemTime,
}

/// Login links pending and the key session cookies are signed with.
pub struct Logins {
    key: hmac::Key,
    session_ttl: Duration,
    pending: Mutex<HashMap<[u8; 32], Pending>>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("session_ttl", &self.session_ttl)
            .finish_non_exhaustive()
    }
}

/// What a session cookie carries (signed).
#[derive(Serialize, Deserialize)]
struct Claims {
    /// Caller name.
    n: String,
    /// `mtls` or `jwt`.
    k: String,
    /// Tenants; `["*"]` for every tenant.
    t: Vec<String>,
    /// Expiry, Unix seconds.
    e: u64,
    /// Issued, Unix seconds.
    i: u64,
    /// The caller certificate's SHA-256, hex (empty: a bearer token).
    f: String,
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).expect("the system's random source");
    b
}

fn digest(code: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, code);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Logins {
    /// A new signing key; sessions last `session_ttl`.
    pub fn new(session_ttl: Duration) -> Logins {
        Logins {
            key: hmac::Key::new(hmac::HMAC_SHA256, &random32()),
            session_ttl,
            pending: Mutex::default(),
        }
    }

    /// How long a session lasts.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// A new single-use code for `caller` (who came with the certificate of SHA-256
    /// `fingerprint`, or none: empty), and when it expires.
    pub fn mint(
        &self,
        caller: &Caller,
        fingerprint: &str,
        now: SystemTime,
    ) -> Result<(String, SystemTime), LoginError> {
        let code = random32();
        let expires = now + LINK_TTL;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, p| p.expires > now);
        if pending.len() >= MAX_PENDING {
            return Err(LoginError::TooMany);
        }
        pending.insert(
            digest(&code),
            Pending {
                caller: caller.clone(),
                fingerprint: fingerprint.to_owned(),
                expires,
            },
        );
        Ok((B64.encode(code), expires))
    }

    /// The session a code was minted for, starting `now`; the code is spent whatever the
    /// outcome.
    pub fn redeem(&self, code: &str, now: SystemTime) -> Result<Session, LoginError> {
        let raw = B64.decode(code).map_err(|_| LoginError::UnknownLink)?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.remove(&digest(&raw)) {
            Some(p) if p.expires > now => Ok(Session {
                caller: p.caller,
                fingerprint: p.fingerprint,
                issued: now,
            }),
            _ => Err(LoginError::UnknownLink),
        }
    }

    /// A signed cookie value for `session`, valid `session_ttl` from its start.
    pub fn cookie_value(&self, session: &Session) -> String {
        let caller = &session.caller;
        let claims = Claims {
            n: caller.name.clone(),
            k: caller.kind.as_str().to_owned(),
            t: match &caller.tenants {
                TenantScope::All => vec!["*".to_owned()],
                TenantScope::Set(s) => s.iter().cloned().collect(),
            },
            e: unix(session.issued + self.session_ttl),
            i: unix(session.issued),
            f: session.fingerprint.clone(),
        };
        let body = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", B64.encode(tag.as_ref()))
    }

    /// The session a cookie value was signed for, if the signature is ours and it has not
    /// expired.
    pub fn session(&self, value: &str, now: SystemTime) -> Option<Session> {
        let (body, tag) = value.split_once('.')?;
        let tag = B64.decode(tag).ok()?;
        hmac::verify(&self.key, body.as_bytes(), &tag).ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        if claims.e <= unix(now) {
            return None;
        }
        let kind = match claims.k.as_str() {
            "jwt" => CallerKind::Jwt,
            _ => CallerKind::Mtls,
        };
        let tenants = if claims.t.iter().any(|t| t == "*") {
            TenantScope::All
        } else {
            TenantScope::Set(claims.t.into_iter().collect::<BTreeSet<_>>())
        };
        Some(Session {
            caller: Caller {
                name: claims.n,
                kind,
                tenants,
            },
            fingerprint: claims.f,
            issued: UNIX_EPOCH + Duration::from_secs(claims.i),
        })
    }

    /// The `set-cookie` value starting `session`.
    pub fn set_cookie(&self, session: &Session) -> String {
        format!(
            "{COOKIE}={}; Path=/ui; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
            self.cookie_value(session),
            self.session_ttl.as_secs()
        )
    }
}

/// The `set-cookie` value ending a session.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// The session cookie's value in a `cookie` header, if there.
pub fn cookie_of(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(tenants: &[&str]) -> Caller {
        Caller {
            name: "ops".into(),
            kind: CallerKind::Mtls,
            tenants: TenantScope::Set(tenants.iter().map(|t| t.to_string()).collect()),
        }
    }

    #[test]
    fn a_login_code_works_once_and_not_after_a_minute() {
        let l = Logins::new(Duration::from_secs(3600));
        let now = SystemTime::now();
        let (code, expires) = l.mint(&caller(&["acme"]), "ab12", now).unwrap();
        assert_eq!(expires, now + LINK_TTL);
        let s = l.redeem(&code, now).unwrap();
        assert_eq!(s.caller.tenants, caller(&["acme"]).tenants);
        assert_eq!(s.fingerprint, "ab12");
        assert_eq!(l.redeem(&code, now).unwrap_err(), LoginError::UnknownLink);
        let (late, _) = l.mint(&caller(&["acme"]), "", now).unwrap();
        let refused = |code: &str, at| l.redeem(code, at).unwrap_err();
        assert_eq!(
            refused(&late, now + LINK_TTL + Duration::from_secs(1)),
            LoginError::UnknownLink
        );
        assert_eq!(refused("forged", now), LoginError::UnknownLink);
        assert_eq!(
            refused(&B64.encode([7u8; 32]), now),
            LoginError::UnknownLink
        );
    }

    #[test]
    fn a_cookie_keeps_its_scope_until_it_expires_and_only_under_its_key() {
        let l = Logins::new(Duration::from_secs(60));
        let now = SystemTime::now();
        let session = |c: Caller| Session {
            caller: c,
            fingerprint: "ab12".into(),
            issued: now,
        };
        let v = l.cookie_value(&session(caller(&["acme", "beta"])));
        let s = l.session(&v, now).unwrap();
        assert_eq!(s.caller.name, "ops");
        assert_eq!(s.caller.tenants, caller(&["acme", "beta"]).tenants);
        assert_eq!(s.fingerprint, "ab12");
        assert_eq!(unix(s.issued), unix(now));
        assert!(l.session(&v, now + Duration::from_secs(61)).is_none());
        // Another gateway start: another key.
        assert!(
            Logins::new(Duration::from_secs(60))
                .session(&v, now)
                .is_none()
        );
        // A widened scope under the old signature.
        let (_, tag) = v.split_once('.').unwrap();
        let forged = B64.encode(br#"{"n":"ops","k":"mtls","t":["*"],"e":99999999999}"#);
        assert!(l.session(&format!("{forged}.{tag}"), now).is_none());
        let all = Caller {
            tenants: TenantScope::All,
            ..caller(&[])
        };
        let v = l.cookie_value(&session(all));
        assert_eq!(l.session(&v, now).unwrap().caller.tenants, TenantScope::All);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            format!("a=b; {COOKIE}=xyz.abc; c=d").parse().unwrap(),
        );
        assert_eq!(cookie_of(&h), Some("xyz.abc"));
    }
}
