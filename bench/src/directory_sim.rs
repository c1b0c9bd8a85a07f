//! directory-sim: the cluster's directory at 10–100 nodes on one host.
//!
//! Each simulated node is a thread with its own current-thread tokio runtime and its own
//! connection to a real nats-server, running a directory: the replicated one the gateway
//! used before (`replicated`, every node keeps every other node's users) or the gateway's
//! sharded one (`cluster::directory`, a home node per user by rendezvous hashing). Users
//! are synthetic: each node holds `--users` online users out of a pool twice that size,
//! and they come and go with exponential sessions (mean `--session`), so each node sees
//! `users / session` departures and as many arrivals per second. Each node also sends
//! `--sends` messages per second to random online users of other nodes: routed as the
//! gateway routes them (a lookup at the user's home when the sharded directory does not
//! know), published to the holding nodes, checked there.
//!
//! Measured per node over the `--duration` after `--warmup`: the directory's own memory
//! (net bytes allocated inside its calls, by a counting allocator), the presence and
//! directory messages received per second (NATS messages and bytes), the lookups and
//! their latency, and each routed message's latency from send to arrival.

mod replicated;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use replicated::wire::{self, PresenceMsg};
use replicated::{Action, Presence};
use shardgate::cluster::directory::{self, DirKey, HomeDirectory, Resolution};
use shardgate::cluster::wire::NodeId;

/// Counts, per thread, the bytes allocated minus the bytes freed while `COUNTING` is set.
/// The directory's memory is what dropping it frees (`heap_of`): exact, whoever allocated
/// it, with no counting on the way.
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static NET: Cell<i64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = NET.try_with(|n| n.set(n.get() + layout.size() as i64));
            }
        });
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = NET.try_with(|n| n.set(n.get() - layout.size() as i64));
            }
        });
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The heap bytes `value` holds: what dropping it frees.
fn heap_of<T>(value: T) -> i64 {
    NET.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    drop(value);
    COUNTING.with(|c| c.set(false));
    -NET.with(|n| n.get())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Replicated,
    Sharded,
}

#[derive(Parser, Clone)]
#[command(name = "directory-sim", about = "the cluster directory at many nodes, on real NATS")]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Node counts to run, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    nodes: Vec<usize>,
    /// Online users per node.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Mean session length.
    #[arg(long, default_value = "30m")]
    session: humantime::Duration,
    /// Messages per node per second, each to a random online user of another node.
    #[arg(long, default_value_t = 50.0)]
    sends: f64,
    #[arg(long, default_value = "15s")]
    warmup: humantime::Duration,
    #[arg(long, default_value = "30s")]
    duration: humantime::Duration,
    #[arg(long, value_delimiter = ',', default_value = "replicated,sharded")]
    directory: Vec<Kind>,
    /// The sharded directory's cache of keys held elsewhere, per node.
    #[arg(long, default_value_t = 100_000)]
    cache: usize,
    /// The replicated directory is skipped where all nodes together would hold more
    /// entries than this (nodes × nodes × users): it would not fit in this host.
    #[arg(long, default_value_t = 60_000_000)]
    replicated_max_entries: usize,
    /// Where to write every run's figures as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One node's figures over the measured window.
#[derive(Default, Clone)]
struct NodeStats {
    dir_bytes: i64,
    local_users: usize,
    presence_msgs: u64,
    presence_bytes: u64,
    sent: u64,
    delivered: u64,
    absent: u64,
    unavailable: u64,
    /// Answered "held nowhere" although the user was online on another node.
    said_offline: u64,
    lookups: u64,
    cache_hits: u64,
    lookup_us: Option<Histogram<u64>>,
    route_us: Option<Histogram<u64>>,
}

struct Shared {
    /// Each pool user's state: 0 offline, 1 online.
    online: Vec<AtomicU8>,
    ids: Vec<NodeId>,
    pool: usize,
    run: u64,
}

fn user_name(index: usize) -> String {
    format!("user-{index}")
}

enum Dir {
    Replicated(Box<Presence>, Vec<Action>),
    Sharded(Box<HomeDirectory>),
}

struct SimNode {
    index: usize,
    me: NodeId,
    prefix: String,
    client: async_nats::Client,
    dir: Dir,
    shared: Arc<Shared>,
    online: Vec<usize>,
    offline: Vec<usize>,
    rng: u64,
    /// Sends waiting for a lookup: (user index, when sent).
    parked: HashMap<DirKey, Vec<(usize, Instant)>>,
    stats: NodeStats,
    measuring: bool,
}

impl SimNode {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn set_user(&mut self, user: usize, present: bool) {
        self.shared.online[user].store(present as u8, Ordering::Release);
        let name: Arc<str> = Arc::from(user_name(user));
        let now = Instant::now();
        match &mut self.dir {
            Dir::Replicated(p, _) => p.local_user(name, 0, present),
            Dir::Sharded(d) => d.local_key(
                DirKey {
                    kind: directory::KeyKind::User,
                    name,
                },
                0,
                present,
                now,
            ),
        }
    }

    /// One session ends and another begins, `n` times.
    fn churn(&mut self, n: usize) {
        for _ in 0..n {
            if self.online.is_empty() || self.offline.is_empty() {
                return;
            }
            let i = self.next() as usize % self.online.len();
            let leaving = self.online.swap_remove(i);
            self.set_user(leaving, false);
            self.offline.push(leaving);
            let j = self.next() as usize % self.offline.len();
            let coming = self.offline.swap_remove(j);
            self.set_user(coming, true);
            self.online.push(coming);
        }
    }

    /// A message to a random online user of another node.
    async fn send_one(&mut self) {
        let nodes = self.shared.ids.len();
        let mut target = None;
        for _ in 0..8 {
            let node = self.next() as usize % nodes;
            if node == self.index {
                continue;
            }
            let user = node * self.shared.pool + self.next() as usize % self.shared.pool;
            if self.shared.online[user].load(Ordering::Acquire) == 1 {
                target = Some(user);
                break;
            }
        }
        let Some(user) = target else { return };
        if self.measuring {
            self.stats.sent += 1;
        }
        self.route(user, Instant::now(), false).await;
    }

    async fn route(&mut self, user: usize, since: Instant, after_lookup: bool) {
        let name: Arc<str> = Arc::from(user_name(user));
        let now = Instant::now();
        let nodes: Vec<NodeId> = match &mut self.dir {
            Dir::Replicated(p, _) => p.user_nodes(&name).to_vec(),
            Dir::Sharded(d) => {
                let key = DirKey::user(name);
                match d.resolve(&key, now) {
                    Resolution::Nodes(n) => {
                        if self.measuring && !after_lookup {
                            self.stats.cache_hits += 1;
                        }
                        n.to_vec()
                    }
                    Resolution::Pending if !after_lookup => {
                        if self.measuring {
                            self.stats.lookups += 1;
                        }
                        self.parked.entry(key).or_default().push((user, since));
                        return;
                    }
                    Resolution::Pending | Resolution::Unavailable => {
                        if self.measuring {
                            self.stats.unavailable += 1;
                        }
                        return;
                    }
                }
            }
        };
        if after_lookup && self.measuring {
            record(&mut self.stats.lookup_us, now.duration_since(since));
        }
        if nodes.is_empty() {
            if self.measuring {
                self.stats.said_offline += 1;
            }
            return;
        }
        let sent_ns = unix_ns() - since.elapsed().as_nanos() as u64;
        for node in nodes {
            let mut body = Vec::with_capacity(16);
            body.extend_from_slice(&sent_ns.to_le_bytes());
            body.extend_from_slice(&(user as u64).to_le_bytes());
            let subject = format!("{}.node.{node:016x}.msg", self.prefix);
            let _ = self.client.publish(subject, body.into()).await;
        }
    }

    /// Lookups answered: what waited for them is routed.
    async fn release(&mut self) {
        let keys = match &mut self.dir {
            Dir::Sharded(d) => d.take_resolved(),
            Dir::Replicated(..) => return,
        };
        for key in keys {
            for (user, since) in self.parked.remove(&key).unwrap_or_default() {
                Box::pin(self.route(user, since, true)).await;
            }
        }
    }

    async fn on_message(&mut self, msg: async_nats::Message) {
        let now = Instant::now();
        let subject = msg.subject.as_str();
        let presence = subject.ends_with(".presence");
        if !subject.ends_with(".msg") && self.measuring {
            self.stats.presence_msgs += 1;
            self.stats.presence_bytes += msg.payload.len() as u64;
        }
        if presence {
            let Ok(m) = wire::read_presence(msg.payload) else {
                return;
            };
            match &mut self.dir {
                Dir::Replicated(p, actions) => p.on_presence(m, now, actions),
                Dir::Sharded(d) => match m {
                    PresenceMsg::Heartbeat { node, .. } | PresenceMsg::Hello { node } => {
                        d.heard(node, now);
                    }
                    PresenceMsg::Bye { node } => {
                        d.left(node, now);
                    }
                    PresenceMsg::Delta { .. } => {}
                },
            }
            return;
        }
        let rest = subject.rsplit('.').next().unwrap_or_default();
        match (rest, &mut self.dir) {
            ("msg", dir) => {
                if msg.payload.len() < 16 {
                    return;
                }
                let sent_ns = u64::from_le_bytes(msg.payload[..8].try_into().unwrap_or_default());
                let user = u64::from_le_bytes(msg.payload[8..16].try_into().unwrap_or_default()) as usize;
                let name = user_name(user);
                let here = match dir {
                    Dir::Replicated(p, _) => p.local_user_shards(&name).is_some(),
                    Dir::Sharded(d) => d.local_shards(directory::KeyKind::User, &name).is_some(),
                };
                if self.measuring {
                    if here {
                        self.stats.delivered += 1;
                        record(
                            &mut self.stats.route_us,
                            Duration::from_nanos(unix_ns().saturating_sub(sent_ns)),
                        );
                    } else {
                        self.stats.absent += 1;
                    }
                }
                if !here {
                    if let Dir::Sharded(d) = dir {
                        d.not_held_here(DirKey::user(name.as_str()));
                    }
                }
            }
            ("dir", Dir::Sharded(d)) => {
                if let Ok((from, msgs)) = directory::wire::read_dir(msg.payload) {
                    d.on_messages(from, msgs, now);
                }
                self.release().await;
            }
            ("snapshot", Dir::Replicated(p, actions)) => {
                if let Ok(chunk) = wire::read_snapshot(msg.payload) {
                    p.on_snapshot(chunk, now, actions);
                }
            }
            ("resync", Dir::Replicated(p, actions)) => {
                if let Ok(bytes) = <[u8; 8]>::try_from(&msg.payload[..]) {
                    let to = NodeId::from_le_bytes(bytes);
                    {
                        p.flush(actions);
                        let snapshot = p.snapshot();
                        actions.push(Action::SendSnapshot(to, snapshot));
                    };
                }
            }
            _ => {}
        }
    }

    /// What the directory has for others goes out.
    async fn flush(&mut self) {
        let p = self.prefix.clone();
        match &mut self.dir {
            Dir::Replicated(pres, actions) => {
                pres.flush(actions);
                for action in std::mem::take(actions) {
                    match action {
                        Action::Broadcast(bytes) => self.publish(format!("{p}.presence"), bytes).await,
                        Action::AskSnapshot(node) => {
                            let me = Bytes::from(self.me.to_le_bytes().to_vec());
                            self.publish(format!("{p}.node.{node:016x}.resync"), me).await
                        }
                        Action::SendSnapshot(node, chunks) => {
                            for chunk in chunks {
                                self.publish(format!("{p}.node.{node:016x}.snapshot"), chunk).await;
                            }
                        }
                        Action::Say(_) => {}
                    }
                }
            }
            Dir::Sharded(d) => {
                for (node, body) in d.take_outbox() {
                    self.publish(format!("{p}.node.{node:016x}.dir"), body).await;
                }
            }
        }
    }

    async fn heartbeat(&mut self) {
        let hb = match &self.dir {
            Dir::Replicated(p, _) => p.heartbeat(),
            Dir::Sharded(_) => wire::write_presence(&PresenceMsg::Heartbeat {
                node: self.me,
                seq: 0,
                users: self.online.len() as u32,
            }),
        };
        self.publish(format!("{}.presence", self.prefix), hb).await;
    }

    async fn publish(&self, subject: String, body: Bytes) {
        let _ = self.client.publish(subject, body).await;
    }
}

fn record(h: &mut Option<Histogram<u64>>, d: Duration) {
    let h = h.get_or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"));
    let _ = h.record((d.as_micros() as u64).max(1));
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct Timing {
    start: Instant,
    warmup: Duration,
    duration: Duration,
}

fn run_node(args: &Args, kind: Kind, index: usize, shared: Arc<Shared>, timing: &Timing) -> NodeStats {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let me = shared.ids[index];
        let client = async_nats::connect(&args.nats).await.expect("nats-server reachable");
        // Subjects of this run only: a node of an earlier run still draining is not heard.
        let prefix = format!("dsim{:x}", shared.run);
        let mut presence_sub = client.subscribe(format!("{prefix}.presence")).await.expect("subscribe");
        let mut own_sub = client
            .subscribe(format!("{prefix}.node.{me:016x}.>"))
            .await
            .expect("subscribe");
        let now = Instant::now();
        let dir = match kind {
            Kind::Replicated => Dir::Replicated(Box::new(Presence::new(me, Duration::from_secs(5))), Vec::new()),
            Kind::Sharded => Dir::Sharded(Box::new(HomeDirectory::new(
                me,
                Duration::from_secs(5),
                NonZeroUsize::new(args.cache.max(1)).expect("non-zero"),
                now,
            ))),
        };
        let pool = shared.pool;
        let mut node = SimNode {
            index,
            me,
            prefix: prefix.clone(),
            client: client.clone(),
            dir,
            shared: shared.clone(),
            online: Vec::new(),
            offline: (index * pool..(index + 1) * pool).collect(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ (me | 1),
            parked: HashMap::new(),
            stats: NodeStats::default(),
            measuring: false,
        };
        let hello = wire::write_presence(&PresenceMsg::Hello { node: me });
        node.publish(format!("{prefix}.presence"), hello).await;
        // Half of the pool comes online at once, as after a deploy.
        for _ in 0..args.users {
            let i = node.next() as usize % node.offline.len();
            let user = node.offline.swap_remove(i);
            node.set_user(user, true);
            node.online.push(user);
        }
        let churn_per_s = args.users as f64 / args.session.as_secs_f64();
        let mut churn_due = 0.0;
        let mut sends_due = 0.0;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut last_heartbeat = Instant::now();
        let mut last_dir_tick = Instant::now();
        let measure_from = timing.start + timing.warmup;
        let measure_to = measure_from + timing.duration;
        loop {
            tokio::select! {
                Some(msg) = presence_sub.next() => node.on_message(msg).await,
                Some(msg) = own_sub.next() => node.on_message(msg).await,
                _ = tick.tick() => {
                    let now = Instant::now();
                    churn_due += churn_per_s * 0.01;
                    let n = churn_due as usize;
                    churn_due -= n as f64;
                    node.churn(n);
                    if now >= timing.start + timing.warmup / 2 {
                        sends_due += args.sends * 0.01;
                        while sends_due >= 1.0 {
                            sends_due -= 1.0;
                            node.send_one().await;
                        }
                    }
                    if now.duration_since(last_dir_tick) >= Duration::from_millis(100) {
                        last_dir_tick = now;
                        match &mut node.dir {
                            Dir::Replicated(p, actions) => p.tick(now, actions),
                            Dir::Sharded(d) => {
                                d.tick(now);
                            }
                        }
                        node.release().await;
                    }
                    if now.duration_since(last_heartbeat) >= Duration::from_secs(1) {
                        last_heartbeat = now;
                        node.heartbeat().await;
                    }
                    if !node.measuring && now >= measure_from && now < measure_to {
                        node.measuring = true;
                    }
                    if now >= measure_to {
                        break;
                    }
                }
            }
            // What the event gave the directory for other nodes leaves now, as at the end
            // of each of the cluster thread's rounds.
            node.flush().await;
        }
        node.stats.local_users = node.online.len();
        // Keep answering the others until every node is done measuring.
        let linger = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(linger);
        node.measuring = false;
        loop {
            tokio::select! {
                Some(msg) = presence_sub.next() => node.on_message(msg).await,
                Some(msg) = own_sub.next() => node.on_message(msg).await,
                _ = &mut linger => break,
            }
        }
        let _ = client.flush().await;
        node.parked.clear();
        let mut stats = std::mem::take(&mut node.stats);
        stats.dir_bytes = heap_of(node.dir);
        stats
    })
}

#[derive(serde::Serialize)]
struct RunFigures {
    directory: String,
    nodes: usize,
    users_per_node: usize,
    sends_per_node_per_s: f64,
    churn_per_node_per_s: f64,
    dir_bytes_per_node_mean: f64,
    dir_bytes_per_node_max: i64,
    dir_bytes_per_local_user: f64,
    presence_msgs_per_node_per_s: f64,
    presence_kib_per_node_per_s: f64,
    sent: u64,
    delivered: u64,
    absent: u64,
    unavailable: u64,
    said_offline: u64,
    lookup_share: f64,
    lookup_p50_us: u64,
    lookup_p99_us: u64,
    route_p50_us: u64,
    route_p99_us: u64,
    host_cpu_busy: f64,
}

fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (fields.iter().sum(), idle)
}

fn run(args: &Args, kind: Kind, nodes: usize) -> RunFigures {
    let pool = args.users * 2;
    let shared = Arc::new(Shared {
        online: (0..nodes * pool).map(|_| AtomicU8::new(0)).collect(),
        ids: (0..nodes)
            .map(|i| {
                let mut z = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ unix_ns();
                z = (z ^ (z >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z ^ (z >> 29)
            })
            .collect(),
        pool,
        run: unix_ns(),
    });
    let timing = Arc::new(Timing {
        start: Instant::now(),
        warmup: *args.warmup,
        duration: *args.duration,
    });
    let barrier = Arc::new(Barrier::new(nodes));
    let cpu_before = cpu_times();
    let handles: Vec<_> = (0..nodes)
        .map(|i| {
            let (args, shared, timing, barrier) = (args.clone(), shared.clone(), timing.clone(), barrier.clone());
            std::thread::Builder::new()
                .name(format!("node-{i}"))
                .stack_size(1 << 20)
                .spawn(move || {
                    barrier.wait();
                    run_node(&args, kind, i, shared, &timing)
                })
                .expect("a node thread")
        })
        .collect();
    let stats: Vec<NodeStats> = handles.into_iter().map(|h| h.join().expect("a node thread")).collect();
    let cpu_after = cpu_times();
    let busy = {
        let total = cpu_after.0.saturating_sub(cpu_before.0).max(1) as f64;
        1.0 - cpu_after.1.saturating_sub(cpu_before.1) as f64 / total
    };
    let secs = args.duration.as_secs_f64();
    let n = nodes as f64;
    let mut lookup = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut route = lookup.clone();
    let mut sum = NodeStats::default();
    for s in &stats {
        if let Some(h) = &s.lookup_us {
            let _ = lookup.add(h);
        }
        if let Some(h) = &s.route_us {
            let _ = route.add(h);
        }
        sum.dir_bytes += s.dir_bytes;
        sum.local_users += s.local_users;
        sum.presence_msgs += s.presence_msgs;
        sum.presence_bytes += s.presence_bytes;
        sum.sent += s.sent;
        sum.delivered += s.delivered;
        sum.absent += s.absent;
        sum.unavailable += s.unavailable;
        sum.said_offline += s.said_offline;
        sum.lookups += s.lookups;
        sum.cache_hits += s.cache_hits;
    }
    let q = |h: &Histogram<u64>, p: f64| if h.is_empty() { 0 } else { h.value_at_quantile(p) };
    RunFigures {
        directory: format!("{kind:?}").to_lowercase(),
        nodes,
        users_per_node: args.users,
        sends_per_node_per_s: args.sends,
        churn_per_node_per_s: args.users as f64 / args.session.as_secs_f64(),
        dir_bytes_per_node_mean: sum.dir_bytes as f64 / n,
        dir_bytes_per_node_max: stats.iter().map(|s| s.dir_bytes).max().unwrap_or(0),
        dir_bytes_per_local_user: sum.dir_bytes as f64 / sum.local_users.max(1) as f64,
        presence_msgs_per_node_per_s: sum.presence_msgs as f64 / n / secs,
        presence_kib_per_node_per_s: sum.presence_bytes as f64 / n / secs / 1024.0,
        sent: sum.sent,
        delivered: sum.delivered,
        absent: sum.absent,
        unavailable: sum.unavailable,
        said_offline: sum.said_offline,
        lookup_share: sum.lookups as f64 / (sum.lookups + sum.cache_hits).max(1) as f64,
        lookup_p50_us: q(&lookup, 0.5),
        lookup_p99_us: q(&lookup, 0.99),
        route_p50_us: q(&route, 0.5),
        route_p99_us: q(&route, 0.99),
        host_cpu_busy: busy,
    }
}

fn main() {
    let args = Args::parse();
    let mut all = Vec::new();
    println!(
        "| directory | nodes | users/node | dir MiB/node (max) | dir B/local user | presence msgs/node/s | presence KiB/node/s | sent | delivered | absent | unavailable | said offline | lookups | lookup p50/p99 ms | route p50/p99 ms | host CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &nodes in &args.nodes {
        for &kind in &args.directory {
            let entries = nodes * nodes * args.users;
            if kind == Kind::Replicated && entries > args.replicated_max_entries {
                println!(
                    "| replicated | {nodes} | {} | skipped: {entries} entries in all would not fit this host | | | | | | | | | | | | |",
                    args.users
                );
                continue;
            }
            let f = run(&args, kind, nodes);
            println!(
                "| {} | {} | {} | {:.1} ({:.1}) | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {:.1}% | {:.2} / {:.2} | {:.2} / {:.2} | {:.0}% |",
                f.directory,
                f.nodes,
                f.users_per_node,
                f.dir_bytes_per_node_mean / 1048576.0,
                f.dir_bytes_per_node_max as f64 / 1048576.0,
                f.dir_bytes_per_local_user,
                f.presence_msgs_per_node_per_s,
                f.presence_kib_per_node_per_s,
                f.sent,
                f.delivered,
                f.absent,
                f.unavailable,
                f.said_offline,
                f.lookup_share * 100.0,
                f.lookup_p50_us as f64 / 1000.0,
                f.lookup_p99_us as f64 / 1000.0,
                f.route_p50_us as f64 / 1000.0,
                f.route_p99_us as f64 / 1000.0,
                f.host_cpu_busy * 100.0,
            );
            all.push(f);
            // Let NATS drop the departed connections' interest before the next run.
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&all).expect("figures serialise");
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("directory-sim: cannot write {}: {e}", path.display());
        }
    }
}
