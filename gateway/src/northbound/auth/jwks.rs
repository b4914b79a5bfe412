//! Feature layer: the keys bearer tokens are checked against, from `auth.jwks_file` or
//! `auth.jwks_url`, kept fresh.
//!
//! The file is read at start (unusable: a config error) and again when its modification time
//! or length changes; the URL (hyper over rustls, `auth.jwks_ca` or the system trust store) is
//! fetched at start, every `auth.jwks_refresh`, and at most every few seconds for a `kid` that
//! is not known yet (single flight: requests wait for the fetch in progress). A failed fetch or
//! a broken file keeps the keys loaded before.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tether_runtime::CancellationToken;
use tether_runtime::config::ConfigError;

use crate::config::AuthConfig;
use crate::error::GatewayError;

/// Largest JWKS document accepted.
const JWKS_MAX_BYTES: usize = 1 << 20;
/// Time allowed for one JWKS fetch, connection included.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `auth.jwks_file` is checked for changes.
const JWKS_FILE_CHECK: Duration = Duration::from_secs(1);
/// Longest wait between fetches of a `jwks_url` that has not given us keys yet.
pub(super) const JWKS_RETRY: Duration = Duration::from_secs(5);

/// Why keys could not be loaded from the JWKS file or URL (the keys loaded before stay).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The document is not a JWKS.
    #[error("not a JWKS: {0}")]
    NotJwks(serde_json::Error),
    /// The JWKS holds no key a token may be signed with here.
    #[error("no ES256 (P-256) or RS256 signature key in the JWKS")]
    NoUsableKey,
    /// `auth.jwks_file` could not be read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `auth.jwks_file` is larger than a JWKS may be.
    #[error("{}: larger than 1 MiB", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// `auth.jwks_file` does not hold a usable JWKS.
    #[error("{}: {source}", path.display())]
    FileContents {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<JwksError>,
    },
    /// `auth.jwks_url` names no host.
    #[error("no host")]
    NoHost,
    /// The JWKS server could not be reached.
    #[error("connecting to {host}:{port}: {source}")]
    Connect {
        /// Its host.
        host: String,
        /// Its port.
        port: u16,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The request could not be built from the URL.
    #[error("{0}")]
    Request(http::Error),
    /// The host is not a name TLS can verify.
    #[error("server name {host:?}: {source}")]
    ServerName {
        /// The host.
        host: String,
        /// Why it is not a server name.
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake with the JWKS server failed.
    #[error("TLS with {host}: {source}")]
    Tls {
        /// The host.
        host: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(hyper::Error),
    /// The server answered with another status than 200.
    #[error("HTTP status {0}")]
    Status(http::StatusCode),
    /// The body could not be read whole (or is larger than 1 MiB).
    #[error("reading the body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The server did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Why no key could be found for a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No JWKS was ever loaded.
    #[error("no signing keys are loaded (the JWKS could not be read)")]
    NoKeys,
    /// The token's `kid` is in no JWKS loaded, even after looking again.
    #[error("unknown key id {0:?}")]
    UnknownKid(String),
    /// The token names no `kid`, and there is more than one key to choose from.
    #[error("the token has no kid and the JWKS has several keys")]
    NoKid,
}

/// One usable signing key.
#[derive(Clone)]
pub(super) struct Key {
    pub(super) alg: Algorithm,
    pub(super) key: DecodingKey,
}

/// The keys of one JWKS document.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid`: usable only by tokens without one, when they are the only key.
    anonymous: Vec<Key>,
}

impl KeySet {
    /// The ES256 (P-256) and RS256 signature keys of a JWKS document; others are skipped.
    fn parse(json: &[u8]) -> Result<KeySet, JwksError> {
        let set: JwkSet = serde_json::from_slice(json).map_err(JwksError::NotJwks)?;
        let mut out = KeySet::default();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let Some(key) = usable(jwk) else {
                tracing::debug!(kid = ?kid, "JWKS key skipped: not an ES256 or RS256 signature key");
                continue;
            };
            match kid {
                Some(kid) => {
                    out.by_kid.entry(kid).or_insert(key);
                }
                None => out.anonymous.push(key),
            }
        }
        if out.len() == 0 {
            return Err(JwksError::NoUsableKey);
        }
        Ok(out)
    }

    fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None if self.len() == 1 => self.by_kid.values().chain(&self.anonymous).next(),
            None => None,
        }
    }

    fn kids(&self) -> BTreeSet<&str> {
        self.by_kid.keys().map(String::as_str).collect()
    }
}

fn usable(jwk: &Jwk) -> Option<Key> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        _ => return None,
    };
    // A key published for another algorithm is not ours to use with this one.
    let declared = &jwk.common.key_algorithm;
    let fits = match alg {
        Algorithm::ES256 => matches!(declared, None | Some(KeyAlgorithm::ES256)),
        _ => matches!(declared, None | Some(KeyAlgorithm::RS256)),
    };
    if !fits {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { alg, key })
}

/// Where the keys come from.
#[derive(Debug)]
enum JwksSource {
    File(PathBuf),
    Url {
        uri: http::Uri,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// The JWKS in force, and how it is kept fresh.
pub(super) struct Jwks {
    refresh: Duration,
    source: JwksSource,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped at each successful load, so a request that waited for a fetch in progress sees
    /// that it happened.
    generation: AtomicU64,
    /// One fetch at a time; when the last one started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// `jwks_file`'s modification time and length when last read.
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// From `[auth]`: a file is read now (a bad one is a config error), a URL is fetched by
    /// [`run_refresh`](Self::run_refresh).
    pub(super) fn new(a: &AuthConfig) -> Result<Jwks, GatewayError> {
        let source = match (&a.jwks_file, &a.jwks_url) {
            (Some(path), _) => JwksSource::File(path.clone()),
            (None, Some(url)) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| ConfigError::invalid("auth.jwks_url", format!("{e}")))?;
                JwksSource::Url {
                    uri,
                    tls: jwks_tls(a)?,
                }
            }
            (None, None) => {
                return Err(ConfigError::invalid("auth", "no jwks_file or jwks_url").into());
            }
        };
        let jwks = Jwks {
            refresh: a.jwks_refresh,
            source,
            keys: RwLock::new(Arc::new(KeySet::default())),
            generation: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(None),
            file_stamp: Mutex::new(None),
        };
        if let JwksSource::File(path) = &jwks.source {
            let (stamp, set) = read_jwks_file(path)
                .map_err(|e| ConfigError::invalid("auth.jwks_file", e.to_string()))?;
            tracing::info!(file = %path.display(), keys = set.len(), kids = ?set.kids(), "JWKS loaded");
            *jwks.file_stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
            jwks.install(set);
        }
        Ok(jwks)
    }

    fn install(&self, set: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps the keys fresh until `shutdown`: re-reads the file when it changes, fetches the
    /// URL every `auth.jwks_refresh`.
    pub(super) async fn run_refresh(&self, shutdown: CancellationToken) {
        if let JwksSource::Url { .. } = &self.source {
            self.fetch(Duration::ZERO).await;
        }
        loop {
            let wait = match &self.source {
                JwksSource::File(_) => JWKS_FILE_CHECK.min(self.refresh),
                // Never loaded: try again soon.
                JwksSource::Url { .. } if self.current().len() == 0 => JWKS_RETRY.min(self.refresh),
                JwksSource::Url { .. } => self.refresh,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match &self.source {
                JwksSource::File(path) => self.reload_file(path),
                JwksSource::Url { .. } => {
                    self.fetch(Duration::ZERO).await;
                }
            }
        }
    }

    /// Re-reads the file when its modification time or length changed; a bad new version is
    /// logged and the old keys stay.
    fn reload_file(&self, path: &Path) {
        let stamp = match file_stamp(path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "JWKS file unreadable; keeping the keys loaded before");
                return;
            }
        };
        {
            let mut last = self.file_stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == Some(stamp) {
                return;
            }
            *last = Some(stamp);
        }
        match read_jwks_file(path) {
            Ok((_, set)) => {
                tracing::info!(file = %path.display(), keys = set.len(), kids = ?set.kids(), "JWKS reloaded");
                self.install(set);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "JWKS file changed but is not usable; keeping the keys loaded before");
            }
        }
    }

    /// Fetches the URL unless a fetch started less than `min_gap` ago. True when keys were
    /// loaded (by this call or by the fetch it waited for).
    async fn fetch(&self, min_gap: Duration) -> bool {
        let JwksSource::Url { uri, tls } = &self.source else {
            return false;
        };
        let before = self.generation.load(Ordering::SeqCst);
        let mut last = self.fetching.lock().await;
        if self.generation.load(Ordering::SeqCst) != before {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < min_gap) {
            return false;
        }
        *last = Some(Instant::now());
        let got = tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch_url(uri, tls))
            .await
            .unwrap_or(Err(JwksError::Timeout(JWKS_FETCH_TIMEOUT)))
            .and_then(|body| KeySet::parse(&body));
        match got {
            Ok(set) => {
                let changed = set.kids() != self.current().kids();
                if changed {
                    tracing::info!(url = %uri, keys = set.len(), kids = ?set.kids(), "JWKS loaded");
                }
                self.install(set);
                true
            }
            Err(e) => {
                tracing::warn!(url = %uri, error = %e, "JWKS fetch failed; keeping the keys loaded before");
                false
            }
        }
    }

    /// The key for `kid`, fetching the JWKS again (at most every few seconds) when it is not
    /// known: that is how a rotation shows up before the next refresh.
    pub(super) async fn key_for(&self, kid: Option<&str>) -> Result<Key, KeyError> {
        if let Some(k) = self.current().find(kid) {
            return Ok(k.clone());
        }
        // Not known (yet): a rotation shows up here before the next refresh.
        match &self.source {
            JwksSource::Url { .. } => {
                if self.fetch(JWKS_RETRY.min(self.refresh)).await {
                    let keys = self.current();
                    if let Some(k) = keys.find(kid) {
                        return Ok(k.clone());
                    }
                }
            }
            JwksSource::File(path) => {
                self.reload_file(path);
                let keys = self.current();
                if let Some(k) = keys.find(kid) {
                    return Ok(k.clone());
                }
            }
        }
        let keys = self.current();
        Err(match kid {
            _ if keys.len() == 0 => KeyError::NoKeys,
            Some(kid) => KeyError::UnknownKid(kid.to_owned()),
            None => KeyError::NoKid,
        })
    }
}

fn file_stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified()?, m.len()))
}

fn read_jwks_file(path: &Path) -> Result<((SystemTime, u64), KeySet), JwksError> {
    let io = |source| JwksError::File {
        path: path.to_owned(),
        source,
    };
    let stamp = file_stamp(path).map_err(io)?;
    let bytes = std::fs::read(path).map_err(io)?;
    if bytes.len() > JWKS_MAX_BYTES {
        return Err(JwksError::FileTooLarge {
            path: path.to_owned(),
        });
    }
    let set = KeySet::parse(&bytes).map_err(|e| JwksError::FileContents {
        path: path.to_owned(),
        source: Box::new(e),
    })?;
    Ok((stamp, set))
}

/// TLS for fetching the JWKS: `auth.jwks_ca`, or the system's trust store.
fn jwks_tls(a: &AuthConfig) -> Result<Arc<rustls::ClientConfig>, GatewayError> {
    let roots = match &a.jwks_ca {
        Some(ca) => tether_runtime::tls::load_roots(ca)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "system trust store");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0
                && a.jwks_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https:"))
            {
                return Err(ConfigError::invalid(
                    "auth.jwks_ca",
                    "the system trust store is empty: set auth.jwks_ca to the JWKS server's CA bundle",
                )
                .into());
            }
            roots
        }
    };
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// `GET uri` over HTTP/1.1 (TLS for `https`), the 200 body up to [`JWKS_MAX_BYTES`].
async fn fetch_url(uri: &http::Uri, tls: &Arc<rustls::ClientConfig>) -> Result<Vec<u8>, JwksError> {
    let host = uri
        .host()
        .ok_or(JwksError::NoHost)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| JwksError::Connect {
            host: host.clone(),
            port,
            source,
        })?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "tether-gateway")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(JwksError::Request)?;
    if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|source| {
            JwksError::ServerName {
                host: host.clone(),
                source,
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| JwksError::Tls {
                host: host.clone(),
                source,
            })?;
        http_get(stream, req).await
    } else {
        http_get(tcp, req).await
    }
}

async fn http_get<IO>(
    io: IO,
    req: http::Request<http_body_util::Empty<Bytes>>,
) -> Result<Vec<u8>, JwksError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(JwksError::Http)?;
    let conn = tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(JwksError::Http)?;
    let status = resp.status();
    if status != http::StatusCode::OK {
        conn.abort();
        return Err(JwksError::Status(status));
    }
    let body = http_body_util::Limited::new(resp.into_body(), JWKS_MAX_BYTES)
        .collect()
        .await
        .map_err(JwksError::Body)?
        .to_bytes();
    conn.abort();
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_without_usable_keys_is_refused() {
        let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(KeySet::parse(oct).is_err());
        assert!(KeySet::parse(b"{}").is_err());
    }
}
