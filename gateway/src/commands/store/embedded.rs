//! Backend layer: the embedded command store, one redb file in the gateway's data directory.
//!
//! redb is pure Rust (no C build, no server to run) and ACID: a commit returns only after its
//! pages are fsync'd, so a Submit answered after its commit survives `kill -9`. One writer thread
//! owns every write and commits whatever is queued in one transaction (group commit): concurrent
//! Submits share one fsync, which is what makes thousands of durable Submits per second possible.
//!
//! Ids are `t` + the submission time (Unix ms, 12 hex digits) + 80 bits (20 hex digits), random
//! for the first command of a millisecond and the previous one plus a random 64-bit step after
//! it: fixed width, so they sort in submission order (List pages by id, recovery refills lanes
//! in order) and cannot be guessed or counted (each carries at least 64 bits its neighbours do
//! not reveal). Ids of older stores (`<8 hex prefix><16 hex sequence>`) start with a hex digit
//! and so sort before every new one; they are looked up, listed and pruned like the new ones.
//!
//! Indexes (kept in the same transactions as the records): `by_owner` lists an agent's and a
//! tenant's commands in id order, so `List` for one agent or for a caller's tenants reads only
//! those; `finished` orders finished commands by finish time, for retention. A store written
//! before they existed gets them built once when it is opened.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};
use tunnel_proto::AgentId;

use super::codec::{self, Parts};
use super::{
    CommandStore, LIST_SCAN_BYTES, LIST_SCAN_RECORDS, ListFilter, ListPage, Retention, StoreError,
    StoreFuture, SubmitOutcome,
};
use crate::commands::record::{CommandRecord, unix_ms};

/// id → the encoded record ([`codec`]; its payload inline when at most [`INLINE_PAYLOAD`] bytes, its output
/// when at most [`INLINE_OUTPUT`]).
const COMMANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("commands");
/// id → a larger payload, written once at Submit: state changes rewrite the small record only.
const PAYLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("payloads");
/// id → a larger result output, written once with the final state: `List` never reads it.
const OUTPUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("outputs");
/// Payloads up to this size stay in the record: one B-tree insert per Submit, not two.
const INLINE_PAYLOAD: usize = 4096;
/// Outputs up to this size stay in the record; `List` leaves larger ones out anyway.
pub const INLINE_OUTPUT: usize = 64 << 10;
/// `agent \n idempotency_key` → id.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// agent → number of commands ever submitted.
const AGENTS: TableDefinition<&str, u64> = TableDefinition::new("agents");
/// `a<agent>\n<id>` and `t<tenant>\n<id>` → (): each agent's and each tenant's commands in id
/// order. Agent and tenant names never hold a byte below `\x0b`, so `<name>\n` .. `<name>\x0b`
/// is exactly one name's range.
const BY_OWNER: TableDefinition<&str, ()> = TableDefinition::new("by_owner");
/// (finish time in Unix ms, id) → (): finished commands, oldest first, for retention.
const FINISHED: TableDefinition<(u64, &str), ()> = TableDefinition::new("finished");
/// `last_id` → the last id assigned; `schema` → [`SCHEMA`] once the indexes exist. Stores
/// written before kept `prefix` and `seq` (their id scheme) here; they are left alone.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// The store's layout version: 2 has `by_owner`, `finished` and `outputs`.
const SCHEMA: &str = "2";

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
    Submit(
        CommandRecord,
        oneshot::Sender<Result<SubmitOutcome, StoreError>>,
    ),
    Put(CommandRecord, oneshot::Sender<Result<(), StoreError>>),
    Prune(Retention, oneshot::Sender<Result<usize, StoreError>>),
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

use codec::decode;

/// The record as stored: everything but a large payload or output.
fn encode_record(cmd: &CommandRecord) -> Vec<u8> {
    let big_output = cmd
        .result
        .as_ref()
        .is_some_and(|r| r.output.len() > INLINE_OUTPUT);
    codec::encode(
        cmd,
        Parts {
            payload: cmd.payload.len() <= INLINE_PAYLOAD,
            output: !big_output,
        },
    )
}

fn agent_key(agent: &AgentId, id: &str) -> String {
    format!("a{agent}\n{id}")
}

fn tenant_key(agent: &AgentId, id: &str) -> String {
    format!("t{}\n{id}", agent.tenant())
}

/// The `idempotency` table's key.
fn idempotency_key(agent: &AgentId, key: &str) -> String {
    format!("{agent}\n{key}")
}

/// When a final record finished, for the `finished` index (its write time if it has none).
fn finished_ms(cmd: &CommandRecord) -> u64 {
    match cmd.finished {
        Some(t) => u64::try_from(unix_ms(t)).unwrap_or(0),
        None => now_ms(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// === Ids ===

/// Assigns ids (see the module docs); lives in the writer thread.
#[derive(Debug, Clone, Copy, PartialEq)]
struct IdGen {
    ms: u64,
    rand: u128,
}

/// The random part's width.
const ID_RAND_BITS: u32 = 80;

impl IdGen {
    fn parse(id: &str) -> Option<IdGen> {
        let rest = id.strip_prefix('t')?;
        if rest.len() != 32 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(IdGen {
            ms: u64::from_str_radix(&rest[..12], 16).ok()?,
            rand: u128::from_str_radix(&rest[12..], 16).ok()?,
        })
    }

    fn id(&self) -> String {
        format!("t{:012x}{:020x}", self.ms, self.rand)
    }

    /// The next id at `now_ms`, greater than every one before (also when the clock went back).
    fn next(&mut self, now_ms: u64) -> String {
        let max = (1u128 << ID_RAND_BITS) - 1;
        // A fresh random part leaves room above it for the steps of the same millisecond.
        let fresh = || rand::random::<u128>() & ((1u128 << (ID_RAND_BITS - 1)) - 1);
        let step = 1 + u128::from(rand::random::<u64>());
        if now_ms > self.ms {
            self.ms = now_ms;
            self.rand = fresh();
        } else if self.rand + step <= max {
            self.rand += step;
        } else {
            self.ms += 1;
            self.rand = fresh();
        }
        self.id()
    }
}

// === Open ===

impl EmbeddedStore {
    /// Opens (or creates) `dir/commands.redb`, creating `dir` if needed, builds the indexes of a
    /// store written before they existed, and starts the writer.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE)
            .create(&path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let ids = {
            let tx = db.begin_write().map_err(backend)?;
            let ids = {
                let mut meta = tx.open_table(META).map_err(backend)?;
                tx.open_table(COMMANDS).map_err(backend)?;
                tx.open_table(PAYLOADS).map_err(backend)?;
                tx.open_table(OUTPUTS).map_err(backend)?;
                tx.open_table(IDEMPOTENCY).map_err(backend)?;
                tx.open_table(AGENTS).map_err(backend)?;
                tx.open_table(BY_OWNER).map_err(backend)?;
                tx.open_table(FINISHED).map_err(backend)?;
                let schema = meta
                    .get("schema")
                    .map_err(backend)?
                    .map(|v| v.value().to_owned());
                if schema.as_deref() != Some(SCHEMA) {
                    let n = build_indexes(&tx)?;
                    if n > 0 {
                        tracing::info!(commands = n, "command store: indexes built");
                    }
                    meta.insert("schema", SCHEMA).map_err(backend)?;
                }
                let last = meta
                    .get("last_id")
                    .map_err(backend)?
                    .map(|v| v.value().to_owned());
                match last {
                    None => IdGen { ms: 0, rand: 0 },
                    Some(id) => IdGen::parse(&id).ok_or_else(|| StoreError::Corrupt {
                        id: "meta/last_id".into(),
                        detail: format!("{id:?} is not an id"),
                    })?,
                }
            };
            tx.commit().map_err(backend)?;
            ids
        };
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let wdb = db.clone();
        std::thread::Builder::new()
            .name("command-store".into())
            .spawn(move || writer(wdb, rx, ids))
            .map_err(|e| StoreError::Backend(format!("starting the store writer: {e}")))?;
        Ok(EmbeddedStore { db, writer: tx })
    }
}

/// Fills `by_owner` and `finished` from every record (once, for a store from before them).
fn build_indexes(tx: &WriteTransaction) -> Result<usize, StoreError> {
    let commands = tx.open_table(COMMANDS).map_err(backend)?;
    let mut owner = tx.open_table(BY_OWNER).map_err(backend)?;
    let mut finished = tx.open_table(FINISHED).map_err(backend)?;
    let mut n = 0;
    for entry in commands.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        let c = decode(k.value(), v.value())?;
        owner
            .insert(agent_key(&c.agent, &c.id).as_str(), ())
            .map_err(backend)?;
        owner
            .insert(tenant_key(&c.agent, &c.id).as_str(), ())
            .map_err(backend)?;
        if c.is_final() {
            finished
                .insert((finished_ms(&c), c.id.as_str()), ())
                .map_err(backend)?;
        }
        n += 1;
    }
    Ok(n)
}

// === The writer ===

/// The single writer: drains whatever is queued into one transaction, commits (fsync), answers.
fn writer(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Op>, mut ids: IdGen) {
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
        let before = ids;
        match write_batch(&db, &mut batch, &mut ids) {
            Ok(answers) => {
                for a in answers {
                    a();
                }
            }
            Err(e) => {
                // Nothing of the batch was committed; the ids it took are free again (none was
                // handed out), and taking them again keeps the order.
                ids = before;
                tracing::error!(error = %e, "command store commit failed");
                for op in batch.drain(..) {
                    let err = StoreError::Backend(e.to_string());
                    match op {
                        Op::Submit(_, tx) => {
                            let _ = tx.send(Err(err));
                        }
                        Op::Put(_, tx) => {
                            let _ = tx.send(Err(err));
                        }
                        Op::Prune(_, tx) => {
                            let _ = tx.send(Err(err));
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

/// What an operation of a batch did, answered once the batch is committed.
enum Done {
    Submitted(Box<SubmitOutcome>),
    Written,
    Pruned(usize),
}

/// What one batch writes, to open only the tables it needs: opening a table in a write
/// transaction costs its commit.
#[derive(Default)]
struct Needs {
    submit: bool,
    large_payload: bool,
    finals: bool,
    large_output: bool,
    prune: bool,
}

impl Needs {
    fn of(batch: &[Op]) -> Needs {
        let mut n = Needs::default();
        for op in batch {
            match op {
                Op::Submit(c, _) => {
                    n.submit = true;
                    n.large_payload |= c.payload.len() > INLINE_PAYLOAD;
                }
                Op::Put(c, _) => {
                    if c.is_final() {
                        n.finals = true;
                        n.large_output |= c
                            .result
                            .as_ref()
                            .is_some_and(|r| r.output.len() > INLINE_OUTPUT);
                    }
                }
                Op::Prune(..) => n.prune = true,
            }
        }
        n
    }
}

fn write_batch(
    db: &Database,
    batch: &mut Vec<Op>,
    ids: &mut IdGen,
) -> Result<Vec<Answer>, StoreError> {
    let mut tx = db.begin_write().map_err(backend)?;
    // The default, stated: commit returns only once the data is on disk.
    tx.set_durability(Durability::Immediate).map_err(backend)?;
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut results: Vec<Done> = Vec::with_capacity(batch.len());
    let needs = Needs::of(batch);
    let first_id = *ids;
    {
        let open = |want: bool, t: TableDefinition<'static, &'static str, &'static [u8]>| {
            want.then(|| tx.open_table(t)).transpose().map_err(backend)
        };
        let mut commands = tx.open_table(COMMANDS).map_err(backend)?;
        let mut payloads = open(needs.large_payload || needs.prune, PAYLOADS)?;
        let mut outputs = open(needs.large_output || needs.prune, OUTPUTS)?;
        let with = needs.submit || needs.prune;
        let mut idem = with
            .then(|| tx.open_table(IDEMPOTENCY))
            .transpose()
            .map_err(backend)?;
        let mut agents = needs
            .submit
            .then(|| tx.open_table(AGENTS))
            .transpose()
            .map_err(backend)?;
        let mut owner = with
            .then(|| tx.open_table(BY_OWNER))
            .transpose()
            .map_err(backend)?;
        let mut finished = (needs.finals || needs.prune)
            .then(|| tx.open_table(FINISHED))
            .transpose()
            .map_err(backend)?;
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
                    let (Some(idem), Some(agents), Some(owner)) =
                        (idem.as_mut(), agents.as_mut(), owner.as_mut())
                    else {
                        unreachable!("a batch with a Submit opens its tables");
                    };
                    let key = idempotency_key(&cmd.agent, &cmd.idempotency_key);
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
                        results.push(Done::Submitted(Box::new(SubmitOutcome {
                            command: existing,
                            created: false,
                        })));
                        continue;
                    }
                    let mut cmd = cmd.clone();
                    cmd.id = ids.next(now_ms());
                    commands
                        .insert(cmd.id.as_str(), encode_record(&cmd).as_slice())
                        .map_err(backend)?;
                    if cmd.payload.len() > INLINE_PAYLOAD
                        && let Some(payloads) = payloads.as_mut()
                    {
                        payloads
                            .insert(cmd.id.as_str(), &cmd.payload[..])
                            .map_err(backend)?;
                    }
                    owner
                        .insert(agent_key(&cmd.agent, &cmd.id).as_str(), ())
                        .map_err(backend)?;
                    owner
                        .insert(tenant_key(&cmd.agent, &cmd.id).as_str(), ())
                        .map_err(backend)?;
                    if !cmd.idempotency_key.is_empty() {
                        idem.insert(key.as_str(), cmd.id.as_str())
                            .map_err(backend)?;
                    }
                    let agent = cmd.agent.to_string();
                    let n = agents
                        .get(agent.as_str())
                        .map_err(backend)?
                        .map_or(0, |v| v.value());
                    agents.insert(agent.as_str(), n + 1).map_err(backend)?;
                    results.push(Done::Submitted(Box::new(SubmitOutcome {
                        command: cmd,
                        created: true,
                    })));
                }
                Op::Put(cmd, _) if last_put.get(cmd.id.as_str()) != Some(&i) => {
                    results.push(Done::Written);
                }
                Op::Put(cmd, _) => {
                    commands
                        .insert(cmd.id.as_str(), encode_record(cmd).as_slice())
                        .map_err(backend)?;
                    if cmd.is_final() {
                        if let Some(r) = &cmd.result
                            && r.output.len() > INLINE_OUTPUT
                            && let Some(outputs) = outputs.as_mut()
                        {
                            outputs
                                .insert(cmd.id.as_str(), &r.output[..])
                                .map_err(backend)?;
                        }
                        if let Some(finished) = finished.as_mut() {
                            finished
                                .insert((finished_ms(cmd), cmd.id.as_str()), ())
                                .map_err(backend)?;
                        }
                    }
                    results.push(Done::Written);
                }
                Op::Prune(retention, _) => {
                    let (Some(payloads), Some(outputs), Some(idem), Some(owner), Some(finished)) = (
                        payloads.as_mut(),
                        outputs.as_mut(),
                        idem.as_mut(),
                        owner.as_mut(),
                        finished.as_mut(),
                    ) else {
                        unreachable!("a batch with a Prune opens its tables");
                    };
                    let n = prune(
                        retention,
                        &mut commands,
                        payloads,
                        outputs,
                        idem,
                        owner,
                        finished,
                    )?;
                    results.push(Done::Pruned(n));
                }
            }
        }
        if *ids != first_id {
            let mut meta = tx.open_table(META).map_err(backend)?;
            meta.insert("last_id", ids.id().as_str()).map_err(backend)?;
        }
    }
    tx.commit().map_err(backend)?;
    for (op, res) in batch.drain(..).zip(results) {
        match (op, res) {
            (Op::Submit(_, tx), Done::Submitted(out)) => answers.push(Box::new(move || {
                let _ = tx.send(Ok(*out));
            })),
            (Op::Put(_, tx), _) => answers.push(Box::new(move || {
                let _ = tx.send(Ok(()));
            })),
            (Op::Prune(_, tx), Done::Pruned(n)) => answers.push(Box::new(move || {
                let _ = tx.send(Ok(n));
            })),
            (Op::Submit(_, tx), _) => answers.push(Box::new(move || {
                let _ = tx.send(Err(StoreError::Closed));
            })),
            (Op::Prune(_, tx), _) => answers.push(Box::new(move || {
                let _ = tx.send(Err(StoreError::Closed));
            })),
        }
    }
    Ok(answers)
}

type BlobTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// Deletes the finished commands past `r` (at most `r.batch`), oldest finished first.
fn prune(
    r: &Retention,
    commands: &mut BlobTable<'_>,
    payloads: &mut BlobTable<'_>,
    outputs: &mut BlobTable<'_>,
    idem: &mut redb::Table<'_, &'static str, &'static str>,
    owner: &mut redb::Table<'_, &'static str, ()>,
    finished: &mut redb::Table<'_, (u64, &'static str), ()>,
) -> Result<usize, StoreError> {
    let total = finished.len().map_err(backend)?;
    let mut victims: Vec<(u64, String)> = Vec::new();
    for entry in finished.iter().map_err(backend)? {
        if victims.len() >= r.batch {
            break;
        }
        let (k, _) = entry.map_err(backend)?;
        let (ms, id) = k.value();
        let over = total - victims.len() as u64 > r.keep;
        if ms >= r.finished_before_ms && !over {
            break;
        }
        victims.push((ms, id.to_owned()));
    }
    for (ms, id) in &victims {
        finished.remove((*ms, id.as_str())).map_err(backend)?;
        let record = commands.remove(id.as_str()).map_err(backend)?;
        let Some(record) = record else { continue };
        let c = decode(id, record.value())?;
        drop(record);
        payloads.remove(id.as_str()).map_err(backend)?;
        outputs.remove(id.as_str()).map_err(backend)?;
        owner
            .remove(agent_key(&c.agent, id).as_str())
            .map_err(backend)?;
        owner
            .remove(tenant_key(&c.agent, id).as_str())
            .map_err(backend)?;
        if !c.idempotency_key.is_empty() {
            let key = idempotency_key(&c.agent, &c.idempotency_key);
            let names_it = idem
                .get(key.as_str())
                .map_err(backend)?
                .is_some_and(|v| v.value() == id.as_str());
            if names_it {
                idem.remove(key.as_str()).map_err(backend)?;
            }
        }
    }
    Ok(victims.len())
}

// === Reads ===

/// Whether `c` passes the filters `list` checks record by record.
fn matches(f: &ListFilter, c: &CommandRecord) -> bool {
    let created = c.created.map_or(0, unix_ms);
    f.agent.as_ref().is_none_or(|a| c.agent == *a)
        && f.tenants
            .as_ref()
            .is_none_or(|ts| ts.iter().any(|t| t == c.agent.tenant()))
        && f.state.is_none_or(|s| c.state == s)
        && (f.kind.is_empty() || c.kind == f.kind)
        && f.from_ms.is_none_or(|from| created >= from)
        && f.to_ms.is_none_or(|to| created < to)
}

/// Ids in `owner` from `<prefix>\n<after>` (exclusive) to the end of `prefix`'s range.
fn owner_ids<'t>(
    owner: &'t redb::ReadOnlyTable<&'static str, ()>,
    prefix: &str,
    after: &str,
) -> Result<impl Iterator<Item = Result<String, StoreError>> + 't, StoreError> {
    let from = format!("{prefix}\n{after}");
    let to = format!("{prefix}\x0b");
    let lower = if after.is_empty() {
        std::ops::Bound::Included(from.as_str())
    } else {
        std::ops::Bound::Excluded(from.as_str())
    };
    let range = owner
        .range::<&str>((lower, std::ops::Bound::Excluded(to.as_str())))
        .map_err(backend)?;
    let skip = prefix.len() + 1;
    Ok(range.map(move |e| {
        let (k, _) = e.map_err(backend)?;
        Ok(k.value()[skip..].to_owned())
    }))
}

impl EmbeddedStore {
    /// Whether any finished command is past `r`.
    fn prunable(&self, r: &Retention) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let finished = tx.open_table(FINISHED).map_err(backend)?;
        if finished.len().map_err(backend)? > r.keep {
            return Ok(true);
        }
        let first = finished.first().map_err(backend)?;
        Ok(first.is_some_and(|(k, _)| k.value().0 < r.finished_before_ms))
    }
}

/// A record's id and, when the source already read it, its bytes.
type Found = Result<(String, Option<Vec<u8>>), StoreError>;

impl EmbeddedStore {
    fn list_in(&self, tx: &ReadTransaction, f: &ListFilter) -> Result<ListPage, StoreError> {
        let t = tx.open_table(COMMANDS).map_err(backend)?;
        let owner = tx.open_table(BY_OWNER).map_err(backend)?;
        // Where the records come from, in id order: one agent's index, the merged indexes of
        // some tenants, or the whole table.
        let mut found: Box<dyn Iterator<Item = Found> + '_> = if let Some(agent) = &f.agent {
            let ids = owner_ids(&owner, &format!("a{agent}"), &f.after)?;
            Box::new(ids.map(|r| r.map(|id| (id, None))))
        } else if let Some(tenants) = &f.tenants {
            let mut heads = Vec::new();
            for tenant in tenants {
                heads.push(owner_ids(&owner, &format!("t{tenant}"), &f.after)?.peekable());
            }
            Box::new(std::iter::from_fn(move || {
                let mut best: Option<(usize, String)> = None;
                for (i, head) in heads.iter_mut().enumerate() {
                    match head.peek() {
                        Some(Err(_)) => return head.next().map(|r| r.map(|id| (id, None))),
                        Some(Ok(id)) if best.as_ref().is_none_or(|(_, b)| id < b) => {
                            best = Some((i, id.clone()));
                        }
                        _ => {}
                    }
                }
                let (i, _) = best?;
                heads[i].next().map(|r| r.map(|id| (id, None)))
            }))
        } else {
            let range = if f.after.is_empty() {
                t.range::<&str>(..)
            } else {
                t.range::<&str>((
                    std::ops::Bound::Excluded(f.after.as_str()),
                    std::ops::Bound::Unbounded,
                ))
            }
            .map_err(backend)?;
            Box::new(range.map(|e| {
                let (k, v) = e.map_err(backend)?;
                Ok((k.value().to_owned(), Some(v.value().to_vec())))
            }))
        };
        let mut page = ListPage::default();
        let (mut read, mut bytes) = (0usize, 0usize);
        while let Some((id, record)) = found.next().transpose()? {
            let c = match record {
                Some(b) => {
                    bytes += b.len();
                    decode(&id, &b)?
                }
                None => {
                    // An index entry always has its record (both written and deleted in one
                    // transaction); a missing one is skipped rather than failing every List.
                    let Some(v) = t.get(id.as_str()).map_err(backend)? else {
                        continue;
                    };
                    bytes += v.value().len();
                    decode(&id, v.value())?
                }
            };
            read += 1;
            if matches(f, &c) {
                page.commands.push(c);
                if f.limit > 0 && page.commands.len() >= f.limit {
                    return Ok(page);
                }
            }
            if read >= LIST_SCAN_RECORDS || bytes >= LIST_SCAN_BYTES {
                // More may follow: go on after the last record read.
                if found.next().is_some() {
                    page.resume = Some(id);
                }
                return Ok(page);
            }
        }
        Ok(page)
    }
}

impl CommandStore for EmbeddedStore {
    fn submit(&self, command: CommandRecord) -> StoreFuture<SubmitOutcome> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Op::Submit(command, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn put(&self, command: CommandRecord) -> StoreFuture<()> {
        let (tx, rx) = oneshot::channel();
        // Enqueued now, so writes apply in call order even if the future is never awaited.
        let sent = self.writer.send(Op::Put(command, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn get(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(COMMANDS).map_err(backend)?;
        let Some(b) = t.get(id).map_err(backend)? else {
            return Ok(None);
        };
        let mut c = decode(id, b.value())?;
        if c.payload.is_empty() {
            let p = tx.open_table(PAYLOADS).map_err(backend)?;
            if let Some(payload) = p.get(id).map_err(backend)? {
                c.payload = Bytes::copy_from_slice(payload.value());
            }
        }
        if c.is_final()
            && let Some(r) = c.result.as_mut()
            && r.output.is_empty()
        {
            let o = tx.open_table(OUTPUTS).map_err(backend)?;
            if let Some(output) = o.get(id).map_err(backend)? {
                r.output = Bytes::copy_from_slice(output.value());
            }
        }
        Ok(Some(c))
    }

    fn list(&self, f: &ListFilter) -> Result<ListPage, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        self.list_in(&tx, f)
    }

    fn unfinished(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(COMMANDS).map_err(backend)?;
        let p = tx.open_table(PAYLOADS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            let mut c = decode(k.value(), v.value())?;
            if !c.is_final() {
                if c.payload.is_empty()
                    && let Some(payload) = p.get(k.value()).map_err(backend)?
                {
                    c.payload = Bytes::copy_from_slice(payload.value());
                }
                out.push(c);
            }
        }
        Ok(out)
    }

    fn knows_agent(&self, agent: &AgentId) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(AGENTS).map_err(backend)?;
        Ok(t.get(agent.to_string().as_str())
            .map_err(backend)?
            .is_some())
    }

    fn prune(&self, retention: Retention) -> StoreFuture<usize> {
        // Most passes find nothing to delete: a read says so without a write (and its fsync).
        match self.prunable(&retention) {
            Ok(false) => return Box::pin(async { Ok(0) }),
            Ok(true) => {}
            Err(e) => return Box::pin(async move { Err(e) }),
        }
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Op::Prune(retention, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::record::{CommandState, NewCommand, Outcome, from_unix_ms};
    use prost::Message as _;

    fn cmd(agent: &str, key: &str) -> CommandRecord {
        CommandRecord::queued(
            NewCommand {
                agent: agent.parse().unwrap(),
                kind: "echo".into(),
                payload: Bytes::new(),
                content_type: String::new(),
                idempotency_key: key.into(),
                ordering_key: String::new(),
                ttl: None,
                trace_context: Default::default(),
            },
            std::time::SystemTime::now(),
            None,
        )
    }

    fn agent(s: &str) -> Option<AgentId> {
        Some(s.parse().unwrap())
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
        assert!(store.knows_agent(&"t/a".parse().unwrap()).unwrap());
        assert!(!store.knows_agent(&"t/b".parse().unwrap()).unwrap());
    }

    #[tokio::test]
    async fn the_payload_is_written_once_and_joined_on_get() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut c = cmd("t/a", "");
        c.payload = Bytes::from(vec![9; INLINE_PAYLOAD + 1]);
        let mut c = store.submit(c).await.unwrap().command;
        c.state = CommandState::Succeeded;
        store.put(c.clone()).await.unwrap();
        let got = store.get(&c.id).unwrap().unwrap();
        assert_eq!(
            (got.state, got.payload.len()),
            (c.state, INLINE_PAYLOAD + 1)
        );
        let listed = store.list(&ListFilter::default()).unwrap();
        assert!(listed.commands[0].payload.is_empty());
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
            c.state = s;
            c.attempts += 1;
            store.put(c.clone())
        })
        .collect();
        for w in writes {
            w.await.unwrap();
        }
        let got = store.get(&c.id).unwrap().unwrap();
        assert_eq!((got.state, got.attempts), (CommandState::Succeeded, 3));
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

    fn finished(mut c: CommandRecord, ms: i64) -> CommandRecord {
        c.state = CommandState::Succeeded;
        c.finished = Some(from_unix_ms(ms / 1000 * 1000));
        c
    }

    #[test]
    fn ids_are_unguessable_and_ordered_even_within_a_millisecond_and_when_the_clock_goes_back() {
        let mut g = IdGen { ms: 0, rand: 0 };
        let mut last = String::new();
        let mut steps = std::collections::HashSet::new();
        for i in 0..2000u64 {
            // The clock stands still for a while, then jumps back.
            let now = if i < 1000 {
                1_700_000_000_000
            } else {
                1_600_000_000_000
            };
            let before = g;
            let id = g.next(now);
            assert!(id > last, "{id} after {last}");
            assert_eq!(IdGen::parse(&id), Some(g));
            if before.ms == g.ms {
                // At least 64 bits a neighbour does not reveal.
                steps.insert(g.rand - before.rand);
            }
            last = id;
        }
        assert!(steps.len() > 1990, "steps repeat: {}", steps.len());
        assert!(steps.iter().any(|s| *s > 1 << 40));
    }

    #[tokio::test]
    async fn a_store_from_before_indexes_and_random_ids_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let old_id = "0123abcd000000000000002a";
        {
            // The layout of the previous version: records, idempotency keys, agents, and the
            // sequence-based id scheme in `meta`; no indexes, no schema.
            let db = Database::create(dir.path().join(FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            {
                // The record as the API message, as every gateway so far wrote it.
                let c = tether_api::v1::Command {
                    id: old_id.into(),
                    agent: "t/a".into(),
                    kind: "echo".into(),
                    idempotency_key: "k".into(),
                    state: tether_api::v1::CommandState::Succeeded as i32,
                    finished: Some(prost_types::Timestamp {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                };
                tx.open_table(COMMANDS)
                    .unwrap()
                    .insert(old_id, c.encode_to_vec().as_slice())
                    .unwrap();
                tx.open_table(IDEMPOTENCY)
                    .unwrap()
                    .insert("t/a\nk", old_id)
                    .unwrap();
                tx.open_table(AGENTS).unwrap().insert("t/a", 1).unwrap();
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("prefix", "0123abcd").unwrap();
                meta.insert("seq", "42").unwrap();
            }
            tx.commit().unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.get(old_id).unwrap().unwrap().agent.to_string(), "t/a");
        // The old idempotency key still names the old command.
        let again = store.submit(cmd("t/a", "k")).await.unwrap();
        assert_eq!((again.command.id.as_str(), again.created), (old_id, false));
        let new = store.submit(cmd("t/a", "")).await.unwrap().command;
        assert!(new.id.starts_with('t') && new.id.len() == 33, "{}", new.id);
        assert!(new.id.as_str() > old_id);
        let by_agent = |a: &str| ListFilter {
            agent: agent(a),
            ..Default::default()
        };
        let ids = |p: ListPage| p.commands.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.list(&by_agent("t/a")).unwrap()),
            vec![old_id.to_owned(), new.id.clone()]
        );
        let tenant = ListFilter {
            tenants: Some(vec!["t".into()]),
            ..Default::default()
        };
        assert_eq!(ids(store.list(&tenant).unwrap()).len(), 2);
        // Old finished records are in the retention index too.
        let pruned = store
            .prune(Retention {
                finished_before_ms: 2_000,
                keep: u64::MAX,
                batch: 10,
            })
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        assert!(store.get(old_id).unwrap().is_none());
        assert_eq!(ids(store.list(&by_agent("t/a")).unwrap()), vec![new.id]);
    }

    #[tokio::test]
    async fn list_reads_an_agents_or_tenants_index_and_a_scan_stops_at_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let many: Vec<_> = (0..LIST_SCAN_RECORDS + 50)
            .map(|_| store.submit(cmd("big/a", "")))
            .collect();
        for f in many {
            f.await.unwrap();
        }
        let b = store.submit(cmd("small/b", "")).await.unwrap().command;
        let c = store.submit(cmd("other/c", "")).await.unwrap().command;
        // One agent, one tenant, two tenants merged in id order: only their records are read.
        let page = store
            .list(&ListFilter {
                agent: agent("small/b"),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((page.commands.len(), page.resume), (1, None));
        let page = store
            .list(&ListFilter {
                tenants: Some(vec!["other".into(), "small".into(), "none".into()]),
                ..Default::default()
            })
            .unwrap();
        let got: Vec<_> = page.commands.iter().map(|c| c.id.clone()).collect();
        assert_eq!((got, page.resume), (vec![b.id.clone(), c.id.clone()], None));
        // A filter that matches nothing reads a bounded part and says where to go on.
        let nothing = ListFilter {
            state: Some(CommandState::Failed),
            ..Default::default()
        };
        let page = store.list(&nothing).unwrap();
        assert!(page.commands.is_empty());
        let resume = page.resume.expect("a resume point");
        let rest = store
            .list(&ListFilter {
                after: resume,
                ..nothing.clone()
            })
            .unwrap();
        assert_eq!((rest.commands.len(), rest.resume), (0, None));
        // Pagination by id within the index.
        let page = store
            .list(&ListFilter {
                agent: agent("big/a"),
                limit: 3,
                ..Default::default()
            })
            .unwrap();
        let next = store
            .list(&ListFilter {
                agent: agent("big/a"),
                limit: 3,
                after: page.commands[2].id.clone(),
                ..Default::default()
            })
            .unwrap();
        assert!(next.commands[0].id > page.commands[2].id);
    }

    #[tokio::test]
    async fn prune_deletes_by_age_then_beyond_the_count_with_everything_a_command_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for i in 0..6i64 {
            let mut c = cmd("t/a", &format!("k{i}"));
            c.payload = Bytes::from(vec![1; INLINE_PAYLOAD + 1]);
            let c = store.submit(c).await.unwrap().command;
            let mut f = finished(c, 10_000 * (i + 1));
            f.result = Some(Outcome {
                output: Bytes::from(vec![2; INLINE_OUTPUT + 1]),
                message: String::new(),
            });
            store.put(f.clone()).await.unwrap();
            ids.push(f.id);
        }
        let unfinished = store.submit(cmd("t/a", "open")).await.unwrap().command;
        // A large output is kept apart: Get joins it, List leaves it out.
        let got = store.get(&ids[0]).unwrap().unwrap();
        assert_eq!(got.result.unwrap().output.len(), INLINE_OUTPUT + 1);
        let listed = store.list(&ListFilter::default()).unwrap().commands;
        assert!(listed[0].result.as_ref().unwrap().output.is_empty());
        // Finished before 25 s: the first two. Batches of one: one per call.
        let r = Retention {
            finished_before_ms: 25_000,
            keep: u64::MAX,
            batch: 1,
        };
        assert_eq!(store.prune(r).await.unwrap(), 1);
        assert_eq!(store.prune(r).await.unwrap(), 1);
        assert_eq!(store.prune(r).await.unwrap(), 0);
        // Beyond two finished: the oldest two of the four left.
        let r = Retention {
            finished_before_ms: 0,
            keep: 2,
            batch: 100,
        };
        assert_eq!(store.prune(r).await.unwrap(), 2);
        let left: Vec<_> = store
            .list(&ListFilter {
                agent: agent("t/a"),
                ..Default::default()
            })
            .unwrap()
            .commands
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(left, vec![ids[4].clone(), ids[5].clone(), unfinished.id]);
        // Everything of a pruned command is gone: record, payload, output, idempotency key.
        let tx = store.db.begin_read().unwrap();
        for id in &ids[..4] {
            assert!(store.get(id).unwrap().is_none());
            assert!(
                tx.open_table(PAYLOADS)
                    .unwrap()
                    .get(id.as_str())
                    .unwrap()
                    .is_none()
            );
            assert!(
                tx.open_table(OUTPUTS)
                    .unwrap()
                    .get(id.as_str())
                    .unwrap()
                    .is_none()
            );
        }
        assert_eq!(tx.open_table(FINISHED).unwrap().len().unwrap(), 2);
        assert_eq!(tx.open_table(BY_OWNER).unwrap().len().unwrap(), 6);
        drop(tx);
        let again = store.submit(cmd("t/a", "k0")).await.unwrap();
        assert!(
            again.created,
            "a pruned command's idempotency key is free again"
        );
        let kept = store.submit(cmd("t/a", "k5")).await.unwrap();
        assert_eq!(
            (kept.created, kept.command.id.as_str()),
            (false, ids[5].as_str())
        );
    }
}
