//! shardgate-load: the chat load generator for soak tests.
//!
//! Opens N chat connections at a ramp rate, pairs them (direct mode: users 2k and 2k+1 send
//! each other messages; room mode: groups publish to their room), holds them for a while at
//! a message rate, then drains and counts: sent, received, lost, duplicated, reordered,
//! failed handshakes, unexpected closes, and end-to-end latency (send to receive) in an
//! HDR histogram. Partners share a client thread and, unless `--cross-node` spreads their
//! group over gateways, a gateway; messages between gateways (nodes of one cluster) are
//! counted and measured apart.
//!
//! Thread-per-core on glommio; each thread reads every socket into one shared buffer, so a
//! connection costs a few KiB. More connections than one process may open are spread over
//! child processes (`--processes`), whose results are merged. `--tls` connects with
//! `wss://` (rustls, no certificate check; sessions resumed on reconnect).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use crossbeam_channel::Sender;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use rustls::{ClientConfig, ClientConnection};
use serde::Deserialize;
use shardgate::chat::auth::Authenticator;
use shardgate::ws::deflate::{accepted_in_response, Deflater, Inflater, EXTENSION, RSV1};
use shardgate::ws::{write_close, write_frame, Decoder, Event, OpCode, Role};
use shardgate_bench::accounting::{decode_histogram, encode_histogram, new_histogram, Answer, Report, Tracker};
use shardgate_bench::{gather_response_head, tls_client};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Users 2k and 2k+1 send each other direct messages.
    Direct,
    /// Groups of --room-size users join a room and publish to it.
    Room,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "shardgate-load",
    about = "chat load generator: ramp, hold, count, measure",
    args_override_self = true
)]
struct Args {
    /// Gateway addresses; a pair (or room group) uses one of them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    gateways: Vec<SocketAddr>,
    /// Connections in all (even; in room mode a multiple of --room-size).
    #[arg(short, long, default_value_t = 2000)]
    connections: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000.0)]
    ramp: f64,
    /// How long to hold the load once every connection is up.
    #[arg(short, long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Messages per second each connection sends.
    #[arg(long, default_value_t = 0.5)]
    rate: f64,
    #[arg(long, value_enum, default_value_t = Mode::Direct)]
    mode: Mode,
    #[arg(long, default_value_t = 4)]
    room_size: usize,
    /// Local addresses client sockets bind to, in turn (loopback: 127.0.0.2,127.0.0.3,…).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Mint tokens with this secret file; without it, use the gateway's --insecure-dev-auth.
    #[arg(long)]
    auth_secret_file: Option<PathBuf>,
    /// CPUs for the client threads, one thread each. (Set, not appended: a child process
    /// is given its one CPU after the parent's list, and must run one thread.)
    #[arg(long, value_delimiter = ',', default_value = "1", action = clap::ArgAction::Set)]
    cpus: Vec<usize>,
    /// The latency objective: the run fails if p99 is above it.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    slo: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Between the last connection's `ready` and the first message: time for presence to
    /// reach other gateways of a cluster (a send to a user not known yet is `offline`).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// After the hold, how long to wait for messages still in flight.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Run as this many child processes (each opens its share), and merge their results.
    #[arg(long, default_value_t = 0)]
    processes: usize,
    /// Write the merged latency distribution (HdrHistogram V2, base64) here.
    #[arg(long)]
    histogram_out: Option<PathBuf>,
    /// Share of groups (pairs, rooms) spread over different gateways, so that their
    /// messages cross nodes (gateways joined through NATS), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    cross_node: f64,
    /// User ids are PREFIX-<n>.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Faults are expected: a connection the gateway closes (or that breaks) connects
    /// again, to the next gateway in the list, and the run is judged on what the
    /// answers promised (see the README's fault-injection runs) rather than on a clean run.
    #[arg(long)]
    reconnect: bool,
    /// With --drop-at: the share of connections (0 to 1) that break at once, with a reset,
    /// and reconnect at once (a reconnect storm).
    #[arg(long, default_value_t = 0.0)]
    drop_share: f64,
    /// When, after the hold starts, the --drop-share connections break (a list: one storm
    /// each).
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration)]
    drop_at: Vec<Duration>,
    /// Offer permessage-deflate (the gateway must accept it: run it with --deflate); sends
    /// at least --deflate-min-size long go compressed, and compressed frames are inflated.
    #[arg(long)]
    deflate: bool,
    /// Messages shorter than this are sent uncompressed (as the gateway's own default).
    #[arg(long, default_value_t = 512)]
    deflate_min_size: usize,
    /// Pad each message's body with this many bytes of chat-like text (a `text` field), to
    /// load the gateway with messages of a realistic size.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Connect with TLS (`wss://`): the gateways' addresses are their `--listen-tls` ones.
    #[arg(long)]
    tls: bool,
    /// (internal) first connection index of this child, and its count of all connections.
    #[arg(long, hide = true)]
    child_offset: Option<usize>,
    #[arg(long, hide = true)]
    total: Option<usize>,
}

/// What a client thread tells its process every interval, and at the end.
enum ThreadEvent {
    Tick {
        tick: u64,
        up: u64,
        sent: u64,
        received: u64,
        latency: Histogram<u64>,
    },
    Done(Box<Report>),
}

fn main() {
    let args = Args::parse();
    let group = if args.mode == Mode::Direct {
        2
    } else {
        args.room_size.max(2)
    };
    if args.connections == 0 || args.connections % group != 0 {
        eprintln!("shardgate-load: --connections must be a positive multiple of {group}");
        std::process::exit(2);
    }
    if !(0.0..=1.0).contains(&args.cross_node) {
        eprintln!("shardgate-load: --cross-node is a share, from 0 to 1");
        std::process::exit(2);
    }
    let mut args = args;
    if args.processes == 0 && args.child_offset.is_none() {
        // One descriptor per connection: past what one process may open, split into
        // processes (the open-file limit cannot always be raised, e.g. in a sandbox).
        let nofile = shardgate::sys::process::raise_nofile().unwrap_or(1024) as usize;
        let per_process = nofile.saturating_sub(256).max(group) / group * group;
        let needed = args.connections.div_ceil(per_process);
        if needed > 1 {
            println!(
                "shardgate-load: {} connections exceed one process's open-file limit ({nofile}): running {needed} processes",
                args.connections
            );
            args.processes = needed;
        }
    }
    let report = if args.processes > 0 {
        coordinate(&args, group)
    } else {
        run_process(&args, group)
    };
    if args.child_offset.is_some() {
        println!("final {}", report.to_line());
    } else {
        print_final(&args, &report);
    }
    if !passed(&args, &report) {
        std::process::exit(1);
    }
}

/// Every connection up and none closed on us, every message delivered once and in order,
/// p99 within the SLO.
fn passed(args: &Args, r: &Report) -> bool {
    let p99_ok = r.latency.value_at_quantile(0.99) <= args.slo.as_micros() as u64;
    if args.reconnect {
        // With faults: nothing acknowledged `routed` to a connection that held is lost,
        // every send of a connection that held is answered, everyone is back at the end.
        // Which refusals are acceptable depends on the fault (scripts/faults.sh judges).
        return r.lost == 0
            && r.duplicates == 0
            && r.reordered == 0
            && r.unanswered == 0
            && r.errors == 0
            && r.connected_at_end == args.connections as u64
            && p99_ok;
    }
    r.is_clean()
        && r.connections_up == args.connections as u64
        && r.failed_handshakes == 0
        && r.unexpected_closes == 0
        && p99_ok
}

fn print_final(args: &Args, r: &Report) {
    let h = &r.latency;
    let x = &r.cross_latency;
    println!(
        "summary: connections_up={} failed_handshakes={} unexpected_closes={} sent={} received={} lost={} duplicates={} reordered={} offline={} errors={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} slo_ms={} cross_node_received={} cross_p50_us={} cross_p90_us={} cross_p99_us={} cross_p999_us={} cross_max_us={} verdict={}",
        r.connections_up, r.failed_handshakes, r.unexpected_closes, r.sent, r.received, r.lost, r.duplicates, r.reordered, r.offline, r.errors,
        h.value_at_quantile(0.5), h.value_at_quantile(0.9), h.value_at_quantile(0.99), h.value_at_quantile(0.999), h.max(),
        args.slo.as_millis(),
        r.cross_received, x.value_at_quantile(0.5), x.value_at_quantile(0.9), x.value_at_quantile(0.99), x.value_at_quantile(0.999), x.max(),
        if passed(args, r) { "PASS" } else { "FAIL" },
    );
    if args.reconnect {
        println!(
            "faults: reconnects={} routed={} offline={} unavailable={} limited={} unanswered={} unanswered_dropped={} lost_reconnected={} refused_local={} refused_cross={} connected_at_end={} recovery_ms={}",
            r.reconnects, r.routed, r.offline, r.unavailable, r.limited, r.unanswered, r.unanswered_dropped,
            r.lost_reconnected, r.refused_local, r.refused_cross, r.connected_at_end, r.recovery_ms,
        );
    }
    print!("{}", shardgate::metrics::percentile_distribution(h));
    if let Some(path) = &args.histogram_out {
        if let Err(e) = std::fs::write(path, encode_histogram(h)) {
            eprintln!("shardgate-load: cannot write {}: {e}", path.display());
        }
    }
}

/// Spawns the child processes and merges what they report.
fn coordinate(args: &Args, group: usize) -> Report {
    let groups = args.connections / group;
    let exe = std::env::current_exe().expect("own path");
    let mut children = Vec::new();
    let mut offset = 0;
    for k in 0..args.processes {
        let share = (groups / args.processes + usize::from(k < groups % args.processes)) * group;
        if share == 0 {
            continue;
        }
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1).collect::<Vec<_>>())
            .args(["--processes", "0", "--connections", &share.to_string()])
            // One client thread per child, children spread over the CPUs: more threads
            // than cores only adds parking and waking.
            .args(["--cpus", &args.cpus[k % args.cpus.len()].to_string()])
            .args([
                "--child-offset",
                &offset.to_string(),
                "--total",
                &args.connections.to_string(),
            ])
            .stdout(Stdio::piped());
        offset += share;
        children.push(cmd.spawn().expect("start a load process"));
    }
    let n = children.len();
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, String)>();
    for (k, child) in children.iter_mut().enumerate() {
        let out = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((k, line));
            }
        });
    }
    drop(tx);
    let started = Instant::now();
    let mut ticks: std::collections::BTreeMap<u64, (usize, u64, u64, u64, Histogram<u64>)> = Default::default();
    let mut total = Report::default();
    for (_, line) in rx.iter() {
        if let Some(rest) = line.strip_prefix("final ") {
            match Report::from_line(rest) {
                Ok(r) => total.merge(&r),
                Err(e) => eprintln!("shardgate-load: bad report from a child: {e}"),
            }
        } else if let Some(rest) = line.strip_prefix("tick ") {
            let kv: std::collections::HashMap<&str, &str> =
                rest.split_whitespace().filter_map(|s| s.split_once('=')).collect();
            let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let tick = num("tick");
            let e = ticks.entry(tick).or_insert_with(|| (0, 0, 0, 0, new_histogram()));
            e.0 += 1;
            e.1 += num("up");
            e.2 += num("sent");
            e.3 += num("received");
            if let Some(h) = kv.get("hist").and_then(|h| decode_histogram(h).ok()) {
                let _ = e.4.add(&h);
            }
            if e.0 == n {
                if let Some((_, up, sent, received, h)) = ticks.remove(&tick) {
                    print_progress(started.elapsed(), args.report_interval, up, sent, received, &h);
                }
            }
        } else {
            println!("{line}");
        }
    }
    for mut child in children {
        // A child that failed to run reports nothing; its connections count as not up.
        match child.wait() {
            Ok(status) if status.code().is_some() => {}
            _ => total.errors += 1,
        }
    }
    total
}

fn print_progress(t: Duration, interval: Duration, up: u64, sent: u64, received: u64, h: &Histogram<u64>) {
    let secs = interval.as_secs_f64();
    println!(
        "progress: t={:.0}s connections_up={up} sent_per_s={:.0} received_per_s={:.0} p50_us={} p99_us={} max_us={}",
        t.as_secs_f64(),
        sent as f64 / secs,
        received as f64 / secs,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
}

/// Runs this process's share on its client threads; returns the merged report.
fn run_process(args: &Args, group: usize) -> Report {
    let offset = args.child_offset.unwrap_or(0);
    let total = args.total.unwrap_or(args.connections);
    let epoch = Instant::now();
    let (names, creds) = users_and_credentials(args, offset);
    let threads = args.cpus.len();
    let groups = args.connections / group;
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut handles = Vec::new();
    for (t, &cpu) in args.cpus.iter().enumerate() {
        // Whole groups per thread, so partners share a thread.
        let mine: Vec<usize> = (0..groups).filter(|g| g % threads == t).collect();
        let members: Vec<(usize, String, String)> = mine
            .iter()
            .flat_map(|g| (g * group..(g + 1) * group).map(|i| (i, names[i].clone(), creds[i].clone())))
            .collect();
        let (args, tx) = (args.clone(), tx.clone());
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("load-{t}"))
            .io_memory(1 << 20)
            // A deep ring gets the kernel's largest poll-cancel table (256 buckets instead
            // of 8): glommio's cancels otherwise scan thousands of armed polls each.
            .ring_depth(4096)
            .spawn(move || async move { run_thread(args, members, group, offset, total, epoch, tx).await })
            .unwrap_or_else(|e| {
                eprintln!("shardgate-load: cannot start a thread on cpu {cpu}: {e}");
                std::process::exit(2)
            });
        handles.push(handle);
    }
    drop(tx);
    let report = collect_events(args, threads, rx);
    for h in handles {
        let _ = h.join();
    }
    report
}

/// The process's user names, and the credential of each (a token minted here, before the
/// threads start, since the authenticator is not Send; or `user=` for dev auth).
fn users_and_credentials(args: &Args, offset: usize) -> (Vec<String>, Vec<String>) {
    let auth = args.auth_secret_file.as_ref().map(|f| {
        Authenticator::load(Some(f), std::path::Path::new("."), Default::default()).unwrap_or_else(|e| {
            eprintln!("shardgate-load: {e}");
            std::process::exit(2)
        })
    });
    let names: Vec<String> = (0..args.connections)
        .map(|i| format!("{}-{}", args.prefix, offset + i))
        .collect();
    let creds = names
        .iter()
        .map(|n| match &auth {
            Some(a) => format!(
                "token={}",
                a.mint(n, Duration::from_secs(86_400), None).expect("valid user id")
            ),
            None => format!("user={n}"),
        })
        .collect();
    (names, creds)
}

/// Merges the threads' ticks (printed once every thread reported one: a progress line,
/// or a `tick` line for the coordinator) and their final reports.
fn collect_events(args: &Args, threads: usize, rx: crossbeam_channel::Receiver<ThreadEvent>) -> Report {
    let child = args.child_offset.is_some();
    let started = Instant::now();
    let mut ticks: std::collections::BTreeMap<u64, (usize, u64, u64, u64, Histogram<u64>)> = Default::default();
    let mut total_report = Report::default();
    for event in rx.iter() {
        match event {
            ThreadEvent::Tick {
                tick,
                up,
                sent,
                received,
                latency,
            } => {
                let e = ticks.entry(tick).or_insert_with(|| (0, 0, 0, 0, new_histogram()));
                e.0 += 1;
                e.1 += up;
                e.2 += sent;
                e.3 += received;
                let _ = e.4.add(&latency);
                if e.0 < threads {
                    continue;
                }
                let Some((_, up, sent, received, h)) = ticks.remove(&tick) else {
                    continue;
                };
                if child {
                    println!(
                        "tick tick={tick} up={up} sent={sent} received={received} hist={}",
                        encode_histogram(&h)
                    );
                } else {
                    print_progress(started.elapsed(), args.report_interval, up, sent, received, &h);
                }
            }
            ThreadEvent::Done(r) => total_report.merge(&r),
        }
    }
    total_report
}

/// One simulated user on a client thread.
struct User {
    name: String,
    /// Its index over all processes (names and gateways derive from it).
    global: usize,
    /// Can receive from its group: connected (direct mode), or joined its room (room mode).
    ready: Cell<bool>,
    /// Messages this user sent (to its partner, or to its room).
    sent: Cell<u64>,
    /// Messages from each member of its group, by position in the group.
    trackers: RefCell<Vec<Tracker>>,
    finished: Cell<bool>,
    /// The answer to each message it sent, by sequence number.
    answers: RefCell<Vec<Answer>>,
    /// Its connection broke (closed by the gateway, reset, dropped) at least once.
    broke: Cell<bool>,
    /// The `--drop-at` storms it has been through.
    drops: Cell<usize>,
    /// The gateway it is connected to (or tries next), by index in --gateways.
    gateway: Cell<usize>,
}

struct Thread {
    args: Args,
    users: Vec<User>,
    group: usize,
    /// Index of the first connection this process runs (names carry global indices).
    offset: usize,
    rx: RefCell<Vec<u8>>,
    /// With --tls: the client configuration (one session store per thread), and the
    /// ciphertext of the last read and its plaintext.
    tls: Option<Arc<ClientConfig>>,
    cipher: RefCell<Vec<u8>>,
    plain: RefCell<Vec<u8>>,
    report: RefCell<Report>,
    interval: RefCell<Histogram<u64>>,
    interval_sent: Cell<u64>,
    interval_received: Cell<u64>,
    epoch: Instant,
    /// Connections up now.
    live: Cell<u64>,
    /// With --deflate: compresses sends, inflates what arrives (no context kept).
    deflater: RefCell<Deflater>,
    inflater: RefCell<Inflater>,
    /// With --body-bytes: `,"text":"…"` to put in every message body.
    padding: String,
}

impl Thread {
    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

async fn run_thread(
    args: Args,
    members: Vec<(usize, String, String)>,
    group: usize,
    offset: usize,
    total: usize,
    epoch: Instant,
    tx: Sender<ThreadEvent>,
) {
    let ramp_time = Duration::from_secs_f64(total as f64 / args.ramp.max(1.0));
    let hold_end = epoch + ramp_time + args.settle + args.duration;
    let users = members
        .iter()
        .map(|(global, name, _)| User {
            name: name.clone(),
            global: offset + global,
            ready: Cell::new(false),
            sent: Cell::new(0),
            trackers: RefCell::new(vec![Tracker::default(); group]),
            finished: Cell::new(false),
            answers: RefCell::new(Vec::new()),
            broke: Cell::new(false),
            drops: Cell::new(0),
            gateway: Cell::new(gateway_of(&args, group, offset + global)),
        })
        .collect();
    let th = Rc::new(Thread {
        args: args.clone(),
        users,
        group,
        offset,
        rx: RefCell::new(vec![0; 64 * 1024]),
        tls: args.tls.then(|| tls_client::client_config(true)),
        cipher: RefCell::new(if args.tls { vec![0; 16 * 1024] } else { Vec::new() }),
        plain: RefCell::new(Vec::new()),
        report: RefCell::new(Report::default()),
        interval: RefCell::new(new_histogram()),
        interval_sent: Cell::new(0),
        interval_received: Cell::new(0),
        epoch,
        live: Cell::new(0),
        deflater: RefCell::new(Deflater::new(1)),
        inflater: RefCell::new(Inflater::new()),
        padding: padding(args.body_bytes),
    });
    let ticker = glommio::spawn_local(report_ticks(th.clone(), tx.clone()));
    let tasks: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(local, (global, _, cred))| {
            let start = epoch + Duration::from_secs_f64((offset + global) as f64 / args.ramp.max(1.0));
            glommio::spawn_local(run_user(th.clone(), local, global, cred, start, hold_end))
        })
        .collect();
    for t in tasks {
        t.await;
    }
    drop(ticker);
    let report = count_losses(&th);
    let _ = tx.send(ThreadEvent::Done(Box::new(report)));
}

/// Sends the thread's interval figures to the process every `--report-interval`.
async fn report_ticks(th: Rc<Thread>, tx: Sender<ThreadEvent>) {
    for tick in 1u64.. {
        let due = th.epoch + th.args.report_interval * tick as u32;
        glommio::timer::sleep(due.saturating_duration_since(Instant::now())).await;
        let latency = std::mem::replace(&mut *th.interval.borrow_mut(), new_histogram());
        let up = th.live.get();
        let _ = tx.send(ThreadEvent::Tick {
            tick,
            up,
            sent: th.interval_sent.replace(0),
            received: th.interval_received.replace(0),
            latency,
        });
    }
}

/// The thread's report, with the loss: what each sender sent to each recipient and the
/// recipient never got. With --reconnect, judged by the answers: only what was
/// acknowledged `routed` must arrive, and only at a recipient whose connection held.
fn count_losses(th: &Thread) -> Report {
    let mut report = std::mem::take(&mut *th.report.borrow_mut());
    for (u, user) in th.users.iter().enumerate() {
        let base = u - u % th.group;
        for (pos, tracker) in user.trackers.borrow().iter().enumerate() {
            if base + pos == u {
                continue;
            }
            let sender = &th.users[base + pos];
            if !th.args.reconnect {
                report.lost += tracker.lost(sender.sent.get());
            }
            report.received += tracker.received;
            report.duplicates += tracker.duplicates;
            report.reordered += tracker.reordered;
        }
    }
    if th.args.reconnect {
        count_answers(th, &mut report);
    }
    report
}

/// Classifies every message by its answer (with --reconnect).
fn count_answers(th: &Thread, report: &mut Report) {
    for (u, sender) in th.users.iter().enumerate() {
        let base = u - u % th.group;
        let recipients: Vec<usize> = (base..base + th.group).filter(|&r| r != u).collect();
        let held = |r: usize| !th.users[r].broke.get();
        let all_held = !sender.broke.get() && recipients.iter().all(|&r| held(r));
        let gateway = |i: usize| gateway_of(&th.args, th.group, th.users[i].global);
        let one_gateway = recipients.iter().all(|&r| gateway(r) == gateway(u));
        for (seq, answer) in sender.answers.borrow().iter().enumerate() {
            match answer {
                Answer::Routed => {
                    report.routed += 1;
                    for &r in &recipients {
                        let pos = u - base;
                        if !th.users[r].trackers.borrow()[pos].has(seq as u64) {
                            if held(r) {
                                report.lost += 1;
                            } else {
                                report.lost_reconnected += 1;
                            }
                        }
                    }
                }
                Answer::Pending if sender.broke.get() => report.unanswered_dropped += 1,
                Answer::Pending => report.unanswered += 1,
                Answer::Offline | Answer::Unavailable | Answer::Limited => {
                    match answer {
                        Answer::Unavailable => report.unavailable += 1,
                        Answer::Limited => report.limited += 1,
                        _ => {} // counted as the ack came
                    }
                    if all_held && one_gateway {
                        report.refused_local += 1;
                    } else if all_held {
                        report.refused_cross += 1;
                    }
                }
                Answer::Other => {}
            }
        }
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    from: Option<&'a str>,
    #[serde(default)]
    status: Option<&'a str>,
    #[serde(default)]
    id: Option<&'a str>,
    #[serde(default)]
    code: Option<&'a str>,
    #[serde(default)]
    body: Option<Body>,
}

/// One frame from the gateway, as far as the accounting needs it.
struct Received {
    kind: String,
    seq: Option<u64>,
    sent_at: Option<u64>,
    from: Option<String>,
    /// For acks and errors: what it says of the message `id`.
    answer: Option<(u64, Answer)>,
}

#[derive(Deserialize)]
struct Body {
    s: u64,
    t: u64,
}

/// The gateway connection `global` (an index over all processes) uses: its group's, or,
/// for the groups `--cross-node` spreads, one per member in turn.
fn gateway_of(args: &Args, group: usize, global: usize) -> usize {
    let g = global / group;
    let n = args.gateways.len();
    // Spread groups are picked by a low-discrepancy sequence: an even share, in any prefix.
    let spread = args.cross_node > 0.0 && (g as f64 * 0.618_033_988_749_895).fract() < args.cross_node;
    if spread {
        (g + global % group) % n
    } else {
        g % n
    }
}

/// Connects, upgrades and waits for `ready`; `None` counts as a failed handshake.
/// A connection's stream, and its TLS state with --tls.
struct Wire {
    stream: TcpStream,
    tls: Option<ClientConnection>,
}

impl Wire {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.tls {
            Some(conn) => tls_client::write_all(&mut self.stream, conn, bytes).await,
            None => self.stream.write_all(bytes).await,
        }
    }

    /// Reads into the thread's shared buffer (opened, with TLS): how many bytes are there
    /// (0 at the end of the stream).
    async fn read(&mut self, th: &Thread) -> std::io::Result<usize> {
        let Some(conn) = &mut self.tls else {
            return read_shared(th, &mut self.stream).await;
        };
        loop {
            let n = poll_fn(|cx| {
                let mut cipher = th.cipher.borrow_mut();
                Pin::new(&mut self.stream).poll_read(cx, &mut cipher[..])
            })
            .await?;
            if n == 0 {
                return Ok(0);
            }
            let opened = {
                let mut plain = th.plain.borrow_mut();
                plain.clear();
                tls_client::take_in(conn, &th.cipher.borrow()[..n], &mut plain)?;
                if !plain.is_empty() {
                    let mut rx = th.rx.borrow_mut();
                    if rx.len() < plain.len() {
                        rx.resize(plain.len(), 0);
                    }
                    rx[..plain.len()].copy_from_slice(&plain);
                }
                plain.len()
            };
            if conn.wants_write() {
                // An alert or a key update of rustls' own.
                tls_client::write_all(&mut self.stream, conn, &[]).await?;
            }
            if opened > 0 {
                return Ok(opened);
            }
        }
    }
}

async fn connect(th: &Thread, gateway: usize, global: usize, cred: &str) -> Option<(Wire, Decoder, Vec<u8>)> {
    let gateway = th.args.gateways[gateway];
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(gateway),
        socket2::Type::STREAM.nonblocking(),
        None,
    )
    .ok()?;
    if !th.args.source_ips.is_empty() {
        let ip = th.args.source_ips[global % th.args.source_ips.len()];
        // Choose the port at connect time, not bind time: bind(port 0) makes the kernel scan
        // its bind table for a free port, which grows slower with every socket (it stalled a
        // client thread for a minute at 17k sockets per address).
        let _ = shardgate::sys::socket::set_bind_address_no_port(&socket);
        socket.bind(&SocketAddr::new(ip, 0).into()).ok()?;
    }
    let _ = socket.set_nodelay(true);
    match socket.connect(&gateway.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(_) => return None,
    }
    let mut stream = shardgate::sys::socket::glommio_stream(socket.into());
    let tls = match &th.tls {
        Some(config) => {
            let mut conn = tls_client::connection(config).ok()?;
            // The handshake's first write waits until the connection is established.
            tls_client::handshake(&mut stream, &mut conn).await.ok()?;
            Some(conn)
        }
        None => None,
    };
    let mut wire = Wire { stream, tls };
    let offer = if th.args.deflate {
        format!("Sec-WebSocket-Extensions: {EXTENSION}; client_no_context_takeover\r\n")
    } else {
        String::new()
    };
    let request = format!(
        "GET /ws?{cred} HTTP/1.1\r\nHost: {gateway}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    // The first write waits until the connection is established.
    wire.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let pos = loop {
        let n = wire.read(th).await.ok()?;
        if let Some(end) = gather_response_head(&mut head, &th.rx.borrow()[..n])? {
            break end;
        }
    };
    if !head.starts_with(b"HTTP/1.1 101 ") {
        return None;
    }
    // A gateway that did not agree to deflate (run without --deflate) fails the handshake
    // here: the run would not measure what it says.
    if th.args.deflate && accepted_in_response(&head[..pos]).is_none() {
        return None;
    }
    let decoder = Decoder::new(Role::Client, 1 << 20);
    head.drain(..pos);
    Some((wire, decoder, head))
}

/// `,"text":"…"` of about `bytes` bytes of chat-like words (empty for 0).
fn padding(bytes: usize) -> String {
    const WORDS: [&str; 12] = [
        "hello", "see", "you", "at", "the", "meeting", "tomorrow", "thanks", "sounds", "good", "running", "late",
    ];
    if bytes == 0 {
        return String::new();
    }
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < bytes {
        text.push_str(WORDS[(i * 7 + i / 5) % WORDS.len()]);
        text.push(' ');
        i += 1;
    }
    text.truncate(bytes);
    format!(r#","text":"{text}""#)
}

async fn read_shared(th: &Thread, stream: &mut TcpStream) -> std::io::Result<usize> {
    poll_fn(|cx| {
        let mut rx = th.rx.borrow_mut();
        Pin::new(&mut *stream).poll_read(cx, &mut rx[..])
    })
    .await
}

enum Wake {
    Read(std::io::Result<usize>),
    Send,
}

/// How a connection's session ended.
enum SessionEnd {
    /// The run is over (and the connection still up).
    Finished,
    /// The gateway closed it, or it broke.
    Broke,
    /// This run dropped it on purpose (`--drop-at`).
    Dropped,
}

async fn run_user(th: Rc<Thread>, local: usize, global: usize, cred: String, start: Instant, hold_end: Instant) {
    glommio::timer::sleep(start.saturating_duration_since(Instant::now())).await;
    let drain_end = hold_end + th.args.drain;
    let user = &th.users[local];
    // When the connection last broke (or was dropped): `ready` again measures recovery.
    let mut broke_at: Option<Instant> = None;
    let mut pause = Duration::from_millis(100);
    loop {
        let gateway = user.gateway.get();
        let Some((stream, decoder, pending)) = connect(&th, gateway, global, &cred).await else {
            th.report.borrow_mut().failed_handshakes += 1;
            if !th.args.reconnect || Instant::now() >= drain_end {
                return;
            }
            // That gateway may be gone: try the next, after a pause that grows to 1 s.
            user.gateway.set((gateway + 1) % th.args.gateways.len());
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            continue;
        };
        pause = Duration::from_millis(100);
        let u = UserConn::new(&th, local, global, hold_end, decoder, pending, broke_at);
        let end = session(&th, u, stream).await;
        match end {
            SessionEnd::Finished => {
                th.report.borrow_mut().connected_at_end += 1;
                return;
            }
            SessionEnd::Broke => {
                th.report.borrow_mut().unexpected_closes += 1;
                if !th.args.reconnect {
                    return;
                }
                // Elsewhere: the gateway that closed it may be going away.
                user.gateway.set((gateway + 1) % th.args.gateways.len());
            }
            SessionEnd::Dropped => {}
        }
        user.broke.set(true);
        broke_at = Some(Instant::now());
        th.report.borrow_mut().reconnects += 1;
    }
}

/// One connection's life: decode, answer, send on schedule, until the run ends or the
/// connection does.
async fn session(th: &Thread, mut u: UserConn<'_>, mut stream: Wire) -> SessionEnd {
    let end = loop {
        // Decode what arrived (the bytes after the 101 first), then answer it.
        let (events, closed, bad) = u.decode();
        u.on_received(events);
        if bad {
            th.report.borrow_mut().errors += 1;
        }
        if closed {
            break SessionEnd::Broke;
        }
        if !u.out.is_empty() {
            if stream.write_all(&u.out).await.is_err() {
                break SessionEnd::Broke;
            }
            u.out.clear();
        }
        let now = Instant::now();
        if u.drop_due(now) {
            let user = &th.users[u.local];
            user.drops.set(user.drops.get() + 1);
            // A reset, as a network fault would break it: no Close, no FIN.
            let _ = shardgate::sys::socket::reset_on_close(&stream.stream);
            break SessionEnd::Dropped;
        }
        if now >= u.hold_end {
            u.user().finished.set(true);
            let answered = !u.user().answers.borrow().contains(&Answer::Pending);
            if now >= u.drain_end || (answered && all_received(th, u.local, u.base)) {
                break SessionEnd::Finished;
            }
        }
        // Wait for data or the next send.
        let deadline = u.next_wake(now);
        let wake = futures_lite::future::or(async { Wake::Read(stream.read(th).await) }, async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            Wake::Send
        })
        .await;
        match wake {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => break SessionEnd::Broke,
            Wake::Read(Ok(n)) => u.last_read = n,
            Wake::Send => u.send_due(),
        }
    };
    if u.ready {
        th.live.set(th.live.get() - 1);
    }
    if let SessionEnd::Finished = end {
        let mut close = Vec::new();
        write_close(&mut close, shardgate::ws::CloseCode::NORMAL, "", Some(u.mask));
        let _ = stream.write_all(&close).await;
    }
    end
}

/// One simulated user's connection, between its reads and sends.
struct UserConn<'a> {
    th: &'a Thread,
    local: usize,
    global: usize,
    /// The first user of its group (pair or room).
    base: usize,
    room: String,
    mask: [u8; 4],
    interval: Duration,
    next_send: Instant,
    hold_end: Instant,
    drain_end: Instant,
    joined: bool,
    ready: bool,
    decoder: Decoder,
    /// What followed the 101 in the handshake's reads; decoded first.
    pending: Vec<u8>,
    /// Bytes of the shared buffer filled by the last read (decoded next).
    last_read: usize,
    /// When the previous connection broke, if this one replaces it.
    broke_at: Option<Instant>,
    /// When this user's connection is to be dropped (`--drop-at`), if it is.
    drop_at: Option<Instant>,
    /// Frames to send (pongs, joins, messages).
    out: Vec<u8>,
}

impl<'a> UserConn<'a> {
    fn new(
        th: &'a Thread,
        local: usize,
        global: usize,
        hold_end: Instant,
        decoder: Decoder,
        pending: Vec<u8>,
        broke_at: Option<Instant>,
    ) -> Self {
        let interval = Duration::from_secs_f64(1.0 / th.args.rate.max(1e-6));
        // Messages flow during the hold only (the ramp is for connecting), and the first
        // sends are spread over one interval so the load starts smooth.
        let hold_start = hold_end - th.args.duration;
        // The dropped share is picked by a low-discrepancy sequence: an even spread over
        // threads, gateways and groups. Each is dropped once per storm.
        let picked = ((th.offset + global) as f64 * 0.754_877_666_246_692_7).fract() < th.args.drop_share;
        let drop_at = th
            .args
            .drop_at
            .get(th.users[local].drops.get())
            .filter(|_| picked)
            .map(|d| hold_start + *d);
        UserConn {
            broke_at,
            drop_at,
            th,
            local,
            global,
            base: local - local % th.group,
            room: format!("{}-room-{}", th.args.prefix, (th.offset + global) / th.group),
            mask: (global as u32).wrapping_mul(2_654_435_761).to_be_bytes(),
            interval,
            next_send: hold_start.max(Instant::now()) + interval.mul_f64((global % 997) as f64 / 997.0),
            hold_end,
            drain_end: hold_end + th.args.drain,
            joined: th.args.mode == Mode::Direct,
            ready: false,
            decoder,
            pending,
            last_read: 0,
            out: Vec::with_capacity(256),
        }
    }

    fn user(&self) -> &'a User {
        &self.th.users[self.local]
    }

    /// Decodes what arrived; pongs go straight into `out`. Returns the chat frames, and
    /// whether the gateway closed or sent something unexpected.
    fn decode(&mut self) -> (Vec<Received>, bool, bool) {
        let mut events: Vec<Received> = Vec::new();
        let (mut closed, mut bad) = (false, false);
        let mut rx_guard;
        let input: &mut [u8] = if !self.pending.is_empty() {
            &mut self.pending[..]
        } else {
            rx_guard = self.th.rx.borrow_mut();
            &mut rx_guard[..self.last_read]
        };
        let (out, mask) = (&mut self.out, self.mask);
        let mut inflater = self.th.inflater.borrow_mut();
        let mut on_event = |e: Event<'_>| match e {
            Event::Message {
                opcode: OpCode::Text,
                payload,
            } => match serde_json::from_slice::<Incoming<'_>>(payload) {
                Ok(m) => events.push(Received {
                    kind: m.kind.to_string(),
                    seq: m.body.as_ref().map(|b| b.s),
                    sent_at: m.body.as_ref().map(|b| b.t),
                    from: m.from.map(str::to_string),
                    answer: m.id.and_then(|id| id.parse().ok()).map(|id| {
                        let answer = match (m.kind, m.status, m.code) {
                            // `stored` (the gateway's message store) promises what `routed`
                            // does, and durability besides.
                            ("ack", Some("routed" | "stored"), _) => Answer::Routed,
                            ("ack", Some("offline"), _) => Answer::Offline,
                            (_, _, Some("unavailable")) => Answer::Unavailable,
                            (_, _, Some("rate_limited")) => Answer::Limited,
                            _ => Answer::Other,
                        };
                        (id, answer)
                    }),
                }),
                Err(_) => bad = true,
            },
            Event::Close { .. } => closed = true,
            // Keepalive: a client that does not answer is closed by the gateway.
            Event::Ping(payload) => write_frame(out, true, OpCode::Pong, payload, Some(mask)),
            Event::Pong(_) => {}
            _ => bad = true,
        };
        // Compressed frames only where deflate was agreed (a protocol error elsewhere).
        let result = if self.th.args.deflate {
            self.decoder.feed_inflating(input, &mut inflater, &mut on_event)
        } else {
            self.decoder.feed(input, &mut on_event)
        };
        self.pending.clear();
        self.last_read = 0;
        (events, closed, bad || result.is_err())
    }

    fn on_received(&mut self, events: Vec<Received>) {
        let th = self.th;
        let now_us = th.micros();
        for r in events {
            match r.kind.as_str() {
                "ready" => {
                    self.ready = true;
                    th.live.set(th.live.get() + 1);
                    if let Some(at) = self.broke_at.take() {
                        let ms = at.elapsed().as_millis() as u64;
                        let mut report = th.report.borrow_mut();
                        report.recovery_ms = report.recovery_ms.max(ms);
                    }
                    self.user().ready.set(th.args.mode == Mode::Direct);
                    th.report.borrow_mut().connections_up += 1;
                    if th.args.mode == Mode::Room {
                        let join = format!(r#"{{"type":"join","room":"{}"}}"#, self.room);
                        send_json(&mut self.out, self.mask, &join);
                    }
                }
                "joined" => {
                    self.joined = true;
                    self.user().ready.set(true);
                }
                "message" | "room_message" => self.on_message(r, now_us),
                "ack" | "error" => {
                    let Some((id, answer)) = r.answer else {
                        th.report.borrow_mut().errors += 1;
                        continue;
                    };
                    if answer == Answer::Offline {
                        th.report.borrow_mut().offline += 1;
                    }
                    // Errors other than the refusals a fault explains are defects.
                    let expected = matches!(answer, Answer::Routed | Answer::Offline)
                        || (th.args.reconnect && matches!(answer, Answer::Unavailable | Answer::Limited));
                    if !expected {
                        th.report.borrow_mut().errors += 1;
                    }
                    if let Some(slot) = self.user().answers.borrow_mut().get_mut(id as usize) {
                        *slot = answer;
                    }
                }
                _ => th.report.borrow_mut().errors += 1,
            }
        }
    }

    /// A message from a member of the group: in order, and how late.
    fn on_message(&self, r: Received, now_us: u64) {
        let th = self.th;
        let (Some(s), Some(t), Some(from)) = (r.seq, r.sent_at, r.from) else {
            th.report.borrow_mut().errors += 1;
            return;
        };
        // Names carry global indices; groups are aligned on them.
        let sender = from.rsplit('-').next().and_then(|n| n.parse::<usize>().ok());
        let pos = sender
            .filter(|g| g / th.group == (th.offset + self.global) / th.group)
            .map(|g| g % th.group);
        match pos {
            Some(pos) => self.user().trackers.borrow_mut()[pos].record(s),
            None => th.report.borrow_mut().errors += 1,
        }
        let us = now_us.saturating_sub(t).max(1);
        let _ = th.interval.borrow_mut().record(us);
        let mut report = th.report.borrow_mut();
        let _ = report.latency.record(us);
        let me = gateway_of(&th.args, th.group, th.offset + self.global);
        if sender.is_some_and(|g| gateway_of(&th.args, th.group, g) != me) {
            report.cross_received += 1;
            let _ = report.cross_latency.record(us);
        }
        th.interval_received.set(th.interval_received.get() + 1);
    }

    fn drop_due(&self, now: Instant) -> bool {
        self.drop_at.is_some_and(|at| now >= at)
    }

    fn sending(&self, now: Instant) -> bool {
        now < self.hold_end && self.ready && self.joined
    }

    /// Until when to wait for input: the next send while sending, else the end of the
    /// hold, then the drain in steps of 100 ms.
    fn next_wake(&self, now: Instant) -> Instant {
        let wake = if self.sending(now) {
            self.next_send
        } else if now < self.hold_end {
            self.hold_end
        } else {
            self.drain_end.min(now + Duration::from_millis(100))
        };
        self.drop_at.map_or(wake, |at| wake.min(at))
    }

    /// Sends the next message if it is due and the whole group is ready for it.
    fn send_due(&mut self) {
        let th = self.th;
        let now = Instant::now();
        if now < self.next_send || !self.sending(now) {
            return;
        }
        self.next_send += self.interval;
        if !th.users[self.base..self.base + th.group].iter().all(|u| u.ready.get()) {
            return;
        }
        let user = self.user();
        let seq = user.sent.get();
        let t = th.micros();
        let pad = &th.padding;
        let msg = match th.args.mode {
            Mode::Direct => format!(
                r#"{{"type":"send","to":"{}","id":"{seq}","body":{{"s":{seq},"t":{t}{pad}}}}}"#,
                th.users[self.local ^ 1].name
            ),
            Mode::Room => format!(
                r#"{{"type":"publish","room":"{}","id":"{seq}","body":{{"s":{seq},"t":{t}{pad}}}}}"#,
                self.room
            ),
        };
        if th.args.deflate && msg.len() >= th.args.deflate_min_size {
            send_deflated(&mut self.out, self.mask, &msg, &mut th.deflater.borrow_mut());
        } else {
            send_json(&mut self.out, self.mask, &msg);
        }
        user.sent.set(seq + 1);
        user.answers.borrow_mut().push(Answer::Pending);
        th.report.borrow_mut().sent += 1;
        th.interval_sent.set(th.interval_sent.get() + 1);
    }
}

fn send_json(out: &mut Vec<u8>, mask: [u8; 4], json: &str) {
    write_frame(out, true, OpCode::Text, json.as_bytes(), Some(mask));
}

/// A text frame compressed (RSV1), or plain when deflate does not shrink it.
fn send_deflated(out: &mut Vec<u8>, mask: [u8; 4], json: &str, deflater: &mut Deflater) {
    match deflater.deflate(json.as_bytes(), 15) {
        Some(deflated) => {
            let at = out.len();
            write_frame(out, true, OpCode::Text, deflated, Some(mask));
            out[at] |= RSV1;
        }
        None => send_json(out, mask, json),
    }
}

/// Has `local` received everything its group sent it?
fn all_received(th: &Thread, local: usize, base: usize) -> bool {
    let trackers = th.users[local].trackers.borrow();
    (0..th.group).filter(|&p| base + p != local).all(|p| {
        let sender = &th.users[base + p];
        sender.finished.get() && trackers[p].received >= sender.sent.get()
    })
}
