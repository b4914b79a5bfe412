//! A hostile agent: a bare QUIC client with a valid agent certificate that holds a real session
//! (the sans-IO [`AgentSession`] over its control stream, heartbeats, probes answered) and
//! answers every command delivered to it with as much as the protocol lets it send: the largest
//! progress lines a stream frame holds, as many as it likes, a large output and a huge result
//! message. What a compromised agent can do to the gateway's memory, store and `List`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tunnel_proto::frame::{FrameDecoder, MAX_DATA_FRAME};
use tunnel_proto::message::{
    CommandAck, CommandProgress, CommandResult, Hello, Message, OpenResult, StreamKind,
};
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};

use crate::{CertFiles, RawAgent};

/// What the hostile agent sends back for each command.
#[derive(Clone, Debug)]
pub struct Flood {
    /// Progress lines per delivery.
    pub progress_lines: usize,
    /// Bytes per progress line (a stream frame holds up to 128 KiB).
    pub line_bytes: usize,
    /// Bytes of output, in `Data` frames before the result.
    pub output_bytes: usize,
    /// Bytes of the result's message.
    pub message_bytes: usize,
    /// End the first delivery of each command after its progress lines, without a result, so
    /// the gateway redelivers it; the second delivery sends one line, `second attempt`.
    pub fail_first_attempt: bool,
}

impl Flood {
    /// The attack of issue 15, finding 2: 20 lines of 120 KiB, 4 MiB of output, a 120 KiB
    /// message, per command.
    pub fn issue_15() -> Flood {
        Flood {
            progress_lines: 20,
            line_bytes: 120 << 10,
            output_bytes: 4 << 20,
            message_bytes: 120 << 10,
            fail_first_attempt: false,
        }
    }
}

/// A running hostile agent; dropped, it disconnects.
pub struct HostileAgent {
    /// Command deliveries it answered (up to the result, or up to the abandon).
    pub answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileAgent {
    /// Connects to `gateway` with `files` (a valid agent certificate), waits for `Welcome`, and
    /// serves deliveries with `flood`.
    pub async fn connect(files: &CertFiles, gateway: SocketAddr, flood: Flood) -> HostileAgent {
        Self::connect_as(files, gateway, flood, "hostile").await
    }

    /// [`HostileAgent::connect`], announcing `agent_version` in its `Hello`.
    pub async fn connect_as(
        files: &CertFiles,
        gateway: SocketAddr,
        flood: Flood,
        agent_version: &str,
    ) -> HostileAgent {
        let raw = RawAgent::new(files, true, b"tether/1");
        let conn = raw
            .endpoint
            .connect(gateway, "localhost")
            .expect("connect")
            .await
            .expect("hostile agent handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        let hello = Hello {
            agent_version: agent_version.into(),
            capabilities: vec!["relay".into(), "commands".into()],
            instance_id: "hostile".into(),
            ..Default::default()
        };
        let mut session = AgentSession::new(AgentSessionConfig::new(hello), Instant::now());
        let mut buf = vec![0u8; 64 << 10];
        // Up to Welcome here, so the caller knows the gateway has the session.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut established = false;
        while !established {
            while let Some(b) = session.poll_transmit() {
                send.write_all(&b).await.expect("write control");
            }
            while let Some(e) = session.poll_event() {
                match e {
                    AgentEvent::Established(_) => established = true,
                    AgentEvent::Closed(c) => panic!("gateway closed the hostile session: {c:?}"),
                    _ => {}
                }
            }
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "no Welcome within 20 s");
            let n = tokio::time::timeout(Duration::from_secs(1), recv.read(&mut buf)).await;
            match n {
                Ok(Ok(Some(n))) => session.handle_input(&buf[..n], Instant::now()),
                Ok(_) => panic!("control stream ended before Welcome"),
                Err(_) => session.handle_timeout(Instant::now()),
            }
        }
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            let _endpoint = raw.endpoint;
            let attempts = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
            loop {
                while let Some(b) = session.poll_transmit() {
                    if send.write_all(&b).await.is_err() {
                        return;
                    }
                }
                while let Some(e) = session.poll_event() {
                    if let AgentEvent::Closed(_) = e {
                        return;
                    }
                }
                let at = session
                    .poll_timeout()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                tokio::select! {
                    r = recv.read(&mut buf) => match r {
                        Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                        _ => return,
                    },
                    _ = tokio::time::sleep_until(at.into()) => session.handle_timeout(Instant::now()),
                    s = conn.accept_bi() => match s {
                        Ok((tx, rx)) => {
                            let flood = flood.clone();
                            let count = count.clone();
                            let attempts = attempts.clone();
                            tokio::spawn(async move {
                                answer(tx, rx, &flood, &attempts, &count).await;
                            });
                        }
                        Err(_) => return,
                    },
                }
            }
        });
        HostileAgent { answered, task }
    }
}

type Attempts = std::sync::Mutex<std::collections::HashMap<String, u32>>;

/// Reads one gateway-opened stream's header (and a command's payload) and floods the answer.
async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    flood: &Flood,
    attempts: &Attempts,
    answered: &AtomicUsize,
) {
    let mut dec = FrameDecoder::new(MAX_DATA_FRAME + (64 << 10));
    let mut header = None;
    // The header, then (commands) the payload up to FIN.
    loop {
        match dec.next_message() {
            Ok(Some(Message::StreamHeader(h))) if header.is_none() => {
                if h.stream_kind() == StreamKind::Probe {
                    let ok = Message::OpenResult(OpenResult {
                        ok: true,
                        ..Default::default()
                    });
                    let _ = send.write_all(&ok.to_bytes()).await;
                    let _ = send.finish();
                    return;
                }
                header = Some(h);
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(_) => return,
        }
        match recv.read_chunk(MAX_DATA_FRAME, true).await {
            Ok(Some(c)) => dec.push(&c.bytes),
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let Some(header) = header else { return };
    if header.stream_kind() != StreamKind::Command {
        return;
    }
    let attempt = {
        let mut a = attempts.lock().unwrap();
        let n = a.entry(header.id.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let second = flood.fail_first_attempt && attempt > 1;
    let mut frames = vec![Message::CommandAck(CommandAck::default()).to_bytes()];
    if second {
        frames.push(
            Message::CommandProgress(CommandProgress {
                message: "second attempt".into(),
            })
            .to_bytes(),
        );
    } else {
        for i in 0..flood.progress_lines {
            let mut line = format!("attempt {attempt} line {i} ");
            line.push_str(&"p".repeat(flood.line_bytes.saturating_sub(line.len())));
            frames.push(Message::CommandProgress(CommandProgress { message: line }).to_bytes());
        }
    }
    for f in frames {
        if send.write_all(&f).await.is_err() {
            return;
        }
    }
    if flood.fail_first_attempt && !second {
        // The stream ends without a result (a clean FIN, so the gateway reads every line
        // first): a failed attempt, redelivered.
        answered.fetch_add(1, Ordering::SeqCst);
        let _ = send.finish();
        let _ = send.stopped().await;
        return;
    }
    let output = Bytes::from(vec![b'o'; if second { 2 } else { flood.output_bytes }]);
    let mut out = output.clone();
    while !out.is_empty() {
        let chunk = out.split_to(out.len().min(MAX_DATA_FRAME));
        if send
            .write_all(&Message::Data(chunk).to_bytes())
            .await
            .is_err()
        {
            // The gateway stopped reading (an output above its limit): nothing more to say.
            answered.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
    let result = Message::CommandResult(CommandResult {
        succeeded: true,
        output: Vec::new(),
        message: "m".repeat(if second { 1 } else { flood.message_bytes }),
    });
    let _ = send.write_all(&result.to_bytes()).await;
    let _ = send.finish();
    answered.fetch_add(1, Ordering::SeqCst);
    // Keep the stream until the gateway has read it all.
    let _ = send.stopped().await;
}
