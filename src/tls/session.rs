//! One TLS connection's record layer, with no IO: ciphertext in, plaintext out, and the
//! other way. rustls' unbuffered API leaves every buffer to us, so a connection keeps none
//! while nothing is in flight: ciphertext is read into the shard's scratch buffer and
//! plaintext lands in its receive arena; only the start of a record that has not all
//! arrived, and ciphertext the socket did not take, are kept (and freed once used).

use std::sync::Arc;

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::HandshakeKind;

/// Bytes a record may add to its plaintext: the header, a TLS 1.2 explicit nonce or the
/// TLS 1.3 inner content type, and the AEAD tag, with room to spare.
const RECORD_OVERHEAD: usize = 64;
/// Plaintext per record (the TLS maximum).
const RECORD_PLAINTEXT: usize = 16 * 1024;
/// A handshake record, the first byte of a ClientHello.
const HANDSHAKE_RECORD: u8 = 22;

/// Why a session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The first bytes are not a TLS handshake (a plaintext client on a TLS port).
    #[error("not TLS: the client spoke plaintext to a TLS port")]
    NotTls,
    #[error("TLS: {0}")]
    Protocol(#[from] rustls::Error),
    #[error("TLS: the handshake is not finished")]
    HandshakeNotDone,
    #[error("TLS: the connection is closed")]
    Closed,
    #[error("TLS: more plaintext than the buffer holds")]
    Overflow,
}

pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// The start of a record that has not all arrived (empty otherwise).
    partial: Vec<u8>,
    /// Ciphertext made but not yet taken by the socket, from `unsent_at` on.
    unsent: Vec<u8>,
    unsent_at: usize,
    /// Bytes of plaintext sealed into `unsent` that the sender was told were not sent:
    /// it offers them again (a socket's contract), and they are then skipped.
    owed: usize,
    /// Whether any byte came yet (the first must start a handshake record).
    started: bool,
    peer_closed: bool,
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, SessionError> {
        Ok(TlsSession {
            conn: UnbufferedServerConnection::new(config)?,
            partial: Vec::new(),
            unsent: Vec::new(),
            unsent_at: 0,
            owed: 0,
            started: false,
            peer_closed: false,
        })
    }

    /// Whether the handshake is over (application data may flow).
    pub fn is_established(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// Whether the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(HandshakeKind::Resumed)
    }

    /// Bytes this session holds between calls (partial records and unsent ciphertext).
    pub fn held(&self) -> usize {
        self.partial.capacity() + self.unsent.capacity()
    }

    /// Bytes of an incomplete record kept from the last call: new ciphertext goes after
    /// them (`take_partial`).
    pub fn partial_len(&self) -> usize {
        self.partial.len()
    }

    /// Moves the start of an incomplete record to the front of `buf` (`partial_len()`
    /// bytes), once more ciphertext has come after it.
    pub fn take_partial(&mut self, buf: &mut [u8]) {
        let n = self.partial.len().min(buf.len());
        buf[..n].copy_from_slice(&self.partial[..n]);
        self.partial = Vec::new();
    }

    /// Whether the peer sent close_notify: nothing more will come.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Processes the ciphertext in `cipher` (which starts with `take_partial`'s bytes):
    /// the application data goes to `plain`, handshake answers to the unsent ciphertext
    /// (`unsent`), an incomplete last record is kept for the next call. `plain` must be
    /// at least as long as `cipher` (plaintext is always shorter). Returns how many
    /// plaintext bytes it wrote; `peer_closed` tells whether close_notify came.
    pub fn open(&mut self, cipher: &mut [u8], plain: &mut [u8]) -> Result<usize, SessionError> {
        if !self.started && !cipher.is_empty() {
            if cipher[0] != HANDSHAKE_RECORD {
                return Err(SessionError::NotTls);
            }
            self.started = true;
        }
        let mut opened = 0;
        let mut start = 0;
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut cipher[start..]);
            match state? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        let to = plain
                            .get_mut(opened..opened + record.payload.len())
                            .ok_or(SessionError::Overflow)?;
                        to.copy_from_slice(record.payload);
                        opened += record.payload.len();
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => encode_into(&mut self.unsent, |out| encode.encode(out))?,
                // The bytes wait in `unsent`, which the caller sends before anything else.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.peer_closed = true;
                    start += discard;
                    break;
                }
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    start += discard;
                    break;
                }
                // Early data is off (the configuration's default), so it never comes.
                _ => return Err(SessionError::Closed),
            }
            start += discard;
        }
        if start < cipher.len() {
            self.partial.extend_from_slice(&cipher[start..]);
        }
        Ok(opened)
    }

    /// Seals `plain` into records appended to `out` (after any handshake message that
    /// is due). Fails before the handshake is over or after the connection closed.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), SessionError> {
        self.with_write(out, |traffic, out| {
            encrypt_into(out, plain.len(), |buf| traffic.encrypt(plain, buf))
        })
    }

    /// Appends a close_notify alert to `out`.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), SessionError> {
        self.with_write(out, |traffic, out| {
            encrypt_into(out, 0, |buf| traffic.queue_close_notify(buf))
        })
    }

    fn with_write(
        &mut self,
        out: &mut Vec<u8>,
        write: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut Vec<u8>,
        ) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        let mut write = Some(write);
        loop {
            // Only an incomplete record is ever kept, so nothing of it is consumed here.
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.partial);
            match state? {
                ConnectionState::EncodeTlsData(mut encode) => encode_into(out, |buf| encode.encode(buf))?,
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::WriteTraffic(mut traffic) => {
                    let write = write.take().ok_or(SessionError::Closed)?;
                    write(&mut traffic, out)?;
                    self.partial.drain(..discard);
                    return Ok(());
                }
                ConnectionState::PeerClosed => {}
                ConnectionState::BlockedHandshake => return Err(SessionError::HandshakeNotDone),
                _ => return Err(SessionError::Closed),
            }
            self.partial.drain(..discard);
        }
    }

    /// The ciphertext waiting for the socket.
    pub fn unsent(&self) -> &[u8] {
        &self.unsent[self.unsent_at..]
    }

    /// The socket took `n` bytes of `unsent()`. Returns true when nothing is left.
    pub fn sent(&mut self, n: usize) -> bool {
        self.unsent_at += n;
        if self.unsent_at >= self.unsent.len() {
            self.unsent = Vec::new();
            self.unsent_at = 0;
            return true;
        }
        false
    }

    /// Keeps ciphertext the socket did not take (sealed from plaintext of which `owed`
    /// bytes the sender will offer again).
    pub fn keep_unsent(&mut self, cipher: &[u8], owed: usize) {
        self.unsent.extend_from_slice(cipher);
        self.owed += owed;
    }

    /// Of `offered` plaintext bytes, how many were already sealed (and have now left with
    /// `unsent`): the sender skips them.
    pub fn settle_owed(&mut self, offered: usize) -> usize {
        let skip = self.owed.min(offered);
        self.owed -= skip;
        skip
    }

    /// Takes the unsent ciphertext (to write it while waiting for the socket).
    pub fn take_unsent(&mut self) -> Vec<u8> {
        let mut unsent = std::mem::take(&mut self.unsent);
        unsent.drain(..std::mem::take(&mut self.unsent_at));
        unsent
    }
}

/// Encodes one handshake record at the end of `out`.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), SessionError> {
    append_growing(out, 4096, |buf| match encode(buf) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(need)) => Err(Some(need.required_size)),
        Err(_) => Err(None),
    })
}

/// Encrypts `len` bytes of plaintext into records at the end of `out`.
fn encrypt_into(
    out: &mut Vec<u8>,
    len: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), SessionError> {
    let room = len + (len / RECORD_PLAINTEXT + 1) * RECORD_OVERHEAD;
    append_growing(out, room, |buf| match encrypt(buf) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(need)) => Err(Some(need.required_size)),
        Err(EncryptError::EncryptExhausted) => Err(None),
    })
}

/// Lets `write` fill `room` bytes at the end of `out` and keeps what it wrote; when it
/// says it needs more (`Err(Some(bytes))`) tries again with that much. `Err(None)`: the
/// connection can write no more.
fn append_growing(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), SessionError> {
    loop {
        let at = out.len();
        out.resize(at + room, 0);
        let written = write(&mut out[at..]);
        out.truncate(at + *written.as_ref().unwrap_or(&0));
        match written {
            Ok(_) => return Ok(()),
            Err(Some(need)) => room = need,
            Err(None) => return Err(SessionError::Closed),
        }
    }
}
