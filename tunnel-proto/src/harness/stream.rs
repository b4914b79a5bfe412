//! A simulated gateway-opened stream between two stream machines, for tests.
//!
//! Inside one QUIC (or HTTP/2) stream nothing is lost, duplicated or reordered; what a stream
//! machine does see is: reads that split and join writes anywhere, the peer's FIN, a reset at any
//! point (and with it the loss of whatever the receiver had not read yet), a stop from the
//! reader, and any bytes a misbehaving peer chooses to write, in any order. [`StreamLink`]
//! carries exactly that between a gateway-side and an agent-side end, deterministically (reads
//! split by a seeded generator); [`RawPeer`] stands in for a peer that writes by hand. An end is
//! anything with both halves: a whole-stream machine, two halves joined in a [`Halves`], or a
//! [`RawPeer`].
//!
//! The link also checks the machines: a machine that writes after its own FIN or reset fails
//! the test.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::error::ErrorCode;
use crate::stream::{RecvHalf, SendHalf, Transmit};

/// One end of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The gateway, which opened the stream.
    Gateway,
    /// The agent.
    Agent,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Gateway => 0,
            Side::Agent => 1,
        }
    }
}

/// A send half and a receive half driven as one end (the halves of a relayed call or of an
/// open TCP stream).
#[derive(Debug)]
pub struct Halves<S, R> {
    /// The sending half.
    pub send: S,
    /// The receiving half.
    pub recv: R,
}

impl<S: SendHalf, R> SendHalf for Halves<S, R> {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.send.handle_stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.send.poll_transmit()
    }
}

impl<S, R: RecvHalf> RecvHalf for Halves<S, R> {
    type Event = R::Event;

    fn handle_input(&mut self, data: Bytes) {
        self.recv.handle_input(data);
    }

    fn handle_fin(&mut self) {
        self.recv.handle_fin();
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        self.recv.handle_reset(code);
    }

    fn poll_event(&mut self) -> Option<R::Event> {
        self.recv.poll_event()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.recv.poll_stop()
    }
}

/// What a [`RawPeer`] was told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The far end finished its half.
    Fin,
    /// The far end reset its half.
    Reset(ErrorCode),
}

/// A peer that writes by hand (frames in any order, garbage, a FIN mid-frame) and records what
/// reaches it.
#[derive(Debug, Default)]
pub struct RawPeer {
    /// Every byte received, in order.
    pub received: BytesMut,
    /// How the far end's half ended, if it did.
    pub ended: Option<PeerEvent>,
    /// The stop the far end sent, if any.
    pub stopped: Option<ErrorCode>,
    out: VecDeque<Transmit>,
    stop: Option<ErrorCode>,
    events: VecDeque<PeerEvent>,
}

impl RawPeer {
    /// A peer that has written nothing yet.
    pub fn new() -> RawPeer {
        RawPeer::default()
    }

    /// Writes `bytes` as they are.
    pub fn write(&mut self, bytes: impl Into<Bytes>) {
        self.out.push_back(Transmit::Bytes(bytes.into()));
    }

    /// Finishes its half.
    pub fn finish(&mut self) {
        self.out.push_back(Transmit::Finish);
    }

    /// Resets its half.
    pub fn reset(&mut self, code: ErrorCode) {
        self.out.push_back(Transmit::Reset(code));
    }

    /// Stops reading.
    pub fn stop(&mut self, code: ErrorCode) {
        self.stop = Some(code);
    }
}

impl SendHalf for RawPeer {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.stopped = Some(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }
}

impl RecvHalf for RawPeer {
    type Event = PeerEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.received.extend_from_slice(&data);
    }

    fn handle_fin(&mut self) {
        self.ended = Some(PeerEvent::Fin);
        self.events.push_back(PeerEvent::Fin);
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        self.ended = Some(PeerEvent::Reset(code));
        self.events.push_back(PeerEvent::Reset(code));
    }

    fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.stop.take()
    }
}

#[derive(Debug)]
enum Wire {
    Bytes(Bytes),
    Fin,
    Reset(ErrorCode),
}

/// One direction of the stream.
#[derive(Debug, Default)]
struct Pipe {
    /// Towards the receiver, in order.
    queue: VecDeque<Wire>,
    /// The sender finished or reset: it may write nothing more.
    closed: bool,
    /// The receiver has its FIN or reset, or stopped: nothing more reaches it.
    done: bool,
    /// The receiver stopped: what the sender writes is dropped.
    stopped: bool,
    /// A stop on its way back to the sender.
    stop_back: Option<ErrorCode>,
    /// Bytes handed to the receiver.
    delivered: usize,
}

/// A simulated stream between a gateway-side and an agent-side end.
#[derive(Debug, Default)]
pub struct StreamLink {
    /// `[gateway → agent, agent → gateway]`.
    pipes: [Pipe; 2],
    rng: Option<u64>,
    /// Reads handed to either end.
    pub reads: usize,
}

impl StreamLink {
    /// A link that hands each end, in one read, every byte written so far.
    pub fn new() -> StreamLink {
        StreamLink::default()
    }

    /// Reads of pseudo-random sizes (a byte, a few, or several KiB, across writes), seeded for
    /// reproducibility.
    pub fn with_chunking(mut self, seed: u64) -> StreamLink {
        self.rng = Some(seed.max(1));
        self
    }

    fn next_rand(&mut self) -> Option<u64> {
        let x = self.rng.as_mut()?;
        // xorshift64, as in `Pair`.
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        Some(*x)
    }

    /// The pipe `side` writes into.
    fn from(&mut self, side: Side) -> &mut Pipe {
        &mut self.pipes[side.index()]
    }

    /// The pipe `side` reads from.
    fn towards(&mut self, side: Side) -> &mut Pipe {
        &mut self.pipes[1 - side.index()]
    }

    /// Puts everything `end` (at `side`) has to transmit on the wire, and its stops. True if
    /// there was anything.
    pub fn flush<E: SendHalf + RecvHalf + ?Sized>(&mut self, side: Side, end: &mut E) -> bool {
        let mut moved = false;
        while let Some(t) = end.poll_transmit() {
            moved = true;
            self.transmit(side, t);
        }
        while let Some(code) = end.poll_stop() {
            moved = true;
            self.stop(side, code);
        }
        moved
    }

    fn transmit(&mut self, side: Side, t: Transmit) {
        let pipe = self.from(side);
        if pipe.stopped {
            // The reader stopped; what was in flight, and what follows, is dropped.
            pipe.closed |= !matches!(t, Transmit::Bytes(_));
            return;
        }
        assert!(
            !pipe.closed,
            "{side:?} transmitted {t:?} after finishing or resetting its half"
        );
        match t {
            Transmit::Bytes(b) => {
                if !b.is_empty() {
                    pipe.queue.push_back(Wire::Bytes(b));
                }
            }
            Transmit::Finish => {
                pipe.closed = true;
                pipe.queue.push_back(Wire::Fin);
            }
            Transmit::Reset(code) => self.reset(side, code),
        }
    }

    /// `side` resets its half (as its IO would, outside its machine): what the other end has
    /// not read yet is lost, and it learns of the reset next. Nothing if the other end already
    /// saw the half end.
    pub fn reset(&mut self, side: Side, code: ErrorCode) {
        let pipe = self.from(side);
        pipe.closed = true;
        if pipe.done || pipe.stopped {
            return;
        }
        pipe.queue.clear();
        pipe.queue.push_back(Wire::Reset(code));
    }

    /// `side` finishes its half (as its IO would, outside its machine).
    pub fn finish(&mut self, side: Side) {
        let pipe = self.from(side);
        if !pipe.closed {
            pipe.closed = true;
            pipe.queue.push_back(Wire::Fin);
        }
    }

    /// `side` stops reading (as its IO would, outside its machine): nothing more reaches it,
    /// and the other end is told.
    pub fn stop(&mut self, side: Side, code: ErrorCode) {
        let pipe = self.towards(side);
        if pipe.stopped || pipe.done {
            return;
        }
        pipe.stopped = true;
        pipe.done = true;
        pipe.queue.clear();
        pipe.stop_back = Some(code);
    }

    /// Hands `end` (at `side`) the next thing for it: a stop of what it sends, or a read, a FIN
    /// or a reset of what it receives. False if there was nothing.
    pub fn deliver<E: SendHalf + RecvHalf + ?Sized>(&mut self, side: Side, end: &mut E) -> bool {
        if let Some(code) = self.from(side).stop_back.take() {
            end.handle_stopped(code);
            return true;
        }
        let want = match self.next_rand() {
            Some(r) if r & 8 == 0 => 1 + (r >> 4) as usize % 7,
            Some(r) => 1 + (r >> 4) as usize % 9000,
            None => usize::MAX,
        };
        let pipe = &mut self.pipes[1 - side.index()];
        if pipe.done {
            return false;
        }
        match pipe.queue.front_mut() {
            None => false,
            Some(Wire::Bytes(_)) => {
                // One read: up to `want` bytes, across writes.
                let mut read = BytesMut::new();
                while read.len() < want {
                    let Some(Wire::Bytes(b)) = pipe.queue.front_mut() else {
                        break;
                    };
                    let n = (want - read.len()).min(b.len());
                    read.extend_from_slice(&b.split_to(n));
                    if b.is_empty() {
                        pipe.queue.pop_front();
                    }
                }
                pipe.delivered += read.len();
                self.reads += 1;
                end.handle_input(read.freeze());
                true
            }
            Some(Wire::Fin) => {
                pipe.queue.pop_front();
                pipe.done = true;
                end.handle_fin();
                true
            }
            Some(Wire::Reset(code)) => {
                let code = *code;
                pipe.queue.pop_front();
                pipe.done = true;
                end.handle_reset(code);
                true
            }
        }
    }

    /// Flushes both ends, then hands each its next read (or stop, FIN, reset). False when
    /// nothing moved: the stream is idle until an end does something.
    pub fn step<G, A>(&mut self, gateway: &mut G, agent: &mut A) -> bool
    where
        G: SendHalf + RecvHalf + ?Sized,
        A: SendHalf + RecvHalf + ?Sized,
    {
        let mut moved = self.flush(Side::Gateway, gateway);
        moved |= self.flush(Side::Agent, agent);
        moved |= self.deliver(Side::Gateway, gateway);
        moved |= self.deliver(Side::Agent, agent);
        moved
    }

    /// Steps until the stream is idle.
    pub fn run<G, A>(&mut self, gateway: &mut G, agent: &mut A)
    where
        G: SendHalf + RecvHalf + ?Sized,
        A: SendHalf + RecvHalf + ?Sized,
    {
        let mut steps = 0u64;
        while self.step(gateway, agent) {
            steps += 1;
            assert!(steps < 50_000_000, "the stream never went idle");
        }
    }

    /// Bytes handed to the end at `side` so far.
    pub fn delivered(&self, side: Side) -> usize {
        self.pipes[1 - side.index()].delivered
    }

    /// True when the half `side` writes has ended (FIN or reset sent, or the reader stopped).
    pub fn is_closed(&self, side: Side) -> bool {
        let p = &self.pipes[side.index()];
        p.closed || p.stopped
    }

    /// True when nothing is on its way to `side`.
    pub fn is_drained(&self, side: Side) -> bool {
        let p = &self.pipes[1 - side.index()];
        p.queue.is_empty() && self.pipes[side.index()].stop_back.is_none()
    }
}
