//! The board: where each shard (and the store and cluster threads) leaves a copy of what
//! it counted, once a second, for a scrape or the dashboard to read. Each writer has a
//! slot of its own, so the only lock taken is one slot's, once a second by its writer and
//! once per scrape by the reader: nothing is shared on the hot path.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::counters::{Counts, ERROR_CODES};
use super::new_histogram;
use crate::sys::process::Usage;

/// Upper bounds (µs) of the latency buckets exposed to Prometheus: 100 µs to 10 s, with
/// the default 200 ms SLO among them.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// A latency distribution folded into Prometheus' cumulative buckets.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Buckets {
    /// Values above the bound before (or 0) and at or below each of `LATENCY_BOUNDS_US`;
    /// those above the last are only in `count`.
    pub per_bound: [u64; LATENCY_BOUNDS_US.len()],
    pub count: u64,
    /// The sum of the values in µs (each value as the HDR histogram holds it: within
    /// 0.1%).
    pub sum_us: f64,
}

impl Buckets {
    pub fn of(h: &Histogram<u64>) -> Buckets {
        let mut b = Buckets::default();
        for v in h.iter_recorded() {
            let value = h.highest_equivalent(v.value_iterated_to());
            let n = v.count_at_value();
            b.sum_us += h.median_equivalent(value) as f64 * n as f64;
            b.count += n;
            if let Some(i) = LATENCY_BOUNDS_US.iter().position(|&bound| value <= bound) {
                b.per_bound[i] += n;
            }
        }
        b
    }

    pub fn add(&mut self, o: &Buckets) {
        for (a, b) in self.per_bound.iter_mut().zip(&o.per_bound) {
            *a += b;
        }
        self.count += o.count;
        self.sum_us += o.sum_us;
    }
}

/// One shard, as of its last copy.
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub counts: Counts,
    pub connections: u64,
    /// Of them, on the TLS listener.
    pub tls_connections: u64,
    /// Bytes held in messages being assembled and frames queued for sockets.
    pub held_bytes: u64,
    /// Messages waiting in the shard's inbox (from other shards and threads).
    pub inbox_depth: u64,
    /// Ingress-to-egress latency of every routed message since the start.
    pub latency: Buckets,
    /// The same, of the last whole second only (the dashboard's percentiles).
    pub last_second: Histogram<u64>,
}

impl Default for ShardSnapshot {
    fn default() -> Self {
        ShardSnapshot {
            counts: Counts::default(),
            connections: 0,
            tls_connections: 0,
            held_bytes: 0,
            inbox_depth: 0,
            latency: Buckets::default(),
            last_second: new_histogram(),
        }
    }
}

/// The store thread's totals since the start.
#[derive(Debug, Default, Clone)]
pub struct StoreSnapshot {
    pub appended: u64,
    /// Group commits (one sync each).
    pub commits: u64,
    pub duplicates: u64,
    pub unavailable: u64,
    pub reads: u64,
    pub trimmed: u64,
    /// Error frames the store thread sent, by code (`ERROR_CODES`).
    pub errors: [u64; ERROR_CODES.len()],
    /// From a group's start to its sync's end.
    pub commit_latency: Buckets,
}

/// The cluster thread's totals since the start, and its view now.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClusterSnapshot {
    pub connected: bool,
    pub nodes: u64,
    pub remote_users: u64,
    pub batches_out: u64,
    pub records_out: u64,
    pub batches_in: u64,
    pub records_in: u64,
    /// Batches confirmed by a receipt from the nodes they went to (round trips done).
    pub confirmed: u64,
    /// Cross-node sends, by how they ended: routed, offline, unavailable, refused.
    pub outcomes: [u64; 4],
    /// Batches sent and not yet confirmed by the nodes they went to.
    pub awaiting_receipts: u64,
    pub rejected: u64,
    pub directory: DirectoryGauges,
}

/// The cluster directory's sizes now (see `cluster::directory`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DirectoryGauges {
    /// Every node of the view synced with it.
    pub ready: bool,
    /// Users and rooms held here, and those of them whose home has not answered yet.
    pub local: u64,
    pub unconfirmed: u64,
    /// Keys homed here, and cache entries for keys held elsewhere.
    pub homed: u64,
    pub cached: u64,
    /// Lookups asked and not answered, and the sends waiting for them.
    pub lookups: u64,
    pub parked: u64,
}

pub struct Board {
    started: Instant,
    pub slo: Duration,
    shards: Vec<Mutex<ShardSnapshot>>,
    store: Mutex<Option<StoreSnapshot>>,
    cluster: Mutex<Option<ClusterSnapshot>>,
    /// Read by the reporter thread once a second (procfs is a file read, kept off the shards).
    process: Mutex<Option<Usage>>,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").field("shards", &self.shards()).finish()
    }
}

/// A slot's lock; a writer that panicked left a whole copy (they are replaced whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Board {
    pub fn new(shards: usize, slo: Duration) -> Board {
        Board {
            started: Instant::now(),
            slo,
            shards: (0..shards).map(|_| Mutex::new(ShardSnapshot::default())).collect(),
            store: Mutex::new(None),
            cluster: Mutex::new(None),
            process: Mutex::new(None),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Shard `id` replaces its copy; `write` fills it in place (the histogram's memory is
    /// reused).
    pub fn publish_shard(&self, id: usize, write: impl FnOnce(&mut ShardSnapshot)) {
        if let Some(slot) = self.shards.get(id) {
            write(&mut lock(slot));
        }
    }

    pub fn publish_store(&self, snapshot: StoreSnapshot) {
        *lock(&self.store) = Some(snapshot);
    }

    pub fn publish_cluster(&self, snapshot: ClusterSnapshot) {
        *lock(&self.cluster) = Some(snapshot);
    }

    /// Reads shard `id`'s copy.
    pub fn shard<R>(&self, id: usize, read: impl FnOnce(&ShardSnapshot) -> R) -> Option<R> {
        self.shards.get(id).map(|slot| read(&lock(slot)))
    }

    pub fn store(&self) -> Option<StoreSnapshot> {
        lock(&self.store).clone()
    }

    pub fn cluster(&self) -> Option<ClusterSnapshot> {
        lock(&self.cluster).clone()
    }

    pub fn publish_process(&self, usage: Usage) {
        *lock(&self.process) = Some(usage);
    }

    pub fn process(&self) -> Option<Usage> {
        *lock(&self.process)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_every_value_once() {
        let mut h = new_histogram();
        for us in [50u64, 100, 150, 9_000, 300_000, 30_000_000] {
            h.record(us).unwrap();
        }
        let b = Buckets::of(&h);
        assert_eq!(b.count, 6);
        assert_eq!(b.per_bound[0], 2, "50 and 100 are at or below 100 µs");
        assert_eq!(b.per_bound[1], 1);
        assert_eq!(b.per_bound[6], 1, "9 ms is within 10 ms");
        assert_eq!(b.per_bound[11], 1, "300 ms is within 500 ms");
        assert_eq!(
            b.per_bound.iter().sum::<u64>(),
            5,
            "30 s is past every bound (only +Inf holds it)"
        );
        let exact: f64 = [50.0, 100.0, 150.0, 9_000.0, 300_000.0, 30_000_000.0].iter().sum();
        assert!((b.sum_us - exact).abs() / exact < 0.001, "{} vs {exact}", b.sum_us);
        let mut two = b.clone();
        two.add(&b);
        assert_eq!(two.count, 12);
        assert_eq!(two.per_bound[0], 4);
    }
}
