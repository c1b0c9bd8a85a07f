//! Driving upgraded connections at a window of messages in flight, outside glommio's
//! reactor (its one-shot poll per read made the client the limit at window 1). Two
//! drivers, chosen with `--io`:
//!
//! - `epoll` (the default, and always with `--tls`): one edge-triggered epoll set, a
//!   non-blocking `recv` per read and a `sendmsg` per answer, like uWebSockets'
//!   `load_test`.
//! - `uring`: the gateway's own `ShardRing`, a multishot receive per connection into one
//!   provided-buffer pool, and every echo of a pass answered by one batch of sends: two
//!   `io_uring_enter`s a pass whatever the number of connections. It halves the client's
//!   user time but not its kernel time, which is most of it (on loopback a send carries
//!   the receiving socket's TCP work too), and it sleeps more often with few
//!   connections; docs/perf/29 has the comparison that kept epoll the default.
//!
//! Both send the same encoded frame again and again: the client spends its time on
//! system calls, not on encoding, and the kernel copies every send from the same
//! cache-hot bytes (200 frames of 16 KiB, one per connection, would not fit in the
//! cache). Compressed, it is deflated once too: with no context taken over, every copy is
//! a valid message.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::ClientConnection;
use shardgate::sys::socket::{self, IoBatch, Push, IOV_BATCH};
use shardgate::sys::uring::{Completion, ShardRing, MAX_SENDS};
use shardgate::ws::deflate::Inflater;
use shardgate::ws::{Decoder, Event, OpCode, Role};
use shardgate_bench::epoll::{event_buffer, Poller};
use shardgate_bench::tls_client;

use super::{decode, encode_message, make_payload, Args, Payload, Upgraded};

/// How the client waits for its sockets (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Io {
    /// io_uring: multishot receives into a buffer pool, sends in one batch per pass.
    Uring,
    /// An edge-triggered epoll set with a `recv` and a `sendmsg` per socket.
    Epoll,
}

impl Io {
    /// As `--io` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Io::Uring => "uring",
            Io::Epoll => "epoll",
        }
    }
}

/// What a run of the drivers counted in the measured window.
pub struct Driven {
    pub messages: u64,
    pub failed: u64,
    /// Bytes received (on the wire: frames, and TLS records under `--tls`).
    pub received: u64,
}

/// Keeps `--window` messages in flight on every stream until `deadline`, with the driver
/// `args.io` names (epoll under `--tls`), timing each echo into `hist`.
pub fn drive(
    args: &Args,
    streams: &mut [Upgraded],
    measure_from: Instant,
    deadline: Instant,
    hist: &mut Histogram<u64>,
) -> Driven {
    let opcode = if args.text || args.payload == Payload::Json {
        OpCode::Text
    } else {
        OpCode::Binary
    };
    let payload = make_payload(args.payload, args.size);
    let frame = encode_message(opcode, &payload, 0x9e37_79b1u32.to_be_bytes(), args.deflate);
    let mut tally = Tally {
        size: args.size,
        deflate: args.deflate,
        inflater: Inflater::new(),
        measure_from,
        deadline,
        hist,
        messages: 0,
        received: 0,
        failed: 0,
    };
    let mut conns = new_conns(args, streams, &frame, &mut tally);
    match io_for(args) {
        Io::Uring => drive_ring(args.window, &mut conns, &frame, &mut tally),
        Io::Epoll => drive_epoll(&mut conns, &frame, &mut tally),
    }
    Driven {
        messages: tally.messages,
        failed: tally.failed,
        received: tally.received,
    }
}

/// The driver a run uses: `--io`, but epoll for TLS (its reads open records in rustls
/// from a buffer of their own).
pub fn io_for(args: &Args) -> Io {
    if args.tls {
        Io::Epoll
    } else {
        args.io
    }
}

/// One connection being driven.
struct Conn {
    fd: RawFd,
    /// Under `--tls`: what is sealed waits in rustls until the socket takes it.
    tls: Option<ClientConnection>,
    decoder: Decoder,
    /// When each message in flight was sent, oldest first.
    in_flight: VecDeque<Instant>,
    /// Bytes the socket did not take yet, from `sent` on: they wait for room.
    pending: Vec<u8>,
    sent: usize,
    /// Copies of the frame the ring driver sends at the end of this pass.
    queued: usize,
    dead: bool,
}

/// The counts and the histogram both drivers keep, and the echo decoding they share.
struct Tally<'a> {
    size: usize,
    deflate: bool,
    inflater: Inflater,
    measure_from: Instant,
    deadline: Instant,
    hist: &'a mut Histogram<u64>,
    messages: u64,
    received: u64,
    failed: u64,
}

impl Tally<'_> {
    /// Decodes `input`, what `c` received at `now` (`wire` bytes of it on the wire),
    /// times the echoes in it and puts as many new messages in flight. Returns how many
    /// to send (none once the run is over).
    fn echoes(&mut self, c: &mut Conn, input: &mut [u8], wire: usize, now: Instant) -> io::Result<usize> {
        let size = self.size;
        let mut echoed = 0usize;
        let mut bad = false;
        let inflater = self.deflate.then_some(&mut self.inflater);
        let result = decode(&mut c.decoder, input, inflater, &mut |event| match event {
            Event::Message { payload: p, .. } if p.len() == size => echoed += 1,
            _ => bad = true,
        });
        if result.is_err() || bad || echoed > c.in_flight.len() {
            return Err(io::Error::other("unexpected frame from the server"));
        }
        if now >= self.measure_from && now < self.deadline {
            for sent in c.in_flight.iter().take(echoed) {
                let _ = self.hist.record(now.duration_since(*sent).as_micros().max(1) as u64);
            }
            self.messages += echoed as u64;
            self.received += wire as u64;
        }
        c.in_flight.drain(..echoed);
        if now >= self.deadline {
            return Ok(0);
        }
        c.in_flight.extend(std::iter::repeat_n(now, echoed));
        Ok(echoed)
    }

    /// Counts `c` as failed (once) for `e`, telling of the first few.
    fn fail(&mut self, c: &mut Conn, e: &io::Error) {
        if c.dead {
            return;
        }
        c.dead = true;
        self.failed += 1;
        if self.failed <= 3 {
            eprintln!("echo-load: connection failed: {e}");
        }
    }
}

/// Every stream as a `Conn`, its first window of messages waiting in `pending` (or in
/// rustls) to be flushed by the driver.
fn new_conns(args: &Args, streams: &mut [Upgraded], frame: &[u8], tally: &mut Tally) -> Vec<Conn> {
    let start = Instant::now();
    let mut conns: Vec<Conn> = streams
        .iter_mut()
        .map(|(s, tls)| Conn {
            fd: s.as_raw_fd(),
            tls: tls.take(),
            pending: frame.repeat(args.window),
            decoder: Decoder::new(Role::Client, usize::MAX),
            in_flight: std::iter::repeat_n(start, args.window).collect(),
            sent: 0,
            queued: 0,
            dead: false,
        })
        .collect();
    for c in &mut conns {
        if let Some(tls) = &mut c.tls {
            // The first window goes through rustls like every later message.
            if let Err(e) = io::Write::write_all(&mut tls.writer(), &c.pending) {
                tally.fail(c, &e);
                continue;
            }
            c.pending.clear();
        }
    }
    conns
}

/// Tags of the ring driver's requests: a connection's index for its receive, with this
/// bit for its wait for room to write.
const WRITABLE: u64 = 1 << 40;
/// The receive pool of the ring driver: 256 buffers of 64 KiB, room for a pass of 500
/// connections' 16 KiB echoes (consumed a receive at a time, returned as soon as a pass
/// has decoded them; a pool that runs dry ends a receive, which is armed again).
const RING_BUFFERS: u16 = 256;
const RING_BUFFER_SIZE: u32 = 64 * 1024;

/// The io_uring driver. A pass waits for completions, decodes every chunk received (each
/// released at once), and sends each connection's answers as one send of the window's
/// worth of frames, all of them in one submission.
fn drive_ring(window: usize, conns: &mut [Conn], frame: &[u8], tally: &mut Tally) {
    let mut ring = match ShardRing::new(RING_BUFFERS, RING_BUFFER_SIZE) {
        Ok(ring) => ring,
        Err(e) => {
            eprintln!("echo-load: cannot set up io_uring ({e}); try --io epoll");
            for c in conns.iter_mut() {
                tally.fail(c, &e);
            }
            return;
        }
    };
    let pool = ring.pool().clone();
    // A send of k answers is the first k frames of these.
    let frames = frame.repeat(window);
    for (i, c) in conns.iter_mut().enumerate() {
        if c.dead {
            continue;
        }
        ring.recv(c.fd, i as u64);
        match flush(c) {
            Ok(()) if !c.pending.is_empty() => ring.poll(c.fd, libc::POLLOUT, WRITABLE | i as u64),
            Ok(()) => {}
            Err(e) => tally.fail(c, &e),
        }
    }
    let mut taken = Vec::new();
    let mut sending: Vec<usize> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= tally.deadline {
            break;
        }
        let wait = (tally.deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(100));
        ring.enter(Some(Some(wait)));
        if ring.is_broken() {
            let e = io::Error::other("io_uring_enter failed");
            for c in conns.iter_mut() {
                tally.fail(c, &e);
            }
            return;
        }
        let now = Instant::now();
        ring.completions(|c| taken.push(c));

        for completion in taken.drain(..) {
            match completion {
                Completion::Data { user, chunk, more } => {
                    let i = user as usize;
                    let c = &mut conns[i];
                    if !c.dead {
                        // SAFETY: the chunk is held until the release below, and nothing
                        // else refers to its bytes meanwhile.
                        let input = unsafe { pool.bytes(chunk) };
                        let wire = input.len();
                        match tally.echoes(c, input, wire, now) {
                            Ok(0) => {}
                            Ok(k) if c.pending.is_empty() => {
                                if c.queued == 0 {
                                    sending.push(i);
                                }
                                c.queued += k;
                            }
                            // Still waiting for room: the answers wait behind.
                            Ok(k) => {
                                for _ in 0..k {
                                    c.pending.extend_from_slice(frame);
                                }
                            }
                            Err(e) => tally.fail(c, &e),
                        }
                        if !more && !c.dead {
                            ring.recv(c.fd, user);
                        }
                    }
                    pool.release(chunk);
                }
                Completion::Status { user, result, .. } if user & WRITABLE != 0 => {
                    let c = &mut conns[(user & !WRITABLE) as usize];
                    let flushed = match result {
                        e if e < 0 => Err(io::Error::from_raw_os_error(-e)),
                        _ => flush(c),
                    };
                    match flushed {
                        Ok(()) if !c.pending.is_empty() => ring.poll(c.fd, libc::POLLOUT, user),
                        Ok(()) => {}
                        Err(e) => tally.fail(c, &e),
                    }
                }
                Completion::Status { user, result, more } => {
                    let c = &mut conns[user as usize];
                    match result {
                        0 => tally.fail(c, &io::Error::other("server closed the connection")),
                        // The pool ran dry for a moment: the bytes wait in the socket.
                        e if e == -libc::ENOBUFS => {}
                        e if e < 0 => tally.fail(c, &io::Error::from_raw_os_error(-e)),
                        _ => {}
                    }
                    if !more && !c.dead {
                        ring.recv(c.fd, user);
                    }
                }
            }
        }
        send_queued(&mut ring, conns, &mut sending, frame, &frames, tally);
    }
}

/// Sends the answers queued on each of `sending` (emptied), in one submission per
/// `MAX_SENDS`; what a socket does not take waits for room.
fn send_queued(
    ring: &mut ShardRing,
    conns: &mut [Conn],
    sending: &mut Vec<usize>,
    frame: &[u8],
    frames: &[u8],
    tally: &mut Tally,
) {
    let len = frame.len();
    let mut results: Vec<(usize, io::Result<usize>)> = Vec::new();
    for batch in sending.chunks(MAX_SENDS) {
        results.clear();
        ring.send_all(
            batch.iter().map(|&i| (conns[i].fd, &frames[..conns[i].queued * len])),
            |j, result| results.push((batch[j], result)),
        );
        for (i, result) in results.drain(..) {
            let c = &mut conns[i];
            let whole = c.queued * len;
            c.queued = 0;
            match result {
                Ok(n) if n == whole => {}
                Ok(n) => {
                    // The socket is full: the rest waits for room.
                    c.pending.extend_from_slice(&frames[n..whole]);
                    ring.poll(c.fd, libc::POLLOUT, WRITABLE | i as u64);
                }
                Err(e) => tally.fail(c, &e),
            }
        }
        // Sends the ring did not take (it failed): the socket takes them directly.
        for &i in batch {
            let c = &mut conns[i];
            if c.queued > 0 {
                let k = std::mem::take(&mut c.queued);
                if let Err(e) = send_frames(c, frame, k) {
                    tally.fail(c, &e);
                }
            }
        }
    }
    sending.clear();
}

/// Full reads one connection gets per turn of the epoll driver before the others'.
const READS_PER_TURN: usize = 4;

/// The epoll driver (see the module's documentation).
fn drive_epoll(conns: &mut [Conn], frame: &[u8], tally: &mut Tally) {
    let poller = match Poller::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("echo-load: epoll_create1: {e}");
            for c in conns.iter_mut() {
                tally.fail(c, &e);
            }
            return;
        }
    };
    for (i, c) in conns.iter_mut().enumerate() {
        if c.dead {
            continue;
        }
        if let Err(e) = poller.add_read_write(c.fd, i as u64).and_then(|()| flush(c)) {
            tally.fail(c, &e);
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut plain = Vec::with_capacity(64 * 1024);
    let mut events = event_buffer();
    // Connections whose socket still had input when their turn ended (see
    // `read_echoes`), and the ones to read this time round.
    let mut again: Vec<usize> = Vec::new();
    let mut turn: Vec<(usize, bool, bool)> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= tally.deadline {
            break;
        }
        let wait = if again.is_empty() {
            (tally.deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(100))
        } else {
            Duration::ZERO
        };
        if poller.wait(&mut events, Some(wait)).is_err() {
            continue; // EINTR
        }
        turn.clear();
        turn.extend(again.drain(..).map(|i| (i, false, true)));
        turn.extend(events.iter().map(|e| {
            let writable = e.events & libc::EPOLLOUT as u32 != 0;
            (e.u64 as usize, writable, e.events != libc::EPOLLOUT as u32)
        }));
        for &(i, writable, readable) in &turn {
            let c = &mut conns[i];
            if c.dead {
                continue;
            }
            let mut result = if writable { flush(c) } else { Ok(()) };
            if result.is_ok() && readable {
                result = read_echoes(c, frame, &mut buf, &mut plain, tally).map(|drained| {
                    if !drained {
                        again.push(i);
                    }
                });
            }
            if let Err(e) = result {
                tally.fail(c, &e);
            }
        }
    }
}

/// Reads what `c`'s socket has, up to a few full buffers (then the other connections get
/// their turn: a client slower than the server, with TLS, would otherwise stay on one
/// connection that never runs dry), and sends as many new messages as came back.
/// Returns whether the socket was drained.
fn read_echoes(c: &mut Conn, frame: &[u8], buf: &mut [u8], plain: &mut Vec<u8>, tally: &mut Tally) -> io::Result<bool> {
    for _ in 0..READS_PER_TURN {
        let n = match socket::recv(c.fd, buf) {
            Ok(0) => return Err(io::Error::other("server closed the connection")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let input = match &mut c.tls {
            Some(tls) => {
                plain.clear();
                tls_client::take_in(tls, &buf[..n], plain)?;
                &mut plain[..]
            }
            None => &mut buf[..n],
        };
        let more = tally.echoes(c, input, n, now)?;
        if more > 0 {
            send_frames(c, frame, more)?;
        }
        if n < buf.len() {
            // A short read drained the socket: the next arrival is a new edge.
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sends `count` more copies of the frame on `c`. While nothing waits before them
/// they go straight from the one encoded frame; only what the socket does not take is
/// copied, to wait for room. (Copying each 16 KiB message into the pending buffer took a
/// third of the client's CPU and made the client, not the server, the limit of the 16 KiB
/// cases.)
fn send_frames(c: &mut Conn, frame: &[u8], mut count: usize) -> io::Result<()> {
    if let Some(tls) = &mut c.tls {
        // In one go, as the plain path's one `sendmsg`: small messages share a record.
        let copies = vec![io::IoSlice::new(frame); count];
        io::Write::write_vectored(&mut tls.writer(), &copies)?;
        return tls_client::flush(c.fd, tls).map(|_| ());
    }
    let len = frame.len();
    while c.pending.is_empty() && count > 0 {
        let k = count.min(IOV_BATCH);
        let mut iov = IoBatch::new();
        for _ in 0..k {
            iov.push(frame);
        }
        let sent = iov.send(c.fd, Push::Now)?;
        let (whole, part) = (sent / len, sent % len);
        count -= whole;
        if part > 0 {
            c.pending.extend_from_slice(&frame[part..]);
            count -= 1;
        }
        if whole < k {
            break; // the socket is full
        }
    }
    for _ in 0..count {
        c.pending.extend_from_slice(frame);
    }
    Ok(())
}

/// Sends what is pending, as much as the socket takes now.
fn flush(c: &mut Conn) -> io::Result<()> {
    if let Some(tls) = &mut c.tls {
        return tls_client::flush(c.fd, tls).map(|_| ());
    }
    while c.sent < c.pending.len() {
        match socket::send(c.fd, &c.pending[c.sent..], Push::Now)? {
            0 => return Ok(()),
            n => c.sent += n,
        }
    }
    c.pending.clear();
    c.sent = 0;
    Ok(())
}
