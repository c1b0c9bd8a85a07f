//! Latency against the SLO: each shard records every routed message's ingress-to-egress
//! time in its own HDR histograms (no locks), and hands copies to a reporter thread that
//! merges them off the hot path and prints. Each shard also counts what it does
//! (`counters`) and copies that to the board once a second (`board`), which `/metrics`
//! (`exposition`) and the dashboard read.

pub mod board;
pub mod counters;
pub mod exposition;
pub mod report;

pub use report::{spawn_reporter, Reporter, ShardReport};

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::ws::deflate::DeflateStats;

/// 1 µs to 60 s at 3 significant digits, as every histogram here.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One shard's recorder: the current interval and the whole run, for every message and
/// again for those that came from another node; and the current second, for the board.
pub struct LatencyRecorder {
    pub interval: Histogram<u64>,
    pub second: Histogram<u64>,
    pub total: Histogram<u64>,
    pub cross_interval: Histogram<u64>,
    pub cross_total: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            interval: new_histogram(),
            second: new_histogram(),
            total: new_histogram(),
            cross_interval: new_histogram(),
            cross_total: new_histogram(),
        }
    }
}

impl LatencyRecorder {
    /// Records a message that entered at `ingress` (on this node or, `cross_node`, on
    /// another) and left at `now`.
    #[inline]
    pub fn record(&mut self, ingress: Instant, now: Instant, cross_node: bool) {
        let us = now.saturating_duration_since(ingress).as_micros().clamp(1, 60_000_000) as u64;
        // Within the bounds by the clamp, so recording cannot fail.
        let _ = self.interval.record(us);
        let _ = self.second.record(us);
        let _ = self.total.record(us);
        if cross_node {
            let _ = self.cross_interval.record(us);
            let _ = self.cross_total.record(us);
        }
    }

    /// The interval so far (all messages, cross-node ones), and fresh ones started.
    pub fn take_interval(&mut self) -> (Histogram<u64>, Histogram<u64>) {
        let h = (self.interval.clone(), self.cross_interval.clone());
        self.interval.reset();
        self.cross_interval.reset();
        h
    }
}

/// What a shard holds at the end of an interval, summed over shards for the report line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardLoad {
    pub connections: u64,
    /// Bytes held in messages being assembled and in outbound queues, now.
    pub held_bytes: u64,
    /// Messages refused (1009) in the interval because the shard was over its budget.
    pub refused_budget: u64,
    /// Connections refused (429) in the interval by the per-IP limits.
    pub refused_per_ip: u64,
    /// Messages compressed (permessage-deflate) in the interval, and their sizes.
    pub deflated: DeflateStats,
}

impl std::ops::AddAssign for ShardLoad {
    fn add_assign(&mut self, o: ShardLoad) {
        self.connections += o.connections;
        self.held_bytes += o.held_bytes;
        self.refused_budget += o.refused_budget;
        self.refused_per_ip += o.refused_per_ip;
        self.deflated += o.deflated;
    }
}

/// The stdout report line for one interval (documented in the README):
/// `report: t=… interval_s=… msgs_per_s=… connections=… count=… p50_us=… p90_us=… p99_us=… p999_us=… max_us=… within_slo_pct=… slo_ms=… cross_node=… cross_p50_us=… cross_p99_us=… held_kib=… refused_budget=… refused_per_ip=… deflated=… deflated_pct=…`
/// where the `cross_` fields count the messages that came from other nodes, `deflated`
/// the messages compressed (once per message and shard, however many recipients) and
/// `deflated_pct` their compressed size in percent of their size.
pub fn report_line(
    elapsed: Duration,
    interval: Duration,
    load: ShardLoad,
    h: &Histogram<u64>,
    cross: &Histogram<u64>,
    slo: Duration,
) -> String {
    let connections = load.connections;
    let count = h.len();
    let within = if count == 0 { 100.0 } else { within_slo(h, slo) * 100.0 };
    format!(
        "report: t={:.0}s interval_s={:.1} msgs_per_s={:.1} connections={connections} count={count} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} within_slo_pct={within:.3} slo_ms={} cross_node={} cross_p50_us={} cross_p99_us={} held_kib={} refused_budget={} refused_per_ip={} deflated={} deflated_pct={:.1}",
        elapsed.as_secs_f64(),
        interval.as_secs_f64(),
        count as f64 / interval.as_secs_f64().max(1e-9),
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        slo.as_millis(),
        cross.len(),
        cross.value_at_quantile(0.50),
        cross.value_at_quantile(0.99),
        load.held_bytes / 1024,
        load.refused_budget,
        load.refused_per_ip,
        load.deflated.messages,
        load.deflated.bytes_out as f64 * 100.0 / load.deflated.bytes_in.max(1) as f64,
    )
}

/// The share of recorded values at or below `slo`.
pub fn within_slo(h: &Histogram<u64>, slo: Duration) -> f64 {
    if h.is_empty() {
        return 1.0;
    }
    let limit = slo.as_micros() as u64;
    h.count_between(0, limit) as f64 / h.len() as f64
}

/// The whole distribution in HdrHistogram's percentile text format (values in ms).
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    ));
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:14.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{:12.3} {:2.12} {:10} {}\n",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
            inv
        ));
    }
    let mean = h.mean() / 1000.0;
    let stddev = h.stdev() / 1000.0;
    out.push_str(&format!(
        "#[Mean    = {mean:12.3}, StdDeviation   = {stddev:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n#[Buckets = {:12}, SubBuckets     = {:12}]\n",
        h.max() as f64 / 1000.0,
        h.len(),
        h.buckets(),
        h.distinct_values(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_and_report_line() {
        let mut r = LatencyRecorder::default();
        let t0 = Instant::now();
        for us in [100u64, 200, 300, 250_000] {
            r.record(t0, t0 + Duration::from_micros(us), us == 300);
        }
        let (h, cross) = r.take_interval();
        assert_eq!(cross.len(), 1);
        assert!(r.cross_interval.is_empty());
        assert_eq!(r.cross_total.len(), 1);
        assert_eq!(h.len(), 4);
        assert!(r.interval.is_empty());
        assert_eq!(r.total.len(), 4);
        assert!((within_slo(&h, Duration::from_millis(200)) - 0.75).abs() < 1e-9);
        let line = report_line(
            Duration::from_secs(10),
            Duration::from_secs(10),
            ShardLoad {
                connections: 7,
                held_bytes: 4096,
                refused_budget: 2,
                refused_per_ip: 3,
                deflated: DeflateStats {
                    messages: 2,
                    bytes_in: 4000,
                    bytes_out: 1000,
                },
            },
            &h,
            &cross,
            Duration::from_millis(200),
        );
        assert!(
            line.starts_with("report: t=10s interval_s=10.0 msgs_per_s=0.4 connections=7 count=4 p50_us=200 "),
            "{line}"
        );
        assert!(
            line.ends_with(
                "within_slo_pct=75.000 slo_ms=200 cross_node=1 cross_p50_us=300 cross_p99_us=300 held_kib=4 refused_budget=2 refused_per_ip=3 deflated=2 deflated_pct=25.0"
            ),
            "{line}"
        );
    }

    #[test]
    fn distribution_format_is_hdrhistogram_percentiles() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let text = percentile_distribution(&h);
        let mut lines = text.lines();
        assert!(lines.next().unwrap().contains("Value") && text.contains("1/(1-Percentile)"));
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("Value") && !l.is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect();
        let last = rows.last().unwrap();
        assert_eq!(last[1].parse::<f64>().unwrap(), 1.0);
        assert_eq!(last[2], "1000");
        assert!(text.contains("Total count    =         1000"));
    }
}
