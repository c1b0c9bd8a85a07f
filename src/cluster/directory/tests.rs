use std::collections::{BTreeMap, HashMap, VecDeque};

use proptest::prelude::*;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(3);

fn cache(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("non-zero")
}

/// Nodes wired by in-order links (as NATS is between two connections), with the truth
/// of who holds what kept beside them.
struct Cluster {
    now: Instant,
    nodes: BTreeMap<NodeId, HomeDirectory>,
    links: BTreeMap<(NodeId, NodeId), VecDeque<Vec<DirMsg>>>,
    /// Which shards of which node hold each key.
    truth: HashMap<DirKey, BTreeMap<NodeId, ShardMask>>,
    cache: usize,
    trace: bool,
}

impl Cluster {
    fn new(ids: &[NodeId], cache: usize) -> Self {
        let now = Instant::now();
        let mut c = Cluster {
            now,
            nodes: BTreeMap::new(),
            links: BTreeMap::new(),
            truth: HashMap::new(),
            cache,
            trace: false,
        };
        for id in ids {
            c.join(*id);
        }
        c
    }

    fn join(&mut self, id: NodeId) {
        self.nodes
            .entry(id)
            .or_insert_with(|| HomeDirectory::new(id, TIMEOUT, cache(self.cache), self.now));
    }

    /// `id` says bye and is gone: nothing more leaves it or reaches it.
    fn leave(&mut self, id: NodeId) {
        self.nodes.remove(&id);
        self.links.retain(|(from, to), _| *from != id && *to != id);
        for holders in self.truth.values_mut() {
            holders.remove(&id);
        }
    }

    fn hears(&mut self, to: NodeId, from: NodeId) {
        let now = self.now;
        if self.nodes.contains_key(&from) {
            if let Some(n) = self.nodes.get_mut(&to) {
                n.heard(from, now);
            }
        } else if let Some(n) = self.nodes.get_mut(&to) {
            n.left(from, now);
        }
    }

    fn set(&mut self, node: NodeId, key: &DirKey, shard: usize, present: bool) {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&node) else { return };
        n.local_key(key.clone(), shard, present, now);
        let holders = self.truth.entry(key.clone()).or_default();
        let mask = holders.entry(node).or_default();
        if present {
            *mask |= 1 << shard;
        } else {
            *mask &= !(1 << shard);
        }
        if *mask == 0 {
            holders.remove(&node);
        }
    }

    /// Moves every node's outbox onto its links.
    fn post(&mut self) {
        for (id, node) in &mut self.nodes {
            for (to, msgs) in node.take_messages() {
                if to != *id {
                    self.links.entry((*id, to)).or_default().push_back(msgs);
                }
            }
        }
        self.links.retain(|_, q| !q.is_empty());
    }

    /// Delivers the oldest body on the `index`-th busy link.
    fn deliver_one(&mut self, index: usize) {
        self.post();
        let Some(link) = self.links.keys().nth(index % self.links.len().max(1)).copied() else {
            return;
        };
        let Some(msgs) = self.links.get_mut(&link).and_then(|q| q.pop_front()) else {
            return;
        };
        let now = self.now;
        if self.trace {
            eprintln!("   {} -> {}: {msgs:?}", link.0, link.1);
        }
        if let Some(n) = self.nodes.get_mut(&link.1) {
            n.on_messages(link.0, msgs, now);
        }
    }

    fn deliver_all(&mut self) {
        for _ in 0..100_000 {
            self.post();
            if self.links.is_empty() {
                return;
            }
            self.deliver_one(0);
        }
        panic!("messages never stopped");
    }

    /// Time enough passes for every node to apply the membership it has heard of.
    fn apply_views(&mut self) {
        self.now += VIEW_MAX_WAIT;
        let now = self.now;
        for n in self.nodes.values_mut() {
            n.tick(now);
        }
    }

    /// Every node hears every other and of every departure, applies what it heard, and
    /// every message is delivered (messages from nodes not heard of yet make views change
    /// again, hence the rounds).
    fn settle(&mut self) {
        for _ in 0..10 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for a in &ids {
                let known: Vec<NodeId> = self.nodes[a].members.keys().copied().collect();
                for b in ids.iter().chain(&known) {
                    self.hears(*a, *b);
                }
            }
            self.apply_views();
            self.deliver_all();
            if self.nodes.values().all(|n| n.view_pending.is_none()) {
                return;
            }
        }
        panic!("views never settled");
    }

    /// A user, named `prefix` and a number, whose home is `home` (in the first node's view).
    fn user_homed_at(&self, home: NodeId, prefix: &str) -> DirKey {
        let first = self.nodes.values().next().expect("a node");
        (0..1000)
            .map(|i| DirKey::user(format!("{prefix}{i}")))
            .find(|k| first.home_of(k) == home)
            .expect("some user is homed there")
    }

    fn holders(&self, key: &DirKey) -> Vec<NodeId> {
        self.truth.get(key).map_or(Vec::new(), |h| h.keys().copied().collect())
    }

    /// What `node` resolves `key` to, asking its home and waiting for the answer if need be.
    fn resolve(&mut self, node: NodeId, key: &DirKey) -> Option<Vec<NodeId>> {
        let now = self.now;
        let first = match self.nodes.get_mut(&node)?.resolve(key, now) {
            Resolution::Nodes(n) => Some(n.to_vec()),
            Resolution::Pending => None,
            Resolution::Unavailable => return None,
        };
        // An answer that is not final (an entry whose home moved) was asked again.
        if let Some(mut n) = first.filter(|_| self.nodes[&node].is_final(key)) {
            n.sort_unstable();
            return Some(n);
        }
        self.deliver_all();
        let resolved = self.nodes.get_mut(&node)?.take_resolved();
        assert!(resolved.contains(key), "{key:?} was asked and never resolved");
        match self.nodes.get_mut(&node)?.resolve(key, now) {
            Resolution::Nodes(n) => {
                let mut n = n.to_vec();
                n.sort_unstable();
                Some(n)
            }
            _ => None,
        }
    }

    /// Every node, for every key, knows every other node that holds it; a node it names
    /// that does not hold it (a release that reached a home of another view) is healed as
    /// a delivery there heals it, and then every node knows exactly the nodes that do.
    /// (A refused or incomplete answer stands for `RECHECK`: the check comes after it.)
    fn check(&mut self, keys: &[DirKey]) -> Result<(), TestCaseError> {
        self.now += RECHECK;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            prop_assert!(self.nodes[id].is_ready(), "node {id} not ready");
            let unconfirmed = self.nodes[id].stats().local_unconfirmed;
            prop_assert_eq!(unconfirmed, 0, "node {} has keys its home never answered for", id);
        }
        for key in keys {
            let holders = self.holders(key);
            for id in &ids {
                let expected: Vec<NodeId> = holders.iter().copied().filter(|n| n != id).collect();
                let got = self.resolve(*id, key);
                prop_assert!(got.is_some(), "node {} cannot resolve {:?}", id, key);
                let got = got.unwrap_or_default();
                let missing: Vec<&NodeId> = expected.iter().filter(|n| !got.contains(n)).collect();
                prop_assert!(
                    missing.is_empty(),
                    "node {id} resolving {key:?}: {got:?}, missing {missing:?}"
                );
                let stale: Vec<NodeId> = got.iter().copied().filter(|n| !expected.contains(n)).collect();
                for node in stale {
                    // The record reaches `node`, which does not hold the key, and its
                    // receipt says so to the sender.
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.not_held_here(key.clone());
                    }
                    if let Some(n) = self.nodes.get_mut(id) {
                        n.stale_entry(key, node);
                    }
                    self.deliver_all();
                    self.now += RECHECK;
                    let healed = self.resolve(*id, key);
                    prop_assert!(
                        healed.as_ref().is_some_and(|h| !h.contains(&node)),
                        "node {id} resolving {key:?} still names {node} after a delivery there: {healed:?}"
                    );
                }
            }
        }
        for key in keys {
            let holders = self.holders(key);
            for id in &ids {
                let expected: Vec<NodeId> = holders.iter().copied().filter(|n| n != id).collect();
                let got = self.resolve(*id, key);
                prop_assert_eq!(got, Some(expected), "node {} resolving {:?} once healed", id, key);
            }
        }
        Ok(())
    }
}

#[test]
fn a_lookup_goes_to_the_home_and_the_asker_hears_of_changes() {
    let mut c = Cluster::new(&[1, 2, 3], 100);
    c.settle();
    let ann = DirKey::user("ann");
    let home = c.nodes[&1].home_of(&ann);
    let (holder, asker) = match home {
        1 => (2, 3),
        2 => (3, 1),
        _ => (1, 2),
    };
    // Nobody holds ann yet: every node resolves her as held nowhere.
    assert_eq!(c.resolve(asker, &ann), Some(vec![]));
    c.set(holder, &ann, 0, true);
    c.deliver_all();
    // The asker was told when she came, without asking again.
    let now = c.now;
    assert_eq!(
        c.nodes.get_mut(&asker).unwrap().resolve(&ann, now),
        Resolution::Nodes(&[holder])
    );
    c.set(holder, &ann, 0, false);
    c.deliver_all();
    assert_eq!(
        c.nodes.get_mut(&asker).unwrap().resolve(&ann, now),
        Resolution::Nodes(&[])
    );
}

#[test]
fn a_key_is_confirmed_once_its_home_answered() {
    let mut c = Cluster::new(&[1, 2], 100);
    c.settle();
    let key = c.user_homed_at(2, "u");
    c.set(1, &key, 0, true);
    assert_eq!(c.nodes[&1].stats().local_unconfirmed, 1);
    c.deliver_all();
    assert_eq!(c.nodes[&1].stats().local_unconfirmed, 0);
    // Homed at itself: nothing to wait for.
    let own = c.user_homed_at(1, "v");
    c.set(1, &own, 0, true);
    assert_eq!(c.nodes[&1].stats().local_unconfirmed, 0);
}

#[test]
fn a_user_on_two_nodes_is_flagged_on_both() {
    let mut c = Cluster::new(&[1, 2, 3], 100);
    c.settle();
    let bob = DirKey::user("bob");
    c.set(1, &bob, 0, true);
    c.deliver_all();
    assert!(c.nodes.get_mut(&1).unwrap().take_remote_flags().is_empty());
    c.set(2, &bob, 1, true);
    c.deliver_all();
    let bob_name: Arc<str> = Arc::from("bob");
    assert_eq!(
        c.nodes.get_mut(&1).unwrap().take_remote_flags(),
        vec![(bob_name.clone(), true)]
    );
    assert_eq!(
        c.nodes.get_mut(&2).unwrap().take_remote_flags(),
        vec![(bob_name.clone(), true)]
    );
    c.set(2, &bob, 1, false);
    c.deliver_all();
    assert_eq!(
        c.nodes.get_mut(&1).unwrap().take_remote_flags(),
        vec![(bob_name, false)]
    );
}

#[test]
fn an_empty_answer_is_unavailable_until_every_node_has_synced() {
    let mut c = Cluster::new(&[1, 2], 100);
    c.settle();
    let key = c.user_homed_at(2, "u");
    // A third node appears to node 2 only: node 2 waits for its `Synced`.
    c.join(3);
    c.hears(2, 3);
    let now = c.now + VIEW_MAX_WAIT;
    c.now = now;
    c.nodes.get_mut(&2).unwrap().tick(now);
    c.post();
    let now = c.now;
    let link = (1, 2);
    if let Some(q) = c.links.get_mut(&link) {
        for msgs in q.drain(..) {
            c.nodes.get_mut(&2).unwrap().on_messages(1, msgs, now);
        }
    }
    assert!(!c.nodes[&2].is_ready());
    let lookup = DirMsg::Lookup { key: key.clone() };
    c.nodes.get_mut(&2).unwrap().on_messages(1, vec![lookup], now);
    let answer = c.nodes.get_mut(&2).unwrap().take_messages();
    let to_one = answer
        .iter()
        .find(|(n, _)| *n == 1)
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    let key_home = c.nodes[&2].home_of(&key);
    if key_home == 2 {
        assert!(
            to_one.contains(&DirMsg::Where {
                key: key.clone(),
                nodes: vec![],
                complete: false,
            }),
            "{to_one:?}"
        );
    } else {
        assert!(to_one.contains(&DirMsg::NotHome { key: key.clone() }), "{to_one:?}");
    }
    c.settle();
    assert!(c.nodes[&2].is_ready());
}

#[test]
fn a_joining_node_takes_only_its_share_of_the_keys() {
    let ids: Vec<NodeId> = (1..=10).map(|i| mix(i * 7919)).collect();
    let keys: Vec<DirKey> = (0..20_000).map(|i| DirKey::user(format!("user-{i}"))).collect();
    let mut nodes = ids.clone();
    nodes.sort_unstable();
    let before: Vec<NodeId> = keys.iter().map(|k| home_among(key_hash(k), &nodes)).collect();
    let newcomer = mix(11 * 7919);
    nodes.push(newcomer);
    nodes.sort_unstable();
    let after: Vec<NodeId> = keys.iter().map(|k| home_among(key_hash(k), &nodes)).collect();
    let moved: Vec<usize> = (0..keys.len()).filter(|i| before[*i] != after[*i]).collect();
    // Every moved key went to the newcomer, and about 1/11 of them moved.
    assert!(moved.iter().all(|i| after[*i] == newcomer));
    let share = moved.len() as f64 / keys.len() as f64;
    assert!((0.07..0.115).contains(&share), "{share}");
    // Homes are spread: no node owns more than twice its share.
    let mut per_node: HashMap<NodeId, usize> = HashMap::new();
    for home in &after {
        *per_node.entry(*home).or_default() += 1;
    }
    assert!(per_node.values().all(|n| *n < 2 * keys.len() / 11), "{per_node:?}");
}

#[test]
fn the_cache_is_bounded_and_evicted_entries_are_unwatched() {
    let mut c = Cluster::new(&[1, 2], 4);
    c.settle();
    let keys: Vec<DirKey> = (0..40)
        .map(|i| DirKey::user(format!("k{i}")))
        .filter(|k| c.nodes[&1].home_of(k) == 2)
        .take(10)
        .collect();
    for key in &keys {
        assert_eq!(c.resolve(1, key), Some(vec![]));
    }
    assert_eq!(c.nodes[&1].stats().cached, 4);
    // Node 2 keeps watchers only for what node 1 still caches.
    let watched = c.nodes[&2].homed.values().filter(|r| r.watchers.contains(&1)).count();
    assert_eq!(watched, 4);
}

#[test]
fn a_departed_node_is_dropped_from_every_record() {
    let mut c = Cluster::new(&[1, 2, 3], 100);
    c.settle();
    let keys: Vec<DirKey> = (0..30).map(|i| DirKey::user(format!("u{i}"))).collect();
    for (i, key) in keys.iter().enumerate() {
        c.set([1, 2, 3][i % 3], key, 0, true);
        c.set(3, key, 1, true);
    }
    c.settle();
    c.check(&keys).unwrap();
    c.leave(3);
    c.settle();
    c.check(&keys).unwrap();
}

#[derive(Debug, Clone)]
enum Step {
    Set {
        node: usize,
        key: usize,
        shard: usize,
        present: bool,
    },
    Deliver(usize),
    Hear {
        to: usize,
        from: usize,
    },
    Join,
    Leave(usize),
    Lookup {
        node: usize,
        key: usize,
    },
    /// Time passes (every node ticks): members time out, lookups are asked again, kept
    /// records are pruned.
    Advance {
        ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..8usize, 0..12usize, 0..2usize, any::<bool>())
            .prop_map(|(node, key, shard, present)| Step::Set { node, key, shard, present }),
        6 => any::<usize>().prop_map(Step::Deliver),
        3 => (0..8usize, 0..8usize).prop_map(|(to, from)| Step::Hear { to, from }),
        1 => Just(Step::Join),
        1 => (0..8usize).prop_map(Step::Leave),
        2 => (0..8usize, 0..12usize).prop_map(|(node, key)| Step::Lookup { node, key }),
        1 => prop_oneof![0..1500u64, 0..40_000u64].prop_map(|ms| Step::Advance { ms }),
    ]
}

fn run(steps: Vec<Step>, trace: bool) -> Result<(), TestCaseError> {
    let mut ids: Vec<NodeId> = vec![101, 202, 303];
    let mut next_id = 404;
    let mut c = Cluster::new(&ids, 6);
    c.trace = trace;
    let keys: Vec<DirKey> = (0..12)
        .map(|i| {
            if i % 4 == 3 {
                DirKey::room(format!("r{i}"))
            } else {
                DirKey::user(format!("u{i}"))
            }
        })
        .collect();
    for s in steps {
        if trace {
            eprintln!("-- {s:?} (ids {ids:?})");
        }
        match s {
            Step::Set {
                node,
                key,
                shard,
                present,
            } => {
                let id = ids[node % ids.len()];
                c.set(id, &keys[key], shard, present);
            }
            Step::Deliver(i) => c.deliver_one(i),
            Step::Hear { to, from } => {
                let (to, from) = (ids[to % ids.len()], ids[from % ids.len()]);
                c.hears(to, from);
            }
            Step::Join if ids.len() < 6 => {
                ids.push(next_id);
                c.join(next_id);
                next_id += 101;
            }
            Step::Leave(i) if ids.len() > 1 => {
                let id = ids.remove(i % ids.len());
                c.leave(id);
            }
            Step::Lookup { node, key } => {
                let id = ids[node % ids.len()];
                let now = c.now;
                if let Some(n) = c.nodes.get_mut(&id) {
                    let _ = n.resolve(&keys[key], now);
                }
            }
            Step::Advance { ms } => {
                c.now += Duration::from_millis(ms);
                let now = c.now;
                for n in c.nodes.values_mut() {
                    n.tick(now);
                }
            }
            Step::Join | Step::Leave(_) => {}
        }
    }
    if trace {
        eprintln!("-- settle");
    }
    c.settle();
    if trace {
        for (id, n) in &c.nodes {
            for (k, h) in &n.local {
                eprintln!(
                    "node {id} holds {k:?} home {} (view says {}) others {:?}",
                    h.home,
                    n.home_of(k),
                    h.others
                );
            }
        }
    }
    c.check(&keys)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever order connections, departures, arrivals and messages come in (views of
    /// different nodes differing meanwhile), once every node has heard every other and
    /// the messages are through, every node resolves every key to exactly the other
    /// nodes that hold it.
    #[test]
    fn every_node_agrees_with_the_truth_once_things_settle(steps in proptest::collection::vec(step(), 0..300)) {
        run(steps, false)?;
    }
}
