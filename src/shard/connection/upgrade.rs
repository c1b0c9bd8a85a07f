//! The HTTP side of a connection: read the request head, answer it, and say which
//! endpoint an upgraded connection runs.

use std::time::Instant;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::{linger_close, Endpoint};
use crate::chat::session::authorize;
use crate::shard::context::{ConnectionSlot, ReadOutcome, ShardContext};
use crate::shard::Apps;
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
pub(super) async fn upgrade(
    ctx: &ShardContext,
    apps: &Apps,
    stream: &mut TcpStream,
    slot: &ConnectionSlot,
) -> Option<Upgraded> {
    let deadline = Instant::now() + ctx.config.handshake_timeout;
    let mut head: Vec<u8> = Vec::new();
    let request = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            refuse(ctx, stream, slot, &handshake_timeout()).await;
            return None;
        }
        match ctx.read(stream, Some(slot), true, None, Some(left)).await {
            Ok(ReadOutcome::Data(n)) => ctx.egress.copy_input(n, &mut head),
            Ok(ReadOutcome::TimedOut) => {
                refuse(ctx, stream, slot, &handshake_timeout()).await;
                return None;
            }
            Ok(ReadOutcome::Eof | ReadOutcome::Stopping | ReadOutcome::Outbound) | Err(_) => return None,
        }
        match handshake::parse_request(&head, ctx.config.max_request_head) {
            Ok(Some(request)) => break request,
            Ok(None) => continue,
            Err(rejection) => {
                refuse(ctx, stream, slot, &rejection).await;
                return None;
            }
        }
    };
    let mut out = Vec::new();
    match answer(ctx, apps, &request, &mut out) {
        Some((endpoint, deflate)) => {
            let head_len = request.head_len;
            stream.write_all(&out).await.ok()?;
            head.drain(..head_len);
            Some(Upgraded {
                leftover: head,
                endpoint,
                deflate,
            })
        }
        None => {
            if stream.write_all(&out).await.is_ok() {
                linger_close(ctx, stream, Some(slot)).await;
            }
            None
        }
    }
}

/// Writes the answer to `request` into `out`: a 101 and the endpoint to run (with the
/// deflate agreement, if any), or a plain answer (health check, refusal) and `None`.
fn answer(
    ctx: &ShardContext,
    apps: &Apps,
    request: &Request<'_>,
    out: &mut Vec<u8>,
) -> Option<(Endpoint, Option<Agreed>)> {
    let config = &ctx.config;
    let chat = match request.path {
        "/healthz" if request.method == "GET" => {
            handshake::write_response(out, 200, "ok", "");
            return None;
        }
        "/healthz" => {
            handshake::write_response(out, 405, "use GET", "Allow: GET\r\n");
            return None;
        }
        "/echo" if config.echo => false,
        "/ws" => true,
        _ => {
            handshake::write_response(out, 404, "no such endpoint", "");
            return None;
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
            Some((endpoint, accept.deflate))
        }
        Err(rejection) => {
            handshake::write_rejection(out, &rejection);
            None
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

async fn refuse(ctx: &ShardContext, stream: &mut TcpStream, slot: &ConnectionSlot, rejection: &Rejection) {
    let mut out = Vec::new();
    handshake::write_rejection(&mut out, rejection);
    if stream.write_all(&out).await.is_ok() {
        linger_close(ctx, stream, Some(slot)).await;
    }
}
