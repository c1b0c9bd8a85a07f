//! Drives one connection: the HTTP upgrade, then WebSocket frames, until it closes.
//!
//! Reads land in the shard's shared receive buffer and are decoded before the next await;
//! everything the connection answers goes into the shard's cork and leaves in one
//! `sendmsg` per read (large echoed payloads straight from the receive buffer), or, for an
//! echo, with the pass's other answers in the shard's send batch. Only when the socket
//! cannot take it all does the rest wait in the connection's outbound queue, which is also
//! where routed chat messages for it arrive.

use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::chat::{Arrival, ChatConn};
use super::context::{ConnectionSlot, ReadOutcome, ShardContext, RX_BUFFER};
use super::cork::Cork;
use super::outbound::Outbound;
use crate::chat::auth::is_valid_user_id;
use crate::ws::handshake::{self, Rejection, Request};
use crate::ws::{write_close, CloseCode, Decoder, Event, OpCode, Role};

/// After we close (or refuse), how long we keep reading so that the peer gets our last
/// bytes rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// What an upgraded connection runs.
enum AppKind {
    Echo,
    Chat(Arc<str>),
}

/// Serves one accepted connection to the end.
pub async fn serve(ctx: Rc<ShardContext>, mut stream: TcpStream, slot: ConnectionSlot) {
    if let Err(e) = slot.watch(stream.as_raw_fd()) {
        // Only a host out of epoll watches (fs.epoll.max_user_watches) or memory gets here.
        println!(
            "shard {}: dropping a connection: cannot add it to the epoll set: {e}",
            ctx.id
        );
        return;
    }
    if let Some((leftover, app)) = handshake(&ctx, &mut stream, &slot).await {
        websocket(&ctx, &mut stream, &slot, leftover, app).await;
    }
}

/// Answers a connection the process has no room for: 503, then the same lingering close
/// as every refusal (closing with the request unread would reset the connection and could
/// destroy the answer before the client reads it).
pub async fn refuse_busy(ctx: Rc<ShardContext>, mut stream: TcpStream) {
    let mut out = Vec::new();
    handshake::write_response(
        &mut out,
        503,
        "the gateway is at its connection limit",
        "Retry-After: 1\r\n",
    );
    if stream.write_all(&out).await.is_ok() {
        linger_close(&ctx, &mut stream, None).await;
    }
}

/// Reads the request head and answers it. Returns the bytes that followed the head and
/// the endpoint when the connection was upgraded, `None` when it is done.
async fn handshake(ctx: &ShardContext, stream: &mut TcpStream, slot: &ConnectionSlot) -> Option<(Vec<u8>, AppKind)> {
    let config = &ctx.config;
    let deadline = Instant::now() + config.handshake_timeout;
    let mut head: Vec<u8> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            refuse(ctx, stream, slot, &handshake_timeout()).await;
            return None;
        }
        match ctx.read(stream, Some(slot), true, None, Some(left)).await {
            Ok(ReadOutcome::Data(n)) => head.extend_from_slice(&ctx.rx.borrow()[ctx.rx_at()..][..n]),
            Ok(ReadOutcome::TimedOut) => {
                refuse(ctx, stream, slot, &handshake_timeout()).await;
                return None;
            }
            Ok(ReadOutcome::Eof | ReadOutcome::Stopping | ReadOutcome::Outbound) | Err(_) => return None,
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
        let upgrade = match request.path {
            "/healthz" if request.method == "GET" => {
                handshake::write_response(&mut out, 200, "ok", "");
                None
            }
            "/healthz" => {
                handshake::write_response(&mut out, 405, "use GET", "Allow: GET\r\n");
                None
            }
            "/echo" if config.echo => Some(AppKind::Echo),
            "/ws" => Some(AppKind::Chat(Arc::from(""))),
            _ => {
                handshake::write_response(&mut out, 404, "no such endpoint", "");
                None
            }
        };
        if let Some(app) = upgrade {
            let decision = handshake::validate_upgrade(&request, &config.subprotocols).and_then(|accept| match app {
                AppKind::Echo => Ok((accept, AppKind::Echo)),
                AppKind::Chat(_) => authorize(ctx, &request).map(|user| (accept, AppKind::Chat(user))),
            });
            match decision {
                Ok((accept, app)) => {
                    handshake::write_accept(&mut out, &accept);
                    let head_len = request.head_len;
                    stream.write_all(&out).await.ok()?;
                    head.drain(..head_len);
                    return Some((head, app));
                }
                Err(rejection) => handshake::write_rejection(&mut out, &rejection),
            }
        }
        if stream.write_all(&out).await.is_ok() {
            linger_close(ctx, stream, Some(slot)).await;
        }
        return None;
    }
}

/// Who is opening /ws: the Origin must be allowed, and a valid token (or, in dev mode, a
/// `user` parameter) must name the user.
fn authorize(ctx: &ShardContext, request: &Request<'_>) -> Result<Arc<str>, Rejection> {
    const UNAUTHORIZED: &str = "WWW-Authenticate: Bearer\r\n";
    let config = &ctx.config;
    if !config.allowed_origins.is_empty() {
        if let Some(origin) = request.header_values("origin").next() {
            if !config
                .allowed_origins
                .iter()
                .any(|o| o.as_bytes() == origin.trim_ascii())
            {
                return Err(Rejection {
                    status: 403,
                    message: "this Origin may not open the chat endpoint",
                    extra_headers: "",
                });
            }
        }
    }
    let mut token = None;
    let mut dev_user = None;
    for (k, v) in form_urlencoded::parse(request.query.as_bytes()) {
        match &*k {
            "token" => token = Some(v.into_owned()),
            "user" => dev_user = Some(v.into_owned()),
            _ => {}
        }
    }
    if token.is_none() {
        if let Some(value) = request.header("authorization") {
            let value = std::str::from_utf8(value).unwrap_or("").trim();
            if let Some(t) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
                token = Some(t.trim().to_string());
            }
        }
    }
    let unauthorized = |message| Rejection {
        status: 401,
        message,
        extra_headers: UNAUTHORIZED,
    };
    match (token, dev_user) {
        (Some(token), _) => match ctx.auth.verify(&token) {
            Ok(user) => Ok(ctx.hub.router.borrow().intern(&user)),
            Err(_) => Err(unauthorized("the token is malformed, badly signed or expired")),
        },
        (None, Some(user)) if config.insecure_dev_auth => {
            if is_valid_user_id(&user) {
                Ok(ctx.hub.router.borrow().intern(&user))
            } else {
                Err(unauthorized("user must be 1-64 of A-Z a-z 0-9 _ . @ -"))
            }
        }
        _ => Err(unauthorized("a token is required: ?token= or Authorization: Bearer")),
    }
}

fn handshake_timeout() -> Rejection {
    Rejection {
        status: 408,
        message: "the upgrade request did not arrive in time",
        extra_headers: "",
    }
}

async fn refuse(ctx: &ShardContext, stream: &mut TcpStream, slot: &ConnectionSlot, rejection: &Rejection) {
    let mut out = Vec::new();
    handshake::write_rejection(&mut out, rejection);
    if stream.write_all(&out).await.is_ok() {
        linger_close(ctx, stream, Some(slot)).await;
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

enum App {
    Echo,
    Chat(ChatConn),
}

struct Session {
    decoder: Decoder,
    state: State,
    app: App,
    /// When our keepalive ping went out, while no pong has come back.
    ping_sent: Option<Instant>,
}

impl Session {
    /// Decodes `input` and queues every answer (echo, chat answers, pong, close) in `out`.
    fn on_bytes(&mut self, ctx: &ShardContext, input: &mut [u8], out: &mut Cork) -> Next {
        let open = self.state == State::Open;
        let mut peer_close = None;
        let mut pong = false;
        // Chat messages carry when they arrived; an echo reads no clock.
        let arrival = match self.app {
            App::Chat(_) => Some(Arrival::now()),
            App::Echo => None,
        };
        out.begin(input);
        let Session { decoder, app, .. } = self;
        let result = decoder.feed(input, &mut |event| match event {
            Event::Message { opcode, payload } if open => match app {
                App::Echo => out.frame(opcode, payload),
                App::Chat(chat) => {
                    if let Some(arrival) = arrival {
                        chat.on_message(&ctx.hub, &ctx.config, opcode, payload, arrival, out)
                    }
                }
            },
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

    /// No pong came back in time: Close 1008, then drop the connection.
    fn fail_keepalive(&mut self, out: &mut Cork) -> Next {
        self.begin_close(CloseCode::POLICY_VIOLATION, "no pong to keepalive ping", out, LINGER);
        Next::Fail
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

/// Unregisters a chat connection from its shard however the connection ends.
struct Registration<'a> {
    ctx: &'a ShardContext,
    user: Arc<str>,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.ctx.hub.unregister(&self.user, self.id);
        self.ctx.end_round();
    }
}

async fn websocket(
    ctx: &ShardContext,
    stream: &mut TcpStream,
    slot: &ConnectionSlot,
    mut leftover: Vec<u8>,
    kind: AppKind,
) {
    let config = &ctx.config;
    let fd = stream.as_raw_fd();
    // A peer that takes nothing for this long is gone.
    if stream
        .set_write_timeout(Some(config.ping_interval + config.pong_timeout))
        .is_err()
    {
        return;
    }
    let id = ctx.hub.next_conn_id();
    let (app, out, mut registration) = match kind {
        AppKind::Echo => {
            // An echo answers at most one read plus one assembled message at a time.
            let out = Rc::new(Outbound::new(
                id,
                slot.key(),
                fd,
                config.max_message_size + 2 * RX_BUFFER,
            ));
            (App::Echo, out, None)
        }
        AppKind::Chat(user) => {
            let out = Rc::new(Outbound::new(id, slot.key(), fd, config.max_outbound_bytes));
            ctx.hub.register(&user, out.clone());
            ctx.end_round();
            let registration = Registration {
                ctx,
                user: user.clone(),
                id,
            };
            (
                App::Chat(ChatConn::new(user, out.clone(), config)),
                out,
                Some(registration),
            )
        }
    };
    let mut session = Session {
        decoder: Decoder::new(Role::Server, config.max_message_size),
        state: State::Open,
        app,
        ping_sent: None,
    };
    let mut next = Next::Continue;
    if !leftover.is_empty() {
        let mut cork = ctx.cork.borrow_mut();
        next = session.on_bytes(ctx, &mut leftover, &mut cork);
        if next != Next::Continue {
            drop(registration.take());
        }
        if finish_round(ctx, &out, &mut cork, &mut leftover, fd, false, next != Next::Continue).is_err() {
            return;
        }
        if next != Next::Continue {
            out.seal();
        }
    }
    drop(leftover);
    // Whatever this connection left in the shard's send batch goes out before its socket
    // closes (the descriptor number could be reused by then).
    let _flush = FlushOnExit { ctx, out: &out };
    loop {
        if out.overflowed() {
            close_slow_consumer(ctx, stream, slot, &out).await;
            return;
        }
        if !out.is_empty() {
            if write_queue(ctx, stream, &out).await.is_err() {
                return;
            }
            continue;
        }
        match next {
            Next::Continue => {}
            // The closing handshake is complete. Shutting the sending side down sends our
            // Close (held by `fin_follows`) with the FIN, even if a peer that broke §5.5.1
            // sent more after its Close: closing with bytes unread would reset the
            // connection and drop the Close unsent.
            Next::Close => {
                let _ = stream.shutdown(Shutdown::Write).await;
                return;
            }
            Next::Fail => {
                linger_close(ctx, stream, Some(slot)).await;
                return;
            }
        }
        let timeout = session.read_timeout(config.ping_interval, config.pong_timeout);
        glommio::yield_if_needed().await;
        let outcome = ctx
            .read(
                stream,
                Some(slot),
                session.state == State::Open,
                Some(&out),
                Some(timeout),
            )
            .await;
        // From here to the send: no await, so the shard's buffers are ours alone.
        let mut cork = ctx.cork.borrow_mut();
        let mut rx = ctx.rx.borrow_mut();
        let input: &mut [u8] = match outcome {
            Ok(ReadOutcome::Data(n)) => &mut rx[ctx.rx_at()..][..n],
            _ => &mut [],
        };
        next = match outcome {
            Ok(ReadOutcome::Data(_)) => {
                let next = session.on_bytes(ctx, input, &mut cork);
                // A peer that keeps sending but never answers our ping is not alive either.
                let overdue = session
                    .ping_sent
                    .is_some_and(|sent| sent.elapsed() >= config.pong_timeout);
                if next == Next::Continue && overdue {
                    session.fail_keepalive(&mut cork)
                } else {
                    next
                }
            }
            Ok(ReadOutcome::TimedOut) => match (session.state, session.ping_sent) {
                (State::Open, None) => {
                    cork.frame(OpCode::Ping, &[]);
                    session.ping_sent = Some(Instant::now());
                    Next::Continue
                }
                (State::Open, Some(_)) => session.fail_keepalive(&mut cork),
                (State::Closing { .. }, _) => return,
            },
            Ok(ReadOutcome::Stopping) => {
                session.begin_close(CloseCode::GOING_AWAY, "going away", &mut cork, config.drain_timeout);
                Next::Continue
            }
            Ok(ReadOutcome::Outbound) => Next::Continue,
            Ok(ReadOutcome::Eof) | Err(_) => return,
        };
        if next != Next::Continue {
            // Leave the directory before our last frames go out: a client that sees our
            // Close and reconnects at once must find its old connection already gone.
            drop(registration.take());
        }
        // A plain echo answer may wait for the end of the pass; anything that ends or
        // closes the connection leaves now.
        let batchable = matches!(session.app, App::Echo) && next == Next::Continue && session.state == State::Open;
        if finish_round(ctx, &out, &mut cork, input, fd, batchable, next != Next::Continue).is_err() {
            return;
        }
        if next != Next::Continue || session.state != State::Open {
            // Our Close (or the answer to the peer's) is on its way: nothing may follow it.
            out.seal();
        }
    }
}

struct FlushOnExit<'a> {
    ctx: &'a ShardContext,
    out: &'a Outbound,
}

impl Drop for FlushOnExit<'_> {
    fn drop(&mut self) {
        if self.out.is_batched() {
            self.ctx.flush_batch();
        }
    }
}

/// Sends what the round put in the cork (straight away when nothing is queued before it,
/// else behind the queue), then ends the shard's round. With `batchable`, the answer joins
/// the shard's send batch instead, to leave with the pass's others: copied when it is
/// small, in place when it is one frame echoed from the receive buffer. With `fin_follows`
/// the socket (or its sending side) closes next, and what leaves now waits for the FIN
/// (see `Cork::send`).
fn finish_round(
    ctx: &ShardContext,
    out: &Rc<Outbound>,
    cork: &mut Cork,
    input: &mut [u8],
    fd: i32,
    batchable: bool,
    fin_follows: bool,
) -> std::io::Result<()> {
    if !cork.is_empty() && out.is_batched() {
        // Bytes of ours wait in the batch: they must leave first.
        ctx.flush_batch();
    }
    let joined = cork.join_in_input(input);
    if !cork.is_empty() && batchable && out.is_empty() {
        if let Some(run) = joined {
            if ctx.batch_received(out, &input[run]) {
                cork.clear();
            }
        } else if let Some(bytes) = cork.owned_only() {
            let mut batch = ctx.batch.borrow_mut();
            if batch.has_room(bytes.len()) {
                batch.add(out, |b| b.extend_from_slice(bytes));
                drop(batch);
                cork.clear();
            }
        }
    }
    if !cork.is_empty() {
        if out.is_empty() {
            if let Some(rest) = cork.send(fd, input, fin_follows)? {
                out.push_unsent(Bytes::from(rest));
            }
        } else {
            out.push(Bytes::from(cork.take_all(input)), None);
        }
    }
    ctx.end_round();
    Ok(())
}

/// Writes the outbound queue until it is empty, waiting for the socket as needed.
async fn write_queue(ctx: &ShardContext, stream: &mut TcpStream, out: &Outbound) -> std::io::Result<()> {
    loop {
        let more = out.flush_now(&mut ctx.hub.latency.borrow_mut())?;
        if !more || out.overflowed() {
            return Ok(());
        }
        let Some(chunk) = out.begin_write() else { return Ok(()) };
        let written = stream.write(&chunk).await;
        out.end_write(*written.as_ref().unwrap_or(&0), &mut ctx.hub.latency.borrow_mut());
        written?;
    }
}

/// Closes a connection whose outbound queue overflowed: finish the frame on the wire,
/// then Close 1008 naming the reason. The socket is full, so this waits for the peer to
/// read, as long as a pong may take: a peer that cannot take one frame by then is gone.
async fn close_slow_consumer(ctx: &ShardContext, stream: &mut TcpStream, slot: &ConnectionSlot, out: &Outbound) {
    let _ = stream.set_write_timeout(Some(ctx.config.pong_timeout));
    while let Some(chunk) = out.begin_write() {
        let written = stream.write(&chunk).await;
        out.end_write(*written.as_ref().unwrap_or(&0), &mut ctx.hub.latency.borrow_mut());
        if written.is_err() {
            return;
        }
    }
    let mut close = Vec::new();
    let reason = format!("slow consumer: more than {} bytes queued", out.limit());
    write_close(&mut close, CloseCode::POLICY_VIOLATION.0, &reason, None);
    if stream.write_all(&close).await.is_ok() {
        linger_close(ctx, stream, Some(slot)).await;
    }
}

/// Half-closes, then reads and discards for a moment, so that our last bytes reach the
/// peer instead of being cut off by a reset (closing a socket with unread input sends RST).
async fn linger_close(ctx: &ShardContext, stream: &mut TcpStream, slot: Option<&ConnectionSlot>) {
    if stream.shutdown(Shutdown::Write).await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match ctx.read(stream, slot, false, None, Some(left)).await {
            Ok(ReadOutcome::Data(_)) => continue,
            _ => return,
        }
    }
}
