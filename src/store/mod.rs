//! The message store of durable conversations: every message of a conversation gets the
//! conversation's next sequence number, and a group of appends is made durable (one
//! sync) before any of it may be acknowledged `stored`. One store thread owns it, never
//! a shard; the interface is small so that a shared backend can stand behind it too.
//!
//! - `conv`: conversation ids (`dm:<a>:<b>`, `room:<name>`).
//! - `record`: the bytes of one stored message.
//! - `embedded`: the store in the data directory, on fjall (docs/perf/17 says why).
//! - `log`: the embedded store's write-ahead log, whose sync is the acknowledgement's.
//! - `redis`: the store on Redis, shared by gateways.
//! - `thread`: the store thread: group commit, sequencing, delivery to the shards.
//! - `sequencer`: one order per conversation when messages arrive from several nodes.
//! - `push`: the push webhook for users with no connection.

pub mod conv;
pub mod embedded;
pub mod log;
pub mod push;
pub mod record;
pub mod redis;
pub mod sequencer;
pub mod thread;

use std::collections::HashMap;
use std::time::Duration;

pub use conv::ConvId;

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub conv: ConvId,
    pub from: String,
    /// The sender's own id for the message, when it gave one (for idempotent retries).
    pub client_id: Option<String>,
    /// When the gateway read it, Unix milliseconds.
    pub ts_ms: u64,
    /// The message body: JSON, as the sender wrote it.
    pub body: Vec<u8>,
}

/// What became of one message of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this seq of its conversation.
    New(u64),
    /// The sender stored a message with the same client id within the window: this is a
    /// retry, stored before at `conv`/`seq`, and not stored again.
    Duplicate { conv: ConvId, seq: u64 },
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub from: String,
    pub client_id: Option<String>,
    pub ts_ms: u64,
    pub body: Vec<u8>,
}

/// Which part of a conversation to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The oldest messages after this seq (exclusive): catching up.
    After(u64),
    /// The newest messages before this seq (exclusive): scrolling back.
    Before(u64),
}

/// Part of a conversation, in `seq` order, and where the conversation stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub messages: Vec<Stored>,
    /// The conversation's latest `seq` (0: nothing stored yet).
    pub head: u64,
    /// The first `seq` still held (retention trims older ones); `head + 1` when none is.
    pub first: u64,
}

/// How long messages are kept. Zero is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_messages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the message store failed: {0}")]
    Engine(String),
    /// What is on disk is not what this build writes: a foreign or damaged directory.
    #[error("the message store holds a record this build cannot read: {0}")]
    Corrupt(&'static str),
}

/// What the store thread does with its engine.
pub trait MessageStore {
    /// Appends `group` in order, each new message at its conversation's next `seq`, and
    /// makes all of it durable. A message whose sender used its client id within the
    /// dedupe window is a retry and is answered with the original position instead. On an
    /// error none of it may be acknowledged `stored`: it may or may not be on disk (a sync
    /// that failed after the write), but no seq it took is ever given to another message.
    fn append(&mut self, group: &[NewMessage], now_ms: u64) -> Result<Vec<Appended>, StoreError>;

    /// As `append`, with, for each message, how long after the message before it in its
    /// conversation it was stored, by the one clock of a store that several gateways share
    /// (`None`: no message shortly before it, or the store cannot say). A cluster's node
    /// holds a message back only while the one before it may still be on its way
    /// (`sequencer`).
    fn append_timed(
        &mut self,
        group: &[NewMessage],
        now_ms: u64,
    ) -> Result<Vec<(Appended, Option<Duration>)>, StoreError> {
        Ok(self.append(group, now_ms)?.into_iter().map(|a| (a, None)).collect())
    }

    /// Up to `limit` messages of `conv` in `range`, in `seq` order.
    fn read(&mut self, conv: &ConvId, range: Range, limit: usize) -> Result<Page, StoreError>;

    /// The conversations `user` took part in most recently (at most `max`), newest first,
    /// each with its latest `seq`.
    fn conversations(&mut self, user: &str, max: usize) -> Result<Vec<(ConvId, u64)>, StoreError>;

    /// `user` joined the room of `conv` at `ts_ms`: it is one of their conversations.
    fn note_member(&mut self, user: &str, conv: &ConvId, ts_ms: u64) -> Result<(), StoreError>;

    /// Trims what retention no longer keeps, a slice at a time: looks at up to `budget`
    /// conversations and returns how many messages it removed, and whether it went round
    /// every conversation since the sweep began.
    fn trim_step(&mut self, now_ms: u64, budget: usize) -> Result<TrimStep, StoreError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrimStep {
    pub removed: u64,
    pub swept_all: bool,
}

/// Index writes that need not be repeated within a minute (a user's conversation time:
/// it only orders `ready`'s list). Every key written per message costs the engine, so the
/// stores skip a rewrite of one they wrote less than a minute ago. `due` collects the
/// writes of a group; they count as written once the group is `committed`.
#[derive(Debug, Default)]
pub struct RecentWrites {
    written: HashMap<Vec<u8>, u64>,
    pending: Vec<(Vec<u8>, u64)>,
}

impl RecentWrites {
    /// How stale an index time may be.
    pub const REFRESH_MS: u64 = 60_000;
    /// Forgotten past this many keys (a forgotten key is only written again).
    const MAX_KEYS: usize = 1 << 20;

    /// Whether `key` is to be written for an event at `ts_ms`; if so it joins the group.
    pub fn due(&mut self, key: Vec<u8>, ts_ms: u64) -> bool {
        let fresh = |at: u64| at.saturating_add(Self::REFRESH_MS) > ts_ms;
        if self.written.get(&key).is_some_and(|&at| fresh(at))
            || self.pending.iter().any(|(k, at)| *k == key && fresh(*at))
        {
            return false;
        }
        self.pending.push((key, ts_ms));
        true
    }

    /// The group's writes are done.
    pub fn committed(&mut self) {
        if self.written.len() + self.pending.len() > Self::MAX_KEYS {
            self.written.clear();
        }
        self.written.extend(self.pending.drain(..));
    }

    /// The group's writes failed (or a new group begins): none of them counts.
    pub fn discard(&mut self) {
        self.pending.clear();
    }
}
