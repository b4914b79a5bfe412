//! Feature layer: serves the streams a gateway opens on a session — relayed gRPC calls and TCP
//! streams — to the upstreams in the agent's service map, and the built-in `agent` service;
//! command deliveries go to [`crate::commands`].
//!
//! The service map is the allow-list: a stream naming anything else is refused here, before any
//! connection is made. Cancellation travels both ways: a gateway reset cancels the upstream call
//! (its h2 stream is reset), and a deadline passing does the same.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tether_runtime::CancellationToken;
use tether_runtime::grpc;
use tether_runtime::stream::{Gathered, Reader, flush};
use tether_runtime::telemetry::{CallSpan, KeyValue, SpanKind, Telemetry};
use tether_runtime::transport::{Link, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tunnel_proto::message::{ResponseHead, StreamHeader, Trailers};
use tunnel_proto::stream::rpc::{RequestEvent, RequestRecv, ResponseSend};
use tunnel_proto::stream::tcp::{AgentTcp, TcpEvent};
use tunnel_proto::stream::{Accepted, Incoming, IncomingEvent, StreamFailure};
use tunnel_proto::{ErrorCode, ProtoError};

use crate::config::{AgentConfig, ServiceKind};
use crate::error::{AgentError, UpstreamError};

/// Errors of upstream services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A gRPC upstream: an HTTP/2 client (tonic's `Channel`) or an in-process service.
pub type GrpcService =
    BoxCloneSyncService<Request<tonic::body::Body>, Response<tonic::body::Body>, BoxError>;

/// The reserved name of the built-in service.
pub const BUILTIN: &str = "agent";

/// Time allowed for a stream's header to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to connect to a TCP upstream.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most read from a TCP upstream at once (one write to the tunnel stream).
const TCP_READ_CHUNK: usize = 64 * 1024;
/// The most bytes already received from the gateway gathered into one write to a TCP upstream.
const TCP_WRITE_GATHER: usize = 256 * 1024;

enum Upstream {
    Grpc { svc: GrpcService, address: String },
    Tcp { address: String },
}

/// The agent's allow-listed upstreams.
pub struct Services {
    map: BTreeMap<String, Upstream>,
    default: String,
    builtin: GrpcService,
    agent: String,
    commands: Arc<crate::commands::Executor>,
    telemetry: Telemetry,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("names", &self.map.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl Services {
    /// Builds clients for every service in the config (they connect lazily, on first use).
    pub fn new(
        cfg: &AgentConfig,
        agent: String,
        builtin: GrpcService,
        commands: Arc<crate::commands::Executor>,
    ) -> Result<Services, AgentError> {
        let mut map = BTreeMap::new();
        for (name, s) in &cfg.services {
            let up = match s.kind {
                ServiceKind::Tcp => Upstream::Tcp {
                    address: s.address.clone(),
                },
                ServiceKind::Grpc => {
                    let bad = |error| AgentError::Upstream {
                        service: name.clone(),
                        error,
                    };
                    let mut ep = Endpoint::from_shared(s.address.clone())
                        .map_err(|e| bad(UpstreamError::Endpoint(e)))?
                        .connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true);
                    if let Some(ca) = &s.ca {
                        let pem = std::fs::read(ca).map_err(|source| {
                            bad(UpstreamError::Ca {
                                path: ca.clone(),
                                source,
                            })
                        })?;
                        let mut tls =
                            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
                        if let Some(n) = &s.server_name {
                            tls = tls.domain_name(n.clone());
                        }
                        ep = ep
                            .tls_config(tls)
                            .map_err(|e| bad(UpstreamError::Endpoint(e)))?;
                    }
                    let channel = ep.connect_lazy();
                    Upstream::Grpc {
                        svc: BoxCloneSyncService::new(channel.map_err(BoxError::from)),
                        address: s.address.clone(),
                    }
                }
            };
            map.insert(name.clone(), up);
        }
        Ok(Services {
            map,
            default: cfg.default_service.clone(),
            builtin,
            agent,
            commands,
            telemetry: Telemetry::disabled(),
        })
    }

    /// Makes a span of every relayed call and stream with `telemetry` (`[telemetry]`).
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Services {
        self.telemetry = telemetry;
        self
    }

    /// Service names, for `AgentInfo`.
    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

/// What the session layer watches on one connection: streams in flight (a retired session
/// closes once they are done) and when the gateway last probed it. Read by the session's driver
/// only at its deadlines, and woken by [`LinkStats::idle`]: nothing here is polled. Once the
/// session is left ([`LinkStats::refuse_new_streams`]), every stream accepted afterwards is
/// reset unread with `REFUSED_STREAM`.
#[derive(Debug)]
pub struct LinkStats {
    refusing: std::sync::atomic::AtomicBool,
    active: std::sync::atomic::AtomicUsize,
    /// Notified when `active` drops to zero.
    became_idle: tokio::sync::Notify,
    /// When serving began; `last_probe` counts from it.
    since: Instant,
    /// Nanoseconds from `since` to the last probe.
    last_probe: std::sync::atomic::AtomicU64,
}

impl Default for LinkStats {
    fn default() -> Self {
        LinkStats {
            refusing: Default::default(),
            active: Default::default(),
            became_idle: tokio::sync::Notify::new(),
            since: Instant::now(),
            last_probe: Default::default(),
        }
    }
}

impl LinkStats {
    /// From now on, refuse every stream the gateway opens (the session is being left): reset
    /// unread with `REFUSED_STREAM`, so the gateway sends it again on another session.
    pub fn refuse_new_streams(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Streams being served.
    pub fn active(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once no stream is being served (at once when none is).
    pub async fn idle(&self) {
        loop {
            let notified = self.became_idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// When the gateway's last probe arrived (or when serving began).
    pub fn last_probe(&self) -> Instant {
        let nanos = self.last_probe.load(std::sync::atomic::Ordering::Relaxed);
        self.since + Duration::from_nanos(nanos)
    }

    fn probed(&self) {
        let nanos = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_probe
            .store(nanos, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Serves every stream the gateway opens on `link` until the connection ends.
pub async fn serve(link: Link, services: Arc<Services>, stats: Arc<LinkStats>) {
    use std::sync::atomic::Ordering;
    while let Some((mut send, mut recv)) = link.accept().await {
        if stats.refusing.load(Ordering::SeqCst) {
            // Nothing of it is read or served: the gateway opens it again elsewhere.
            metrics::counter!("tether_agent_streams_refused_total").increment(1);
            send.reset(ErrorCode::REFUSED_STREAM);
            recv.stop(ErrorCode::REFUSED_STREAM);
            continue;
        }
        let (services, stats) = (services.clone(), stats.clone());
        stats.active.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            handle(send, recv, services, &stats).await;
            if stats.active.fetch_sub(1, Ordering::SeqCst) == 1 {
                stats.became_idle.notify_waiters();
            }
        });
    }
}

async fn handle(
    mut send: SendStream,
    recv: RecvStream,
    services: Arc<Services>,
    stats: &LinkStats,
) {
    // Command payloads up to the protocol's default limit (64 MiB).
    let mut reader = Reader::new(recv, Incoming::new());
    let event = match tokio::time::timeout(HEADER_TIMEOUT, reader.next()).await {
        Ok(Ok(e)) => e,
        // The connection is gone, or the header did not come in time.
        Ok(Err(_)) | Err(_) => {
            reader.half_mut().cancel();
            let _ = flush(&mut send, reader.half_mut()).await;
            return;
        }
    };
    let (recv, mut incoming) = reader.into_parts();
    // What the machine answers itself (a probe, an unknown kind, a broken stream).
    let _ = flush(&mut send, &mut incoming).await;
    match event {
        IncomingEvent::Accepted(accepted) => match *accepted {
            Accepted::Rpc {
                mut header,
                request,
                response,
            } => {
                // The agent's span, child of the gateway's; the upstream's parent.
                let span = services.telemetry.span(
                    format!("upstream {}", header.method),
                    SpanKind::Client,
                    &header.trace_context,
                    vec![
                        KeyValue::new("rpc.system", "grpc"),
                        KeyValue::new("rpc.method", header.method.clone()),
                        KeyValue::new("tether.agent", services.agent.clone()),
                        KeyValue::new(
                            "tether.service",
                            service_name(&header, &services).to_owned(),
                        ),
                    ],
                );
                header.trace_context = span.context();
                let request = Reader::new(recv, request);
                // Counted once here: every way a call ends gives its code (none when the
                // gateway's stream broke before an answer could be sent).
                if let Some(code) = rpc(header, request, response, send, &services).await {
                    metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => format!("{code:?}")).increment(1);
                    span.end(code as i32, "");
                }
            }
            Accepted::Tcp(machine) => tcp(Reader::new(recv, machine), send, &services).await,
            Accepted::Command(machine) => {
                let reader = Reader::new(recv, machine);
                services
                    .commands
                    .clone()
                    .serve(reader, send, &services.telemetry)
                    .await
            }
        },
        IncomingEvent::Probed => {
            stats.probed();
        }
        IncomingEvent::Unsupported(header) => {
            tracing::warn!(kind = ?header.stream_kind(), "stream kind not supported by this agent");
        }
        IncomingEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected { got, .. })) => {
            tracing::warn!(frame = got, "stream did not start with a StreamHeader");
        }
        IncomingEvent::Failed(StreamFailure::Protocol(e)) => {
            tracing::warn!(error = %e, "bad stream header");
        }
        IncomingEvent::Failed(_) => {}
    }
}

fn service_name<'a>(header: &'a StreamHeader, services: &'a Services) -> &'a str {
    if header.service.is_empty() {
        &services.default
    } else {
        &header.service
    }
}

async fn finish_with(
    send: &mut SendStream,
    response: &mut ResponseSend,
    code: Code,
    message: &str,
) -> Code {
    let _ = response.trailers(Trailers::status(code as i32, message));
    let _ = flush(send, response).await;
    code
}

async fn rpc(
    header: StreamHeader,
    request: Reader<RequestRecv>,
    mut response: ResponseSend,
    mut send: SendStream,
    services: &Services,
) -> Option<Code> {
    let name = service_name(&header, services).to_owned();
    let (svc, address) = match services.map.get(&name) {
        _ if name == BUILTIN => (services.builtin.clone(), "built-in".to_owned()),
        Some(Upstream::Grpc { svc, address }) => (svc.clone(), address.clone()),
        Some(Upstream::Tcp { .. }) => {
            let msg = format!(
                "service {name:?} on agent {} is a TCP service: use tether.v1.Streams/Open",
                services.agent
            );
            return Some(
                finish_with(&mut send, &mut response, Code::FailedPrecondition, &msg).await,
            );
        }
        None => {
            tracing::info!(service = %name, method = %header.method, "refused: service not in the allow-list");
            let msg = format!(
                "service {name:?} is not allow-listed on agent {}",
                services.agent
            );
            return Some(finish_with(&mut send, &mut response, Code::PermissionDenied, &msg).await);
        }
    };
    let deadline =
        (header.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(header.timeout_ms));

    // The request: headers from metadata, body read from the Data frames as the HTTP/2 client
    // polls it (no task or channel between). Any return from here on ends the body with an
    // error, which makes the HTTP/2 client reset the upstream's stream.
    let abort = CancellationToken::new();
    let _abort_body = abort.clone().drop_guard();
    let mut req = Request::new(tonic::body::Body::new(http_body_util::StreamBody::new(
        request_body(request, abort),
    )));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = match header.method.parse() {
        Ok(u) => u,
        Err(_) => {
            return Some(
                finish_with(
                    &mut send,
                    &mut response,
                    Code::InvalidArgument,
                    "method is not a valid path",
                )
                .await,
            );
        }
    };
    grpc::metadata_to_headers(&header.metadata, req.headers_mut());
    for (k, v) in &header.trace_context {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            req.headers_mut().insert(k, v);
        }
    }
    req.headers_mut()
        .insert(http::header::TE, HeaderValue::from_static("trailers"));
    if let Some(d) = deadline {
        req.headers_mut().insert(
            "grpc-timeout",
            grpc::encode_grpc_timeout(d.saturating_duration_since(Instant::now())),
        );
    }

    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let deadline_at = deadline.unwrap_or(far);
    let call = async { svc.oneshot(req).await };
    let resp = tokio::select! {
        // The deadline first: an upstream that gives up at the same moment (a tonic server
        // answers its own grpc-timeout with CANCELLED) must not win the draw.
        biased;
        _ = tokio::time::sleep_until(deadline_at.into()) => {
            return Some(finish_with(&mut send, &mut response, Code::DeadlineExceeded, "deadline exceeded before the upstream answered").await);
        }
        r = call => r,
        _ = send.stopped() => {
            // The gateway cancelled: dropping the call resets the upstream's stream.
            return Some(Code::Cancelled);
        }
    };
    let expired = || deadline.is_some_and(|d| Instant::now() + Duration::from_millis(5) >= d);
    let resp = match resp {
        Ok(r) => r,
        Err(_) if expired() => {
            // The HTTP/2 client enforces grpc-timeout itself; report it as what it is.
            return Some(
                finish_with(
                    &mut send,
                    &mut response,
                    Code::DeadlineExceeded,
                    "deadline exceeded before the upstream answered",
                )
                .await,
            );
        }
        Err(e) => {
            let msg = format!(
                "upstream service {name:?} ({address}) is unavailable: {}",
                error_chain(e.as_ref())
            );
            tracing::warn!(service = %name, %address, "{msg}");
            return Some(finish_with(&mut send, &mut response, Code::Unavailable, &msg).await);
        }
    };
    let (parts, mut body) = resp.into_parts();
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only response (the call failed, or had nothing to say): relay it as such.
        let t = Trailers {
            metadata: grpc::headers_to_metadata(&parts.headers),
        };
        let code = t.grpc_status().map(Code::from_i32).unwrap_or(Code::Unknown);
        if code == Code::Cancelled && expired() {
            // The upstream enforced the grpc-timeout it was sent and called it CANCELLED (as
            // tonic's server does): for the caller, its deadline passed.
            return Some(
                finish_with(
                    &mut send,
                    &mut response,
                    Code::DeadlineExceeded,
                    "deadline exceeded before the upstream answered",
                )
                .await,
            );
        }
        let _ = response.trailers(t);
        let _ = flush(&mut send, &mut response).await;
        return Some(code);
    }
    let head = ResponseHead {
        status: u32::from(parts.status.as_u16()),
        metadata: grpc::headers_to_metadata(&parts.headers),
    };
    let _ = response.head(head);
    if flush(&mut send, &mut response).await.is_err() {
        return None;
    }
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(deadline_at.into()) => {
                    return Some(finish_with(&mut send, &mut response, Code::DeadlineExceeded, "deadline exceeded").await);
            }
            _ = send.stopped() => {
                return Some(Code::Cancelled);
            }
        };
        match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => {
                    let _ = response.data(data);
                    if flush(&mut send, &mut response).await.is_err() {
                        return None;
                    }
                }
                Err(f) => {
                    if let Ok(trailers) = f.into_trailers() {
                        let t = Trailers {
                            metadata: grpc::headers_to_metadata(&trailers),
                        };
                        let code = t.grpc_status().map(Code::from_i32).unwrap_or(Code::Unknown);
                        let _ = response.trailers(t);
                        let _ = flush(&mut send, &mut response).await;
                        return Some(code);
                    }
                }
            },
            Some(Err(e)) => {
                let msg = format!(
                    "upstream service {name:?} failed mid-call: {}",
                    error_chain(&e)
                );
                return Some(finish_with(&mut send, &mut response, Code::Unavailable, &msg).await);
            }
            None => {
                // A response without trailers is not valid gRPC; report it rather than hang.
                return Some(
                    finish_with(
                        &mut send,
                        &mut response,
                        Code::Internal,
                        "upstream response ended without trailers",
                    )
                    .await,
                );
            }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    tether_runtime::report::chain(e)
}

/// Gateway → upstream: the Data frames as the request body, read as the HTTP/2 client polls
/// it. A reset from the gateway (or `abort`) fails the body, which makes the HTTP/2 client
/// reset the upstream stream.
fn request_body(
    request: Reader<RequestRecv>,
    abort: CancellationToken,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
    futures::stream::unfold(Some((request, abort)), |state| async move {
        let (mut request, abort) = state?;
        let event = tokio::select! {
            e = request.next() => e,
            _ = abort.cancelled() => return Some((Err("the call ended".into()), None)),
        };
        let failure: BoxError = match event {
            Ok(RequestEvent::Data(b)) => return Some((Ok(Frame::data(b)), Some((request, abort)))),
            Ok(RequestEvent::Finished) => return None,
            // The machine stopped the stream (PROTOCOL_ERROR).
            Ok(RequestEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected {
                got,
                ..
            }))) => format!("unexpected {got} frame in request").into(),
            Ok(RequestEvent::Failed(e)) => Box::new(e),
            Err(e) => Box::new(e),
        };
        Some((Err(failure), None))
    })
}

/// Answers the TCP stream: `Code::Ok` accepts it, anything else refuses it (and ends it); ends
/// the stream's span (its opening) with the same code.
async fn open_result(
    (send, span): (&mut SendStream, &mut Option<CallSpan>),
    machine: &mut AgentTcp,
    code: Code,
    message: String,
) {
    if let Some(s) = span.take() {
        s.end(code as i32, "");
    }
    let _ = if code == Code::Ok {
        machine.accept()
    } else {
        machine.refuse(code as i32, message)
    };
    let _ = flush(send, machine).await;
    metrics::counter!("tether_agent_relay_calls_total", "kind" => "tcp", "code" => format!("{code:?}")).increment(1);
}

async fn tcp(reader: Reader<AgentTcp>, mut send: SendStream, services: &Services) {
    let (recv, mut machine) = reader.into_parts();
    let name = service_name(machine.header(), services).to_owned();
    // The agent's span of the stream's opening (its connect to the service), child of the
    // gateway's.
    let mut span = Some(services.telemetry.span(
        format!("connect {name}"),
        SpanKind::Client,
        &machine.header().trace_context,
        vec![
            KeyValue::new("tether.agent", services.agent.clone()),
            KeyValue::new("tether.service", name.clone()),
        ],
    ));
    let address = match services.map.get(&name) {
        Some(Upstream::Tcp { address }) => address.clone(),
        Some(Upstream::Grpc { .. }) => {
            let msg = format!(
                "service {name:?} on agent {} is a gRPC service, not TCP",
                services.agent
            );
            return open_result(
                (&mut send, &mut span),
                &mut machine,
                Code::FailedPrecondition,
                msg,
            )
            .await;
        }
        None => {
            tracing::info!(service = %name, "refused: TCP service not in the allow-list");
            let msg = format!(
                "service {name:?} is not allow-listed on agent {}",
                services.agent
            );
            return open_result(
                (&mut send, &mut span),
                &mut machine,
                Code::PermissionDenied,
                msg,
            )
            .await;
        }
    };
    let stream = match tokio::time::timeout(
        TCP_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(&address),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let msg = format!("upstream service {name:?} ({address}) is unavailable: {e}");
            return open_result((&mut send, &mut span), &mut machine, Code::Unavailable, msg).await;
        }
        Err(_) => {
            let msg = format!(
                "upstream service {name:?} ({address}) did not accept within {TCP_CONNECT_TIMEOUT:?}"
            );
            return open_result((&mut send, &mut span), &mut machine, Code::Unavailable, msg).await;
        }
    };
    let _ = stream.set_nodelay(true);
    open_result(
        (&mut send, &mut span),
        &mut machine,
        Code::Ok,
        String::new(),
    )
    .await;
    let Ok((mut to_gateway, from_gateway)) = machine.into_raw() else {
        return;
    };
    let mut from_gateway = Reader::new(recv, from_gateway);
    let (mut rd, mut wr) = stream.into_split();
    // Gateway → service; the gateway finishing its side half-closes ours.
    let inbound = async move {
        // What has already arrived goes to the service in one gathered write: QUIC hands bytes
        // over a packet (~1.4 KB) at a time, and a write each would be a TCP segment each.
        let mut gathered = Gathered::default();
        let mut next = None;
        loop {
            let event = match next.take() {
                Some(e) => e,
                None => from_gateway.next().await,
            };
            match event {
                Ok(TcpEvent::Data(b)) => {
                    gathered.push(b);
                    while gathered.has_room(TCP_WRITE_GATHER) {
                        match from_gateway.try_next() {
                            Some(Ok(TcpEvent::Data(b))) => gathered.push(b),
                            Some(other) => {
                                next = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    if wr.write_all_buf(&mut gathered).await.is_err() {
                        from_gateway.half_mut().stop(ErrorCode::CANCELLED);
                        from_gateway.apply_stop();
                        return;
                    }
                }
                Ok(TcpEvent::Finished) => {
                    let _ = wr.shutdown().await;
                    return;
                }
                Ok(_) | Err(_) => return,
            }
        }
    };
    // Service → gateway; the service closing its side finishes the stream.
    let outbound = async move {
        // Read straight into the buffer the stream sends from: no copy on the way to QUIC.
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.reserve(TCP_READ_CHUNK);
            let done = match rd.read_buf(&mut buf).await {
                Ok(0) => to_gateway.finish().is_ok(),
                Ok(_) => to_gateway.write(buf.split().freeze()).is_err(),
                Err(_) => {
                    to_gateway.reset(ErrorCode::CANCELLED);
                    true
                }
            };
            if flush(&mut send, &mut to_gateway).await.is_err() || done {
                return;
            }
        }
    };
    tokio::join!(inbound, outbound);
}
