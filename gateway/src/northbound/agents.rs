//! Feature layer: the northbound gRPC API (`tether.v1.Agents`) over TLS.
//!
//! Callers are authenticated before they get here (`auth::Authenticated`); each method checks
//! the tenants of what it touches against the caller's scope: `List` and `Watch` show only the
//! caller's tenants, and naming another tenant or its agent is `PERMISSION_DENIED` whether or
//! not the agent exists.
//!
//! On the embedded store the answers come from this gateway's registry. With replicas
//! (`store.dsn`) they come from the cluster's presence in PostgreSQL, so any replica answers
//! for the whole fleet: `List` and `Get` read the sessions of live replicas (a replica whose
//! liveness expired vanishes from the answers at once), each session naming its `replica`;
//! `Watch` starts from them and follows the cluster feed's session events.
//!
//! `Watch` streams are capped per caller (`limits.agent_watches_per_caller`): each holds a
//! task and a subscription for as long as it is open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prost::Message as _;
use sqlx::PgPool;
use tether_api::v1;
use tether_api::v1::agents_server::{Agents, AgentsServer};
use tether_runtime::CancellationToken;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tunnel_proto::AgentId;

use crate::cluster::events::{EventFeed, EventKind, FeedItem};
use crate::cluster::presence::{self, SessionFilter};
use crate::identity::store::IdentityStore;
use crate::metrics::{Limit, count_rejection};
pub use crate::northbound::auth::Caller;
use crate::northbound::auth::caller;
use crate::relay::outcomes::CallOutcomes;
use crate::tunnel::registry::{AgentSnapshot, Registry, RegistryEvent, SessionInfo};

/// Checks that the request was authenticated (by `auth::Authenticated`, which wraps every
/// northbound service); usable as a tonic interceptor.
pub fn authenticate(_trust_domain: &str, req: Request<()>) -> Result<Request<()>, Status> {
    caller(&req)?;
    Ok(req)
}

/// The cluster's view of the fleet (PostgreSQL mode).
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Presence lives there.
    pub pool: PgPool,
    /// Session events of every replica.
    pub feed: Arc<EventFeed>,
}

/// `tether.v1.Agents`.
#[derive(Debug, Clone)]
pub struct AgentsApi {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    identity: Option<IdentityStore>,
    fleet: Option<Fleet>,
    watches: Arc<WatchCount>,
    /// Relayed calls and bytes per agent, counted by this gateway's relay.
    traffic: Option<Arc<CallOutcomes>>,
}

/// Open `Agents/Watch` streams per caller.
#[derive(Debug)]
struct WatchCount {
    limit: u32,
    open: Mutex<HashMap<String, u32>>,
}

/// One open watch of a caller; given back when dropped.
struct WatchSlot {
    count: Arc<WatchCount>,
    key: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.count.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl WatchCount {
    fn take(self: &Arc<Self>, caller: &Caller) -> Result<WatchSlot, Status> {
        // Names are unique per kind: a certificate's `<name>` and a token's `sub` may coincide.
        let key = format!("{}:{}", caller.kind.as_str(), caller.name);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.get(&key).copied().unwrap_or(0);
        if n >= self.limit {
            drop(open);
            count_rejection(Limit::AgentWatchesPerCaller);
            return Err(Status::resource_exhausted(format!(
                "caller {:?} has {} agent watches open, the limit (limits.agent_watches_per_caller); end one before opening another",
                caller.name, self.limit
            )));
        }
        open.insert(key.clone(), n + 1);
        Ok(WatchSlot {
            count: self.clone(),
            key,
        })
    }
}

impl AgentsApi {
    /// Serves from `registry`; watches end when `shutdown` is cancelled.
    pub fn new(registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        AgentsApi {
            registry,
            shutdown,
            identity: None,
            fleet: None,
            traffic: None,
            watches: Arc::new(WatchCount {
                limit: u32::MAX,
                open: Mutex::default(),
            }),
        }
    }

    /// Serves `Revoke` with revocations stored in `identity` (without it: UNIMPLEMENTED).
    pub fn with_identity(mut self, identity: impl Into<IdentityStore>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Answers `List`, `Get` and `Watch` for the whole fleet from the cluster's presence.
    pub fn with_fleet(mut self, fleet: Fleet) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Answers with the relayed calls and bytes `traffic` counts (the relay's), per agent.
    pub fn with_traffic(mut self, traffic: Arc<CallOutcomes>) -> Self {
        self.traffic = Some(traffic);
        self
    }

    /// Fills in what this gateway relayed to `a`.
    fn count(&self, mut a: v1::Agent) -> v1::Agent {
        if let Some(t) = &self.traffic {
            let t = t.traffic(&a.id);
            a.relayed_calls = t.calls();
            a.relayed_bytes_to_agent = t.bytes_to_agent;
            a.relayed_bytes_from_agent = t.bytes_from_agent;
        }
        a
    }

    /// At most `limit` open `Watch` streams per caller (`limits.agent_watches_per_caller`).
    pub fn with_watch_limit(mut self, limit: u32) -> Self {
        self.watches = Arc::new(WatchCount {
            limit,
            open: Mutex::default(),
        });
        self
    }

    /// The tonic service (callers are authenticated by `auth::Authenticated` around it).
    pub fn into_service(self) -> AgentsServer<AgentsApi> {
        AgentsServer::new(self)
    }
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// The API view of a session.
pub fn session_proto(s: &SessionInfo) -> v1::Session {
    v1::Session {
        session_id: s.session_id.clone(),
        agent: s.agent.to_string(),
        remote_addr: s.remote.to_string(),
        transport: s.transport.to_owned(),
        connected_at: Some(ts(s.connected_at)),
        agent_version: s.hello.agent_version.clone(),
        labels: s.hello.labels.clone().into_iter().collect(),
        capabilities: s.hello.capabilities.clone(),
        rtt: s
            .rtt()
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        instance_id: s.hello.instance_id.clone(),
        protocol_version: s.version,
        certificate_expires: Some(ts(s.cert_not_after)),
        replica: String::new(),
        version_skew: crate::tunnel::version::skew(
            crate::tunnel::version::gateway_version(),
            &s.hello.agent_version,
        ) as i32,
        paused: s.pause().is_some(),
        pause_reason: s.pause().unwrap_or_default(),
        proxy: match hello_proxy(s.hello.proxy) {
            tunnel_proto::message::Proxy::Unknown => v1::ProxyUse::ProxyUnspecified,
            tunnel_proto::message::Proxy::Direct => v1::ProxyUse::ProxyDirect,
            tunnel_proto::message::Proxy::Http => v1::ProxyUse::ProxyHttp,
        } as i32,
        services: s
            .services()
            .iter()
            .map(|e| v1::AgentService {
                name: e.name.clone(),
                kind: e.kind.clone(),
            })
            .collect(),
        sessions_wanted: s.sessions_wanted,
    }
}

/// The `Hello`'s proxy field (an unknown value from a newer agent: unknown).
fn hello_proxy(p: i32) -> tunnel_proto::message::Proxy {
    tunnel_proto::message::Proxy::try_from(p).unwrap_or(tunnel_proto::message::Proxy::Unknown)
}

fn agent_proto(a: &AgentSnapshot) -> v1::Agent {
    v1::Agent {
        id: a.id.to_string(),
        tenant: a.id.tenant().to_owned(),
        name: a.id.agent().to_owned(),
        connected: !a.sessions.is_empty(),
        sessions: a.sessions.iter().map(|s| session_proto(s)).collect(),
        last_seen: Some(ts(a.last_seen)),
        paused: a.sessions.iter().any(|s| s.pause().is_some()),
        // Filled in by `AgentsApi::count`.
        ..Default::default()
    }
}

fn parse_agent(s: &str) -> Result<AgentId, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("agent: {e}")))
}

fn cluster_unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "the cluster's state (PostgreSQL) cannot be read: {e}; retry, or ask the gateway's operator"
    ))
}

/// The agents the cluster knows matching `filter`, with their sessions on live replicas, by
/// id.
async fn fleet_agents(pool: &PgPool, filter: &SessionFilter) -> Result<Vec<v1::Agent>, Status> {
    let started = std::time::Instant::now();
    let known = presence::agents(pool, filter)
        .await
        .map_err(cluster_unavailable)?;
    let sessions = presence::sessions(pool, filter)
        .await
        .map_err(cluster_unavailable)?;
    crate::cluster::record_store_latency("presence_read", started.elapsed());
    let mut by_agent: BTreeMap<String, v1::Agent> = BTreeMap::new();
    for (id, last_seen) in known {
        let (tenant, name) = id.split_once('/').unwrap_or((&id, ""));
        by_agent.insert(
            id.clone(),
            v1::Agent {
                id: id.clone(),
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                connected: false,
                sessions: Vec::new(),
                last_seen: Some(ts(last_seen)),
                // Set from its sessions below.
                paused: false,
                ..Default::default()
            },
        );
    }
    for s in sessions {
        // A session's row and its agent's are written in one transaction: the agent is there.
        if let Some(a) = by_agent.get_mut(&s.agent) {
            a.connected = true;
            a.last_seen = Some(ts(SystemTime::now()));
            a.paused |= s.paused;
            a.sessions.push(s);
        }
    }
    Ok(by_agent.into_values().collect())
}

/// What one `Watch` wants to see.
struct WatchFilter {
    caller: Caller,
    tenant: String,
    agent: Option<AgentId>,
}

impl WatchFilter {
    fn wants(&self, agent: &str) -> bool {
        let tenant = agent.split_once('/').map_or(agent, |(t, _)| t);
        self.caller.may_act_for(tenant)
            && (self.tenant.is_empty() || tenant == self.tenant)
            && self.agent.as_ref().is_none_or(|a| a.to_string() == agent)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::AgentEvent, Status>> + Send>>;
type WatchTx = tokio::sync::mpsc::Sender<Result<v1::AgentEvent, Status>>;

/// Streams this gateway's registry: its sessions, then each connect and disconnect.
async fn watch_registry(
    registry: Arc<Registry>,
    filter: WatchFilter,
    tx: WatchTx,
    shutdown: CancellationToken,
) {
    let (live, mut feed) = registry.subscribe();
    let wanted = |s: &SessionInfo| filter.wants(&s.agent.to_string());
    for s in live.iter().filter(|s| wanted(s)) {
        let ev = v1::AgentEvent {
            kind: v1::agent_event::Kind::Connected as i32,
            agent: s.agent.to_string(),
            session: Some(session_proto(s)),
            time: Some(ts(s.connected_at)),
            reason: String::new(),
            initial: true,
        };
        if tx.send(Ok(ev)).await.is_err() {
            return;
        }
    }
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            ev = feed.recv() => ev,
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "watch fell {n} events behind; start a new watch"
                    ))))
                    .await;
                return;
            }
            Err(_) => return,
        };
        if !wanted(ev.session()) {
            continue;
        }
        let (kind, session, time, reason) = match ev {
            RegistryEvent::Connected(s) => {
                let at = s.connected_at;
                (v1::agent_event::Kind::Connected, s, at, String::new())
            }
            RegistryEvent::Disconnected {
                session,
                at,
                reason,
            } => (v1::agent_event::Kind::Disconnected, session, at, reason),
        };
        let msg = v1::AgentEvent {
            kind: kind as i32,
            agent: session.agent.to_string(),
            session: Some(session_proto(&session)),
            time: Some(ts(time)),
            reason,
            initial: false,
        };
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
    }
}

/// Streams the fleet: the sessions of live replicas, then the session events every replica
/// appends to the cluster feed.
async fn watch_fleet(fleet: Fleet, filter: WatchFilter, tx: WatchTx, shutdown: CancellationToken) {
    // Subscribed before the snapshot is read: an event in both is recognised by its session
    // id and not sent twice; none falls between.
    let mut feed = fleet.feed.subscribe();
    let query = SessionFilter {
        agent: filter.agent.as_ref().map(ToString::to_string),
        tenant: (!filter.tenant.is_empty()).then(|| filter.tenant.clone()),
    };
    let snapshot = match presence::sessions(&fleet.pool, &query).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(cluster_unavailable(e))).await;
            return;
        }
    };
    let mut initial: HashSet<String> = HashSet::new();
    for s in snapshot.into_iter().filter(|s| filter.wants(&s.agent)) {
        initial.insert(s.session_id.clone());
        let ev = v1::AgentEvent {
            kind: v1::agent_event::Kind::Connected as i32,
            agent: s.agent.clone(),
            time: s.connected_at,
            session: Some(s),
            reason: String::new(),
            initial: true,
        };
        if tx.send(Ok(ev)).await.is_err() {
            return;
        }
    }
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            item = feed.recv() => item,
        };
        let ev = match item {
            Ok(FeedItem::Event(ev)) => ev,
            Ok(FeedItem::Resync) => {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "this replica could not follow the cluster's events; start a new watch",
                    )))
                    .await;
                return;
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "watch fell {n} events behind; start a new watch"
                    ))))
                    .await;
                return;
            }
            Err(_) => return,
        };
        if !matches!(ev.kind, EventKind::SessionUp | EventKind::SessionDown)
            || !filter.wants(&ev.agent)
        {
            continue;
        }
        let Ok(msg) = v1::AgentEvent::decode(ev.body.as_ref()) else {
            continue;
        };
        let id = msg
            .session
            .as_ref()
            .map(|s| s.session_id.clone())
            .unwrap_or_default();
        let seen = match ev.kind {
            EventKind::SessionUp => initial.contains(&id),
            _ => {
                initial.remove(&id);
                false
            }
        };
        if seen {
            continue;
        }
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Agents for AgentsApi {
    async fn list(
        &self,
        req: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        if !r.tenant.is_empty() {
            caller.authorize_tenant("tether.v1.Agents/List", &r.tenant, "")?;
        }
        let agents: Vec<v1::Agent> = match &self.fleet {
            Some(fleet) => {
                let filter = SessionFilter {
                    agent: None,
                    tenant: (!r.tenant.is_empty()).then(|| r.tenant.clone()),
                };
                fleet_agents(&fleet.pool, &filter).await?
            }
            None => self.registry.list().iter().map(agent_proto).collect(),
        };
        let agents = agents
            .into_iter()
            .filter(|a| caller.may_act_for(&a.tenant))
            .filter(|a| r.tenant.is_empty() || a.tenant == r.tenant)
            .filter(|a| !r.connected_only || a.connected)
            .map(|a| self.count(a))
            .collect();
        Ok(Response::new(v1::ListAgentsResponse { agents }))
    }

    async fn get(&self, req: Request<v1::GetAgentRequest>) -> Result<Response<v1::Agent>, Status> {
        let caller = caller(&req)?;
        let id = parse_agent(&req.get_ref().agent)?;
        // Before the lookup: another tenant's agent is denied whether or not it exists.
        caller.authorize("tether.v1.Agents/Get", &id)?;
        let found = match &self.fleet {
            Some(fleet) => {
                let filter = SessionFilter {
                    agent: Some(id.to_string()),
                    tenant: None,
                };
                fleet_agents(&fleet.pool, &filter).await?.pop()
            }
            None => self.registry.get(&id).map(|a| agent_proto(&a)),
        };
        match found {
            Some(a) => Ok(Response::new(self.count(a))),
            None => Err(Status::not_found(format!(
                "agent {id} is not known to this gateway"
            ))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<v1::WatchAgentsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let only_agent = if r.agent.is_empty() {
            None
        } else {
            Some(parse_agent(&r.agent)?)
        };
        if let Some(a) = &only_agent {
            caller.authorize("tether.v1.Agents/Watch", a)?;
        }
        if !r.tenant.is_empty() {
            caller.authorize_tenant("tether.v1.Agents/Watch", &r.tenant, "")?;
        }
        let slot = self.watches.take(&caller)?;
        let filter = WatchFilter {
            caller,
            tenant: r.tenant,
            agent: only_agent,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let shutdown = self.shutdown.clone();
        let (registry, fleet) = (self.registry.clone(), self.fleet.clone());
        tokio::spawn(async move {
            // Held for as long as the stream is served.
            let _slot = slot;
            match fleet {
                Some(fleet) => watch_fleet(fleet, filter, tx, shutdown).await,
                None => watch_registry(registry, filter, tx, shutdown).await,
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn revoke(
        &self,
        req: Request<v1::RevokeAgentRequest>,
    ) -> Result<Response<v1::RevokeAgentResponse>, Status> {
        let Some(identity) = &self.identity else {
            return Err(Status::unimplemented("this gateway has no identity store"));
        };
        const METHOD: &str = "tether.v1.Agents/Revoke";
        let caller = caller(&req)?;
        let r = req.into_inner();
        let id = parse_agent(&r.agent)?;
        caller.authorize(METHOD, &id)?;
        tracing::info!(agent = %id, caller = %caller.name, "revocation requested");
        let done = crate::identity::revocation::revoke(&self.registry, identity, &id, &r.reason)
            .await
            .map_err(Status::from)?;
        caller.audit_allowed(METHOD, &id, &format!("revoked: {}", r.reason));
        Ok(Response::new(crate::identity::revocation::response(
            &id, &done,
        )))
    }
}
