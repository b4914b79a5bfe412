//! Transport layer: one tunnel connection and its bidirectional streams, over QUIC or, where UDP
//! is blocked, over TLS + HTTP/2 on TCP.
//!
//! Both carry the same thing: streams the gateway opens towards the agent (plus the control
//! stream), each a pair of byte pipes with per-stream flow control, finish and reset. Over
//! HTTP/2 the **agent is the HTTP/2 server**, so the gateway opens streams towards it exactly as
//! over QUIC: a stream is a request (the gateway's half) and its response (the agent's half),
//! the response headers sent at once so both halves flow from the start. The control stream is
//! the first stream: agent-opened over QUIC, gateway-opened over HTTP/2 (an HTTP/2 server cannot
//! open streams); the session state machines do not care which side opened it.
//!
//! This is a closed set of two, so the seam is an enum, not a trait object: no boxed futures on
//! the data path, and `match` shows every difference in one place.
//!
//! | | QUIC | HTTP/2 |
//! |---|---|---|
//! | reset | `RESET_STREAM` with the error code | `RST_STREAM` with the code (offset past HTTP/2's own) |
//! | stop reading | `STOP_SENDING` | nothing (the peer learns from the reset that follows) |
//! | peer stopped | `stopped()` | `poll_reset` |
//! | close | `CONNECTION_CLOSE` with code and reason | the session's `Close` frame, then TCP close |

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tunnel_proto::ErrorCode;

use crate::stream::{LinkError, StreamError, quinn_connection_err};

/// Which transport a link runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS + HTTP/2 over TCP (the fallback).
    Tcp,
}

impl Transport {
    /// `quic` or `tcp`, as in metrics labels, `/readyz` and `Agents/Get`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// HTTP/2 settings for both ends: windows large enough for bulk transfers on long paths, and
/// frames larger than the 16 KiB default (less per-frame overhead).
pub mod h2_settings {
    /// Per-stream receive window.
    pub const STREAM_WINDOW: u32 = 1 << 20;
    /// Per-connection receive window.
    pub const CONNECTION_WINDOW: u32 = 16 << 20;
    /// Largest frame accepted.
    pub const MAX_FRAME: u32 = 64 << 10;
    /// Most concurrent gateway-opened streams an agent accepts (as over QUIC).
    pub const MAX_STREAMS: u32 = 1024;
    /// Data buffered per stream before `write` waits for the peer.
    pub const SEND_BUFFER: usize = 256 << 10;
    /// Largest header list accepted: tunnel streams carry their metadata in the body (the
    /// `StreamHeader`), so HTTP/2 headers here are a few bytes; this bounds what a peer can
    /// make the other end decode and hold.
    pub const MAX_HEADER_LIST: u32 = 16 << 10;
}

/// One tunnel connection (cheap to clone).
#[derive(Clone, Debug)]
pub enum Link {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// An HTTP/2 connection over TLS on TCP.
    H2(H2Link),
}

/// An HTTP/2 tunnel connection; see the module docs.
#[derive(Clone)]
pub struct H2Link {
    inner: Arc<H2Inner>,
}

impl std::fmt::Debug for H2Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Link")
            .field("remote", &self.inner.remote)
            .finish_non_exhaustive()
    }
}

type Accepted = (
    http::Request<h2::RecvStream>,
    h2::server::SendResponse<Bytes>,
);

enum Role {
    /// The gateway's end: opens streams.
    Client(h2::client::SendRequest<Bytes>),
    /// The agent's end: accepts them.
    Server(Mutex<mpsc::Receiver<Accepted>>),
}

struct H2Inner {
    role: Role,
    remote: SocketAddr,
    /// Cancelled by `close`: the driver flushes briefly, then drops the connection.
    close: CancellationToken,
    /// Why the connection ended, once it has.
    ended: watch::Receiver<Option<String>>,
    /// How long its TLS handshake took, in microseconds (0: not measured): the round trip
    /// until the first heartbeat measures one.
    handshake_rtt_us: std::sync::atomic::AtomicU64,
}

/// How long a closing HTTP/2 connection keeps flushing (the session's `Close` frame) before the
/// socket is dropped, unless the peer closes first.
const CLOSE_FLUSH: Duration = Duration::from_millis(250);

impl Link {
    /// The round trip as known before any heartbeat: QUIC's estimate from its handshake, or,
    /// over TCP, how long the TLS handshake took when [`Link::set_handshake_rtt`] said.
    pub fn initial_rtt(&self) -> Option<Duration> {
        match self {
            Link::Quic(c) => Some(c.rtt()),
            Link::H2(h) => match h
                .inner
                .handshake_rtt_us
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                0 => None,
                us => Some(Duration::from_micros(us)),
            },
        }
    }

    /// Records how long the TLS handshake under an HTTP/2 link took (from the ClientHello read
    /// to its end: one round trip plus both ends' handshake work); nothing for QUIC.
    pub fn set_handshake_rtt(&self, took: Duration) {
        if let Link::H2(h) = self {
            h.inner.handshake_rtt_us.store(
                took.as_micros().clamp(1, u64::MAX as u128) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        match self {
            Link::Quic(_) => Transport::Quic,
            Link::H2(_) => Transport::Tcp,
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Link::Quic(c) => c.remote_address(),
            Link::H2(h) => h.inner.remote,
        }
    }

    /// Opens a stream towards the peer (the gateway's side; over QUIC also the agent's control
    /// stream).
    pub async fn open(&self) -> Result<(SendStream, RecvStream), StreamError> {
        match self {
            Link::Quic(c) => {
                let (s, r) = c.open_bi().await.map_err(quinn_connection_err)?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Link::H2(h) => {
                let Role::Client(sr) = &h.inner.role else {
                    return Err(StreamError::Unusable {
                        what: "the agent's end of an HTTP/2 tunnel cannot open streams",
                    });
                };
                let mut sr = sr.clone().ready().await.map_err(h2_conn_err)?;
                let req = http::Request::post("/tether")
                    .body(())
                    .expect("static request");
                let (response, send) = sr.send_request(req, false).map_err(h2_conn_err)?;
                Ok((
                    SendStream::H2(send),
                    RecvStream::H2(H2Recv {
                        state: H2RecvState::Pending(response),
                        left: Bytes::new(),
                    }),
                ))
            }
        }
    }

    /// The next stream the peer opened; `None` once the connection is gone.
    pub async fn accept(&self) -> Option<(SendStream, RecvStream)> {
        match self {
            Link::Quic(c) => {
                let (s, r) = c.accept_bi().await.ok()?;
                Some((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Link::H2(h) => {
                let Role::Server(rx) = &h.inner.role else {
                    // The gateway's end never accepts: wait for the end of the connection.
                    h.ended().await;
                    return None;
                };
                loop {
                    let (req, mut respond) = rx.lock().await.recv().await?;
                    // Headers at once, so both halves flow from the start.
                    match respond.send_response(http::Response::new(()), false) {
                        Ok(send) => {
                            return Some((
                                SendStream::H2(send),
                                RecvStream::H2(H2Recv {
                                    state: H2RecvState::Ready(req.into_body()),
                                    left: Bytes::new(),
                                }),
                            ));
                        }
                        // Reset by the gateway before we answered: nothing to serve.
                        Err(_) => continue,
                    }
                }
            }
        }
    }

    /// Closes the connection. Over QUIC the code and reason travel in `CONNECTION_CLOSE`; over
    /// HTTP/2 the session's `Close` frame (written before this) carries them.
    pub fn close(&self, code: ErrorCode, reason: &[u8]) {
        match self {
            Link::Quic(c) => c.close(code.0.into(), reason),
            Link::H2(h) => h.inner.close.cancel(),
        }
    }

    /// After writing the session's `Close` and calling [`close`](Self::close): waits (at most
    /// [`CLOSE_FLUSH`]) for the connection to end while the caller still holds the control
    /// stream, so that over HTTP/2 the peer reads `Close` before any reset of the stream.
    pub async fn linger(&self) {
        let _ = tokio::time::timeout(CLOSE_FLUSH * 2, self.closed()).await;
    }

    /// Waits until the connection is gone; says why.
    pub async fn closed(&self) -> String {
        match self {
            Link::Quic(c) => c.closed().await.to_string(),
            Link::H2(h) => h.ended().await,
        }
    }
}

impl H2Link {
    async fn ended(&self) -> String {
        let mut rx = self.inner.ended.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return "connection dropped".into();
            }
        }
    }

    /// The gateway's end: runs the HTTP/2 client handshake on an established TLS stream (the
    /// agent is the server) and drives the connection in a task.
    pub async fn client<T>(io: T, remote: SocketAddr) -> Result<Link, StreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send_request, conn) = h2::client::Builder::new()
            .initial_window_size(h2_settings::STREAM_WINDOW)
            .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
            .max_frame_size(h2_settings::MAX_FRAME)
            .max_send_buffer_size(h2_settings::SEND_BUFFER)
            .max_header_list_size(h2_settings::MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(h2_conn_err)?;
        let close = CancellationToken::new();
        let (ended_tx, ended) = watch::channel(None);
        let stop = close.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let why = tokio::select! {
                r = &mut conn => describe_end(r),
                _ = stop.cancelled() => {
                    // Flush what was written (the Close frame) unless the peer ends it first.
                    match tokio::time::timeout(CLOSE_FLUSH, &mut conn).await {
                        Ok(r) => describe_end(r),
                        Err(_) => "closed locally".into(),
                    }
                }
            };
            let _ = ended_tx.send(Some(why));
        });
        Ok(Link::H2(H2Link {
            inner: Arc::new(H2Inner {
                role: Role::Client(send_request),
                remote,
                close,
                ended,
                handshake_rtt_us: Default::default(),
            }),
        }))
    }

    /// The agent's end: runs the HTTP/2 server handshake on an established TLS stream and
    /// drives the connection in a task, queueing the streams the gateway opens.
    pub async fn server<T>(io: T, remote: SocketAddr) -> Result<Link, StreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(h2_settings::STREAM_WINDOW)
            .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
            .max_frame_size(h2_settings::MAX_FRAME)
            .max_concurrent_streams(h2_settings::MAX_STREAMS)
            .max_send_buffer_size(h2_settings::SEND_BUFFER)
            .max_header_list_size(h2_settings::MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(h2_conn_err)?;
        let close = CancellationToken::new();
        let (ended_tx, ended) = watch::channel(None);
        // Streams wait here until accepted; the bound is HTTP/2's own stream limit.
        let (tx, rx) = mpsc::channel(h2_settings::MAX_STREAMS as usize);
        let stop = close.clone();
        tokio::spawn(async move {
            let why = loop {
                tokio::select! {
                    next = conn.accept() => match next {
                        Some(Ok(stream)) => {
                            if tx.send(stream).await.is_err() {
                                break "agent stopped accepting".to_owned();
                            }
                        }
                        Some(Err(e)) => break h2_conn_err(e).to_string(),
                        None => break "closed by the gateway".to_owned(),
                    },
                    _ = stop.cancelled() => {
                        conn.graceful_shutdown();
                        let flushed = tokio::time::timeout(CLOSE_FLUSH, async {
                            while let Some(Ok(_)) = conn.accept().await {}
                        })
                        .await;
                        break if flushed.is_ok() { "closed".into() } else { "closed locally".into() };
                    }
                }
            };
            let _ = ended_tx.send(Some(why));
        });
        Ok(Link::H2(H2Link {
            inner: Arc::new(H2Inner {
                role: Role::Server(Mutex::new(rx)),
                remote,
                close,
                ended,
                handshake_rtt_us: Default::default(),
            }),
        }))
    }
}

fn describe_end(r: Result<(), h2::Error>) -> String {
    match r {
        Ok(()) => "closed by the peer".into(),
        Err(e) => h2_conn_err(e).to_string(),
    }
}

/// Tether's stream error codes travel in `RST_STREAM` offset by this, so they never collide with
/// HTTP/2's own codes (h2 itself resets streams with `CANCEL`, 0x8, when their handles drop).
const APP_RESET_BASE: u32 = 0x1000_0000;

/// An HTTP/2 error as a stream error: a reset keeps its code; the rest is the connection.
fn h2_err(e: h2::Error) -> StreamError {
    if let Some(r) = e.reason()
        && !e.is_go_away()
        && !e.is_io()
    {
        let r = u32::from(r);
        return if r >= APP_RESET_BASE {
            StreamError::Reset(ErrorCode(r - APP_RESET_BASE))
        } else if r == u32::from(h2::Reason::CANCEL) || r == u32::from(h2::Reason::NO_ERROR) {
            StreamError::Reset(ErrorCode::CANCELLED)
        } else {
            StreamError::Http2(e)
        };
    }
    h2_conn_err(e)
}

fn h2_conn_err(e: h2::Error) -> StreamError {
    StreamError::ConnectionLost(if e.is_io() {
        LinkError::Tcp(e)
    } else {
        LinkError::Http2(e)
    })
}

/// The sending half of a tunnel stream.
#[derive(Debug)]
pub enum SendStream {
    /// Over QUIC.
    Quic(quinn::SendStream),
    /// Over HTTP/2.
    H2(h2::SendStream<Bytes>),
}

impl SendStream {
    /// Writes all of `buf`, waiting for flow control.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s) => Ok(s.write_all(buf).await?),
            SendStream::H2(s) => h2_write(s, Bytes::copy_from_slice(buf)).await,
        }
    }

    /// Writes every chunk, in order, without copying them.
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s) => Ok(s.write_all_chunks(chunks).await?),
            SendStream::H2(s) => {
                for c in chunks.iter_mut() {
                    h2_write(s, std::mem::take(c)).await?;
                }
                Ok(())
            }
        }
    }

    /// Ends the stream cleanly (the peer reads end-of-stream after the data).
    pub fn finish(&mut self) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(|_| StreamError::Unusable {
                what: "closed stream",
            }),
            SendStream::H2(s) => s.send_data(Bytes::new(), true).map_err(h2_err),
        }
    }

    /// Abandons the stream with `code` (both directions over HTTP/2).
    pub fn reset(&mut self, code: ErrorCode) {
        match self {
            SendStream::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u32(code.0));
            }
            SendStream::H2(s) => {
                s.send_reset(h2::Reason::from(APP_RESET_BASE.saturating_add(code.0)));
            }
        }
    }

    /// Resolves when the peer no longer wants the data (it stopped or reset the stream).
    pub async fn stopped(&mut self) {
        match self {
            SendStream::Quic(s) => {
                let _ = s.stopped().await;
            }
            SendStream::H2(s) => {
                let _ = poll_fn(|cx| s.poll_reset(cx)).await;
            }
        }
    }

    /// As [`stopped`](Self::stopped), with the code the peer stopped the stream with (over
    /// HTTP/2, its reset's code); `None` when the stream ended otherwise: finished and
    /// acknowledged, or its connection gone. For a relay in the middle (a peer link's splice)
    /// that hands the code on.
    pub async fn stopped_code(&mut self) -> Option<ErrorCode> {
        match self {
            SendStream::Quic(s) => match s.stopped().await {
                Ok(Some(code)) => Some(ErrorCode::from(code.into_inner())),
                _ => None,
            },
            SendStream::H2(s) => match poll_fn(|cx| s.poll_reset(cx)).await {
                Ok(reason) => {
                    let r = u32::from(reason);
                    Some(if r >= APP_RESET_BASE {
                        ErrorCode(r - APP_RESET_BASE)
                    } else {
                        ErrorCode::CANCELLED
                    })
                }
                Err(_) => None,
            },
        }
    }
}

async fn h2_write(s: &mut h2::SendStream<Bytes>, mut data: Bytes) -> Result<(), StreamError> {
    while !data.is_empty() {
        s.reserve_capacity(data.len());
        let n = match poll_fn(|cx| s.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_err(e)),
            None => {
                return Err(StreamError::Unusable {
                    what: "stream closed for sending",
                });
            }
        };
        if n == 0 {
            continue;
        }
        let chunk = data.split_to(n.min(data.len()));
        s.send_data(chunk, false).map_err(h2_err)?;
    }
    Ok(())
}

/// The receiving half of a tunnel stream.
#[derive(Debug)]
pub enum RecvStream {
    /// Over QUIC.
    Quic(quinn::RecvStream),
    /// Over HTTP/2.
    H2(H2Recv),
}

/// The receiving half of an HTTP/2 tunnel stream.
#[derive(Debug)]
pub struct H2Recv {
    state: H2RecvState,
    /// Bytes of a frame larger than the caller asked for, served first.
    left: Bytes,
}

#[derive(Debug)]
enum H2RecvState {
    /// Gateway side: the agent's response headers have not arrived yet.
    Pending(h2::client::ResponseFuture),
    Ready(h2::RecvStream),
}

impl RecvStream {
    /// The next bytes (at most about `max`); `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        match self {
            RecvStream::Quic(r) => Ok(r.read_chunk(max, true).await?.map(|c| c.bytes)),
            RecvStream::H2(r) => r.read_chunk(max).await,
        }
    }

    /// Reads into `buf`; `None` at the end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        match self {
            RecvStream::Quic(r) => Ok(r.read(buf).await?),
            RecvStream::H2(r) => Ok(r.read_chunk(buf.len()).await?.map(|b| {
                buf[..b.len()].copy_from_slice(&b);
                b.len()
            })),
        }
    }

    /// Tells the peer to stop sending (QUIC `STOP_SENDING`; over HTTP/2 a no-op: the caller
    /// resets the stream, which ends both halves).
    pub fn stop(&mut self, code: ErrorCode) {
        if let RecvStream::Quic(r) = self {
            let _ = r.stop(quinn::VarInt::from_u32(code.0));
        }
    }
}

impl H2Recv {
    /// Cancel-safe (callers race it against timers): nothing is moved out of `self` across an
    /// await.
    async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        let max = max.max(1);
        if !self.left.is_empty() {
            return Ok(Some(self.left.split_to(self.left.len().min(max))));
        }
        loop {
            match &mut self.state {
                H2RecvState::Pending(fut) => {
                    let resp = fut.await.map_err(h2_err)?;
                    self.state = H2RecvState::Ready(resp.into_body());
                }
                H2RecvState::Ready(body) => {
                    let mut chunk = match poll_fn(|cx| body.poll_data(cx)).await {
                        None => return Ok(None),
                        Some(Err(e)) => return Err(h2_err(e)),
                        Some(Ok(b)) => b,
                    };
                    // The window opens again as soon as the bytes are ours: buffering is
                    // bounded by the window plus what the reader holds.
                    let _ = body.flow_control().release_capacity(chunk.len());
                    if chunk.is_empty() {
                        continue;
                    }
                    let out = chunk.split_to(chunk.len().min(max));
                    self.left = chunk;
                    return Ok(Some(out));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// Reads frames from the gateway's end until a GOAWAY; its error code (`None` if the
    /// connection ended without one).
    async fn goaway_code(io: &mut DuplexStream) -> Option<u32> {
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.ok()?;
            if head[3] == 0x7 {
                return Some(u32::from_be_bytes(payload[4..8].try_into().ok()?));
            }
        }
    }

    /// An HTTP/2 "agent" that speaks raw frames: takes the gateway's preface, sends its own
    /// SETTINGS, then `misbehave`.
    async fn hostile_agent(misbehave: Vec<u8>) -> (Link, DuplexStream) {
        let (gateway_io, mut agent_io) = tokio::io::duplex(1 << 20);
        let link = tokio::spawn(H2Link::client(gateway_io, ([127, 0, 0, 1], 1).into()));
        let mut preface = vec![0u8; PREFACE.len()];
        agent_io.read_exact(&mut preface).await.unwrap();
        assert_eq!(preface, PREFACE);
        agent_io.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
        agent_io.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
        let link = link.await.unwrap().expect("HTTP/2 handshake");
        agent_io.write_all(&misbehave).await.unwrap();
        (link, agent_io)
    }

    #[tokio::test]
    async fn the_agent_end_of_a_tcp_tunnel_can_neither_push_nor_open_streams() {
        // :method GET, :scheme https, :path /, :authority localhost (HPACK).
        let mut request = vec![0x82, 0x87, 0x84, 0x41, 9];
        request.extend(b"localhost");

        // A PUSH_PROMISE on a stream the gateway opened.
        let mut promise = 2u32.to_be_bytes().to_vec();
        promise.extend(&request);
        let (link, mut io) = hostile_agent(Vec::new()).await;
        let (_send, _recv) = link.open().await.expect("gateway opens a stream");
        io.write_all(&frame(0x5, 0x4, 1, &promise)).await.unwrap();
        assert_eq!(goaway_code(&mut io).await, Some(0x1), "PROTOCOL_ERROR");
        let why = tokio::time::timeout(Duration::from_secs(10), link.closed())
            .await
            .expect("the connection ends");
        assert!(why.contains("HTTP/2"), "{why}");

        // HEADERS opening a stream of its own (stream 2: server-initiated).
        let (link, mut io) = hostile_agent(frame(0x1, 0x4 | 0x1, 2, &request)).await;
        assert_eq!(goaway_code(&mut io).await, Some(0x1), "PROTOCOL_ERROR");
        tokio::time::timeout(Duration::from_secs(10), link.closed())
            .await
            .expect("the connection ends");
    }
}
