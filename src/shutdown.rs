//! The process-wide stop signal, delivered to every shard through a doorbell it can await
//! without blocking (the signal arrives on an ordinary thread).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;

pub struct Shutdown {
    requested: AtomicBool,
    doorbells: Vec<AtomicWaker>,
}

impl Shutdown {
    pub fn new(shards: usize) -> Self {
        Shutdown {
            requested: AtomicBool::new(false),
            doorbells: (0..shards).map(|_| AtomicWaker::new()).collect(),
        }
    }

    /// Asks every shard to stop. Safe from any thread.
    pub fn trigger(&self) {
        self.requested.store(true, Ordering::SeqCst);
        for bell in &self.doorbells {
            bell.wake();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Resolves once a stop has been asked for; awaited by shard `shard`.
    pub async fn wait(&self, shard: usize) {
        poll_fn(|cx| {
            if self.is_requested() {
                return Poll::Ready(());
            }
            self.doorbells[shard].register(cx.waker());
            // Checked again after registering, so a trigger in between is not lost.
            if self.is_requested() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}
