//! Shared pieces of the benchmark tools.

pub mod accounting;
