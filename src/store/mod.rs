//! The message store of durable conversations: every message of a conversation gets the
//! conversation's next sequence number, and a group of appends is made durable (one
//! sync) before any of it may be acknowledged `stored`. One store thread owns it, never
//! a shard; the interface is small so that a shared backend can stand behind it too.
//!
//! - `conv`: conversation ids (`dm:<a>:<b>`, `room:<name>`).
//! - `record`: the bytes of one stored message.
//! - `embedded`: the store in the data directory, on fjall (docs/perf/17 says why).

pub mod conv;
pub mod embedded;
pub mod record;

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

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub from: String,
    pub client_id: Option<String>,
    pub ts_ms: u64,
    pub body: Vec<u8>,
}

/// Part of a conversation, in `seq` order, and where the conversation stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub messages: Vec<Stored>,
    /// The conversation's latest `seq` (0: nothing stored yet).
    pub head: u64,
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
    /// Appends `group` in order, each message at its conversation's next `seq`, and makes
    /// all of it durable; returns the seqs. On an error none of it may be acknowledged
    /// `stored`: it may or may not be on disk (a sync that failed after the write), but
    /// no seq it took is ever given to another message.
    fn append(&mut self, group: &[NewMessage]) -> Result<Vec<u64>, StoreError>;

    /// Up to `limit` messages of `conv` after `seq` (exclusive), in order.
    fn read_after(&self, conv: &ConvId, seq: u64, limit: usize) -> Result<Page, StoreError>;
}
