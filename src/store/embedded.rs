//! The store in the data directory, on fjall (an LSM tree: appends are journal writes,
//! and a conversation's messages are one key range), behind a write-ahead log of its own
//! (`log`): a group is durable once its record is synced to the log, and fjall is written
//! behind it by the store's apply thread, which syncs fjall and removes the log's older
//! segments at each checkpoint. fjall holds its own locks across its flushes' syncs, and a
//! commit that met one waited tens of milliseconds (docs/perf/18); the log waits only on
//! the device. Keyspaces:
//! - `messages`: conversation id, NUL, seq (u64 big-endian) → record, so that a range
//!   scan reads a conversation in order;
//! - `heads`: conversation → latest seq, written in the same atomic batch;
//! - `floors`: conversation → first seq still held, once retention trimmed it;
//! - `user_convs`: user, NUL, conversation → when the user last took part (u64 BE ms),
//!   rewritten at most once a minute per conversation (it only orders `ready`'s list);
//! - `client_ids`: the dedupe window's period (u64 BE, time / window), hash of (sender,
//!   client id) (u64 BE) → when it was used, seq and conversation. The hashes' fingerprints
//!   of the current and previous period are also held in memory, so that fjall is read
//!   only for a likely retry; periods older than those are trimmed from the front.
//!
//! Reads that must see every acknowledged message (history, `ready`, a retry's lookup)
//! first wait until the apply thread has caught up with the log; the append path reads
//! fjall only for a conversation it has not touched since start. Every key written per
//! message brings a flush closer, so the indexes take as few writes as they can.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::log::{self, Log, Records, Write, Writes};
use super::{
    record, Appended, ConvId, MessageStore, NewMessage, Page, Range, RecentWrites, Retention, StoreError, TrimStep,
};

/// The file that marks a directory as a shardgate message store, and its format.
const MARKER: &str = "SHARDGATE-STORE";
const MARKER_TEXT: &str = "shardgate message store, format 3\n";
/// Formats this build opens and rewrites as its own (format 3 added the log, which a
/// format 2 directory has none of yet).
const OLDER_MARKERS: &[&str] = &["shardgate message store, format 2\n"];
/// The log's segments, in the data directory.
const LOG_DIR: &str = "wal";
/// What the store may hold in memory: the block cache and each keyspace's memtable (the
/// messages' larger: it takes every write); and the journal kept on disk before memtables
/// are flushed. fjall's defaults (32 MiB cache, 64 MiB memtables) are for a database that
/// owns its host; a gateway holds connections first, and small memtables also keep each
/// flush, which every sync then waits behind, short (docs/perf/18).
const CACHE_BYTES: u64 = 16 << 20;
const MESSAGES_MEMTABLE_BYTES: u64 = 4 << 20;
const INDEX_MEMTABLE_BYTES: u64 = 1 << 20;
/// Journal kept before memtables must be flushed (fjall's default is 512 MiB).
const JOURNAL_BYTES: u64 = 64 << 20;
/// Background flush and compaction threads: the store's write rate (a chat host's
/// messages) needs one, and every thread competes with the shards for the cores.
const WORKER_THREADS: usize = 1;
/// Caches of heads and floors are dropped past this many conversations (fjall's block
/// cache still holds the hot ones): memory stays bounded however many conversations exist.
const CACHE_MAX: usize = 1 << 20;
/// The dedupe window's periods are at least this long (a window of 0 still dedupes a
/// retry in the same second).
const MIN_DEDUPE_PERIOD_MS: u64 = 1_000;
/// Bytes logged but not yet in fjall, past which the store thread waits for the apply
/// thread: fjall is behind by that much at most, and the queue holds no more in memory.
const APPLY_QUEUE_BYTES: u64 = 32 << 20;
/// How long a read waits for the apply thread to catch up before it is answered with an
/// error.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The apply thread's waits between tries of a write fjall refused (a full disk).
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Keyspace numbers in the log's writes.
const MESSAGES: u8 = 0;
const HEADS: u8 = 1;
const FLOORS: u8 = 2;
const USER_CONVS: u8 = 3;
const CLIENT_IDS: u8 = 4;

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: not a shardgate message store (it holds other files and no {MARKER}); give --data-dir an empty or shardgate directory", .0.display())]
    Foreign(PathBuf),
    #[error("{}: the message store was written by another format ({found:?}); this build reads {MARKER_TEXT:?}", path.display())]
    OtherFormat { path: PathBuf, found: String },
    #[error("{}: another shardgate process holds this message store (one store per process: give each its own --data-dir)", .0.display())]
    Locked(PathBuf),
    #[error("{}: cannot open the message store: {reason}", path.display())]
    Engine { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

pub struct EmbeddedStore {
    messages: Keyspace,
    heads: Keyspace,
    floors: Keyspace,
    user_convs: Keyspace,
    client_ids: Keyspace,
    retention: Retention,
    dedupe_window_ms: u64,
    /// Latest seq and first held seq per conversation, as far as read or written since start.
    head_cache: HashMap<ConvId, u64>,
    floor_cache: HashMap<ConvId, u64>,
    /// Groups submitted when a cache was last cleared: fjall must hold them before a miss
    /// may be read from it (until then, a value only in the cache may be newer than fjall's).
    caches_cleared_at: u64,
    /// `user_convs` keys written within the last minute.
    user_convs_written: RecentWrites,
    /// The client ids of the dedupe window, once the first append has loaded them.
    recent_ids: Option<RecentIds>,
    /// Where the retention sweep goes on from (a conversation id), and whether it is
    /// in the middle of a round.
    sweep_cursor: Option<String>,
    /// Reused for encoding records.
    scratch: Vec<u8>,
    log: Log,
    /// Groups handed to the apply thread so far.
    submitted: u64,
    /// Log segments to remove once fjall holds what they hold.
    retired: Vec<PathBuf>,
    applier: Applier,
}

/// The keyspaces, by their numbers in the log.
#[derive(Clone)]
struct Spaces([Keyspace; 5]);

impl Spaces {
    /// Writes one log record's batch into fjall, atomically.
    fn apply(&self, db: &Database, bytes: &[u8]) -> Result<(), StoreError> {
        let mut batch = db.batch();
        for write in log::writes(bytes) {
            match write.ok_or(StoreError::Corrupt("a log record holds a write this build cannot read"))? {
                Write::Put { space, key, value } => batch.insert(self.space(space)?, key, value),
                Write::Remove { space, key } => batch.remove(self.space(space)?, key),
            }
        }
        batch.commit().map_err(engine)
    }

    fn space(&self, n: u8) -> Result<&Keyspace, StoreError> {
        self.0.get(n as usize).ok_or(StoreError::Corrupt(
            "a log record names a keyspace this build does not have",
        ))
    }
}

enum ToApplier {
    /// One group's writes, as logged.
    Apply(Writes),
    /// Everything in this segment was sent before: sync fjall, then remove it.
    Checkpoint(PathBuf),
}

/// How far the apply thread is, for the store thread to wait on.
#[derive(Default)]
struct ApplyState {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// fjall refuses writes: appends are refused too until it takes them again.
    failing: AtomicBool,
    /// The store is closing: a write fjall refuses is left to the log's replay.
    stopping: AtomicBool,
}

#[derive(Default)]
struct Progress {
    applied: u64,
    /// Bytes of the groups sent and not yet applied.
    queued_bytes: u64,
    error: Option<String>,
}

impl ApplyState {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `attempt` until it succeeds, waiting longer after each failure; false if the
    /// store closed first.
    fn retry(&self, what: &str, mut attempt: impl FnMut() -> Result<(), StoreError>) -> bool {
        let mut wait = RETRY_FIRST;
        loop {
            match attempt() {
                Ok(()) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("store: fjall takes writes again");
                        self.progress().error = None;
                    }
                    return true;
                }
                Err(e) => {
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!("store: fjall refused a {what}: {e}; the log holds it, trying again");
                    }
                    self.progress().error = Some(e.to_string());
                    self.changed.notify_all();
                    if self.stopping.load(Ordering::Relaxed) {
                        return false;
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// The apply thread: writes the logged groups into fjall in log order, and at each
/// checkpoint syncs fjall and removes the segment the log is done with.
struct Applier {
    to: Option<Sender<ToApplier>>,
    thread: Option<JoinHandle<()>>,
    state: Arc<ApplyState>,
}

impl Applier {
    fn spawn(db: Database, spaces: Spaces) -> std::io::Result<Self> {
        // Bounded by bytes (`wait_for_room`), not by count.
        let (to, from) = crossbeam_channel::unbounded();
        let state = Arc::new(ApplyState::default());
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("store-apply".into())
            .spawn(move || apply_loop(&db, &spaces, &from, &thread_state))?;
        Ok(Applier {
            to: Some(to),
            thread: Some(thread),
            state,
        })
    }

    /// Waits while the groups not yet applied hold more than `APPLY_QUEUE_BYTES` (fjall is
    /// behind, say in a long flush), then counts `bytes` in. Gives up while fjall refuses
    /// writes: the group is in the log already, and its apply waits behind the others.
    fn wait_for_room(&self, bytes: u64) {
        let mut progress = self.state.progress();
        while progress.queued_bytes > APPLY_QUEUE_BYTES && progress.error.is_none() {
            progress = self
                .state
                .changed
                .wait_timeout(progress, SETTLE_TIMEOUT)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        progress.queued_bytes += bytes;
    }

    fn send(&self, msg: ToApplier) {
        if let Some(to) = &self.to {
            // Only fails once the thread is gone; the log holds the writes for the replay.
            let _ = to.send(msg);
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::Relaxed);
        self.to = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn apply_loop(db: &Database, spaces: &Spaces, from: &Receiver<ToApplier>, state: &ApplyState) {
    for msg in from.iter() {
        match msg {
            ToApplier::Apply(writes) => {
                state.retry("write", || match spaces.apply(db, writes.payload()) {
                    // Cannot happen to bytes this build wrote; retrying would not help.
                    Err(StoreError::Corrupt(what)) => {
                        tracing::error!("store: a logged group was not applied: {what}");
                        Ok(())
                    }
                    other => other,
                });
                let mut progress = state.progress();
                progress.applied += 1;
                progress.queued_bytes = progress.queued_bytes.saturating_sub(writes.payload().len() as u64);
                drop(progress);
                state.changed.notify_all();
            }
            ToApplier::Checkpoint(segment) => {
                let synced = state.retry("sync", || db.persist(PersistMode::SyncAll).map_err(engine));
                if synced {
                    if let Err(e) = std::fs::remove_file(&segment) {
                        tracing::warn!("store: cannot remove {}: {e}", segment.display());
                    }
                }
            }
        }
    }
}

/// 32-bit fingerprints of the client ids used in the dedupe window's current and previous
/// period. A message whose fingerprint is in neither is no retry, and fjall is not read
/// for it; a match (a retry, or one in 2^32 per id held) is looked up. About 5–10 bytes
/// per id used within the last two periods.
#[derive(Default)]
struct RecentIds {
    period: u64,
    current: HashSet<u32, BuildHasherDefault<FingerprintHasher>>,
    previous: HashSet<u32, BuildHasherDefault<FingerprintHasher>>,
}

/// The fingerprints are hashes already; spread them over the whole word, whose top bits
/// the table probes by.
#[derive(Default)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0 << 8 | u64::from(*b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }

    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

fn fingerprint(hash: u64) -> u32 {
    (hash >> 32) as u32
}

impl RecentIds {
    /// Moves on to `period` (the next one, or later); false if it is before the current.
    fn advance(&mut self, period: u64) -> bool {
        if period < self.period {
            return false;
        }
        if period == self.period + 1 {
            self.previous = std::mem::take(&mut self.current);
        } else if period > self.period {
            self.current.clear();
            self.previous.clear();
        }
        self.period = period;
        true
    }

    fn insert(&mut self, period: u64, hash: u64) {
        if period == self.period {
            self.current.insert(fingerprint(hash));
        } else if period + 1 == self.period {
            self.previous.insert(fingerprint(hash));
        }
    }

    fn may_hold(&self, hash: u64) -> bool {
        let fp = fingerprint(hash);
        self.current.contains(&fp) || self.previous.contains(&fp)
    }
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// The key of message `seq` of `conv`.
fn message_key(conv: &ConvId, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(conv.as_str().len() + 9);
    key.extend_from_slice(conv.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn user_conv_key(user: &str, conv: &ConvId) -> Vec<u8> {
    let mut key = Vec::with_capacity(user.len() + conv.as_str().len() + 1);
    key.extend_from_slice(user.as_bytes());
    key.push(0);
    key.extend_from_slice(conv.as_str().as_bytes());
    key
}

/// The `client_ids` key of `hash` in `period`.
fn client_id_key(period: u64, hash: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&period.to_be_bytes());
    key[8..].copy_from_slice(&hash.to_be_bytes());
    key
}

fn client_id_hash(from: &str, id: &str) -> u64 {
    // SipHash with fixed keys: the same on every run, so that hashes written before a
    // restart are found after it.
    let mut h = DefaultHasher::new();
    (from, id).hash(&mut h);
    h.finish()
}

fn u64_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u64, StoreError> {
    let b: [u8; 8] = bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .ok_or(StoreError::Corrupt(what))?;
    Ok(u64::from_be_bytes(b))
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`. A directory with other files and no marker,
    /// or another format's marker, is refused, as is one another process holds.
    pub fn open(dir: &Path, retention: Retention, dedupe_window: Duration) -> Result<Self, OpenError> {
        let io = |source| OpenError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let marker = dir.join(MARKER);
        match std::fs::read_to_string(&marker) {
            Ok(text) if text == MARKER_TEXT => {}
            Ok(text) if OLDER_MARKERS.contains(&text.as_str()) => std::fs::write(&marker, MARKER_TEXT).map_err(io)?,
            Ok(found) => {
                return Err(OpenError::OtherFormat {
                    path: dir.to_path_buf(),
                    found,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = match std::fs::read_dir(dir) {
                    Ok(mut entries) => entries.next().is_none(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => return Err(io(e)),
                };
                if !empty {
                    return Err(OpenError::Foreign(dir.to_path_buf()));
                }
                std::fs::create_dir_all(dir).map_err(io)?;
                std::fs::write(&marker, MARKER_TEXT).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        let fail = |e: fjall::Error| match e {
            fjall::Error::Locked => OpenError::Locked(dir.to_path_buf()),
            other => OpenError::Engine {
                path: dir.to_path_buf(),
                reason: other.to_string(),
            },
        };
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(JOURNAL_BYTES)
            .worker_threads(WORKER_THREADS)
            .open()
            .map_err(fail)?;
        let keyspace = |name: &str, memtable: u64| {
            db.keyspace(name, || KeyspaceCreateOptions::default().max_memtable_size(memtable))
                .map_err(fail)
        };
        let spaces = Spaces([
            keyspace("messages", MESSAGES_MEMTABLE_BYTES)?,
            keyspace("heads", INDEX_MEMTABLE_BYTES)?,
            keyspace("floors", INDEX_MEMTABLE_BYTES)?,
            keyspace("user_convs", INDEX_MEMTABLE_BYTES)?,
            keyspace("client_ids", INDEX_MEMTABLE_BYTES)?,
        ]);
        let log_dir = dir.join(LOG_DIR);
        let next_segment = replay(&db, &spaces, &log_dir)?;
        let [messages, heads, floors, user_convs, client_ids] = spaces.0.clone();
        Ok(EmbeddedStore {
            messages,
            heads,
            floors,
            user_convs,
            client_ids,
            retention,
            dedupe_window_ms: dedupe_window.as_millis() as u64,
            head_cache: HashMap::new(),
            floor_cache: HashMap::new(),
            caches_cleared_at: 0,
            user_convs_written: RecentWrites::default(),
            recent_ids: None,
            sweep_cursor: None,
            scratch: Vec::new(),
            log: Log::new(log_dir.clone(), next_segment),
            submitted: 0,
            retired: Vec::new(),
            applier: Applier::spawn(db, spaces).map_err(|source| OpenError::Io { path: log_dir, source })?,
        })
    }

    /// Logs a group of writes (and, with `sync`, makes it and every write before it
    /// durable), then hands it to the apply thread. Writes that were not synced are made
    /// durable by the next synced group, or by fjall's next checkpoint.
    fn submit(&mut self, mut writes: Writes, sync: bool) -> Result<(), log::AppendError> {
        if self.applier.state.failing.load(Ordering::Relaxed) {
            let reason = self.applier.state.progress().error.clone().unwrap_or_default();
            return Err(log::AppendError {
                error: std::io::Error::other(format!("fjall refuses writes: {reason}")),
                written: false,
            });
        }
        let logged = self.log.append(&mut writes, sync, &mut self.retired);
        if logged.is_ok() || logged.as_ref().is_err_and(|e| e.written) {
            self.applier.wait_for_room(writes.payload().len() as u64);
            self.applier.send(ToApplier::Apply(writes));
            self.submitted += 1;
        }
        for segment in self.retired.drain(..) {
            self.applier.send(ToApplier::Checkpoint(segment));
        }
        logged
    }

    /// Waits until fjall holds the first `groups` groups submitted.
    fn settle(&self, groups: u64) -> Result<(), StoreError> {
        let state = &self.applier.state;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut progress = state.progress();
        while progress.applied < groups {
            if let Some(e) = &progress.error {
                return Err(StoreError::Engine(e.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Engine(format!(
                    "fjall is {} groups behind the log",
                    groups - progress.applied
                )));
            }
            progress = state
                .changed
                .wait_timeout(progress, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// Waits until fjall holds everything submitted.
    fn settle_all(&self) -> Result<(), StoreError> {
        self.settle(self.submitted)
    }

    /// The latest seq of `conv` (0 when it has none).
    pub fn head(&self, conv: &ConvId) -> Result<u64, StoreError> {
        if let Some(head) = self.head_cache.get(conv) {
            return Ok(*head);
        }
        self.settle(self.caches_cleared_at)?;
        match self.heads.get(conv.as_str()).map_err(engine)? {
            None => Ok(0),
            Some(bytes) => u64_at(&bytes, 0, "a conversation head is not 8 bytes"),
        }
    }

    /// The first seq of `conv` retention has not trimmed (1 when nothing was trimmed).
    fn floor(&self, conv: &ConvId) -> Result<u64, StoreError> {
        if let Some(floor) = self.floor_cache.get(conv) {
            return Ok(*floor);
        }
        self.settle(self.caches_cleared_at)?;
        match self.floors.get(conv.as_str()).map_err(engine)? {
            None => Ok(1),
            Some(bytes) => u64_at(&bytes, 0, "a conversation floor is not 8 bytes"),
        }
    }

    /// Is this message a retry of one stored within the window? Only a fingerprint found
    /// in memory is looked up, and a hash match is checked against the stored record, so
    /// that two different ids never pass for one.
    fn earlier_copy(
        &mut self,
        hash: u64,
        m: &NewMessage,
        client_id: &str,
        now_ms: u64,
    ) -> Result<Option<(ConvId, u64)>, StoreError> {
        let period = self.dedupe_period(now_ms);
        if !self.recent_ids(period)?.may_hold(hash) {
            return Ok(None);
        }
        self.settle_all()?;
        let mut found = None;
        for p in [period, period.saturating_sub(1)] {
            found = self.client_ids.get(client_id_key(p, hash)).map_err(engine)?;
            if found.is_some() {
                break;
            }
        }
        let Some(value) = found else {
            return Ok(None);
        };
        let used_ms = u64_at(&value, 0, "a client id record is too short")?;
        if used_ms < now_ms.saturating_sub(self.dedupe_window_ms) {
            return Ok(None);
        }
        let seq = u64_at(&value, 8, "a client id record is too short")?;
        let conv = std::str::from_utf8(&value[16..])
            .ok()
            .and_then(ConvId::from_stored)
            .ok_or(StoreError::Corrupt("a client id record names no conversation"))?;
        let Some(record) = self.messages.get(message_key(&conv, seq)).map_err(engine)? else {
            // Trimmed since: the hash alone has to do.
            return Ok(Some((conv, seq)));
        };
        let stored = record::decode(seq, &record)?;
        let same = stored.from == m.from && stored.client_id.as_deref() == Some(client_id);
        Ok(same.then_some((conv, seq)))
    }

    /// The fingerprints of the dedupe window at `period`, read from fjall the first time
    /// (and again if the clock went back past the period held).
    fn recent_ids(&mut self, period: u64) -> Result<&mut RecentIds, StoreError> {
        let held = match &mut self.recent_ids {
            Some(ids) => ids.advance(period),
            None => false,
        };
        if !held {
            self.settle_all()?;
            let mut ids = RecentIds {
                period,
                ..RecentIds::default()
            };
            let from = client_id_key(period.saturating_sub(1), 0);
            let to = client_id_key(period, u64::MAX);
            for item in self.client_ids.range(from..=to) {
                let key = item.key().map_err(engine)?;
                let at = u64_at(&key, 0, "a client id key is too short")?;
                ids.insert(at, u64_at(&key, 8, "a client id key is too short")?);
            }
            self.recent_ids = Some(ids);
        }
        Ok(self.recent_ids.get_or_insert_with(RecentIds::default))
    }

    /// The dedupe window's period at `now_ms`: a retry's record is in this one or the one
    /// before.
    fn dedupe_period(&self, now_ms: u64) -> u64 {
        now_ms / self.dedupe_window_ms.max(MIN_DEDUPE_PERIOD_MS)
    }

    /// Notes in `batch` that `user` took part in `conv` at `ts_ms`, unless that was written
    /// within the last minute.
    fn touch_user_conv(&mut self, writes: &mut Writes, user: &str, conv: &ConvId, ts_ms: u64) {
        let key = user_conv_key(user, conv);
        if self.user_convs_written.due(key.clone(), ts_ms) {
            writes.put(USER_CONVS, &key, &ts_ms.to_be_bytes());
        }
    }

    /// Removes the messages of `conv` below `new_floor` (from `floor`) in `writes`.
    /// (The caller writes the new floor, once per conversation and batch: fjall gives a
    /// batch's writes one sequence number, so two writes of one key in it would leave
    /// either.)
    fn trim_below(writes: &mut Writes, conv: &ConvId, floor: u64, new_floor: u64) {
        for seq in floor..new_floor {
            writes.remove(MESSAGES, &message_key(conv, seq));
        }
    }

    fn remember_head(&mut self, conv: ConvId, head: u64) {
        if self.head_cache.len() >= CACHE_MAX {
            self.head_cache.clear();
            self.caches_cleared_at = self.submitted;
        }
        self.head_cache.insert(conv, head);
    }

    fn remember_floor(&mut self, conv: ConvId, floor: u64) {
        if self.floor_cache.len() >= CACHE_MAX {
            self.floor_cache.clear();
            self.caches_cleared_at = self.submitted;
        }
        self.floor_cache.insert(conv, floor);
    }

    /// Where the age sweep may stop in `conv` from `floor`: the first seq newer than the
    /// cutoff, or `head + 1`.
    fn first_young(&self, conv: &ConvId, floor: u64, head: u64, cutoff_ms: u64) -> Result<u64, StoreError> {
        if floor > head {
            return Ok(floor);
        }
        let range = message_key(conv, floor)..=message_key(conv, head);
        for item in self.messages.range(range) {
            let (key, value) = item.into_inner().map_err(engine)?;
            let seq = u64_at(&key, key.len().saturating_sub(8), "a message key is too short")?;
            if record::decode(seq, &value)?.ts_ms >= cutoff_ms {
                return Ok(seq);
            }
        }
        Ok(head + 1)
    }
}

/// Writes what the log's segments in `dir` hold into fjall, syncs it and removes them;
/// returns the index for the next segment. A record cut short (the process died while
/// writing it: it was never acknowledged) ends its segment, and is said on stdout.
fn replay(db: &Database, spaces: &Spaces, dir: &Path) -> Result<u64, OpenError> {
    let io = |source| OpenError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let segments = log::segments(dir).map_err(io)?;
    let mut groups = 0u64;
    for (_, path) in &segments {
        let bytes = std::fs::read(path).map_err(|source| OpenError::Io {
            path: path.clone(),
            source,
        })?;
        let mut records = Records::new(&bytes);
        for payload in records.by_ref() {
            spaces.apply(db, payload).map_err(|e| OpenError::Engine {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            groups += 1;
        }
        if records.ends_in_a_cut_record() {
            tracing::warn!(
                "store: {}: a record at byte {} was cut short (the process stopped while writing it; it was never acknowledged): skipped",
                path.display(),
                bytes.len() - records.unread()
            );
        }
    }
    if let Some((last, _)) = segments.last() {
        db.persist(PersistMode::SyncAll).map_err(|e| OpenError::Engine {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        for (_, path) in &segments {
            std::fs::remove_file(path).map_err(io)?;
        }
        log::sync_dir(dir).map_err(io)?;
        tracing::info!(
            "store: {groups} logged groups written into fjall from {}",
            dir.display()
        );
        return Ok(last + 1);
    }
    Ok(0)
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The last segment is done with too: the apply thread syncs fjall and removes it
        // before it ends (the applier's drop waits for that).
        self.log.retire(&mut self.retired);
        for segment in self.retired.drain(..) {
            self.applier.send(ToApplier::Checkpoint(segment));
        }
    }
}

impl MessageStore for EmbeddedStore {
    fn append(&mut self, group: &[NewMessage], now_ms: u64) -> Result<Vec<Appended>, StoreError> {
        // Heads and floors change in maps of their own until the batch is committed: a
        // batch that fails to commit uses up no seq.
        let mut heads: HashMap<ConvId, u64> = HashMap::new();
        let mut floors: HashMap<ConvId, u64> = HashMap::new();
        // Client ids used in this group (a retry may come in the same group).
        let mut ids: HashMap<u64, (ConvId, u64)> = HashMap::new();
        let mut results = Vec::with_capacity(group.len());
        self.user_convs_written.discard();
        let period = self.dedupe_period(now_ms);
        let mut writes = Writes::default();
        for m in group {
            let hash = m.client_id.as_deref().map(|id| client_id_hash(&m.from, id));
            if let (Some(hash), Some(id)) = (hash, m.client_id.as_deref()) {
                let in_group = ids.get(&hash).cloned();
                if let Some((conv, seq)) =
                    in_group.map_or_else(|| self.earlier_copy(hash, m, id, now_ms), |c| Ok(Some(c)))?
                {
                    results.push(Appended::Duplicate { conv, seq });
                    continue;
                }
            }
            let head = match heads.get(&m.conv) {
                Some(h) => *h,
                None => self.head(&m.conv)?,
            };
            let seq = head + 1;
            heads.insert(m.conv.clone(), seq);
            results.push(Appended::New(seq));
            self.scratch.clear();
            record::encode(&mut self.scratch, m.ts_ms, &m.from, m.client_id.as_deref(), &m.body);
            writes.put(MESSAGES, &message_key(&m.conv, seq), &self.scratch);
            let max = self.retention.max_messages;
            if max > 0 && seq > max {
                // Count-based retention as it goes: each append past the limit trims one.
                let floor = match floors.get(&m.conv) {
                    Some(f) => *f,
                    None => self.floor(&m.conv)?,
                };
                let new_floor = seq - max + 1;
                if new_floor > floor {
                    Self::trim_below(&mut writes, &m.conv, floor, new_floor);
                    floors.insert(m.conv.clone(), new_floor);
                }
            }
            match m.conv.direct_users() {
                Some((a, b)) => {
                    self.touch_user_conv(&mut writes, a, &m.conv, m.ts_ms);
                    self.touch_user_conv(&mut writes, b, &m.conv, m.ts_ms);
                }
                None => self.touch_user_conv(&mut writes, &m.from, &m.conv, m.ts_ms),
            }
            if let Some(hash) = hash {
                let mut value = now_ms.to_be_bytes().to_vec();
                value.extend_from_slice(&seq.to_be_bytes());
                value.extend_from_slice(m.conv.as_str().as_bytes());
                writes.put(CLIENT_IDS, &client_id_key(period, hash), &value);
                ids.insert(hash, (m.conv.clone(), seq));
                self.recent_ids(period)?.insert(period, hash);
            }
        }
        for (conv, seq) in &heads {
            writes.put(HEADS, conv.as_str().as_bytes(), &seq.to_be_bytes());
        }
        for (conv, floor) in &floors {
            writes.put(FLOORS, conv.as_str().as_bytes(), &floor.to_be_bytes());
        }
        let failed = match self.submit(writes, true) {
            Ok(()) => None,
            Err(e) if !e.written => return Err(engine(e.error)),
            Err(e) => Some(e.error),
        };
        // Logged: the seqs are taken, durable or not (a record whose sync failed may still
        // be replayed), so that none is ever reused.
        for (conv, head) in heads {
            self.remember_head(conv, head);
        }
        for (conv, floor) in floors {
            self.remember_floor(conv, floor);
        }
        self.user_convs_written.committed();
        match failed {
            None => Ok(results),
            Some(e) => Err(engine(e)),
        }
    }

    fn read(&mut self, conv: &ConvId, range: Range, limit: usize) -> Result<Page, StoreError> {
        if let Err(e) = self.settle_all() {
            // fjall is behind the log (it refuses writes, or is slow): a conversation it
            // holds up to its head can still be read, any other would miss messages.
            let held = match self.heads.get(conv.as_str()).map_err(engine)? {
                Some(bytes) => u64_at(&bytes, 0, "a conversation head is not 8 bytes")?,
                None => 0,
            };
            if held != self.head(conv)? {
                return Err(e);
            }
        }
        let head = self.head(conv)?;
        let first = self.floor(conv)?.min(head + 1);
        let (from, to) = match range {
            Range::After(seq) => (seq.saturating_add(1).max(first), head),
            Range::Before(seq) => (first, seq.saturating_sub(1).min(head)),
        };
        let mut messages = Vec::new();
        if from <= to && limit > 0 {
            let keys = self.messages.range(message_key(conv, from)..=message_key(conv, to));
            let mut take = |item: fjall::Guard| -> Result<(), StoreError> {
                let (key, value) = item.into_inner().map_err(engine)?;
                let seq = u64_at(&key, key.len().saturating_sub(8), "a message key is too short")?;
                messages.push(record::decode(seq, &value)?);
                Ok(())
            };
            match range {
                Range::After(_) => keys.take(limit).try_for_each(&mut take)?,
                Range::Before(_) => {
                    keys.rev().take(limit).try_for_each(&mut take)?;
                    messages.reverse();
                }
            }
        }
        Ok(Page { messages, head, first })
    }

    fn conversations(&mut self, user: &str, max: usize) -> Result<Vec<(ConvId, u64)>, StoreError> {
        self.settle_all()?;
        let mut prefix = user.as_bytes().to_vec();
        prefix.push(0);
        let mut recent: Vec<(u64, ConvId)> = Vec::new();
        for item in self.user_convs.prefix(&prefix) {
            let (key, value) = item.into_inner().map_err(engine)?;
            let conv = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(ConvId::from_stored)
                .ok_or(StoreError::Corrupt("a user's conversation key names no conversation"))?;
            recent.push((u64_at(&value, 0, "a user's conversation time is not 8 bytes")?, conv));
        }
        recent.sort_unstable_by(|a, b| b.cmp(a));
        recent.truncate(max);
        recent
            .into_iter()
            .map(|(_, conv)| self.head(&conv).map(|head| (conv, head)))
            .collect()
    }

    fn note_member(&mut self, user: &str, conv: &ConvId, ts_ms: u64) -> Result<(), StoreError> {
        // Not synced on its own: it is an index, and the next append's sync carries it.
        let mut writes = Writes::default();
        writes.put(USER_CONVS, &user_conv_key(user, conv), &ts_ms.to_be_bytes());
        self.submit(writes, false).map_err(|e| engine(e.error))
    }

    fn trim_step(&mut self, now_ms: u64, budget: usize) -> Result<TrimStep, StoreError> {
        let mut step = TrimStep::default();
        // The dedupe window's periods before the two a lookup reads.
        // It reads fjall without waiting for the apply thread: what fjall lacks is newer
        // than what it holds, so a sweep that misses it only trims less this round.
        let oldest_read = self.dedupe_period(now_ms).saturating_sub(1).to_be_bytes();
        let mut writes = Writes::default();
        for item in self.client_ids.range(..oldest_read.as_slice()).take(budget) {
            writes.remove(CLIENT_IDS, &item.key().map_err(engine)?);
        }
        let cutoff_ms = match self.retention.max_age {
            d if d.is_zero() => 0,
            d => now_ms.saturating_sub(d.as_millis() as u64),
        };
        let start = self.sweep_cursor.take().unwrap_or_default();
        let mut looked = 0;
        let mut last = None;
        let mut floors = Vec::new();
        for item in self.heads.range(start.as_bytes()..) {
            if looked == budget {
                break;
            }
            looked += 1;
            let (key, value) = item.into_inner().map_err(engine)?;
            let conv = std::str::from_utf8(&key)
                .ok()
                .and_then(ConvId::from_stored)
                .ok_or(StoreError::Corrupt("a conversation head names no conversation"))?;
            let head = u64_at(&value, 0, "a conversation head is not 8 bytes")?;
            let floor = self.floor(&conv)?;
            let max = self.retention.max_messages;
            let mut new_floor = if max > 0 {
                floor.max(head.saturating_sub(max) + 1)
            } else {
                floor
            };
            if cutoff_ms > 0 {
                new_floor = self.first_young(&conv, new_floor, head, cutoff_ms)?;
            }
            if new_floor > floor {
                Self::trim_below(&mut writes, &conv, floor, new_floor);
                writes.put(FLOORS, conv.as_str().as_bytes(), &new_floor.to_be_bytes());
                step.removed += new_floor - floor;
                floors.push((conv.clone(), new_floor));
            }
            last = Some(conv);
        }
        match (looked == budget, last) {
            // More may follow: go on after the last one looked at.
            (true, Some(conv)) => self.sweep_cursor = Some(format!("{}\0", conv.as_str())),
            _ => step.swept_all = true,
        }
        if !writes.is_empty() {
            self.submit(writes, false).map_err(|e| engine(e.error))?;
            for (conv, floor) in floors {
                self.remember_floor(conv, floor);
            }
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const NOW: u64 = 1_700_000_000_000;
    const KEEP_ALL: Retention = Retention {
        max_age: Duration::ZERO,
        max_messages: 0,
    };

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("shardgate-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn open(dir: &Path, retention: Retention) -> EmbeddedStore {
        EmbeddedStore::open(dir, retention, Duration::from_secs(300)).unwrap()
    }

    fn msg(conv: &ConvId, from: &str, n: u64) -> NewMessage {
        NewMessage {
            conv: conv.clone(),
            from: from.into(),
            client_id: Some(format!("c-{n}")),
            ts_ms: NOW + n,
            body: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    fn seqs(results: Vec<Appended>) -> Vec<u64> {
        results
            .into_iter()
            .map(|a| match a {
                Appended::New(seq) => seq,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_restart_continues_every_conversation_where_it_was() {
        let dir = temp("restart");
        let dm = ConvId::direct("bob", "alice");
        let room = ConvId::room("lobby");
        {
            let mut store = open(&dir, KEEP_ALL);
            let group = [msg(&dm, "alice", 1), msg(&room, "bob", 2), msg(&dm, "bob", 3)];
            assert_eq!(seqs(store.append(&group, NOW).unwrap()), vec![1, 1, 2]);
        }
        let mut store = open(&dir, KEEP_ALL);
        assert_eq!(seqs(store.append(&[msg(&dm, "alice", 4)], NOW).unwrap()), vec![3]);
        let page = store.read(&dm, Range::After(0), 10).unwrap();
        assert_eq!((page.head, page.first), (3, 1));
        let seen: Vec<(u64, &str)> = page.messages.iter().map(|m| (m.seq, m.from.as_str())).collect();
        assert_eq!(seen, vec![(1, "alice"), (2, "bob"), (3, "alice")]);
        assert_eq!(page.messages[1].body, b"{\"n\":3}");
        let back = store.read(&dm, Range::Before(3), 1).unwrap();
        assert_eq!(back.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);
        assert!(store.read(&room, Range::After(1), 10).unwrap().messages.is_empty());
        // Both parties of a direct conversation, and a room's sender, have it listed.
        let convs = store.conversations("alice", 10).unwrap();
        assert_eq!(convs, vec![(dm.clone(), 3)]);
        let convs = store.conversations("bob", 10).unwrap();
        assert_eq!(convs, vec![(dm.clone(), 3), (room.clone(), 1)]);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ready_lists_conversations_by_their_last_minute_of_activity() {
        let dir = temp("recent");
        let with_bob = ConvId::direct("alice", "bob");
        let with_carol = ConvId::direct("alice", "carol");
        let mut store = open(&dir, KEEP_ALL);
        let order = |store: &mut EmbeddedStore| -> Vec<ConvId> {
            store
                .conversations("alice", 10)
                .unwrap()
                .into_iter()
                .map(|(c, _)| c)
                .collect()
        };
        store.append(&[msg(&with_bob, "alice", 0)], NOW).unwrap();
        store.append(&[msg(&with_carol, "alice", 1_000)], NOW).unwrap();
        assert_eq!(order(&mut store), vec![with_carol.clone(), with_bob.clone()]);
        // Within a minute of its last index write a conversation keeps its place (the
        // index is not rewritten per message) ...
        store.append(&[msg(&with_bob, "alice", 2_000)], NOW).unwrap();
        assert_eq!(order(&mut store), vec![with_carol.clone(), with_bob.clone()]);
        // ... and moves up once that minute has passed.
        store.append(&[msg(&with_bob, "alice", 61_000)], NOW).unwrap();
        assert_eq!(order(&mut store), vec![with_bob.clone(), with_carol.clone()]);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_retry_within_the_window_is_not_stored_twice_even_after_a_restart() {
        let dir = temp("dedupe");
        let dm = ConvId::direct("alice", "bob");
        {
            let mut store = open(&dir, KEEP_ALL);
            let first = msg(&dm, "alice", 1);
            let results = store.append(&[first.clone(), first.clone()], NOW).unwrap();
            assert_eq!(
                results,
                vec![
                    Appended::New(1),
                    Appended::Duplicate {
                        conv: dm.clone(),
                        seq: 1
                    }
                ]
            );
        }
        let mut store = open(&dir, KEEP_ALL);
        let retry = msg(&dm, "alice", 1);
        let other_sender = NewMessage {
            from: "bob".into(),
            ..retry.clone()
        };
        let results = store.append(&[retry.clone(), other_sender], NOW + 1000).unwrap();
        assert_eq!(
            results,
            vec![
                Appended::Duplicate {
                    conv: dm.clone(),
                    seq: 1
                },
                Appended::New(2)
            ]
        );
        // Still within the window, though in the window's next period.
        assert_eq!(
            store.append(std::slice::from_ref(&retry), NOW + 299_000).unwrap(),
            vec![Appended::Duplicate {
                conv: dm.clone(),
                seq: 1
            }]
        );
        // Past the window, the same id is a new message.
        let later = NOW + 301_000;
        assert_eq!(store.append(&[retry], later).unwrap(), vec![Appended::New(3)]);
        // Records stay while a lookup may read their period (this one and the one before),
        // and are trimmed from disk after.
        assert!(store.trim_step(later, 100).unwrap().swept_all);
        store.settle_all().unwrap();
        assert_eq!(store.client_ids.iter().count(), 3);
        assert!(store.trim_step(later + 300_000, 100).unwrap().swept_all);
        store.settle_all().unwrap();
        assert_eq!(
            store.client_ids.iter().count(),
            1,
            "the first window's ids are trimmed, alice's new use is kept"
        );
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn retention_trims_by_count_as_it_goes_and_by_age_in_sweeps() {
        let dir = temp("retention");
        let dm = ConvId::direct("alice", "bob");
        let room = ConvId::room("lobby");
        let mut store = open(
            &dir,
            Retention {
                max_age: Duration::from_secs(60),
                max_messages: 3,
            },
        );
        let group: Vec<NewMessage> = (1..=5).map(|n| msg(&dm, "alice", n)).collect();
        store.append(&group, NOW).unwrap();
        let page = store.read(&dm, Range::After(0), 10).unwrap();
        assert_eq!((page.first, page.head), (3, 5));
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        // Two old room messages, one young: a sweep a minute later keeps the young one.
        let mut old = msg(&room, "bob", 10);
        old.ts_ms = NOW - 120_000;
        let mut young = msg(&room, "bob", 11);
        young.ts_ms = NOW + 30_000;
        store.append(&[old.clone(), old, young], NOW).unwrap();
        // A sweep reads what fjall holds, without waiting for the apply thread (it trims
        // what it missed at the next round).
        store.settle_all().unwrap();
        let mut removed = 0;
        loop {
            let step = store.trim_step(NOW + 40_000, 1).unwrap();
            removed += step.removed;
            if step.swept_all {
                break;
            }
        }
        // The second old one had the same client id: a retry, never stored.
        assert_eq!(removed, 1);
        let page = store.read(&room, Range::After(0), 10).unwrap();
        assert_eq!((page.first, page.head), (2, 2));
        drop(store);
        let mut store = open(
            &dir,
            Retention {
                max_age: Duration::ZERO,
                max_messages: 3,
            },
        );
        assert_eq!(
            store.read(&room, Range::After(0), 10).unwrap().first,
            2,
            "floors are kept"
        );
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn what_a_crash_left_in_the_log_is_replayed_and_a_cut_record_skipped() {
        let dir = temp("replay");
        let dm = ConvId::direct("alice", "bob");
        {
            let mut store = open(&dir, KEEP_ALL);
            assert_eq!(seqs(store.append(&[msg(&dm, "alice", 1)], NOW).unwrap()), vec![1]);
        }
        // What a crash leaves: a synced group fjall never took (seq 2), then a record the
        // process was writing when it died.
        let mut record = Vec::new();
        record::encode(&mut record, NOW, "bob", None, b"{}");
        let mut writes = Writes::default();
        writes.put(MESSAGES, &message_key(&dm, 2), &record);
        writes.put(HEADS, dm.as_str().as_bytes(), &2u64.to_be_bytes());
        let mut log = Log::new(dir.join(LOG_DIR), 5);
        let mut retired = Vec::new();
        log.append(&mut writes, true, &mut retired).unwrap();
        drop(log);
        let segment = dir.join(LOG_DIR).join(format!("{:020}.log", 5));
        let bytes = std::fs::read(&segment).unwrap();
        let mut records = Records::new(&bytes);
        assert_eq!(records.by_ref().count(), 1);
        // A header that promises 100 bytes, and 6 of them.
        let end = (bytes.len() - records.unread()) as u64;
        let mut cut = 100u32.to_le_bytes().to_vec();
        cut.extend_from_slice(&[7; 10]);
        let file = std::fs::OpenOptions::new().write(true).open(&segment).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &cut, end).unwrap();
        drop(file);
        let mut store = open(&dir, KEEP_ALL);
        assert!(
            log::segments(&dir.join(LOG_DIR)).unwrap().is_empty(),
            "replayed and removed"
        );
        let page = store.read(&dm, Range::After(0), 10).unwrap();
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(page.messages[1].from, "bob");
        assert_eq!(seqs(store.append(&[msg(&dm, "alice", 3)], NOW).unwrap()), vec![3]);
        // The next segment comes after the replayed one.
        let written: Vec<u64> = log::segments(&dir.join(LOG_DIR))
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(written, vec![6]);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_foreign_directory_is_refused() {
        let dir = temp("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = EmbeddedStore::open(&dir, KEEP_ALL, Duration::ZERO).err().unwrap();
        assert!(matches!(e, OpenError::Foreign(_)), "{e}");
        assert!(e.to_string().contains(dir.to_str().unwrap()));
        std::fs::write(dir.join(MARKER), "something else\n").unwrap();
        let e = EmbeddedStore::open(&dir, KEEP_ALL, Duration::ZERO).err().unwrap();
        assert!(matches!(e, OpenError::OtherFormat { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Against a model: each conversation's messages get 1, 2, 3, … in append order,
        /// and any page (either direction) reads back exactly the model's slice.
        #[test]
        fn seqs_and_pages_match_a_model(groups in proptest::collection::vec(
                proptest::collection::vec((0usize..4, 0usize..3), 1..20), 1..12),
            reads in proptest::collection::vec((0usize..4, 0u64..30, 1usize..10, any::<bool>()), 1..10)) {
            let convs = [ConvId::direct("a", "b"), ConvId::direct("b", "c"), ConvId::room("r1"), ConvId::room("r2")];
            let users = ["a", "b", "c"];
            let dir = temp("model");
            let mut store = open(&dir, KEEP_ALL);
            let mut model: BTreeMap<usize, Vec<(u64, String)>> = BTreeMap::new();
            let mut n = 0;
            for group in groups {
                let messages: Vec<NewMessage> = group.iter().map(|&(c, u)| { n += 1; msg(&convs[c], users[u], n) }).collect();
                let results = store.append(&messages, NOW).unwrap();
                for ((c, u), result) in group.iter().zip(results) {
                    let entry = model.entry(*c).or_default();
                    prop_assert_eq!(result, Appended::New(entry.len() as u64 + 1));
                    entry.push((entry.len() as u64 + 1, users[*u].to_string()));
                }
            }
            for (c, at, limit, after) in reads {
                let range = if after { Range::After(at) } else { Range::Before(at) };
                let page = store.read(&convs[c], range, limit).unwrap();
                let all = model.get(&c).cloned().unwrap_or_default();
                let want: Vec<(u64, String)> = if after {
                    all.iter().filter(|(s, _)| *s > at).take(limit).cloned().collect()
                } else {
                    let older: Vec<_> = all.iter().filter(|(s, _)| *s < at).cloned().collect();
                    older[older.len().saturating_sub(limit)..].to_vec()
                };
                let got: Vec<(u64, String)> = page.messages.iter().map(|m| (m.seq, m.from.clone())).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(page.head, all.len() as u64);
            }
            drop(store);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
