//! Backend layer: the embedded command store, one redb file in the gateway's data directory.
//!
//! redb is pure Rust (no C build, no server to run) and ACID: a commit returns only after its
//! pages are fsync'd, so a Submit answered after its commit survives `kill -9`. One writer thread
//! owns every write and commits whatever is queued in one transaction (group commit): concurrent
//! Submits share one fsync, which is what makes thousands of durable Submits per second possible.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use prost::Message as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tether_api::v1::{Command, CommandState};
use tokio::sync::{mpsc, oneshot};

use super::{CommandStore, ListFilter, StoreError, StoreFuture, SubmitOutcome};

/// id → encoded `Command` (its payload inline when at most [`INLINE_PAYLOAD`] bytes).
const COMMANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("commands");
/// id → a larger payload, written once at Submit: state changes rewrite the small record only.
const PAYLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("payloads");
/// Payloads up to this size stay in the record: one B-tree insert per Submit, not two.
const INLINE_PAYLOAD: usize = 4096;
/// `agent \n idempotency_key` → id.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// agent → number of commands ever submitted.
const AGENTS: TableDefinition<&str, u64> = TableDefinition::new("agents");
/// `prefix` → random id prefix of this database; `seq` → last sequence number.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The file name inside the data directory.
pub const FILE: &str = "commands.redb";

/// redb's page cache (its default is 1 GiB). The store keeps every command, and the cache keeps
/// every page it has read or written up to this size: with the default, gateway RSS grows with
/// the store file (~400 bytes a command) for as long as the gateway runs. Pages beyond it are
/// read again through the OS page cache.
const CACHE_SIZE: usize = 64 << 20;

/// Largest number of operations committed in one transaction.
const MAX_BATCH: usize = 4096;

enum Op {
    Submit(Command, oneshot::Sender<Result<SubmitOutcome, StoreError>>),
    Put(Command, oneshot::Sender<Result<(), StoreError>>),
}

/// See the module docs.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: mpsc::UnboundedSender<Op>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode(id: &str, bytes: &[u8]) -> Result<Command, StoreError> {
    Command::decode(bytes).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        detail: e.to_string(),
    })
}

/// The record as stored: everything but the payload.
fn encode_record(cmd: &Command) -> Vec<u8> {
    if cmd.payload.len() <= INLINE_PAYLOAD {
        return cmd.encode_to_vec();
    }
    let mut record = cmd.clone();
    record.payload = Vec::new();
    record.encode_to_vec()
}

/// Final states never change again.
pub fn is_final(state: i32) -> bool {
    matches!(
        CommandState::try_from(state),
        Ok(CommandState::Succeeded
            | CommandState::Failed
            | CommandState::Expired
            | CommandState::Cancelled)
    )
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/commands.redb`, creating `dir` if needed, and starts the writer.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE)
            .create(&path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let (prefix, seq) = {
            let tx = db.begin_write().map_err(backend)?;
            let meta = {
                let mut meta = tx.open_table(META).map_err(backend)?;
                tx.open_table(COMMANDS).map_err(backend)?;
                tx.open_table(PAYLOADS).map_err(backend)?;
                tx.open_table(IDEMPOTENCY).map_err(backend)?;
                tx.open_table(AGENTS).map_err(backend)?;
                let existing = meta
                    .get("prefix")
                    .map_err(backend)?
                    .map(|p| p.value().to_owned());
                let prefix = match existing {
                    Some(p) => p,
                    None => {
                        // Ids differ across databases, so an agent's record of completed ids
                        // never matches a command from a wiped and recreated store.
                        let p = format!("{:08x}", rand::random::<u32>());
                        meta.insert("prefix", p.as_str()).map_err(backend)?;
                        p
                    }
                };
                let seq_text = meta
                    .get("seq")
                    .map_err(backend)?
                    .map(|s| s.value().to_owned());
                let seq = match seq_text {
                    Some(s) => s.parse::<u64>().map_err(|e| StoreError::Corrupt {
                        id: "meta/seq".into(),
                        detail: e.to_string(),
                    })?,
                    None => 0,
                };
                (prefix, seq)
            };
            tx.commit().map_err(backend)?;
            meta
        };
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let wdb = db.clone();
        std::thread::Builder::new()
            .name("command-store".into())
            .spawn(move || writer(wdb, rx, prefix, seq))
            .map_err(|e| StoreError::Backend(format!("starting the store writer: {e}")))?;
        Ok(EmbeddedStore { db, writer: tx })
    }
}

/// The single writer: drains whatever is queued into one transaction, commits (fsync), answers.
fn writer(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Op>, prefix: String, mut seq: u64) {
    let mut batch = Vec::new();
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let size = batch.len();
        match write_batch(&db, &mut batch, &prefix, seq) {
            Ok((new_seq, answers)) => {
                seq = new_seq;
                for a in answers {
                    a();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "command store commit failed");
                for op in batch.drain(..) {
                    match op {
                        Op::Submit(_, tx) => {
                            let _ = tx.send(Err(StoreError::Backend(e.to_string())));
                        }
                        Op::Put(_, tx) => {
                            let _ = tx.send(Err(StoreError::Backend(e.to_string())));
                        }
                    }
                }
            }
        }
        metrics::histogram!("tether_gateway_command_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tether_gateway_command_store_batch_size").record(size as f64);
    }
}

type Answer = Box<dyn FnOnce() + Send>;

fn write_batch(
    db: &Database,
    batch: &mut Vec<Op>,
    prefix: &str,
    mut seq: u64,
) -> Result<(u64, Vec<Answer>), StoreError> {
    let mut tx = db.begin_write().map_err(backend)?;
    // The default, stated: commit returns only once the data is on disk.
    tx.set_durability(Durability::Immediate).map_err(backend)?;
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut commands = tx.open_table(COMMANDS).map_err(backend)?;
        // Opened only when a batch has a large payload: an opened table costs the commit.
        let large = batch
            .iter()
            .any(|op| matches!(op, Op::Submit(c, _) if c.payload.len() > INLINE_PAYLOAD));
        let mut payloads = if large {
            Some(tx.open_table(PAYLOADS).map_err(backend)?)
        } else {
            None
        };
        let mut idem = tx.open_table(IDEMPOTENCY).map_err(backend)?;
        let mut agents = tx.open_table(AGENTS).map_err(backend)?;
        // A command's state changes often land in one batch (delivered, running, succeeded):
        // only its last record is written, which is what applying them in order leaves.
        let mut last_put: HashMap<&str, usize> = HashMap::new();
        for (i, op) in batch.iter().enumerate() {
            if let Op::Put(cmd, _) = op {
                last_put.insert(cmd.id.as_str(), i);
            }
        }
        for (i, op) in batch.iter().enumerate() {
            match op {
                Op::Submit(cmd, _) => {
                    let key = format!("{}\n{}", cmd.agent, cmd.idempotency_key);
                    if !cmd.idempotency_key.is_empty()
                        && let Some(id) = idem.get(key.as_str()).map_err(backend)?
                    {
                        let id = id.value().to_owned();
                        // Submit answers with the id: the existing command's payload is not needed.
                        let existing = match commands.get(id.as_str()).map_err(backend)? {
                            Some(b) => decode(&id, b.value())?,
                            None => {
                                return Err(StoreError::Corrupt {
                                    id,
                                    detail: "idempotency key names a missing command".into(),
                                });
                            }
                        };
                        results.push(Some(SubmitOutcome {
                            command: existing,
                            created: false,
                        }));
                        continue;
                    }
                    seq += 1;
                    let mut cmd = cmd.clone();
                    cmd.id = format!("{prefix}{seq:016x}");
                    commands
                        .insert(cmd.id.as_str(), encode_record(&cmd).as_slice())
                        .map_err(backend)?;
                    if cmd.payload.len() > INLINE_PAYLOAD
                        && let Some(payloads) = payloads.as_mut()
                    {
                        payloads
                            .insert(cmd.id.as_str(), cmd.payload.as_slice())
                            .map_err(backend)?;
                    }
                    if !cmd.idempotency_key.is_empty() {
                        idem.insert(key.as_str(), cmd.id.as_str())
                            .map_err(backend)?;
                    }
                    let n = agents
                        .get(cmd.agent.as_str())
                        .map_err(backend)?
                        .map_or(0, |v| v.value());
                    agents.insert(cmd.agent.as_str(), n + 1).map_err(backend)?;
                    results.push(Some(SubmitOutcome {
                        command: cmd,
                        created: true,
                    }));
                }
                Op::Put(cmd, _) if last_put.get(cmd.id.as_str()) != Some(&i) => {
                    results.push(None);
                }
                Op::Put(cmd, _) => {
                    commands
                        .insert(cmd.id.as_str(), encode_record(cmd).as_slice())
                        .map_err(backend)?;
                    results.push(None);
                }
            }
        }
        let mut meta = tx.open_table(META).map_err(backend)?;
        meta.insert("seq", seq.to_string().as_str())
            .map_err(backend)?;
    }
    tx.commit().map_err(backend)?;
    for (op, res) in batch.drain(..).zip(results) {
        match (op, res) {
            (Op::Submit(_, tx), Some(out)) => answers.push(Box::new(move || {
                let _ = tx.send(Ok(out));
            })),
            (Op::Put(_, tx), _) => answers.push(Box::new(move || {
                let _ = tx.send(Ok(()));
            })),
            (Op::Submit(_, tx), None) => answers.push(Box::new(move || {
                let _ = tx.send(Err(StoreError::Closed));
            })),
        }
    }
    Ok((seq, answers))
}

impl CommandStore for EmbeddedStore {
    fn submit(&self, command: Command) -> StoreFuture<SubmitOutcome> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Op::Submit(command, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn put(&self, command: Command) -> StoreFuture<()> {
        let (tx, rx) = oneshot::channel();
        // Enqueued now, so writes apply in call order even if the future is never awaited.
        let sent = self.writer.send(Op::Put(command, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn get(&self, id: &str) -> Result<Option<Command>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(COMMANDS).map_err(backend)?;
        let p = tx.open_table(PAYLOADS).map_err(backend)?;
        let Some(b) = t.get(id).map_err(backend)? else {
            return Ok(None);
        };
        let mut c = decode(id, b.value())?;
        if c.payload.is_empty()
            && let Some(payload) = p.get(id).map_err(backend)?
        {
            c.payload = payload.value().to_vec();
        }
        Ok(Some(c))
    }

    fn list(&self, f: &ListFilter) -> Result<Vec<Command>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(COMMANDS).map_err(backend)?;
        let mut out = Vec::new();
        let range = if f.after.is_empty() {
            t.range::<&str>(..)
        } else {
            t.range::<&str>((
                std::ops::Bound::Excluded(f.after.as_str()),
                std::ops::Bound::Unbounded,
            ))
        }
        .map_err(backend)?;
        for entry in range {
            let (k, v) = entry.map_err(backend)?;
            let c = decode(k.value(), v.value())?;
            let created = c
                .created
                .as_ref()
                .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
            if (!f.agent.is_empty() && c.agent != f.agent)
                || (f.state != 0 && c.state != f.state)
                || (!f.kind.is_empty() && c.kind != f.kind)
                || f.from_ms.is_some_and(|from| created < from)
                || f.to_ms.is_some_and(|to| created >= to)
            {
                continue;
            }
            out.push(c);
            if f.limit > 0 && out.len() >= f.limit {
                break;
            }
        }
        Ok(out)
    }

    fn unfinished(&self) -> Result<Vec<Command>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(COMMANDS).map_err(backend)?;
        let p = tx.open_table(PAYLOADS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            let mut c = decode(k.value(), v.value())?;
            if !is_final(c.state) {
                if c.payload.is_empty()
                    && let Some(payload) = p.get(k.value()).map_err(backend)?
                {
                    c.payload = payload.value().to_vec();
                }
                out.push(c);
            }
        }
        Ok(out)
    }

    fn knows_agent(&self, agent: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(AGENTS).map_err(backend)?;
        Ok(t.get(agent).map_err(backend)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(agent: &str, key: &str) -> Command {
        Command {
            agent: agent.into(),
            kind: "echo".into(),
            idempotency_key: key.into(),
            state: CommandState::Queued as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn ids_sort_in_submission_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let a = store.submit(cmd("t/a", "")).await.unwrap();
        let b = store.submit(cmd("t/a", "")).await.unwrap();
        assert!(a.command.id < b.command.id);
        drop(store);
        // The writer thread still holds the database until its channel closes.
        let store = loop {
            match EmbeddedStore::open(dir.path()) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let c = store.submit(cmd("t/a", "")).await.unwrap();
        assert!(b.command.id < c.command.id);
        assert_eq!(store.unfinished().unwrap().len(), 3);
        assert!(store.knows_agent("t/a").unwrap());
        assert!(!store.knows_agent("t/b").unwrap());
    }

    #[tokio::test]
    async fn the_payload_is_written_once_and_joined_on_get() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut c = cmd("t/a", "");
        c.payload = vec![9; INLINE_PAYLOAD + 1];
        let mut c = store.submit(c).await.unwrap().command;
        c.state = CommandState::Succeeded as i32;
        store.put(c.clone()).await.unwrap();
        let got = store.get(&c.id).unwrap().unwrap();
        assert_eq!(
            (got.state, got.payload.len()),
            (c.state, INLINE_PAYLOAD + 1)
        );
        let listed = store.list(&ListFilter::default()).unwrap();
        assert!(listed[0].payload.is_empty());
    }

    #[tokio::test]
    async fn state_changes_queued_together_leave_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut c = store.submit(cmd("t/a", "")).await.unwrap().command;
        // Enqueued back to back (the writer may commit them in one batch): the last one wins.
        let writes: Vec<_> = [
            CommandState::Delivered,
            CommandState::Running,
            CommandState::Succeeded,
        ]
        .into_iter()
        .map(|s| {
            c.state = s as i32;
            c.attempts += 1;
            store.put(c.clone())
        })
        .collect();
        for w in writes {
            w.await.unwrap();
        }
        let got = store.get(&c.id).unwrap().unwrap();
        assert_eq!(
            (got.state, got.attempts),
            (CommandState::Succeeded as i32, 3)
        );
        assert!(store.unfinished().unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_idempotency_key_one_command() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let futs: Vec<_> = (0..50).map(|_| store.submit(cmd("t/a", "k"))).collect();
        let mut ids = std::collections::BTreeSet::new();
        let mut created = 0;
        for f in futs {
            let o = f.await.unwrap();
            created += usize::from(o.created);
            ids.insert(o.command.id);
        }
        assert_eq!((ids.len(), created), (1, 1));
        let other = store.submit(cmd("t/b", "k")).await.unwrap();
        assert!(other.created);
    }
}
