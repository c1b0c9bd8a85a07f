//! A batch from another node, handed to this node's shards (sans IO, apart from the
//! shards' and store thread's inboxes): each record goes to every shard holding its
//! recipient (a stored message to the store thread, which puts its conversation in order
//! first), and the receipt says truthfully what became of it. A record for a recipient
//! not here tells the directory, which heals a home that still names this node.

use std::time::Instant;

use super::directory::{DirKey, HomeDirectory, KeyKind};
use super::unix_nanos_to_instant;
use super::wire::{Receipt, Record, RecordKind};
use crate::route::inbox::Mesh;
use crate::route::{shards_in, ShardMask, ShardMsg};
use crate::store::thread::{StoreLink, ToStore};
use crate::store::ConvId;

/// Hands `records` (of batch `seq`) to the shards holding their recipients. Returns the
/// receipt and the shards handed to (to ring). `accepting` is false while the node shuts
/// down: its connections are closing, so every record is refused rather than queued
/// where no one will read it.
pub fn hand_over(
    seq: u64,
    records: Vec<Record>,
    directory: &mut HomeDirectory,
    (mesh, store): (&Mesh, Option<&StoreLink>),
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
        let kind = match record.kind {
            RecordKind::Direct => KeyKind::User,
            RecordKind::Room => KeyKind::Room,
            RecordKind::Stored => {
                let outcome = hand_stored(&record, name, directory, store, (now, now_ns));
                match outcome {
                    Handed::Yes => {}
                    Handed::Absent => receipt.absent.push(index),
                    Handed::Refused => receipt.refused.push(index),
                }
                continue;
            }
        };
        let Some((name, mask)) = directory.local_shards(kind, name) else {
            directory.not_held_here(DirKey {
                kind,
                name: name.into(),
            });
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
                RecordKind::Stored => continue,
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

enum Handed {
    Yes,
    Absent,
    Refused,
}

/// A stored message goes to the store thread (when some of its audience is here): it
/// delivers the conversation's messages in `seq` order, whichever node they came from.
fn hand_stored(
    record: &Record,
    conv: &str,
    directory: &mut HomeDirectory,
    store: Option<&StoreLink>,
    (now, now_ns): (Instant, u64),
) -> Handed {
    // Seqs start at 1: a record saying 0 is not one a node of this cluster sent.
    let (Some(conv), Some(at)) = (ConvId::from_stored(conv), record.stored.filter(|at| at.seq > 0)) else {
        return Handed::Absent;
    };
    let keys = match (conv.direct_users(), conv.room_name()) {
        (Some((a, b)), _) => [Some((KeyKind::User, a)), Some((KeyKind::User, b))],
        (None, Some(room)) => [Some((KeyKind::Room, room)), None],
        (None, None) => [None, None],
    };
    let here = keys
        .iter()
        .flatten()
        .any(|(kind, name)| directory.local_shards(*kind, name).is_some());
    if !here {
        for (kind, name) in keys.into_iter().flatten() {
            directory.not_held_here(DirKey {
                kind,
                name: name.into(),
            });
        }
    }
    // A node without a store cannot order stored messages: to it they are absent (the
    // nodes of one cluster run with the same store).
    let Some(store) = store.filter(|_| here) else {
        return Handed::Absent;
    };
    if store.is_full() {
        return Handed::Refused;
    }
    store.push(ToStore::Remote {
        conv,
        seq: at.seq,
        after_previous: at.after_previous,
        frame: record.frame.clone(),
        ingress: unix_nanos_to_instant(record.ingress_ns, now, now_ns),
    });
    Handed::Yes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::directory::DirMsg;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;

    fn record(to: &str) -> Record {
        Record {
            kind: RecordKind::Direct,
            ingress_ns: 0,
            name: Bytes::copy_from_slice(to.as_bytes()),
            stored: None,
            frame: Bytes::from_static(b"\x81\x02hi"),
        }
    }

    /// Node 1's directory, holding `users`, in a view with node 2.
    fn directory_with(users: &[(&str, usize)]) -> HomeDirectory {
        let now = Instant::now();
        let cache = std::num::NonZeroUsize::new(16).unwrap();
        let mut d = HomeDirectory::new(1, Duration::from_secs(5), cache, now);
        d.heard(2, now);
        d.tick(now + Duration::from_secs(1));
        for (user, shard) in users {
            d.local_key(DirKey::user(*user), *shard, true, now);
        }
        d.take_messages();
        d
    }

    #[test]
    fn a_full_inbox_refuses_and_never_says_offline() {
        let mut directory = directory_with(&[("bob", 0), ("carol", 1)]);
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
            &mut directory,
            (&mesh, None),
            true,
            now,
        );
        assert_eq!(receipt.seq, 9);
        assert_eq!(receipt.refused, vec![0], "bob is here, on a shard that cannot take it");
        assert_eq!(receipt.absent, vec![2], "dave is not on this node");
        assert_eq!(rung, 0b10, "carol's shard got hers");
    }

    #[test]
    fn a_record_for_someone_not_here_tells_the_home_so() {
        // A user homed at node 2, which names this node as holding them.
        let name = (0..)
            .map(|i| format!("dave-{i}"))
            .find(|n| directory_with(&[]).home_of(&DirKey::user(n.as_str())) == 2)
            .unwrap();
        let mut directory = directory_with(&[]);
        let (mesh, _inboxes) = Mesh::new(1);
        let (receipt, _) = hand_over(
            1,
            vec![record(&name)],
            &mut directory,
            (&mesh, None),
            true,
            (Instant::now(), 0),
        );
        assert_eq!(receipt.absent, vec![0]);
        let told = directory.take_messages();
        let release = DirMsg::Hold {
            key: DirKey::user(name.as_str()),
            held: false,
        };
        assert_eq!(told, vec![(2, vec![release])]);
    }

    #[test]
    fn a_node_that_shuts_down_refuses_everything() {
        let mut directory = directory_with(&[("bob", 0)]);
        let (mesh, _inboxes) = Mesh::new(1);
        let (receipt, rung) = hand_over(
            1,
            vec![record("bob"), record("dave")],
            &mut directory,
            (&mesh, None),
            false,
            (Instant::now(), 0),
        );
        assert_eq!((receipt.refused, receipt.absent, rung), (vec![0, 1], vec![], 0));
    }
}
