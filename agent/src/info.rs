//! Feature layer: the agent's built-in `tether.agent.v1.AgentInfo` service, reachable through
//! the relay with `tether-service: agent`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tether_api::agent::v1::agent_info_server::{AgentInfo, AgentInfoServer};
use tether_api::agent::v1::{AgentInfoResponse, ConnectedGateway, GetAgentInfoRequest};
use tonic::{Request, Response, Status};
use tower::ServiceExt;

use crate::relay::GrpcService;
use crate::status::AgentStatus;

/// What `AgentInfo/Get` reports.
#[derive(Debug)]
pub struct Info {
    /// `<tenant>/<agent>` from the certificate.
    pub agent: String,
    /// Software version.
    pub version: String,
    /// Capabilities offered in `Hello`.
    pub capabilities: Vec<String>,
    /// Labels from config.
    pub labels: BTreeMap<String, String>,
    /// Allow-listed service names.
    pub services: Vec<String>,
    /// What each speaks (`grpc` or `tcp`), by name.
    pub service_kinds: BTreeMap<String, String>,
    /// This process among replicas.
    pub instance_id: String,
    /// Process start.
    pub started: Instant,
    /// Live sessions.
    pub status: Arc<AgentStatus>,
}

#[tonic::async_trait]
impl AgentInfo for Info {
    async fn get(
        &self,
        _: Request<GetAgentInfoRequest>,
    ) -> Result<Response<AgentInfoResponse>, Status> {
        let gateways = self
            .status
            .sessions()
            .into_iter()
            .map(|s| ConnectedGateway {
                address: s.gateway,
                session_id: s.session_id,
                transport: s.transport.to_owned(),
                rtt: s.rtt.and_then(|d| prost_types::Duration::try_from(d).ok()),
            })
            .collect();
        Ok(Response::new(AgentInfoResponse {
            agent: self.agent.clone(),
            version: self.version.clone(),
            capabilities: self.capabilities.clone(),
            labels: self.labels.clone().into_iter().collect(),
            uptime: prost_types::Duration::try_from(self.started.elapsed()).ok(),
            gateways,
            services: self.services.clone(),
            service_kinds: self.service_kinds.clone().into_iter().collect(),
            instance_id: self.instance_id.clone(),
            preflight: self.status.preflight().map(|p| p.to_proto()),
        }))
    }
}

/// The service as an in-process upstream.
pub fn service(info: Arc<Info>) -> GrpcService {
    let svc = AgentInfoServer::from_arc(info);
    GrpcService::new(ServiceExt::<http::Request<tonic::body::Body>>::map_err(
        svc,
        |e: std::convert::Infallible| -> crate::relay::BoxError { match e {} },
    ))
}
