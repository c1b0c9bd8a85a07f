//! The reporter thread: merges every shard's interval histograms and prints one line per
//! interval; at the end, prints (and writes) the whole run's percentile distribution.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;

use crate::sys::process;

use super::board::Board;
use super::{new_histogram, percentile_distribution, report_line, ShardLoad};

/// What a shard hands the reporter.
pub enum ShardReport {
    /// Interval number `tick` of one shard.
    Interval {
        tick: u64,
        histogram: Histogram<u64>,
        cross: Histogram<u64>,
        load: ShardLoad,
    },
    /// The shard's whole run, sent once when it stops.
    Final {
        histogram: Histogram<u64>,
        cross: Histogram<u64>,
    },
}

/// The shards' handle on the reporter.
#[derive(Clone)]
pub struct Reporter {
    tx: Sender<ShardReport>,
}

impl Reporter {
    /// Never blocks (the channel is unbounded, and carries one message per shard per interval).
    pub fn send(&self, report: ShardReport) {
        let _ = self.tx.send(report);
    }
}

pub struct ReporterConfig {
    pub shards: usize,
    pub interval: Duration,
    pub slo: Duration,
    pub histogram_out: Option<PathBuf>,
    /// The reporter also refreshes the process's usage there, once a second (a procfs
    /// read, kept off the shards).
    pub board: Arc<Board>,
}

/// Starts the reporter thread. It ends after every shard sent its `Final`.
pub fn spawn_reporter(config: ReporterConfig) -> std::io::Result<(Reporter, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = std::thread::Builder::new()
        .name("reporter".into())
        .spawn(move || run(config, rx))?;
    Ok((Reporter { tx }, handle))
}

fn run(config: ReporterConfig, rx: Receiver<ShardReport>) {
    let started = Instant::now();
    // Interval merges waiting for the shards that have not reported that tick yet.
    let mut ticks: std::collections::BTreeMap<u64, (usize, Histogram<u64>, Histogram<u64>, ShardLoad)> =
        Default::default();
    let mut total = new_histogram();
    let mut cross_total = new_histogram();
    let mut finals = 0;
    let mut next_usage = Instant::now();
    while finals < config.shards {
        if Instant::now() >= next_usage {
            if let Ok(usage) = process::usage() {
                config.board.publish_process(usage);
            }
            next_usage = Instant::now() + Duration::from_secs(1);
        }
        let report = match rx.recv_timeout(next_usage.saturating_duration_since(Instant::now())) {
            Ok(report) => report,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match report {
            ShardReport::Interval {
                tick,
                histogram,
                cross,
                load,
            } => {
                let entry = ticks
                    .entry(tick)
                    .or_insert_with(|| (0, new_histogram(), new_histogram(), ShardLoad::default()));
                entry.0 += 1;
                let _ = entry.1.add(&histogram);
                let _ = entry.2.add(&cross);
                entry.3 += load;
                if entry.0 == config.shards {
                    if let Some((_, h, cross, load)) = ticks.remove(&tick) {
                        println!(
                            "{}",
                            report_line(started.elapsed(), config.interval, load, &h, &cross, config.slo)
                        );
                    }
                }
            }
            ShardReport::Final { histogram, cross } => {
                let _ = total.add(&histogram);
                let _ = cross_total.add(&cross);
                finals += 1;
            }
        }
    }
    let text = percentile_distribution(&total);
    println!(
        "latency over the whole run (ingress to egress, ms; {} messages, {:.3}% within the {} ms SLO):",
        total.len(),
        super::within_slo(&total, config.slo) * 100.0,
        config.slo.as_millis()
    );
    print!("{text}");
    if !cross_total.is_empty() {
        println!(
            "cross-node messages: {} ({:.1}% of all); p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            cross_total.len(),
            cross_total.len() as f64 * 100.0 / total.len().max(1) as f64,
            cross_total.value_at_quantile(0.5) as f64 / 1000.0,
            cross_total.value_at_quantile(0.99) as f64 / 1000.0,
            cross_total.value_at_quantile(0.999) as f64 / 1000.0,
            cross_total.max() as f64 / 1000.0,
        );
    }
    if let Some(path) = &config.histogram_out {
        match std::fs::write(path, &text) {
            Ok(()) => println!("histogram written to {}", path.display()),
            Err(e) => println!("cannot write the histogram to {}: {e}", path.display()),
        }
    }
}
