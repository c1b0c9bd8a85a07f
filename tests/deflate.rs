//! permessage-deflate (RFC 7692) against the real binary: what is negotiated for each
//! offer, compressed chat messages, a room message compressed once for all its members,
//! a compressed message that inflates past the limit, and context takeover.
//!
//! The client side inflates with flate2 directly (raw deflate plus the `00 00 ff ff`
//! tail), not with the gateway's own `ws::deflate`; the Autobahn|Testsuite's 12.* and 13.*
//! cases (scripts/autobahn.sh) check the same against Python's zlib.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{upgrade_request, Gateway};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// Sends an upgrade with `extensions` (if any) and returns the socket and the 101's
/// `Sec-WebSocket-Extensions` value, if it has one.
fn upgrade(addr: SocketAddr, path: &str, extensions: Option<&str>) -> (TcpStream, Option<String>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let extra = extensions
        .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
        .unwrap_or_default();
    s.write_all(upgrade_request(path, &extra).as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let agreed = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(str::to_string);
    (s, agreed)
}

/// One server frame: its first byte (FIN, RSV1, opcode) and payload.
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("a frame header");
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("a frame payload");
    (h[0], payload)
}

const RSV1: u8 = 0x40;

/// A data message from the server, inflated if it came compressed; and whether it did.
fn read_message(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let (first, payload) = read_frame(s);
    assert_eq!(first & 0x80, 0x80, "the gateway sends whole messages");
    if first & RSV1 == 0 {
        return (payload, false);
    }
    (inflate(&payload), true)
}

fn inflate(deflated: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = deflated.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("valid deflate data");
    assert_eq!(d.total_in() as usize, input.len());
    out
}

/// `len` pseudo-random lowercase letters (compressible by Huffman coding alone).
fn letters(len: usize) -> String {
    let mut x = 0x9E37_79B9u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn deflate(message: &[u8]) -> Vec<u8> {
    deflate_with(message, 6, 15)
}

/// Raw deflate of one message with a sync flush, the tail stripped (RFC 7692 §7.2.1).
fn deflate_with(message: &[u8], level: u32, window_bits: u8) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(Compression::new(level), false, window_bits);
    let mut out = Vec::with_capacity(message.len() * 2 + 64);
    c.compress_vec(message, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Sends a masked text message, compressed (RSV1) if `compressed`.
fn send_text(s: &mut TcpStream, text: &str, compressed: bool) {
    if compressed {
        send_deflated(s, &deflate(text.as_bytes()));
    } else {
        send_frame(s, text.as_bytes(), false);
    }
}

/// Sends one masked text frame carrying deflate data (RSV1 set).
fn send_deflated(s: &mut TcpStream, deflated: &[u8]) {
    send_frame(s, deflated, true);
}

fn send_frame(s: &mut TcpStream, payload: &[u8], rsv1: bool) {
    let mut frame = Vec::new();
    shardgate::ws::frame::write_frame(
        &mut frame,
        true,
        shardgate::ws::OpCode::Text,
        payload,
        Some([9, 8, 7, 6]),
    );
    if rsv1 {
        frame[0] |= RSV1;
    }
    s.write_all(&frame).unwrap();
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// Reads messages until one of type `kind`.
fn expect_type(s: &mut TcpStream, kind: &str) -> (serde_json::Value, bool) {
    loop {
        let (bytes, compressed) = read_message(s);
        let v = json(&bytes);
        if v["type"] == kind {
            return (v, compressed);
        }
    }
}

const BOTH_NO_CONTEXT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[test]
fn each_offer_gets_the_answer_rfc_7692_asks_for() {
    let gw = Gateway::start(&["--deflate"]);
    let cases: &[(Option<&str>, Option<String>)] = &[
        (None, None),
        (Some("permessage-deflate"), Some(BOTH_NO_CONTEXT.into())),
        // Browsers offer this.
        (
            Some("permessage-deflate; client_max_window_bits"),
            Some(BOTH_NO_CONTEXT.into()),
        ),
        (
            Some("permessage-deflate; client_max_window_bits=10"),
            Some(BOTH_NO_CONTEXT.into()),
        ),
        (
            Some("permessage-deflate; server_no_context_takeover"),
            Some(BOTH_NO_CONTEXT.into()),
        ),
        (
            Some("permessage-deflate; client_no_context_takeover"),
            Some(BOTH_NO_CONTEXT.into()),
        ),
        (
            Some("permessage-deflate; server_max_window_bits=10"),
            Some(format!("{BOTH_NO_CONTEXT}; server_max_window_bits=10")),
        ),
        // Declined, not failed: a value out of range, a parameter twice, an unknown one,
        // an extension we do not know.
        (Some("permessage-deflate; server_max_window_bits=7"), None),
        (Some("permessage-deflate; server_max_window_bits"), None),
        (
            Some("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
            None,
        ),
        (Some("permessage-deflate; x-unknown=1"), None),
        (Some("x-webkit-deflate-frame"), None),
        // Several offers: the first acceptable one.
        (
            Some("permessage-deflate; server_max_window_bits=99, permessage-deflate; server_max_window_bits=12"),
            Some(format!("{BOTH_NO_CONTEXT}; server_max_window_bits=12")),
        ),
    ];
    for (offer, answer) in cases {
        let (_, agreed) = upgrade(gw.addr, "/echo", *offer);
        assert_eq!(&agreed, answer, "offer {offer:?}");
    }
    // Off unless allowed.
    let plain = Gateway::start(&[]);
    assert_eq!(upgrade(plain.addr, "/echo", Some("permessage-deflate")).1, None);
}

#[test]
fn echo_answers_compressed_above_the_threshold_and_within_the_agreed_window() {
    let gw = Gateway::start(&["--deflate", "--deflate-min-size", "100"]);
    for window in [None, Some(9), Some(15)] {
        let offer = match window {
            Some(bits) => format!("permessage-deflate; server_max_window_bits={bits}"),
            None => "permessage-deflate".into(),
        };
        let (mut s, agreed) = upgrade(gw.addr, "/echo", Some(&offer));
        assert!(agreed.is_some());
        // Repeats at a distance of 700 bytes: further than a 9-bit window reaches.
        let big = letters(700).repeat(3);
        for (text, compressed_in) in [(&big[..], true), (&big[..], false), ("short", false), ("short", true)] {
            send_text(&mut s, text, compressed_in);
            let (first, payload) = read_frame(&mut s);
            let long = text.len() >= 100;
            assert_eq!(first & RSV1 != 0, long, "{text:.10}… compressed in: {compressed_in}");
            let echoed = match (long, window) {
                (false, _) => payload,
                (true, None) => inflate(&payload),
                // Deflated with the agreed window: the same bytes as zlib makes with it
                // (zlib's inflate does not check distances against its window).
                (true, Some(bits)) => {
                    assert_eq!(payload, deflate_with(text.as_bytes(), 1, bits), "window {bits}");
                    if bits < 10 {
                        assert_ne!(payload, deflate_with(text.as_bytes(), 1, 15), "the window tells");
                    }
                    inflate(&payload)
                }
            };
            assert_eq!(echoed, text.as_bytes());
        }
    }
}

/// A chat connection of `user` (dev auth), with permessage-deflate offered or not; its
/// `ready` is read.
fn chat_user(addr: SocketAddr, user: &str, offer_deflate: bool) -> TcpStream {
    let offer = offer_deflate.then_some("permessage-deflate; client_max_window_bits");
    let (mut s, agreed) = upgrade(addr, &format!("/ws?user={user}"), offer);
    assert_eq!(agreed.is_some(), offer_deflate);
    let (ready, _) = expect_type(&mut s, "ready");
    assert_eq!(ready["user"], user);
    s
}

/// Chat JSON text of about `len` bytes, as a message body.
fn chat_text(len: usize) -> String {
    let words = [
        "see", "you", "at", "the", "meeting", "tomorrow", "thanks", "sounds", "good",
    ];
    let mut text = String::new();
    let mut i = 0;
    while text.len() < len {
        text.push_str(words[(i * 5 + i / 3) % words.len()]);
        text.push(' ');
        i += 1;
    }
    text
}

fn dev_gateway(extra: &[&str]) -> Gateway {
    let mut args = vec!["--insecure-dev-auth", "--rate-limit", "0", "--rate-limit-bytes", "0"];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

#[test]
fn a_compressed_chat_message_reaches_the_other_user_compressed_and_whole() {
    let gw = dev_gateway(&["--deflate"]);
    let mut alice = chat_user(gw.addr, "alice", true);
    let mut bob = chat_user(gw.addr, "bob", true);
    let text = chat_text(4000);
    let send = serde_json::json!({"type":"send","to":"bob","id":"d1","body":{"text":text}}).to_string();
    send_text(&mut alice, &send, true);
    let (ack, ack_compressed) = expect_type(&mut alice, "ack");
    assert_eq!(ack["status"], "routed");
    assert!(!ack_compressed, "an ack is under the threshold");
    let (msg, compressed) = expect_type(&mut bob, "message");
    assert!(compressed);
    assert_eq!(msg["from"], "alice");
    assert_eq!(msg["body"]["text"], text);
    // And uncompressed from a client that sends plainly over the same agreement.
    let small = serde_json::json!({"type":"send","to":"alice","id":"d2","body":"hi"}).to_string();
    send_text(&mut bob, &small, false);
    let (msg, compressed) = expect_type(&mut alice, "message");
    assert!(!compressed);
    assert_eq!(msg["body"], "hi");
}

/// The `deflated=` counts of the report lines seen so far and of the next `lines` lines.
fn deflated_in_reports(gw: &mut Gateway, lines: usize) -> u64 {
    for _ in 0..lines {
        gw.wait_line("report: ");
    }
    let reports: Vec<&String> = gw.seen.iter().filter(|l| l.contains("report: ")).collect();
    reports
        .iter()
        .map(|l| {
            let field = l.split(" deflated=").nth(1).expect("a deflated= field");
            field.split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn a_room_message_is_compressed_once_for_every_member_that_agreed() {
    let mut gw = dev_gateway(&["--deflate", "--shards", "1", "--report-interval", "200ms"]);
    let mut members: Vec<(TcpStream, bool)> = [("ann", true), ("ben", true), ("cat", false), ("dan", true)]
        .into_iter()
        .map(|(user, deflate)| (chat_user(gw.addr, user, deflate), deflate))
        .collect();
    for (s, _) in members.iter_mut() {
        send_text(s, r#"{"type":"join","room":"lobby"}"#, false);
        expect_type(s, "joined");
    }
    let before = deflated_in_reports(&mut gw, 1);
    assert_eq!(before, 0, "nothing was large enough to compress yet");
    let text = chat_text(2048);
    let publish = serde_json::json!({"type":"publish","room":"lobby","id":"p1","body":{"text":text}}).to_string();
    // Sent uncompressed: the gateway compresses what it sends, whatever came in.
    send_text(&mut members[2].0, &publish, false);
    let mut compressed_payloads = Vec::new();
    for (i, (s, deflate)) in members.iter_mut().enumerate() {
        if i == 2 {
            assert_eq!(expect_type(s, "ack").0["status"], "routed");
            continue;
        }
        let (first, payload) = loop {
            let (first, payload) = read_frame(s);
            let bytes = if first & RSV1 != 0 {
                inflate(&payload)
            } else {
                payload.clone()
            };
            if json(&bytes)["type"] == "room_message" {
                assert_eq!(json(&bytes)["body"]["text"], text);
                break (first, payload);
            }
        };
        assert_eq!(first & RSV1 != 0, *deflate, "member {i}");
        compressed_payloads.push(payload);
    }
    // The same compressed bytes for every member that agreed: one compression.
    assert!(compressed_payloads.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(deflated_in_reports(&mut gw, 2), 1, "{:?}", gw.seen);
}

#[test]
fn a_compressed_message_that_inflates_past_the_limit_closes_with_1009() {
    let gw = dev_gateway(&["--deflate", "--max-chat-message", "65536"]);
    let mut mallory = chat_user(gw.addr, "mallory", true);
    let mut bob = chat_user(gw.addr, "bob", true);
    // 16 MiB of one repeated byte: a few KiB on the wire.
    let bomb = format!(
        r#"{{"type":"send","to":"bob","id":"z","body":"{}"}}"#,
        "A".repeat(16 << 20)
    );
    let deflated = deflate(bomb.as_bytes());
    assert!(deflated.len() < 64 * 1024, "{}", deflated.len());
    send_deflated(&mut mallory, &deflated);
    let (first, payload) = read_frame(&mut mallory);
    assert_eq!(first & 0x0F, 0x8, "a Close");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
    // Bob got nothing of it, and the gateway serves on.
    let mut carol = chat_user(gw.addr, "carol", true);
    send_text(
        &mut carol,
        r#"{"type":"send","to":"bob","id":"c","body":"still here"}"#,
        true,
    );
    let (msg, _) = expect_type(&mut bob, "message");
    assert_eq!(msg["from"], "carol");
}

#[test]
fn with_context_takeover_messages_refer_back_to_earlier_ones() {
    let gw = dev_gateway(&["--deflate", "--deflate-context-takeover"]);
    // The answer keeps context wherever the offer does not refuse it.
    let (_, agreed) = upgrade(gw.addr, "/echo", Some("permessage-deflate"));
    assert_eq!(agreed.as_deref(), Some("permessage-deflate"));
    let (_, agreed) = upgrade(gw.addr, "/echo", Some("permessage-deflate; client_no_context_takeover"));
    assert_eq!(
        agreed.as_deref(),
        Some("permessage-deflate; client_no_context_takeover")
    );

    let mut alice = chat_user(gw.addr, "alice", true);
    let mut bob = chat_user(gw.addr, "bob", true);
    // Both sides keep context: one compressor for all of alice's messages, one
    // decompressor for all of bob's.
    let mut alice_deflate = Compress::new(Compression::new(6), false);
    let mut bob_inflate = Decompress::new(false);
    let mut sizes = Vec::new();
    for i in 0..3 {
        // Letters compress only so far alone; the same letters again, very far.
        let text = format!("{} #{i}", letters(1500));
        let send = serde_json::json!({"type":"send","to":"bob","id":format!("t{i}"),"body":{"text":text}}).to_string();
        let mut deflated = Vec::with_capacity(send.len() + 64);
        alice_deflate
            .compress_vec(send.as_bytes(), &mut deflated, FlushCompress::Sync)
            .unwrap();
        deflated.truncate(deflated.len() - 4);
        send_deflated(&mut alice, &deflated);
        assert_eq!(expect_type(&mut alice, "ack").0["status"], "routed");
        let message = loop {
            let (first, payload) = read_frame(&mut bob);
            assert_ne!(first & RSV1, 0, "a 1.5 KiB message goes compressed");
            sizes.push(payload.len());
            let mut input = payload;
            input.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(1 << 16);
            bob_inflate
                .decompress_vec(&input, &mut out, FlushDecompress::Sync)
                .expect("inflates with the context of the earlier messages");
            let v = json(&out);
            if v["type"] == "message" {
                break v;
            }
        };
        assert_eq!(message["body"]["text"], text);
    }
    // The second and third messages refer back to the first: far smaller.
    assert!(sizes[1] * 3 < sizes[0] && sizes[2] * 3 < sizes[0], "{sizes:?}");
}
