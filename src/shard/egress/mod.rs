//! The shard's buffers and its one way out for bytes.
//!
//! A shard has one io_uring (`ShardRing`) that its sockets' input arrives through and
//! its batched answers leave through, one pool of receive buffers (the ring's), one
//! receive arena (TLS plaintext, input copied out of the pool) and one cork, all shared
//! by its connections (an idle connection holds no buffer), and it gathers the small
//! answers of an executor pass in one send batch. A write that finds its socket full
//! waits for room through the same ring (`Socket::room`, the connection's slot's).
//! Whatever a connection answers leaves through `Egress::finish_round`, which picks the
//! cheapest of three paths underneath:
//! - `send_batch`: an echo answer waits for the end of the pass and leaves with the
//!   others in one `io_uring_enter` (in place where it was received when it is one run);
//! - `cork`: everything else one read produced leaves in one `send`/`sendmsg`;
//! - `queue`: what the socket does not take, and every routed chat message, waits in the
//!   connection's own queue, flushed at the end of each round or written by its task.

mod cork;
mod queue;
mod send_batch;
mod tls;

use std::cell::{Cell, RefCell, RefMut};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;

use bytes::Bytes;

pub use cork::Cork;
pub use queue::Outbound;
use send_batch::SendBatch;
pub use tls::{Opened, TlsConns, MAX_READ as TLS_MAX_READ};

use crate::metrics::LatencyRecorder;
use crate::sys::socket::{self, Push};
use crate::sys::uring::{BufferPool, Chunk, ShardRing};

/// One read takes up to this much from a socket. A read that fills it is the
/// connection's last of the executor pass (see `ShardContext::read`), so this is also what
/// a busy connection gets per turn: 256 KiB takes nearly a whole window of 16 messages of
/// 16 KiB in one `recv`, answered by one `sendmsg`. With 64 KiB, a turn was 4 such
/// messages, and both ends made more, smaller system calls for the same bytes (about a
/// quarter fewer msg/s at 16 × 16 KiB in flight; docs/perf/13-256k-reads.md).
pub const RX_BUFFER: usize = 256 * 1024;
/// The receive arena. Reads land at `rx_at`; echo answers that lie whole in it join the
/// send batch in place, and the next read lands after them, until the batch is sent and
/// reads start over at the beginning. Two reads' worth: four measured the same, and this
/// CPU's L2 is 512 KiB (docs/perf/13-256k-reads.md).
const RX_ARENA: usize = 2 * RX_BUFFER;

/// A connection's socket as its writes see it (`ConnectionSlot`): the descriptor, and a
/// wait for room in it.
pub trait Socket {
    fn fd(&self) -> RawFd;
    /// Resolves once the socket may take more (or has failed: the next send says how).
    fn room(&self) -> impl Future<Output = io::Result<()>>;
}

/// Writes some of `bytes` to a plain socket, waiting for room as needed: how much it
/// took (0 only for no bytes).
async fn write_some(socket: &impl Socket, bytes: &[u8]) -> io::Result<usize> {
    loop {
        let sent = socket::send(socket.fd(), bytes, Push::Now)?;
        if sent > 0 || bytes.is_empty() {
            return Ok(sent);
        }
        socket.room().await?;
    }
}

/// Writes all of `bytes` to a plain socket, waiting for room as needed.
async fn write_plain(socket: &impl Socket, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let sent = write_some(socket, bytes).await?;
        bytes = &bytes[sent..];
    }
    Ok(())
}

/// How the bytes of a round may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A plain echo answer: it may wait for the end of the executor pass.
    Batchable,
    /// Now.
    Now,
    /// Now, and the socket (or its sending side) closes next: the bytes wait for the FIN.
    BeforeFin,
}

pub struct Egress {
    /// The shard's ring: input arrives and the send batch leaves through it.
    pub ring: RefCell<ShardRing>,
    /// The ring's receive buffers.
    pool: Rc<BufferPool>,
    /// Where the last read's bytes are: a chunk of the pool (held until the next read
    /// replaces it), or `None` for the arena.
    input: Cell<Option<Chunk>>,
    /// Chunks the send batch points into, released when it is sent.
    batch_holds: RefCell<Vec<Chunk>>,
    /// The receive arena (`RX_ARENA` bytes, never reallocated: the send batch may point
    /// into it). A read's bytes are at `rx[rx_at()..][..n]`.
    rx: RefCell<Vec<u8>>,
    /// Where the next read lands; what lies before it waits in the send batch.
    rx_at: Cell<usize>,
    /// The address of `rx`'s bytes.
    rx_addr: usize,
    cork: RefCell<Cork>,
    /// Echo answers of this executor pass, sent together when it ends.
    batch: RefCell<SendBatch>,
    /// Routed messages' latency, recorded when their last byte is handed to the socket.
    pub latency: RefCell<LatencyRecorder>,
    /// Queues being flushed, kept between rounds so that its capacity is reused.
    flushing: RefCell<Vec<Rc<Outbound>>>,
    /// The TLS sockets: every send and receive here seals or opens their records.
    pub tls: TlsConns,
}

/// A read's bytes and the cork for its answers, borrowed together until the round ends.
pub struct Round<'a> {
    input: RoundInput<'a>,
    pub cork: RefMut<'a, Cork>,
}

enum RoundInput<'a> {
    Arena {
        rx: RefMut<'a, Vec<u8>>,
        at: usize,
        len: usize,
    },
    Received(&'a mut [u8]),
}

impl Round<'_> {
    /// The read's bytes and the cork, at once.
    pub fn parts(&mut self) -> (&mut [u8], &mut Cork) {
        let input = match &mut self.input {
            RoundInput::Arena { rx, at, len } => &mut rx[*at..][..*len],
            RoundInput::Received(bytes) => &mut bytes[..],
        };
        (input, &mut self.cork)
    }
}

impl Egress {
    /// With `ring`, the shard's io_uring.
    pub fn new(ring: ShardRing) -> io::Result<Self> {
        let rx = vec![0; RX_ARENA];
        Ok(Egress {
            pool: ring.pool().clone(),
            ring: RefCell::new(ring),
            input: Cell::new(None),
            batch_holds: RefCell::new(Vec::new()),
            rx_addr: rx.as_ptr() as usize,
            rx: RefCell::new(rx),
            rx_at: Cell::new(0),
            cork: RefCell::new(Cork::new()),
            batch: RefCell::new(SendBatch::new()),
            latency: RefCell::new(LatencyRecorder::default()),
            flushing: RefCell::new(Vec::new()),
            tls: TlsConns::default(),
        })
    }

    /// Opens the last read's `n` bytes, ciphertext received for the TLS socket `fd`: the
    /// plaintext is then the last read's bytes (`round`), in the arena. `None` for a
    /// plain socket, whose bytes stay as they are.
    pub fn open_tls(&self, fd: std::os::fd::RawFd, n: usize) -> Option<io::Result<Opened>> {
        let at = self.rx_at.get();
        let loaded = match self.input.take() {
            Some(chunk) => {
                // SAFETY: held until released just below, and no round borrows it now.
                let loaded = self.tls.load(fd, unsafe { self.pool.bytes(chunk) });
                if !matches!(loaded, Ok(true)) {
                    self.input.set(Some(chunk));
                } else {
                    self.pool.release(chunk);
                }
                loaded
            }
            None => self.tls.load(fd, &self.rx.borrow()[at..at + n]),
        };
        match loaded {
            Ok(true) => Some(self.tls.open_loaded(fd, &mut self.rx.borrow_mut()[at..at + RX_BUFFER])),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Makes `chunk` (held, from the shard ring) the last read's bytes.
    pub fn received(&self, chunk: Chunk) {
        if let Some(before) = self.input.replace(Some(chunk)) {
            self.pool.release(before);
        }
    }

    /// A chunk received for a connection that will not read it from the pool.
    pub fn release(&self, chunk: Chunk) {
        self.pool.release(chunk);
    }

    /// Appends the bytes of `chunk` (held) to `into`.
    pub fn copy_chunk(&self, chunk: Chunk, into: &mut Vec<u8>) {
        // SAFETY: held, and no round borrows it now (rounds do not outlive a read's task
        // step, and this runs between them).
        into.extend_from_slice(unsafe { self.pool.bytes(chunk) });
    }

    /// Copies the first `RX_BUFFER` of `bytes` (input kept out of the pool) into the arena
    /// as the last read's bytes; returns how many.
    pub fn received_copy(&self, bytes: &[u8]) -> usize {
        self.release_input();
        let n = bytes.len().min(RX_BUFFER);
        let at = self.rx_at.get();
        self.rx.borrow_mut()[at..at + n].copy_from_slice(&bytes[..n]);
        n
    }

    /// The last read's chunk, if any, goes back to the pool; reads land in the arena.
    fn release_input(&self) {
        if let Some(before) = self.input.take() {
            self.pool.release(before);
        }
    }

    /// The last read's `n` bytes, with the cork for the answers to them.
    pub fn round(&self, n: usize) -> Round<'_> {
        let input = match self.input.get() {
            // SAFETY: the chunk is held (until the next read replaces it), and the round
            // is the only reference to its bytes: a read's bytes are used before the
            // caller's next await, and rounds do not nest (the cork is borrowed with it).
            Some(chunk) => RoundInput::Received(unsafe { self.pool.bytes(chunk) }),
            None => RoundInput::Arena {
                rx: self.rx.borrow_mut(),
                at: self.rx_at.get(),
                len: n,
            },
        };
        Round {
            input,
            cork: self.cork.borrow_mut(),
        }
    }

    /// The cork alone, for answers to input that is not in the arena.
    pub fn cork(&self) -> RefMut<'_, Cork> {
        self.cork.borrow_mut()
    }

    /// Frames and bytes the cork queued since the last call (none while a round holds it).
    pub fn take_queued(&self) -> (u64, u64) {
        self.cork.try_borrow_mut().map_or((0, 0), |mut cork| cork.take_queued())
    }

    /// A copy of the last read's `n` bytes, appended to `into` (an HTTP head in the
    /// making).
    pub fn copy_input(&self, n: usize, into: &mut Vec<u8>) {
        match self.input.get() {
            // SAFETY: held, and no round borrows it now.
            Some(chunk) => into.extend_from_slice(unsafe { self.pool.bytes(chunk) }),
            None => into.extend_from_slice(&self.rx.borrow()[self.rx_at.get()..][..n]),
        }
    }

    /// Sends what the round put in the cork (its payloads may point into `input`) (straight away when nothing is queued before
    /// it, else behind the queue). A `Batchable` answer joins the pass's send batch
    /// instead: copied when it is small, in place when it is one frame echoed from the
    /// arena. Returns the slots of connections to wake (their queue needs its task).
    pub fn finish_round(
        &self,
        cork: &mut Cork,
        input: &mut [u8],
        out: &Rc<Outbound>,
        finish: Finish,
        wake: &mut Vec<usize>,
    ) -> io::Result<()> {
        if !cork.is_empty() && out.is_batched() {
            // Bytes of ours wait in the batch: they must leave first.
            self.flush_batch(wake);
        }
        let joined = cork.join_in_input(input);
        // TLS records are sealed per connection, so a TLS answer leaves through the cork.
        if !cork.is_empty() && finish == Finish::Batchable && out.is_empty() && !self.tls.is_tls(out.fd()) {
            if let Some(run) = joined {
                if self.batch_received(out, &input[run], wake) {
                    cork.clear();
                }
            } else if let Some(bytes) = cork.owned_only() {
                let mut batch = self.batch.borrow_mut();
                if batch.has_room(bytes.len()) {
                    batch.add(out, |b| b.extend_from_slice(bytes));
                    drop(batch);
                    cork.clear();
                }
            }
        }
        if !cork.is_empty() {
            if out.is_empty() {
                let push = if finish == Finish::BeforeFin {
                    Push::WithFin
                } else {
                    Push::Now
                };
                if let Some(rest) = cork.send(&self.tls, out.fd(), input, push)? {
                    out.push_unsent(Bytes::from(rest));
                }
            } else {
                out.push(Bytes::from(cork.take_all(input)), None);
            }
        }
        Ok(())
    }

    /// Puts `answer`, which lies in this round's input (a chunk of the pool, or the arena
    /// at or after `rx_at`), in the send batch without copying it: the chunk is held until
    /// the batch is sent, or the next read lands after it in the arena. Returns false,
    /// having done nothing, when the batch is full or `answer` lies elsewhere.
    fn batch_received(&self, out: &Rc<Outbound>, answer: &[u8], wake: &mut Vec<usize>) -> bool {
        if let Some(chunk) = self.input.get() {
            if !self.pool.contains(chunk, answer) {
                return false;
            }
            let mut batch = self.batch.borrow_mut();
            if !batch.has_room(0) {
                return false;
            }
            self.pool.hold(chunk);
            self.batch_holds.borrow_mut().push(chunk);
            // SAFETY: the chunk's bytes stay as they are while it is held (the kernel
            // writes a buffer only past what it completed, and a buffer goes back to the
            // ring only when nothing holds it), and `flush_batch` releases it only after
            // sending the batch.
            unsafe { batch.add_borrowed(out, answer) };
            return true;
        }
        let start = (answer.as_ptr() as usize).wrapping_sub(self.rx_addr);
        let end = start.wrapping_add(answer.len());
        if start < self.rx_at.get() || end > RX_ARENA || end < start {
            return false;
        }
        {
            let mut batch = self.batch.borrow_mut();
            if !batch.has_room(0) {
                return false;
            }
            // SAFETY: the arena is never reallocated, and nothing writes before `rx_at`
            // (reads land at it) until `flush_batch` sends the batch and resets it.
            unsafe { batch.add_borrowed(out, answer) };
        }
        // The next read starts on a fresh cache line after the answer.
        self.rx_at.set(end.next_multiple_of(64));
        if self.rx_at.get() + RX_BUFFER > RX_ARENA {
            self.flush_batch(wake);
        }
        true
    }

    /// Sends the pass's batch now; the connections whose sockets did not take it all
    /// are pushed to `wake`.
    pub fn flush_batch(&self, wake: &mut Vec<usize>) {
        self.batch.borrow_mut().flush(&mut self.ring.borrow_mut(), wake);
        // Nothing in the batch points into the arena or the pool any more.
        self.rx_at.set(0);
        for chunk in self.batch_holds.borrow_mut().drain(..) {
            self.pool.release(chunk);
        }
    }

    /// Sends what each of `dirty` queued this round, as much as each socket takes now.
    /// Connections whose queue needs its task (a full socket, a slow consumer) are pushed
    /// to `wake`.
    pub fn flush_queues(&self, dirty: &mut Vec<Rc<Outbound>>, wake: &mut Vec<usize>) {
        if dirty.is_empty() {
            return;
        }
        let mut flushing = self.flushing.borrow_mut();
        std::mem::swap(&mut *flushing, dirty);
        let mut latency = self.latency.borrow_mut();
        for out in flushing.drain(..) {
            match out.flush_now(&mut latency, &self.tls) {
                Ok(false) if !out.overflowed() => {}
                _ => wake.push(out.slot),
            }
        }
    }

    /// Writes `out`'s queue until it is empty, waiting for the socket as needed. The wait
    /// is boxed: it is rare (the socket full), and inline it would be the largest state of
    /// every connection's future, idle ones included.
    pub async fn write_queue(&self, socket: &impl Socket, out: &Outbound) -> io::Result<()> {
        loop {
            let more = out.flush_now(&mut self.latency.borrow_mut(), &self.tls)?;
            if !more || out.overflowed() {
                return Ok(());
            }
            Box::pin(self.write_front(socket, out)).await?;
        }
    }

    /// Writes what is left of `out`'s front frame once the socket takes it. Returns false
    /// when the queue is empty.
    pub async fn write_front(&self, socket: &impl Socket, out: &Outbound) -> io::Result<bool> {
        let Some(chunk) = out.begin_write() else {
            return Ok(false);
        };
        let written = if self.tls.is_tls(out.fd()) {
            self.write_sealed(socket, &chunk).await
        } else {
            write_some(socket, &chunk).await
        };
        out.end_write(*written.as_ref().unwrap_or(&0), &mut self.latency.borrow_mut());
        written.map(|_| true)
    }

    /// Writes some of `chunk` to a TLS socket, waiting for it as needed: how much.
    async fn write_sealed(&self, socket: &impl Socket, chunk: &[u8]) -> io::Result<usize> {
        loop {
            // (No `IoBatch` here: its 1 KiB would live in every connection task's future.)
            let sent = self.tls.send_bytes(socket.fd(), chunk, Push::Now)?;
            if sent > 0 || chunk.is_empty() {
                return Ok(sent);
            }
            self.tls.write_unsent(socket).await?;
        }
    }

    /// Writes all of `bytes` (sealed, for a TLS socket), waiting for the socket as needed.
    pub async fn write_all(&self, socket: &impl Socket, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(socket, bytes).await
    }

    /// Closes the sending side (after close_notify, for a TLS socket).
    pub async fn shutdown(&self, socket: &impl Socket) -> io::Result<()> {
        self.tls.close_notify(socket).await?;
        socket::shutdown_write(socket.fd())
    }
}
