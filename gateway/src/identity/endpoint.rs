//! Transport layer of enrollment: the agent-facing `Enroll` endpoint, a side door on the
//! tunnel's TCP port (ALPN `tether-enroll/1`). TLS is server-authenticated only: the agent
//! verifies the gateway against its CA bundle and holds no certificate yet.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tether_api::v1::enrollment_server::EnrollmentServer;
use tokio::net::TcpStream;
use tonic::Status;
use tower::ServiceExt;

use crate::config::GatewayConfig;
use crate::identity::enrollment::{ENROLL_ALPN, Enrollment, EnrollmentApi, Face, Remote};
use crate::metrics::{IdleIn, Limit, count_idle_timeout, count_rejection};
use crate::quota::{Full, Shares};
use crate::tls::{Listener, TlsMaterial, TlsSetupError};

/// Largest `Enroll` request accepted (a CSR is well under 2 KiB).
const MAX_REQUEST: usize = 16 * 1024;

/// Enrollment connections open at once, idle ones included; more are dropped at the
/// ClientHello (`tether_gateway_limit_rejections_total{limit="enrollment_connections"}`).
const MAX_CONNECTIONS: usize = 1024;

/// Enrollment connections one source address may have open at once: an address cannot take
/// the places of others (and agents behind one NAT still enroll many at a time; one refused
/// retries with its backoff).
pub const CONNECTIONS_PER_ADDRESS: usize = 32;

/// Time a connection has, once TLS is done, to send its request; then it is closed.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Time the one request of a connection has to arrive whole and be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `Enroll` on TLS connections the tunnel's TCP accept loop hands over (their
/// ClientHello offered [`ENROLL_ALPN`]).
///
/// Nothing an idle connection holds can keep a real agent out: a connection takes one of
/// [`MAX_CONNECTIONS`] places, at most [`CONNECTIONS_PER_ADDRESS`] per source address; once TLS
/// is done it must send its request within [`FIRST_REQUEST_TIMEOUT`]; it carries one request
/// ([`REQUEST_TIMEOUT`] to arrive and be answered) and is then closed; and the work of an
/// enrollment is admitted only once its request is whole ([`MAX_ISSUING`], per address
/// [`ISSUING_PER_ADDRESS`]).
pub struct EnrollEndpoint {
    tls: Arc<rustls::ServerConfig>,
    routes: tonic::service::Routes,
    connections: Arc<Shares<IpAddr>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for EnrollEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollEndpoint").finish_non_exhaustive()
    }
}

impl EnrollEndpoint {
    /// TLS 1.3 with the gateway's certificate, no client certificate, ALPN `tether-enroll/1`.
    pub fn new(
        cfg: &GatewayConfig,
        material: &TlsMaterial,
        inner: Arc<Enrollment>,
    ) -> Result<Self, TlsSetupError> {
        let tls = material.server_config(
            Listener::Enrollment,
            &[&rustls::version::TLS13],
            None,
            ENROLL_ALPN,
        )?;
        let svc = EnrollmentServer::new(EnrollmentApi::new(inner, Face::Agent))
            .max_decoding_message_size(MAX_REQUEST);
        Ok(EnrollEndpoint {
            tls: Arc::new(tls),
            routes: tonic::service::Routes::new(svc).prepare(),
            connections: Shares::new(MAX_CONNECTIONS, CONNECTIONS_PER_ADDRESS),
            handshake_timeout: cfg.tunnel.handshake_timeout,
        })
    }

    /// Enrollment connections open now.
    pub fn connections(&self) -> usize {
        self.connections.taken()
    }

    /// Completes the TLS handshake and serves one HTTP/2 (gRPC) request on it; see the type's
    /// docs for the bounds.
    pub async fn serve(
        self: Arc<Self>,
        start: tokio_rustls::StartHandshake<TcpStream>,
        remote: SocketAddr,
    ) {
        let _place = match self.connections.take(&remote.ip()) {
            Ok(p) => p,
            Err(full) => {
                count_rejection(Limit::EnrollmentConnections);
                metrics::counter!("tether_gateway_enrollments_total", "result" => "busy")
                    .increment(1);
                tracing::debug!(%remote, per_address = (full == Full::Key),
                    "too many enrollment connections; dropping one");
                return;
            }
        };
        let tls =
            match tokio::time::timeout(self.handshake_timeout, start.into_stream(self.tls.clone()))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "enrollment TLS handshake failed");
                    return;
                }
                Err(_) => {
                    count_idle_timeout(IdleIn::Enrollment);
                    tracing::info!(%remote, "enrollment TLS handshake timed out");
                    return;
                }
            };
        let routes = self.routes.clone();
        let (arrived, mut first) = tokio::sync::watch::channel(false);
        let svc =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                if arrived.send_replace(true) {
                    count_rejection(Limit::EnrollmentRequestsPerConnection);
                    let status =
                        Status::resource_exhausted("one request per enrollment connection");
                    return futures::future::Either::Left(std::future::ready(Ok(
                        status.into_http()
                    )));
                }
                req.extensions_mut().insert(Remote(remote));
                futures::future::Either::Right(routes.clone().oneshot(req))
            });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.max_concurrent_streams(1);
        let conn = builder.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let waited = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, first.wait_for(|a| *a));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "enrollment connection ended");
                }
                return;
            }
            w = waited => {
                if !matches!(w, Ok(Ok(_))) {
                    count_idle_timeout(IdleIn::Enrollment);
                    tracing::debug!(%remote, "no enrollment request in {FIRST_REQUEST_TIMEOUT:?}; closing");
                    return;
                }
            }
        }
        // The one request (a second one is refused above): it has this long, and then the
        // connection goes, whatever the client does.
        match tokio::time::timeout(REQUEST_TIMEOUT, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%remote, error = %e, "enrollment connection ended"),
            Err(_) => {
                count_idle_timeout(IdleIn::Enrollment);
                tracing::debug!(%remote, "enrollment request not done in {REQUEST_TIMEOUT:?}; closed");
            }
        }
    }
}
