//! shardgate: a WebSocket chat gateway for Linux on io_uring, one pinned shard per core.
//!
//! From the bottom up (each module imports only those listed before it):
//! - [`sys`]: every system call (and all `unsafe` code but one zero-copy hand-over).
//! - [`ws`]: the WebSocket protocol, sans IO (bytes in, events out).
//! - [`mailbox`], [`shutdown`]: channels with a doorbell, for handing work to a shard.
//! - [`metrics`]: latency histograms, the report line, per-shard counters, the board and `/metrics`.
//! - [`route`]: messages between shards, the directory of who is where.
//! - [`config`]: flags, the TOML file, defaults, from one table; [`secret`]: secret files.
//! - [`store`]: durable conversations (sequence numbers, the embedded message store).
//! - [`cluster`]: many nodes as one, through NATS.
//! - [`chat`]: the chat application (auth, protocol, sessions, the hub), apart from IO.
//! - [`web`]: the chat and dashboard pages, and the dashboard's live feed.
//! - [`shard`]: executors, listeners, buffers and the connection driver.

pub mod chat;
pub mod cluster;
pub mod config;
pub(crate) mod mailbox;
pub mod metrics;
pub mod route;
pub mod secret;
pub mod shard;
pub(crate) mod shutdown;
pub mod store;
pub mod sys;
pub mod tls;
pub mod web;
pub mod ws;
