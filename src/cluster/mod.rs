//! Many gateways as one, through NATS (`--nats URL`).
//!
//! The NATS client runs on a thread of its own (async-nats on a current-thread tokio
//! runtime), never inside a shard. Shards hand it work through a crossbeam channel and a
//! doorbell, exactly as they hand each other work; it hands deliveries back through the
//! shards' own inboxes.
//!
//! - `wire`: the bytes nodes exchange (batches, receipts, heartbeats).
//! - `directory`: which nodes hold which users and rooms, sharded by home node (sans IO).
//! - `node`: the thread: subjects, batching, receipts, reconnects.
//! - `access`: the cluster key and the credentials this node gives NATS.
//! - `inbound`: a batch from another node handed to the shards, and its receipt.

pub mod access;
pub mod directory;
pub mod inbound;
pub mod node;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;

use crate::mailbox::Mailbox;
use crate::route::{AckTo, Placement};
use crate::store::push::PushEvent;
use crate::store::ConvId;

/// Messages waiting for the cluster thread beyond which shards refuse cross-node sends
/// (answered `rate_limited`), so a stalled NATS link cannot grow memory without bound.
pub const CLUSTER_QUEUE_LIMIT: usize = 1 << 20;

/// What a shard sends the cluster thread.
#[derive(Debug)]
pub enum ToCluster {
    /// Deliver to `to`'s connections on other nodes. With `ack`, the cluster thread
    /// answers the sender (the user had no connection on this node).
    Direct {
        to: Arc<str>,
        frame: Bytes,
        ingress: Instant,
        ack: Option<AckTo>,
    },
    /// Deliver to `room`'s members on other nodes, then answer `ack`.
    Publish {
        room: Arc<str>,
        frame: Bytes,
        ingress: Instant,
        ack: AckTo,
    },
    /// From the store thread: a stored message, for its conversation's audience on other
    /// nodes (no ack: the sender was acked `stored`). With `push`, the recipient has no
    /// connection on this node: the push goes out unless another node holds one.
    Stored {
        conv: ConvId,
        seq: u64,
        /// How long after the message before it the store stored it.
        after_previous: Option<Duration>,
        frame: Bytes,
        ingress: Instant,
        push: Option<PushEvent>,
    },
    /// A shard's holding of users and rooms changed.
    Placement(Placement),
}

/// The shards' side of the cluster thread: its mailbox, and whether NATS is up.
pub struct ClusterLink {
    mailbox: Arc<Mailbox<ToCluster>>,
    up: AtomicBool,
}

impl ClusterLink {
    pub fn new() -> (Arc<ClusterLink>, Receiver<ToCluster>) {
        let (mailbox, rx) = Mailbox::new();
        (
            Arc::new(ClusterLink {
                mailbox,
                up: AtomicBool::new(false),
            }),
            rx,
        )
    }

    /// Queues `msg` without waking the cluster thread (ring once per round).
    pub fn push(&self, msg: ToCluster) {
        self.mailbox.push(msg);
    }

    pub fn ring(&self) {
        self.mailbox.ring();
    }

    /// Is the NATS connection up (as last reported by the cluster thread)?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    /// Tells the cluster thread to finish (every shard has stopped).
    pub fn close(&self) {
        self.mailbox.close();
    }

    /// Would one more message exceed the queue limit?
    pub fn is_full(&self) -> bool {
        self.mailbox.len() >= CLUSTER_QUEUE_LIMIT
    }

    /// Waits for work, then moves up to `max` messages into `batch`. False once closed
    /// and drained.
    pub async fn next_batch(&self, rx: &Receiver<ToCluster>, batch: &mut Vec<ToCluster>, max: usize) -> bool {
        self.mailbox.next_batch(rx, batch, max).await
    }
}

/// Now as Unix nanoseconds (the clock that travels between nodes).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The wall-clock time of a monotonic `instant` in the past.
pub fn instant_to_unix_nanos(instant: Instant, now: Instant, now_ns: u64) -> u64 {
    now_ns.saturating_sub(now.saturating_duration_since(instant).as_nanos() as u64)
}

/// The monotonic instant of a wall-clock time in the past (clamped to now: clocks of
/// different hosts may disagree by a little).
pub fn unix_nanos_to_instant(ns: u64, now: Instant, now_ns: u64) -> Instant {
    let ago = std::time::Duration::from_nanos(now_ns.saturating_sub(ns));
    now.checked_sub(ago).unwrap_or(now)
}
