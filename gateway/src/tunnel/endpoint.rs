//! Transport layer: the QUIC endpoint on the tunnel's UDP socket: its socket buffers, the
//! stateless-reset key kept in `data_dir`, and connection ids a restarted gateway accepts.

use std::sync::Arc;
use std::time::Duration;

use crate::config::GatewayConfig;

/// Kernel buffer asked for the tunnel's UDP socket, each way. One socket carries every agent's
/// connection: a reconnect storm (a burst of Initials) or a broadcast (a burst of responses)
/// overflows the default ~208 KiB and the lost datagrams cost a retransmission timeout each
/// (about a second for a handshake). Linux caps it at `net.core.rmem_max`/`wmem_max`.
const TUNNEL_SOCKET_BUFFER: usize = 8 << 20;

/// The file in `data_dir` holding the QUIC stateless-reset key.
const RESET_KEY_FILE: &str = "quic-reset-key";

/// The QUIC endpoint on the tunnel socket: large socket buffers, and a stateless-reset key that
/// survives a restart. With the key kept, a gateway that crashed and came back answers the
/// agents' next packets on their old connections with a stateless reset they recognise
/// (RFC 9000 §10.3), so they reconnect at their next heartbeat instead of waiting out three
/// heartbeat intervals; with a fresh random key (quinn's default) they cannot tell a reset
/// from noise. Resets are sent for every such packet (quinn limits them to one per 20 ms by
/// default, 50/s, far too few for a fleet): a reset is always smaller than the packet that
/// caused it, so this amplifies nothing.
pub fn quic_endpoint(
    cfg: &GatewayConfig,
    socket: std::net::UdpSocket,
    mut server: quinn::ServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    for (what, r) in [
        (
            "receive",
            state.set_recv_buffer_size((&socket).into(), TUNNEL_SOCKET_BUFFER),
        ),
        (
            "send",
            state.set_send_buffer_size((&socket).into(), TUNNEL_SOCKET_BUFFER),
        ),
    ] {
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot enlarge the tunnel socket's {what} buffer");
        }
    }
    tracing::debug!(
        recv = state.recv_buffer_size((&socket).into()).unwrap_or(0),
        send = state.send_buffer_size((&socket).into()).unwrap_or(0),
        "tunnel socket buffers"
    );
    let mut endpoint = match &cfg.data_dir {
        Some(dir) => {
            let key = ResetKey::load_or_create(dir)?;
            // Retry tokens sealed with a key derived from the kept one: a token handed out
            // just before a restart is still good after it (a restart storm is when Retry is
            // on), and so are tokens of replicas sharing data_dir's key.
            server.token_key(Arc::new(key.retry_token_key()));
            quinn::EndpointConfig::new(Arc::new(key))
        }
        None => quinn::EndpointConfig::default(),
    };
    // Connection attempts queued before the accept loop decides on them (each answered at once
    // by a refusal, a Retry or a handshake): bounded, so a flood cannot grow the queue.
    server
        .max_incoming(4096)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(16 << 20);
    endpoint.min_reset_interval(Duration::ZERO);
    // Connection ids the restarted process accepts as its own: quinn's default generator signs
    // its ids with a per-process key and drops packets whose id it did not sign, which would
    // silence the reset above.
    endpoint.cid_generator(|| Box::new(RandomCids));
    quinn::Endpoint::new(
        endpoint,
        Some(server),
        socket,
        Arc::new(super::lean::LeanRuntime),
    )
}

/// Random 8-byte connection ids (quinn's own random generator is not exported).
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// HMAC-SHA256 key for stateless-reset tokens (from the one crypto provider).
struct ResetKey([u8; 32]);

impl ResetKey {
    /// Reads `dir/quic-reset-key`, or creates it (mode 0600) with a random key.
    fn load_or_create(dir: &std::path::Path) -> std::io::Result<ResetKey> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(RESET_KEY_FILE);
        match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&b);
                return Ok(ResetKey(k));
            }
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a 32-byte key: delete it to make a new one",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        let key: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&key)?;
        f.sync_all()?;
        Ok(ResetKey(key))
    }

    /// The HKDF key quinn seals Retry tokens with, derived from this key (so it persists with
    /// it) for that one purpose.
    fn retry_token_key(&self) -> aws_lc_rs::hkdf::Prk {
        let derived = self.tag(b"tether quic retry token key v1");
        aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[]).extract(derived.as_ref())
    }

    fn tag(&self, data: &[u8]) -> rustls::crypto::hmac::Tag {
        let rustls::SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!("a TLS 1.3 suite")
        };
        suite
            .hkdf_provider
            .hmac_sign(&rustls::crypto::tls13::OkmBlock::new(&self.0), data)
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        let tag = self.tag(data);
        let n = out.len().min(tag.as_ref().len());
        out[..n].copy_from_slice(&tag.as_ref()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let tag = self.tag(data);
        let t = tag.as_ref();
        // Constant time: no early exit on the first differing byte.
        let diff = t
            .iter()
            .zip(signature)
            .fold(t.len() ^ signature.len(), |d, (a, b)| {
                d | usize::from(a ^ b)
            });
        if diff == 0 {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::crypto::HmacKey;

    #[test]
    fn reset_key_survives_a_restart_and_signs_the_same_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let a = ResetKey::load_or_create(dir.path()).unwrap();
        let b = ResetKey::load_or_create(dir.path()).unwrap();
        let (mut sa, mut sb) = ([0u8; 32], [0u8; 32]);
        a.sign(b"connection id", &mut sa);
        b.sign(b"connection id", &mut sb);
        assert_eq!(sa, sb);
        assert!(b.verify(b"connection id", &sa).is_ok());
        assert!(b.verify(b"another id", &sa).is_err());
        assert!(b.verify(b"connection id", &sa[..16]).is_err());
        // Retry tokens sealed before a restart open after it.
        use quinn::crypto::HandshakeTokenKey;
        let mut token = b"retry token".to_vec();
        a.retry_token_key()
            .aead_from_hkdf(b"nonce")
            .seal(&mut token, b"ad")
            .unwrap();
        let opened = b
            .retry_token_key()
            .aead_from_hkdf(b"nonce")
            .open(&mut token, b"ad")
            .unwrap();
        assert_eq!(opened, b"retry token");
        let mode = std::fs::metadata(dir.path().join(RESET_KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
