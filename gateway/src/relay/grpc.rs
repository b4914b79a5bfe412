//! Feature layer: the transparent gRPC relay on the northbound listener, and the pumps that
//! carry one call's bytes.
//!
//! Any call to a service other than `tether.v1.*` that carries `tether-agent: <tenant>/<agent>`
//! (and optionally `tether-service: <name>`) is carried over a new gateway-opened QUIC stream to
//! one of that agent's live sessions, which forwards it to the upstream it maps the service name
//! to. Every call shape works because bytes are streamed as they come, both ways:
//!
//! ```text
//! caller ──h2──► gateway ──QUIC stream: StreamHeader, Data…, FIN──► agent ──h2──► upstream
//! caller ◄─h2─── gateway ◄─ResponseHead, Data…, Trailers, FIN────── agent ◄─h2─── upstream
//! ```
//!
//! Backpressure is end to end: the response pump holds at most a few frames and only reads the
//! QUIC stream when the caller takes them; QUIC flow control then slows the agent, whose h2
//! flow control slows the upstream. Cancellation is a reset: a caller that goes away, or a
//! deadline that passes, resets the QUIC stream both ways and the agent cancels the upstream call.
//!
//! The caller (resolved by `auth::Authenticated`) must be allowed to act for the agent's tenant:
//! otherwise `PERMISSION_DENIED`, before the registry is consulted, so the answer says nothing
//! about whether the agent exists.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use tether_runtime::CancellationToken;
use tether_runtime::grpc;
use tether_runtime::stream::{Reader, flush};
use tether_runtime::telemetry::{self, CallSpan, KeyValue, SpanKind};
use tether_runtime::transport::SendStream;
use tonic::{Code, Status};
use tunnel_proto::message::{StreamHeader, StreamKind, Trailers};
use tunnel_proto::stream::StreamFailure;
use tunnel_proto::stream::rpc::{self, RequestSend, ResponseEvent, ResponseRecv};
use tunnel_proto::{AgentId, ProtoError};

use crate::metrics::{Direction, RelayKind, relayed_bytes};
use crate::northbound::auth::Caller;
use crate::relay::limits::StreamPermit;
use crate::relay::outcomes::AgentTraffic;
use crate::relay::resend::{Replay, ReplayReader};
use crate::relay::{Attempts, Relay, RelayError, record_call, record_first_byte, record_resend};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The tower service mounted as the northbound router's fallback.
#[derive(Clone, Debug)]
pub struct RelayService(pub Arc<Relay>);

fn caller_of<B>(req: &Request<B>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

impl tower::Service<Request<axum::body::Body>> for RelayService {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<axum::body::Body>) -> Self::Future {
        let relay = self.0.clone();
        Box::pin(async move {
            let started = Instant::now();
            // Set once the call reached an agent the caller may act for and the gateway knows.
            let mut routed: Option<AgentId> = None;
            // The call's span once it is routed; ended with the call's status.
            let mut span = None;
            match relay_call(&relay, req, &mut routed, &mut span).await {
                Ok(resp) => {
                    record_first_byte(RelayKind::Grpc, started);
                    Ok(resp)
                }
                Err(status) => {
                    record_end(
                        tenant_label(routed.as_ref().map(AgentId::tenant)),
                        status.code(),
                    );
                    if let Some(agent) = &routed {
                        relay.outcomes.record(agent, status.code());
                    }
                    if let Some(s) = span.take() {
                        s.end(status.code() as i32, status.message());
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// The `tenant` label of `tether_gateway_relay_calls_total` for a call refused before it
/// reached an agent the gateway knows (missing or malformed `tether-agent`, a tenant outside
/// the caller's scope, an unknown agent). Not a valid tenant name (names never start with
/// `-`), so it cannot be mistaken for one.
pub const UNROUTED: &str = "-";

/// The `tenant` label of a relayed call: the tenant of the agent it was routed to, or
/// [`UNROUTED`]. Labels are for tenants the caller was authorized for *and* that have an agent
/// the registry knows, never for what a caller wrote in its metadata: every distinct label
/// value is a series the gateway keeps for good, and callers choose their metadata freely.
pub fn tenant_label(routed: Option<&str>) -> &str {
    routed.unwrap_or(UNROUTED)
}

fn record_end(tenant: &str, code: Code) {
    record_call(RelayKind::Grpc, tenant, code);
}

/// Relays one call; `routed` is set to the agent once the call is routed to an agent the
/// caller may act for and the registry knows (for the metrics label and the outcomes).
async fn relay_call(
    relay: &Relay,
    req: Request<axum::body::Body>,
    routed: &mut Option<AgentId>,
    span_slot: &mut Option<CallSpan>,
) -> Result<Response<axum::body::Body>, Status> {
    let caller = caller_of(&req)?;
    let (agent, service) = relay.route(req.headers(), &caller, "relay")?;
    let timeout = req
        .headers()
        .get("grpc-timeout")
        .and_then(grpc::parse_grpc_timeout);
    let deadline = timeout.map(|t| Instant::now() + t);
    // The server span of this call, child of the caller's trace context: the agent's span
    // will be its child.
    let span = relay.telemetry().span(
        format!("relay {}", req.uri().path()),
        SpanKind::Server,
        &telemetry::context_of(req.headers()),
        vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.method", req.uri().path().to_owned()),
            KeyValue::new("tether.tenant", agent.tenant().to_owned()),
            KeyValue::new("tether.agent", agent.to_string()),
            KeyValue::new("tether.service", service.clone()),
        ],
    );
    let trace_context = span.context();
    *span_slot = Some(span);
    let header = StreamHeader {
        kind: StreamKind::Rpc as i32,
        service,
        method: req.uri().path().to_owned(),
        metadata: grpc::headers_to_metadata(req.headers()),
        timeout_ms: timeout.map_or(0, |t| t.as_millis().max(1) as u64),
        trace_context,
        id: String::new(),
        caller: format!("{}:{}", caller.kind.as_str(), caller.name),
        attempt: 0,
    };
    // Sent again on another session when it provably did not reach the agent (`Attempts`).
    let body = Replay::new(req.into_body());
    let mut attempts = Attempts::default();
    // The agent's counters (calls, bytes each way), looked up once the call reached it.
    let mut counted: Option<Arc<AgentTraffic>> = None;
    let (first, mut reader, cancel, active, traffic) = loop {
        let (mut request, response) = rpc::open(header.clone());
        let opened = relay
            .open_attempt(Some(&caller), &agent, &mut request, deadline, &mut attempts)
            .await;
        if !matches!(&opened, Err(RelayError::UnknownAgent(_))) {
            *routed = Some(agent.clone());
        }
        let (send, recv, permit) = match opened {
            Ok(o) => o,
            Err(e) if attempts.resend_after_open(&e) && body.replayable().await => {
                record_resend(RelayKind::Grpc);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let active = ActiveGuard::new(RelayKind::Grpc, permit);
        let cancel = CancellationToken::new();
        let traffic = counted
            .get_or_insert_with(|| relay.outcomes.agent(&agent))
            .clone();
        tokio::spawn(pump_request(
            body.reader(),
            send,
            request,
            (cancel.clone(), deadline),
            traffic.clone(),
        ));

        let mut reader = Reader::new(recv, response);
        let first = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), reader.next()).await {
                Ok(r) => r,
                Err(_) => {
                    reader.half_mut().cancel();
                    reader.apply_stop();
                    cancel.cancel();
                    return Err(Status::deadline_exceeded(
                        "deadline exceeded waiting for the upstream's response",
                    ));
                }
            },
            None => reader.next().await,
        };
        let again = match &first {
            Err(e) => attempts.resend_after_stream_error(e),
            Ok(ResponseEvent::Failed(f)) => attempts.resend_after_failure(f),
            Ok(_) => false,
        };
        if again {
            cancel.cancel();
            if body.replayable().await {
                record_resend(RelayKind::Grpc);
                continue;
            }
        }
        body.settle();
        break (first, reader, cancel, active, traffic);
    };
    let tenant = agent.tenant().to_owned();
    let mut resp = Response::new(axum::body::Body::empty());
    match first {
        Ok(ResponseEvent::Head(head)) => {
            *resp.status_mut() =
                http::StatusCode::from_u16(head.status as u16).unwrap_or(http::StatusCode::OK);
            grpc::metadata_to_headers(&head.metadata, resp.headers_mut());
        }
        Ok(ResponseEvent::Trailers(t)) => {
            // Trailers-only: the call failed before any response (or had no body).
            cancel.cancel();
            record_end(&tenant, code_of(&t));
            traffic.ended(code_of(&t));
            if let Some(s) = span_slot.take() {
                s.end(code_of(&t) as i32, &message_of(&t));
            }
            grpc::metadata_to_headers(&t.metadata, resp.headers_mut());
            resp.headers_mut()
                .entry(http::header::CONTENT_TYPE)
                .or_insert(HeaderValue::from_static("application/grpc"));
            return Ok(resp);
        }
        Ok(ResponseEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected {
            got, ..
        }))) => {
            // The machine stopped the stream (PROTOCOL_ERROR).
            reader.apply_stop();
            cancel.cancel();
            return Err(Status::internal(format!(
                "agent {agent} sent {got} before the response head"
            )));
        }
        Ok(ResponseEvent::Failed(StreamFailure::Ended { .. })) => {
            cancel.cancel();
            return Err(Status::unavailable(format!("agent {agent}: stream ended")));
        }
        // The machine never gives a body before the head; should it, this is what it means.
        Ok(ResponseEvent::Data(_)) => {
            reader.half_mut().cancel();
            reader.apply_stop();
            cancel.cancel();
            return Err(Status::internal(format!(
                "agent {agent} sent Data before the response head"
            )));
        }
        Ok(ResponseEvent::Failed(e)) => {
            reader.apply_stop();
            cancel.cancel();
            return Err(Status::unavailable(format!("agent {agent}: {e}")));
        }
        Err(e) => {
            cancel.cancel();
            return Err(Status::unavailable(format!("agent {agent}: {e}")));
        }
    }
    // The response body reads the QUIC stream as the caller's HTTP/2 stream polls it: no task
    // or channel between the agent's bytes and the caller's.
    let to_caller = ToCaller {
        reader,
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
        cancel,
        tenant,
        traffic,
        bytes: relayed_bytes(Direction::FromAgent),
        done: false,
        span: span_slot.take(),
        _active: active,
    };
    *resp.body_mut() = axum::body::Body::new(http_body_util::StreamBody::new(
        futures::stream::unfold(to_caller, |mut st| async move {
            let frame = st.next().await?;
            Some((frame, st))
        }),
    ));
    Ok(resp)
}

/// The trailers' `grpc-message` (as sent: percent-encoded), for the span's status.
fn message_of(t: &Trailers) -> String {
    t.metadata
        .iter()
        .find(|m| m.key == "grpc-message")
        .map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .unwrap_or_default()
}

fn code_of(t: &Trailers) -> Code {
    t.grpc_status().map(Code::from_i32).unwrap_or(Code::Unknown)
}

/// Counts a stream as active (and against its agent's stream limit) for as long as it lives.
struct ActiveGuard {
    kind: RelayKind,
    _permit: StreamPermit,
}

impl ActiveGuard {
    fn new(kind: RelayKind, permit: StreamPermit) -> Self {
        metrics::gauge!("tether_gateway_relay_streams_active", "kind" => kind.as_str())
            .increment(1.0);
        ActiveGuard {
            kind,
            _permit: permit,
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        metrics::gauge!("tether_gateway_relay_streams_active", "kind" => self.kind.as_str())
            .decrement(1.0);
    }
}

/// Caller → agent: request body bytes as `Data` frames, then FIN. Resets the stream when the
/// caller's body fails (the caller went away), the call is cancelled or its deadline passes
/// (whether or not the caller is reading the response).
async fn pump_request(
    mut body: ReplayReader,
    mut send: SendStream,
    mut request: RequestSend,
    (cancel, deadline): (CancellationToken, Option<Instant>),
    traffic: Arc<AgentTraffic>,
) {
    let bytes = relayed_bytes(Direction::ToAgent);
    let deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = cancel.cancelled() => break,
            _ = &mut deadline => break,
            _ = send.stopped() => return,
        };
        match frame {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    bytes.increment(data.len() as u64);
                    traffic.to_agent(data.len() as u64);
                    let _ = request.data(data);
                    if flush(&mut send, &mut request).await.is_err() {
                        return;
                    }
                }
            }
            Some(Err(_)) => break,
            None => {
                let _ = request.finish();
                let _ = flush(&mut send, &mut request).await;
                // Stay until the call ends so a later cancellation can still reset.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = &mut deadline => break,
                    _ = send.stopped() => return,
                }
            }
        }
    }
    request.cancel();
    let _ = flush(&mut send, &mut request).await;
}

fn status_trailers(code: Code, msg: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    grpc::metadata_to_headers(&Trailers::status(code as i32, msg).metadata, &mut h);
    h
}

/// Agent → caller: `Data` frames as body chunks, `Trailers` as HTTP/2 trailers, read as the
/// caller's response is polled. Ends the call with a status of its own when the agent's stream
/// breaks or the deadline passes; dropped before its end (the caller went away), it cancels the
/// call end to end.
struct ToCaller {
    reader: Reader<ResponseRecv>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    cancel: CancellationToken,
    tenant: String,
    /// The agent's counters: the call's outcome and its response bytes.
    traffic: Arc<AgentTraffic>,
    bytes: metrics::Counter,
    /// The final frame was given (or the call was ended): nothing more is read.
    done: bool,
    /// The call's span, ended with its status.
    span: Option<CallSpan>,
    _active: ActiveGuard,
}

impl ToCaller {
    /// Stops the agent's stream, cancels the request side, and counts the call as `code`.
    fn end(&mut self, code: Code) {
        self.done = true;
        self.reader.half_mut().cancel();
        self.reader.apply_stop();
        self.cancel.cancel();
        self.record(code, "");
    }

    /// Counts the call as `code` and ends its span.
    fn record(&mut self, code: Code, message: &str) {
        record_end(&self.tenant, code);
        self.traffic.ended(code);
        if let Some(s) = self.span.take() {
            s.end(code as i32, message);
        }
    }

    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        if self.done {
            return None;
        }
        let event = match &mut self.deadline {
            Some(deadline) => tokio::select! {
                e = self.reader.next() => e,
                _ = deadline.as_mut() => {
                    self.end(Code::DeadlineExceeded);
                    return Some(Ok(Frame::trailers(status_trailers(Code::DeadlineExceeded, "deadline exceeded"))));
                }
            },
            None => self.reader.next().await,
        };
        let (code, why) = match event {
            Ok(ResponseEvent::Data(b)) => {
                self.bytes.increment(b.len() as u64);
                self.traffic.from_agent(b.len() as u64);
                return Some(Ok(Frame::data(b)));
            }
            Ok(ResponseEvent::Trailers(t)) => {
                self.done = true;
                self.record(code_of(&t), &message_of(&t));
                let mut h = HeaderMap::new();
                grpc::metadata_to_headers(&t.metadata, &mut h);
                self.cancel.cancel();
                return Some(Ok(Frame::trailers(h)));
            }
            Ok(ResponseEvent::Failed(StreamFailure::Ended { .. })) => (
                Code::Internal,
                "agent stream ended unexpectedly (end of stream)".to_owned(),
            ),
            Ok(ResponseEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected {
                got,
                ..
            }))) => (
                Code::Internal,
                format!("agent stream ended unexpectedly ({got})"),
            ),
            // The machine refuses a second head; should it not, this is what it means.
            Ok(ResponseEvent::Head(_)) => (
                Code::Internal,
                "agent stream ended unexpectedly (ResponseHead)".to_owned(),
            ),
            Ok(ResponseEvent::Failed(e)) => {
                (Code::Unavailable, format!("agent stream failed: {e}"))
            }
            Err(e) => (Code::Unavailable, format!("agent stream failed: {e}")),
        };
        self.end(code);
        Some(Ok(Frame::trailers(status_trailers(code, &why))))
    }
}

impl Drop for ToCaller {
    /// Dropped before its end: the caller went away (or reset the call). Cancel end to end.
    fn drop(&mut self) {
        if !self.done {
            let code = match &self.deadline {
                Some(d) if d.is_elapsed() => Code::DeadlineExceeded,
                _ => Code::Cancelled,
            };
            self.end(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::agent_of_metadata;
    use proptest::prelude::*;
    use tether_runtime::grpc::TETHER_AGENT;

    fn headers(agent: &[u8]) -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(TETHER_AGENT, HeaderValue::from_bytes(agent).ok()?);
        Some(h)
    }

    proptest! {
        /// Whatever a caller writes in `tether-agent`, the label of a call that reached no
        /// agent is the one fixed value, and an accepted id's tenant is a valid name (at most
        /// 63 bytes): metadata never becomes a label of its own.
        #[test]
        fn the_relay_label_never_comes_from_raw_metadata(
            raw in proptest::collection::vec(any::<u8>(), 0..300),
            tenant in "[a-z0-9._-]{0,80}",
            agent in "[a-zA-Z0-9/._-]{0,20}",
        ) {
            prop_assert_eq!(tenant_label(None), UNROUTED);
            for value in [raw.clone(), format!("{tenant}/{agent}").into_bytes()] {
                let Some(h) = headers(&value) else { continue };
                if let Ok(id) = agent_of_metadata(&h) {
                    prop_assert!(id.tenant().len() <= 63);
                    prop_assert!(tunnel_proto::identity::check_name("tenant", id.tenant()).is_ok());
                    prop_assert_eq!(tenant_label(Some(id.tenant())), id.tenant());
                    prop_assert_ne!(id.tenant(), UNROUTED);
                }
            }
        }
    }
}
