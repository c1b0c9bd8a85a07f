//! The cluster thread: one NATS connection per node.
//!
//! Subjects, under a prefix (`--nats-prefix`, default `shardgate`):
//! - `<p>.presence`: every node's heartbeats, hellos and byes (who is in the cluster).
//! - `<p>.node.<id>.inbox`: batches of deliveries for node `<id>`.
//! - `<p>.node.<id>.receipts`: which of `<id>`'s batches arrived, gathered for a few
//!   milliseconds per sender (one message per sender then, not one per batch).
//! - `<p>.node.<id>.dir`: what other nodes' directories have for `<id>`'s (where users
//!   and rooms are: `directory`), one message per sender per round.
//!
//! A node subscribes to two subjects only: `<p>.presence` and `<p>.node.<its id>.>`.
//! Everything one node has for another in one round goes as one batch (one NATS
//! message), each frame encoded once by the sending shard.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event, Message};
use bytes::Bytes;
use crossbeam_channel::Receiver;
use futures_util::StreamExt;

use super::access::{redact_url, NatsAccess};
use super::directory::{self, DirKey, HomeDirectory, Resolution};
use super::wire::{self, BatchWriter, ClusterKey, NodeId, PresenceMsg, ReceiptWriter, RecordKind, StoredAt};
use super::{instant_to_unix_nanos, unix_nanos, ClusterLink, ToCluster};
use crate::metrics::board::{Board, ClusterSnapshot, DirectoryGauges};
use crate::route::inbox::Mesh;
use crate::route::{AckTo, Outcome, Placement};
use crate::route::{ShardMask, ShardMsg};
use crate::shutdown::Shutdown;
use crate::store::push::{PushEvent, PushQueue};
use crate::store::thread::StoreLink;
use crate::store::ConvId;

/// How the node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub url: String,
    pub prefix: String,
    pub node: NodeId,
    /// Seals what this node sends, and checks what it receives.
    pub key: Arc<ClusterKey>,
    /// The credentials and TLS settings given to NATS.
    pub access: NatsAccess,
    /// A node not heard from for this long is forgotten with its users.
    pub presence_timeout: Duration,
    pub heartbeat: Duration,
    /// Entries the directory keeps of keys held on other nodes.
    pub directory_cache: NonZeroUsize,
    /// A batch not acknowledged within this is answered `unavailable`.
    pub ack_timeout: Duration,
    pub cpu: Option<usize>,
    /// How often the `cluster:` traffic line is printed.
    pub report_interval: Duration,
}

/// Traffic through NATS since the last `cluster:` line.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    batches_out: u64,
    records_out: u64,
    batches_in: u64,
    records_in: u64,
    /// Batches confirmed by a receipt.
    confirmed: u64,
    routed: u64,
    offline: u64,
    unavailable: u64,
    refused: u64,
    /// Stored messages sent to other nodes (each once, however many nodes it went to).
    stored_out: u64,
    /// Messages dropped unread: a bad or stale seal, a replayed batch, unreadable bytes.
    rejected: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        self.batches_out += o.batches_out;
        self.records_out += o.records_out;
        self.batches_in += o.batches_in;
        self.records_in += o.records_in;
        self.confirmed += o.confirmed;
        self.routed += o.routed;
        self.offline += o.offline;
        self.unavailable += o.unavailable;
        self.refused += o.refused;
        self.stored_out += o.stored_out;
        self.rejected += o.rejected;
    }
}

/// Shard messages handled per round, before batches are sent.
const ROUND: usize = 4096;
/// Batches stay well under NATS's default 1 MiB payload limit.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// A publish that cannot even be queued in this time (the client is reconnecting with a
/// full buffer) is given up, so that the thread keeps serving the shards.
const PUBLISH_WAIT: Duration = Duration::from_millis(200);
/// Sends waiting for directory lookups beyond which more are answered at once as if the
/// lookup had failed (`unavailable`): a silent home must not grow memory without bound.
const MAX_PARKED: usize = 1 << 16;
/// Receipts wait this long to go out together: a sender's acks come a little later, and
/// NATS carries one receipt message per sender instead of one per batch.
const RECEIPT_DELAY: Duration = Duration::from_millis(5);
/// Batches leave at most this often. A message after a quiet spell leaves at once; under
/// load, what the shards hand over meanwhile waits in their channel (the thread is not even
/// woken for it) and leaves together: fewer, fuller NATS messages and fewer wake-ups on
/// every node it reaches.
const FLUSH_INTERVAL: Duration = Duration::from_millis(1);

/// What ties the cluster thread to the shards.
pub struct Wiring {
    /// The shards' side of the thread's mailbox, and `rx` its receiving end.
    pub link: Arc<ClusterLink>,
    pub rx: Receiver<ToCluster>,
    /// The shards' inboxes, for deliveries and acks.
    pub mesh: Arc<Mesh>,
    /// Says when to leave the cluster; `stop_index` is this thread's doorbell in it.
    pub stop: Arc<Shutdown>,
    pub stop_index: usize,
    /// With a shared store: the store thread (stored messages from other nodes go to it
    /// to be put in order), and the push webhook's queue.
    pub store: Option<Arc<StoreLink>>,
    pub push: Option<PushQueue>,
    /// Where the thread's totals are left once a second, for `/metrics`.
    pub board: Arc<Board>,
}

/// Starts the cluster thread.
pub fn spawn(config: ClusterConfig, wiring: Wiring) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("cluster".into()).spawn(move || {
        if let Some(cpu) = config.cpu {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                tracing::warn!("cluster: cannot pin to CPU {cpu}; running unpinned");
            }
        }
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::warn!("cluster: cannot start the NATS runtime: {e}; this node serves local traffic only");
                return;
            }
        };
        runtime.block_on(run(config, wiring));
    })
}

/// The cluster thread's links: its own mailbox, the shards', the store thread's and the
/// push queue.
type Links = (Arc<ClusterLink>, Arc<Mesh>, Option<Arc<StoreLink>>, Option<PushQueue>);

/// A cross-node send waiting for receipts.
struct PendingAck {
    to: AckTo,
    room: bool,
    /// The nodes it went to are the directory's final word (else "none has it" is not
    /// `offline`: the view was changing).
    final_nodes: bool,
    remaining: usize,
    delivered: bool,
    failed: bool,
    refused: bool,
    answered: bool,
}

/// A batch sent and not yet acknowledged.
struct SentBatch {
    at: Instant,
    /// `(record index, pending ack)` of the records that carry an ack.
    acks: Vec<(u32, usize)>,
}

/// A batch being filled for one node.
struct OutBatch {
    seq: u64,
    writer: BatchWriter,
    acks: Vec<(u32, usize)>,
}

/// What one destination node said of one record.
enum Answer {
    Delivered,
    Absent,
    /// It could not take it (overloaded shards, shutting down).
    Refused,
    /// No receipt (NATS down, timed out).
    Failed,
}

/// What the directory could say of a send's destinations.
#[derive(Clone, Copy)]
struct Answers {
    /// It could say for each of its keys (else: NATS is away, or a home cannot answer).
    known: bool,
    /// Each answer was final (see `HomeDirectory::is_final`).
    final_nodes: bool,
    /// A stored message's push user is connected to another node.
    push_user_elsewhere: bool,
}

impl Answers {
    const UNKNOWN: Answers = Answers {
        known: false,
        final_nodes: false,
        push_user_elsewhere: false,
    };
}

/// A send for other nodes, kept whole while it waits for a directory lookup.
enum Outgoing {
    /// To a user's (`Direct`) or a room's (`Room`) connections on other nodes; with
    /// `ack`, the sender is answered.
    Relay {
        kind: RecordKind,
        name: Arc<str>,
        frame: Bytes,
        ingress: Instant,
        ack: Option<AckTo>,
    },
    /// A stored message, for its conversation's audience on other nodes; with `push`, the
    /// recipient has no connection on the storing node.
    Stored {
        conv: ConvId,
        at: StoredAt,
        frame: Bytes,
        ingress: Instant,
        push: Option<PushEvent>,
    },
}

impl Outgoing {
    /// The users or room whose nodes it goes to (one or two).
    fn keys(&self) -> [Option<DirKey>; 2] {
        match self {
            Outgoing::Relay {
                kind: RecordKind::Room,
                name,
                ..
            } => [Some(DirKey::room(name.clone())), None],
            Outgoing::Relay { name, .. } => [Some(DirKey::user(name.clone())), None],
            Outgoing::Stored { conv, .. } => match (conv.direct_users(), conv.room_name()) {
                (Some((a, b)), _) => [Some(DirKey::user(a)), Some(DirKey::user(b))],
                (None, Some(room)) => [Some(DirKey::room(room)), None],
                (None, None) => [None, None],
            },
        }
    }
}

struct Node {
    config: ClusterConfig,
    /// The process is stopping: from that instant deliveries are refused, even before
    /// this thread's own turn to leave comes.
    stop: Arc<Shutdown>,
    client: Client,
    link: Arc<ClusterLink>,
    mesh: Arc<Mesh>,
    store: Option<Arc<StoreLink>>,
    push: Option<PushQueue>,
    directory: HomeDirectory,
    /// Sends waiting for a lookup, in the order they came, by the key looked up; and how
    /// many in all.
    parked: HashMap<DirKey, VecDeque<Outgoing>>,
    parked_count: usize,
    connected: bool,
    /// When the current NATS connection came up.
    connected_at: Option<Instant>,
    /// The node count last said "settled" with (since the connection came up).
    said_settled: Option<usize>,
    leaving: bool,
    next_seq: u64,
    filling: HashMap<NodeId, OutBatch>,
    /// Batches complete before the end of the round.
    sealed: Vec<(NodeId, OutBatch)>,
    sent: HashMap<u64, SentBatch>,
    acks: slab::Slab<PendingAck>,
    /// Shards sent to this round (doorbells to ring).
    to_ring: ShardMask,
    /// Receipts to send, by the node whose batches they confirm.
    receipts: HashMap<NodeId, ReceiptWriter>,
    receipts_due: Option<tokio::time::Instant>,
    traffic: Traffic,
    /// The totals up to the last traffic line (`traffic` holds what came since).
    reported: Traffic,
    board: Option<Arc<Board>>,
    last_publish: Instant,
    /// The destination nodes of the message at hand (kept for its capacity).
    destinations: Vec<NodeId>,
    /// When the last `cluster:` traffic line and heartbeat went out.
    last_report: Instant,
    last_heartbeat: Instant,
    /// The last batch seq taken from each sender: each node numbers its batches upwards
    /// and NATS keeps one publisher's order, so an older or equal seq is a replay.
    last_batch: HashMap<NodeId, u64>,
    /// Rejected messages since start (the traffic line shows them per interval).
    rejected_total: u64,
}

/// The NATS client and the two subscriptions, once connected (NATS reconnects by itself
/// after that); `None` when this node cannot use NATS at all.
async fn connect(
    config: &ClusterConfig,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> Option<(Client, async_nats::Subscriber, async_nats::Subscriber)> {
    let options = match config.access.apply(ConnectOptions::new()) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("cluster: cannot use the NATS credentials: {e}; this node serves local traffic only");
            return None;
        }
    };
    let connect = options
        .name(format!("shardgate-{:016x}", config.node))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // We never need our own presence broadcasts back.
        .no_echo()
        .ping_interval(Duration::from_secs(2))
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempt| Duration::from_millis((attempt as u64 * 100).min(1000)))
        .event_callback(move |event| {
            let tx = events.clone();
            async move {
                let _ = tx.send(event);
            }
        })
        .connect(config.url.as_str())
        .await;
    let client = match connect {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "cluster: cannot use NATS at {}: {e}; this node serves local traffic only",
                redact_url(&config.url)
            );
            return None;
        }
    };
    let (p, me) = (&config.prefix, config.node);
    let subscribed = async {
        let presence = client.subscribe(format!("{p}.presence")).await?;
        let own = client.subscribe(format!("{p}.node.{me:016x}.>")).await?;
        Ok::<_, async_nats::SubscribeError>((presence, own))
    };
    match subscribed.await {
        Ok((presence, own)) => {
            tracing::info!(
                "cluster: node {me:016x}, NATS {} (subjects {p}.presence, {p}.node.{me:016x}.>); presence timeout {:?}",
                redact_url(&config.url),
                config.presence_timeout
            );
            Some((client, presence, own))
        }
        Err(e) => {
            tracing::warn!("cluster: cannot subscribe: {e}; this node serves local traffic only");
            None
        }
    }
}

async fn run(config: ClusterConfig, wiring: Wiring) {
    let Wiring {
        link,
        rx,
        mesh,
        stop,
        stop_index,
        store,
        push,
        board,
    } = wiring;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let Some((client, mut presence_sub, mut own_sub)) = connect(&config, events_tx).await else {
        return;
    };
    let mut node = Node::new(config, client, (link.clone(), mesh, store, push), stop.clone());
    node.board = Some(board);
    let mut batch = Vec::with_capacity(ROUND);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_flush = Instant::now() - FLUSH_INTERVAL;
    loop {
        // Batches waiting for the next flush: the shards' channel is left alone till then.
        let flush_due = node
            .has_batches()
            .then(|| tokio::time::Instant::from_std(last_flush + FLUSH_INTERVAL));
        tokio::select! {
            more = link.next_batch(&rx, &mut batch, ROUND), if flush_due.is_none() => {
                if !more {
                    break;
                }
                for msg in batch.drain(..) {
                    node.on_shard_msg(msg);
                }
            }
            _ = sleep_until(flush_due) => {
                for msg in rx.try_iter() {
                    node.on_shard_msg(msg);
                }
            }
            Some(msg) = presence_sub.next() => node.on_presence(msg),
            Some(msg) = own_sub.next() => node.on_own(msg).await,
            Some(event) = events.recv() => node.on_event(event).await,
            _ = sleep_until(node.receipts_due) => node.send_receipts().await,
            _ = tick.tick() => node.on_tick(Instant::now()).await,
            _ = stop.wait(stop_index), if !node.leaving => node.leave().await,
        }
        let now = Instant::now();
        let flush = now >= last_flush + FLUSH_INTERVAL;
        if flush && node.has_batches() {
            last_flush = now;
        }
        node.end_round(flush).await;
    }
    node.finish().await;
}

/// Sleeps until `due`; never, without one.
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

impl Node {
    fn new(config: ClusterConfig, client: Client, links: Links, stop: Arc<Shutdown>) -> Node {
        let (link, mesh, store, push) = links;
        Node {
            stop,
            store,
            push,
            directory: HomeDirectory::new(
                config.node,
                config.presence_timeout,
                config.directory_cache,
                Instant::now(),
            ),
            parked: HashMap::new(),
            parked_count: 0,
            config,
            client,
            link,
            mesh,
            connected: false,
            connected_at: None,
            said_settled: None,
            leaving: false,
            next_seq: 0,
            filling: HashMap::new(),
            sealed: Vec::new(),
            sent: HashMap::new(),
            acks: slab::Slab::new(),
            to_ring: 0,
            receipts: HashMap::new(),
            receipts_due: None,
            traffic: Traffic::default(),
            reported: Traffic::default(),
            board: None,
            last_publish: Instant::now(),
            destinations: Vec::new(),
            last_report: Instant::now(),
            last_heartbeat: Instant::now(),
            last_batch: HashMap::new(),
            rejected_total: 0,
        }
    }

    /// Every 100 ms: unconfirmed batches time out, the traffic line is due, presence
    /// times out silent nodes, and our heartbeat leaves each `heartbeat`.
    async fn on_tick(&mut self, now: Instant) {
        self.expire_batches(now);
        if now.duration_since(self.last_publish) >= Duration::from_secs(1) {
            self.last_publish = now;
            self.publish_totals();
        }
        if now.duration_since(self.last_report) >= self.config.report_interval {
            let secs = now.duration_since(self.last_report).as_secs_f64();
            self.last_report = now;
            self.report(secs);
        }
        if !self.connected || self.leaving {
            return;
        }
        for node in self.directory.tick(now) {
            tracing::info!(
                "cluster: node {node:016x} not heard from for {:?}: gone from the directory",
                self.config.presence_timeout
            );
        }
        self.release_parked(now);
        let nodes = self.directory.members();
        if self.said_settled != Some(nodes) && self.settled() {
            self.said_settled = Some(nodes);
            tracing::info!("cluster: directory ready: {nodes} other node(s)");
        }
        if now.duration_since(self.last_heartbeat) >= self.config.heartbeat {
            self.last_heartbeat = now;
            let hb = wire::write_presence(&PresenceMsg::Heartbeat {
                node: self.config.node,
                // What the replicated directory used: nothing reads it now.
                seq: 0,
                users: u32::try_from(self.directory.local_len()).unwrap_or(u32::MAX),
            });
            self.publish(format!("{}.presence", self.config.prefix), hb).await;
        }
    }

    /// The shards are stopping: say bye, so that the other nodes forget us at once.
    async fn leave(&mut self) {
        self.leaving = true;
        self.release_all_parked(Instant::now());
        let me = self.config.node;
        if self.connected {
            let bye = wire::write_presence(&PresenceMsg::Bye { node: me });
            self.publish(format!("{}.presence", self.config.prefix), bye).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
        }
        tracing::info!("cluster: node {me:016x} left the cluster");
    }

    /// The shards are gone: whatever still waits for an answer gets one.
    async fn finish(&mut self) {
        self.leaving = true;
        self.release_all_parked(Instant::now());
        self.end_round(true).await;
        self.send_receipts().await;
        self.fail_all();
        self.ring();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
    }

    /// One message from a shard.
    fn on_shard_msg(&mut self, msg: ToCluster) {
        let now = Instant::now();
        let out = match msg {
            ToCluster::Placement(Placement::User { user, shard, present }) => {
                return self.directory.local_key(DirKey::user(user), shard, present, now);
            }
            ToCluster::Placement(Placement::Room { room, shard, present }) => {
                return self.directory.local_key(DirKey::room(room), shard, present, now);
            }
            ToCluster::Direct {
                to,
                frame,
                ingress,
                ack,
            } => Outgoing::Relay {
                kind: RecordKind::Direct,
                name: to,
                frame,
                ingress,
                ack,
            },
            ToCluster::Publish {
                room,
                frame,
                ingress,
                ack,
            } => Outgoing::Relay {
                kind: RecordKind::Room,
                name: room,
                frame,
                ingress,
                ack: Some(ack),
            },
            ToCluster::Stored {
                conv,
                seq,
                after_previous,
                frame,
                ingress,
                push,
            } => Outgoing::Stored {
                conv,
                at: StoredAt { seq, after_previous },
                frame,
                ingress,
                push,
            },
        };
        self.route(out, now);
    }

    /// Sends `out` to the other nodes holding its users or room, once the directory knows
    /// them: a key being looked up parks it (and every later send for that key, so that
    /// they leave in order) until the answer comes.
    fn route(&mut self, out: Outgoing, now: Instant) {
        // The list lives in `self.destinations` between messages, for its capacity.
        let mut nodes = std::mem::take(&mut self.destinations);
        nodes.clear();
        let mut known = self.connected && !self.leaving;
        // With a push: whether its user is connected to another node.
        let push_user = match &out {
            Outgoing::Stored { push: Some(p), .. } => Some(p.user.as_str()),
            _ => None,
        };
        let mut push_user_elsewhere = false;
        let mut final_nodes = true;
        if known {
            for key in out.keys().into_iter().flatten() {
                if self.parked.contains_key(&key) {
                    self.destinations = nodes;
                    return self.park(key, out);
                }
                match self.directory.resolve(&key, now) {
                    Resolution::Nodes(held) => {
                        if push_user == Some(&*key.name) && !held.is_empty() {
                            push_user_elsewhere = true;
                        }
                        for node in held {
                            if !nodes.contains(node) {
                                nodes.push(*node);
                            }
                        }
                        final_nodes &= self.directory.is_final(&key);
                    }
                    Resolution::Pending => {
                        self.destinations = nodes;
                        return self.park(key, out);
                    }
                    Resolution::Unavailable => known = false,
                }
            }
        }
        let answers = Answers {
            known,
            final_nodes,
            push_user_elsewhere,
        };
        self.send(out, &nodes, answers);
        self.destinations = nodes;
    }

    /// Parks `out` until `key`'s lookup ends; past `MAX_PARKED`, it is sent as if the
    /// lookup had failed.
    fn park(&mut self, key: DirKey, out: Outgoing) {
        if self.parked_count >= MAX_PARKED {
            return self.send(out, &[], Answers::UNKNOWN);
        }
        self.parked_count += 1;
        self.parked.entry(key).or_default().push_back(out);
    }

    /// Lookups ended: what waited for them is routed, in the order it came.
    fn release_parked(&mut self, now: Instant) {
        for key in self.directory.take_resolved() {
            let Some(waiting) = self.parked.remove(&key) else {
                continue;
            };
            self.parked_count -= waiting.len();
            for out in waiting {
                self.route(out, now);
            }
        }
    }

    /// Every parked send is answered now (NATS is gone, or this node is leaving).
    fn release_all_parked(&mut self, now: Instant) {
        let parked: Vec<VecDeque<Outgoing>> = self.parked.drain().map(|(_, q)| q).collect();
        self.parked_count = 0;
        for out in parked.into_iter().flatten() {
            self.route(out, now);
        }
    }

    /// Adds `out` to the batches of `nodes` (every other node holding its users or room,
    /// with what the directory could say of them).
    ///
    /// A relay's ack comes once those nodes confirmed; when none holds it, at once: `offline`
    /// (a room: `routed`) only if the directory is settled, else `unavailable` (as when
    /// NATS is down). A stored message's push (its recipient has no connection on this
    /// node) goes out unless another node is known to hold the recipient: one push per
    /// message, from the node that stored it; when nothing is known (NATS away) it goes out
    /// (a notification too many rather than one missed).
    fn send(&mut self, out: Outgoing, nodes: &[NodeId], answers: Answers) {
        let Answers {
            known,
            final_nodes,
            push_user_elsewhere,
        } = answers;
        match out {
            Outgoing::Relay {
                kind,
                name,
                frame,
                ingress,
                ack,
            } => {
                if nodes.is_empty() {
                    if let Some(ack) = ack {
                        let none = if kind == RecordKind::Room {
                            Outcome::Routed
                        } else {
                            Outcome::Offline
                        };
                        let settled = known && final_nodes && self.settled();
                        self.answer(ack, if settled { none } else { Outcome::Unavailable });
                    }
                    return;
                }
                let room = kind == RecordKind::Room;
                let pending = ack.map(|to| self.pending(to, room, final_nodes, nodes.len()));
                self.add(nodes, kind, &name, None, &frame, ingress, pending);
            }
            Outgoing::Stored {
                conv,
                at,
                frame,
                ingress,
                push,
            } => {
                if let (Some(event), Some(queue)) = (push, &self.push) {
                    if !push_user_elsewhere {
                        queue.offer(event);
                    }
                }
                if self.connected && !self.leaving && !nodes.is_empty() {
                    self.traffic.stored_out += 1;
                    self.add(
                        nodes,
                        RecordKind::Stored,
                        conv.as_str(),
                        Some(at),
                        &frame,
                        ingress,
                        None,
                    );
                }
            }
        }
    }

    /// Is the directory complete? Every live node heartbeats each interval, so two
    /// intervals after connecting we have heard of all of them, and the view takes them in
    /// within `VIEW_MAX_WAIT`; then every node must have synced with it.
    fn settled(&self) -> bool {
        let heard_all = self.connected_at.is_some_and(|t| {
            t.elapsed() >= self.config.heartbeat * 2 + directory::VIEW_MAX_WAIT + Duration::from_millis(100)
        });
        heard_all && self.directory.is_settled()
    }

    fn pending(&mut self, to: AckTo, room: bool, final_nodes: bool, remaining: usize) -> usize {
        self.acks.insert(PendingAck {
            to,
            room,
            final_nodes,
            remaining,
            delivered: false,
            failed: false,
            refused: false,
            answered: false,
        })
    }

    /// Adds one record to the batch of each node in `nodes` (`stored`: a stored message's
    /// position).
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        nodes: &[NodeId],
        kind: RecordKind,
        name: &str,
        stored: Option<StoredAt>,
        frame: &Bytes,
        ingress: Instant,
        pending: Option<usize>,
    ) {
        let ingress_ns = instant_to_unix_nanos(ingress, Instant::now(), unix_nanos());
        for &node in nodes {
            let me = self.config.node;
            let full = self
                .filling
                .get(&node)
                .is_some_and(|b| b.writer.records > 0 && b.writer.len_with(name.len(), frame.len()) > MAX_BATCH_BYTES);
            if full {
                // Sent at the end of the round with the rest; start another for this node.
                if let Some(batch) = self.filling.remove(&node) {
                    self.seal(node, batch);
                }
            }
            let seq = &mut self.next_seq;
            let batch = self.filling.entry(node).or_insert_with(|| {
                *seq += 1;
                OutBatch {
                    seq: *seq,
                    writer: BatchWriter::new(me, *seq),
                    acks: Vec::new(),
                }
            });
            let index = batch.writer.push(kind, ingress_ns, name, stored, frame);
            if let Some(p) = pending {
                batch.acks.push((index, p));
            }
        }
    }

    /// Batches sealed before the end of the round (a full one), to send with the others.
    fn seal(&mut self, node: NodeId, batch: OutBatch) {
        self.sealed.push((node, batch));
    }

    fn has_batches(&self) -> bool {
        !self.filling.is_empty() || !self.sealed.is_empty()
    }

    /// The end of a round: the directory's messages go out, batches too if `flush`,
    /// doorbells ring.
    async fn end_round(&mut self, flush: bool) {
        let outbox = self.directory.take_outbox();
        // While NATS is away they are dropped: every node this one hears again is a change
        // of view, and the directory sends what it must then.
        if self.connected && !self.leaving {
            for (node, body) in outbox {
                let subject = format!("{}.node.{node:016x}.dir", self.config.prefix);
                self.publish(subject, body).await;
            }
        }
        for (user, remote) in self.directory.take_remote_flags() {
            for shard in 0..self.mesh.shards() {
                self.mesh.push(
                    shard,
                    ShardMsg::AlsoRemote {
                        user: user.clone(),
                        remote,
                    },
                );
                self.to_ring |= 1 << shard;
            }
        }
        if !flush {
            self.ring();
            return;
        }
        let filling: Vec<(NodeId, OutBatch)> = self.filling.drain().collect();
        self.sealed.extend(filling);
        let sealed = std::mem::take(&mut self.sealed);
        for (node, batch) in sealed {
            let p = &self.config.prefix;
            let subject = format!("{p}.node.{node:016x}.inbox");
            self.traffic.batches_out += 1;
            self.traffic.records_out += batch.writer.records as u64;
            let ok = self.publish(subject, batch.writer.buf).await;
            let sent = SentBatch {
                at: Instant::now(),
                acks: batch.acks,
            };
            if ok {
                self.sent.insert(batch.seq, sent);
            } else {
                for (_, p) in sent.acks {
                    self.resolve(p, Answer::Failed);
                }
            }
        }
        self.ring();
    }

    /// Seals and publishes, unless NATS is away; false when the message was not handed to
    /// the client.
    async fn publish(&mut self, subject: String, body: impl Into<Vec<u8>>) -> bool {
        if !self.connected {
            return false;
        }
        let sealed = self.config.key.seal(&subject, body.into(), unix_nanos());
        let publish = self.client.publish(subject, sealed);
        matches!(tokio::time::timeout(PUBLISH_WAIT, publish).await, Ok(Ok(())))
    }

    /// Sends the gathered receipts, one message per sender.
    async fn send_receipts(&mut self) {
        self.receipts_due = None;
        let receipts: Vec<(NodeId, ReceiptWriter)> = self.receipts.drain().collect();
        for (node, receipt) in receipts {
            let subject = format!("{}.node.{node:016x}.receipts", self.config.prefix);
            // A receipt lost here times the sender's acks out as `unavailable`: still an answer.
            self.publish(subject, receipt.buf).await;
        }
    }

    /// The body of a message, if it is sealed with the cluster key and recent; else it
    /// is counted and dropped.
    fn open(&mut self, msg: Message) -> Option<(async_nats::Subject, Bytes)> {
        match self.config.key.open(msg.subject.as_str(), msg.payload, unix_nanos()) {
            Ok(body) => Some((msg.subject, body)),
            Err(e) => {
                self.reject(msg.subject.as_str(), e);
                None
            }
        }
    }

    /// Counts a message dropped unread; the first of each report interval is also logged
    /// (an attacker must not be able to flood the log).
    fn reject(&mut self, subject: &str, why: wire::WireError) {
        self.traffic.rejected += 1;
        self.rejected_total += 1;
        if self.traffic.rejected == 1 {
            tracing::warn!(
                "cluster: rejected a message on {subject}: {} (more this interval are only counted)",
                why.0
            );
        }
    }

    /// A message on the presence subject: who is in the cluster.
    fn on_presence(&mut self, msg: Message) {
        if self.leaving {
            return;
        }
        let Some((subject, body)) = self.open(msg) else { return };
        let now = Instant::now();
        match wire::read_presence(body) {
            Ok(PresenceMsg::Heartbeat { node, .. } | PresenceMsg::Hello { node }) => {
                if self.directory.heard(node, now) {
                    tracing::info!("cluster: node {node:016x} joined");
                }
            }
            Ok(PresenceMsg::Bye { node }) => {
                if self.directory.left(node, now) {
                    tracing::info!("cluster: node {node:016x} left");
                }
            }
            Err(e) => self.reject(subject.as_str(), e),
        }
    }

    /// A message on one of our own subjects.
    async fn on_own(&mut self, msg: Message) {
        let own = format!("{}.node.{:016x}.", self.config.prefix, self.config.node);
        let Some((subject, body)) = self.open(msg) else { return };
        let Some(rest) = subject.as_str().strip_prefix(own.as_str()) else {
            return;
        };
        if rest == "inbox" {
            self.deliver(&subject, body).await;
        } else if rest == "receipts" {
            let receipts = match wire::read_receipts(body) {
                Ok(r) => r,
                Err(e) => return self.reject(&subject, e),
            };
            for receipt in receipts {
                let Some(batch) = self.sent.remove(&receipt.seq) else {
                    continue; // Answered already (timed out).
                };
                self.traffic.confirmed += 1;
                for (index, p) in batch.acks {
                    let r = if receipt.absent.contains(&index) {
                        Answer::Absent
                    } else if receipt.refused.contains(&index) {
                        Answer::Refused
                    } else {
                        Answer::Delivered
                    };
                    self.resolve(p, r);
                }
            }
        } else if rest == "dir" {
            if self.leaving {
                return;
            }
            match directory::wire::read_dir(body) {
                Ok((from, msgs)) => {
                    let now = Instant::now();
                    self.directory.on_messages(from, msgs, now);
                    self.release_parked(now);
                }
                Err(e) => self.reject(&subject, e),
            }
        }
    }

    /// A batch from another node: hand each record to the shards holding its recipients,
    /// then note its receipt.
    async fn deliver(&mut self, subject: &str, body: Bytes) {
        let (sender, seq, records) = match wire::read_batch(body) {
            Ok(b) => b,
            Err(e) => return self.reject(subject, e),
        };
        let last = self.last_batch.entry(sender).or_insert(0);
        if seq <= *last {
            return self.reject(subject, wire::WireError("a batch seen before (replayed)"));
        }
        *last = seq;
        self.traffic.batches_in += 1;
        self.traffic.records_in += records.len() as u64;
        let now = (Instant::now(), unix_nanos());
        let accepting = !self.leaving && !self.stop.is_requested();
        let to = (&*self.mesh, self.store.as_deref());
        let (receipt, rung) = super::inbound::hand_over(seq, records, &mut self.directory, to, accepting, now);
        self.to_ring |= rung;
        self.receipts.entry(sender).or_default().push(&receipt);
        if self.receipts_due.is_none() {
            self.receipts_due = Some(tokio::time::Instant::now() + RECEIPT_DELAY);
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                self.connected = true;
                self.connected_at = Some(Instant::now());
                self.said_settled = None;
                self.link.set_up(true);
                tracing::info!("cluster: connected to NATS at {}", redact_url(&self.config.url));
                if !self.leaving {
                    // New or back: everyone sends us their state, and learns of us.
                    let hello = wire::write_presence(&PresenceMsg::Hello { node: self.config.node });
                    self.publish(format!("{}.presence", self.config.prefix), hello).await;
                }
            }
            Event::Disconnected => {
                self.connected = false;
                self.connected_at = None;
                self.link.set_up(false);
                // What we knew of other nodes goes stale while we cannot hear them.
                let now = Instant::now();
                self.directory.forget_all(now);
                self.release_all_parked(now);
                let waiting = self.sent.len();
                self.fail_all();
                tracing::warn!(
                    "cluster: lost NATS at {}; cross-node sends are answered 'unavailable' until it is back ({waiting} batch(es) unconfirmed)",
                    redact_url(&self.config.url)
                );
            }
            Event::SlowConsumer(sid) => {
                tracing::warn!("cluster: NATS dropped messages for this node (slow consumer, subscription {sid})");
            }
            // A refused password or certificate shows here, on every attempt.
            Event::ServerError(_) | Event::ClientError(_) => tracing::warn!("cluster: NATS {event}"),
            other => tracing::info!("cluster: NATS {other}"),
        }
    }

    /// Answers `unavailable` to batches not confirmed within the ack timeout.
    fn expire_batches(&mut self, now: Instant) {
        let timeout = self.config.ack_timeout;
        let late: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, b)| now.saturating_duration_since(b.at) > timeout)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in late {
            if let Some(batch) = self.sent.remove(&seq) {
                for (_, p) in batch.acks {
                    self.resolve(p, Answer::Failed);
                }
            }
        }
    }

    fn fail_all(&mut self) {
        let sent: Vec<SentBatch> = self.sent.drain().map(|(_, b)| b).collect();
        for batch in sent {
            for (_, p) in batch.acks {
                self.resolve(p, Answer::Failed);
            }
        }
    }

    /// One destination node's answer for a pending send.
    fn resolve(&mut self, key: usize, receipt: Answer) {
        let Some(p) = self.acks.get_mut(key) else {
            return;
        };
        p.remaining = p.remaining.saturating_sub(1);
        match receipt {
            Answer::Delivered => p.delivered = true,
            Answer::Absent => {}
            Answer::Failed => p.failed = true,
            Answer::Refused => p.refused = true,
        }
        // A direct message is routed once any device has it.
        let early = !p.room && p.delivered && !p.answered;
        if early {
            p.answered = true;
            let to = p.to.clone();
            self.answer(to, Outcome::Routed);
        }
        let Some(p) = self.acks.get(key) else { return };
        if p.remaining > 0 {
            return;
        }
        let p = self.acks.remove(key);
        if p.answered {
            return;
        }
        // `offline` only when every node said the recipient is not there; a room is
        // `routed` only when every node with members took it.
        let outcome = if p.failed {
            Outcome::Unavailable
        } else if p.refused && (p.room || !p.delivered) {
            Outcome::Refused
        } else if p.room || p.delivered {
            Outcome::Routed
        } else if p.final_nodes {
            Outcome::Offline
        } else {
            Outcome::Unavailable
        };
        self.answer(p.to, outcome);
    }

    fn answer(&mut self, to: AckTo, outcome: Outcome) {
        match outcome {
            Outcome::Routed => self.traffic.routed += 1,
            Outcome::Offline => self.traffic.offline += 1,
            Outcome::Unavailable => self.traffic.unavailable += 1,
            Outcome::Refused => self.traffic.refused += 1,
        }
        let shard = to.shard;
        self.mesh.push(
            shard,
            ShardMsg::ClusterAck {
                conn: to.conn,
                id: to.id,
                outcome,
            },
        );
        self.to_ring |= 1 << shard;
    }

    /// The `cluster:` traffic line (documented in the README).
    fn report(&mut self, secs: f64) {
        let t = std::mem::take(&mut self.traffic);
        self.reported += t;
        let per_batch = |records: u64, batches: u64| records as f64 / batches.max(1) as f64;
        let dir = self.directory.stats();
        println!(
            "cluster: nodes={} remote_users={} connected={} directory_ready={} local_keys={} unconfirmed={} homed={} cached={} lookups={} parked={} out_records_per_s={:.1} out_batches_per_s={:.1} records_per_batch={:.2} in_records_per_s={:.1} in_batches_per_s={:.1} acks_routed={} acks_offline={} acks_unavailable={} acks_refused={} stored_out_per_s={:.1} awaiting_receipts={} rejected={} rejected_total={}",
            dir.members,
            self.directory.known_remote_users(),
            self.connected,
            dir.ready,
            dir.local,
            dir.local_unconfirmed,
            dir.homed,
            dir.cached,
            dir.lookups_in_flight,
            self.parked_count,
            t.records_out as f64 / secs,
            t.batches_out as f64 / secs,
            per_batch(t.records_out, t.batches_out),
            t.records_in as f64 / secs,
            t.batches_in as f64 / secs,
            t.routed,
            t.offline,
            t.unavailable,
            t.refused,
            t.stored_out as f64 / secs,
            self.sent.len(),
            t.rejected,
            self.rejected_total,
        );
    }

    /// Leaves the totals since the start, and the view now, on the board.
    fn publish_totals(&self) {
        let Some(board) = &self.board else { return };
        let mut t = self.reported;
        t += self.traffic;
        let dir = self.directory.stats();
        board.publish_cluster(ClusterSnapshot {
            connected: self.connected,
            nodes: self.directory.members() as u64,
            remote_users: self.directory.known_remote_users() as u64,
            batches_out: t.batches_out,
            records_out: t.records_out,
            batches_in: t.batches_in,
            records_in: t.records_in,
            confirmed: t.confirmed,
            outcomes: [t.routed, t.offline, t.unavailable, t.refused],
            awaiting_receipts: self.sent.len() as u64,
            rejected: t.rejected,
            directory: DirectoryGauges {
                ready: dir.ready,
                local: dir.local as u64,
                unconfirmed: dir.local_unconfirmed as u64,
                homed: dir.homed as u64,
                cached: dir.cached as u64,
                lookups: dir.lookups_in_flight as u64,
                parked: self.parked_count as u64,
            },
        });
    }

    fn ring(&mut self) {
        for shard in crate::route::shards_in(std::mem::take(&mut self.to_ring)) {
            self.mesh.ring(shard);
        }
    }
}
