//! Feature layer: the northbound gRPC API (`tether.v1.Agents`) over TLS.
//!
//! Callers are authenticated before they get here (`auth::Authenticated`); each method checks
//! the tenants of what it touches against the caller's scope: `List` and `Watch` show only the
//! caller's tenants, and naming another tenant or its agent is `PERMISSION_DENIED` whether or
//! not the agent exists.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tether_api::v1;
use tether_api::v1::agents_server::{Agents, AgentsServer};
use tether_runtime::CancellationToken;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tunnel_proto::AgentId;

pub use crate::northbound::auth::Caller;
use crate::northbound::auth::caller;
use crate::tunnel::registry::{AgentSnapshot, Registry, RegistryEvent, SessionInfo};

/// Checks that the request was authenticated (by `auth::Authenticated`, which wraps every
/// northbound service); usable as a tonic interceptor.
pub fn authenticate(_trust_domain: &str, req: Request<()>) -> Result<Request<()>, Status> {
    caller(&req)?;
    Ok(req)
}

/// `tether.v1.Agents`.
#[derive(Debug, Clone)]
pub struct AgentsApi {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    identity: Option<Arc<crate::identity::db::IdentityDb>>,
}

impl AgentsApi {
    /// Serves from `registry`; watches end when `shutdown` is cancelled.
    pub fn new(registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        AgentsApi {
            registry,
            shutdown,
            identity: None,
        }
    }

    /// Serves `Revoke` with revocations stored in `identity` (without it: UNIMPLEMENTED).
    pub fn with_identity(mut self, identity: Arc<crate::identity::db::IdentityDb>) -> Self {
        self.identity = Some(identity);
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
    }
}

fn agent_proto(a: &AgentSnapshot) -> v1::Agent {
    v1::Agent {
        id: a.id.to_string(),
        tenant: a.id.tenant().to_owned(),
        name: a.id.agent().to_owned(),
        connected: !a.sessions.is_empty(),
        sessions: a.sessions.iter().map(|s| session_proto(s)).collect(),
        last_seen: Some(ts(a.last_seen)),
    }
}

fn parse_agent(s: &str) -> Result<AgentId, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("agent: {e}")))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::AgentEvent, Status>> + Send>>;

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
        let agents = self
            .registry
            .list()
            .iter()
            .filter(|a| caller.may_act_for(a.id.tenant()))
            .filter(|a| r.tenant.is_empty() || a.id.tenant() == r.tenant)
            .filter(|a| !r.connected_only || !a.sessions.is_empty())
            .map(agent_proto)
            .collect();
        Ok(Response::new(v1::ListAgentsResponse { agents }))
    }

    async fn get(&self, req: Request<v1::GetAgentRequest>) -> Result<Response<v1::Agent>, Status> {
        let caller = caller(&req)?;
        let id = parse_agent(&req.get_ref().agent)?;
        // Before the lookup: another tenant's agent is denied whether or not it exists.
        caller.authorize("tether.v1.Agents/Get", &id)?;
        match self.registry.get(&id) {
            Some(a) => Ok(Response::new(agent_proto(&a))),
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
        let tenant = r.tenant;
        let wanted = move |s: &SessionInfo| {
            caller.may_act_for(s.agent.tenant())
                && (tenant.is_empty() || s.agent.tenant() == tenant)
                && only_agent.as_ref().is_none_or(|a| *a == s.agent)
        };
        let (live, mut feed) = self.registry.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
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
