//! Durable conversations as clients see them: a real gateway process with its message
//! store on disk, real WebSocket clients, a real HTTP server for the push webhook, and
//! `kill -9` for the crash.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A gateway with the store (the default) in a data directory of its own.
fn gateway_in(dir: &Path, extra: &[&str]) -> (Gateway, Vec<u16>) {
    two_shard_dev_gateway(dir, extra)
}

/// A gateway on `store` (no flags: the embedded store; else `--store redis://…`), with a
/// data directory of its own named after the test and the store.
fn gateway_on(name: &str, store: &[&str], extra: &[&str]) -> (Gateway, Vec<u16>) {
    let kind = store_kind(store);
    let dir = temp_dir(&format!("{name}-{kind}"));
    let (gw, ports) = gateway_in(&dir, &[store, extra].concat());
    let said = format!("store: {} ", kind.trim_end_matches("-cluster"));
    assert!(gw.seen.iter().any(|l| l.contains(&said)), "{:?}", gw.seen);
    (gw, ports)
}

fn store_kind(store: &[&str]) -> &'static str {
    match store.get(1) {
        None => "embedded",
        Some(url) if url.starts_with("redis+cluster://") => "redis-cluster",
        Some(_) => "redis",
    }
}

/// Each test named here runs on the embedded store (`<name>::embedded`), on a Redis of its
/// own (`<name>::redis`) and on a Redis Cluster of three primaries of its own
/// (`<name>::redis_cluster`), the same assertions on each.
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[test]
            fn embedded() {
                super::$name(&[]);
            }

            #[test]
            fn redis() {
                let redis = super::Redis::start(stringify!($name));
                super::$name(&["--store", &redis.url(0)]);
            }

            #[test]
            fn redis_cluster() {
                let cluster = super::RedisCluster::start(stringify!($name));
                super::$name(&["--store", &cluster.url()]);
            }
        })*
    };
}

on_each_store!(
    a_message_to_an_offline_user_is_stored_and_fetched_when_they_connect,
    two_senders_into_one_conversation_get_one_order_everywhere,
    a_dropped_connection_resumes_with_nothing_missed,
    joining_a_room_with_since_recovers_what_was_missed,
    a_member_that_joins_before_its_ready_gets_the_room_live,
    a_retried_send_is_stored_once_and_acked_with_the_original_position,
    trimmed_history_is_answered_not_recovered,
    bad_history_requests_get_clear_errors_and_keep_the_connection,
    every_message_acked_stored_survives_kill_9,
);

async fn connect(port: u16, user: &str) -> (Ws, Value) {
    connect_stored(&format!("ws://127.0.0.1:{port}/ws?user={user}"), user).await
}

/// Sends and returns the ack (or error) that answers it.
async fn send_acked(ws: &mut Ws, v: Value) -> Value {
    send(ws, v).await;
    recv(ws).await
}

fn seq(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

async fn history(ws: &mut Ws, request: Value) -> Value {
    send(ws, request).await;
    let page = recv(ws).await;
    assert_eq!(page["type"], "history", "{page}");
    page
}

fn seqs_of(page: &Value) -> Vec<u64> {
    page["messages"].as_array().unwrap().iter().map(seq).collect()
}

fn a_message_to_an_offline_user_is_stored_and_fetched_when_they_connect(store: &[&str]) {
    let (mut gw, ports) = gateway_on("store-offline", store, &[]);
    runtime().block_on(async {
        let (mut alice, ready) = connect(ports[0], "alice").await;
        assert_eq!(ready["convs"], json!([]));
        for n in 1..=3 {
            let ack = send_acked(
                &mut alice,
                json!({"type":"send","to":"bob","id":format!("m{n}"),"body":{"n":n}}),
            )
            .await;
            assert_eq!(
                ack,
                json!({"type":"ack","id":format!("m{n}"),"status":"stored","conv":"dm:alice:bob","seq":n})
            );
        }
        let (mut bob, ready) = connect(ports[1], "bob").await;
        assert_eq!(ready["convs"], json!([{"conv":"dm:alice:bob","seq":3}]));
        let page = history(
            &mut bob,
            json!({"type":"history","conv":"dm:alice:bob","since":0,"id":"h"}),
        )
        .await;
        assert_eq!(seqs_of(&page), vec![1, 2, 3]);
        assert_eq!(
            (
                &page["id"],
                &page["head"],
                &page["first"],
                &page["more"],
                &page["recovered"]
            ),
            (&json!("h"), &json!(3), &json!(1), &json!(false), &json!(true))
        );
        let m = &page["messages"][0];
        assert_eq!(
            (&m["type"], &m["conv"], &m["from"], &m["to"], &m["id"], &m["body"]),
            (
                &json!("message"),
                &json!("dm:alice:bob"),
                &json!("alice"),
                &json!("bob"),
                &json!("m1"),
                &json!({"n":1})
            )
        );
        // Scrolling back: the newest two before 3.
        let page = history(
            &mut bob,
            json!({"type":"history","conv":"dm:alice:bob","before":3,"limit":2}),
        )
        .await;
        assert_eq!((seqs_of(&page), &page["more"]), (vec![1, 2], &json!(false)));
        let page = history(&mut bob, json!({"type":"history","conv":"dm:alice:bob","limit":1})).await;
        assert_eq!((seqs_of(&page), &page["more"]), (vec![3], &json!(true)));
        // Live now: bob answers, alice and bob's other device see it with the next seq.
        let (mut bob_phone, _) = connect(ports[0], "bob").await;
        let ack = send_acked(&mut bob, json!({"type":"send","to":"alice","id":"r","body":"back"})).await;
        assert_eq!(seq(&ack), 4);
        for ws in [&mut alice, &mut bob_phone] {
            let m = recv(ws).await;
            assert_eq!(
                (&m["conv"], seq(&m), &m["from"], &m["body"]),
                (&json!("dm:alice:bob"), 4, &json!("bob"), &json!("back"))
            );
        }
    });
    // SIGTERM: the store thread commits what is queued and the process ends.
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit().success(), "{:?}", gw.seen);
}

fn two_senders_into_one_conversation_get_one_order_everywhere(store: &[&str]) {
    let (_gw, ports) = gateway_on("store-order", store, &[]);
    const EACH: u64 = 60;
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let (mut bob, _) = connect(ports[1], "bob").await;
        let (mut carol, _) = connect(ports[0], "carol").await;
        let (mut dave, _) = connect(ports[1], "dave").await;
        for ws in [&mut alice, &mut bob, &mut carol, &mut dave] {
            send(ws, json!({"type":"join","room":"team"})).await;
            assert_eq!(recv(ws).await, json!({"type":"joined","room":"team"}));
        }
        // Alice and Bob publish at once, without waiting for acks.
        tokio::join!(burst(&mut alice, "a", EACH), burst(&mut bob, "b", EACH));
        // Every member sees the messages it receives in seq order; the watchers see all.
        for ws in [&mut carol, &mut dave] {
            let mut seqs = Vec::new();
            for _ in 0..2 * EACH {
                let m = recv(ws).await;
                assert_eq!(m["conv"], "room:team", "{m}");
                seqs.push(seq(&m));
            }
            assert_eq!(seqs, (1..=2 * EACH).collect::<Vec<_>>());
        }
        // A sender gets its acks and the other's messages, each in seq order, and the
        // two acked sets share nothing.
        let mut acked = Vec::new();
        for ws in [&mut alice, &mut bob] {
            let (mut acks, mut others) = (Vec::new(), Vec::new());
            for _ in 0..2 * EACH {
                let f = recv(ws).await;
                match f["type"].as_str() {
                    Some("ack") => acks.push(seq(&f)),
                    Some("room_message") => others.push(seq(&f)),
                    _ => panic!("{f}"),
                }
            }
            assert!(acks.windows(2).all(|w| w[0] < w[1]) && others.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(acks.len() as u64, EACH);
            acked.extend(acks);
        }
        acked.sort();
        assert_eq!(acked, (1..=2 * EACH).collect::<Vec<_>>());
    });
}

/// Publishes `n` messages to `team` without waiting for acks.
async fn burst(ws: &mut Ws, who: &str, n: u64) {
    for i in 0..n {
        send(
            ws,
            json!({"type":"publish","room":"team","id":format!("{who}-{i}"),"body":i}),
        )
        .await;
    }
}

fn a_dropped_connection_resumes_with_nothing_missed(store: &[&str]) {
    let (_gw, ports) = gateway_on("store-resume", store, &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let (mut bob, _) = connect(ports[1], "bob").await;
        let mut next = 0u64;
        let say = |n: u64| json!({"type":"send","to":"bob","id":format!("m{n}"),"body":n});
        for _ in 0..5 {
            next += 1;
            send(&mut alice, say(next)).await;
        }
        let mut seen = BTreeMap::new();
        let mut last_seen = 0;
        for _ in 0..5 {
            let m = recv(&mut bob).await;
            last_seen = seq(&m);
            seen.insert(last_seen, m["body"].as_u64().unwrap());
        }
        drop(bob);
        // While bob is away, and while he reconnects, alice keeps sending.
        for _ in 0..5 {
            next += 1;
            send(&mut alice, say(next)).await;
        }
        let reconnect = async { connect(ports[1], "bob").await };
        let keep_sending = async {
            for _ in 0..20 {
                next += 1;
                send(&mut alice, say(next)).await;
                tokio::task::yield_now().await;
            }
        };
        let ((mut bob, ready), ()) = tokio::join!(reconnect, keep_sending);
        let head = ready["convs"][0]["seq"].as_u64().unwrap();
        assert!(head >= last_seen, "{ready}");
        // Fetch from what bob had; live frames may come before and after the page.
        send(
            &mut bob,
            json!({"type":"history","conv":"dm:alice:bob","since":last_seen}),
        )
        .await;
        let mut page_seen = false;
        while seen.len() < 30 || !page_seen {
            let f = match tokio::time::timeout(Duration::from_secs(5), recv(&mut bob)).await {
                Ok(f) => f,
                Err(_) => panic!("after {} frames: {seen:?} (page {page_seen})", seen.len()),
            };
            match f["type"].as_str() {
                Some("history") => {
                    page_seen = true;
                    for m in f["messages"].as_array().unwrap() {
                        seen.insert(seq(m), m["body"].as_u64().unwrap());
                    }
                }
                Some("message") => {
                    seen.insert(seq(&f), f["body"].as_u64().unwrap());
                }
                _ => panic!("{f}"),
            }
        }
        // Seqs 1..=30 and bodies 1..=30: the same numbering, nothing missing, each once.
        assert_eq!(seen, (1..=30).map(|n| (n, n)).collect::<BTreeMap<_, _>>());
    });
}

fn joining_a_room_with_since_recovers_what_was_missed(store: &[&str]) {
    let (_gw, ports) = gateway_on("store-join-since", store, &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        send(&mut alice, json!({"type":"join","room":"news"})).await;
        recv(&mut alice).await;
        for n in 1..=4 {
            let ack = send_acked(
                &mut alice,
                json!({"type":"publish","room":"news","id":format!("p{n}"),"body":n}),
            )
            .await;
            assert_eq!(
                (&ack["status"], &ack["conv"], seq(&ack)),
                (&json!("stored"), &json!("room:news"), n)
            );
        }
        let (mut carol, _) = connect(ports[1], "carol").await;
        send(&mut carol, json!({"type":"join","room":"news","since":1})).await;
        assert_eq!(recv(&mut carol).await, json!({"type":"joined","room":"news"}));
        let page = recv(&mut carol).await;
        assert_eq!((&page["type"], seqs_of(&page)), (&json!("history"), vec![2, 3, 4]));
        assert_eq!(page["messages"][0]["room"], "news");
        // And live from there on.
        send_acked(&mut alice, json!({"type":"publish","room":"news","body":5})).await;
        assert_eq!(seq(&recv(&mut carol).await), 5);
        // The room is now one of carol's conversations.
        let (_c2, ready) = connect(ports[0], "carol").await;
        assert_eq!(ready["convs"], json!([{"conv":"room:news","seq":5}]));
    });
}

/// A connection may join a room before its `ready` is written (`ready` waits behind the
/// store's queue of reads; `joined` does not). It was sent `joined`, so what is published
/// into the room from then on reaches it live, even while its `ready` is still on its way.
fn a_member_that_joins_before_its_ready_gets_the_room_live(store: &[&str]) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (_gw, ports) = gateway_on("store-join-before-ready", store, &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        send(&mut alice, json!({"type":"join","room":"lobby"})).await;
        assert_eq!(recv(&mut alice).await, json!({"type":"joined","room":"lobby"}));
        send(&mut alice, json!({"type":"join","room":"archive"})).await;
        assert_eq!(recv(&mut alice).await, json!({"type":"joined","room":"archive"}));
        for n in 0..40 {
            send_acked(&mut alice, json!({"type":"publish","room":"archive","body":n})).await;
        }
        // A queue of reads in front of bob's `ready` (their answers taken as they come).
        let (mut reader, _) = connect(ports[0], "reader").await;
        let read = json!({"type":"history","conv":"room:archive","limit":40}).to_string();
        for _ in 0..4000 {
            reader.feed(Message::Text(read.clone())).await.unwrap();
        }
        reader.flush().await.unwrap();
        let drain = tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = reader.next().await {}
        });
        let (mut bob, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws?user=bob", ports[1]))
            .await
            .expect("upgrade");
        send(&mut bob, json!({"type":"join","room":"lobby"})).await;
        let mut before_joined = Vec::new();
        loop {
            let frame = recv(&mut bob).await;
            if frame == json!({"type":"joined","room":"lobby"}) {
                break;
            }
            before_joined.push(frame);
        }
        let ack = send_acked(
            &mut alice,
            json!({"type":"publish","room":"lobby","id":"p1","body":"hi"}),
        )
        .await;
        assert_eq!((&ack["status"], seq(&ack)), (&json!("stored"), 1), "{ack}");
        let mut seen = before_joined;
        let message = loop {
            let frame = recv(&mut bob).await;
            if frame["type"] == "room_message" {
                break frame;
            }
            seen.push(frame);
        };
        assert_eq!(
            (&message["conv"], seq(&message), &message["body"]),
            (&json!("room:lobby"), 1, &json!("hi")),
            "frames before it: {seen:?}"
        );
        drain.abort();
    });
}

fn a_retried_send_is_stored_once_and_acked_with_the_original_position(store: &[&str]) {
    let (_gw, ports) = gateway_on("store-retry", store, &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let (mut bob, _) = connect(ports[1], "bob").await;
        let first = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"once","body":"x"})).await;
        assert_eq!(seq(&recv(&mut bob).await), 1);
        let retry = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"once","body":"x"})).await;
        assert_eq!(first, retry);
        // Another user may use the same id.
        let bobs = send_acked(&mut bob, json!({"type":"send","to":"alice","id":"once","body":"y"})).await;
        assert_eq!(seq(&bobs), 2);
        let page = history(&mut bob, json!({"type":"history","conv":"dm:alice:bob","since":0})).await;
        assert_eq!(seqs_of(&page), vec![1, 2]);
        assert_eq!(page["messages"][0]["from"], "alice");
    });
}

fn trimmed_history_is_answered_not_recovered(store: &[&str]) {
    let (_gw, ports) = gateway_on("store-retention", store, &["--retention-max-messages", "3"]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        for n in 1..=5 {
            send_acked(&mut alice, json!({"type":"send","to":"bob","body":n})).await;
        }
        let page = history(&mut alice, json!({"type":"history","conv":"dm:alice:bob","since":0})).await;
        assert_eq!(seqs_of(&page), vec![3, 4, 5]);
        assert_eq!(
            (&page["recovered"], &page["first"], &page["head"]),
            (&json!(false), &json!(3), &json!(5))
        );
        let page = history(&mut alice, json!({"type":"history","conv":"dm:alice:bob","since":2})).await;
        assert_eq!((seqs_of(&page), &page["recovered"]), (vec![3, 4, 5], &json!(true)));
    });
}

fn bad_history_requests_get_clear_errors_and_keep_the_connection(store: &[&str]) {
    let (_gw, ports) = gateway_on("store-bad", store, &["--rooms-closed-by-default"]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        send_acked(&mut alice, json!({"type":"send","to":"bob","body":1})).await;
        let (mut carol, _) = connect(ports[1], "carol").await;
        let cases = [
            (json!({"type":"history","conv":"dm:alice:bob","id":"1"}), "forbidden"),
            (json!({"type":"history","conv":"room:secret","id":"2"}), "forbidden"),
            (
                json!({"type":"history","conv":"dm:carol:zed","since":0,"id":"3"}),
                "not_found",
            ),
            (json!({"type":"history","conv":"dm:zed:carol","id":"4"}), "bad_field"),
            (json!({"type":"history","conv":"chat:x","id":"5"}), "bad_field"),
            (
                json!({"type":"history","conv":"dm:carol:zed","limit":5000,"id":"6"}),
                "bad_field",
            ),
            (
                json!({"type":"history","conv":"dm:carol:zed","since":1,"before":3,"id":"7"}),
                "bad_field",
            ),
        ];
        for (request, code) in cases {
            let e = send_acked(&mut carol, request.clone()).await;
            assert_eq!(
                (&e["type"], &e["code"], &e["id"]),
                (&json!("error"), &json!(code), &request["id"]),
                "{request}: {e}"
            );
        }
        let e = send_acked(
            &mut alice,
            json!({"type":"history","conv":"dm:alice:bob","since":9,"id":"8"}),
        )
        .await;
        assert_eq!(e["code"], "bad_field", "{e}");
        assert!(e["message"].as_str().unwrap().contains("past the end"), "{e}");
        // Still connected and served.
        let ack = send_acked(&mut carol, json!({"type":"send","to":"alice","body":"still here"})).await;
        assert_eq!(ack["status"], "stored");
    });
}

#[test]
fn relay_mode_keeps_no_history_and_a_cluster_refuses_the_embedded_store() {
    let dir = temp_dir("store-none");
    let (_gw, ports) = gateway_in(&dir, &["--store", "none"]);
    runtime().block_on(async {
        let mut alice = connect_user(&format!("ws://127.0.0.1:{}/ws?user=alice", ports[0]), "alice").await;
        let ack = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"r","body":1})).await;
        assert_eq!(ack, json!({"type":"ack","id":"r","status":"offline"}));
        let e = send_acked(&mut alice, json!({"type":"history","conv":"dm:alice:bob"})).await;
        assert_eq!(e["code"], "unavailable");
    });
    assert!(!dir.join("messages").exists(), "relay mode writes no store");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args([
            "serve",
            "--store",
            "embedded",
            "--nats",
            "nats://127.0.0.1:1",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--store embedded cannot run with --nats"),
        "{err}"
    );
}

#[test]
fn a_foreign_data_directory_is_refused_with_its_path() {
    let dir = temp_dir("store-foreign");
    let messages = dir.join("messages");
    std::fs::create_dir_all(&messages).unwrap();
    std::fs::write(messages.join("thesis.tex"), "not a store").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(messages.to_str().unwrap()) && err.contains("not a shardgate message store"),
        "{err}"
    );
}

#[test]
fn the_push_webhook_gets_signed_batches_and_retries_after_a_500() {
    let dir = temp_dir("store-push");
    let secret_file = dir.join("push.key");
    let secret = "0123456789abcdef0123456789abcdef-push";
    std::fs::write(&secret_file, secret).unwrap();
    std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (port, requests) = webhook_server(vec![500]);
    let url = format!("http://127.0.0.1:{port}/push");
    let (_gw, ports) = gateway_in(
        &dir,
        &[
            "--push-webhook",
            &url,
            "--push-secret-file",
            secret_file.to_str().unwrap(),
            "--push-preview-bytes",
            "5",
        ],
    );
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let (mut carol, _) = connect(ports[1], "carol").await;
        // Carol is connected: no push for her. Bob is not.
        send_acked(&mut alice, json!({"type":"send","to":"carol","body":"hello carol"})).await;
        let ack = send_acked(&mut alice, json!({"type":"send","to":"bob","body":"hello bob"})).await;
        assert_eq!(ack["status"], "stored");
        recv(&mut carol).await;
    });
    let wait = Duration::from_secs(10);
    let (first_headers, first_body) = requests.recv_timeout(wait).expect("a push request");
    let (headers, body) = requests.recv_timeout(wait).expect("the retry after the 500");
    assert_eq!(first_body, body, "the retry carries the same batch");
    assert_eq!(first_headers["content-type"], "application/json");
    let timestamp = &headers["x-shardgate-timestamp"];
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&body);
    let hex: String = ring::hmac::sign(&key, &signed)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(headers["x-shardgate-signature"], format!("sha256={hex}"));
    let events: Value = serde_json::from_slice(&body).unwrap();
    let event = &events["events"][0];
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "{events}");
    assert_eq!(
        (
            &event["user"],
            &event["conv"],
            &event["seq"],
            &event["from"],
            &event["preview"]
        ),
        (
            &json!("bob"),
            &json!("dm:alice:bob"),
            &json!(1),
            &json!("alice"),
            &json!("hello")
        )
    );
    assert!(
        requests.recv_timeout(Duration::from_millis(500)).is_err(),
        "one delivery, one retry"
    );
}

/// Sends as fast as acks come back, `kill -9`s the gateway mid-stream, restarts it on the
/// same directory: every message acked `stored` is there, once, in order, and the
/// sequence goes on.
fn every_message_acked_stored_survives_kill_9(store: &[&str]) {
    let dir = temp_dir(&format!("store-crash-{}", store_kind(store)));
    let (mut gw, ports) = gateway_in(&dir, store);
    let acked: Vec<(u64, String)> = runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let mut acked = Vec::new();
        let window = 64;
        let mut sent = 0u64;
        // Keep `window` sends in flight; kill once 2,000 are acked.
        while sent < window {
            sent += 1;
            send(
                &mut alice,
                json!({"type":"send","to":"bob","id":format!("k{sent}"),"body":sent}),
            )
            .await;
        }
        loop {
            let ack = recv(&mut alice).await;
            assert_eq!(ack["status"], "stored", "{ack}");
            acked.push((seq(&ack), ack["id"].as_str().unwrap().to_string()));
            if acked.len() == 2000 {
                gw.signal(libc::SIGKILL);
                break;
            }
            sent += 1;
            send(
                &mut alice,
                json!({"type":"send","to":"bob","id":format!("k{sent}"),"body":sent}),
            )
            .await;
        }
        acked
    });
    assert!(!gw.wait_exit().success());
    let (_gw, ports) = gateway_in(&dir, store);
    runtime().block_on(async {
        let (mut bob, ready) = connect(ports[1], "bob").await;
        let head = ready["convs"][0]["seq"].as_u64().unwrap();
        assert!(head >= 2000, "{ready}");
        let mut stored = Vec::new();
        let mut since = 0;
        loop {
            let page = history(
                &mut bob,
                json!({"type":"history","conv":"dm:alice:bob","since":since,"limit":1000}),
            )
            .await;
            for m in page["messages"].as_array().unwrap() {
                stored.push((seq(m), m["id"].as_str().unwrap().to_string()));
            }
            since = stored.last().map_or(since, |s| s.0);
            if page["more"] == json!(false) {
                break;
            }
        }
        // 1..=head with no gap, each client id once, and every acked one at its acked seq.
        assert_eq!(
            stored.iter().map(|s| s.0).collect::<Vec<_>>(),
            (1..=head).collect::<Vec<_>>()
        );
        let stored: BTreeMap<u64, String> = stored.into_iter().collect();
        let ids: std::collections::HashSet<&String> = stored.values().collect();
        assert_eq!(ids.len(), stored.len(), "a message stored twice");
        for (seq, id) in &acked {
            assert_eq!(stored.get(seq), Some(id), "acked {id} at {seq}");
        }
        let (mut alice, _) = connect(ports[0], "alice").await;
        let ack = send_acked(&mut alice, json!({"type":"send","to":"bob","body":"after"})).await;
        assert_eq!(seq(&ack), head + 1);
    });
}

/// A data directory on a 4 MiB tmpfs (root mounts it): once the disk is full, sends are
/// answered `unavailable`, the gateway says so and keeps serving (a read is answered, or
/// refused with `unavailable` while the store's engine is behind its log, never a page
/// that lacks an acked message); restarted with room on the disk, every message acked
/// `stored` is there and the sequence goes on after it.
#[test]
fn a_full_disk_answers_unavailable_and_loses_nothing_acked() {
    let dir = temp_dir("store-full");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(mounted, "this test mounts a tmpfs, which needs root (CI runs as root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    // Room taken now and given back before the restart.
    let ballast = dir.join("ballast");
    std::fs::write(&ballast, vec![1u8; 1536 << 10]).unwrap();
    let flags = ["--max-chat-message", "65536", "--retention-max-messages", "0"];
    let (mut gw, ports) = gateway_in(&dir, &flags);
    // Bodies that do not compress (the store compresses its blocks).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = move || {
        (0..60_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect::<String>()
    };
    let acked = runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let mut acked = Vec::new();
        let mut refused = None;
        for n in 0..400 {
            let a = send_acked(
                &mut alice,
                json!({"type":"send","to":"bob","id":format!("f{n}"),"body":noise()}),
            )
            .await;
            match a["type"].as_str() {
                Some("ack") => acked.push(seq(&a)),
                _ => {
                    refused = Some(a);
                    break;
                }
            }
        }
        let e = refused.expect("a 4 MiB disk fills before 400 messages of 60 kB");
        assert_eq!(e["code"], "unavailable", "{e}");
        let last = *acked.last().expect("some messages fit");
        // Still serving: a read gets the acked message or a clear refusal, and a new
        // connection gets its `ready`.
        send(
            &mut alice,
            json!({"type":"history","conv":"dm:alice:bob","since":last - 1}),
        )
        .await;
        let page = recv(&mut alice).await;
        match page["type"].as_str() {
            Some("history") => assert_eq!(seqs_of(&page), vec![last]),
            _ => assert_eq!(page["code"], "unavailable", "{page}"),
        }
        let (_bob, ready) = connect(ports[1], "bob").await;
        assert_eq!(ready["type"], "ready", "{ready}");
        acked
    });
    gw.wait_line("store: cannot write messages");
    gw.signal(libc::SIGTERM);
    gw.wait_exit();
    std::fs::remove_file(&ballast).unwrap();
    let (_gw, ports) = gateway_in(&dir, &flags);
    runtime().block_on(async {
        let (mut bob, ready) = connect(ports[1], "bob").await;
        let head = ready["convs"][0]["seq"].as_u64().unwrap_or(0);
        let last = *acked.last().unwrap();
        assert!(head >= last, "{ready}");
        let mut held = Vec::new();
        let mut since = 0;
        while since < head {
            let page = history(
                &mut bob,
                json!({"type":"history","conv":"dm:alice:bob","since":since,"limit":20}),
            )
            .await;
            held.extend(seqs_of(&page));
            since = held.last().copied().unwrap_or(head);
        }
        assert!(acked.iter().all(|s| held.contains(s)), "acked {acked:?}, held {held:?}");
        let (mut alice, _) = connect(ports[0], "alice").await;
        let a = send_acked(&mut alice, json!({"type":"send","to":"bob","body":"after"})).await;
        assert_eq!((&a["status"], seq(&a)), (&json!("stored"), head + 1), "{a}");
    });
}

/// Redis killed under a running gateway: sends are answered `unavailable` at once and the
/// connection stays; once Redis is back (its append-only file synced before each reply)
/// the gateway connects again by itself and says so, every message acked `stored` before
/// the crash is there, and the sequence goes on from it.
#[test]
fn redis_down_answers_unavailable_and_loses_nothing_acked() {
    let mut redis = Redis::start("down");
    let url = redis.url(3);
    let (mut gw, ports) = gateway_on("store-redis-down", &["--store", &url], &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        for n in 1..=20 {
            let ack = send_acked(&mut alice, json!({"type":"send","to":"bob","body":n})).await;
            assert_eq!((&ack["status"], seq(&ack)), (&json!("stored"), n), "{ack}");
        }
        redis.kill();
        for attempt in ["during-1", "during-2"] {
            let started = std::time::Instant::now();
            let e = send_acked(&mut alice, json!({"type":"send","to":"bob","id":attempt,"body":"x"})).await;
            assert_eq!(
                (&e["type"], &e["code"], &e["id"]),
                (&json!("error"), &json!("unavailable"), &json!(attempt)),
                "{e}"
            );
            assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        }
        redis.restart();
        // The gateway tries Redis again after a growing wait (at most 2 s): a client
        // retries with the same id, as the error says, until it is stored.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ack = loop {
            let v = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"during-2","body":"x"})).await;
            if v["code"] != "unavailable" || std::time::Instant::now() > deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!((&ack["status"], seq(&ack)), (&json!("stored"), 21), "{ack}");
        let page = history(&mut alice, json!({"type":"history","conv":"dm:alice:bob","since":0})).await;
        assert_eq!(seqs_of(&page), (1..=21).collect::<Vec<_>>());
    });
    gw.seen_or_wait("cannot write messages");
    gw.seen_or_wait("writing messages again");
}

/// A Redis that stops answering (hung, not gone): sends are answered `unavailable` after a
/// bounded wait, the shards go on serving (a new connection upgrades, pings are answered),
/// and once Redis answers again sends are stored, with nothing acked before it lost.
#[test]
fn a_hung_redis_answers_unavailable_in_bounded_time_and_never_blocks_a_shard() {
    let redis = Redis::start("hung");
    let url = redis.url(0);
    let (_gw, ports) = gateway_on("store-redis-hung", &["--store", &url], &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let ack = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"before","body":1})).await;
        assert_eq!((&ack["status"], seq(&ack)), (&json!("stored"), 1), "{ack}");
        redis.freeze(true);
        let started = std::time::Instant::now();
        send(&mut alice, json!({"type":"send","to":"bob","id":"hung","body":2})).await;
        // Meanwhile the shard upgrades a new connection and answers its ping.
        let (mut other, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws?user=carol", ports[0]))
            .await
            .expect("upgrade while Redis hangs");
        {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::Message;
            other.send(Message::Ping(b"still there".to_vec())).await.unwrap();
            let pong = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match other.next().await {
                        Some(Ok(Message::Pong(p))) => return p,
                        Some(Ok(_)) => continue,
                        other => panic!("{other:?}"),
                    }
                }
            })
            .await
            .expect("the shard answers a ping while Redis hangs");
            assert_eq!(pong, b"still there");
        }
        let e = recv(&mut alice).await;
        assert_eq!((&e["code"], &e["id"]), (&json!("unavailable"), &json!("hung")), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        redis.freeze(false);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ack = loop {
            let v = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"hung","body":2})).await;
            if v["code"] != "unavailable" || std::time::Instant::now() > deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The hung attempt may have been written before Redis froze: then the retry is
        // answered with its seq, 2, either way.
        assert_eq!((&ack["status"], seq(&ack)), (&json!("stored"), 2), "{ack}");
    });
}

/// `rediss://` with a password: the gateway checks Redis's certificate against
/// `--store-tls-ca` and stores over TLS; without that CA (a certificate no system root
/// signed) it cannot connect, and says so, and sends are answered `unavailable`.
#[test]
fn a_redis_over_tls_with_a_password_is_used_when_its_ca_is_trusted() {
    let dir = temp_dir("store-redis-tls-files");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let tls_port = free_redis_port();
    let (port, cert_arg, key_arg) = (
        tls_port.to_string(),
        cert_pem.to_str().unwrap(),
        key_pem.to_str().unwrap(),
    );
    let redis = Redis::start_with(
        "tls",
        &[
            "--tls-port",
            &port,
            "--tls-cert-file",
            cert_arg,
            "--tls-key-file",
            key_arg,
            "--tls-ca-cert-file",
            cert_arg,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret-pass",
        ],
    );
    let url = format!("rediss://:s3cret-pass@127.0.0.1:{tls_port}/0");
    let (mut gw, ports) = gateway_on("store-redis-tls", &["--store", &url, "--store-tls-ca", cert_arg], &[]);
    let line = gw.seen_or_wait("store: redis at rediss://:***@127.0.0.1");
    assert!(line.ends_with("connected"), "{line}");
    runtime().block_on(async {
        let (mut alice, _) = connect(ports[0], "alice").await;
        let ack = send_acked(
            &mut alice,
            json!({"type":"send","to":"bob","id":"t1","body":"over tls"}),
        )
        .await;
        assert_eq!((&ack["status"], seq(&ack)), (&json!("stored"), 1), "{ack}");
    });
    // The password never shows, and the plain port holds what came over TLS.
    assert!(gw.seen.iter().all(|l| !l.contains("s3cret-pass")), "{:?}", gw.seen);
    let head = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "-a", "s3cret-pass", "--no-auth-warning"])
        .args(["GET", "sg:{dm:alice:bob}:head"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), "1");
    drop(gw);
    // Without the CA: the certificate is not trusted, nothing is stored.
    let (mut untrusting, ports) = gateway_on("store-redis-tls-untrusted", &["--store", &url], &[]);
    untrusting.seen_or_wait("unreachable");
    runtime().block_on(async {
        let (mut alice, ready) = connect(ports[0], "alice").await;
        assert_eq!(ready["convs"], json!([]));
        let e = recv(&mut alice).await;
        assert_eq!(e["code"], "unavailable", "ready could not list the conversations: {e}");
        let e = send_acked(&mut alice, json!({"type":"send","to":"bob","id":"t2","body":"x"})).await;
        assert_eq!((&e["code"], &e["id"]), (&json!("unavailable"), &json!("t2")), "{e}");
    });
}

/// A Redis that acknowledges writes before syncing them is said at start, with the
/// settings that make `stored` hold.
#[test]
fn a_redis_that_may_lose_acked_writes_is_said_at_start() {
    let redis = Redis::start_with("everysec", &["--appendfsync", "everysec"]);
    let url = redis.url(0);
    let (mut gw, _) = gateway_on("store-redis-everysec", &["--store", &url], &[]);
    let line = gw.seen_or_wait("appendfsync=everysec");
    assert!(line.contains("set appendonly yes and appendfsync always"), "{line}");
}
