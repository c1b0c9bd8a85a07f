//! room-fanout: one room of many members, publishes into it, and how long each takes to
//! reach every member.
//!
//! Opens `--members` chat connections (dev auth: the gateway runs with
//! `--insecure-dev-auth`), has each join one room, then a publisher joins it too and
//! publishes `--publishes` messages, one every `--interval`. Every member timestamps each
//! message it receives against the publish time written in its body (one clock: client
//! threads share it). Prints the delivery latency (publish → member) over all deliveries,
//! the time each publish took to reach its last member, members reached per second, lost
//! deliveries, and the client's own CPU over the publishes.
//!
//! Thread-per-core on glommio (`--cpus`); members are spread over the threads, and the
//! gateway's `SO_REUSEPORT` listeners spread them over its shards, so that a publish
//! crosses shards.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use shardgate::ws::{write_frame, Decoder, Event, OpCode, Role};
use shardgate_bench::accounting::new_histogram;
use shardgate_bench::gather_response_head;

#[derive(Debug, Clone, Parser)]
#[command(name = "room-fanout", about = "publishes into one large room and times the fan-out")]
struct Args {
    /// The gateway (run with --insecure-dev-auth).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Members of the room (connections), besides the publisher.
    #[arg(short, long, default_value_t = 10_000)]
    members: usize,
    /// Messages the publisher sends.
    #[arg(short, long, default_value_t = 50)]
    publishes: usize,
    /// Time between publishes.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long members wait for what is still missing after the last publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// One client thread per CPU listed.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    cpus: Vec<usize>,
    /// Local addresses client sockets bind to, in turn (loopback: 127.0.0.2,127.0.0.3,…).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    #[arg(long, default_value = "fanout")]
    room: String,
    /// Connections a thread opens at a time.
    #[arg(long, default_value_t = 200)]
    concurrency: u64,
}

/// What all threads share.
struct Shared {
    epoch: Instant,
    /// Members that joined the room.
    joined: AtomicUsize,
    /// Members that could not connect or join.
    failed: AtomicUsize,
    /// When (µs since `epoch`) members stop waiting; `u64::MAX` until the last publish.
    give_up_at: AtomicU64,
}

impl Shared {
    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// One client thread's figures.
struct Part {
    latency: Histogram<u64>,
    /// Per publish: members that received it, and when the last of them did (µs).
    reached: Vec<u64>,
    last_at: Vec<u64>,
    /// When each publish left (µs; the publisher's thread alone has them).
    published_at: Vec<u64>,
    /// Members that lost their connection before the end.
    broken: u64,
}

struct Thread {
    args: Args,
    shared: Arc<Shared>,
    rx: RefCell<Vec<u8>>,
    latency: RefCell<Histogram<u64>>,
    reached: RefCell<Vec<u64>>,
    last_at: RefCell<Vec<u64>>,
    published_at: RefCell<Vec<u64>>,
    broken: Cell<u64>,
    connecting: Semaphore,
}

fn main() {
    let args = Args::parse();
    if args.members == 0 || args.publishes == 0 || args.cpus.is_empty() {
        eprintln!("room-fanout: --members, --publishes and --cpus must not be empty or zero");
        std::process::exit(2);
    }
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        joined: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        give_up_at: AtomicU64::new(u64::MAX),
    });
    let threads = args.cpus.len();
    let cpu_before = process_cpu_seconds();
    let handles: Vec<_> = args
        .cpus
        .iter()
        .enumerate()
        .map(|(i, &cpu)| {
            let share = args.members / threads + usize::from(i < args.members % threads);
            let first = (0..i)
                .map(|j| args.members / threads + usize::from(j < args.members % threads))
                .sum::<usize>();
            let (args, shared) = (args.clone(), shared.clone());
            LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("fanout-{i}"))
                .io_memory(1 << 20)
                .spawn(move || async move { run_thread(args, shared, i, first, share).await })
                .unwrap_or_else(|e| {
                    eprintln!("room-fanout: cannot start a client thread on cpu {cpu}: {e}");
                    std::process::exit(2)
                })
        })
        .collect();
    let mut parts = Vec::new();
    for h in handles {
        match h.join() {
            Ok(part) => parts.push(part),
            Err(e) => {
                eprintln!("room-fanout: a client thread failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let cpu = process_cpu_seconds() - cpu_before;
    let clean = report(&args, &shared, &parts, cpu);
    if !clean {
        std::process::exit(1);
    }
}

async fn run_thread(args: Args, shared: Arc<Shared>, index: usize, first: usize, share: usize) -> Part {
    let th = Rc::new(Thread {
        rx: RefCell::new(vec![0; 256 * 1024]),
        latency: RefCell::new(new_histogram()),
        reached: RefCell::new(vec![0; args.publishes]),
        last_at: RefCell::new(vec![0; args.publishes]),
        published_at: RefCell::new(Vec::new()),
        broken: Cell::new(0),
        connecting: Semaphore::new(args.concurrency),
        args,
        shared,
    });
    let mut tasks: Vec<_> = (first..first + share)
        .map(|m| glommio::spawn_local(member(th.clone(), m)))
        .collect();
    if index == 0 {
        tasks.push(glommio::spawn_local(publisher(th.clone())));
    }
    for t in tasks {
        t.await;
    }
    Part {
        latency: th.latency.replace(new_histogram()),
        reached: th.reached.take(),
        last_at: th.last_at.take(),
        published_at: th.published_at.take(),
        broken: th.broken.get(),
    }
}

/// A member: connect, join, then count what arrives until every publish did or the
/// publisher's deadline passed.
async fn member(th: Rc<Thread>, m: usize) {
    let joined = {
        let _permit = th.connecting.acquire_permit(1).await;
        connect_and_join(&th, &format!("fanout-member-{m}"), m).await
    };
    let Some((mut stream, mut decoder)) = joined else {
        th.shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    th.shared.joined.fetch_add(1, Ordering::Relaxed);
    let mut received = 0;
    let mut pongs = Vec::new();
    while received < th.args.publishes {
        if th.shared.micros() >= th.shared.give_up_at.load(Ordering::Relaxed) {
            return;
        }
        let n = match read(&th, &mut stream).await {
            Ok(0) => {
                th.broken.set(th.broken.get() + 1);
                return;
            }
            Ok(n) => n,
            // The read timeout: look at the deadline again.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => {
                th.broken.set(th.broken.get() + 1);
                return;
            }
        };
        let now = th.shared.micros();
        let fed = decoder.feed(&mut th.rx.borrow_mut()[..n], &mut |event| match event {
            Event::Message { payload, .. } => {
                if let Some((i, sent_at)) = publish_stamp(payload) {
                    if let Some(count) = th.reached.borrow_mut().get_mut(i) {
                        *count += 1;
                        received += 1;
                        let mut last = th.last_at.borrow_mut();
                        last[i] = last[i].max(now);
                        let _ = th.latency.borrow_mut().record(now.saturating_sub(sent_at).max(1));
                    }
                }
            }
            Event::Ping(payload) => write_frame(&mut pongs, true, OpCode::Pong, payload, Some(MASK)),
            Event::Pong(_) | Event::Close { .. } => {}
        });
        if fed.is_err() {
            th.broken.set(th.broken.get() + 1);
            return;
        }
        if !pongs.is_empty() {
            if stream.write_all(&pongs).await.is_err() {
                th.broken.set(th.broken.get() + 1);
                return;
            }
            pongs.clear();
        }
    }
}

/// The publisher: joins once every member has joined (or failed), then publishes one
/// message every interval, its index and the time in the body.
async fn publisher(th: Rc<Thread>) {
    let Some((mut stream, _decoder)) = connect_and_join(&th, "fanout-publisher", 0).await else {
        eprintln!("room-fanout: the publisher could not join");
        th.shared.give_up_at.store(0, Ordering::Relaxed);
        return;
    };
    let shared = &th.shared;
    // Members join on every thread; the only signal across threads is the counters.
    while shared.joined.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < th.args.members {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    let mut frame = Vec::new();
    let start = Instant::now();
    for i in 0..th.args.publishes {
        glommio::timer::sleep((start + th.args.interval * i as u32).saturating_duration_since(Instant::now())).await;
        let at = shared.micros();
        th.published_at.borrow_mut().push(at);
        let body = format!(
            r#"{{"type":"publish","room":"{}","id":"p{i}","body":{{"i":{i},"t":{at}}}}}"#,
            th.args.room
        );
        frame.clear();
        write_frame(&mut frame, true, OpCode::Text, body.as_bytes(), Some(MASK));
        if stream.write_all(&frame).await.is_err() {
            eprintln!("room-fanout: the publisher's connection broke");
            break;
        }
        // Its acks are read (and dropped) so that they never fill its socket.
        drain_now(&th, &stream);
    }
    let until = shared.micros() + th.args.drain.as_micros() as u64;
    shared.give_up_at.store(until, Ordering::Relaxed);
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Connects, upgrades, joins the room and waits for `joined`.
async fn connect_and_join(th: &Thread, user: &str, n: usize) -> Option<(TcpStream, Decoder)> {
    let addr = th.args.addr;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).ok()?;
    if !th.args.source_ips.is_empty() {
        let _ = shardgate::sys::socket::set_bind_address_no_port(&socket);
        socket
            .bind(&SocketAddr::new(th.args.source_ips[n % th.args.source_ips.len()], 0).into())
            .ok()?;
    }
    let _ = socket.set_nodelay(true);
    socket.set_nonblocking(true).ok()?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(_) => return None,
    }
    let mut stream = shardgate::sys::socket::glommio_stream(socket.into());
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let request = format!(
        "GET /ws?user={user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let end = loop {
        let n = read(th, &mut stream).await.ok()?;
        if let Some(end) = gather_response_head(&mut head, &th.rx.borrow()[..n])? {
            break end;
        }
    };
    if !head.starts_with(b"HTTP/1.1 101 ") {
        return None;
    }
    let mut frame = Vec::new();
    let join = format!(r#"{{"type":"join","room":"{}"}}"#, th.args.room);
    write_frame(&mut frame, true, OpCode::Text, join.as_bytes(), Some(MASK));
    stream.write_all(&frame).await.ok()?;
    let mut decoder = Decoder::new(Role::Client, 1 << 20);
    let mut input = head.split_off(end);
    loop {
        let mut joined = false;
        let mut refused = false;
        decoder
            .feed(&mut input, &mut |event| {
                if let Event::Message { payload, .. } = event {
                    joined |= contains(payload, br#""type":"joined""#);
                    refused |= contains(payload, br#""type":"error""#);
                }
            })
            .ok()?;
        if refused {
            eprintln!("room-fanout: {user} could not join {}", th.args.room);
            return None;
        }
        if joined {
            stream.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
            return Some((stream, decoder));
        }
        let n = read(th, &mut stream).await.ok()?;
        if n == 0 {
            return None;
        }
        input.clear();
        input.extend_from_slice(&th.rx.borrow()[..n]);
    }
}

/// Reads into the thread's shared buffer.
async fn read(th: &Thread, stream: &mut TcpStream) -> std::io::Result<usize> {
    poll_fn(|cx| {
        let mut rx = th.rx.borrow_mut();
        Pin::new(&mut *stream).poll_read(cx, &mut rx[..])
    })
    .await
}

/// Takes whatever is readable now without waiting (the publisher's acks), until nothing
/// is there, the stream ended or it failed (a lost publisher shows as missing deliveries).
fn drain_now(th: &Thread, stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let mut rx = th.rx.borrow_mut();
    while let Ok(1..) = shardgate::sys::socket::recv(stream.as_raw_fd(), &mut rx[..]) {}
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The publish index and time a room message carries in its body (`"body":{"i":I,"t":T}`).
fn publish_stamp(message: &[u8]) -> Option<(usize, u64)> {
    let at = message.windows(12).position(|w| w == br#""body":{"i":"#)? + 12;
    let (i, rest) = number(&message[at..])?;
    let rest = rest.strip_prefix(br#","t":"#)?;
    let (t, _) = number(rest)?;
    Some((usize::try_from(i).ok()?, t))
}

fn number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&bytes[..digits]).ok()?.parse().ok()?;
    Some((n, &bytes[digits..]))
}

/// User and system CPU seconds of this process so far.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Prints the run's figures; true when every member got every publish.
fn report(args: &Args, shared: &Shared, parts: &[Part], cpu_seconds: f64) -> bool {
    let mut latency = new_histogram();
    let mut reached = vec![0u64; args.publishes];
    let mut last_at = vec![0u64; args.publishes];
    let mut published_at = Vec::new();
    let mut broken = 0;
    for p in parts {
        latency.add(&p.latency).expect("histograms share their bounds");
        for i in 0..args.publishes {
            reached[i] += p.reached[i];
            last_at[i] = last_at[i].max(p.last_at[i]);
        }
        published_at.extend_from_slice(&p.published_at);
        broken += p.broken;
    }
    let joined = shared.joined.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let expected = (joined * published_at.len()) as u64;
    let delivered: u64 = reached.iter().sum();
    // Per publish: from when it left to when its last member had it.
    let mut to_all = new_histogram();
    for ((&sent, &last), &members) in published_at.iter().zip(&last_at).zip(&reached) {
        if members > 0 {
            let _ = to_all.record(last.saturating_sub(sent).max(1));
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let median_to_all = to_all.value_at_quantile(0.5).max(1);
    println!(
        "room-fanout: {} members ({} failed to join), {} publishes every {:?}, client threads on CPUs {:?}",
        joined,
        failed,
        published_at.len(),
        args.interval,
        args.cpus
    );
    println!(
        "deliveries: {delivered} of {expected} ({} lost), {broken} connections broke",
        expected.saturating_sub(delivered)
    );
    println!(
        "delivery latency (publish -> member): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.value_at_quantile(0.999)),
        ms(latency.max())
    );
    println!(
        "time to reach every member, per publish: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(median_to_all),
        ms(to_all.value_at_quantile(0.99)),
        ms(to_all.max())
    );
    println!(
        "members reached per second within a publish: {:.0} (members / median time to reach all)",
        joined as f64 / (median_to_all as f64 / 1e6)
    );
    println!("client CPU: {cpu_seconds:.2} s in all");
    println!(
        "room-fanout-summary {{\"members\":{joined},\"failed\":{failed},\"publishes\":{},\"delivered\":{delivered},\"expected\":{expected},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"to_all_p50_ms\":{:.3},\"to_all_p99_ms\":{:.3},\"members_per_s\":{:.0},\"client_cpu_s\":{cpu_seconds:.2}}}",
        published_at.len(),
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.value_at_quantile(0.999)),
        ms(median_to_all),
        ms(to_all.value_at_quantile(0.99)),
        joined as f64 / (median_to_all as f64 / 1e6)
    );
    failed == 0 && broken == 0 && published_at.len() == args.publishes && delivered == expected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_message_gives_its_publish_index_and_time() {
        let msg = br#"{"type":"room_message","conv":"room:fanout","seq":7,"room":"fanout","from":"p","id":"p3","ts":1,"body":{"i":3,"t":123456}}"#;
        assert_eq!(publish_stamp(msg), Some((3, 123_456)));
        assert_eq!(publish_stamp(br#"{"type":"ack","id":"p3"}"#), None);
        assert_eq!(publish_stamp(br#"{"body":{"i":3}}"#), None);
    }
}
