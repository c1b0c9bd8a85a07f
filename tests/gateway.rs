//! The gateway as a client sees it: a real process, real sockets, real WebSocket clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[test]
fn echoes_text_binary_and_large_messages() {
    let gw = Gateway::start(&["--shards", "2", "--max-message-size", "4194304"]);
    runtime().block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("/echo"))
            .await
            .expect("upgrade");
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let messages = vec![
            Message::Text("hello, κόσμε".into()),
            Message::Binary(vec![0, 1, 2, 255]),
            Message::Text(String::new()),
            Message::Binary(big),
            Message::Text("x".repeat(70_000)),
        ];
        // All in flight at once: the server must keep them apart and in order.
        for m in &messages {
            ws.send(m.clone()).await.unwrap();
        }
        for m in &messages {
            assert_eq!(ws.next().await.unwrap().unwrap(), *m);
        }
        ws.send(Message::Ping(b"are you there".to_vec())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(b"are you there".to_vec())
        );
        ws.close(None).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Close(_))) | None => {}
            other => panic!("expected the close handshake, got {other:?}"),
        }
    });
}

#[test]
fn many_connections_pipelining_small_and_large_messages_get_each_echo_in_order() {
    // Small answers of one executor pass leave together (the send batch). Over 64 KiB of
    // small messages fill a whole read, so the shard reads that connection again in the
    // same pass and meets the large one, which goes straight out: after what the
    // connection has waiting in the batch.
    let gw = Gateway::start(&["--shards", "1"]);
    const SMALL_FIRST: usize = 3000;
    const TOTAL: usize = SMALL_FIRST + 101;
    let message = |c: usize, i: usize| {
        if i == SMALL_FIRST {
            Message::Binary(vec![c as u8; 40_000])
        } else {
            Message::Text(format!("client {c} message {i}"))
        }
    };
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (ws, _) = tokio_tungstenite::connect_async(gw.url("/echo"))
                .await
                .expect("upgrade");
            clients.push(ws);
        }
        for (c, ws) in clients.iter_mut().enumerate() {
            for i in 0..TOTAL {
                ws.feed(message(c, i)).await.unwrap();
            }
        }
        for ws in clients.iter_mut() {
            ws.flush().await.unwrap();
        }
        for (c, ws) in clients.iter_mut().enumerate() {
            for i in 0..TOTAL {
                assert_eq!(
                    ws.next().await.unwrap().unwrap(),
                    message(c, i),
                    "client {c}, message {i}"
                );
            }
        }
    });
}

#[test]
fn many_connections_echoing_large_messages_at_once_each_get_their_own_bytes_back() {
    // Echoes of frames that arrived whole wait in the send batch in place, in the shard's
    // receive buffer; the next read lands after them. 64 connections of up to 20 KB each
    // at once are more than that buffer holds, so the batch also leaves early, mid-pass.
    // Sizes below 2 KiB take the copying path, so both kinds share batches.
    let gw = Gateway::start(&["--shards", "1"]);
    const CLIENTS: usize = 64;
    const ROUNDS: usize = 12;
    let message = |c: usize, round: usize| {
        let len = 1500 + (c * 7919 + round * 104_729) % 18_500;
        let seed = (c * 31 + round * 17) as u8;
        Message::Binary((0..len).map(|k| (k as u8).wrapping_mul(13) ^ seed).collect())
    };
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (ws, _) = tokio_tungstenite::connect_async(gw.url("/echo"))
                .await
                .expect("upgrade");
            clients.push(ws);
        }
        for round in 0..ROUNDS {
            for (c, ws) in clients.iter_mut().enumerate() {
                ws.send(message(c, round)).await.unwrap();
            }
            for (c, ws) in clients.iter_mut().enumerate() {
                let echo = ws.next().await.unwrap().unwrap();
                assert!(echo == message(c, round), "client {c}, round {round}");
            }
        }
    });
}

#[test]
fn a_flooding_connection_does_not_hold_up_the_others() {
    // One client sends 16 KiB messages faster than the gateway echoes them, so its socket
    // never runs dry. Another connection's small messages must still be answered at once:
    // each connection gets one full read per executor pass, not as many as its client can
    // feed until the executor's task slice (100 ms) runs out.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;
    let gw = Gateway::start(&["--shards", "1"]);
    let flood = raw_upgrade(gw.addr, "/echo");
    let mut frame = Vec::new();
    let payload = vec![7u8; 16 * 1024];
    shardgate::ws::frame::write_frame(
        &mut frame,
        true,
        shardgate::ws::OpCode::Binary,
        &payload,
        Some([1, 2, 3, 4]),
    );
    let burst = frame.repeat(64);
    let (stop, echoed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (mut socket, stop) = (flood.try_clone().unwrap(), stop.clone());
        std::thread::spawn(
            move || {
                while !stop.load(Ordering::Relaxed) && socket.write_all(&burst).is_ok() {}
            },
        )
    };
    let reader = {
        let (mut socket, echoed) = (flood.try_clone().unwrap(), echoed.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = socket.read(&mut buf) {
                echoed.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    // The flood is flowing: 8 MiB of echoes are back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while echoed.load(Ordering::Relaxed) < 8 << 20 {
        assert!(Instant::now() < deadline, "the flood never got going");
        std::thread::yield_now();
    }
    let mut probe = raw_upgrade(gw.addr, "/echo");
    let before = echoed.load(Ordering::Relaxed);
    let mut round_trips = Vec::new();
    for _ in 0..21 {
        let sent = Instant::now();
        write_frame(&mut probe, 0x82, b"probe");
        let (opcode, echo) = read_frame(&mut probe).unwrap();
        round_trips.push(sent.elapsed());
        assert_eq!((opcode, &echo[..]), (0x2, &b"probe"[..]));
    }
    let during = echoed.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = flood.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    reader.join().unwrap();
    round_trips.sort();
    // Served in turn, a probe waits at most a pass: under a millisecond here. Held up by
    // the flood, at least one of 21 probes waited a whole task slice (97-300 ms).
    assert!(
        round_trips[20] < Duration::from_millis(50),
        "probe round trips: {round_trips:?}"
    );
    assert!(during > before, "the flood was served too while the probes were");
}

#[test]
fn healthz_answers_200_without_upgrading() {
    let gw = Gateway::start(&["--shards", "1"]);
    let resp = http_exchange(gw.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nok\n"), "{resp}");
}

#[test]
fn bad_upgrades_get_the_right_status() {
    let gw = Gateway::start(&["--shards", "1"]);
    let good = upgrade_request("/echo", "");
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        (
            good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
            "426",
            Some("Sec-WebSocket-Version: 13"),
        ),
        (
            good.replace("Upgrade: websocket\r\n", ""),
            "426",
            Some("Upgrade: websocket"),
        ),
        (
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            "400",
            None,
        ),
        (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "dG9vIHNob3J0"), "400", None),
        (good.replace("Host: localhost\r\n", ""), "400", None),
        (good.replace("GET", "POST"), "405", Some("Allow: GET")),
        (good.replace("/echo", "/nowhere"), "404", None),
        (
            good.replace("Host:", &format!("X-Big: {}\r\nHost:", "a".repeat(9000))),
            "431",
            None,
        ),
        ("\u{1}\u{2}garbage\r\n\r\n".to_string(), "400", None),
    ];
    for (request, status, header) in cases {
        let resp = http_exchange(gw.addr, request.as_bytes());
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "want {status} for {request:?}, got {resp:?}"
        );
        if let Some(h) = header {
            assert!(resp.contains(&format!("{h}\r\n")), "want {h} in {resp:?}");
        }
    }
    // The gateway is still serving.
    raw_upgrade(gw.addr, "/echo");
}

#[test]
fn slow_handshake_times_out_with_408() {
    let gw = Gateway::start(&["--shards", "1", "--handshake-timeout", "300ms"]);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n").unwrap(); // and never the rest
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp:?}");
}

#[test]
fn protocol_errors_close_with_the_right_code() {
    let gw = Gateway::start(&["--shards", "1", "--max-message-size", "1000"]);
    // (first byte, mask it?, payload, expected close code)
    let cases: [(u8, &[u8], u16); 4] = [
        (0x81 | 0x40, b"rsv1", 1002), // RSV1 without an extension
        (0x83, b"op3", 1002),         // unknown opcode
        (0x81, &[0xC3, 0x28], 1007),  // invalid UTF-8
        (0x82, &[0u8; 1001], 1009),   // over --max-message-size
    ];
    for (first, payload, code) in cases {
        let mut s = raw_upgrade(gw.addr, "/echo");
        write_frame(&mut s, first, payload);
        let (op, body) = read_frame(&mut s).expect("close frame");
        assert_eq!((op, close_code(&body)), (0x8, code), "first byte {first:#x}");
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap(),
            0,
            "the server closes after its Close"
        );
    }
    // An unmasked frame is a protocol error too.
    let mut s = raw_upgrade(gw.addr, "/echo");
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    let (op, body) = read_frame(&mut s).unwrap();
    assert_eq!((op, close_code(&body)), (0x8, 1002));
}

#[test]
fn an_oversize_chat_message_closes_with_1009_before_it_is_assembled() {
    let dir = temp_dir("chat-1009");
    let gw = Gateway::start(&[
        "--shards",
        "1",
        "--insecure-dev-auth",
        "--max-chat-message",
        "200",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let mut s = raw_upgrade(gw.addr, "/ws?user=alice");
    // A text frame that announces 1,000 bytes, of which only the first 250 are sent: the
    // gateway must not wait for the rest (nor hold it) to know it is too large.
    let mut head = vec![0x81, 0x80 | 126];
    head.extend_from_slice(&1000u16.to_be_bytes());
    head.extend_from_slice(&[0, 0, 0, 0]); // a zero mask: the payload goes as it is
    head.extend_from_slice(&[b'a'; 250]);
    s.write_all(&head).unwrap();
    let close = loop {
        let (op, body) = read_frame(&mut s).expect("frames until the Close");
        if op == 0x8 {
            break body;
        }
    };
    assert_eq!(close_code(&close), 1009);
}

#[test]
fn subprotocol_is_negotiated_in_server_order() {
    let gw = Gateway::start(&["--shards", "1", "--subprotocol", "chat.v2", "--subprotocol", "chat.v1"]);
    let offer = |protocols: &str| {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = upgrade_request("/echo", &format!("Sec-WebSocket-Protocol: {protocols}\r\n"));
        s.write_all(req.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    };
    let head = offer("chat.v1, chat.v2");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("\r\nSec-WebSocket-Protocol: chat.v2\r\n"), "{head}");
    let head = offer("other");
    assert!(
        head.starts_with("HTTP/1.1 101 ") && !head.contains("Sec-WebSocket-Protocol"),
        "{head}"
    );
}

#[test]
fn keepalive_pings_and_closes_a_silent_peer() {
    let gw = Gateway::start(&["--shards", "1", "--ping-interval", "200ms", "--pong-timeout", "300ms"]);
    // A peer that answers: tungstenite pongs automatically, and the connection lives on
    // through several ping rounds.
    runtime().block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("/echo")).await.unwrap();
        for _ in 0..3 {
            assert!(matches!(ws.next().await, Some(Ok(Message::Ping(_)))));
        }
        ws.send(Message::Text("still here".into())).await.unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Ping(_) => continue,
                m => {
                    assert_eq!(m, Message::Text("still here".into()));
                    break;
                }
            }
        }
    });
    // A peer that never answers gets a ping, then Close 1008, then EOF.
    let mut s = raw_upgrade(gw.addr, "/echo");
    assert_eq!(read_frame(&mut s).unwrap().0, 0x9);
    let (op, body) = read_frame(&mut s).unwrap();
    assert_eq!((op, close_code(&body)), (0x8, 1008));
}

#[test]
fn a_peer_that_reads_nothing_is_dropped_once_its_socket_stays_full() {
    let gw = Gateway::start(&["--shards", "1", "--ping-interval", "300ms", "--pong-timeout", "300ms"]);
    let mut s = raw_upgrade(gw.addr, "/echo");
    s.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut frame = Vec::new();
    shardgate::ws::frame::write_frame(
        &mut frame,
        true,
        shardgate::ws::OpCode::Binary,
        &[7u8; 60_000],
        Some([1, 2, 3, 4]),
    );
    // The echoes fill both sockets' buffers, then the gateway's writes wait for room that
    // never comes: it must give the peer up (our writes then meet its reset), not wait
    // for ever.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut at = 0;
    let dropped = loop {
        assert!(Instant::now() < deadline, "the gateway kept a peer that reads nothing");
        match s.write(&frame[at..]) {
            Ok(n) => at = (at + n) % frame.len(),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            dropped.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{dropped}"
    );
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_zero() {
    let mut gw = Gateway::start(&["--shards", "2"]);
    let status = runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..6 {
            let (ws, _) = tokio_tungstenite::connect_async(gw.url("/echo")).await.unwrap();
            clients.push(ws);
        }
        // Make sure every connection is fully up before the signal.
        for ws in &mut clients {
            ws.send(Message::Text("up".into())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("up".into()));
        }
        gw.signal(libc::SIGTERM);
        for ws in &mut clients {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
                other => panic!("expected Close 1001, got {other:?}"),
            }
        }
        drop(clients);
        gw.wait_exit()
    });
    assert!(status.success(), "exit status {status:?}");
    assert!(
        gw.seen.iter().any(|l| l.ends_with(" shardgate stopped")),
        "{:?}",
        gw.seen
    );
}

#[test]
fn a_stopping_gateway_stops_listening_at_once() {
    // A listener's accept in the shard ring holds its socket open: unless the shard
    // cancels it when it stops accepting, the port keeps taking connections that nobody
    // will serve until the process exits (and SO_REUSEPORT peers of a restarted gateway
    // do not get them meanwhile).
    let mut gw = Gateway::start(&["--shards", "2"]);
    let mut held = raw_upgrade(gw.addr, "/echo");
    drop(TcpStream::connect(gw.addr).expect("listening before the signal"));
    gw.signal(libc::SIGTERM);
    let (op, body) = read_frame(&mut held).expect("the server's Close");
    assert_eq!((op, close_code(&body)), (0x8, 1001));
    // `held` does not answer its Close: the gateway lingers on it for a second before it
    // can exit, so a refusal within half of that comes from the closed listeners.
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match TcpStream::connect(gw.addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connect: {e}"),
            Ok(_) => assert!(Instant::now() < deadline, "still accepting 500 ms after the stop"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(held);
    assert!(gw.wait_exit().success());
}

#[test]
fn connections_over_the_cap_get_503() {
    let gw = Gateway::start(&["--shards", "1", "--max-connections", "2"]);
    let _a = raw_upgrade(gw.addr, "/echo");
    let _b = raw_upgrade(gw.addr, "/echo");
    let resp = http_exchange(gw.addr, upgrade_request("/echo", "").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    drop(_a);
    // A freed place is usable again (the server notices the close when it reads EOF).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = response_status(gw.addr, &upgrade_request("/echo", ""));
        if status == "101" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the freed place was never reused: {status}"
        );
    }
}

#[test]
fn a_connection_that_has_not_spoken_takes_no_slot() {
    let gw = Gateway::start(&["--shards", "1", "--max-connections", "1"]);
    // Connected, but no request yet: the kernel holds it back (TCP_DEFER_ACCEPT), so the
    // only slot is still free for a client that speaks.
    let mut silent = TcpStream::connect(gw.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _speaking = raw_upgrade(gw.addr, "/echo");
    // Once it speaks it is served: here, told that the gateway is full.
    silent.write_all(upgrade_request("/echo", "").as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = silent.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp:?}");
}

#[test]
fn shards_are_pinned_one_per_cpu() {
    let gw = Gateway::start(&["--shards", "2"]);
    let shard_lines: Vec<&String> = gw
        .seen
        .iter()
        .filter(|l| l.contains(" shard ") && l.contains("thread"))
        .collect();
    assert_eq!(shard_lines.len(), 2, "{:?}", gw.seen);
    let mut cpus = Vec::new();
    for line in shard_lines {
        // "shard 0: cpu 0 (running on 0), thread 1234, listening on ..."
        let field = |after: &str, until: char| {
            line.split(after)
                .nth(1)
                .unwrap()
                .split(until)
                .next()
                .unwrap()
                .to_string()
        };
        let (cpu, running_on, tid) = (field(": cpu ", ' '), field("running on ", ')'), field("thread ", ','));
        assert_eq!(cpu, running_on, "{line}");
        let status = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", gw.pid())).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        assert_eq!(allowed, cpu, "thread {tid} may run on {allowed}");
        cpus.push(cpu);
    }
    cpus.sort();
    cpus.dedup();
    assert_eq!(cpus.len(), 2, "two shards on two cores here");
}

#[test]
fn accept_backs_off_at_the_open_file_limit_and_resumes() {
    use std::os::unix::process::CommandExt;
    const NOFILE: u64 = 64;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"));
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A cap above what the descriptors allow, so that accept itself hits EMFILE.
    let mut gw = Gateway::start_with(cmd, &["--shards", "1", "--max-connections", "1000"]);
    let in_use = std::fs::read_dir(format!("/proc/{}/fd", gw.pid())).unwrap().count() as u64;
    let room = (NOFILE - in_use) as usize;
    assert!(room >= 10, "only {room} descriptors free");

    let first: Vec<TcpStream> = (0..room).map(|_| raw_upgrade(gw.addr, "/echo")).collect();
    // These wait in the listen backlog: the process has no descriptor left to accept them.
    let mut waiting: Vec<TcpStream> = (0..room / 2)
        .map(|_| {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s.write_all(upgrade_request("/echo", "").as_bytes()).unwrap();
            s
        })
        .collect();
    gw.wait_line("backing off until descriptors free up");
    drop(first);
    for s in &mut waiting {
        let mut head = [0u8; 12];
        s.read_exact(&mut head)
            .expect("a waiting connection is served once descriptors free up");
        assert_eq!(&head, b"HTTP/1.1 101");
    }
}

#[test]
fn steering_by_cpu_serves_clients_on_every_cpu() {
    // Which shard a SYN picks is tested on real sockets in `shard::listener`; here the
    // gateway takes the flag, says so, and serves clients connecting from both CPUs.
    let gw = Gateway::start(&["--shards", "2", "--cpus", "0,1", "--steer-by-cpu"]);
    assert!(gw.seen.iter().any(|l| l.contains("--steer-by-cpu")), "{:?}", gw.seen);
    for cpu in [0, 1] {
        let addr = gw.addr;
        let echoed = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(core_affinity::CoreId { id: cpu }));
            let mut s = raw_upgrade(addr, "/echo");
            write_frame(&mut s, 0x81, b"from this cpu");
            read_frame(&mut s).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(echoed, (0x1, b"from this cpu".to_vec()), "client on cpu {cpu}");
    }
}

#[test]
fn steering_by_cpu_refuses_shards_that_share_a_cpu() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--cpus",
            "0",
            "--steer-by-cpu",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--steer-by-cpu needs a CPU of its own for each shard"),
        "{stderr}"
    );
}

#[test]
fn too_low_memlock_limit_is_named_in_a_clear_error() {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"));
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RLIMIT_MEMLOCK is 64 KiB") && stderr.contains("512 KiB"),
        "{stderr}"
    );
}

#[test]
fn echo_is_off_unless_asked_for() {
    let gw = Gateway::start_without_echo(&["--shards", "1"]);
    let resp = http_exchange(gw.addr, upgrade_request("/echo", "").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
}

/// Segments that have arrived on `s` so far (`TCP_INFO`).
fn segments_in(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed tcp_info is valid; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_segs_in
}

#[test]
fn the_servers_close_arrives_with_its_fin() {
    // The server's last Close and its FIN share one segment: the peer takes in one packet
    // fewer at every close. Counted on the client's socket, from the client's last frame
    // to the end of the stream (on loopback nothing else arrives in between): the answer
    // to a Close, and a Close for a protocol error.
    let gw = Gateway::start(&["--shards", "1"]);
    let cases: [(u8, &[u8], u16); 2] = [(0x88, &1000u16.to_be_bytes(), 1000), (0x83, b"op3", 1002)];
    for (first, payload, code) in cases {
        for _ in 0..10 {
            let mut s = raw_upgrade(gw.addr, "/echo");
            write_frame(&mut s, 0x82, b"ping");
            assert_eq!(read_frame(&mut s).unwrap(), (0x2, b"ping".to_vec()));
            let before = segments_in(&s);
            write_frame(&mut s, first, payload);
            let (op, body) = read_frame(&mut s).unwrap();
            assert_eq!((op, close_code(&body)), (0x8, code));
            let mut rest = Vec::new();
            assert_eq!(
                s.read_to_end(&mut rest).unwrap(),
                0,
                "the server closes after its Close"
            );
            assert_eq!(segments_in(&s) - before, 1, "Close {code} and the FIN came apart");
        }
    }
}

#[test]
fn a_close_followed_by_more_bytes_still_gets_its_answer() {
    // A peer that keeps sending after its Close breaks RFC 6455 §5.5.1, but it must still
    // get our Close: bytes left unread when the socket closes make the kernel reset the
    // connection, and a reset throws away whatever had not left yet.
    let gw = Gateway::start(&["--shards", "1"]);
    for _ in 0..10 {
        let mut s = raw_upgrade(gw.addr, "/echo");
        let mut close = Vec::new();
        shardgate::ws::write_close(&mut close, shardgate::ws::CloseCode::NORMAL, "", Some([1, 2, 3, 4]));
        close.extend_from_slice(&vec![0x55u8; 600 * 1024]);
        // The gateway stops reading after the Close, so the rest may never be taken.
        let writer = {
            let mut s = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = s.write_all(&close);
            })
        };
        let (op, body) = read_frame(&mut s).expect("the server's Close, not a reset");
        assert_eq!((op, close_code(&body)), (0x8, 1000));
        let _ = s.shutdown(std::net::Shutdown::Both);
        writer.join().unwrap();
    }
}

/// CPU time (user + system) the process has used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends at the last ')': utime and stime are the
    // 12th and 13th of them.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_gateway_sleeps() {
    // Shards yield the CPU and look again before they sleep; a look that kept finding
    // something (or a wait that kept returning at once) would spin them at 100% of a CPU
    // each. Checked with connections open, after traffic.
    let gw = Gateway::start(&["--shards", "2"]);
    let mut clients: Vec<TcpStream> = (0..100).map(|_| raw_upgrade(gw.addr, "/echo")).collect();
    for s in &mut clients {
        write_frame(s, 0x82, b"once");
        assert_eq!(read_frame(s).unwrap(), (0x2, b"once".to_vec()));
    }
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let before = cpu_ticks(gw.pid());
    // The measurement window: how much CPU two idle shards use in two seconds.
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(gw.pid()) - before;
    // Two spinning shards would use 4 s; an idle gateway uses next to nothing.
    assert!(
        used * 10 < ticks_per_s,
        "an idle gateway used {used} ticks of CPU in 2 s"
    );
    for s in &mut clients {
        write_frame(s, 0x82, b"still there");
        assert_eq!(read_frame(s).unwrap(), (0x2, b"still there".to_vec()));
    }
}

/// The server's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Clients that each hold a part-sent 15 MiB message cannot make a shard hold more than
/// its memory budget: past it, new ones are closed with 1009; the ones within it are
/// still served whole.
#[test]
fn part_sent_large_messages_stay_within_the_shard_memory_budget() {
    const MIB: usize = 1 << 20;
    const SIZE: usize = 15 * MIB;
    const BUDGET: usize = 32 * MIB;
    let mut gw = Gateway::start(&[
        "--shards",
        "1",
        "--max-message-size",
        "16777216",
        "--shard-memory-budget",
        &BUDGET.to_string(),
        "--report-interval",
        "1s",
    ]);
    let rss_before = rss_kib(gw.pid());
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let mut frame = Vec::new();
    shardgate::ws::frame::write_frame(
        &mut frame,
        true,
        shardgate::ws::OpCode::Binary,
        &body,
        Some([9, 8, 7, 6]),
    );
    let (all_but_last, last) = frame.split_at(frame.len() - 1);
    let mut kept = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        let mut client = raw_upgrade(gw.addr, "/echo");
        let mut writer = client.try_clone().unwrap();
        let part = all_but_last.to_vec();
        // The writer may be cut off by the refusal; the reader sees the Close meanwhile.
        let sending = std::thread::spawn(move || writer.write_all(&part).is_ok());
        if i < 2 {
            // 2 × 15 MiB fit in 32 MiB: these are assembled, and wait for their last byte.
            assert!(sending.join().unwrap(), "client {i} could not send");
            kept.push(client);
        } else {
            let (opcode, payload) = read_frame(&mut client).expect("a Close");
            assert_eq!(opcode, 8, "client {i}");
            assert_eq!(close_code(&payload), 1009, "client {i}");
            let _ = sending.join();
            refused += 1;
        }
    }
    let grown_mib = (rss_kib(gw.pid()) - rss_before) / 1024;
    assert!(
        grown_mib <= (BUDGET / MIB) as u64 + 8,
        "the server grew by {grown_mib} MiB holding part-sent messages (budget 32 MiB)"
    );
    // The four refusals are counted, over however many report intervals they span.
    let mut counted = 0;
    while counted < 4 {
        let line = gw.wait_line("refused_budget=");
        assert!(line.contains("held_kib="), "{line}");
        let n: u64 = line
            .split("refused_budget=")
            .nth(1)
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("a count");
        counted += n;
    }
    assert_eq!(counted, 4);
    // The messages within the budget lose nothing: each comes back whole.
    for mut client in kept {
        client.write_all(last).unwrap();
        let (opcode, echoed) = read_frame(&mut client).unwrap();
        assert_eq!(opcode, 2);
        assert!(echoed == body, "the echo differs");
    }
    assert_eq!(refused, 4);
}

/// One address may hold only so many connections (429 past it, the place comes back when
/// one closes), and open only so many a second.
#[test]
fn per_address_limits_answer_429() {
    let mut gw = Gateway::start(&[
        "--shards",
        "2",
        "--max-connections-per-ip",
        "3",
        "--handshakes-per-ip",
        "0",
        "--report-interval",
        "1s",
    ]);
    let mut open: Vec<TcpStream> = (0..3).map(|_| raw_upgrade(gw.addr, "/echo")).collect();
    let resp = http_exchange(gw.addr, upgrade_request("/echo", "").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 429 "), "{resp}");
    assert!(resp.contains("too many connections from this address"), "{resp}");
    gw.wait_line("refused_per_ip=1");
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while response_status(gw.addr, &upgrade_request("/echo", "")) != "101" {
        assert!(std::time::Instant::now() < deadline, "the freed place never came back");
    }

    let gw = Gateway::start(&[
        "--shards",
        "2",
        "--handshakes-per-ip",
        "5",
        "--max-connections-per-ip",
        "0",
    ]);
    // 20 upgrades in a burst touch at most two one-second windows: 5 to 10 get through.
    let statuses: Vec<String> = (0..20)
        .map(|_| response_status(gw.addr, &upgrade_request("/echo", "")))
        .collect();
    let upgraded = statuses.iter().filter(|s| *s == "101").count();
    let limited = statuses.iter().filter(|s| *s == "429").count();
    assert!((5..=10).contains(&upgraded) && upgraded + limited == 20, "{statuses:?}");
}

#[test]
fn connections_that_stop_reading_do_not_hold_the_others_input() {
    // Input arrives in receive buffers the shard shares. Forty clients send, never read
    // their echoes, and keep sending: each connection's task then waits to write, and what
    // arrives for it meanwhile must not keep the shared buffers from everyone else. A
    // fresh connection must still be upgraded and echoed.
    let gw = Gateway::start(&["--shards", "1"]);
    let mut frame = Vec::new();
    shardgate::ws::frame::write_frame(
        &mut frame,
        true,
        shardgate::ws::OpCode::Binary,
        &[5u8; 16 * 1024],
        Some([1, 2, 3, 4]),
    );
    let burst = frame.repeat(32);
    let stuck: Vec<TcpStream> = (0..40)
        .map(|_| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // A small window: the gateway's answers back up after a few messages.
            socket.set_recv_buffer_size(4096).unwrap();
            socket.connect(&gw.addr.into()).unwrap();
            let mut s: TcpStream = socket.into();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let head = request_upgrade(&mut s, "/echo");
            assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
            s
        })
        .collect();
    // Each sends until its socket takes no more: the gateway has stopped reading it, its
    // answers unread.
    for s in &stuck {
        s.set_nonblocking(true).unwrap();
        let mut sent = 0;
        let started = std::time::Instant::now();
        loop {
            match (&*s).write(&burst) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the gateway never stopped reading"
            );
        }
        assert!(sent > 0);
    }
    let mut probe = raw_upgrade(gw.addr, "/echo");
    for _ in 0..10 {
        write_frame(&mut probe, 0x82, b"still here");
        let (opcode, echo) = read_frame(&mut probe).expect("the probe's echo");
        assert_eq!((opcode, &echo[..]), (0x2, &b"still here"[..]));
    }
    drop(stuck);
}
