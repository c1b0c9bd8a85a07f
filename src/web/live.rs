//! The dashboard's live feed: once a second, the board as one JSON object (sent as a
//! server-sent event). Counters are totals since the start; the page turns them into
//! rates. Percentiles are of the last whole second, merged over the shards.

use serde_json::{json, Value};

use crate::metrics::board::Board;
use crate::metrics::counters::{Counts, Route};
use crate::metrics::{new_histogram, within_slo};

/// The board now, as the dashboard reads it.
pub fn snapshot(board: &Board) -> Value {
    let mut total = Counts::default();
    let mut second = new_histogram();
    let mut shards = Vec::with_capacity(board.shards());
    let mut connections = 0;
    for id in 0..board.shards() {
        board.shard(id, |s| {
            total += &s.counts;
            // Same bounds on both sides: adding cannot fail.
            let _ = second.add(&s.last_second);
            connections += s.connections;
            shards.push(json!({
                "id": id,
                "connections": s.connections,
                "frames_in": s.counts.frames_in,
                "frames_out": s.counts.frames_out,
                "delivered_last_second": s.last_second.len(),
                "held_bytes": s.held_bytes,
                "inbox_depth": s.inbox_depth,
            }));
        });
    }
    let sent = total.routed[Route::Direct as usize] + total.routed[Route::Room as usize];
    let cluster = board
        .cluster()
        .map(|c| json!({"connected": c.connected, "nodes": c.nodes + 1, "remote_users": c.remote_users}));
    let store = board
        .store()
        .map(|s| json!({"appended": s.appended, "commits": s.commits}));
    json!({
        "uptime_s": board.uptime().as_secs_f64(),
        "slo_ms": board.slo.as_millis() as u64,
        "connections": connections,
        "sent": sent,
        "frames_in": total.frames_in,
        "frames_out": total.frames_out,
        "upgrades": total.http[0],
        "last_second": {
            "delivered": second.len(),
            "p50_us": second.value_at_quantile(0.5),
            "p99_us": second.value_at_quantile(0.99),
            "p999_us": second.value_at_quantile(0.999),
            "max_us": second.max(),
            "within_slo_pct": within_slo(&second, board.slo) * 100.0,
        },
        "shards": shards,
        "cluster": cluster,
        "store": store,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn merges_the_shards_last_second_and_sums_their_counters() {
        let board = Board::new(2, Duration::from_millis(200));
        for id in 0..2 {
            board.publish_shard(id, |s| {
                s.connections = 3;
                s.counts.routed[Route::Direct as usize] = 5;
                s.counts.routed[Route::CrossShard as usize] = 7;
                s.last_second.record(if id == 0 { 100 } else { 300_000 }).unwrap();
            });
        }
        let v = snapshot(&board);
        assert_eq!(v["connections"], 6);
        assert_eq!(v["sent"], 10, "cross-shard hand-overs are not sends");
        assert_eq!(v["last_second"]["delivered"], 2);
        assert_eq!(v["last_second"]["within_slo_pct"], 50.0);
        assert_eq!(v["shards"].as_array().unwrap().len(), 2);
        assert!(v["cluster"].is_null() && v["store"].is_null());
    }
}
