//! Echo answers of one executor pass, sent together: one `io_uring_enter` for all of
//! them (the shard ring's, which also takes the pass's input) instead of one `send` per
//! connection. Small answers are copied into the batch; a frame echoed whole stays where
//! it arrived, in the shard's receive buffers, which keep it until the flush
//! (`Egress::batch_received`).
//!
//! Why: each `send` is a system call, and on a core shared with other threads the first
//! one that wakes a peer hands it the core before the next answer is written. Submitted
//! together, every send runs inside one call (`MSG_DONTWAIT`: none waits; what a socket
//! does not take comes back as a short count), and the shard is interrupted at most once.

use std::io;
use std::rc::Rc;

use bytes::Bytes;

use super::queue::Outbound;
use crate::sys::socket::{self, Push};
use crate::sys::uring::{ShardRing, MAX_SENDS};
/// Bytes a pass may gather before it sends early.
const MAX_BYTES: usize = 256 * 1024;
/// Owned bytes kept between passes.
const RETAIN: usize = 256 * 1024;

/// What became of one send: bytes the socket took (0 when full), or the error. What the
/// socket did not take waits in the connection's queue, and its task is woken to write it
/// (a write that fails there ends the task). A broken connection is left to its own read,
/// which reports the error and ends the task.
fn settle(p: &Pending, bytes: &[u8], result: io::Result<usize>, wake: &mut Vec<usize>) {
    let sent = match result {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => return,
        Err(_) => 0,
    };
    if sent < bytes.len() {
        p.out.push_unsent(Bytes::copy_from_slice(&bytes[sent..]));
        wake.push(p.out.slot);
    }
}

/// Where an entry's bytes are.
#[derive(Clone, Copy)]
enum Place {
    /// `SendBatch::bytes[start..end]`.
    Owned { start: usize, end: usize },
    /// Memory the caller of `add_borrowed` keeps unchanged until the flush.
    Borrowed { ptr: *const u8, len: usize },
}

impl Place {
    /// The entry's bytes; `owned` is the batch's own buffer.
    fn bytes(self, owned: &[u8]) -> &[u8] {
        match self {
            Place::Owned { start, end } => &owned[start..end],
            // SAFETY: `add_borrowed`'s caller keeps the memory valid and unchanged until
            // the flush, the only reader.
            Place::Borrowed { ptr, len } => unsafe { std::slice::from_raw_parts(ptr, len) },
        }
    }
}

struct Pending {
    place: Place,
    out: Rc<Outbound>,
}

pub struct SendBatch {
    /// The ring failed for good: answers go out one `send` each (see `has_room`).
    broken: bool,
    bytes: Vec<u8>,
    pending: Vec<Pending>,
    /// Which of `pending` completed (reused).
    done: Vec<bool>,
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            broken: false,
            bytes: Vec::with_capacity(64 * 1024),
            pending: Vec::with_capacity(MAX_SENDS),
            done: Vec::with_capacity(MAX_SENDS),
        }
    }

    /// Whether `bytes` more fit in this pass's batch.
    pub fn has_room(&self, bytes: usize) -> bool {
        !self.broken && self.pending.len() < MAX_SENDS && self.bytes.len() + bytes <= MAX_BYTES
    }

    /// Queues the bytes `write` appends for `out`'s socket. The caller checked `has_room`,
    /// and that `out` has nothing waiting, here (`is_batched`) or in its own queue: a
    /// socket that takes part of an entry must not see a later one before the rest.
    pub fn add(&mut self, out: &Rc<Outbound>, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        write(&mut self.bytes);
        let end = self.bytes.len();
        self.push(out, Place::Owned { start, end });
    }

    /// Queues `bytes` for `out`'s socket without copying them, under the same conditions
    /// as `add` (and `has_room(0)`).
    ///
    /// # Safety
    /// The memory of `bytes` must stay valid and unchanged until the next `flush`.
    pub unsafe fn add_borrowed(&mut self, out: &Rc<Outbound>, bytes: &[u8]) {
        self.push(
            out,
            Place::Borrowed {
                ptr: bytes.as_ptr(),
                len: bytes.len(),
            },
        );
    }

    fn push(&mut self, out: &Rc<Outbound>, place: Place) {
        out.set_batched(true);
        self.pending.push(Pending {
            place,
            out: out.clone(),
        });
    }

    /// Sends everything gathered through `ring`. What a socket did not take goes to the
    /// front of its connection's queue; those connections' slots are pushed to `wake`, for
    /// their tasks to write the rest when the socket is writable.
    pub fn flush(&mut self, ring: &mut ShardRing, wake: &mut Vec<usize>) {
        if self.pending.is_empty() {
            return;
        }
        self.done.clear();
        self.done.resize(self.pending.len(), false);
        // Even a lone answer goes through the ring: the pass enters it anyway, for its
        // input. Any the ring did not take goes out with a plain `send`.
        {
            let (pending, owned, done) = (&self.pending, &self.bytes, &mut self.done);
            let sends = pending.iter().map(|p| (p.out.fd(), p.place.bytes(owned)));
            ring.send_all(sends, |i, result| {
                done[i] = true;
                settle(&pending[i], pending[i].place.bytes(owned), result, wake);
            });
            self.broken = ring.is_broken();
        }
        for (p, _) in self.pending.iter().zip(&self.done).filter(|(_, &done)| !done) {
            let bytes = p.place.bytes(&self.bytes);
            let result = socket::send(p.out.fd(), bytes, Push::Now);
            settle(p, bytes, result, wake);
        }
        for p in self.pending.drain(..) {
            p.out.set_batched(false);
        }
        self.bytes.clear();
        if self.bytes.capacity() > RETAIN {
            self.bytes.shrink_to(RETAIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A socket, its peer, and a connection queue for the socket in slot `10 * id`.
    fn connection(id: u64) -> (UnixStream, UnixStream, Rc<Outbound>) {
        let (socket, peer) = UnixStream::pair().unwrap();
        let out = Rc::new(Outbound::new(id, 10 * id as usize, socket.as_raw_fd(), 1 << 20));
        (socket, peer, out)
    }

    /// Writes to `socket` until it takes nothing more; returns how much it took.
    fn fill(socket: &UnixStream) -> usize {
        socket.set_nonblocking(true).unwrap();
        let mut filled = 0;
        loop {
            match (&*socket).write(&[7u8; 4096]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return filled,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn answers_of_many_connections_leave_together_each_in_order() {
        let mut batch = SendBatch::new();
        let mut ring = ShardRing::new(2, 4096).unwrap();
        let (_a, mut a_peer, out_a) = connection(1);
        let (_b, mut b_peer, out_b) = connection(2);
        batch.add(&out_a, |v| v.extend_from_slice(b"first to a, then more to a"));
        batch.add(&out_b, |v| v.extend_from_slice(b"to b"));
        assert!(out_a.is_batched() && out_b.is_batched());
        // Nothing leaves before the flush.
        a_peer.set_nonblocking(true).unwrap();
        assert_eq!(
            a_peer.read(&mut [0u8; 8]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        a_peer.set_nonblocking(false).unwrap();

        let mut wake = Vec::new();
        batch.flush(&mut ring, &mut wake);
        assert!(wake.is_empty(), "every socket took all: {wake:?}");
        assert_eq!(read_exactly(&mut a_peer, 26), b"first to a, then more to a");
        assert_eq!(read_exactly(&mut b_peer, 4), b"to b");
        assert!(!out_a.is_batched() && !out_b.is_batched());
        assert!(out_a.is_empty() && out_b.is_empty());
    }

    #[test]
    fn borrowed_and_copied_answers_leave_in_the_order_they_were_added() {
        let mut batch = SendBatch::new();
        let mut ring = ShardRing::new(2, 4096).unwrap();
        let (_a, mut a_peer, out_a) = connection(1);
        let (_b, mut b_peer, out_b) = connection(2);
        let received: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        // SAFETY: `received` is neither changed nor dropped before the flush.
        unsafe { batch.add_borrowed(&out_a, &received[100..18_100]) };
        batch.add(&out_b, |v| v.extend_from_slice(b"copied"));
        let mut wake = Vec::new();
        batch.flush(&mut ring, &mut wake);
        assert!(wake.is_empty());
        assert_eq!(read_exactly(&mut a_peer, 18_000), &received[100..18_100]);
        assert_eq!(read_exactly(&mut b_peer, 6), b"copied");
        assert!(!out_a.is_batched() && out_a.is_empty());
    }

    #[test]
    fn what_a_full_socket_leaves_of_a_borrowed_answer_is_copied_to_its_queue() {
        let mut batch = SendBatch::new();
        let mut ring = ShardRing::new(2, 4096).unwrap();
        let (full, _peer, out) = connection(9);
        fill(&full);
        let (_other, _other_peer, other_out) = connection(10);
        let mut received = vec![3u8; 5000];
        // SAFETY: `received` is unchanged until the flush; it is overwritten only after.
        unsafe { batch.add_borrowed(&out, &received) };
        batch.add(&other_out, |v| v.extend_from_slice(b"fine"));
        let mut wake = Vec::new();
        batch.flush(&mut ring, &mut wake);
        assert_eq!(wake, [90]);
        // The queue holds a copy: the receive buffer may be reused at once.
        received.fill(0);
        assert_eq!(&out.begin_write().expect("the answer is queued")[..], &[3u8; 5000][..]);
    }

    #[test]
    fn what_a_full_socket_leaves_waits_in_its_queue_and_its_task_is_woken() {
        let mut batch = SendBatch::new();
        let mut ring = ShardRing::new(2, 4096).unwrap();
        let (full, mut peer, out) = connection(3);
        let filled = fill(&full);
        // A second connection, so that the batch goes through the ring.
        let (_other, mut other_peer, other_out) = connection(6);
        batch.add(&out, |v| v.extend_from_slice(b"answer"));
        batch.add(&other_out, |v| v.extend_from_slice(b"fine"));
        let mut wake = Vec::new();
        batch.flush(&mut ring, &mut wake);
        assert_eq!(wake, [30]);
        assert_eq!(read_exactly(&mut other_peer, 4), b"fine");
        assert!(!out.is_batched());
        assert_eq!(&out.begin_write().expect("the answer is queued")[..], b"answer");
        // And nothing of it was written twice: the peer finds the filler only.
        peer.set_nonblocking(true).unwrap();
        let mut seen = 0;
        let mut buf = [0u8; 65536];
        while let Ok(n) = peer.read(&mut buf) {
            assert!(buf[..n].iter().all(|&b| b == 7));
            seen += n;
        }
        assert_eq!(seen, filled);
    }

    #[test]
    fn a_connection_whose_peer_is_gone_is_left_to_its_own_read() {
        let mut batch = SendBatch::new();
        let mut ring = ShardRing::new(2, 4096).unwrap();
        let (_a, peer, out) = connection(4);
        drop(peer);
        let (_b, mut b_peer, out_b) = connection(7);
        // Alone (a plain send) and with another (through the ring): no SIGPIPE
        // (MSG_NOSIGNAL), nothing queued, nobody woken.
        batch.add(&out, |v| v.extend_from_slice(b"lost"));
        let mut wake = Vec::new();
        batch.flush(&mut ring, &mut wake);
        batch.add(&out, |v| v.extend_from_slice(b"lost"));
        batch.add(&out_b, |v| v.extend_from_slice(b"kept"));
        batch.flush(&mut ring, &mut wake);
        assert!(wake.is_empty());
        assert!(out.is_empty() && !out.is_batched());
        assert_eq!(read_exactly(&mut b_peer, 4), b"kept");
    }

    #[test]
    fn a_lone_answer_to_a_full_socket_is_kept_in_its_queue() {
        let mut batch = SendBatch::new();
        let mut ring = ShardRing::new(2, 4096).unwrap();
        let (full, _peer, out) = connection(8);
        fill(&full);
        batch.add(&out, |v| v.extend_from_slice(b"answer"));
        let mut wake = Vec::new();
        batch.flush(&mut ring, &mut wake);
        assert_eq!(wake, [80]);
        assert_eq!(&out.begin_write().expect("the answer is queued")[..], b"answer");
    }

    #[test]
    fn a_batch_is_bounded_by_the_ring_and_by_bytes() {
        let mut batch = SendBatch::new();
        let (_a, _peer, out) = connection(5);
        assert!(batch.has_room(MAX_BYTES));
        assert!(!batch.has_room(MAX_BYTES + 1));
        // (Never flushed: one connection would not have two entries.)
        for _ in 0..MAX_SENDS {
            assert!(batch.has_room(1));
            batch.add(&out, |v| v.push(0));
        }
        assert!(!batch.has_room(1), "a full ring takes no more");
    }
}
