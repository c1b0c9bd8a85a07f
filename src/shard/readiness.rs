//! Which of a shard's sockets have input: one edge-triggered epoll set per shard.
//!
//! Why not glommio's own readiness: it arms a one-shot io_uring poll on a socket after
//! every read and fires it when the next bytes arrive, so every message pays for arming a
//! poll, a completion through task work, and re-arming. The peers' epoll pays one cheap
//! callback per arrival instead, and at one message in flight per connection that was the
//! difference (bench/README.md, "Why window 1 was slower"). Here each socket joins the set
//! once; the shard asks the set for ready sockets without blocking while it is busy, and
//! parks on the set's own descriptor (one io_uring poll for all its sockets) when it is not.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Events asked for: input, the peer's FIN, and (always reported) errors and hang-ups.
const INTEREST: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// Ready sockets taken per `epoll_wait`; more simply wait for the next round.
pub const BATCH: usize = 1024;

pub struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no preconditions; a non-negative result is a new fd.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Poller {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The set's own descriptor: readable while any member socket is ready.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Adds `socket`; its events come back tagged with `key`.
    pub fn add(&self, socket: RawFd, key: usize) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: INTEREST,
            u64: key as u64,
        };
        // SAFETY: `event` is a valid epoll_event; the kernel checks both descriptors.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, socket, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills `events` with what is ready now, without waiting.
    pub fn ready_now(&self, events: &mut Vec<libc::epoll_event>) -> io::Result<()> {
        events.clear();
        loop {
            // SAFETY: `events` has room for BATCH entries; the kernel writes at most that.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
            if n >= 0 {
                // SAFETY: the kernel initialised the first `n` entries.
                unsafe { events.set_len(n as usize) };
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A buffer for `Poller::ready_now`.
pub fn event_buffer() -> Vec<libc::epoll_event> {
    Vec::with_capacity(BATCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn keys(events: &[libc::epoll_event]) -> Vec<u64> {
        let mut k: Vec<u64> = events.iter().map(|e| e.u64).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn reports_each_arrival_once_until_more_arrives() {
        let poller = Poller::new().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut c, d) = UnixStream::pair().unwrap();
        poller.add(b.as_raw_fd(), 7).unwrap();
        poller.add(d.as_raw_fd(), 9).unwrap();
        let mut events = event_buffer();
        poller.ready_now(&mut events).unwrap();
        assert!(events.is_empty(), "nothing has arrived yet");

        a.write_all(b"x").unwrap();
        c.write_all(b"y").unwrap();
        poller.ready_now(&mut events).unwrap();
        assert_eq!(keys(&events), [7, 9]);
        // Edge-triggered: unread input is not reported again...
        poller.ready_now(&mut events).unwrap();
        assert!(events.is_empty());
        // ...until more arrives.
        a.write_all(b"z").unwrap();
        poller.ready_now(&mut events).unwrap();
        assert_eq!(keys(&events), [7]);

        // A peer that goes away is reported; a closed socket leaves the set by itself.
        drop(d);
        drop(c);
        drop(a);
        poller.ready_now(&mut events).unwrap();
        assert_eq!(keys(&events), [7]);
        assert_ne!(events[0].events & (libc::EPOLLRDHUP as u32 | libc::EPOLLHUP as u32), 0);
    }
}
