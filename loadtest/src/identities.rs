//! Backend: identities for the fleet, issued in bulk from a local CA (`tether_gateway::identity::pki::Ca`,
//! rcgen, ECDSA P-256 as in production), in memory: no per-agent files.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tether_gateway::identity::pki::{self, Ca};
use tunnel_proto::AgentId;

use crate::LoadError;

/// The tenant every simulated agent belongs to.
pub const TENANT: &str = "load";

/// The id of agent number `i`: `load/a00042`.
pub fn agent_id(i: usize) -> AgentId {
    AgentId::new(TENANT, &format!("a{i:05}")).expect("valid generated agent id")
}

/// One agent's certificate and key.
pub struct AgentIdentity {
    /// `<tenant>/<agent>`.
    pub id: AgentId,
    /// Leaf certificate.
    pub certs: Vec<CertificateDer<'static>>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Issues `n` agent certificates on `threads` threads.
pub fn issue_agents(ca: &Ca, n: usize, threads: usize) -> Result<Vec<AgentIdentity>, LoadError> {
    let threads = threads.clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    let parts: Vec<Result<Vec<AgentIdentity>, LoadError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(n))
                        .map(|i| issue_one(ca, agent_id(i)))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("issuing thread"))
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

fn issue_one(ca: &Ca, id: AgentId) -> Result<AgentIdentity, LoadError> {
    let issued = ca
        .issue_agent(&id, pki::AGENT_TTL)
        .map_err(|e| LoadError::Pki(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LoadError::Pki(format!("issued certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| LoadError::Pki(format!("issued key: {e}")))?;
    Ok(AgentIdentity { id, certs, key })
}

/// The CA as a root store, for the agents to verify the gateway.
pub fn roots(ca: &Ca) -> Result<Arc<RootCertStore>, LoadError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        let c = c.map_err(|e| LoadError::Pki(format!("CA certificate: {e}")))?;
        roots
            .add(c)
            .map_err(|e| LoadError::Pki(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// Files of the control-plane client certificate the driver presents.
#[derive(Clone, Debug)]
pub struct ClientFiles {
    /// CA bundle.
    pub ca: std::path::PathBuf,
    /// Certificate.
    pub cert: std::path::PathBuf,
    /// Key.
    pub key: std::path::PathBuf,
}

/// Issues the driver's control-plane certificate (`controlplane/loadtest`) into `out`.
pub fn issue_client(ca: &Ca, out: &Path) -> Result<ClientFiles, LoadError> {
    let issued = ca
        .issue_client("loadtest", pki::CLIENT_TTL)
        .map_err(|e| LoadError::Pki(e.to_string()))?;
    pki::write_issued(out, "client", &issued, ca).map_err(|e| LoadError::Pki(e.to_string()))?;
    Ok(ClientFiles {
        ca: out.join("ca.pem"),
        cert: out.join("client.pem"),
        key: out.join("client-key.pem"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_distinct_agent_identities_in_parallel() {
        tether_runtime::tls::install_crypto_provider();
        let ca = Ca::generate("load.test").unwrap();
        let ids = issue_agents(&ca, 5, 2).unwrap();
        let names: Vec<String> = ids.iter().map(|i| i.id.to_string()).collect();
        assert_eq!(
            names,
            [
                "load/a00000",
                "load/a00001",
                "load/a00002",
                "load/a00003",
                "load/a00004"
            ]
        );
        for i in &ids {
            match tether_runtime::tls::spiffe_id(&i.certs[0]).unwrap() {
                tunnel_proto::SpiffeId::Agent { id, .. } => assert_eq!(id, i.id),
                other => panic!("not an agent identity: {other:?}"),
            }
        }
    }
}
