//! A chat connection: who it is (`authorize`), and what becomes of each text frame it
//! sends: parsed, checked, routed by kind, answered through its `Reply`.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;

use super::auth::{is_valid_user_id, Authenticator, RoomGrants};
use super::hub::Hub;
use super::output::{ConnOutput, Reply};
use super::protocol::{self, AppError, ClientMessage, ErrorCode, HistoryRange};
use crate::cluster::ToCluster;
use crate::config::Config;
use crate::metrics::counters::Route;
use crate::route::directory::JoinRefused;
use crate::route::{shards_in, AckTo, Audience, ShardMask, ShardMsg};
use crate::store::thread::{AppendRequest, StoreLink, ToStore};
use crate::store::{ConvId, NewMessage, Range};
use crate::ws::handshake::{Rejection, Request};
use crate::ws::OpCode;

/// The rate limits of chat input (`--rate-limit`, `--rate-burst`, `--rate-limit-bytes`,
/// `--rate-burst-bytes`): the same for every connection, so kept once per shard.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    messages_per_s: f64,
    message_burst: f64,
    bytes_per_s: f64,
    byte_burst: f64,
}

impl RateLimits {
    pub fn from_config(config: &Config) -> Self {
        RateLimits {
            messages_per_s: config.rate_limit,
            message_burst: config.rate_burst.max(1) as f64,
            bytes_per_s: config.rate_limit_bytes as f64,
            // A burst always lets one message of the largest size through.
            byte_burst: (config.rate_burst_bytes as usize).max(config.max_chat_message) as f64,
        }
    }
}

/// Which limit a message was over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverRate {
    Messages,
    Bytes,
}

/// A connection's two token buckets, for messages and for bytes, filled from one clock.
/// Only what is left is kept here (the limits are the shard's): 24 bytes per connection.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    messages: f32,
    bytes: f32,
    last: Instant,
}

impl RateLimit {
    /// Full buckets.
    pub fn new(limits: &RateLimits, now: Instant) -> Self {
        RateLimit {
            messages: limits.message_burst as f32,
            bytes: limits.byte_burst as f32,
            last: now,
        }
    }

    /// Takes one message of `len` bytes, or says which limit it is over (a rate of 0 is
    /// no limit). A message over either limit takes nothing.
    pub fn take(&mut self, limits: &RateLimits, len: usize, now: Instant) -> Result<(), OverRate> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let refill = |left: f32, rate: f64, burst: f64| (left as f64 + elapsed * rate).min(burst);
        let messages = refill(self.messages, limits.messages_per_s, limits.message_burst);
        let bytes = refill(self.bytes, limits.bytes_per_s, limits.byte_burst);
        let message_ok = limits.messages_per_s <= 0.0 || messages >= 1.0;
        let bytes_ok = limits.bytes_per_s <= 0.0 || bytes >= len as f64;
        let take = message_ok && bytes_ok;
        self.messages = (messages - if take { 1.0 } else { 0.0 }) as f32;
        self.bytes = (bytes - if take { len as f64 } else { 0.0 }) as f32;
        match (message_ok, bytes_ok) {
            (false, _) => Err(OverRate::Messages),
            (true, false) => Err(OverRate::Bytes),
            (true, true) => Ok(()),
        }
    }
}

/// A connection over its message rate hears so at most this often.
const RATE_ERROR_INTERVAL: Duration = Duration::from_secs(1);

/// When the read that carried a message returned: the monotonic instant (for latency) and
/// the wall clock in Unix milliseconds (the `ts` clients see).
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub ingress: Instant,
    pub ts_ms: u64,
}

impl Arrival {
    pub fn now() -> Self {
        Arrival {
            ingress: Instant::now(),
            ts_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// A chat connection's user (interned in the hub's directory), and the rooms its token
/// grants (`None`: no `rooms` claim, or dev auth).
#[derive(Debug, Clone)]
pub struct ChatUser {
    pub user: Arc<str>,
    pub rooms: Option<RoomGrants>,
}

/// Who is opening /ws: the Origin must be allowed, and a valid token (or, in dev mode, a
/// `user` parameter) must name the user.
pub fn authorize<O: ConnOutput>(
    config: &Config,
    auth: &Authenticator,
    hub: &Hub<O>,
    request: &Request<'_>,
) -> Result<ChatUser, Rejection> {
    const UNAUTHORIZED: &str = "WWW-Authenticate: Bearer\r\n";
    let unauthorized = |message| Rejection {
        status: 401,
        message,
        extra_headers: UNAUTHORIZED,
    };
    if !origin_allowed(config, request) {
        return Err(Rejection {
            status: 403,
            message: "this Origin may not open the chat endpoint",
            extra_headers: "",
        });
    }
    let (token, dev_user) = credentials(request);
    match (token, dev_user) {
        (Some(token), _) => match auth.verify(&token) {
            Ok(id) => Ok(ChatUser {
                user: hub.router.borrow().intern(&id.user),
                rooms: id.rooms,
            }),
            Err(_) => Err(unauthorized("the token is malformed, badly signed or expired")),
        },
        (None, Some(user)) if config.insecure_dev_auth => {
            if is_valid_user_id(&user) {
                Ok(ChatUser {
                    user: hub.router.borrow().intern(&user),
                    rooms: None,
                })
            } else {
                Err(unauthorized("user must be 1-64 of A-Z a-z 0-9 _ . @ -"))
            }
        }
        _ => Err(unauthorized("a token is required: ?token= or Authorization: Bearer")),
    }
}

/// Browsers send an Origin; with `--allowed-origin` set, it must be one of them.
fn origin_allowed(config: &Config, request: &Request<'_>) -> bool {
    if config.allowed_origins.is_empty() {
        return true;
    }
    match request.header_values("origin").next() {
        Some(origin) => config
            .allowed_origins
            .iter()
            .any(|o| o.as_bytes() == origin.trim_ascii()),
        None => true,
    }
}

/// The token (`?token=`, else `Authorization: Bearer`) and the dev-mode `?user=`.
pub fn credentials(request: &Request<'_>) -> (Option<String>, Option<String>) {
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
    (token, dev_user)
}

/// One chat connection: its user, the rooms it may join, its outgoing queue and its rate
/// limit.
pub struct ChatConn<O> {
    pub user: Arc<str>,
    /// Boxed: most tokens carry no room claim, and this state is kept per connection.
    rooms: Option<Box<RoomGrants>>,
    pub out: Rc<O>,
    rate: RateLimit,
    /// When the last `rate_limited` error went out.
    rate_error_at: Option<Instant>,
}

impl<O: ConnOutput> ChatConn<O> {
    pub fn new(who: ChatUser, out: Rc<O>, limits: &RateLimits) -> Self {
        ChatConn {
            user: who.user,
            rooms: who.rooms.map(Box::new),
            out,
            rate: RateLimit::new(limits, Instant::now()),
            rate_error_at: None,
        }
    }

    /// Handles one complete message from the client; `at` is when the read that carried
    /// it returned. Answers (acks, errors) go to `reply`.
    pub fn on_message(
        &mut self,
        hub: &Hub<O>,
        config: &Config,
        opcode: OpCode,
        payload: &[u8],
        at: Arrival,
        reply: &mut impl Reply,
    ) {
        let result = if opcode != OpCode::Text {
            Err(AppError::new(ErrorCode::BadJson, "the chat protocol uses text frames"))
        } else if let Err(over) = self.rate.take(&hub.rate_limits, payload.len(), at.ingress) {
            // One error per RATE_ERROR_INTERVAL at most: a flood of tiny frames must not be
            // answered with as many (larger) error frames.
            if self
                .rate_error_at
                .is_some_and(|t| at.ingress.saturating_duration_since(t) < RATE_ERROR_INTERVAL)
            {
                return;
            }
            self.rate_error_at = Some(at.ingress);
            Err(AppError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {}; messages over the limit are dropped, with one error a second",
                    match over {
                        OverRate::Messages => format!("{} messages per second", config.rate_limit),
                        OverRate::Bytes => format!("{} bytes per second", config.rate_limit_bytes),
                    }
                ),
            ))
        } else {
            protocol::parse(payload).and_then(|msg| self.route(hub, config, msg, at, reply))
        };
        if let Err(error) = result {
            hub.counters.error(error.code.as_str());
            hub.with_json(|json| protocol::write_error(json, &error), |json| reply.text(json));
        }
    }

    fn route(
        &mut self,
        hub: &Hub<O>,
        config: &Config,
        msg: ClientMessage<'_>,
        at: Arrival,
        reply: &mut impl Reply,
    ) -> Result<(), AppError> {
        match msg {
            ClientMessage::Send { to, id, body } => {
                let id = id.as_deref();
                self.send(hub, &to, id, body, at, reply)
                    .inspect(|()| hub.counters.routed(Route::Direct, 1))
                    .map_err(|e| e.with_id_str(id))
            }
            ClientMessage::Publish { room, id, body } => {
                let id = id.as_deref();
                self.publish(hub, &room, id, body, at, reply)
                    .inspect(|()| hub.counters.routed(Route::Room, 1))
                    .map_err(|e| e.with_id_str(id))
            }
            ClientMessage::Join { room, since } => {
                self.check_may_join(&room, config)?;
                if since.is_some() && hub.store.is_none() {
                    return Err(no_history());
                }
                self.change_membership(hub, room, true, since)
            }
            ClientMessage::History { conv, range, limit, id } => {
                let id = id.as_deref();
                self.history(hub, config, conv, range, limit, id)
                    .map_err(|e| e.with_id_str(id))
            }
            ClientMessage::Leave { room } => self.change_membership(hub, room, false, None),
        }
    }

    /// A direct message: to the recipient's connections on this node's shards, and to the
    /// cluster thread when it has connections elsewhere (or none here).
    fn send(
        &self,
        hub: &Hub<O>,
        to: &str,
        id: Option<&str>,
        body: &RawValue,
        at: Arrival,
        reply: &mut impl Reply,
    ) -> Result<(), AppError> {
        if let Some(store) = hub.store.as_deref() {
            let to = hub.router.borrow().intern(to);
            let mask = hub.router.borrow().user_shards(&to) | hub.router.borrow().user_shards(&self.user);
            check_shards_have_room(hub, mask, "the recipient's shard is overloaded; retry")?;
            let conv = ConvId::direct(&self.user, &to);
            let audience = Audience::Users(self.user.clone(), to);
            return self.store(hub, store, conv, audience, id, body, at);
        }
        let mask = hub.router.borrow().user_shards(to);
        let cluster = hub.cluster.as_deref();
        if let Some(link) = cluster {
            // The recipient may have connections on other nodes too.
            if mask == 0 && !link.is_up() {
                return Err(unavailable(
                    "the recipient is not on this node, and the cluster is unreachable",
                ));
            }
            if link.is_up() && link.is_full() {
                return Err(AppError::new(
                    ErrorCode::RateLimited,
                    "the cluster link is overloaded; retry",
                ));
            }
        }
        if mask == 0 && cluster.is_none() {
            hub.counters.ack("offline");
            hub.with_json(|json| protocol::write_ack(json, id, "offline"), |json| reply.text(json));
            return Ok(());
        }
        check_shards_have_room(hub, mask, "the recipient's shard is overloaded; retry")?;
        let frame = hub.encode(|json| protocol::write_message(json, &self.user, to, id, at.ts_ms, body));
        let to = hub.router.borrow().intern(to);
        for shard in shards_in(mask) {
            if shard == hub.shard {
                let router = hub.router.borrow();
                hub.deliver_local(router.local_connections(&to), &frame, at.ingress, None, false);
            } else {
                let (to, frame, ingress) = (to.clone(), frame.clone(), at.ingress);
                hub.send_to(
                    shard,
                    ShardMsg::Direct {
                        to,
                        frame,
                        ingress,
                        cross_node: false,
                    },
                );
            }
        }
        let elsewhere = mask == 0 || hub.also_remote.borrow().contains(&to);
        // Only on this shard, and every connection there just overflowed (or is closing):
        // the message went nowhere, and the sender hears so rather than `routed`.
        if mask == 1 << hub.shard && !elsewhere && !hub.any_open(hub.router.borrow().local_connections(&to)) {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                "the recipient is not reading fast enough and its connection is being closed; the message was not delivered",
            ));
        }
        if let Some(link) = cluster.filter(|l| l.is_up() && elsewhere) {
            // Not on this node: the cluster thread answers once other nodes did.
            let ack = (mask == 0).then(|| self.ack_to(hub, id));
            hub.to_cluster(
                link,
                ToCluster::Direct {
                    to,
                    frame,
                    ingress: at.ingress,
                    ack,
                },
            );
            if mask == 0 {
                return Ok(());
            }
        }
        hub.counters.ack("routed");
        hub.with_json(|json| protocol::write_ack(json, id, "routed"), |json| reply.text(json));
        Ok(())
    }

    /// A room message: to the members' connections on this node (except the sender's),
    /// then through the cluster thread, which answers once the other nodes confirmed.
    fn publish(
        &self,
        hub: &Hub<O>,
        room: &str,
        id: Option<&str>,
        body: &RawValue,
        at: Arrival,
        reply: &mut impl Reply,
    ) -> Result<(), AppError> {
        if !hub.router.borrow().is_member(&self.user, room) {
            return Err(AppError::new(
                ErrorCode::NotMember,
                format!("join {room} before publishing to it"),
            ));
        }
        let mask = hub.router.borrow().room_shards(room);
        check_shards_have_room(hub, mask, "a member's shard is overloaded; retry")?;
        if let Some(store) = hub.store.as_deref() {
            // The frame is made by the store thread (it holds the seq): this is its size
            // near enough, for the members' queues.
            let len = body.get().len() + room.len() * 2 + self.user.len() + id.map_or(0, str::len) + 128;
            let fits = {
                let router = hub.router.borrow();
                hub.all_have_room(router.local_room_connections(room), len, self.out.conn_id())
            };
            if !fits {
                return Err(AppError::new(
                    ErrorCode::RateLimited,
                    format!("members of {room} are not keeping up with its messages; retry later"),
                ));
            }
            let room = hub.router.borrow().intern_room(room);
            let conv = ConvId::room(&room);
            return self.store(hub, store, conv, Audience::Room(room), id, body, at);
        }
        if hub.cluster.as_ref().is_some_and(|l| l.is_up() && l.is_full()) {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                "a member's shard is overloaded; retry",
            ));
        }
        let frame = hub.encode(|json| protocol::write_room_message(json, room, &self.user, id, at.ts_ms, body));
        // A publish that would overflow members' queues here is refused, not delivered
        // to close them as slow consumers: the publisher retries, the members keep up.
        // (Elsewhere `--rate-limit-bytes` bounds what one publisher adds to a queue.)
        let fits = {
            let router = hub.router.borrow();
            hub.all_have_room(router.local_room_connections(room), frame.len(), self.out.conn_id())
        };
        if !fits {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                format!("members of {room} are not keeping up with its messages; retry later"),
            ));
        }
        let room = hub.router.borrow().intern_room(room);
        self.publish_locally(hub, &room, &frame, at.ingress, mask);
        if let Some(link) = hub.cluster.as_deref() {
            if !link.is_up() {
                return Err(unavailable(
                    "delivered to the room's members on this node only: the cluster is unreachable",
                ));
            }
            let ack = self.ack_to(hub, id);
            hub.to_cluster(
                link,
                ToCluster::Publish {
                    room,
                    frame,
                    ingress: at.ingress,
                    ack,
                },
            );
            return Ok(());
        }
        hub.counters.ack("routed");
        hub.with_json(|json| protocol::write_ack(json, id, "routed"), |json| reply.text(json));
        Ok(())
    }

    /// Hands a message to the store thread, which sequences, stores, delivers and acks it.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        hub: &Hub<O>,
        store: &StoreLink,
        conv: ConvId,
        audience: Audience,
        id: Option<&str>,
        body: &RawValue,
        at: Arrival,
    ) -> Result<(), AppError> {
        if store.is_full() {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                "the message store is behind; the message was not stored, retry",
            ));
        }
        let message = NewMessage {
            conv,
            from: self.user.to_string(),
            client_id: id.map(str::to_string),
            ts_ms: at.ts_ms,
            body: body.get().as_bytes().to_vec(),
        };
        store.push(ToStore::Append(Box::new(AppendRequest {
            message,
            audience,
            ingress: at.ingress,
            shard: hub.shard,
            conn: self.out.conn_id(),
        })));
        Ok(())
    }

    /// A page of a conversation the user is part of: its own direct conversations, and
    /// the rooms it may join.
    fn history(
        &self,
        hub: &Hub<O>,
        config: &Config,
        conv: ConvId,
        range: HistoryRange,
        limit: usize,
        id: Option<&str>,
    ) -> Result<(), AppError> {
        let Some(store) = hub.store.as_deref() else {
            return Err(no_history());
        };
        let allowed = match (conv.direct_users(), conv.room_name()) {
            (Some((a, b)), _) => *self.user == *a || *self.user == *b,
            (None, Some(room)) => self.check_may_join(room, config).is_ok(),
            (None, None) => false,
        };
        if !allowed {
            return Err(AppError::new(
                ErrorCode::Forbidden,
                format!("{} may not read {conv}", self.user),
            ));
        }
        let range = match range {
            HistoryRange::Since(since) => Range::After(since),
            HistoryRange::Before(before) => Range::Before(before.unwrap_or(u64::MAX)),
        };
        store.push(ToStore::Read {
            conv,
            range,
            limit,
            reply: AckTo {
                shard: hub.shard,
                conn: self.out.conn_id(),
                id: id.map(Box::from),
            },
        });
        Ok(())
    }

    /// Delivers a room's frame on every shard of this node in `mask`.
    fn publish_locally(&self, hub: &Hub<O>, room: &Arc<str>, frame: &Bytes, ingress: Instant, mask: ShardMask) {
        for shard in shards_in(mask) {
            if shard == hub.shard {
                let router = hub.router.borrow();
                let members = router.local_room_connections(room);
                hub.deliver_local(members, frame, ingress, Some(self.out.conn_id()), false);
            } else {
                let msg = ShardMsg::Room {
                    room: room.clone(),
                    frame: frame.clone(),
                    ingress,
                    except: (hub.shard, self.out.conn_id()),
                    cross_node: false,
                };
                hub.send_to(shard, msg);
            }
        }
    }

    /// A token's `rooms` claim decides which rooms the user may join; without one,
    /// `--rooms-closed-by-default` does.
    fn check_may_join(&self, room: &str, config: &Config) -> Result<(), AppError> {
        let allowed = match &self.rooms {
            Some(grants) => grants.allows(room),
            None => !config.rooms_closed_by_default,
        };
        if allowed {
            Ok(())
        } else {
            Err(AppError::new(
                ErrorCode::Forbidden,
                format!("this token does not let {} join {room}", self.user),
            ))
        }
    }

    fn change_membership(
        &self,
        hub: &Hub<O>,
        room: Cow<'_, str>,
        join: bool,
        since: Option<u64>,
    ) -> Result<(), AppError> {
        let name: Arc<str> = Arc::from(room.as_ref());
        hub.router
            .borrow_mut()
            .change_membership(&self.user, self.out.conn_id(), name.clone(), join)
            .map(|()| {
                // Kept until the join completes (a refused join leaves nothing behind).
                if let Some(since) = since {
                    hub.recover_after_join(self.out.conn_id(), name, since);
                }
            })
            .map_err(|JoinRefused::RoomFull| {
                AppError::new(
                    ErrorCode::RoomFull,
                    format!(
                        "not joined to {room}: it has {} members on this server shard, the most allowed",
                        hub.limits.members_per_shard
                    ),
                )
            })
    }

    /// Where the cluster thread's answer for this connection goes.
    fn ack_to(&self, hub: &Hub<O>, id: Option<&str>) -> AckTo {
        AckTo {
            shard: hub.shard,
            conn: self.out.conn_id(),
            id: id.map(Box::from),
        }
    }
}

/// Refuses a delivery that would overfill another shard's inbox.
fn check_shards_have_room<O: ConnOutput>(hub: &Hub<O>, mask: ShardMask, message: &'static str) -> Result<(), AppError> {
    if shards_in(mask).any(|s| s != hub.shard && hub.mesh.is_full(s)) {
        return Err(AppError::new(ErrorCode::RateLimited, message));
    }
    Ok(())
}

fn no_history() -> AppError {
    AppError::new(
        ErrorCode::Unavailable,
        "this gateway keeps no history (it runs with --store none)",
    )
}

fn unavailable(message: &'static str) -> AppError {
    AppError::new(ErrorCode::Unavailable, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(messages_per_s: f64, message_burst: f64, bytes_per_s: f64, byte_burst: f64) -> RateLimits {
        RateLimits {
            messages_per_s,
            message_burst,
            bytes_per_s,
            byte_burst,
        }
    }

    #[test]
    fn rate_limits_allow_bursts_then_the_rate() {
        let t0 = Instant::now();
        let l = limits(10.0, 3.0, 0.0, 0.0);
        let mut r = RateLimit::new(&l, t0);
        assert!((0..3).all(|_| r.take(&l, 100, t0).is_ok()));
        assert_eq!(r.take(&l, 100, t0), Err(OverRate::Messages));
        let later = t0 + Duration::from_millis(100);
        assert!(r.take(&l, 100, later).is_ok());
        assert_eq!(r.take(&l, 100, later), Err(OverRate::Messages));
        let none = limits(0.0, 1.0, 0.0, 1.0);
        let mut unlimited = RateLimit::new(&none, t0);
        assert!((0..10_000).all(|_| unlimited.take(&none, 1 << 20, t0).is_ok()));
    }

    #[test]
    fn bytes_are_limited_beside_messages_and_a_refused_message_takes_nothing() {
        let t0 = Instant::now();
        let l = limits(0.0, 1.0, 1000.0, 4000.0);
        let mut r = RateLimit::new(&l, t0);
        assert!(r.take(&l, 1500, t0).is_ok() && r.take(&l, 1500, t0).is_ok());
        assert_eq!(r.take(&l, 1500, t0), Err(OverRate::Bytes));
        // 1,000 bytes are left: a small message still fits.
        assert!(r.take(&l, 900, t0).is_ok());
        // Half a second refills 500 bytes.
        assert!(r.take(&l, 550, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn a_connection_keeps_only_what_is_left() {
        assert!(std::mem::size_of::<RateLimit>() <= 24);
    }
}
