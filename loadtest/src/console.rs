//! Console client (northbound client, HTTPS): the web console as a browser uses it, without
//! the browser. It follows a login link (from [`crate::driver::Driver::login_link`]) to get the
//! session cookie, loads pages over one kept-alive HTTP/1.1 connection (as a browser reuses
//! its connection), and reads a page's server-sent events on a connection of their own (as
//! `EventSource` does), split into events by [`SseParser`].
//!
//! TLS: the gateway's CA only, no client certificate (the console's viewer is the cookie).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::LoadError;

/// Longest wait for one page, or for the head of an event stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn err(what: impl std::fmt::Display) -> LoadError {
    LoadError::Driver(format!("console: {what}"))
}

/// A logged-in console viewer.
pub struct ConsoleClient {
    addr: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    cookie: String,
    /// The connection pages are loaded over, opened on first use.
    pages: tokio::sync::Mutex<Option<SendRequest<Empty<Bytes>>>>,
}

impl std::fmt::Debug for ConsoleClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// One page as loaded.
#[derive(Debug)]
pub struct Page {
    /// Its status.
    pub status: http::StatusCode,
    /// From sending the request to the last byte of the body.
    pub took: Duration,
    /// The body (HTML).
    pub body: Bytes,
}

impl ConsoleClient {
    /// Follows `link` (a login link's path, `/ui/login?code=…`) on the northbound listener at
    /// `addr`, trusting `ca` (PEM) for a certificate naming `server_name`, and keeps the session
    /// cookie it sets.
    pub async fn login(
        addr: &str,
        server_name: &str,
        ca: &Path,
        link: &str,
    ) -> Result<ConsoleClient, LoadError> {
        let mut roots = rustls::RootCertStore::empty();
        let certs =
            CertificateDer::pem_file_iter(ca).map_err(|e| err(format!("{}: {e}", ca.display())))?;
        for c in certs {
            let c = c.map_err(|e| err(format!("{}: {e}", ca.display())))?;
            roots
                .add(c)
                .map_err(|e| err(format!("{}: {e}", ca.display())))?;
        }
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut c = ConsoleClient {
            addr: addr.to_owned(),
            server_name: ServerName::try_from(server_name.to_owned())
                .map_err(|e| err(format!("server name {server_name}: {e}")))?,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            cookie: String::new(),
            pages: Default::default(),
        };
        let mut send = c.connect().await?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, send.send_request(c.request(link)?))
            .await
            .map_err(|_| err("the login link: no answer"))?
            .map_err(|e| err(format!("the login link: {e}")))?;
        if resp.status() != http::StatusCode::SEE_OTHER {
            return Err(err(format!("the login link answered {}", resp.status())));
        }
        c.cookie = resp
            .headers()
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.split(';').next().filter(|kv| kv.contains('=')))
            .map(str::to_owned)
            .ok_or_else(|| err("the login link set no cookie"))?;
        let _ = resp.into_body().collect().await;
        *c.pages.get_mut() = Some(send);
        Ok(c)
    }

    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, LoadError> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| err(format!("{}: {e}", self.addr)))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| err(format!("{}: TLS: {e}", self.addr)))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err(format!("{}: HTTP: {e}", self.addr)))?;
        tokio::spawn(conn);
        Ok(send)
    }

    fn request(&self, path: &str) -> Result<http::Request<Empty<Bytes>>, LoadError> {
        let mut b = http::Request::get(path).header(http::header::HOST, &self.addr);
        if !self.cookie.is_empty() {
            b = b.header(http::header::COOKIE, &self.cookie);
        }
        b.body(Empty::new())
            .map_err(|e| err(format!("{path}: {e}")))
    }

    /// GETs `path` over the page connection (opened again if the gateway closed it).
    pub async fn get(&self, path: &str) -> Result<Page, LoadError> {
        let mut guard = self.pages.lock().await;
        if guard.as_ref().is_none_or(SendRequest::is_closed) {
            *guard = Some(self.connect().await?);
        }
        let send = guard
            .as_mut()
            .expect("a page connection, just opened if need be");
        send.ready()
            .await
            .map_err(|e| err(format!("{path}: {e}")))?;
        let req = self.request(path)?;
        let t = Instant::now();
        let fetched = async {
            let resp = send.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let r = tokio::time::timeout(REQUEST_TIMEOUT, fetched).await;
        let took = t.elapsed();
        match r {
            Ok(Ok((status, body))) => Ok(Page { status, took, body }),
            Ok(Err(e)) => {
                *guard = None;
                Err(err(format!("{path}: {e}")))
            }
            Err(_) => {
                *guard = None;
                Err(err(format!("{path}: no answer within {REQUEST_TIMEOUT:?}")))
            }
        }
    }

    /// Opens the event stream at `path` on a connection of its own and returns once its head
    /// has arrived (the gateway subscribes before sending it: no change after this is missed).
    pub async fn events(&self, path: &str) -> Result<EventStream, LoadError> {
        let mut send = self.connect().await?;
        let mut req = self.request(path)?;
        req.headers_mut().insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, send.send_request(req))
            .await
            .map_err(|_| err(format!("{path}: no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| err(format!("{path}: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            return Err(err(format!("{path} answered {}", resp.status())));
        }
        Ok(EventStream {
            body: resp.into_body(),
            parser: SseParser::default(),
            ready: std::collections::VecDeque::new(),
            _send: send,
        })
    }
}

/// The page's `data-live` attribute: the event stream it opens, as `console.js` reads it
/// (HTML's `&amp;` decoded).
pub fn live_path(html: &str) -> Option<String> {
    let start = html.find("data-live=\"")? + "data-live=\"".len();
    let end = start + html[start..].find('"')?;
    Some(html[start..end].replace("&amp;", "&"))
}

// === Server-sent events ===

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` name (`message` when it has none).
    pub name: String,
    /// Its `data:` lines, joined by newlines.
    pub data: String,
    /// Bytes it took in the stream, from its first line to the blank line ending it, each line
    /// ending counted as one byte (the gateway ends lines with `\n`): what
    /// `text/event-stream` carried for it, before HTTP framing.
    pub wire_len: usize,
    /// When its last byte was read.
    pub at: Instant,
}

impl SseEvent {
    /// The agent a fleet `row` or `remove` event is about, and the status the row shows
    /// (`online`, `degraded`, `offline`; empty for `remove`).
    pub fn fleet_row(&self) -> Option<(&str, &str)> {
        match self.name.as_str() {
            "remove" => Some((self.data.as_str(), "")),
            "row" => {
                let (id, html) = self.data.split_once('\n')?;
                let start = html.find("class=\"")? + "class=\"".len();
                let end = start + html[start..].find('"')?;
                Some((id, &html[start..end]))
            }
            _ => None,
        }
    }
}

/// Splits a `text/event-stream` into events, whatever the chunks it arrives in.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of an unfinished line.
    line: Vec<u8>,
    name: String,
    data: Vec<String>,
    /// Bytes read since the last event ended.
    bytes: usize,
    /// A `\r` ended the last line: a `\n` right after it belongs to it.
    after_cr: bool,
}

impl SseParser {
    /// Feeds `chunk` (read at `at`) and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8], at: Instant) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            self.bytes += 1;
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.line_done(&line, at) {
                        out.push(ev);
                    }
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8], at: Instant) -> Option<SseEvent> {
        if line.is_empty() {
            let bytes = std::mem::take(&mut self.bytes);
            let name = std::mem::take(&mut self.name);
            if self.data.is_empty() {
                // A block with no data (comments, keep-alives) is no event, and its bytes are
                // not the next event's.
                return None;
            }
            let data = std::mem::take(&mut self.data).join("\n");
            return Some(SseEvent {
                name: if name.is_empty() {
                    "message".to_owned()
                } else {
                    name
                },
                data,
                wire_len: bytes,
                at,
            });
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.name = value.to_owned(),
            "data" => self.data.push(value.to_owned()),
            _ => {}
        }
        None
    }
}

/// An open event stream.
pub struct EventStream {
    body: hyper::body::Incoming,
    parser: SseParser,
    ready: std::collections::VecDeque<SseEvent>,
    _send: SendRequest<Empty<Bytes>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event, or `None` when the stream ended or `deadline` passed.
    pub async fn next(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Some(ev);
            }
            let frame = tokio::time::timeout_at(deadline.into(), self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(data) = frame.into_data() {
                let events = self.parser.push(&data, Instant::now());
                self.ready.extend(events);
            }
        }
    }

    /// The events already read, or readable within a millisecond.
    pub async fn drain(&mut self) -> Vec<SseEvent> {
        let mut out: Vec<SseEvent> = self.ready.drain(..).collect();
        while let Some(ev) = self.next(Instant::now() + Duration::from_millis(1)).await {
            out.push(ev);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_framed_across_any_chunking() {
        let stream = b": keep-alive\n\nevent: row\ndata: load/a00001\ndata: <tr data-agent=\"load/a00001\" class=\"offline\">\n\nevent: replace\r\ndata: counts\r\ndata: <p>\r\n\r\ndata: plain\n\n";
        let at = Instant::now();
        let whole = SseParser::default().push(stream, at);
        // Byte by byte, the same events.
        let mut p = SseParser::default();
        let mut split = Vec::new();
        for b in stream {
            split.extend(p.push(std::slice::from_ref(b), at));
        }
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 3, "{whole:?}");
        assert_eq!(whole[0].name, "row");
        assert_eq!(
            whole[0].data,
            "load/a00001\n<tr data-agent=\"load/a00001\" class=\"offline\">"
        );
        assert_eq!(whole[0].fleet_row(), Some(("load/a00001", "offline")));
        assert_eq!(whole[1].name, "replace");
        assert_eq!(whole[1].data, "counts\n<p>");
        assert_eq!(whole[1].fleet_row(), None);
        assert_eq!(whole[2].name, "message");
        // The keep-alive's bytes are not the row's; each event counts its own lines.
        let row = "event: row\ndata: load/a00001\ndata: <tr data-agent=\"load/a00001\" class=\"offline\">\n\n";
        assert_eq!(whole[0].wire_len, row.len());
        let replace = "event: replace\ndata: counts\ndata: <p>\n\n";
        assert_eq!(
            whole[1].wire_len,
            replace.len(),
            "CR LF counted as one byte"
        );
    }

    #[test]
    fn a_remove_names_the_agent_without_a_status() {
        let ev = SseParser::default().push(b"event: remove\ndata: load/a00002\n\n", Instant::now());
        assert_eq!(ev[0].fleet_row(), Some(("load/a00002", "")));
    }

    #[test]
    fn the_live_path_is_read_from_the_page_as_the_script_reads_it() {
        let html = r#"<tbody id="agents" data-live="/ui/events/fleet?all=1&amp;since=1733420000000" data-page-size="50">"#;
        assert_eq!(
            live_path(html).as_deref(),
            Some("/ui/events/fleet?all=1&since=1733420000000")
        );
        assert_eq!(live_path("<p>no stream</p>"), None);
    }
}
