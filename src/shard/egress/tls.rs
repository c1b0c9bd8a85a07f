//! The TLS connections of a shard, by socket: every send and receive of the egress goes
//! through here, and for a TLS socket it seals or opens records around the same system
//! calls (a plaintext socket costs one look-up). A TLS socket then behaves like a plain
//! one to the rest of the shard: a send reports what the peer will get, a short count
//! when the socket is full, and the sender offers the rest again later.
//!
//! Buffers are the shard's, not the connection's: ciphertext arrives as any socket's
//! input does (the shard ring's pool), is copied behind what is left of an incomplete
//! record into one scratch buffer and opened into the receive arena; records are sealed
//! into another. A connection keeps only what is in flight (see `tls::session`).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;

use super::{write_plain, Socket, RX_BUFFER};
use crate::sys::socket::{self, IoBatch, Push};
use crate::tls::session::SessionError;
use crate::tls::TlsSession;

/// The most ciphertext one read of a TLS socket takes: with an incomplete record kept
/// before it (under 17 KiB), it fits the scratch buffer, and its plaintext the arena.
pub const MAX_READ: usize = RX_BUFFER / 2;
/// Plaintext sealed per step of a send: what the socket does not take of it waits in
/// the connection (so this also bounds what a connection holds).
const SEAL_STEP: usize = 64 * 1024;
/// A piece at least this long is sealed where it lies rather than gathered.
const DIRECT_SEAL: usize = 4096;
/// Scratch capacity kept between sends.
const RETAIN: usize = 2 * SEAL_STEP;

/// The answer to a plaintext request on a TLS port (then the connection closes).
const NOT_TLS_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 42\r\nConnection: close\r\n\r\nThis port speaks TLS: connect with wss://\n";

/// What the shard's TLS handshakes came to (for `/metrics`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TlsCounts {
    pub full: u64,
    pub resumed: u64,
    /// Plaintext clients on a TLS port.
    pub plaintext: u64,
    /// Handshakes or records rustls refused.
    pub protocol: u64,
}

struct Conn {
    session: Box<TlsSession>,
    counted: bool,
}

#[derive(Default)]
pub struct TlsConns {
    /// By socket descriptor.
    by_fd: RefCell<Vec<Option<Conn>>>,
    live: Cell<usize>,
    /// Ciphertext just received, after an incomplete record's start (`RX_BUFFER`,
    /// allocated with the first TLS connection).
    cipher_in: RefCell<Vec<u8>>,
    /// Records being sealed.
    cipher_out: RefCell<Vec<u8>>,
    /// Small slices gathered into one record.
    gathered: RefCell<Vec<u8>>,
    counts: Cell<TlsCounts>,
    /// Bytes of `cipher_in` the last `load` filled.
    loaded: Cell<usize>,
}

/// What opening a TLS socket's input gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// This much plaintext (0: a handshake message, or part of a record).
    Plain(usize),
    /// close_notify, with no plaintext before it: the stream's end.
    Closed,
}

impl TlsConns {
    /// Makes `fd` a TLS socket. The caller removes it before the socket is closed.
    pub fn insert(&self, fd: RawFd, session: Box<TlsSession>) {
        let Ok(index) = usize::try_from(fd) else { return };
        let mut by_fd = self.by_fd.borrow_mut();
        if by_fd.len() <= index {
            by_fd.resize_with(index + 1, || None);
        }
        if by_fd[index]
            .replace(Conn {
                session,
                counted: false,
            })
            .is_none()
        {
            self.live.set(self.live.get() + 1);
        }
        drop(by_fd);
        let mut cipher_in = self.cipher_in.borrow_mut();
        if cipher_in.is_empty() {
            cipher_in.resize(RX_BUFFER, 0);
        }
    }

    pub fn remove(&self, fd: RawFd) {
        let mut by_fd = self.by_fd.borrow_mut();
        if let Some(slot) = usize::try_from(fd).ok().and_then(|i| by_fd.get_mut(i)) {
            if slot.take().is_some() {
                self.live.set(self.live.get() - 1);
            }
        }
    }

    pub fn is_tls(&self, fd: RawFd) -> bool {
        self.live.get() > 0 && self.with(fd, |_| ()).is_some()
    }

    /// TLS connections of the shard.
    pub fn live(&self) -> usize {
        self.live.get()
    }

    /// What the handshakes came to since the last call.
    pub fn take_counts(&self) -> TlsCounts {
        self.counts.take()
    }

    fn count(&self, f: impl FnOnce(&mut TlsCounts)) {
        let mut counts = self.counts.get();
        f(&mut counts);
        self.counts.set(counts);
    }

    fn with<R>(&self, fd: RawFd, f: impl FnOnce(&mut Conn) -> R) -> Option<R> {
        let mut by_fd = self.by_fd.borrow_mut();
        let conn = usize::try_from(fd).ok().and_then(|i| by_fd.get_mut(i))?.as_mut()?;
        Some(f(conn))
    }

    /// Bytes the shard's TLS connections hold between calls: incomplete records and
    /// ciphertext their sockets did not take.
    pub fn held_bytes(&self) -> usize {
        self.by_fd.borrow().iter().flatten().map(|c| c.session.held()).sum()
    }

    /// Takes `cipher`, just received for the TLS socket `fd`, after what is left of its
    /// last incomplete record, for `open_loaded`. False for a plain socket.
    pub fn load(&self, fd: RawFd, cipher: &[u8]) -> io::Result<bool> {
        self.with(fd, |conn| {
            let mut scratch = self.cipher_in.borrow_mut();
            let kept = conn.session.partial_len();
            let end = kept + cipher.len();
            if end > scratch.len() {
                // Reads are bounded well below the scratch's size (`MAX_READ`): not reached.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS read past the scratch buffer",
                ));
            }
            conn.session.take_partial(&mut scratch[..kept]);
            scratch[kept..end].copy_from_slice(cipher);
            self.loaded.set(end);
            Ok(true)
        })
        .unwrap_or(Ok(false))
    }

    /// Opens what `load` took for `fd` into `plain` (at least `RX_BUFFER` long), answering
    /// handshake messages on the way (what the socket does not take of them waits for
    /// `flush`).
    pub fn open_loaded(&self, fd: RawFd, plain: &mut [u8]) -> io::Result<Opened> {
        let loaded = self.loaded.take();
        self.with(fd, |conn| self.open_into(fd, conn, loaded, plain))
            .unwrap_or_else(|| Err(io::ErrorKind::NotConnected.into()))
    }

    fn open_into(&self, fd: RawFd, conn: &mut Conn, loaded: usize, plain: &mut [u8]) -> io::Result<Opened> {
        let mut cipher = self.cipher_in.borrow_mut();
        let plaintext = match conn.session.open(&mut cipher[..loaded], plain) {
            Ok(opened) => opened,
            Err(e) => {
                if matches!(e, SessionError::NotTls) {
                    self.count(|c| c.plaintext += 1);
                    let _ = socket::send(fd, NOT_TLS_ANSWER, Push::WithFin);
                } else {
                    self.count(|c| c.protocol += 1);
                }
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        };
        if !conn.counted && conn.session.is_established() {
            conn.counted = true;
            let resumed = conn.session.resumed();
            self.count(|c| if resumed { c.resumed += 1 } else { c.full += 1 });
        }
        flush_unsent(fd, &mut conn.session)?;
        if plaintext == 0 && conn.session.peer_closed() {
            return Ok(Opened::Closed);
        }
        Ok(Opened::Plain(plaintext))
    }

    /// Sends what a TLS socket's handshake left unsent, as much as the socket takes:
    /// true when nothing is left (always, for a plain socket).
    pub fn flush(&self, fd: RawFd) -> io::Result<bool> {
        self.with(fd, |c| flush_unsent(fd, &mut c.session)).unwrap_or(Ok(true))
    }

    /// Whether the peer of the TLS socket `fd` sent close_notify: nothing more will come.
    pub fn peer_closed(&self, fd: RawFd) -> bool {
        self.with(fd, |c| c.session.peer_closed()).unwrap_or(false)
    }

    /// One non-blocking send of `iov`, sealed for a TLS socket: how many of its bytes the
    /// peer will get, short when the socket is full (the sender offers the rest again, as
    /// to a plain socket).
    pub fn send(&self, fd: RawFd, iov: &IoBatch<'_>, push: Push) -> io::Result<usize> {
        match self.send_slices(fd, iov.slices(), iov.bytes(), push) {
            Some(result) => result,
            None => iov.send(fd, push),
        }
    }

    /// As `send`, of one slice.
    pub fn send_bytes(&self, fd: RawFd, bytes: &[u8], push: Push) -> io::Result<usize> {
        match self.send_slices(fd, std::iter::once(bytes), bytes.len(), push) {
            Some(result) => result,
            None => socket::send(fd, bytes, push),
        }
    }

    fn send_slices<'a>(
        &self,
        fd: RawFd,
        slices: impl Iterator<Item = &'a [u8]>,
        total: usize,
        push: Push,
    ) -> Option<io::Result<usize>> {
        if self.live.get() == 0 {
            return None;
        }
        let mut by_fd = self.by_fd.borrow_mut();
        let conn = usize::try_from(fd).ok().and_then(|i| by_fd.get_mut(i))?.as_mut()?;
        Some(self.send_tls(fd, &mut conn.session, slices, total, push))
    }

    fn send_tls<'a>(
        &self,
        fd: RawFd,
        session: &mut TlsSession,
        slices: impl Iterator<Item = &'a [u8]>,
        total: usize,
        push: Push,
    ) -> io::Result<usize> {
        if !flush_unsent(fd, session)? {
            return Ok(0);
        }
        // What an earlier send sealed has left now: the sender offers it again, skip it.
        let mut done = session.settle_owed(total);
        let mut skip = done;
        let mut out = self.cipher_out.borrow_mut();
        let mut gathered = self.gathered.borrow_mut();
        out.clear();
        gathered.clear();
        let mut slices = slices.peekable();
        let result = loop {
            let Some(slice) = slices.next() else {
                break Ok(done);
            };
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let mut rest = &slice[std::mem::take(&mut skip)..];
            let mut full = false;
            while !rest.is_empty() && !full {
                // A large piece is sealed where it lies; small ones are gathered into one
                // record (the header and tag cost the same for 20 bytes as for 16 KiB).
                let direct = rest.len() >= DIRECT_SEAL;
                if direct && !gathered.is_empty() {
                    full = !seal_send(session, fd, &gathered, &mut out, Push::Now)?;
                    if !full {
                        done += gathered.len();
                        gathered.clear();
                    }
                    continue;
                }
                let take = rest.len().min(SEAL_STEP - gathered.len());
                let (piece, after) = rest.split_at(take);
                rest = after;
                let last = rest.is_empty() && slices.peek().is_none();
                let step_push = if last { push } else { Push::Now };
                if direct {
                    full = !seal_send(session, fd, piece, &mut out, step_push)?;
                    if !full {
                        done += piece.len();
                    }
                } else {
                    gathered.extend_from_slice(piece);
                    if gathered.len() == SEAL_STEP || last {
                        full = !seal_send(session, fd, &gathered, &mut out, step_push)?;
                        if !full {
                            done += gathered.len();
                            gathered.clear();
                        }
                    }
                }
            }
            if full {
                break Ok(done);
            }
        };
        trim(&mut out, &mut gathered);
        result
    }

    /// Takes a TLS socket's unsent ciphertext, to write while waiting for the socket.
    fn take_unsent(&self, fd: RawFd) -> Vec<u8> {
        self.with(fd, |c| c.session.take_unsent()).unwrap_or_default()
    }

    /// Writes all of `bytes`, waiting for the socket as needed (as they are, for a plain
    /// socket).
    pub async fn write_all(&self, socket: &impl Socket, bytes: &[u8]) -> io::Result<()> {
        let fd = socket.fd();
        if !self.is_tls(fd) {
            return write_plain(socket, bytes).await;
        }
        let mut at = 0;
        loop {
            let sent = self
                .send_slices(fd, std::iter::once(&bytes[at..]), bytes.len() - at, Push::Now)
                .unwrap_or_else(|| Err(io::ErrorKind::NotConnected.into()))?;
            at += sent;
            if at == bytes.len() {
                return Ok(());
            }
            self.write_unsent(socket).await?;
        }
    }

    /// Writes a TLS socket's unsent ciphertext, waiting for the socket as needed.
    pub async fn write_unsent(&self, socket: &impl Socket) -> io::Result<()> {
        let pending = self.take_unsent(socket.fd());
        write_plain(socket, &pending).await
    }

    /// Before a TLS socket's sending side closes: close_notify, and whatever is unsent.
    pub async fn close_notify(&self, socket: &impl Socket) -> io::Result<()> {
        let fd = socket.fd();
        let sealed = self.with(fd, |c| {
            let mut alert = Vec::new();
            c.session.seal_close_notify(&mut alert).map(|()| alert)
        });
        let Some(sealed) = sealed else { return Ok(()) };
        let mut pending = self.take_unsent(fd);
        // Before the handshake ends there is nothing to close politely.
        if let Ok(alert) = sealed {
            pending.extend_from_slice(&alert);
        }
        write_plain(socket, &pending).await
    }
}

/// Seals `plain` into `out` and sends it; what the socket does not take waits in the
/// session (owed: its plaintext will be offered again). True when all of it went.
fn seal_send(session: &mut TlsSession, fd: RawFd, plain: &[u8], out: &mut Vec<u8>, push: Push) -> io::Result<bool> {
    out.clear();
    session.seal(plain, out).map_err(io_error)?;
    let sent = socket::send(fd, out, push)?;
    if sent < out.len() {
        session.keep_unsent(&out[sent..], plain.len());
        return Ok(false);
    }
    Ok(true)
}

/// Sends what the socket did not take before; true when nothing is left.
fn flush_unsent(fd: RawFd, session: &mut TlsSession) -> io::Result<bool> {
    if session.unsent().is_empty() {
        return Ok(true);
    }
    let sent = socket::send(fd, session.unsent(), Push::Now)?;
    Ok(session.sent(sent))
}

fn trim(out: &mut Vec<u8>, gathered: &mut Vec<u8>) {
    for buf in [out, gathered] {
        buf.clear();
        if buf.capacity() > RETAIN {
            buf.shrink_to(RETAIN);
        }
    }
}

fn io_error(e: SessionError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use crate::tls::{server_config, Certificates};

    #[test]
    fn the_answer_to_plaintext_says_its_own_length() {
        let text = std::str::from_utf8(NOT_TLS_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
    }

    /// A server configuration with a fresh self-signed certificate, and a client one
    /// that trusts it.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<ClientConfig>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "shardgate-egress-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
        let certificates = Certificates::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        let server = server_config(Arc::new(certificates)).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    }

    /// A TLS socket of `conns` (non-blocking) and its peer (blocking), handshaken.
    fn handshaken(conns: &TlsConns) -> (UnixStream, UnixStream, ClientConnection) {
        let (server_config, client_config) = configs();
        let (server, mut client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        conns.insert(server.as_raw_fd(), Box::new(TlsSession::new(server_config).unwrap()));
        let mut tls = ClientConnection::new(client_config, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut arena = vec![0u8; RX_BUFFER];
        while tls.is_handshaking() || tls.wants_write() {
            while tls.wants_write() {
                tls.write_tls(&mut client).unwrap();
            }
            match receive(conns, server.as_raw_fd(), &mut arena) {
                Ok(Opened::Plain(0)) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("a handshake gives no plaintext: {other:?}"),
            }
            if tls.is_handshaking() {
                tls.read_tls(&mut client).unwrap();
                tls.process_new_packets().unwrap();
            }
        }
        assert_eq!(conns.take_counts().full, 1);
        (server, client, tls)
    }

    /// Receives what the peer sent and opens it, as the shard does with what its ring
    /// received for the socket.
    fn receive(conns: &TlsConns, fd: RawFd, arena: &mut [u8]) -> io::Result<Opened> {
        let mut cipher = vec![0u8; MAX_READ];
        let n = socket::recv(fd, &mut cipher)?;
        assert!(conns.load(fd, &cipher[..n])?, "a TLS socket");
        conns.open_loaded(fd, arena)
    }

    fn send(conns: &TlsConns, fd: RawFd, bytes: &[u8]) -> usize {
        let mut iov = IoBatch::new();
        iov.push(bytes);
        conns.send(fd, &iov, Push::Now).unwrap()
    }

    /// Reads and opens what has arrived at the client, without waiting.
    fn drain(client: &mut UnixStream, tls: &mut ClientConnection, into: &mut Vec<u8>) {
        client.set_nonblocking(true).unwrap();
        loop {
            match tls.read_tls(client) {
                Ok(0) => break,
                Ok(_) => {
                    tls.process_new_packets().unwrap();
                    let _ = tls.reader().read_to_end(into);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        client.set_nonblocking(false).unwrap();
    }

    /// Once everything was offered: the last sealed records may still wait for room (the
    /// next send takes them); then the client must hold exactly `expected`.
    fn receive_the_rest(
        conns: &TlsConns,
        fd: RawFd,
        client: &mut UnixStream,
        tls: &mut ClientConnection,
        got: &mut Vec<u8>,
        expected: &[u8],
    ) {
        while got.len() < expected.len() {
            send(conns, fd, &[]);
            drain(client, tls, got);
        }
        assert!(got == expected, "{} bytes arrived of {}", got.len(), expected.len());
    }

    #[test]
    fn records_both_ways_through_the_shard_buffers() {
        let conns = TlsConns::default();
        let (server, mut client, mut tls) = handshaken(&conns);
        let fd = server.as_raw_fd();
        tls.writer().write_all(b"hello, shard").unwrap();
        tls.write_tls(&mut client).unwrap();
        let mut arena = vec![0u8; RX_BUFFER];
        let Opened::Plain(n) = receive(&conns, fd, &mut arena).unwrap() else {
            panic!("no plaintext");
        };
        assert_eq!(&arena[..n], b"hello, shard");
        assert_eq!(send(&conns, fd, b"hello, client"), 13);
        let mut got = Vec::new();
        while got.len() < 13 {
            drain(&mut client, &mut tls, &mut got);
        }
        assert_eq!(got, b"hello, client");
        conns.remove(fd);
        assert!(!conns.is_tls(fd));
    }

    #[test]
    fn a_full_socket_gets_a_short_count_and_every_byte_arrives_once() {
        let conns = TlsConns::default();
        let (server, mut client, mut tls) = handshaken(&conns);
        let fd = server.as_raw_fd();
        let message: Vec<u8> = (0..(3 << 20)).map(|i: usize| (i % 251) as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut short = 0;
        while sent < message.len() {
            // As a plain socket's sender does: offer what was not taken, again.
            let n = send(&conns, fd, &message[sent..]);
            if sent + n < message.len() {
                short += 1;
                assert!(conns.held_bytes() > 0);
            }
            sent += n;
            drain(&mut client, &mut tls, &mut got);
        }
        assert!(short > 0, "the socket never filled: the test proves nothing");
        receive_the_rest(&conns, fd, &mut client, &mut tls, &mut got, &message);
    }

    #[test]
    fn small_and_large_pieces_through_a_full_socket_arrive_whole_and_in_order() {
        let conns = TlsConns::default();
        let (server, mut client, mut tls) = handshaken(&conns);
        let fd = server.as_raw_fd();
        // Pieces as a queue offers them: small frames gathered into records, large ones
        // sealed where they lie, 60 per send.
        let pieces: Vec<Vec<u8>> = (0..600usize)
            .map(|i| {
                let len = if i % 3 == 0 { 20_000 + i } else { 10 + i % 50 };
                (0..len).map(|j| (i * 31 + j) as u8).collect()
            })
            .collect();
        let whole: Vec<u8> = pieces.concat();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut short = 0;
        while sent < whole.len() {
            // The rest, piece by piece, from where the last send stopped.
            let mut iov = IoBatch::new();
            let mut at = 0;
            for piece in &pieces {
                if iov.is_full() || iov.bytes() > 256 * 1024 {
                    break;
                }
                let end = at + piece.len();
                if end > sent {
                    iov.push(&piece[sent.saturating_sub(at)..]);
                }
                at = end;
            }
            let offered = iov.bytes();
            let n = conns.send(fd, &iov, Push::Now).unwrap();
            short += usize::from(n < offered);
            sent += n;
            drain(&mut client, &mut tls, &mut got);
        }
        assert!(short > 0, "the socket never filled: the test proves nothing");
        receive_the_rest(&conns, fd, &mut client, &mut tls, &mut got, &whole);
    }

    #[test]
    fn plaintext_is_answered_in_plaintext_and_refused() {
        let (server_config, _) = configs();
        let conns = TlsConns::default();
        let (server, mut client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        conns.insert(server.as_raw_fd(), Box::new(TlsSession::new(server_config).unwrap()));
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut arena = vec![0u8; RX_BUFFER];
        let err = receive(&conns, server.as_raw_fd(), &mut arena).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(conns.take_counts().plaintext, 1);
        drop(server);
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 ") && answer.contains("wss://"),
            "{answer}"
        );
    }
}
