//! The store on Redis (`--store redis://HOST:PORT[/DB]`), or on a Redis Cluster through
//! its seed nodes (`--store redis+cluster://HOST:PORT,HOST:PORT,…`), for gateways that
//! share one (Centrifugo keeps its history the same way). Every key of a conversation carries the
//! conversation in a hash tag (`sg:{dm:alice:bob}:…`), so that one Redis Function call
//! touches one slot and the same function runs on Redis Cluster unchanged:
//! - `sg:{<conv>}:head`: the conversation's latest seq (a counter; never expires, so a
//!   seq is never given twice even after every message expired);
//! - `sg:{<conv>}:msgs`: a stream of the messages, entry id `<seq>-0`, fields `t` (ms)
//!   and `r` (the record), capped to the retention's count, trimmed by age from its front
//!   and expiring as a whole after a silence of the retention's age;
//! - `sg:{<conv>}:id:<sender>\0<client id>`: the seq a client id got, expiring with the
//!   dedupe window;
//! - `sg:user:{<user>}:convs`: a sorted set of the user's conversations by last activity,
//!   rewritten at most once a minute per conversation.
//!
//! One `sg_append_2` call assigns the seq, stores, trims and remembers the client id in
//! one atomic step; a group of appends is one pipeline, so one round trip. What is acked
//! `stored` is as durable as Redis makes a write before its reply: with `appendonly yes`
//! and `appendfsync always` it is on Redis's disk (the gateway says at connect when Redis
//! runs otherwise).

use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Cmd, Connection, ConnectionLike, FromRedisValue, RedisError, RedisResult, TlsCertificates};

use super::{
    record, Appended, ConvId, MessageStore, NewMessage, Page, Range, RecentWrites, Retention, StoreError, TrimStep,
};

/// The function library, loaded (and replaced) at every connect: versioned by name so
/// that gateways of different builds sharing a Redis each find their own.
const LIBRARY: &str = r#"#!lua name=shardgate_2

-- One message at its conversation's next seq, once per client id.
-- KEYS: 1 the head counter, 2 the stream, 3 when the latest message was stored (Redis's
--       clock, "seconds:microseconds", kept a minute), 4 (when the message has a client
--       id) its key.
-- ARGV: 1 the record, 2 its time (ms), 3 messages kept (0: no limit), 4 age kept in ms
--       (0: no limit), 5 now (ms), 6 the dedupe window (ms).
-- Returns {1, seq, us} when stored (us: microseconds since the message before it was
-- stored, -1 if not within the minute), {0, seq, -1} when it is a retry of seq.
local function append(keys, args)
  if keys[4] then
    local prior = redis.call('GET', keys[4])
    if prior then return {0, tonumber(prior), -1} end
  end
  local seq = redis.call('INCR', keys[1])
  local now = redis.call('TIME')
  local previous = redis.call('GET', keys[3])
  local after = -1
  if previous then
    local s, us = string.match(previous, '^(%d+):(%d+)$')
    if s then after = (tonumber(now[1]) - tonumber(s)) * 1000000 + tonumber(now[2]) - tonumber(us) end
  end
  redis.call('SET', keys[3], now[1] .. ':' .. now[2], 'PX', 60000)
  local id = seq .. '-0'
  local max = tonumber(args[3])
  if max > 0 then
    redis.call('XADD', keys[2], 'MAXLEN', max, id, 't', args[2], 'r', args[1])
  else
    redis.call('XADD', keys[2], id, 't', args[2], 'r', args[1])
  end
  local max_age = tonumber(args[4])
  if max_age > 0 then
    local cutoff = tonumber(args[5]) - max_age
    for _ = 1, 64 do
      local oldest = redis.call('XRANGE', keys[2], '-', '+', 'COUNT', 1)[1]
      if not oldest or tonumber(oldest[2][2]) >= cutoff then break end
      redis.call('XDEL', keys[2], oldest[1])
    end
    redis.call('PEXPIRE', keys[2], max_age)
  end
  if keys[4] then
    redis.call('SET', keys[4], seq, 'PX', args[6])
  end
  return {1, seq, after}
end

redis.register_function('sg_append_2', append)
"#;

/// How long a connect, and then each request, may take before the store answers
/// `unavailable` (the store thread waits, never a shard).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connect, the next is tried this much later, the wait doubling up to
/// `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How `--store` names a Redis Cluster by its seed nodes (plain, and over TLS), and the
/// scheme each seed gets.
const CLUSTER_SCHEMES: [(&str, &str); 2] = [("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://")];

enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

enum Conn {
    Single(Connection),
    Cluster(Box<ClusterConnection>),
}

/// A command of a pipeline, and whether its answer is left out of the pipeline's.
type Piped = (Cmd, bool);

impl Conn {
    fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }

    /// Sends `commands` as one pipeline (per node, on a cluster) and parses the answers
    /// of those not ignored.
    fn pipeline<T: FromRedisValue>(&mut self, commands: &[Piped]) -> RedisResult<T> {
        macro_rules! fill {
            ($pipe:expr) => {{
                let mut pipe = $pipe;
                for (cmd, ignore) in commands {
                    pipe.add_command(cmd.clone());
                    if *ignore {
                        pipe.ignore();
                    }
                }
                pipe
            }};
        }
        match self {
            Conn::Single(c) => fill!(redis::pipe()).query(c),
            Conn::Cluster(c) => fill!(redis::cluster::cluster_pipe()).query(c.as_mut()),
        }
    }
}

pub struct RedisStore {
    client: Client,
    /// The URL without its password, for what the gateway says.
    shown: String,
    conn: Option<Conn>,
    /// After a failed connect: when the next attempt may be made (requests meanwhile fail
    /// at once instead of each waiting for a connect timeout), and the wait after that.
    retry: Option<(Instant, Duration)>,
    retention: Retention,
    dedupe_window_ms: u64,
    user_convs_written: RecentWrites,
}

/// Why `--store redis://…` cannot be used at all (an unreachable Redis is not one: the
/// gateway starts and answers sends `unavailable` until it can write).
#[derive(Debug, thiserror::Error)]
#[error("--store {shown}: {reason}")]
pub struct OpenError {
    shown: String,
    reason: String,
}

fn head_key(conv: &ConvId) -> String {
    format!("sg:{{{conv}}}:head")
}

/// When the conversation's latest message was stored, by Redis's clock.
fn stored_at_key(conv: &ConvId) -> String {
    format!("sg:{{{conv}}}:at")
}

fn stream_key(conv: &ConvId) -> String {
    format!("sg:{{{conv}}}:msgs")
}

fn client_id_key(conv: &ConvId, from: &str, id: &str) -> Vec<u8> {
    format!("sg:{{{conv}}}:id:{from}\0{id}").into_bytes()
}

fn user_key(user: &str) -> String {
    format!("sg:user:{{{user}}}:convs")
}

fn engine(e: RedisError) -> StoreError {
    StoreError::Engine(format!("redis: {e}"))
}

/// The seq of a stream entry id (`<seq>-0`).
fn entry_seq(id: &str) -> Result<u64, StoreError> {
    id.split_once('-')
        .and_then(|(seq, _)| seq.parse().ok())
        .ok_or(StoreError::Corrupt("a stream entry id is not <seq>-0"))
}

/// Stream entries (`XRANGE` replies) as stored messages.
fn entries(reply: Vec<(String, Vec<Vec<u8>>)>) -> Result<Vec<super::Stored>, StoreError> {
    reply
        .into_iter()
        .map(|(id, fields)| {
            let record = fields
                .chunks(2)
                .find(|f| f.first().map(Vec::as_slice) == Some(b"r"))
                .and_then(|f| f.get(1))
                .ok_or(StoreError::Corrupt("a stream entry has no record"))?;
            record::decode(entry_seq(&id)?, record)
        })
        .collect()
}

impl RedisStore {
    /// A store on the Redis at `url`. Connects once to say how durable its writes are; a
    /// Redis that is not up yet is said and retried on the first request.
    pub fn open(url: &str, retention: Retention, dedupe_window: Duration) -> Result<Self, OpenError> {
        Self::open_with_ca(url, None, retention, dedupe_window)
    }

    /// As `open`; a `rediss://` server's certificate is checked against the CA
    /// certificates (PEM) in `tls_ca` when given, else against the system's.
    pub fn open_with_ca(
        url: &str,
        tls_ca: Option<Vec<u8>>,
        retention: Retention,
        dedupe_window: Duration,
    ) -> Result<Self, OpenError> {
        let shown = crate::cluster::access::redact_url(url);
        let certs = tls_ca.map(|root| TlsCertificates {
            client_tls: None,
            root_cert: Some(root),
        });
        let cluster = CLUSTER_SCHEMES
            .iter()
            .find_map(|(scheme, seed_scheme)| Some((url.strip_prefix(scheme)?, seed_scheme)));
        let client = match cluster {
            // `[user:password@]seed,seed,…`: each seed a `redis://` (`rediss://`) URL with
            // the same login.
            Some((rest, seed_scheme)) => {
                let (login, seeds) = match rest.rsplit_once('@') {
                    Some((login, seeds)) => (format!("{login}@"), seeds),
                    None => (String::new(), rest),
                };
                let seeds: Vec<String> = seeds
                    .split(',')
                    .map(|seed| format!("{seed_scheme}{login}{seed}"))
                    .collect();
                let mut builder = ClusterClient::builder(seeds)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(IO_TIMEOUT);
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                builder.build().map(Client::Cluster)
            }
            None => match certs {
                Some(certs) => redis::Client::build_with_tls(url, certs),
                None => redis::Client::open(url),
            }
            .map(Client::Single),
        }
        .map_err(|e| OpenError {
            shown: shown.clone(),
            reason: e.to_string(),
        })?;
        let mut store = RedisStore {
            client,
            shown,
            conn: None,
            retry: None,
            retention,
            dedupe_window_ms: dedupe_window.as_millis() as u64,
            user_convs_written: RecentWrites::default(),
        };
        if let Err(e) = store.connection() {
            tracing::warn!("store: {e}; sends are answered 'unavailable' until it is reachable");
        }
        Ok(store)
    }

    /// The connection, connecting (and loading the functions) when there is none.
    fn connection(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.is_none() {
            if let Some((at, _)) = self.retry.filter(|(at, _)| Instant::now() < *at) {
                let left = at.saturating_duration_since(Instant::now()).as_millis();
                let why = format!("redis at {} unreachable (next attempt in {left} ms)", self.shown);
                return Err(StoreError::Engine(why));
            }
            let connected = self.connect();
            self.retry = match &connected {
                Ok(()) => None,
                Err(_) => {
                    let wait = self.retry.map_or(RETRY_FIRST, |(_, wait)| wait);
                    Some((Instant::now() + wait, (wait * 2).min(RETRY_MAX)))
                }
            };
            connected?;
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Engine("no redis connection".into()))
    }

    /// Connects, and loads the functions.
    fn connect(&mut self) -> Result<(), StoreError> {
        let unreachable = |e: RedisError| StoreError::Engine(format!("redis at {} unreachable: {e}", self.shown));
        let mut conn = match &self.client {
            Client::Single(client) => {
                let conn = client
                    .get_connection_with_timeout(CONNECT_TIMEOUT)
                    .map_err(unreachable)?;
                conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
                conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
                Conn::Single(conn)
            }
            Client::Cluster(client) => Conn::Cluster(Box::new(client.get_connection().map_err(unreachable)?)),
        };
        load_library(conn.like()).map_err(engine)?;
        say_durability(conn.like(), &self.shown);
        tracing::info!("store: redis at {} connected", self.shown);
        self.conn = Some(conn);
        Ok(())
    }

    /// Runs `request` on the connection; a dropped connection is forgotten (the next
    /// request connects again), and a Redis that lost the functions (restarted without
    /// persistence, or flushed) gets them again for one more try.
    fn run<T>(&mut self, request: impl Fn(&mut Conn) -> RedisResult<T>) -> Result<T, StoreError> {
        let conn = self.connection()?;
        let mut result = request(conn);
        if let Err(e) = &result {
            if e.to_string().contains("Function not found") {
                result = load_library(conn.like()).and_then(|_| request(conn));
            }
        }
        result.map_err(|e| {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error() {
                self.conn = None;
            }
            engine(e)
        })
    }
}

/// Loads the functions (on every primary of a cluster).
fn load_library(conn: &mut dyn ConnectionLike) -> RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .exec(conn)
}

/// Says when Redis acknowledges writes before they are on its disk (`CONFIG` may be
/// renamed away: then nothing is said).
fn say_durability(conn: &mut dyn ConnectionLike, shown: &str) {
    let get = |conn: &mut dyn ConnectionLike, name: &str| -> Option<String> {
        let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn).ok()?;
        pair.get(1).cloned()
    };
    let appendonly = get(conn, "appendonly");
    let appendfsync = get(conn, "appendfsync");
    if let (Some(only), Some(fsync)) = (appendonly, appendfsync) {
        if only != "yes" || fsync != "always" {
            tracing::warn!(
                "store: redis at {shown} runs appendonly={only} appendfsync={fsync}: a Redis crash can lose messages acked stored; set appendonly yes and appendfsync always"
            );
        }
    }
}

impl MessageStore for RedisStore {
    fn append(&mut self, group: &[NewMessage], now_ms: u64) -> Result<Vec<Appended>, StoreError> {
        Ok(self.append_timed(group, now_ms)?.into_iter().map(|(a, _)| a).collect())
    }

    fn append_timed(
        &mut self,
        group: &[NewMessage],
        now_ms: u64,
    ) -> Result<Vec<(Appended, Option<Duration>)>, StoreError> {
        let mut pipe: Vec<Piped> = Vec::with_capacity(group.len() * 2);
        let mut record = Vec::new();
        self.user_convs_written.discard();
        for m in group {
            record.clear();
            record::encode(&mut record, m.ts_ms, &m.from, m.client_id.as_deref(), &m.body);
            let id_key = m
                .client_id
                .as_deref()
                .filter(|_| self.dedupe_window_ms > 0)
                .map(|id| client_id_key(&m.conv, &m.from, id));
            let mut call = redis::cmd("FCALL");
            call.arg("sg_append_2").arg(3 + id_key.is_some() as u8);
            call.arg(head_key(&m.conv))
                .arg(stream_key(&m.conv))
                .arg(stored_at_key(&m.conv));
            if let Some(key) = id_key {
                call.arg(key);
            }
            call.arg(record.as_slice())
                .arg(m.ts_ms)
                .arg(self.retention.max_messages)
                .arg(self.retention.max_age.as_millis() as u64)
                .arg(now_ms)
                .arg(self.dedupe_window_ms);
            pipe.push((call, false));
            let users = match m.conv.direct_users() {
                Some((a, b)) => vec![a, b],
                None => vec![m.from.as_str()],
            };
            for user in users {
                let key = user_key(user);
                let written = format!("{key}\0{}", m.conv);
                if self.user_convs_written.due(written.into_bytes(), m.ts_ms) {
                    let mut zadd = redis::cmd("ZADD");
                    zadd.arg(&key).arg(m.ts_ms).arg(m.conv.as_str());
                    pipe.push((zadd, true));
                    if !self.retention.max_age.is_zero() {
                        // Conversations silent for longer than retention keeps messages.
                        let cutoff = now_ms.saturating_sub(self.retention.max_age.as_millis() as u64);
                        let mut trim = redis::cmd("ZREMRANGEBYSCORE");
                        trim.arg(&key).arg("-inf").arg(format!("({cutoff}"));
                        pipe.push((trim, true));
                    }
                }
            }
        }
        let replies: Vec<(i64, u64, i64)> = self.run(|conn| conn.pipeline(&pipe))?;
        if replies.len() != group.len() {
            return Err(StoreError::Engine(format!(
                "redis answered {} of {} appends",
                replies.len(),
                group.len()
            )));
        }
        self.user_convs_written.committed();
        Ok(group
            .iter()
            .zip(replies)
            .map(|(m, (stored, seq, after_us))| match stored {
                1 => (
                    Appended::New(seq),
                    u64::try_from(after_us).ok().map(Duration::from_micros),
                ),
                _ => {
                    let conv = m.conv.clone();
                    (Appended::Duplicate { conv, seq }, None)
                }
            })
            .collect())
    }

    fn read(&mut self, conv: &ConvId, range: Range, limit: usize) -> Result<Page, StoreError> {
        let stream = stream_key(conv);
        let mut head = redis::cmd("GET");
        head.arg(head_key(conv));
        let mut oldest = redis::cmd("XRANGE");
        oldest.arg(&stream).arg("-").arg("+").arg("COUNT").arg(1);
        let count = limit.max(1);
        let page = match range {
            Range::After(seq) => {
                let mut page = redis::cmd("XRANGE");
                page.arg(&stream)
                    .arg(format!("{}-0", seq.saturating_add(1)))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count);
                page
            }
            Range::Before(seq) => {
                // Before 1 nothing is: `(1-0` would ask below the first id, which Redis refuses.
                let end = match seq {
                    0 | 1 => "0-0".to_string(),
                    _ => format!("({seq}-0"),
                };
                let mut page = redis::cmd("XREVRANGE");
                page.arg(&stream).arg(end).arg("-").arg("COUNT").arg(count);
                page
            }
        };
        let pipe = [(head, false), (oldest, false), (page, false)];
        type Entries = Vec<(String, Vec<Vec<u8>>)>;
        let (head, oldest, page): (Option<u64>, Entries, Entries) = self.run(|conn| conn.pipeline(&pipe))?;
        let head = head.unwrap_or(0);
        let first = match entries(oldest)?.first() {
            Some(m) => m.seq,
            None => head + 1,
        };
        // An append between the reads may have added past `head`: the page ends at it.
        let mut messages: Vec<_> = entries(page)?.into_iter().filter(|m| m.seq <= head).collect();
        if let Range::Before(_) = range {
            messages.reverse();
        }
        if limit == 0 {
            messages.clear();
        }
        Ok(Page { messages, head, first })
    }

    fn conversations(&mut self, user: &str, max: usize) -> Result<Vec<(ConvId, u64)>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let key = user_key(user);
        let names: Vec<String> =
            self.run(|conn| redis::cmd("ZREVRANGE").arg(&key).arg(0).arg(max - 1).query(conn.like()))?;
        let convs = names
            .iter()
            .map(|name| {
                ConvId::from_stored(name).ok_or(StoreError::Corrupt("a user's conversation names no conversation"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let pipe: Vec<Piped> = convs
            .iter()
            .map(|conv| {
                let mut get = redis::cmd("GET");
                get.arg(head_key(conv));
                (get, false)
            })
            .collect();
        let heads: Vec<Option<u64>> = self.run(|conn| conn.pipeline(&pipe))?;
        Ok(convs
            .into_iter()
            .zip(heads.into_iter().map(|h| h.unwrap_or(0)))
            .collect())
    }

    fn note_member(&mut self, user: &str, conv: &ConvId, ts_ms: u64) -> Result<(), StoreError> {
        let key = user_key(user);
        self.run(|conn| {
            redis::cmd("ZADD")
                .arg(&key)
                .arg(ts_ms)
                .arg(conv.as_str())
                .exec(conn.like())
        })
    }

    fn trim_step(&mut self, _now_ms: u64, _budget: usize) -> Result<TrimStep, StoreError> {
        // Retention is kept by Redis as it goes: each append caps its stream and trims
        // its front by age, a silent conversation's stream expires, client ids expire.
        Ok(TrimStep {
            removed: 0,
            swept_all: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream entry as `XRANGE` answers it.
    fn entry(seq: u64, record: &[u8]) -> (String, Vec<Vec<u8>>) {
        (
            format!("{seq}-0"),
            vec![b"t".to_vec(), b"0".to_vec(), b"r".to_vec(), record.to_vec()],
        )
    }

    #[test]
    fn keys_of_a_conversation_share_its_hash_tag() {
        let conv = ConvId::direct("bob", "alice");
        assert_eq!(head_key(&conv), "sg:{dm:alice:bob}:head");
        assert_eq!(stream_key(&conv), "sg:{dm:alice:bob}:msgs");
        assert_eq!(
            client_id_key(&conv, "alice", "m1"),
            b"sg:{dm:alice:bob}:id:alice\0m1".to_vec()
        );
        assert_eq!(user_key("alice"), "sg:user:{alice}:convs");
    }

    #[test]
    fn stream_entries_become_stored_messages() {
        let mut bytes = Vec::new();
        record::encode(&mut bytes, 5, "alice", Some("m1"), b"{}");
        let got = entries(vec![entry(7, &bytes)]).unwrap();
        assert_eq!((got[0].seq, got[0].from.as_str(), got[0].ts_ms), (7, "alice", 5));
        assert!(entries(vec![("x".into(), vec![])]).is_err());
        assert!(entries(vec![("3-0".into(), vec![b"t".to_vec(), b"1".to_vec()])]).is_err());
    }
}
