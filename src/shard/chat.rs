//! A chat connection on its shard: each text frame is parsed, checked and routed; answers
//! (acks, errors) go back through the shard's cork with the connection's other output.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::cork::Cork;
use super::hub::{text_frame, Hub};
use super::outbound::Outbound;
use crate::chat::protocol::{self, AppError, ClientMessage};
use crate::cluster::{AckTo, ToCluster};
use crate::config::Config;
use crate::route::{shards_in, ShardMsg};
use crate::ws::OpCode;

/// A token bucket: `rate` messages per second, bursts of `burst`. A rate of 0 is no limit.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When the read that carried a message returned: the monotonic instant (for latency) and
/// the wall clock in Unix milliseconds (the `ts` clients see).
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub ingress: Instant,
    pub ts_ms: u64,
}

impl Arrival {
    pub fn now() -> Self {
        Arrival {
            ingress: Instant::now(),
            ts_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

pub struct ChatConn {
    pub user: Arc<str>,
    pub out: Rc<Outbound>,
    bucket: TokenBucket,
}

impl ChatConn {
    pub fn new(user: Arc<str>, out: Rc<Outbound>, config: &Config) -> Self {
        let bucket = TokenBucket::new(config.rate_limit, config.rate_burst.max(1) as f64, Instant::now());
        ChatConn { user, out, bucket }
    }

    /// Handles one complete message from the client; `at` is when the
    /// read that carried it returned.
    pub fn on_message(
        &mut self,
        hub: &Hub,
        config: &Config,
        opcode: OpCode,
        payload: &[u8],
        at: Arrival,
        cork: &mut Cork,
    ) {
        let Arrival { ingress, ts_ms } = at;
        let result = if opcode != OpCode::Text {
            Err(AppError::new("bad_json", "the chat protocol uses text frames"))
        } else if payload.len() > config.max_chat_message {
            Err(AppError::new(
                "too_large",
                format!("messages are limited to {} bytes", config.max_chat_message),
            ))
        } else if !self.bucket.take(ingress) {
            Err(AppError::new(
                "rate_limited",
                format!("more than {} messages per second", config.rate_limit),
            ))
        } else {
            protocol::parse(payload).and_then(|msg| self.route(hub, msg, ingress, ts_ms, cork))
        };
        if let Err(error) = result {
            let mut scratch = hub.scratch.borrow_mut();
            scratch.clear();
            protocol::write_error(&mut scratch, &error);
            cork.frame(OpCode::Text, &scratch);
        }
    }

    fn route(
        &mut self,
        hub: &Hub,
        msg: ClientMessage<'_>,
        ingress: Instant,
        ts_ms: u64,
        cork: &mut Cork,
    ) -> Result<(), AppError> {
        match msg {
            ClientMessage::Send { to, id, body } => {
                let mask = hub.router.borrow().user_shards(&to);
                let cluster = hub.cluster.as_deref();
                if let Some(link) = cluster {
                    // The recipient may have connections on other nodes too.
                    if mask == 0 && !link.is_up() {
                        return Err(
                            unavailable("the recipient is not on this node, and the cluster is unreachable")
                                .with_id_str(id.as_deref()),
                        );
                    }
                    if link.is_up() && link.is_full() {
                        return Err(AppError::new("rate_limited", "the cluster link is overloaded; retry")
                            .with_id_str(id.as_deref()));
                    }
                }
                let status = if mask == 0 && cluster.is_none() {
                    "offline"
                } else {
                    if shards_in(mask).any(|s| s != hub.shard && hub.mesh.is_full(s)) {
                        return Err(
                            AppError::new("rate_limited", "the recipient's shard is overloaded; retry")
                                .with_id_str(id.as_deref()),
                        );
                    }
                    let frame = {
                        let mut scratch = hub.scratch.borrow_mut();
                        scratch.clear();
                        protocol::write_message(&mut scratch, &self.user, &to, id.as_deref(), ts_ms, body);
                        text_frame(&scratch)
                    };
                    let to = hub.router.borrow().intern(&to);
                    for shard in shards_in(mask) {
                        if shard == hub.shard {
                            let router = hub.router.borrow();
                            hub.deliver_local(router.local_connections(&to), &frame, ingress, None, false);
                        } else {
                            hub.send_to(
                                shard,
                                ShardMsg::Direct {
                                    to: to.clone(),
                                    frame: frame.clone(),
                                    ingress,
                                    cross_node: false,
                                },
                            );
                        }
                    }
                    let elsewhere = mask == 0 || hub.also_remote.borrow().contains(&to);
                    if let Some(link) = cluster.filter(|l| l.is_up() && elsewhere) {
                        // Not on this node: the cluster thread answers once other nodes did.
                        let ack = (mask == 0).then(|| self.ack_to(hub, id.as_deref()));
                        hub.to_cluster(
                            link,
                            ToCluster::Direct {
                                to,
                                frame,
                                ingress,
                                ack,
                            },
                        );
                        if mask == 0 {
                            return Ok(());
                        }
                    }
                    "routed"
                };
                self.answer(hub, cork, |s| protocol::write_ack(s, id.as_deref(), status));
            }
            ClientMessage::Publish { room, id, body } => {
                if !hub.router.borrow().is_member(&self.user, &room) {
                    return Err(
                        AppError::new("not_member", format!("join {room} before publishing to it"))
                            .with_id_str(id.as_deref()),
                    );
                }
                let mask = hub.router.borrow().room_shards(&room);
                if shards_in(mask).any(|s| s != hub.shard && hub.mesh.is_full(s))
                    || hub.cluster.as_ref().is_some_and(|l| l.is_up() && l.is_full())
                {
                    return Err(AppError::new("rate_limited", "a member's shard is overloaded; retry")
                        .with_id_str(id.as_deref()));
                }
                let frame = {
                    let mut scratch = hub.scratch.borrow_mut();
                    scratch.clear();
                    protocol::write_room_message(&mut scratch, &room, &self.user, id.as_deref(), ts_ms, body);
                    text_frame(&scratch)
                };
                let room = hub.router.borrow().intern_room(&room);
                for shard in shards_in(mask) {
                    if shard == hub.shard {
                        let router = hub.router.borrow();
                        hub.deliver_local(
                            router.local_room_connections(&room),
                            &frame,
                            ingress,
                            Some(self.out.id),
                            false,
                        );
                    } else {
                        hub.send_to(
                            shard,
                            ShardMsg::Room {
                                room: room.clone(),
                                frame: frame.clone(),
                                ingress,
                                except: (hub.shard, self.out.id),
                                cross_node: false,
                            },
                        );
                    }
                }
                if let Some(link) = hub.cluster.as_deref() {
                    if !link.is_up() {
                        return Err(unavailable(
                            "delivered to the room's members on this node only: the cluster is unreachable",
                        )
                        .with_id_str(id.as_deref()));
                    }
                    // The cluster thread answers once the other nodes with members confirmed.
                    let ack = self.ack_to(hub, id.as_deref());
                    hub.to_cluster(
                        link,
                        ToCluster::Publish {
                            room,
                            frame,
                            ingress,
                            ack,
                        },
                    );
                    return Ok(());
                }
                self.answer(hub, cork, |s| protocol::write_ack(s, id.as_deref(), "routed"));
            }
            ClientMessage::Join { room } => {
                hub.router
                    .borrow_mut()
                    .change_membership(&self.user, self.out.id, Arc::from(room.as_ref()), true)
            }
            ClientMessage::Leave { room } => {
                hub.router
                    .borrow_mut()
                    .change_membership(&self.user, self.out.id, Arc::from(room.as_ref()), false)
            }
        }
        Ok(())
    }

    /// Where the cluster thread's answer for this connection goes.
    fn ack_to(&self, hub: &Hub, id: Option<&str>) -> AckTo {
        AckTo {
            shard: hub.shard,
            conn: self.out.id,
            id: id.map(Box::from),
        }
    }

    fn answer(&self, hub: &Hub, cork: &mut Cork, write: impl FnOnce(&mut Vec<u8>)) {
        let mut scratch = hub.scratch.borrow_mut();
        scratch.clear();
        write(&mut scratch);
        cork.frame(OpCode::Text, &scratch);
    }
}

fn unavailable(message: &'static str) -> AppError {
    AppError::new("unavailable", message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn token_bucket_allows_bursts_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        let mut unlimited = TokenBucket::new(0.0, 1.0, t0);
        assert!((0..10_000).all(|_| unlimited.take(t0)));
    }
}
