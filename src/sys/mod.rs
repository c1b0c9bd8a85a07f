//! Every system call shardgate makes itself: sockets (`socket`), the epoll set that drives
//! a shard (`epoll`), the io_uring that batches sends (`uring`), and process limits and
//! scheduling (`process`). The rest of the crate is safe code over these wrappers, but for
//! one hand-over in `shard::egress` (an echo sent from the receive arena without a copy,
//! whose memory the arena keeps still until the send); `bench/` uses them too.

pub mod epoll;
pub mod process;
pub mod socket;
pub mod uring;
