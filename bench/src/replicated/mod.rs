//! The replicated directory the gateway used before the sharded one
//! (`shardgate::cluster::directory`), kept as the simulator's baseline (sans IO).
//!
//! Every node publishes its own changes (a user's first connection on the node, its last
//! one, the same for rooms) as numbered deltas, and a heartbeat each second carrying its
//! latest number. Every other node keeps a replica of that node's users and rooms:
//! - a delta with the next number is applied; a gap, or a node not known yet, asks that
//!   node for a snapshot (deltas received meanwhile are logged and replayed on top of it);
//! - a node not heard from within the timeout is forgotten, as is a node that says bye.
//!
//! Routing then needs one lookup: which other nodes hold this user (or room).

// The simulator routes to users only; rooms and the remote flags stay, with their tests,
// so that the baseline is the directory the gateway ran.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub mod wire;

use shardgate::cluster::wire::NodeId;
use shardgate::route::ShardMask;
use wire::{Op, PresenceMsg, SnapshotChunk};

/// What the node must send or say, produced by the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish on the presence subject.
    Broadcast(Bytes),
    /// Ask `node` for its snapshot.
    AskSnapshot(NodeId),
    /// Send our snapshot chunks to `node`.
    SendSnapshot(NodeId, Vec<Bytes>),
    /// A line for stdout.
    Say(String),
}

/// Deltas logged while a node's snapshot is awaited, at most this many.
const MAX_LOG: usize = 100_000;
/// A snapshot asked for and not received is asked for again after this long.
const RESYNC_RETRY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct RemoteNode {
    seq: u64,
    synced: bool,
    last_heard: Option<Instant>,
    asked: Option<Instant>,
    /// Deltas received while not synced, to replay on top of the snapshot.
    log: Vec<(u64, Vec<Op>)>,
    /// Snapshot chunks being assembled: `(seq, total, chunks by index)`.
    assembling: Option<(u64, u32, HashMap<u32, Vec<Op>>)>,
    users: usize,
}

pub struct Presence {
    pub me: NodeId,
    timeout: Duration,
    /// This node's users and rooms, by the shards that hold them.
    local_users: HashMap<Arc<str>, ShardMask>,
    local_rooms: HashMap<Arc<str>, ShardMask>,
    /// Changes not yet published.
    pending: Vec<Op>,
    seq: u64,
    nodes: HashMap<NodeId, RemoteNode>,
    /// Other nodes' users and rooms.
    users: HashMap<Arc<str>, Vec<NodeId>>,
    rooms: HashMap<Arc<str>, Vec<NodeId>>,
    /// Users of this node that gained or lost connections on other nodes, for the shards
    /// (a send to a local user goes to the cluster thread only when it is elsewhere too).
    remote_flags: Vec<(Arc<str>, bool)>,
}

impl Presence {
    pub fn new(me: NodeId, timeout: Duration) -> Self {
        Presence {
            me,
            timeout,
            local_users: HashMap::new(),
            local_rooms: HashMap::new(),
            pending: Vec::new(),
            seq: 0,
            nodes: HashMap::new(),
            users: HashMap::new(),
            rooms: HashMap::new(),
            remote_flags: Vec::new(),
        }
    }

    /// Local users whose presence on other nodes changed since the last call.
    pub fn take_remote_flags(&mut self) -> Vec<(Arc<str>, bool)> {
        std::mem::take(&mut self.remote_flags)
    }

    // ---- this node ----

    /// Shard `shard` holds connections of `user` (or no longer does).
    pub fn local_user(&mut self, user: Arc<str>, shard: usize, present: bool) {
        let elsewhere = self.users.contains_key(&user);
        if let Some(op) = update_mask(
            &mut self.local_users,
            user.clone(),
            shard,
            present,
            Op::UserUp,
            Op::UserDown,
        ) {
            if elsewhere {
                self.remote_flags.push((user, present));
            }
            self.pending.push(op);
        }
    }

    /// Shard `shard` holds members of `room` (or no longer does).
    pub fn local_room(&mut self, room: Arc<str>, shard: usize, present: bool) {
        if let Some(op) = update_mask(&mut self.local_rooms, room, shard, present, Op::RoomUp, Op::RoomDown) {
            self.pending.push(op);
        }
    }

    /// The local shards holding `user`, and its interned name.
    pub fn local_user_shards(&self, user: &str) -> Option<(&Arc<str>, ShardMask)> {
        self.local_users.get_key_value(user).map(|(k, m)| (k, *m))
    }

    /// Publishes the pending changes as one delta (none if there are none).
    pub fn flush(&mut self, out: &mut Vec<Action>) {
        if self.pending.is_empty() {
            return;
        }
        self.seq += 1;
        let ops = std::mem::take(&mut self.pending);
        out.push(Action::Broadcast(wire::write_presence(&PresenceMsg::Delta {
            node: self.me,
            seq: self.seq,
            ops,
        })));
    }

    /// Our heartbeat (after `flush`, so its number covers everything we hold).
    pub fn heartbeat(&self) -> Bytes {
        wire::write_presence(&PresenceMsg::Heartbeat {
            node: self.me,
            seq: self.seq,
            users: self.local_users.len() as u32,
        })
    }

    /// Our snapshot (call `flush` first: its number must cover the whole state).
    pub fn snapshot(&self) -> Vec<Bytes> {
        let users = self.local_users.keys().map(|u| Op::UserUp(u.to_string()));
        let rooms = self.local_rooms.keys().map(|r| Op::RoomUp(r.to_string()));
        wire::write_snapshot(self.me, self.seq, users.chain(rooms))
    }

    // ---- other nodes ----

    /// Other nodes holding `user`.
    pub fn user_nodes(&self, user: &str) -> &[NodeId] {
        self.users.get(user).map_or(&[], Vec::as_slice)
    }

    /// Other nodes holding members of `room`.
    pub fn room_nodes(&self, room: &str) -> &[NodeId] {
        self.rooms.get(room).map_or(&[], Vec::as_slice)
    }

    /// Nodes known and in sync.
    pub fn synced_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.synced).count()
    }

    /// Handles a message from the presence subject.
    pub fn on_presence(&mut self, msg: PresenceMsg, now: Instant, out: &mut Vec<Action>) {
        match msg {
            PresenceMsg::Delta { node, .. }
            | PresenceMsg::Heartbeat { node, .. }
            | PresenceMsg::Hello { node }
            | PresenceMsg::Bye { node }
                if node == self.me => {}
            PresenceMsg::Delta { node, seq, ops } => {
                let n = self.heard(node, now, out);
                if n.synced && seq <= n.seq {
                    return;
                }
                if n.synced && seq == n.seq + 1 {
                    n.seq = seq;
                    self.apply(node, &ops);
                    return;
                }
                if n.synced {
                    out.push(Action::Say(format!(
                        "cluster: node {node:016x} skipped from change {} to {seq}; asking for its snapshot",
                        n.seq
                    )));
                    n.synced = false;
                }
                if n.log.len() < MAX_LOG {
                    n.log.push((seq, ops));
                }
                self.ask(node, now, out);
            }
            PresenceMsg::Heartbeat { node, seq, .. } => {
                let n = self.heard(node, now, out);
                if n.synced && seq > n.seq {
                    out.push(Action::Say(format!(
                        "cluster: node {node:016x} is at change {seq}, we have {}; asking for its snapshot",
                        n.seq
                    )));
                    n.synced = false;
                }
                self.ask(node, now, out);
            }
            PresenceMsg::Hello { node } => {
                // It may be new, or back after an outage: it wants our state, and we want its.
                self.heard(node, now, out);
                self.flush(out);
                out.push(Action::SendSnapshot(node, self.snapshot()));
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.asked = None;
                }
                self.ask(node, now, out);
            }
            PresenceMsg::Bye { node } => {
                if self.nodes.contains_key(&node) {
                    self.forget(node);
                    out.push(Action::Say(format!("cluster: node {node:016x} left")));
                }
            }
        }
    }

    /// Handles a snapshot chunk another node sent us.
    pub fn on_snapshot(&mut self, chunk: SnapshotChunk, now: Instant, out: &mut Vec<Action>) {
        if chunk.node == self.me {
            return;
        }
        let node = chunk.node;
        let n = self.heard(node, now, out);
        if n.synced && chunk.seq <= n.seq {
            return; // Older than what we have.
        }
        let (seq, total, parts) = n
            .assembling
            .get_or_insert_with(|| (chunk.seq, chunk.total, HashMap::new()));
        if *seq != chunk.seq || *total != chunk.total {
            if chunk.seq < *seq {
                return;
            }
            *seq = chunk.seq;
            *total = chunk.total;
            parts.clear();
        }
        parts.insert(chunk.index, chunk.ops);
        if parts.len() < *total as usize {
            return;
        }
        let Some((seq, total, mut parts)) = n.assembling.take() else {
            return;
        };
        let log = std::mem::take(&mut n.log);
        self.drop_entries(node);
        let ops: Vec<Op> = (0..total).filter_map(|i| parts.remove(&i)).flatten().collect();
        self.apply(node, &ops);
        let mut at = seq;
        let mut gap = false;
        for (s, ops) in log {
            if s <= at {
                continue;
            }
            if s != at + 1 {
                gap = true;
                break;
            }
            self.apply(node, &ops);
            at = s;
        }
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        n.seq = at;
        n.asked = None;
        if gap {
            out.push(Action::Say(format!(
                "cluster: node {node:016x}: changes missing after its snapshot; asking again"
            )));
            self.ask(node, now, out);
        } else {
            let first = !n.synced;
            n.synced = true;
            if first {
                out.push(Action::Say(format!(
                    "cluster: node {node:016x} synced: {} user(s), change {at}",
                    n.users
                )));
            }
        }
    }

    /// Forgets nodes not heard from within the timeout; asks again for overdue snapshots.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let timeout = self.timeout;
        let expired: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.last_heard.is_none_or(|t| now.saturating_duration_since(t) > timeout))
            .map(|(id, _)| *id)
            .collect();
        for node in expired {
            let users = self.nodes.get(&node).map_or(0, |n| n.users);
            self.forget(node);
            out.push(Action::Say(format!(
                "cluster: node {node:016x} not heard from for {timeout:?}: its {users} user(s) are gone from presence"
            )));
        }
        let overdue: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.synced)
            .map(|(id, _)| *id)
            .collect();
        for node in overdue {
            self.ask(node, now, out);
        }
    }

    fn heard(&mut self, node: NodeId, now: Instant, out: &mut Vec<Action>) -> &mut RemoteNode {
        let n = self.nodes.entry(node).or_insert_with(|| {
            out.push(Action::Say(format!(
                "cluster: node {node:016x} seen; asking for its snapshot"
            )));
            RemoteNode::default()
        });
        n.last_heard = Some(now);
        n
    }

    fn ask(&mut self, node: NodeId, now: Instant, out: &mut Vec<Action>) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if n.synced || n.asked.is_some_and(|t| now.saturating_duration_since(t) < RESYNC_RETRY) {
            return;
        }
        n.asked = Some(now);
        out.push(Action::AskSnapshot(node));
    }

    fn forget(&mut self, node: NodeId) {
        self.drop_entries(node);
        self.nodes.remove(&node);
    }

    /// Removes `node` from every user and room entry.
    fn drop_entries(&mut self, node: NodeId) {
        let (local, flags) = (&self.local_users, &mut self.remote_flags);
        self.users.retain(|user, nodes| {
            nodes.retain(|n| *n != node);
            let kept = !nodes.is_empty();
            if !kept && local.contains_key(user) {
                flags.push((user.clone(), false));
            }
            kept
        });
        self.rooms.retain(|_, nodes| {
            nodes.retain(|n| *n != node);
            !nodes.is_empty()
        });
        if let Some(n) = self.nodes.get_mut(&node) {
            n.users = 0;
        }
    }

    fn apply(&mut self, node: NodeId, ops: &[Op]) {
        let mut users = 0isize;
        for op in ops {
            let (map, name, up) = match op {
                Op::UserUp(n) => (&mut self.users, n, true),
                Op::UserDown(n) => (&mut self.users, n, false),
                Op::RoomUp(n) => (&mut self.rooms, n, true),
                Op::RoomDown(n) => (&mut self.rooms, n, false),
            };
            let is_user = matches!(op, Op::UserUp(_) | Op::UserDown(_));
            // A user of ours now also elsewhere, or no longer: the shards are told.
            let local = is_user.then(|| self.local_users.get_key_value(name.as_str()).map(|(k, _)| k.clone()));
            if up {
                let nodes = map.entry(Arc::from(name.as_str())).or_default();
                if !nodes.contains(&node) {
                    nodes.push(node);
                    users += is_user as isize;
                    if let (1, Some(Some(user))) = (nodes.len(), local) {
                        self.remote_flags.push((user, true));
                    }
                }
            } else if let Some(nodes) = map.get_mut(name.as_str()) {
                let before = nodes.len();
                nodes.retain(|n| *n != node);
                users -= (is_user && nodes.len() < before) as isize;
                if nodes.is_empty() {
                    map.remove(name.as_str());
                    if let Some(Some(user)) = local {
                        self.remote_flags.push((user, false));
                    }
                }
            }
        }
        if let Some(n) = self.nodes.get_mut(&node) {
            n.users = n.users.saturating_add_signed(users);
        }
    }
}

/// Sets or clears `shard` in `name`'s mask; the node-level change, if any.
fn update_mask(
    map: &mut HashMap<Arc<str>, ShardMask>,
    name: Arc<str>,
    shard: usize,
    present: bool,
    up: fn(String) -> Op,
    down: fn(String) -> Op,
) -> Option<Op> {
    let bit = 1 << shard;
    if present {
        let mask = map.entry(name.clone()).or_insert(0);
        let first = *mask == 0;
        *mask |= bit;
        first.then(|| up(name.to_string()))
    } else {
        let mask = map.get_mut(&name)?;
        *mask &= !bit;
        if *mask == 0 {
            map.remove(&name);
            Some(down(name.to_string()))
        } else {
            None
        }
    }
}

/// Names of nodes and rooms held by a set of presences, for tests.
#[cfg(test)]
fn users_of(p: &Presence) -> std::collections::HashSet<String> {
    p.users.keys().map(|u| u.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// Runs `a`'s actions into `b` as NATS would (broadcasts and snapshots to b only).
    fn deliver(from: &mut Presence, actions: Vec<Action>, to: &mut Presence, now: Instant) -> Vec<Action> {
        let mut back = Vec::new();
        for a in actions {
            match a {
                Action::Broadcast(bytes) => to.on_presence(wire::read_presence(bytes).unwrap(), now, &mut back),
                Action::SendSnapshot(node, chunks) if node == to.me => {
                    for c in chunks {
                        to.on_snapshot(wire::read_snapshot(c).unwrap(), now, &mut back);
                    }
                }
                Action::AskSnapshot(node) if node == to.me => {
                    let mut own = Vec::new();
                    to.flush(&mut own);
                    let snapshot = to.snapshot();
                    let _ = deliver(to, own, from, now);
                    for c in snapshot {
                        from.on_snapshot(wire::read_snapshot(c).unwrap(), now, &mut Vec::new());
                    }
                }
                _ => {}
            }
        }
        back
    }

    #[test]
    fn node_level_changes_come_from_the_first_and_last_shard() {
        let mut p = Presence::new(1, T);
        let bob: Arc<str> = Arc::from("bob");
        p.local_user(bob.clone(), 0, true);
        p.local_user(bob.clone(), 1, true);
        p.local_user(bob.clone(), 0, false);
        assert_eq!(p.pending, vec![Op::UserUp("bob".into())]);
        p.local_user(bob.clone(), 1, false);
        assert_eq!(p.pending, vec![Op::UserUp("bob".into()), Op::UserDown("bob".into())]);
        let mut out = Vec::new();
        p.flush(&mut out);
        assert_eq!(out.len(), 1);
        p.flush(&mut out);
        assert_eq!(out.len(), 1, "nothing pending, nothing sent");
    }

    #[test]
    fn deltas_then_snapshot_then_replayed_log() {
        let now = Instant::now();
        let mut a = Presence::new(1, T);
        let mut b = Presence::new(2, T);
        // b first hears a's second delta: a is new to it, so it asks and logs.
        a.local_user(Arc::from("u1"), 0, true);
        let mut first = Vec::new();
        a.flush(&mut first);
        a.local_user(Arc::from("u2"), 0, true);
        let mut second = Vec::new();
        a.flush(&mut second);
        let mut asked = Vec::new();
        if let Action::Broadcast(bytes) = &second[0] {
            b.on_presence(wire::read_presence(bytes.clone()).unwrap(), now, &mut asked);
        }
        assert!(asked.contains(&Action::AskSnapshot(1)));
        assert!(b.user_nodes("u2").is_empty(), "not applied before the snapshot");
        // a answers with its snapshot at change 2, b replays nothing newer: both users.
        for c in a.snapshot() {
            b.on_snapshot(wire::read_snapshot(c).unwrap(), now, &mut Vec::new());
        }
        assert_eq!(users_of(&b), ["u1", "u2"].iter().map(|s| s.to_string()).collect());
        // Later deltas apply in order; a user's last disconnect removes it.
        a.local_user(Arc::from("u1"), 0, false);
        let mut third = Vec::new();
        a.flush(&mut third);
        deliver(&mut a, third, &mut b, now);
        assert_eq!(b.user_nodes("u1"), &[] as &[NodeId]);
        assert_eq!(b.user_nodes("u2"), &[1]);
    }

    #[test]
    fn a_snapshot_older_than_logged_deltas_is_completed_by_them() {
        let now = Instant::now();
        let mut a = Presence::new(1, T);
        let mut b = Presence::new(2, T);
        a.local_user(Arc::from("u1"), 0, true);
        a.flush(&mut Vec::new());
        let snapshot = a.snapshot(); // at change 1
        a.local_user(Arc::from("u2"), 0, true);
        let mut delta = Vec::new();
        a.flush(&mut delta); // change 2, seen by b before the snapshot arrives
        if let Action::Broadcast(bytes) = &delta[0] {
            b.on_presence(wire::read_presence(bytes.clone()).unwrap(), now, &mut Vec::new());
        }
        let mut said = Vec::new();
        for c in snapshot {
            b.on_snapshot(wire::read_snapshot(c).unwrap(), now, &mut said);
        }
        assert_eq!(users_of(&b).len(), 2, "{said:?}");
        assert_eq!(b.synced_nodes(), 1);
    }

    #[test]
    fn a_gap_asks_for_a_snapshot_and_a_silent_node_expires() {
        let now = Instant::now();
        let mut a = Presence::new(1, T);
        let mut b = Presence::new(2, T);
        a.local_user(Arc::from("u1"), 0, true);
        let mut d1 = Vec::new();
        a.flush(&mut d1);
        let back = deliver(&mut a, d1, &mut b, now);
        let _ = deliver(&mut b, back, &mut a, now);
        assert_eq!(b.user_nodes("u1"), &[1]);
        // Change 2 is lost; change 3 arrives: a gap.
        a.local_user(Arc::from("u2"), 0, true);
        a.flush(&mut Vec::new());
        a.local_user(Arc::from("u3"), 0, true);
        let mut d3 = Vec::new();
        a.flush(&mut d3);
        let mut out = Vec::new();
        if let Action::Broadcast(bytes) = &d3[0] {
            b.on_presence(wire::read_presence(bytes.clone()).unwrap(), now, &mut out);
        }
        assert!(out.contains(&Action::AskSnapshot(1)), "{out:?}");
        let _ = deliver(&mut b, out, &mut a, now);
        assert_eq!(users_of(&b).len(), 3);
        // A heartbeat keeps it; silence past the timeout forgets it.
        let hb = a.heartbeat();
        b.on_presence(wire::read_presence(hb).unwrap(), now + T, &mut Vec::new());
        let mut said = Vec::new();
        b.tick(now + T + Duration::from_secs(1), &mut said);
        assert_eq!(users_of(&b).len(), 3);
        b.tick(now + T * 2 + Duration::from_secs(1), &mut said);
        assert!(users_of(&b).is_empty());
        assert!(said
            .iter()
            .any(|s| matches!(s, Action::Say(l) if l.contains("not heard from"))));
    }

    #[test]
    fn local_users_learn_when_they_are_elsewhere_too() {
        let now = Instant::now();
        let mut a = Presence::new(1, T);
        let mut b = Presence::new(2, T);
        // bob is on b; a has nobody yet.
        b.local_user(Arc::from("bob"), 0, true);
        let mut d = Vec::new();
        b.flush(&mut d);
        let back = deliver(&mut b, d, &mut a, now);
        let _ = deliver(&mut a, back, &mut b, now);
        assert!(a.take_remote_flags().is_empty(), "bob is not a's user");
        // bob connects to a too: a's shards learn he is elsewhere as well.
        a.local_user(Arc::from("bob"), 1, true);
        assert_eq!(a.take_remote_flags(), vec![(Arc::from("bob"), true)]);
        // bob leaves b: no longer elsewhere.
        b.local_user(Arc::from("bob"), 0, false);
        let mut d = Vec::new();
        b.flush(&mut d);
        deliver(&mut b, d, &mut a, now);
        assert_eq!(a.take_remote_flags(), vec![(Arc::from("bob"), false)]);
        // Back on b, then b is forgotten: flags follow.
        b.local_user(Arc::from("bob"), 0, true);
        let mut d = Vec::new();
        b.flush(&mut d);
        deliver(&mut b, d, &mut a, now);
        assert_eq!(a.take_remote_flags(), vec![(Arc::from("bob"), true)]);
        let bye = wire::write_presence(&PresenceMsg::Bye { node: 2 });
        a.on_presence(wire::read_presence(bye).unwrap(), now, &mut Vec::new());
        assert_eq!(a.take_remote_flags(), vec![(Arc::from("bob"), false)]);
    }

    #[test]
    fn bye_forgets_at_once_and_rooms_follow_the_same_rules() {
        let now = Instant::now();
        let mut a = Presence::new(1, T);
        let mut b = Presence::new(2, T);
        a.local_room(Arc::from("lobby"), 0, true);
        a.local_room(Arc::from("lobby"), 1, true);
        let mut d = Vec::new();
        a.flush(&mut d);
        let back = deliver(&mut a, d, &mut b, now);
        let _ = deliver(&mut b, back, &mut a, now);
        assert_eq!(b.room_nodes("lobby"), &[1]);
        let bye = wire::write_presence(&PresenceMsg::Bye { node: 1 });
        b.on_presence(wire::read_presence(bye).unwrap(), now, &mut Vec::new());
        assert!(b.room_nodes("lobby").is_empty());
        assert_eq!(b.synced_nodes(), 0);
    }
}
