//! Many sends in one `io_uring_enter`: a ring of our own, used only to submit a batch of
//! non-blocking sends and wait for all their completions.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// Sends per `io_uring_enter` (the ring's submission queue).
pub const RING_ENTRIES: u32 = 256;

pub struct SendRing {
    ring: IoUring,
    /// `io_uring_enter` failed for good: `send_all` does nothing from then on.
    broken: bool,
}

impl SendRing {
    pub fn new() -> io::Result<Self> {
        Ok(SendRing {
            ring: IoUring::builder().setup_single_issuer().build(RING_ENTRIES)?,
            broken: false,
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends each `(fd, bytes)` of `sends` (the first `RING_ENTRIES`) with `MSG_DONTWAIT`,
    /// all in one submission, and waits for every completion. `done(i, result)` hears
    /// how send `i` ended: bytes taken (0 for a full socket) or the error. Sends that
    /// `done` did not hear of (the ring failed) are the caller's to send another way.
    pub fn send_all<'a>(
        &mut self,
        sends: impl Iterator<Item = (RawFd, &'a [u8])>,
        mut done: impl FnMut(usize, io::Result<usize>),
    ) {
        let mut submitted = 0;
        {
            let mut sq = self.ring.submission();
            for (i, (fd, bytes)) in sends.enumerate() {
                let entry = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32)
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(i as u64);
                // SAFETY: every buffer is borrowed for this call, which waits for all the
                // completions (below) before it returns.
                if unsafe { sq.push(&entry) }.is_err() {
                    break;
                }
                submitted += 1;
            }
        }
        let mut left = submitted;
        while left > 0 {
            let failed = match self.ring.submit_and_wait(left) {
                Ok(_) => false,
                // Interrupted, or short of kernel memory for a moment: reap and retry.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => false,
                Err(e) => {
                    tracing::error!("send ring: io_uring_enter failed ({e}); sending directly from now on");
                    self.broken = true;
                    true
                }
            };
            for cqe in self.ring.completion() {
                left -= 1;
                let result = match cqe.result() {
                    n if n >= 0 => Ok(n as usize),
                    e if e == -libc::EAGAIN => Ok(0),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
                done(cqe.user_data() as usize, result);
            }
            if failed {
                break;
            }
        }
    }
}
