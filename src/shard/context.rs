//! What one shard shares among its connections: the receive and send buffers (one each per
//! shard, uWebSockets-style, so an idle connection holds no buffer), and the registry of
//! live connections that lets a stop reach every one of them.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use slab::Slab;

use super::cork::Cork;
use super::hub::Hub;
use super::outbound::Outbound;
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

pub struct ShardContext {
    pub id: usize,
    pub config: Arc<Config>,
    pub rx: RefCell<Vec<u8>>,
    pub cork: RefCell<Cork>,
    pub hub: Hub,
    pub auth: Arc<Authenticator>,
    /// Slots to wake after a round (reused, so a round allocates nothing).
    to_wake: RefCell<Vec<usize>>,
    /// Each live connection's waker, so that a stop can interrupt its read.
    connections: RefCell<Slab<Option<Waker>>>,
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
    ) -> Self {
        ShardContext {
            id,
            config,
            rx: RefCell::new(vec![0; RX_BUFFER]),
            cork: RefCell::new(Cork::new()),
            hub,
            auth,
            to_wake: RefCell::new(Vec::new()),
            connections: RefCell::new(Slab::new()),
            stopping: Cell::new(false),
            drained: RefCell::new(None),
            open_connections,
            max_connections,
        }
    }

    /// Claims a place for a new connection, or `None` when the process is at its cap.
    pub fn admit(self: &Rc<Self>) -> Option<ConnectionSlot> {
        let before = self.open_connections.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_connections {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let key = self.connections.borrow_mut().insert(None);
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
            .filter_map(|(_, w)| w.take())
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
        let waker = self.connections.borrow_mut().get_mut(slot).and_then(Option::take);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Reads from `stream` into the shared receive buffer. With `interruptible`, a stop of
    /// the shard ends the wait with `Stopping`; with `out`, a queue that needs the task
    /// ends it with `Outbound`.
    pub async fn read(
        &self,
        stream: &mut TcpStream,
        slot: Option<&ConnectionSlot>,
        interruptible: bool,
        out: Option<&Outbound>,
    ) -> io::Result<ReadOutcome> {
        poll_fn(|cx| {
            if interruptible && self.stopping.get() {
                return Poll::Ready(Ok(ReadOutcome::Stopping));
            }
            if out.is_some_and(Outbound::needs_task) {
                return Poll::Ready(Ok(ReadOutcome::Outbound));
            }
            let mut rx = self.rx.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut rx[..]) {
                Poll::Ready(Ok(0)) => Poll::Ready(Ok(ReadOutcome::Eof)),
                Poll::Ready(Ok(n)) => Poll::Ready(Ok(ReadOutcome::Data(n))),
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Poll::Ready(Ok(ReadOutcome::TimedOut)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    let mut connections = self.connections.borrow_mut();
                    if let Some(entry) = slot.and_then(|s| connections.get_mut(s.key)) {
                        if !entry.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *entry = Some(cx.waker().clone());
                        }
                    }
                    Poll::Pending
                }
            }
        })
        .await
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
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let ctx = &self.ctx;
        ctx.connections.borrow_mut().remove(self.key);
        ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
        if ctx.stopping.get() && ctx.connections.borrow().is_empty() {
            if let Some(w) = ctx.drained.borrow_mut().take() {
                w.wake();
            }
        }
    }
}
