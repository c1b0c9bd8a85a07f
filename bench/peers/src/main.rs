//! peer-echo: WebSocket echo servers on other Rust libraries, each written the way its own
//! examples write a fast echo server, for the side-by-side benchmark
//! (`scripts/bench-peers.sh`). Every server echoes text and binary messages at any path,
//! without compression and without message or frame size limits (as shardgate's `/echo`
//! with a large `--max-message-size`), with `TCP_NODELAY` on, as shardgate.
//!
//! `--threads 1` runs a tokio current-thread runtime pinned to `--cpu` (the single-core
//! cases); `--threads N` a multi-thread runtime with N workers (the all-cores cases).

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};
use futures_util::{future, SinkExt, StreamExt, TryStreamExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Server {
    /// tokio-tungstenite: the most used.
    Tungstenite,
    /// fastwebsockets (Deno's), upgraded through hyper.
    Fastwebsockets,
    /// tokio-websockets.
    TokioWebsockets,
}

#[derive(Debug, Parser)]
#[command(name = "peer-echo", about = "WebSocket echo servers on other Rust libraries")]
struct Args {
    #[arg(long, value_enum)]
    server: Server,
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Runtime worker threads: 1 is a current-thread runtime pinned to --cpu.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The CPU of the current-thread runtime.
    #[arg(long, default_value_t = 0)]
    cpu: usize,
}

fn main() {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: args.cpu }) {
            eprintln!("peer-echo: cannot pin to cpu {}", args.cpu);
            std::process::exit(2);
        }
        tokio::runtime::Builder::new_current_thread().enable_io().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_io()
            .build()
    }
    .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await.expect("bind");
        // The same start line shape as shardgate's, for the scripts.
        println!(
            "peer-echo {:?}: {} thread(s) on {}; listening on {}",
            args.server,
            args.threads,
            if args.threads <= 1 {
                format!("cpu {}", args.cpu)
            } else {
                "any cpu".to_string()
            },
            listener.local_addr().expect("local address")
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            match args.server {
                Server::Tungstenite => tokio::spawn(tungstenite(stream)),
                Server::Fastwebsockets => tokio::spawn(fastwebsockets_conn(stream)),
                Server::TokioWebsockets => tokio::spawn(tokio_websockets(stream)),
            };
        }
    });
}

/// As tokio-tungstenite's `examples/echo-server.rs`, without size limits.
async fn tungstenite(stream: TcpStream) {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (write, read) = ws.split();
    let _ = read
        .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
        .forward(write)
        .await;
}

/// As fastwebsockets' `examples/echo_server.rs`: hyper serves the upgrade, the frames are
/// echoed from a `FragmentCollector` in an unconstrained task.
async fn fastwebsockets_conn(stream: TcpStream) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = http1::Builder::new()
        .serve_connection(io, service_fn(fastwebsockets_upgrade))
        .with_upgrades()
        .await;
}

async fn fastwebsockets_upgrade(
    mut req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Empty<hyper::body::Bytes>>, fastwebsockets::WebSocketError> {
    let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
    tokio::spawn(tokio::task::unconstrained(async move {
        let Ok(ws) = fut.await else { return };
        let mut ws = fastwebsockets::FragmentCollector::new(ws);
        while let Ok(frame) = ws.read_frame().await {
            let done = match frame.opcode {
                fastwebsockets::OpCode::Close => true,
                fastwebsockets::OpCode::Text | fastwebsockets::OpCode::Binary => ws.write_frame(frame).await.is_err(),
                _ => false,
            };
            if done {
                break;
            }
        }
    }));
    Ok(response)
}

/// As tokio-websockets' `examples/echo_server.rs`: unlimited, in an unconstrained task.
async fn tokio_websockets(stream: TcpStream) {
    tokio::task::unconstrained(async move {
        let accepted = tokio_websockets::ServerBuilder::new()
            .config(tokio_websockets::Config::default().frame_size(usize::MAX))
            .limits(tokio_websockets::Limits::unlimited())
            .accept(stream)
            .await;
        let Ok((_request, mut ws)) = accepted else { return };
        while let Some(Ok(item)) = ws.next().await {
            if (item.is_text() || item.is_binary()) && ws.send(item).await.is_err() {
                break;
            }
        }
    })
    .await
}
