//! The replicated directory's bytes: numbered deltas of a node's users and rooms on the
//! presence subject (next to the gateway's heartbeats), and snapshots of its whole state.

use bytes::{Buf, BufMut, Bytes};
use shardgate::cluster::wire::{self, NodeId, PresenceMsg as Gateway, WireError, PRESENCE_DELTA_TAG};

/// A change in what a node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    UserUp(String),
    UserDown(String),
    RoomUp(String),
    RoomDown(String),
}

impl Op {
    fn code(&self) -> (u8, &str) {
        match self {
            Op::UserUp(n) => (1, n),
            Op::UserDown(n) => (2, n),
            Op::RoomUp(n) => (3, n),
            Op::RoomDown(n) => (4, n),
        }
    }
}

/// A message on the presence subject, as the replicated directory uses it: the gateway's
/// heartbeats, hellos and byes, and its own numbered deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceMsg {
    /// Changes numbered `seq` (each node numbers its own from 1).
    Delta { node: NodeId, seq: u64, ops: Vec<Op> },
    /// "I am alive; my last change is `seq`; I hold `users` users."
    Heartbeat { node: NodeId, seq: u64, users: u32 },
    /// A node (re)joined: everyone sends it a snapshot.
    Hello { node: NodeId },
    /// A node is leaving: forget it now.
    Bye { node: NodeId },
}

pub fn write_presence(msg: &PresenceMsg) -> Bytes {
    let gateway = match msg {
        PresenceMsg::Delta { node, seq, ops } => {
            let mut buf = Vec::new();
            buf.put_u8(PRESENCE_DELTA_TAG);
            buf.put_u64_le(*node);
            buf.put_u64_le(*seq);
            for op in ops {
                put_op(&mut buf, op);
            }
            return Bytes::from(buf);
        }
        PresenceMsg::Heartbeat { node, seq, users } => Gateway::Heartbeat {
            node: *node,
            seq: *seq,
            users: *users,
        },
        PresenceMsg::Hello { node } => Gateway::Hello { node: *node },
        PresenceMsg::Bye { node } => Gateway::Bye { node: *node },
    };
    wire::write_presence(&gateway)
}

pub fn read_presence(mut msg: Bytes) -> Result<PresenceMsg, WireError> {
    if msg.first() != Some(&PRESENCE_DELTA_TAG) {
        return Ok(match wire::read_presence(msg)? {
            Gateway::Heartbeat { node, seq, users } => PresenceMsg::Heartbeat { node, seq, users },
            Gateway::Hello { node } => PresenceMsg::Hello { node },
            Gateway::Bye { node } => PresenceMsg::Bye { node },
        });
    }
    if msg.len() < 17 {
        return Err(WireError("presence delta too short"));
    }
    msg.advance(1);
    let node = msg.get_u64_le();
    let seq = msg.get_u64_le();
    Ok(PresenceMsg::Delta {
        node,
        seq,
        ops: read_ops(msg)?,
    })
}

/// One chunk of a node's snapshot: the users and rooms it held at change `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    pub node: NodeId,
    pub seq: u64,
    pub index: u32,
    pub total: u32,
    pub ops: Vec<Op>,
}

/// Snapshot chunks stay well under NATS's default 1 MiB payload limit.
pub const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;

/// Splits a whole state (`UserUp`/`RoomUp` ops) into chunks. Always at least one chunk,
/// so an empty node is heard from too.
pub fn write_snapshot<'a>(node: NodeId, seq: u64, ops: impl Iterator<Item = Op> + 'a) -> Vec<Bytes> {
    let mut bodies: Vec<Vec<u8>> = vec![Vec::new()];
    for op in ops {
        let last = bodies.last_mut().expect("at least one chunk");
        if last.len() > SNAPSHOT_CHUNK_BYTES {
            bodies.push(Vec::new());
        }
        put_op(bodies.last_mut().expect("at least one chunk"), &op);
    }
    let total = bodies.len() as u32;
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut buf = Vec::with_capacity(24 + body.len());
            buf.put_u64_le(node);
            buf.put_u64_le(seq);
            buf.put_u32_le(i as u32);
            buf.put_u32_le(total);
            buf.extend_from_slice(&body);
            Bytes::from(buf)
        })
        .collect()
}

pub fn read_snapshot(mut chunk: Bytes) -> Result<SnapshotChunk, WireError> {
    if chunk.len() < 24 {
        return Err(WireError("snapshot chunk shorter than its header"));
    }
    let node = chunk.get_u64_le();
    let seq = chunk.get_u64_le();
    let index = chunk.get_u32_le();
    let total = chunk.get_u32_le();
    if index >= total {
        return Err(WireError("snapshot chunk index out of range"));
    }
    Ok(SnapshotChunk {
        node,
        seq,
        index,
        total,
        ops: read_ops(chunk)?,
    })
}

fn put_op(buf: &mut Vec<u8>, op: &Op) {
    let (code, name) = op.code();
    buf.put_u8(code);
    buf.put_u8(name.len() as u8);
    buf.put_slice(name.as_bytes());
}

fn read_ops(mut buf: Bytes) -> Result<Vec<Op>, WireError> {
    let mut ops = Vec::new();
    while buf.has_remaining() {
        if buf.len() < 2 {
            return Err(WireError("truncated op"));
        }
        let code = buf.get_u8();
        let len = buf.get_u8() as usize;
        if buf.len() < len {
            return Err(WireError("truncated op name"));
        }
        let name = std::str::from_utf8(&buf[..len])
            .map_err(|_| WireError("op name is not UTF-8"))?
            .to_string();
        buf.advance(len);
        ops.push(match code {
            1 => Op::UserUp(name),
            2 => Op::UserDown(name),
            3 => Op::RoomUp(name),
            4 => Op::RoomDown(name),
            _ => return Err(WireError("unknown op")),
        });
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deltas are this module's own; the rest go through the gateway's (tested there).
    #[test]
    fn deltas_round_trip_next_to_the_gateways_messages() {
        for msg in [
            PresenceMsg::Delta {
                node: 1,
                seq: 2,
                ops: vec![
                    Op::UserUp("a".into()),
                    Op::UserDown("b".into()),
                    Op::RoomUp("r".into()),
                    Op::RoomDown("s".into()),
                ],
            },
            PresenceMsg::Bye { node: 5 },
        ] {
            assert_eq!(read_presence(write_presence(&msg)).unwrap(), msg);
        }
    }

    #[test]
    fn snapshots_split_into_chunks_that_reassemble() {
        let users: Vec<Op> = (0..30_000).map(|i| Op::UserUp(format!("user-{i:08}"))).collect();
        let chunks = write_snapshot(9, 77, users.clone().into_iter());
        assert!(chunks.len() > 1, "30k users need more than one chunk");
        assert!(chunks.iter().all(|c| c.len() < 512 * 1024));
        let mut all = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let chunk = read_snapshot(c.clone()).unwrap();
            assert_eq!(
                (chunk.node, chunk.seq, chunk.index, chunk.total),
                (9, 77, i as u32, chunks.len() as u32)
            );
            all.extend(chunk.ops);
        }
        assert_eq!(all, users);
        let empty = write_snapshot(9, 0, std::iter::empty());
        assert_eq!(empty.len(), 1);
        assert_eq!(read_snapshot(empty[0].clone()).unwrap().ops, vec![]);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let b = Bytes::from(data);
            let _ = read_presence(b.clone());
            let _ = read_snapshot(b);
        }
    }
}
