//! route-bench: the cost of routing between shards.
//!
//! `hop`: two glommio executors pinned to two CPUs, joined by the gateway's own inboxes
//! (`Mesh`/`Inbox`: crossbeam channel + doorbell). Shard 0 sends `Direct` messages to
//! shard 1, whose pump records each one's age on arrival in an HDR histogram.
//!   - paced: one message every `--interval` (the receiver parks in between): the latency
//!     of waking a parked shard;
//!   - burst: batches of `--batch` with one doorbell each: throughput.
//!
//! `churn`: the directory itself (sans IO, one thread, shards simulated in order):
//! `--users` users connect, join one room, leave it and disconnect, and the time of each
//! operation, including the messages it causes on every shard, is recorded: it must stay
//! flat as the room grows, or churn would stall routing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use shardgate::route::directory::Router;
use shardgate::route::inbox::Mesh;
use shardgate::route::ShardMsg;

#[derive(Parser)]
#[command(
    name = "route-bench",
    about = "cross-shard hop latency/throughput and directory churn"
)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// One-way latency and throughput between two pinned shards.
    Hop {
        /// Paced messages for the latency run.
        #[arg(long, default_value_t = 20_000)]
        paced: u64,
        /// Time between paced messages.
        #[arg(long, default_value = "100us", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Messages for the throughput run.
        #[arg(long, default_value_t = 5_000_000)]
        burst: u64,
        /// Messages per doorbell in the throughput run.
        #[arg(long, default_value_t = 1000)]
        batch: u64,
        /// Sender and receiver CPUs.
        #[arg(long, value_delimiter = ',', default_value = "0,1")]
        cpus: Vec<usize>,
    },
    /// Directory cost of connect/join/leave/disconnect as a room grows.
    Churn {
        #[arg(long, default_value_t = 100_000)]
        users: u64,
        #[arg(long, default_value_t = 2)]
        shards: usize,
    },
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")
}

fn main() {
    match Args::parse().mode {
        Mode::Hop {
            paced,
            interval,
            burst,
            batch,
            cpus,
        } => hop(paced, interval, burst, batch, &cpus),
        Mode::Churn { users, shards } => churn(users, shards),
    }
}

fn hop(paced: u64, interval: Duration, burst: u64, batch: u64, cpus: &[usize]) {
    let (tx_cpu, rx_cpu) = (cpus[0], cpus.get(1).copied().unwrap_or(cpus[0]));
    let (mesh, mut inboxes) = Mesh::new(2);
    let inbox = inboxes.pop().expect("shard 1's inbox");
    let total = paced + burst;
    let consumer = LocalExecutorBuilder::new(Placement::Fixed(rx_cpu))
        .name("hop-rx")
        .spawn(move || async move {
            let (mut latency, mut received) = (histogram(), 0u64);
            let mut batch_buf = Vec::with_capacity(4096);
            let mut burst_started = None;
            while received < total && inbox.next_batch(&mut batch_buf, 4096).await {
                let now = Instant::now();
                for msg in batch_buf.drain(..) {
                    if let ShardMsg::Direct { ingress, .. } = msg {
                        received += 1;
                        if received <= paced {
                            let _ = latency.record(now.duration_since(ingress).as_nanos() as u64);
                        } else if burst_started.is_none() {
                            burst_started = Some(ingress);
                        }
                    }
                }
            }
            let burst_secs = burst_started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            (latency, burst_secs)
        })
        .expect("receiver shard");
    let producer = LocalExecutorBuilder::new(Placement::Fixed(tx_cpu))
        .name("hop-tx")
        .spawn(move || async move {
            let to: Arc<str> = Arc::from("bob");
            let frame = Bytes::from_static(b"\x81\x05hello");
            // A message stamped now, for shard 1.
            let send = || {
                let msg = ShardMsg::Direct {
                    to: to.clone(),
                    frame: frame.clone(),
                    ingress: Instant::now(),
                    cross_node: false,
                };
                mesh.push(1, msg);
            };
            for _ in 0..paced {
                send();
                mesh.ring(1);
                glommio::timer::sleep(interval).await;
            }
            let mut sent = 0;
            while sent < burst {
                let n = batch.min(burst - sent);
                for _ in 0..n {
                    send();
                }
                mesh.ring(1);
                sent += n;
                glommio::yield_if_needed().await;
            }
        })
        .expect("sender shard");
    producer.join().expect("sender");
    let (latency, burst_secs) = consumer.join().expect("receiver");
    println!(
        "hop paced: messages={paced} interval={interval:?} cpus={tx_cpu}->{rx_cpu} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.value_at_quantile(0.999) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    println!(
        "hop burst: messages={burst} batch={batch} msgs_per_s={:.0}",
        burst as f64 / burst_secs.max(1e-9)
    );
}

fn churn(users: u64, shards: usize) {
    let mut routers: Vec<Router> = (0..shards).map(|i| Router::new(i, shards)).collect();
    let mut queues: Vec<VecDeque<ShardMsg>> = (0..shards).map(|_| VecDeque::new()).collect();
    // Runs every router until no message is left, as the shards' pumps would.
    let settle = |routers: &mut Vec<Router>, queues: &mut Vec<VecDeque<ShardMsg>>| loop {
        let mut moved = false;
        for s in 0..routers.len() {
            for (dest, msg) in routers[s].take_effects() {
                queues[dest].push_back(msg);
            }
            while let Some(msg) = queues[s].pop_front() {
                moved = true;
                routers[s].handle(msg);
                for (dest, msg) in routers[s].take_effects() {
                    queues[dest].push_back(msg);
                }
            }
            routers[s].take_completed();
        }
        if !moved {
            break;
        }
    };
    let room: Arc<str> = Arc::from("general");
    let names: Vec<Arc<str>> = (0..users).map(|i| Arc::from(format!("user-{i}"))).collect();
    let mut phases = Vec::new();
    for phase in ["connect", "join", "leave", "disconnect"] {
        let mut h = histogram();
        let started = Instant::now();
        for (i, user) in names.iter().enumerate() {
            let shard = i % shards;
            let t = Instant::now();
            match phase {
                "connect" => routers[shard].connect(user, i as u64),
                "join" => routers[shard]
                    .change_membership(user, i as u64, room.clone(), true)
                    .expect("the bench sets no room limits"),
                "leave" => routers[shard]
                    .change_membership(user, i as u64, room.clone(), false)
                    .expect("a leave is never refused"),
                _ => routers[shard].disconnect(user, i as u64),
            }
            settle(&mut routers, &mut queues);
            let _ = h.record(t.elapsed().as_nanos() as u64);
        }
        phases.push((phase, started.elapsed(), h));
        if phase == "join" {
            assert_eq!(
                routers[0].room_shards("general").count_ones() as usize,
                shards.min(users as usize)
            );
        }
    }
    for (phase, took, h) in phases {
        println!(
            "churn {phase}: users={users} shards={shards} ops_per_s={:.0} p50_us={:.1} p99_us={:.1} max_us={:.1} (each op includes the messages it causes on every shard)",
            users as f64 / took.as_secs_f64(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
}
