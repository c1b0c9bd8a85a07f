//! store-load: shardgate's own message store (`EmbeddedStore`, as the store thread drives
//! it: sequencing, heads, the users' conversation index, client ids), measured alone.
//!
//! - `append`: messages of `--payload` bytes over `--conversations` direct conversations,
//!   appended in groups of each `--batches` size with one sync each: messages/s, syncs/s,
//!   group commit p50/p99, bytes on disk per message.
//! - `catch-up`: one user with `--messages` stored over `--conversations` conversations
//!   fetches them all as a client would (list its conversations, then pages of 1,000):
//!   wall time and the thread's CPU time.
//! - `restart`: `--messages` stored, the store closed and opened again: time to open and
//!   to the first append.
//!   With `--redis URL`, the same on the Redis store (one pipeline per group: the syncs
//!   column is then round trips, and the last Redis's memory per message).
//! - `fill`: only stores `--messages` (for a gateway to serve them: `--dir` is then the
//!   gateway's `--data-dir` followed by `/messages`; `scripts/bench-catch-up.sh`); with
//!   `--crash` it ends as a crash would, without closing the store.
//! - `open`: opens the store in `--dir` as it is (after `fill --crash`: the log's replay)
//!   and appends once: time to open and to the first append.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use shardgate::store::embedded::EmbeddedStore;
use shardgate::store::redis::RedisStore;
use shardgate::store::{ConvId, MessageStore, NewMessage, Range, Retention};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Case {
    Append,
    CatchUp,
    Restart,
    Fill,
    Open,
}

#[derive(Debug, Parser)]
#[command(name = "store-load", about = "shardgate's embedded message store, alone")]
struct Args {
    #[arg(value_enum)]
    case: Case,
    /// Messages per group (one sync each), for `append`.
    #[arg(long, value_delimiter = ',', default_value = "1,64,4096")]
    batches: Vec<usize>,
    /// How long each `append` case runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    #[arg(long, default_value_t = 1_000)]
    conversations: u64,
    /// Messages stored first, for `catch-up` and `restart`.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// `fill` ends as a crash would (no close: the log is left as it was, for `open` to
    /// replay).
    #[arg(long)]
    crash: bool,
    /// Where the store goes (emptied first, except for `open`).
    #[arg(long, default_value = "target/store-load")]
    dir: PathBuf,
    /// `append` on the Redis store at this URL (`redis://…` or `redis+cluster://seed,…`)
    /// instead: its servers are flushed first, and the last column is then their memory
    /// per message.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

const KEEP_ALL: Retention = Retention {
    max_age: Duration::ZERO,
    max_messages: 0,
};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir, KEEP_ALL, Duration::from_secs(300)).expect("open the store")
}

fn fresh(dir: &Path) -> EmbeddedStore {
    let _ = std::fs::remove_dir_all(dir);
    open(dir)
}

/// Message `n`: from `reader`'s peer `n % conversations` to `reader`, with a client id,
/// and a body of `template`'s length and quotes but letters of its own (bodies that repeat
/// would compress away on disk).
fn message(n: u64, conversations: u64, template: &[u8]) -> NewMessage {
    let peer = format!("peer{}", n % conversations);
    let mut body = template.to_vec();
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let letters = body.len().saturating_sub(1);
    for c in body.iter_mut().take(letters).skip(1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *c = b'a' + (x % 26) as u8;
    }
    NewMessage {
        conv: ConvId::direct(&peer, "reader"),
        from: peer,
        client_id: Some(format!("m{n}")),
        ts_ms: now_ms(),
        body,
    }
}

fn body(payload: usize) -> Vec<u8> {
    // A JSON string of `payload` bytes that does not compress away.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut b = vec![b'"'];
    b.extend((0..payload.saturating_sub(2)).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b'a' + (x % 26) as u8
    }));
    b.push(b'"');
    b
}

/// Stores `count` messages in groups of 4,096, without client ids (a bulk load: with them,
/// once the store outgrows its 16 MiB cache each append's dedupe lookup reads from the
/// files, a third of the fill's time in `perf`, and a 10-million fill over 10,000
/// conversations had not finished after 25 minutes).
fn fill(store: &mut EmbeddedStore, count: u64, conversations: u64, body: &[u8]) {
    let mut n = 0;
    while n < count {
        let group: Vec<NewMessage> = (n..(n + 4096).min(count))
            .map(|i| NewMessage {
                client_id: None,
                ..message(i, conversations, body)
            })
            .collect();
        store.append(&group, now_ms()).expect("append");
        n += group.len() as u64;
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// The servers behind a `--redis` URL: itself, or a cluster's seeds (all its primaries).
fn redis_servers(url: &str) -> Vec<String> {
    match url.strip_prefix("redis+cluster://") {
        Some(seeds) => seeds.split(',').map(|seed| format!("redis://{seed}")).collect(),
        None => vec![url.to_string()],
    }
}

/// `redis-cli` on each server of `url`, their answers.
fn redis_cli(url: &str, args: &[&str]) -> Vec<String> {
    redis_servers(url)
        .iter()
        .map(|server| {
            let out = std::process::Command::new("redis-cli")
                .args(["-u", server])
                .args(args)
                .output()
                .expect("redis-cli (apt-get install redis-server)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// The servers' `used_memory`, in bytes, summed.
fn redis_memory(url: &str) -> u64 {
    redis_cli(url, &["info", "memory"])
        .iter()
        .map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("used_memory in INFO memory")
        })
        .sum()
}

/// Appends groups of `batch` for `duration`: messages, seconds, groups, commit times.
fn append_for<S: MessageStore>(
    store: &mut S,
    batch: usize,
    args: &Args,
    body: &[u8],
) -> (u64, f64, u64, Histogram<u64>) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (start, mut n, mut groups) = (Instant::now(), 0u64, 0u64);
    while start.elapsed() < args.duration {
        let group: Vec<NewMessage> = (n..n + batch as u64)
            .map(|i| message(i, args.conversations, body))
            .collect();
        let t = Instant::now();
        store.append(&group, now_ms()).expect("append");
        hist.record(t.elapsed().as_micros().max(1) as u64).expect("record");
        n += batch as u64;
        groups += 1;
    }
    (n, start.elapsed().as_secs_f64(), groups, hist)
}

fn main() {
    let args = Args::parse();
    let body = body(args.payload);
    match args.case {
        Case::Append => {
            println!("batch  messages  msg_per_s  syncs_per_s  commit_p50_us  commit_p99_us  commit_p999_us  commit_max_us  disk_bytes_per_msg");
            for &batch in &args.batches {
                let (n, secs, groups, hist, bytes) = match &args.redis {
                    Some(url) => {
                        redis_cli(url, &["flushall"]);
                        let before = redis_memory(url);
                        let mut store = RedisStore::open(url, KEEP_ALL, Duration::from_secs(300)).expect("redis");
                        let (n, secs, groups, hist) = append_for(&mut store, batch, &args, &body);
                        (n, secs, groups, hist, redis_memory(url).saturating_sub(before))
                    }
                    None => {
                        let mut store = fresh(&args.dir);
                        let (n, secs, groups, hist) = append_for(&mut store, batch, &args, &body);
                        drop(store);
                        (n, secs, groups, hist, dir_bytes(&args.dir))
                    }
                };
                println!(
                    "{batch:>5}  {n:>8}  {:>9.0}  {:>11.0}  {:>13}  {:>13}  {:>14}  {:>13}  {:>18.0}",
                    n as f64 / secs,
                    groups as f64 / secs,
                    hist.value_at_quantile(0.5),
                    hist.value_at_quantile(0.99),
                    hist.value_at_quantile(0.999),
                    hist.max(),
                    bytes as f64 / n as f64
                );
            }
        }
        Case::CatchUp => {
            let mut store = fresh(&args.dir);
            fill(&mut store, args.messages, args.conversations, &body);
            drop(store);
            let mut store = open(&args.dir);
            let (wall, cpu) = (Instant::now(), thread_cpu());
            let convs = store
                .conversations("reader", args.conversations as usize)
                .expect("list");
            let (mut fetched, mut pages) = (0u64, 0u64);
            for (conv, _) in &convs {
                let mut since = 0;
                loop {
                    let page = store.read(conv, Range::After(since), 1000).expect("read");
                    pages += 1;
                    fetched += page.messages.len() as u64;
                    match page.messages.last() {
                        Some(m) if m.seq < page.head => since = m.seq,
                        _ => break,
                    }
                }
            }
            let (wall, cpu) = (wall.elapsed(), thread_cpu() - cpu);
            assert_eq!(fetched, args.messages, "every stored message is fetched");
            println!(
                "catch-up: {fetched} messages in {} conversations, {pages} pages: {:.0} ms wall, {:.0} ms CPU ({:.0} messages/s)",
                convs.len(),
                wall.as_secs_f64() * 1e3,
                cpu.as_secs_f64() * 1e3,
                fetched as f64 / wall.as_secs_f64()
            );
        }
        Case::Fill => {
            let mut store = fresh(&args.dir);
            let t = Instant::now();
            fill(&mut store, args.messages, args.conversations, &body);
            println!(
                "fill: {} messages in {} conversations of user 'reader' in {:.1} s",
                args.messages,
                args.conversations,
                t.elapsed().as_secs_f64()
            );
            if args.crash {
                std::process::abort();
            }
        }
        Case::Open => {
            let log = dir_bytes(&args.dir.join("wal"));
            let t = Instant::now();
            let mut store = open(&args.dir);
            let opened = t.elapsed();
            let next = message(args.messages, args.conversations, &body);
            store.append(&[next], now_ms()).expect("append");
            println!(
                "open: {:.0} MB on disk, {:.0} MB of it the log: open {:.0} ms, first append done {:.0} ms after the start",
                dir_bytes(&args.dir) as f64 / 1e6,
                log as f64 / 1e6,
                opened.as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        Case::Restart => {
            let mut store = fresh(&args.dir);
            let t = Instant::now();
            fill(&mut store, args.messages, args.conversations, &body);
            let filled = t.elapsed();
            drop(store);
            let t = Instant::now();
            let mut store = open(&args.dir);
            let opened = t.elapsed();
            let next = message(args.messages, args.conversations, &body);
            store.append(&[next], now_ms()).expect("append");
            let first = t.elapsed();
            println!(
                "restart: {} messages in {} conversations ({:.0} MB on disk, stored in {:.1} s): open {:.0} ms, first append done {:.0} ms after the start",
                args.messages,
                args.conversations,
                dir_bytes(&args.dir) as f64 / 1e6,
                filled.as_secs_f64(),
                opened.as_secs_f64() * 1e3,
                first.as_secs_f64() * 1e3
            );
        }
    }
}
