//! Transport + backend: who the peers are, and keeping a link to those this replica dials.
//!
//! Every probe interval the replicas' rows are read from PostgreSQL (`gateway_replicas`: one
//! small query): where each is dialed (`cluster.advertise`), whether it drains, and how long
//! its liveness surely lasts. For one link per pair, the replica whose id sorts first dials;
//! a task per such peer keeps the link up while the peer is alive, dialing again with capped
//! exponential backoff and full jitter (100 ms to 5 s) after a failure, and at once when the
//! peer restarted (its epoch moved). A dial is complete once the peer answered a probe: over
//! QUIC a peer that refuses this replica's certificate shows it only at the first stream. The
//! probe's answer names the epoch of the process that answered, and that is the link's: a
//! restarted peer may be dialed before its new row is read, and its link must not then be
//! taken for the old process's (and closed, with the calls on it) when the row catches up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tunnel_proto::{Backoff, ErrorCode};

use crate::cluster::replica::peer_records;
use crate::peer::link::PeerLink;
use crate::peer::metrics::{self, PeerFailure};
use crate::peer::tls::SERVER_NAME;
use crate::peer::{PeerRow, Peers};

/// How long a QUIC handshake with a peer may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait between failed dials.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// At most one warning per peer this often while its dials fail.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Reads the replicas every probe interval and starts a keeper for each peer this replica
/// dials, until the peers stop.
pub async fn run(peers: Arc<Peers>, pool: PgPool) {
    let mut failing_since: Option<Instant> = None;
    loop {
        let sent = Instant::now();
        let budget = peers.settings.down_after;
        match tokio::time::timeout(budget, peer_records(&pool)).await {
            Ok(Ok(rows)) => {
                failing_since = None;
                peers.set_rows(rows, sent);
                let rows: Vec<PeerRow> = peers
                    .rows
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for row in rows {
                    if row.alive() && row.replica.as_str() > peers.me.as_str() {
                        let new = peers
                            .keepers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(row.replica.clone());
                        if new {
                            tokio::spawn(keep(peers.clone(), row.replica));
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                if failing_since.is_none() {
                    tracing::warn!(error = %e,
                        "peer links: cannot read the replicas from PostgreSQL; peers whose \
                         liveness cannot be confirmed are not forwarded to");
                    failing_since = Some(Instant::now());
                }
            }
            Err(_) => {
                if failing_since.is_none() {
                    tracing::warn!(timeout = ?budget,
                        "peer links: reading the replicas from PostgreSQL timed out");
                    failing_since = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            _ = peers.stop.cancelled() => return,
            _ = tokio::time::sleep(peers.settings.probe_interval) => {}
        }
    }
}

/// Keeps a link to `peer` while its row says it is alive; then leaves the keepers.
async fn keep(peers: Arc<Peers>, peer: String) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut warned: Option<Instant> = None;
    loop {
        if peers.stop.is_cancelled() {
            break;
        }
        let Some(row) = peers.row(&peer).filter(PeerRow::alive) else {
            break;
        };
        if let Some(link) = peers.link(&peer) {
            // A new process took the name: the old one is gone, whatever the link says.
            if link.epoch().is_some_and(|e| e < row.epoch) {
                link.close(ErrorCode::REPLACED, "the peer restarted");
                continue;
            }
            tokio::select! {
                _ = link.closed() => {}
                _ = tokio::time::sleep(peers.settings.probe_interval) => {}
                _ = peers.stop.cancelled() => break,
            }
            continue;
        }
        match dial(&peers, &row).await {
            Ok(link) => {
                backoff.reset();
                warned = None;
                peers.adopt(link);
            }
            Err(why) => {
                metrics::count_failure(&peer, PeerFailure::Dial);
                if warned.is_none_or(|t| t.elapsed() > WARN_EVERY) {
                    tracing::warn!(%peer, advertise = %row.advertise, error = %why,
                        "cannot link to peer replica; retrying with backoff");
                    warned = Some(Instant::now());
                }
                let wait = backoff.next_delay(rand::random::<f64>());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = peers.stop.cancelled() => break,
                }
            }
        }
    }
    peers
        .keepers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&peer);
}

/// Dials `row`'s replica, checks its identity, and waits for its first probe answer.
async fn dial(peers: &Peers, row: &PeerRow) -> Result<Arc<PeerLink>, String> {
    let addr = resolve(&row.advertise, peers.local_addr()).await?;
    let config = peers
        .tls
        .client_config(&row.replica, &peers.settings)
        .map_err(|e| e.to_string())?;
    let connecting = peers
        .endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|e| format!("{addr}: {e}"))?;
    let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("{addr}: {e}")),
        Err(_) => return Err(format!("{addr}: no handshake within {DIAL_TIMEOUT:?}")),
    };
    let link = Arc::new(PeerLink::new(row.replica.clone(), Some(row.epoch), conn));
    match tokio::time::timeout(peers.settings.down_after, link.ping()).await {
        Ok(Ok(())) => Ok(link),
        Ok(Err(e)) => {
            link.close(ErrorCode::UNAUTHENTICATED, "first probe failed");
            Err(format!("{addr}: the first probe failed: {e}"))
        }
        Err(_) => {
            link.close(ErrorCode::UNRESPONSIVE, "first probe unanswered");
            Err(format!("{addr}: the first probe got no answer"))
        }
    }
}

/// The address of `advertise` (`host:port`), of the family the local socket can reach.
async fn resolve(advertise: &str, local: Option<SocketAddr>) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(advertise)
        .await
        .map_err(|e| format!("resolving {advertise}: {e}"))?
        .collect();
    let v4 = local.is_none_or(|l| l.is_ipv4());
    addrs
        .iter()
        .find(|a| a.is_ipv4() == v4)
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{advertise} resolves to no address"))
}
