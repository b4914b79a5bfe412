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

use tether_runtime::transport::{H2Link, Link};

use crate::config::{AgentConfig, split_host_port};
use crate::error::AgentError;
use crate::identity::Identity;
use crate::proxy::Proxy;

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
    pub fn new(cfg: &AgentConfig, identity: &Identity) -> Result<Dialer, AgentError> {
        tls::install_crypto_provider();
        let proxy = Proxy::from_config(&cfg.proxy, |k| std::env::var(k).ok())
            .map_err(|e| AgentError::Tls(format!("proxy: {e}")))?;
        if let Some(p) = &proxy {
            tracing::info!(proxy = %p, "TCP transport goes through an HTTP CONNECT proxy");
        }
        Dialer::build(identity, cfg.server_name.clone(), proxy)
    }

    /// The same dialer presenting another identity (a renewed certificate) and trusting its
    /// roots.
    pub fn with_identity(&self, identity: &Identity) -> Result<Dialer, AgentError> {
        Dialer::build(identity, self.server_name.clone(), self.proxy.clone())
    }

    fn build(
        identity: &Identity,
        server_name: Option<String>,
        proxy: Option<Proxy>,
    ) -> Result<Dialer, AgentError> {
        let mut tls =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(identity.roots.clone())
                .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())
                .map_err(|e| AgentError::Tls(format!("agent certificate and key: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let tls = Arc::new(tls);
        let crypto = QuicClientConfig::try_from(tls.clone())
            .map_err(|e| AgentError::Tls(format!("QUIC TLS config: {e}")))?;
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

    /// Resolves `addr` and completes the QUIC + TLS handshake.
    pub async fn dial(&self, addr: &str) -> Result<(quinn::Endpoint, Link), AgentError> {
        let (host, _) = host_of(addr)?;
        let fail = |reason: String| AgentError::Dial {
            gateway: addr.to_owned(),
            reason,
        };
        let remote: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| fail(format!("resolving: {e}")))?
            .next()
            .ok_or_else(|| fail("resolves to no address".into()))?;
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        ServerName::try_from(name.clone())
            .map_err(|e| fail(format!("server name {name:?}: {e}")))?;
        let local: SocketAddr = if remote.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket =
            std::net::UdpSocket::bind(local).map_err(|e| fail(format!("binding UDP: {e}")))?;
        socket
            .connect(remote)
            .map_err(|e| fail(format!("UDP connect: {e}")))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| fail(format!("QUIC endpoint: {e}")))?;
        let conn = endpoint
            .connect_with(self.client.clone(), remote, &name)
            .map_err(|e| fail(format!("connect: {e}")))?
            .await
            .map_err(|e| fail(describe(&e)))?;
        Ok((endpoint, Link::Quic(conn)))
    }

    /// Connects to `addr` over TCP (through the proxy when one applies), completes TLS with the
    /// same identity and ALPN as QUIC, then serves HTTP/2 on it.
    pub async fn dial_tcp(&self, addr: &str) -> Result<Link, AgentError> {
        let (host, _) = host_of(addr)?;
        let fail = |reason: String| AgentError::Dial {
            gateway: addr.to_owned(),
            reason: format!("tcp: {reason}"),
        };
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| fail(format!("server name {name:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let link = match self.proxy.as_ref().filter(|p| p.applies_to(host)) {
            Some(proxy) => {
                let io = proxy.connect(addr).await.map_err(fail)?;
                let remote = tokio::net::lookup_host(addr)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                let tls = connector
                    .connect(server_name, io)
                    .await
                    .map_err(|e| fail(format!("TLS through proxy {proxy}: {e}")))?;
                H2Link::server(tls, remote).await
            }
            None => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                let remote = tcp.peer_addr().map_err(|e| fail(e.to_string()))?;
                let tls = connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| fail(format!("TLS: {e}")))?;
                H2Link::server(tls, remote).await
            }
        };
        link.map_err(|e| fail(format!("HTTP/2: {e}")))
    }
}

/// `addr`'s host and port, or the error saying it is not `host:port`.
fn host_of(addr: &str) -> Result<(&str, u16), AgentError> {
    split_host_port(addr).ok_or_else(|| AgentError::Dial {
        gateway: addr.to_owned(),
        reason: "not host:port".into(),
    })
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
