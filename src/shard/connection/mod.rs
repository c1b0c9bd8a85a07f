//! Drives one connection from accept to close: the HTTP upgrade (`upgrade`), then the
//! WebSocket session (`session`), and the ways a connection ends (a lingering close, a
//! slow consumer's 1008).

mod session;
mod upgrade;

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::context::{ConnectionSlot, ReadOutcome, ShardContext};
use super::egress::{Outbound, Socket};
use super::per_ip::Refusal;
use super::Apps;
use crate::chat::session::ChatUser;
use crate::tls::TlsSession;
use crate::ws::handshake;
use crate::ws::{write_close, CloseCode};

/// After we close (or refuse), how long we keep reading so that the peer gets our last
/// bytes rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// What an upgraded connection runs.
enum Endpoint {
    Echo,
    /// A chat connection of this user.
    Chat(ChatUser),
}

/// Serves one accepted connection to the end; `tls` for one accepted on a TLS listener
/// (the handshake then runs inside its first reads, within the handshake deadline).
///
/// The future lives as long as the connection, so its size is memory every idle
/// connection holds. It is an `async move` block rather than an `async fn` because the
/// compiler keeps an `async fn`'s arguments twice (as passed and as moved into its
/// body); the upgrade, run once and larger than the session, is boxed for its duration.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    ctx: Rc<ShardContext>,
    apps: Rc<Apps>,
    slot: ConnectionSlot,
    tls: Option<Box<TlsSession>>,
) -> impl Future<Output = ()> {
    async move {
        slot.watch(tls.is_some());
        // Dropped before `slot` (captured), so before its descriptor can be reused.
        let _tls = tls.map(|session| TlsRegistration::new(&ctx, slot.fd(), session));
        let Some(upgraded) = Box::pin(upgrade::upgrade(&ctx, &apps, &slot)).await else {
            return;
        };
        session::run(&ctx, &apps, &slot, upgraded).await;
    }
}

/// A socket's place among the shard's TLS connections, for as long as it is open.
struct TlsRegistration<'a> {
    ctx: &'a ShardContext,
    fd: RawFd,
}

impl<'a> TlsRegistration<'a> {
    fn new(ctx: &'a ShardContext, fd: RawFd, session: Box<TlsSession>) -> Self {
        ctx.egress.tls.insert(fd, session);
        TlsRegistration { ctx, fd }
    }
}

impl Drop for TlsRegistration<'_> {
    fn drop(&mut self) {
        self.ctx.egress.tls.remove(self.fd);
    }
}

/// Answers a connection the process has no room for: 503, then the same lingering close
/// as every refusal (closing with the request unread would reset the connection and could
/// destroy the answer before the client reads it).
pub async fn refuse_busy(ctx: Rc<ShardContext>, mut stream: TcpStream) {
    let mut out = Vec::new();
    ctx.counters.http(503);
    handshake::write_response(
        &mut out,
        503,
        "the gateway is at its connection limit",
        "Retry-After: 1\r\n",
    );
    if stream.write_all(&out).await.is_ok() {
        linger_refused(stream).await;
    }
}

/// Answers a connection its address may not open now (see `per_ip`): 429, the same
/// lingering close. It holds no connection slot meanwhile.
pub async fn refuse_per_ip(ctx: Rc<ShardContext>, mut stream: TcpStream, refusal: Refusal) {
    let mut out = Vec::new();
    ctx.counters.http(429);
    handshake::write_response(&mut out, 429, refusal.reason(), "Retry-After: 1\r\n");
    if stream.write_all(&out).await.is_ok() {
        linger_refused(stream).await;
    }
}

/// `linger_close` for a refused connection, which has no place in the shard: glommio's
/// own reads, into a small buffer of its own.
async fn linger_refused(mut stream: TcpStream) {
    if stream.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut discard = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut discard).await {
            Ok(n) if n > 0 => continue,
            _ => return,
        }
    }
}

/// Closes a connection whose outgoing queue overflowed: finish the frame on the wire,
/// then Close 1008 naming the reason. The socket is full, so this waits for the peer to
/// read, as long as a pong may take: a peer that cannot take one frame by then is gone.
async fn close_slow_consumer(ctx: &ShardContext, slot: &ConnectionSlot, out: &Outbound) {
    let close = async {
        while ctx.egress.write_front(slot, out).await? {}
        let mut close = Vec::new();
        let reason = format!("slow consumer: more than {} bytes queued", out.limit());
        ctx.counters.close_sent(CloseCode::POLICY_VIOLATION.into());
        write_close(&mut close, CloseCode::POLICY_VIOLATION, &reason, None);
        ctx.egress.write_all(slot, &close).await
    };
    let gone = async {
        glommio::timer::sleep(ctx.config.pong_timeout).await;
        Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut))
    };
    if futures_lite::future::or(close, gone).await.is_ok() {
        linger_close(ctx, slot).await;
    }
}

/// Half-closes, then reads and discards for a moment, so that our last bytes reach the
/// peer instead of being cut off by a reset (closing a socket with unread input sends RST).
async fn linger_close(ctx: &ShardContext, slot: &ConnectionSlot) {
    if ctx.egress.shutdown(slot).await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match ctx.read(slot, false, None, Some(left)).await {
            Ok(ReadOutcome::Data(_)) => continue,
            _ => return,
        }
    }
}
