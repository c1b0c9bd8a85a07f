//! Drives one connection: the HTTP upgrade, then WebSocket frames, until it closes.
//!
//! Reads land in the shard's shared receive buffer and are decoded before the next await;
//! everything the connection answers goes into the shard's cork and leaves in one
//! `sendmsg` per read (large echoed payloads straight from the receive buffer). Only when
//! the socket cannot take it all does the rest move into a buffer of the connection's own,
//! which is freed once written.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::context::{ConnectionSlot, ReadOutcome, ShardContext};
use super::cork::{self, Cork};
use crate::ws::handshake::{self, Rejection};
use crate::ws::{write_close, CloseCode, Decoder, Event, OpCode, Role};

/// After we close (or refuse), how long we keep reading so that the peer gets our last
/// bytes rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one accepted connection to the end.
pub async fn serve(ctx: Rc<ShardContext>, mut stream: TcpStream, slot: ConnectionSlot) {
    if let Some(leftover) = handshake(&ctx, &mut stream, &slot).await {
        websocket(&ctx, &mut stream, &slot, leftover).await;
    }
}

/// Answers a connection the process has no room for, without spending a task on it.
pub fn refuse_busy(stream: &TcpStream) {
    let mut out = Vec::new();
    handshake::write_response(
        &mut out,
        503,
        "the gateway is at its connection limit",
        "Retry-After: 1\r\n",
    );
    let _ = cork::send_now(stream.as_raw_fd(), &out);
}

/// Reads the request head and answers it. Returns the bytes that followed the head when
/// the connection was upgraded, `None` when it is done.
async fn handshake(
    ctx: &ShardContext,
    stream: &mut TcpStream,
    slot: &ConnectionSlot,
) -> Option<Vec<u8>> {
    let config = &ctx.config;
    let deadline = Instant::now() + config.handshake_timeout;
    let mut head: Vec<u8> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            refuse(ctx, stream, slot, &handshake_timeout()).await;
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match ctx.read(stream, slot, true).await {
            Ok(ReadOutcome::Data(n)) => head.extend_from_slice(&ctx.rx.borrow()[..n]),
            Ok(ReadOutcome::TimedOut) => {
                refuse(ctx, stream, slot, &handshake_timeout()).await;
                return None;
            }
            Ok(ReadOutcome::Eof | ReadOutcome::Stopping) | Err(_) => return None,
        }
        let request = match handshake::parse_request(&head, config.max_request_head) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(rejection) => {
                refuse(ctx, stream, slot, &rejection).await;
                return None;
            }
        };
        let mut out = Vec::new();
        match request.path {
            "/healthz" if request.method == "GET" => {
                handshake::write_response(&mut out, 200, "ok", "")
            }
            "/healthz" => handshake::write_response(&mut out, 405, "use GET", "Allow: GET\r\n"),
            "/echo" if config.echo => {
                match handshake::validate_upgrade(&request, &config.subprotocols) {
                    Ok(accept) => {
                        handshake::write_accept(&mut out, &accept);
                        let head_len = request.head_len;
                        write_all(stream, &out).await.ok()?;
                        head.drain(..head_len);
                        return Some(head);
                    }
                    Err(rejection) => handshake::write_rejection(&mut out, &rejection),
                }
            }
            _ => handshake::write_response(&mut out, 404, "no such endpoint", ""),
        }
        if write_all(stream, &out).await.is_ok() {
            linger_close(ctx, stream, slot).await;
        }
        return None;
    }
}

fn handshake_timeout() -> Rejection {
    Rejection {
        status: 408,
        message: "the upgrade request did not arrive in time",
        extra_headers: "",
    }
}

async fn refuse(
    ctx: &ShardContext,
    stream: &mut TcpStream,
    slot: &ConnectionSlot,
    rejection: &Rejection,
) {
    let mut out = Vec::new();
    handshake::write_rejection(&mut out, rejection);
    if write_all(stream, &out).await.is_ok() {
        linger_close(ctx, stream, slot).await;
    }
}

/// Where the connection is in its life after the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// We sent Close and wait (until the deadline) for the peer's.
    Closing {
        deadline: Instant,
    },
}

/// What the driver does after handling a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    /// The closing handshake is complete: flush, then close TCP (the server closes first).
    Close,
    /// The peer broke the protocol or stopped answering: flush our Close, then linger-close.
    Fail,
}

struct Session {
    decoder: Decoder,
    state: State,
    echo: bool,
    /// When our keepalive ping went out, while no pong has come back.
    ping_sent: Option<Instant>,
}

impl Session {
    /// Decodes `input` and queues every answer (echo, pong, close) in `out`.
    fn on_bytes(&mut self, input: &mut [u8], out: &mut Cork) -> Next {
        let open = self.state == State::Open;
        let echo = self.echo && open;
        let mut peer_close = None;
        let mut pong = false;
        out.begin(input);
        let result = self.decoder.feed(input, &mut |event| match event {
            Event::Message { opcode, payload } if echo => out.frame(opcode, payload),
            Event::Message { .. } => {}
            Event::Ping(payload) if open => out.frame(OpCode::Pong, payload),
            Event::Ping(_) => {}
            Event::Pong(_) => pong = true,
            Event::Close { code, .. } => peer_close = Some(code),
        });
        if pong {
            self.ping_sent = None;
        }
        if let Err(error) = result {
            if open {
                out.push_with(|b| write_close(b, error.code.0, error.reason, None));
            }
            return Next::Fail;
        }
        match peer_close {
            Some(code) => {
                if open {
                    // Echo the peer's code (§5.5.1); an empty Close is answered with an empty one.
                    match code {
                        Some(code) => out.push_with(|b| write_close(b, code.0, "", None)),
                        None => out.frame(OpCode::Close, &[]),
                    }
                }
                Next::Close
            }
            None => Next::Continue,
        }
    }

    /// Starts the closing handshake from our side.
    fn begin_close(&mut self, code: CloseCode, reason: &str, out: &mut Cork, drain: Duration) {
        if self.state == State::Open {
            out.push_with(|b| write_close(b, code.0, reason, None));
            self.state = State::Closing {
                deadline: Instant::now() + drain,
            };
        }
    }

    /// The read timeout that matches the state: the ping interval, what is left of the
    /// pong timeout, or what is left of the closing deadline.
    fn read_timeout(&self, ping_interval: Duration, pong_timeout: Duration) -> Duration {
        match (self.state, self.ping_sent) {
            (State::Closing { deadline }, _) => deadline.saturating_duration_since(Instant::now()),
            (State::Open, Some(sent)) => pong_timeout.saturating_sub(sent.elapsed()),
            (State::Open, None) => ping_interval,
        }
        .max(Duration::from_millis(1))
    }
}

async fn websocket(
    ctx: &ShardContext,
    stream: &mut TcpStream,
    slot: &ConnectionSlot,
    mut leftover: Vec<u8>,
) {
    let config = &ctx.config;
    let fd = stream.as_raw_fd();
    let mut session = Session {
        decoder: Decoder::new(Role::Server, config.max_message_size),
        state: State::Open,
        echo: config.echo,
        ping_sent: None,
    };
    // Bytes the socket could not take at once; written (awaiting) before reading more,
    // which is the backpressure on a client that sends faster than it reads.
    let mut unsent = None;
    let mut next = Next::Continue;
    if !leftover.is_empty() {
        let mut cork = ctx.cork.borrow_mut();
        next = session.on_bytes(&mut leftover, &mut cork);
        match cork.send(fd, &leftover) {
            Ok(rest) => unsent = rest,
            Err(_) => return,
        }
    }
    drop(leftover);
    let mut timeout = Duration::ZERO;
    loop {
        if let Some(rest) = unsent.take() {
            if write_all(stream, &rest).await.is_err() {
                return;
            }
        }
        match next {
            Next::Continue => {}
            Next::Close => {
                let _ = stream.shutdown(Shutdown::Write).await;
                return;
            }
            Next::Fail => {
                linger_close(ctx, stream, slot).await;
                return;
            }
        }
        let wanted = session.read_timeout(config.ping_interval, config.pong_timeout);
        if wanted != timeout {
            timeout = wanted;
            if stream.set_read_timeout(Some(timeout)).is_err() {
                return;
            }
        }
        glommio::yield_if_needed().await;
        let outcome = ctx.read(stream, slot, session.state == State::Open).await;
        // From here to the send: no await, so the shard's buffers are ours alone.
        let mut cork = ctx.cork.borrow_mut();
        let mut rx = ctx.rx.borrow_mut();
        let input: &mut [u8] = match outcome {
            Ok(ReadOutcome::Data(n)) => &mut rx[..n],
            _ => &mut [],
        };
        next = match outcome {
            Ok(ReadOutcome::Data(_)) => {
                let next = session.on_bytes(input, &mut cork);
                match session.ping_sent {
                    Some(sent)
                        if next == Next::Continue && sent.elapsed() >= config.pong_timeout =>
                    {
                        session.begin_close(
                            CloseCode::POLICY_VIOLATION,
                            "no pong to keepalive ping",
                            &mut cork,
                            LINGER,
                        );
                        Next::Fail
                    }
                    _ => next,
                }
            }
            Ok(ReadOutcome::TimedOut) => match (session.state, session.ping_sent) {
                (State::Open, None) => {
                    cork.frame(OpCode::Ping, &[]);
                    session.ping_sent = Some(Instant::now());
                    Next::Continue
                }
                (State::Open, Some(_)) => {
                    session.begin_close(
                        CloseCode::POLICY_VIOLATION,
                        "no pong to keepalive ping",
                        &mut cork,
                        LINGER,
                    );
                    Next::Fail
                }
                (State::Closing { .. }, _) => return,
            },
            Ok(ReadOutcome::Stopping) => {
                session.begin_close(
                    CloseCode::GOING_AWAY,
                    "going away",
                    &mut cork,
                    config.drain_timeout,
                );
                Next::Continue
            }
            Ok(ReadOutcome::Eof) | Err(_) => return,
        };
        match cork.send(fd, input) {
            Ok(rest) => unsent = rest,
            Err(_) => return,
        }
    }
}

async fn write_all(stream: &mut TcpStream, buf: &[u8]) -> io::Result<()> {
    stream.write_all(buf).await
}

/// Half-closes, then reads and discards for a moment, so that our last bytes reach the
/// peer instead of being cut off by a reset (closing a socket with unread input sends RST).
async fn linger_close(ctx: &ShardContext, stream: &mut TcpStream, slot: &ConnectionSlot) {
    if stream.shutdown(Shutdown::Write).await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match ctx.read(stream, slot, false).await {
            Ok(ReadOutcome::Data(_)) => continue,
            _ => return,
        }
    }
}
