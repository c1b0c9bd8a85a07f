//! What a shard counts, in its own memory: plain cells bumped on the shard's thread (no
//! atomics, no locks), copied to the board once a second (`board`), where a scrape or
//! the dashboard reads them.

use std::cell::Cell;
use std::ops::AddAssign;

/// HTTP statuses answered, each counted apart; the last slot counts any other.
pub const HTTP_STATUSES: [u16; 13] = [101, 200, 400, 401, 403, 404, 405, 408, 426, 429, 431, 503, 0];
/// Close codes, each counted apart; the last slot counts any other.
pub const CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 0];
/// How a chat message was routed: to a user, to a room, to another shard of this node,
/// to (or from) another node.
pub const ROUTES: [&str; 4] = ["direct", "room", "cross_shard", "cross_node"];
/// Acks the shards write, by status (`stored` acks are the store thread's: its appends).
pub const ACKS: [&str; 2] = ["routed", "offline"];
/// The `code`s of error frames, as the chat protocol names them (`chat::protocol`
/// checks that every code it has is here).
pub const ERROR_CODES: [&str; 10] = [
    "bad_json",
    "unknown_type",
    "bad_field",
    "not_member",
    "forbidden",
    "rate_limited",
    "too_many_rooms",
    "room_full",
    "unavailable",
    "not_found",
];

/// TLS handshakes completed, by kind.
pub const TLS_HANDSHAKES: [&str; 2] = ["full", "resumed"];
/// TLS connections refused before any HTTP: a plaintext client on a TLS port, or a
/// handshake (or record) rustls rejected.
pub const TLS_REFUSALS: [&str; 2] = ["plaintext", "protocol"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct = 0,
    Room = 1,
    CrossShard = 2,
    CrossNode = 3,
}

/// A shard's counters, as cells (`ShardCounters`, bumped in place) or as values (`Counts`,
/// a copy). Every one only grows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CountsOf<T> {
    /// Answers to HTTP requests, by status (`HTTP_STATUSES`): 101 is an accepted upgrade.
    pub http: [T; HTTP_STATUSES.len()],
    /// Close frames we sent, by code (`CLOSE_CODES`).
    pub closes_sent: [T; CLOSE_CODES.len()],
    /// Close frames peers sent, by code (`CLOSE_CODES`; one without a code counts as 1005,
    /// in the last slot).
    pub closes_received: [T; CLOSE_CODES.len()],
    /// Frames decoded (a fragmented message counts once, with its control frames apart).
    pub frames_in: T,
    pub bytes_in: T,
    /// Frames queued to be sent, and their bytes.
    pub frames_out: T,
    pub bytes_out: T,
    /// Chat messages routed, by `Route`.
    pub routed: [T; ROUTES.len()],
    /// Acks sent, by status (`ACKS`).
    pub acks: [T; ACKS.len()],
    /// Error frames sent, by code (`ERROR_CODES`).
    pub errors: [T; ERROR_CODES.len()],
    /// Messages compressed (permessage-deflate), their bytes before and after.
    pub deflated: T,
    pub deflated_bytes_in: T,
    pub deflated_bytes_out: T,
    /// TLS handshakes, by kind (`TLS_HANDSHAKES`), and refusals (`TLS_REFUSALS`).
    pub tls_handshakes: [T; TLS_HANDSHAKES.len()],
    pub tls_refused: [T; TLS_REFUSALS.len()],
}

pub type ShardCounters = CountsOf<Cell<u64>>;
pub type Counts = CountsOf<u64>;

fn slot<V: PartialEq>(table: &[V], value: &V) -> usize {
    table.iter().position(|v| v == value).unwrap_or(table.len() - 1)
}

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get() + by);
}

impl ShardCounters {
    pub fn http(&self, status: u16) {
        bump(&self.http[slot(&HTTP_STATUSES, &status)], 1);
    }

    pub fn close_sent(&self, code: u16) {
        bump(&self.closes_sent[slot(&CLOSE_CODES, &code)], 1);
    }

    pub fn close_received(&self, code: Option<u16>) {
        bump(&self.closes_received[slot(&CLOSE_CODES, &code.unwrap_or(1005))], 1);
    }

    #[inline]
    pub fn frame_in(&self) {
        bump(&self.frames_in, 1);
    }

    #[inline]
    pub fn read(&self, bytes: usize) {
        bump(&self.bytes_in, bytes as u64);
    }

    #[inline]
    pub fn queued(&self, frames: u64, bytes: usize) {
        bump(&self.frames_out, frames);
        bump(&self.bytes_out, bytes as u64);
    }

    #[inline]
    pub fn routed(&self, route: Route, messages: u64) {
        bump(&self.routed[route as usize], messages);
    }

    pub fn ack(&self, status: &str) {
        bump(&self.acks[slot(&ACKS, &status)], 1);
    }

    pub fn error(&self, code: &str) {
        bump(&self.errors[slot(&ERROR_CODES, &code)], 1);
    }

    pub fn deflated(&self, messages: u64, bytes_in: u64, bytes_out: u64) {
        bump(&self.deflated, messages);
        bump(&self.deflated_bytes_in, bytes_in);
        bump(&self.deflated_bytes_out, bytes_out);
    }

    pub fn tls(&self, full: u64, resumed: u64, plaintext: u64, protocol: u64) {
        bump(&self.tls_handshakes[0], full);
        bump(&self.tls_handshakes[1], resumed);
        bump(&self.tls_refused[0], plaintext);
        bump(&self.tls_refused[1], protocol);
    }

    /// The values now.
    pub fn snapshot(&self) -> Counts {
        let get = |cells: &[Cell<u64>], into: &mut [u64]| {
            for (v, c) in into.iter_mut().zip(cells) {
                *v = c.get();
            }
        };
        let mut c = Counts::default();
        get(&self.http, &mut c.http);
        get(&self.closes_sent, &mut c.closes_sent);
        get(&self.closes_received, &mut c.closes_received);
        get(&self.routed, &mut c.routed);
        get(&self.acks, &mut c.acks);
        get(&self.errors, &mut c.errors);
        get(&self.tls_handshakes, &mut c.tls_handshakes);
        get(&self.tls_refused, &mut c.tls_refused);
        c.frames_in = self.frames_in.get();
        c.bytes_in = self.bytes_in.get();
        c.frames_out = self.frames_out.get();
        c.bytes_out = self.bytes_out.get();
        c.deflated = self.deflated.get();
        c.deflated_bytes_in = self.deflated_bytes_in.get();
        c.deflated_bytes_out = self.deflated_bytes_out.get();
        c
    }
}

impl AddAssign<&Counts> for Counts {
    fn add_assign(&mut self, o: &Counts) {
        let add = |into: &mut [u64], from: &[u64]| {
            for (a, b) in into.iter_mut().zip(from) {
                *a += b;
            }
        };
        add(&mut self.http, &o.http);
        add(&mut self.closes_sent, &o.closes_sent);
        add(&mut self.closes_received, &o.closes_received);
        add(&mut self.routed, &o.routed);
        add(&mut self.acks, &o.acks);
        add(&mut self.errors, &o.errors);
        add(&mut self.tls_handshakes, &o.tls_handshakes);
        add(&mut self.tls_refused, &o.tls_refused);
        self.frames_in += o.frames_in;
        self.bytes_in += o.bytes_in;
        self.frames_out += o.frames_out;
        self.bytes_out += o.bytes_out;
        self.deflated += o.deflated;
        self.deflated_bytes_in += o.deflated_bytes_in;
        self.deflated_bytes_out += o.deflated_bytes_out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_values_count_in_the_last_slot_and_snapshots_add_up() {
        let c = ShardCounters::default();
        c.http(101);
        c.http(101);
        c.http(418);
        c.close_sent(1009);
        c.close_received(None);
        c.close_received(Some(4000));
        c.routed(Route::CrossShard, 3);
        c.ack("offline");
        c.error("rate_limited");
        c.queued(2, 100);
        let s = c.snapshot();
        assert_eq!(s.http[0], 2);
        assert_eq!(s.http[HTTP_STATUSES.len() - 1], 1);
        assert_eq!(s.closes_sent[6], 1);
        assert_eq!(s.closes_received[CLOSE_CODES.len() - 1], 2);
        assert_eq!(s.routed, [0, 0, 3, 0]);
        assert_eq!(s.acks, [0, 1]);
        assert_eq!(s.errors[5], 1);
        assert_eq!((s.frames_out, s.bytes_out), (2, 100));
        let mut sum = s.clone();
        sum += &s;
        assert_eq!(sum.http[0], 4);
        assert_eq!(sum.bytes_out, 200);
    }
}
