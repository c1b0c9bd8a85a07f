//! The chat side of a shard: its router, the outgoing queues of its chat connections, and
//! the end-of-round work (send router messages, acknowledge memberships, hand over the
//! queues that changed, ring the doorbells of shards we sent to).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::output::ConnOutput;
use super::protocol::{self, AppError, ErrorCode};
use super::session::RateLimits;
use crate::cluster::{ClusterLink, ToCluster};
use crate::metrics::counters::{Route, ShardCounters};
use crate::route::directory::{AckEvent, RoomLimits, Router};
use crate::route::inbox::Mesh;
use crate::route::{shards_in, AckTo, Audience, ConnId, Outcome, Placement, ShardMask, ShardMsg};
use crate::store::thread::{StoreLink, ToStore};
use crate::ws::deflate::{deflate_frame, DeflateStats, Deflater};
use crate::ws::frame::text_frame;

/// Each chat connection of the shard: its user and its outgoing queue.
type ConnTable<O> = HashMap<ConnId, (Arc<str>, Rc<O>)>;

pub struct Hub<O> {
    pub shard: usize,
    pub router: RefCell<Router>,
    pub limits: RoomLimits,
    /// Every chat connection's rate limits.
    pub rate_limits: RateLimits,
    pub mesh: Arc<Mesh>,
    /// The cluster thread, when this node is part of one (`--nats`).
    pub cluster: Option<Arc<ClusterLink>>,
    /// The store thread, unless the gateway only relays (`--store none`).
    pub store: Option<Arc<StoreLink>>,
    /// Joins that asked for the room's messages after a seq, until they are in effect.
    recover_since: RefCell<HashMap<(ConnId, Arc<str>), u64>>,
    /// With the store: connections whose `ready` has not been written yet. Stored direct
    /// messages skip them: the store thread committed those before it listed the
    /// conversations for `ready`, whose heads include them.
    awaiting_ready: RefCell<HashSet<ConnId>>,
    /// Connections registered this round, for which the store is asked for `ready` once
    /// the store thread knows where they are.
    new_conns: RefCell<Vec<(ConnId, Arc<str>)>>,
    /// Messages were queued for the cluster thread since its doorbell last rang.
    ring_cluster: Cell<bool>,
    /// Users of this node connected to other nodes too: a send to them also goes to the
    /// cluster thread (for other users of this node it need not).
    pub also_remote: RefCell<HashSet<Arc<str>>>,
    conns: RefCell<ConnTable<O>>,
    next_conn: Cell<ConnId>,
    /// Queues with frames added since the last round ended.
    dirty: RefCell<Vec<Rc<O>>>,
    /// Shards sent to since their doorbells were last rung.
    to_ring: Cell<ShardMask>,
    /// Scratch space for encoding JSON, reused by every message.
    scratch: RefCell<Vec<u8>>,
    /// With `--deflate`: compresses frames for the connections that agreed to it.
    deflate: Option<FrameDeflate>,
    /// What the chat application did on this shard (routes, acks, errors, frames queued).
    pub counters: ShardCounters,
}

/// Compresses routed frames, once per message (per window size) however many of the
/// shard's connections get it, for the connections that keep no compression state
/// (`ws::deflate`); a connection with context takeover compresses with its own deflater.
pub struct FrameDeflate {
    deflater: RefCell<Deflater>,
    min_size: usize,
    /// What the connections' own deflaters (context takeover) did since the last report.
    own_stats: Cell<DeflateStats>,
}

/// Output buffer bytes a connection's own deflater keeps between messages.
const OWN_DEFLATER_RETAIN: usize = 4096;

impl FrameDeflate {
    pub fn new(level: u32, min_size: usize) -> Self {
        FrameDeflate {
            deflater: RefCell::new(Deflater::new(level)),
            min_size,
            own_stats: Cell::new(DeflateStats::default()),
        }
    }
}

/// The compressed twins of one frame made so far, by window size (8 to 15 bits): `Some(None)`
/// when it was tried and did not pay.
#[derive(Default)]
struct Twins([Option<Option<Bytes>>; 8]);

impl<O: ConnOutput> Hub<O> {
    pub fn new(
        shard: usize,
        mesh: Arc<Mesh>,
        threads: (Option<Arc<ClusterLink>>, Option<Arc<StoreLink>>),
        limits: RoomLimits,
        rate_limits: RateLimits,
        deflate: Option<FrameDeflate>,
    ) -> Self {
        let (cluster, store) = threads;
        Hub {
            shard,
            rate_limits,
            router: RefCell::new(Router::new(shard, mesh.shards()).with_limits(limits)),
            limits,
            mesh,
            cluster,
            store,
            recover_since: RefCell::new(HashMap::new()),
            awaiting_ready: RefCell::new(HashSet::new()),
            new_conns: RefCell::new(Vec::new()),
            ring_cluster: Cell::new(false),
            also_remote: RefCell::new(HashSet::new()),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
            dirty: RefCell::new(Vec::new()),
            to_ring: Cell::new(0),
            scratch: RefCell::new(Vec::with_capacity(4096)),
            deflate,
            counters: ShardCounters::default(),
        }
    }

    /// `frame`, or its compressed twin for a connection that agreed to deflate (made on
    /// first need and kept in `twins` for the other recipients of the same frame; with
    /// the connection's own deflater when it keeps context).
    fn frame_for(&self, out: &O, frame: &Bytes, twins: &mut Twins) -> Bytes {
        let (Some(conn), Some(deflate)) = (out.deflate(), &self.deflate) else {
            return frame.clone();
        };
        if frame.len() < deflate.min_size {
            return frame.clone();
        }
        let window = conn.agreed.window_bits;
        if let Some(own) = conn.own_deflater.as_deref() {
            let mut own = own.borrow_mut();
            let deflated = deflate_frame(&mut own, frame, window, deflate.min_size);
            let mut stats = deflate.own_stats.get();
            stats += own.take_stats();
            deflate.own_stats.set(stats);
            own.trim(OWN_DEFLATER_RETAIN);
            return deflated.map_or_else(|| frame.clone(), Bytes::from);
        }
        let twin = &mut twins.0[usize::from(window.clamp(8, 15) - 8)];
        twin.get_or_insert_with(|| {
            deflate_frame(&mut deflate.deflater.borrow_mut(), frame, window, deflate.min_size).map(Bytes::from)
        })
        .clone()
        .unwrap_or_else(|| frame.clone())
    }

    /// What the chat deflater did since the last call (for the report).
    pub fn take_deflate_stats(&self) -> DeflateStats {
        self.deflate
            .as_ref()
            .map(|d| {
                let mut stats = d.deflater.borrow_mut().take_stats();
                stats += d.own_stats.take();
                stats
            })
            .unwrap_or_default()
    }

    pub fn next_conn_id(&self) -> ConnId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    /// Encodes the JSON `write` produces into a text frame, in the shared scratch space.
    pub fn encode(&self, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        self.with_json(write, text_frame)
    }

    /// Calls `use_json` with the JSON `write` produces, in the shared scratch space.
    pub fn with_json<R>(&self, write: impl FnOnce(&mut Vec<u8>), use_json: impl FnOnce(&[u8]) -> R) -> R {
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        write(&mut scratch);
        use_json(&scratch)
    }

    /// A chat connection of `user` is up.
    pub fn register(&self, user: &Arc<str>, out: Rc<O>) {
        let id = out.conn_id();
        self.conns.borrow_mut().insert(id, (user.clone(), out));
        self.router.borrow_mut().connect(user, id);
        if self.store.is_some() {
            self.awaiting_ready.borrow_mut().insert(id);
            self.new_conns.borrow_mut().push((id, user.clone()));
        }
    }

    /// A chat connection of `user` is gone.
    pub fn unregister(&self, user: &str, id: ConnId) {
        self.conns.borrow_mut().remove(&id);
        self.router.borrow_mut().disconnect(user, id);
        self.awaiting_ready.borrow_mut().remove(&id);
    }

    /// Once connection `conn`'s join of `room` is in effect, it is sent the room's
    /// messages after `since`.
    pub fn recover_after_join(&self, conn: ConnId, room: Arc<str>, since: u64) {
        self.recover_since.borrow_mut().insert((conn, room), since);
    }

    /// Queues `frame` for each of `conns` (except `except`).
    pub fn deliver_local<'a>(
        &self,
        conns: impl IntoIterator<Item = &'a ConnId>,
        frame: &Bytes,
        ingress: Instant,
        except: Option<ConnId>,
        cross_node: bool,
    ) {
        let map = self.conns.borrow();
        let mut dirty = self.dirty.borrow_mut();
        let mut twins = Twins::default();
        for id in conns {
            if Some(*id) == except {
                continue;
            }
            if let Some((_, out)) = map.get(id) {
                let frame = self.frame_for(out, frame, &mut twins);
                self.counters.queued(1, frame.len());
                if out.deliver(frame, ingress, cross_node) {
                    dirty.push(out.clone());
                }
            }
        }
    }

    /// Does any of `conns` still take frames?
    pub fn any_open<'a>(&self, conns: impl IntoIterator<Item = &'a ConnId>) -> bool {
        let map = self.conns.borrow();
        conns
            .into_iter()
            .any(|id| map.get(id).is_some_and(|(_, out)| out.is_open()))
    }

    /// Do all of `conns` (but `except`) have room for `len` more bytes?
    pub fn all_have_room<'a>(&self, conns: impl IntoIterator<Item = &'a ConnId>, len: usize, except: ConnId) -> bool {
        let map = self.conns.borrow();
        conns
            .into_iter()
            .filter(|id| **id != except)
            .all(|id| map.get(id).is_none_or(|(_, out)| out.has_room(len)))
    }

    /// Queues a frame of ours for a connection (not a routed message).
    fn queue_own(&self, out: &Rc<O>, frame: Bytes) {
        let frame = self.frame_for(out, &frame, &mut Twins::default());
        self.counters.queued(1, frame.len());
        if out.answer(frame) {
            self.dirty.borrow_mut().push(out.clone());
        }
    }

    /// Sends `msg` to another shard; its doorbell rings at the end of the round.
    pub fn send_to(&self, shard: usize, msg: ShardMsg) {
        if matches!(msg, ShardMsg::Direct { .. } | ShardMsg::Room { .. }) {
            self.counters.routed(Route::CrossShard, 1);
        }
        self.mesh.push(shard, msg);
        self.to_ring.set(self.to_ring.get() | 1 << shard);
    }

    /// Hands `msg` to the cluster thread; its doorbell rings at the end of the round.
    pub fn to_cluster(&self, link: &ClusterLink, msg: ToCluster) {
        if matches!(msg, ToCluster::Direct { .. } | ToCluster::Publish { .. }) {
            self.counters.routed(Route::CrossNode, 1);
        }
        link.push(msg);
        self.ring_cluster.set(true);
    }

    /// Handles one message from the inbox.
    pub fn on_message(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Direct {
                to,
                frame,
                ingress,
                cross_node,
            } => {
                if cross_node {
                    self.counters.routed(Route::CrossNode, 1);
                }
                let router = self.router.borrow();
                self.deliver_local(router.local_connections(&to), &frame, ingress, None, cross_node);
            }
            ShardMsg::Room {
                room,
                frame,
                ingress,
                except,
                cross_node,
            } => {
                if cross_node {
                    self.counters.routed(Route::CrossNode, 1);
                }
                let router = self.router.borrow();
                let except = (except.0 == self.shard).then_some(except.1);
                self.deliver_local(
                    router.local_room_connections(&room),
                    &frame,
                    ingress,
                    except,
                    cross_node,
                );
            }
            ShardMsg::Stored {
                audience,
                frame,
                ingress,
                except,
                cross_node,
            } => {
                if cross_node {
                    self.counters.routed(Route::CrossNode, 1);
                }
                let router = self.router.borrow();
                let except = (except.0 == self.shard).then_some(except.1);
                let waiting = self.awaiting_ready.borrow();
                let ready = |id: &&ConnId| waiting.is_empty() || !waiting.contains(*id);
                match &audience {
                    Audience::Users(a, b) => {
                        let both = router.local_connections(a).iter();
                        let both = both.chain(if a == b { &[][..] } else { router.local_connections(b) });
                        self.deliver_local(both.filter(ready), &frame, ingress, except, cross_node);
                    }
                    // Not skipped while `ready` is on its way: a member was sent `joined`
                    // already, and `ready` lists the room only if the store noted the
                    // membership before listing, which it need not have (both wait behind
                    // the store's groups). Skipping lost the message for such a member.
                    Audience::Room(room) => {
                        let members = router.local_room_connections(room);
                        self.deliver_local(members, &frame, ingress, except, cross_node);
                    }
                }
            }
            ShardMsg::Reply { conn, frame, ready } => {
                if ready {
                    self.awaiting_ready.borrow_mut().remove(&conn);
                }
                let out = self.conns.borrow().get(&conn).map(|(_, out)| out.clone());
                if let Some(out) = out {
                    self.queue_own(&out, frame);
                }
            }
            ShardMsg::ClusterAck { conn, id, outcome } => self.answer_cluster(conn, id.as_deref(), outcome),
            ShardMsg::AlsoRemote { user, remote } => {
                let mut set = self.also_remote.borrow_mut();
                if remote {
                    set.insert(user);
                } else {
                    set.remove(&user);
                }
            }
            other => self.router.borrow_mut().handle(other),
        }
    }

    /// The end of a cross-node send, for the connection that sent it.
    fn answer_cluster(&self, conn: ConnId, id: Option<&str>, outcome: Outcome) {
        let Some(out) = self.conns.borrow().get(&conn).map(|(_, out)| out.clone()) else {
            return; // The sender is gone.
        };
        match outcome {
            Outcome::Routed => self.counters.ack("routed"),
            Outcome::Offline => self.counters.ack("offline"),
            Outcome::Refused => self.counters.error(ErrorCode::RateLimited.as_str()),
            Outcome::Unavailable => self.counters.error(ErrorCode::Unavailable.as_str()),
        }
        let frame = self.encode(|json| match outcome {
            Outcome::Routed => protocol::write_ack(json, id, "routed"),
            Outcome::Offline => protocol::write_ack(json, id, "offline"),
            Outcome::Refused => protocol::write_error(
                json,
                &AppError::new(
                    ErrorCode::RateLimited,
                    "the recipient's server could not take the message now (overloaded or shutting down); it was not delivered, retry",
                )
                .with_id_str(id),
            ),
            Outcome::Unavailable => protocol::write_error(
                json,
                &AppError::new(ErrorCode::Unavailable,
                    "another node did not confirm the message (the cluster link is down or slow); it may not have arrived",
                )
                .with_id_str(id),
            ),
        });
        self.queue_own(&out, frame);
    }

    /// Which users and rooms this shard now holds (or no longer does), from the router's
    /// messages to other shards: what the cluster and store threads keep.
    fn placement(&self, dest: usize, msg: &ShardMsg) -> Option<Placement> {
        match msg {
            ShardMsg::Attach { user, shard } => Some(Placement::User {
                user: user.clone(),
                shard: *shard,
                present: true,
            }),
            ShardMsg::Detach { user, shard } => Some(Placement::User {
                user: user.clone(),
                shard: *shard,
                present: false,
            }),
            // Broadcast to every shard: passed on once, from the copy addressed to us.
            ShardMsg::RoomShard { room, shard, present } if dest == self.shard && *shard == self.shard => {
                Some(Placement::Room {
                    room: room.clone(),
                    shard: *shard,
                    present: *present,
                })
            }
            _ => None,
        }
    }

    /// The end of a round (a read, an inbox batch): router messages go out, completed
    /// memberships are acknowledged, doorbells rung, and the queues that gained frames
    /// are moved into `dirty`, for the shard to flush.
    pub fn end_round(&self, dirty: &mut Vec<Rc<O>>) {
        self.send_router_effects();
        self.ask_ready();
        self.acknowledge_completed();
        dirty.append(&mut self.dirty.borrow_mut());
        let ring = self.to_ring.replace(0);
        for shard in shards_in(ring) {
            self.mesh.ring(shard);
        }
        if self.ring_cluster.replace(false) {
            if let Some(link) = &self.cluster {
                link.ring();
            }
        }
    }

    /// Sends what the router has for other shards (and itself, and the cluster thread)
    /// until it has nothing more.
    fn send_router_effects(&self) {
        loop {
            let effects = self.router.borrow_mut().take_effects();
            if effects.is_empty() {
                return;
            }
            for (dest, msg) in effects {
                if let Some(placement) = self.placement(dest, &msg) {
                    if let Some(store) = &self.store {
                        store.push(ToStore::Placement(placement.clone()));
                    }
                    if let Some(link) = &self.cluster {
                        self.to_cluster(link, ToCluster::Placement(placement));
                    }
                }
                if dest == self.shard {
                    self.router.borrow_mut().handle(msg);
                } else {
                    self.send_to(dest, msg);
                }
            }
        }
    }

    /// With the store, `ready` comes from the store thread, asked after it was told where
    /// the new connections are (through the same channel, so in that order): every
    /// message it commits after answering reaches them live.
    fn ask_ready(&self) {
        let Some(store) = &self.store else { return };
        for (conn, user) in self.new_conns.borrow_mut().drain(..) {
            let reply = AckTo {
                shard: self.shard,
                conn,
                id: None,
            };
            store.push(ToStore::Ready { user, reply });
        }
    }

    /// Answers `ready`, `joined` and `left` for the changes now in effect everywhere.
    fn acknowledge_completed(&self) {
        let completed = self.router.borrow_mut().take_completed();
        for ack in completed {
            let since = match &ack.event {
                AckEvent::Joined(room) | AckEvent::TooManyRooms(room) => {
                    self.recover_since.borrow_mut().remove(&(ack.conn, room.clone()))
                }
                _ => None,
            };
            let Some((user, out)) = self.conns.borrow().get(&ack.conn).cloned() else {
                continue;
            };
            if let Some(store) = &self.store {
                let reply = AckTo {
                    shard: self.shard,
                    conn: ack.conn,
                    id: None,
                };
                match &ack.event {
                    // `ready` comes from the store thread (see `ask_ready`).
                    AckEvent::Ready => continue,
                    AckEvent::Joined(room) => store.push(ToStore::Joined {
                        user: user.clone(),
                        room: room.clone(),
                        since,
                        reply,
                    }),
                    _ => {}
                }
            }
            let frame = self.encode(|json| match &ack.event {
                AckEvent::Ready => protocol::write_ready(json, &user),
                AckEvent::Joined(room) => protocol::write_membership(json, true, room),
                AckEvent::Left(room) => protocol::write_membership(json, false, room),
                AckEvent::TooManyRooms(room) => {
                    self.counters.error(ErrorCode::TooManyRooms.as_str());
                    protocol::write_error(
                        json,
                        &AppError::new(
                            ErrorCode::TooManyRooms,
                            format!(
                                "not joined to {room}: {user} is in {} rooms, the most allowed; leave one first",
                                self.limits.rooms_per_user
                            ),
                        ),
                    )
                }
            });
            self.queue_own(&out, frame);
        }
    }
}
