//! `GET /metrics`: the board in Prometheus' text format, through a `prometheus-client`
//! collector that reads every slot at scrape time. Every metric is documented in the
//! README ("Metrics, dashboard and chat page").

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::board::{Board, Buckets, LATENCY_BOUNDS_US};
use super::counters::{Counts, ACKS, CLOSE_CODES, ERROR_CODES, HTTP_STATUSES, ROUTES, TLS_HANDSHAKES, TLS_REFUSALS};

/// The content type of `render`'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the board for a scrape.
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub fn new(board: Arc<Board>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(BoardCollector(board)));
        Exposition { registry }
    }

    pub fn render(&self) -> String {
        let mut text = String::with_capacity(32 * 1024);
        // Writing into a String cannot fail, nor can the collector (it only formats).
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

#[derive(Debug)]
struct BoardCollector(Arc<Board>);

type Labels = Vec<(&'static str, String)>;

/// One metric family: its samples, each with its labels.
fn family<V: Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<V>: EncodeMetric,
    ConstGauge<V>: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let member = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(member)?,
            _ => ConstGauge::new(value).encode(member)?,
        }
    }
    Ok(())
}

fn latency(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, Buckets)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, b) in samples {
        let bounds: Vec<(f64, u64)> = LATENCY_BOUNDS_US
            .iter()
            .zip(b.per_bound)
            .map(|(&us, n)| (us as f64 / 1e6, n))
            .collect();
        let mut member = metric.encode_family(&labels)?;
        member.encode_histogram::<Labels>(b.sum_us / 1e6, b.count, &bounds, None)?;
    }
    Ok(())
}

fn shard_label(id: usize) -> Labels {
    vec![("shard", id.to_string())]
}

/// `(shard, values)` rows, one per table entry: a labelled sample per shard and entry.
fn by_table<T: ToString>(
    shards: &[Counts],
    key: &'static str,
    table: &[T],
    values: impl Fn(&Counts) -> &[u64],
) -> Vec<(Labels, u64)> {
    let mut samples = Vec::new();
    for (id, counts) in shards.iter().enumerate() {
        for (entry, value) in table.iter().zip(values(counts)) {
            let label = match entry.to_string().as_str() {
                "0" => "other".to_string(),
                s => s.to_string(),
            };
            samples.push((vec![("shard", id.to_string()), (key, label)], *value));
        }
    }
    samples
}

impl Collector for BoardCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let board = &self.0;
        let n = board.shards();
        let mut counts = Vec::with_capacity(n);
        let mut gauges = Vec::with_capacity(n);
        let mut latencies = Vec::with_capacity(n);
        for id in 0..n {
            board.shard(id, |s| {
                counts.push(s.counts.clone());
                gauges.push((s.connections, s.held_bytes, s.inbox_depth, s.tls_connections));
                latencies.push((shard_label(id), s.latency.clone()));
            });
        }
        let per_shard = |f: &dyn Fn(usize) -> u64| (0..n).map(|id| (shard_label(id), f(id))).collect::<Vec<_>>();

        family(
            &mut e,
            "shardgate_shards",
            "Shards (executors, one per core) of this process.",
            Gauge,
            [(vec![], n as u64)],
        )?;
        family(
            &mut e,
            "shardgate_uptime_seconds",
            "Seconds since the gateway started.",
            Gauge,
            [(vec![], board.uptime().as_secs_f64())],
        )?;
        family(
            &mut e,
            "shardgate_slo_seconds",
            "The end-to-end latency objective (--slo).",
            Gauge,
            [(vec![], board.slo.as_secs_f64())],
        )?;
        family(
            &mut e,
            "shardgate_connections",
            "Open connections (upgraded or not yet).",
            Gauge,
            per_shard(&|id| gauges[id].0),
        )?;
        family(
            &mut e,
            "shardgate_tls_connections",
            "Open connections on the TLS listener (--listen-tls), handshaken or not yet.",
            Gauge,
            per_shard(&|id| gauges[id].3),
        )?;
        family(
            &mut e,
            "shardgate_tls_handshakes",
            "TLS handshakes completed, by kind: full, or resumed from a ticket or session id.",
            Counter,
            by_table(&counts, "kind", &TLS_HANDSHAKES, |c| &c.tls_handshakes),
        )?;
        family(
            &mut e,
            "shardgate_tls_refused",
            "TLS connections refused before any HTTP: plaintext (a plaintext client on the TLS port, answered 400) or protocol (a handshake or record rustls rejected). Stalled handshakes count as 408 in shardgate_http_responses.",
            Counter,
            by_table(&counts, "reason", &TLS_REFUSALS, |c| &c.tls_refused),
        )?;
        family(
            &mut e,
            "shardgate_held_bytes",
            "Bytes held for clients: messages being assembled and frames queued for sockets.",
            Gauge,
            per_shard(&|id| gauges[id].1),
        )?;
        family(
            &mut e,
            "shardgate_inbox_depth",
            "Messages waiting in the shard's inbox (from other shards and threads).",
            Gauge,
            per_shard(&|id| gauges[id].2),
        )?;
        family(&mut e, "shardgate_http_responses", "HTTP requests answered, by status: 101 is an accepted upgrade; 4xx and 5xx refusals; 200 health checks, pages and scrapes.", Counter, by_table(&counts, "status", &HTTP_STATUSES, |c| &c.http))?;
        family(
            &mut e,
            "shardgate_frames_in",
            "WebSocket frames received (a fragmented message counts once).",
            Counter,
            per_shard(&|id| counts[id].frames_in),
        )?;
        family(
            &mut e,
            "shardgate_bytes_in",
            "Bytes read from sockets.",
            Counter,
            per_shard(&|id| counts[id].bytes_in),
        )?;
        family(
            &mut e,
            "shardgate_frames_out",
            "WebSocket frames queued for sending.",
            Counter,
            per_shard(&|id| counts[id].frames_out),
        )?;
        family(
            &mut e,
            "shardgate_bytes_out",
            "Bytes of the frames queued for sending.",
            Counter,
            per_shard(&|id| counts[id].bytes_out),
        )?;
        family(&mut e, "shardgate_messages_routed", "Chat messages routed, by kind: direct and room sends of this shard's connections, deliveries handed to another shard, messages handed to or received from other nodes.", Counter, by_table(&counts, "kind", &ROUTES, |c| &c.routed))?;
        family(
            &mut e,
            "shardgate_acks",
            "Acks written by the shards, by status (stored acks: shardgate_store_appended).",
            Counter,
            by_table(&counts, "status", &ACKS, |c| &c.acks),
        )?;
        family(
            &mut e,
            "shardgate_error_frames",
            "Error frames sent, by code.",
            Counter,
            by_table(&counts, "code", &ERROR_CODES, |c| &c.errors),
        )?;
        family(
            &mut e,
            "shardgate_closes_sent",
            "Close frames sent, by code (1001 going away, 1008 slow consumer or policy, 1009 too big, ...).",
            Counter,
            by_table(&counts, "code", &CLOSE_CODES, |c| &c.closes_sent),
        )?;
        family(
            &mut e,
            "shardgate_closes_received",
            "Close frames received, by code (1005: none given).",
            Counter,
            by_table(&counts, "code", &CLOSE_CODES, |c| &c.closes_received),
        )?;
        family(
            &mut e,
            "shardgate_deflated_messages",
            "Messages compressed (permessage-deflate), once per message and shard.",
            Counter,
            per_shard(&|id| counts[id].deflated),
        )?;
        family(
            &mut e,
            "shardgate_deflate_bytes_in",
            "Bytes of the messages compressed, before.",
            Counter,
            per_shard(&|id| counts[id].deflated_bytes_in),
        )?;
        family(
            &mut e,
            "shardgate_deflate_bytes_out",
            "Bytes of the messages compressed, after.",
            Counter,
            per_shard(&|id| counts[id].deflated_bytes_out),
        )?;
        latency(
            &mut e,
            "shardgate_latency_seconds",
            "Routed messages from ingress (read) to egress (written to the socket), from the shards' HDR histograms.",
            latencies,
        )?;

        if let Some(s) = board.store() {
            family(
                &mut e,
                "shardgate_store_appended",
                "Messages stored (and acked stored).",
                Counter,
                [(vec![], s.appended)],
            )?;
            family(
                &mut e,
                "shardgate_store_commits",
                "Group commits (one sync each).",
                Counter,
                [(vec![], s.commits)],
            )?;
            family(
                &mut e,
                "shardgate_store_duplicates",
                "Retried sends found already stored (acked with the original seq).",
                Counter,
                [(vec![], s.duplicates)],
            )?;
            family(
                &mut e,
                "shardgate_store_unavailable",
                "Messages the store could not write (answered unavailable).",
                Counter,
                [(vec![], s.unavailable)],
            )?;
            family(
                &mut e,
                "shardgate_store_reads",
                "History and recovery reads.",
                Counter,
                [(vec![], s.reads)],
            )?;
            family(
                &mut e,
                "shardgate_store_trimmed",
                "Messages removed by retention.",
                Counter,
                [(vec![], s.trimmed)],
            )?;
            family(
                &mut e,
                "shardgate_store_error_frames",
                "Error frames the store thread sent, by code (unavailable, not_found, ...).",
                Counter,
                ERROR_CODES
                    .iter()
                    .zip(s.errors)
                    .map(|(c, v)| (vec![("code", c.to_string())], v)),
            )?;
            latency(
                &mut e,
                "shardgate_store_commit_seconds",
                "From a group's start to its sync's end.",
                [(vec![], s.commit_latency)],
            )?;
        }
        if let Some(c) = board.cluster() {
            let outcomes = ["routed", "offline", "unavailable", "refused"];
            family(
                &mut e,
                "shardgate_cluster_connected",
                "1 while connected to NATS.",
                Gauge,
                [(vec![], u64::from(c.connected))],
            )?;
            family(
                &mut e,
                "shardgate_cluster_nodes",
                "Other nodes heard from.",
                Gauge,
                [(vec![], c.nodes)],
            )?;
            family(
                &mut e,
                "shardgate_cluster_remote_users",
                "Users known to be on other nodes.",
                Gauge,
                [(vec![], c.remote_users)],
            )?;
            let d = &c.directory;
            family(
                &mut e,
                "shardgate_cluster_directory_ready",
                "1 while every node of the directory's view is synced with it.",
                Gauge,
                [(vec![], u64::from(d.ready))],
            )?;
            family(
                &mut e,
                "shardgate_cluster_directory_keys",
                "Directory entries: users and rooms held here (local; unconfirmed: their home has not answered yet), homed here, cached.",
                Gauge,
                [
                    (vec![("role", "local".to_string())], d.local),
                    (vec![("role", "unconfirmed".to_string())], d.unconfirmed),
                    (vec![("role", "homed".to_string())], d.homed),
                    (vec![("role", "cached".to_string())], d.cached),
                ],
            )?;
            family(
                &mut e,
                "shardgate_cluster_directory_waiting",
                "Lookups asked of other nodes and not answered, and the sends waiting for them.",
                Gauge,
                [
                    (vec![("what", "lookups".to_string())], d.lookups),
                    (vec![("what", "sends".to_string())], d.parked),
                ],
            )?;
            family(
                &mut e,
                "shardgate_cluster_batches",
                "NATS messages (batches of records), by direction.",
                Counter,
                [
                    (vec![("direction", "out".to_string())], c.batches_out),
                    (vec![("direction", "in".to_string())], c.batches_in),
                ],
            )?;
            family(
                &mut e,
                "shardgate_cluster_records",
                "Records (messages) in those batches, by direction.",
                Counter,
                [
                    (vec![("direction", "out".to_string())], c.records_out),
                    (vec![("direction", "in".to_string())], c.records_in),
                ],
            )?;
            family(
                &mut e,
                "shardgate_cluster_receipts",
                "Batches confirmed by a receipt from the nodes they went to (NATS round trips done).",
                Counter,
                [(vec![], c.confirmed)],
            )?;
            family(
                &mut e,
                "shardgate_cluster_sends",
                "Cross-node sends by how they ended (the sender's ack).",
                Counter,
                outcomes
                    .iter()
                    .zip(c.outcomes)
                    .map(|(o, v)| (vec![("outcome", o.to_string())], v)),
            )?;
            family(
                &mut e,
                "shardgate_cluster_awaiting_receipts",
                "Batches sent and not yet confirmed by the nodes they went to (NATS round trips in flight).",
                Gauge,
                [(vec![], c.awaiting_receipts)],
            )?;
            family(
                &mut e,
                "shardgate_cluster_rejected",
                "NATS messages dropped unread (bad seal, replay, unreadable).",
                Counter,
                [(vec![], c.rejected)],
            )?;
        }
        if let Some(p) = board.process() {
            family(
                &mut e,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                Counter,
                [(vec![], p.cpu_seconds)],
            )?;
            family(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                Gauge,
                [(vec![], p.resident_bytes)],
            )?;
            family(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                Gauge,
                [(vec![], p.virtual_bytes)],
            )?;
            family(
                &mut e,
                "process_open_fds",
                "Number of open file descriptors.",
                Gauge,
                [(vec![], p.open_fds)],
            )?;
            family(
                &mut e,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                Gauge,
                [(vec![], p.max_fds)],
            )?;
            family(
                &mut e,
                "process_threads",
                "Number of OS threads in the process.",
                Gauge,
                [(vec![], p.threads)],
            )?;
            family(
                &mut e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                Gauge,
                [(vec![], p.start_time_seconds)],
            )?;
        }
        Ok(())
    }
}
