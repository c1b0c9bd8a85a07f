//! shardgate patch: an application's own readiness source (an epoll set) can drive the
//! executor's sleep.
//!
//! Upstream an idle executor sleeps in `io_uring_enter`, and an application that keeps its
//! sockets in an epoll set of its own has to arm an io_uring poll on that set to be woken:
//! per idle period a poll submitted, a completion through task work, and a second
//! `epoll_wait` to learn what became ready. With an external poller installed the executor
//! sleeps in the poller instead (one `epoll_wait` that returns the ready sockets), and the
//! poller watches the executor's rings so that their completions still wake it.

use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::time::Duration;

/// A readiness source the executor asks on each busy pass and sleeps in when idle.
pub trait ExternalPoller {
    /// Takes what is ready now, without blocking, and wakes the tasks waiting for it.
    /// Called once per pass of the executor loop while tasks run. Returns how many tasks
    /// it woke.
    fn poll(&self) -> usize;

    /// Blocks until something of its own is ready, one of the descriptors returned by
    /// [`set_external_poller`] is readable, the thread is interrupted, or `timeout`
    /// passes; then wakes the tasks waiting for what became ready. Returns how many it
    /// woke.
    fn park(&self, timeout: Option<Duration>) -> usize;

    /// Called at the start of every pass of the executor loop, before [`poll`] or
    /// [`park`]: what the application gathered while the last pass's tasks ran (writes
    /// to batch, say) can go out here. Returns how many tasks it woke.
    ///
    /// [`poll`]: ExternalPoller::poll
    /// [`park`]: ExternalPoller::park
    fn end_pass(&self) -> usize {
        0
    }
}

/// Installs `poller` on the current thread's executor and returns the descriptors it must
/// watch, level-triggered, for input: the executor's rings, readable while they hold
/// completions. The rings must not use `IORING_SETUP_COOP_TASKRUN` (glommio's do not):
/// a completion that runs as task work then interrupts the poller's wait.
///
/// # Panics
/// Outside an executor.
pub fn set_external_poller(poller: Rc<dyn ExternalPoller>) -> Vec<RawFd> {
    let reactor = crate::executor().reactor();
    reactor.sys.set_external_poller(poller)
}
