//! Shards: one glommio executor per core, pinned, each with its own listener, owning its
//! connections from accept to close. This module starts them, and stops them on a signal.

mod chat;
mod connection;
mod context;
mod cork;
mod hub;
pub mod limits;
mod listener;
mod outbound;
mod readiness;
mod send_batch;
mod shutdown;
mod yield_policy;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};

use crate::chat::auth::{Authenticator, SecretSource};
use crate::cluster::node::ClusterConfig;
use crate::cluster::wire::NodeId;
use crate::cluster::ClusterLink;
use crate::config::Config;
use crate::metrics::{spawn_reporter, Reporter, ShardReport};
use crate::route::inbox::{Inbox, Mesh};
use crate::route::ShardMsg;
use context::ShardContext;
use hub::Hub;
pub use shutdown::Shutdown;

/// Runs the gateway until SIGINT or SIGTERM, then closes every connection with 1001 and
/// returns once they are gone (or the drain time is up).
pub fn run(config: Config) -> Result<(), String> {
    let shards = config.shards;
    let nofile = limits::raise_nofile().map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    let fd_room = limits::connections_for_nofile(nofile, shards);
    let max_connections = config.max_connections.unwrap_or(fd_room);
    check_memlock(&config)?;
    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let cores = match &config.cpus {
        Some(cpus) => {
            if let Some(bad) = cpus.iter().find(|c| !online.contains(c)) {
                return Err(format!(
                    "--cpus names CPU {bad}, which this process may not run on (it may use {online:?})"
                ));
            }
            cpus.clone()
        }
        None if online.is_empty() => return Err("cannot list the CPU cores".into()),
        None => online,
    };
    let (sockets, bound) = listener::bind_listeners(config.listen, shards, config.backlog)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let shard_cpus: Vec<usize> = (0..shards).map(|id| cores[id % cores.len()]).collect();
    if config.steer_by_cpu && shards > 1 {
        // Two shards on one CPU: the second would never be chosen.
        let distinct: std::collections::HashSet<_> = shard_cpus.iter().collect();
        if distinct.len() < shards {
            return Err(format!(
                "--steer-by-cpu needs a CPU of its own for each shard; {shards} shards share {:?}",
                shard_cpus
            ));
        }
        listener::steer_by_cpu(&sockets[0], &shard_cpus)
            .map_err(|e| format!("cannot steer connections by CPU on {}: {e}", config.listen))?;
    }
    // With --shard-ports every shard also gets a listener of its own, to reach it by choice.
    let mut own_ports = Vec::new();
    for _ in 0..shards {
        own_ports.push(if config.shard_ports {
            let (mut socket, addr) =
                listener::bind_listeners(std::net::SocketAddr::new(bound.ip(), 0), 1, config.backlog)
                    .map_err(|e| format!("cannot bind a shard port: {e}"))?;
            Some((socket.remove(0), addr))
        } else {
            None
        });
    }
    let auth = Arc::new(Authenticator::load(
        config.auth_secret_file.as_deref(),
        &config.data_dir,
    )?);

    println!(
        "shardgate {}: {shards} shard(s) on {bound}; max connections {max_connections} (RLIMIT_NOFILE {nofile} allows {fd_room})",
        env!("CARGO_PKG_VERSION")
    );
    if config.steer_by_cpu && shards > 1 {
        println!("new connections go to the shard on the CPU that received their SYN (--steer-by-cpu)");
    }
    if max_connections > fd_room {
        println!("warning: --max-connections {max_connections} is above what the open-file limit allows ({fd_room}); accepts will back off at the limit");
    }
    print_auth(&config, &auth);

    let (reporter, reporter_thread) = spawn_reporter(crate::metrics::report::ReporterConfig {
        shards,
        interval: config.report_interval,
        slo: config.slo,
        histogram_out: config.histogram_out.clone(),
    })
    .map_err(|e| format!("cannot start the reporter thread: {e}"))?;
    let (mesh, receivers) = Mesh::new(shards);
    let config = Arc::new(config);
    // One doorbell per shard, and one for the cluster thread.
    let stop = Arc::new(Shutdown::new(shards + 1));
    let cluster = match &config.nats {
        Some(url) => {
            let (link, rx) = ClusterLink::new();
            let node: NodeId = rand_node_id()?;
            let cluster_config = ClusterConfig {
                url: url.clone(),
                prefix: config.nats_prefix.clone(),
                node,
                presence_timeout: config.presence_timeout,
                heartbeat: Duration::from_secs(1),
                ack_timeout: config.cluster_ack_timeout,
                cpu: config.cluster_cpu,
                report_interval: config.report_interval,
            };
            let thread =
                crate::cluster::node::spawn(cluster_config, link.clone(), rx, mesh.clone(), stop.clone(), shards)
                    .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
            Some((link, thread))
        }
        None => None,
    };
    // Signals are watched before any shard says it listens: a SIGTERM right after that
    // line drains instead of killing, and the watcher's descriptors are already counted.
    spawn_signal_thread(stop.clone())?;
    let open_connections = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(shards);
    for (id, (socket, receiver)) in sockets.into_iter().zip(receivers).enumerate() {
        let cpu = shard_cpus[id];
        let fd = socket.into_raw_fd();
        let own = own_ports[id].take().map(|(s, addr)| (s.into_raw_fd(), addr));
        let (config, stop, open) = (config.clone(), stop.clone(), open_connections.clone());
        let (mesh, auth, reporter) = (mesh.clone(), auth.clone(), reporter.clone());
        let link = cluster.as_ref().map(|(link, _)| link.clone());
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .io_memory(config.io_memory)
            .ring_depth(config.ring_depth);
        if let Some(spin) = config.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let handle = builder
            .spawn(move || async move {
                // SAFETY: `fd` is a listening socket this shard alone now owns.
                let listener = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: as above, for the shard's own listener.
                let own = own.map(|(fd, addr)| (unsafe { OwnedFd::from_raw_fd(fd) }, addr));
                // SAFETY: gettid and sched_getcpu have no preconditions.
                let (tid, running_on) = unsafe { (libc::gettid(), libc::sched_getcpu()) };
                let own_line = own
                    .as_ref()
                    .map(|(_, a)| format!(", own port {}", a.port()))
                    .unwrap_or_default();
                let inbox = Inbox::new(id, receiver, mesh.clone());
                let hub = Hub::new(id, mesh, link);
                let ctx = match ShardContext::new(id, config, hub, auth, open, max_connections) {
                    Ok(ctx) => Rc::new(ctx),
                    Err(e) => panic!("shard {id}: cannot create its epoll set: {e}"),
                };
                // Announced only once the shard holds every descriptor it keeps (the epoll
                // set included): operators and tests take this line to mean "ready".
                println!(
                    "shard {id}: cpu {cpu} (running on {running_on}), thread {tid}, listening on {bound}{own_line}"
                );
                shard_main(ctx, listener, own.map(|(l, _)| l), inbox, reporter, stop).await
            })
            .map_err(|e| explain_start_error(id, &e.to_string()))?;
        handles.push(handle);
    }
    drop(reporter);

    let mut failures = Vec::new();
    for (id, handle) in handles.into_iter().enumerate() {
        if let Err(e) = handle.join() {
            failures.push(explain_start_error(id, &e.to_string()));
        }
    }
    if let Some((link, thread)) = cluster {
        link.close();
        let _ = thread.join();
    }
    if failures.is_empty() {
        let _ = reporter_thread.join();
    }
    if failures.is_empty() {
        println!("shardgate stopped");
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// One shard's life: accept (and route) until told to stop, then close every connection
/// and wait for them (at most the drain time).
async fn shard_main(
    ctx: Rc<ShardContext>,
    listener: OwnedFd,
    own: Option<OwnedFd>,
    inbox: Inbox,
    reporter: Reporter,
    stop: Arc<Shutdown>,
) {
    // Cross-shard deliveries arrive by a wake from another thread; glommio serves such
    // wakes promptly only for latency-sensitive queues (into a `NotImportant` queue one was
    // measured upstream at ~95 ms).
    let inbox_queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(Duration::from_millis(1)),
        "inbox",
    );
    match glommio::spawn_local_into(pump(ctx.clone(), inbox), inbox_queue) {
        Ok(task) => task.detach(),
        Err(e) => {
            println!("shard {}: cannot start the inbox pump: {e}", ctx.id);
            return;
        }
    };
    glommio::spawn_local(report_intervals(ctx.clone(), reporter.clone())).detach();
    if let Err(e) = ctx.drive_executor() {
        println!("shard {}: cannot watch the executor's rings: {e}", ctx.id);
        return;
    }
    let deadlines = ctx.clone();
    glommio::spawn_local(async move { deadlines.expire_deadlines().await }).detach();
    let accepting = async {
        match own {
            Some(own) => future::or(accept_loop(ctx.clone(), listener), accept_loop(ctx.clone(), own)).await,
            None => accept_loop(ctx.clone(), listener).await,
        }
    };
    future::or(accepting, stop.wait(ctx.id)).await;
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
    println!(
        "shard {}: stopped; {live} connection(s) closed with 1001{}",
        ctx.id,
        if drained {
            String::new()
        } else {
            format!(", {} cut off after {drain:?}", ctx.live_connections())
        }
    );
    let (histogram, cross) = {
        let latency = ctx.hub.latency.borrow();
        (latency.total.clone(), latency.cross_total.clone())
    };
    reporter.send(ShardReport::Final { histogram, cross });
}

/// Messages per inbox batch: enough to amortise a wake-up, few enough to stay fair.
const INBOX_BATCH: usize = 1024;

/// Drains the shard's inbox: deliveries to local connections, and the router's messages.
async fn pump(ctx: Rc<ShardContext>, inbox: Inbox) {
    let mut batch: Vec<ShardMsg> = Vec::with_capacity(INBOX_BATCH);
    while inbox.next_batch(&mut batch, INBOX_BATCH).await {
        for msg in batch.drain(..) {
            ctx.hub.on_message(msg);
        }
        ctx.end_round();
        glommio::yield_if_needed().await;
    }
}

/// Hands the reporter this shard's interval histogram every `--report-interval`.
async fn report_intervals(ctx: Rc<ShardContext>, reporter: Reporter) {
    let interval = ctx.config.report_interval;
    let start = std::time::Instant::now();
    for tick in 1u64.. {
        // Sleep to the tick's deadline, not for a fixed time, so the ticks do not drift.
        let due = start + interval * tick as u32;
        glommio::timer::sleep(due.saturating_duration_since(std::time::Instant::now())).await;
        let (histogram, cross) = ctx.hub.latency.borrow_mut().take_interval();
        reporter.send(ShardReport::Interval {
            tick,
            histogram,
            cross,
            connections: ctx.live_connections() as u64,
        });
    }
}

/// A random node id: nodes restarted with the same address are still new nodes.
fn rand_node_id() -> Result<NodeId, String> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("cannot draw a node id: {e}"))?;
    Ok(NodeId::from_le_bytes(bytes))
}

fn print_auth(config: &Config, auth: &Authenticator) {
    match &auth.source {
        SecretSource::File(path) => println!("auth: HS256 tokens, secret from {}", path.display()),
        SecretSource::Env => println!("auth: HS256 tokens, secret from ${}", crate::chat::auth::SECRET_ENV),
        SecretSource::DataDir { path, created } => {
            println!(
                "auth: HS256 tokens, secret {} {} (mode 0600); mint a token with: shardgate token <user> --data-dir {}",
                if *created { "created at" } else { "from" },
                path.display(),
                config.data_dir.display()
            );
        }
    }
    if config.insecure_dev_auth {
        println!("WARNING: --insecure-dev-auth is on: anyone can connect to /ws as any user with ?user=<id>. For demos and benchmarks only.");
    }
}

async fn accept_loop(ctx: Rc<ShardContext>, listener: OwnedFd) {
    let index = match ctx.watch_listener(listener.as_raw_fd()) {
        Ok(index) => index,
        Err(e) => {
            println!("shard {}: cannot watch its listener: {e}; accepting nothing", ctx.id);
            return;
        }
    };
    let mut backoff = Duration::ZERO;
    loop {
        match ctx.accept(listener.as_raw_fd(), index).await {
            Ok(fd) => {
                backoff = Duration::ZERO;
                // SAFETY: `fd` is a connected socket that accept4 just handed to us alone.
                let stream = unsafe { TcpStream::from_raw_fd(fd) };
                match ctx.admit() {
                    Some(slot) => glommio::spawn_local(connection::serve(ctx.clone(), stream, slot)).detach(),
                    None => {
                        glommio::spawn_local(connection::refuse_busy(ctx.clone(), stream)).detach();
                        continue;
                    }
                };
            }
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    // Out of descriptors: spinning would burn the core and starve the
                    // connections whose closing frees them. Back off, up to 100 ms.
                    if backoff.is_zero() {
                        println!("shard {}: accept: {e}; backing off until descriptors free up", ctx.id);
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(1), Duration::from_millis(100));
                    glommio::timer::sleep(backoff).await;
                }
                // Anything else (a peer that reset before we accepted it) concerns only that peer.
            }
        }
    }
}

fn check_memlock(config: &Config) -> Result<(), String> {
    let memlock = limits::raise_memlock().map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    if memlock < limits::GLOMMIO_MIN_MEMLOCK {
        return Err(format!(
            "RLIMIT_MEMLOCK is {} KiB, but io_uring (glommio) needs at least {} KiB per process plus --io-memory per shard.\n\
             Raise it: `ulimit -l unlimited` in the shell, LimitMEMLOCK=infinity in a systemd unit, or memlock in /etc/security/limits.conf (see kernel-tuning.md).",
            memlock / 1024,
            limits::GLOMMIO_MIN_MEMLOCK / 1024
        ));
    }
    let wanted = config.io_memory as u64 * config.shards as u64;
    if !limits::is_root() && memlock < wanted + limits::GLOMMIO_MIN_MEMLOCK {
        println!(
            "warning: RLIMIT_MEMLOCK is {} KiB, less than --io-memory × shards ({} KiB); io_uring buffers may fail to register (lower --io-memory or raise the limit)",
            memlock / 1024,
            wanted / 1024
        );
    }
    Ok(())
}

fn explain_start_error(shard: usize, error: &str) -> String {
    if error.contains("MemLock") {
        format!("shard {shard} could not start io_uring: {error}: RLIMIT_MEMLOCK is too low (glommio needs at least 512 KiB per executor); raise it with `ulimit -l` or LimitMEMLOCK= (see kernel-tuning.md)")
    } else {
        format!("shard {shard} failed: {error}")
    }
}

/// SIGINT/SIGTERM start a graceful stop; a second one ends the process at once.
fn spawn_signal_thread(stop: Arc<Shutdown>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("cannot watch signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if stop.is_requested() {
                    println!("second signal {signal}: exiting without draining");
                    std::process::exit(130);
                }
                println!("signal {signal}: closing every connection with 1001 (going away)");
                stop.trigger();
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}
