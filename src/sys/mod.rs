//! Every system call shardgate makes itself, and so every `unsafe` block outside the
//! vendored glommio: sockets (`socket`), the epoll set that drives a shard (`epoll`), the
//! io_uring that batches sends (`uring`), and process limits and scheduling (`process`).
//! The rest of the crate is safe code over these wrappers; `bench/` uses them too.

pub mod epoll;
pub mod process;
pub mod socket;
pub mod uring;
