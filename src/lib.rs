//! shardgate: a WebSocket chat gateway for Linux on io_uring, one pinned shard per core.
//!
//! - [`ws`]: the WebSocket protocol, sans IO (bytes in, events out).
//! - [`shard`]: executors, listeners and the connection driver.
//! - [`config`]: flags, the TOML file, defaults.
//! - [`route`]: messages between shards, the directory of who is where.
//! - [`cluster`]: many nodes as one, through NATS.
//! - [`chat`], [`metrics`]: the chat protocol and auth; latency histograms and reports.

pub mod chat;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod route;
pub mod shard;
pub mod ws;
