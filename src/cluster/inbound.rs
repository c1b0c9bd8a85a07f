//! A batch from another node, handed to this node's shards (sans IO, apart from the
//! shards' inboxes): each record goes to every shard holding its recipient, and the
//! receipt says truthfully what became of it.

use std::time::Instant;

use super::presence::Presence;
use super::unix_nanos_to_instant;
use super::wire::{Receipt, Record, RecordKind};
use crate::route::inbox::Mesh;
use crate::route::{shards_in, ShardMask, ShardMsg};

/// Hands `records` (of batch `seq`) to the shards holding their recipients. Returns the
/// receipt and the shards handed to (to ring). `accepting` is false while the node shuts
/// down: its connections are closing, so every record is refused rather than queued
/// where no one will read it.
pub fn hand_over(
    seq: u64,
    records: Vec<Record>,
    presence: &Presence,
    mesh: &Mesh,
    accepting: bool,
    (now, now_ns): (Instant, u64),
) -> (Receipt, ShardMask) {
    let mut receipt = Receipt {
        seq,
        ..Default::default()
    };
    let mut rung: ShardMask = 0;
    for (index, record) in records.into_iter().enumerate() {
        let index = index as u32;
        if !accepting {
            receipt.refused.push(index);
            continue;
        }
        let Ok(name) = std::str::from_utf8(&record.name) else {
            receipt.absent.push(index);
            continue;
        };
        let target = match record.kind {
            RecordKind::Direct => presence.local_user_shards(name),
            RecordKind::Room => presence.local_room_shards(name),
        };
        let Some((name, mask)) = target else {
            receipt.absent.push(index);
            continue;
        };
        let ingress = unix_nanos_to_instant(record.ingress_ns, now, now_ns);
        let mut handed = false;
        for shard in shards_in(mask) {
            // A full inbox refuses; the recipient is there all the same (not `absent`).
            if mesh.is_full(shard) {
                continue;
            }
            let frame = record.frame.clone();
            let msg = match record.kind {
                RecordKind::Direct => ShardMsg::Direct {
                    to: name.clone(),
                    frame,
                    ingress,
                    cross_node: true,
                },
                RecordKind::Room => ShardMsg::Room {
                    room: name.clone(),
                    frame,
                    ingress,
                    except: (usize::MAX, 0),
                    cross_node: true,
                },
            };
            mesh.push(shard, msg);
            rung |= 1 << shard;
            handed = true;
        }
        if !handed {
            receipt.refused.push(index);
        }
    }
    (receipt, rung)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;

    fn record(to: &str) -> Record {
        Record {
            kind: RecordKind::Direct,
            ingress_ns: 0,
            name: Bytes::copy_from_slice(to.as_bytes()),
            frame: Bytes::from_static(b"\x81\x02hi"),
        }
    }

    fn presence_with(users: &[(&str, usize)]) -> Presence {
        let mut p = Presence::new(1, Duration::from_secs(5));
        for (user, shard) in users {
            p.local_user(Arc::from(*user), *shard, true);
        }
        p
    }

    #[test]
    fn a_full_inbox_refuses_and_never_says_offline() {
        let presence = presence_with(&[("bob", 0), ("carol", 1)]);
        let (mesh, _inboxes) = Mesh::with_limit(2, 1);
        // Shard 0's inbox is full already.
        mesh.push(
            0,
            ShardMsg::AlsoRemote {
                user: Arc::from("x"),
                remote: true,
            },
        );
        let now = (Instant::now(), 0);
        let (receipt, rung) = hand_over(
            9,
            vec![record("bob"), record("carol"), record("dave")],
            &presence,
            &mesh,
            true,
            now,
        );
        assert_eq!(receipt.seq, 9);
        assert_eq!(receipt.refused, vec![0], "bob is here, on a shard that cannot take it");
        assert_eq!(receipt.absent, vec![2], "dave is not on this node");
        assert_eq!(rung, 0b10, "carol's shard got hers");
    }

    #[test]
    fn a_node_that_shuts_down_refuses_everything() {
        let presence = presence_with(&[("bob", 0)]);
        let (mesh, _inboxes) = Mesh::new(1);
        let (receipt, rung) = hand_over(
            1,
            vec![record("bob"), record("dave")],
            &presence,
            &mesh,
            false,
            (Instant::now(), 0),
        );
        assert_eq!((receipt.refused, receipt.absent, rung), (vec![0, 1], vec![], 0));
    }
}
