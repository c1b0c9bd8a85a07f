//! Every system call shardgate makes itself: sockets (`socket`), the io_uring that
//! carries everything of a shard's sockets (`uring`: receives, sends, accepts, polls),
//! and process limits and scheduling (`process`). The rest of the crate is safe code over
//! these wrappers, but for one hand-over in `shard::egress` (an echo sent from the
//! received bytes without a copy, whose memory is held until the send); `bench/` uses
//! them too.

pub mod process;
pub mod socket;
pub mod uring;
