//! Read deadlines without a timer per read: reads only note when they give up, and one
//! sweep per shard sleeps until the earliest of them (at least `DEADLINE_TICK` after its
//! last walk), so a shard whose connections are idle wakes only when one of them is due,
//! and one without deadlines does not wake at all.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::context::ShardContext;

/// The least time between two sweeps of the read deadlines: a read times out at most this
/// late, and deadlines close together expire in one walk.
const DEADLINE_TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct Deadlines {
    /// No read deadline falls before this.
    earliest: Cell<Option<Instant>>,
    /// When the sweep means to wake (`None`: it waits for a deadline to appear).
    sweep_at: Cell<Option<Instant>>,
    /// The sleeping sweep, woken when a read sets a deadline earlier than `sweep_at`.
    waker: RefCell<Option<Waker>>,
    kicked: Cell<bool>,
}

impl Deadlines {
    /// A read now waits until `at`: wakes the sweep if it means to sleep past that.
    pub fn note(&self, at: Instant) {
        if self.earliest.get().is_some_and(|e| e <= at) {
            return;
        }
        self.earliest.set(Some(at));
        if self.sweep_at.get().is_none_or(|s| at < s) {
            if let Some(w) = self.waker.borrow_mut().take() {
                self.kicked.set(true);
                w.wake();
            }
        }
    }

    /// Ends the reads of `ctx` whose deadline has passed, for as long as the shard runs.
    pub async fn expire(&self, ctx: &ShardContext) {
        let mut last = Instant::now();
        loop {
            let target = self.earliest.get().map(|e| e.max(last + DEADLINE_TICK));
            self.sweep_at.set(target);
            self.sleep_until(target).await;
            self.sweep_at.set(None);
            let now = Instant::now();
            last = now;
            if self.earliest.get().is_none_or(|e| e > now) {
                continue;
            }
            self.earliest.set(ctx.expire_reads(now));
        }
    }

    /// Sleeps until `until` (`None`: no limit), or until `note` wakes it.
    async fn sleep_until(&self, until: Option<Instant>) {
        let kicked = poll_fn(|cx| {
            if self.kicked.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        });
        match until {
            Some(at) => {
                let timer = glommio::timer::sleep(at.saturating_duration_since(Instant::now()));
                futures_lite::future::or(timer, kicked).await
            }
            None => kicked.await,
        }
        self.waker.borrow_mut().take();
    }
}
