//! The chat side of a shard: its router, the outbound queues of its chat connections, and
//! the end-of-round work (send router messages, acknowledge memberships, flush queues,
//! ring the doorbells of shards we sent to).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::outbound::Outbound;
use crate::chat::protocol::{self, AppError};
use crate::cluster::{ClusterLink, Outcome, ToCluster};
use crate::metrics::LatencyRecorder;
use crate::route::directory::{AckEvent, Router};
use crate::route::inbox::Mesh;
use crate::route::{ConnId, ShardMask, ShardMsg};
use crate::ws::frame::{encode_header, MAX_HEADER_LEN};
use crate::ws::OpCode;

/// Each chat connection of the shard: its user and its outbound queue.
type ConnTable = HashMap<ConnId, (Arc<str>, Rc<Outbound>)>;

pub struct Hub {
    pub shard: usize,
    pub router: RefCell<Router>,
    pub mesh: Arc<Mesh>,
    /// The cluster thread, when this node is part of one (`--nats`).
    pub cluster: Option<Arc<ClusterLink>>,
    /// Messages were queued for the cluster thread since its doorbell last rang.
    ring_cluster: Cell<bool>,
    /// Users of this node connected to other nodes too: a send to them also goes to the
    /// cluster thread (for other users of this node it need not).
    pub also_remote: RefCell<HashSet<Arc<str>>>,
    conns: RefCell<ConnTable>,
    next_conn: Cell<ConnId>,
    /// Queues with frames added since the last flush.
    dirty: RefCell<Vec<Rc<Outbound>>>,
    /// The list being flushed, kept between rounds so that its capacity is reused.
    flushing: RefCell<Vec<Rc<Outbound>>>,
    /// Shards sent to since their doorbells were last rung.
    to_ring: Cell<ShardMask>,
    pub latency: RefCell<LatencyRecorder>,
    /// Scratch space for encoding JSON, reused by every message.
    pub scratch: RefCell<Vec<u8>>,
}

/// An encoded text frame, ready to share among recipients.
pub fn text_frame(json: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut header, true, OpCode::Text, json.len() as u64, None);
    let mut frame = Vec::with_capacity(n + json.len());
    frame.extend_from_slice(&header[..n]);
    frame.extend_from_slice(json);
    Bytes::from(frame)
}

impl Hub {
    pub fn new(shard: usize, mesh: Arc<Mesh>, cluster: Option<Arc<ClusterLink>>) -> Self {
        Hub {
            shard,
            router: RefCell::new(Router::new(shard, mesh.shards())),
            mesh,
            cluster,
            ring_cluster: Cell::new(false),
            also_remote: RefCell::new(HashSet::new()),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
            dirty: RefCell::new(Vec::new()),
            flushing: RefCell::new(Vec::new()),
            to_ring: Cell::new(0),
            latency: RefCell::new(LatencyRecorder::default()),
            scratch: RefCell::new(Vec::with_capacity(4096)),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    /// A chat connection of `user` is up.
    pub fn register(&self, user: &Arc<str>, out: Rc<Outbound>) {
        let id = out.id;
        self.conns.borrow_mut().insert(id, (user.clone(), out));
        self.router.borrow_mut().connect(user, id);
    }

    /// A chat connection of `user` is gone.
    pub fn unregister(&self, user: &str, id: ConnId) {
        self.conns.borrow_mut().remove(&id);
        self.router.borrow_mut().disconnect(user, id);
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
        for id in conns {
            if Some(*id) == except {
                continue;
            }
            if let Some((_, out)) = map.get(id) {
                if out.push_routed(frame.clone(), ingress, cross_node) {
                    dirty.push(out.clone());
                }
            }
        }
    }

    /// Queues a frame that is not a routed message (an answer to the connection itself).
    pub fn queue_own(&self, out: &Rc<Outbound>, frame: Bytes) {
        if out.push(frame, None) {
            self.dirty.borrow_mut().push(out.clone());
        }
    }

    /// Sends `msg` to another shard; its doorbell rings at the end of the round.
    pub fn send_to(&self, shard: usize, msg: ShardMsg) {
        self.mesh.push(shard, msg);
        self.to_ring.set(self.to_ring.get() | 1 << shard);
    }

    /// Hands `msg` to the cluster thread; its doorbell rings at the end of the round.
    pub fn to_cluster(&self, link: &ClusterLink, msg: ToCluster) {
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
        let frame = {
            let mut scratch = self.scratch.borrow_mut();
            scratch.clear();
            match outcome {
                Outcome::Routed => protocol::write_ack(&mut scratch, id, "routed"),
                Outcome::Offline => protocol::write_ack(&mut scratch, id, "offline"),
                Outcome::Unavailable => protocol::write_error(
                    &mut scratch,
                    &AppError::new(
                        "unavailable",
                        "another node did not confirm the message (the cluster link is down or slow); it may not have arrived",
                    )
                    .with_id_str(id),
                ),
            }
            text_frame(&scratch)
        };
        self.queue_own(&out, frame);
    }

    /// Tells the cluster thread which users and rooms this shard now holds (or no longer
    /// does), from the router's messages to other shards.
    fn tell_cluster(&self, link: &ClusterLink, dest: usize, msg: &ShardMsg) {
        let msg = match msg {
            ShardMsg::Attach { user, shard } => ToCluster::UserShard {
                user: user.clone(),
                shard: *shard,
                present: true,
            },
            ShardMsg::Detach { user, shard } => ToCluster::UserShard {
                user: user.clone(),
                shard: *shard,
                present: false,
            },
            // Broadcast to every shard: passed on once, from the copy addressed to us.
            ShardMsg::RoomShard { room, shard, present } if dest == self.shard && *shard == self.shard => {
                ToCluster::RoomShard {
                    room: room.clone(),
                    shard: *shard,
                    present: *present,
                }
            }
            _ => return,
        };
        self.to_cluster(link, msg);
    }

    /// The end of a round (a read, an inbox batch): router messages go out, completed
    /// memberships are acknowledged, queues are flushed, doorbells rung. Returns the slots
    /// of connections whose task must take over (a full socket, a slow consumer).
    pub fn end_round(&self, wake: &mut Vec<usize>) {
        loop {
            let effects = self.router.borrow_mut().take_effects();
            if effects.is_empty() {
                break;
            }
            for (dest, msg) in effects {
                if let Some(link) = &self.cluster {
                    self.tell_cluster(link, dest, &msg);
                }
                if dest == self.shard {
                    self.router.borrow_mut().handle(msg);
                } else {
                    self.send_to(dest, msg);
                }
            }
        }
        let completed = self.router.borrow_mut().take_completed();
        for ack in completed {
            let Some((user, out)) = self.conns.borrow().get(&ack.conn).cloned() else {
                continue;
            };
            let frame = {
                let mut scratch = self.scratch.borrow_mut();
                scratch.clear();
                match &ack.event {
                    AckEvent::Ready => protocol::write_ready(&mut scratch, &user),
                    AckEvent::Joined(room) => protocol::write_membership(&mut scratch, true, room),
                    AckEvent::Left(room) => protocol::write_membership(&mut scratch, false, room),
                }
                text_frame(&scratch)
            };
            self.queue_own(&out, frame);
        }
        let mut flushing = self.flushing.borrow_mut();
        std::mem::swap(&mut *flushing, &mut *self.dirty.borrow_mut());
        if !flushing.is_empty() {
            let mut latency = self.latency.borrow_mut();
            for out in flushing.drain(..) {
                match out.flush_now(&mut latency) {
                    Ok(false) if !out.overflowed() => {}
                    _ => wake.push(out.slot),
                }
            }
        }
        let ring = self.to_ring.replace(0);
        for shard in crate::route::shards_in(ring) {
            self.mesh.ring(shard);
        }
        if self.ring_cluster.replace(false) {
            if let Some(link) = &self.cluster {
                link.ring();
            }
        }
    }
}
