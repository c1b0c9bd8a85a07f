//! The bytes one node's directory sends another's (sans IO), to `<p>.node.<id>.dir`:
//! every message it has for that node in one round, after the sender's id.
//! Little-endian, names length-prefixed by one byte (user ids and room names are at most
//! 255 bytes, as in the presence ops).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};

use crate::cluster::wire::{NodeId, WireError};

/// What a directory entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    User = 1,
    Room = 2,
}

/// A user or a room: what has a home node and a set of nodes holding it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirKey {
    pub kind: KeyKind,
    pub name: Arc<str>,
}

/// A key seen through a borrowed name, so that maps keyed by `DirKey` can be asked with
/// `(KeyKind, &str)` (a record off the wire) without allocating a name.
pub trait KeyView {
    fn kind(&self) -> KeyKind;
    fn name(&self) -> &str;
}

impl KeyView for DirKey {
    fn kind(&self) -> KeyKind {
        self.kind
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl KeyView for (KeyKind, &str) {
    fn kind(&self) -> KeyKind {
        self.0
    }
    fn name(&self) -> &str {
        self.1
    }
}

// The same hash and equality for a key and its view (what `Borrow` requires).
impl Hash for DirKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.name.hash(state);
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind().hash(state);
        self.name().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind() && self.name() == other.name()
    }
}

impl Eq for dyn KeyView + '_ {}

impl<'a> Borrow<dyn KeyView + 'a> for DirKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl DirKey {
    pub fn user(name: impl Into<Arc<str>>) -> Self {
        DirKey {
            kind: KeyKind::User,
            name: name.into(),
        }
    }

    pub fn room(name: impl Into<Arc<str>>) -> Self {
        DirKey {
            kind: KeyKind::Room,
            name: name.into(),
        }
    }
}

/// One message between two nodes' directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirMsg {
    /// To the key's home: "I hold it" (`held`), or "I no longer do".
    Hold { key: DirKey, held: bool },
    /// To every node: "everything of mine homed at you under the view `view` has been sent".
    Synced { view: u64 },
    /// To the key's home: "which nodes hold it?" The asker is then told of every change
    /// until it says `Unwatch`.
    Lookup { key: DirKey },
    /// From the key's home, as an answer and on every change: the nodes holding it.
    /// `complete` once the home has heard from every node of its view.
    Where {
        key: DirKey,
        nodes: Vec<NodeId>,
        complete: bool,
    },
    /// "I am not the key's home" (the asker's view of the cluster differs from ours).
    NotHome { key: DirKey },
    /// To the key's home: "stop telling me about it" (it left the asker's cache).
    Unwatch { key: DirKey },
    /// "I had forgotten you (you were silent past the timeout): send again what of yours
    /// is homed at me, then `Synced`."
    Resync,
}

/// The most node ids one `Where` carries (a key held by more nodes than this is told as
/// held by the first ones; no deployment comes near it).
pub const MAX_WHERE_NODES: usize = u16::MAX as usize;

/// Writes `msgs` from `from` as one NATS message body.
pub fn write_dir(from: NodeId, msgs: &[DirMsg]) -> Bytes {
    let mut buf = Vec::with_capacity(8 + msgs.len() * 24);
    buf.put_u64_le(from);
    for msg in msgs {
        match msg {
            DirMsg::Hold { key, held } => {
                buf.put_u8(if *held { 1 } else { 2 });
                put_key(&mut buf, key);
            }
            DirMsg::Synced { view } => {
                buf.put_u8(3);
                buf.put_u64_le(*view);
            }
            DirMsg::Lookup { key } => {
                buf.put_u8(4);
                put_key(&mut buf, key);
            }
            DirMsg::Where { key, nodes, complete } => {
                buf.put_u8(if *complete { 5 } else { 6 });
                put_key(&mut buf, key);
                let nodes = &nodes[..nodes.len().min(MAX_WHERE_NODES)];
                buf.put_u16_le(nodes.len() as u16);
                for node in nodes {
                    buf.put_u64_le(*node);
                }
            }
            DirMsg::NotHome { key } => {
                buf.put_u8(7);
                put_key(&mut buf, key);
            }
            DirMsg::Unwatch { key } => {
                buf.put_u8(8);
                put_key(&mut buf, key);
            }
            DirMsg::Resync => buf.put_u8(9),
        }
    }
    Bytes::from(buf)
}

/// Reads a body written by `write_dir`: the sender and its messages.
pub fn read_dir(mut body: Bytes) -> Result<(NodeId, Vec<DirMsg>), WireError> {
    if body.len() < 8 {
        return Err(WireError("directory message shorter than its sender"));
    }
    let from = body.get_u64_le();
    let mut msgs = Vec::new();
    while body.has_remaining() {
        let tag = body.get_u8();
        msgs.push(match tag {
            1 | 2 => DirMsg::Hold {
                key: read_key(&mut body)?,
                held: tag == 1,
            },
            3 => {
                if body.len() < 8 {
                    return Err(WireError("truncated directory view"));
                }
                DirMsg::Synced {
                    view: body.get_u64_le(),
                }
            }
            4 => DirMsg::Lookup {
                key: read_key(&mut body)?,
            },
            5 | 6 => {
                let key = read_key(&mut body)?;
                if body.len() < 2 {
                    return Err(WireError("truncated node count"));
                }
                let n = body.get_u16_le() as usize;
                if body.len() < n * 8 {
                    return Err(WireError("truncated node list"));
                }
                let nodes = (0..n).map(|_| body.get_u64_le()).collect();
                DirMsg::Where {
                    key,
                    nodes,
                    complete: tag == 5,
                }
            }
            7 => DirMsg::NotHome {
                key: read_key(&mut body)?,
            },
            8 => DirMsg::Unwatch {
                key: read_key(&mut body)?,
            },
            9 => DirMsg::Resync,
            _ => return Err(WireError("unknown directory message")),
        });
    }
    Ok((from, msgs))
}

fn put_key(buf: &mut Vec<u8>, key: &DirKey) {
    let name = &key.name.as_bytes()[..key.name.len().min(u8::MAX as usize)];
    buf.put_u8(key.kind as u8);
    buf.put_u8(name.len() as u8);
    buf.put_slice(name);
}

fn read_key(body: &mut Bytes) -> Result<DirKey, WireError> {
    if body.len() < 2 {
        return Err(WireError("truncated directory key"));
    }
    let kind = match body.get_u8() {
        1 => KeyKind::User,
        2 => KeyKind::Room,
        _ => return Err(WireError("unknown directory key kind")),
    };
    let len = body.get_u8() as usize;
    if body.len() < len {
        return Err(WireError("truncated directory key name"));
    }
    let name = std::str::from_utf8(&body[..len]).map_err(|_| WireError("directory key name is not UTF-8"))?;
    let key = DirKey {
        kind,
        name: Arc::from(name),
    };
    body.advance(len);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = DirKey> {
        (any::<bool>(), "[a-z0-9:]{0,20}").prop_map(
            |(room, name)| {
                if room {
                    DirKey::room(name)
                } else {
                    DirKey::user(name)
                }
            },
        )
    }

    fn msg() -> impl Strategy<Value = DirMsg> {
        prop_oneof![
            (key(), any::<bool>()).prop_map(|(key, held)| DirMsg::Hold { key, held }),
            any::<u64>().prop_map(|view| DirMsg::Synced { view }),
            key().prop_map(|key| DirMsg::Lookup { key }),
            (key(), proptest::collection::vec(any::<u64>(), 0..5), any::<bool>())
                .prop_map(|(key, nodes, complete)| DirMsg::Where { key, nodes, complete }),
            key().prop_map(|key| DirMsg::NotHome { key }),
            key().prop_map(|key| DirMsg::Unwatch { key }),
            Just(DirMsg::Resync),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(from in any::<u64>(), msgs in proptest::collection::vec(msg(), 0..20)) {
            let (f, read) = read_dir(write_dir(from, &msgs)).unwrap();
            prop_assert_eq!(f, from);
            prop_assert_eq!(read, msgs);
        }

        /// Any prefix of a valid body, and any bytes at all, read as an error or as
        /// messages, never a panic.
        #[test]
        fn cut_or_random_bodies_never_panic(
            msgs in proptest::collection::vec(msg(), 1..10),
            cut in any::<prop::sample::Index>(),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let body = write_dir(1, &msgs);
            let at = cut.index(body.len());
            let _ = read_dir(body.slice(..at));
            let _ = read_dir(Bytes::from(noise));
        }
    }

    #[test]
    fn a_key_is_found_by_its_borrowed_name() {
        let mut map = std::collections::HashMap::new();
        map.insert(DirKey::user("ann"), 1);
        map.insert(DirKey::room("ann"), 2);
        let user: &dyn KeyView = &(KeyKind::User, "ann");
        let room: &dyn KeyView = &(KeyKind::Room, "ann");
        let other: &dyn KeyView = &(KeyKind::User, "bob");
        assert_eq!(
            (map.get(user), map.get(room), map.get(other)),
            (Some(&1), Some(&2), None)
        );
    }

    #[test]
    fn a_truncated_node_list_is_an_error() {
        let body = write_dir(
            9,
            &[DirMsg::Where {
                key: DirKey::user("ann"),
                nodes: vec![1, 2],
                complete: true,
            }],
        );
        assert_eq!(
            read_dir(body.slice(..body.len() - 1)),
            Err(WireError("truncated node list"))
        );
    }
}
