//! deflate-fanout: what compressing a room message costs when it goes to many members.
//!
//! One publish of a chat message (`--size` bytes of JSON text) to `--members` members that
//! all agreed to permessage-deflate, three ways, on one thread:
//!   - `plain`: the uncompressed frame, shared (what a gateway without deflate does);
//!   - `once`: deflated once and the compressed frame shared (shardgate, possible because
//!     no connection keeps compression context);
//!   - `per-member`: deflated again for each member (what context takeover forces).
//!
//! It times the step that differs (making and handing out each member's frame with the
//! gateway's own `ws::deflate::deflate_frame`), not the sockets, and prints the median over
//! `--rounds` publishes: time per publish, members reached per second, and bytes per
//! member on the wire.

use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use shardgate::ws::deflate::{deflate_frame, Deflater};
use shardgate::ws::frame::text_frame;

#[derive(Parser)]
#[command(
    name = "deflate-fanout",
    about = "the cost of compressing one room message for many members"
)]
struct Args {
    /// Members of the room.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Bytes of the message's JSON.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Publishes timed (the median is shown).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// zlib level (the gateway's --deflate-level).
    #[arg(long, default_value_t = 1)]
    level: u32,
}

fn main() {
    let args = Args::parse();
    let frame = text_frame(&chat_json(args.size));
    let mut deflater = Deflater::new(args.level);
    let mut queues: Vec<Bytes> = Vec::with_capacity(args.members);
    println!(
        "deflate-fanout: members={} size={} level={} rounds={} (median per publish)",
        args.members, args.size, args.level, args.rounds
    );
    for way in ["plain", "once", "per-member"] {
        let mut times = Vec::with_capacity(args.rounds);
        let mut bytes_per_member = 0;
        for _ in 0..args.rounds {
            queues.clear();
            let start = Instant::now();
            match way {
                "plain" => queues.extend((0..args.members).map(|_| frame.clone())),
                "once" => {
                    let twin = Bytes::from(deflate_frame(&mut deflater, &frame, 15, 512).expect("compressible"));
                    queues.extend((0..args.members).map(|_| twin.clone()));
                }
                _ => queues.extend(
                    (0..args.members)
                        .map(|_| Bytes::from(deflate_frame(&mut deflater, &frame, 15, 512).expect("compressible"))),
                ),
            }
            times.push(start.elapsed().as_secs_f64());
            bytes_per_member = queues.last().map_or(0, Bytes::len);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "deflate-fanout: way={way} per_publish_us={:.0} members_per_s={:.0} bytes_per_member={bytes_per_member}",
            median * 1e6,
            args.members as f64 / median
        );
    }
}

/// About `size` bytes of chat JSON: one `message` frame's text.
fn chat_json(size: usize) -> Vec<u8> {
    let words = [
        "see", "you", "at", "the", "meeting", "tomorrow", "thanks", "sounds", "good", "lunch",
    ];
    let mut text = String::new();
    let mut x: u32 = 0x9E37_79B9;
    while text.len() + 120 < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        text.push_str(words[(x % words.len() as u32) as usize]);
        text.push(' ');
    }
    format!(r#"{{"type":"room_message","room":"lobby","conv":"room:lobby","seq":4711,"from":"user-1234","body":{{"text":"{text}"}}}}"#)
        .into_bytes()
}
