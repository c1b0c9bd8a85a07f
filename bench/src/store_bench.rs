//! store-bench: the append path of the two embedded engines the durable store could use,
//! side by side: messages of `--payload` bytes appended to `--conversations` conversations
//! (key: conversation id and sequence number, big-endian, so a conversation's messages
//! are adjacent and in order), committed durably in batches of each `--batches` size.
//! For each engine and batch size: messages/s, commit latency p50/p99 (HDR, µs), fsyncs
//! (durable commits) per second, and bytes on disk per message after a final flush.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(
    name = "store-bench",
    about = "append path of fjall and redb, durable commits in batches"
)]
struct Args {
    /// Engines to measure.
    #[arg(long, value_delimiter = ',', default_value = "fjall,redb")]
    engines: Vec<String>,
    /// Messages per durable commit.
    #[arg(long, value_delimiter = ',', default_value = "1,64,4096")]
    batches: Vec<usize>,
    /// How long each case appends.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    #[arg(long, default_value_t = 10_000)]
    conversations: u64,
    /// Where the databases go (emptied first).
    #[arg(long, default_value = "target/store-bench")]
    dir: PathBuf,
}

/// One engine behind the bench's two operations.
trait Engine {
    /// Appends `batch` and makes it durable.
    fn commit(&mut self, batch: &[([u8; 16], &[u8])]);
    /// Flushes everything to its files (for the size on disk).
    fn settle(&mut self);
}

struct Fjall {
    db: fjall::Database,
    messages: fjall::Keyspace,
}

impl Engine for Fjall {
    fn commit(&mut self, batch: &[([u8; 16], &[u8])]) {
        let mut b = self.db.batch();
        for (k, v) in batch {
            b.insert(&self.messages, *k, *v);
        }
        b.commit().expect("fjall batch");
        self.db.persist(fjall::PersistMode::SyncAll).expect("fjall persist");
    }
    fn settle(&mut self) {
        self.db.persist(fjall::PersistMode::SyncAll).expect("fjall persist");
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("messages");

struct Redb {
    db: redb::Database,
}

impl Engine for Redb {
    fn commit(&mut self, batch: &[([u8; 16], &[u8])]) {
        let tx = self.db.begin_write().expect("redb write");
        {
            let mut t = tx.open_table(TABLE).expect("redb table");
            for (k, v) in batch {
                t.insert(&k[..], *v).expect("redb insert");
            }
        }
        tx.commit().expect("redb commit");
    }
    fn settle(&mut self) {}
}

fn open(engine: &str, dir: &Path) -> Box<dyn Engine> {
    match engine {
        "fjall" => {
            let db = fjall::Database::builder(dir).open().expect("fjall open");
            let messages = db
                .keyspace("messages", fjall::KeyspaceCreateOptions::default)
                .expect("fjall keyspace");
            Box::new(Fjall { db, messages })
        }
        "redb" => {
            std::fs::create_dir_all(dir).expect("dir");
            Box::new(Redb {
                db: redb::Database::create(dir.join("messages.redb")).expect("redb open"),
            })
        }
        other => panic!("unknown engine {other} (fjall, redb)"),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    let payload = vec![b'x'; args.payload];
    println!("engine  batch  messages  msg_per_s  commits_per_s  commit_p50_us  commit_p99_us  disk_bytes_per_msg");
    for &batch_size in &args.batches {
        for engine in &args.engines {
            let dir = args.dir.join(format!("{engine}-{batch_size}"));
            let _ = std::fs::remove_dir_all(&dir);
            let mut db = open(engine, &dir);
            let mut seqs = vec![0u64; args.conversations as usize];
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut batch: Vec<([u8; 16], &[u8])> = Vec::with_capacity(batch_size);
            let (mut messages, mut commits, mut conv) = (0u64, 0u64, 0u64);
            let start = Instant::now();
            while start.elapsed() < args.duration {
                batch.clear();
                for _ in 0..batch_size {
                    // Conversations in a scrambled order, as traffic interleaves them.
                    conv = (conv + 7_919) % args.conversations;
                    let seq = &mut seqs[conv as usize];
                    *seq += 1;
                    let mut key = [0u8; 16];
                    key[..8].copy_from_slice(&conv.to_be_bytes());
                    key[8..].copy_from_slice(&seq.to_be_bytes());
                    batch.push((key, &payload));
                }
                let t = Instant::now();
                db.commit(&batch);
                let _ = latency.record(t.elapsed().as_micros().max(1) as u64);
                messages += batch_size as u64;
                commits += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            db.settle();
            drop(db);
            println!(
                "{engine:<7} {batch_size:>5}  {messages:>8}  {:>9.0}  {:>13.0}  {:>13}  {:>13}  {:>18.0}",
                messages as f64 / secs,
                commits as f64 / secs,
                latency.value_at_quantile(0.5),
                latency.value_at_quantile(0.99),
                dir_bytes(&dir) as f64 / messages.max(1) as f64,
            );
        }
    }
}
