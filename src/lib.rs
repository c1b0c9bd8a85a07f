//! shardgate: a WebSocket chat gateway for Linux on io_uring, one pinned shard per core.

pub mod ws;
