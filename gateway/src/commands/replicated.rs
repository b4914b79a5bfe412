//! Feature layer: the commands feature across replicas (`store.dsn`), on the PostgreSQL state
//! in `cluster::commands` and `cluster::lease`.
//!
//! Any replica takes Submits, Gets, Lists, Cancels and Watches; exactly one delivers an agent's
//! commands: the holder of the agent's *lease*, taken by a replica that holds a session with the
//! agent when the lease is free or its holder is not alive. The holder keeps the agent's
//! unfinished commands in its lanes (the same lanes as the embedded mode) and writes every
//! transition through [`Replicated::write`], which lands only while the lease is still its own
//! (the epoch fence) and the stored command is older and not final: a replica that was taken over
//! stops at its first write, and a Cancel or an expiry that won a race is never undone.
//!
//! Versions only grow across holders: a holder that took the lease at lease epoch `E` numbers
//! its writes from `E << 32`, above anything an earlier holder wrote or published, so every
//! replica's watchers order one command's events by version alone and drop what they saw.
//!
//! What other replicas did arrives on the cluster feed: a Submit for an agent whose lease is
//! held here enters its lane; a Cancel or an expiry made elsewhere leaves it; every change is
//! published to this replica's watchers once.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tunnel_proto::AgentId;

use super::Commands;
use super::record::{CommandRecord, CommandState};
use super::state::lock;
use super::store::StoreError;
use crate::cluster::Cluster;
use crate::cluster::commands::{self as pg, Write, Written};
use crate::cluster::events::{EventKind, FeedItem};
use crate::cluster::lease::{self, Lease};
use crate::cluster::replica::Liveness;
use crate::tunnel::registry::RegistryEvent;

/// Writer tasks: one agent's writes go through one of them, in order; agents spread over all.
const WRITERS: usize = 8;
/// Tasks storing Submits, each a batch (one transaction) at a time.
const SUBMITTERS: usize = 1;
/// Submits stored in one transaction at most.
const SUBMIT_BATCH: usize = 256;
/// Writes of one writer applied in one transaction at most.
const WRITE_BATCH: usize = 64;
/// How often this replica looks for agents it holds a session with whose lease nobody alive
/// holds (a session's arrival and a Submit's event look at once).
const ORPHAN_SWEEP: Duration = Duration::from_secs(1);
/// Agents taken per sweep at most.
const ORPHANS_PER_SWEEP: i64 = 500;
/// How long Cancel waits for a command stored `DELIVERED` to be acknowledged or to wait for
/// approval (see `cancel_replicated`).
const DELIVERY_SETTLES: Duration = Duration::from_secs(3);

/// Queued commands expired per pass at most.
const EXPIRE_BATCH: i64 = 1000;

/// A holder's version for its first write under lease epoch `epoch`: above every version
/// written under an earlier epoch.
pub(super) fn version_floor(epoch: i64) -> u64 {
    u64::try_from(epoch).unwrap_or(0) << 32
}

/// A Submit waiting for its batch.
struct Queued {
    cmd: CommandRecord,
    limit: u32,
    done: oneshot::Sender<Result<pg::Submitted, String>>,
}

pub(super) struct Pending {
    cmd: CommandRecord,
    done: Option<oneshot::Sender<()>>,
}

/// This replica's part in the commands feature across replicas.
pub(crate) struct Replicated {
    pub(super) cluster: Arc<Cluster>,
    /// Leases held here, by agent.
    leases: Mutex<HashMap<AgentId, Lease>>,
    writers: Vec<mpsc::UnboundedSender<Pending>>,
    /// Wakes the orphan sweep (a session arrived).
    sweep: Notify,
    /// Commands submitted here for an agent whose lease this replica holds, with their
    /// payloads, until the feed brings their event: the lane takes them in the feed's (commit)
    /// order, so a Submit acknowledged on another replica before this one was sent runs first,
    /// and without reading the payload back.
    submitted_here: Mutex<HashMap<String, CommandRecord>>,
    /// Submits waiting to be stored (see [`run_submitter`]).
    submits: mpsc::UnboundedSender<Queued>,
}

/// Commands kept in [`Replicated::submitted_here`] at most (a feed that lags that far is
/// caught up by reading the store).
const SUBMITTED_HERE_MAX: usize = 10_000;

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("replica", self.cluster.replica.id())
            .finish_non_exhaustive()
    }
}

fn shard(agent: &AgentId) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    agent.hash(&mut h);
    (h.finish() as usize) % WRITERS
}

pub(super) fn sql(e: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("PostgreSQL: {e}"))
}

impl Replicated {
    /// The replica's writers and feed follower, delivering for `commands`.
    pub(super) fn new(
        cluster: Arc<Cluster>,
    ) -> (Arc<Replicated>, Vec<mpsc::UnboundedReceiver<Pending>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..WRITERS).map(|_| mpsc::unbounded_channel()).unzip();
        let (submits, queued) = mpsc::unbounded_channel();
        let queued = Arc::new(tokio::sync::Mutex::new(queued));
        for _ in 0..SUBMITTERS {
            tokio::spawn(run_submitter(cluster.pool.clone(), queued.clone()));
        }
        let r = Arc::new(Replicated {
            cluster,
            leases: Mutex::new(HashMap::new()),
            writers: txs,
            sweep: Notify::new(),
            submitted_here: Mutex::new(HashMap::new()),
            submits,
        });
        (r, rxs)
    }

    fn lease_of(&self, agent: &AgentId) -> Option<Lease> {
        lock(&self.leases).get(agent).cloned()
    }

    /// True when this replica delivers `agent`'s commands.
    pub(super) fn holds(&self, agent: &AgentId) -> bool {
        self.lease_of(agent).is_some()
    }

    /// Queues a holder's write; the future resolves once it was applied or refused.
    pub(super) fn write(
        &self,
        cmd: CommandRecord,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let _ = self.writers[shard(&cmd.agent)].send(Pending {
            cmd,
            done: Some(tx),
        });
        async move {
            let _ = rx.await;
        }
    }
}

impl Commands {
    /// Starts the writers, the feed follower, the orphan sweep, expiry and retention of the
    /// replicated mode.
    pub(super) fn start_replicated_tasks(
        self: &Arc<Self>,
        r: &Arc<Replicated>,
        writers: Vec<mpsc::UnboundedReceiver<Pending>>,
    ) {
        for rx in writers {
            tokio::spawn(run_writer(Arc::downgrade(self), r.clone(), rx));
        }
        tokio::spawn(self.clone().follow(r.clone()));
        tokio::spawn(self.clone().take_orphans(r.clone()));
        tokio::spawn(self.clone().expire_replicated(r.clone()));
    }

    /// Takes `agent`'s lease if nobody alive holds it, and puts its unfinished commands into
    /// lanes here. Does nothing while this replica is not alive.
    async fn take_lease(self: &Arc<Self>, r: &Arc<Replicated>, agent: &AgentId) {
        if r.holds(agent) || !r.cluster.replica.is_live() {
            return;
        }
        let me = r.cluster.replica.id().clone();
        let name = agent.to_string();
        let lease = match lease::acquire(&r.cluster.pool, &me, &name, agent.tenant()).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%agent, error = %e, "taking the command lease failed; the sweep retries");
                return;
            }
        };
        let cmds = match pg::unfinished(&r.cluster.pool, agent).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%agent, error = %e, "loading the agent's commands failed; releasing its lease");
                let _ = lease::release(&r.cluster.pool, &me, &[lease]).await;
                return;
            }
        };
        let floor = version_floor(lease.epoch);
        {
            let mut leases = lock(&r.leases);
            leases.insert(agent.clone(), lease);
            metrics::gauge!("tether_gateway_command_leases").set(leases.len() as f64);
        }
        // The agent's last session here may have ended while the lease was being taken (its
        // release then found no lease): a lease without a session would keep the agent's
        // commands from every replica that has one.
        if self.registry.last_session(agent).is_none() {
            self.release_lease(r, agent).await;
            return;
        }
        let n = cmds.len();
        for mut cmd in cmds {
            cmd.version = cmd.version.max(floor);
            self.adopt(cmd);
        }
        if n > 0 {
            tracing::info!(%agent, commands = n, "holding the agent's command lease");
        }
    }

    /// Stops delivering `agent`'s commands here: its lease was released or taken over. Its
    /// commands leave memory without a state change (the store keeps them for the next holder).
    fn drop_agent(&self, r: &Replicated, agent: &AgentId) {
        {
            let mut leases = lock(&r.leases);
            leases.remove(agent);
            metrics::gauge!("tether_gateway_command_leases").set(leases.len() as f64);
        }
        self.state
            .agents
            .run(agent, |st| self.state.forget(st, &self.state.agents));
    }

    /// Releases `agent`'s lease (its last session here ended) so a replica that has one takes
    /// it at once.
    async fn release_lease(&self, r: &Replicated, agent: &AgentId) {
        let Some(lease) = r.lease_of(agent) else {
            return;
        };
        self.drop_agent(r, agent);
        let me = r.cluster.replica.id().clone();
        if let Err(e) = lease::release(&r.cluster.pool, &me, &[lease]).await {
            tracing::warn!(%agent, error = %e, "releasing the command lease failed; it lapses with this replica");
        }
    }

    /// Puts every unfinished command of the agents held here into its lane (those missing: a
    /// Submit whose feed event this replica missed).
    async fn reload_held(self: &Arc<Self>, r: &Replicated) {
        let held: Vec<(AgentId, Lease)> = lock(&r.leases)
            .iter()
            .map(|(a, l)| (a.clone(), l.clone()))
            .collect();
        for (agent, lease) in held {
            match pg::unfinished(&r.cluster.pool, &agent).await {
                Ok(cmds) => {
                    for mut cmd in cmds {
                        cmd.version = cmd.version.max(version_floor(lease.epoch));
                        self.adopt(cmd);
                    }
                }
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "reloading the agent's commands failed; the next resync retries")
                }
            }
        }
    }

    /// Drops the leases (all, or `only`'s) that PostgreSQL says another replica holds now.
    async fn verify_leases(&self, r: &Replicated, only: Option<&AgentId>) {
        let agents: Vec<AgentId> = match only {
            Some(a) => vec![a.clone()],
            None => lock(&r.leases).keys().cloned().collect(),
        };
        let me = r.cluster.replica.id().clone();
        for agent in agents {
            match lease::holder(&r.cluster.pool, &agent.to_string()).await {
                Ok(Some((holder, _))) if holder == me => {}
                Ok(_) => {
                    tracing::info!(%agent, "another replica holds this agent's command lease now; delivering its commands stops here");
                    self.drop_agent(r, &agent);
                }
                // The first write will tell (it is fenced).
                Err(e) => tracing::warn!(%agent, error = %e, "checking a command lease failed"),
            }
        }
    }

    /// Reads the cluster feed and the registry: other replicas' Submits, Cancels and expiries,
    /// lease changes, and this replica's sessions coming and going.
    async fn follow(self: Arc<Self>, r: Arc<Replicated>) {
        let mut feed = r.cluster.feed.subscribe();
        let mut sessions = self.registry.feed();
        let mut liveness = r.cluster.replica.watch();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                changed = liveness.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // Live again after a lapse (PostgreSQL unreachable, the process paused; the
                    // lapse itself may not be seen, only that the liveness changed): other
                    // replicas may have taken leases meanwhile.
                    let live = *liveness.borrow_and_update() == Liveness::Live;
                    if live {
                        self.verify_leases(&r, None).await;
                    }
                }
                ev = feed.recv() => match ev {
                    Ok(FeedItem::Event(ev)) => self.on_feed(&r, ev.kind, &ev.agent, &ev.body).await,
                    Ok(FeedItem::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Events may be gone: Submits for the agents held here are read from
                        // the store, and the sweep finds agents with work again.
                        self.reload_held(&r).await;
                        r.sweep.notify_one();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                ev = sessions.recv() => match ev {
                    Ok(RegistryEvent::Connected(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        r.sweep.notify_one();
                    }
                    Ok(RegistryEvent::Disconnected { session, .. }) => {
                        if self.registry.last_session(&session.agent).is_none() {
                            self.release_lease(&r, &session.agent).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        // Shutting down: hand every lease over at once instead of after the liveness timeout.
        let leases: Vec<Lease> = lock(&r.leases).drain().map(|(_, l)| l).collect();
        let me = r.cluster.replica.id().clone();
        if let Err(e) = lease::release(&r.cluster.pool, &me, &leases).await {
            tracing::warn!(error = %e, leases = leases.len(), "releasing command leases at shutdown failed; they lapse with this replica");
        }
    }

    async fn on_feed(
        self: &Arc<Self>,
        r: &Arc<Replicated>,
        kind: EventKind,
        agent: &str,
        body: &[u8],
    ) {
        if kind == EventKind::Command {
            match pg::decode_event(body) {
                Ok(cmd) => self.on_command_event(r, cmd).await,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "a command event on the cluster feed did not decode; ignored");
                }
            }
            return;
        }
        if kind != EventKind::Lease {
            return;
        }
        let Ok(agent) = agent.parse::<AgentId>() else {
            tracing::warn!(%agent, "a lease event on the cluster feed names no agent; ignored");
            return;
        };
        if r.holds(&agent) {
            // Taken by someone else while this replica believed it held it (it was paused or
            // cut off longer than its liveness).
            self.verify_leases(r, Some(&agent)).await;
        } else if self.registry.last_session(&agent).is_some() {
            // A lease was released or taken: this replica has a session, it may take it.
            self.take_lease(r, &agent).await;
        }
    }

    async fn on_command_event(self: &Arc<Self>, r: &Arc<Replicated>, cmd: CommandRecord) {
        let id = cmd.id.clone();
        let agent = cmd.agent.clone();
        // Watchers first: this replica's own changes were published when made.
        self.state.publish(Arc::new(cmd.view()));
        if !r.holds(&agent) {
            if cmd.state == CommandState::Queued && self.registry.last_session(&agent).is_some() {
                self.take_lease(r, &agent).await;
            }
            return;
        }
        let active = self
            .state
            .agents
            .run(&agent, |st| {
                if !st.active.contains_key(&id) {
                    return false;
                }
                if cmd.is_final() {
                    // Cancelled or expired by another replica.
                    self.state.change(st, &id, cmd.state, false, |c| {
                        c.finished = cmd.finished;
                        c.result = cmd.result.clone();
                        c.version = c.version.max(cmd.version);
                    });
                }
                true
            })
            .unwrap_or(false);
        if active || cmd.state != CommandState::Queued {
            return;
        }
        let here = lock(&r.submitted_here).remove(&id);
        if let Some(mut own) = here {
            if let Some(l) = r.lease_of(&agent) {
                own.version = own.version.max(version_floor(l.epoch));
            }
            self.adopt(own);
            return;
        }
        // Submitted on another replica: into its lane, with its payload.
        match pg::get(&r.cluster.pool, &id).await {
            Ok(Some(mut full)) if full.state == CommandState::Queued && r.holds(&agent) => {
                if let Some(l) = r.lease_of(&agent) {
                    full.version = full.version.max(version_floor(l.epoch));
                }
                self.adopt(full);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(command = %id, error = %e, "loading a command submitted on another replica failed; the sweep retries");
                self.release_lease(r, &agent).await;
            }
        }
    }

    /// Takes the leases nobody alive holds of agents this replica has a session with, every
    /// [`ORPHAN_SWEEP`] and whenever a session arrives: how a replica's death hands its agents'
    /// commands over, and how work submitted while no session existed starts.
    async fn take_orphans(self: Arc<Self>, r: Arc<Replicated>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(ORPHAN_SWEEP) => {}
                _ = r.sweep.notified() => {}
            }
            if !r.cluster.replica.is_live() {
                continue;
            }
            let me = r.cluster.replica.id().clone();
            let agents = match pg::orphaned(&r.cluster.pool, &me, ORPHANS_PER_SWEEP).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "looking for agents whose command lease is free failed; will retry");
                    continue;
                }
            };
            for agent in agents {
                self.take_lease(&r, &agent).await;
            }
        }
    }

    /// Expires queued commands past their TTL, whoever holds their agent (conditional on the
    /// command still being queued, so replicas racing here expire each once).
    async fn expire_replicated(self: Arc<Self>, r: Arc<Replicated>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(super::SWEEP_EVERY) => {}
            }
            if !r.cluster.replica.is_live() {
                continue;
            }
            let now_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            match pg::expire_due(&r.cluster.pool, now_ms, EXPIRE_BATCH).await {
                Ok(done) => {
                    metrics::counter!("tether_gateway_command_expirations_total")
                        .increment(done.len() as u64);
                }
                Err(e) => tracing::warn!(error = %e, "expiring queued commands failed; will retry"),
            }
        }
    }
}

/// Applies one writer's queue: each agent's writes in order, in batches, fenced by its lease.
async fn run_writer(
    commands: Weak<Commands>,
    r: Arc<Replicated>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        // Group by agent, keeping each agent's order.
        let mut by_agent: Vec<(AgentId, Vec<Pending>)> = Vec::new();
        for p in batch.drain(..) {
            match by_agent.iter_mut().find(|(a, _)| *a == p.cmd.agent) {
                Some((_, v)) => v.push(p),
                None => by_agent.push((p.cmd.agent.clone(), vec![p])),
            }
        }
        // Each agent under the lease held now; the others are not ours any more (the new
        // holder redelivers).
        let mut groups: Vec<(AgentId, Lease, Vec<Write>, Vec<Pending>)> = Vec::new();
        for (agent, pending) in by_agent {
            match r.lease_of(&agent) {
                Some(lease) => {
                    let writes = pending
                        .iter()
                        .map(|p| Write {
                            record: p.cmd.clone(),
                        })
                        .collect();
                    groups.push((agent, lease, writes, pending));
                }
                None => metrics::counter!("tether_gateway_fenced_writes_total")
                    .increment(pending.len() as u64),
            }
        }
        if groups.is_empty() {
            continue;
        }
        let me = r.cluster.replica.id().clone();
        // One transaction for the whole batch, every agent's writes in their order.
        let outcome = loop {
            let args: Vec<(&Lease, &[Write])> = groups
                .iter()
                .map(|(_, l, w, _)| (l, w.as_slice()))
                .collect();
            match pg::write_many(&r.cluster.pool, &me, &args).await {
                Ok(o) => break o,
                Err(e) => {
                    // PostgreSQL unreachable: keep the order and try again; the lease lapses
                    // with this replica's liveness if it stays so, and the fence then refuses
                    // these writes.
                    tracing::warn!(agents = groups.len(), error = %e, "writing command state failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    groups.retain(|(a, ..)| r.lease_of(a).is_some());
                    if groups.is_empty() {
                        break Vec::new();
                    }
                }
            }
        };
        let Some(commands) = commands.upgrade() else {
            return;
        };
        for ((agent, _, _, pending), written) in groups.into_iter().zip(outcome) {
            let mut conflicts = HashSet::new();
            let mut fenced = false;
            for (p, w) in pending.iter().zip(&written) {
                match w {
                    Written::Ok => {}
                    Written::Conflict => {
                        conflicts.insert(p.cmd.id.clone());
                    }
                    Written::Fenced => fenced = true,
                }
            }
            if fenced {
                tracing::warn!(%agent, "another replica took this agent's command lease; delivering its commands stops here");
                commands.drop_agent(&r, &agent);
            }
            for id in conflicts {
                commands.reconcile(&r, &id).await;
            }
            for mut p in pending {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl Commands {
    /// A holder's write was refused though it holds the lease: the command was cancelled or
    /// expired elsewhere first. Takes the stored state.
    async fn reconcile(&self, r: &Replicated, id: &str) {
        let stored = match pg::get(&r.cluster.pool, id).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(command = %id, error = %e, "reloading a command after a refused write failed");
                return;
            }
        };
        if !stored.is_final() {
            return;
        }
        self.state.agents.run(&stored.agent, |st| {
            self.state.change(st, id, stored.state, false, |c| {
                c.finished = stored.finished;
                c.result = stored.result.clone();
                c.version = c.version.max(stored.version);
            })
        });
    }
}

impl Commands {
    /// Stores a Submit in PostgreSQL (idempotency key and pending limit checked there, across
    /// replicas); the agent's lease holder delivers it, this replica if it holds a session.
    pub(super) async fn submit_replicated(
        self: &Arc<Self>,
        r: &Arc<Replicated>,
        mut cmd: CommandRecord,
        limit: u32,
    ) -> Result<(CommandRecord, bool), super::CommandError> {
        let created = cmd.created.unwrap_or_else(SystemTime::now);
        cmd.id = super::store::fresh_id(created);
        cmd.version = 1;
        let agent = cmd.agent.clone();
        // Kept before the write, so its feed event (which may come back before the write
        // returns) finds it.
        let holding = r.holds(&agent);
        if holding {
            let mut here = lock(&r.submitted_here);
            if here.len() >= SUBMITTED_HERE_MAX {
                here.clear();
            }
            here.insert(cmd.id.clone(), cmd.clone());
        }
        let (done, stored) = oneshot::channel();
        let _ = r.submits.send(Queued {
            cmd: cmd.clone(),
            limit,
            done,
        });
        let out = stored
            .await
            .unwrap_or_else(|_| Err("the gateway is shutting down".to_owned()));
        if holding && !matches!(out, Ok(pg::Submitted::Created(_))) {
            lock(&r.submitted_here).remove(&cmd.id);
        }
        let out = out.map_err(|e| {
            super::CommandError::Unavailable(format!(
                "storing the command in PostgreSQL failed: {e}; retry"
            ))
        })?;
        match out {
            pg::Submitted::Existing(c) => Ok((c, false)),
            pg::Submitted::TooManyPending { .. } => {
                crate::metrics::count_rejection(crate::metrics::Limit::PendingCommandsPerAgent);
                Err(super::CommandError::TooManyPending { agent, limit })
            }
            pg::Submitted::Created(c) => {
                self.state.publish(Arc::new(c.view()));
                // Held here: into the lane when the feed brings it (see `submitted_here`).
                // Else, with a session to the agent, this replica may take the lease.
                if !holding && !r.holds(&agent) && self.registry.last_session(&agent).is_some() {
                    let this = self.clone();
                    let r = r.clone();
                    tokio::spawn(async move { this.take_lease(&r, &agent).await });
                }
                r.cluster.feed.poke();
                Ok((c, true))
            }
        }
    }

    /// Cancels a queued command in PostgreSQL, whoever holds its agent (the holder's delivery
    /// write then conflicts, and the holder takes the cancelled state).
    pub(super) async fn cancel_replicated(
        &self,
        r: &Replicated,
        id: &str,
    ) -> Result<CommandRecord, super::CommandError> {
        // A command stored DELIVERED may be waiting for its owner's approval already, its
        // holder's write of that still on its way (a `Get` at the holder shows it first): a
        // delivery is acknowledged (RUNNING) or waits (AWAITING_APPROVAL, cancellable) within
        // moments, so Cancel waits that long for it to settle before saying it is too late.
        let settles = std::time::Instant::now() + DELIVERY_SETTLES;
        let cancelled = loop {
            match pg::cancel(&r.cluster.pool, id, SystemTime::now())
                .await
                .map_err(sql)?
            {
                Err(pg::NotCancelled::TooLate(c))
                    if c.state == CommandState::Delivered
                        && std::time::Instant::now() < settles =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        match cancelled {
            Ok(cmd) => {
                let view = Arc::new(cmd.view());
                let held = self.state.agents.run(&cmd.agent, |st| {
                    self.state
                        .change(st, id, CommandState::Cancelled, false, |c| {
                            c.finished = cmd.finished;
                            c.result = cmd.result.clone();
                            c.version = c.version.max(cmd.version);
                        });
                    // Under the agent's lock, as its own transitions are.
                    self.state.publish(view.clone());
                });
                if held.is_none() {
                    self.state.publish(view);
                }
                r.cluster.feed.poke();
                Ok(cmd)
            }
            Err(pg::NotCancelled::NotFound) => Err(super::CommandError::NotFound(id.to_owned())),
            Err(pg::NotCancelled::TooLate(c)) => Err(super::CommandError::TooLate {
                id: id.to_owned(),
                state: c.state,
            }),
        }
    }
}

/// Stores queued Submits, as many as are waiting (up to [`SUBMIT_BATCH`]) per transaction:
/// concurrent Submits share one commit (see `cluster::commands::submit_batch`).
async fn run_submitter(
    pool: sqlx::PgPool,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>>,
) {
    let mut batch = Vec::with_capacity(SUBMIT_BATCH);
    loop {
        let n = queue.lock().await.recv_many(&mut batch, SUBMIT_BATCH).await;
        if n == 0 {
            return;
        }
        // One batch's limit: they are all the configured limit (it changes only at start).
        let limit = batch.iter().map(|q| q.limit).min().unwrap_or(u32::MAX);
        let cmds: Vec<CommandRecord> = batch.iter().map(|q| q.cmd.clone()).collect();
        match pg::submit_batch(&pool, &cmds, limit).await {
            Ok(outcomes) => {
                for (q, o) in batch.drain(..).zip(outcomes) {
                    let _ = q.done.send(Ok(o));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for q in batch.drain(..) {
                    let _ = q.done.send(Err(e.clone()));
                }
            }
        }
    }
}
