//! One inbox per shard: a crossbeam channel and a doorbell (`AtomicWaker`). Senders never
//! block (the channel is unbounded, and delivery traffic checks its length against a limit
//! first); the receiving shard drains in batches and parks when empty.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::ShardMsg;

/// Delivery messages waiting in one inbox beyond which new ones are refused (the sender
/// answers `rate_limited`), so a stalled shard cannot make memory grow without bound.
pub const INBOX_DELIVERY_LIMIT: usize = 1 << 20;

/// The sending side of every shard's inbox; shared by all shards.
pub struct Mesh {
    senders: Vec<Sender<ShardMsg>>,
    doorbells: Vec<AtomicWaker>,
}

/// The receiving side of one shard's inbox.
pub struct Inbox {
    shard: usize,
    receiver: Receiver<ShardMsg>,
    mesh: Arc<Mesh>,
}

impl Mesh {
    /// Creates the mesh and one inbox per shard.
    pub fn new(shards: usize) -> (Arc<Mesh>, Vec<Receiver<ShardMsg>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| crossbeam_channel::unbounded()).unzip();
        let mesh = Arc::new(Mesh {
            senders,
            doorbells: (0..shards).map(|_| AtomicWaker::new()).collect(),
        });
        (mesh, receivers)
    }

    pub fn shards(&self) -> usize {
        self.senders.len()
    }

    /// Queues `msg` for `shard` without ringing its doorbell (ring once per batch).
    pub fn push(&self, shard: usize, msg: ShardMsg) {
        // The receiver lives as long as the process's shards; a send after one stopped is moot.
        let _ = self.senders[shard].send(msg);
    }

    /// Would a delivery to `shard` exceed the inbox limit?
    pub fn is_full(&self, shard: usize) -> bool {
        self.senders[shard].len() >= INBOX_DELIVERY_LIMIT
    }

    /// Wakes `shard` if it is parked waiting for messages. Cheap when it is awake.
    pub fn ring(&self, shard: usize) {
        self.doorbells[shard].wake();
    }
}

impl Inbox {
    pub fn new(shard: usize, receiver: Receiver<ShardMsg>, mesh: Arc<Mesh>) -> Self {
        Inbox { shard, receiver, mesh }
    }

    /// Waits until at least one message is queued, then moves up to `max` into `batch`.
    /// Returns false when every sender is gone.
    pub async fn next_batch(&self, batch: &mut Vec<ShardMsg>, max: usize) -> bool {
        poll_fn(|cx| {
            if self.drain(batch, max) {
                return Poll::Ready(true);
            }
            self.mesh.doorbells[self.shard].register(cx.waker());
            // Drained again after registering, so a message sent in between is not missed.
            if self.drain(batch, max) {
                return Poll::Ready(true);
            }
            match self.receiver.try_recv() {
                Err(TryRecvError::Disconnected) => Poll::Ready(false),
                Ok(msg) => {
                    batch.push(msg);
                    Poll::Ready(true)
                }
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }

    fn drain(&self, batch: &mut Vec<ShardMsg>, max: usize) -> bool {
        let before = batch.len();
        batch.extend(self.receiver.try_iter().take(max));
        batch.len() > before
    }
}
