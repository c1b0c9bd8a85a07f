//! Sockets' input, as the shard ring delivers it (a TLS socket's is ciphertext, opened by
//! its read): each connection's multishot receive, the chunks it took waiting for the
//! connection's reads, and the rules that keep one connection from holding the shared
//! buffers:
//! - a connection reads at most `PASS_BYTES` per executor pass, then waits for the next
//!   one: a client that sends as fast as we answer must not keep the pass from ending
//!   (everyone else's input is taken between passes);
//! - a connection holding `PAUSE_AT` unread has its receive cancelled, and armed again
//!   once half of that is read (its client then waits in TCP, as with a full socket);
//! - when the pool runs low, what connections have not read by the next pass (a task
//!   waiting to write, or paced by `PASS_BYTES`) is copied out of the pool into buffers of
//!   their own (`spill`): a chunk keeps its whole buffer from the kernel, and a few slow
//!   readers must not stop every other connection's input;
//! - a receive the pool ran dry for is armed again once a buffer is back, before any
//!   other, so that a connection with a full socket cannot take every buffer first.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;

use slab::Slab;

use super::budget::MemoryBudget;
use super::egress::Egress;
use crate::sys::uring::{Chunk, Completion, ShardRing};

/// The shard ring's pool: 16 buffers of 128 KiB, consumed a message at a time. A
/// receive takes at most what is left of the buffer it lands in.
pub const POOL_BUFFERS: u16 = 16;
pub const POOL_BUFFER_BYTES: u32 = 128 * 1024;
/// Unread input at which a connection's receive is paused.
const PAUSE_AT: usize = 2 * POOL_BUFFER_BYTES as usize;
/// What a connection reads per executor pass (as one `recv` of the receive arena did).
const PASS_BYTES: usize = super::egress::RX_BUFFER;
/// Buffers left to the kernel under which unread input is spilled.
const LOW_WATER: u16 = POOL_BUFFERS / 4;

/// The shard ring's tags: a connection's receive carries its slot and generation
/// (`ring_user`, below 2^61), its wait for room to write that with `WRITABLE` set; the
/// shard's own tags have `OWN` set; `uring::SEND` (bit 63) is the ring's.
pub const WRITABLE: u64 = 1 << 61;
pub const OWN: u64 = 1 << 62;
/// Cancellations (nothing to do when they complete).
pub const CANCELLED: u64 = OWN | 2;

/// A connection's multishot receive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Receive {
    /// None armed: not yet, paused, ended, or the pool ran dry.
    #[default]
    Idle,
    /// Queued, to be submitted before the next enter.
    Queued,
    Armed,
    /// Asked to stop (a paused connection); idle at its last completion.
    Cancelling,
}

/// One connection's input from the ring.
#[derive(Default)]
pub struct Input {
    fd: RawFd,
    /// Tells this connection's completions from those of an earlier one in the same slot.
    generation: u32,
    /// Chunks taken for it, in order, linked through `Receiver::links`.
    head: Option<u32>,
    tail: Option<u32>,
    /// Bytes in those chunks.
    chunk_bytes: u32,
    /// Older input than the chunks, copied out of the pool (see the module's doc).
    spill: Option<Box<Spill>>,
    receive: Receive,
    /// The peer's FIN (0) or a receive's error (an errno), after the input.
    ended: Option<i32>,
    /// The pass of the last read, and what the connection read in it.
    pass: u64,
    read_in_pass: usize,
}

struct Spill {
    bytes: Vec<u8>,
    /// Where the unread part starts.
    at: usize,
}

impl Input {
    /// The socket.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    fn unread(&self) -> usize {
        self.chunk_bytes as usize + self.spill.as_ref().map_or(0, |s| s.bytes.len() - s.at)
    }
}

/// What a read found.
pub enum Read {
    /// `n` bytes, now the egress's input (`Egress::round`).
    Data(usize),
    /// The connection had its share of this pass: more in the next.
    NextPass,
    /// The peer's FIN (`Ok`), or the receive's error.
    Ended(io::Result<()>),
    Nothing,
}

/// A chunk waiting for its connection's read.
struct Link {
    chunk: Chunk,
    next: Option<u32>,
}

#[derive(Default)]
pub struct Receiver {
    /// Chunks waiting for their connection's read (reused: no allocation per message).
    links: RefCell<Slab<Link>>,
    /// Receives to submit before the next enter, in order.
    queued: RefCell<Vec<(usize, u32)>>,
    /// Receives the pool ran dry for, to arm again first once a buffer is back.
    starved: RefCell<Vec<(usize, u32)>>,
    /// Requests to cancel with the next enter.
    cancels: RefCell<Vec<u64>>,
    /// Connections given input at the last take: what they have not read by the next
    /// is spilled.
    fresh: RefCell<Vec<(usize, u32)>>,
    /// `fresh` of the take before (reused).
    checking: RefCell<Vec<(usize, u32)>>,
    generation: Cell<u32>,
}

impl Receiver {
    /// The input state of a new connection on `fd`; `start` arms it.
    pub fn input(&self, fd: RawFd) -> Input {
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        Input {
            fd,
            generation,
            ..Input::default()
        }
    }

    /// Arms the connection's receive (with the next enter).
    pub fn start(&self, key: usize, input: &mut Input) {
        self.arm(key, input, PAUSE_AT);
    }

    /// Arms `input`'s receive unless it is armed, has ended, or holds `below` bytes or
    /// more unread.
    fn arm(&self, key: usize, input: &mut Input, below: usize) {
        if input.receive == Receive::Idle && input.ended.is_none() && input.unread() < below {
            input.receive = Receive::Queued;
            self.queued.borrow_mut().push((key, input.generation));
        }
    }

    /// The connection's next input in executor pass `pass`, made the egress's (or its end):
    /// one chunk, or up to `max` bytes of what was copied out of the pool.
    pub fn read(
        &self,
        key: usize,
        input: &mut Input,
        pass: u64,
        max: usize,
        egress: &Egress,
        budget: &MemoryBudget,
    ) -> Read {
        if input.pass != pass {
            input.pass = pass;
            input.read_in_pass = 0;
        }
        if input.read_in_pass >= PASS_BYTES && input.unread() > 0 {
            return Read::NextPass;
        }
        let n = if let Some(spill) = input.spill.as_mut() {
            let unread = &spill.bytes[spill.at..];
            let n = egress.received_copy(&unread[..unread.len().min(max)]);
            spill.at += n;
            budget.dequeued(n);
            if spill.at == spill.bytes.len() {
                input.spill = None;
            }
            n
        } else if let Some(chunk) = self.next_chunk(input) {
            egress.received(chunk);
            chunk.len as usize
        } else {
            return match input.ended {
                Some(0) => Read::Ended(Ok(())),
                Some(errno) => Read::Ended(Err(io::Error::from_raw_os_error(errno))),
                None => Read::Nothing,
            };
        };
        input.read_in_pass += n;
        // A paused receive resumes once half of what paused it is read.
        self.arm(key, input, PAUSE_AT / 2);
        Read::Data(n)
    }

    fn next_chunk(&self, input: &mut Input) -> Option<Chunk> {
        let head = input.head?;
        let link = self.links.borrow_mut().remove(head as usize);
        input.head = link.next;
        if link.next.is_none() {
            input.tail = None;
        }
        input.chunk_bytes -= link.chunk.len;
        Some(link.chunk)
    }

    fn push_chunk(&self, input: &mut Input, chunk: Chunk) {
        let mut links = self.links.borrow_mut();
        let index = links.insert(Link { chunk, next: None }) as u32;
        match input.tail.and_then(|tail| links.get_mut(tail as usize)) {
            Some(link) => link.next = Some(index),
            None => input.head = Some(index),
        }
        input.tail = Some(index);
        input.chunk_bytes += chunk.len;
    }

    /// Copies `input`'s chunks into its spill, releasing them.
    fn spill(&self, input: &mut Input, egress: &Egress, budget: &MemoryBudget) {
        if input.head.is_none() {
            return;
        }
        let mut spill = input.spill.take().unwrap_or_else(|| {
            Box::new(Spill {
                bytes: Vec::new(),
                at: 0,
            })
        });
        if spill.at > 0 {
            spill.bytes.drain(..spill.at);
            spill.at = 0;
        }
        while let Some(chunk) = self.next_chunk(input) {
            egress.copy_chunk(chunk, &mut spill.bytes);
            budget.queued(chunk.len as usize);
            egress.release(chunk);
        }
        input.spill = Some(spill);
    }

    /// The connection ends: its unread input goes back (chunks to the pool), and an armed
    /// receive, which holds the socket open (closing the descriptor does not end it), is
    /// cancelled with the next enter; completions still on their way find another
    /// generation in the slot.
    pub fn close(&self, key: usize, input: &mut Input, egress: &Egress, budget: &MemoryBudget) {
        while let Some(chunk) = self.next_chunk(input) {
            egress.release(chunk);
        }
        if let Some(spill) = input.spill.take() {
            budget.dequeued(spill.bytes.len() - spill.at);
        }
        if matches!(input.receive, Receive::Armed | Receive::Cancelling) {
            self.cancels.borrow_mut().push(ring_user(key, input.generation));
        }
    }

    /// Before the ring is entered: spills what connections did not read since the last
    /// take, and submits the receives to arm (those the pool ran dry for first, when a
    /// buffer is back) and the cancellations. `input(conn)` is a connection's input.
    pub fn before_enter<T>(
        &self,
        ring: &mut ShardRing,
        egress: &Egress,
        budget: &MemoryBudget,
        conns: &mut Slab<T>,
        input: fn(&mut T) -> &mut Input,
    ) {
        fn live<T>(
            conns: &mut Slab<T>,
            input: fn(&mut T) -> &mut Input,
            key: usize,
            generation: u32,
        ) -> Option<&mut Input> {
            conns.get_mut(key).map(input).filter(|i| i.generation == generation)
        }
        let mut checking = self.checking.borrow_mut();
        std::mem::swap(&mut *checking, &mut *self.fresh.borrow_mut());
        let low = ring.pool().lent() < LOW_WATER;
        for (key, generation) in checking.drain(..) {
            match live(conns, input, key, generation) {
                Some(input) if low => self.spill(input, egress, budget),
                // Looked at again next time, in case the pool runs low then.
                Some(input) if input.head.is_some() => self.fresh.borrow_mut().push((key, generation)),
                _ => {}
            }
        }
        // Submitted first: the kernel issues submissions in order, and an armed receive
        // takes what is waiting in its socket at once.
        if ring.pool().lent() > 0 {
            for (key, generation) in self.starved.borrow_mut().drain(..) {
                let starved = live(conns, input, key, generation)
                    .filter(|i| i.receive == Receive::Idle && i.ended.is_none() && i.unread() < PAUSE_AT);
                if let Some(input) = starved {
                    ring.recv(input.fd, ring_user(key, generation));
                    input.receive = Receive::Armed;
                }
            }
        }
        for (key, generation) in self.queued.borrow_mut().drain(..) {
            if let Some(input) = live(conns, input, key, generation).filter(|i| i.receive == Receive::Queued) {
                ring.recv(input.fd, ring_user(key, generation));
                input.receive = Receive::Armed;
            }
        }
        for user in self.cancels.borrow_mut().drain(..) {
            ring.cancel(user, CANCELLED);
        }
    }

    /// What completion `c` (not one of the shard's own tags) means for its connection, if
    /// it is still in `conns`. Returns the connection's slot when it has something new to
    /// read (or its end).
    pub fn completed<T>(
        &self,
        c: Completion,
        egress: &Egress,
        conns: &mut Slab<T>,
        input: fn(&mut T) -> &mut Input,
    ) -> Option<usize> {
        let (user, more) = match c {
            Completion::Data { user, more, .. } | Completion::Status { user, more, .. } => (user, more),
        };
        if user == CANCELLED {
            return None;
        }
        let key = (user & u64::from(u32::MAX)) as usize;
        let live = conns
            .get_mut(key)
            .map(input)
            .filter(|i| ring_user(key, i.generation) == user);
        let Some(input) = live else {
            // A connection gone since: its input goes back to the pool.
            if let Completion::Data { chunk, .. } = c {
                egress.release(chunk);
            }
            return None;
        };
        if !more {
            input.receive = Receive::Idle;
        }
        match c {
            Completion::Data { chunk, .. } => {
                self.push_chunk(input, chunk);
                self.fresh.borrow_mut().push((key, input.generation));
                if input.receive == Receive::Armed && input.unread() >= PAUSE_AT {
                    self.cancels.borrow_mut().push(user);
                    input.receive = Receive::Cancelling;
                }
            }
            Completion::Status { result, .. } if result == -libc::ENOBUFS => {
                // One holding unread input is armed again by its own reads.
                if input.unread() == 0 {
                    self.starved.borrow_mut().push((key, input.generation));
                }
                return None;
            }
            Completion::Status { result, .. } if result == -libc::ECANCELED || result > 0 => {}
            Completion::Status { result, .. } => input.ended = Some(-result),
        }
        if input.receive == Receive::Idle {
            self.arm(key, input, PAUSE_AT);
        }
        Some(key)
    }
}

/// The shard ring's tag for a connection's receive: its slot and generation (29 bits of
/// it: the bits above are `WRITABLE`, `OWN` and the ring's).
fn ring_user(key: usize, generation: u32) -> u64 {
    (u64::from(generation & 0x1FFF_FFFF) << 32) | (key as u64 & u64::from(u32::MAX))
}

/// The tag of a wait for room to write on `input`'s socket (see `WRITABLE`).
pub fn writable_user(key: usize, input: &Input) -> u64 {
    ring_user(key, input.generation) | WRITABLE
}
