//! The Redis store's engine against a real redis-server, through the same interface the
//! store thread uses: what the gateway tests cannot drive (times chosen by the test).

mod common;

use std::time::Duration;

use common::Redis;
use shardgate::store::redis::RedisStore;
use shardgate::store::{Appended, ConvId, MessageStore, NewMessage, Range, Retention};

const T0: u64 = 1_700_000_000_000;
const KEEP_ALL: Retention = Retention {
    max_age: Duration::ZERO,
    max_messages: 0,
};
const FIVE_MINUTES: Duration = Duration::from_secs(300);

/// A store on database `db` of `redis`.
fn open(redis: &Redis, db: u8, retention: Retention, dedupe_window: Duration) -> RedisStore {
    RedisStore::open(&redis.url(db), retention, dedupe_window).unwrap()
}

fn msg(conv: &ConvId, from: &str, id: Option<&str>, ts_ms: u64) -> NewMessage {
    NewMessage {
        conv: conv.clone(),
        from: from.into(),
        client_id: id.map(str::to_string),
        ts_ms,
        body: format!("{{\"at\":{ts_ms}}}").into_bytes(),
    }
}

fn seqs(store: &mut RedisStore, conv: &ConvId) -> (Vec<u64>, u64, u64) {
    let page = store.read(conv, Range::After(0), 1000).unwrap();
    (page.messages.iter().map(|m| m.seq).collect(), page.first, page.head)
}

#[test]
fn retention_trims_by_age_and_count_and_never_reuses_a_seq() {
    let redis = Redis::start("engine-retention");
    let minute = Duration::from_secs(60);
    let retention = Retention {
        max_age: minute,
        max_messages: 4,
    };
    let mut store = open(&redis, 1, retention, FIVE_MINUTES);
    let dm = ConvId::direct("alice", "bob");
    // Six messages a second apart: the count keeps the last four.
    for i in 0..6 {
        let at = T0 + i * 1000;
        assert_eq!(
            store.append(&[msg(&dm, "alice", None, at)], at).unwrap(),
            vec![Appended::New(i + 1)]
        );
    }
    assert_eq!(seqs(&mut store, &dm), (vec![3, 4, 5, 6], 3, 6));
    // Two minutes on, one more: everything older than a minute goes from the front.
    let later = T0 + 120_000;
    assert_eq!(
        store.append(&[msg(&dm, "alice", None, later)], later).unwrap(),
        vec![Appended::New(7)]
    );
    assert_eq!(seqs(&mut store, &dm), (vec![7], 7, 7));
    // Both users list it, with its head.
    assert_eq!(store.conversations("bob", 10).unwrap(), vec![(dm.clone(), 7)]);
}

#[test]
fn a_client_id_is_a_retry_within_the_window_and_new_after_it() {
    let redis = Redis::start("engine-dedupe");
    let mut store = open(&redis, 2, KEEP_ALL, Duration::from_millis(300));
    let room = ConvId::room("lobby");
    let first = msg(&room, "alice", Some("m1"), T0);
    let by_bob = msg(&room, "bob", Some("m1"), T0);
    // In one group: the second copy is a retry; another sender's same id is not.
    assert_eq!(
        store.append(&[first.clone(), first.clone(), by_bob], T0).unwrap(),
        vec![
            Appended::New(1),
            Appended::Duplicate {
                conv: room.clone(),
                seq: 1
            },
            Appended::New(2)
        ]
    );
    // The window is Redis's expiry of the id's key (300 ms here): once Redis has
    // expired it, the same id is a new message.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.append(std::slice::from_ref(&first), T0).unwrap()[..] {
            [Appended::New(seq)] => {
                assert_eq!(seq, 3);
                break;
            }
            [Appended::Duplicate { seq: 1, .. }] => {
                assert!(std::time::Instant::now() < deadline, "the id never expired");
                std::thread::sleep(Duration::from_millis(50));
            }
            ref other => panic!("{other:?}"),
        }
    }
    assert_eq!(seqs(&mut store, &room), (vec![1, 2, 3], 1, 3));
}

#[test]
fn reads_page_both_ways_and_say_where_the_conversation_stands() {
    let redis = Redis::start("engine-reads");
    let mut store = open(&redis, 0, KEEP_ALL, FIVE_MINUTES);
    let dm = ConvId::direct("bob", "alice");
    let group: Vec<NewMessage> = (0..10)
        .map(|i| msg(&dm, "bob", Some(&format!("b{i}")), T0 + i))
        .collect();
    let got = store.append(&group, T0).unwrap();
    assert_eq!(got, (1..=10).map(Appended::New).collect::<Vec<_>>());
    let page = store.read(&dm, Range::After(7), 2).unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![8, 9]);
    assert_eq!((page.head, page.first), (10, 1));
    assert_eq!(page.messages[0].client_id.as_deref(), Some("b7"));
    assert_eq!(page.messages[0].body, format!("{{\"at\":{}}}", T0 + 7).into_bytes());
    let page = store.read(&dm, Range::Before(4), 10).unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    for before in [0, 1] {
        assert!(store.read(&dm, Range::Before(before), 10).unwrap().messages.is_empty());
    }
    let none = ConvId::direct("x", "y");
    let page = store.read(&none, Range::After(0), 10).unwrap();
    assert_eq!((page.messages.len(), page.head, page.first), (0, 0, 1));
}

#[test]
fn functions_flushed_from_a_live_redis_are_loaded_again() {
    let redis = Redis::start("engine-functions");
    let mut store = open(&redis, 0, KEEP_ALL, FIVE_MINUTES);
    let dm = ConvId::direct("alice", "bob");
    assert_eq!(
        store.append(&[msg(&dm, "alice", None, T0)], T0).unwrap(),
        vec![Appended::New(1)]
    );
    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "FUNCTION", "FLUSH"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&flushed.stdout).trim(), "OK");
    assert_eq!(
        store.append(&[msg(&dm, "alice", None, T0)], T0).unwrap(),
        vec![Appended::New(2)]
    );
}
