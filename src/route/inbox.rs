//! One inbox per shard: a `Mailbox` that other shards (and the cluster thread) push
//! into. Senders never block (the channel is unbounded, and delivery traffic checks its
//! length against a limit first); the receiving shard drains in batches and parks when
//! empty.

use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::ShardMsg;
use crate::mailbox::Mailbox;

/// Delivery messages waiting in one inbox beyond which new ones are refused (the sender
/// answers `rate_limited`), so a stalled shard cannot make memory grow without bound.
pub const INBOX_DELIVERY_LIMIT: usize = 1 << 20;

/// The sending side of every shard's inbox; shared by all shards.
pub struct Mesh {
    inboxes: Vec<Arc<Mailbox<ShardMsg>>>,
    limit: usize,
}

/// The receiving side of one shard's inbox.
pub struct Inbox {
    mailbox: Arc<Mailbox<ShardMsg>>,
    receiver: Receiver<ShardMsg>,
}

impl Mesh {
    /// Creates the mesh and one inbox per shard.
    pub fn new(shards: usize) -> (Arc<Mesh>, Vec<Inbox>) {
        Self::with_limit(shards, INBOX_DELIVERY_LIMIT)
    }

    /// `new`, with another delivery limit per inbox (tests fill one with a few messages).
    pub fn with_limit(shards: usize, limit: usize) -> (Arc<Mesh>, Vec<Inbox>) {
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| Mailbox::new()).unzip();
        let ends = inboxes
            .iter()
            .zip(receivers)
            .map(|(mailbox, receiver)| Inbox {
                mailbox: mailbox.clone(),
                receiver,
            })
            .collect();
        (Arc::new(Mesh { inboxes, limit }), ends)
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// Queues `msg` for `shard` without ringing its doorbell (ring once per batch).
    pub fn push(&self, shard: usize, msg: ShardMsg) {
        self.inboxes[shard].push(msg);
    }

    /// Messages waiting in `shard`'s inbox.
    pub fn depth(&self, shard: usize) -> usize {
        self.inboxes[shard].len()
    }

    /// Would a delivery to `shard` exceed the inbox limit?
    pub fn is_full(&self, shard: usize) -> bool {
        self.inboxes[shard].len() >= self.limit
    }

    /// Wakes `shard` if it is parked waiting for messages. Cheap when it is awake.
    pub fn ring(&self, shard: usize) {
        self.inboxes[shard].ring();
    }
}

impl Inbox {
    /// Waits until at least one message is queued, then moves up to `max` into `batch`.
    /// Returns false when every sender is gone.
    pub async fn next_batch(&self, batch: &mut Vec<ShardMsg>, max: usize) -> bool {
        self.mailbox.next_batch(&self.receiver, batch, max).await
    }
}
