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
//! Renewed over the tunnel ([`crate::renew`]), a certificate is kept in `state_dir`, never
//! written back to a Secret or Secrets Manager: at start a renewed certificate there of the same
//! identity that is valid longer is used instead of the configured one, and the CA bundle
//! that came with it is trusted in addition to `tls.ca` (or the secret's `ca`).

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tether_runtime::tls;
use tunnel_proto::SpiffeId;

use crate::config::{AgentConfig, IdentitySource, is_unset};
use crate::error::AgentError;
use crate::secrets::{SecretValue, SecretsManager};

/// The key of the identity secret holding the agent's PEM certificate chain.
pub const CERTIFICATE_KEY: &str = "certificate";
/// The key of the identity secret holding the agent's PEM private key.
pub const PRIVATE_KEY_KEY: &str = "private_key";
/// The optional key of the identity secret holding the PEM CA bundle.
pub const CA_KEY: &str = "ca";

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
    /// Loads the identity from where `identity.source` points; a Secrets Manager client is built
    /// from `[aws]` (standard credential chain) only when needed.
    pub async fn load(cfg: &AgentConfig) -> Result<Identity, AgentError> {
        match &cfg.identity.source {
            IdentitySource::Files => {
                if cfg.enrolled_identity() {
                    crate::enroll::ensure(cfg).await?;
                }
                Identity::from_files(cfg)
            }
            IdentitySource::AwsSecretsManager(_) => {
                Identity::load_with(cfg, &SecretsManager::new(&cfg.aws).await).await
            }
        }
    }

    /// [`load`](Self::load) with a given Secrets Manager client.
    pub async fn load_with(
        cfg: &AgentConfig,
        secrets: &SecretsManager,
    ) -> Result<Identity, AgentError> {
        match &cfg.identity.source {
            IdentitySource::Files => Identity::from_files(cfg),
            IdentitySource::AwsSecretsManager(secret_id) => {
                let value =
                    secrets
                        .get(secret_id)
                        .await
                        .map_err(|error| AgentError::IdentityFetch {
                            identity_source: cfg.identity.source.to_string(),
                            error,
                        })?;
                crate::renew::recover(cfg)?;
                let identity = crate::renew::with_stored(cfg, Identity::from_secret(cfg, &value)?);
                tracing::info!(
                    identity_source = %cfg.identity.source,
                    version_id = %value.version_id,
                    agent = %identity.agent,
                    "agent identity loaded from AWS Secrets Manager"
                );
                Ok(identity)
            }
        }
    }

    /// Reads `tls.ca`, `tls.cert` and `tls.key` (or the enrolled certificate and key in
    /// `state_dir`), with what a renewal kept in `state_dir` (see the module docs).
    pub fn from_files(cfg: &AgentConfig) -> Result<Identity, AgentError> {
        crate::renew::recover(cfg)?;
        let roots = tls::load_roots(&cfg.tls.ca)?;
        let (cert, key) = cfg.identity_files();
        let certs = tls::load_certs("certificate", &cert)?;
        let key = tls::load_key(&key)?;
        let agent = agent_id(&certs)
            .map_err(|reason| AgentError::Tls(format!("{}: {reason}", cert.display())))?;
        Ok(crate::renew::with_stored(
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
    pub fn from_secret(cfg: &AgentConfig, value: &SecretValue) -> Result<Identity, AgentError> {
        let bad = |reason: String| AgentError::Identity {
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
        let certs = pem_certs(field(CERTIFICATE_KEY)?)
            .map_err(|e| bad(format!("`{CERTIFICATE_KEY}`: {e}")))?;
        // No detail from the parser: nothing about the key's bytes goes into an error.
        let key = PrivateKeyDer::from_pem_slice(field(PRIVATE_KEY_KEY)?).map_err(|_| {
            bad(format!(
                "`{PRIVATE_KEY_KEY}` is not a PEM private key (PKCS#8, PKCS#1 or SEC1)"
            ))
        })?;
        rustls::sign::CertifiedKey::from_der(
            certs.clone(),
            key.clone_key(),
            &rustls::crypto::aws_lc_rs::default_provider(),
        )
        .map_err(|e| {
            bad(format!(
                "`{PRIVATE_KEY_KEY}` does not go with `{CERTIFICATE_KEY}`: {e}"
            ))
        })?;
        let agent = agent_id(&certs).map_err(|e| bad(format!("`{CERTIFICATE_KEY}`: {e}")))?;
        let roots = match value.get(CA_KEY) {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for c in pem_certs(pem).map_err(|e| bad(format!("`{CA_KEY}`: {e}")))? {
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

/// Every certificate of a PEM bundle; at least one.
fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// `<tenant>/<agent>` from the leaf certificate's URI SAN.
pub(crate) fn agent_id(certs: &[CertificateDer<'_>]) -> Result<String, String> {
    let leaf = certs.first().ok_or("no certificate")?;
    match tls::spiffe_id(leaf).map_err(|e| e.to_string())? {
        SpiffeId::Agent { id, .. } => Ok(id.to_string()),
        other => Err(format!(
            "{other} is not an agent identity (spiffe://<td>/tenant/<t>/agent/<a>)"
        )),
    }
}
