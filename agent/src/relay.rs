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
use tether_runtime::grpc;
use tether_runtime::stream::{FramedRecv, StreamError, send_data, send_msg};
use tether_runtime::transport::{Link, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tunnel_proto::message::{OpenResult, ResponseHead, StreamHeader, StreamKind, Trailers};
use tunnel_proto::{ErrorCode, Message};

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
        })
    }

    /// Service names, for `AgentInfo`.
    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

/// What the session layer watches on one connection: streams in flight (a retired session
/// closes once they are done) and when the gateway last probed it. Read by the session's driver
/// only at its deadlines, and woken by [`LinkStats::idle`]: nothing here is polled.
#[derive(Debug)]
pub struct LinkStats {
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
            active: Default::default(),
            became_idle: tokio::sync::Notify::new(),
            since: Instant::now(),
            last_probe: Default::default(),
        }
    }
}

impl LinkStats {
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
    while let Some((send, recv)) = link.accept().await {
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
    let mut framed = FramedRecv::relay(recv);
    let header = match tokio::time::timeout(HEADER_TIMEOUT, framed.next()).await {
        Ok(Ok(Some(Message::StreamHeader(h)))) => h,
        Ok(Ok(Some(other))) => {
            tracing::warn!(
                frame = other.name(),
                "stream did not start with a StreamHeader"
            );
            send.reset(ErrorCode::PROTOCOL_ERROR);
            framed.stop(ErrorCode::PROTOCOL_ERROR);
            return;
        }
        Ok(Err(StreamError::Protocol(e))) => {
            tracing::warn!(error = %e, "bad stream header");
            send.reset(e.code());
            framed.stop(e.code());
            return;
        }
        Ok(_) | Err(_) => {
            send.reset(ErrorCode::CANCELLED);
            return;
        }
    };
    match header.stream_kind() {
        StreamKind::Rpc => rpc(header, framed, send, &services).await,
        StreamKind::Tcp => tcp(header, framed, send, &services).await,
        StreamKind::Command => services.commands.clone().serve(header, framed, send).await,
        StreamKind::Probe => {
            stats.probed();
            let ok = Message::OpenResult(OpenResult {
                ok: true,
                ..Default::default()
            });
            if send_msg(&mut send, &ok).await.is_ok() {
                let _ = send.finish();
            }
        }
        other => {
            tracing::warn!(kind = ?other, "stream kind not supported by this agent");
            let _ = send_msg(
                &mut send,
                &Message::Trailers(Trailers::status(
                    Code::Unimplemented as i32,
                    "stream kind not supported by this agent",
                )),
            )
            .await;
            let _ = send.finish();
        }
    }
}

fn service_name<'a>(header: &'a StreamHeader, services: &'a Services) -> &'a str {
    if header.service.is_empty() {
        &services.default
    } else {
        &header.service
    }
}

async fn finish_with(send: &mut SendStream, code: Code, message: &str) {
    metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => format!("{code:?}")).increment(1);
    let _ = send_msg(
        send,
        &Message::Trailers(Trailers::status(code as i32, message)),
    )
    .await;
    let _ = send.finish();
}

async fn rpc(header: StreamHeader, framed: FramedRecv, mut send: SendStream, services: &Services) {
    let name = service_name(&header, services).to_owned();
    let (svc, address) = match services.map.get(&name) {
        _ if name == BUILTIN => (services.builtin.clone(), "built-in".to_owned()),
        Some(Upstream::Grpc { svc, address }) => (svc.clone(), address.clone()),
        Some(Upstream::Tcp { .. }) => {
            let msg = format!(
                "service {name:?} on agent {} is a TCP service: use tether.v1.Streams/Open",
                services.agent
            );
            return finish_with(&mut send, Code::FailedPrecondition, &msg).await;
        }
        None => {
            tracing::info!(service = %name, method = %header.method, "refused: service not in the allow-list");
            let msg = format!(
                "service {name:?} is not allow-listed on agent {}",
                services.agent
            );
            return finish_with(&mut send, Code::PermissionDenied, &msg).await;
        }
    };
    let deadline =
        (header.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(header.timeout_ms));

    // The request: headers from metadata, body streamed from Data frames.
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let mut req = Request::new(tonic::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(body_rx),
    )));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = match header.method.parse() {
        Ok(u) => u,
        Err(_) => {
            return finish_with(
                &mut send,
                Code::InvalidArgument,
                "method is not a valid path",
            )
            .await;
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
    let request_pump = tokio::spawn(pump_request(framed, body_tx));

    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let deadline_at = deadline.unwrap_or(far);
    let call = async { svc.oneshot(req).await };
    let resp = tokio::select! {
        r = call => r,
        _ = tokio::time::sleep_until(deadline_at.into()) => {
            request_pump.abort();
            return finish_with(&mut send, Code::DeadlineExceeded, "deadline exceeded before the upstream answered").await;
        }
        _ = send.stopped() => {
            // The gateway cancelled: dropping the call resets the upstream's stream.
            request_pump.abort();
            metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => "Cancelled").increment(1);
            return;
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(_) if deadline.is_some_and(|d| Instant::now() + Duration::from_millis(5) >= d) => {
            // The HTTP/2 client enforces grpc-timeout itself; report it as what it is.
            request_pump.abort();
            return finish_with(
                &mut send,
                Code::DeadlineExceeded,
                "deadline exceeded before the upstream answered",
            )
            .await;
        }
        Err(e) => {
            request_pump.abort();
            let msg = format!(
                "upstream service {name:?} ({address}) is unavailable: {}",
                error_chain(e.as_ref())
            );
            tracing::warn!(service = %name, %address, "{msg}");
            return finish_with(&mut send, Code::Unavailable, &msg).await;
        }
    };
    let (parts, mut body) = resp.into_parts();
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only response (the call failed, or had nothing to say): relay it as such.
        request_pump.abort();
        let t = Trailers {
            metadata: grpc::headers_to_metadata(&parts.headers),
        };
        let code = t.grpc_status().map(Code::from_i32).unwrap_or(Code::Unknown);
        metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => format!("{code:?}")).increment(1);
        let _ = send_msg(&mut send, &Message::Trailers(t)).await;
        let _ = send.finish();
        return;
    }
    let head = ResponseHead {
        status: u32::from(parts.status.as_u16()),
        metadata: grpc::headers_to_metadata(&parts.headers),
    };
    if send_msg(&mut send, &Message::ResponseHead(head))
        .await
        .is_err()
    {
        request_pump.abort();
        return;
    }
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(deadline_at.into()) => {
                request_pump.abort();
                return finish_with(&mut send, Code::DeadlineExceeded, "deadline exceeded").await;
            }
            _ = send.stopped() => {
                request_pump.abort();
                metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => "Cancelled").increment(1);
                return;
            }
        };
        match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => {
                    if send_data(&mut send, data).await.is_err() {
                        request_pump.abort();
                        return;
                    }
                }
                Err(f) => {
                    if let Ok(trailers) = f.into_trailers() {
                        let t = Trailers {
                            metadata: grpc::headers_to_metadata(&trailers),
                        };
                        let code = t.grpc_status().map(Code::from_i32).unwrap_or(Code::Unknown);
                        metrics::counter!("tether_agent_relay_calls_total", "kind" => "grpc", "code" => format!("{code:?}")).increment(1);
                        let _ = send_msg(&mut send, &Message::Trailers(t)).await;
                        let _ = send.finish();
                        return;
                    }
                }
            },
            Some(Err(e)) => {
                request_pump.abort();
                let msg = format!(
                    "upstream service {name:?} failed mid-call: {}",
                    error_chain(&e)
                );
                return finish_with(&mut send, Code::Unavailable, &msg).await;
            }
            None => {
                // A response without trailers is not valid gRPC; report it rather than hang.
                return finish_with(
                    &mut send,
                    Code::Internal,
                    "upstream response ended without trailers",
                )
                .await;
            }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Gateway → upstream: Data frames into the request body. A reset from the gateway fails the
/// body, which makes the HTTP/2 client reset the upstream stream.
async fn pump_request(
    mut framed: FramedRecv,
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
) {
    loop {
        let msg = tokio::select! {
            m = framed.next() => m,
            _ = tx.closed() => return,
        };
        match msg {
            Ok(Some(Message::Data(b))) => {
                if tx.send(Ok(Frame::data(b))).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Ok(Some(other)) => {
                let _ = tx
                    .send(Err(
                        format!("unexpected {} frame in request", other.name()).into()
                    ))
                    .await;
                framed.stop(ErrorCode::PROTOCOL_ERROR);
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(Box::new(e))).await;
                return;
            }
        }
    }
}

async fn open_result(send: &mut SendStream, code: Code, message: String) {
    let r = OpenResult {
        ok: code == Code::Ok,
        code: code as i32,
        message,
    };
    let _ = send_msg(send, &Message::OpenResult(r)).await;
    if code != Code::Ok {
        let _ = send.finish();
    }
    metrics::counter!("tether_agent_relay_calls_total", "kind" => "tcp", "code" => format!("{code:?}")).increment(1);
}

async fn tcp(header: StreamHeader, framed: FramedRecv, mut send: SendStream, services: &Services) {
    let name = service_name(&header, services).to_owned();
    let address = match services.map.get(&name) {
        Some(Upstream::Tcp { address }) => address.clone(),
        Some(Upstream::Grpc { .. }) => {
            let msg = format!(
                "service {name:?} on agent {} is a gRPC service, not TCP",
                services.agent
            );
            return open_result(&mut send, Code::FailedPrecondition, msg).await;
        }
        None => {
            tracing::info!(service = %name, "refused: TCP service not in the allow-list");
            let msg = format!(
                "service {name:?} is not allow-listed on agent {}",
                services.agent
            );
            return open_result(&mut send, Code::PermissionDenied, msg).await;
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
            return open_result(&mut send, Code::Unavailable, msg).await;
        }
        Err(_) => {
            let msg = format!(
                "upstream service {name:?} ({address}) did not accept within {TCP_CONNECT_TIMEOUT:?}"
            );
            return open_result(&mut send, Code::Unavailable, msg).await;
        }
    };
    let _ = stream.set_nodelay(true);
    open_result(&mut send, Code::Ok, String::new()).await;
    let (mut recv, leftover) = framed.into_parts();
    let (mut rd, mut wr) = stream.into_split();
    // Gateway → service; the gateway finishing its side half-closes ours.
    let inbound = async move {
        if !leftover.is_empty() && wr.write_all(&leftover).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    if wr.write_all(&buf[..n]).await.is_err() {
                        recv.stop(ErrorCode::CANCELLED);
                        return;
                    }
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return;
                }
                Err(_) => return,
            }
        }
    };
    // Service → gateway; the service closing its side finishes the stream.
    let outbound = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    return;
                }
                Ok(n) => {
                    if send.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    send.reset(ErrorCode::CANCELLED);
                    return;
                }
            }
        }
    };
    tokio::join!(inbound, outbound);
}
