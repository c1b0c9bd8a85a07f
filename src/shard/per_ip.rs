//! Limits per client IP address, shared by every shard (a client's connections land on
//! any of them): how many connections it holds, and how many it opens per second.
//!
//! Counters live in fixed tables indexed by a keyed hash of the address, so admission
//! takes a few atomic operations and no lock, and memory does not grow with the number
//! of addresses. Addresses that share a slot share its limits; the key is random per
//! process, so a client cannot choose to collide with another.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Slots per table: 65,536 (768 KiB for both tables); at 100,000 client addresses a
/// slot holds 1.5 of them on average.
const SLOTS: usize = 1 << 16;

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyHandshakes,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too many connections from this address",
            Refusal::TooManyHandshakes => "too many new connections from this address this second",
        }
    }
}

pub struct PerIpLimits {
    max_connections: u32,
    handshakes_per_sec: u32,
    key: RandomState,
    start: Instant,
    open: Box<[AtomicU32]>,
    /// Per slot: the second (since `start`) in the high half, handshakes in it in the low.
    handshakes: Box<[AtomicU64]>,
}

/// A connection's place in its address's count (a slot of the table, plus one), to
/// `release` when it closes. Four bytes, even as an `Option`, in the connection's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpTicket(NonZeroU32);

impl PerIpLimits {
    /// Limits of 0 are off.
    pub fn new(max_connections: u32, handshakes_per_sec: u32) -> Arc<Self> {
        let table = |on: bool| if on { SLOTS } else { 0 };
        Arc::new(PerIpLimits {
            max_connections,
            handshakes_per_sec,
            key: RandomState::new(),
            start: Instant::now(),
            open: (0..table(max_connections > 0)).map(|_| AtomicU32::new(0)).collect(),
            handshakes: (0..table(handshakes_per_sec > 0)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Admits a new connection from `ip`, or says why not. `Ok(None)`: no connection
    /// limit to hold a place in.
    pub fn admit(&self, ip: IpAddr) -> Result<Option<IpTicket>, Refusal> {
        self.admit_at(ip, self.start.elapsed().as_secs())
    }

    /// `admit`, `second` seconds after the limits were made.
    fn admit_at(&self, ip: IpAddr, second: u64) -> Result<Option<IpTicket>, Refusal> {
        let slot = self.key.hash_one(ip.to_canonical()) as usize & (SLOTS - 1);
        if self.handshakes_per_sec > 0 && !self.take_handshake(slot, second) {
            return Err(Refusal::TooManyHandshakes);
        }
        if self.max_connections == 0 {
            return Ok(None);
        }
        let before = self.open[slot].fetch_add(1, Ordering::Relaxed);
        if before >= self.max_connections {
            self.open[slot].fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::TooManyConnections);
        }
        Ok(NonZeroU32::new(slot as u32 + 1).map(IpTicket))
    }

    /// A connection admitted with `ticket` closed.
    pub fn release(&self, ticket: IpTicket) {
        self.open[ticket.0.get() as usize - 1].fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a handshake in the slot's current second; false past the rate.
    fn take_handshake(&self, slot: usize, second: u64) -> bool {
        let now = second & u32::MAX as u64;
        let cell = &self.handshakes[slot];
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let count = if current >> 32 == now {
                current & u32::MAX as u64
            } else {
                0
            };
            if count >= self.handshakes_per_sec as u64 {
                return false;
            }
            match cell.compare_exchange_weak(current, now << 32 | (count + 1), Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let limits = PerIpLimits::new(2, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.admit(a).unwrap().unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(Refusal::TooManyConnections));
        // The same address over IPv6 (mapped) is the same client.
        assert_eq!(
            limits.admit("::ffff:10.0.0.1".parse().unwrap()).err(),
            Some(Refusal::TooManyConnections)
        );
        assert!(limits.admit(b).is_ok(), "another address has its own count");
        limits.release(first);
        assert!(limits.admit(a).is_ok(), "a closed connection gives its place back");
    }

    #[test]
    fn handshakes_per_address_are_limited_per_second() {
        let limits = PerIpLimits::new(0, 3);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            assert!(matches!(limits.admit_at(a, 5), Ok(None)));
        }
        assert_eq!(limits.admit_at(a, 5).err(), Some(Refusal::TooManyHandshakes));
        assert!(limits.admit_at("192.0.2.8".parse().unwrap(), 5).is_ok());
        // The next second starts a new count.
        assert!(limits.admit_at(a, 6).is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        let limits = PerIpLimits::new(0, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..10_000).all(|_| limits.admit(a).is_ok()));
    }
}
