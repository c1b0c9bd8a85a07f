//! Gateways joined through a real nats-server: users on different processes exchange
//! direct and room messages; nodes that die, and a NATS server that restarts.
//!
//! `scripts/test.sh` starts one nats-server for the run and names it in
//! `SHARDGATE_TEST_NATS`; without it each test starts its own. Tests that restart or
//! need a server to themselves always start their own.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use shardgate::cluster::directory::{home_among, key_hash, DirKey};
use tokio_tungstenite::tungstenite::Message;

/// The run's nats-server, or one of this test's own.
fn nats() -> (Option<Nats>, String) {
    match std::env::var("SHARDGATE_TEST_NATS") {
        Ok(url) if !url.is_empty() => (None, url),
        _ => {
            let n = Nats::start();
            let url = n.url();
            (Some(n), url)
        }
    }
}

struct Node {
    gw: Gateway,
    id: String,
    prefix: String,
}

/// Writes a cluster key (mode 0600) into `dir`.
fn cluster_key(dir: &std::path::Path, byte: u8) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("cluster-key");
    std::fs::write(&path, format!("{byte:02x}").repeat(32)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Starts a node of cluster `prefix` (one shard, dev auth, no rate limit).
fn node(name: &str, url: &str, prefix: &str, extra: &[&str]) -> Node {
    let dir = temp_dir(name);
    let key = cluster_key(&temp_dir(&format!("{prefix}-key")), 0x5a);
    let mut args = vec![
        "--cluster-key-file",
        key.to_str().unwrap(),
        "--shards",
        "1",
        "--insecure-dev-auth",
        "--rate-limit",
        "0",
        "--report-interval",
        "1s",
        "--nats",
        url,
        "--nats-prefix",
        prefix,
        "--data-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut gw = Gateway::start(&args);
    let line = gw.seen_or_wait("cluster: node ");
    let id = line
        .split("cluster: node ")
        .nth(1)
        .expect("node line")
        .split(',')
        .next()
        .expect("node id")
        .to_string();
    gw.seen_or_wait("cluster: connected to NATS");
    Node {
        gw,
        id,
        prefix: prefix.to_string(),
    }
}

/// Starts `n` nodes and waits until each one's directory is ready with every other.
fn cluster(name: &str, url: &str, n: usize, extra: &[&str]) -> Vec<Node> {
    let prefix = format!("t{}{}", std::process::id(), name.replace('-', "_"));
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| node(&format!("{name}-{i}"), url, &prefix, extra))
        .collect();
    for node in nodes.iter_mut() {
        node.gw
            .seen_or_wait(&format!("cluster: directory ready: {} other node(s)", n - 1));
    }
    nodes
}

async fn connect(node: &Node, user: &str) -> Ws {
    connect_user(&node.gw.url(&format!("/ws?user={user}")), user).await
}

/// Sends probes to `to` until one is acknowledged `routed` (presence reaches other nodes
/// a moment after `ready`); returns how many probes were sent. The recipient sees only
/// the routed one.
async fn until_routed(ws: &mut Ws, to: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 1.. {
        let id = format!("probe-{n}");
        send(ws, json!({"type":"send","to":to,"id":id,"body":"probe"})).await;
        let ack = recv(ws).await;
        assert_eq!(ack["id"], id.as_str(), "{ack}");
        if ack["status"] == "routed" {
            return n;
        }
        assert!(Instant::now() < deadline, "{to} never became reachable: {ack}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// Skips the probe a recipient got.
async fn take_probe(ws: &mut Ws) {
    let m = recv(ws).await;
    assert_eq!(m["body"], "probe", "{m}");
}

#[test]
fn two_nodes_exchange_direct_and_room_messages() {
    let (_nats, url) = nats();
    let mut nodes = cluster("two", &url, 2, &[]);
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut bob = connect(&nodes[1], "bob").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob).await;
        send(
            &mut alice,
            json!({"type":"send","to":"bob","id":"m1","body":{"text":"hi"}}),
        )
        .await;
        assert_eq!(
            recv(&mut alice).await,
            json!({"type":"ack","id":"m1","status":"routed"})
        );
        let m = recv(&mut bob).await;
        assert_eq!(
            (m["type"].as_str(), m["from"].as_str()),
            (Some("message"), Some("alice"))
        );
        assert_eq!(m["body"], json!({"text":"hi"}));
        // And back; and to a user no node holds.
        send(&mut bob, json!({"type":"send","to":"alice","id":"r1","body":"pong"})).await;
        assert_eq!(recv(&mut bob).await["status"], "routed");
        assert_eq!(recv(&mut alice).await["body"], "pong");
        send(&mut alice, json!({"type":"send","to":"nobody","id":"m2","body":1})).await;
        assert_eq!(
            recv(&mut alice).await,
            json!({"type":"ack","id":"m2","status":"offline"})
        );

        // A room with members on both nodes.
        let mut carol = connect(&nodes[0], "carol").await;
        for ws in [&mut carol, &mut bob] {
            send(ws, json!({"type":"join","room":"lobby"})).await;
            assert_eq!(recv(ws).await, json!({"type":"joined","room":"lobby"}));
        }
        // Until node 0 knows node 1 has members, a publish reaches carol only.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        loop {
            n += 1;
            let id = format!("p{n}");
            send(&mut carol, json!({"type":"publish","room":"lobby","id":id,"body":n})).await;
            assert_eq!(recv(&mut carol).await, json!({"type":"ack","id":id,"status":"routed"}));
            let got = tokio::time::timeout(Duration::from_millis(200), recv(&mut bob)).await;
            if let Ok(m) = got {
                assert_eq!(
                    (m["type"].as_str(), m["room"].as_str()),
                    (Some("room_message"), Some("lobby"))
                );
                assert_eq!(m["from"], "carol");
                assert_eq!(m["body"], n);
                break;
            }
            assert!(Instant::now() < deadline, "the publish never crossed nodes");
        }
        // From the other side, with a member on each node: carol gets it, bob (the sender) not.
        send(&mut bob, json!({"type":"publish","room":"lobby","id":"b1","body":"x"})).await;
        assert_eq!(recv(&mut bob).await, json!({"type":"ack","id":"b1","status":"routed"}));
        let m = recv(&mut carol).await;
        assert_eq!((m["from"].as_str(), m["body"].as_str()), (Some("bob"), Some("x")));
        // The sender was excluded: the next frame bob sees is the answer to his next send.
        send(&mut bob, json!({"type":"send","to":"carol","id":"b2","body":"y"})).await;
        assert_eq!(recv(&mut bob).await, json!({"type":"ack","id":"b2","status":"routed"}));
        assert_eq!(recv(&mut carol).await["body"], "y");
        // The directory (its gauges are a second old at most): settled, with alice, carol
        // and the lobby held here, each one's home has answered, and nothing waits.
        scrape_until(nodes[0].gw.addr, |s| {
            sum(s, "shardgate_cluster_directory_ready", &[]) == 1.0
                && sum(s, "shardgate_cluster_directory_keys", &["role=\"local\""]) == 3.0
                && sum(s, "shardgate_cluster_directory_keys", &["role=\"unconfirmed\""]) == 0.0
                && sum(s, "shardgate_cluster_directory_waiting", &["what=\"sends\""]) == 0.0
        });
    });
    // /metrics shows the cluster: the other node, the batches, the sends that crossed.
    let m = scrape_until(nodes[0].gw.addr, |s| {
        sum(s, "shardgate_cluster_sends_total", &["outcome=\"routed\""]) >= 2.0
    });
    assert_eq!(sum(&m, "shardgate_cluster_connected", &[]), 1.0);
    assert_eq!(sum(&m, "shardgate_cluster_nodes", &[]), 1.0);
    assert!(sum(&m, "shardgate_cluster_batches_total", &["direction=\"out\""]) >= 1.0);
    assert!(sum(&m, "shardgate_cluster_batches_total", &["direction=\"in\""]) >= 1.0);
    assert!(sum(&m, "shardgate_cluster_records_total", &["direction=\"out\""]) >= 3.0);
    assert!(sum(&m, "shardgate_cluster_receipts_total", &[]) >= 1.0);
    // m2 to nobody, and any probe sent before bob's presence arrived.
    assert!(sum(&m, "shardgate_cluster_sends_total", &["outcome=\"offline\""]) >= 1.0);
    // Out: the probes, m1, m2, p1..pn; in: pong, b1, b2 (at least).
    assert!(sum(&m, "shardgate_messages_routed_total", &["kind=\"cross_node\""]) >= 6.0);
    // Each node counts what crossed into it, in the report lines and the final summary.
    // The traffic is over: once an interval reports none after some did, every message
    // that crossed has been reported.
    let node1 = &mut nodes[1].gw;
    let cross_of = |line: &str| -> u64 {
        line.split("cross_node=")
            .nth(1)
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("a cross_node field")
    };
    let mut crossed: u64 = node1
        .seen
        .iter()
        .filter(|l| l.starts_with("report: "))
        .map(|l| cross_of(l))
        .sum();
    loop {
        let n = cross_of(&node1.wait_line("report: "));
        crossed += n;
        if crossed > 0 && n == 0 {
            break;
        }
    }
    node1.signal(libc::SIGTERM);
    assert!(node1.wait_exit().success());
    let summary = node1
        .seen
        .iter()
        .find(|l| l.starts_with("cross-node messages: "))
        .unwrap_or_else(|| panic!("no cross-node summary in {:?}", node1.seen));
    let count: u64 = summary["cross-node messages: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Into node 1: the probe, m1 and the publish that crossed (b2 went the other way).
    assert!(count >= 3, "{summary}");
    assert_eq!(crossed, count, "report lines add up to the summary");
}

#[test]
fn three_nodes_keep_order_per_sender_and_reach_every_device() {
    let (_nats, url) = nats();
    let nodes = cluster("three", &url, 3, &[]);
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut phone = connect(&nodes[1], "bob").await;
        let mut laptop = connect(&nodes[2], "bob").await;
        // Wait until alice's node routes to both of bob's devices.
        loop {
            let n = until_routed(&mut alice, "bob").await;
            let _ = n;
            let a = tokio::time::timeout(Duration::from_millis(300), recv(&mut phone)).await;
            let b = tokio::time::timeout(Duration::from_millis(300), recv(&mut laptop)).await;
            if a.is_ok() && b.is_ok() {
                break;
            }
        }
        const N: usize = 3000;
        let (mut tx, mut rx) = alice.split();
        let sender = async {
            for i in 0..N {
                let m = json!({"type":"send","to":"bob","id":format!("s{i}"),"body":i});
                tx.send(Message::Text(m.to_string())).await.unwrap();
            }
        };
        let acks = async {
            let mut routed = 0;
            while routed < N {
                match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        assert_eq!(v["status"], "routed", "{v}");
                        routed += 1;
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("acks stopped after {routed}: {other:?}"),
                }
            }
        };
        tokio::join!(sender, acks, in_order(&mut phone, N), in_order(&mut laptop, N));
    });
}

/// Receives bodies 0..n in order (probes aside).
async fn in_order(ws: &mut Ws, n: usize) {
    let mut next = 0u64;
    while next < n as u64 {
        let m = recv(ws).await;
        if m["body"] == "probe" {
            continue;
        }
        assert_eq!(m["body"], next, "in order");
        next += 1;
    }
}

/// Runs a short steady stream of sends from `from` to `to` and records what came of each.
struct Tally {
    routed: HashSet<String>,
    offline: HashSet<String>,
    unavailable: HashSet<String>,
    delivered: HashSet<String>,
}

#[test]
fn nats_restart_mid_traffic_loses_no_message_silently() {
    let mut nats = Nats::start();
    let url = nats.url();
    let mut nodes = cluster("restart", &url, 2, &[]);
    let tally = runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut bob = connect(&nodes[1], "bob").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob).await;
        let (mut tx, mut rx) = alice.split();
        let mut tally = Tally {
            routed: HashSet::new(),
            offline: HashSet::new(),
            unavailable: HashSet::new(),
            delivered: HashSet::new(),
        };
        let sent = std::cell::Cell::new(0usize);
        let done_sending = std::cell::Cell::new(false);
        // 2 s of traffic; the server restarts half a second in.
        let sender = async {
            let start = Instant::now();
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(2) {
                for _ in 0..10 {
                    let m = json!({"type":"send","to":"bob","id":format!("s{i}"),"body":i});
                    tx.send(Message::Text(m.to_string())).await.unwrap();
                    i += 1;
                }
                sent.set(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            done_sending.set(true);
        };
        let restarter = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The blocking restart runs on a thread of its own; the clients keep going.
            let handle = std::thread::spawn(move || {
                nats.restart();
                nats
            });
            loop {
                if handle.is_finished() {
                    break handle.join().unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let answers = async {
            let mut answered = 0;
            let mut last_progress = Instant::now();
            loop {
                if done_sending.get() && answered == sent.get() {
                    break;
                }
                assert!(
                    last_progress.elapsed() < Duration::from_secs(10),
                    "answers stopped after {answered} of {}",
                    sent.get()
                );
                match tokio::time::timeout(Duration::from_millis(100), rx.next()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        let id = v["id"].as_str().expect("every answer names its message").to_string();
                        match (v["type"].as_str(), v["status"].as_str(), v["code"].as_str()) {
                            (Some("ack"), Some("routed"), _) => tally.routed.insert(id),
                            (Some("ack"), Some("offline"), _) => tally.offline.insert(id),
                            (Some("error"), _, Some("unavailable")) => tally.unavailable.insert(id),
                            _ => panic!("unexpected answer {v}"),
                        };
                        answered += 1;
                        last_progress = Instant::now();
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(other) => panic!("alice's connection ended after {answered} answers: {other:?}"),
                }
            }
        };
        let receiving = async {
            // Bob takes what arrives until two quiet seconds after the sending ended.
            loop {
                match tokio::time::timeout(Duration::from_secs(2), bob.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        tally.delivered.insert(v["id"].as_str().unwrap().to_string());
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(other) => panic!("bob's connection ended: {other:?}"),
                    Err(_) if done_sending.get() => break,
                    Err(_) => {}
                }
            }
        };
        let (_, nats, _, _) = tokio::join!(sender, restarter, answers, receiving);
        // The nodes recover by themselves: cross-node sends are routed again.
        let mut alice = rx.reunite(tx).unwrap();
        until_routed(&mut alice, "bob").await;
        drop(nats);
        tally
    });
    let total = tally.routed.len() + tally.offline.len() + tally.unavailable.len();
    println!(
        "{total} sent: {} routed, {} offline, {} unavailable; {} delivered",
        tally.routed.len(),
        tally.offline.len(),
        tally.unavailable.len(),
        tally.delivered.len()
    );
    // Every message was answered once, and every `routed` one arrived.
    let missing: Vec<&String> = tally.routed.difference(&tally.delivered).collect();
    assert!(missing.is_empty(), "routed but never delivered: {missing:?}");
    assert!(
        !tally.unavailable.is_empty(),
        "the outage must show: some sends are answered unavailable"
    );
    assert!(tally.routed.len() > 100, "traffic flowed before and after the restart");
    // The outage and the recovery are on stdout.
    let node0 = &mut nodes[0].gw;
    node0.seen_or_wait("cluster: lost NATS");
    node0.wait_line("cluster: connected to NATS");
}

#[test]
fn a_killed_node_disappears_from_presence() {
    let nats = Nats::start();
    let url = nats.url();
    let mut nodes = cluster("killed", &url, 2, &["--presence-timeout", "2s"]);
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut bob = connect(&nodes[1], "bob").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob).await;
        let killed_id = nodes[1].id.clone();
        nodes[1].gw.signal(libc::SIGKILL);
        let t0 = Instant::now();
        nodes[0]
            .gw
            .wait_line(&format!("cluster: node {killed_id} not heard from"));
        let gone_after = t0.elapsed();
        assert!(gone_after < Duration::from_secs(5), "took {gone_after:?}");
        // The directory applies the change with the next view (within a second).
        nodes[0].gw.wait_line("cluster: directory ready: 0 other node(s)");
        send(&mut alice, json!({"type":"send","to":"bob","id":"after","body":1})).await;
        assert_eq!(
            recv(&mut alice).await,
            json!({"type":"ack","id":"after","status":"offline"})
        );
    });
    drop(nats);
}

#[test]
fn without_nats_cross_node_sends_are_answered_unavailable_and_local_traffic_flows() {
    let mut nats = Nats::start();
    let url = nats.url();
    let nodes = cluster("down", &url, 2, &[]);
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut carol = connect(&nodes[0], "carol").await;
        let mut bob = connect(&nodes[1], "bob").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob).await;
        nats.stop();
        // Once the node noticed, sends to users elsewhere are refused with a reason...
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            send(&mut alice, json!({"type":"send","to":"bob","id":"x","body":1})).await;
            let v = recv(&mut alice).await;
            if v["type"] == "error" {
                assert_eq!(v["code"], "unavailable", "{v}");
                assert_eq!(v["id"], "x");
                break;
            }
            assert!(Instant::now() < deadline, "never answered unavailable: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...while users of this node still reach each other.
        send(&mut alice, json!({"type":"send","to":"carol","id":"l","body":"local"})).await;
        assert_eq!(recv(&mut alice).await, json!({"type":"ack","id":"l","status":"routed"}));
        assert_eq!(recv(&mut carol).await["body"], "local");
    });
}

/// The first sends to a user on another node wait for the directory's lookup at the
/// user's home; those sent meanwhile leave after it, in the order they were sent, and
/// each is acked `routed`.
#[test]
fn sends_that_wait_for_a_lookup_leave_in_order() {
    let (_nats, url) = nats();
    let mut nodes = cluster("lookup", &url, 2, &[]);
    // A recipient whose home is node 1, so that node 0 must ask it.
    let id = |n: &Node| u64::from_str_radix(&n.id, 16).expect("a hex node id");
    let mut view = vec![id(&nodes[0]), id(&nodes[1])];
    view.sort_unstable();
    let bob = (0..)
        .map(|i| format!("bob-{i}"))
        .find(|name| home_among(key_hash(&DirKey::user(name.as_str())), &view) == id(&nodes[1]))
        .expect("some name is homed at node 1");
    runtime().block_on(async {
        let mut bob_ws = connect(&nodes[1], &bob).await;
        wait_findable(&mut nodes[1], 1);
        // Node 0 has never routed to him: its first send asks his home.
        let mut alice = connect(&nodes[0], "alice").await;
        for n in 0..200 {
            send(
                &mut alice,
                json!({"type":"send","to":bob,"id":format!("m{n}"),"body":n}),
            )
            .await;
        }
        for n in 0..200 {
            assert_eq!(
                recv(&mut alice).await,
                json!({"type":"ack","id":format!("m{n}"),"status":"routed"})
            );
        }
        for n in 0..200 {
            assert_eq!(recv(&mut bob_ws).await["body"], n);
        }
    });
    // The answer stays in node 0's cache; nothing waits any more.
    nodes[0].gw.wait_line("cached=1 lookups=0 parked=0 ");
}

/// A third node joins while one node streams to users on another: the keys it wins move
/// to it, and no send is lost, duplicated, reordered or answered `offline` (while the
/// views differ the answer is `unavailable`).
#[test]
fn a_node_joining_mid_traffic_moves_homes_and_loses_nothing() {
    let (_nats, url) = nats();
    let mut nodes = cluster("join", &url, 2, &[]);
    let prefix = nodes[0].prefix.clone();
    // Thirteen keys (alice and these): some are won by the third node but for (2/3)^13.
    let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut recipients = Vec::new();
        for user in &users {
            recipients.push(connect(&nodes[1], user).await);
        }
        wait_findable(&mut nodes[1], users.len());
        let mut routed = vec![Vec::new(); users.len()];
        let mut third = None;
        let mut since_ready = 0;
        let mut n = 0u64;
        // Until 200 sends after the first node's directory took the third one in.
        while since_ready < 200 {
            let i = n as usize % users.len();
            let to = users[i].as_str();
            send(&mut alice, json!({"type":"send","to":to,"id":n.to_string(),"body":n})).await;
            let ack = recv(&mut alice).await;
            match (ack["status"].as_str(), ack["code"].as_str()) {
                (Some("routed"), _) => routed[i].push(n),
                (_, Some("unavailable")) => {}
                _ => panic!("send {n} to {to} was answered {ack}"),
            }
            n += 1;
            if n == 100 {
                third = Some(node("join-2", &url, &prefix, &[]));
            }
            if since_ready > 0 || third.is_some() && nodes[0].gw.saw("cluster: directory ready: 2 other node(s)") {
                since_ready += 1;
            }
        }
        for (i, ws) in recipients.iter_mut().enumerate() {
            let last = *routed[i].last().expect("routed after the join");
            let mut got = Vec::new();
            while got.last() != Some(&last) {
                got.push(recv(ws).await["body"].as_u64().expect("a body"));
            }
            assert!(got.windows(2).all(|w| w[0] < w[1]), "{}: {got:?}", users[i]);
            let missing: Vec<u64> = routed[i].iter().filter(|r| !got.contains(r)).copied().collect();
            assert!(missing.is_empty(), "{}: routed but never came: {missing:?}", users[i]);
        }
        drop(third);
    });
}

#[test]
fn devices_on_the_senders_node_and_elsewhere_both_receive() {
    let (_nats, url) = nats();
    let nodes = cluster("devices", &url, 2, &[]);
    runtime().block_on(async {
        let mut bob_far = connect(&nodes[1], "bob").await;
        let mut alice = connect(&nodes[0], "alice").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob_far).await;
        // bob's second device is on alice's node: the send is local there, and must still
        // reach the device on the other node.
        let mut bob_near = connect(&nodes[0], "bob").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in 0.. {
            let id = format!("d{n}");
            send(&mut alice, json!({"type":"send","to":"bob","id":id,"body":n})).await;
            assert_eq!(recv(&mut alice).await, json!({"type":"ack","id":id,"status":"routed"}));
            assert_eq!(recv(&mut bob_near).await["body"], n);
            if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), recv(&mut bob_far)).await {
                assert_eq!(m["body"], n);
                break;
            }
            assert!(Instant::now() < deadline, "the far device never got a local send");
        }
        // From then on, every message reaches both, in order.
        for n in 1000..1100 {
            send(
                &mut alice,
                json!({"type":"send","to":"bob","id":format!("e{n}"),"body":n}),
            )
            .await;
        }
        for _ in 1000..1100 {
            assert_eq!(recv(&mut alice).await["status"], "routed");
        }
        for n in 1000..1100 {
            assert_eq!(recv(&mut bob_near).await["body"], n);
            assert_eq!(recv(&mut bob_far).await["body"], n);
        }
    });
}

/// Waits for a `cluster:` line whose `rejected_total` is at least `n`; returns it.
fn rejected_at_least(gw: &mut Gateway, n: u64) -> u64 {
    loop {
        let line = gw.wait_line("rejected_total=");
        let total: u64 = line
            .rsplit("rejected_total=")
            .next()
            .and_then(|v| v.trim().parse().ok())
            .expect("rejected_total");
        if total >= n {
            return total;
        }
    }
}

/// A delivery batch as the wire format lays it out, with one record for `to`.
fn raw_batch(sender: u64, seq: u64, to: &str, frame: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&sender.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.push(1); // a direct message
    b.extend_from_slice(&0u64.to_le_bytes());
    b.push(to.len() as u8);
    b.extend_from_slice(to.as_bytes());
    b.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    b.extend_from_slice(frame);
    b
}

/// A client of the same NATS without the cluster key tries to write to a user, claims a
/// user for a node of its own, and replays a real batch it overheard: every attempt is
/// dropped and counted, and no client sees anything of it.
#[test]
fn a_stranger_on_nats_can_neither_write_to_users_nor_claim_them() {
    let (_nats, url) = nats();
    let mut nodes = cluster("stranger", &url, 2, &[]);
    let (prefix, target) = (nodes[1].prefix.clone(), nodes[1].id.clone());
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut bob = connect(&nodes[1], "bob").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob).await;
        let stranger = async_nats::connect(url.as_str()).await.expect("a plain NATS client");
        let inbox = format!("{prefix}.node.{target}.inbox");
        let mut tap = stranger.subscribe(inbox.clone()).await.unwrap();
        stranger.flush().await.unwrap();
        // A batch for bob: unsealed, then with a seal made with another key.
        let forged = raw_batch(0xbad, 1, "bob", b"\x81\x06forged");
        stranger.publish(inbox.clone(), forged.clone().into()).await.unwrap();
        let mut other_key = forged;
        other_key.extend_from_slice(&[0x42; 40]);
        stranger.publish(inbox.clone(), other_key.into()).await.unwrap();
        // A node of its own that holds carol: a directory `Hold` to each node (whichever
        // is carol's home) and a hello.
        let mut hold = 0xbadu64.to_le_bytes().to_vec();
        hold.extend_from_slice(&[1, 1, 5]);
        hold.extend_from_slice(b"carol");
        for node in nodes.iter() {
            let subject = format!("{prefix}.node.{}.dir", node.id);
            stranger.publish(subject, hold.clone().into()).await.unwrap();
        }
        let mut hello = vec![3u8];
        hello.extend_from_slice(&0xbadu64.to_le_bytes());
        stranger
            .publish(format!("{prefix}.presence"), hello.into())
            .await
            .unwrap();
        // A real batch, overheard and sent again.
        send(&mut alice, json!({"type":"send","to":"bob","id":"real","body":"real"})).await;
        assert_eq!(recv(&mut alice).await["status"], "routed");
        assert_eq!(recv(&mut bob).await["id"], "real");
        let overheard = tokio::time::timeout(Duration::from_secs(10), tap.next())
            .await
            .expect("the batch for bob crosses NATS")
            .expect("subscription open");
        stranger.publish(inbox.clone(), overheard.payload).await.unwrap();
        stranger.flush().await.unwrap();

        // Node 1 rejected the two forged batches, the replay, the hold and the hello;
        // node 0 the hold and the hello; nothing else.
        assert_eq!(rejected_at_least(&mut nodes[1].gw, 5), 5);
        assert_eq!(rejected_at_least(&mut nodes[0].gw, 2), 2);
        // Bob's next message is the next real one: no forgery and no second copy came.
        send(
            &mut alice,
            json!({"type":"send","to":"bob","id":"after","body":"after"}),
        )
        .await;
        assert_eq!(recv(&mut alice).await["status"], "routed");
        assert_eq!(recv(&mut bob).await["id"], "after");
        // And no node believes carol is anywhere.
        send(&mut alice, json!({"type":"send","to":"carol","id":"c","body":1})).await;
        assert_eq!(
            recv(&mut alice).await,
            json!({"type":"ack","id":"c","status":"offline"})
        );
    });
    nodes[1].gw.seen_or_wait("cluster: rejected a message on");
}

/// Writes `text` to `dir/name` with mode 0600 (how the gateway wants its secrets).
fn private_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_string()
}

/// Alice on node 0 reaches Bob on node 1, both nodes count the other, and neither printed
/// `secret` (the credential they joined with).
fn routes_across_without_printing(nodes: &mut [Node], secret: &str) {
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        let mut bob = connect(&nodes[1], "bob").await;
        until_routed(&mut alice, "bob").await;
        take_probe(&mut bob).await;
    });
    for node in nodes.iter_mut() {
        node.gw.wait_line("cluster: nodes=1");
        assert!(
            !node.gw.seen.iter().any(|l| l.contains(secret)),
            "a credential was printed"
        );
    }
}

/// A NATS server that wants TLS and a password: nodes with the CA and the password form
/// a cluster without ever printing the password; one with a wrong password says so and
/// stays out.
#[test]
fn nodes_join_a_nats_that_wants_tls_and_a_password() {
    let dir = temp_dir("nats-tls");
    let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = private_file(&dir, "nats-cert.pem", &ca.cert.pem());
    let key = private_file(&dir, "nats-key.pem", &ca.signing_key.serialize_pem());
    let password = "correct-horse-battery-staple";
    let nats = Nats::start_with(&[
        "--tls",
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "--user",
        "gateway",
        "--pass",
        password,
    ]);
    let url = nats.url();
    let good = private_file(&dir, "password", password);
    let access = [
        "--nats-user",
        "gateway",
        "--nats-password-file",
        &good,
        "--nats-tls-ca",
        &cert,
    ];
    let mut nodes = cluster("tls", &url, 2, &access);
    routes_across_without_printing(&mut nodes, password);

    let bad = private_file(&dir, "wrong-password", "not-the-password");
    let key_file = cluster_key(&dir, 0x5a);
    let mut outsider = Gateway::start(&[
        "--shards",
        "1",
        "--report-interval",
        "1s",
        "--data-dir",
        dir.to_str().unwrap(),
        "--nats",
        &url,
        "--cluster-key-file",
        key_file.to_str().unwrap(),
        "--nats-user",
        "gateway",
        "--nats-password-file",
        &bad,
        "--nats-tls-ca",
        &cert,
    ]);
    outsider.wait_line("authorization violation");
    outsider.wait_line("cluster: nodes=0 remote_users=0 connected=false");
    assert!(!outsider.seen.iter().any(|l| l.contains("cluster: connected to NATS")));
}

/// Without a cluster key, or with one others may read, a node refuses to start.
#[test]
fn a_node_needs_a_private_cluster_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("no-key");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(["serve", "--listen", "127.0.0.1:0", "--nats", "nats://127.0.0.1:1"])
            .args(["--data-dir", dir.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&[]).contains("--nats needs --cluster-key-file"));
    let key = cluster_key(&dir, 1);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = run(&["--cluster-key-file", key.to_str().unwrap()]);
    assert!(e.contains("cluster key") && e.contains("chmod 600"), "{e}");
    std::fs::write(&key, "short").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = run(&["--cluster-key-file", key.to_str().unwrap()]);
    assert!(e.contains("is 5 bytes; at least 32"), "{e}");
    // A client certificate's key that others may read is refused the same way.
    let good_key = cluster_key(&dir, 2);
    let tls_key = dir.join("client-key.pem");
    std::fs::write(&tls_key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = run(&[
        "--cluster-key-file",
        good_key.to_str().unwrap(),
        "--nats-tls-cert",
        "/dev/null",
        "--nats-tls-key",
        tls_key.to_str().unwrap(),
    ]);
    assert!(
        e.contains("NATS client certificate key") && e.contains("chmod 600"),
        "{e}"
    );
}

/// A node authenticates with a token, and with an NKey seed, each from a private file.
#[test]
fn nodes_authenticate_with_a_token_or_an_nkey() {
    let dir = temp_dir("nats-nkey");
    let user = nkeys::KeyPair::new_user();
    let config = format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key());
    let config_file = private_file(&dir, "nats.conf", &config);
    let nkey_nats = Nats::start_with(&["-c", &config_file]);
    let token_nats = Nats::start_with(&["--auth", "a-token-for-the-gateways"]);
    let seed = private_file(&dir, "seed", &user.seed().unwrap());
    let token = private_file(&dir, "token", "a-token-for-the-gateways");
    for (url, flag, file) in [
        (nkey_nats.url(), "--nats-nkey-file", &seed),
        (token_nats.url(), "--nats-token-file", &token),
    ] {
        let node = node(&format!("auth{}", flag.len()), &url, "auth", &[flag, file]);
        assert!(
            !node.gw.seen.iter().any(|l| l.contains("a-token-for")),
            "the token was printed"
        );
    }
}

/// A node shutting down takes no more deliveries: once its user saw the Close, sends to
/// that user from another node are answered `rate_limited` (not taken) or `offline`
/// (the node said goodbye), never `routed` into a connection that is closing.
#[test]
fn a_node_that_drains_is_never_routed_to() {
    let (_nats, url) = nats();
    let nodes = cluster("drain", &url, 2, &["--drain-timeout", "20s"]);
    let bob_port = nodes[1].gw.addr;
    let mut bob = raw_upgrade(bob_port, "/ws?user=bob");
    let (op, ready) = read_frame(&mut bob).unwrap();
    assert_eq!((op, &ready[..9]), (1, &br#"{"type":""#[..]));
    runtime().block_on(async {
        let mut alice = connect(&nodes[0], "alice").await;
        until_routed(&mut alice, "bob").await;
        let (_, probe) = read_frame(&mut bob).unwrap();
        assert!(String::from_utf8_lossy(&probe).contains("probe"));
        nodes[1].gw.signal(libc::SIGTERM);
        // Bob reads until the Close 1001 (and never answers it: the node keeps draining).
        loop {
            let (op, payload) = read_frame(&mut bob).unwrap();
            if op == 8 {
                assert_eq!(close_code(&payload), 1001);
                break;
            }
        }
        for i in 0..50 {
            send(
                &mut alice,
                json!({"type":"send","to":"bob","id":i.to_string(),"body":i}),
            )
            .await;
            let v = recv(&mut alice).await;
            let answer = (v["status"].as_str(), v["code"].as_str());
            assert!(
                matches!(answer, (Some("offline"), _) | (_, Some("rate_limited"))),
                "a send to a draining node's user was answered {v}"
            );
        }
    });
}

/// A NATS JWT (`header.claims.signature`, signed with the issuer's NKey).
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let header = B64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": format!("{name}{iat}").to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", B64.encode(claims.to_string()));
    let signature = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", B64.encode(signature))
}

/// A NATS server in operator mode (JWT accounts and users, as `nsc` sets them up): a
/// node joins with a credentials file, and the file's secret never shows in its output.
#[test]
fn nodes_join_an_operator_mode_nats_with_a_credentials_file() {
    let dir = temp_dir("nats-creds");
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "op",
        json!({"type": "operator", "version": 2}),
    );
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                           "wildcards": true, "conn": -1, "leaf": -1});
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "chat",
        json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "gateway",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    let config = format!(
        "operator: {operator_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt}\n}}\n",
        account.public_key()
    );
    let config_file = private_file(&dir, "nats.conf", &config);
    let nats = Nats::start_with(&["-c", &config_file]);
    let seed = user.seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let creds_file = private_file(&dir, "gateway.creds", &creds);
    let mut nodes = cluster("creds", &nats.url(), 2, &["--nats-credentials", &creds_file]);
    routes_across_without_printing(&mut nodes, &seed);
}

// ---- A cluster on a shared store (Redis) ----

/// Nodes of a cluster sharing the store at `store` (a Redis URL).
fn stored_cluster(name: &str, url: &str, store: &str, n: usize, extra: &[&str]) -> Vec<Node> {
    let args = [&["--store", store][..], extra].concat();
    cluster(name, url, n, &args)
}

async fn connect_to_store(node: &Node, user: &str) -> (Ws, Value) {
    connect_stored(&node.gw.url(&format!("/ws?user={user}")), user).await
}

/// Waits for `node`'s next `cluster:` line saying it knows `n` users on other nodes (of
/// its own users' other nodes, the users homed at it and those it looked up).
fn wait_remote_users(node: &mut Node, n: usize) {
    node.gw.wait_line(&format!("remote_users={n} "));
}

/// Waits until the `keys` users and rooms held on `node` can be found from the other
/// node: the home of each has answered it. In a cluster of two, a key's home is one of
/// the two, so the other node's lookups find it from then on.
fn wait_findable(node: &mut Node, keys: usize) {
    node.gw.wait_line(&format!("local_keys={keys} unconfirmed=0 "));
}

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

/// What one device saw of a conversation: the seqs of its acks and of the messages it got.
#[derive(Default)]
struct Seen {
    acked: Vec<u64>,
    got: Vec<u64>,
    /// Bodies `{"from":…,"i":…}` of the messages got, in arrival order.
    bodies: Vec<(String, u64)>,
}

/// Sends `count` messages to `to` at once (not waiting for acks), then reads until it has
/// `count` acks and `expect` messages. Ids are unique per `round`.
async fn stream_and_read(ws: &mut Ws, (me, to): (&str, &str), round: usize, count: u64, expect: usize) -> Seen {
    for i in 0..count {
        let id = format!("{me}-{round}-{i}");
        send(ws, json!({"type":"send","to":to,"id":id,"body":{"from":me,"i":i}})).await;
    }
    read_until(ws, count as usize, expect).await
}

async fn read_until(ws: &mut Ws, acks: usize, messages: usize) -> Seen {
    let mut seen = Seen::default();
    while seen.acked.len() < acks || seen.got.len() < messages {
        let v = match tokio::time::timeout(Duration::from_secs(8), recv(ws)).await {
            Ok(v) => v,
            Err(_) => panic!(
                "waiting for {acks} acks and {messages} messages, got acks {:?} and messages {:?}",
                seen.acked, seen.got
            ),
        };
        match v["type"].as_str() {
            Some("ack") => {
                assert_eq!(v["status"], "stored", "{v}");
                seen.acked.push(seq_of(&v));
            }
            Some("message" | "room_message") => {
                seen.got.push(seq_of(&v));
                let from = v["body"]["from"].as_str().unwrap_or_default().to_string();
                seen.bodies.push((from, v["body"]["i"].as_u64().unwrap_or(u64::MAX)));
            }
            _ => panic!("unexpected {v}"),
        }
    }
    seen
}

/// A small deterministic generator (xorshift), for burst sizes that differ per run.
fn sizes(seed: u64, rounds: usize) -> Vec<(u64, u64)> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..rounds).map(|_| (20 + next() % 200, 20 + next() % 200)).collect()
}

#[test]
fn two_nodes_appending_to_one_conversation_give_every_device_one_gapless_order() {
    let (_nats, url) = nats();
    let redis = Redis::start("cluster-order");
    let mut nodes = stored_cluster("sorder", &url, &redis.url(0), 2, &[]);
    let seed = std::process::id() as u64 * 0x9e37_79b9;
    runtime().block_on(async {
        // Alice and Bob on different nodes, and each one's second device on the other's.
        let (mut alice, _) = connect_to_store(&nodes[0], "alice").await;
        let (mut bob, _) = connect_to_store(&nodes[1], "bob").await;
        let (mut alice2, _) = connect_to_store(&nodes[1], "alice").await;
        let (mut bob2, _) = connect_to_store(&nodes[0], "bob").await;
        for node in nodes.iter_mut() {
            wait_remote_users(node, 2);
        }
        let mut head = 0;
        for (round, (from_alice, from_bob)) in sizes(seed, 3).into_iter().enumerate() {
            let total = (from_alice + from_bob) as usize;
            // Both write at the same instant, from two nodes, into one conversation.
            let (a, b, a2, b2) = tokio::join!(
                stream_and_read(&mut alice, ("alice", "bob"), round, from_alice, from_bob as usize),
                stream_and_read(&mut bob, ("bob", "alice"), round, from_bob, from_alice as usize),
                read_until(&mut alice2, 0, total),
                read_until(&mut bob2, 0, total),
            );
            let all: Vec<u64> = (head + 1..=head + total as u64).collect();
            // The second devices saw every message once, in seq order, with no gap.
            for (who, seen) in [("alice2", &a2), ("bob2", &b2)] {
                assert_eq!(
                    seen.got, all,
                    "round {round} ({from_alice}+{from_bob}, seed {seed}): {who}"
                );
            }
            // Each sender's device: its own acks and the other's messages are the same
            // seqs, disjoint; what it got came in order.
            for (who, seen) in [("alice", &a), ("bob", &b)] {
                let mut union: Vec<u64> = seen.acked.iter().chain(&seen.got).copied().collect();
                union.sort_unstable();
                assert_eq!(union, all, "round {round}: {who}'s acks and messages");
                assert!(
                    seen.got.windows(2).all(|w| w[0] < w[1]),
                    "round {round}: {who} got {:?}",
                    seen.got
                );
            }
            // One sender's messages keep the order it sent them in.
            for sender in ["alice", "bob"] {
                let order: Vec<u64> = a2.bodies.iter().filter(|(f, _)| f == sender).map(|(_, i)| *i).collect();
                let sent = if sender == "alice" { from_alice } else { from_bob };
                assert_eq!(order, (0..sent).collect::<Vec<_>>(), "round {round}: {sender}'s order");
            }
            head += total as u64;
        }
    });
}

#[test]
fn a_user_offline_everywhere_is_pushed_once_and_catches_up_on_any_node() {
    let (_nats, url) = nats();
    let redis = Redis::start("cluster-offline");
    let (hook_port, requests) = webhook_server(vec![]);
    let hook = format!("http://127.0.0.1:{hook_port}/push");
    let secret = temp_dir("cluster-offline-secret").join("push-secret");
    std::fs::write(&secret, "s".repeat(32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra = ["--push-webhook", &hook, "--push-secret-file", secret.to_str().unwrap()];
    let mut nodes = stored_cluster("soffline", &url, &redis.url(0), 2, &extra);
    runtime().block_on(async {
        let (mut alice, _) = connect_to_store(&nodes[0], "alice").await;
        // Carol has no connection anywhere: stored, acked, pushed (by the node that stored it).
        for n in 1..=3 {
            send(
                &mut alice,
                json!({"type":"send","to":"carol","id":format!("c{n}"),"body":n}),
            )
            .await;
            let ack = recv(&mut alice).await;
            assert_eq!(
                ack,
                json!({"type":"ack","id":format!("c{n}"),"status":"stored","conv":"dm:alice:carol","seq":n})
            );
        }
        // She connects to the other node: it knows where the conversation stands.
        let (mut carol, ready) = connect_to_store(&nodes[1], "carol").await;
        assert_eq!(ready["convs"], json!([{"conv":"dm:alice:carol","seq":3}]));
        send(&mut carol, json!({"type":"history","conv":"dm:alice:carol","since":0})).await;
        let page = recv(&mut carol).await;
        let got: Vec<(u64, Value)> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (seq_of(m), m["body"].clone()))
            .collect();
        assert_eq!(got, vec![(1, json!(1)), (2, json!(2)), (3, json!(3))], "{page}");
        // Once alice's node knows carol is on the other node, she gets the next one live,
        // and no push goes out for it.
        wait_remote_users(&mut nodes[0], 1);
        send(&mut alice, json!({"type":"send","to":"carol","id":"c4","body":4})).await;
        assert_eq!(seq_of(&recv(&mut alice).await), 4);
        let live = recv(&mut carol).await;
        assert_eq!(
            (seq_of(&live), &live["from"], &live["body"]),
            (4, &json!("alice"), &json!(4))
        );
        // A marker: dave is offline everywhere, so his push follows carol's in the queue.
        send(&mut alice, json!({"type":"send","to":"dave","id":"d1","body":"marker"})).await;
        assert_eq!(seq_of(&recv(&mut alice).await), 1);
    });
    let mut events = Vec::new();
    while !events.iter().any(|e: &Value| e["user"] == "dave") {
        let (_, body) = requests
            .recv_timeout(Duration::from_secs(10))
            .expect("the push webhook was called");
        let batch: Value = serde_json::from_slice(&body).unwrap();
        events.extend(batch["events"].as_array().unwrap().iter().cloned());
    }
    let pushed: Vec<(String, u64)> = events
        .iter()
        .map(|e| (e["user"].as_str().unwrap().to_string(), e["seq"].as_u64().unwrap()))
        .collect();
    let expected = [("carol", 1), ("carol", 2), ("carol", 3), ("dave", 1)];
    let expected: Vec<(String, u64)> = expected.iter().map(|(u, s)| (u.to_string(), *s)).collect();
    assert_eq!(
        pushed, expected,
        "one push per message for a user offline everywhere, none for one online elsewhere"
    );
}

#[test]
fn a_message_another_node_stored_but_never_published_is_filled_from_the_store() {
    let (_nats, url) = nats();
    let redis = Redis::start("cluster-gap");
    let store = redis.url(0);
    let mut nodes = stored_cluster("sgap", &url, &store, 2, &[]);
    // A third gateway on the same store but outside the cluster: what it stores reaches
    // no other node, as if it had died between storing and publishing.
    let outside_dir = temp_dir("cluster-gap-outside");
    let (outside, outside_ports) = two_shard_dev_gateway(&outside_dir, &["--store", &store]);
    runtime().block_on(async {
        let (mut alice, _) = connect_to_store(&nodes[0], "alice").await;
        let (mut bob, _) = connect_to_store(&nodes[1], "bob").await;
        wait_findable(&mut nodes[1], 1);
        send(&mut alice, json!({"type":"send","to":"bob","id":"1","body":"one"})).await;
        assert_eq!(seq_of(&recv(&mut alice).await), 1);
        let outside_url = format!("ws://127.0.0.1:{}/ws?user=alice", outside_ports[0]);
        let (mut alice_outside, _) = connect_stored(&outside_url, "alice").await;
        send(
            &mut alice_outside,
            json!({"type":"send","to":"bob","id":"2","body":"two"}),
        )
        .await;
        assert_eq!(seq_of(&recv(&mut alice_outside).await), 2);
        send(&mut alice, json!({"type":"send","to":"bob","id":"3","body":"three"})).await;
        assert_eq!(seq_of(&recv(&mut alice).await), 3);
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = recv(&mut bob).await;
            got.push((seq_of(&m), m["body"].as_str().unwrap().to_string()));
        }
        let expected: Vec<(u64, String)> = [(1, "one"), (2, "two"), (3, "three")]
            .iter()
            .map(|(s, b)| (*s, b.to_string()))
            .collect();
        assert_eq!(got, expected, "seq 3 waited for 2, which was read from the store");
    });
    nodes[1].gw.seen_or_wait("gap_filled=1 ");
    let held = nodes[1].gw.seen.iter().filter(|l| l.contains(" held=1 ")).count();
    assert_eq!(held, 1, "seq 3 was held once: {:?}", nodes[1].gw.seen);
    drop(outside);
}

#[test]
fn a_node_killed_mid_stream_loses_nothing_and_its_users_catch_up_on_another() {
    let (_nats, url) = nats();
    let redis = Redis::start("cluster-kill");
    let mut nodes = stored_cluster("skill", &url, &redis.url(0), 2, &[]);
    const COUNT: u64 = 300;
    runtime().block_on(async {
        let (mut alice, _) = connect_to_store(&nodes[0], "alice").await;
        let (mut bob, _) = connect_to_store(&nodes[1], "bob").await;
        wait_findable(&mut nodes[1], 1);
        for i in 0..COUNT {
            send(
                &mut alice,
                json!({"type":"send","to":"bob","id":format!("m{i}"),"body":i}),
            )
            .await;
        }
        // Node A dies with part of the stream acked.
        let mut acked = std::collections::HashMap::new();
        while acked.len() < 100 {
            let ack = recv(&mut alice).await;
            acked.insert(ack["id"].as_str().unwrap().to_string(), seq_of(&ack));
        }
        nodes[0].gw.signal(libc::SIGKILL);
        let _ = nodes[0].gw.wait_exit();
        // Alice reconnects to node B and sends everything again with the same ids: what
        // was stored is acked with its first seq, the rest is stored now; then one more.
        let (mut alice, ready) = connect_to_store(&nodes[1], "alice").await;
        let head = ready["convs"][0]["seq"].as_u64().unwrap_or(0);
        assert!(head >= 100, "{ready}");
        let mut ids = std::collections::HashMap::new();
        for i in 0..=COUNT {
            let id = format!("m{i}");
            send(&mut alice, json!({"type":"send","to":"bob","id":id,"body":i})).await;
            // Her own messages reach her new device too (those node A stored and never
            // published come once a gap shows them): only the ack matters here.
            let ack = loop {
                let v = recv(&mut alice).await;
                if v["type"] != "message" {
                    break v;
                }
            };
            assert_eq!(ack["status"], "stored", "{ack}");
            if let Some(first) = acked.get(&id) {
                assert_eq!(seq_of(&ack), *first, "{id} was acked at {first} before the crash");
            }
            ids.insert(id, seq_of(&ack));
        }
        let mut seqs: Vec<u64> = ids.values().copied().collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=COUNT + 1).collect::<Vec<_>>(),
            "each message stored once, no gap"
        );
        // Bob saw every message once, in order: what node A published before dying, what it
        // stored but never published (filled from the store), and the rest.
        let mut got = Vec::new();
        while got.len() < (COUNT + 1) as usize {
            let m = recv(&mut bob).await;
            got.push(seq_of(&m));
        }
        assert_eq!(got, (1..=COUNT + 1).collect::<Vec<_>>());
    });
}

#[test]
fn a_room_across_nodes_on_a_redis_cluster_has_one_order_and_join_since_recovers_it() {
    let (_nats, url) = nats();
    let redis = RedisCluster::start("cluster-room");
    let mut nodes = stored_cluster("sroom", &url, &redis.url(), 2, &[]);
    const EACH: u64 = 50;
    runtime().block_on(async {
        let (mut alice, _) = connect_to_store(&nodes[0], "alice").await;
        let (mut bob, _) = connect_to_store(&nodes[1], "bob").await;
        for ws in [&mut alice, &mut bob] {
            send(ws, json!({"type":"join","room":"news"})).await;
            assert_eq!(recv(ws).await, json!({"type":"joined","room":"news"}));
        }
        for node in nodes.iter_mut() {
            wait_findable(node, 2);
        }
        // Both publish at once, from two nodes: each sees the other's in one seq order.
        let publish = |ws: &'static str| {
            (0..EACH)
                .map(move |i| json!({"type":"publish","room":"news","id":format!("{ws}-{i}"),"body":{"from":ws,"i":i}}))
        };
        let (a, b) = tokio::join!(
            async {
                for p in publish("alice") {
                    send(&mut alice, p).await;
                }
                read_until(&mut alice, EACH as usize, EACH as usize).await
            },
            async {
                for p in publish("bob") {
                    send(&mut bob, p).await;
                }
                read_until(&mut bob, EACH as usize, EACH as usize).await
            },
        );
        for (who, seen) in [("alice", &a), ("bob", &b)] {
            let mut union: Vec<u64> = seen.acked.iter().chain(&seen.got).copied().collect();
            union.sort_unstable();
            assert_eq!(union, (1..=2 * EACH).collect::<Vec<_>>(), "{who}");
            assert!(seen.got.windows(2).all(|w| w[0] < w[1]), "{who} got {:?}", seen.got);
        }
        // Carol joins on node B with since=0: the whole room, in order, from the cluster.
        let (mut carol, _) = connect_to_store(&nodes[1], "carol").await;
        send(&mut carol, json!({"type":"join","room":"news","since":0,"id":"j"})).await;
        assert_eq!(recv(&mut carol).await, json!({"type":"joined","room":"news"}));
        let page = recv(&mut carol).await;
        let seqs: Vec<u64> = page["messages"].as_array().unwrap().iter().map(seq_of).collect();
        assert_eq!(seqs, (1..=2 * EACH).collect::<Vec<_>>(), "{page}");
        assert_eq!((&page["head"], &page["more"]), (&json!(2 * EACH), &json!(false)));
    });
}

#[test]
fn with_nats_away_sends_are_still_stored_and_reach_the_other_node_with_the_next_message() {
    let mut nats = Nats::start();
    let url = nats.url();
    let redis = Redis::start("cluster-nats-away");
    let mut nodes = stored_cluster("snats", &url, &redis.url(0), 2, &[]);
    runtime().block_on(async {
        let (mut alice, _) = connect_to_store(&nodes[0], "alice").await;
        let (mut bob, _) = connect_to_store(&nodes[1], "bob").await;
        wait_findable(&mut nodes[1], 1);
        send(
            &mut alice,
            json!({"type":"send","to":"bob","id":"before","body":"before"}),
        )
        .await;
        assert_eq!(seq_of(&recv(&mut alice).await), 1);
        assert_eq!(seq_of(&recv(&mut bob).await), 1);
        // NATS goes away: the send is stored and acked all the same.
        nats.stop();
        nodes[0].gw.wait_line("cluster: lost NATS");
        send(
            &mut alice,
            json!({"type":"send","to":"bob","id":"during","body":"during"}),
        )
        .await;
        let ack = recv(&mut alice).await;
        assert_eq!((&ack["status"], seq_of(&ack)), (&json!("stored"), 2), "{ack}");
        // Back: once node A knows again where Bob is, the next message brings the one he
        // missed (read from Redis for the gap), in order.
        nats.restart();
        for node in nodes.iter_mut() {
            node.gw.wait_line("cluster: directory ready: 1 other node(s)");
        }
        wait_findable(&mut nodes[1], 1);
        send(
            &mut alice,
            json!({"type":"send","to":"bob","id":"after","body":"after"}),
        )
        .await;
        assert_eq!(seq_of(&recv(&mut alice).await), 3);
        let mut got = Vec::new();
        for _ in 0..2 {
            let m = recv(&mut bob).await;
            got.push((seq_of(&m), m["body"].as_str().unwrap_or_default().to_string()));
        }
        assert_eq!(got, vec![(2, "during".to_string()), (3, "after".to_string())]);
    });
    nodes[1].gw.seen_or_wait("gap_filled=1 ");
}
