//! `echo-load`'s epoll set: sockets join it once, edge-triggered. `wait` takes what is
//! ready (without blocking, or sleeping up to a timeout with `epoll_pwait2`'s
//! nanoseconds where the kernel has it). (The gateway itself uses no epoll: its shards'
//! sockets are all in their io_uring.)

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Events asked for: input, the peer's FIN, and (always reported) errors and hang-ups.
const INTEREST: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
/// The same, and room to write again (for a sender that waits for a full socket).
const INTEREST_RW: u32 = INTEREST | libc::EPOLLOUT as u32;

/// Ready sockets taken per `epoll_wait`; more simply wait for the next round.
pub const BATCH: usize = 1024;

pub struct Poller {
    epoll: OwnedFd,
    /// `epoll_pwait2` is missing (Linux before 5.11, or valgrind): sleeps use
    /// `epoll_wait`, with the timeout rounded up to whole milliseconds.
    no_pwait2: Cell<bool>,
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
            no_pwait2: Cell::new(false),
        })
    }

    /// Adds `socket` (input, edge-triggered); its events come back tagged with `key`.
    pub fn add(&self, socket: RawFd, key: u64) -> io::Result<()> {
        self.add_events(socket, key, INTEREST)
    }

    /// Adds `socket` for input and for room to write, edge-triggered.
    pub fn add_read_write(&self, socket: RawFd, key: u64) -> io::Result<()> {
        self.add_events(socket, key, INTEREST_RW)
    }

    fn add_events(&self, socket: RawFd, key: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: key };
        // SAFETY: `event` is a valid epoll_event; the kernel checks both descriptors.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, socket, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills `events` with what becomes ready within `timeout` (`None`: no limit). An
    /// interruption (a signal, or io_uring task work for this thread) ends the wait early
    /// with `Interrupted`.
    pub fn wait(&self, events: &mut Vec<libc::epoll_event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        let n = match timeout {
            Some(Duration::ZERO) => self.epoll_wait(events, 0),
            _ if self.no_pwait2.get() => self.epoll_wait(events, timeout.map_or(-1, ceil_millis)),
            _ => {
                let n = self.epoll_pwait2(events, timeout);
                if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                    self.no_pwait2.set(true);
                    self.epoll_wait(events, timeout.map_or(-1, ceil_millis))
                } else {
                    n
                }
            }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel initialised the first `n` entries.
        unsafe { events.set_len(n as usize) };
        Ok(())
    }
}

impl Poller {
    fn epoll_wait(&self, events: &mut Vec<libc::epoll_event>, timeout_ms: libc::c_int) -> libc::c_long {
        // SAFETY: `events` has room for BATCH entries; the kernel writes at most that.
        unsafe {
            libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, timeout_ms) as libc::c_long
        }
    }

    /// `epoll_pwait2`: a timeout finer than `epoll_wait`'s milliseconds (the executor's
    /// next timer is often a fraction of one).
    fn epoll_pwait2(&self, events: &mut Vec<libc::epoll_event>, timeout: Option<Duration>) -> libc::c_long {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: as in `epoll_wait`; `ts` outlives the call and a null sigmask is allowed.
        unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                BATCH as libc::c_int,
                ts_ptr,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        }
    }
}

/// `d` in whole milliseconds, rounded up (a sleep must not end before its timer is due).
fn ceil_millis(d: Duration) -> libc::c_int {
    d.as_nanos().div_ceil(1_000_000).min(libc::c_int::MAX as u128) as libc::c_int
}

/// A buffer for `Poller::wait`.
pub fn event_buffer() -> Vec<libc::epoll_event> {
    Vec::with_capacity(BATCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn ready_now(poller: &Poller, events: &mut Vec<libc::epoll_event>) {
        poller.wait(events, Some(Duration::ZERO)).unwrap();
    }

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
        ready_now(&poller, &mut events);
        assert!(events.is_empty(), "nothing has arrived yet");

        a.write_all(b"x").unwrap();
        c.write_all(b"y").unwrap();
        ready_now(&poller, &mut events);
        assert_eq!(keys(&events), [7, 9]);
        // Edge-triggered: unread input is not reported again...
        ready_now(&poller, &mut events);
        assert!(events.is_empty());
        // ...until more arrives.
        a.write_all(b"z").unwrap();
        ready_now(&poller, &mut events);
        assert_eq!(keys(&events), [7]);

        // A peer that goes away is reported; a closed socket leaves the set by itself.
        drop(d);
        drop(c);
        drop(a);
        ready_now(&poller, &mut events);
        assert_eq!(keys(&events), [7]);
        assert_ne!(events[0].events & (libc::EPOLLRDHUP as u32 | libc::EPOLLHUP as u32), 0);
    }

    #[test]
    fn without_epoll_pwait2_sleeps_round_up_to_whole_milliseconds() {
        assert_eq!(ceil_millis(Duration::from_micros(1)), 1);
        assert_eq!(ceil_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ceil_millis(Duration::from_millis(3)), 3);

        // The fallback (as on Linux before 5.11) still sleeps for at least the timeout and
        // still returns what is ready.
        let poller = Poller::new().unwrap();
        poller.no_pwait2.set(true);
        let (mut a, b) = UnixStream::pair().unwrap();
        poller.add(b.as_raw_fd(), 3).unwrap();
        let mut events = event_buffer();
        let started = std::time::Instant::now();
        poller.wait(&mut events, Some(Duration::from_micros(1500))).unwrap();
        assert!(events.is_empty());
        assert!(started.elapsed() >= Duration::from_micros(1500));
        a.write_all(b"x").unwrap();
        poller.wait(&mut events, None).unwrap();
        assert_eq!(keys(&events), [3]);
    }
}
