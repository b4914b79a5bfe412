//! Transport layer: the tunnel's TLS and QUIC transport configuration, for QUIC and TCP alike.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use tunnel_proto::ALPN;

use crate::config::GatewayConfig;
use crate::identity::revocation::RevocationList;
use crate::tls::{Listener, TlsMaterial, TlsSetupError};
use crate::tunnel::verifier::AgentVerifier;

/// The tunnel's TLS config, for QUIC and TCP alike: TLS 1.3, ALPN `tether/1`, mandatory agent
/// client certificates checked by [`AgentVerifier`], refusing the certificates `revocations`
/// lists, and no session resumption ([`TlsMaterial::server_config`]).
pub fn tls_config(
    cfg: &GatewayConfig,
    material: &TlsMaterial,
    revocations: Arc<RevocationList>,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let inner = WebPkiClientVerifier::builder(material.roots())
        .build()
        .map_err(|source| TlsSetupError::Verifier {
            listener: Listener::Tunnel,
            source,
        })?;
    let verifier =
        Arc::new(AgentVerifier::new(inner, cfg.trust_domain.clone()).with_revocations(revocations));
    let mut tls = material.server_config(
        Listener::Tunnel,
        &[&rustls::version::TLS13],
        Some(verifier),
        ALPN,
    )?;
    // The gateway's suite order (AES-128-GCM first, `tls::crypto_provider`), whatever an agent
    // prefers: the cheaper handshake is the gateway's to choose when thousands reconnect.
    tls.ignore_client_order = true;
    Ok(Arc::new(tls))
}

/// What one agent stream may have in flight towards the gateway (QUIC's per-stream receive
/// window): quinn's default, kept so a relayed response streams as fast as before (25 MB/s per
/// call at 50 ms). A gateway-opened stream is read as its caller takes the data, and the
/// control stream as it comes.
pub const STREAM_WINDOW: u32 = 1_250_000;

/// What one agent connection may have in flight towards the gateway across its streams
/// (quinn's default is unbounded): six streams at full speed, 160 MiB/s at 50 ms.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// What the gateway keeps written but not yet acknowledged towards one agent connection
/// (quinn's default is 10 MB): 80 MiB/s at 50 ms, beyond what a control plane sends one data
/// plane, and the bound on what an agent that stops acknowledging can make it hold.
pub const SEND_WINDOW: u64 = 4 << 20;

/// Builds the QUIC server config on [`tls_config`].
pub fn server_config(
    cfg: &GatewayConfig,
    tls: Arc<rustls::ServerConfig>,
) -> Result<quinn::ServerConfig, TlsSetupError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(TlsSetupError::Quic)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Agents open exactly one stream, the control stream, and the gateway accepts exactly one:
    // every other stream is gateway-opened. A second agent stream would be one the gateway
    // never reads, buffering up to a stream window each for the connection's life (with 4
    // allowed, 40 sessions of one certificate took the gateway from 22 to 185 MB). With 1,
    // quinn refuses it at the transport (STREAM_LIMIT_ERROR).
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Bounded windows (see the constants): per connection, what an agent can make the gateway
    // buffer is at most CONNECTION_WINDOW received plus SEND_WINDOW unacknowledged, and
    // `limits.sessions_per_agent` bounds the connections.
    transport.stream_receive_window(STREAM_WINDOW.into());
    transport.receive_window(CONNECTION_WINDOW.into());
    transport.send_window(SEND_WINDOW);
    // Many mostly idle connections: no QUIC keep-alive (the session's heartbeats keep the
    // connection alive and QUIC's idle timer is only their backstop), and no unreliable
    // datagrams (the protocol uses none, and with them on a peer could make the gateway buffer
    // up to 1.25 MB of datagrams per connection that nobody reads).
    transport.keep_alive_interval(None);
    transport.datagram_receive_buffer_size(None);
    // Backstop for the heartbeat timeout in the session itself.
    let idle = cfg.tunnel.heartbeat_interval * 3 + Duration::from_secs(2);
    transport.max_idle_timeout(Some(
        idle.try_into().map_err(|_| TlsSetupError::IdleTimeout)?,
    ));
    server.transport_config(Arc::new(transport));
    Ok(server)
}
