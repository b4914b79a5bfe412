//! Wiring + session: renewing the agent's certificate over the tunnel, before it expires.
//!
//! At two thirds of the current certificate's lifetime (`notBefore + ⅔·(notAfter − notBefore)`,
//! up to 5% of the lifetime earlier so a fleet enrolled at once does not renew at once, and at
//! once at start when that moment has passed) the renewer:
//! 1. generates a fresh ECDSA P-256 key here (rcgen on aws-lc-rs) and a CSR with no name in it:
//!    the gateway signs only for the identity of the session the request arrives on;
//! 2. sends it as `RenewRequest` on the control stream of a live session to a gateway that
//!    offers renewal (its `Welcome` lists `renew`) and waits for the `RenewResponse`;
//! 3. checks the certificate: this agent's identity, this key, chaining to the CA bundle that
//!    came with it (the gateway's `tls.ca`: during a CA rotation the old and the new CA);
//! 4. keeps it in `state_dir` (below), so a restart uses it;
//! 5. hands it to the supervisors ([`Credentials::install`]): each dials a new session with it
//!    and retires its old one once the new one is up (make-before-break: calls in flight
//!    finish on the old session, new ones go to the new).
//!
//! A failure (no answer, a refusal, a certificate that does not check out) is logged, counted
//! in `tether_agent_renewals_total{result}` and retried with capped, jittered backoff (1 s, up
//! to 5 min or a tenth of the lifetime); the current certificate stays in use meanwhile, and a
//! session established before it expires stays up after. `tether_agent_certificate_expiry_seconds`
//! is the current certificate's `notAfter` (Unix seconds).
//!
//! **State** (`state_dir`; mode 0700, keys 0600): `agent.pem` and `agent-key.pem` (the same
//! files an enrolled identity lives in), `gateway-ca.pem` (the CA bundle of the last
//! certificate, trusted for the gateway's certificate in addition to `tls.ca`), and, for a
//! moment, `renewed.pem`. Every file is written beside and renamed. Key and certificate are two
//! files, so the new pair is first written as one (`renewed.pem`, the commit point), then
//! installed, then that file removed; a start that finds it (a crash in between) installs it
//! first ([`crate::state::StateDir::recover_renewal`]; the layout is [`crate::state`]'s). An identity from `tls.cert`/`tls.key` (a Kubernetes Secret mount) or
//! from Secrets Manager is not written back to its source: the renewed pair goes to
//! `state_dir`, and at start the agent uses it instead of the configured one when it is the
//! same identity and valid longer. Without `state_dir` the renewed certificate lives in memory
//! only.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tether_runtime::CancellationToken;
use tether_runtime::tls;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tunnel_proto::Backoff;
use tunnel_proto::message::RenewResponse;

use crate::certs::{self, CertificateError};
use crate::config::AgentConfig;
use crate::dialer::Dialer;
use crate::error::AgentError;
use crate::identity::{Identity, IdentityError};
use crate::state::StateDir;

/// How long the gateway gets to answer a renewal.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a due renewal waits for a session before saying so.
const NO_SESSION_WARNING: Duration = Duration::from_secs(30);
/// Least time between two renewals, whatever the certificate says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Retry backoff after a failed renewal: base and cap (lowered to a tenth of the lifetime).
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(300);

/// A renewal to send on one session; the answer comes back on `reply` (dropped when the session
/// could not send it or ended first).
#[derive(Debug)]
pub struct RenewOrder {
    /// The CSR, PEM.
    pub csr_pem: String,
    /// Where the gateway's answer goes.
    pub reply: oneshot::Sender<RenewResponse>,
}

/// The identity in use: what sessions dial with.
#[derive(Debug)]
pub struct Current {
    /// Bumped by every renewal.
    pub generation: u64,
    /// Presents this identity.
    pub dialer: Arc<Dialer>,
    /// The certificate's `notBefore`.
    pub not_before: SystemTime,
    /// The certificate's `notAfter`.
    pub not_after: SystemTime,
    identity: Identity,
}

/// The agent's current certificate, replaced by each renewal, and the live sessions a renewal
/// can be sent on. Shared by the supervisors and the renewer.
#[derive(Debug)]
pub struct Credentials {
    current: RwLock<Arc<Current>>,
    generation: watch::Sender<u64>,
    sessions: Mutex<Vec<(u64, mpsc::Sender<RenewOrder>)>>,
    session_up: Notify,
}

impl Credentials {
    /// Starts with `identity`, dialing as `cfg` says.
    pub fn new(cfg: &AgentConfig, identity: Identity) -> Result<Credentials, AgentError> {
        let dialer = Dialer::new(cfg, &identity)?;
        Ok(Credentials {
            current: RwLock::new(Arc::new(current(0, dialer, identity)?)),
            generation: watch::channel(0).0,
            sessions: Mutex::default(),
            session_up: Notify::new(),
        })
    }

    /// The identity in use.
    pub fn current(&self) -> Arc<Current> {
        self.current.read().expect("credentials lock").clone()
    }

    /// Changes with every renewal (the new generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Makes `identity` the one new sessions dial with; the supervisors then replace their
    /// sessions (make-before-break).
    pub fn install(&self, identity: Identity) -> Result<Arc<Current>, AgentError> {
        let old = self.current();
        let dialer = old.dialer.with_identity(&identity)?;
        let next = Arc::new(current(old.generation + 1, dialer, identity)?);
        *self.current.write().expect("credentials lock") = next.clone();
        self.generation.send_replace(next.generation);
        Ok(next)
    }

    /// Offers the session `key` for renewals until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, key: u64) -> SessionRenewals {
        let (tx, rx) = mpsc::channel(1);
        self.sessions.lock().expect("sessions lock").push((key, tx));
        self.session_up.notify_waiters();
        SessionRenewals {
            orders: rx,
            credentials: self.clone(),
            key,
        }
    }

    /// The newest session that takes renewals, waiting for one.
    async fn session(&self) -> mpsc::Sender<RenewOrder> {
        loop {
            let up = self.session_up.notified();
            if let Some((_, tx)) = self.sessions.lock().expect("sessions lock").last() {
                return tx.clone();
            }
            up.await;
        }
    }
}

fn current(generation: u64, dialer: Dialer, identity: Identity) -> Result<Current, AgentError> {
    let leaf = identity
        .certs
        .first()
        .ok_or_else(|| IdentityError::Certificate {
            origin: "the identity in use".into(),
            error: CertificateError::Missing,
        })?;
    let (not_before, not_after) = tls::validity(leaf)?;
    Ok(Current {
        generation,
        dialer: Arc::new(dialer),
        not_before,
        not_after,
        identity,
    })
}

/// One session's renewal orders; deregisters the session when dropped.
#[derive(Debug)]
pub struct SessionRenewals {
    /// Orders for this session.
    pub orders: mpsc::Receiver<RenewOrder>,
    credentials: Arc<Credentials>,
    key: u64,
}

impl Drop for SessionRenewals {
    fn drop(&mut self) {
        self.credentials
            .sessions
            .lock()
            .expect("sessions lock")
            .retain(|(k, _)| *k != self.key);
    }
}

/// Why one renewal failed.
#[derive(Debug, thiserror::Error)]
enum RenewError {
    /// The gateway said no (revoked, a refused CSR, renewal not enabled).
    #[error("the gateway refused the renewal (code {code}): {message}")]
    Refused { code: i32, message: String },
    /// The session ended before the gateway answered.
    #[error("no answer from the gateway: the session ended first")]
    SessionEnded,
    /// The gateway took longer than this.
    #[error("no answer from the gateway: none within {0:?}")]
    Timeout(Duration),
    /// What came back is not usable.
    #[error("the gateway returned an unusable certificate: {0}")]
    BadCertificate(#[source] CertificateError),
    /// What came back is another agent's certificate.
    #[error("the gateway returned an unusable certificate: it is for {got}, not {want}")]
    WrongAgent { got: String, want: String },
    /// The certificate cannot make a TLS client.
    #[error("the gateway returned an unusable certificate: {0}")]
    Unusable(#[source] AgentError),
    /// The key or CSR could not be made.
    #[error("generating the key and CSR: {0}")]
    Key(#[source] rcgen::Error),
}

impl RenewError {
    fn label(&self) -> &'static str {
        match self {
            RenewError::Refused { .. } => "refused",
            _ => "failed",
        }
    }
}

/// When a certificate is due for renewal: two thirds into its lifetime, less up to 5% of
/// the lifetime (`unit` uniform in `[0, 1)`).
pub fn due(not_before: SystemTime, not_after: SystemTime, unit: f64) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life * 2 / 3 - life.mul_f64(0.05 * unit.clamp(0.0, 1.0))
}

/// Renews the certificate whenever it is due, until `shutdown`; see the module docs.
pub async fn run(credentials: Arc<Credentials>, cfg: AgentConfig, shutdown: CancellationToken) {
    let mut retry: Option<Backoff> = None;
    let mut earliest = SystemTime::now();
    loop {
        let cur = credentials.current();
        metrics::gauge!("tether_agent_certificate_expiry_seconds").set(unix(cur.not_after));
        let at = match retry.as_mut() {
            Some(b) => SystemTime::now() + b.next_delay(rand::random::<f64>()),
            None => due(cur.not_before, cur.not_after, rand::random::<f64>()).max(earliest),
        };
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let session = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = wait_session(&credentials, cur.not_after) => s,
        };
        let started = SystemTime::now();
        // Shutdown does not wait for an answer (up to ANSWER_TIMEOUT): a renewal cut short
        // before its commit point is simply not done, and one after it is finished by the next
        // start (see `recover`).
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = renew_once(&credentials, session, &cfg) => r,
        };
        match result {
            Ok(next) => {
                retry = None;
                earliest = started + MIN_INTERVAL;
                let next_due = due(next.not_before, next.not_after, 0.0);
                if next_due < earliest {
                    tracing::warn!(
                        lifetime = ?next.not_after.duration_since(next.not_before).unwrap_or_default(),
                        "the gateway issues certificates due for renewal at once; renewing at most every second"
                    );
                }
            }
            Err(e) => {
                metrics::counter!("tether_agent_renewals_total", "result" => e.label())
                    .increment(1);
                let expired = SystemTime::now() >= cur.not_after;
                if expired {
                    tracing::error!(error = %e, not_after = %rfc3339(cur.not_after),
                        "certificate renewal failed and the certificate has expired: gateways renew only unexpired certificates, so the agent needs a new enrollment token (live sessions stay up; new ones cannot be opened)");
                } else {
                    tracing::error!(error = %e, not_after = %rfc3339(cur.not_after),
                        "certificate renewal failed; keeping the current certificate and trying again");
                }
                let life = cur
                    .not_after
                    .duration_since(cur.not_before)
                    .unwrap_or(RETRY_CAP);
                let cap = (life / 10).clamp(RETRY_BASE, RETRY_CAP);
                retry.get_or_insert_with(|| Backoff::new(RETRY_BASE.min(cap), cap));
            }
        }
    }
}

/// The session to renew on, saying so when none comes for a while.
async fn wait_session(
    credentials: &Credentials,
    not_after: SystemTime,
) -> mpsc::Sender<RenewOrder> {
    let mut warned = false;
    loop {
        tokio::select! {
            s = credentials.session() => return s,
            _ = tokio::time::sleep(NO_SESSION_WARNING), if !warned => {
                warned = true;
                tracing::warn!(not_after = %rfc3339(not_after),
                    "certificate renewal is due, but no session to a gateway that renews certificates is up (the gateway needs enrollment.ca_key); waiting for one");
            }
        }
    }
}

/// One renewal on `session`; see the module docs.
async fn renew_once(
    credentials: &Credentials,
    session: mpsc::Sender<RenewOrder>,
    cfg: &AgentConfig,
) -> Result<Arc<Current>, RenewError> {
    let key = rcgen::KeyPair::generate().map_err(RenewError::Key)?;
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(RenewError::Key)?;
    let (reply, answer) = oneshot::channel();
    session
        .send(RenewOrder { csr_pem, reply })
        .await
        .map_err(|_| RenewError::SessionEnded)?;
    let resp = tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| RenewError::Timeout(ANSWER_TIMEOUT))?
        .map_err(|_| RenewError::SessionEnded)?;
    if resp.code != 0 {
        return Err(RenewError::Refused {
            code: resp.code,
            message: resp.message,
        });
    }
    let cur = credentials.current();
    let key_pem = key.serialize_pem();
    let mut roots = cur.identity.roots.clone();
    for c in CertificateDer::pem_slice_iter(resp.ca_pem.as_bytes()).flatten() {
        let _ = roots.add(c);
    }
    let certs = certs::check_issued(&resp.certificate_pem, &key_pem, &roots)
        .map_err(RenewError::BadCertificate)?;
    let agent = certs::agent_id(&certs).map_err(RenewError::BadCertificate)?;
    if agent != cur.identity.agent {
        return Err(RenewError::WrongAgent {
            got: agent,
            want: cur.identity.agent.clone(),
        });
    }
    let identity = Identity {
        certs,
        key: certs::pem_key(key_pem.as_bytes()).map_err(RenewError::BadCertificate)?,
        roots,
        agent,
    };
    let saved = match StateDir::of(cfg) {
        Some(state) => {
            let (cert_pem, ca_pem) = (resp.certificate_pem.clone(), resp.ca_pem.clone());
            let key_pem = key_pem.clone();
            let dir = state.path().to_owned();
            let r = tokio::task::spawn_blocking(move || {
                state
                    .save_renewed(&cert_pem, &key_pem, &ca_pem)
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = &r {
                tracing::error!(error = %e, state_dir = %dir.display(),
                    "the renewed certificate could not be saved: using it, but a restart will start from the previous one");
            }
            r.is_ok()
        }
        None => {
            tracing::warn!(
                "no state_dir: the renewed certificate is kept in memory only; a restart starts from the configured one"
            );
            false
        }
    };
    let next = credentials
        .install(identity)
        .map_err(RenewError::Unusable)?;
    metrics::counter!("tether_agent_renewals_total",
        "result" => if saved || cfg.state_dir.is_none() { "renewed" } else { "unsaved" })
    .increment(1);
    metrics::gauge!("tether_agent_certificate_expiry_seconds").set(unix(next.not_after));
    tracing::info!(agent = %next.identity.agent, not_after = %rfc3339(next.not_after),
        generation = next.generation, "certificate renewed: moving to new sessions");
    Ok(next)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_is_two_thirds_into_the_lifetime_less_a_little_jitter() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let na = nb + Duration::from_secs(24 * 3600);
        assert_eq!(due(nb, na, 0.0), nb + Duration::from_secs(16 * 3600));
        let early = due(nb, na, 0.999);
        assert!(early < nb + Duration::from_secs(16 * 3600));
        assert!(
            early > nb + Duration::from_secs(14 * 3600 + 1800),
            "at most 5% of 24 h early"
        );
        // A certificate dated backwards (or nonsense) is due at its start.
        assert_eq!(due(na, nb, 0.5), na);
    }
}
