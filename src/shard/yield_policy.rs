//! Whether a shard yields its CPU before it sleeps (see `ShardContext::park`).
//!
//! A yield pays when the CPU is shared with a thread that is about to give the shard work
//! and then block (a client on the same host): the shard comes back without a sleep and
//! a wake-up. It costs dearly beside a thread that does not block (a CPU-bound neighbour):
//! that one keeps the CPU for its whole time slice, milliseconds, while the shard's input
//! waits, since a runnable thread is not woken by it. Such a yield is seen by its length,
//! and yields then stop for a while, longer each time, until long yields have not been
//! seen for a while. (Beside a CPU-bound thread not every yield is long: the scheduler
//! often hands the CPU straight back; so short yields do not end the pauses.)

use std::time::{Duration, Instant};

/// A yield longer than this handed the CPU to a thread that did not soon block.
const LONG_YIELD: Duration = Duration::from_micros(200);
/// How long yields stop after the first long one; each further long one doubles it.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// After this long without a long yield, pauses start again from `FIRST_PAUSE`.
const CALM: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct YieldPolicy {
    /// No yield before this.
    paused_until: Option<Instant>,
    /// The pause that the next long yield sets.
    next_pause: Duration,
    /// When the last long yield ended.
    last_long: Option<Instant>,
}

impl Default for YieldPolicy {
    fn default() -> Self {
        YieldPolicy {
            paused_until: None,
            next_pause: FIRST_PAUSE,
            last_long: None,
        }
    }
}

impl YieldPolicy {
    /// Whether a shard about to sleep at `now` should yield first.
    pub fn may_yield(&self, now: Instant) -> bool {
        self.paused_until.is_none_or(|until| now >= until)
    }

    /// Notes a yield that left the CPU at `start` and got it back at `end`.
    pub fn yielded(&mut self, start: Instant, end: Instant) {
        if end.saturating_duration_since(start) <= LONG_YIELD {
            return;
        }
        if self
            .last_long
            .is_some_and(|last| end.saturating_duration_since(last) > CALM)
        {
            self.next_pause = FIRST_PAUSE;
        }
        self.last_long = Some(end);
        self.paused_until = Some(end + self.next_pause);
        self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_micros(5);
    const LONG: Duration = Duration::from_millis(4);

    #[test]
    fn short_yields_keep_yielding() {
        let mut policy = YieldPolicy::default();
        let t = Instant::now();
        assert!(policy.may_yield(t));
        policy.yielded(t, t + SHORT);
        assert!(policy.may_yield(t + SHORT));
    }

    #[test]
    fn a_long_yield_pauses_yields_and_repeated_ones_pause_longer_up_to_a_limit() {
        let mut policy = YieldPolicy::default();
        let mut t = Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..14 {
            policy.yielded(t, t + LONG);
            t += LONG;
            let mut pause = Duration::ZERO;
            while !policy.may_yield(t + pause) {
                pause += Duration::from_micros(500);
            }
            pauses.push(pause);
            t += pause;
        }
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(pauses[2], FIRST_PAUSE * 4);
        assert_eq!(*pauses.last().unwrap(), MAX_PAUSE);
    }

    #[test]
    fn short_yields_between_long_ones_do_not_end_the_pauses() {
        let mut policy = YieldPolicy::default();
        let t = Instant::now();
        policy.yielded(t, t + LONG);
        let after = t + LONG + FIRST_PAUSE;
        assert!(policy.may_yield(after));
        policy.yielded(after, after + SHORT);
        policy.yielded(after + SHORT, after + SHORT + LONG);
        let back = after + SHORT + LONG;
        assert!(!policy.may_yield(back + FIRST_PAUSE * 2 - Duration::from_micros(1)));
        assert!(policy.may_yield(back + FIRST_PAUSE * 2));
    }

    #[test]
    fn after_a_calm_spell_pauses_start_short_again() {
        let mut policy = YieldPolicy::default();
        let mut t = Instant::now();
        for _ in 0..5 {
            policy.yielded(t, t + LONG);
            t += Duration::from_secs(2);
        }
        t += CALM;
        policy.yielded(t, t + LONG);
        assert!(!policy.may_yield(t + LONG + FIRST_PAUSE - Duration::from_micros(1)));
        assert!(policy.may_yield(t + LONG + FIRST_PAUSE));
    }
}
