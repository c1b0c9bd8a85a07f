//! What the chat application needs from a connection's outgoing path. The shard's
//! outgoing queue implements it (`shard::egress`); chat code never touches a socket.

use std::time::Instant;

use bytes::Bytes;

use crate::route::ConnId;
use crate::ws::deflate::ConnDeflate;

/// The answers to what a connection just said (acks, errors): written while its input is
/// decoded, and sent with everything else that input produced.
pub trait Reply {
    /// Appends one text frame carrying `json`.
    fn text(&mut self, json: &[u8]);
}

/// A chat connection's queue of frames for its socket.
pub trait ConnOutput {
    fn conn_id(&self) -> ConnId;

    /// Queues a message routed to this connection; `ingress` is when it entered the
    /// gateway (its latency is recorded when it leaves). Returns true when the queue just
    /// became dirty: the caller lists it for the end-of-round flush.
    fn deliver(&self, frame: Bytes, ingress: Instant, cross_node: bool) -> bool;

    /// Queues a frame of our own (an ack that came later, `ready`, `joined`). Returns as
    /// `deliver` does.
    fn answer(&self, frame: Bytes) -> bool;

    /// Would a frame of `len` bytes fit in the queue now (without making the connection
    /// a slow consumer)?
    fn has_room(&self, len: usize) -> bool;

    /// Does the queue still take frames (not closed as a slow consumer, no Close queued)?
    fn is_open(&self) -> bool;

    /// What the peer agreed to of permessage-deflate, if anything: it may be sent
    /// compressed frames. With context takeover its frames are compressed with its own
    /// deflater, in the order they are queued, and shared with no one.
    fn deflate(&self) -> Option<&ConnDeflate>;
}
