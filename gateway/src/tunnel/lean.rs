//! Transport layer: quinn's runtime for the tunnel endpoint, tokio's with one difference that
//! saves ~11 KB of heap (~4 KiB resident) of every idle agent's connection.
//!
//! quinn's connection driver keeps one send buffer per connection for its life, and the first
//! time a transmit needs a second datagram (the handshake's flight: the post-quantum
//! `ServerHello` and the certificate do not fit one) quinn-proto reserves room for a whole GSO
//! batch at once, ten datagrams of up to 1,452 bytes (`Connection::poll_transmit`). That buffer
//! is never shrunk, so an agent that only heartbeats keeps ~13 KB the gateway will not use
//! again, a quarter of the heap one idle agent costs; its pages never written are not resident,
//! so RSS gains less (see docs/PERFORMANCE.md, "Memory per idle agent, second pass").
//!
//! quinn asks the socket how many segments a batch may have (`max_transmit_segments`) each
//! time a connection's driver sends. Here the socket answers 1 to a connection that has sent
//! fewer than [`BATCH_AFTER`] datagrams: its transmits are one datagram each, and its buffer
//! stays one datagram long. A connection that sends more (a relayed upload, a bulk stream
//! towards the agent) gets GSO batches from then on, as with tokio's runtime. Which connection
//! is asking is known because every task quinn spawns here (the connection drivers, and the
//! endpoint driver) runs inside [`Counted`], which lends the thread its count while it polls.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};

/// Datagrams a connection sends one per `sendmsg` before it may send GSO batches: more than a
/// handshake (3–4), a heartbeat's or a probe's exchange, or a relayed call of a few KB needs,
/// so idle and lightly used connections never grow a batch buffer; about 90 KB, so a bulk
/// transfer is batched after its first milliseconds.
pub const BATCH_AFTER: u64 = 64;

thread_local! {
    /// Datagrams sent so far by the connection whose driver this thread is polling; `None`
    /// outside one.
    static POLLING: Cell<Option<u64>> = const { Cell::new(None) };
}

/// tokio's runtime, with the tunnel's lean send batches (see the module's documentation).
#[derive(Debug)]
pub struct LeanRuntime;

impl Runtime for LeanRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(Counted { sent: 0, future });
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(LeanSocket(TokioRuntime.wrap_udp_socket(socket)?)))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// A task quinn spawned, with the datagrams it has sent.
struct Counted {
    sent: u64,
    future: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Future for Counted {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Restores the thread's previous count even if the task panics.
        struct Lend<'a>(&'a mut u64, Option<u64>);
        impl Drop for Lend<'_> {
            fn drop(&mut self) {
                if let Some(sent) = POLLING.replace(self.1) {
                    *self.0 = sent;
                }
            }
        }
        let outer = POLLING.replace(Some(this.sent));
        let _lend = Lend(&mut this.sent, outer);
        this.future.as_mut().poll(cx)
    }
}

/// tokio's UDP socket, answering [`BATCH_AFTER`]'s policy for the polling connection.
struct LeanSocket(Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for LeanSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LeanSocket").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for LeanSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.0.try_send(transmit)?;
        let datagrams = match transmit.segment_size {
            Some(s) if s > 0 => transmit.contents.len().div_ceil(s),
            _ => 1,
        };
        POLLING.with(|p| {
            if let Some(sent) = p.get() {
                p.set(Some(sent.saturating_add(datagrams as u64)));
            }
        });
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        match POLLING.get() {
            Some(sent) if sent < BATCH_AFTER => 1,
            _ => self.0.max_transmit_segments(),
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(contents: &[u8], segment_size: Option<usize>, to: SocketAddr) -> Transmit<'_> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    /// What a task quinn spawned on the lean runtime sees: one segment per transmit until it
    /// has sent `BATCH_AFTER` datagrams (batches count each of their segments), the socket's
    /// own limit after that; and outside such a task, the socket's own limit always.
    #[tokio::test]
    async fn a_connection_is_given_batches_only_after_it_has_sent_its_first_datagrams() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let socket = LeanRuntime
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let own = TokioRuntime
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap()
            .max_transmit_segments();
        assert!(
            own > 1,
            "this kernel offers no UDP GSO on loopback (quinn reports {own} segment), so a lean \
             connection cannot be told from a batching one; run on Linux with UDP GSO"
        );
        assert_eq!(socket.max_transmit_segments(), own, "outside a quinn task");

        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_socket = socket.clone();
        LeanRuntime.spawn(Box::pin(async move {
            let mut seen = Vec::new();
            let datagram = [7u8; 100];
            // Single datagrams up to one short of the threshold.
            for _ in 0..BATCH_AFTER - 1 {
                seen.push(task_socket.max_transmit_segments());
                send(&*task_socket, &transmit(&datagram, None, to)).await;
            }
            seen.push(task_socket.max_transmit_segments());
            // A batch of two segments crosses it.
            send(&*task_socket, &transmit(&[7u8; 200], Some(100), to)).await;
            seen.push(task_socket.max_transmit_segments());
            tx.send(seen).unwrap();
        }));
        let seen = rx.await.unwrap();
        assert!(
            seen[..BATCH_AFTER as usize].iter().all(|&s| s == 1),
            "one segment per transmit before {BATCH_AFTER} datagrams: {seen:?}"
        );
        assert_eq!(*seen.last().unwrap(), own, "the socket's own limit after");
        // A second task starts from nothing: counts are per task, not per socket.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_socket = socket.clone();
        LeanRuntime.spawn(Box::pin(async move {
            tx.send(task_socket.max_transmit_segments()).unwrap();
        }));
        assert_eq!(rx.await.unwrap(), 1);
        assert_eq!(socket.max_transmit_segments(), own, "outside again");
    }

    async fn send(socket: &dyn AsyncUdpSocket, t: &Transmit<'_>) {
        loop {
            match socket.try_send(t) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::task::yield_now().await,
                Err(e) => panic!("send to loopback: {e}"),
            }
        }
    }
}
