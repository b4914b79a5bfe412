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
    /// Allow-listed service names and what each speaks (`grpc` or `tcp`); replaced when the
    /// config is reloaded.
    pub catalog: std::sync::Mutex<BTreeMap<String, String>>,
    /// The kill switch.
    pub pause: Arc<crate::pause::PauseSwitch>,
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
        let catalog = self
            .catalog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pause_reason = self.pause.reason();
        Ok(Response::new(AgentInfoResponse {
            agent: self.agent.clone(),
            version: self.version.clone(),
            capabilities: self.capabilities.clone(),
            labels: self.labels.clone().into_iter().collect(),
            uptime: prost_types::Duration::try_from(self.started.elapsed()).ok(),
            gateways,
            services: catalog.keys().cloned().collect(),
            service_kinds: catalog.into_iter().collect(),
            instance_id: self.instance_id.clone(),
            paused: pause_reason.is_some(),
            pause_reason: pause_reason.map(|r| r.to_string()).unwrap_or_default(),
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
