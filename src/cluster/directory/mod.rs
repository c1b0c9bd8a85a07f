//! Where the cluster's users and rooms are, sharded by home node (sans IO).
//!
//! Every user and room has a *home*: the live node that wins rendezvous hashing
//! (highest `score(key, node)`) over the nodes this node has heard from. A node tells a
//! key's home when it gets the key's first connection and when it loses the last
//! (`Hold`); the home keeps which nodes hold the key. A node that must reach a key it
//! does not hold asks its home (`Lookup`), keeps the answer in a bounded cache and is
//! told of every change (`Where`) until the entry leaves the cache (`Unwatch`). The
//! nodes holding a key are told of changes too (a send to a local user must also reach
//! its other nodes).
//!
//! So a node keeps its own keys, the keys homed at it (its share, about all keys / nodes)
//! and its cache: nothing grows with the cluster. A node that joins or leaves moves only
//! the keys whose home it becomes or was:
//! - on a change of view, each node sends `Hold` for its keys whose home changed, then
//!   `Synced` to every node. A home is *ready* for a view once every node of it said
//!   `Synced` for that view; until then its answers say `complete: false` (an empty one
//!   is `unavailable` to the sender, never `offline`);
//! - the keys a node released within `GRACE` are released again at their new home, and a
//!   home keeps the records it no longer owns until every node has agreed on its view for
//!   `GRACE`: views of different nodes differ for a moment, and these two make up for it;
//! - membership changes are applied together (`VIEW_SETTLE`), so that a cluster starting
//!   at once moves each key a few times, not once per node.
//!
//! The view itself comes from the heartbeats every node publishes (`heard`, `left`,
//! `tick`), which cost each node one small message per node per second.

pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;

use crate::cluster::wire::NodeId;
use crate::route::ShardMask;
pub use wire::{DirKey, DirMsg, KeyKind, KeyView};

/// An unanswered lookup is sent again after this long, at most `LOOKUP_TRIES` times in
/// all; then the key is resolved as unavailable.
const LOOKUP_RETRY: Duration = Duration::from_secs(1);
const LOOKUP_TRIES: u8 = 3;
/// An incomplete or refused answer stands this long before the key is asked again.
const RECHECK: Duration = Duration::from_millis(100);
/// How long released keys are remembered and disowned records kept (see the module doc).
pub const GRACE: Duration = Duration::from_secs(30);
/// Changes of membership are applied together: once none came for `VIEW_SETTLE`, or
/// `VIEW_MAX_WAIT` after the first. A cluster that starts (or a NATS that comes back)
/// brings every node at once; one view change per node heard would move each key once
/// per node and send every node a `Synced` per change.
pub const VIEW_SETTLE: Duration = Duration::from_millis(200);
pub const VIEW_MAX_WAIT: Duration = Duration::from_secs(1);
/// How long a node forgotten for its silence is remembered: if it speaks again within
/// this, it is asked to send its keys again (it may not have forgotten us, and so would
/// not send them by itself).
const FORGOTTEN_KEPT: Duration = Duration::from_secs(3600);

/// What a node knows of where a key is, for routing.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution<'a> {
    /// These other nodes hold it (none: it is held nowhere else, as far as the home
    /// has heard from every node).
    Nodes(&'a [NodeId]),
    /// Its home was asked; the key comes back from `take_resolved` with the answer.
    Pending,
    /// Its home cannot say now (the cluster's view is changing, or the home is silent).
    Unavailable,
}

/// A key this node holds.
#[derive(Debug)]
struct Held {
    shards: ShardMask,
    /// Its home under the current view.
    home: NodeId,
    /// The other nodes holding it, as its home last said.
    others: Vec<NodeId>,
    /// Has its home answered since it was last told (so lookups there find this node)?
    confirmed: bool,
}

/// A key homed here: who holds it and who wants to hear of changes.
#[derive(Debug, Default)]
struct HomeRecord {
    holders: Vec<NodeId>,
    watchers: Vec<NodeId>,
}

#[derive(Debug)]
struct Cached {
    /// The home that answered (a change of view drops the entry if the home moves).
    home: NodeId,
    nodes: Vec<NodeId>,
    complete: bool,
    at: Instant,
}

#[derive(Debug)]
struct Asked {
    home: NodeId,
    at: Instant,
    tries: u8,
}

/// Sizes, for the cluster line and the simulator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectoryStats {
    pub members: usize,
    pub local: usize,
    /// Local keys whose home has not answered since it was told of them: until it does,
    /// a lookup there may not find them.
    pub local_unconfirmed: usize,
    pub homed: usize,
    pub cached: usize,
    pub lookups_in_flight: usize,
    pub ready: bool,
}

pub struct HomeDirectory {
    me: NodeId,
    timeout: Duration,
    /// Other nodes heard from, with when each was last heard from.
    members: HashMap<NodeId, Instant>,
    /// Membership changed since the view was last applied: when first, and when last.
    view_pending: Option<(Instant, Instant)>,
    /// Nodes that left or went silent since then (some may never have been in a view,
    /// yet have been named as holders).
    gone: Vec<NodeId>,
    /// The view: the members and this node, sorted, as last applied; and its digest.
    view_nodes: Vec<NodeId>,
    view: u64,
    /// Has every node of the view said `Synced` for it?
    ready: bool,
    /// Since when every node of the view has agreed on it (`None`: not ready).
    ready_since: Option<Instant>,
    /// Have the records this node does not own been dropped since the view last changed?
    pruned: bool,
    /// The view each node last said `Synced` for.
    synced: HashMap<NodeId, u64>,
    /// Nodes dropped from the view, and when.
    forgotten: HashMap<NodeId, Instant>,
    local: HashMap<DirKey, Held>,
    released: VecDeque<(Instant, DirKey, NodeId)>,
    homed: HashMap<DirKey, HomeRecord>,
    cache: LruCache<DirKey, Cached>,
    cache_capacity: usize,
    asked: HashMap<DirKey, Asked>,
    resolved: Vec<DirKey>,
    /// Answers sent with `complete: false`: sent again once this node is ready.
    told_incomplete: Vec<(DirKey, NodeId)>,
    outbox: HashMap<NodeId, Vec<DirMsg>>,
    /// Local users that gained or lost connections on other nodes, for the shards.
    remote_flags: Vec<(Arc<str>, bool)>,
}

impl HomeDirectory {
    /// A node alone in its view; `timeout` forgets members not heard from, `cache` bounds
    /// the entries kept for keys held elsewhere.
    pub fn new(me: NodeId, timeout: Duration, cache: NonZeroUsize, now: Instant) -> Self {
        HomeDirectory {
            me,
            timeout,
            members: HashMap::new(),
            view_pending: None,
            gone: Vec::new(),
            view_nodes: vec![me],
            view: view_digest(&[me]),
            ready: true,
            ready_since: Some(now),
            pruned: false,
            synced: HashMap::new(),
            forgotten: HashMap::new(),
            local: HashMap::new(),
            released: VecDeque::new(),
            homed: HashMap::new(),
            // Unbounded to the crate (which would allocate the whole capacity at once),
            // bounded by `cache_put`.
            cache: LruCache::unbounded(),
            cache_capacity: cache.get(),
            asked: HashMap::new(),
            resolved: Vec::new(),
            told_incomplete: Vec::new(),
            outbox: HashMap::new(),
            remote_flags: Vec::new(),
        }
    }

    /// Has every node of the view said `Synced` for it (so empty answers mean offline)?
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Ready, with no change of membership waiting to be applied: an empty answer now
    /// means the key is held nowhere.
    pub fn is_settled(&self) -> bool {
        self.ready && self.view_pending.is_none()
    }

    /// The other nodes of the view.
    pub fn members(&self) -> usize {
        self.view_nodes.len() - 1
    }

    /// Keys (users and rooms) held on this node.
    pub fn local_len(&self) -> usize {
        self.local.len()
    }

    /// Users this node knows to be connected to other nodes: its own users' other nodes,
    /// the users homed here and its cache. Walks them all: for a report, not per message.
    pub fn known_remote_users(&self) -> usize {
        let me = self.me;
        let user = |key: &DirKey| key.kind == KeyKind::User;
        let held = self
            .local
            .iter()
            .filter(|(k, h)| user(k) && !h.others.is_empty())
            .count();
        let homed = self
            .homed
            .iter()
            .filter(|(k, r)| user(k) && !self.local.contains_key(*k) && r.holders.iter().any(|n| *n != me))
            .count();
        let cached = self
            .cache
            .iter()
            .filter(|(k, c)| user(k) && !c.nodes.is_empty() && !self.homed.contains_key(*k))
            .count();
        held + homed + cached
    }

    /// `now` is when a change to ready counts from.
    fn update_ready(&mut self, now: Instant) {
        let (me, view) = (self.me, self.view);
        self.ready = self
            .view_nodes
            .iter()
            .all(|n| *n == me || self.synced.get(n) == Some(&view));
        if !self.ready {
            self.ready_since = None;
        } else if self.ready_since.is_none() {
            self.ready_since = Some(now);
        }
    }

    /// The home of `key` under the current view.
    pub fn home_of(&self, key: &DirKey) -> NodeId {
        home_among(key_hash(key), &self.view_nodes)
    }

    pub fn stats(&self) -> DirectoryStats {
        DirectoryStats {
            members: self.view_nodes.len() - 1,
            local: self.local.len(),
            local_unconfirmed: self.local.values().filter(|h| !h.confirmed).count(),
            homed: self.homed.len(),
            cached: self.cache.len(),
            lookups_in_flight: self.asked.len(),
            ready: self.is_ready(),
        }
    }

    // ---- the view ----

    /// A heartbeat (or any message) from `node`; true if it is new to this node.
    pub fn heard(&mut self, node: NodeId, now: Instant) -> bool {
        if node == self.me {
            return false;
        }
        let new = self.members.insert(node, now).is_none();
        if new {
            self.view_changed(now);
        }
        new
    }

    /// `node` said bye; true if it was a member.
    pub fn left(&mut self, node: NodeId, now: Instant) -> bool {
        let member = self.members.remove(&node).is_some();
        if member {
            self.gone.push(node);
            self.view_changed(now);
        }
        member
    }

    /// Every other node is forgotten (this node lost NATS: what it knew is stale).
    pub fn forget_all(&mut self, now: Instant) {
        self.gone.extend(self.members.drain().map(|(n, _)| n));
        self.cache.clear();
        self.outbox.clear();
        self.change_view(now);
    }

    fn view_changed(&mut self, now: Instant) {
        let first = self.view_pending.map_or(now, |(first, _)| first);
        self.view_pending = Some((first, now));
    }

    /// Forgets members not heard from within the timeout (returned), applies membership
    /// changes, asks again for lookups left unanswered, forgets old releases and, once
    /// every node has agreed on the view for `GRACE`, the records this node no longer owns.
    pub fn tick(&mut self, now: Instant) -> Vec<NodeId> {
        let timeout = self.timeout;
        let mut silent = Vec::new();
        self.members.retain(|node, heard| {
            let alive = now.saturating_duration_since(*heard) <= timeout;
            if !alive {
                silent.push(*node);
            }
            alive
        });
        if !silent.is_empty() {
            self.gone.extend_from_slice(&silent);
            self.view_changed(now);
        }
        if let Some((first, last)) = self.view_pending {
            if now.saturating_duration_since(last) >= VIEW_SETTLE
                || now.saturating_duration_since(first) >= VIEW_MAX_WAIT
            {
                self.change_view(now);
            }
        }
        let overdue: Vec<DirKey> = self
            .asked
            .iter()
            .filter(|(_, a)| now.saturating_duration_since(a.at) >= LOOKUP_RETRY)
            .map(|(k, _)| k.clone())
            .collect();
        for key in overdue {
            let Some(asked) = self.asked.get_mut(&key) else {
                continue;
            };
            if asked.tries >= LOOKUP_TRIES {
                self.asked.remove(&key);
                self.refuse(key, now);
            } else {
                asked.tries += 1;
                asked.at = now;
                let home = asked.home;
                self.send(home, DirMsg::Lookup { key });
            }
        }
        self.forgotten
            .retain(|_, at| now.saturating_duration_since(*at) < FORGOTTEN_KEPT);
        while self
            .released
            .front()
            .is_some_and(|(at, ..)| now.saturating_duration_since(*at) > GRACE)
        {
            self.released.pop_front();
        }
        if !self.pruned
            && self
                .ready_since
                .is_some_and(|t| now.saturating_duration_since(t) >= GRACE)
        {
            self.pruned = true;
            let (me, nodes) = (self.me, &self.view_nodes);
            self.homed.retain(|key, _| home_among(key_hash(key), nodes) == me);
            self.homed.shrink_to_fit();
            // Cache entries kept across the view change for keys now homed here.
            self.uncache_homed_at(me);
        }
        silent
    }

    fn change_view(&mut self, now: Instant) {
        self.view_pending = None;
        let old_nodes = std::mem::take(&mut self.view_nodes);
        let mut nodes: Vec<NodeId> = self.members.keys().copied().chain([self.me]).collect();
        nodes.sort_unstable();
        let joined: Vec<NodeId> = nodes
            .iter()
            .filter(|n| old_nodes.binary_search(n).is_err())
            .copied()
            .collect();
        let mut departed: Vec<NodeId> = old_nodes
            .iter()
            .chain(&self.gone)
            .filter(|n| nodes.binary_search(n).is_err())
            .copied()
            .collect();
        departed.sort_unstable();
        departed.dedup();
        self.gone.clear();
        self.view_nodes = nodes;
        self.view = view_digest(&self.view_nodes);
        self.pruned = false;
        self.synced.retain(|n, _| self.members.contains_key(n));
        self.ready = false;
        self.ready_since = None;
        let me = self.me;
        for node in &departed {
            self.forgotten.insert(*node, now);
        }
        for node in &joined {
            if self.forgotten.remove(node).is_some() {
                self.send(*node, DirMsg::Resync);
            }
        }

        // Our keys: tell each new home, and drop departed nodes from the other holders.
        let mut holds = Vec::new();
        let mut own_home = Vec::new();
        for (key, held) in &mut self.local {
            let home = new_home(key, held.home, &joined, &departed, &self.view_nodes);
            if home != held.home {
                held.home = home;
                held.confirmed = home == me;
                if home == me {
                    own_home.push(key.clone());
                } else {
                    holds.push((home, key.clone()));
                }
            }
            let before = held.others.len();
            held.others.retain(|n| !departed.contains(n));
            if before > 0 && held.others.is_empty() && key.kind == KeyKind::User {
                self.remote_flags.push((key.name.clone(), false));
            }
        }
        for (home, key) in holds {
            self.send(home, DirMsg::Hold { key, held: true });
        }
        // Keys of ours homed here now: what a record kept here says replaces what the old
        // home said (it may name nodes this node never heard of, now gone).
        for key in own_home {
            if self.homed.get(&key).is_some_and(|r| r.holders.contains(&me)) {
                self.notify(&key);
            } else {
                self.add_holder(key, me);
            }
        }
        // Keys released lately: released again at their new home.
        let (view_nodes, released) = (&self.view_nodes, &mut self.released);
        let mut releases = Vec::new();
        for (_, key, home) in released.iter_mut() {
            let new = new_home(key, *home, &joined, &departed, view_nodes);
            if new != *home {
                *home = new;
                if new != me && !self.local.contains_key(key) {
                    releases.push((new, key.clone()));
                }
            }
        }
        for (home, key) in releases {
            self.send(home, DirMsg::Hold { key, held: false });
        }

        // Records homed here: departed nodes hold nothing and watch nothing.
        if !departed.is_empty() {
            let mut changed = Vec::new();
            self.homed.retain(|key, record| {
                let before = record.holders.len();
                record.holders.retain(|n| !departed.contains(n));
                record.watchers.retain(|n| !departed.contains(n));
                if record.holders.len() != before {
                    changed.push(key.clone());
                }
                !(record.holders.is_empty() && record.watchers.is_empty())
            });
            for key in changed {
                self.notify(&key);
            }
        }

        // Our cache: entries whose home moved stand, without the departed nodes, until
        // the new home is asked at their next use (the old home no longer tells us of
        // changes); meanwhile they are not final, so that sends keep reaching the holders
        // while the view changes, and an all-absent answer is `unavailable`, not `offline`.
        // Lookups in flight go to the new home.
        let view_nodes = &self.view_nodes;
        for (key, c) in self.cache.iter_mut() {
            let home = new_home(key, c.home, &joined, &departed, view_nodes);
            if home != c.home {
                c.home = home;
                c.complete = false;
                c.at = now.checked_sub(RECHECK).unwrap_or(c.at);
            }
            c.nodes.retain(|n| departed.binary_search(n).is_err());
        }
        let reasked: Vec<DirKey> = self
            .asked
            .iter()
            .filter(|(key, a)| self.home_of(key) != a.home)
            .map(|(key, _)| key.clone())
            .collect();
        for key in reasked {
            self.asked.remove(&key);
            self.ask(key, now);
        }

        // Then, after every `Hold` above: "that was all of mine for you".
        let view = self.view;
        let mut members: Vec<NodeId> = self.members.keys().copied().collect();
        members.sort_unstable();
        for node in members {
            self.send(node, DirMsg::Synced { view });
        }
        self.update_ready(now);
        self.check_ready();
    }

    // ---- this node's keys ----

    /// Shard `shard` holds connections of this user or members of this room (or no
    /// longer does).
    pub fn local_key(&mut self, key: DirKey, shard: usize, present: bool, now: Instant) {
        let bit = 1 << shard;
        match self.local.get_mut(&key) {
            Some(held) if present => held.shards |= bit,
            Some(held) => {
                held.shards &= !bit;
                if held.shards != 0 {
                    return;
                }
                let home = held.home;
                let had_others = !held.others.is_empty();
                self.local.remove(&key);
                if had_others && key.kind == KeyKind::User {
                    self.remote_flags.push((key.name.clone(), false));
                }
                // Also from a record kept here from an older view, should it come back.
                self.remove_holder(&key, self.me);
                if home != self.me {
                    self.send(
                        home,
                        DirMsg::Hold {
                            key: key.clone(),
                            held: false,
                        },
                    );
                }
                self.released.push_back((now, key, home));
            }
            None if present => {
                // A lookup in flight is answered now: the key is here.
                if self.asked.remove(&key).is_some() {
                    self.resolved.push(key.clone());
                }
                let home = self.home_of(&key);
                // What the cache knew is now what the home tells a holder.
                let others = self.cache.pop(&key).map(|c| c.nodes).unwrap_or_default();
                if !others.is_empty() && key.kind == KeyKind::User {
                    self.remote_flags.push((key.name.clone(), true));
                }
                self.local.insert(
                    key.clone(),
                    Held {
                        shards: bit,
                        home,
                        others,
                        confirmed: home == self.me,
                    },
                );
                if home == self.me {
                    self.add_holder(key, self.me);
                } else {
                    self.send(home, DirMsg::Hold { key, held: true });
                }
            }
            None => {}
        }
    }

    /// The local shards holding the user or room `name`, and its interned name (asked
    /// for each record another node sends: no allocation).
    pub fn local_shards(&self, kind: KeyKind, name: &str) -> Option<(&Arc<str>, ShardMask)> {
        let view: &dyn KeyView = &(kind, name);
        self.local.get_key_value(view).map(|(k, h)| (&k.name, h.shards))
    }

    /// A record for `key` reached this node, which does not hold it: its home is told
    /// again (heals a release that reached a node no longer its home).
    pub fn not_held_here(&mut self, key: DirKey) {
        if self.local.contains_key(&key) {
            return;
        }
        let home = self.home_of(&key);
        if home == self.me {
            self.remove_holder(&key, self.me);
        } else {
            self.send(home, DirMsg::Hold { key, held: false });
        }
    }

    /// Local users whose presence on other nodes changed since the last call.
    pub fn take_remote_flags(&mut self) -> Vec<(Arc<str>, bool)> {
        std::mem::take(&mut self.remote_flags)
    }

    // ---- routing ----

    /// The other nodes holding `key`, asking its home when this node does not know.
    pub fn resolve(&mut self, key: &DirKey, now: Instant) -> Resolution<'_> {
        if self.local.contains_key(key) {
            return Resolution::Nodes(self.local.get(key).map_or(&[], |h| h.others.as_slice()));
        }
        if self.home_of(key) == self.me {
            let ready = self.is_ready();
            return match self.homed.get(key) {
                Some(r) if !r.holders.is_empty() => Resolution::Nodes(&r.holders),
                _ if ready => Resolution::Nodes(&[]),
                // Homed here since the view changed, and its holders have not said so yet:
                // what the cache knew from the old home stands meanwhile (not final).
                _ => match self.cache.peek(key) {
                    Some(c) if !c.nodes.is_empty() => Resolution::Nodes(&c.nodes),
                    _ => Resolution::Unavailable,
                },
            };
        }
        if self.asked.contains_key(key) {
            return Resolution::Pending;
        }
        let (usable, stale) = match self.cache.peek(key) {
            Some(c) => (
                c.complete || !c.nodes.is_empty(),
                !c.complete && now.saturating_duration_since(c.at) >= RECHECK,
            ),
            None => (false, true),
        };
        if stale {
            self.ask(key.clone(), now);
        }
        match self.cache.get(key) {
            Some(c) if usable => Resolution::Nodes(&c.nodes),
            _ if stale => Resolution::Pending,
            _ => Resolution::Unavailable,
        }
    }

    /// Is what `resolve` gives for `key` final: held here (its home keeps this node told),
    /// homed here with every node synced, or a complete answer from its home? A send routed
    /// on an answer that is not (the view is changing) and that finds the key nowhere
    /// cannot say `offline`.
    pub fn is_final(&self, key: &DirKey) -> bool {
        if self.local.contains_key(key) {
            return true;
        }
        if self.home_of(key) == self.me {
            return self.ready;
        }
        self.cache.peek(key).is_some_and(|c| c.complete)
    }

    /// Keys whose lookup ended (answered, refused or given up) since the last call: what
    /// waited for them can be routed now.
    pub fn take_resolved(&mut self) -> Vec<DirKey> {
        std::mem::take(&mut self.resolved)
    }

    /// A receipt said `node` does not hold `key`: the cached entry is dropped, so that the
    /// next send asks the home again.
    pub fn stale_entry(&mut self, key: &DirKey, node: NodeId) {
        if self.cache.peek(key).is_some_and(|c| c.nodes.contains(&node)) {
            self.cache.pop(key);
            let home = self.home_of(key);
            if home != self.me {
                self.send(home, DirMsg::Unwatch { key: key.clone() });
            }
        }
    }

    fn ask(&mut self, key: DirKey, now: Instant) {
        let home = self.home_of(&key);
        if home == self.me {
            self.resolved.push(key);
            return;
        }
        self.send(home, DirMsg::Lookup { key: key.clone() });
        self.asked.insert(
            key,
            Asked {
                home,
                at: now,
                tries: 1,
            },
        );
    }

    /// The key's home cannot answer: what was known stands (not final), else
    /// unavailable, for `RECHECK`; then it is asked again.
    fn refuse(&mut self, key: DirKey, now: Instant) {
        let home = self.home_of(&key);
        let nodes = self.cache.peek(&key).map(|c| c.nodes.clone()).unwrap_or_default();
        self.cache_put(
            key.clone(),
            Cached {
                home,
                nodes,
                complete: false,
                at: now,
            },
        );
        self.resolved.push(key);
    }

    fn cache_put(&mut self, key: DirKey, entry: Cached) {
        self.cache.push(key, entry);
        while self.cache.len() > self.cache_capacity {
            let Some((evicted, _)) = self.cache.pop_lru() else {
                break;
            };
            let home = self.home_of(&evicted);
            if home != self.me {
                self.send(home, DirMsg::Unwatch { key: evicted });
            }
        }
    }

    // ---- messages from other nodes ----

    /// Handles what `from` sent (it is heard from, too).
    pub fn on_messages(&mut self, from: NodeId, msgs: Vec<DirMsg>, now: Instant) {
        if from == self.me {
            return;
        }
        self.heard(from, now);
        for msg in msgs {
            match msg {
                DirMsg::Hold { key, held: true } => self.add_holder(key, from),
                DirMsg::Hold { key, held: false } => self.remove_holder(&key, from),
                DirMsg::Synced { view } => {
                    self.synced.insert(from, view);
                    self.update_ready(now);
                }
                DirMsg::Lookup { key } => self.on_lookup(key, from),
                DirMsg::Where { key, nodes, complete } => self.on_where(key, from, nodes, complete, now),
                DirMsg::NotHome { key } => {
                    if self.asked.get(&key).is_some_and(|a| a.home == from) {
                        self.asked.remove(&key);
                        self.refuse(key, now);
                    }
                }
                DirMsg::Resync => self.resync(from),
                DirMsg::Unwatch { key } => {
                    if let Some(record) = self.homed.get_mut(&key) {
                        record.watchers.retain(|n| *n != from);
                        if record.holders.is_empty() && record.watchers.is_empty() {
                            self.homed.remove(&key);
                        }
                    }
                }
            }
        }
        self.check_ready();
    }

    /// `home` had forgotten this node: our keys homed there are sent again, and our
    /// cache's entries from it dropped (it no longer counts us as a watcher).
    fn resync(&mut self, home: NodeId) {
        let keys: Vec<DirKey> = self
            .local
            .iter_mut()
            .filter(|(_, held)| held.home == home)
            .map(|(key, held)| {
                held.confirmed = false;
                key.clone()
            })
            .collect();
        for key in keys {
            self.send(home, DirMsg::Hold { key, held: true });
        }
        self.uncache_homed_at(home);
        let view = self.view;
        self.send(home, DirMsg::Synced { view });
    }

    /// Drops the cache's entries for keys homed at `home` under the current view.
    fn uncache_homed_at(&mut self, home: NodeId) {
        let nodes = &self.view_nodes;
        let homed: Vec<DirKey> = self
            .cache
            .iter()
            .filter(|(key, _)| home_among(key_hash(key), nodes) == home)
            .map(|(key, _)| key.clone())
            .collect();
        for key in homed {
            self.cache.pop(&key);
        }
    }

    fn on_lookup(&mut self, key: DirKey, from: NodeId) {
        if self.home_of(&key) != self.me {
            self.send(from, DirMsg::NotHome { key });
            return;
        }
        let complete = self.is_ready();
        let record = self.homed.entry(key.clone()).or_default();
        if !record.watchers.contains(&from) {
            record.watchers.push(from);
        }
        let nodes = record.holders.clone();
        if !complete {
            self.told_incomplete.push((key.clone(), from));
        }
        self.send(from, DirMsg::Where { key, nodes, complete });
    }

    /// Once every node of the view has synced, what was told incomplete is told again.
    fn check_ready(&mut self) {
        if self.told_incomplete.is_empty() || !self.is_ready() {
            return;
        }
        let mut told = std::mem::take(&mut self.told_incomplete);
        told.sort_unstable();
        told.dedup();
        for (key, node) in told {
            let Some(record) = self.homed.get(&key) else { continue };
            if record.watchers.contains(&node) || record.holders.contains(&node) {
                let nodes = record.holders.clone();
                self.send(
                    node,
                    DirMsg::Where {
                        key,
                        nodes,
                        complete: true,
                    },
                );
            }
        }
    }

    fn on_where(&mut self, key: DirKey, from: NodeId, nodes: Vec<NodeId>, complete: bool, now: Instant) {
        if self.home_of(&key) != from {
            return; // From a home of an older view: the current one will tell.
        }
        let me = self.me;
        if let Some(held) = self.local.get_mut(&key) {
            held.confirmed = true;
            let before = !held.others.is_empty();
            held.others = nodes.into_iter().filter(|n| *n != me).collect();
            let after = !held.others.is_empty();
            if before != after && key.kind == KeyKind::User {
                self.remote_flags.push((key.name.clone(), after));
            }
            return;
        }
        let asked = self.asked.remove(&key).is_some();
        if asked || self.cache.contains(&key) {
            let mut nodes: Vec<NodeId> = nodes.into_iter().filter(|n| *n != me).collect();
            // An incomplete "nowhere" (a new home that has not heard from every node yet)
            // leaves the nodes known before: sends keep reaching them meanwhile.
            if !complete && nodes.is_empty() {
                if let Some(before) = self.cache.peek(&key) {
                    nodes.clone_from(&before.nodes);
                }
            }
            self.cache_put(
                key.clone(),
                Cached {
                    home: from,
                    nodes,
                    complete,
                    at: now,
                },
            );
            if asked {
                self.resolved.push(key);
            }
        } else {
            self.send(from, DirMsg::Unwatch { key });
        }
    }

    // ---- records homed here ----

    fn add_holder(&mut self, key: DirKey, node: NodeId) {
        let record = self.homed.entry(key.clone()).or_default();
        if !record.holders.contains(&node) {
            record.holders.push(node);
            self.notify(&key);
        } else if node != self.me {
            // Known already (a record kept from an older view): the holder, whose home
            // changed, still needs to hear who else holds it.
            let (nodes, complete) = (record.holders.clone(), self.is_ready());
            if !complete {
                self.told_incomplete.push((key.clone(), node));
            }
            self.send(node, DirMsg::Where { key, nodes, complete });
        }
    }

    fn remove_holder(&mut self, key: &DirKey, node: NodeId) {
        let Some(record) = self.homed.get_mut(key) else { return };
        let before = record.holders.len();
        record.holders.retain(|n| *n != node);
        if record.holders.len() == before {
            return;
        }
        self.notify(key);
        if let Some(record) = self.homed.get(key) {
            if record.holders.is_empty() && record.watchers.is_empty() {
                self.homed.remove(key);
            }
        }
    }

    /// Tells the holders and watchers of `key` (and this node, if it holds it) who holds it.
    fn notify(&mut self, key: &DirKey) {
        let Some(record) = self.homed.get(key) else { return };
        let complete = self.is_ready();
        let nodes = record.holders.clone();
        let mut to: Vec<NodeId> = record.holders.iter().chain(&record.watchers).copied().collect();
        to.sort_unstable();
        to.dedup();
        for node in to {
            if node == self.me {
                // Only as its home (a record kept from another view says nothing to us).
                if self.home_of(key) == self.me {
                    self.on_where_local(key, &nodes);
                }
            } else {
                if !complete {
                    self.told_incomplete.push((key.clone(), node));
                }
                self.send(
                    node,
                    DirMsg::Where {
                        key: key.clone(),
                        nodes: nodes.clone(),
                        complete,
                    },
                );
            }
        }
    }

    /// This node holds `key` and is its home: its other holders changed.
    fn on_where_local(&mut self, key: &DirKey, nodes: &[NodeId]) {
        let me = self.me;
        if let Some(held) = self.local.get_mut(key) {
            let before = !held.others.is_empty();
            held.others = nodes.iter().copied().filter(|n| *n != me).collect();
            let after = !held.others.is_empty();
            if before != after && key.kind == KeyKind::User {
                self.remote_flags.push((key.name.clone(), after));
            }
        }
    }

    // ---- out ----

    fn send(&mut self, node: NodeId, msg: DirMsg) {
        self.outbox.entry(node).or_default().push(msg);
    }

    /// What this node has for others since the last call: one body per node.
    pub fn take_outbox(&mut self) -> Vec<(NodeId, Bytes)> {
        let me = self.me;
        let mut out: Vec<(NodeId, Bytes)> = self
            .outbox
            .drain()
            .map(|(node, msgs)| (node, wire::write_dir(me, &msgs)))
            .collect();
        out.sort_unstable_by_key(|(node, _)| *node);
        out
    }

    /// Same as `take_outbox`, without encoding (for tests and the simulator).
    pub fn take_messages(&mut self) -> Vec<(NodeId, Vec<DirMsg>)> {
        let mut out: Vec<(NodeId, Vec<DirMsg>)> = self.outbox.drain().collect();
        out.sort_unstable_by_key(|(node, _)| *node);
        out
    }
}

/// FNV-1a of the key's kind and name: the same on every node and every build.
pub fn key_hash(key: &DirKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(key.kind as u8).chain(key.name.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads `key_hash ^ node` over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn score(hash: u64, node: NodeId) -> (u64, NodeId) {
    (mix(hash ^ mix(node)), node)
}

/// Rendezvous hashing: the node with the highest score for the key.
pub fn home_among(hash: u64, nodes: &[NodeId]) -> NodeId {
    nodes.iter().copied().max_by_key(|n| score(hash, *n)).unwrap_or(0)
}

/// The key's home after a change of view, from its home before: a joined node wins only
/// if it beats the old home, and only a departed home means scoring every node.
fn new_home(key: &DirKey, old: NodeId, joined: &[NodeId], departed: &[NodeId], nodes: &[NodeId]) -> NodeId {
    let hash = key_hash(key);
    if departed.contains(&old) {
        return home_among(hash, nodes);
    }
    joined
        .iter()
        .copied()
        .chain([old])
        .max_by_key(|n| score(hash, *n))
        .unwrap_or(old)
}

/// A digest of a sorted set of nodes: equal views have equal digests.
fn view_digest(nodes: &[NodeId]) -> u64 {
    nodes.iter().fold(0x9e37_79b9_7f4a_7c15, |h, n| mix(h ^ *n))
}

#[cfg(test)]
mod tests;
