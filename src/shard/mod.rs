//! Shards: one glommio executor per core, pinned, each with its own listener, owning its
//! connections from accept to close. This module starts them, and stops them on a signal.
//!
//! The IO layer: sockets, buffers, readiness, sends and deadlines. It knows the chat
//! application only through `Apps` (what a connection may run) and the hub's
//! end-of-round hand-over of queues to flush.

mod budget;
mod connection;
mod context;
mod deadlines;
mod egress;
mod listener;
mod metrics_listener;
mod per_ip;
mod receive;
mod start;
mod yield_policy;

use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};

use crate::chat::auth::Authenticator;
use crate::chat::hub::{FrameDeflate, Hub};
use crate::chat::session::RateLimits;
use crate::cluster::node::ClusterConfig;
use crate::cluster::wire::NodeId;
use crate::cluster::{ClusterLink, ToCluster};
use crate::config::{Config, StoreKind};
use crate::metrics::board::{Board, Buckets};
use crate::metrics::exposition::Exposition;
use crate::metrics::{spawn_reporter, Reporter, ShardLoad, ShardReport};
use crate::route::directory::RoomLimits;
use crate::route::inbox::{Inbox, Mesh};
use crate::route::ShardMsg;
use crate::shutdown::Shutdown;
use crate::store::embedded::EmbeddedStore;
use crate::store::push::{PushConfig, PushQueue};
use crate::store::redis::RedisStore;
use crate::store::thread::{StoreLink, StoreOutputs, StoreThreadConfig};
use crate::store::Retention;
use crate::sys::{process, socket};
use crate::tls::TlsSession;
use crate::ws::deflate::DeflateStats;
use context::ShardContext;
use crossbeam_channel::Receiver;
use egress::Outbound;
use per_ip::PerIpLimits;
pub use start::StartError;

/// The applications a shard serves, beside its IO: the chat hub and who may use it.
pub(crate) struct Apps {
    pub hub: Hub<Outbound>,
    pub auth: Arc<Authenticator>,
    /// Where the shard leaves its counters once a second.
    pub board: Arc<Board>,
    /// `/metrics` on the main listener (none with `--metrics-listen`).
    pub exposition: Option<Arc<Exposition>>,
}

/// What every shard thread starts with.
struct Shared {
    config: Arc<Config>,
    stop: Arc<Shutdown>,
    open: Arc<AtomicUsize>,
    per_ip: Arc<PerIpLimits>,
    mesh: Arc<Mesh>,
    auth: Arc<Authenticator>,
    reporter: Reporter,
    board: Arc<Board>,
    exposition: Option<Arc<Exposition>>,
    cluster: Option<Arc<ClusterLink>>,
    store: Option<Arc<StoreLink>>,
    max_connections: usize,
    bound: std::net::SocketAddr,
    /// The handshakes' configuration, with `--listen-tls`.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Runs the gateway until SIGINT or SIGTERM, then closes every connection with 1001 and
/// returns once they are gone (or the drain time is up).
pub fn run(config: Config) -> Result<(), StartError> {
    let plan = start::Plan::new(&config)?;
    let listeners = start::bind(&config, &plan)?;
    let tls = start::tls(&config)?;
    let rules = crate::chat::auth::TokenRules::from_config(&config);
    let auth = Arc::new(Authenticator::load(
        config.auth_secret_file.as_deref(),
        &config.data_dir,
        rules,
    )?);
    start::announce(&config, &plan, listeners.bound, &auth);
    let board = Arc::new(Board::new(config.shards, config.slo));
    let exposition = Arc::new(Exposition::new(board.clone()));
    let exposition = match config.metrics_listen {
        Some(addr) => {
            metrics_listener::spawn(addr, exposition).map_err(|source| StartError::Thread {
                what: "metrics listener",
                source,
            })?;
            None
        }
        None => Some(exposition),
    };
    let (reporter, reporter_thread) = spawn_reporter(crate::metrics::report::ReporterConfig {
        shards: config.shards,
        interval: config.report_interval,
        slo: config.slo,
        histogram_out: config.histogram_out.clone(),
        board: board.clone(),
    })
    .map_err(|source| StartError::Thread {
        what: "reporter",
        source,
    })?;
    let (mesh, inboxes) = Mesh::new(config.shards);
    let config = Arc::new(config);
    // One doorbell per shard, and one for the cluster thread.
    let stop = Arc::new(Shutdown::new(config.shards + 1));
    // The store and cluster threads hand each other stored messages: both links first.
    let cluster_link = config.nats.is_some().then(ClusterLink::new);
    let store = start_store(
        &config,
        &mesh,
        cluster_link.as_ref().map(|(link, _)| link.clone()),
        &board,
    )?;
    let cluster = match cluster_link {
        Some(link) => Some(start_cluster(&config, &mesh, &stop, link, store.as_ref(), &board)?),
        None => None,
    };
    // Signals are watched before any shard says it listens: a SIGTERM right after that
    // line drains instead of killing, and the watcher's descriptors are already counted.
    start::spawn_signal_thread(stop.clone(), tls.as_ref().map(|(certificates, _)| certificates.clone()))?;
    if let Some((certificates, _)) = &tls {
        start::watch_tls_files(certificates)?;
    }
    if let (Some(addr), Some((certificates, _))) = (listeners.tls_bound, &tls) {
        tracing::info!(
            "wss:// (TLS 1.3 and 1.2, rustls) on {addr}, certificate {}; read again on SIGHUP or when its files change",
            certificates.cert_path().display()
        );
    }
    let per_ip = PerIpLimits::new(config.max_connections_per_ip, config.handshakes_per_ip);
    let shared = Shared {
        config,
        stop,
        open: Arc::new(AtomicUsize::new(0)),
        per_ip,
        mesh,
        auth,
        reporter,
        board,
        exposition,
        cluster: cluster.as_ref().map(|(link, _)| link.clone()),
        store: store.as_ref().map(|s| s.link.clone()),
        max_connections: plan.max_connections,
        bound: listeners.bound,
        tls: tls.map(|(_, config)| config),
    };
    let handles = spawn_shards(&shared, &plan, listeners, inboxes)?;
    drop(shared);
    let mut failures = Vec::new();
    for (id, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failures.push(why),
            Err(e) => failures.push(start::explain_start_error(id, &e.to_string())),
        }
    }
    let mut push = None;
    if let Some(store) = store {
        // The shards are gone: the store thread commits what they handed it (and hands
        // the cluster thread what other nodes should get of it), then ends.
        store.link.stop();
        let _ = store.thread.join();
        push = store.push;
    }
    if let Some((link, thread)) = cluster {
        link.close();
        let _ = thread.join();
    }
    // Its queue is gone with the store and cluster threads: it sends what is queued, then ends.
    if let Some(push) = push {
        let _ = push.join();
    }
    if !failures.is_empty() {
        return Err(StartError::Shards(failures));
    }
    let _ = reporter_thread.join();
    tracing::info!("shardgate stopped");
    Ok(())
}

/// The shards' link to the cluster thread, and the thread.
type ClusterThread = (Arc<ClusterLink>, JoinHandle<()>);

/// With `--nats`, the cluster thread (on the link made for it) and the shards' link to it.
fn start_cluster(
    config: &Config,
    mesh: &Arc<Mesh>,
    stop: &Arc<Shutdown>,
    (link, rx): (Arc<ClusterLink>, Receiver<ToCluster>),
    store: Option<&StoreThreads>,
    board: &Arc<Board>,
) -> Result<ClusterThread, StartError> {
    let url = config.nats.clone().unwrap_or_default();
    let (key, access) = crate::cluster::access::load(config)?;
    let cluster_config = ClusterConfig {
        url,
        prefix: config.nats_prefix.clone(),
        node: rand_node_id()?,
        key,
        access,
        presence_timeout: config.presence_timeout,
        heartbeat: Duration::from_secs(1),
        directory_cache: NonZeroUsize::new(config.directory_cache).unwrap_or(NonZeroUsize::MIN),
        ack_timeout: config.cluster_ack_timeout,
        cpu: config.cluster_cpu,
        report_interval: config.report_interval,
    };
    let wiring = crate::cluster::node::Wiring {
        link: link.clone(),
        rx,
        mesh: mesh.clone(),
        stop: stop.clone(),
        stop_index: config.shards,
        store: store.map(|s| s.link.clone()),
        push: store.and_then(|s| s.push_queue.clone()),
        board: board.clone(),
    };
    let thread = crate::cluster::node::spawn(cluster_config, wiring).map_err(|source| StartError::Thread {
        what: "cluster",
        source,
    })?;
    Ok((link, thread))
}

/// The store thread (and the push thread), and the shards' link to it.
struct StoreThreads {
    link: Arc<StoreLink>,
    thread: JoinHandle<()>,
    push: Option<JoinHandle<()>>,
    /// The push thread's queue (the cluster thread sends pushes too); it ends once every
    /// copy is dropped.
    push_queue: Option<PushQueue>,
}

/// Unless the gateway only relays: opens the message store in the data directory and
/// starts its thread (and the push webhook's).
fn start_store(
    config: &Config,
    mesh: &Arc<Mesh>,
    cluster: Option<Arc<ClusterLink>>,
    board: &Arc<Board>,
) -> Result<Option<StoreThreads>, StartError> {
    if config.store_kind() == StoreKind::None {
        let why = if config.nats.is_some() {
            " (a cluster with no shared store: --store redis://HOST:PORT gives it one)"
        } else {
            ""
        };
        tracing::info!("store: none{why}: messages are relayed, not stored; acks say routed or offline");
        return Ok(None);
    }
    let retention = Retention {
        max_age: config.retention_max_age,
        max_messages: config.retention_max_messages,
    };
    let kept = format!(
        "retention {} per conversation, {}",
        match config.retention_max_messages {
            0 => "every message".to_string(),
            n => format!("{n} messages"),
        },
        match config.retention_max_age {
            d if d.is_zero() => "kept however old".to_string(),
            d => format!("up to {} old", humantime::format_duration(d)),
        }
    );
    enum Opened {
        Embedded(Box<EmbeddedStore>),
        Redis(Box<RedisStore>),
    }
    let store = match (config.store_kind(), config.store.as_deref()) {
        (StoreKind::Redis, Some(url)) => {
            let tls_ca = match &config.store_tls_ca {
                Some(path) => Some(std::fs::read(path).map_err(|source| StartError::Read {
                    what: "--store-tls-ca",
                    path: path.clone(),
                    source,
                })?),
                None => None,
            };
            let store = RedisStore::open_with_ca(url, tls_ca, retention, config.dedupe_window)?;
            tracing::info!("store: redis at {}; {kept}", crate::cluster::access::redact_url(url));
            Opened::Redis(Box::new(store))
        }
        _ => {
            let dir = config.data_dir.join("messages");
            let store = EmbeddedStore::open(&dir, retention, config.dedupe_window)?;
            tracing::info!("store: embedded in {}; {kept}", dir.display());
            Opened::Embedded(Box::new(store))
        }
    };
    let (push_queue, push) = match (&config.push_webhook, &config.push_secret_file) {
        (Some(url), Some(secret_file)) => {
            let secret = crate::secret::read_secret_file(secret_file, PUSH_SECRET)?;
            let push_config = PushConfig {
                url: url.clone(),
                secret,
                capacity: config.push_queue,
                attempts: 5,
                first_backoff: Duration::from_millis(200),
            };
            let (queue, thread) =
                crate::store::push::spawn(push_config).map_err(|source| StartError::Thread { what: "push", source })?;
            let shown = crate::cluster::access::redact_url(url);
            tracing::info!("push: messages for users with no connection go to {shown}");
            (Some(queue), Some(thread))
        }
        _ => (None, None),
    };
    let (link, rx) = StoreLink::new();
    let thread_config = StoreThreadConfig {
        report_interval: config.report_interval,
        sweep_interval: Duration::from_secs(60),
        ready_conversations: config.ready_conversations,
        max_page_bytes: config.max_outbound_bytes / 2,
        push_preview_bytes: config.push_preview_bytes,
        reorder_hold: config.reorder_hold,
    };
    let outputs = StoreOutputs {
        mesh: mesh.clone(),
        push: push_queue.clone(),
        cluster,
        board: board.clone(),
    };
    let thread = match store {
        Opened::Embedded(store) => crate::store::thread::spawn(*store, thread_config, rx, outputs),
        Opened::Redis(store) => crate::store::thread::spawn(*store, thread_config, rx, outputs),
    }
    .map_err(|source| StartError::Thread { what: "store", source })?;
    Ok(Some(StoreThreads {
        link,
        thread,
        push,
        push_queue,
    }))
}

/// The push webhook's signing key.
const PUSH_SECRET: crate::secret::SecretKind = crate::secret::SecretKind {
    what: "push webhook secret",
    risk: "can forge push requests",
    min_len: 32,
};

/// Starts one pinned executor per shard, each with its listeners and inbox.
fn spawn_shards(
    shared: &Shared,
    plan: &start::Plan,
    listeners: start::Listeners,
    inboxes: Vec<Inbox>,
) -> Result<Vec<glommio::ExecutorJoinHandle<Result<(), String>>>, StartError> {
    let mut handles = Vec::with_capacity(inboxes.len());
    let mut tls_listeners = listeners.tls.into_iter();
    let sockets = listeners.shared.into_iter().zip(listeners.own).zip(inboxes);
    for (id, ((listener, own), inbox)) in sockets.enumerate() {
        let tls = tls_listeners
            .next()
            .zip(shared.tls.clone())
            .map(|(socket, config)| (OwnedFd::from(socket), config));
        let cpu = plan.shard_cpus[id];
        let config = &shared.config;
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .io_memory(config.io_memory)
            .ring_depth(config.ring_depth);
        if let Some(spin) = config.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let listener = OwnedFd::from(listener);
        let own = own.map(|(s, addr)| (OwnedFd::from(s), addr));
        let start = ShardStart {
            id,
            cpu,
            config: config.clone(),
            stop: shared.stop.clone(),
            open: shared.open.clone(),
            per_ip: shared.per_ip.clone(),
            apps: (
                shared.mesh.clone(),
                shared.auth.clone(),
                shared.cluster.clone(),
                shared.store.clone(),
            ),
            reporter: shared.reporter.clone(),
            board: shared.board.clone(),
            exposition: shared.exposition.clone(),
            max_connections: shared.max_connections,
            bound: shared.bound,
        };
        let handle = builder
            .spawn(move || shard_main(start, Listening { listener, own, tls }, inbox))
            .map_err(|e| StartError::Shards(vec![start::explain_start_error(id, &e.to_string())]))?;
        handles.push(handle);
    }
    Ok(handles)
}

/// The mesh, the authenticator, and the cluster and store threads' links.
type ShardApps = (
    Arc<Mesh>,
    Arc<Authenticator>,
    Option<Arc<ClusterLink>>,
    Option<Arc<StoreLink>>,
);

/// What one shard thread is handed.
struct ShardStart {
    id: usize,
    cpu: usize,
    config: Arc<Config>,
    stop: Arc<Shutdown>,
    open: Arc<AtomicUsize>,
    per_ip: Arc<PerIpLimits>,
    apps: ShardApps,
    reporter: Reporter,
    board: Arc<Board>,
    exposition: Option<Arc<Exposition>>,
    max_connections: usize,
    bound: std::net::SocketAddr,
}

/// A shard's listening sockets.
struct Listening {
    /// On the shared address.
    listener: OwnedFd,
    /// With `--shard-ports`, its own port.
    own: Option<(OwnedFd, std::net::SocketAddr)>,
    /// With `--listen-tls`, on the TLS address, with the handshakes' configuration.
    tls: Option<(OwnedFd, Arc<rustls::ServerConfig>)>,
}

/// One shard's life: accept (and route) until told to stop, then close every connection
/// and wait for them (at most the drain time). A shard that cannot start says why, and
/// stops the others.
async fn shard_main(start: ShardStart, listening: Listening, inbox: Inbox) -> Result<(), String> {
    let Listening { listener, own, tls } = listening;
    let ShardStart {
        id,
        cpu,
        config,
        stop,
        open,
        per_ip,
        apps,
        reporter,
        board,
        exposition,
        max_connections,
        bound,
    } = start;
    let (mesh, auth, cluster, store) = apps;
    let apps = Rc::new(Apps {
        hub: Hub::new(
            id,
            mesh,
            (cluster, store),
            RoomLimits {
                rooms_per_user: config.max_rooms_per_user,
                members_per_shard: config.max_room_members,
            },
            RateLimits::from_config(&config),
            config
                .deflate
                .then(|| FrameDeflate::new(config.deflate_level, config.deflate_min_size)),
        ),
        auth,
        board,
        exposition,
    });
    let ctx = match ShardContext::new(id, config, open, max_connections, per_ip) {
        Ok(ctx) => Rc::new(ctx),
        Err(e) => {
            stop.trigger();
            return Err(format!(
                "shard {id} cannot set up its io_uring: {e} (shardgate needs Linux 6.12 or later, with io_uring enabled)"
            ));
        }
    };
    if !start_tasks(&ctx, &apps, inbox, &reporter) {
        stop.trigger();
        return Err(format!("shard {id} could not start its tasks (see above)"));
    }
    let own_line = own
        .as_ref()
        .map(|(_, a)| format!(", own port {}", a.port()))
        .unwrap_or_default();
    // Announced only once the shard holds every descriptor it keeps (its ring
    // included): operators and tests take this line to mean "ready".
    tracing::info!(
        "shard {id}: cpu {cpu} (running on {}), thread {}, listening on {bound}{own_line}",
        process::current_cpu(),
        process::thread_id()
    );
    let accepting = async {
        let own = async {
            match own {
                Some((own, _)) => accept_loop(ctx.clone(), apps.clone(), own, None).await,
                None => future::pending().await,
            }
        };
        let tls = async {
            match tls {
                Some((listener, config)) => accept_loop(ctx.clone(), apps.clone(), listener, Some(config)).await,
                None => future::pending().await,
            }
        };
        future::or(
            accept_loop(ctx.clone(), apps.clone(), listener, None),
            future::or(own, tls),
        )
        .await
    };
    future::or(accepting, stop.wait(id)).await;
    drain(&ctx).await;
    let (histogram, cross) = {
        let latency = ctx.egress.latency.borrow();
        (latency.total.clone(), latency.cross_total.clone())
    };
    reporter.send(ShardReport::Final { histogram, cross });
    Ok(())
}

/// The shard's own tasks besides its connections: the inbox pump, the report ticks, the
/// read deadlines, and the ring driving the executor. False when one cannot start.
fn start_tasks(ctx: &Rc<ShardContext>, apps: &Rc<Apps>, inbox: Inbox, reporter: &Reporter) -> bool {
    // Cross-shard deliveries arrive by a wake from another thread; glommio serves such
    // wakes promptly only for latency-sensitive queues (into a `NotImportant` queue one was
    // measured upstream at ~95 ms).
    let inbox_queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(Duration::from_millis(1)),
        "inbox",
    );
    match glommio::spawn_local_into(pump(ctx.clone(), apps.clone(), inbox), inbox_queue) {
        Ok(task) => task.detach(),
        Err(e) => {
            tracing::error!("shard {}: cannot start the inbox pump: {e}", ctx.id);
            return false;
        }
    };
    glommio::spawn_local(report_intervals(ctx.clone(), apps.clone(), reporter.clone())).detach();
    glommio::spawn_local(publish_to_board(ctx.clone(), apps.clone())).detach();
    ctx.drive_executor();
    let deadlines = ctx.clone();
    glommio::spawn_local(async move { deadlines.deadlines.expire(&deadlines).await }).detach();
    true
}

/// Closes every connection with 1001 and waits for them, at most the drain time.
async fn drain(ctx: &ShardContext) {
    let live = ctx.live_connections();
    ctx.begin_stop();
    let drain = ctx.config.drain_timeout;
    let drained = future::or(
        async {
            ctx.drained().await;
            true
        },
        async {
            glommio::timer::sleep(drain).await;
            false
        },
    )
    .await;
    let cut = if drained {
        String::new()
    } else {
        format!(", {} cut off after {drain:?}", ctx.live_connections())
    };
    tracing::info!("shard {}: stopped; {live} connection(s) closed with 1001{cut}", ctx.id);
}

/// Messages per inbox batch: enough to amortise a wake-up, few enough to stay fair.
const INBOX_BATCH: usize = 1024;

/// Drains the shard's inbox: deliveries to local connections, and the router's messages.
async fn pump(ctx: Rc<ShardContext>, apps: Rc<Apps>, inbox: Inbox) {
    let mut batch: Vec<ShardMsg> = Vec::with_capacity(INBOX_BATCH);
    while inbox.next_batch(&mut batch, INBOX_BATCH).await {
        for msg in batch.drain(..) {
            apps.hub.on_message(msg);
        }
        ctx.end_round(&apps.hub);
        glommio::yield_if_needed().await;
    }
}

/// Hands the reporter this shard's interval histogram every `--report-interval`.
async fn report_intervals(ctx: Rc<ShardContext>, apps: Rc<Apps>, reporter: Reporter) {
    let interval = ctx.config.report_interval;
    let start = std::time::Instant::now();
    let mut deflated_before = DeflateStats::default();
    for tick in 1u64.. {
        // Sleep to the tick's deadline, not for a fixed time, so the ticks do not drift.
        let due = start + interval * tick as u32;
        glommio::timer::sleep(due.saturating_duration_since(std::time::Instant::now())).await;
        let (histogram, cross) = ctx.egress.latency.borrow_mut().take_interval();
        count_deflated(&ctx, &apps);
        let c = &ctx.counters;
        let deflated_now = DeflateStats {
            messages: c.deflated.get(),
            bytes_in: c.deflated_bytes_in.get(),
            bytes_out: c.deflated_bytes_out.get(),
        };
        let deflated = deflated_now - deflated_before;
        deflated_before = deflated_now;
        reporter.send(ShardReport::Interval {
            tick,
            histogram,
            cross,
            load: ShardLoad {
                connections: ctx.live_connections() as u64,
                held_bytes: ctx.budget.held() as u64,
                refused_budget: ctx.budget.take_refused(),
                refused_per_ip: ctx.refused_per_ip.replace(0),
                deflated,
            },
        });
    }
}

/// Adds what the shard's deflaters (the hub's and the echo's) did since they were last
/// asked to the shard's counters.
fn count_deflated(ctx: &ShardContext, apps: &Apps) {
    let mut deflated = apps.hub.take_deflate_stats();
    deflated += ctx.deflate.take_stats();
    ctx.counters
        .deflated(deflated.messages, deflated.bytes_in, deflated.bytes_out);
}

/// Copies this shard's counters, gauges and last second of latency to the board, once a
/// second.
async fn publish_to_board(ctx: Rc<ShardContext>, apps: Rc<Apps>) {
    let start = std::time::Instant::now();
    let mut latency_total = Buckets::default();
    for tick in 1u64.. {
        let due = start + Duration::from_secs(tick);
        glommio::timer::sleep(due.saturating_duration_since(std::time::Instant::now())).await;
        count_deflated(&ctx, &apps);
        let tls = ctx.egress.tls.take_counts();
        ctx.counters.tls(tls.full, tls.resumed, tls.plaintext, tls.protocol);
        let (frames, bytes) = ctx.egress.take_queued();
        ctx.counters.queued(frames, bytes as usize);
        let mut counts = ctx.counters.snapshot();
        counts += &apps.hub.counters.snapshot();
        let mut latency = ctx.egress.latency.borrow_mut();
        latency_total.add(&Buckets::of(&latency.second));
        apps.board.publish_shard(ctx.id, |s| {
            s.counts = counts;
            s.connections = ctx.live_connections() as u64;
            s.tls_connections = ctx.egress.tls.live() as u64;
            s.held_bytes = (ctx.budget.held() + ctx.egress.tls.held_bytes()) as u64;
            s.inbox_depth = apps.hub.mesh.depth(ctx.id) as u64;
            s.latency = latency_total.clone();
            s.last_second.reset();
            // Same bounds on both sides: adding cannot fail.
            let _ = s.last_second.add(&latency.second);
        });
        latency.second.reset();
    }
}

/// A random node id: nodes restarted with the same address are still new nodes.
fn rand_node_id() -> Result<NodeId, StartError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(StartError::NodeId)?;
    Ok(NodeId::from_le_bytes(bytes))
}

/// A listener's accept in the shard ring, cancelled when the accept loop ends (before
/// the listening socket closes).
struct WatchedListener<'a> {
    ctx: &'a ShardContext,
    index: usize,
}

impl Drop for WatchedListener<'_> {
    fn drop(&mut self) {
        self.ctx.close_listener(self.index);
    }
}

/// Accepts on `listener` until the shard stops; with `tls`, each connection's first
/// reads are its TLS handshake.
async fn accept_loop(ctx: Rc<ShardContext>, apps: Rc<Apps>, listener: OwnedFd, tls: Option<Arc<rustls::ServerConfig>>) {
    let watched = WatchedListener {
        ctx: &ctx,
        index: ctx.watch_listener(listener.as_raw_fd()),
    };
    let mut backoff = Duration::ZERO;
    loop {
        match ctx.accept(watched.index).await {
            Ok((fd, ip)) => {
                backoff = Duration::ZERO;
                let ticket = match ctx.per_ip.admit(ip) {
                    Ok(ticket) => ticket,
                    Err(refusal) => {
                        ctx.refused_per_ip.set(ctx.refused_per_ip.get() + 1);
                        // A refusal in plaintext means nothing to a TLS client, and a
                        // handshake to refuse it is work an overload should not pay.
                        if tls.is_none() {
                            let stream = socket::glommio_stream(fd);
                            glommio::spawn_local(connection::refuse_per_ip(ctx.clone(), stream, refusal)).detach();
                        }
                        continue;
                    }
                };
                // Boxed: rustls' state is a few KiB, and a plain connection's task must
                // not carry room for it.
                let session = match tls
                    .as_ref()
                    .map(|config| TlsSession::new(config.clone()).map(Box::new))
                    .transpose()
                {
                    Ok(session) => session,
                    Err(e) => {
                        tracing::warn!("shard {}: cannot start a TLS session: {e}", ctx.id);
                        continue;
                    }
                };
                match ctx.admit(fd, ticket) {
                    Ok(slot) => {
                        glommio::spawn_local(connection::serve(ctx.clone(), apps.clone(), slot, session)).detach();
                    }
                    Err(fd) if tls.is_none() => {
                        let stream = socket::glommio_stream(fd);
                        glommio::spawn_local(connection::refuse_busy(ctx.clone(), stream)).detach();
                    }
                    Err(fd) => drop(fd),
                }
            }
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    // Out of descriptors: spinning would burn the core and starve the
                    // connections whose closing frees them. Back off, up to 100 ms.
                    if backoff.is_zero() {
                        tracing::warn!("shard {}: accept: {e}; backing off until descriptors free up", ctx.id);
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(1), Duration::from_millis(100));
                    glommio::timer::sleep(backoff).await;
                }
                // Anything else (a peer that reset before we accepted it) concerns only that peer.
            }
        }
    }
}
