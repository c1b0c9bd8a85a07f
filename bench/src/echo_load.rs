//! echo-load: an echo load generator for WebSocket servers.
//!
//! Opens N connections to an echo endpoint, keeps a window of W messages of S bytes in
//! flight on each, and reports messages per second and round-trip percentiles from an HDR
//! histogram. One thread per CPU: connections are made on glommio, then each thread drives
//! its connections outside glommio's reactor, from an edge-triggered epoll set like
//! uWebSockets' `load_test` (or through io_uring, `--io uring`), so that the server
//! rather than the client is what runs out of CPU (`drive`). `--idle` only opens and
//! holds the connections (for measuring the server's memory per connection);
//! `--handshakes` measures new connections per second, each doing an upgrade, one echo and
//! a close (on glommio). `--tls` speaks `wss://` (rustls, no certificate check).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use rustls::{ClientConfig, ClientConnection};
use shardgate::sys::socket::{self, Push};
use shardgate::ws::deflate::{accepted_in_response, Deflater, Inflater, EXTENSION, RSV1};
use shardgate::ws::{write_frame, Decoder, Event, OpCode, Role};
use shardgate_bench::tls_client;
use std::sync::Arc;

#[path = "echo_load/drive.rs"]
mod drive;
use drive::Io;

#[derive(Debug, Clone, Parser)]
#[command(name = "echo-load", about = "WebSocket echo load generator")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Request path of the echo endpoint.
    #[arg(long, default_value = "/echo")]
    path: String,
    /// Connections, spread over the client threads.
    #[arg(short, long, default_value_t = 100)]
    connections: usize,
    /// Payload bytes per message.
    #[arg(short, long, default_value_t = 20)]
    size: usize,
    /// Messages in flight per connection.
    #[arg(short, long, default_value_t = 1)]
    window: usize,
    /// Measured time, after the warm-up.
    #[arg(short, long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time running before measuring starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// CPUs the client threads are pinned to, one thread each (e.g. `1` or `0,1`).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    cpus: Vec<usize>,
    /// Send text frames instead of binary (the payload is ASCII).
    #[arg(long)]
    text: bool,
    /// Only open the connections and hold them for --duration; print when all are up.
    #[arg(long)]
    idle: bool,
    /// Measure handshakes: each of --connections loops connect, upgrade, one echo, close.
    #[arg(long, conflicts_with = "idle")]
    handshakes: bool,
    /// Offer permessage-deflate (the server must accept it, with no context takeover) and
    /// send every message compressed; echoes are inflated.
    #[arg(long)]
    deflate: bool,
    /// The payload: `letters` (a-z repeated) or `json` (chat-like JSON text, which
    /// compresses about as real chat traffic does).
    #[arg(long, value_enum, default_value_t = Payload::Letters)]
    payload: Payload,
    /// Connect with TLS (`wss://`; the server's `--listen-tls` address as --addr). Every
    /// handshake is a full one unless --tls-resume.
    #[arg(long)]
    tls: bool,
    /// With --tls: keep sessions and resume them (a thread's connections share a store).
    #[arg(long, requires = "tls")]
    tls_resume: bool,
    /// How the connections are driven once upgraded: epoll (a `recv` and a `sendmsg` per
    /// socket, like uWebSockets' `load_test`) or io_uring (multishot receives, one batch
    /// of sends per pass). With --tls always epoll.
    #[arg(long, value_enum, default_value_t = Io::Epoll)]
    io: Io,
}

/// A connected, upgraded stream, with its TLS state under `--tls`.
type Upgraded = (TcpStream, Option<ClientConnection>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Payload {
    Letters,
    Json,
}

/// `size` bytes of the chosen payload; `json` is text (chat messages in a JSON array).
fn make_payload(kind: Payload, size: usize) -> Vec<u8> {
    match kind {
        Payload::Letters => (0..size).map(|i| b'a' + (i % 26) as u8).collect(),
        Payload::Json => {
            const WORDS: [&str; 16] = [
                "hello", "see", "you", "at", "the", "meeting", "tomorrow", "thanks", "ok", "sure", "lunch", "noon",
                "sounds", "good", "running", "late",
            ];
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut out = String::from("[");
            while out.len() < size {
                let words: Vec<&str> = (0..3 + next() % 10).map(|_| WORDS[(next() % 16) as usize]).collect();
                out.push_str(&format!(
                    r#"{{"type":"msg","conv":"dm:user-{}:user-{}","seq":{},"from":"user-{}","id":"{:x}","body":{{"text":"{}"}}}},"#,
                    next() % 100_000,
                    next() % 100_000,
                    next() % 1_000_000,
                    next() % 100_000,
                    next() as u32,
                    words.join(" ")
                ));
            }
            let mut bytes = out.into_bytes();
            bytes.truncate(size);
            bytes
        }
    }
}

/// One masked message frame: compressed (RSV1) with `deflate`.
fn encode_message(opcode: OpCode, payload: &[u8], mask: [u8; 4], deflate: bool) -> Vec<u8> {
    let mut frame = Vec::new();
    let deflated = deflate
        .then(|| Deflater::new(1).deflate(payload, 15).map(<[u8]>::to_vec))
        .flatten();
    match deflated {
        Some(d) => {
            write_frame(&mut frame, true, opcode, &d, Some(mask));
            frame[0] |= RSV1;
        }
        None => write_frame(&mut frame, true, opcode, payload, Some(mask)),
    }
    frame
}

#[derive(Default)]
struct Stats {
    messages: u64,
    failed: u64,
    /// Bytes received in the measured window (echo frames, headers included).
    rx_bytes: u64,
}

fn main() {
    let args = Args::parse();
    if args.connections == 0 || args.window == 0 || args.cpus.is_empty() {
        eprintln!("echo-load: --connections, --window and --cpus must not be empty");
        std::process::exit(2);
    }
    let threads = args.cpus.len();

    let handles: Vec<_> = args
        .cpus
        .iter()
        .enumerate()
        .map(|(i, &cpu)| {
            let share = args.connections / threads + usize::from(i < args.connections % threads);
            let args = args.clone();
            LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("load-{i}"))
                .io_memory(1 << 20)
                .spawn(move || async move { run_thread(args, share).await })
                .unwrap_or_else(|e| {
                    eprintln!("echo-load: cannot start a client thread on cpu {cpu}: {e}");
                    std::process::exit(2)
                })
        })
        .collect();
    let mut hist = new_histogram();
    let mut total = Stats::default();
    for h in handles {
        match h.join() {
            Ok((part, stats)) => {
                hist.add(&part).expect("histograms share their bounds");
                total.messages += stats.messages;
                total.failed += stats.failed;
                total.rx_bytes += stats.rx_bytes;
            }
            Err(e) => {
                eprintln!("echo-load: a client thread failed: {e}");
                std::process::exit(1);
            }
        }
    }
    print_summary(&args, &total, &hist);
    if total.failed > 0 {
        std::process::exit(1);
    }
}

/// The one line a run ends with: `key=value` fields that scripts read.
fn print_summary(args: &Args, total: &Stats, hist: &Histogram<u64>) {
    if args.idle {
        println!(
            "echo-load: held {} idle connections ({} failed) for {:?}",
            args.connections - total.failed as usize,
            total.failed,
            args.duration
        );
        return;
    }
    let secs = args.duration.as_secs_f64();
    let what = if args.handshakes {
        format!("mode=handshakes concurrency={} size={}", args.connections, args.size)
    } else {
        format!(
            "io={} connections={} size={} window={} payload={:?} deflate={} echo_bytes_per_msg={:.0}",
            drive::io_for(args).name(),
            args.connections,
            args.size,
            args.window,
            args.payload,
            args.deflate,
            total.rx_bytes as f64 / total.messages.max(1) as f64
        )
    };
    let (count, rate) = if args.handshakes {
        ("handshakes", "handshakes_per_s")
    } else {
        ("messages", "msg_per_s")
    };
    println!(
        "echo-load: {what} client_cpus={:?} duration={secs:.1}s {count}={} {rate}={:.0} p50_us={} p99_us={} p999_us={} max_us={} failed_connections={}",
        args.cpus,
        total.messages,
        total.messages as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        total.failed,
    );
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

async fn run_thread(args: Args, connections: usize) -> (Histogram<u64>, Stats) {
    let args = Rc::new(args);
    let tls = args.tls.then(|| tls_client::client_config(args.tls_resume));
    let hist = Rc::new(RefCell::new(new_histogram()));
    let messages = Rc::new(Cell::new(0u64));
    let mut rx_bytes = 0;
    let failed = if args.handshakes {
        let (measure_from, deadline) = measured_window(&args);
        let tasks: Vec<_> = (0..connections)
            .map(|i| {
                glommio::spawn_local(handshake_loop(
                    args.clone(),
                    tls.clone(),
                    i as u32,
                    measure_from,
                    deadline,
                    hist.clone(),
                    messages.clone(),
                ))
            })
            .collect();
        let mut failed = 0;
        for t in tasks {
            failed += t.await;
        }
        failed
    } else {
        // Connect everything first, so the measured phase sees a steady population.
        let mut streams = Vec::with_capacity(connections);
        let mut failed = 0u64;
        for chunk in (0..connections).collect::<Vec<_>>().chunks(256) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|_| glommio::spawn_local(connect(args.clone(), tls.clone())))
                .collect();
            for t in tasks {
                match t.await {
                    Ok(s) => streams.push(s),
                    Err(e) => {
                        failed += 1;
                        eprintln!("echo-load: connection failed: {e}");
                    }
                }
            }
        }
        if args.idle {
            println!("echo-load: {} connections up", streams.len());
            glommio::timer::sleep(args.duration).await;
            return (
                new_histogram(),
                Stats {
                    messages: 0,
                    failed,
                    rx_bytes: 0,
                },
            );
        }
        let (measure_from, deadline) = measured_window(&args);
        let driven = drive::drive(&args, &mut streams, measure_from, deadline, &mut hist.borrow_mut());
        messages.set(driven.messages);
        rx_bytes = driven.received;
        failed += driven.failed;
        // The closing handshake is not waited for: the measured window is over.
        let mut close = Vec::new();
        shardgate::ws::write_close(&mut close, shardgate::ws::CloseCode::NORMAL, "", Some([1, 2, 3, 4]));
        for (s, tls) in &mut streams {
            match tls {
                Some(conn) => {
                    if std::io::Write::write_all(&mut conn.writer(), &close).is_ok() {
                        let _ = tls_client::flush(s.as_raw_fd(), conn);
                    }
                }
                None => {
                    let _ = socket::send(s.as_raw_fd(), &close, Push::Now);
                }
            }
        }
        drop(streams);
        failed
    };
    let hist = hist.borrow().clone();
    (
        hist,
        Stats {
            messages: messages.get(),
            failed,
            rx_bytes,
        },
    )
}

/// When measuring starts (after the warm-up) and when the run ends.
fn measured_window(args: &Args) -> (Instant, Instant) {
    let measure_from = Instant::now() + args.warmup;
    (measure_from, measure_from + args.duration)
}

async fn connect(args: Rc<Args>, tls: Option<Arc<ClientConfig>>) -> std::io::Result<Upgraded> {
    let mut stream = TcpStream::connect(args.addr).await?;
    stream.set_nodelay(true)?;
    let mut tls = match tls {
        Some(config) => {
            let mut conn = tls_client::connection(&config)?;
            tls_client::handshake(&mut stream, &mut conn).await?;
            Some(conn)
        }
        None => None,
    };
    let offer = if args.deflate {
        format!("Sec-WebSocket-Extensions: {EXTENSION}; client_no_context_takeover\r\n")
    } else {
        String::new()
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
        args.path, args.addr
    );
    write_all(&mut stream, &mut tls, request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read(&mut stream, &mut tls, &mut head).await?;
        if n == 0 || head.len() > 8192 {
            return Err(std::io::Error::other("no 101 from the server"));
        }
    }
    if !head.starts_with(b"HTTP/1.1 101 ") {
        return Err(std::io::Error::other(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&head[..head.len().min(80)])
        )));
    }
    if args.deflate && accepted_in_response(&head).is_none() {
        return Err(std::io::Error::other(
            "the server did not accept permessage-deflate without context takeover (is it run with --deflate?)",
        ));
    }
    Ok((stream, tls))
}

/// Writes all of `bytes`, sealed with TLS when there is `tls`.
async fn write_all(stream: &mut TcpStream, tls: &mut Option<ClientConnection>, bytes: &[u8]) -> std::io::Result<()> {
    match tls {
        Some(conn) => tls_client::write_all(stream, conn, bytes).await,
        None => stream.write_all(bytes).await,
    }
}

/// Reads what comes (opened, with TLS) and appends it to `into`; 0 at the end.
async fn read(
    stream: &mut TcpStream,
    tls: &mut Option<ClientConnection>,
    into: &mut Vec<u8>,
) -> std::io::Result<usize> {
    match tls {
        Some(conn) => tls_client::read(stream, conn, into).await,
        None => {
            let mut buf = [0u8; 16 * 1024];
            let n = stream.read(&mut buf).await?;
            into.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }
}

/// Decodes what the server sent, inflating compressed messages when `inflater` is given
/// (deflate was agreed; without it a compressed frame is a protocol error).
fn decode<F: FnMut(Event<'_>)>(
    decoder: &mut Decoder,
    input: &mut [u8],
    inflater: Option<&mut Inflater>,
    on_event: &mut F,
) -> Result<(), shardgate::ws::ProtocolError> {
    match inflater {
        Some(inflater) => decoder.feed_inflating(input, inflater, on_event),
        None => decoder.feed(input, on_event),
    }
}

/// Connects, upgrades, echoes one message and closes, again and again until `deadline`;
/// counts the cycles completed in the measured window and returns the failures.
async fn handshake_loop(
    args: Rc<Args>,
    tls: Option<Arc<ClientConfig>>,
    seed: u32,
    measure_from: Instant,
    deadline: Instant,
    hist: Rc<RefCell<Histogram<u64>>>,
    done: Rc<Cell<u64>>,
) -> u64 {
    let payload = make_payload(args.payload, args.size);
    let mask = (seed.wrapping_mul(2_654_435_761) | 1).to_be_bytes();
    let frame = encode_message(OpCode::Binary, &payload, mask, args.deflate);
    let mut inflater = Inflater::new();
    let mut close = Vec::new();
    shardgate::ws::write_close(&mut close, shardgate::ws::CloseCode::NORMAL, "", Some(mask));
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut failed = 0;
    while Instant::now() < deadline {
        let start = Instant::now();
        let cycle = async {
            let (mut stream, mut tls) = connect(args.clone(), tls.clone()).await?;
            // One echo, then the closing handshake: our Close, the server's answer.
            write_all(&mut stream, &mut tls, &frame).await?;
            let mut decoder = Decoder::new(Role::Client, usize::MAX);
            let (mut echoed, mut closed) = (false, false);
            while !closed {
                buf.clear();
                let n = read(&mut stream, &mut tls, &mut buf).await?;
                if n == 0 {
                    break;
                }
                let was_echoed = echoed;
                let inflater = args.deflate.then_some(&mut inflater);
                let result = decode(&mut decoder, &mut buf[..n], inflater, &mut |event| match event {
                    Event::Message { payload: p, .. } if p.len() == args.size => echoed = true,
                    Event::Close { .. } => closed = true,
                    _ => {}
                });
                if result.is_err() {
                    return Err(std::io::Error::other("unexpected frame from the server"));
                }
                if echoed && !was_echoed {
                    write_all(&mut stream, &mut tls, &close).await?;
                }
            }
            if echoed && closed {
                Ok(())
            } else {
                Err(std::io::Error::other("the echo or the server's Close did not come"))
            }
        };
        match cycle.await {
            Ok(()) => {
                let end = Instant::now();
                if start >= measure_from && end < deadline {
                    done.set(done.get() + 1);
                    let _ = hist
                        .borrow_mut()
                        .record(end.duration_since(start).as_micros().max(1) as u64);
                }
            }
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("echo-load: handshake cycle failed: {e}");
                }
            }
        }
    }
    failed
}
