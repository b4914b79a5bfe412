//! Feature layer: `tether.v1.Commands`, the gRPC face of [`Commands`]. Each method checks the
//! tenant of the command's agent against the caller's scope.
//!
//! The API edge: requests become domain values here ([`NewCommand`], [`WatchTarget`],
//! [`ListFilter`]) and records become `tether.v1.Command` messages here ([`to_proto`]), nowhere
//! else (the stores have their own encoding, `store/codec.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_api::v1;
use tether_api::v1::Command;
use tether_api::v1::commands_server::{Commands as CommandsRpc, CommandsServer};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tunnel_proto::AgentId;

use super::record::{CommandRecord, CommandState, NewCommand};
use super::store::ListFilter;
use super::watch::{WatchEvent, WatchTarget};
use super::{CommandError, Commands, KEY_MAX, LIST_PAGE_BYTES, MAX_PAGE_SIZE, PAGE_SIZE};
use crate::northbound::auth::{Caller, TenantScope, caller};

/// The stream a `Commands/Watch` call answers with.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<v1::CommandEvent, Status>> + Send>>;

fn ts(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(Into::into)
}

/// The API's message for a record (its payload copied in: the message owns its bytes).
pub(super) fn to_proto(c: &CommandRecord) -> Command {
    Command {
        id: c.id.clone(),
        agent: c.agent.to_string(),
        kind: c.kind.clone(),
        payload: c.payload.to_vec(),
        content_type: c.content_type.clone(),
        idempotency_key: c.idempotency_key.clone(),
        ordering_key: c.ordering_key.clone(),
        state: c.state.wire(),
        attempts: c.attempts,
        created: ts(c.created),
        delivered: ts(c.delivered),
        started: ts(c.started),
        finished: ts(c.finished),
        expires: ts(c.expires),
        result: c.result.as_ref().map(|r| v1::CommandResult {
            output: r.output.to_vec(),
            message: r.message.clone(),
        }),
        progress: c.progress.clone(),
        version: c.version,
        trace_context: c
            .trace_context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn to_event(ev: WatchEvent) -> v1::CommandEvent {
    v1::CommandEvent {
        command: Some(to_proto(&ev.command)),
        initial: ev.initial,
    }
}

/// A Submit's request as the feature takes it: the agent already parsed and authorized.
fn new_command(
    agent: AgentId,
    r: v1::SubmitCommandRequest,
    trace_context: std::collections::BTreeMap<String, String>,
) -> Result<NewCommand, CommandError> {
    let ttl = match r.ttl {
        Some(ttl) if ttl.seconds < 0 || ttl.nanos < 0 => {
            return Err(CommandError::Invalid("ttl is negative".into()));
        }
        Some(ttl) => {
            Some(Duration::try_from(ttl).map_err(|e| CommandError::Invalid(format!("ttl: {e}")))?)
        }
        None => None,
    };
    Ok(NewCommand {
        agent,
        kind: r.kind,
        payload: Bytes::from(r.payload),
        content_type: r.content_type,
        idempotency_key: r.idempotency_key,
        ordering_key: r.ordering_key,
        ttl,
        trace_context,
    })
}

/// Cuts a page of listed commands (already as events carry them) to [`LIST_PAGE_BYTES`]:
/// returns how many fit, at least one.
fn fit_page(cmds: &[Command]) -> usize {
    use prost::Message as _;
    let mut bytes = 0;
    for (i, c) in cmds.iter().enumerate() {
        // Each command is a length-delimited field of the response: its bytes plus a few.
        bytes += c.encoded_len() + 8;
        if bytes > LIST_PAGE_BYTES && i > 0 {
            return i;
        }
    }
    cmds.len()
}

/// `tether.v1.Commands`.
#[derive(Debug, Clone)]
pub struct CommandsApi {
    commands: Arc<Commands>,
}

impl CommandsApi {
    /// Serves `commands`.
    pub fn new(commands: Arc<Commands>) -> Self {
        CommandsApi { commands }
    }

    /// The tonic service (callers are authenticated by `auth::Authenticated` around it; each
    /// method checks the tenant of the command's agent).
    pub fn into_service(self, max_payload: u64) -> CommandsServer<CommandsApi> {
        // Room for the payload plus the request's other fields; larger ones are refused by tonic
        // before they reach Submit's own check, which names the limit.
        let max = usize::try_from(max_payload)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10);
        CommandsServer::new(self)
            .max_decoding_message_size(max.max(8 << 20))
            .max_encoding_message_size(usize::MAX)
    }

    /// The command `id` if `caller` may act for its agent's tenant. `NOT_FOUND` when there is
    /// no such command, and the very same answer for a command of another tenant (still audited
    /// and counted as a denial): a caller cannot tell another tenant's ids from unused ones.
    async fn authorized(
        &self,
        caller: &Caller,
        method: &'static str,
        id: &str,
    ) -> Result<CommandRecord, Status> {
        let cmd = self.commands.get(id).await?;
        if caller
            .authorize_command(method, id, &cmd.agent.to_string())
            .is_err()
        {
            return Err(CommandError::NotFound(id.to_owned()).into());
        }
        Ok(cmd)
    }
}

/// The agent a request names, checked against the caller's tenants.
fn authorized_agent(caller: &Caller, method: &'static str, agent: &str) -> Result<AgentId, Status> {
    let id: AgentId = agent
        .parse()
        .map_err(|e| CommandError::Invalid(format!("agent {agent:?}: {e}")))?;
    caller.authorize(method, &id)?;
    Ok(id)
}

#[tonic::async_trait]
impl CommandsRpc for CommandsApi {
    async fn submit(
        &self,
        req: Request<v1::SubmitCommandRequest>,
    ) -> Result<Response<v1::SubmitCommandResponse>, Status> {
        const METHOD: &str = "tether.v1.Commands/Submit";
        let caller = caller(&req)?;
        let agent = authorized_agent(&caller, METHOD, &req.get_ref().agent)?;
        // The caller's trace context, kept with the command for the agent's span to link to.
        let trace = tether_runtime::telemetry::context_of(req.metadata().as_ref());
        let new = new_command(agent.clone(), req.into_inner(), trace)?;
        let (cmd, created) = self.commands.submit(new).await?;
        let detail = format!("command {} kind {} created {created}", cmd.id, cmd.kind);
        caller.audit_allowed(METHOD, &agent, &detail);
        Ok(Response::new(v1::SubmitCommandResponse {
            id: cmd.id,
            created,
        }))
    }

    async fn get(&self, req: Request<v1::GetCommandRequest>) -> Result<Response<Command>, Status> {
        let caller = caller(&req)?;
        let cmd = self
            .authorized(&caller, "tether.v1.Commands/Get", &req.get_ref().id)
            .await?;
        Ok(Response::new(to_proto(&cmd)))
    }

    async fn list(
        &self,
        req: Request<v1::ListCommandsRequest>,
    ) -> Result<Response<v1::ListCommandsResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let agent = match r.agent.as_str() {
            "" => None,
            a => Some(authorized_agent(&caller, "tether.v1.Commands/List", a)?),
        };
        let state = match r.state {
            0 => None,
            n => Some(CommandState::from_wire(n).ok_or_else(|| {
                CommandError::Invalid(format!("state {n} is not a command state"))
            })?),
        };
        let ms = |t: Option<prost_types::Timestamp>| {
            t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        let limit = match r.page_size as usize {
            0 => PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if r.page_token.len() > KEY_MAX {
            return Err(CommandError::Invalid(
                "page_token is not one List returned: pass next_page_token as it came".into(),
            )
            .into());
        }
        // A caller scoped to some tenants reads their indexes only, never another tenant's
        // records (nor their ids in a page token).
        let tenants = match (&caller.tenants, &agent) {
            (TenantScope::Set(set), None) => Some(set.iter().cloned().collect()),
            _ => None,
        };
        let filter = ListFilter {
            agent,
            tenants,
            state,
            kind: r.kind,
            from_ms: ms(r.from),
            to_ms: ms(r.to),
            after: r.page_token,
            limit: limit + 1,
        };
        let page = self
            .commands
            .list_stored(filter)
            .await
            .map_err(CommandError::from)?;
        let mut cmds = page.commands;
        let more = cmds.len() > limit;
        cmds.truncate(limit);
        // The store may lag the in-memory state by one write: show the live one.
        self.commands.overlay_recent(&mut cmds);
        let mut cmds: Vec<Command> = cmds.iter().map(|c| to_proto(&c.view())).collect();
        let fit = fit_page(&cmds);
        let cut = fit < cmds.len();
        cmds.truncate(fit);
        let next_page_token = if cut || more {
            cmds.last().map(|c| c.id.clone()).unwrap_or_default()
        } else {
            page.resume.unwrap_or_default()
        };
        Ok(Response::new(v1::ListCommandsResponse {
            commands: cmds,
            next_page_token,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<v1::WatchCommandsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use v1::watch_commands_request::Target;
        const METHOD: &str = "tether.v1.Commands/Watch";
        let caller = caller(&req)?;
        let target = match req.into_inner().target {
            Some(Target::Id(id)) => {
                self.authorized(&caller, METHOD, &id).await?;
                WatchTarget::Id(id)
            }
            Some(Target::Agent(agent)) => {
                WatchTarget::Agent(authorized_agent(&caller, METHOD, &agent)?)
            }
            None => {
                return Err(CommandError::Invalid("watch needs an id or an agent".into()).into());
            }
        };
        let slot = self.commands.watch_slot(&caller)?;
        let events = self.commands.watch(target, slot).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(events)
            .map(|ev| ev.map(to_event).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelCommandRequest>,
    ) -> Result<Response<Command>, Status> {
        const METHOD: &str = "tether.v1.Commands/Cancel";
        let caller = caller(&req)?;
        let id = req.into_inner().id;
        let cmd = self.authorized(&caller, METHOD, &id).await?;
        let cancelled = self.commands.cancel(&id).await?;
        caller.audit_allowed(METHOD, &cmd.agent, &format!("command {id}"));
        Ok(Response::new(to_proto(&cancelled)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{EVENT_OUTPUT_MAX, PROGRESS_KEPT};
    use tunnel_proto::message::{COMMAND_MESSAGE_MAX, COMMAND_PROGRESS_LINE_MAX};

    #[test]
    fn a_list_page_fits_its_byte_budget_and_carries_at_least_one_command() {
        let big = |id: &str| Command {
            id: id.into(),
            progress: vec!["p".repeat(COMMAND_PROGRESS_LINE_MAX); PROGRESS_KEPT],
            result: Some(v1::CommandResult {
                output: vec![0; EVENT_OUTPUT_MAX],
                message: "m".repeat(COMMAND_MESSAGE_MAX),
            }),
            ..Default::default()
        };
        let cmds: Vec<Command> = (0..1000).map(|i| big(&i.to_string())).collect();
        let n = fit_page(&cmds);
        let bytes: usize = cmds[..n]
            .iter()
            .map(|c| prost::Message::encoded_len(c) + 8)
            .sum();
        assert!(
            (1..1000).contains(&n) && bytes <= LIST_PAGE_BYTES,
            "{n} {bytes}"
        );
        let huge = Command {
            kind: "k".repeat(2 * LIST_PAGE_BYTES),
            ..Default::default()
        };
        assert_eq!(fit_page(&[huge.clone(), huge]), 1);
    }
}
