//! An upgraded connection: WebSocket frames in, answers out, until it closes.
//!
//! Reads land in the shard's arena and are decoded before the next await; everything the
//! connection answers leaves through `Egress::finish_round`. Routed chat messages for it
//! arrive in its queue, which the shard flushes at the end of each round.

use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::upgrade::Upgraded;
use super::{close_slow_consumer, linger_close, Endpoint, LINGER};
use crate::chat::output::ConnOutput;
use crate::chat::session::{Arrival, ChatConn};
use crate::shard::context::{ConnectionSlot, ReadOutcome, ShardContext};
use crate::shard::egress::{Cork, Finish, Outbound, Socket, RX_BUFFER};
use crate::shard::Apps;
use crate::ws::deflate::{write_compressed_frame, Agreed, ConnDeflate, Deflater};
use crate::ws::{write_close, CloseCode, Decoder, Event, OpCode, ProtocolError, Role};

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

/// What the connection runs: the one place where echo and chat part ways. A chat
/// connection's state has an allocation of its own, so that it is not part of every
/// connection's future (an echo has none).
enum App {
    Echo,
    Chat(Box<ChatConn<Outbound>>),
}

struct Session {
    decoder: Decoder,
    /// What the decoder held after the last read, as counted in the shard's budget.
    held: u32,
    state: State,
    app: App,
    /// When our keepalive ping went out, while no pong has come back.
    ping_sent: Option<Instant>,
}

impl Session {
    /// Decodes `input` and queues every answer (echo, chat answers, pong, close) in `out`.
    /// With permessage-deflate agreed (`deflate`), messages in may be compressed, and echo
    /// answers are compressed when it pays.
    fn on_bytes(
        &mut self,
        apps: &Apps,
        ctx: &ShardContext,
        input: &mut [u8],
        out: &mut Cork,
        deflate: Option<&ConnDeflate>,
    ) -> Next {
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
        let min_size = ctx.config.deflate_min_size;
        let own_deflater = deflate.and_then(|d| d.own_deflater.as_deref());
        let mut on_event = |event: Event<'_>| {
            ctx.counters.frame_in();
            match event {
                Event::Message { opcode, payload } if open => match (&mut *app, arrival) {
                    (App::Echo, _) => match deflate.filter(|_| payload.len() >= min_size) {
                        Some(conn) => match own_deflater {
                            Some(own) => {
                                let mut own = own.borrow_mut();
                                echo_deflated(&mut own, out, opcode, payload, conn.agreed.window_bits);
                                ctx.deflate.count_own(own.take_stats());
                            }
                            None => echo_deflated(
                                &mut ctx.deflate.deflater.borrow_mut(),
                                out,
                                opcode,
                                payload,
                                conn.agreed.window_bits,
                            ),
                        },
                        None => out.frame(opcode, payload),
                    },
                    (App::Chat(chat), Some(arrival)) => {
                        chat.on_message(&apps.hub, &ctx.config, opcode, payload, arrival, out)
                    }
                    (App::Chat(_), None) => {}
                },
                Event::Message { .. } => {}
                Event::Ping(payload) if open => out.frame(OpCode::Pong, payload),
                Event::Ping(_) => {}
                Event::Pong(_) => pong = true,
                Event::Close { code, .. } => {
                    ctx.counters.close_received(code.map(u16::from));
                    peer_close = Some(code)
                }
            }
        };
        let own_inflater = deflate.and_then(|d| d.own_inflater.as_deref());
        let result = match (deflate, own_inflater) {
            (Some(_), Some(own)) => {
                let mut own = own.borrow_mut();
                let result = decoder.feed_inflating(input, &mut own, &mut on_event);
                own.trim(OWN_BUFFER_RETAIN);
                result
            }
            (Some(_), None) => decoder.feed_inflating(input, &mut ctx.deflate.inflater.borrow_mut(), &mut on_event),
            (None, _) => decoder.feed(input, &mut on_event),
        };
        if deflate.is_some() {
            ctx.deflate.trim();
        }
        if let Some(own) = own_deflater {
            own.borrow_mut().trim(OWN_BUFFER_RETAIN);
        }
        if pong {
            self.ping_sent = None;
        }
        // At most one message and a control frame; kept in 4 bytes (a limit set past
        // 4 GiB is counted as 4 GiB, consistently in and out of the budget).
        let held = u32::try_from(self.decoder.held()).unwrap_or(u32::MAX);
        let fits = ctx.budget.assembly_changed(self.held as usize, held as usize);
        self.held = held;
        let result = match result {
            Ok(()) if !fits => {
                ctx.budget.refuse();
                Err(ProtocolError::new(
                    CloseCode::MESSAGE_TOO_BIG,
                    "the server has no memory for large messages now; try again later",
                ))
            }
            other => other,
        };
        if let Err(error) = result {
            if open {
                ctx.counters.close_sent(error.code().into());
                out.push_with(|b| write_close(b, error.code(), error.reason(), None));
            }
            return Next::Fail;
        }
        match peer_close {
            Some(code) => {
                if open {
                    // Echo the peer's code (§5.5.1); an empty Close is answered with an empty one.
                    ctx.counters.close_sent(code.map_or(1005, u16::from));
                    match code {
                        Some(code) => out.push_with(|b| write_close(b, code, "", None)),
                        None => out.frame(OpCode::Close, &[]),
                    }
                }
                Next::Close
            }
            None => Next::Continue,
        }
    }

    /// Starts the closing handshake from our side.
    fn begin_close(&mut self, ctx: &ShardContext, code: CloseCode, reason: &str, out: &mut Cork, drain: Duration) {
        if self.state == State::Open {
            ctx.counters.close_sent(code.into());
            out.push_with(|b| write_close(b, code, reason, None));
            self.state = State::Closing {
                deadline: Instant::now() + drain,
            };
        }
    }

    /// No pong came back in time: Close 1008, then drop the connection.
    fn fail_keepalive(&mut self, ctx: &ShardContext, out: &mut Cork) -> Next {
        self.begin_close(
            ctx,
            CloseCode::POLICY_VIOLATION,
            "no pong to keepalive ping",
            out,
            LINGER,
        );
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

    /// What a read's outcome (other than data) means for the session.
    fn on_no_data(&mut self, outcome: ReadOutcome, cork: &mut Cork, ctx: &ShardContext) -> Option<Next> {
        match outcome {
            ReadOutcome::TimedOut => match (self.state, self.ping_sent) {
                (State::Open, None) => {
                    cork.frame(OpCode::Ping, &[]);
                    self.ping_sent = Some(Instant::now());
                    Some(Next::Continue)
                }
                (State::Open, Some(_)) => Some(self.fail_keepalive(ctx, cork)),
                (State::Closing { .. }, _) => None,
            },
            ReadOutcome::Stopping => {
                self.begin_close(ctx, CloseCode::GOING_AWAY, "going away", cork, ctx.config.drain_timeout);
                Some(Next::Continue)
            }
            ReadOutcome::Outbound => Some(Next::Continue),
            ReadOutcome::Data(_) | ReadOutcome::Eof => None,
        }
    }
}

/// Output buffer bytes a connection's own inflater or deflater (context takeover) keeps
/// between messages.
const OWN_BUFFER_RETAIN: usize = 4096;

/// Echoes a message compressed (or plain, when deflate does not shrink it).
fn echo_deflated(deflater: &mut Deflater, out: &mut Cork, opcode: OpCode, payload: &[u8], window_bits: u8) {
    match deflater.deflate(payload, window_bits) {
        Some(deflated) => out.push_with(|b| write_compressed_frame(b, opcode, deflated)),
        None => out.frame(opcode, payload),
    }
}

/// A connection and everything its loop needs.
struct Conn<'a> {
    ctx: &'a ShardContext,
    apps: &'a Apps,
    slot: &'a ConnectionSlot,
    out: Rc<Outbound>,
    session: Session,
    /// The id a chat connection has in the hub's directory, until it leaves it.
    registered: Option<u64>,
}

/// Runs an upgraded connection until it closes. What followed the request head in its
/// reads (`upgraded.leftover`) is handled first, before the future is returned.
///
/// The connection lives in the returned future for as long as it is open: `Conn` is
/// kept in place (an `async fn` would hold `upgraded` beside it for the connection's
/// life), and the ways a connection ends are boxed when they run, so that an idle
/// connection holds only its read's state.
pub(super) fn run<'a>(
    ctx: &'a ShardContext,
    apps: &'a Apps,
    slot: &'a ConnectionSlot,
    upgraded: Upgraded,
) -> impl Future<Output = ()> + 'a {
    let mut started = start(ctx, apps, slot, upgraded);
    async move {
        if let Some((conn, next)) = &mut started {
            conn.drive(*next).await;
        }
    }
}

/// Opens the session, and handles what followed the request head. `None` when the
/// connection is over already.
fn start<'a>(
    ctx: &'a ShardContext,
    apps: &'a Apps,
    slot: &'a ConnectionSlot,
    upgraded: Upgraded,
) -> Option<(Conn<'a>, Next)> {
    let Upgraded {
        leftover,
        endpoint,
        deflate,
    } = upgraded;
    // (A peer that takes nothing for a ping interval and a pong timeout is gone: the
    // slot's waits for room to write say so.)
    let mut conn = open(ctx, apps, slot, endpoint, deflate);
    // The request head's buffer is freed here, not held for the connection's life: an
    // idle connection keeps no buffer (about 170 bytes each at 15,000 connections).
    let next = if leftover.is_empty() {
        Next::Continue
    } else {
        conn.leftover(leftover).ok()?
    };
    Some((conn, next))
}

/// Registers the connection with its application and sets up its queue.
fn open<'a>(
    ctx: &'a ShardContext,
    apps: &'a Apps,
    slot: &'a ConnectionSlot,
    endpoint: Endpoint,
    deflate: Option<Agreed>,
) -> Conn<'a> {
    let config = &ctx.config;
    let fd = slot.fd();
    let id = apps.hub.next_conn_id();
    // A chat message over its limit closes the connection with 1009 as soon as the limit
    // is passed (RFC 6455 §7.4.1), instead of being assembled first: an unauthenticated
    // peer cannot make the shard hold more than the chat limit per connection.
    let max_message = match endpoint {
        Endpoint::Echo => config.max_message_size,
        Endpoint::Chat(_) => config.max_chat_message,
    };
    let (app, out, registered) = match endpoint {
        Endpoint::Echo => {
            // An echo answers at most one read plus one assembled message at a time.
            let out = Rc::new(
                Outbound::new(id, slot.key(), fd, config.max_message_size + 2 * RX_BUFFER)
                    .with_deflate(deflate, config.deflate_level),
            );
            (App::Echo, out, None)
        }
        Endpoint::Chat(who) => {
            let out = Rc::new(
                Outbound::new(id, slot.key(), fd, config.max_outbound_bytes)
                    .counted_in(ctx.budget.clone())
                    .with_deflate(deflate, config.deflate_level),
            );
            apps.hub.register(&who.user, out.clone());
            ctx.end_round(&apps.hub);
            let chat = ChatConn::new(who, out.clone(), &apps.hub.rate_limits);
            (App::Chat(Box::new(chat)), out, Some(id))
        }
    };
    let session = Session {
        decoder: Decoder::new(Role::Server, max_message),
        held: 0,
        state: State::Open,
        app,
        ping_sent: None,
    };
    Conn {
        ctx,
        apps,
        slot,
        out,
        session,
        registered,
    }
}

impl Drop for Conn<'_> {
    /// However the connection ends: its batched answers are sent, a chat connection
    /// leaves the directory, and the decoder's buffers leave the budget.
    fn drop(&mut self) {
        // What the connection left in the shard's send batch goes before its socket
        // closes (the descriptor number could be reused by then).
        if self.out.is_batched() {
            self.ctx.flush_batch();
        }
        self.end_session();
        self.ctx.budget.assembly_changed(self.session.held as usize, 0);
    }
}

impl Conn<'_> {
    /// The connection's loop: send what is queued, read, answer, until it ends.
    async fn drive(&mut self, mut next: Next) {
        let ctx = self.ctx;
        loop {
            if self.out.overflowed() {
                // Out of the directory first: while the Close waits for the peer, sends to
                // this user must not be acknowledged `routed` into a queue no one will read.
                self.end_session();
                Box::pin(close_slow_consumer(ctx, self.slot, &self.out)).await;
                return;
            }
            if !self.out.is_empty() {
                if ctx.egress.write_queue(self.slot, &self.out).await.is_err() {
                    return;
                }
                continue;
            }
            match next {
                Next::Continue => {}
                // The closing handshake is complete. Shutting the sending side down sends
                // our Close (held back by `Finish::BeforeFin`) with the FIN, even if a peer
                // that broke §5.5.1 sent more after its Close: closing with bytes unread
                // would reset the connection and drop the Close unsent.
                Next::Close => {
                    let _ = Box::pin(ctx.egress.shutdown(self.slot)).await;
                    return;
                }
                Next::Fail => {
                    Box::pin(linger_close(ctx, self.slot)).await;
                    return;
                }
            }
            // Waits for input (or a deadline, a stop, work for the queue). The wait is
            // here, not in a method of its own, so that an idle connection's future
            // holds one level of state.
            glommio::yield_if_needed().await;
            let timeout = self
                .session
                .read_timeout(ctx.config.ping_interval, ctx.config.pong_timeout);
            let open = self.session.state == State::Open;
            let outcome = ctx.read(self.slot, open, Some(&self.out), Some(timeout)).await;
            match outcome.ok().and_then(|outcome| self.on_read(outcome)) {
                Some(n) => next = n,
                None => return,
            }
        }
    }

    /// Handles what followed the request head in its reads (it is not in the arena: its
    /// answers are sent from the cork alone).
    fn leftover(&mut self, mut leftover: Vec<u8>) -> std::io::Result<Next> {
        let mut cork = self.ctx.egress.cork();
        let next = self
            .session
            .on_bytes(self.apps, self.ctx, &mut leftover, &mut cork, self.out.deflate());
        self.end_session_if(next);
        self.ctx.finish_round(
            &self.apps.hub,
            &mut cork,
            &mut leftover,
            &self.out,
            finish_kind(next, false),
        )?;
        if next != Next::Continue {
            self.out.seal();
        }
        Ok(next)
    }

    /// Handles what a read brought (or why it ended), and sends the answers. `None` ends
    /// the connection at once.
    fn on_read(&mut self, outcome: ReadOutcome) -> Option<Next> {
        let ctx = self.ctx;
        let config = &ctx.config;
        // From here to the send: no await, so the shard's buffers are ours alone.
        let n = match outcome {
            ReadOutcome::Data(n) => n,
            _ => 0,
        };
        let mut round = ctx.egress.round(n);
        let next = match outcome {
            ReadOutcome::Data(_) => {
                let (input, cork) = round.parts();
                let next = self.session.on_bytes(self.apps, ctx, input, cork, self.out.deflate());
                // A peer that keeps sending but never answers our ping is not alive either.
                let overdue = self
                    .session
                    .ping_sent
                    .is_some_and(|sent| sent.elapsed() >= config.pong_timeout);
                if next == Next::Continue && overdue {
                    self.session.fail_keepalive(ctx, &mut round.cork)
                } else {
                    next
                }
            }
            other => self.session.on_no_data(other, &mut round.cork, ctx)?,
        };
        self.end_session_if(next);
        // A plain echo answer may wait for the end of the pass; anything that ends or
        // closes the connection leaves now.
        let echo = matches!(self.session.app, App::Echo) && self.session.state == State::Open;
        let (input, cork) = round.parts();
        ctx.finish_round(&self.apps.hub, cork, input, &self.out, finish_kind(next, echo))
            .ok()?;
        if next != Next::Continue || self.session.state != State::Open {
            // Our Close (or the answer to the peer's) is on its way: nothing may follow it.
            self.out.seal();
        }
        Some(next)
    }

    /// Leaves the directory once the connection is ending or closing (our Close queued,
    /// e.g. at shutdown): before our last frames go out, so that a client that sees our
    /// Close and reconnects finds its old connection already gone, and so that nothing
    /// is acknowledged `routed` into a queue that takes no more frames.
    fn end_session_if(&mut self, next: Next) {
        if next != Next::Continue || self.session.state != State::Open {
            self.end_session();
        }
    }

    fn end_session(&mut self) {
        if let (Some(id), App::Chat(chat)) = (self.registered.take(), &self.session.app) {
            self.apps.hub.unregister(&chat.user, id);
            self.ctx.end_round(&self.apps.hub);
        }
    }
}

fn finish_kind(next: Next, echo: bool) -> Finish {
    match next {
        Next::Continue if echo => Finish::Batchable,
        Next::Continue => Finish::Now,
        Next::Close | Next::Fail => Finish::BeforeFin,
    }
}
