//! catch-up: one client fetches everything a gateway stored for it, as an app that was
//! offline would: connect, read `ready` (its conversations and their heads), then ask
//! `history` with `since` in pages of `--limit` until every conversation reaches its head.
//! Prints the messages fetched, the wall time, and the gateway's CPU time over the fetch
//! (from `/proc/<--pid>/stat`). `scripts/bench-catch-up.sh` sets it up.

use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};
use tungstenite::Message;

#[derive(Debug, Parser)]
#[command(name = "catch-up", about = "fetch every stored message over a real connection")]
struct Args {
    /// The gateway's address (it runs with --insecure-dev-auth).
    #[arg(long)]
    addr: String,
    #[arg(long, default_value = "reader")]
    user: String,
    /// The gateway's PID, for its CPU time.
    #[arg(long)]
    pid: u32,
    /// Messages per history page.
    #[arg(long, default_value_t = 1000)]
    limit: u64,
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the gateway's /proc stat");
    // The fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn next_text(ws: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>) -> Value {
    loop {
        match ws.read().expect("read a frame") {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn main() {
    let args = Args::parse();
    // SAFETY: sysconf has no preconditions.
    let tick_hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (cpu0, wall) = (cpu_ticks(args.pid), Instant::now());
    let url = format!("ws://{}/ws?user={}", args.addr, args.user);
    let (mut ws, _) = tungstenite::connect(url).expect("upgrade");
    let ready = next_text(&mut ws);
    let convs = ready["convs"].as_array().expect("ready lists conversations").clone();
    let (mut fetched, mut pages) = (0u64, 0u64);
    for c in &convs {
        let (conv, head) = (c["conv"].as_str().expect("conv"), c["seq"].as_u64().expect("seq"));
        let mut since = 0;
        while since < head {
            let request = json!({"type":"history","conv":conv,"since":since,"limit":args.limit});
            ws.send(Message::Text(request.to_string())).expect("send");
            let page = next_text(&mut ws);
            let messages = page["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("not a history page: {page}"));
            pages += 1;
            fetched += messages.len() as u64;
            since = messages.last().and_then(|m| m["seq"].as_u64()).unwrap_or(head);
        }
    }
    let (wall, cpu) = (wall.elapsed(), (cpu_ticks(args.pid) - cpu0) as f64 / tick_hz);
    println!(
        "catch-up over the socket: {fetched} messages in {} conversations, {pages} pages: {:.0} ms wall, gateway CPU {:.0} ms ({:.0} messages/s)",
        convs.len(),
        wall.as_secs_f64() * 1e3,
        cpu * 1e3,
        fetched as f64 / wall.as_secs_f64()
    );
}
