//! Socket system calls: non-blocking receive and send (one buffer or an iovec batch),
//! accept, and the socket options the listeners need. Every call here is non-blocking,
//! retries `EINTR` itself, and reports a full (or empty) socket as a count, not an error.

use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// iovecs handed to one `sendmsg` (the kernel's IOV_MAX is 1024; these live on the stack).
pub const IOV_BATCH: usize = 64;

/// `SO_ATTACH_REUSEPORT_CBPF` from asm-generic/socket.h (x86, arm, riscv); the libc crate
/// has it for Android only.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// One non-blocking `recv` into `buf`: how many bytes came (0 at end of stream), or the
/// error (`WouldBlock` when nothing is there).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
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

/// When a send's bytes may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// At once.
    Now,
    /// With what follows (`MSG_MORE`): the caller closes the socket or its sending side
    /// next, and one segment then carries the bytes and the FIN.
    WithFin,
}

impl Push {
    fn flags(self) -> libc::c_int {
        let more = match self {
            Push::Now => 0,
            Push::WithFin => libc::MSG_MORE,
        };
        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | more
    }
}

/// One non-blocking `send` of one buffer: how much the socket took (0 when it is full).
pub fn send(fd: RawFd, bytes: &[u8], push: Push) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` outlives the call.
        let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), push.flags()) };
        match sent(n) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// What a non-blocking send returned: bytes taken, 0 for a full socket, or the error.
fn sent(n: isize) -> io::Result<usize> {
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(err)
    }
}

/// Up to `IOV_BATCH` slices for one `sendmsg`, on the stack (no allocation per send, and
/// no clearing of the 64 entries either: only the first `len` are ever read). The slices
/// are borrowed for `'a`, so they outlive every send of the batch.
pub struct IoBatch<'a> {
    iov: MaybeUninit<[libc::iovec; IOV_BATCH]>,
    len: usize,
    bytes: usize,
    _slices: std::marker::PhantomData<&'a [u8]>,
}

impl Default for IoBatch<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> IoBatch<'a> {
    pub fn new() -> Self {
        let mut batch = MaybeUninit::<IoBatch>::uninit();
        // SAFETY: `len` and `bytes` are the only fields that need a value (the marker is
        // zero-sized); `iov` may stay uninitialised. Building the struct by value let LLVM
        // fold the counters and the undefined array into one 1 KiB `memset`.
        unsafe {
            std::ptr::addr_of_mut!((*batch.as_mut_ptr()).len).write(0);
            std::ptr::addr_of_mut!((*batch.as_mut_ptr()).bytes).write(0);
            batch.assume_init()
        }
    }

    pub fn is_full(&self) -> bool {
        self.len == IOV_BATCH
    }

    /// Bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds a slice.
    ///
    /// # Panics
    /// When the batch already holds `IOV_BATCH` slices.
    pub fn push(&mut self, s: &'a [u8]) {
        assert!(self.len < IOV_BATCH);
        // SAFETY: in bounds (checked above) of memory we own; `iovec` has no destructor.
        unsafe {
            self.iov
                .as_mut_ptr()
                .cast::<libc::iovec>()
                .add(self.len)
                .write(libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                });
        }
        self.len += 1;
        self.bytes += s.len();
    }

    /// The slices, in order.
    pub fn slices(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        // SAFETY: `push` initialised the first `len` entries, each pointing into a slice
        // borrowed for `'a`.
        let iov = unsafe { std::slice::from_raw_parts(self.iov.as_ptr().cast::<libc::iovec>(), self.len) };
        iov.iter()
            .map(|one| unsafe { std::slice::from_raw_parts(one.iov_base as *const u8, one.iov_len) })
    }

    /// One non-blocking send of the slices: how much the socket took (0 when full). A
    /// single slice goes with `send`, which the kernel takes faster than `sendmsg` (no
    /// message header or iovec array to copy in).
    pub fn send(&self, fd: RawFd, push: Push) -> io::Result<usize> {
        // SAFETY: `push` initialised the first `len` entries.
        let iov = unsafe { std::slice::from_raw_parts(self.iov.as_ptr().cast::<libc::iovec>(), self.len) };
        match iov {
            [] => Ok(0),
            [one] => {
                // SAFETY: the entry points into a slice borrowed for `'a`.
                send(
                    fd,
                    unsafe { std::slice::from_raw_parts(one.iov_base as *const u8, one.iov_len) },
                    push,
                )
            }
            _ => loop {
                // SAFETY: a zeroed msghdr is valid; we set only the iovec array, which
                // outlives the call and whose entries point into slices that do too.
                let n = unsafe {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                    msg.msg_iovlen = iov.len();
                    libc::sendmsg(fd, &msg, push.flags())
                };
                match sent(n) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            },
        }
    }
}

/// The IP address of a connected socket's peer (`NotConnected` once the peer reset it).
pub fn peer_ip(socket: RawFd) -> io::Result<IpAddr> {
    // SAFETY: sockaddr_storage is plain data, valid when zeroed.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` describe a buffer the kernel may fill; it checks `socket`.
    let rc = unsafe { libc::getpeername(socket, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ip_of(&addr))
}

/// The IP address in a socket address the kernel filled (unspecified if not IP).
fn ip_of(addr: &libc::sockaddr_storage) -> IpAddr {
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            IpAddr::from(v6.sin6_addr.s6_addr)
        }
        _ => IpAddr::from([0u8; 4]),
    }
}

/// Closes the sending side of a connected socket (its FIN goes after what is queued).
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A connected socket as a glommio stream (which takes ownership of the descriptor).
pub fn glommio_stream(socket: OwnedFd) -> glommio::net::TcpStream {
    // SAFETY: `socket` is a connected TCP socket that nobody else owns; the stream now does.
    unsafe { glommio::net::TcpStream::from_raw_fd(socket.into_raw_fd()) }
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address with port 0 gets its port at
/// connect time, not bind time (bind(port 0) scans the bind table for a free port, which
/// grows slower with every socket on the address).
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    setsockopt(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        &(1 as libc::c_int),
    )
}

/// `TCP_DEFER_ACCEPT`: the kernel holds a new connection back until its first bytes
/// arrive, or `secs` pass.
pub fn set_defer_accept(socket: &impl AsRawFd, secs: libc::c_int) -> io::Result<()> {
    setsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, &secs)
}

/// `SO_LINGER` of zero: closing the socket then resets the connection at once (a load
/// generator's way to break connections as a network fault would).
pub fn reset_on_close(socket: &impl AsRawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// Attaches a classic BPF program to the listener's `SO_REUSEPORT` group: it returns the
/// index of the listener (in the order they joined the port) that gets a new connection.
pub fn attach_reuseport_program(listener: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // The kernel copies the program: it need not outlive the call.
    setsockopt(listener.as_raw_fd(), libc::SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` for the length we pass; the kernel checks the rest.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
