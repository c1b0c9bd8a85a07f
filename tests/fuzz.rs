//! Fuzz targets, one per parser that reads network input: the HTTP upgrade, the frame
//! decoder, the chat protocol, and the cluster wire (with its seal).
//!
//! Property-based fuzzing with proptest (it runs on the stable toolchain; cargo-fuzz needs
//! nightly): each target gets random bytes and valid inputs mutated (bytes flipped,
//! inserted, deleted, duplicated, cut, spliced), checks that the parser never panics, and
//! checks a property of what it accepts. `SHARDGATE_FUZZ_CASES` sets the cases per target
//! (2,000 by default, as CI runs it); `scripts/fuzz.sh` runs long and reports the figures.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use bytes::Bytes;
use shardgate::chat::protocol::{self, ClientMessage};
use shardgate::cluster::directory::{self, DirKey, DirMsg};
use shardgate::cluster::wire;
use shardgate::ws::handshake;
use shardgate::ws::{write_frame, Decoder, Event, OpCode, Role};

fn cases() -> u32 {
    std::env::var("SHARDGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// Runs `check` on `cases()` inputs from `inputs`, and says how many it ran.
fn fuzz<S: Strategy>(name: &str, inputs: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let start = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&inputs, check) {
        panic!("fuzz target {name}: {e}");
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz {name}: {} cases in {secs:.1} s ({:.0}/s)",
        cases(),
        cases() as f64 / secs.max(1e-9)
    );
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Insert(i, x)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Splice(i, b)),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match m {
            Mutation::Flip(i, x) if !data.is_empty() => {
                let i = at(*i, data.len());
                data[i] ^= x;
            }
            Mutation::Insert(i, x) => {
                let i = at(*i, data.len() + 1);
                data.insert(i, *x);
            }
            Mutation::Delete(i, n) if !data.is_empty() => {
                let i = at(*i, data.len());
                let end = (i + n).min(data.len());
                data.drain(i..end);
            }
            Mutation::Duplicate(i, n) if !data.is_empty() => {
                let i = at(*i, data.len());
                let end = (i + n).min(data.len());
                let copy = data[i..end].to_vec();
                data.splice(i..i, copy);
            }
            Mutation::Truncate(i) => {
                let i = at(*i, data.len() + 1);
                data.truncate(i);
            }
            Mutation::Splice(i, bytes) => {
                let i = at(*i, data.len() + 1);
                data.splice(i..i, bytes.iter().copied());
            }
            _ => {}
        }
    }
    data
}

/// Random bytes, or one of `seeds` with up to 8 mutations.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..600),
        4 => (proptest::sample::select(seeds), proptest::collection::vec(mutation(), 0..8))
            .prop_map(|(seed, ms)| apply(seed, &ms)),
    ]
}

const REQUEST: &str = "GET /ws?token=abc HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat.v1, chat.v2\r\nOrigin: https://chat.example\r\n\r\n";

#[test]
fn fuzz_the_upgrade_request() {
    let seeds = vec![
        REQUEST.as_bytes().to_vec(),
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        b"POST /ws HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
    ];
    let supported = vec!["chat.v2".to_string()];
    fuzz("handshake", input(seeds), |buf| {
        match handshake::parse_request(&buf, 8192) {
            Ok(Some(req)) => {
                prop_assert!(req.head_len <= buf.len());
                if let Ok(accept) =
                    handshake::validate_upgrade(&req, &supported, shardgate::ws::deflate::Policy::Takeover)
                {
                    // An accepted upgrade had the one key the accept is derived from.
                    let key = req.header("sec-websocket-key").unwrap_or_default().trim_ascii();
                    prop_assert_eq!(&accept.accept_key, &handshake::accept_key(key));
                    let mut out = Vec::new();
                    handshake::write_accept(&mut out, &accept);
                    prop_assert!(out.starts_with(b"HTTP/1.1 101 "));
                }
            }
            Ok(None) => prop_assert!(buf.len() < 8192),
            Err(r) => prop_assert!(matches!(r.status, 400 | 431)),
        }
        Ok(())
    });
}

/// What a decoder made of a stream: its events and how it ended.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Message(OpCode, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

fn decode(data: &[u8], cuts: &[usize]) -> (Vec<Seen>, Option<(u16, &'static str)>) {
    let mut d = Decoder::new(Role::Server, 4096);
    let mut seen = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    points.push(data.len());
    let mut from = 0;
    for to in points {
        let mut piece = data[from..to].to_vec();
        from = to;
        let result = d.feed(&mut piece, &mut |e| {
            seen.push(match e {
                Event::Message { opcode, payload } => Seen::Message(opcode, payload.to_vec()),
                Event::Ping(p) => Seen::Ping(p.to_vec()),
                Event::Pong(p) => Seen::Pong(p.to_vec()),
                Event::Close { code, reason } => Seen::Close(code.map(u16::from), reason.to_string()),
            })
        });
        if let Err(e) = result {
            return (seen, Some((u16::from(e.code()), e.reason())));
        }
    }
    (seen, None)
}

#[test]
fn fuzz_the_frame_decoder() {
    let mut stream = Vec::new();
    let mask = Some([0x37, 0xfa, 0x21, 0x3d]);
    write_frame(&mut stream, false, OpCode::Text, "héllo ".as_bytes(), mask);
    write_frame(&mut stream, true, OpCode::Ping, b"p", mask);
    write_frame(&mut stream, true, OpCode::Continuation, "wörld".as_bytes(), mask);
    write_frame(&mut stream, true, OpCode::Binary, &[7; 300], mask);
    let mut close = Vec::new();
    shardgate::ws::write_close(&mut close, shardgate::ws::CloseCode::NORMAL, "bye", mask);
    let mut with_close = stream.clone();
    with_close.extend_from_slice(&close);
    let seeds = vec![stream, with_close, close];
    let inputs = (input(seeds), proptest::collection::vec(any::<usize>(), 0..6));
    fuzz("frame decoder", inputs, |(data, cuts)| {
        // However the bytes are split across reads, the decoder sees the same thing.
        let whole = decode(&data, &[]);
        let split = decode(&data, &cuts);
        prop_assert_eq!(&whole, &split);
        let (events, error) = whole;
        for e in &events {
            if let Seen::Message(OpCode::Text, payload) = e {
                prop_assert!(std::str::from_utf8(payload).is_ok(), "text that is not UTF-8");
            }
            if let Seen::Message(_, payload) = e {
                prop_assert!(payload.len() <= 4096, "a message over the limit");
            }
        }
        if let Some((code, _)) = error {
            prop_assert!(matches!(code, 1002 | 1007 | 1009), "close code {}", code);
        }
        Ok(())
    });
}

#[test]
fn fuzz_the_chat_protocol() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"type":"send","to":"user-b","id":"c-17","body":{"text":"hi","n":[1,2.5,null,true]}}"#,
        r#"{"type":"publish","room":"general","id":"c-18","body":"plain"}"#,
        r#"{"type":"join","room":"general"}"#,
        r#"{"type":"leave","room":"team-7"}"#,
        r#"{"type":"send","to":"b","body":"\u00e9\ud83d\ude00"}"#,
        r#"{"type":"history","conv":"dm:alice:bob","since":17,"limit":50,"id":"h-1"}"#,
        r#"{"type":"history","conv":"room:general","before":100}"#,
        r#"{"type":"join","room":"general","since":3}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("chat protocol", input(seeds), |frame| {
        match protocol::parse(&frame) {
            Ok(ClientMessage::Send { to, id, body }) => {
                prop_assert!(shardgate::chat::auth::is_valid_user_id(&to));
                prop_assert!(id.is_none_or(|i| (1..=128).contains(&i.len())));
                // The body is forwarded as it came: it must be JSON on its own.
                prop_assert!(serde_json::from_str::<serde_json::Value>(body.get()).is_ok());
            }
            Ok(ClientMessage::Publish { room, body, .. }) => {
                prop_assert!(protocol::is_valid_room(&room));
                prop_assert!(serde_json::from_str::<serde_json::Value>(body.get()).is_ok());
            }
            Ok(ClientMessage::Join { room, .. } | ClientMessage::Leave { room }) => {
                prop_assert!(protocol::is_valid_room(&room));
            }
            Ok(ClientMessage::History { conv, limit, .. }) => {
                // A conversation id a client may name is one the store could have made.
                let same = match (conv.direct_users(), conv.room_name()) {
                    (Some((a, b)), _) => shardgate::store::ConvId::direct(b, a) == conv,
                    (None, Some(room)) => protocol::is_valid_room(room),
                    (None, None) => false,
                };
                prop_assert!(same, "{conv}");
                prop_assert!((1..=protocol::HISTORY_MAX_LIMIT).contains(&limit));
            }
            Err(e) => {
                // The error frame the client gets is JSON too.
                let mut out = Vec::new();
                protocol::write_error(&mut out, &e);
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_the_cluster_wire() {
    let key = wire::ClusterKey::new(&[0x5a; 32]);
    let now = 1_800_000_000_000_000_000u64;
    let mut batch = wire::BatchWriter::new(7, 42);
    batch.push(wire::RecordKind::Direct, 123, "bob", None, b"\x81\x02hi");
    batch.push(wire::RecordKind::Room, 456, "lobby", None, b"\x82\x00");
    let presence = wire::write_presence(&wire::PresenceMsg::Heartbeat {
        node: 1,
        seq: 0,
        users: 2,
    });
    let dir = directory::wire::write_dir(
        9,
        &[
            DirMsg::Hold {
                key: DirKey::user("u"),
                held: true,
            },
            DirMsg::Where {
                key: DirKey::room("r"),
                nodes: vec![1, 2],
                complete: true,
            },
            DirMsg::Synced { view: 3 },
        ],
    );
    let mut receipts = wire::ReceiptWriter::default();
    receipts.push(&wire::Receipt {
        seq: 5,
        absent: vec![1],
        refused: vec![0],
    });
    let plain = vec![batch.buf.clone(), presence.to_vec(), dir.to_vec(), receipts.buf.clone()];
    let sealed: Vec<Vec<u8>> = plain
        .iter()
        .map(|body| key.seal("sg.node.1.inbox", body.clone(), now).to_vec())
        .collect();
    let seeds: Vec<Vec<u8>> = plain.into_iter().chain(sealed.clone()).collect();
    fuzz("cluster wire", input(seeds), |data| {
        let b = Bytes::from(data.clone());
        if let Ok((_, _, records)) = wire::read_batch(b.clone()) {
            for r in records {
                // Whatever a batch carries goes to sockets as it is: one whole frame.
                prop_assert!(r.frame.len() >= 2);
            }
        }
        let _ = wire::read_presence(b.clone());
        let _ = directory::wire::read_dir(b.clone());
        let _ = wire::read_receipts(b.clone());
        // Only an unchanged sealed message opens.
        if key.open("sg.node.1.inbox", b, now).is_ok() {
            prop_assert!(sealed.contains(&data), "a changed message opened");
        }
        Ok(())
    });
}
