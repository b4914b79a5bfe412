//! Feature layer: bearer tokens (JWT). ES256 or RS256 only (`none` and HMAC are refused by
//! name, from the header read before anything else), the signature checked against the key the
//! token's `kid` names ([`super::jwks`]), `iss` and `aud` checked, `exp` required and `nbf`
//! honoured (with `auth.leeway`), tenants from `auth.tenant_claim`.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use tether_runtime::CancellationToken;

use super::jwks::{Jwks, KeyError};
use crate::config::AuthConfig;
use crate::error::GatewayError;

/// Why a bearer token is refused (`UNAUTHENTICATED`, audited with this reason).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three dot-separated parts.
    #[error("not a JWT (three dot-separated parts)")]
    NotJwt,
    /// The header is not base64url.
    #[error("the token header is not base64url")]
    HeaderNotBase64,
    /// The header is not a JSON object.
    #[error("the token header is not a JSON object")]
    HeaderNotJson,
    /// The header names an algorithm other than ES256 and RS256 (`none` and HMAC among them).
    #[error("algorithm {0:?} is not accepted (ES256 or RS256)")]
    Algorithm(String),
    /// The header names no algorithm.
    #[error("the token header has no alg")]
    NoAlgorithm,
    /// The header's `kid` is not a string.
    #[error("kid is not a string")]
    KidNotString,
    /// No key for the token.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The key the `kid` names is for another algorithm than the token's.
    #[error("algorithm {token:?} does not match the key's ({key:?})")]
    KeyAlgorithm {
        /// The token's.
        token: Algorithm,
        /// The key's.
        key: Algorithm,
    },
    /// The signature, a date, the issuer, the audience or a required claim is wrong.
    #[error("{}", describe(.0))]
    Invalid(jsonwebtoken::errors::Error),
    /// `sub` is missing, empty or not a string.
    #[error("sub is not a non-empty string")]
    Subject,
    /// The tenant claim holds something other than strings.
    #[error("claim {0:?} holds a non-string")]
    TenantNotString(String),
    /// The tenant claim is neither a string nor an array.
    #[error("claim {0:?} is neither a string nor an array of strings")]
    TenantClaimShape(String),
    /// A tenant in the claim is not a valid name.
    #[error("claim {claim:?}: {source}")]
    Tenant {
        /// The claim.
        claim: String,
        /// Why the name is invalid.
        source: tunnel_proto::IdentityError,
    },
}

/// A reason for each way jsonwebtoken refuses a token, in the words an operator reads.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
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

/// What a verified token says.
#[derive(Debug)]
pub(super) struct Claims {
    pub(super) sub: String,
    pub(super) tenants: BTreeSet<String>,
}

/// Verifies bearer tokens against a JWKS that it keeps fresh.
#[derive(Debug)]
pub(super) struct JwtVerifier {
    issuer: String,
    audience: String,
    tenant_claim: String,
    leeway: Duration,
    jwks: Jwks,
}

impl JwtVerifier {
    pub(super) fn new(a: &AuthConfig) -> Result<JwtVerifier, GatewayError> {
        Ok(JwtVerifier {
            issuer: a.issuer.clone().unwrap_or_default(),
            audience: a.audience.clone().unwrap_or_default(),
            tenant_claim: a.tenant_claim.clone(),
            leeway: a.leeway,
            jwks: Jwks::new(a)?,
        })
    }

    /// Keeps the JWKS fresh until `shutdown`.
    pub(super) async fn run_refresh(&self, shutdown: CancellationToken) {
        self.jwks.run_refresh(shutdown).await;
    }

    pub(super) async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = token_header(token)?;
        let alg = match header.get("alg").and_then(|a| a.as_str()) {
            Some("ES256") => Algorithm::ES256,
            Some("RS256") => Algorithm::RS256,
            Some(other) => return Err(TokenError::Algorithm(other.to_owned())),
            None => return Err(TokenError::NoAlgorithm),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(serde_json::Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(TokenError::KidNotString),
        };
        let key = self.jwks.key_for(kid).await?;
        if key.alg != alg {
            return Err(TokenError::KeyAlgorithm {
                token: alg,
                key: key.alg,
            });
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
                .map_err(TokenError::Invalid)?;
        let claims = data.claims;
        let sub = match claims.get("sub") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(TokenError::Subject),
        };
        let claim = &self.tenant_claim;
        let tenants: Vec<&str> = match claims.get(claim) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| TokenError::TenantNotString(claim.clone()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(TokenError::TenantClaimShape(claim.clone())),
        };
        for t in &tenants {
            tunnel_proto::identity::check_name("tenant", t).map_err(|source| {
                TokenError::Tenant {
                    claim: claim.clone(),
                    source,
                }
            })?;
        }
        Ok(Claims {
            sub,
            tenants: tenants.into_iter().map(str::to_owned).collect(),
        })
    }
}

/// The JOSE header, read before anything else so `alg: none` and HMAC are refused by name.
fn token_header(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::NotJwt);
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| TokenError::HeaderNotBase64)?;
    serde_json::from_slice(&raw).map_err(|_| TokenError::HeaderNotJson)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_of_alg_none_token_is_read() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"x"}"#));
        assert_eq!(token_header(&t).unwrap()["alg"], "none");
        assert!(token_header("a.b").is_err());
    }
}
