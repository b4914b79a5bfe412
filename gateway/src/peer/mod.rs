//! Transport + feature layer: the links between gateway replicas, and forwarding over them.
//!
//! With several replicas a call lands on whichever one the load balancer picks, while the
//! agent's sessions live on one or two others. Each replica keeps one long-lived QUIC
//! connection to every live peer ([`link`]), on `cluster.peer_listen`, mutual TLS with the
//! replicas' own identities `spiffe://<trust_domain>/gateway/<replica_id>` ([`tls`]); the
//! replica with the smaller id dials ([`dialer`], which also reads who the peers are, and
//! whether they are alive, from PostgreSQL), the other accepts ([`listener`]). Both probe it.
//!
//! A call for an agent with no session here goes to a replica that holds one
//! ([`forwarder`]): a stream on the link to it, a small header ([`wire`]), then exactly the
//! bytes of the gateway→agent stream protocol the relay would write to an agent; the holder
//! opens a stream to its local session and splices the two ([`splice`]), so the relay's code
//! runs unchanged on a forwarded stream. One hop at most: a holder only uses its own sessions.
//!
//! The relay (`relay::Relay`) is above this module: it asks the [`forwarder::Forwarder`] when
//! it has no session itself, and it serves the holder's side through [`LocalStreams`].

pub mod dialer;
pub mod forwarder;
pub mod link;
pub mod listener;
pub mod metrics;
pub mod splice;
pub mod tls;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::PgPool;
use tether_runtime::CancellationToken;
use tether_runtime::transport::{RecvStream, SendStream};
use tunnel_proto::{AgentId, ErrorCode};

use crate::config::GatewayConfig;
use crate::peer::link::PeerLink;
use crate::peer::tls::PeerTls;

/// The timings of the peer links, from `cluster.heartbeat_interval`.
#[derive(Clone, Copy, Debug)]
pub struct PeerSettings {
    /// How often each end probes a link (and re-reads the replicas from PostgreSQL).
    pub probe_interval: Duration,
    /// A probe unanswered this long closes the link.
    pub down_after: Duration,
    /// How long a forwarding replica waits for the holder's answer before it tries another.
    pub answer_timeout: Duration,
}

impl PeerSettings {
    /// Probes at `cluster.heartbeat_interval` (within 100 ms – 5 s); a link is down after three
    /// unanswered intervals, and never sooner than a second (a busy replica is not a dead one).
    pub fn from_config(cfg: &GatewayConfig) -> PeerSettings {
        let probe_interval = cfg
            .cluster
            .heartbeat_interval
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let down_after = (probe_interval * 3).max(Duration::from_secs(1));
        PeerSettings {
            probe_interval,
            down_after,
            answer_timeout: down_after,
        }
    }
}

/// Why the peer links could not start: the operator's to fix (exit 64) but for
/// [`PeerError::Io`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// `cluster.peer_cert` and `cluster.peer_key` are not set.
    #[error("cluster.peer_cert and cluster.peer_key are not set")]
    NotConfigured,
    /// Issuing this replica's own peer certificate with `cluster.peer_ca_key` failed.
    #[error("cluster.peer_ca_key {}: cannot issue this replica's peer certificate: {reason} (it must be the key of a CA whose certificate is in tls.ca)", path.display())]
    SelfIssued {
        /// `cluster.peer_ca_key`.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The peer certificate or key could not be loaded.
    #[error("cluster.peer_cert / cluster.peer_key: {0}")]
    Material(tether_runtime::tls::TlsError),
    /// The peer certificate is not this replica's gateway identity.
    #[error("cluster.peer_cert {}: {reason}", path.display())]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the certificate or key.
    #[error("cluster.peer_cert / cluster.peer_key: {0}")]
    Tls(rustls::Error),
    /// The client-certificate verifier refused `tls.ca`.
    #[error("peer links: client verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// QUIC cannot use the TLS config.
    #[error("peer links: QUIC TLS config: {0}")]
    Quic(quinn::crypto::rustls::NoInitialCipherSuite),
    /// The idle timeout derived from `cluster.heartbeat_interval` is out of range.
    #[error("cluster.heartbeat_interval: the peer links' idle timeout is out of range")]
    IdleTimeout,
    /// The peer listener could not be bound or started.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

impl PeerError {
    /// True when the configuration is at fault (exit 64).
    pub fn is_config(&self) -> bool {
        !matches!(self, PeerError::Io { .. })
    }
}

// === What the holder's side needs from the relay ===

/// A stream to one of an agent's sessions on this replica, and what counts it against the
/// agent's stream limit (held as long as the stream lives).
pub struct LocalStream {
    /// Towards the agent.
    pub send: SendStream,
    /// From the agent.
    pub recv: RecvStream,
    /// The stream's place under `limits.streams_per_agent`.
    pub permit: Box<dyn Send + Sync>,
}

/// Why no stream to the agent could be opened here. Each means nothing reached the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalRefusal {
    /// No live session of the agent on this replica.
    NotHere,
    /// The agent has `limits.streams_per_agent` streams through this replica (the message).
    TooManyStreams(String),
    /// The agent's connection gave no stream in time (the message).
    NoFreeStream(String),
    /// The agent's connection went away while the stream was being opened (the message).
    Lost(String),
}

/// Opens streams to this replica's own sessions: what a forwarded stream is spliced to. The
/// relay implements it (one hop at most: it never forwards again).
pub trait LocalStreams: Send + Sync + 'static {
    /// A stream to one of `agent`'s sessions here, opened by `deadline`.
    fn open_local<'a>(
        &'a self,
        agent: &'a AgentId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<LocalStream, LocalRefusal>>;
}

// === The peers ===

/// A replica as the peers see it in PostgreSQL (`gateway_replicas`), read every probe interval.
#[derive(Clone, Debug)]
pub struct PeerRow {
    /// Its `cluster.replica_id`.
    pub replica: String,
    /// Its epoch (grows each time a process takes the name).
    pub epoch: i64,
    /// Where it is dialed (`cluster.advertise`).
    pub advertise: String,
    /// Shutting down: chosen only when no other replica holds the agent.
    pub draining: bool,
    /// A lower bound of when its liveness expires, on this process's clock: the time the
    /// query that read it was sent plus what was left by the database's clock. Past it, the
    /// replica is never chosen, whatever rows it left.
    pub alive_until: Instant,
}

impl PeerRow {
    /// True while its liveness has surely not expired.
    pub fn alive(&self) -> bool {
        Instant::now() < self.alive_until
    }
}

/// A link as `/readyz` and the dev tool show it.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// The peer.
    pub peer: String,
    /// Its link is open and not suspect.
    pub up: bool,
    /// The last probe's round trip.
    pub rtt: Option<Duration>,
}

/// This replica's peer links: the endpoint, the links by peer, and the peers' rows.
pub struct Peers {
    me: String,
    /// This process's epoch (`gateway_replicas.epoch`), told to peers in probe answers.
    epoch: i64,
    trust_domain: String,
    endpoint: quinn::Endpoint,
    tls: PeerTls,
    settings: PeerSettings,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
    rows: RwLock<HashMap<String, PeerRow>>,
    /// The rows were read at least once.
    rows_read: std::sync::atomic::AtomicBool,
    /// Peers a dialer task keeps a link to.
    keepers: Mutex<HashSet<String>>,
    local: Arc<dyn LocalStreams>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.me)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// Starts the peer links on `socket` (bound to `cluster.peer_listen`): accepts peers,
    /// reads the replicas from `pool` every probe interval and dials those it should; forwarded
    /// streams are opened on `local`. Everything stops at `stop`.
    pub fn start(
        cfg: &GatewayConfig,
        epoch: i64,
        socket: std::net::UdpSocket,
        roots: Arc<rustls::RootCertStore>,
        pool: PgPool,
        local: Arc<dyn LocalStreams>,
        stop: CancellationToken,
    ) -> Result<Arc<Peers>, PeerError> {
        let settings = PeerSettings::from_config(cfg);
        let tls = PeerTls::load(cfg, roots)?;
        let server = tls.server_config(&settings)?;
        let addr = socket.local_addr().map_err(|source| PeerError::Io {
            what: "peer socket".into(),
            source,
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| PeerError::Io {
            what: format!("starting QUIC on the peer listener udp/{addr}"),
            source,
        })?;
        let peers = Arc::new(Peers {
            me: cfg.cluster.replica_id(),
            epoch,
            trust_domain: cfg.trust_domain.clone(),
            endpoint,
            tls,
            settings,
            links: Mutex::default(),
            rows: RwLock::default(),
            rows_read: Default::default(),
            keepers: Mutex::default(),
            local,
            stop,
        });
        tokio::spawn(listener::accept_loop(peers.clone()));
        tokio::spawn(dialer::run(peers.clone(), pool));
        let p = peers.clone();
        tokio::spawn(async move {
            p.stop.cancelled().await;
            p.endpoint
                .close(ErrorCode::SHUTDOWN.0.into(), b"gateway replica stopping");
        });
        Ok(peers)
    }

    /// This replica's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// This process's epoch.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The timings.
    pub fn settings(&self) -> PeerSettings {
        self.settings
    }

    /// Where the peer listener is bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The open link to `peer`, if there is one.
    pub fn link(&self, peer: &str) -> Option<Arc<PeerLink>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .filter(|l| l.is_open())
            .cloned()
    }

    /// `peer`'s row as last read.
    pub fn row(&self, peer: &str) -> Option<PeerRow> {
        self.rows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned()
    }

    /// The live peers, not draining, this replica has no open link to (sorted); `None` until
    /// the replicas were read once. What `/readyz` waits for after a start: a call that lands
    /// here before the links are up could not be forwarded.
    pub fn unlinked(&self) -> Option<Vec<String>> {
        if !self.rows_read.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let rows: Vec<String> = self
            .rows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.alive() && !r.draining)
            .map(|r| r.replica.clone())
            .collect();
        let mut out: Vec<String> = rows
            .into_iter()
            .filter(|p| self.link(p).is_none())
            .collect();
        out.sort();
        Some(out)
    }

    /// Every link, for `/readyz` and the dev tool.
    pub fn status(&self) -> Vec<PeerStatus> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PeerStatus> = links
            .values()
            .map(|l| PeerStatus {
                peer: l.peer().to_owned(),
                up: l.is_open() && !l.is_suspect(),
                rtt: l.rtt(),
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Replaces the rows (read at `sent`; `rows` carry what was left of each liveness then).
    fn set_rows(&self, rows: Vec<crate::cluster::replica::PeerRecord>, sent: Instant) {
        let map = rows
            .into_iter()
            .filter(|r| r.replica_id != self.me)
            .map(|r| {
                (
                    r.replica_id.clone(),
                    PeerRow {
                        replica: r.replica_id,
                        epoch: r.epoch,
                        advertise: r.advertise,
                        draining: r.draining,
                        alive_until: sent + r.alive_for,
                    },
                )
            })
            .collect();
        *self.rows.write().unwrap_or_else(|e| e.into_inner()) = map;
        self.rows_read
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Takes `link` as the link to its peer (closing one it replaces), and serves it: probes,
    /// and the streams the peer opens, until it is gone.
    fn adopt(self: &Arc<Self>, link: Arc<PeerLink>) {
        let peer = link.peer().to_owned();
        let old = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.clone(), link.clone());
        if let Some(old) = old
            && !Arc::ptr_eq(&old, &link)
        {
            old.close(ErrorCode::REPLACED, "replaced by a newer link");
        }
        metrics::set_up(&peer, true);
        tracing::info!(%peer, dialed = link.epoch().is_some(), "peer link up");
        let peers = self.clone();
        tokio::spawn(async move {
            let probes = link.run_probes(peers.settings);
            let streams = listener::serve_link(&peers, &link);
            tokio::select! {
                _ = probes => {}
                _ = streams => {}
            }
            let why = link.closed().await;
            let current = {
                let mut links = peers.links.lock().unwrap_or_else(|e| e.into_inner());
                let current = links.get(&peer).is_some_and(|l| Arc::ptr_eq(l, &link));
                if current {
                    links.remove(&peer);
                }
                current
            };
            if current {
                metrics::set_up(&peer, false);
                if !peers.stop.is_cancelled() {
                    metrics::count_failure(&peer, metrics::PeerFailure::LinkLost);
                    tracing::warn!(%peer, reason = %why, "peer link down");
                }
            }
        });
    }
}
