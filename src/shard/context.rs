//! What one shard shares among its connections: its buffers and way out (`Egress`), the
//! ring that everything of the shard's sockets arrives through (connections' input,
//! listeners' new connections, a TLS socket's room to write, and the wake-ups of its
//! executor's own rings), and the registry of live connections that lets input, read
//! deadlines and a stop reach every one of them.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

use super::budget::MemoryBudget;
use super::deadlines::Deadlines;
use super::egress::{Cork, Egress, Finish, Opened, Outbound, Socket, TLS_MAX_READ};
use super::per_ip::{IpTicket, PerIpLimits};
use super::receive::{self, Input, Read, Receiver, CANCELLED, OWN, POOL_BUFFERS, POOL_BUFFER_BYTES, WRITABLE};
use super::yield_policy::YieldPolicy;
use crate::chat::hub::Hub;
use crate::config::Config;
use crate::metrics::counters::ShardCounters;
use crate::sys::uring::{Completion, ShardRing};
use crate::sys::{process, socket};
use crate::ws::deflate::{DeflateStats, Deflater, Inflater};

/// The shard ring's tags for a listener's accepts (plus the listener's index) and for a
/// poll of one of the executor's rings (plus its index); see `receive::OWN`.
const LISTENER: u64 = OWN | (1 << 16);
const EXECUTOR_RING: u64 = OWN | (2 << 16);
/// Low bits of those tags: the index.
const INDEX: u64 = 0xFFFF;

/// What a read returned. For `Data(n)` the bytes are `egress.round(n)`'s, until the
/// caller's next await: decode them before awaiting anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    Data(usize),
    Eof,
    TimedOut,
    /// The shard is stopping; only returned to reads that asked to be interrupted.
    Stopping,
    /// The connection's outbound queue needs its task (a full socket, a slow consumer).
    Outbound,
}

/// A live connection as its shard sees it.
#[derive(Default)]
struct Entry {
    /// The task waiting on the connection, if it waits.
    waker: Option<Waker>,
    /// How the socket's input reaches its reads, once watched.
    watch: Watch,
    /// A poll for room to write is armed: a write waits for it (`RoomToWrite`), or a
    /// TLS socket's read has handshake bytes the socket did not take.
    waits_for_room: bool,
    /// What the shard ring received for the socket.
    input: Input,
    /// When the waiting read (or wait for room to write) gives up.
    deadline: Option<Instant>,
    timed_out: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Not yet.
    #[default]
    No,
    /// A multishot receive in the shard ring.
    Plain,
    /// The same, its input ciphertext; its reads also send what the socket did not take
    /// of a handshake, once it has room.
    Tls,
}

/// A listening socket as its shard sees it: a multishot accept in the shard ring.
struct ListenerEntry {
    fd: RawFd,
    waker: Option<Waker>,
    /// Connections the ring accepted, until `accept` hands them over.
    accepted: VecDeque<OwnedFd>,
    /// The error that ended the multishot accept (out of descriptors, say), for `accept`
    /// to report once.
    failed: Option<i32>,
    /// The accept is armed (or queued to be).
    armed: bool,
    /// Closed: what arrives now is dropped.
    closed: bool,
}

impl ListenerEntry {
    /// A completion of the listener's accept: a new connection's descriptor, or the error
    /// that ended the accept. Returns the waker of the task that takes them.
    fn completed(&mut self, result: i32, more: bool) -> Option<Waker> {
        if !more {
            self.armed = false;
        }
        // SAFETY: the accept just handed us this descriptor alone.
        let accepted = (result >= 0).then(|| unsafe { OwnedFd::from_raw_fd(result) });
        if self.closed {
            return None;
        }
        match accepted {
            Some(socket) => self.accepted.push_back(socket),
            None if !more && result != -libc::ECANCELED => self.failed = Some(-result),
            None => {}
        }
        self.waker.take()
    }
}

pub struct ShardContext {
    pub id: usize,
    pub config: Arc<Config>,
    pub egress: Egress,
    /// What clients make this shard hold, against `--shard-memory-budget`.
    pub budget: Rc<MemoryBudget>,
    /// permessage-deflate's state for the shard's connections that keep none of their own
    /// (all but those with context takeover; see `ws::deflate`).
    pub deflate: ShardDeflate,
    /// Slots to wake after a round (reused, so a round allocates nothing).
    to_wake: RefCell<Vec<usize>>,
    /// Chat queues that gained frames this round (reused).
    dirty: RefCell<Vec<Rc<Outbound>>>,
    /// Every live connection: its waker, readiness and read deadline.
    connections: RefCell<Slab<Entry>>,
    /// The shard's listening sockets (at most a few), by index.
    listeners: RefCell<Vec<ListenerEntry>>,
    /// The executor's own rings, each with whether a poll of it is armed in the shard
    /// ring (their completions must end the shard's sleep in it).
    executor_rings: RefCell<Vec<(RawFd, bool)>>,
    /// Sockets' input from the shard ring, until their reads take it.
    receiver: Receiver,
    /// Executor passes ended so far.
    pass: Cell<u64>,
    /// Connections that had their full read this pass and wait for the next one.
    next_pass: RefCell<Vec<usize>>,
    /// The sweep that ends reads at their deadline.
    pub deadlines: Deadlines,
    stopping: Cell<bool>,
    drained: RefCell<Option<Waker>>,
    /// Connections open in the whole process (every shard), against `max_connections`.
    open_connections: Arc<AtomicUsize>,
    max_connections: usize,
    /// Connections and handshakes per client address, shared by every shard.
    pub per_ip: Arc<PerIpLimits>,
    /// Connections this shard refused for the per-IP limits since the last report.
    pub refused_per_ip: Cell<u64>,
    /// What the IO layer did (HTTP answers, closes, frames and bytes); the chat hub counts
    /// the rest.
    pub counters: ShardCounters,
    yield_policy: RefCell<YieldPolicy>,
}

/// The shard's one inflater (client messages, echo and chat) and the deflater of its
/// echo answers; the chat hub deflates routed frames with its own.
pub struct ShardDeflate {
    pub inflater: RefCell<Inflater>,
    pub deflater: RefCell<Deflater>,
    /// What echo connections' own deflaters (context takeover) did since the last report.
    own_stats: Cell<DeflateStats>,
}

/// Output buffer bytes the inflater and deflater keep after a message; a bigger one (after
/// a large message) is released.
const DEFLATE_RETAIN: usize = 256 * 1024;

impl ShardDeflate {
    fn new(level: u32) -> Self {
        ShardDeflate {
            inflater: RefCell::new(Inflater::new()),
            deflater: RefCell::new(Deflater::new(level)),
            own_stats: Cell::new(DeflateStats::default()),
        }
    }

    /// Counts what a connection's own deflater did.
    pub fn count_own(&self, stats: DeflateStats) {
        let mut all = self.own_stats.get();
        all += stats;
        self.own_stats.set(all);
    }

    /// What the echo deflaters did since the last call (for the report).
    pub fn take_stats(&self) -> DeflateStats {
        let mut stats = self.deflater.borrow_mut().take_stats();
        stats += self.own_stats.take();
        stats
    }

    /// Releases what one large message made the buffers grow to.
    pub fn trim(&self) {
        self.inflater.borrow_mut().trim(DEFLATE_RETAIN);
        self.deflater.borrow_mut().trim(DEFLATE_RETAIN);
    }
}

impl glommio::ExternalPoller for ShardContext {
    fn poll(&self) -> usize {
        self.take_completions(None)
    }

    fn park(&self, timeout: Option<Duration>) -> usize {
        if timeout != Some(Duration::ZERO) {
            let start = Instant::now();
            if self.yield_policy.borrow().may_yield(start) {
                // Before sleeping, let whatever else waits for this CPU run first, and
                // look again. A thread sharing the CPU (a client on the same host) is
                // often the one about to send us work: it runs now, and the shard comes
                // back without the sleep and the wake-up it would cost both sides. On a
                // CPU of its own the yield returns at once; beside a CPU-bound thread it
                // can take a whole time slice, and `YieldPolicy` then pauses yields.
                // See docs/perf/15-yield-before-sleep.md.
                process::yield_cpu();
                self.yield_policy.borrow_mut().yielded(start, Instant::now());
                let woke = self.poll();
                if woke > 0 {
                    return woke;
                }
            }
        }
        let wait = if timeout == Some(Duration::ZERO) {
            None
        } else {
            Some(timeout)
        };
        self.take_completions(wait)
    }

    fn end_pass(&self) -> usize {
        let mut woke = self.flush_batch();
        self.pass.set(self.pass.get() + 1);
        let mut next_pass = self.next_pass.borrow_mut();
        woke += next_pass.len();
        for slot in next_pass.drain(..) {
            self.wake(slot);
        }
        woke
    }
}

impl ShardContext {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        open_connections: Arc<AtomicUsize>,
        max_connections: usize,
        per_ip: Arc<PerIpLimits>,
    ) -> io::Result<Self> {
        let budget = Rc::new(MemoryBudget::new(config.shard_memory_budget));
        let deflate_level = config.deflate_level;
        Ok(ShardContext {
            id,
            config,
            egress: Egress::new(ShardRing::new(POOL_BUFFERS, POOL_BUFFER_BYTES)?)?,
            budget,
            deflate: ShardDeflate::new(deflate_level),
            to_wake: RefCell::new(Vec::new()),
            dirty: RefCell::new(Vec::new()),
            connections: RefCell::new(Slab::new()),
            listeners: RefCell::new(Vec::new()),
            executor_rings: RefCell::new(Vec::new()),
            receiver: Receiver::default(),
            pass: Cell::new(0),
            next_pass: RefCell::new(Vec::new()),
            deadlines: Deadlines::default(),
            stopping: Cell::new(false),
            drained: RefCell::new(None),
            open_connections,
            max_connections,
            per_ip,
            refused_per_ip: Cell::new(0),
            counters: ShardCounters::default(),
            yield_policy: RefCell::new(YieldPolicy::default()),
        })
    }

    /// Claims a place for a new connection on `socket` (holding its address's
    /// `ticket`); the socket is given back when the process is at its cap.
    pub fn admit(self: &Rc<Self>, socket: OwnedFd, ticket: Option<IpTicket>) -> Result<ConnectionSlot, OwnedFd> {
        let before = self.open_connections.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_connections {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return Err(socket);
        }
        let key = self.connections.borrow_mut().insert(Entry::default());
        Ok(ConnectionSlot {
            ctx: self.clone(),
            // A shard holds far fewer than 2^32 connections (one descriptor each).
            key: key as u32,
            ip: ticket,
            socket,
        })
    }

    pub fn live_connections(&self) -> usize {
        self.connections.borrow().len()
    }

    /// Marks the shard as stopping and wakes every connection so it can say goodbye.
    pub fn begin_stop(&self) {
        self.stopping.set(true);
        let wakers: Vec<Waker> = self
            .connections
            .borrow_mut()
            .iter_mut()
            .filter_map(|(_, e)| e.waker.take())
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Resolves when no connection is left.
    pub async fn drained(&self) {
        poll_fn(|cx| {
            if self.connections.borrow().is_empty() {
                Poll::Ready(())
            } else {
                *self.drained.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Ends a round of work (a read, an inbox batch): the chat hub's end of round (see
    /// `Hub::end_round`), then the queues that gained frames are flushed, and the
    /// connections whose queues need their task are woken.
    pub fn end_round(&self, hub: &Hub<Outbound>) {
        let mut dirty = self.dirty.borrow_mut();
        hub.end_round(&mut dirty);
        let mut wake = self.to_wake.borrow_mut();
        self.egress.flush_queues(&mut dirty, &mut wake);
        for slot in wake.drain(..) {
            self.wake(slot);
        }
    }

    /// Sends the pass's batch now; wakes the connections whose sockets did not take it
    /// all. Returns how many it woke.
    pub fn flush_batch(&self) -> usize {
        let mut wake = self.to_wake.borrow_mut();
        self.egress.flush_batch(&mut wake);
        let woke = wake.len();
        for slot in wake.drain(..) {
            self.wake(slot);
        }
        woke
    }

    /// Sends a connection's answers to one read (`Egress::finish_round`), then ends the
    /// round.
    pub fn finish_round(
        &self,
        hub: &Hub<Outbound>,
        cork: &mut Cork,
        input: &mut [u8],
        out: &Rc<Outbound>,
        finish: Finish,
    ) -> io::Result<()> {
        let result = {
            let mut wake = self.to_wake.borrow_mut();
            let result = self.egress.finish_round(cork, input, out, finish, &mut wake);
            for slot in wake.drain(..) {
                self.wake(slot);
            }
            result
        };
        self.end_round(hub);
        result
    }

    /// Wakes the task of the connection in `slot`, if it is waiting.
    pub fn wake(&self, slot: usize) {
        let waker = self.connections.borrow_mut().get_mut(slot).and_then(|e| e.waker.take());
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Reads from `slot`'s socket (what the shard ring received for it). With
    /// `interruptible`, a stop of the shard ends the wait with `Stopping`; with `out`, a
    /// queue that needs the task ends it with `Outbound`; with `timeout`, no input for
    /// that long ends it with `TimedOut`.
    pub fn read<'a>(
        &'a self,
        slot: &ConnectionSlot,
        interruptible: bool,
        out: Option<&'a Outbound>,
        timeout: Option<Duration>,
    ) -> ReadFuture<'a> {
        let key = slot.key();
        if let Some(entry) = self.connections.borrow_mut().get_mut(key) {
            entry.timed_out = false;
            entry.deadline = None;
        }
        ReadFuture {
            ctx: self,
            key,
            interruptible,
            out,
            timeout,
            deadline: None,
        }
    }

    /// `ReadFuture::poll`.
    fn poll_read(&self, cx: &mut Context<'_>, read: &mut ReadFuture<'_>) -> Poll<io::Result<ReadOutcome>> {
        let key = read.key;
        if read.interruptible && self.stopping.get() {
            return Poll::Ready(Ok(ReadOutcome::Stopping));
        }
        if read.out.is_some_and(Outbound::needs_task) {
            return Poll::Ready(Ok(ReadOutcome::Outbound));
        }
        let mut connections = self.connections.borrow_mut();
        let Some(entry) = connections.get_mut(key) else {
            return Poll::Ready(Ok(ReadOutcome::Eof));
        };
        let tls = entry.watch == Watch::Tls;
        let fd = entry.input.fd();
        loop {
            if tls {
                if self.egress.tls.peer_closed(fd) {
                    return Poll::Ready(Ok(ReadOutcome::Eof));
                }
                // What a handshake left unsent goes first, once the socket has room.
                match self.egress.tls.flush(fd) {
                    Ok(true) => {}
                    Ok(false) if !entry.waits_for_room => {
                        entry.waits_for_room = true;
                        let user = receive::writable_user(key, &entry.input);
                        self.egress.ring.borrow_mut().poll(fd, libc::POLLOUT, user);
                    }
                    Ok(false) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            let max = if tls { TLS_MAX_READ } else { usize::MAX };
            let n = match self
                .receiver
                .read(key, &mut entry.input, self.pass.get(), max, &self.egress, &self.budget)
            {
                Read::Data(n) => n,
                Read::NextPass => {
                    self.next_pass.borrow_mut().push(key);
                    break;
                }
                Read::Ended(Ok(())) => return Poll::Ready(Ok(ReadOutcome::Eof)),
                Read::Ended(Err(e)) => return Poll::Ready(Err(e)),
                Read::Nothing => break,
            };
            let n = if tls {
                match self.egress.open_tls(fd, n) {
                    // A handshake message, or part of a record: read on.
                    Some(Ok(Opened::Plain(0))) => continue,
                    Some(Ok(Opened::Plain(plain))) => plain,
                    Some(Ok(Opened::Closed)) => return Poll::Ready(Ok(ReadOutcome::Eof)),
                    Some(Err(e)) => return Poll::Ready(Err(e)),
                    None => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
                }
            } else {
                n
            };
            entry.deadline = None;
            self.counters.read(n);
            return Poll::Ready(Ok(ReadOutcome::Data(n)));
        }
        if entry.timed_out {
            entry.timed_out = false;
            return Poll::Ready(Ok(ReadOutcome::TimedOut));
        }
        if let Some(timeout) = read.timeout {
            let at = *read.deadline.get_or_insert_with(|| Instant::now() + timeout);
            entry.deadline = Some(at);
            self.deadlines.note(at);
        }
        if !entry.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            entry.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Submits what the pass queued in the shard ring and takes its completions (waiting
    /// for one, up to `wait`, when that is `Some`): input to connections, the ends of
    /// their receives, new connections, room to write, the executor's rings' news.
    /// Returns how many tasks it woke.
    fn take_completions(&self, wait: Option<Option<Duration>>) -> usize {
        let mut woke = 0;
        let mut ring = self.egress.ring.borrow_mut();
        let mut connections = self.connections.borrow_mut();
        self.receiver
            .before_enter(&mut ring, &self.egress, &self.budget, &mut connections, |e| {
                &mut e.input
            });
        // Polled again before each wait: an executor ring that still holds completions
        // ends the wait at once, as a level-triggered watch would.
        for (index, (fd, armed)) in self.executor_rings.borrow_mut().iter_mut().enumerate() {
            if !*armed {
                *armed = true;
                ring.poll(*fd, libc::POLLIN, EXECUTOR_RING | index as u64);
            }
        }
        ring.enter(wait);
        let mut listeners = self.listeners.borrow_mut();
        ring.completions(|completion| {
            let user = completion.user();
            let wake = if user & OWN != 0 && user != CANCELLED {
                let index = (user & INDEX) as usize;
                match (user & !INDEX, completion) {
                    (LISTENER, Completion::Status { result, more, .. }) => {
                        listeners.get_mut(index).and_then(|l| l.completed(result, more))
                    }
                    (EXECUTOR_RING, _) => {
                        if let Some((_, armed)) = self.executor_rings.borrow_mut().get_mut(index) {
                            *armed = false;
                        }
                        None
                    }
                    _ => None,
                }
            } else if user & WRITABLE != 0 && user & OWN == 0 {
                let key = (user & u64::from(u32::MAX)) as usize;
                connections
                    .get_mut(key)
                    .filter(|e| receive::writable_user(key, &e.input) == user)
                    .and_then(|e| {
                        e.waits_for_room = false;
                        e.waker.take()
                    })
            } else {
                self.receiver
                    .completed(completion, &self.egress, &mut connections, |e| &mut e.input)
                    .and_then(|key| connections.get_mut(key))
                    .and_then(|e| e.waker.take())
            };
            if let Some(w) = wake {
                w.wake();
                woke += 1;
            }
        });
        woke
    }

    /// Makes the shard ring drive its executor (`glommio::ExternalPoller`, a
    /// patch of ours): each busy pass of the executor ends with one `io_uring_enter` on
    /// it that submits the pass's requests and hands over what arrived, and an idle shard
    /// sleeps in it. The executor's rings are polled in it, so that their completions
    /// (timers' wake-ups, other shards' doorbells) end that sleep too.
    pub fn drive_executor(self: &Rc<Self>) {
        let fds = glommio::set_external_poller(self.clone());
        self.executor_rings
            .borrow_mut()
            .extend(fds.into_iter().map(|fd| (fd, false)));
    }

    /// Arms a multishot accept on a listening socket in the shard ring; `accept` then
    /// takes what it accepts. Returns the index to pass to `accept` and `close_listener`.
    pub fn watch_listener(&self, listener: RawFd) -> usize {
        let mut listeners = self.listeners.borrow_mut();
        let index = listeners.len();
        self.egress.ring.borrow_mut().accept(listener, LISTENER | index as u64);
        listeners.push(ListenerEntry {
            fd: listener,
            waker: None,
            accepted: VecDeque::new(),
            failed: None,
            armed: true,
            closed: false,
        });
        index
    }

    /// The next connection accepted on the listener `index` (see `watch_listener`), with
    /// its peer's address; the socket is close-on-exec. An error that ended the
    /// multishot accept (out of descriptors) is returned once; the next call arms it
    /// again.
    pub async fn accept(&self, index: usize) -> io::Result<(OwnedFd, IpAddr)> {
        poll_fn(|cx| {
            let mut listeners = self.listeners.borrow_mut();
            let Some(entry) = listeners.get_mut(index) else {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotFound, "no such listener")));
            };
            if let Some(socket) = entry.accepted.pop_front() {
                // A peer that reset since has no address: that concerns only it.
                return Poll::Ready(socket::peer_ip(socket.as_raw_fd()).map(|ip| (socket, ip)));
            }
            if let Some(errno) = entry.failed.take() {
                return Poll::Ready(Err(io::Error::from_raw_os_error(errno)));
            }
            if !entry.armed {
                entry.armed = true;
                self.egress.ring.borrow_mut().accept(entry.fd, LISTENER | index as u64);
            }
            if !entry.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                entry.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Stops accepting on the listener `index`: its accept is cancelled (it holds the
    /// socket open, so without this the port would keep taking connections nobody
    /// serves) and what it accepted and was not taken is closed.
    pub fn close_listener(&self, index: usize) {
        let mut listeners = self.listeners.borrow_mut();
        if let Some(entry) = listeners.get_mut(index) {
            entry.closed = true;
            entry.accepted.clear();
            if entry.armed {
                let mut ring = self.egress.ring.borrow_mut();
                ring.cancel(LISTENER | index as u64, CANCELLED);
                // Submitted now, not with the next pass: a shard with no connection
                // left stops at once, and would leave it to its ring's teardown.
                ring.enter(None);
            }
        }
    }

    /// Ends the reads (and waits for room to write) whose deadline has passed with
    /// `TimedOut`; returns the earliest deadline still ahead (see `Deadlines`).
    pub fn expire_reads(&self, now: Instant) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        let mut connections = self.connections.borrow_mut();
        for (_, entry) in connections.iter_mut() {
            match entry.deadline {
                Some(at) if at <= now => {
                    entry.deadline = None;
                    entry.timed_out = true;
                    if let Some(w) = entry.waker.take() {
                        w.wake();
                    }
                }
                Some(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
                None => {}
            }
        }
        earliest
    }
}

/// A connection's place in its shard, and its socket; dropping it frees the place (the
/// socket's receive and any poll cancelled), then closes the socket.
pub struct ConnectionSlot {
    ctx: Rc<ShardContext>,
    key: u32,
    /// The connection's place in its address's count, given back with the slot.
    ip: Option<IpTicket>,
    /// Its own descriptor rather than glommio's `TcpStream` (120 bytes, in every
    /// connection's future): reads and waits for room both go through the shard ring.
    socket: OwnedFd,
}

impl ConnectionSlot {
    pub fn key(&self) -> usize {
        self.key as usize
    }

    /// Arms the socket's multishot receive in the shard ring, so that its reads take
    /// what that receives (for a TLS socket, ciphertext they open).
    pub fn watch(&self, tls: bool) {
        if let Some(entry) = self.ctx.connections.borrow_mut().get_mut(self.key()) {
            entry.watch = if tls { Watch::Tls } else { Watch::Plain };
            entry.input = self.ctx.receiver.input(self.socket.as_raw_fd());
            self.ctx.receiver.start(self.key(), &mut entry.input);
        }
    }
}

impl Socket for ConnectionSlot {
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// A one-shot `POLLOUT` poll in the shard ring. A peer that takes nothing for a ping
    /// interval and a pong timeout is gone: `TimedOut`.
    fn room(&self) -> impl Future<Output = io::Result<()>> {
        if let Some(entry) = self.ctx.connections.borrow_mut().get_mut(self.key()) {
            entry.timed_out = false;
            entry.deadline = None;
        }
        RoomToWrite {
            slot: self,
            armed: false,
            deadline: None,
        }
    }
}

/// A wait for room to write in a connection's socket (`Socket::room`).
struct RoomToWrite<'a> {
    slot: &'a ConnectionSlot,
    /// The poll is armed (by this wait or a TLS read before it).
    armed: bool,
    deadline: Option<Instant>,
}

impl Future for RoomToWrite<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let wait = self.get_mut();
        let ctx = &wait.slot.ctx;
        let key = wait.slot.key();
        let mut connections = ctx.connections.borrow_mut();
        let Some(entry) = connections.get_mut(key) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if wait.armed && !entry.waits_for_room {
            entry.deadline = None;
            return Poll::Ready(Ok(()));
        }
        if entry.timed_out {
            entry.timed_out = false;
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        if !entry.waits_for_room {
            entry.waits_for_room = true;
            let user = receive::writable_user(key, &entry.input);
            ctx.egress
                .ring
                .borrow_mut()
                .poll(wait.slot.socket.as_raw_fd(), libc::POLLOUT, user);
        }
        wait.armed = true;
        let timeout = ctx.config.ping_interval + ctx.config.pong_timeout;
        let at = *wait.deadline.get_or_insert_with(|| Instant::now() + timeout);
        entry.deadline = Some(at);
        ctx.deadlines.note(at);
        if !entry.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            entry.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A read of one connection (`ShardContext::read`). A named future rather than an
/// `async fn`: an idle connection waits in one, so its size is memory each of them holds.
pub struct ReadFuture<'a> {
    ctx: &'a ShardContext,
    /// The connection's key in the shard's table.
    key: usize,
    interruptible: bool,
    out: Option<&'a Outbound>,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
}

impl Future for ReadFuture<'_> {
    type Output = io::Result<ReadOutcome>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let read = self.get_mut();
        read.ctx.poll_read(cx, read)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let ctx = &self.ctx;
        let mut entry = ctx.connections.borrow_mut().remove(self.key());
        ctx.receiver
            .close(self.key(), &mut entry.input, &ctx.egress, &ctx.budget);
        if entry.waits_for_room {
            // The poll holds the socket open, as a receive does.
            let user = receive::writable_user(self.key(), &entry.input);
            ctx.egress.ring.borrow_mut().cancel(user, CANCELLED);
        }
        if let Some(ticket) = self.ip {
            ctx.per_ip.release(ticket);
        }
        ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
        if ctx.stopping.get() && ctx.connections.borrow().is_empty() {
            if let Some(w) = ctx.drained.borrow_mut().take() {
                w.wake();
            }
        }
    }
}
