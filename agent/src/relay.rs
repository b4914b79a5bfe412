//! Feature layer: serves the streams a gateway opens on a session — relayed gRPC calls and TCP
//! streams — to the upstreams in the agent's service map, and the built-in `agent` service;
//! command deliveries go to [`crate::commands`].
//!
//! The service map is the allow-list: a stream naming anything else is refused here, before any
//! connection is made. Cancellation travels both ways: a gateway reset cancels the upstream call
//! (its h2 stream is reset), and a deadline passing does the same.
//!
//! The map is live ([`Services::reload`]): a call looks its service up once, in the map of the
//! moment, and runs on until it ends, unless its service leaves the map (or changes) or the
//! agent pauses ([`crate::pause`]): then it is ended at once, a call with its status, a TCP
//! stream with a reset. Each call and stream is handed to the [`Ledger`] as it ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime};

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

use crate::config::{AgentConfig, ServiceConfig, ServiceKind};
use crate::error::{AgentError, UpstreamError};
use crate::ledger::{Entry, Ledger, Relayed};
use crate::pause::{PauseSwitch, refusal};

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

/// One entry of the live map: its upstream and the config it was built from.
struct Entrant {
    upstream: Upstream,
    config: ServiceConfig,
}

/// The allow-list of the moment (opaque outside this module: see [`Services::subscribe`]).
pub struct Live {
    map: BTreeMap<String, Arc<Entrant>>,
    default: String,
}

/// The agent's allow-listed upstreams.
pub struct Services {
    live: tokio::sync::watch::Sender<Arc<Live>>,
    builtin: GrpcService,
    agent: String,
    tenant: String,
    commands: Arc<crate::commands::Executor>,
    telemetry: Telemetry,
    pause: Arc<PauseSwitch>,
    ledger: Ledger,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.live.borrow().clone();
        f.debug_struct("Services")
            .field("names", &live.map.keys().collect::<Vec<_>>())
            .field("default", &live.default)
            .finish()
    }
}

/// Bytes of one call or stream, each way.
#[derive(Debug, Default)]
struct Counts {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Counts {
    fn inbound(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, AtomicOrdering::Relaxed);
    }

    fn outbound(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, AtomicOrdering::Relaxed);
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
        let map = build(cfg, None)?;
        let tenant = agent.split_once('/').map_or("", |(t, _)| t).to_owned();
        Ok(Services {
            live: tokio::sync::watch::channel(Arc::new(Live {
                map,
                default: cfg.default_service.clone(),
            }))
            .0,
            builtin,
            agent,
            tenant,
            commands,
            telemetry: Telemetry::disabled(),
            pause: Arc::new(PauseSwitch::new(None, Ledger::disabled())),
            ledger: Ledger::disabled(),
        })
    }

    /// Refuses calls while `pause` says so, and records every call and stream in `ledger`.
    pub fn with_control(mut self, pause: Arc<PauseSwitch>, ledger: Ledger) -> Services {
        self.pause = pause;
        self.ledger = ledger;
        self
    }

    /// Replaces the allow-list with `cfg`'s `services` and `default_service`: an entry whose
    /// config did not change keeps its client (and its calls in flight); one that left or
    /// changed ends its calls and streams at once. Returns what changed, by key; on an error
    /// (naming the service) nothing changes.
    pub fn reload(&self, cfg: &AgentConfig) -> Result<Vec<String>, AgentError> {
        let old = self.live.borrow().clone();
        let map = build(cfg, Some(&old.map))?;
        let mut changed = Vec::new();
        for (name, e) in &map {
            match old.map.get(name) {
                None => changed.push(format!("services.{name} (added)")),
                Some(o) if !Arc::ptr_eq(o, e) => changed.push(format!("services.{name} (changed)")),
                Some(_) => {}
            }
        }
        for name in old.map.keys().filter(|n| !map.contains_key(*n)) {
            changed.push(format!("services.{name} (removed)"));
        }
        if old.default != cfg.default_service {
            changed.push("default_service".into());
        }
        if !changed.is_empty() {
            self.live.send_replace(Arc::new(Live {
                map,
                default: cfg.default_service.clone(),
            }));
        }
        Ok(changed)
    }

    /// The allow-list as a gateway is told of it: names and kinds, never addresses or
    /// credentials ([`tunnel_proto::message::Hello::services`]).
    pub fn announced(&self) -> Vec<tunnel_proto::message::ServiceEntry> {
        self.catalog()
            .into_iter()
            .map(|(name, kind)| tunnel_proto::message::ServiceEntry { name, kind })
            .collect()
    }

    /// Follows the allow-list: changed when a reload replaced it (read it with
    /// [`Services::announced`]).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Live>> {
        self.live.subscribe()
    }

    /// Service names and what each speaks (`grpc`, `tcp`), for `AgentInfo`.
    pub fn catalog(&self) -> BTreeMap<String, String> {
        self.live
            .borrow()
            .map
            .iter()
            .map(|(n, e)| {
                let kind = match e.config.kind {
                    ServiceKind::Grpc => "grpc",
                    ServiceKind::Tcp => "tcp",
                };
                (n.clone(), kind.to_owned())
            })
            .collect()
    }

    /// Resolves when a call to `name` (its entry `entry`; `None`: the built-in, never
    /// ended) must end: the agent paused, or the entry left the allow-list or changed.
    async fn ended(&self, name: &str, entry: Option<Arc<Entrant>>) -> (Code, String) {
        let Some(entry) = entry else {
            return std::future::pending().await;
        };
        let mut live = self.live.subscribe();
        let mut pause = self.pause.subscribe();
        loop {
            if let Some(r) = pause.borrow_and_update().clone() {
                return (Code::FailedPrecondition, refusal(&r));
            }
            let still = live
                .borrow_and_update()
                .map
                .get(name)
                .is_some_and(|e| Arc::ptr_eq(e, &entry));
            if !still {
                return (
                    Code::PermissionDenied,
                    format!(
                        "service {name:?} was removed from the allow-list of agent {} (its config was reloaded)",
                        self.agent
                    ),
                );
            }
            tokio::select! {
                r = pause.changed() => if r.is_err() { return std::future::pending().await },
                r = live.changed() => if r.is_err() { return std::future::pending().await },
            }
        }
    }
}

/// Builds the entries of `cfg.services`, reusing those of `old` whose config is the same.
fn build(
    cfg: &AgentConfig,
    old: Option<&BTreeMap<String, Arc<Entrant>>>,
) -> Result<BTreeMap<String, Arc<Entrant>>, AgentError> {
    let mut map = BTreeMap::new();
    for (name, s) in &cfg.services {
        if let Some(e) = old.and_then(|o| o.get(name)).filter(|e| e.config == *s) {
            map.insert(name.clone(), e.clone());
            continue;
        }
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
                    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
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
        map.insert(
            name.clone(),
            Arc::new(Entrant {
                upstream: up,
                config: s.clone(),
            }),
        );
    }
    Ok(map)
}

impl Services {
    /// Makes a span of every relayed call and stream with `telemetry` (`[telemetry]`).
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Services {
        self.telemetry = telemetry;
        self
    }

    /// Service names, for `AgentInfo`.
    pub fn names(&self) -> Vec<String> {
        self.live.borrow().map.keys().cloned().collect()
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
                        KeyValue::new("tether.service", service_name(&header, &services)),
                    ],
                );
                header.trace_context = span.context();
                let request = Reader::new(recv, request);
                let (start, began) = (SystemTime::now(), Instant::now());
                let counts = Arc::new(Counts::default());
                let noted = services.ledger.is_enabled().then(|| {
                    (
                        header.caller.clone(),
                        service_name(&header, &services),
                        header.method.clone(),
                    )
                });
                // Counted once here: every way a call ends gives its code (none when the
                // gateway's stream broke before an answer could be sent).
                let code = rpc(header, request, response, send, &services, &counts).await;
                if let Some(code) = code {
                    metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => format!("{code:?}")).increment(1);
                    span.end(code as i32, "");
                }
                if let Some((caller, service, method)) = noted {
                    services.ledger.record(Entry::Call(Relayed {
                        caller,
                        tenant: services.tenant.clone(),
                        service,
                        method,
                        status: code.map_or_else(|| "Reset".to_owned(), |c| format!("{c:?}")),
                        bytes_in: counts.bytes_in.load(AtomicOrdering::Relaxed),
                        bytes_out: counts.bytes_out.load(AtomicOrdering::Relaxed),
                        start,
                        duration_ms: began.elapsed().as_secs_f64() * 1000.0,
                    }));
                }
            }
            Accepted::Tcp(machine) => {
                let (start, began) = (SystemTime::now(), Instant::now());
                let counts = Counts::default();
                let noted = services.ledger.is_enabled().then(|| {
                    (
                        machine.header().caller.clone(),
                        service_name(machine.header(), &services),
                    )
                });
                let code = tcp(Reader::new(recv, machine), send, &services, &counts).await;
                if let Some((caller, service)) = noted {
                    services.ledger.record(Entry::Stream(Relayed {
                        caller,
                        tenant: services.tenant.clone(),
                        service,
                        method: String::new(),
                        status: format!("{code:?}"),
                        bytes_in: counts.bytes_in.load(AtomicOrdering::Relaxed),
                        bytes_out: counts.bytes_out.load(AtomicOrdering::Relaxed),
                        start,
                        duration_ms: began.elapsed().as_secs_f64() * 1000.0,
                    }));
                }
            }
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

fn service_name(header: &StreamHeader, services: &Services) -> String {
    if header.service.is_empty() {
        services.live.borrow().default.clone()
    } else {
        header.service.clone()
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
    counts: &Arc<Counts>,
) -> Option<Code> {
    let name = service_name(&header, services);
    // The built-in service answers while paused: it is how the vendor sees the pause.
    if name != BUILTIN
        && let Some(reason) = services.pause.reason()
    {
        let msg = refusal(&reason);
        return Some(finish_with(&mut send, &mut response, Code::FailedPrecondition, &msg).await);
    }
    let live = services.live.borrow().clone();
    let entry = live.map.get(&name).filter(|_| name != BUILTIN).cloned();
    let (svc, address) = match entry.as_ref().map(|e| &e.upstream) {
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
        request_body(request, abort, counts.clone()),
    )));
    // Ends the call when the agent pauses or the service leaves the allow-list.
    let ended = services.ended(&name, entry);
    tokio::pin!(ended);
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
        (code, msg) = &mut ended => {
            return Some(finish_with(&mut send, &mut response, code, &msg).await);
        }
    };
    // The deadline passed while the upstream answered: the HTTP/2 client's own grpc-timeout
    // error, or the upstream enforcing the grpc-timeout it was sent and calling it CANCELLED
    // (as tonic's server does). For the caller, its deadline passed.
    let expired = deadline.is_some_and(|d| Instant::now() + Duration::from_millis(5) >= d);
    let upstream_gave_up = match &resp {
        Err(_) => true,
        Ok(r) => r
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"1"),
    };
    if expired && upstream_gave_up {
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
    let resp = match resp {
        Ok(r) => r,
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
            (code, msg) = &mut ended => {
                return Some(finish_with(&mut send, &mut response, code, &msg).await);
            }
        };
        match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => {
                    counts.outbound(data.len());
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
    counts: Arc<Counts>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
    futures::stream::unfold(Some((request, abort, counts)), |state| async move {
        let (mut request, abort, counts) = state?;
        let event = tokio::select! {
            e = request.next() => e,
            _ = abort.cancelled() => return Some((Err("the call ended".into()), None)),
        };
        let failure: BoxError = match event {
            Ok(RequestEvent::Data(b)) => {
                counts.inbound(b.len());
                return Some((Ok(Frame::data(b)), Some((request, abort, counts))));
            }
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
) -> Code {
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
    code
}

/// Serves a TCP stream; returns how it ended (`Ok`: opened and ended by either side).
async fn tcp(
    reader: Reader<AgentTcp>,
    mut send: SendStream,
    services: &Services,
    counts: &Counts,
) -> Code {
    let (recv, mut machine) = reader.into_parts();
    let name = service_name(machine.header(), services);
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
    if let Some(reason) = services.pause.reason() {
        let msg = refusal(&reason);
        return open_result(
            (&mut send, &mut span),
            &mut machine,
            Code::FailedPrecondition,
            msg,
        )
        .await;
    }
    let entry = services.live.borrow().map.get(&name).cloned();
    let address = match entry.as_ref().map(|e| &e.upstream) {
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
    let ended = services.ended(&name, entry);
    tokio::pin!(ended);
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
        return Code::Ok;
    };
    // Set when the stream must end (paused, service removed): both directions stop, the
    // gateway's side is reset.
    let cut = CancellationToken::new();
    let mut from_gateway = Reader::new(recv, from_gateway);
    let (mut rd, mut wr) = stream.into_split();
    // Gateway → service; the gateway finishing its side half-closes ours.
    let (cut_in, cut_out) = (cut.clone(), cut.clone());
    let inbound = async move {
        // What has already arrived goes to the service in one gathered write: QUIC hands bytes
        // over a packet (~1.4 KB) at a time, and a write each would be a TCP segment each.
        let mut gathered = Gathered::default();
        let mut next = None;
        loop {
            let event = match next.take() {
                Some(e) => e,
                None => tokio::select! {
                    e = from_gateway.next() => e,
                    _ = cut_in.cancelled() => {
                        from_gateway.half_mut().stop(ErrorCode::CANCELLED);
                        from_gateway.apply_stop();
                        return;
                    }
                },
            };
            match event {
                Ok(TcpEvent::Data(b)) => {
                    counts.inbound(b.len());
                    gathered.push(b);
                    while gathered.has_room(TCP_WRITE_GATHER) {
                        match from_gateway.try_next() {
                            Some(Ok(TcpEvent::Data(b))) => {
                                counts.inbound(b.len());
                                gathered.push(b)
                            }
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
            let read = tokio::select! {
                r = rd.read_buf(&mut buf) => r,
                _ = cut_out.cancelled() => {
                    to_gateway.reset(ErrorCode::CANCELLED);
                    let _ = flush(&mut send, &mut to_gateway).await;
                    return;
                }
            };
            let done = match read {
                Ok(0) => to_gateway.finish().is_ok(),
                Ok(n) => {
                    counts.outbound(n);
                    to_gateway.write(buf.split().freeze()).is_err()
                }
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
    let mut code = Code::Ok;
    let both = async { tokio::join!(inbound, outbound) };
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => {}
        (c, msg) = &mut ended => {
            tracing::info!(service = %name, "{msg}: the TCP stream is ended");
            code = c;
            cut.cancel();
            both.await;
        }
    }
    code
}
