//! Transport layer: dialing the gateway over mutual-TLS QUIC, or over TLS + HTTP/2 on TCP (the
//! fallback where UDP is blocked, optionally through an HTTP CONNECT proxy).
//!
//! Each QUIC session gets its own UDP socket, bound to an ephemeral port and *connected* to the
//! gateway's address: the kernel then drops datagrams from anyone else, and the socket is not a
//! listener (`ss -lu` does not show it). Over TCP the agent is the HTTP/2 *server* on a
//! connection it dialed, so the gateway opens streams towards it exactly as over QUIC. Either
//! way the agent listens on nothing but its loopback ops port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::ServerName;
use tether_runtime::tls;
use tunnel_proto::ALPN;

use tether_runtime::stream::StreamError;
use tether_runtime::transport::{H2Link, Link};

use crate::config::{AgentConfig, ProxyConfigError, split_host_port};
use crate::identity::Identity;
use crate::proxy::{Proxy, ProxyError};

/// Why a dialer could not be built from the agent's identity and config: the operator's to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialerError {
    /// `[proxy]` (or `HTTPS_PROXY`) names no usable proxy.
    #[error("TLS: proxy: {0}")]
    Proxy(#[from] ProxyConfigError),
    /// rustls refused the agent's certificate and key.
    #[error("TLS: agent certificate and key: {0}")]
    Certificate(#[source] rustls::Error),
    /// The TLS configuration cannot carry QUIC.
    #[error("TLS: QUIC TLS config: {0}")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Why one dial of a gateway failed; the supervisor retries with backoff.
#[derive(Debug, thiserror::Error)]
#[error("gateway {gateway}: {failure}{}", self.hint())]
pub struct DialError {
    /// The address dialed.
    pub gateway: String,
    /// What failed.
    #[source]
    pub failure: DialFailure,
}

impl DialError {
    /// What a TLS refusal means for the operator, after the bare alert (empty when there is
    /// nothing to add).
    fn hint(&self) -> &'static str {
        use rustls::AlertDescription as A;
        if let Some(alert) = self.tls_alert() {
            return match alert {
                A::NoApplicationProtocol => {
                    ". The server there speaks TLS but not Tether's tunnel protocol (it refused ALPN tether/1): is this the gateway's northbound port (7444)? Agents dial the tunnel port (`tunnel.listen`, default 7443)"
                }
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::UnsupportedCertificate => {
                    ". The gateway does not accept this agent's certificate: is it issued by a CA in the gateway's `tls.ca`, for this trust domain, and unexpired?"
                }
                A::CertificateExpired => {
                    ". The gateway says this agent's certificate expired: issue a new one (`tether-gateway pki issue-agent`) or enroll again"
                }
                _ => "",
            };
        }
        // This agent refused the gateway's certificate (rustls says why only in words).
        let local = match &self.failure {
            DialFailure::Handshake(quinn::ConnectionError::TransportError(e)) => e.reason.clone(),
            DialFailure::Tcp(TcpFailure::Tls(e)) => e.to_string(),
            _ => return "",
        };
        if local.contains("NotValidForName") {
            ". The gateway's certificate does not carry the name dialed: set `server_name` to a name it has (`tether-gateway pki init --gateway-name` sets them)"
        } else if local.contains("UnknownIssuer") || local.contains("BadSignature") {
            ". The gateway's certificate is not signed by a CA in this agent's `tls.ca`: use the CA bundle of the gateway's PKI (its ca.pem)"
        } else {
            ""
        }
    }

    /// The TLS alert the gateway refused this agent with, if it did (typed: from QUIC's
    /// `CRYPTO_ERROR` code or rustls's error, never from text).
    pub fn tls_alert(&self) -> Option<rustls::AlertDescription> {
        match &self.failure {
            DialFailure::Handshake(e) => tls::quic_alert(e),
            DialFailure::Tcp(TcpFailure::Tls(e) | TcpFailure::TlsThroughProxy { error: e, .. }) => {
                tls::received_alert(e)
            }
            DialFailure::Tcp(TcpFailure::Http2(e)) => e.tls_alert(),
            _ => None,
        }
    }
}

/// What failed in one dial.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialFailure {
    /// The address is not `host:port`.
    #[error("not host:port")]
    NotHostPort,
    /// The name did not resolve.
    #[error("resolving: {0}")]
    Resolve(#[source] std::io::Error),
    /// The name resolved to nothing.
    #[error("resolves to no address")]
    NoAddress,
    /// The TLS server name is not a DNS name or IP address.
    #[error("server name {name:?}: {error}")]
    ServerName {
        /// The name.
        name: String,
        /// Why rustls refused it.
        #[source]
        error: rustls_pki_types::InvalidDnsNameError,
    },
    /// No UDP socket.
    #[error("binding UDP: {0}")]
    BindUdp(#[source] std::io::Error),
    /// The UDP socket could not be connected to the gateway.
    #[error("UDP connect: {0}")]
    ConnectUdp(#[source] std::io::Error),
    /// No QUIC endpoint on the socket.
    #[error("QUIC endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    /// QUIC refused to start the connection.
    #[error("connect: {0}")]
    Connect(#[source] quinn::ConnectError),
    /// The QUIC handshake failed.
    #[error("{}", describe(.0))]
    Handshake(#[source] quinn::ConnectionError),
    /// The gateway's host answered with ICMP port unreachable: nothing listens on that UDP
    /// port (or a firewall rejects it). Known at once, without waiting the connect timeout.
    #[error(
        "nothing listens on UDP {0}: the host answered ICMP port unreachable. Is the gateway running, and is this its tunnel port (`tunnel.listen`, default 7443)? (or a firewall rejects UDP to it)"
    )]
    PortUnreachable(SocketAddr),
    /// The TCP fallback failed.
    #[error("tcp: {0}")]
    Tcp(#[source] TcpFailure),
}

/// What failed in one dial of the TCP fallback.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TcpFailure {
    /// The TLS server name is not a DNS name or IP address.
    #[error("server name {name:?}: {error}")]
    ServerName {
        /// The name.
        name: String,
        /// Why rustls refused it.
        #[source]
        error: rustls_pki_types::InvalidDnsNameError,
    },
    /// The HTTP CONNECT proxy failed.
    #[error("{0}")]
    Proxy(#[source] ProxyError),
    /// TLS through the proxy failed.
    #[error("TLS through proxy {proxy}: {error}")]
    TlsThroughProxy {
        /// The proxy, without credentials.
        proxy: String,
        /// What TLS said.
        #[source]
        error: std::io::Error,
    },
    /// The TCP connection failed.
    #[error("{}", tcp_connect(.0))]
    Connect(#[source] std::io::Error),
    /// TLS failed.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// HTTP/2 on the TLS connection failed (a refused certificate shows here: TLS 1.3 refuses
    /// a client certificate after the client's side of the handshake is done).
    #[error("HTTP/2: {0}")]
    Http2(#[source] StreamError),
}

fn tcp_connect(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        "connection refused: nothing listens on that TCP port".into()
    } else {
        e.to_string()
    }
}

/// Everything needed to dial, built once from config.
#[derive(Clone)]
pub struct Dialer {
    client: quinn::ClientConfig,
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
    proxy: Option<Proxy>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("server_name", &self.server_name)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// A dialer presenting `identity` and trusting its roots.
    pub fn new(cfg: &AgentConfig, identity: &Identity) -> Result<Dialer, DialerError> {
        tls::install_crypto_provider();
        let proxy = Proxy::from_config(&cfg.proxy, |k| std::env::var(k).ok())?;
        if let Some(p) = &proxy {
            tracing::info!(proxy = %p, "TCP transport goes through an HTTP CONNECT proxy");
        }
        Dialer::build(identity, cfg.server_name.clone(), proxy)
    }

    /// The same dialer presenting another identity (a renewed certificate) and trusting its
    /// roots.
    pub fn with_identity(&self, identity: &Identity) -> Result<Dialer, DialerError> {
        Dialer::build(identity, self.server_name.clone(), self.proxy.clone())
    }

    /// A dialer as [`Dialer::new`] builds it, but checking the gateway's certificate with
    /// `verifier` (`tether-agent doctor` wraps the usual check to see what was presented), and
    /// presenting no certificate when there is no `identity` yet (reachability only).
    pub fn inspecting(
        cfg: &AgentConfig,
        identity: Option<&Identity>,
        verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    ) -> Result<Dialer, DialerError> {
        tls::install_crypto_provider();
        let proxy = Proxy::from_config(&cfg.proxy, |k| std::env::var(k).ok())?;
        let builder =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .dangerous()
                .with_custom_certificate_verifier(verifier);
        let tls = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.certs.clone(), id.key.clone_key())
                .map_err(DialerError::Certificate)?,
            None => builder.with_no_client_auth(),
        };
        Dialer::from_tls(tls, cfg.server_name.clone(), proxy)
    }

    fn build(
        identity: &Identity,
        server_name: Option<String>,
        proxy: Option<Proxy>,
    ) -> Result<Dialer, DialerError> {
        let tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(identity.roots.clone())
            .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())
            .map_err(DialerError::Certificate)?;
        Dialer::from_tls(tls, server_name, proxy)
    }

    fn from_tls(
        mut tls: rustls::ClientConfig,
        server_name: Option<String>,
        proxy: Option<Proxy>,
    ) -> Result<Dialer, DialerError> {
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let tls = Arc::new(tls);
        let crypto = QuicClientConfig::try_from(tls.clone()).map_err(DialerError::Quic)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(1024u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_idle_timeout(Some(
            Duration::from_secs(120)
                .try_into()
                .expect("120s is a valid idle timeout"),
        ));
        client.transport_config(Arc::new(transport));
        Ok(Dialer {
            client,
            tls,
            server_name,
            proxy,
        })
    }

    /// Whether a TCP connection to `addr` (`host:port`) goes through the HTTP CONNECT proxy.
    pub fn proxied(&self, addr: &str) -> bool {
        split_host_port(addr).is_some_and(|(host, _)| self.proxy_for(host).is_some())
    }

    /// The HTTP CONNECT proxy the TCP transport uses for `host`, if one applies.
    pub fn proxy_for(&self, host: &str) -> Option<&Proxy> {
        self.proxy.as_ref().filter(|p| p.applies_to(host))
    }

    /// Resolves `addr` and completes the QUIC + TLS handshake.
    pub async fn dial(&self, addr: &str) -> Result<(quinn::Endpoint, Link), DialError> {
        let fail = |failure| DialError {
            gateway: addr.to_owned(),
            failure,
        };
        let (host, _) = split_host_port(addr).ok_or_else(|| fail(DialFailure::NotHostPort))?;
        let remote: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| fail(DialFailure::Resolve(e)))?
            .next()
            .ok_or_else(|| fail(DialFailure::NoAddress))?;
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        if let Err(error) = ServerName::try_from(name.clone()) {
            return Err(fail(DialFailure::ServerName { name, error }));
        }
        let local: SocketAddr = if remote.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local).map_err(|e| fail(DialFailure::BindUdp(e)))?;
        socket
            .connect(remote)
            .map_err(|e| fail(DialFailure::ConnectUdp(e)))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| fail(DialFailure::Endpoint(e)))?;
        let connecting = endpoint
            .connect_with(self.client.clone(), remote, &name)
            .map_err(|e| fail(DialFailure::Connect(e)))?;
        let conn = tokio::select! {
            biased;
            c = connecting => c.map_err(|e| fail(DialFailure::Handshake(e)))?,
            () = udp_port_closed(remote) => {
                return Err(fail(DialFailure::PortUnreachable(remote)));
            }
        };
        Ok((endpoint, Link::Quic(conn)))
    }

    /// Connects to `addr` over TCP (through the proxy when one applies), completes TLS with the
    /// same identity and ALPN as QUIC, then serves HTTP/2 on it.
    pub async fn dial_tcp(&self, addr: &str) -> Result<Link, DialError> {
        let fail = |failure| DialError {
            gateway: addr.to_owned(),
            failure,
        };
        let (host, _) = split_host_port(addr).ok_or_else(|| fail(DialFailure::NotHostPort))?;
        let tcp_fail = |f| fail(DialFailure::Tcp(f));
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name = match ServerName::try_from(name.clone()) {
            Ok(n) => n,
            Err(error) => return Err(tcp_fail(TcpFailure::ServerName { name, error })),
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let link = match self.proxy.as_ref().filter(|p| p.applies_to(host)) {
            Some(proxy) => {
                let io = proxy
                    .connect(addr)
                    .await
                    .map_err(|e| tcp_fail(TcpFailure::Proxy(e)))?;
                let remote = tokio::net::lookup_host(addr)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                let tls = connector.connect(server_name, io).await.map_err(|error| {
                    tcp_fail(TcpFailure::TlsThroughProxy {
                        proxy: proxy.to_string(),
                        error,
                    })
                })?;
                H2Link::server(tls, remote).await
            }
            None => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| tcp_fail(TcpFailure::Connect(e)))?;
                let _ = tcp.set_nodelay(true);
                let remote = tcp
                    .peer_addr()
                    .map_err(|e| tcp_fail(TcpFailure::Connect(e)))?;
                let tls = connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| tcp_fail(TcpFailure::Tls(e)))?;
                H2Link::server(tls, remote).await
            }
        };
        link.map_err(|e| tcp_fail(TcpFailure::Http2(e)))
    }
}

/// Resolves once `remote`'s host answers a datagram with ICMP port unreachable (the kernel
/// reports it on a connected UDP socket as `ECONNREFUSED`); never resolves otherwise.
///
/// quinn hears of the ICMP answer too, but only logs it and waits for its handshake to time
/// out. So a probe socket of its own sends a one-byte datagram every half second (too short
/// for any QUIC packet: a gateway drops it unread) and listens for the refusal, while the
/// handshake runs.
async fn udp_port_closed(remote: SocketAddr) {
    let local: SocketAddr = if remote.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
    let probe = async {
        let sock = tokio::net::UdpSocket::bind(local).await.ok()?;
        sock.connect(remote).await.ok()?;
        let mut buf = [0u8; 64];
        loop {
            if let Err(e) = sock.send(&[0]).await
                && refused(&e)
            {
                return Some(());
            }
            let answer =
                tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await;
            if let Ok(Err(e)) = answer
                && refused(&e)
            {
                return Some(());
            }
        }
    };
    if probe.await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// A connection error in words an operator can act on.
pub fn describe(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TimedOut => {
            "no answer from the gateway (is UDP to it allowed by the firewall?)".into()
        }
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "gateway closed the connection: {} {}",
            tunnel_proto::ErrorCode::from(u64::from(c.error_code)),
            String::from_utf8_lossy(&c.reason)
        ),
        other => other.to_string(),
    }
}
