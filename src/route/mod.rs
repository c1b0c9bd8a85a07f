//! Routing between shards: the messages shards send each other, the inboxes they arrive
//! in, and the directory each shard keeps of who is where.
//!
//! - `inbox`: one crossbeam channel per shard plus a doorbell that wakes it.
//! - `directory`: the sans-IO router: replicas of user and room placement, the home-shard
//!   protocol that keeps them consistent, and barriers for acknowledged membership changes.

pub mod directory;
pub mod inbox;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

/// Shards in one process, as bits of a `u64`.
pub type ShardMask = u64;
/// The most shards one process may run (one bit each in a `ShardMask`).
pub const MAX_SHARDS: usize = 64;
/// A connection, unique within its shard for the life of the process.
pub type ConnId = u64;

/// Where the answer to a cross-node send goes: a connection of a shard, and the
/// client's `id` for its ack.
#[derive(Debug, Clone)]
pub struct AckTo {
    pub shard: usize,
    pub conn: ConnId,
    pub id: Option<Box<str>>,
}

/// How a cross-node send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A node holding the recipient took it.
    Routed,
    /// No node holds a connection of the recipient.
    Offline,
    /// NATS is unreachable, or a node did not answer in time: it may not have arrived.
    Unavailable,
    /// The nodes holding the recipient could not take it now (overloaded shards, or
    /// shutting down): it did not arrive; retry.
    Refused,
}

/// A shard began or stopped holding connections of a user, or of a room's members: what
/// the process-wide threads (cluster, store) keep of where everyone is.
#[derive(Debug, Clone)]
pub enum Placement {
    User {
        user: Arc<str>,
        shard: usize,
        present: bool,
    },
    Room {
        room: Arc<str>,
        shard: usize,
        present: bool,
    },
}

/// Who receives a stored message: both users of a direct conversation (the recipient,
/// and the sender's other devices), or a room's members.
#[derive(Debug, Clone)]
pub enum Audience {
    Users(Arc<str>, Arc<str>),
    Room(Arc<str>),
}

/// What one shard sends another.
#[derive(Debug, Clone)]
pub enum ShardMsg {
    /// Deliver `frame` (an encoded WebSocket frame) to every local connection of `to`.
    Direct {
        to: Arc<str>,
        frame: Bytes,
        ingress: Instant,
        /// It came from another node (counted and recorded apart).
        cross_node: bool,
    },
    /// Deliver `frame` to every local connection of every member of `room`, except the
    /// sending connection `(shard, conn)`.
    Room {
        room: Arc<str>,
        frame: Bytes,
        ingress: Instant,
        except: (usize, ConnId),
        cross_node: bool,
    },
    /// From the store thread: a stored message for the local connections of `audience`,
    /// except the one that sent it `(shard, conn)`. Each shard receives a conversation's
    /// messages from that one thread, in `seq` order.
    Stored {
        audience: Audience,
        frame: Bytes,
        ingress: Instant,
        except: (usize, ConnId),
        /// Another node stored it (counted and recorded apart).
        cross_node: bool,
    },
    /// From the store thread: a frame for one connection (an ack, a history page, or,
    /// `ready`, the connection's `ready`).
    Reply {
        conn: ConnId,
        frame: Bytes,
        ready: bool,
    },
    /// From the cluster thread, to every shard: `user`, connected to this node, also is (or
    /// no longer is) connected to other nodes.
    AlsoRemote {
        user: Arc<str>,
        remote: bool,
    },
    /// From the cluster thread: how a cross-node send of connection `conn` ended.
    ClusterAck {
        conn: ConnId,
        id: Option<Box<str>>,
        outcome: Outcome,
    },
    /// To a user's home: shard `shard` now holds connections of `user` (or no longer does).
    Attach {
        user: Arc<str>,
        shard: usize,
    },
    Detach {
        user: Arc<str>,
        shard: usize,
    },
    /// To a user's home: answer `Done` to `ticket.shard` (after everything sent before it).
    Sync {
        ticket: Ticket,
    },
    /// To a user's home: add or remove a room; answer `Done` to `ticket.shard`.
    Membership {
        user: Arc<str>,
        room: Arc<str>,
        join: bool,
        ticket: Ticket,
    },
    /// From a user's home to every shard: where the user is connected and its rooms.
    UserState {
        user: Arc<str>,
        mask: ShardMask,
        rooms: Arc<[Arc<str>]>,
    },
    /// From shard `shard` to every shard: whether it holds connections of members of `room`.
    RoomShard {
        room: Arc<str>,
        shard: usize,
        present: bool,
    },
    /// From a home: the membership change of `ticket` is recorded and broadcast, or
    /// (`refused`) was not made: the user is in as many rooms as allowed.
    Done {
        ticket: Ticket,
        refused: bool,
    },
    /// Barrier round `round` of `ticket`: answer `BarrierAck` to `ticket.shard`.
    Barrier {
        ticket: Ticket,
        round: u8,
    },
    BarrierAck {
        ticket: Ticket,
        round: u8,
    },
}

/// Names one pending operation of one connection, so its answer finds its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub shard: usize,
    pub seq: u64,
}

/// The shards set in `mask`, lowest first. Walks the set bits only: an empty mask (the
/// common case, checked after every read) costs one comparison.
pub fn shards_in(mut mask: ShardMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let shard = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(shard)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_in_lists_the_set_bits_in_order() {
        assert_eq!(shards_in(0).count(), 0);
        assert_eq!(shards_in(0b1).collect::<Vec<_>>(), [0]);
        assert_eq!(shards_in(0b1010_0110).collect::<Vec<_>>(), [1, 2, 5, 7]);
        assert_eq!(shards_in(1 << (MAX_SHARDS - 1)).collect::<Vec<_>>(), [MAX_SHARDS - 1]);
        assert_eq!(shards_in(ShardMask::MAX).count(), MAX_SHARDS);
    }
}
