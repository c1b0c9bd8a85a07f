//! The store in the data directory, on fjall (an LSM tree: appends are journal writes,
//! and a conversation's messages are one key range). Keys are the conversation id, a NUL
//! and the seq (u64 big-endian), so that a range scan reads a conversation in order; a
//! second keyspace holds each conversation's latest seq, written in the same atomic batch.

use std::collections::HashMap;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{record, ConvId, MessageStore, NewMessage, Page, StoreError};

pub struct EmbeddedStore {
    db: Database,
    messages: Keyspace,
    heads: Keyspace,
    /// Latest seq per conversation, as far as read or written since start.
    head_cache: HashMap<ConvId, u64>,
    /// Reused for encoding records.
    scratch: Vec<u8>,
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// The key of message `seq` of `conv`.
fn message_key(conv: &ConvId, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(conv.as_str().len() + 9);
    key.extend_from_slice(conv.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::builder(dir).open().map_err(engine)?;
        let messages = db
            .keyspace("messages", KeyspaceCreateOptions::default)
            .map_err(engine)?;
        let heads = db.keyspace("heads", KeyspaceCreateOptions::default).map_err(engine)?;
        Ok(EmbeddedStore {
            db,
            messages,
            heads,
            head_cache: HashMap::new(),
            scratch: Vec::new(),
        })
    }

    /// The latest seq of `conv` (0 when it has none).
    pub fn head(&self, conv: &ConvId) -> Result<u64, StoreError> {
        if let Some(head) = self.head_cache.get(conv) {
            return Ok(*head);
        }
        match self.heads.get(conv.as_str()).map_err(engine)? {
            None => Ok(0),
            Some(bytes) => {
                let bytes: [u8; 8] = bytes[..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a conversation head is not 8 bytes"))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }
}

impl MessageStore for EmbeddedStore {
    fn append(&mut self, group: &[NewMessage]) -> Result<Vec<u64>, StoreError> {
        // Heads move in a map of their own until the batch is committed: a batch that
        // fails to commit uses up no seq.
        let mut heads: HashMap<ConvId, u64> = HashMap::new();
        let mut seqs = Vec::with_capacity(group.len());
        let mut batch = self.db.batch();
        for m in group {
            let head = match heads.get(&m.conv) {
                Some(h) => *h,
                None => self.head(&m.conv)?,
            };
            let seq = head + 1;
            heads.insert(m.conv.clone(), seq);
            seqs.push(seq);
            self.scratch.clear();
            record::encode(&mut self.scratch, m.ts_ms, &m.from, m.client_id.as_deref(), &m.body);
            batch.insert(&self.messages, message_key(&m.conv, seq), self.scratch.as_slice());
        }
        for (conv, seq) in &heads {
            batch.insert(&self.heads, conv.as_str(), seq.to_be_bytes());
        }
        batch.commit().map_err(engine)?;
        // Committed: the seqs are taken, durable or not, so that none is ever reused.
        self.head_cache.extend(heads);
        self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        Ok(seqs)
    }

    fn read_after(&self, conv: &ConvId, seq: u64, limit: usize) -> Result<Page, StoreError> {
        let head = self.head(conv)?;
        let mut messages = Vec::new();
        if seq < head {
            let range = message_key(conv, seq + 1)..=message_key(conv, head);
            for item in self.messages.range(range).take(limit) {
                let (key, value) = item.into_inner().map_err(engine)?;
                let at = key
                    .len()
                    .checked_sub(8)
                    .ok_or(StoreError::Corrupt("a message key is too short"))?;
                let seq = u64::from_be_bytes(key[at..].try_into().map_err(|_| StoreError::Corrupt("key"))?);
                messages.push(record::decode(seq, &value)?);
            }
        }
        Ok(Page { messages, head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("shardgate-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn msg(conv: &ConvId, from: &str, n: u64) -> NewMessage {
        NewMessage {
            conv: conv.clone(),
            from: from.into(),
            client_id: Some(format!("c-{n}")),
            ts_ms: 1_700_000_000_000 + n,
            body: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    #[test]
    fn a_restart_continues_every_conversation_where_it_was() {
        let dir = temp("restart");
        let dm = ConvId::direct("bob", "alice");
        let room = ConvId::room("lobby");
        {
            let mut store = EmbeddedStore::open(&dir).unwrap();
            let group = [msg(&dm, "alice", 1), msg(&room, "bob", 2), msg(&dm, "bob", 3)];
            assert_eq!(store.append(&group).unwrap(), vec![1, 1, 2]);
        }
        let mut store = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(store.append(&[msg(&dm, "alice", 4)]).unwrap(), vec![3]);
        let page = store.read_after(&dm, 0, 10).unwrap();
        assert_eq!(page.head, 3);
        let seen: Vec<(u64, &str)> = page.messages.iter().map(|m| (m.seq, m.from.as_str())).collect();
        assert_eq!(seen, vec![(1, "alice"), (2, "bob"), (3, "alice")]);
        assert_eq!(page.messages[1].body, b"{\"n\":3}");
        assert_eq!(
            store.read_after(&room, 1, 10).unwrap(),
            Page {
                messages: vec![],
                head: 1
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Against a model: each conversation's messages get 1, 2, 3, … in append order,
        /// and any page reads back exactly the model's slice.
        #[test]
        fn seqs_and_pages_match_a_model(groups in proptest::collection::vec(
                proptest::collection::vec((0usize..4, 0usize..3), 1..20), 1..12),
            reads in proptest::collection::vec((0usize..4, 0u64..30, 1usize..10), 1..10)) {
            let convs = [ConvId::direct("a", "b"), ConvId::direct("b", "c"), ConvId::room("r1"), ConvId::room("r2")];
            let users = ["a", "b", "c"];
            let dir = temp("model");
            let mut store = EmbeddedStore::open(&dir).unwrap();
            let mut model: BTreeMap<usize, Vec<(u64, String)>> = BTreeMap::new();
            let mut n = 0;
            for group in groups {
                let messages: Vec<NewMessage> = group.iter().map(|&(c, u)| { n += 1; msg(&convs[c], users[u], n) }).collect();
                let seqs = store.append(&messages).unwrap();
                for ((c, u), seq) in group.iter().zip(seqs) {
                    let entry = model.entry(*c).or_default();
                    prop_assert_eq!(seq, entry.len() as u64 + 1);
                    entry.push((seq, users[*u].to_string()));
                }
            }
            for (c, after, limit) in reads {
                let page = store.read_after(&convs[c], after, limit).unwrap();
                let all = model.get(&c).cloned().unwrap_or_default();
                let want: Vec<(u64, String)> = all.iter().filter(|(s, _)| *s > after).take(limit).cloned().collect();
                let got: Vec<(u64, String)> = page.messages.iter().map(|m| (m.seq, m.from.clone())).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(page.head, all.len() as u64);
            }
            drop(store);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
