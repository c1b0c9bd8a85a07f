//! Delivery accounting for the chat load generator: per sender-recipient stream, which
//! sequence numbers arrived, which are missing, duplicated or out of order; and a report
//! that merges across threads and processes (histograms travel as base64 HdrHistogram V2).

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;

/// What one recipient has received from one sender (sequence numbers start at 0).
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    /// Every sequence number below this arrived, except those in `missing`.
    next: u64,
    missing: BTreeSet<u64>,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

impl Tracker {
    /// Records the arrival of `seq`.
    pub fn record(&mut self, seq: u64) {
        if seq == self.next {
            self.next += 1;
            self.received += 1;
        } else if seq > self.next {
            // Ahead of a gap: the skipped ones are missing (lost, unless they turn up late,
            // which then counts as reordering).
            self.missing.extend(self.next..seq);
            self.next = seq + 1;
            self.received += 1;
        } else if self.missing.remove(&seq) {
            self.received += 1;
            self.reordered += 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// Messages that were sent (`sent` of them) and never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.received)
    }

    /// Did `seq` arrive?
    pub fn has(&self, seq: u64) -> bool {
        seq < self.next && !self.missing.contains(&seq)
    }
}

/// What the gateway answered to one sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Nothing yet (or the connection died first).
    Pending,
    Routed,
    Offline,
    /// `unavailable`: another node did not confirm.
    Unavailable,
    /// `rate_limited`: refused (an overloaded or stopping destination).
    Limited,
    /// Any other error.
    Other,
}

/// One load process's (or thread's) results; they add up.
#[derive(Debug, Clone)]
pub struct Report {
    pub connections_up: u64,
    pub failed_handshakes: u64,
    pub unexpected_closes: u64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub offline: u64,
    pub errors: u64,
    /// End-to-end latency, µs.
    pub latency: Histogram<u64>,
    /// Messages whose sender and recipient used different gateways (nodes), and their latency.
    pub cross_received: u64,
    pub cross_latency: Histogram<u64>,
    /// With faults (`--reconnect`): connections made again after a close or a drop.
    pub reconnects: u64,
    /// Answers to sent messages, by kind.
    pub routed: u64,
    pub unavailable: u64,
    pub limited: u64,
    /// Sent by a connection that never broke, and never answered: a defect.
    pub unanswered: u64,
    /// Sent by a connection that then broke, and never answered (no claim was made).
    pub unanswered_dropped: u64,
    /// Acknowledged `routed` to a recipient whose connection then broke, never received.
    pub lost_reconnected: u64,
    /// Not routed (offline, unavailable, refused) though sender and recipient never lost
    /// their connections: on one gateway, or on two.
    pub refused_local: u64,
    pub refused_cross: u64,
    /// Users connected when the run ended.
    pub connected_at_end: u64,
    /// The longest time from a drop to `ready` again, ms (merged by maximum).
    pub recovery_ms: u64,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

impl Default for Report {
    fn default() -> Self {
        Report {
            connections_up: 0,
            failed_handshakes: 0,
            unexpected_closes: 0,
            sent: 0,
            received: 0,
            lost: 0,
            duplicates: 0,
            reordered: 0,
            offline: 0,
            errors: 0,
            latency: new_histogram(),
            cross_received: 0,
            cross_latency: new_histogram(),
            reconnects: 0,
            routed: 0,
            unavailable: 0,
            limited: 0,
            unanswered: 0,
            unanswered_dropped: 0,
            lost_reconnected: 0,
            refused_local: 0,
            refused_cross: 0,
            connected_at_end: 0,
            recovery_ms: 0,
        }
    }
}

const FIELDS: [&str; 21] = [
    "connections_up",
    "failed_handshakes",
    "unexpected_closes",
    "sent",
    "received",
    "lost",
    "duplicates",
    "reordered",
    "offline",
    "errors",
    "cross_received",
    "reconnects",
    "routed",
    "unavailable",
    "limited",
    "unanswered",
    "unanswered_dropped",
    "lost_reconnected",
    "refused_local",
    "refused_cross",
    "connected_at_end",
];

impl Report {
    fn counters(&self) -> [u64; 21] {
        [
            self.connections_up,
            self.failed_handshakes,
            self.unexpected_closes,
            self.sent,
            self.received,
            self.lost,
            self.duplicates,
            self.reordered,
            self.offline,
            self.errors,
            self.cross_received,
            self.reconnects,
            self.routed,
            self.unavailable,
            self.limited,
            self.unanswered,
            self.unanswered_dropped,
            self.lost_reconnected,
            self.refused_local,
            self.refused_cross,
            self.connected_at_end,
        ]
    }

    fn counters_mut(&mut self) -> [&mut u64; 21] {
        [
            &mut self.connections_up,
            &mut self.failed_handshakes,
            &mut self.unexpected_closes,
            &mut self.sent,
            &mut self.received,
            &mut self.lost,
            &mut self.duplicates,
            &mut self.reordered,
            &mut self.offline,
            &mut self.errors,
            &mut self.cross_received,
            &mut self.reconnects,
            &mut self.routed,
            &mut self.unavailable,
            &mut self.limited,
            &mut self.unanswered,
            &mut self.unanswered_dropped,
            &mut self.lost_reconnected,
            &mut self.refused_local,
            &mut self.refused_cross,
            &mut self.connected_at_end,
        ]
    }

    pub fn merge(&mut self, other: &Report) {
        for (mine, theirs) in self.counters_mut().into_iter().zip(other.counters()) {
            *mine += theirs;
        }
        self.recovery_ms = self.recovery_ms.max(other.recovery_ms);
        let _ = self.latency.add(&other.latency);
        let _ = self.cross_latency.add(&other.cross_latency);
    }

    /// Did every message arrive, once and in order?
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.reordered == 0 && self.offline == 0 && self.errors == 0
    }

    /// One line: `key=value …` counters and `hist=<base64 HdrHistogram V2>`.
    pub fn to_line(&self) -> String {
        let mut line: Vec<String> = FIELDS
            .iter()
            .zip(self.counters())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        line.push(format!("recovery_ms={}", self.recovery_ms));
        line.push(format!("hist={}", encode_histogram(&self.latency)));
        line.push(format!("xhist={}", encode_histogram(&self.cross_latency)));
        line.join(" ")
    }

    pub fn from_line(line: &str) -> Result<Report, String> {
        let mut report = Report::default();
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("not key=value: {kv}"))?;
            if k == "hist" {
                report.latency = decode_histogram(v)?;
            } else if k == "xhist" {
                report.cross_latency = decode_histogram(v)?;
            } else if k == "recovery_ms" {
                report.recovery_ms = v.parse().map_err(|e| format!("{k}: {e}"))?;
            } else if let Some(i) = FIELDS.iter().position(|f| *f == k) {
                *report.counters_mut()[i] = v.parse().map_err(|e| format!("{k}: {e}"))?;
            }
        }
        Ok(report)
    }
}

pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .expect("serializing into memory");
    BASE64.encode(bytes)
}

pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = BASE64.decode(text).map_err(|e| e.to_string())?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = Tracker::default();
        (0..100).for_each(|s| t.record(s));
        assert_eq!((t.received, t.duplicates, t.reordered, t.lost(100)), (100, 0, 0, 0));
    }

    #[test]
    fn detects_loss_duplicates_and_reordering() {
        let mut t = Tracker::default();
        for s in [0, 1, 3, 2, 3, 5] {
            t.record(s);
        }
        // 2 came after 3 (reordered), 3 again is a duplicate, 4 never came (lost).
        assert_eq!((t.received, t.duplicates, t.reordered), (5, 1, 1));
        assert_eq!(t.lost(6), 1);
        assert!(t.has(2) && t.has(5) && !t.has(4) && !t.has(6));
        assert_eq!(t.lost(7), 2, "a 7th message sent and never received is lost too");
    }

    #[test]
    fn reports_merge_and_survive_a_round_trip() {
        let mut a = Report {
            sent: 10,
            received: 9,
            lost: 1,
            connections_up: 4,
            ..Default::default()
        };
        a.latency.record(100).unwrap();
        let mut b = Report {
            sent: 5,
            received: 5,
            connections_up: 2,
            ..Default::default()
        };
        b.latency.record(300).unwrap();
        b.latency.record(500).unwrap();
        b.cross_received = 1;
        b.cross_latency.record(500).unwrap();
        b.recovery_ms = 700;
        b.refused_cross = 3;
        a.recovery_ms = 900;
        let b = Report::from_line(&b.to_line()).unwrap();
        a.merge(&b);
        assert_eq!((a.sent, a.received, a.lost, a.connections_up), (15, 14, 1, 6));
        assert_eq!((a.cross_received, a.cross_latency.len()), (1, 1));
        assert_eq!(
            (a.recovery_ms, a.refused_cross),
            (900, 3),
            "the longest recovery, the sum of counts"
        );
        assert_eq!(a.latency.len(), 3);
        assert_eq!(a.latency.max(), 500);
        assert!(!a.is_clean());
        assert!(Report::default().is_clean());
    }
}
