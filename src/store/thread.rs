//! The store thread: the one sequencer of a process's conversations. Shards hand it
//! messages through a crossbeam channel and a doorbell-free blocking receive (it is a
//! plain thread); it takes whatever has queued up as one group, appends the group with
//! one sync (the time a sync takes is what gathers the next group), then for each message
//! encodes the frame once and hands it to every shard holding a connection of its
//! audience, acks the sender `stored`, and queues a push for a recipient with no
//! connection. Reads (history, the conversations in `ready`) are answered between groups,
//! from what is committed.
//!
//! Ordering: one thread pushes every stored message into the shards' FIFO inboxes, so a
//! conversation's messages reach each connection in `seq` order. The thread learns where
//! users and rooms are from the same shards that later ask it for history, through the
//! same FIFO channel: a connection that asked is in the audience of every later group.
//!
//! In a cluster (a shared store and `--nats`), other nodes append to the same
//! conversations: the thread hands each message it stored to the cluster thread for the
//! audience on other nodes, receives theirs from it, and passes both through one
//! `Sequencer`, which restores `seq` order and fills from the store the gaps that stay
//! open (a node that died between storing and publishing).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use hdrhistogram::Histogram;

use super::push::{PushEvent, PushQueue};
use super::sequencer::{Arrival, Sequencer};
use super::{Appended, ConvId, MessageStore, NewMessage, Page, Range};
use crate::chat::protocol::{self, AppError, ErrorCode, HistoryEnd};
use crate::cluster::{ClusterLink, ToCluster};
use crate::mailbox::Mailbox;
use crate::metrics::board::{Board, Buckets, StoreSnapshot};
use crate::metrics::counters::ERROR_CODES;
use crate::route::inbox::Mesh;
use crate::route::{shards_in, AckTo, Audience, ConnId, Placement, ShardMask, ShardMsg};
use crate::ws::frame::text_frame;

/// Requests waiting for the store thread beyond which shards refuse sends (answered
/// `rate_limited`): a stalled disk cannot grow memory without bound.
pub const STORE_QUEUE_LIMIT: usize = 1 << 18;
/// The most messages committed with one sync.
const MAX_GROUP: usize = 4096;
/// Conversations the retention sweep looks at between two groups.
const SWEEP_BUDGET: usize = 64;
/// Reads (`ready`, history pages) answered between two groups.
const READS_PER_GROUP: usize = 32;
/// The most messages of one gap read back from the store; beyond, they are skipped (the
/// clients catch up with `history`).
const MAX_GAP_FILL: u64 = 1000;
/// A conversation with no message for this long is forgotten by the sequencer, and past
/// this many the least recently active are (about 200 bytes each).
const SEQUENCER_IDLE: Duration = Duration::from_secs(600);
const SEQUENCER_MAX: usize = 1 << 20;

/// What a shard asks of the store thread.
#[derive(Debug)]
pub enum ToStore {
    Append(Box<AppendRequest>),
    /// A history page for the connection `reply`.
    Read {
        conv: ConvId,
        range: Range,
        limit: usize,
        reply: AckTo,
    },
    /// The connection `reply` of `user` is reachable: answer `ready`, with where the user's
    /// recent conversations stand.
    Ready {
        user: Arc<str>,
        reply: AckTo,
    },
    /// `user` joined `room` (it is one of their conversations now); with `since`, send the
    /// room's messages after it.
    Joined {
        user: Arc<str>,
        room: Arc<str>,
        since: Option<u64>,
        reply: AckTo,
    },
    Placement(Placement),
    /// From the cluster thread: a message another node stored, for this node's share of
    /// its conversation's audience.
    Remote {
        conv: ConvId,
        seq: u64,
        /// How long after the message before it the store stored it (see `append_timed`).
        after_previous: Option<Duration>,
        frame: Bytes,
        ingress: Instant,
    },
    /// Every shard has stopped: commit what is queued and end.
    Stop,
}

/// A message to store, and where it goes once stored.
#[derive(Debug)]
pub struct AppendRequest {
    pub message: NewMessage,
    pub audience: Audience,
    pub ingress: Instant,
    /// The sending connection: it gets the ack, and not the message.
    pub shard: usize,
    pub conn: ConnId,
}

/// The shards' side of the store thread.
pub struct StoreLink {
    mailbox: Arc<Mailbox<ToStore>>,
}

impl StoreLink {
    pub fn new() -> (Arc<StoreLink>, Receiver<ToStore>) {
        let (mailbox, rx) = Mailbox::new();
        (Arc::new(StoreLink { mailbox }), rx)
    }

    /// Never blocks; the store thread wakes on the channel itself.
    pub fn push(&self, msg: ToStore) {
        self.mailbox.push(msg);
    }

    /// Would one more request exceed the queue limit?
    pub fn is_full(&self) -> bool {
        self.mailbox.len() >= STORE_QUEUE_LIMIT
    }

    /// Tells the store thread to end once it has handled what is queued. (The shards'
    /// tasks may outlive their executors without dropping their links, so the thread
    /// cannot wait for the channel to disconnect.)
    pub fn stop(&self) {
        self.mailbox.push(ToStore::Stop);
    }
}

pub struct StoreThreadConfig {
    pub report_interval: Duration,
    /// How often retention sweeps every conversation.
    pub sweep_interval: Duration,
    /// Conversations listed in `ready`.
    pub ready_conversations: usize,
    /// A history page stops short of this many bytes (a connection's queue must hold it).
    pub max_page_bytes: usize,
    /// Bytes of a message body a push carries (0: none).
    pub push_preview_bytes: usize,
    /// In a cluster, how long a message that arrived before the ones it follows waits for
    /// them before the gap is read from the store.
    pub reorder_hold: Duration,
}

/// How often the thread's totals go to the board.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Where the store thread's work goes: the shards, the push webhook, the cluster thread.
pub struct StoreOutputs {
    pub mesh: Arc<Mesh>,
    pub push: Option<PushQueue>,
    pub cluster: Option<Arc<ClusterLink>>,
    /// Where the thread's totals are left once a second, for `/metrics`.
    pub board: Arc<Board>,
}

/// Starts the store thread. It ends at `StoreLink::stop`, once what was queued before is
/// handled.
pub fn spawn<S: MessageStore + Send + 'static>(
    store: S,
    config: StoreThreadConfig,
    rx: Receiver<ToStore>,
    outputs: StoreOutputs,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("store".into()).spawn(move || {
        let StoreOutputs {
            mesh,
            push,
            cluster,
            board,
        } = outputs;
        let sequencer = cluster.as_ref().map(|_| Sequencer::new(config.reorder_hold));
        let mut thread = StoreThread {
            store,
            mesh,
            cluster,
            sequencer,
            ring_cluster: false,
            passing: Vec::new(),
            config,
            push,
            users: HashMap::new(),
            rooms: HashMap::new(),
            to_ring: 0,
            json: Vec::with_capacity(64 << 10),
            stats: Stats::default(),
            reported: StoreSnapshot::default(),
            board,
            failing: false,
            reads: VecDeque::new(),
        };
        thread.run(rx);
    })
}

#[derive(Debug)]
struct Stats {
    appended: u64,
    groups: u64,
    duplicates: u64,
    unavailable: u64,
    reads: u64,
    trimmed: u64,
    /// Messages other nodes stored, received for this node's connections.
    from_nodes: u64,
    /// Messages that arrived before one they follow (held), or after where their
    /// conversation started on this node (passed on out of order).
    held: u64,
    late: u64,
    /// Messages read back from the store to fill a gap, and seqs no one could supply.
    gap_filled: u64,
    gap_skipped: u64,
    /// Error frames sent, by code (`metrics::counters::ERROR_CODES`).
    errors: [u64; ERROR_CODES.len()],
    /// Microseconds from a group's start to its sync's end.
    commit_us: Histogram<u64>,
    /// Microseconds from a message's read to its sync's end (the queue included).
    durable_us: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            appended: 0,
            groups: 0,
            duplicates: 0,
            unavailable: 0,
            reads: 0,
            trimmed: 0,
            from_nodes: 0,
            held: 0,
            late: 0,
            gap_filled: 0,
            gap_skipped: 0,
            errors: [0; ERROR_CODES.len()],
            commit_us: Histogram::new_with_bounds(1, 60_000_000, 2).expect("static histogram bounds"),
            durable_us: Histogram::new_with_bounds(1, 60_000_000, 2).expect("static histogram bounds"),
        }
    }
}

/// A stored message on its way to this node's connections of its audience.
struct Delivery {
    audience: Audience,
    frame: Bytes,
    ingress: Instant,
    /// The connection that sent it (it gets the ack instead); none for another node's.
    except: (usize, ConnId),
    /// Another node stored it.
    cross_node: bool,
}

struct StoreThread<S> {
    store: S,
    mesh: Arc<Mesh>,
    /// In a cluster: the cluster thread, and the order of conversations that several
    /// nodes append to.
    cluster: Option<Arc<ClusterLink>>,
    sequencer: Option<Sequencer<Delivery>>,
    ring_cluster: bool,
    /// What the sequencer lets through, reused.
    passing: Vec<(u64, Delivery)>,
    config: StoreThreadConfig,
    push: Option<PushQueue>,
    /// Shards holding connections of each user, and of each room's members.
    users: HashMap<Arc<str>, ShardMask>,
    rooms: HashMap<Arc<str>, ShardMask>,
    /// Shards sent to since their doorbells last rang.
    to_ring: ShardMask,
    json: Vec<u8>,
    stats: Stats,
    /// The totals up to the last report (`stats` holds what came since).
    reported: StoreSnapshot,
    board: Arc<Board>,
    /// The last group could not be written (said once, until one can).
    failing: bool,
    /// Reads waiting for their turn between groups, in the order they came.
    reads: VecDeque<ToStore>,
}

fn now_ms() -> u64 {
    crate::cluster::unix_nanos() / 1_000_000
}

impl<S: MessageStore> StoreThread<S> {
    fn run(&mut self, rx: Receiver<ToStore>) {
        let mut batch: Vec<ToStore> = Vec::with_capacity(MAX_GROUP);
        let mut next_report = Instant::now() + self.config.report_interval;
        let mut next_publish = Instant::now() + PUBLISH_INTERVAL;
        let mut next_sweep = Instant::now();
        let mut sweeping = false;
        loop {
            let now = Instant::now();
            if !sweeping && now >= next_sweep {
                sweeping = true;
                next_sweep = now + self.config.sweep_interval;
            }
            // While reads wait or a sweep is under way, they go on between groups; else
            // sleep until work.
            let wait = if sweeping || !self.reads.is_empty() {
                Duration::ZERO
            } else {
                let gap_due = self.sequencer.as_ref().and_then(Sequencer::next_due);
                let next = next_report.min(next_sweep).min(next_publish);
                gap_due.map_or(next, |due| next.min(due)).saturating_duration_since(now)
            };
            match rx.recv_timeout(wait) {
                Ok(msg) => batch.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            batch.extend(rx.try_iter().take(MAX_GROUP - batch.len()));
            let stop = batch.iter().any(|m| matches!(m, ToStore::Stop));
            if !batch.is_empty() || !self.reads.is_empty() {
                self.handle(&mut batch);
            }
            if stop {
                while let Some(read) = self.reads.pop_front() {
                    self.answer(read);
                }
                break;
            }
            if sweeping {
                sweeping = !self.sweep_step();
            }
            self.fill_gaps();
            self.ring();
            if Instant::now() >= next_publish {
                self.board.publish_store(self.totals());
                next_publish = Instant::now() + PUBLISH_INTERVAL;
            }
            if Instant::now() >= next_report {
                self.report();
                next_report += self.config.report_interval;
                if let Some(sequencer) = &mut self.sequencer {
                    sequencer.forget_idle(Instant::now(), SEQUENCER_IDLE, SEQUENCER_MAX);
                }
            }
        }
    }

    /// One batch from the shards: placements and reads in order, the appends as one group
    /// at the end (reads see what was committed before it).
    fn handle(&mut self, batch: &mut Vec<ToStore>) {
        let mut messages = Vec::new();
        let mut routes = Vec::new();
        for msg in batch.drain(..) {
            match msg {
                ToStore::Append(request) => {
                    let AppendRequest {
                        message,
                        audience,
                        ingress,
                        shard,
                        conn,
                    } = *request;
                    messages.push(message);
                    routes.push((audience, ingress, shard, conn));
                }
                ToStore::Placement(change) => self.place(change),
                ToStore::Remote {
                    conv,
                    seq,
                    after_previous,
                    frame,
                    ingress,
                } => {
                    self.stats.from_nodes += 1;
                    let audience = audience_of(&conv);
                    let except = (usize::MAX, 0);
                    self.pass_on(
                        &conv,
                        seq,
                        after_previous,
                        Delivery {
                            audience,
                            frame,
                            ingress,
                            except,
                            cross_node: true,
                        },
                    );
                }
                ToStore::Stop => {}
                read => self.reads.push_back(read),
            }
        }
        if !messages.is_empty() {
            self.commit(&messages, routes);
        }
        // Reads after the group, and a bounded number per group: a reconnect storm's
        // thousands of `ready`s must not hold the messages behind them. (A read answered
        // after later groups sees them; a `ready`'s connection skips the stored messages
        // that reach it first, which its heads include.)
        for _ in 0..READS_PER_GROUP {
            let Some(read) = self.reads.pop_front() else { break };
            self.answer(read);
        }
        self.ring();
    }

    /// Rings the doorbells of the shards (and the cluster thread) sent to.
    fn ring(&mut self) {
        for shard in shards_in(std::mem::take(&mut self.to_ring)) {
            self.mesh.ring(shard);
        }
        if std::mem::take(&mut self.ring_cluster) {
            if let Some(cluster) = &self.cluster {
                cluster.ring();
            }
        }
    }

    fn answer(&mut self, read: ToStore) {
        match read {
            ToStore::Read {
                conv,
                range,
                limit,
                reply,
            } => self.answer_read(&conv, range, limit, &reply, true),
            ToStore::Ready { user, reply } => self.answer_ready(&user, &reply),
            ToStore::Joined {
                user,
                room,
                since,
                reply,
            } => {
                let conv = ConvId::room(&room);
                if let Err(e) = self.store.note_member(&user, &conv, now_ms()) {
                    tracing::warn!("store: cannot note that {user} joined {room}: {e}");
                }
                if let Some(since) = since {
                    let limit = protocol::HISTORY_DEFAULT_LIMIT;
                    self.answer_read(&conv, Range::After(since), limit, &reply, false);
                }
            }
            ToStore::Append(_) | ToStore::Placement(_) | ToStore::Remote { .. } | ToStore::Stop => {}
        }
    }

    fn place(&mut self, change: Placement) {
        let (map, key, shard, present) = match change {
            Placement::User { user, shard, present } => (&mut self.users, user, shard, present),
            Placement::Room { room, shard, present } => (&mut self.rooms, room, shard, present),
        };
        let mask = map.entry(key.clone()).or_insert(0);
        if present {
            *mask |= 1 << shard;
        } else {
            *mask &= !(1 << shard);
            if *mask == 0 {
                map.remove(&key);
            }
        }
    }

    fn send(&mut self, shard: usize, msg: ShardMsg) {
        self.mesh.push(shard, msg);
        self.to_ring |= 1 << shard;
    }

    /// Encodes the JSON `write` produces as a text frame.
    fn encode(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        self.json.clear();
        write(&mut self.json);
        text_frame(&self.json)
    }

    fn reply(&mut self, shard: usize, conn: ConnId, write: impl FnOnce(&mut Vec<u8>)) {
        let frame = self.encode(write);
        self.send(
            shard,
            ShardMsg::Reply {
                conn,
                frame,
                ready: false,
            },
        );
    }

    fn reply_ready(&mut self, to: &AckTo, user: &str, convs: &[(ConvId, u64)]) {
        let frame = self.encode(|json| protocol::write_ready_with_conversations(json, user, convs));
        let (conn, ready) = (to.conn, true);
        self.send(to.shard, ShardMsg::Reply { conn, frame, ready });
    }

    fn reply_error(&mut self, to: &AckTo, code: ErrorCode, message: String) {
        if let Some(n) = ERROR_CODES.iter().position(|c| *c == code.as_str()) {
            self.stats.errors[n] += 1;
        }
        let error = AppError::new(code, message).with_id_str(to.id.as_deref());
        self.reply(to.shard, to.conn, |json| protocol::write_error(json, &error));
    }

    /// Appends a group with one sync, then delivers, acks and pushes each message.
    fn commit(&mut self, messages: &[NewMessage], routes: Vec<(Audience, Instant, usize, ConnId)>) {
        let started = Instant::now();
        let result = self.store.append_timed(messages, now_ms());
        let _ = self
            .stats
            .commit_us
            .record((started.elapsed().as_micros() as u64).max(1));
        self.stats.groups += 1;
        let results = match result {
            Ok(results) => results,
            Err(e) => {
                if !self.failing {
                    tracing::warn!("store: cannot write messages: {e}; sends are answered 'unavailable' until it can");
                    self.failing = true;
                }
                self.stats.unavailable += messages.len() as u64;
                for (m, (_, _, shard, conn)) in messages.iter().zip(routes) {
                    let to = AckTo {
                        shard,
                        conn,
                        id: m.client_id.as_deref().map(Box::from),
                    };
                    self.reply_error(
                        &to,
                        ErrorCode::Unavailable,
                        "the message store cannot write now: the message was not delivered and may not be stored; retry with the same id".into(),
                    );
                }
                return;
            }
        };
        if self.failing {
            tracing::info!("store: writing messages again");
            self.failing = false;
        }
        let durable = Instant::now();
        for (_, ingress, _, _) in &routes {
            let us = durable.saturating_duration_since(*ingress).as_micros() as u64;
            let _ = self.stats.durable_us.record(us.max(1));
        }
        for ((m, (audience, ingress, shard, conn)), result) in messages.iter().zip(routes).zip(results) {
            let id = m.client_id.as_deref();
            match result {
                (Appended::New(seq), after_previous) => {
                    self.stats.appended += 1;
                    let frame = self.encode(|json| {
                        protocol::write_stored_message(json, &m.conv, seq, &m.from, id, m.ts_ms, &m.body)
                    });
                    let push = self.push_for(&audience, m, seq);
                    match &self.cluster {
                        Some(cluster) => {
                            let (conv, frame) = (m.conv.clone(), frame.clone());
                            cluster.push(ToCluster::Stored {
                                conv,
                                seq,
                                after_previous,
                                frame,
                                ingress,
                                push,
                            });
                            self.ring_cluster = true;
                        }
                        None => {
                            if let (Some(event), Some(queue)) = (push, &self.push) {
                                queue.offer(event);
                            }
                        }
                    }
                    let except = (shard, conn);
                    let delivery = Delivery {
                        audience,
                        frame,
                        ingress,
                        except,
                        cross_node: false,
                    };
                    self.pass_on(&m.conv, seq, after_previous, delivery);
                    self.reply(shard, conn, |json| protocol::write_ack_stored(json, id, &m.conv, seq));
                }
                (Appended::Duplicate { conv, seq }, _) => {
                    self.stats.duplicates += 1;
                    self.reply(shard, conn, |json| protocol::write_ack_stored(json, id, &conv, seq));
                }
            }
        }
    }

    /// Passes a stored message on to this node's connections: through the sequencer in a
    /// cluster (it may hold it for the ones before it), at once otherwise (this thread
    /// numbered it: nothing before it is missing).
    fn pass_on(&mut self, conv: &ConvId, seq: u64, after_previous: Option<Duration>, delivery: Delivery) {
        let Some(sequencer) = &mut self.sequencer else {
            return self.deliver(delivery);
        };
        let mut passing = std::mem::take(&mut self.passing);
        let follows_closely = after_previous.is_some_and(|d| d < self.config.reorder_hold);
        match sequencer.offer(conv, seq, follows_closely, delivery, Instant::now(), &mut passing) {
            Arrival::Held => self.stats.held += 1,
            Arrival::Late => self.stats.late += 1,
            Arrival::InOrder | Arrival::Duplicate => {}
        }
        for (_, delivery) in passing.drain(..) {
            self.deliver(delivery);
        }
        self.passing = passing;
    }

    /// Reads the gaps that stayed open for the reorder hold from the store, and passes on
    /// what they held back.
    fn fill_gaps(&mut self) {
        let Some(sequencer) = &self.sequencer else { return };
        let now = Instant::now();
        if sequencer.next_due().is_none_or(|due| due > now) {
            return;
        }
        for gap in sequencer.overdue(now) {
            let limit = (gap.through - gap.after).min(MAX_GAP_FILL) as usize;
            let found = match self.store.read(&gap.conv, Range::After(gap.after), limit) {
                Ok(page) => page.messages,
                Err(e) => {
                    tracing::warn!(
                        "store: cannot read {} to fill a gap: {e}; its clients catch up with history",
                        gap.conv
                    );
                    Vec::new()
                }
            };
            let (now_i, now_ns) = (Instant::now(), crate::cluster::unix_nanos());
            let mut deliveries = Vec::with_capacity(found.len());
            for m in found.into_iter().filter(|m| m.seq <= gap.through) {
                let frame = self.encode(|json| {
                    protocol::write_stored_message(
                        json,
                        &gap.conv,
                        m.seq,
                        &m.from,
                        m.client_id.as_deref(),
                        m.ts_ms,
                        &m.body,
                    )
                });
                let ingress = crate::cluster::unix_nanos_to_instant(m.ts_ms.saturating_mul(1_000_000), now_i, now_ns);
                let audience = audience_of(&gap.conv);
                deliveries.push((
                    m.seq,
                    Delivery {
                        audience,
                        frame,
                        ingress,
                        except: (usize::MAX, 0),
                        // Read back for a gap: another node stored it.
                        cross_node: true,
                    },
                ));
            }
            let mut passing = std::mem::take(&mut self.passing);
            let Some(sequencer) = &mut self.sequencer else { return };
            let filled = sequencer.fill(&gap.conv, gap.through, deliveries, now, &mut passing);
            self.stats.gap_filled += filled.from_store;
            self.stats.gap_skipped += filled.skipped;
            for (_, delivery) in passing.drain(..) {
                self.deliver(delivery);
            }
            self.passing = passing;
        }
    }

    /// Hands a stored message to every shard holding some of its audience.
    fn deliver(&mut self, delivery: Delivery) {
        let Delivery {
            audience,
            frame,
            ingress,
            except,
            cross_node,
        } = delivery;
        let mask = match &audience {
            Audience::Users(a, b) => self.users.get(a).copied().unwrap_or(0) | self.users.get(b).copied().unwrap_or(0),
            Audience::Room(room) => self.rooms.get(room).copied().unwrap_or(0),
        };
        for shard in shards_in(mask) {
            let msg = ShardMsg::Stored {
                audience: audience.clone(),
                frame: frame.clone(),
                ingress,
                except,
                cross_node,
            };
            self.send(shard, msg);
        }
    }

    /// The push for a direct message whose recipient has no connection on this node (in a
    /// cluster, the cluster thread sends it only if no other node has one either).
    fn push_for(&self, audience: &Audience, m: &NewMessage, seq: u64) -> Option<PushEvent> {
        self.push.as_ref()?;
        let Audience::Users(a, b) = audience else { return None };
        if a == b || self.users.contains_key(b) {
            return None;
        }
        let max = self.config.push_preview_bytes;
        Some(PushEvent {
            user: b.to_string(),
            conv: m.conv.as_str().to_string(),
            seq,
            from: m.from.clone(),
            ts_ms: m.ts_ms,
            preview: (max > 0).then(|| preview_of(&m.body, max)),
        })
    }

    /// A history page, cut short of `max_page_bytes`. `missing_is_error`: a conversation
    /// with nothing stored is answered `not_found` (a `history` request) rather than with
    /// an empty page (a join with `since`).
    fn answer_read(&mut self, conv: &ConvId, range: Range, limit: usize, reply: &AckTo, missing_is_error: bool) {
        self.stats.reads += 1;
        let page = match self.store.read(conv, range, limit) {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!("store: cannot read {conv}: {e}");
                let message = "the message store cannot be read now; retry".to_string();
                return self.reply_error(reply, ErrorCode::Unavailable, message);
            }
        };
        if page.head == 0 && missing_is_error {
            let message = format!("nothing is stored in {conv}");
            return self.reply_error(reply, ErrorCode::NotFound, message);
        }
        if let Range::After(since) = range {
            if since > page.head {
                let message = format!(
                    "since {since} is past the end of {conv} (its latest seq is {})",
                    page.head
                );
                return self.reply_error(reply, ErrorCode::BadField, message);
            }
        }
        let max = self.config.max_page_bytes;
        let frame = self.encode(|json| write_page(json, conv, range, &page, reply.id.as_deref(), max));
        let (conn, ready) = (reply.conn, false);
        self.send(reply.shard, ShardMsg::Reply { conn, frame, ready });
    }

    fn answer_ready(&mut self, user: &str, reply: &AckTo) {
        match self.store.conversations(user, self.config.ready_conversations) {
            Ok(convs) => self.reply_ready(reply, user, &convs),
            Err(e) => {
                tracing::warn!("store: cannot list {user}'s conversations: {e}");
                self.reply_ready(reply, user, &[]);
                let message = "your conversations cannot be listed now; ask each one's history".to_string();
                self.reply_error(reply, ErrorCode::Unavailable, message);
            }
        }
    }

    /// One slice of the retention sweep; true once it went round every conversation.
    fn sweep_step(&mut self) -> bool {
        match self.store.trim_step(now_ms(), SWEEP_BUDGET) {
            Ok(step) => {
                self.stats.trimmed += step.removed;
                step.swept_all
            }
            Err(e) => {
                tracing::warn!("store: retention sweep stopped: {e}; it starts again at the next interval");
                true
            }
        }
    }

    /// Everything since the start.
    fn totals(&self) -> StoreSnapshot {
        let mut t = self.reported.clone();
        let s = &self.stats;
        t.appended += s.appended;
        t.commits += s.groups;
        t.duplicates += s.duplicates;
        t.unavailable += s.unavailable;
        t.reads += s.reads;
        t.trimmed += s.trimmed;
        for (a, b) in t.errors.iter_mut().zip(s.errors) {
            *a += b;
        }
        t.commit_latency.add(&Buckets::of(&s.commit_us));
        t
    }

    fn report(&mut self) {
        self.reported = self.totals();
        let secs = self.config.report_interval.as_secs_f64();
        let s = &mut self.stats;
        let (sent, failed, dropped) = self.push.as_ref().map_or((0, 0, 0), PushQueue::take_counts);
        println!(
            "store: appended_per_s={:.1} groups_per_s={:.1} per_group={:.1} commit_p50_us={} commit_p99_us={} commit_max_us={} durable_p50_us={} durable_p99_us={} durable_max_us={} duplicates={} unavailable={} reads={} trimmed={} push_sent={sent} push_failed={failed} push_dropped={dropped}{}",
            s.appended as f64 / secs,
            s.groups as f64 / secs,
            if s.groups == 0 { 0.0 } else { s.appended as f64 / s.groups as f64 },
            s.commit_us.value_at_quantile(0.5),
            s.commit_us.value_at_quantile(0.99),
            s.commit_us.max(),
            s.durable_us.value_at_quantile(0.5),
            s.durable_us.value_at_quantile(0.99),
            s.durable_us.max(),
            s.duplicates,
            s.unavailable,
            s.reads,
            s.trimmed,
            match &self.sequencer {
                Some(q) => format!(
                    " from_nodes_per_s={:.1} held={} late={} gap_filled={} gap_skipped={} ordering={}",
                    s.from_nodes as f64 / secs,
                    s.held,
                    s.late,
                    s.gap_filled,
                    s.gap_skipped,
                    q.conversations()
                ),
                None => String::new(),
            },
        );
        *s = Stats::default();
    }
}

/// Who receives a conversation's messages.
fn audience_of(conv: &ConvId) -> Audience {
    match conv.direct_users() {
        Some((a, b)) => Audience::Users(a.into(), b.into()),
        None => Audience::Room(conv.room_name().unwrap_or_default().into()),
    }
}

/// A history frame's JSON: the page's messages that fit in `max_bytes`, the newest of them
/// when scrolling back, the oldest when catching up.
fn write_page(json: &mut Vec<u8>, conv: &ConvId, range: Range, page: &Page, id: Option<&str>, max_bytes: usize) {
    // What each message adds, near enough: its body, sender and id, and the fixed fields.
    let cost = |m: &super::Stored| m.body.len() + m.from.len() + m.client_id.as_ref().map_or(0, String::len) + 160;
    let mut budget = max_bytes.saturating_sub(256 + conv.as_str().len());
    let fits = |m: &super::Stored, budget: &mut usize| {
        let c = cost(m);
        let ok = c <= *budget;
        *budget = budget.saturating_sub(c);
        ok
    };
    let messages = &page.messages;
    let kept = match range {
        Range::After(_) => {
            let n = messages
                .iter()
                .take_while(|m| fits(m, &mut budget))
                .count()
                .max(1.min(messages.len()));
            &messages[..n]
        }
        Range::Before(_) => {
            let n = messages
                .iter()
                .rev()
                .take_while(|m| fits(m, &mut budget))
                .count()
                .max(1.min(messages.len()));
            &messages[messages.len() - n..]
        }
    };
    protocol::write_history_start(json, id, conv);
    for (i, m) in kept.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        protocol::write_stored_message(json, conv, m.seq, &m.from, m.client_id.as_deref(), m.ts_ms, &m.body);
    }
    let more = match range {
        Range::After(_) => kept.last().is_some_and(|m| m.seq < page.head),
        Range::Before(_) => kept.first().is_some_and(|m| m.seq > page.first),
    };
    let recovered = match range {
        Range::After(since) => since.saturating_add(1) >= page.first,
        Range::Before(_) => true,
    };
    protocol::write_history_end(
        json,
        HistoryEnd {
            head: page.head,
            first: page.first,
            more,
            recovered,
        },
    );
}

/// The start of a body for a push: a JSON string's text, else the JSON itself, cut at a
/// character boundary.
fn preview_of(body: &[u8], max: usize) -> String {
    let text = match serde_json::from_slice::<String>(body) {
        Ok(s) => s,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
