//! Feature layer: renewal of an agent's certificate over its live session.
//!
//! An agent sends a `RenewRequest` (a CSR for a key it has just made) on the control stream of
//! a live session; the tunnel's session driver hands it to [`Enrollment::renew`] with the
//! identity of the certificate that session authenticated with. The same CSR checks and the
//! same certificate as enrollment, for exactly that identity, unless that certificate or its
//! agent is revoked, or that certificate has expired (a session outlives its certificate;
//! renewing over it would extend a stolen key for ever), and at most one certificate per agent
//! every [`RENEW_EVERY`] however many sessions it holds.

use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::pem::PemObject;
use tunnel_proto::AgentId;
use tunnel_proto::message::{RenewRequest, RenewResponse};

use crate::identity::enrollment::{EnrollError, Enrollment};
use crate::identity::revocation::{from_ms, to_ms};
use crate::tls::CertFacts;

/// Renewals of one agent are signed at most this often, across all its sessions (each session
/// also refuses a second request within a second: `GatewaySessionConfig::renew_min_interval`).
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Agents whose last renewal is remembered; beyond this, entries older than [`RENEW_EVERY`]
/// are dropped.
const RENEWED_KEPT: usize = 4096;

impl Enrollment {
    /// Renews the certificate of a live session: signs `req`'s CSR for exactly `agent`, the
    /// identity of `cert`, the certificate the session authenticated with (see the module
    /// docs). Never fails: a refusal is an answer with a gRPC code and the reason.
    pub fn renew(&self, agent: &AgentId, cert: &CertFacts, req: &RenewRequest) -> RenewResponse {
        let result = self.renew_inner(agent, cert, &req.csr_pem);
        let label = match &result {
            Ok(_) => "issued",
            Err(e) => e.label(),
        };
        metrics::counter!("tether_gateway_renewals_total", "result" => label).increment(1);
        match result {
            Ok((certificate_pem, not_after)) => {
                let issued =
                    rustls_pki_types::CertificateDer::from_pem_slice(certificate_pem.as_bytes())
                        .ok()
                        .and_then(|d| CertFacts::of(&d).ok());
                tracing::info!(%agent, old_serial = %cert.serial,
                    serial = %issued.map(|f| f.serial).unwrap_or_default(),
                    not_after = %humantime::format_rfc3339_seconds(not_after),
                    "agent certificate renewed");
                RenewResponse {
                    id: req.id,
                    certificate_pem,
                    ca_pem: self.bundle.clone(),
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::warn!(%agent, serial = %cert.serial, error = %e, "renewal refused");
                RenewResponse {
                    id: req.id,
                    code: tonic::Status::from(&e).code() as i32,
                    message: e.to_string(),
                    ..Default::default()
                }
            }
        }
    }

    fn renew_inner(
        &self,
        agent: &AgentId,
        cert: &CertFacts,
        csr_pem: &str,
    ) -> Result<(String, SystemTime), EnrollError> {
        if self.ca.is_none() {
            return Err(EnrollError::Disabled);
        }
        if let Some(why) = self.revocations.refusal(agent, cert) {
            return Err(EnrollError::Revoked(why));
        }
        let now = SystemTime::now();
        if cert.not_after <= to_ms(now) / 1000 {
            let at = humantime::format_rfc3339_seconds(from_ms(cert.not_after * 1000));
            return Err(EnrollError::Expired(at.to_string()));
        }
        let key = self.check(agent, csr_pem)?;
        // Held while signing, so that two sessions of one agent cannot both pass.
        let mut renewed = self.renewed.lock().expect("renewal times");
        let started = Instant::now();
        if renewed
            .get(agent)
            .is_some_and(|t| started.duration_since(*t) < RENEW_EVERY)
        {
            return Err(EnrollError::TooSoon(agent.clone()));
        }
        let issued = self.sign(agent, &key, now)?;
        if renewed.len() >= RENEWED_KEPT {
            renewed.retain(|_, t| started.duration_since(*t) < RENEW_EVERY);
        }
        renewed.insert(agent.clone(), started);
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::GatewayConfig;
    use crate::identity::csr::tests::{csr, with_uris};
    use crate::identity::db::IdentityDb;

    /// An enrollment service on a fresh PKI in `dir` (signing when `signing`), its store there.
    fn service(dir: &std::path::Path, signing: bool) -> (Enrollment, Arc<IdentityDb>) {
        crate::identity::pki::init(&dir.join("pki"), "td", &["localhost".into()], false).unwrap();
        let mut cfg: GatewayConfig =
            toml::from_str("trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
                .unwrap();
        cfg.tls.ca = dir.join("pki/ca.pem");
        if signing {
            cfg.enrollment.ca_key = Some(dir.join("pki/ca-key.pem"));
        }
        let db = Arc::new(IdentityDb::open(dir).unwrap());
        let bundle = std::fs::read_to_string(&cfg.tls.ca).unwrap();
        (Enrollment::new(&cfg, &bundle, db.clone()).unwrap(), db)
    }

    fn facts(not_before: i64) -> CertFacts {
        CertFacts {
            fingerprint: "ab".repeat(32),
            serial: "01".into(),
            not_before,
            not_after: not_before + 24 * 3600,
        }
    }

    fn renew_req(csr_pem: String) -> RenewRequest {
        RenewRequest { id: 5, csr_pem }
    }

    /// What the renewal tests share: a signing service in a fresh directory, agent `acme/a`,
    /// the time (Unix seconds) and a key for CSRs.
    struct Renewing {
        svc: Enrollment,
        db: Arc<IdentityDb>,
        agent: AgentId,
        now: i64,
        key: rcgen::KeyPair,
        _dir: tempfile::TempDir,
    }

    fn renewing() -> Renewing {
        tether_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (svc, db) = service(dir.path(), true);
        Renewing {
            svc,
            db,
            agent: "acme/a".parse().unwrap(),
            now: to_ms(SystemTime::now()) / 1000,
            key: rcgen::KeyPair::generate().unwrap(),
            _dir: dir,
        }
    }

    #[test]
    fn a_session_renews_for_exactly_its_own_identity() {
        let Renewing {
            svc,
            agent,
            now,
            key,
            _dir: dir,
            ..
        } = renewing();
        let r = svc.renew(
            &agent,
            &facts(now - 100),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!((r.id, r.code), (5, 0), "{}", r.message);
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(r.certificate_pem.as_bytes()).unwrap();
        assert_eq!(
            tether_runtime::tls::spiffe_id(&der).unwrap().to_string(),
            "spiffe://td/tenant/acme/agent/a"
        );
        let (nb, na) = tether_runtime::tls::validity(&der).unwrap();
        assert_eq!(
            na.duration_since(nb).unwrap(),
            Duration::from_secs(24 * 3600 + 60)
        );
        assert_eq!(
            r.ca_pem,
            std::fs::read_to_string(dir.path().join("pki/ca.pem")).unwrap()
        );
        // Another identity, or more than its own, is refused with the reason.
        for uris in [
            &["spiffe://td/tenant/globex/agent/a"][..],
            &[
                "spiffe://td/tenant/acme/agent/a",
                "spiffe://td/tenant/acme/agent/b",
            ][..],
        ] {
            let r = svc.renew(
                &agent,
                &facts(now - 100),
                &renew_req(csr(with_uris(uris), &key)),
            );
            assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{uris:?}");
            assert!(r.certificate_pem.is_empty());
            assert!(
                r.message.contains("subject alternative name"),
                "{}",
                r.message
            );
        }
    }

    #[test]
    fn a_revoked_certificate_or_agent_is_not_renewed() {
        let Renewing {
            svc,
            db,
            agent,
            now,
            key,
            _dir,
        } = renewing();
        db.revoke(&agent, "key leaked", Vec::new(), now * 1000)
            .unwrap();
        let r = svc.renew(
            &agent,
            &facts(now - 100),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!(r.code, tonic::Code::PermissionDenied as i32);
        assert!(r.message.contains("key leaked"), "{}", r.message);
        assert!(r.certificate_pem.is_empty());
        // A certificate issued after the cut-off (the agent enrolled again) renews.
        let r = svc.renew(
            &agent,
            &facts(now + 1),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!(r.code, 0, "{}", r.message);
    }

    #[test]
    fn an_expired_certificate_is_not_renewed() {
        let Renewing {
            svc,
            agent,
            now,
            key,
            _dir,
            ..
        } = renewing();
        let mut expired = facts(now - 100);
        expired.not_after = now - 1;
        let r = svc.renew(&agent, &expired, &renew_req(csr(with_uris(&[]), &key)));
        assert_eq!(r.code, tonic::Code::Unauthenticated as i32, "{}", r.message);
        assert!(r.message.contains("expired at"), "{}", r.message);
        assert!(r.certificate_pem.is_empty());
        // The same session a little earlier, before its certificate expired, is renewed.
        expired.not_after = now + 60;
        let r = svc.renew(&agent, &expired, &renew_req(csr(with_uris(&[]), &key)));
        assert_eq!(r.code, 0, "{}", r.message);
    }

    #[test]
    fn an_agent_is_renewed_at_most_once_a_second_whatever_its_sessions() {
        let Renewing {
            svc,
            agent: a,
            now,
            key,
            _dir,
            ..
        } = renewing();
        let b: AgentId = "acme/b".parse().unwrap();
        let req = renew_req(csr(with_uris(&[]), &key));
        let started = Instant::now();
        assert_eq!(svc.renew(&a, &facts(now - 100), &req).code, 0);
        // Another session of the same agent (another certificate) asking at once.
        let mut other = facts(now - 50);
        other.fingerprint = "cd".repeat(32);
        let r = svc.renew(&a, &other, &req);
        if started.elapsed() < RENEW_EVERY {
            assert_eq!(
                r.code,
                tonic::Code::ResourceExhausted as i32,
                "{}",
                r.message
            );
            assert!(r.message.contains("acme/a"), "{}", r.message);
            assert!(r.certificate_pem.is_empty());
        }
        // Other agents are not held back.
        assert_eq!(svc.renew(&b, &facts(now - 100), &req).code, 0);
    }

    #[test]
    fn without_a_ca_key_renewal_is_refused_and_a_foreign_signing_ca_is_a_start_error() {
        tether_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (svc, _db) = service(dir.path(), false);
        let key = rcgen::KeyPair::generate().unwrap();
        let r = svc.renew(
            &"acme/a".parse().unwrap(),
            &facts(0),
            &renew_req(csr(with_uris(&[]), &key)),
        );
        assert_eq!(r.code, tonic::Code::FailedPrecondition as i32);
        // enrollment.ca_key of a CA that tls.ca does not hold: refused at start.
        let other = tempfile::tempdir().unwrap();
        crate::identity::pki::init(other.path(), "td", &["localhost".into()], false).unwrap();
        let mut cfg: GatewayConfig =
            toml::from_str("trust_domain = \"td\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
                .unwrap();
        cfg.tls.ca = dir.path().join("pki/ca.pem");
        cfg.enrollment.ca_key = Some(other.path().join("ca-key.pem"));
        cfg.enrollment.ca_cert = Some(other.path().join("ca.pem"));
        let db = Arc::new(IdentityDb::open(other.path()).unwrap());
        let bundle = std::fs::read_to_string(&cfg.tls.ca).unwrap();
        let e = Enrollment::new(&cfg, &bundle, db).unwrap_err().to_string();
        assert!(e.contains("does not hold the CA certificate"), "{e}");
    }
}
