//! Shared pieces of the benchmark tools.

pub mod accounting;
pub mod tls_client;
