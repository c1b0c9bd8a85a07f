//! The shard's memory budget for what clients make it hold: messages being assembled
//! (fragments, or frames spread over reads) and frames queued for slow sockets.
//!
//! Each connection is bounded on its own (`--max-chat-message`, `--max-outbound-bytes`),
//! but thousands of connections each holding a part-sent message add up. Past the budget
//! a connection that asks for more assembly memory is closed with 1009 (its message is
//! too big for the server now) instead of the process growing.

use std::cell::Cell;

#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    assembling: Cell<usize>,
    queued: Cell<usize>,
    /// Messages refused for the budget since the last report.
    refused: Cell<u64>,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit,
            assembling: Cell::new(0),
            queued: Cell::new(0),
            refused: Cell::new(0),
        }
    }

    /// Bytes held now: assembly buffers' capacity plus queued frames (a room frame shared
    /// by many queues counts once per queue: an upper bound).
    pub fn held(&self) -> usize {
        self.assembling.get() + self.queued.get()
    }

    /// A connection's assembly buffers went from `before` to `after` bytes. False when
    /// they grew while the shard is over its budget: the message must be refused.
    pub fn assembly_changed(&self, before: usize, after: usize) -> bool {
        self.assembling
            .set((self.assembling.get() + after).saturating_sub(before));
        after <= before || self.held() <= self.limit
    }

    pub fn queued(&self, added: usize) {
        self.queued.set(self.queued.get() + added);
    }

    pub fn dequeued(&self, removed: usize) {
        self.queued.set(self.queued.get().saturating_sub(removed));
    }

    pub fn refuse(&self) {
        self.refused.set(self.refused.get() + 1);
    }

    /// Refusals since the last call (for the report line).
    pub fn take_refused(&self) -> u64 {
        self.refused.replace(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_budget_is_refused_and_shrinking_never_is() {
        let b = MemoryBudget::new(1000);
        assert!(b.assembly_changed(0, 600));
        b.queued(300);
        assert_eq!(b.held(), 900);
        // Another connection grows past the limit: refused (its buffer is counted until
        // the connection releases it).
        assert!(!b.assembly_changed(0, 200));
        assert_eq!(b.held(), 1100);
        // Whatever shrinks is fine, and makes room again.
        assert!(b.assembly_changed(200, 0));
        assert!(b.assembly_changed(600, 0));
        b.dequeued(300);
        assert_eq!(b.held(), 0);
        assert!(b.assembly_changed(0, 1000));
    }
}
