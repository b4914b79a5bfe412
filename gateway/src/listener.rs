//! Transport layer: the northbound listener. TLS (client certificates required) and HTTP/2,
//! served with hyper directly rather than tonic's `Server`.
//!
//! Why not tonic's server: it enforces `grpc-timeout` in a layer outside every service and
//! answers an expired call with `CANCELLED "Timeout expired"`; the relay must own deadlines
//! end to end and answer `DEADLINE_EXCEEDED`, as the gRPC spec says. The generated services
//! still run unchanged, as tonic `Routes`.
//!
//! Each request carries the caller's certificate chain as a [`PeerCerts`] extension; who the
//! caller is and what it may do is decided above this layer (`auth`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use tether_runtime::CancellationToken;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// The caller's client-certificate chain, in every northbound request's extensions.
#[derive(Clone, Debug)]
pub struct PeerCerts(pub Arc<Vec<CertificateDer<'static>>>);

/// Time allowed for a caller's TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent calls per caller connection (each relayed call is one stream).
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// The request body callers send.
pub type Incoming = hyper::body::Incoming;

/// Serves `service` (the northbound routes behind authentication) on `listener` until
/// `shutdown`, then lets open calls finish (graceful h2 shutdown) for as long as the process
/// waits. An empty certificate chain in [`PeerCerts`] means the caller sent none (allowed only
/// when the TLS config does not require one).
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: S,
    shutdown: CancellationToken,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "northbound accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, service, shutdown) = (acceptor.clone(), service.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "northbound TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "northbound TLS handshake timed out");
                        return;
                    }
                };
            let certs = PeerCerts(Arc::new(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(<[_]>::to_vec)
                    .unwrap_or_default(),
            ));
            let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(certs.clone());
                service.clone().oneshot(req)
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(8 << 20)
                .keep_alive_interval(Some(Duration::from_secs(30)));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "northbound connection ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
