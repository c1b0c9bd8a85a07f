//! `/metrics`, the pages and the dashboard's live feed, against the real binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn metrics_count_upgrades_refusals_messages_errors_and_closes() {
    let dir = temp_dir("metrics-counts");
    let (gw, _) = two_shard_dev_gateway(&dir, &[]);
    let before = scrape(gw.addr);
    assert_eq!(sum(&before, "shardgate_shards", &[]), 2.0);
    assert_eq!(sum(&before, "shardgate_http_responses_total", &["status=\"101\""]), 0.0);
    assert!(sum(&before, "process_open_fds", &[]) > 0.0);
    assert!(sum(&before, "process_resident_memory_bytes", &[]) > 1e6);

    // Refusals: no token (401), a wrong path (404).
    assert_eq!(response_status(gw.addr, &upgrade_request("/ws", "")), "401");
    assert_eq!(response_status(gw.addr, &upgrade_request("/nowhere", "")), "404");
    // Two users, a direct message (stored, since the store is on), a bad frame.
    let rt = runtime();
    rt.block_on(async {
        let (mut alice, _) = connect_stored(&gw.url("/ws?user=alice"), "alice").await;
        let (mut bob, _) = connect_stored(&gw.url("/ws?user=bob"), "bob").await;
        send(
            &mut alice,
            json!({"type": "send", "to": "bob", "id": "m1", "body": {"text": "hi"}}),
        )
        .await;
        assert_eq!(recv(&mut alice).await["status"], "stored");
        assert_eq!(recv(&mut bob).await["body"]["text"], "hi");
        send(&mut alice, json!({"type": "nonsense"})).await;
        assert_eq!(recv(&mut alice).await["code"], "unknown_type");
        // The store thread's own error: nothing stored in this conversation.
        send(
            &mut alice,
            json!({"type": "history", "conv": "dm:alice:zed", "id": "h1"}),
        )
        .await;
        assert_eq!(recv(&mut alice).await["code"], "not_found");
    });
    // A protocol error: an unmasked frame closes with 1002.
    let mut raw = raw_upgrade(gw.addr, "/ws?user=carol");
    let _ready = read_frame(&mut raw).expect("ready");
    raw.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    let (opcode, payload) = read_frame(&mut raw).expect("a close");
    assert_eq!((opcode, close_code(&payload)), (8, 1002));

    let s = scrape_until(gw.addr, |s| {
        sum(s, "shardgate_closes_sent_total", &["code=\"1002\""]) >= 1.0
            && sum(s, "shardgate_store_appended_total", &[]) >= 1.0
            && sum(s, "shardgate_store_error_frames_total", &[]) >= 1.0
            && sum(s, "shardgate_latency_seconds_count", &[]) >= 1.0
    });
    assert_eq!(sum(&s, "shardgate_http_responses_total", &["status=\"101\""]), 3.0);
    assert_eq!(sum(&s, "shardgate_http_responses_total", &["status=\"401\""]), 1.0);
    assert_eq!(sum(&s, "shardgate_http_responses_total", &["status=\"404\""]), 1.0);
    assert_eq!(sum(&s, "shardgate_messages_routed_total", &["kind=\"direct\""]), 1.0);
    assert_eq!(sum(&s, "shardgate_error_frames_total", &["code=\"unknown_type\""]), 1.0);
    assert_eq!(sum(&s, "shardgate_store_appended_total", &[]), 1.0);
    assert_eq!(
        sum(&s, "shardgate_store_error_frames_total", &["code=\"not_found\""]),
        1.0
    );
    assert_eq!(sum(&s, "shardgate_store_error_frames_total", &[]), 1.0);
    assert!(sum(&s, "shardgate_store_commits_total", &[]) >= 1.0);
    assert_eq!(
        sum(&s, "shardgate_store_commit_seconds_count", &[]),
        sum(&s, "shardgate_store_commits_total", &[])
    );
    // alice's send, alice's nonsense, carol's unmasked frame (decoded only as an error).
    assert!(sum(&s, "shardgate_frames_in_total", &[]) >= 2.0);
    assert!(sum(&s, "shardgate_bytes_in_total", &[]) > 0.0);
    // ready ×3, the ack, bob's message, the error, the close.
    assert!(sum(&s, "shardgate_frames_out_total", &[]) >= 7.0, "{s:?}");
    // bob's message was delivered; its latency is in the histogram, within 10 s.
    assert_eq!(sum(&s, "shardgate_latency_seconds_count", &[]), 1.0);
    assert_eq!(sum(&s, "shardgate_latency_seconds_bucket", &["le=\"10\""]), 1.0);
    assert_eq!(sum(&s, "shardgate_latency_seconds_bucket", &["le=\"+Inf\""]), 1.0);
    assert!(sum(&s, "shardgate_latency_seconds_sum", &[]) > 0.0);
}

#[test]
fn metrics_listen_moves_the_scrape_to_a_private_port() {
    let port = free_redis_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = Gateway::start(&["--metrics-listen", &listen]);
    let main = get(gw.addr, "/metrics");
    assert!(main.starts_with("HTTP/1.1 404 "), "{main}");
    let private: SocketAddr = listen.parse().unwrap();
    let s = scrape_until(private, |s| sum(s, "process_threads", &[]) >= 1.0);
    assert!(sum(&s, "shardgate_shards", &[]) >= 1.0);
    assert!(get(private, "/other").starts_with("HTTP/1.1 404 "));
    let post = http_exchange(private, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
}

#[test]
fn the_pages_are_served_whole_and_self_contained() {
    let gw = Gateway::start(&[]);
    for (path, marker) in [
        ("/", "window.chat"),
        ("/chat", "window.chat"),
        ("/dashboard", "EventSource"),
    ] {
        let response = get(gw.addr, path);
        let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
        assert!(head.starts_with("HTTP/1.1 200 "), "{path}: {head}");
        assert!(head.contains("Content-Type: text/html; charset=utf-8"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("a length");
        assert_eq!(body.len(), length, "{path}");
        assert!(body.contains(marker), "{path}");
        // Nothing is loaded from elsewhere.
        assert!(!body.contains("http://") && !body.contains("https://"), "{path}");
    }
    let post = http_exchange(gw.addr, b"POST /dashboard HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    // A WebSocket client pointed at a page is told there is no such endpoint.
    for path in ["/", "/dashboard", "/metrics"] {
        assert_eq!(response_status(gw.addr, &upgrade_request(path, "")), "404", "{path}");
    }
}

/// Opens the live feed and returns its response head, or the whole refusal.
fn open_feed(addr: SocketAddr, query: &str) -> (String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /dashboard/events{query} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    (head, reader)
}

fn next_event(reader: &mut BufReader<TcpStream>) -> serde_json::Value {
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the feed ended");
    }
    serde_json::from_str(line["data: ".len()..].trim()).expect("JSON")
}

#[test]
fn the_live_feed_needs_an_admin_token_and_sends_an_event_a_second() {
    let dir = temp_dir("metrics-feed");
    let (mut gw, _) = two_shard_dev_gateway(&dir, &[]);
    let token = |admin: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardgate"));
        cmd.args(["token", "ops", "--data-dir", dir.to_str().unwrap()]);
        if admin {
            cmd.arg("--admin");
        }
        String::from_utf8(cmd.output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    assert!(open_feed(gw.addr, "").0.starts_with("HTTP/1.1 401 "));
    assert!(open_feed(gw.addr, "?token=not-a-token").0.starts_with("HTTP/1.1 401 "));
    assert!(open_feed(gw.addr, &format!("?token={}", token(false)))
        .0
        .starts_with("HTTP/1.1 403 "));
    let (head, mut feed) = open_feed(gw.addr, &format!("?token={}", token(true)));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("Content-Type: text/event-stream"), "{head}");
    let first = next_event(&mut feed);
    assert_eq!(first["shards"].as_array().map(Vec::len), Some(2));
    assert_eq!(first["slo_ms"], 200);
    // A chat connection and a message show up in a later event.
    let rt = runtime();
    rt.block_on(async {
        let (mut alice, _) = connect_stored(&gw.url("/ws?user=alice"), "alice").await;
        send(&mut alice, json!({"type": "send", "to": "bob", "id": "m1", "body": {}})).await;
        assert_eq!(recv(&mut alice).await["status"], "stored");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let event = next_event(&mut feed);
            // The feed's own connection and alice's.
            if event["connections"] == 2 && event["sent"] == 1 {
                assert!(event["uptime_s"].as_f64() > first["uptime_s"].as_f64());
                break;
            }
            assert!(Instant::now() < deadline, "{event}");
        }
    });
    // A stopping gateway ends the feed: the stream closes and the process exits.
    gw.signal(libc::SIGTERM);
    let mut rest = String::new();
    while feed.read_line(&mut rest).unwrap_or(0) > 0 {}
    assert!(gw.wait_exit().success());
}

#[test]
fn dashboard_open_needs_no_token() {
    let gw = Gateway::start(&["--dashboard-open"]);
    let (head, mut feed) = open_feed(gw.addr, "");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let event = next_event(&mut feed);
    assert!(
        event["shards"].is_array() && event["last_second"]["within_slo_pct"] == 100.0,
        "{event}"
    );
}
