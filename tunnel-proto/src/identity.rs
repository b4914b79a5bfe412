//! The SPIFFE identities carried in certificates' URI SAN.
//!
//! - agents: `spiffe://<trust-domain>/tenant/<tenant>/agent/<agent>`, written `<tenant>/<agent>`;
//! - control-plane callers: `spiffe://<trust-domain>/controlplane/<name>`;
//! - gateway replicas, on the links between them: `spiffe://<trust-domain>/gateway/<replica>`.

use std::fmt;
use std::str::FromStr;

/// Why an identity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    /// The trust domain is empty, too long or has characters outside `[a-z0-9._-]`.
    #[error("invalid trust domain {0:?}: use 1-255 characters of a-z 0-9 . _ -")]
    TrustDomain(String),
    /// The path is not `/tenant/<t>/agent/<a>`, `/controlplane/<name>` or `/gateway/<replica>`.
    #[error(
        "identity path {0:?} is neither /tenant/<tenant>/agent/<agent>, /controlplane/<name> nor /gateway/<replica>"
    )]
    Path(String),
    /// A tenant, agent or caller name is empty, too long or has disallowed characters.
    #[error(
        "invalid {what} {value:?}: use 1-63 characters of a-z A-Z 0-9 . _ -, not starting with . or -"
    )]
    Name {
        /// Which part was bad (`tenant`, `agent`, `name`).
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// A gateway replica id is empty, too long, `.`/`..` or has disallowed characters.
    #[error("invalid replica id {0:?}: use 1-128 characters of a-z A-Z 0-9 . _ -, not . or ..")]
    Replica(String),
    /// An agent id written as text was not `<tenant>/<agent>`.
    #[error("agent id {0:?} is not of the form <tenant>/<agent>")]
    AgentIdForm(String),
}

/// An agent's identity: tenant and agent name. Written `<tenant>/<agent>` in APIs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId {
    tenant: String,
    agent: String,
}

impl AgentId {
    /// Validates both names.
    pub fn new(tenant: &str, agent: &str) -> Result<Self, IdentityError> {
        check_name("tenant", tenant)?;
        check_name("agent", agent)?;
        Ok(AgentId {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
        })
    }

    /// The tenant this agent belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The agent's name within its tenant.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The identity URI for this agent in `trust_domain`.
    pub fn to_uri(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/tenant/{}/agent/{}",
            self.tenant, self.agent
        )
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.agent)
    }
}

impl FromStr for AgentId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (t, a) = s
            .split_once('/')
            .ok_or_else(|| IdentityError::AgentIdForm(s.to_owned()))?;
        if a.contains('/') {
            return Err(IdentityError::AgentIdForm(s.to_owned()));
        }
        AgentId::new(t, a)
    }
}

/// A parsed SPIFFE identity Tether understands.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SpiffeId {
    /// A data-plane agent.
    Agent {
        /// The trust domain.
        trust_domain: String,
        /// The agent's id.
        id: AgentId,
    },
    /// A control-plane caller of the northbound API.
    ControlPlane {
        /// The trust domain.
        trust_domain: String,
        /// The caller's name.
        name: String,
    },
    /// A gateway replica, on the peer links between replicas (never an agent or a caller).
    Gateway {
        /// The trust domain.
        trust_domain: String,
        /// The replica's `cluster.replica_id`.
        replica: String,
    },
}

impl SpiffeId {
    /// Parses `spiffe://<td>/tenant/<t>/agent/<a>`, `spiffe://<td>/controlplane/<name>` or
    /// `spiffe://<td>/gateway/<replica>`.
    pub fn parse(uri: &str) -> Result<SpiffeId, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(td)?;
        let segs: Vec<&str> = path.split('/').collect();
        match segs.as_slice() {
            ["tenant", t, "agent", a] => Ok(SpiffeId::Agent {
                trust_domain: td.to_owned(),
                id: AgentId::new(t, a)?,
            }),
            ["controlplane", n] => {
                check_name("name", n)?;
                Ok(SpiffeId::ControlPlane {
                    trust_domain: td.to_owned(),
                    name: (*n).to_owned(),
                })
            }
            ["gateway", r] => {
                check_replica(r)?;
                Ok(SpiffeId::Gateway {
                    trust_domain: td.to_owned(),
                    replica: (*r).to_owned(),
                })
            }
            _ => Err(IdentityError::Path(format!("/{path}"))),
        }
    }

    /// The trust domain of either kind.
    pub fn trust_domain(&self) -> &str {
        match self {
            SpiffeId::Agent { trust_domain, .. }
            | SpiffeId::ControlPlane { trust_domain, .. }
            | SpiffeId::Gateway { trust_domain, .. } => trust_domain,
        }
    }

    /// The control-plane identity URI for `name`.
    pub fn controlplane_uri(trust_domain: &str, name: &str) -> String {
        format!("spiffe://{trust_domain}/controlplane/{name}")
    }

    /// The identity URI of gateway replica `replica` on the peer links.
    pub fn gateway_uri(trust_domain: &str, replica: &str) -> String {
        format!("spiffe://{trust_domain}/gateway/{replica}")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffeId::Agent { trust_domain, id } => f.write_str(&id.to_uri(trust_domain)),
            SpiffeId::ControlPlane { trust_domain, name } => {
                f.write_str(&SpiffeId::controlplane_uri(trust_domain, name))
            }
            SpiffeId::Gateway {
                trust_domain,
                replica,
            } => f.write_str(&SpiffeId::gateway_uri(trust_domain, replica)),
        }
    }
}

/// Validates a trust domain: 1-255 characters of `[a-z0-9._-]` (SPIFFE requires lower case).
pub fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain(td.to_owned()))
    }
}

/// Validates a tenant, agent or caller name: 1-63 characters of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-` (so never `.` or `..`, which SPIFFE forbids as path segments).
pub fn check_name(what: &'static str, v: &str) -> Result<(), IdentityError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && !v.starts_with(['.', '-'])
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Name {
            what,
            value: v.to_owned(),
        })
    }
}

/// Validates a gateway replica id (`cluster.replica_id`): 1-128 characters of
/// `[A-Za-z0-9._-]`, and not `.` or `..` (which SPIFFE forbids as path segments).
pub fn check_replica(v: &str) -> Result<(), IdentityError> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v != "."
        && v != ".."
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Replica(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_identity() {
        let id = SpiffeId::parse("spiffe://tether.example/tenant/acme/agent/eu-1").unwrap();
        assert_eq!(
            id,
            SpiffeId::Agent {
                trust_domain: "tether.example".into(),
                id: AgentId::new("acme", "eu-1").unwrap()
            }
        );
        assert_eq!(
            id.to_string(),
            "spiffe://tether.example/tenant/acme/agent/eu-1"
        );
    }

    #[test]
    fn parses_controlplane_identity() {
        let id = SpiffeId::parse("spiffe://td/controlplane/api").unwrap();
        assert_eq!(
            id,
            SpiffeId::ControlPlane {
                trust_domain: "td".into(),
                name: "api".into()
            }
        );
    }

    #[test]
    fn rejects_malformed_identities() {
        for bad in [
            "https://td/tenant/a/agent/b",
            "spiffe://",
            "spiffe://TD/tenant/a/agent/b",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/tenant/a/agent/",
            "spiffe://td/tenant//agent/b",
            "spiffe://td/tenant/a/agent/b/extra",
            "spiffe://td/tenant/../agent/b",
            "spiffe://td/tenant/a b/agent/b",
            "spiffe://td/agent/b",
            "spiffe://td/controlplane/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn parses_gateway_identity_and_refuses_bad_replica_ids() {
        let id = SpiffeId::parse("spiffe://td/gateway/gw-1.a_b").unwrap();
        assert_eq!(
            id,
            SpiffeId::Gateway {
                trust_domain: "td".into(),
                replica: "gw-1.a_b".into()
            }
        );
        assert_eq!(id.to_string(), "spiffe://td/gateway/gw-1.a_b");
        assert_eq!(id.trust_domain(), "td");
        let long = format!("spiffe://td/gateway/{}", "r".repeat(129));
        for bad in [
            "spiffe://td/gateway/",
            "spiffe://td/gateway/..",
            "spiffe://td/gateway/.",
            "spiffe://td/gateway/a b",
            "spiffe://td/gateway/a/b",
            long.as_str(),
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn agent_id_text_form_round_trips() {
        let id: AgentId = "acme/eu-1".parse().unwrap();
        assert_eq!(id.to_string(), "acme/eu-1");
        for bad in ["acme", "acme/", "/eu-1", "a/b/c", ""] {
            assert!(bad.parse::<AgentId>().is_err(), "{bad} should be rejected");
        }
    }
}
