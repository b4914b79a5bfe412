//! Wiring: the agent's own identity (certificate chain and private key) and the roots the
//! gateway's certificate must chain to, for the transport ([`crate::dialer`]).
//!
//! `identity.source` says where they come from: PEM files (`tls.cert`, `tls.key`, `tls.ca`; or,
//! without `tls.cert`/`tls.key`, the enrolled identity in `state_dir`, enrolled first when
//! needed: [`crate::enroll`]), or a Secrets Manager secret read through the backend
//! ([`crate::secrets`]) holding
//!
//! ```json
//! {"certificate": "<PEM chain>", "private_key": "<PEM key>", "ca": "<PEM bundle, optional>"}
//! ```
//!
//! (without `ca`, `tls.ca` is used). The identity is loaded once at start: a rotated secret is
//! picked up at the next restart. The key is never logged, and no error quotes it.
//!
//! This module reads and checks; choosing where from (enrolling first, fetching the secret) is
//! wiring: [`Identity::load`], beside [`crate::run`].
//!
//! Renewed over the tunnel ([`crate::renew`]), a certificate is kept in `state_dir`, never
//! written back to a Secret or Secrets Manager: at start a renewed certificate there of the same
//! identity that is valid longer is used instead of the configured one, and the CA bundle
//! that came with it is trusted in addition to `tls.ca` (or the secret's `ca`).

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tether_runtime::tls::{self, TlsError};

use crate::certs::{self, CertificateError};
use crate::config::{AgentConfig, is_unset};
use crate::secrets::SecretValue;
use crate::state::{self, StateDir, StateError};

/// The key of the identity secret holding the agent's PEM certificate chain.
pub const CERTIFICATE_KEY: &str = "certificate";
/// The key of the identity secret holding the agent's PEM private key.
pub const PRIVATE_KEY_KEY: &str = "private_key";
/// The optional key of the identity secret holding the PEM CA bundle.
pub const CA_KEY: &str = "ca";

/// Why the agent's identity could not be read: the operator's to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A PEM file (`tls.ca`, `tls.cert`, `tls.key`) could not be loaded.
    #[error(transparent)]
    TlsMaterial(#[from] TlsError),
    /// A certificate is not a usable agent certificate (`origin`: its file, or what it is).
    #[error("TLS: {origin}: {error}")]
    Certificate {
        /// The file, or what the certificate is.
        origin: String,
        /// What is wrong.
        #[source]
        error: CertificateError,
    },
    /// What `identity.source` points to is not a usable agent identity (not the expected JSON,
    /// not PEM, key and certificate do not match, not an agent certificate), or cannot be
    /// loaded this way.
    #[error("identity.source = \"{identity_source}\": {reason}")]
    Source {
        /// The configured `identity.source`.
        identity_source: String,
        /// What is wrong (never key material).
        reason: String,
    },
    /// `state_dir` could not be read or written (finishing an interrupted renewal).
    #[error(transparent)]
    State(#[from] StateError),
}

/// The agent's certificate chain and key, and the roots it trusts for the gateway.
pub struct Identity {
    /// The agent's certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA bundle the gateway's certificate must chain to.
    pub roots: RootCertStore,
    /// `<tenant>/<agent>`, from the leaf's URI SAN.
    pub agent: String,
}

impl std::fmt::Debug for Identity {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("agent", &self.agent)
            .field("certs", &self.certs.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads `tls.ca`, `tls.cert` and `tls.key` (or the enrolled certificate and key in
    /// `state_dir`), with what a renewal kept in `state_dir` (see the module docs).
    pub fn from_files(cfg: &AgentConfig) -> Result<Identity, IdentityError> {
        if let Some(state) = StateDir::of(cfg) {
            state.recover_renewal()?;
        }
        const PKI: &str = "`tether-gateway pki issue-agent <tenant>/<agent>` writes ca.pem, agent.pem and agent-key.pem; or enroll with a token (`enrollment.token`)";
        let roots = tls::load_roots(&cfg.tls.ca).map_err(|e| e.for_key("tls.ca", PKI))?;
        let (cert, key) = state::identity_files(cfg);
        let enrolled = cfg.enrolled_identity();
        let (cert_key, key_key) = if enrolled {
            (
                "enrolled certificate in state_dir",
                "enrolled key in state_dir",
            )
        } else {
            ("tls.cert", "tls.key")
        };
        let certs = tls::load_certs("certificate", &cert)
            .map_err(|e| e.for_key(cert_key, if enrolled { "" } else { PKI }))?;
        let key =
            tls::load_key(&key).map_err(|e| e.for_key(key_key, if enrolled { "" } else { PKI }))?;
        let agent = certs::agent_id(&certs).map_err(|error| IdentityError::Certificate {
            origin: cert.display().to_string(),
            error,
        })?;
        Ok(with_stored(
            cfg,
            Identity {
                certs,
                key,
                roots,
                agent,
            },
        ))
    }

    /// Parses an identity secret's value (see the module docs); `tls.ca` when it has no `ca`.
    pub fn from_secret(cfg: &AgentConfig, value: &SecretValue) -> Result<Identity, IdentityError> {
        let bad = |reason: String| IdentityError::Source {
            identity_source: cfg.identity.source.to_string(),
            reason,
        };
        let field = |k: &str| {
            value.get(k).ok_or_else(|| {
                bad(format!(
                    "version {} of the secret has no `{k}`: expected a JSON object \
                     {{\"{CERTIFICATE_KEY}\": PEM, \"{PRIVATE_KEY_KEY}\": PEM, \"{CA_KEY}\": PEM (optional)}}, \
                     found keys {:?}",
                    value.version_id,
                    value.data.keys().collect::<Vec<_>>()
                ))
            })
        };
        let certs = certs::pem_chain(field(CERTIFICATE_KEY)?)
            .map_err(|e| bad(format!("`{CERTIFICATE_KEY}`: {e}")))?;
        // No detail from the parser: nothing about the key's bytes goes into an error.
        let key = certs::pem_key(field(PRIVATE_KEY_KEY)?).map_err(|_| {
            bad(format!(
                "`{PRIVATE_KEY_KEY}` is not a PEM private key (PKCS#8, PKCS#1 or SEC1)"
            ))
        })?;
        certs::check_pair(&certs, &key).map_err(|e| {
            let why = match e {
                CertificateError::KeyMismatch(e) => e.to_string(),
                other => other.to_string(),
            };
            bad(format!(
                "`{PRIVATE_KEY_KEY}` does not go with `{CERTIFICATE_KEY}`: {why}"
            ))
        })?;
        let agent =
            certs::agent_id(&certs).map_err(|e| bad(format!("`{CERTIFICATE_KEY}`: {e}")))?;
        let roots = match value.get(CA_KEY) {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for c in certs::pem_chain(pem).map_err(|e| bad(format!("`{CA_KEY}`: {e}")))? {
                    roots.add(c).map_err(|e| bad(format!("`{CA_KEY}`: {e}")))?;
                }
                roots
            }
            None if is_unset(&cfg.tls.ca) => {
                return Err(bad(format!(
                    "the secret has no `{CA_KEY}` and tls.ca is not set: one of them must hold \
                     the CA bundle the gateway's certificate chains to"
                )));
            }
            None => tls::load_roots(&cfg.tls.ca)?,
        };
        Ok(Identity {
            certs,
            key,
            roots,
            agent,
        })
    }
}

/// `identity` with what `state_dir` adds (see [`crate::renew`]): the CA bundle of the last
/// renewal among its roots, and a renewed certificate of the same identity that is valid longer
/// than the configured one in its place.
pub fn with_stored(cfg: &AgentConfig, mut identity: Identity) -> Identity {
    let Some(state) = StateDir::of(cfg) else {
        return identity;
    };
    let bundle = state.ca();
    if bundle.exists() {
        match tls::load_certs("CA bundle", &bundle) {
            Ok(certs) => {
                for c in certs {
                    let _ = identity.roots.add(c);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring the stored CA bundle"),
        }
    }
    if cfg.enrolled_identity() {
        // The state files are the identity already.
        return identity;
    }
    let (cert, key) = (state.cert(), state.key());
    let (Ok(cert_pem), Ok(key_pem)) = (
        std::fs::read_to_string(&cert),
        std::fs::read_to_string(&key),
    ) else {
        return identity;
    };
    let stored = certs::pair(&cert_pem, &key_pem).and_then(|(certs, key)| {
        let agent = certs::agent_id(&certs)?;
        let (_, not_after) = tls::validity(&certs[0])?;
        Ok((certs, key, agent, not_after))
    });
    let configured = identity
        .certs
        .first()
        .and_then(|c| tls::validity(c).ok())
        .map(|(_, not_after)| not_after);
    match stored {
        Ok((certs, key, agent, not_after))
            if agent == identity.agent && configured.is_none_or(|c| not_after > c) =>
        {
            tracing::info!(cert = %cert.display(), not_after = %humantime::format_rfc3339_seconds(not_after),
                "using the renewed certificate kept in state_dir (the configured one expires sooner)");
            identity.certs = certs;
            identity.key = key;
        }
        Ok(_) => {}
        Err(reason) => {
            tracing::warn!(cert = %cert.display(), %reason, "ignoring the certificate kept in state_dir")
        }
    }
    identity
}
