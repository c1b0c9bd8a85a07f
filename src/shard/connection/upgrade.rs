//! The HTTP side of a connection: read the request head, answer it, and say which
//! endpoint an upgraded connection runs.

use std::time::{Duration, Instant};

use super::{linger_close, Endpoint};
use crate::chat::session::authorize;
use crate::metrics::exposition;
use crate::shard::context::{ConnectionSlot, ReadOutcome, ShardContext};
use crate::shard::Apps;
use crate::web;
use crate::ws::deflate::Agreed;
use crate::ws::handshake::{self, Rejection, Request};

/// An upgraded connection, as the upgrade leaves it.
pub(super) struct Upgraded {
    /// What followed the request head in its reads.
    pub leftover: Vec<u8>,
    pub endpoint: Endpoint,
    /// permessage-deflate, when agreed.
    pub deflate: Option<Agreed>,
}

/// Reads the request head and answers it. Returns the upgraded connection, or `None`
/// when it is done.
pub(super) async fn upgrade(ctx: &ShardContext, apps: &Apps, slot: &ConnectionSlot) -> Option<Upgraded> {
    let deadline = Instant::now() + ctx.config.handshake_timeout;
    let mut head: Vec<u8> = Vec::new();
    let request = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            refuse(ctx, slot, &handshake_timeout()).await;
            return None;
        }
        match ctx.read(slot, true, None, Some(left)).await {
            Ok(ReadOutcome::Data(n)) => ctx.egress.copy_input(n, &mut head),
            Ok(ReadOutcome::TimedOut) => {
                refuse(ctx, slot, &handshake_timeout()).await;
                return None;
            }
            Ok(ReadOutcome::Eof | ReadOutcome::Stopping | ReadOutcome::Outbound) | Err(_) => return None,
        }
        match handshake::parse_request(&head, ctx.config.max_request_head) {
            Ok(Some(request)) => break request,
            Ok(None) => continue,
            Err(rejection) => {
                refuse(ctx, slot, &rejection).await;
                return None;
            }
        }
    };
    let mut out = Vec::new();
    match answer(ctx, apps, &request, &mut out) {
        Answer::Upgrade(endpoint, deflate) => {
            let head_len = request.head_len;
            ctx.egress.write_all(slot, &out).await.ok()?;
            head.drain(..head_len);
            Some(Upgraded {
                leftover: head,
                endpoint,
                deflate,
            })
        }
        Answer::Done => {
            if ctx.egress.write_all(slot, &out).await.is_ok() {
                linger_close(ctx, slot).await;
            }
            None
        }
        Answer::LiveFeed => {
            drop(request);
            if ctx.egress.write_all(slot, &out).await.is_ok() {
                live_feed(ctx, apps, slot).await;
            }
            None
        }
    }
}

/// What a request head is answered with.
enum Answer {
    /// A 101 (in `out`): the connection runs the endpoint (with the deflate agreement).
    Upgrade(Endpoint, Option<Agreed>),
    /// A whole response (in `out`); the connection closes after it.
    Done,
    /// The head of the dashboard's event stream (in `out`); events follow.
    LiveFeed,
}

/// Writes the answer to `request` into `out`, and counts its status.
fn answer(ctx: &ShardContext, apps: &Apps, request: &Request<'_>, out: &mut Vec<u8>) -> Answer {
    let status = |out: &[u8]| {
        // Every answer starts "HTTP/1.1 NNN".
        std::str::from_utf8(out.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let answer = route(ctx, apps, request, out);
    ctx.counters.http(status(out));
    answer
}

fn route(ctx: &ShardContext, apps: &Apps, request: &Request<'_>, out: &mut Vec<u8>) -> Answer {
    let config = &ctx.config;
    let get = request.method == "GET";
    // A WebSocket client pointed at a page gets what it got before pages existed.
    let upgrade = request.header_has_token("upgrade", "websocket");
    let chat = match request.path {
        "/metrics" | "/" | "/chat" | "/dashboard" | "/dashboard/events" if upgrade => {
            handshake::write_response(out, 404, "no such endpoint (WebSocket: /ws)", "");
            return Answer::Done;
        }
        "/healthz" | "/metrics" | "/" | "/chat" | "/dashboard" | "/dashboard/events" if !get => {
            handshake::write_response(out, 405, "use GET", "Allow: GET\r\n");
            return Answer::Done;
        }
        "/healthz" => {
            handshake::write_response(out, 200, "ok", "");
            return Answer::Done;
        }
        "/metrics" => {
            match &apps.exposition {
                Some(exposition) => {
                    handshake::write_body(out, 200, exposition::CONTENT_TYPE, "", exposition.render().as_bytes())
                }
                None => handshake::write_response(out, 404, "metrics are served on --metrics-listen", ""),
            }
            return Answer::Done;
        }
        "/" | "/chat" => {
            handshake::write_body(out, 200, web::HTML, web::PAGE_HEADERS, web::CHAT_PAGE.as_bytes());
            return Answer::Done;
        }
        "/dashboard" => {
            handshake::write_body(out, 200, web::HTML, web::PAGE_HEADERS, web::DASHBOARD_PAGE.as_bytes());
            return Answer::Done;
        }
        "/dashboard/events" => {
            return match web::authorize_dashboard(config, &apps.auth, request) {
                Ok(()) => {
                    out.extend_from_slice(LIVE_FEED_HEAD);
                    Answer::LiveFeed
                }
                Err(rejection) => {
                    handshake::write_rejection(out, &rejection);
                    Answer::Done
                }
            };
        }
        "/echo" if config.echo => false,
        "/ws" => true,
        _ => {
            handshake::write_response(out, 404, "no such endpoint", "");
            return Answer::Done;
        }
    };
    let decision =
        handshake::validate_upgrade(request, &config.subprotocols, config.deflate_policy()).and_then(|accept| {
            if chat {
                authorize(config, &apps.auth, &apps.hub, request).map(|who| (accept, Endpoint::Chat(who)))
            } else {
                Ok((accept, Endpoint::Echo))
            }
        });
    match decision {
        Ok((accept, endpoint)) => {
            handshake::write_accept(out, &accept);
            Answer::Upgrade(endpoint, accept.deflate)
        }
        Err(rejection) => {
            handshake::write_rejection(out, &rejection);
            Answer::Done
        }
    }
}

/// A server-sent event stream (the body lasts until the connection closes).
const LIVE_FEED_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";

/// The dashboard's feed: the board as one event a second, until the client goes away or
/// the shard stops. The wait between events is a read with a deadline, so a client that
/// closes is noticed at once and a stop interrupts it.
async fn live_feed(ctx: &ShardContext, apps: &Apps, slot: &ConnectionSlot) {
    let mut event = Vec::new();
    loop {
        event.clear();
        event.extend_from_slice(b"data: ");
        // Serialising a `Value` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut event, &web::live::snapshot(&apps.board));
        event.extend_from_slice(b"\n\n");
        if ctx.egress.write_all(slot, &event).await.is_err() {
            return;
        }
        match ctx.read(slot, true, None, Some(Duration::from_secs(1))).await {
            Ok(ReadOutcome::TimedOut | ReadOutcome::Data(_) | ReadOutcome::Outbound) => {}
            Ok(ReadOutcome::Eof | ReadOutcome::Stopping) | Err(_) => return,
        }
    }
}

fn handshake_timeout() -> Rejection {
    Rejection {
        status: 408,
        message: "the upgrade request did not arrive in time",
        extra_headers: "",
    }
}

async fn refuse(ctx: &ShardContext, slot: &ConnectionSlot, rejection: &Rejection) {
    ctx.counters.http(rejection.status);
    let mut out = Vec::new();
    handshake::write_rejection(&mut out, rejection);
    if ctx.egress.write_all(slot, &out).await.is_ok() {
        linger_close(ctx, slot).await;
    }
}
