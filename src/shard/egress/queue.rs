//! A connection's outgoing queue: frames waiting for its socket.
//!
//! Frames are shared (`Bytes`): a room message encoded once sits in the queues of all its
//! recipients. Whoever queues (the connection's own task, another connection on the shard,
//! the inbox pump) marks the queue dirty; the shard flushes dirty queues with one
//! `sendmsg` each after a batch. What the socket does not take stays queued, and the
//! connection's task writes it when the socket is writable. The queue is bounded in bytes:
//! past the bound the connection is a slow consumer and is closed with 1008.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use super::TlsConns;
use crate::chat::output::ConnOutput;
use crate::metrics::LatencyRecorder;
use crate::route::ConnId;
use crate::shard::budget::MemoryBudget;
use crate::sys::socket::{IoBatch, Push, IOV_BATCH};
use crate::ws::deflate::{Agreed, ConnDeflate};

struct Queued {
    frame: Bytes,
    /// When the message entered the gateway (routed messages only): recorded on egress.
    ingress: Option<Instant>,
    /// It came from another node.
    cross_node: bool,
    /// These bytes may start inside a frame whose beginning is already on the wire.
    continues: bool,
}

pub struct Outbound {
    pub id: ConnId,
    /// The connection's place in its shard (to wake its task).
    pub slot: usize,
    fd: RawFd,
    limit: usize,
    queue: RefCell<VecDeque<Queued>>,
    /// Bytes of the front frame already sent.
    front_sent: Cell<usize>,
    bytes: Cell<usize>,
    /// The connection's task is writing the front frame: nobody else may send now.
    writing: Cell<bool>,
    dirty: Cell<bool>,
    overflowed: Cell<bool>,
    /// Our Close is queued or sent: no data frame may follow it (RFC 6455 §5.5.1).
    sealed: Cell<bool>,
    /// Bytes for the socket wait in the shard's send batch (see `send_batch`): anything
    /// sent directly must wait until they are out.
    batched: Cell<bool>,
    /// The shard's budget, which counts what this queue holds.
    budget: Option<Rc<MemoryBudget>>,
    /// permessage-deflate, if the peer agreed to it.
    deflate: Option<Box<ConnDeflate>>,
}

impl Outbound {
    pub fn new(id: ConnId, slot: usize, fd: RawFd, limit: usize) -> Self {
        Outbound {
            id,
            slot,
            fd,
            limit,
            queue: RefCell::new(VecDeque::new()),
            front_sent: Cell::new(0),
            bytes: Cell::new(0),
            writing: Cell::new(false),
            dirty: Cell::new(false),
            overflowed: Cell::new(false),
            sealed: Cell::new(false),
            batched: Cell::new(false),
            budget: None,
            deflate: None,
        }
    }

    /// What the peer agreed to of permessage-deflate, if anything; `level` is the zlib
    /// level of a deflater of the connection's own (context takeover).
    pub fn with_deflate(mut self, agreed: Option<Agreed>, level: u32) -> Self {
        self.deflate = agreed.map(|a| Box::new(ConnDeflate::new(a, level)));
        self
    }

    /// Counts what the queue holds in the shard's memory budget.
    pub fn counted_in(mut self, budget: Rc<MemoryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Sets the queued byte count, keeping the budget's sum in step.
    fn set_bytes(&self, bytes: usize) {
        let before = self.bytes.replace(bytes);
        if let Some(b) = &self.budget {
            if bytes >= before {
                b.queued(bytes - before);
            } else {
                b.dequeued(before - bytes);
            }
        }
    }

    /// Queues a frame. Returns true when the queue just became dirty (the caller should
    /// put it on the shard's flush list).
    pub fn push(&self, frame: Bytes, ingress: Option<Instant>) -> bool {
        self.enqueue(frame, ingress, false, false)
    }

    /// Queues what a direct send left unsent: it may start mid-frame, so it is never dropped.
    pub fn push_unsent(&self, rest: Bytes) -> bool {
        self.enqueue(rest, None, false, true)
    }

    fn enqueue(&self, frame: Bytes, ingress: Option<Instant>, cross_node: bool, continues: bool) -> bool {
        if self.overflowed.get() || self.sealed.get() {
            return false;
        }
        let bytes = self.bytes.get() + frame.len();
        if bytes > self.limit {
            // The connection is closed for being too slow: drop what is queued, except the
            // rest of a frame already partly on the wire (the Close must not cut into it).
            self.overflowed.set(true);
            let mut queue = self.queue.borrow_mut();
            if self.front_sent.get() > 0 || queue.front().is_some_and(|q| q.continues) {
                queue.truncate(1);
                self.set_bytes(queue.front().map_or(0, |q| q.frame.len() - self.front_sent.get()));
            } else {
                queue.clear();
                self.set_bytes(0);
            }
            return !self.dirty.replace(true);
        }
        self.set_bytes(bytes);
        self.queue.borrow_mut().push_back(Queued {
            frame,
            ingress,
            cross_node,
            continues,
        });
        !self.dirty.replace(true)
    }

    /// Refuses every frame from now on: the connection's Close has been queued.
    pub fn seal(&self) {
        self.sealed.set(true);
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn is_batched(&self) -> bool {
        self.batched.get()
    }

    pub fn set_batched(&self, batched: bool) {
        self.batched.set(batched);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed.get()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Is there work only the connection's task can do (write into a full socket, or
    /// close a slow consumer)?
    pub fn needs_task(&self) -> bool {
        self.overflowed.get() || (!self.writing.get() && !self.queue.borrow().is_empty())
    }

    /// Sends as much as the socket takes now, without waiting. Records the latency of
    /// routed frames that left completely. Returns true if frames remain (the task must
    /// wait for the socket).
    pub fn flush_now(&self, latency: &mut LatencyRecorder, tls: &TlsConns) -> io::Result<bool> {
        self.dirty.set(false);
        if self.writing.get() || self.overflowed.get() {
            return Ok(!self.is_empty());
        }
        let mut queue = self.queue.borrow_mut();
        while !queue.is_empty() {
            let mut iov = IoBatch::new();
            for (i, q) in queue.iter().take(IOV_BATCH).enumerate() {
                iov.push(&q.frame[if i == 0 { self.front_sent.get() } else { 0 }..]);
            }
            let batch_len = iov.bytes();
            let sent = tls.send(self.fd, &iov, Push::Now)?;
            self.advance(&mut queue, sent, latency);
            if sent < batch_len {
                break;
            }
        }
        Ok(!queue.is_empty())
    }

    /// Drops `sent` bytes from the front of the queue.
    fn advance(&self, queue: &mut VecDeque<Queued>, mut sent: usize, latency: &mut LatencyRecorder) {
        self.set_bytes(self.bytes.get() - sent);
        let mut now = None;
        // Every frame that is wholly sent leaves, an empty one even when nothing was: a
        // flush (or a write) that sent nothing can then never find the same front again
        // and spin on it.
        while let Some(front) = queue.front() {
            let left = front.frame.len() - self.front_sent.get();
            if sent < left {
                self.front_sent.set(self.front_sent.get() + sent);
                return;
            }
            sent -= left;
            self.front_sent.set(0);
            if let Some(ingress) = front.ingress {
                latency.record(ingress, *now.get_or_insert_with(Instant::now), front.cross_node);
            }
            queue.pop_front();
        }
    }

    /// The front frame's unsent bytes, for the task to write while it owns the socket.
    /// `None` when the queue is empty.
    pub fn begin_write(&self) -> Option<Bytes> {
        let queue = self.queue.borrow();
        let front = queue.front()?;
        self.writing.set(true);
        Some(front.frame.slice(self.front_sent.get()..))
    }

    /// The task wrote `n` bytes of what `begin_write` gave it.
    pub fn end_write(&self, n: usize, latency: &mut LatencyRecorder) {
        self.writing.set(false);
        let mut queue = self.queue.borrow_mut();
        self.advance(&mut queue, n, latency);
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.set_bytes(0);
    }
}

impl ConnOutput for Outbound {
    fn conn_id(&self) -> ConnId {
        self.id
    }

    fn deliver(&self, frame: Bytes, ingress: Instant, cross_node: bool) -> bool {
        self.enqueue(frame, Some(ingress), cross_node, false)
    }

    fn answer(&self, frame: Bytes) -> bool {
        self.enqueue(frame, None, false, false)
    }

    fn is_open(&self) -> bool {
        !self.overflowed.get() && !self.sealed.get()
    }

    fn has_room(&self, len: usize) -> bool {
        !self.overflowed.get() && !self.sealed.get() && self.bytes.get() + len <= self.limit
    }

    fn deflate(&self) -> Option<&ConnDeflate> {
        self.deflate.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn overflow_keeps_the_rest_of_a_frame_already_on_the_wire() {
        let (a, _b) = UnixStream::pair().unwrap();
        let out = Outbound::new(1, 0, a.as_raw_fd(), 100);
        // The tail of a direct send that stopped mid-frame, then routed frames.
        assert!(out.push_unsent(Bytes::from_static(b"tail-of-a-frame")));
        out.push(Bytes::from(vec![1u8; 50]), None);
        out.push(Bytes::from(vec![2u8; 50]), None);
        assert!(out.overflowed());
        let kept = out.begin_write().expect("the tail stays queued");
        assert_eq!(&kept[..], b"tail-of-a-frame");
        out.end_write(kept.len(), &mut LatencyRecorder::default());
        assert!(out.is_empty(), "whole frames were dropped");
    }

    #[test]
    fn empty_frames_cannot_make_a_flush_spin() {
        // On a thread of its own, so that a flush that spins fails the test, not hangs it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (a, mut b) = UnixStream::pair().unwrap();
            let out = Outbound::new(1, 0, a.as_raw_fd(), 1 << 20);
            let mut latency = LatencyRecorder::default();
            // Nothing but empty frames: a send of 0 bytes is no progress, yet they must go.
            for _ in 0..3 {
                out.answer(Bytes::new());
            }
            assert!(
                !out.flush_now(&mut latency, &TlsConns::default()).unwrap(),
                "the queue is empty after one flush"
            );
            // Empty frames among real ones: the real ones arrive, in order.
            out.answer(Bytes::from_static(b"one"));
            out.answer(Bytes::new());
            out.answer(Bytes::from_static(b"two"));
            assert!(!out.flush_now(&mut latency, &TlsConns::default()).unwrap());
            let mut got = [0u8; 6];
            std::io::Read::read_exact(&mut b, &mut got).unwrap();
            assert_eq!(&got, b"onetwo");
            // The task's own write path: an empty front frame is done once "written".
            out.answer(Bytes::new());
            let chunk = out.begin_write().expect("queued");
            assert!(chunk.is_empty());
            out.end_write(0, &mut latency);
            assert!(out.is_empty());
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("flushing empty frames finished (it used to spin at 100% CPU)");
    }

    #[test]
    fn overflow_drops_whole_frames_only() {
        let (a, _b) = UnixStream::pair().unwrap();
        let out = Outbound::new(1, 0, a.as_raw_fd(), 100);
        out.push(Bytes::from(vec![1u8; 60]), None);
        out.push(Bytes::from(vec![2u8; 60]), None);
        assert!(out.overflowed());
        assert!(out.is_empty());
    }
}
