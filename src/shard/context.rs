//! What one shard shares among its connections: the receive and send buffers (one each per
//! shard, uWebSockets-style, so an idle connection holds no buffer), the epoll set that
//! says which sockets have input, and the registry of live connections that lets readiness,
//! read deadlines and a stop reach every one of them.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use slab::Slab;

use super::cork::Cork;
use super::hub::Hub;
use super::outbound::Outbound;
use super::readiness::{event_buffer, Poller};
use crate::chat::auth::Authenticator;
use crate::config::Config;

/// Size of the shard's receive buffer: one read takes up to this much from a socket.
pub const RX_BUFFER: usize = 64 * 1024;

/// What a read returned. For `Data(n)` the bytes are in `ShardContext::rx[..n]` until the
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
    /// Whether the socket is in the shard's epoll set (reads then use it).
    watched: bool,
    /// Whether a read may find input: set by an epoll event, cleared by a read that comes
    /// up short (edge-triggered, as tokio does with epoll).
    readable: bool,
    /// When the waiting read gives up.
    deadline: Option<Instant>,
    timed_out: bool,
}

/// How often read deadlines are checked; a read times out at most this late.
const DEADLINE_TICK: Duration = Duration::from_millis(20);

pub struct ShardContext {
    pub id: usize,
    pub config: Arc<Config>,
    pub rx: RefCell<Vec<u8>>,
    pub cork: RefCell<Cork>,
    pub hub: Hub,
    pub auth: Arc<Authenticator>,
    /// Slots to wake after a round (reused, so a round allocates nothing).
    to_wake: RefCell<Vec<usize>>,
    /// Every live connection: its waker, readiness and read deadline.
    connections: RefCell<Slab<Entry>>,
    poller: Poller,
    /// No read deadline falls before this (see `expire_deadlines`).
    earliest_deadline: Cell<Option<Instant>>,
    stopping: Cell<bool>,
    drained: RefCell<Option<Waker>>,
    /// Connections open in the whole process (every shard), against `max_connections`.
    open_connections: Arc<AtomicUsize>,
    max_connections: usize,
}

impl ShardContext {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        hub: Hub,
        auth: Arc<Authenticator>,
        open_connections: Arc<AtomicUsize>,
        max_connections: usize,
    ) -> io::Result<Self> {
        Ok(ShardContext {
            id,
            config,
            rx: RefCell::new(vec![0; RX_BUFFER]),
            cork: RefCell::new(Cork::new()),
            hub,
            auth,
            to_wake: RefCell::new(Vec::new()),
            connections: RefCell::new(Slab::new()),
            poller: Poller::new()?,
            earliest_deadline: Cell::new(None),
            stopping: Cell::new(false),
            drained: RefCell::new(None),
            open_connections,
            max_connections,
        })
    }

    /// Claims a place for a new connection, or `None` when the process is at its cap.
    pub fn admit(self: &Rc<Self>) -> Option<ConnectionSlot> {
        let before = self.open_connections.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_connections {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let key = self.connections.borrow_mut().insert(Entry::default());
        Some(ConnectionSlot { ctx: self.clone(), key })
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

    /// Ends a round of work (a read, an inbox batch): see `Hub::end_round`; connections
    /// whose queues need their task are woken.
    pub fn end_round(&self) {
        let mut wake = self.to_wake.borrow_mut();
        self.hub.end_round(&mut wake);
        for slot in wake.drain(..) {
            self.wake(slot);
        }
    }

    /// Wakes the task of the connection in `slot`, if it is waiting.
    pub fn wake(&self, slot: usize) {
        let waker = self.connections.borrow_mut().get_mut(slot).and_then(|e| e.waker.take());
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Reads from `stream` into the shared receive buffer. With `interruptible`, a stop of
    /// the shard ends the wait with `Stopping`; with `out`, a queue that needs the task
    /// ends it with `Outbound`; with `timeout`, no input for that long ends it with
    /// `TimedOut`.
    pub async fn read(
        &self,
        stream: &mut TcpStream,
        slot: Option<&ConnectionSlot>,
        interruptible: bool,
        out: Option<&Outbound>,
        timeout: Option<Duration>,
    ) -> io::Result<ReadOutcome> {
        let watched = slot.filter(|s| self.connections.borrow().get(s.key).is_some_and(|e| e.watched));
        let Some(slot) = watched else {
            // Not in the epoll set (a connection refused for lack of room): glommio's own
            // readiness and timer.
            stream.set_read_timeout(timeout)?;
            return self.read_unwatched(stream, interruptible).await;
        };
        let key = slot.key;
        if let Some(entry) = self.connections.borrow_mut().get_mut(key) {
            entry.timed_out = false;
            entry.deadline = None;
        }
        let mut deadline = None;
        poll_fn(|cx| {
            if interruptible && self.stopping.get() {
                return Poll::Ready(Ok(ReadOutcome::Stopping));
            }
            if out.is_some_and(Outbound::needs_task) {
                return Poll::Ready(Ok(ReadOutcome::Outbound));
            }
            let mut connections = self.connections.borrow_mut();
            let Some(entry) = connections.get_mut(key) else {
                return Poll::Ready(Ok(ReadOutcome::Eof));
            };
            if entry.readable {
                let mut rx = self.rx.borrow_mut();
                match recv(stream.as_raw_fd(), &mut rx) {
                    Ok(0) => return Poll::Ready(Ok(ReadOutcome::Eof)),
                    Ok(n) => {
                        // A short read drained the socket: wait for the next edge.
                        entry.readable = n == rx.len();
                        entry.deadline = None;
                        return Poll::Ready(Ok(ReadOutcome::Data(n)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => entry.readable = false,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if entry.timed_out {
                entry.timed_out = false;
                return Poll::Ready(Ok(ReadOutcome::TimedOut));
            }
            if let Some(timeout) = timeout {
                let at = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                entry.deadline = Some(at);
                if self.earliest_deadline.get().is_none_or(|e| at < e) {
                    self.earliest_deadline.set(Some(at));
                }
            }
            if !entry.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                entry.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    async fn read_unwatched(&self, stream: &mut TcpStream, interruptible: bool) -> io::Result<ReadOutcome> {
        poll_fn(|cx| {
            if interruptible && self.stopping.get() {
                return Poll::Ready(Ok(ReadOutcome::Stopping));
            }
            let mut rx = self.rx.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut rx[..]) {
                Poll::Ready(Ok(0)) => Poll::Ready(Ok(ReadOutcome::Eof)),
                Poll::Ready(Ok(n)) => Poll::Ready(Ok(ReadOutcome::Data(n))),
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Poll::Ready(Ok(ReadOutcome::TimedOut)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Marks the connections whose sockets have input and wakes their tasks, for as long as
    /// the shard runs. While events keep coming it asks again after the woken tasks ran;
    /// when none are left it parks on the epoll set itself.
    pub async fn dispatch_readiness(&self) {
        let mut events = event_buffer();
        loop {
            if let Err(e) = self.poller.ready_now(&mut events) {
                println!("shard {}: epoll_wait failed: {e}; no more input can be read", self.id);
                return;
            }
            if events.is_empty() {
                if let Err(e) = glommio::net::wait_readable(self.poller.as_raw_fd()).await {
                    println!("shard {}: cannot wait on the epoll set: {e}", self.id);
                    return;
                }
                continue;
            }
            self.mark_readable(&events);
            // Let the woken connections read before asking the set again.
            glommio::executor().yield_now().await;
        }
    }

    fn mark_readable(&self, events: &[libc::epoll_event]) {
        let mut connections = self.connections.borrow_mut();
        for event in events {
            if let Some(entry) = connections.get_mut(event.u64 as usize) {
                entry.readable = true;
                if let Some(w) = entry.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Ends the reads whose deadline has passed with `TimedOut`, for as long as the shard
    /// runs. Reads only note their deadline (no timer per read); this checks every
    /// `DEADLINE_TICK`, and walks the connections only once the earliest deadline is due.
    pub async fn expire_deadlines(&self) {
        loop {
            glommio::timer::sleep(DEADLINE_TICK).await;
            let now = Instant::now();
            if self.earliest_deadline.get().is_none_or(|e| e > now) {
                continue;
            }
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
            self.earliest_deadline.set(earliest);
        }
    }
}

/// One non-blocking `recv` into `buf`, retried when a signal interrupts it.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A connection's place in its shard; dropping it frees the place.
pub struct ConnectionSlot {
    ctx: Rc<ShardContext>,
    key: usize,
}

impl ConnectionSlot {
    pub fn key(&self) -> usize {
        self.key
    }

    /// Puts the connection's socket in the shard's epoll set, so that its reads use it.
    pub fn watch(&self, socket: RawFd) -> io::Result<()> {
        self.ctx.poller.add(socket, self.key)?;
        if let Some(entry) = self.ctx.connections.borrow_mut().get_mut(self.key) {
            entry.watched = true;
            // Input may have arrived before the socket joined the set.
            entry.readable = true;
        }
        Ok(())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let ctx = &self.ctx;
        // The socket leaves the epoll set when it is closed, right after this; an event
        // already taken for this key finds no entry, or marks a successor readable, which
        // costs it one empty read.
        ctx.connections.borrow_mut().remove(self.key);
        ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
        if ctx.stopping.get() && ctx.connections.borrow().is_empty() {
            if let Some(w) = ctx.drained.borrow_mut().take() {
                w.wake();
            }
        }
    }
}
