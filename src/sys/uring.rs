//! A shard's own io_uring, for everything of its sockets: data both ways, accepts, and
//! polls (room to write, its executor's rings). Every socket of the shard, TLS or not,
//! has one multishot receive in it, and the kernel reads arriving bytes into one
//! pool of buffers shared by all of them (a provided buffer ring, consumed incrementally:
//! a 20-byte message takes 20 bytes of a buffer, not a whole one). The answers of a pass
//! go out as non-blocking sends in the same ring. Completions are deferred to the
//! shard's thread (`DEFER_TASKRUN`): one `io_uring_enter` at the end of a pass submits
//! its sends (and re-arms, cancellations) and takes what arrived meanwhile, and a pass
//! with nothing to submit or take enters not at all. No system call per socket. See
//! docs/perf/24-io-uring-both-ways.md.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// The pool's buffer group.
const GROUP: u16 = 0;
/// `IOU_PBUF_RING_INC` (Linux 6.12): buffers consumed a receive at a time, not whole.
const IOU_PBUF_RING_INC: u16 = 2;
/// Submission queue entries: a pass that queues more submits early.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: room for a pass's worth of receives (the kernel keeps any
/// overflow, `IORING_FEAT_NODROP`, and ends the multishots it could not post).
const CQ_ENTRIES: u32 = 16 * 1024;
/// Tags of `send_all`'s sends: the caller's tags leave this bit clear.
pub const SEND: u64 = 1 << 63;
/// Sends `send_all` submits at once.
pub const MAX_SENDS: usize = 512;

/// A run of received bytes in the pool: buffer `bid`, from `offset`, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub bid: u16,
    pub offset: u32,
    pub len: u32,
}

/// What one completion of the ring says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// A receive for `user` took `chunk` (now counted as held: release it).
    Data { user: u64, chunk: Chunk, more: bool },
    /// A receive for `user` ended or failed: 0 is the peer's FIN, negative an errno.
    /// `more` says whether the multishot is still armed.
    Status { user: u64, result: i32, more: bool },
}

impl Completion {
    /// The tag of the request it completes.
    pub fn user(&self) -> u64 {
        match *self {
            Completion::Data { user, .. } | Completion::Status { user, .. } => user,
        }
    }
}

/// The buffers every receive of the ring lands in: `count` buffers of `size` bytes,
/// lent to the kernel through a provided buffer ring. A buffer returns to the ring once
/// the kernel has filled it and every chunk taken from it has been released.
pub struct BufferPool {
    memory: *mut u8,
    size: u32,
    count: u16,
    /// The ring of buffer descriptors the kernel takes from (page-aligned).
    ring: *mut types::BufRingEntry,
    ring_layout: std::alloc::Layout,
    memory_layout: std::alloc::Layout,
    tail: Cell<u16>,
    /// Per buffer, by buffer id.
    buffers: RefCell<Vec<BufferState>>,
    /// Buffers in the ring (not all of them spent).
    lent: Cell<u16>,
}

/// Where one buffer of the pool stands.
#[derive(Clone, Copy, Default)]
struct BufferState {
    /// Where the kernel's next write lands in it.
    filled: u32,
    /// Chunks taken from it and not released.
    held: u32,
    /// The kernel has finished with it (a completion without `BUF_MORE`).
    spent: bool,
}

impl BufferPool {
    fn new(count: u16, size: u32) -> io::Result<Self> {
        assert!(count.is_power_of_two() && size > 0);
        let memory_layout = std::alloc::Layout::from_size_align(count as usize * size as usize, 4096)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ring_layout =
            std::alloc::Layout::from_size_align(count as usize * std::mem::size_of::<types::BufRingEntry>(), 4096)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size.
        let (memory, ring) = unsafe {
            (
                std::alloc::alloc_zeroed(memory_layout),
                std::alloc::alloc_zeroed(ring_layout) as *mut types::BufRingEntry,
            )
        };
        if memory.is_null() || ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // The pool is the shard's, not a connection's: touched now, so that it is counted
        // once at start and not in what connections seem to cost later.
        for page in (0..memory_layout.size()).step_by(4096) {
            // SAFETY: within the allocation.
            unsafe { memory.add(page).write_volatile(0) };
        }
        let pool = BufferPool {
            memory,
            size,
            count,
            ring,
            ring_layout,
            memory_layout,
            tail: Cell::new(0),
            buffers: RefCell::new(vec![BufferState::default(); count as usize]),
            lent: Cell::new(0),
        };
        for bid in 0..count {
            pool.lend(bid);
        }
        Ok(pool)
    }

    /// Puts buffer `bid` (whole) at the ring's tail.
    fn lend(&self, bid: u16) {
        let tail = self.tail.get();
        // SAFETY: the index is masked into the ring, which only this thread writes (the
        // kernel reads entries up to the published tail and updates only the head entry's
        // address and length as it consumes it).
        unsafe {
            let entry = &mut *self.ring.add((tail & (self.count - 1)) as usize);
            entry.set_addr(self.memory.add(bid as usize * self.size as usize) as u64);
            entry.set_len(self.size);
            entry.set_bid(bid);
            let tail_ptr = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            self.tail.set(tail.wrapping_add(1));
            (*tail_ptr).store(self.tail.get(), Ordering::Release);
        }
        let mut buffers = self.buffers.borrow_mut();
        let buffer = &mut buffers[bid as usize];
        buffer.filled = 0;
        buffer.spent = false;
        self.lent.set(self.lent.get() + 1);
    }

    /// Counts `len` bytes the kernel wrote into `bid` as a held chunk; `buffer_more`: it
    /// will write more into the same buffer.
    fn received(&self, bid: u16, len: u32, buffer_more: bool) -> Option<Chunk> {
        let i = bid as usize;
        if i >= self.count as usize {
            return None;
        }
        let mut buffers = self.buffers.borrow_mut();
        let buffer = &mut buffers[i];
        let offset = buffer.filled;
        buffer.filled = (offset + len).min(self.size);
        if !buffer_more {
            buffer.spent = true;
            self.lent.set(self.lent.get() - 1);
        }
        buffer.held += 1;
        Some(Chunk {
            bid,
            offset,
            len: len.min(self.size - offset),
        })
    }

    /// One more hold on `chunk`'s buffer (released with `release`).
    pub fn hold(&self, chunk: Chunk) {
        self.buffers.borrow_mut()[chunk.bid as usize].held += 1;
    }

    /// Releases a hold on `chunk`'s buffer; the buffer goes back to the ring when it
    /// was the last and the kernel has filled it.
    pub fn release(&self, chunk: Chunk) {
        let mut buffers = self.buffers.borrow_mut();
        let buffer = &mut buffers[chunk.bid as usize];
        buffer.held = buffer.held.saturating_sub(1);
        let free = buffer.held == 0 && buffer.spent;
        drop(buffers);
        if free {
            self.lend(chunk.bid);
        }
    }

    /// Buffers the kernel can still write into.
    pub fn lent(&self) -> u16 {
        self.lent.get()
    }

    /// Whether `bytes` lies in `chunk`'s part of its buffer.
    pub fn contains(&self, chunk: Chunk, bytes: &[u8]) -> bool {
        let start = self.memory as usize + chunk.bid as usize * self.size as usize + chunk.offset as usize;
        let at = bytes.as_ptr() as usize;
        at >= start && at + bytes.len() <= start + chunk.len as usize
    }

    /// The bytes of `chunk`.
    ///
    /// # Safety
    /// `chunk` came from a completion of this pool and is held; no other reference to
    /// its bytes lives while the returned one does.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes(&self, chunk: Chunk) -> &mut [u8] {
        let start = chunk.bid as usize * self.size as usize + chunk.offset as usize;
        debug_assert!(start + chunk.len as usize <= self.memory_layout.size());
        std::slice::from_raw_parts_mut(self.memory.add(start), chunk.len as usize)
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the ring that used them is gone
        // (`ShardRing` drops its io_uring before the pool's last `Rc`).
        unsafe {
            std::alloc::dealloc(self.memory, self.memory_layout);
            std::alloc::dealloc(self.ring as *mut u8, self.ring_layout);
        }
    }
}

pub struct ShardRing {
    ring: IoUring,
    pool: Rc<BufferPool>,
    /// Completions taken while waiting for sends, for `completions` to hand over first.
    stash: VecDeque<Completion>,
    /// `io_uring_enter` failed for good: sends go another way from then on.
    broken: bool,
}

impl ShardRing {
    /// A ring whose receives land in `buffers` buffers of `buffer_size` bytes.
    pub fn new(buffers: u16, buffer_size: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(CQ_ENTRIES)
            .setup_submit_all()
            .build(SQ_ENTRIES)?;
        let pool = Rc::new(BufferPool::new(buffers, buffer_size)?);
        // SAFETY: the ring's memory lives as long as the pool, which outlives `ring`
        // (fields drop in order: `ring` first).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(pool.ring as u64, buffers, GROUP, IOU_PBUF_RING_INC)?;
        }
        Ok(ShardRing {
            ring,
            pool,
            stash: VecDeque::new(),
            broken: false,
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    pub fn pool(&self) -> &Rc<BufferPool> {
        &self.pool
    }

    /// Arms a multishot receive on `fd`; its completions carry `user`.
    pub fn recv(&mut self, fd: RawFd, user: u64) {
        self.push(opcode::RecvMulti::new(types::Fd(fd), GROUP).build().user_data(user));
    }

    /// Cancels the request carrying `target`; the cancellation's own completion carries
    /// `user`.
    pub fn cancel(&mut self, target: u64, user: u64) {
        self.push(opcode::AsyncCancel::new(target).build().user_data(user));
    }

    /// Arms a one-shot poll of `fd` for `events` (`POLLIN`, `POLLOUT`): it completes
    /// once, at once if `fd` is ready when armed. Re-armed before each wait, it works as a
    /// level-triggered watch: a descriptor still ready wakes the next wait too.
    pub fn poll(&mut self, fd: RawFd, events: libc::c_short, user: u64) {
        self.push(
            opcode::PollAdd::new(types::Fd(fd), events as u32)
                .build()
                .user_data(user),
        );
    }

    /// Arms a multishot accept on the listening socket `fd`: each connection accepted
    /// completes with its descriptor (close-on-exec), an error ends it.
    pub fn accept(&mut self, fd: RawFd, user: u64) {
        self.push(
            opcode::AcceptMulti::new(types::Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(user),
        );
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: none of these entries points at memory of ours but the pool's, which
        // lives as long as the ring.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // A full submission queue: hand it to the kernel now, then queue.
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&entry) };
        }
    }

    /// Sends each `(fd, bytes)` of `sends` (the first `MAX_SENDS`) with `MSG_DONTWAIT`,
    /// submitted with whatever else is queued, and waits for every send's completion.
    /// `done(i, result)` hears how send `i` ended: bytes taken (0 for a full socket) or
    /// the error. Sends that `done` did not hear of (the ring failed) are the caller's to
    /// send another way. Other completions taken meanwhile wait for `completions`.
    pub fn send_all<'a>(
        &mut self,
        sends: impl Iterator<Item = (RawFd, &'a [u8])>,
        mut done: impl FnMut(usize, io::Result<usize>),
    ) {
        if self.broken {
            return;
        }
        let mut left = 0;
        for (i, (fd, bytes)) in sends.take(MAX_SENDS).enumerate() {
            let entry = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                .build()
                .user_data(SEND | i as u64);
            // SAFETY: every buffer is borrowed for this call, which waits for all the
            // completions (below) before it returns.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break;
            }
            left += 1;
        }
        while left > 0 {
            let failed = match self.ring.submit_and_wait(left) {
                Ok(_) => false,
                // Interrupted, or short of kernel memory for a moment: reap and retry.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => false,
                Err(e) => {
                    tracing::error!("shard ring: io_uring_enter failed ({e}); sending directly from now on");
                    self.broken = true;
                    true
                }
            };
            let pool = &self.pool;
            let stash = &mut self.stash;
            for cqe in self.ring.completion() {
                if cqe.user_data() & SEND == 0 {
                    stash.extend(completion(pool, &cqe));
                    continue;
                }
                left -= 1;
                let result = match cqe.result() {
                    n if n >= 0 => Ok(n as usize),
                    e if e == -libc::EAGAIN => Ok(0),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
                done((cqe.user_data() & !SEND) as usize, result);
            }
            if failed {
                break;
            }
        }
    }

    /// Submits what is queued and runs the completions due (one `io_uring_enter`, none
    /// when nothing is queued or due), waiting for at least one for up to `wait` when it
    /// is `Some` (`Some(None)`: no limit).
    pub fn enter(&mut self, wait: Option<Option<Duration>>) {
        // Completions taken while sending are news already: no sleep for more.
        let wait = wait.filter(|_| self.stash.is_empty());
        if wait.is_none() && self.ring.submission().is_empty() && !self.ring.submission().taskrun() {
            return;
        }
        let submitter = self.ring.submitter();
        let result = match wait {
            None => submitter.submit_and_wait(0),
            Some(None) => submitter.submit_and_wait(1),
            Some(Some(timeout)) => {
                let ts = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                submitter.submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            }
        };
        match result {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => {
                if !self.broken {
                    self.broken = true;
                    tracing::error!("shard ring: io_uring_enter failed: {e}");
                }
            }
        }
    }

    /// Hands each completion taken so far to `f`, in order.
    pub fn completions(&mut self, mut f: impl FnMut(Completion)) {
        for c in self.stash.drain(..) {
            f(c);
        }
        let pool = &self.pool;
        for cqe in self.ring.completion() {
            if let Some(c) = completion(pool, &cqe) {
                f(c);
            }
        }
    }
}

/// What `cqe` says, its bytes counted in `pool` (in completion order: a buffer's chunks
/// follow one another).
fn completion(pool: &BufferPool, cqe: &cqueue::Entry) -> Option<Completion> {
    let user = cqe.user_data();
    let flags = cqe.flags();
    let result = cqe.result();
    let more = cqueue::more(flags);
    match cqueue::buffer_select(flags) {
        Some(bid) if result > 0 => pool
            .received(bid, result as u32, cqueue::buffer_more(flags))
            .map(|chunk| Completion::Data { user, chunk, more }),
        _ => Some(Completion::Status { user, result, more }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn take(ring: &mut ShardRing) -> Vec<Completion> {
        ring.enter(None);
        let mut all = Vec::new();
        ring.completions(|c| all.push(c));
        all
    }

    #[test]
    fn receives_land_one_after_another_in_the_shared_buffers() {
        let mut ring = ShardRing::new(4, 64).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut c, d) = UnixStream::pair().unwrap();
        ring.recv(b.as_raw_fd(), 1);
        ring.recv(d.as_raw_fd(), 2);
        assert!(take(&mut ring).is_empty(), "nothing has arrived");

        a.write_all(b"hello").unwrap();
        c.write_all(b"world!").unwrap();
        let got = take(&mut ring);
        assert_eq!(got.len(), 2);
        let pool = ring.pool().clone();
        let mut texts = Vec::new();
        for completion in &got {
            let Completion::Data { user, chunk, more } = *completion else {
                panic!("{completion:?}")
            };
            assert!(more, "the multishot stays armed");
            // SAFETY: held, and no other reference to it.
            texts.push((user, unsafe { pool.bytes(chunk) }.to_vec()));
            // Both fit in the first buffer: the second starts where the first ended.
            assert_eq!(chunk.bid, 0);
        }
        texts.sort();
        assert_eq!(texts, [(1, b"hello".to_vec()), (2, b"world!".to_vec())]);
        let offsets: Vec<u32> = got
            .iter()
            .map(|c| match c {
                Completion::Data { chunk, .. } => chunk.offset,
                _ => unreachable!(),
            })
            .collect();
        assert!(offsets.contains(&0) && (offsets.contains(&5) || offsets.contains(&6)));

        // The peer's FIN ends the multishot with 0.
        drop(a);
        let got = take(&mut ring);
        assert_eq!(
            got,
            [Completion::Status {
                user: 1,
                result: 0,
                more: false
            }]
        );
    }

    #[test]
    fn a_buffer_returns_to_the_ring_once_filled_and_released() {
        let mut ring = ShardRing::new(2, 16).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        ring.recv(b.as_raw_fd(), 7);
        // 32 bytes fill both buffers.
        a.write_all(&[1u8; 32]).unwrap();
        let got = take(&mut ring);
        let chunks: Vec<Chunk> = got
            .iter()
            .filter_map(|c| match c {
                Completion::Data { chunk, .. } => Some(*chunk),
                _ => None,
            })
            .collect();
        assert_eq!(chunks.iter().map(|c| c.len).sum::<u32>(), 32);
        let pool = ring.pool().clone();
        assert_eq!(pool.lent(), 0, "both buffers are full and held");
        // No room: more input ends the multishot with ENOBUFS, and waits in the socket.
        a.write_all(b"x").unwrap();
        let got = take(&mut ring);
        assert!(
            got.iter()
                .any(|c| matches!(c, Completion::Status { result, more: false, .. } if *result == -libc::ENOBUFS)),
            "{got:?}"
        );
        for chunk in chunks {
            pool.release(chunk);
        }
        assert_eq!(pool.lent(), 2);
        ring.recv(b.as_raw_fd(), 7);
        let got = take(&mut ring);
        match got.as_slice() {
            [Completion::Data { chunk, .. }] => {
                // SAFETY: held, and no other reference to it.
                assert_eq!(unsafe { pool.bytes(*chunk) }, b"x");
                assert_eq!(chunk.offset, 0, "a buffer lent again starts over");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn input_taken_while_sending_ends_a_wait_at_once() {
        let mut ring = ShardRing::new(2, 64).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        ring.recv(b.as_raw_fd(), 1);
        assert!(take(&mut ring).is_empty());
        a.write_all(b"in").unwrap();
        // The send's enter also takes the receive's completion, and keeps it.
        let mut sent = None;
        ring.send_all(std::iter::once((c.as_raw_fd(), &b"out"[..])), |i, r| {
            sent = Some((i, r.unwrap()))
        });
        assert_eq!(sent, Some((0, 3)));
        let mut out = [0u8; 3];
        std::io::Read::read_exact(&mut d, &mut out).unwrap();
        assert_eq!(&out, b"out");
        // A wait must not sleep past it (the completion queue itself is empty now).
        let started = std::time::Instant::now();
        ring.enter(Some(Some(Duration::from_secs(10))));
        assert!(started.elapsed() < Duration::from_secs(5), "slept with input taken");
        let mut got = Vec::new();
        ring.completions(|c| got.push(c));
        assert!(matches!(got[..], [Completion::Data { user: 1, .. }]), "{got:?}");
    }

    #[test]
    fn a_cancelled_receive_lets_its_socket_close() {
        let mut ring = ShardRing::new(2, 64).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        ring.recv(b.as_raw_fd(), 3);
        take(&mut ring);
        ring.cancel(3, 99);
        let mut got = take(&mut ring);
        // The cancelled receive's own completion may come as task work, in the next enter.
        got.extend(take(&mut ring));
        assert!(
            got.contains(&Completion::Status {
                user: 3,
                result: -libc::ECANCELED,
                more: false
            }),
            "{got:?}"
        );
        assert!(got.iter().any(|c| matches!(
            c,
            Completion::Status {
                user: 99,
                result: 0,
                ..
            }
        )));
        // Nothing holds the socket now: closing it reaches the peer.
        drop(b);
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &a, &mut buf).unwrap(), 0);
    }
}
