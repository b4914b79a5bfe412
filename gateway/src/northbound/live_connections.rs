//! Transport layer: the northbound connections open now that presented a client certificate,
//! kept by the listener from the end of their TLS handshake (before their first request) until
//! they close, so that a feature above can close some of them at once: a revoked caller's
//! (`callers`).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tether_runtime::CancellationToken;

use crate::northbound::listener::PeerCerts;

/// The caller connections open now that presented a certificate, so that a feature above can
/// close some of them (a revoked caller's: `callers`).
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<u64, (PeerCerts, CancellationToken)>>,
}

impl LiveConnections {
    /// Closes (at once, without GOAWAY) every open connection whose chain `matches`; returns
    /// their chains.
    pub fn close_matching(
        &self,
        matches: impl Fn(&[CertificateDer<'static>]) -> bool,
    ) -> Vec<PeerCerts> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.values()
            .filter(|(certs, _)| matches(&certs.0))
            .map(|(certs, close)| {
                close.cancel();
                certs.clone()
            })
            .collect()
    }

    /// Connections open now with a certificate.
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps a connection that presented `certs` (none: nothing to keep) until the returned
    /// value is dropped; its `close` token is cancelled to close it.
    pub(crate) fn register(self: &Arc<Self>, certs: &PeerCerts) -> Option<Registered> {
        if certs.0.is_empty() {
            return None;
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = CancellationToken::new();
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (certs.clone(), close.clone()));
        Some(Registered {
            live: self.clone(),
            id,
            close,
        })
    }
}

/// One connection in [`LiveConnections`], until dropped.
pub(crate) struct Registered {
    live: Arc<LiveConnections>,
    id: u64,
    /// Cancelled when the connection must close.
    pub(crate) close: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.live
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}
