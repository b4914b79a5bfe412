//! Transport and session layers: where agents connect.
//!
//! The listeners agents dial (QUIC on UDP, and TLS + HTTP/2 on TCP, same port, for networks
//! that block UDP), the admission of their handshakes, the certificate verifier, the driver
//! that runs one `tunnel_proto::GatewaySession` per connection whatever its transport, the
//! end-to-end probe of each session, the registry of live sessions, and the balance of sessions
//! across replicas (which new sessions to take, which agents to ask to move). Beside the session
//! driver, a probe opens a stream every `probe_interval` and expects the agent's answer within
//! `probe_timeout`: a session whose connection looks alive but whose streams do not work is
//! closed (`UNRESPONSIVE`). A bad peer ends only its own connection.

pub mod accept;
pub mod admission;
pub mod balance;
pub mod driver;
pub mod endpoint;
pub mod lean;
pub mod probe;
pub mod registry;
pub mod tls;
pub mod verifier;
pub mod version;

#[cfg(test)]
pub(crate) mod test_support {
    //! What unit tests of the tunnel and its users share.
    use std::sync::Arc;

    use tether_runtime::transport::Link;

    /// A real QUIC connection on loopback: (the agent's end, the gateway's end). The endpoints
    /// are returned so they outlive the test.
    pub(crate) async fn quic_pair() -> (quinn::Connection, Link, [quinn::Endpoint; 2]) {
        tether_runtime::tls::install_crypto_provider();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let server = quinn::ServerConfig::with_single_cert(vec![der.clone()], key).expect("tls");
        let server = quinn::Endpoint::server(server, ([127, 0, 0, 1], 0).into()).expect("server");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
        ));
        let mut client = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("client");
        client.set_default_client_config(client_cfg);
        let addr = server.local_addr().expect("addr");
        let (dialed, accepted) = tokio::join!(
            async {
                client
                    .connect(addr, "localhost")
                    .unwrap()
                    .await
                    .expect("connect")
            },
            async {
                server
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("accept")
            },
        );
        (dialed, Link::Quic(accepted), [client, server])
    }
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tether_runtime::CancellationToken;
use tether_runtime::logging::LogThrottle;
use tunnel_proto::session::GatewaySessionConfig;

use crate::config::GatewayConfig;
use crate::identity::revocation::RevocationList;
use crate::tunnel::accept::{SideDoor, SideDoorFn};
use crate::tunnel::admission::{AgentSessions, SessionPermit};
use crate::tunnel::balance::Balance;
use crate::tunnel::registry::Registry;

/// Shared by every connection's driver.
#[derive(Debug)]
pub struct TunnelContext {
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Template for each session's config.
    pub session: GatewaySessionConfig,
    /// Cancelled when the gateway shuts down: sessions close with `SHUTDOWN`.
    pub shutdown: CancellationToken,
    /// How often each session is probed, and how long a probe may take.
    pub probe: (Duration, Duration),
    /// Checked again once a session is registered (a revocation may have landed after its
    /// handshake).
    pub revocations: Arc<RevocationList>,
    /// Other protocols on the tunnel's TCP port, chosen by the ClientHello's ALPN (enrollment).
    pub side_doors: Vec<SideDoor>,
    /// Signs renewal requests made on sessions (`RenewRequest`); `None`: not offered.
    pub renewal: Option<Arc<crate::identity::enrollment::Enrollment>>,
    /// Connections per agent identity (`limits.sessions_per_agent`).
    pub sessions: AgentSessions,
    /// Which new sessions to take (drain, fair share, budget), and what `Welcome` says of the
    /// replicas.
    pub balance: Arc<Balance>,
    /// The oldest agent version admitted (`agents.min_version`).
    pub min_version: version::MinVersion,
    /// Refusals over `sessions_per_agent` are logged at most every 10 s: a hostile agent
    /// retries as fast as its handshake rate allows.
    refusals: std::sync::Mutex<LogThrottle>,
    next_session: AtomicU64,
    instance: String,
}

impl TunnelContext {
    /// A context for sessions announcing `cfg`'s limits.
    pub fn new(cfg: &GatewayConfig, registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        let instance = format!("{:08x}", rand::random::<u32>());
        let mut session = GatewaySessionConfig::new(String::new());
        session.gateway_id = format!("gw-{instance}");
        session.heartbeat_interval = cfg.tunnel.heartbeat_interval;
        session.handshake_timeout = cfg.tunnel.handshake_timeout;
        session.max_concurrent_streams = cfg.tunnel.max_concurrent_streams;
        session.probe_interval = cfg.tunnel.probe_interval;
        session.hold_hello = true;
        session
            .capabilities
            .push(tunnel_proto::message::LEAVE.to_owned());
        let balance = Arc::new(Balance::new(
            session.gateway_id.clone(),
            cfg.tunnel.fair_share_margin,
            cfg.limits.new_sessions_per_second,
        ));
        TunnelContext {
            registry,
            session,
            shutdown,
            probe: (cfg.tunnel.probe_interval, cfg.tunnel.probe_timeout),
            revocations: Arc::default(),
            side_doors: Vec::new(),
            renewal: None,
            sessions: AgentSessions::new(cfg.limits.sessions_per_agent),
            balance,
            min_version: version::MinVersion::new(cfg.agents.min_version.as_deref()),
            refusals: std::sync::Mutex::new(LogThrottle::new(Duration::from_secs(10))),
            next_session: AtomicU64::new(1),
            instance,
        }
    }

    /// Decides on new sessions with `balance` (a replica's: its cluster id and the fleet's
    /// counts) instead of this process's own.
    pub fn with_balance(mut self, balance: Arc<Balance>) -> Self {
        self.balance = balance;
        self
    }

    /// Uses `revocations` (the list the verifier consults) for the post-registration check.
    pub fn with_revocations(mut self, revocations: Arc<RevocationList>) -> Self {
        self.revocations = revocations;
        self
    }

    /// Offers certificate renewal on every session (`Welcome` lists `renew`) when `enrollment`
    /// can sign.
    pub fn with_renewal(
        mut self,
        enrollment: Arc<crate::identity::enrollment::Enrollment>,
    ) -> Self {
        if enrollment.enabled() {
            self.session
                .capabilities
                .push(tunnel_proto::message::RENEW.to_owned());
            self.renewal = Some(enrollment);
        }
        self
    }

    /// Hands TCP connections offering `alpn` to `serve` instead of the tunnel.
    pub fn with_side_door(mut self, alpn: &[u8], serve: SideDoorFn) -> Self {
        self.side_doors.push(SideDoor {
            alpn: alpn.to_vec(),
            serve,
        });
        self
    }

    fn next_session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    /// Counts a new connection of `agent`, or says (to log and to the agent) why it is
    /// refused.
    fn admit_session(
        &self,
        agent: &tunnel_proto::AgentId,
        remote: SocketAddr,
    ) -> Result<SessionPermit, String> {
        let held = match self.sessions.acquire(agent) {
            Ok(permit) => return Ok(permit),
            Err(held) => held,
        };
        let throttled = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(Instant::now());
        if let Some(held_back) = throttled {
            tracing::warn!(%agent, %remote, held, limit = self.sessions.max(),
                refusals_since_last_warning = held_back,
                "refusing a tunnel connection: the agent holds limits.sessions_per_agent already");
        }
        Err(format!(
            "agent {agent} is at limits.sessions_per_agent on this gateway (connections open: \
             {held}): if they are not all its own instances, another \
             process holds its certificate (revoke it); otherwise wait for old sessions to end, \
             run fewer instances, or raise limits.sessions_per_agent on the gateway"
        ))
    }
}
