//! What nodes send each other through NATS, as bytes (sans IO). Little-endian, length-
//! prefixed, versionless: every node of a cluster runs the same build of the format.
//!
//! - A *batch* (to `<prefix>.node.<id>.inbox`): every delivery one node has for another,
//!   each frame already encoded as the WebSocket frame the recipients get.
//! - A *presence* message (to `<prefix>.presence`): a node's changes, heartbeat, hello, bye.
//! - A *snapshot chunk* (to `<prefix>.node.<id>.snapshot`): part of a node's whole state.
//! - *Receipts* (to `<prefix>.node.<sender>.receipts`): which batches arrived, and which
//!   of their records found no recipient.
//!
//! Every message ends in a *seal* (`ClusterKey`): the time it was sealed and an
//! HMAC-SHA256 tag of its subject, body and that time under the cluster key, so that
//! what a client of the same NATS without the key publishes is recognised and dropped.

use crate::ws::frame::{header_len, parse_header, OpCode};
use bytes::{Buf, BufMut, Bytes};

/// A node of the cluster, random per process (a restarted node is a new node).
pub type NodeId = u64;

/// One delivery in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    /// Wall-clock time the message entered its first gateway, in Unix nanoseconds.
    pub ingress_ns: u64,
    /// The recipient user or room; for a stored message, its conversation id.
    pub name: Bytes,
    /// Where a stored message is in its conversation (`Stored` records only).
    pub stored: Option<StoredAt>,
    /// The encoded WebSocket frame (a slice of the batch: no copy).
    pub frame: Bytes,
}

/// A stored message's `seq`, and how long after the message before it the store stored it
/// (`None`: not shortly before; carried in microseconds, up to about an hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredAt {
    pub seq: u64,
    pub after_previous: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Direct = 1,
    Room = 2,
    /// A stored message, for the connections of its conversation's audience (the two users
    /// of a direct conversation, or a room's members). Carries its `seq`: the receiving
    /// node puts its conversation back in order.
    Stored = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub &'static str);

/// The key every node of a cluster shares (`--cluster-key-file`).
pub struct ClusterKey(ring::hmac::Key);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// The seal's length: the time it was sealed (Unix nanoseconds) and the tag.
pub const SEAL_LEN: usize = 8 + 32;
/// A sealed message older (or newer: clocks differ) than this is refused, so that a
/// recorded message cannot be replayed later. Batches are also refused unless their
/// sequence number is new (`node`).
pub const MAX_SEAL_AGE_NS: u64 = 30_000_000_000;

impl ClusterKey {
    pub fn new(secret: &[u8]) -> Self {
        ClusterKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    fn tag(&self, subject: &str, body: &[u8], sealed_ns: u64) -> ring::hmac::Tag {
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        // The subject is covered, so a message cannot be replayed to another subject.
        ctx.update(&(subject.len() as u32).to_le_bytes());
        ctx.update(subject.as_bytes());
        ctx.update(body);
        ctx.update(&sealed_ns.to_le_bytes());
        ctx.sign()
    }

    /// Appends the seal to `body` (published to `subject`).
    pub fn seal(&self, subject: &str, mut body: Vec<u8>, now_ns: u64) -> Bytes {
        let tag = self.tag(subject, &body, now_ns);
        body.reserve(SEAL_LEN);
        body.put_u64_le(now_ns);
        body.put_slice(tag.as_ref());
        Bytes::from(body)
    }

    /// The body of a message received on `subject`, if its seal is this key's and recent.
    pub fn open(&self, subject: &str, mut msg: Bytes, now_ns: u64) -> Result<Bytes, WireError> {
        if msg.len() < SEAL_LEN {
            return Err(WireError("message without a seal"));
        }
        let seal = msg.split_off(msg.len() - SEAL_LEN);
        let sealed_ns = u64::from_le_bytes(seal[..8].try_into().map_err(|_| WireError("seal"))?);
        let expected = self.tag(subject, &msg, sealed_ns);
        // Compared in constant time: how much of a forged tag matched must not show.
        let diff = expected
            .as_ref()
            .iter()
            .zip(&seal[8..])
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(WireError("bad seal (not signed with this cluster's key)"));
        }
        if now_ns.abs_diff(sealed_ns) > MAX_SEAL_AGE_NS {
            return Err(WireError("stale seal (replayed, or the clocks differ by over 30 s)"));
        }
        Ok(msg)
    }
}

const BATCH_HEADER: usize = 16;
const RECORD_HEADER: usize = 1 + 8 + 1 + 4;
/// A stored record's seq and microseconds after the one before.
const STORED_AT: usize = 8 + 4;

/// Encodes a batch: records are appended until it is sent.
pub struct BatchWriter {
    pub buf: Vec<u8>,
    pub records: u32,
}

impl BatchWriter {
    pub fn new(sender: NodeId, seq: u64) -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.put_u64_le(sender);
        buf.put_u64_le(seq);
        BatchWriter { buf, records: 0 }
    }

    /// The size the batch would have with one more record of these sizes (a stored one
    /// has 12 bytes more, where it is stored).
    pub fn len_with(&self, name: usize, frame: usize) -> usize {
        self.buf.len() + RECORD_HEADER + STORED_AT + name + frame
    }

    /// Appends a record; returns its index in the batch. Names are at most 255 bytes
    /// (user ids and rooms are at most 64, conversation ids at most 134); `stored` goes
    /// with, and only with, a `Stored` record.
    pub fn push(
        &mut self,
        kind: RecordKind,
        ingress_ns: u64,
        name: &str,
        stored: Option<StoredAt>,
        frame: &[u8],
    ) -> u32 {
        debug_assert!(name.len() <= u8::MAX as usize);
        debug_assert_eq!(kind == RecordKind::Stored, stored.is_some());
        self.buf.put_u8(kind as u8);
        self.buf.put_u64_le(ingress_ns);
        self.buf.put_u8(name.len() as u8);
        self.buf.put_slice(name.as_bytes());
        if let Some(at) = stored {
            self.buf.put_u64_le(at.seq);
            let us = at
                .after_previous
                .map_or(u32::MAX, |d| d.as_micros().min(u32::MAX as u128 - 1) as u32);
            self.buf.put_u32_le(us);
        }
        self.buf.put_u32_le(frame.len() as u32);
        self.buf.put_slice(frame);
        self.records += 1;
        self.records - 1
    }
}

/// Reads a batch: `(sender, seq, records)`. Records share the batch's memory.
pub fn read_batch(mut batch: Bytes) -> Result<(NodeId, u64, Vec<Record>), WireError> {
    if batch.len() < BATCH_HEADER {
        return Err(WireError("batch shorter than its header"));
    }
    let sender = batch.get_u64_le();
    let seq = batch.get_u64_le();
    let mut records = Vec::new();
    while batch.has_remaining() {
        if batch.len() < RECORD_HEADER - 4 {
            return Err(WireError("truncated record header"));
        }
        let kind = match batch.get_u8() {
            1 => RecordKind::Direct,
            2 => RecordKind::Room,
            3 => RecordKind::Stored,
            _ => return Err(WireError("unknown record kind")),
        };
        let ingress_ns = batch.get_u64_le();
        let name_len = batch.get_u8() as usize;
        if batch.len() < name_len + 4 {
            return Err(WireError("truncated record name"));
        }
        let name = batch.split_to(name_len);
        let stored = if kind == RecordKind::Stored {
            if batch.len() < STORED_AT + 4 {
                return Err(WireError("truncated stored record"));
            }
            let seq = batch.get_u64_le();
            let us = batch.get_u32_le();
            let after_previous = (us != u32::MAX).then(|| std::time::Duration::from_micros(us.into()));
            Some(StoredAt { seq, after_previous })
        } else {
            None
        };
        let frame_len = batch.get_u32_le() as usize;
        if batch.len() < frame_len {
            return Err(WireError("truncated record frame"));
        }
        let frame = batch.split_to(frame_len);
        check_frame(&frame)?;
        records.push(Record {
            kind,
            ingress_ns,
            name,
            stored,
            frame,
        });
    }
    Ok((sender, seq, records))
}

/// A record's frame goes to recipients' sockets as it is, so it must be exactly one whole
/// frame a server may send: final, unmasked, no extension bits, text or binary, its length
/// what its header says. (An empty one made a connection's flush spin.)
fn check_frame(frame: &[u8]) -> Result<(), WireError> {
    const BAD: WireError = WireError("record frame is not one whole server text or binary frame");
    if frame.len() < 2 || frame.len() < header_len(frame[1]) {
        return Err(BAD);
    }
    let h = parse_header(frame).ok_or(BAD)?;
    let data = matches!(OpCode::try_from(h.opcode), Ok(OpCode::Text | OpCode::Binary));
    let whole = (h.header_len as u64).checked_add(h.payload_len) == Some(frame.len() as u64);
    if !h.fin || h.rsv != 0 || h.mask.is_some() || !data || !whole {
        return Err(BAD);
    }
    Ok(())
}

/// What became of a batch's records on the receiving node: every record not listed was
/// handed to a shard holding its recipient.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// Records whose recipient has no connection on the node.
    pub absent: Vec<u32>,
    /// Records the node could not take: the recipient's shards were overloaded, or the
    /// node is shutting down. Not delivered, and not a sign the recipient is offline.
    pub refused: Vec<u32>,
}

/// Receipts for batches from one sender, gathered for a few milliseconds.
#[derive(Debug, Default)]
pub struct ReceiptWriter {
    pub buf: Vec<u8>,
}

impl ReceiptWriter {
    pub fn push(&mut self, receipt: &Receipt) {
        self.buf.put_u64_le(receipt.seq);
        for list in [&receipt.absent, &receipt.refused] {
            self.buf.put_u32_le(list.len() as u32);
            for i in list {
                self.buf.put_u32_le(*i);
            }
        }
    }
}

/// Reads receipts.
pub fn read_receipts(mut receipts: Bytes) -> Result<Vec<Receipt>, WireError> {
    let mut out = Vec::new();
    while receipts.has_remaining() {
        if receipts.len() < 8 {
            return Err(WireError("truncated receipt"));
        }
        let seq = receipts.get_u64_le();
        let mut lists = [Vec::new(), Vec::new()];
        for list in lists.iter_mut() {
            if receipts.len() < 4 {
                return Err(WireError("truncated receipt"));
            }
            let n = receipts.get_u32_le() as usize;
            if receipts.len() < n.saturating_mul(4) {
                return Err(WireError("truncated receipt indices"));
            }
            *list = (0..n).map(|_| receipts.get_u32_le()).collect();
        }
        let [absent, refused] = lists;
        out.push(Receipt { seq, absent, refused });
    }
    Ok(out)
}

/// A message on the presence subject: who is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceMsg {
    /// "I am alive" (each second). `seq` and `users` are informative only: what a node
    /// holds travels through the directory (`cluster::directory`).
    Heartbeat { node: NodeId, seq: u64, users: u32 },
    /// A node (re)joined.
    Hello { node: NodeId },
    /// A node is leaving: forget it now.
    Bye { node: NodeId },
}

/// The tag of a presence delta: what nodes of an older version, with the replicated
/// directory, sent. Known, so that it is rejected with a reason that says so.
pub const PRESENCE_DELTA_TAG: u8 = 1;

pub fn write_presence(msg: &PresenceMsg) -> Bytes {
    let mut buf = Vec::new();
    match msg {
        PresenceMsg::Heartbeat { node, seq, users } => {
            buf.put_u8(2);
            buf.put_u64_le(*node);
            buf.put_u64_le(*seq);
            buf.put_u32_le(*users);
        }
        PresenceMsg::Hello { node } => {
            buf.put_u8(3);
            buf.put_u64_le(*node);
        }
        PresenceMsg::Bye { node } => {
            buf.put_u8(4);
            buf.put_u64_le(*node);
        }
    }
    Bytes::from(buf)
}

pub fn read_presence(mut msg: Bytes) -> Result<PresenceMsg, WireError> {
    if msg.len() < 9 {
        return Err(WireError("presence message too short"));
    }
    let kind = msg.get_u8();
    let node = msg.get_u64_le();
    match kind {
        PRESENCE_DELTA_TAG => Err(WireError(
            "a presence delta, from a node of an older version (the nodes of a cluster run one version)",
        )),
        2 if msg.len() < 8 => Err(WireError("heartbeat without seq")),
        2 => {
            let seq = msg.get_u64_le();
            let users = if msg.len() >= 4 { msg.get_u32_le() } else { 0 };
            Ok(PresenceMsg::Heartbeat { node, seq, users })
        }
        3 => Ok(PresenceMsg::Hello { node }),
        4 => Ok(PresenceMsg::Bye { node }),
        _ => Err(WireError("unknown presence message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn batches_round_trip_and_share_memory() {
        let mut w = BatchWriter::new(7, 42);
        assert_eq!(w.push(RecordKind::Direct, 123, "bob", None, b"\x81\x02hi"), 0);
        assert_eq!(w.push(RecordKind::Room, 456, "lobby", None, b"\x82\x00"), 1);
        let at = StoredAt {
            seq: 41,
            after_previous: Some(std::time::Duration::from_micros(1500)),
        };
        assert_eq!(
            w.push(RecordKind::Stored, 789, "dm:alice:bob", Some(at), b"\x81\x01x"),
            2
        );
        let bytes = Bytes::from(w.buf);
        let (sender, seq, records) = read_batch(bytes.clone()).unwrap();
        assert_eq!((sender, seq), (7, 42));
        assert_eq!(records[0].kind, RecordKind::Direct);
        assert_eq!(records[0].ingress_ns, 123);
        assert_eq!(&records[0].name[..], b"bob");
        assert_eq!(&records[0].frame[..], b"\x81\x02hi");
        assert_eq!(records[1].kind, RecordKind::Room);
        assert_eq!(&records[1].name[..], b"lobby");
        assert_eq!(records.len(), 3);
        assert_eq!((records[2].kind, records[2].stored), (RecordKind::Stored, Some(at)));
        assert_eq!(&records[2].name[..], b"dm:alice:bob");
        assert_eq!(&records[2].frame[..], b"\x81\x01x");
        // The frame is a view into the batch, not a copy.
        let start = bytes.as_ptr() as usize;
        let frame = records[0].frame.as_ptr() as usize;
        assert!(frame > start && frame < start + bytes.len());
    }

    #[test]
    fn truncated_batches_are_errors() {
        let mut w = BatchWriter::new(1, 1);
        w.push(RecordKind::Direct, 1, "bob", None, b"\x81\x05frame");
        let bytes = Bytes::from(w.buf);
        for cut in [0, 15, 17, 20, 26, bytes.len() - 1] {
            assert!(read_batch(bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        // A stored record cut inside its seq or its time.
        let mut w = BatchWriter::new(1, 1);
        let at = StoredAt {
            seq: 7,
            after_previous: None,
        };
        w.push(RecordKind::Stored, 1, "room:r", Some(at), b"\x81\x01x");
        let bytes = Bytes::from(w.buf);
        let name_end = BATCH_HEADER + 1 + 8 + 1 + "room:r".len();
        for cut in [name_end + 4, name_end + 10, name_end + STORED_AT + 2] {
            assert!(read_batch(bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        assert_eq!(read_batch(bytes).unwrap().2[0].stored, Some(at));
    }

    #[test]
    fn a_record_must_carry_one_whole_server_frame() {
        let batch = |frame: &[u8]| {
            let mut w = BatchWriter::new(1, 1);
            w.push(RecordKind::Direct, 1, "bob", None, frame);
            read_batch(Bytes::from(w.buf))
        };
        assert!(batch(b"\x81\x02hi").is_ok());
        assert!(batch(b"\x82\x00").is_ok(), "an empty binary message is a frame");
        for bad in [
            &b""[..],                      // no frame at all (made the flush spin)
            b"\x81",                       // half a header
            b"\x81\x02hi!",                // more than the frame
            b"\x81\x03hi",                 // less than the frame
            b"\x01\x02hi",                 // not final
            b"\xc1\x02hi",                 // an extension bit
            b"\x88\x02\x03\xe8",           // a Close
            b"\x81\x82\x01\x02\x03\x04hi", // masked (a client's frame)
            b"\x81\x02hi\x81\x02hi",       // two frames
        ] {
            assert!(batch(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn presence_round_trips_and_an_older_nodes_delta_is_refused_by_name() {
        for msg in [
            PresenceMsg::Heartbeat {
                node: 3,
                seq: 9,
                users: 100,
            },
            PresenceMsg::Hello { node: 4 },
            PresenceMsg::Bye { node: 5 },
        ] {
            assert_eq!(read_presence(write_presence(&msg)).unwrap(), msg);
        }
        let mut delta = vec![PRESENCE_DELTA_TAG];
        delta.extend_from_slice(&1u64.to_le_bytes());
        delta.extend_from_slice(&1u64.to_le_bytes());
        let refused = read_presence(Bytes::from(delta)).unwrap_err();
        assert!(refused.0.contains("older version"), "{}", refused.0);
    }

    #[test]
    fn receipts_round_trip() {
        let receipts = vec![
            Receipt {
                seq: 7,
                absent: vec![0, 5, 9],
                refused: vec![2],
            },
            Receipt {
                seq: 8,
                ..Default::default()
            },
        ];
        let mut w = ReceiptWriter::default();
        for r in &receipts {
            w.push(r);
        }
        let bytes = Bytes::from(w.buf);
        assert_eq!(read_receipts(bytes.clone()).unwrap(), receipts);
        assert!(read_receipts(bytes.slice(..bytes.len() - 1)).is_err());
        assert!(read_receipts(Bytes::from_static(b"abc")).is_err());
    }

    #[test]
    fn only_what_the_cluster_key_sealed_for_this_subject_and_recently_opens() {
        let key = ClusterKey::new(&[7; 32]);
        let now = 1_000_000_000_000_000_000;
        let sealed = key.seal("sg.node.1.inbox", b"batch".to_vec(), now);
        assert_eq!(sealed.len(), 5 + SEAL_LEN);
        assert_eq!(
            &key.open("sg.node.1.inbox", sealed.clone(), now + 1).unwrap()[..],
            b"batch"
        );
        // Another key, another subject, a changed byte, no seal, an old or future seal.
        let other = ClusterKey::new(&[8; 32]);
        assert!(other.open("sg.node.1.inbox", sealed.clone(), now).is_err());
        assert!(key.open("sg.node.2.inbox", sealed.clone(), now).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.to_vec();
            bad[i] ^= 1;
            assert!(key.open("sg.node.1.inbox", Bytes::from(bad), now).is_err(), "byte {i}");
        }
        assert!(key.open("sg.node.1.inbox", Bytes::from_static(b"batch"), now).is_err());
        assert!(key
            .open("sg.node.1.inbox", sealed.clone(), now + MAX_SEAL_AGE_NS + 1)
            .is_err());
        assert!(key.open("sg.node.1.inbox", sealed, now - MAX_SEAL_AGE_NS - 1).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let b = Bytes::from(data);
            let _ = read_batch(b.clone());
            let _ = read_presence(b.clone());
            let _ = read_receipts(b);
        }
    }
}
