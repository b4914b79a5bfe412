//! Feature + backend: the ledger, the customer's own record of what the control plane did
//! through this agent: every relayed call and TCP stream, every command delivery, every approval
//! decision, and every pause, resume and reload, never a payload or a secret value.
//!
//! Records are appended, one JSON object a line, to `state_dir/ledger/ledger-NNNNNN.jsonl`:
//!
//! ```text
//! {"hash":"<sha256 of the rest>","seq":7,"prev":"<hash of record 6>","time":"…","kind":"call",…}
//! ```
//!
//! `hash` is the SHA-256 of the line with its `"hash":"…",` member taken out (the object from
//! `{"seq"` on), and `prev` is the hash of the record before, so a removed, edited or reordered
//! record breaks the chain where it happened. Every `checkpoint_records` records (or
//! `checkpoint_interval`), at rotation and at shutdown, a `checkpoint` record carries a
//! signature, with the agent's own private key, over the agent id, its sequence number and the
//! hash before it: a chain rewritten from some point on fails at the next checkpoint unless
//! whoever rewrote it holds the agent's key. Files are rotated at `max_file_bytes`, the newest
//! `max_files` kept; the chain runs on across files.
//!
//! The relay and the executor hand records to [`Ledger::record`], which only queues them (a
//! bounded channel, never a wait): hashing, signing and writing happen on a thread of their own,
//! off the call's path. When the queue is full the record is counted and a `gap` record says
//! how many were lost. The same lines go to stdout (the logs go to stderr) for the cluster's
//! log pipeline, a copy outside the agent's reach.
//!
//! [`verify`] (`tether-agent ledger verify`) checks the files and says where each break is.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use rustls::SignatureScheme;
use rustls_pki_types::PrivateKeyDer;
use serde::Serialize;

use crate::config::LedgerConfig;

/// Records queued for the writer at most; beyond, they are counted and reported as a gap.
pub const QUEUE: usize = 65_536;
/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The ledger's directory under `state_dir`.
pub const DIR: &str = "ledger";
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// Why the ledger could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The directory or a file could not be read or written.
    #[error("ledger: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The agent's key cannot sign checkpoints.
    #[error("ledger: the agent's private key cannot sign checkpoints: {0}")]
    Key(String),
}

// === Records ===

/// A relayed gRPC call or TCP stream.
#[derive(Clone, Debug, Serialize)]
pub struct Relayed {
    /// The caller the gateway authenticated (`mtls:<name>`, `jwt:<subject>`; empty from an
    /// older gateway).
    pub caller: String,
    /// The agent's tenant.
    pub tenant: String,
    /// The service (a key of `services`, or `agent`).
    pub service: String,
    /// The gRPC method; empty for a TCP stream.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The gRPC status (`Ok`, `FailedPrecondition`, …), or `Reset` when the stream broke.
    pub status: String,
    /// Bytes from the caller (request messages, or TCP bytes to the service).
    pub bytes_in: u64,
    /// Bytes to the caller.
    pub bytes_out: u64,
    /// When it began (written as RFC 3339, UTC, by the writer: no formatting on the call's
    /// path).
    #[serde(serialize_with = "rfc3339")]
    pub start: SystemTime,
    /// How long it lasted, in milliseconds.
    pub duration_ms: f64,
}

/// One delivery of a command.
#[derive(Clone, Debug, Serialize)]
pub struct CommandEntry {
    /// The command id.
    pub id: String,
    /// Its kind (`command_kind`: `kind` says what the record is).
    #[serde(rename = "command_kind")]
    pub kind: String,
    /// SHA-256 of the payload, hex.
    pub payload_sha256: String,
    /// Which delivery this was (the gateway's count; 0 from an older gateway).
    pub attempt: u32,
    /// `succeeded`, `failed`, `answered_from_record` (a redelivery of a completed id),
    /// `stream_lost`.
    pub outcome: String,
    /// When the delivery arrived (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    pub start: SystemTime,
    /// How long it took, in milliseconds (a delivery held while paused included).
    pub duration_ms: f64,
    /// How long it was held because the agent was paused, in milliseconds.
    #[serde(skip_serializing_if = "is_zero")]
    pub held_ms: f64,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// What a record says.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A relayed gRPC call.
    Call(Relayed),
    /// A relayed TCP stream.
    Stream(Relayed),
    /// A command delivery.
    Command(CommandEntry),
    /// A command of a kind in `approvals.kinds`: it began waiting for the owner's decision, or
    /// was decided, or its wait ended with its TTL.
    Approval {
        /// The command id.
        id: String,
        /// Its kind.
        command_kind: String,
        /// SHA-256 of the payload, hex: what was approved.
        payload_sha256: String,
        /// `awaiting`, `approved`, `rejected`, `expired`, `withdrawn` (cancelled or expired at
        /// the gateway).
        decision: String,
        /// Who decided (`--by`, else the user running `tether-agent approve|reject`).
        #[serde(skip_serializing_if = "String::is_empty")]
        by: String,
        /// A rejection's reason.
        #[serde(skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The agent paused (or the reason changed).
    Pause {
        /// Why.
        reason: String,
        /// Which switch: `config`, `control_file`, `ops`.
        source: String,
    },
    /// A switch was turned off.
    Resume {
        /// Which switch.
        source: String,
        /// True when another switch still holds the agent paused.
        still_paused: bool,
    },
    /// A new config was applied.
    Reload {
        /// What changed, by key.
        changed: Vec<String>,
    },
    /// A new config was refused; the old one is kept.
    ReloadRefused {
        /// Why (names the key).
        error: String,
    },
    /// The writer started (agent start) or began a new file.
    Open {
        /// The agent id.
        agent: String,
        /// The agent's version.
        version: String,
        /// SHA-256 of the key checkpoints are signed with (its SubjectPublicKeyInfo), hex.
        key: String,
    },
    /// Records were lost: the queue was full.
    Gap {
        /// How many.
        dropped: u64,
    },
    /// A signed checkpoint over everything before it.
    Checkpoint {
        /// Signature scheme (TLS 1.3 name).
        scheme: String,
        /// The signing key's SubjectPublicKeyInfo, base64 (DER).
        public_key: String,
        /// The signature over [`checkpoint_message`], base64.
        signature: String,
    },
}

#[derive(Serialize)]
struct Envelope<'a> {
    seq: u64,
    prev: &'a str,
    time: String,
    #[serde(flatten)]
    entry: &'a Entry,
}

/// What a checkpoint's signature covers.
pub fn checkpoint_message(agent: &str, seq: u64, prev: &str) -> Vec<u8> {
    format!("tether-ledger-checkpoint\n{agent}\n{seq}\n{prev}").into_bytes()
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// SHA-256 hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// The hash of a record's body and the stored line, from the body (`{"seq":…}`).
fn seal(body: &str) -> (String, String) {
    let hash = sha256_hex(body.as_bytes());
    let line = format!("{{\"hash\":\"{hash}\",{}\n", &body[1..]);
    (hash, line)
}

// === Signing ===

/// Signs checkpoints with the agent's key.
pub struct Signer {
    key: Arc<dyn rustls::sign::SigningKey>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key", &self.fingerprint())
            .finish()
    }
}

impl Signer {
    /// A signer with the agent's private key.
    pub fn new(key: &PrivateKeyDer<'_>) -> Result<Signer, LedgerError> {
        let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(key)
            .map_err(|e| LedgerError::Key(e.to_string()))?;
        let spki = key
            .public_key()
            .ok_or_else(|| LedgerError::Key("its public key is unknown".into()))?
            .as_ref()
            .to_vec();
        if key.choose_scheme(SCHEMES).is_none() {
            return Err(LedgerError::Key(format!(
                "no signature scheme among {SCHEMES:?} fits it"
            )));
        }
        Ok(Signer { key, spki })
    }

    /// SHA-256 of the public key (SubjectPublicKeyInfo DER), hex.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.spki)
    }

    fn sign(&self, msg: &[u8]) -> Option<Entry> {
        let signer = self.key.choose_scheme(SCHEMES)?;
        let signature = signer.sign(msg).ok()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Some(Entry::Checkpoint {
            scheme: format!("{:?}", signer.scheme()),
            public_key: b64.encode(&self.spki),
            signature: b64.encode(signature),
        })
    }
}

fn scheme_named(name: &str) -> Option<SignatureScheme> {
    SCHEMES.iter().copied().find(|s| format!("{s:?}") == name)
}

// === The handle ===

/// Where the relay and the executor hand their records; cheap to clone. Disabled: records
/// are dropped at once.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// `None` on the channel: the writer closes (its last checkpoint) and stops.
    tx: Option<SyncSender<Option<Entry>>>,
    dropped: Arc<AtomicU64>,
    /// Records queued, and records the writer took off the queue.
    queued: Arc<AtomicU64>,
    taken: Arc<AtomicU64>,
}

impl Ledger {
    /// Records queued and not yet taken by the writer.
    pub fn pending(&self) -> u64 {
        let taken = self.taken.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(taken)
    }

    /// A ledger that records nothing.
    pub fn disabled() -> Ledger {
        Ledger::default()
    }

    /// True when records are kept.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a record; never waits. A full queue counts it as lost (a `gap` record follows).
    pub fn record(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Some(entry)) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tether_agent_ledger_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The writer thread; joining it waits for its last checkpoint.
#[derive(Debug)]
pub struct Writer {
    thread: Option<std::thread::JoinHandle<()>>,
    tx: Option<SyncSender<Option<Entry>>>,
}

impl Writer {
    /// No writer (the ledger is disabled).
    pub fn none() -> Writer {
        Writer {
            thread: None,
            tx: None,
        }
    }

    /// Closes the ledger and waits for the writer: what was queued before is written, the
    /// last checkpoint signed, the file synced; records handed in later are dropped. Blocking.
    pub fn join(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(None);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the ledger: files in `dir` (none: stdout only), checkpoints signed by `signer`.
pub fn start(
    cfg: &LedgerConfig,
    dir: Option<PathBuf>,
    signer: Signer,
    agent: String,
) -> Result<(Ledger, Writer), LedgerError> {
    if !cfg.enabled {
        return Ok((Ledger::disabled(), Writer::none()));
    }
    let (files, seq, prev) = match dir {
        Some(d) => {
            let (f, seq, prev) = Files::open(d, cfg)?;
            (Some(f), seq, prev)
        }
        None => (None, 0, GENESIS.to_owned()),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let taken = Arc::new(AtomicU64::new(0));
    let mut state = WriterState {
        cfg: cfg.clone(),
        files,
        signer,
        agent,
        dropped: dropped.clone(),
        taken: taken.clone(),
        since_checkpoint: 0,
        first_unsigned: None,
        out: String::new(),
        seq,
        prev,
    };
    let thread = std::thread::Builder::new()
        .name("ledger".into())
        .spawn(move || state.run(rx))
        .map_err(|source| LedgerError::Io {
            what: "starting the writer thread for",
            path: PathBuf::from(DIR),
            source,
        })?;
    Ok((
        Ledger {
            tx: Some(tx.clone()),
            dropped,
            queued: Arc::default(),
            taken,
        },
        Writer {
            thread: Some(thread),
            tx: Some(tx),
        },
    ))
}

// === The writer ===

struct Files {
    dir: PathBuf,
    file: File,
    number: u64,
    size: u64,
}

/// The file name of number `n`.
pub fn file_name(n: u64) -> String {
    format!("ledger-{n:06}.jsonl")
}

fn file_number(name: &str) -> Option<u64> {
    name.strip_prefix("ledger-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The ledger files in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LedgerError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LedgerError::Io {
                what: "reading",
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut v: Vec<(u64, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| Some((file_number(e.file_name().to_str()?)?, e.path())))
        .collect();
    v.sort();
    Ok(v)
}

/// The last complete record of a file: `(seq, hash)`, and whether the file ends cleanly
/// (a complete last line that parses).
fn tail(path: &Path) -> Result<(Option<(u64, String)>, bool), LedgerError> {
    let io = |what, source| LedgerError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(|e| io("opening", e))?;
    let len = f.metadata().map_err(|e| io("reading", e))?.len();
    let from = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(from))
        .map_err(|e| io("reading", e))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| io("reading", e))?;
    let text = String::from_utf8_lossy(&buf);
    let clean_end = text.is_empty() || text.ends_with('\n');
    let mut lines: Vec<&str> = text.split('\n').collect();
    if clean_end {
        lines.pop();
    }
    let mut last = None;
    let mut last_is_good = true;
    for (i, line) in lines.iter().enumerate().rev() {
        match parse_line(line) {
            Ok(r) => {
                last = Some((r.seq, r.hash));
                break;
            }
            Err(_) if i == 0 && from > 0 => break,
            Err(_) => last_is_good = false,
        }
    }
    Ok((last, clean_end && last_is_good))
}

impl Files {
    /// Opens the file to append to, and where the chain goes on: `(files, seq, prev)`.
    fn open(dir: PathBuf, cfg: &LedgerConfig) -> Result<(Files, u64, String), LedgerError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| LedgerError::Io {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        let existing = list(&dir)?;
        let (number, seq, prev, append) = match existing.last() {
            None => (1, 0, GENESIS.to_owned(), false),
            Some((n, path)) => {
                let (last, clean) = tail(path)?;
                let (seq, prev) = match last {
                    Some((s, h)) => (s + 1, h),
                    None => (0, GENESIS.to_owned()),
                };
                let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                // A torn tail (a crash mid-write) is left for `verify` to report; the chain
                // goes on in a new file from the last complete record.
                if clean && size < cfg.max_file_bytes {
                    (*n, seq, prev, true)
                } else {
                    (n + 1, seq, prev, false)
                }
            }
        };
        let path = dir.join(file_name(number));
        let file = open_append(&path)?;
        let size = if append {
            file.metadata().map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        let files = Files {
            dir,
            file,
            number,
            size,
        };
        files.prune(cfg.max_files);
        Ok((files, seq, prev))
    }

    fn rotate(&mut self, max_files: u32) -> Result<(), LedgerError> {
        let _ = self.file.sync_all();
        self.number += 1;
        self.file = open_append(&self.dir.join(file_name(self.number)))?;
        self.size = 0;
        self.prune(max_files);
        Ok(())
    }

    fn prune(&self, max_files: u32) {
        if let Ok(all) = list(&self.dir) {
            let excess = all.len().saturating_sub(max_files as usize);
            for (_, path) in all.into_iter().take(excess) {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not delete an old ledger file");
                }
            }
        }
    }
}

fn open_append(path: &Path) -> Result<File, LedgerError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| LedgerError::Io {
            what: "opening",
            path: path.to_owned(),
            source,
        })
}

struct WriterState {
    cfg: LedgerConfig,
    files: Option<Files>,
    signer: Signer,
    agent: String,
    dropped: Arc<AtomicU64>,
    taken: Arc<AtomicU64>,
    since_checkpoint: u32,
    first_unsigned: Option<Instant>,
    /// Lines of the batch being written.
    out: String,
    /// The next record's sequence number and the hash before it.
    seq: u64,
    prev: String,
}

impl WriterState {
    fn run(&mut self, rx: Receiver<Option<Entry>>) {
        let key = self.signer.fingerprint();
        self.append(&Entry::Open {
            agent: self.agent.clone(),
            version: crate::VERSION.to_owned(),
            key,
        });
        self.flush();
        loop {
            let wait = match self.first_unsigned {
                Some(t) => {
                    (t + self.cfg.checkpoint_interval).saturating_duration_since(Instant::now())
                }
                None => Duration::from_secs(3600),
            };
            let mut closing = false;
            match rx.recv_timeout(wait) {
                Ok(Some(entry)) => {
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    self.append(&entry);
                    // Whatever else is queued goes in the same write, up to the file's size.
                    let room = self.files.as_ref().map_or(1 << 20, |f| {
                        self.cfg.max_file_bytes.saturating_sub(f.size).min(1 << 20) as usize
                    });
                    while self.out.len() < room {
                        match rx.try_recv() {
                            Ok(Some(e)) => {
                                self.taken.fetch_add(1, Ordering::Relaxed);
                                self.append(&e)
                            }
                            Ok(None) => {
                                closing = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Ok(None) => closing = true,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = true,
            }
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                self.append(&Entry::Gap { dropped });
            }
            if closing {
                self.checkpoint();
                self.flush();
                if let Some(f) = &self.files {
                    let _ = f.file.sync_all();
                }
                return;
            }
            if self
                .first_unsigned
                .is_some_and(|t| t.elapsed() >= self.cfg.checkpoint_interval)
            {
                self.checkpoint();
            }
            self.flush();
            let full = self
                .files
                .as_ref()
                .is_some_and(|f| f.size >= self.cfg.max_file_bytes);
            if full {
                self.checkpoint();
                self.flush();
                let max = self.cfg.max_files;
                if let Some(f) = &mut self.files
                    && let Err(e) = f.rotate(max)
                {
                    tracing::error!(error = %e, "could not rotate the ledger; appending to the current file");
                }
            }
        }
    }

    fn append(&mut self, entry: &Entry) {
        let (seq, prev) = self.position();
        let body = serde_json::to_string(&Envelope {
            seq,
            prev: &prev,
            time: timestamp(SystemTime::now()),
            entry,
        })
        .expect("a ledger record serializes");
        let (hash, line) = seal(&body);
        self.out.push_str(&line);
        self.advance(hash);
        if matches!(entry, Entry::Checkpoint { .. }) {
            self.since_checkpoint = 0;
            self.first_unsigned = None;
        } else {
            self.since_checkpoint += 1;
            self.first_unsigned.get_or_insert_with(Instant::now);
            if self.since_checkpoint >= self.cfg.checkpoint_records {
                self.checkpoint();
            }
        }
    }

    fn checkpoint(&mut self) {
        if self.since_checkpoint == 0 {
            return;
        }
        let (seq, prev) = self.position();
        match self
            .signer
            .sign(&checkpoint_message(&self.agent, seq, &prev))
        {
            Some(c) => self.append(&c),
            None => tracing::error!("could not sign a ledger checkpoint"),
        }
    }

    fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        if let Some(f) = &mut self.files {
            match f.file.write_all(self.out.as_bytes()) {
                Ok(()) => f.size += self.out.len() as u64,
                Err(e) => {
                    metrics::counter!("tether_agent_ledger_write_errors_total").increment(1);
                    tracing::error!(error = %e, "could not write the ledger");
                }
            }
        }
        if self.cfg.stdout {
            let _ = std::io::stdout().lock().write_all(self.out.as_bytes());
        }
        self.out.clear();
    }
}

impl WriterState {
    fn position(&self) -> (u64, String) {
        (self.seq, self.prev.clone())
    }

    fn advance(&mut self, hash: String) {
        self.seq += 1;
        self.prev = hash;
    }
}

// === Reading and verifying ===

/// One parsed line.
#[derive(Debug)]
pub struct Line {
    /// Its stored hash.
    pub hash: String,
    /// Its sequence number.
    pub seq: u64,
    /// The hash it says came before.
    pub prev: String,
    /// Its kind.
    pub kind: String,
    /// Whether the stored hash is the hash of its content.
    pub intact: bool,
    /// The whole record.
    pub value: serde_json::Value,
}

/// Parses a stored line (without its newline).
pub fn parse_line(line: &str) -> Result<Line, String> {
    const PREFIX: &str = "{\"hash\":\"";
    let rest = line
        .strip_prefix(PREFIX)
        .ok_or("does not start with {\"hash\":\"…\" (not a ledger record, or cut)")?;
    let (hash, rest) = rest
        .split_at_checked(64)
        .ok_or("is cut short inside its hash")?;
    let body_rest = rest
        .strip_prefix("\",")
        .ok_or("has a malformed hash member")?;
    let body = format!("{{{body_rest}");
    let value: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("is not a complete JSON record (cut or edited): {e}"))?;
    let seq = value
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("has no seq")?;
    let prev = value
        .get("prev")
        .and_then(serde_json::Value::as_str)
        .ok_or("has no prev")?
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .ok_or("has no kind")?
        .to_owned();
    let intact = sha256_hex(body.as_bytes()) == hash;
    Ok(Line {
        hash: hash.to_owned(),
        seq,
        prev,
        kind,
        intact,
        value,
    })
}

/// A break in the ledger, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based), which is the record's place in the file.
    pub line: usize,
    /// The record's sequence number, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: record {}", self.file.display(), self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// What [`verify`] found.
#[derive(Debug, Default)]
pub struct Report {
    /// Files read.
    pub files: usize,
    /// Records read.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The first and last sequence numbers.
    pub first_seq: Option<u64>,
    /// The last sequence number.
    pub last_seq: Option<u64>,
    /// Keys checkpoints were signed with (fingerprints).
    pub keys: BTreeSet<String>,
    /// Records after the last checkpoint (not yet signed).
    pub unsigned_tail: u64,
    /// Remarks that are not breaks (older files rotated away).
    pub notes: Vec<String>,
    /// The breaks.
    pub faults: Vec<Fault>,
}

/// Checks every file in `dir`: each record's hash, the chain from record to record and file
/// to file (sequence numbers without gaps or reordering), and each checkpoint's signature for
/// `agent` (its key is reported; compare it with the agent's certificate).
pub fn verify(dir: &Path, agent: Option<&str>) -> Result<Report, LedgerError> {
    let mut report = Report::default();
    let files = list(dir)?;
    let mut expect: Option<(u64, String)> = None;
    for (i, (_, path)) in files.iter().enumerate() {
        report.files += 1;
        let text = std::fs::read(path).map_err(|source| LedgerError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        let text = String::from_utf8_lossy(&text);
        let ends_clean = text.is_empty() || text.ends_with('\n');
        let mut lines: Vec<&str> = text.split('\n').collect();
        if ends_clean {
            lines.pop();
        }
        let count = lines.len();
        for (n, raw) in lines.into_iter().enumerate() {
            let place = |seq: Option<u64>, what: String| Fault {
                file: path.clone(),
                line: n + 1,
                seq,
                what,
            };
            let torn = !ends_clean && n + 1 == count;
            let line = match parse_line(raw) {
                Ok(l) => l,
                Err(e) => {
                    let what = if torn {
                        format!("the file ends inside this record (truncated): it {e}")
                    } else {
                        format!("the record {e}")
                    };
                    report.faults.push(place(None, what));
                    continue;
                }
            };
            report.records += 1;
            report.first_seq.get_or_insert(line.seq);
            report.last_seq = Some(line.seq);
            if !line.intact {
                report.faults.push(place(
                    Some(line.seq),
                    "its content does not match its hash: the record was edited".into(),
                ));
            }
            match &expect {
                None => {
                    if line.seq != 0 || line.prev != GENESIS {
                        report.notes.push(format!(
                            "the chain starts at seq {} in {} (older files were rotated away)",
                            line.seq,
                            path.display()
                        ));
                    }
                }
                Some((seq, prev)) => {
                    if line.seq != *seq {
                        let what = if line.seq > *seq {
                            format!(
                                "seq {} follows seq {}: {} record(s) before it are missing (removed){}",
                                line.seq,
                                seq - 1,
                                line.seq - seq,
                                if i > 0 && n == 0 {
                                    ", or a whole file was"
                                } else {
                                    ""
                                }
                            )
                        } else {
                            format!(
                                "seq {} comes after seq {}: records were reordered or repeated",
                                line.seq,
                                seq - 1
                            )
                        };
                        report.faults.push(place(Some(line.seq), what));
                    } else if line.prev != *prev {
                        report.faults.push(place(
                            Some(line.seq),
                            "its prev is not the hash of the record before: that record was edited or replaced".into(),
                        ));
                    }
                }
            }
            if line.kind == "checkpoint" {
                match check_signature(&line, agent) {
                    Ok(key) => {
                        report.checkpoints += 1;
                        report.keys.insert(key);
                        report.unsigned_tail = 0;
                    }
                    Err(e) => report.faults.push(place(Some(line.seq), e)),
                }
            } else {
                report.unsigned_tail += 1;
            }
            expect = Some((line.seq + 1, line.hash));
        }
    }
    Ok(report)
}

fn check_signature(line: &Line, agent: Option<&str>) -> Result<String, String> {
    let field = |k: &str| {
        line.value
            .get(k)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("checkpoint without {k}: forged or cut"))
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let scheme_name = field("scheme")?;
    let scheme = scheme_named(scheme_name)
        .ok_or_else(|| format!("checkpoint with an unknown scheme {scheme_name:?}"))?;
    let spki = b64
        .decode(field("public_key")?)
        .map_err(|_| "checkpoint whose public_key is not base64: forged".to_owned())?;
    let signature = b64
        .decode(field("signature")?)
        .map_err(|_| "checkpoint whose signature is not base64: forged".to_owned())?;
    // The agent the checkpoint is for: given, or the one the files' `open` records name
    // (the signature binds it either way).
    let agent = agent.map(str::to_owned).unwrap_or_default();
    let msg = checkpoint_message(&agent, line.seq, &line.prev);
    let raw = spki_key(&spki)
        .ok_or("checkpoint whose public_key is not a SubjectPublicKeyInfo: forged")?;
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let candidates = algs
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .unwrap_or_default();
    let ok = candidates.iter().any(|alg| {
        alg.public_key_alg_id().as_ref() == spki_alg(&spki).unwrap_or_default()
            && alg.verify_signature(raw, &msg, &signature).is_ok()
    });
    if !ok {
        return Err(format!(
            "the checkpoint's signature does not verify for agent {agent:?}: forged, or the records it covers were rewritten"
        ));
    }
    Ok(sha256_hex(&spki))
}

/// One DER element at the start of `d`: `(tag, content, rest)`.
fn der(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, d) = d.split_first()?;
    let (len, d) = if first < 0x80 {
        (first as usize, d)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &d[n..])
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

/// The AlgorithmIdentifier's content of a SubjectPublicKeyInfo (as webpki compares it).
fn spki_alg(spki: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der(spki)? else {
        return None;
    };
    let (0x30, alg, _) = der(body)? else {
        return None;
    };
    Some(alg)
}

/// The public key bits of a SubjectPublicKeyInfo.
fn spki_key(spki: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der(spki)? else {
        return None;
    };
    let (0x30, _, rest) = der(body)? else {
        return None;
    };
    let (0x03, bits, _) = der(rest)? else {
        return None;
    };
    // The first byte counts unused bits: 0 for a key.
    bits.strip_prefix(&[0])
}

/// The agent id the files' first `open` record names, if any.
pub fn agent_of(dir: &Path) -> Option<String> {
    let (_, first) = list(dir).ok()?.into_iter().next()?;
    let text = std::fs::read_to_string(first).ok()?;
    text.lines().find_map(|l| {
        let line = parse_line(l).ok()?;
        (line.kind == "open")
            .then(|| line.value.get("agent")?.as_str().map(str::to_owned))
            .flatten()
    })
}

/// The last `n` records, as stored, oldest first.
pub fn tail_lines(dir: &Path, n: usize) -> Result<Vec<String>, LedgerError> {
    let mut out = std::collections::VecDeque::with_capacity(n);
    for (_, path) in list(dir)?.iter().rev() {
        let text = std::fs::read_to_string(path).map_err(|source| LedgerError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        for line in text.lines().rev() {
            if out.len() == n {
                return Ok(out.into());
            }
            out.push_front(line.to_owned());
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Signer::new(&der).unwrap()
    }

    fn cfg() -> LedgerConfig {
        LedgerConfig {
            checkpoint_records: 5,
            stdout: false,
            ..Default::default()
        }
    }

    fn call(i: u64) -> Entry {
        Entry::Call(Relayed {
            caller: "mtls:api".into(),
            tenant: "acme".into(),
            service: "default".into(),
            method: "/pkg.S/M".into(),
            status: "Ok".into(),
            bytes_in: i,
            bytes_out: 2 * i,
            start: SystemTime::now(),
            duration_ms: 1.5,
        })
    }

    fn write(dir: &Path, cfg: &LedgerConfig, n: u64) {
        let (ledger, writer) = start(cfg, Some(dir.to_owned()), signer(), "acme/a".into()).unwrap();
        for i in 0..n {
            ledger.record(call(i));
        }
        drop(ledger);
        writer.join();
    }

    fn lines(dir: &Path) -> (PathBuf, Vec<String>) {
        let (_, path) = list(dir).unwrap().remove(0);
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text.lines().map(str::to_owned).collect())
    }

    fn put(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn an_untouched_ledger_verifies_with_its_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &cfg(), 12);
        let r = verify(d.path(), Some("acme/a")).unwrap();
        assert!(r.faults.is_empty(), "{:?}", r.faults);
        // open + 12 calls + checkpoints every 5 and at the end.
        assert_eq!(r.records, 13 + 3);
        assert_eq!(r.checkpoints, 3);
        assert_eq!(r.unsigned_tail, 0);
        // Another agent's id does not verify the signatures.
        let r = verify(d.path(), Some("acme/other")).unwrap();
        assert_eq!(r.faults.len(), 3, "{:?}", r.faults);
        // A restart appends to the same chain.
        write(d.path(), &cfg(), 3);
        let r = verify(d.path(), Some("acme/a")).unwrap();
        assert!(r.faults.is_empty(), "{:?}", r.faults);
        assert_eq!(r.first_seq, Some(0));
    }

    #[test]
    fn removed_edited_reordered_and_cut_records_are_found_where_they_are() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &cfg(), 8);
        let (path, orig) = lines(d.path());

        let mut v = orig.clone();
        v.remove(3);
        put(&path, &v);
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert_eq!((f[0].line, f[0].seq), (4, Some(4)), "{f:?}");
        assert!(f[0].what.contains("missing"), "{f:?}");

        let mut v = orig.clone();
        v[2] = v[2].replace("\"bytes_in\":1", "\"bytes_in\":9");
        put(&path, &v);
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert_eq!(f[0].line, 3, "{f:?}");
        assert!(f[0].what.contains("edited"), "{f:?}");

        let mut v = orig.clone();
        v.swap(2, 3);
        put(&path, &v);
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert_eq!(f[0].line, 3, "{f:?}");
        assert!(
            f[0].what.contains("missing") || f[0].what.contains("reordered"),
            "{f:?}"
        );
        assert!(f.iter().any(|f| f.what.contains("reordered")), "{f:?}");

        // The checkpoint after five records, cut in its middle.
        let cp = orig
            .iter()
            .position(|l| l.contains("\"kind\":\"checkpoint\""))
            .unwrap();
        let mut v = orig.clone();
        let half = v[cp].len() / 2;
        v[cp].truncate(half);
        put(&path, &v);
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert_eq!(f[0].line, cp + 1, "{f:?}");

        // A forged signature.
        let mut v = orig.clone();
        let sig_at = v[cp].find("\"signature\":\"").unwrap() + 13;
        let flipped = if &v[cp][sig_at..sig_at + 1] == "A" {
            "B"
        } else {
            "A"
        };
        v[cp].replace_range(sig_at..sig_at + 1, flipped);
        put(&path, &v);
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert!(
            f.iter()
                .any(|f| f.line == cp + 1 && f.what.contains("signature")),
            "{f:?}"
        );

        // The file cut short after the checkpoint's first half.
        let mut text = orig[..cp].join("\n") + "\n";
        text.push_str(&orig[cp][..orig[cp].len() / 2]);
        std::fs::write(&path, text).unwrap();
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert_eq!(f[0].line, cp + 1, "{f:?}");
        assert!(f[0].what.contains("truncated"), "{f:?}");
    }

    #[test]
    fn files_rotate_at_their_size_and_the_chain_runs_across_them() {
        let d = tempfile::tempdir().unwrap();
        let cfg = LedgerConfig {
            max_file_bytes: 4096,
            max_files: 3,
            checkpoint_records: 1000,
            stdout: false,
            ..Default::default()
        };
        write(d.path(), &cfg, 200);
        let files = list(d.path()).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        let r = verify(d.path(), Some("acme/a")).unwrap();
        assert!(r.faults.is_empty(), "{:?}", r.faults);
        assert!(r.notes[0].contains("rotated away"), "{:?}", r.notes);
        // A whole file in the middle removed.
        std::fs::remove_file(&files[1].1).unwrap();
        let f = verify(d.path(), Some("acme/a")).unwrap().faults;
        assert_eq!(f[0].file, files[2].1);
        assert_eq!(f[0].line, 1);
    }
}
