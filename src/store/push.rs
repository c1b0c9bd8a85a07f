//! The push webhook (`--push-webhook URL`): messages stored for a user with no
//! connection are POSTed to a push service (an APNs/FCM bridge) as batched JSON,
//! signed, retried with backoff, on a thread of its own. The store thread offers events
//! to a bounded queue and never waits: when the queue is full the event is dropped and
//! counted (`push_dropped` on the `store:` line).
//!
//! A request: `POST URL` with `Content-Type: application/json`,
//! `X-Shardgate-Timestamp: <unix seconds>` and
//! `X-Shardgate-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>` under the
//! secret of `--push-secret-file`; the body is `{"events":[{"user":…,"conv":…,"seq":…,
//! "from":…,"ts":…,"preview":…},…]}`. A 2xx answer takes the batch; 5xx, 429 and network
//! errors are retried; other answers drop it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::Serialize;

/// One message stored for a user with no connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PushEvent {
    pub user: String,
    pub conv: String,
    pub seq: u64,
    pub from: String,
    #[serde(rename = "ts")]
    pub ts_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

#[derive(Serialize)]
struct Batch<'a> {
    events: &'a [PushEvent],
}

#[derive(Debug, Clone)]
pub struct PushConfig {
    pub url: String,
    pub secret: Vec<u8>,
    /// Events waiting beyond which new ones are dropped.
    pub capacity: usize,
    /// Tries per batch, the first included.
    pub attempts: u32,
    /// The wait before the first retry; it doubles for each next one.
    pub first_backoff: Duration,
}

/// Events per request, and how long the first of a batch waits for company.
const BATCH: usize = 100;
const LINGER: Duration = Duration::from_millis(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The store thread's end of the webhook.
#[derive(Clone)]
pub struct PushQueue {
    tx: Sender<PushEvent>,
    counts: Arc<Counts>,
}

impl PushQueue {
    /// Queues `event`, or drops and counts it when the queue is full. Never waits.
    pub fn offer(&self, event: PushEvent) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(event) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events delivered, given up after retries, and dropped on a full queue since the
    /// last call.
    pub fn take_counts(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        (
            c.sent.swap(0, Ordering::Relaxed),
            c.failed.swap(0, Ordering::Relaxed),
            c.dropped.swap(0, Ordering::Relaxed),
        )
    }
}

/// Starts the webhook thread; it ends once the queue is dropped and drained.
pub fn spawn(config: PushConfig) -> std::io::Result<(PushQueue, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(config.capacity.max(1));
    let counts = Arc::new(Counts::default());
    let thread_counts = counts.clone();
    let handle = std::thread::Builder::new()
        .name("push".into())
        .spawn(move || run(config, rx, &thread_counts))?;
    Ok((PushQueue { tx, counts }, handle))
}

fn run(config: PushConfig, rx: Receiver<PushEvent>, counts: &Counts) {
    let agent = ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).build();
    let mut batch = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.recv_timeout(LINGER) {
                Ok(event) => batch.push(event),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let n = batch.len() as u64;
        if post(&agent, &config, &batch) {
            counts.sent.fetch_add(n, Ordering::Relaxed);
        } else {
            counts.failed.fetch_add(n, Ordering::Relaxed);
        }
        batch.clear();
    }
}

/// `sha256=<hex>` of `"<timestamp>." + body`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(format!("{timestamp}.").as_bytes());
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// POSTs one batch, retrying what may succeed later. True once the service took it.
fn post(agent: &ureq::Agent, config: &PushConfig, events: &[PushEvent]) -> bool {
    let body = match serde_json::to_vec(&Batch { events }) {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!("push: cannot encode a batch: {e}");
            return false;
        }
    };
    let mut backoff = config.first_backoff;
    for attempt in 1..=config.attempts.max(1) {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let result = agent
            .post(&config.url)
            .set("Content-Type", "application/json")
            .set("X-Shardgate-Timestamp", &timestamp.to_string())
            .set("X-Shardgate-Signature", &signature(&config.secret, timestamp, &body))
            .send_bytes(&body);
        let retry = match result {
            Ok(_) => return true,
            Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 => format!("answered {code}"),
            Err(ureq::Error::Status(code, _)) => {
                tracing::warn!("push: the webhook answered {code}; {} event(s) dropped", events.len());
                return false;
            }
            Err(e) => e.to_string(),
        };
        if attempt == config.attempts.max(1) {
            tracing::warn!(
                "push: the webhook {retry} on the last of {attempt} tries; {} event(s) dropped",
                events.len()
            );
            break;
        }
        std::thread::sleep(backoff);
        backoff *= 2;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_an_hmac_of_time_and_body() {
        let sig = signature(b"Jefe", 0, b"");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let want = ring::hmac::sign(&key, b"17.{\"events\":[]}");
        let hex: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(signature(b"Jefe", 17, b"{\"events\":[]}"), format!("sha256={hex}"));
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, _rx) = crossbeam_channel::bounded(2);
        let queue = PushQueue {
            tx,
            counts: Arc::new(Counts::default()),
        };
        let event = PushEvent {
            user: "bob".into(),
            conv: "dm:alice:bob".into(),
            seq: 1,
            from: "alice".into(),
            ts_ms: 1,
            preview: None,
        };
        for _ in 0..5 {
            queue.offer(event.clone());
        }
        assert_eq!(queue.take_counts(), (0, 0, 3));
        assert_eq!(queue.take_counts(), (0, 0, 0));
    }
}
