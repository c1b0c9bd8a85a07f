//! The router of one shard, sans IO: it keeps the shard's view of where users and rooms
//! are, and turns connects, disconnects and membership changes into messages for other
//! shards (`take_effects`). The shard layer sends those and feeds back what arrives.
//!
//! Consistency without locks:
//! - Each user has a home shard (a hash of the id). Only the home changes the user's
//!   record (which shards hold its connections, which rooms it is in) and broadcasts
//!   every change as a `UserState` snapshot; every shard keeps the latest as its replica.
//!   One writer per user and FIFO inboxes make all replicas converge to the same order.
//! - Each shard alone says whether it holds members of a room (`RoomShard`); every
//!   shard's room mask is the collection of those bits.
//! - A membership change is acknowledged to the client only after the home recorded it
//!   and two barrier rounds over all shards: the first makes every shard apply the new
//!   `UserState`, the second makes every shard apply the `RoomShard` bits that caused.
//!   After `joined`, a publish from any shard reaches the user's connections.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock};

use super::{ConnId, ShardMask, ShardMsg, Ticket};

/// What a pending ticket will acknowledge to its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckEvent {
    /// The connection's user is reachable from every shard.
    Ready,
    Joined(Arc<str>),
    Left(Arc<str>),
    /// The user is in `--max-rooms-per-user` rooms already: the join was not made.
    TooManyRooms(Arc<str>),
}

/// Bounds on rooms, so that neither a user's joins (each rebroadcasts the user's room
/// list to every shard) nor a room's fan-out can grow without limit. 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomLimits {
    /// Rooms one user may be in (all its connections on the node together).
    pub rooms_per_user: usize,
    /// Connections of one room on one shard (a publish's fan-out work on that shard).
    pub members_per_shard: usize,
}

/// Why a join is refused on the spot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefused {
    /// The room has `members_per_shard` connections on this shard.
    RoomFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledged {
    pub conn: ConnId,
    pub event: AckEvent,
}

#[derive(Debug)]
struct Pending {
    ack: Acknowledged,
    round: u8,
    waiting: usize,
}

#[derive(Debug, Default)]
struct HomeRecord {
    mask: ShardMask,
    rooms: Vec<Arc<str>>,
}

/// A user's connections on this shard: nearly always one, which needs no allocation.
#[derive(Debug, Clone)]
enum Devices {
    One(ConnId),
    Many(Vec<ConnId>),
}

impl Devices {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Devices::One(conn) => std::slice::from_ref(conn),
            Devices::Many(conns) => conns,
        }
    }

    fn push(&mut self, conn: ConnId) {
        match self {
            Devices::One(first) => *self = Devices::Many(vec![*first, conn]),
            Devices::Many(conns) => conns.push(conn),
        }
    }

    /// Removes `conn`; true when no connection is left.
    fn remove(&mut self, conn: ConnId) -> bool {
        match self {
            Devices::One(only) => *only == conn,
            Devices::Many(conns) => {
                conns.retain(|c| *c != conn);
                match conns.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Devices::One(*one);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// The rooms list of every user in no room (most users): one shared allocation, where
/// collecting an empty list into an `Arc<[_]>` would make one per user.
static NO_ROOMS: LazyLock<Arc<[Arc<str>]>> = LazyLock::new(|| Arc::from(Vec::new()));

#[derive(Debug, Clone)]
struct Replica {
    mask: ShardMask,
    rooms: Arc<[Arc<str>]>,
}

pub struct Router {
    shard: usize,
    shards: usize,
    /// Latest `UserState` of every connected user, from its home.
    users: HashMap<Arc<str>, Replica>,
    /// Shards holding members of each room, from their `RoomShard`s.
    room_masks: HashMap<Arc<str>, ShardMask>,
    /// This shard's connections, by user.
    local_users: HashMap<Arc<str>, Devices>,
    /// This shard's connections that receive each room.
    local_rooms: HashMap<Arc<str>, HashSet<ConnId>>,
    /// Records of the users whose home is this shard.
    homes: HashMap<Arc<str>, HomeRecord>,
    pending: HashMap<u64, Pending>,
    /// Joins from this shard's connections still in flight, by room (they count against
    /// the room's members before they take effect).
    joining: HashMap<Arc<str>, usize>,
    limits: RoomLimits,
    next_seq: u64,
    effects: Vec<(usize, ShardMsg)>,
    completed: Vec<Acknowledged>,
}

impl Router {
    pub fn new(shard: usize, shards: usize) -> Self {
        Router {
            shard,
            shards,
            users: HashMap::new(),
            room_masks: HashMap::new(),
            local_users: HashMap::new(),
            local_rooms: HashMap::new(),
            homes: HashMap::new(),
            pending: HashMap::new(),
            joining: HashMap::new(),
            limits: RoomLimits::default(),
            next_seq: 0,
            effects: Vec::new(),
            completed: Vec::new(),
        }
    }

    pub fn with_limits(mut self, limits: RoomLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The shard that owns `user`'s record.
    pub fn home_of(&self, user: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut h);
        (h.finish() % self.shards as u64) as usize
    }

    /// Messages to send: `(destination shard, message)`. Those for this shard itself must
    /// be fed back through `handle`.
    pub fn take_effects(&mut self) -> Vec<(usize, ShardMsg)> {
        std::mem::take(&mut self.effects)
    }

    /// Membership changes now in effect everywhere, to acknowledge to their connections.
    pub fn take_completed(&mut self) -> Vec<Acknowledged> {
        std::mem::take(&mut self.completed)
    }

    fn send(&mut self, shard: usize, msg: ShardMsg) {
        self.effects.push((shard, msg));
    }

    fn broadcast(&mut self, msg: ShardMsg) {
        for shard in 0..self.shards {
            self.effects.push((shard, msg.clone()));
        }
    }

    // ---- queries on the hot path ----

    /// Shards holding connections of `user` (0 when offline, as far as this shard knows).
    pub fn user_shards(&self, user: &str) -> ShardMask {
        self.users.get(user).map_or(0, |r| r.mask)
    }

    /// Shards holding connections of members of `room`.
    pub fn room_shards(&self, room: &str) -> ShardMask {
        self.room_masks.get(room).copied().unwrap_or(0)
    }

    pub fn is_member(&self, user: &str, room: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|r| r.rooms.iter().any(|x| &**x == room))
    }

    /// This shard's connections of `user`.
    pub fn local_connections(&self, user: &str) -> &[ConnId] {
        self.local_users.get(user).map_or(&[], Devices::as_slice)
    }

    /// This shard's connections that receive `room`.
    pub fn local_room_connections(&self, room: &str) -> impl Iterator<Item = &ConnId> {
        self.local_rooms.get(room).into_iter().flatten()
    }

    /// The interned id for `user`, shared with the directory's maps when known.
    pub fn intern(&self, user: &str) -> Arc<str> {
        match self.users.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        }
    }

    /// The interned name of `room`, shared with the directory's maps when known (a publish
    /// to a room with members then allocates nothing for the name).
    pub fn intern_room(&self, room: &str) -> Arc<str> {
        match self.room_masks.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => Arc::from(room),
        }
    }

    // ---- local events ----

    /// A connection of `user` was upgraded on this shard.
    pub fn connect(&mut self, user: &Arc<str>, conn: ConnId) {
        let first = match self.local_users.entry(user.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().push(conn);
                false
            }
            Entry::Vacant(e) => {
                e.insert(Devices::One(conn));
                true
            }
        };
        // Rooms the user is already in (joined from another device) include this connection.
        let rooms = self.users.get(&**user).map(|r| r.rooms.clone());
        for room in rooms.iter().flat_map(|r| r.iter()) {
            self.add_local_room_member(room, conn);
        }
        let home = self.home_of(user);
        if first {
            self.send(
                home,
                ShardMsg::Attach {
                    user: user.clone(),
                    shard: self.shard,
                },
            );
        }
        // `ready` once the home has the attachment and every shard applied it.
        let ticket = self.new_ticket(conn, AckEvent::Ready);
        self.send(home, ShardMsg::Sync { ticket });
    }

    fn new_ticket(&mut self, conn: ConnId, event: AckEvent) -> Ticket {
        self.next_seq += 1;
        let ticket = Ticket {
            shard: self.shard,
            seq: self.next_seq,
        };
        self.pending.insert(
            ticket.seq,
            Pending {
                ack: Acknowledged { conn, event },
                round: 0,
                waiting: 0,
            },
        );
        ticket
    }

    /// A connection of `user` on this shard closed.
    pub fn disconnect(&mut self, user: &str, conn: ConnId) {
        let Some(conns) = self.local_users.get_mut(user) else {
            return;
        };
        let last = conns.remove(conn);
        let rooms = self.users.get(user).map(|r| r.rooms.clone());
        for room in rooms.iter().flat_map(|r| r.iter()) {
            self.remove_local_room_member(room, conn);
        }
        if last {
            if let Some((user, _)) = self.local_users.remove_entry(user) {
                self.send(
                    self.home_of(&user),
                    ShardMsg::Detach {
                        user,
                        shard: self.shard,
                    },
                );
            }
        }
    }

    /// Connection `conn` of `user` asks to join or leave `room`; `Acknowledged` comes out of
    /// `take_completed` once the change is in effect on every shard.
    /// A join to a room that has its fill of this shard's connections is refused at once.
    pub fn change_membership(
        &mut self,
        user: &Arc<str>,
        conn: ConnId,
        room: Arc<str>,
        join: bool,
    ) -> Result<(), JoinRefused> {
        let event = if join {
            let max = self.limits.members_per_shard;
            let here = self.local_rooms.get(&room).map_or(0, |c| c.len());
            let joining = self.joining.get(&room).copied().unwrap_or(0);
            let already = self.local_rooms.get(&room).is_some_and(|c| c.contains(&conn));
            if max > 0 && !already && here + joining >= max {
                return Err(JoinRefused::RoomFull);
            }
            *self.joining.entry(room.clone()).or_insert(0) += 1;
            AckEvent::Joined(room.clone())
        } else {
            AckEvent::Left(room.clone())
        };
        let ticket = self.new_ticket(conn, event);
        self.send(
            self.home_of(user),
            ShardMsg::Membership {
                user: user.clone(),
                room,
                join,
                ticket,
            },
        );
        Ok(())
    }

    /// A pending operation is over: its answer goes out, and a join no longer counts as
    /// in flight.
    fn complete(&mut self, ack: Acknowledged) {
        if let AckEvent::Joined(room) | AckEvent::TooManyRooms(room) = &ack.event {
            if let Some(n) = self.joining.get_mut(room) {
                *n -= 1;
                if *n == 0 {
                    self.joining.remove(room);
                }
            }
        }
        self.completed.push(ack);
    }

    // ---- messages from shards (including this one) ----

    /// Applies a control message. Delivery messages (`Direct`, `Room`) are the shard
    /// layer's and are ignored here.
    pub fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Attach { user, shard } => {
                let rec = self.homes.entry(user.clone()).or_default();
                rec.mask |= 1 << shard;
                self.publish_user(user);
            }
            ShardMsg::Detach { user, shard } => {
                if let Some(rec) = self.homes.get_mut(&user) {
                    rec.mask &= !(1 << shard);
                    if rec.mask == 0 {
                        // Membership lasts until the user's last connection closes.
                        rec.rooms.clear();
                    }
                    self.publish_user(user);
                }
            }
            ShardMsg::Membership {
                user,
                room,
                join,
                ticket,
            } => {
                // A user with no connection left has no record: nothing to change.
                let max = self.limits.rooms_per_user;
                let mut refused = false;
                if let Some(rec) = self.homes.get_mut(&user) {
                    let present = rec.rooms.iter().position(|r| *r == room);
                    match (join, present) {
                        // The home alone counts a user's rooms: devices joining at once
                        // cannot overshoot it.
                        (true, None) if max > 0 && rec.rooms.len() >= max => refused = true,
                        (true, None) => rec.rooms.push(room),
                        (false, Some(i)) => {
                            rec.rooms.swap_remove(i);
                        }
                        _ => {}
                    }
                    if !refused {
                        self.publish_user(user);
                    }
                }
                self.send(ticket.shard, ShardMsg::Done { ticket, refused });
            }
            ShardMsg::Sync { ticket } => self.send(ticket.shard, ShardMsg::Done { ticket, refused: false }),
            ShardMsg::UserState { user, mask, rooms } => self.apply_user_state(user, mask, rooms),
            ShardMsg::RoomShard { room, shard, present } => {
                if present {
                    *self.room_masks.entry(room).or_insert(0) |= 1 << shard;
                } else if let Some(mask) = self.room_masks.get_mut(&room) {
                    *mask &= !(1 << shard);
                    if *mask == 0 {
                        self.room_masks.remove(&room);
                    }
                }
            }
            ShardMsg::Done { ticket, refused: true } => {
                // Nothing changed: no barrier needed, the refusal is the answer.
                if let Some(mut p) = self.pending.remove(&ticket.seq) {
                    if let AckEvent::Joined(room) = p.ack.event {
                        p.ack.event = AckEvent::TooManyRooms(room);
                    }
                    self.complete(p.ack);
                }
            }
            ShardMsg::Done { ticket, refused: false } => self.barrier_round(ticket, 1),
            ShardMsg::Barrier { ticket, round } => self.send(ticket.shard, ShardMsg::BarrierAck { ticket, round }),
            ShardMsg::BarrierAck { ticket, round } => {
                let Some(p) = self.pending.get_mut(&ticket.seq) else {
                    return;
                };
                if p.round != round {
                    return;
                }
                p.waiting -= 1;
                if p.waiting == 0 {
                    if round == 1 {
                        self.barrier_round(ticket, 2);
                    } else if let Some(p) = self.pending.remove(&ticket.seq) {
                        self.complete(p.ack);
                    }
                }
            }
            ShardMsg::Direct { .. }
            | ShardMsg::Room { .. }
            | ShardMsg::Stored { .. }
            | ShardMsg::Reply { .. }
            | ShardMsg::ClusterAck { .. }
            | ShardMsg::AlsoRemote { .. } => {}
        }
    }

    fn barrier_round(&mut self, ticket: Ticket, round: u8) {
        let others: Vec<usize> = (0..self.shards).filter(|&s| s != self.shard).collect();
        let Some(p) = self.pending.get_mut(&ticket.seq) else {
            return;
        };
        if others.is_empty() {
            if let Some(p) = self.pending.remove(&ticket.seq) {
                self.complete(p.ack);
            }
            return;
        }
        p.round = round;
        p.waiting = others.len();
        for s in others {
            self.send(s, ShardMsg::Barrier { ticket, round });
        }
    }

    /// At a home: broadcasts the user's record (an empty mask removes it everywhere).
    fn publish_user(&mut self, user: Arc<str>) {
        let Some(rec) = self.homes.get(&user) else {
            return;
        };
        let msg = ShardMsg::UserState {
            user: user.clone(),
            mask: rec.mask,
            rooms: match rec.rooms.is_empty() {
                true => NO_ROOMS.clone(),
                false => rec.rooms.iter().cloned().collect(),
            },
        };
        if rec.mask == 0 {
            self.homes.remove(&user);
        }
        self.broadcast(msg);
    }

    fn apply_user_state(&mut self, user: Arc<str>, mask: ShardMask, rooms: Arc<[Arc<str>]>) {
        let old: HashSet<Arc<str>> = self
            .users
            .get(&user)
            .map(|r| r.rooms.iter().cloned().collect())
            .unwrap_or_default();
        let new: HashSet<Arc<str>> = rooms.iter().cloned().collect();
        let conns = self.local_connections(&user).to_vec();
        for room in new.difference(&old) {
            for &c in &conns {
                self.add_local_room_member(room, c);
            }
        }
        for room in old.difference(&new) {
            for &c in &conns {
                self.remove_local_room_member(room, c);
            }
        }
        if mask == 0 {
            self.users.remove(&user);
        } else {
            self.users.insert(user, Replica { mask, rooms });
        }
    }

    fn add_local_room_member(&mut self, room: &Arc<str>, conn: ConnId) {
        let conns = self.local_rooms.entry(room.clone()).or_default();
        if !conns.insert(conn) {
            return;
        }
        if conns.len() == 1 {
            self.broadcast(ShardMsg::RoomShard {
                room: room.clone(),
                shard: self.shard,
                present: true,
            });
        }
    }

    fn remove_local_room_member(&mut self, room: &str, conn: ConnId) {
        let Some(conns) = self.local_rooms.get_mut(room) else {
            return;
        };
        conns.remove(&conn);
        if conns.is_empty() {
            if let Some((room, _)) = self.local_rooms.remove_entry(room) {
                self.broadcast(ShardMsg::RoomShard {
                    room,
                    shard: self.shard,
                    present: false,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several routers exchanging their effects in FIFO order, as the inboxes do.
    struct Cluster {
        routers: Vec<Router>,
        queues: Vec<std::collections::VecDeque<ShardMsg>>,
    }

    impl Cluster {
        fn new(n: usize) -> Self {
            Cluster {
                routers: (0..n).map(|i| Router::new(i, n)).collect(),
                queues: (0..n).map(|_| Default::default()).collect(),
            }
        }

        fn collect(&mut self, shard: usize) {
            for (dest, msg) in self.routers[shard].take_effects() {
                self.queues[dest].push_back(msg);
            }
        }

        /// Delivers messages, one shard at a time in `order`, until all queues are empty.
        fn settle(&mut self, order: &[usize]) {
            for s in 0..self.routers.len() {
                self.collect(s);
            }
            while self.queues.iter().any(|q| !q.is_empty()) {
                for &s in order {
                    if let Some(msg) = self.queues[s].pop_front() {
                        self.routers[s].handle(msg);
                        self.collect(s);
                    }
                }
            }
        }

        fn user(name: &str) -> Arc<str> {
            Arc::from(name)
        }
    }

    #[test]
    fn ready_means_reachable_from_every_shard() {
        let mut c = Cluster::new(4);
        let bob = Cluster::user("bob");
        c.routers[3].connect(&bob, 1);
        // Deliver in an order that makes the home answer before others heard of bob: the
        // barrier still holds `ready` back until every shard knows.
        c.settle(&[0, 1, 2, 3]);
        assert_eq!(
            c.routers[3].take_completed(),
            vec![Acknowledged {
                conn: 1,
                event: AckEvent::Ready
            }]
        );
        for r in &c.routers {
            assert_eq!(r.user_shards("bob"), 0b1000);
        }
    }

    #[test]
    fn users_are_visible_from_every_shard_and_vanish_with_their_last_connection() {
        let mut c = Cluster::new(3);
        let alice = Cluster::user("alice");
        c.routers[0].connect(&alice, 1);
        c.routers[2].connect(&alice, 7);
        c.settle(&[0, 1, 2]);
        for r in &c.routers {
            assert_eq!(r.user_shards("alice"), 0b101);
        }
        assert_eq!(c.routers[2].local_connections("alice"), &[7]);
        c.routers[0].disconnect("alice", 1);
        c.settle(&[2, 1, 0]);
        for r in &c.routers {
            assert_eq!(r.user_shards("alice"), 0b100);
        }
        c.routers[2].disconnect("alice", 7);
        c.settle(&[1, 0, 2]);
        for r in &c.routers {
            assert_eq!(r.user_shards("alice"), 0);
            assert!(r.homes.is_empty() && r.users.is_empty());
        }
    }

    #[test]
    fn membership_reaches_every_device_and_is_acknowledged_when_in_effect() {
        let mut c = Cluster::new(3);
        let (alice, bob) = (Cluster::user("alice"), Cluster::user("bob"));
        c.routers[0].connect(&alice, 1);
        c.routers[1].connect(&alice, 2); // a second device
        c.routers[2].connect(&bob, 3);
        c.settle(&[0, 1, 2]);
        for r in &mut c.routers {
            assert!(r.take_completed().iter().all(|a| a.event == AckEvent::Ready));
        }
        c.routers[0]
            .change_membership(&alice, 1, Arc::from("general"), true)
            .unwrap();
        c.settle(&[2, 0, 1]);
        assert_eq!(
            c.routers[0].take_completed(),
            vec![Acknowledged {
                conn: 1,
                event: AckEvent::Joined(Arc::from("general"))
            }]
        );
        // Every shard knows both of alice's shards receive the room, and that she is a member.
        for r in &c.routers {
            assert_eq!(r.room_shards("general"), 0b011);
            assert!(r.is_member("alice", "general"));
            assert!(!r.is_member("bob", "general"));
        }
        assert_eq!(c.routers[1].local_room_connections("general").collect::<Vec<_>>(), [&2]);
        // A device that connects later receives the room too.
        c.routers[2].connect(&alice, 9);
        c.settle(&[0, 1, 2]);
        assert_eq!(c.routers[2].local_room_connections("general").collect::<Vec<_>>(), [&9]);
        assert_eq!(c.routers[0].room_shards("general"), 0b111);
        // Leaving removes every device; closing the last connection ends membership too.
        c.routers[1].take_completed();
        c.routers[1]
            .change_membership(&alice, 2, Arc::from("general"), false)
            .unwrap();
        c.settle(&[1, 2, 0]);
        assert_eq!(
            c.routers[1].take_completed(),
            vec![Acknowledged {
                conn: 2,
                event: AckEvent::Left(Arc::from("general"))
            }]
        );
        for r in &c.routers {
            assert_eq!(r.room_shards("general"), 0);
            assert!(!r.is_member("alice", "general"));
        }
    }

    #[test]
    fn devices_on_one_shard_come_and_go_and_the_user_stays_until_the_last() {
        let mut c = Cluster::new(2);
        let alice = Cluster::user("alice");
        for conn in [1, 2, 3] {
            c.routers[1].connect(&alice, conn);
        }
        c.settle(&[0, 1]);
        assert_eq!(c.routers[1].local_connections("alice"), &[1, 2, 3]);
        c.routers[1].disconnect("alice", 2);
        assert_eq!(c.routers[1].local_connections("alice"), &[1, 3]);
        c.routers[1].disconnect("alice", 1);
        assert_eq!(c.routers[1].local_connections("alice"), &[3]);
        c.routers[1].disconnect("alice", 42); // not hers: nothing changes
        c.settle(&[1, 0]);
        assert_eq!(c.routers[1].local_connections("alice"), &[3]);
        assert_eq!(c.routers[0].user_shards("alice"), 0b10);
        c.routers[1].connect(&alice, 4);
        assert_eq!(c.routers[1].local_connections("alice"), &[3, 4]);
        c.routers[1].disconnect("alice", 3);
        c.routers[1].disconnect("alice", 4);
        c.settle(&[0, 1]);
        assert_eq!(c.routers[1].local_connections("alice"), &[] as &[ConnId]);
        for r in &c.routers {
            assert_eq!(r.user_shards("alice"), 0);
        }
    }

    #[test]
    fn closing_the_last_connection_ends_membership() {
        let mut c = Cluster::new(2);
        let alice = Cluster::user("alice");
        c.routers[1].connect(&alice, 1);
        c.settle(&[0, 1]);
        c.routers[1].change_membership(&alice, 1, Arc::from("r"), true).unwrap();
        c.settle(&[0, 1]);
        c.routers[1].disconnect("alice", 1);
        c.settle(&[1, 0]);
        c.routers[0].connect(&alice, 5);
        c.settle(&[0, 1]);
        assert!(!c.routers[0].is_member("alice", "r"));
        assert_eq!(c.routers[0].room_shards("r"), 0);
    }

    #[test]
    fn a_single_shard_acknowledges_at_once() {
        let mut c = Cluster::new(1);
        let alice = Cluster::user("alice");
        c.routers[0].connect(&alice, 1);
        c.routers[0].change_membership(&alice, 1, Arc::from("r"), true).unwrap();
        c.settle(&[0]);
        assert_eq!(c.routers[0].take_completed().len(), 2, "ready, then joined");
        assert_eq!(c.routers[0].local_room_connections("r").collect::<Vec<_>>(), [&1]);
    }
}
