//! Transport layer: the northbound listener. TLS (a client certificate asked for, required
//! per request by `auth` unless a bearer token or a console session stands in) and HTTP/2,
//! or HTTP/1.1 for browsers on the console (by ALPN, or by the first bytes when the client
//! names no protocol), served with hyper directly rather than tonic's `Server`.
//!
//! Why not tonic's server: it enforces `grpc-timeout` in a layer outside every service and
//! answers an expired call with `CANCELLED "Timeout expired"`; the relay must own deadlines
//! end to end and answer `DEADLINE_EXCEEDED`, as the gRPC spec says. The generated services
//! still run unchanged, as tonic `Routes`.
//!
//! Each request carries the caller's certificate chain as a [`PeerCerts`] extension; who the
//! caller is and what it may do is decided above this layer (`auth`), which tells the
//! connection through [`MarkAuthenticated`] when a call got past it.
//!
//! What one caller can hold: connections are counted from `accept` (`Connections`: in total
//! and per source address, refused at once beyond either); TLS must finish within
//! `handshake_timeout`; a connection on which no call got past authentication within
//! `unauthenticated_timeout` of its handshake is closed (with bearer tokens on, anyone can
//! finish TLS without a certificate); after that, `idle_timeout` without a call open.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use tether_runtime::CancellationToken;
use tether_runtime::accept::Acceptor;
use tether_runtime::logging::LogThrottle;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::metrics::{IdleIn, Limit, count_idle_timeout, count_rejection};
pub use crate::northbound::live_connections::LiveConnections;
use crate::tls::{Listener, TlsMaterial, TlsSetupError};

/// The caller's client-certificate chain, in every northbound request's extensions.
#[derive(Clone, Debug)]
pub struct PeerCerts(pub Arc<Vec<CertificateDer<'static>>>);

/// How the listener bounds what callers may hold (from `[limits]`).
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Time allowed for a caller's TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no call open for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// A connection on which no call got past authentication this long after its TLS
    /// handshake is closed (GOAWAY).
    pub unauthenticated_timeout: Duration,
    /// Largest request header list answered normally; a larger one (up to twice this, which
    /// HTTP/2 enforces itself) gets RESOURCE_EXHAUSTED.
    pub max_header_list_size: u32,
    /// Connections open at once; beyond it a new one is closed before TLS.
    pub max_connections: u32,
    /// Connections open at once from one source address.
    pub max_connections_per_address: u32,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unauthenticated_timeout: Duration::from_secs(10),
            max_header_list_size: 16 << 10,
            max_connections: 4096,
            max_connections_per_address: 256,
        }
    }
}

/// In every request's extensions: tells the request's connection that one of its calls got
/// past authentication (see [`MarkAuthenticated`]).
#[derive(Clone, Debug)]
pub struct ConnectionAuth(Arc<tokio::sync::watch::Sender<bool>>);

impl ConnectionAuth {
    /// Marks the connection authenticated (the console does, for a request with a session).
    pub fn mark(&self) {
        if !*self.0.borrow() {
            self.0
                .send_if_modified(|authenticated| !std::mem::replace(authenticated, true));
        }
    }
}

/// Wraps the services behind authentication: a request that reaches it was authenticated, so
/// its connection is no longer held to `unauthenticated_timeout`. (The listener sits below
/// authentication and cannot tell a refusal from an answer by itself.)
#[derive(Clone, Debug)]
pub struct MarkAuthenticated<S>(pub S);

impl<S, B> tower::Service<http::Request<B>> for MarkAuthenticated<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(auth) = req.extensions().get::<ConnectionAuth>() {
            auth.mark();
        }
        self.0.call(req)
    }
}

/// TLS for the northbound listener: the gateway's certificate, client certificates verified
/// against the CA (which identities may call is decided per request), ALPN h2 and http/1.1
/// (browsers on the console at `/ui/`), TLS 1.2 or 1.3. A certificate is asked for but not
/// required at the handshake: a browser comes without one, and so may a caller with a bearer
/// token (a certificate that is sent is still verified). A request without a certificate, a
/// token or a console session is refused by `auth` before it reaches any service. No session
/// resumption, as on the tunnel ([`TlsMaterial::server_config`]): an expired caller
/// certificate, or one of a CA a rotation removed, would keep working for as long as its
/// session was cached.
pub fn tls_config(material: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder(material.roots())
        .allow_unauthenticated()
        .build()
        .map_err(|source| TlsSetupError::Verifier {
            listener: Listener::Northbound,
            source,
        })?;
    let mut tls = material.server_config(
        Listener::Northbound,
        rustls::DEFAULT_VERSIONS,
        Some(verifier),
        b"h2",
    )?;
    tls.alpn_protocols.push(b"http/1.1".to_vec());
    Ok(Arc::new(tls))
}

/// How long a connection closed for idling may take to finish its GOAWAY before it is dropped
/// (one that never sent its HTTP/2 preface never finishes it).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Concurrent calls per caller connection (each relayed call is one stream).
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// Largest HTTP/2 frame accepted from a caller (the default is 16 KiB): a relayed stream's
/// bytes arrive in a quarter of the frames, each one wake-up of the call's task.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;

/// The request body callers send.
pub type Incoming = hyper::body::Incoming;

/// Serves `service` (the northbound routes behind authentication) on `listener` until
/// `shutdown`, then lets open calls finish (graceful h2 shutdown) and returns once every
/// connection has closed: the caller bounds how long it waits for that. An empty certificate chain in [`PeerCerts`] means the caller sent none (allowed only
/// when the TLS config does not require one). Connections with a certificate are kept in
/// `live` while they are open.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: S,
    limits: ListenerLimits,
    live: Arc<LiveConnections>,
    shutdown: CancellationToken,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut listener = Acceptor::new(listener, "northbound").with_hint(
        "out of file descriptors: raise the process's open-file limit (ulimit -n, systemd \
         LimitNOFILE) or lower limits.northbound_connections",
    );
    let connections = Connections::new(limits.max_connections, limits.max_connections_per_address);
    // Refusals are logged at most every 10 s: whoever is refused can retry at any rate.
    let mut refusals = LogThrottle::new(Duration::from_secs(10));
    // Connections open, each counted until its task ends.
    let (open, mut open_rx) = tokio::sync::watch::channel(0usize);
    let open = Arc::new(open);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => {
                drop(listener);
                let _ = open_rx.wait_for(|n| *n == 0).await;
                return;
            }
            a = listener.accept() => a,
        };
        let slot = match connections.open(peer.ip()) {
            Ok(slot) => slot,
            Err(limit) => {
                if let Some(held_back) = refusals.allow(std::time::Instant::now()) {
                    tracing::warn!(%peer, limit = limit.as_str(), open = connections.open_now(),
                        refusals_since_last_warning = held_back,
                        "refusing a northbound connection: limits.{limit} reached");
                }
                // Dropped unanswered, before TLS: the cheapest refusal there is.
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, service, shutdown) = (acceptor.clone(), service.clone(), shutdown.clone());
        let live = live.clone();
        let counted = CallGuard::new(open.clone());
        tokio::spawn(async move {
            let (_slot, _counted) = (slot, counted);
            let stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "northbound TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        count_idle_timeout(IdleIn::NorthboundTls);
                        tracing::info!(%peer, "northbound TLS handshake timed out");
                        return;
                    }
                };
            // Browsers on the console may speak HTTP/1.1; gRPC is HTTP/2 only. A client that
            // named no protocol gets whichever its first bytes are.
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let certs = PeerCerts(Arc::new(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(<[_]>::to_vec)
                    .unwrap_or_default(),
            ));
            // Registered before any request is served, so a revocation cannot miss it.
            let registered = live.register(&certs);
            let revoked = async {
                match &registered {
                    Some(r) => r.close.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let (calls, mut calls_rx) = tokio::sync::watch::channel(0usize);
            let calls = Arc::new(calls);
            let (authenticated, mut authenticated_rx) = tokio::sync::watch::channel(false);
            let authenticated = ConnectionAuth(Arc::new(authenticated));
            let max_headers = limits.max_header_list_size;
            let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                let call = CallGuard::new(calls.clone());
                req.extensions_mut().insert(certs.clone());
                req.extensions_mut().insert(authenticated.clone());
                let too_big = header_list_size(req.headers()) > max_headers as usize;
                let service = service.clone();
                async move {
                    if too_big {
                        count_rejection(Limit::HeaderListSize);
                        let status = tonic::Status::resource_exhausted(format!(
                            "request headers are above {max_headers} bytes (limits.max_header_list_size)"
                        ));
                        let resp = status.into_http::<UnsyncBoxBody<bytes::Bytes, BoxError>>();
                        return Ok(resp.map(|b| Guarded::new(b, call)));
                    }
                    let mut resp = service.oneshot(req).await?;
                    size_status_to_resource_exhausted(resp.headers_mut());
                    Ok::<_, Infallible>(
                        resp.map(|b| Guarded::new(b.map_err(Into::into).boxed_unsync(), call)),
                    )
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(8 << 20)
                .max_frame_size(MAX_FRAME_SIZE)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .max_header_list_size(max_headers.saturating_mul(2));
            let builder = match alpn.as_deref() {
                Some(b"http/1.1") => builder.http1_only(),
                Some(_) => builder.http2_only(),
                None => builder,
            };
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let idle = async {
                loop {
                    // Wait for no call to be open, then for one to start within the timeout.
                    if calls_rx.wait_for(|n| *n == 0).await.is_err() {
                        return std::future::pending().await;
                    }
                    let started =
                        tokio::time::timeout(limits.idle_timeout, calls_rx.wait_for(|n| *n > 0));
                    if started.await.is_err() {
                        return;
                    }
                }
            };
            // Until a call gets past authentication; the idle timeout runs beside it.
            let unauthenticated = async {
                let authenticated = authenticated_rx.wait_for(|a| *a);
                let timed_out = tokio::time::timeout(limits.unauthenticated_timeout, authenticated)
                    .await
                    .is_err();
                if !timed_out {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "northbound connection ended");
                    }
                }
                _ = unauthenticated => {
                    count_idle_timeout(IdleIn::NorthboundUnauthenticated);
                    tracing::debug!(%peer, timeout = ?limits.unauthenticated_timeout,
                        "closing a northbound connection on which no caller authenticated");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await;
                }
                _ = idle => {
                    count_idle_timeout(IdleIn::NorthboundIdle);
                    tracing::debug!(%peer, timeout = ?limits.idle_timeout,
                        "closing an idle northbound connection");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await;
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                // Its certificate was revoked: dropped with every call it has open.
                _ = revoked => {
                    tracing::info!(%peer, "closing a revoked caller's connection");
                }
            }
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Header list size as HTTP/2 counts it (RFC 9113 §6.5.2): name, value and 32 bytes each.
fn header_list_size(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum()
}

/// One call open on a connection, from its request to the end of its response body (or one
/// connection open on the listener).
struct CallGuard(Arc<tokio::sync::watch::Sender<usize>>);

impl CallGuard {
    fn new(calls: Arc<tokio::sync::watch::Sender<usize>>) -> CallGuard {
        calls.send_modify(|n| *n += 1);
        CallGuard(calls)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its call counted until it ends, and says RESOURCE_EXHAUSTED
/// (as the gRPC spec does) where tonic answers a message over the size limit with
/// OUT_OF_RANGE, counting it.
struct Guarded {
    inner: UnsyncBoxBody<bytes::Bytes, BoxError>,
    _call: CallGuard,
}

impl Guarded {
    fn new(inner: UnsyncBoxBody<bytes::Bytes, BoxError>, call: CallGuard) -> Guarded {
        Guarded { inner, _call: call }
    }
}

/// Rewrites tonic's message-size status in `headers` (trailers, or a trailers-only response).
fn size_status_to_resource_exhausted(headers: &mut http::HeaderMap) {
    let is_size_error = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers.get("grpc-message").is_some_and(|m| {
            // tonic's "Error, decoded (or encoded) message length too large", percent-encoded.
            let m = m.as_bytes();
            [
                &b"message%20length%20too%20large"[..],
                b"message length too large",
            ]
            .iter()
            .any(|needle| m.windows(needle.len()).any(|w| w == *needle))
        });
    if is_size_error {
        count_rejection(Limit::MessageSize);
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        polled.map(|f| {
            f.map(|r| {
                r.map(|frame| match frame.into_trailers() {
                    Ok(mut t) => {
                        size_status_to_resource_exhausted(&mut t);
                        http_body::Frame::trailers(t)
                    }
                    Err(frame) => frame,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// === Connections ===

#[derive(Debug, Default)]
struct ConnectionCounts {
    total: u32,
    /// Entries leave at zero: the map never holds more addresses than open connections.
    per_address: HashMap<IpAddr, u32>,
}

/// Northbound connections open at once, capped in total (`limits.northbound_connections`) and
/// per source address (`limits.northbound_connections_per_address`). Checked as a connection
/// is accepted, before TLS: a refused one costs a file descriptor for an instant.
#[derive(Debug)]
pub struct Connections {
    total: u32,
    per_address: u32,
    counts: Mutex<ConnectionCounts>,
}

/// One open northbound connection; released when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    /// From `[limits]`.
    pub fn new(total: u32, per_address: u32) -> Arc<Connections> {
        Arc::new(Connections {
            total,
            per_address,
            counts: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, or the limit it would exceed (counted as a refusal):
    /// `northbound_connections_per_address` or `northbound_connections`.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Limit> {
        let mut c = self.lock();
        let limit = if c.per_address.get(&ip).copied().unwrap_or(0) >= self.per_address {
            Limit::NorthboundConnectionsPerAddress
        } else if c.total >= self.total {
            Limit::NorthboundConnections
        } else {
            c.total += 1;
            *c.per_address.entry(ip).or_default() += 1;
            return Ok(ConnectionSlot {
                connections: self.clone(),
                ip,
            });
        };
        drop(c);
        count_rejection(limit);
        Err(limit)
    }

    /// Connections open now.
    pub fn open_now(&self) -> u32 {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.connections.lock();
        c.total -= 1;
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn northbound_connections_are_capped_per_address_then_in_total() {
        let c = Connections::new(3, 2);
        let (x, y, z): (IpAddr, IpAddr, IpAddr) = (
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            [10, 0, 0, 3].into(),
        );
        let x1 = c.open(x).unwrap();
        let _x2 = c.open(x).unwrap();
        assert_eq!(
            c.open(x).unwrap_err(),
            Limit::NorthboundConnectionsPerAddress
        );
        assert_eq!(
            Limit::NorthboundConnectionsPerAddress.as_str(),
            "northbound_connections_per_address"
        );
        let _y1 = c.open(y).unwrap();
        assert_eq!(c.open(z).unwrap_err(), Limit::NorthboundConnections);
        drop(x1);
        assert_eq!(c.open_now(), 2);
        let _z1 = c.open(z).unwrap();
        assert_eq!(c.lock().per_address.len(), 3);
    }
}
