//! The opening handshake (RFC 6455 §4.2), sans IO: a request head in, a decision and the
//! response bytes out. Routing by path is the caller's; this module checks the rules.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

use super::deflate::{self, Agreed, Policy};

const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Headers a request may carry before it is refused with 431.
const MAX_HEADERS: usize = 64;

/// A refusal: the status, a one-line body and any headers the status requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub message: &'static str,
    pub extra_headers: &'static str,
}

const fn reject(status: u16, message: &'static str) -> Rejection {
    Rejection {
        status,
        message,
        extra_headers: "",
    }
}

/// A complete, parsed request head. Strings borrow the input buffer.
#[derive(Debug)]
pub struct Request<'b> {
    /// Bytes taken by the head; anything after it already belongs to the WebSocket stream.
    pub head_len: usize,
    pub method: &'b str,
    pub path: &'b str,
    pub query: &'b str,
    pub http11: bool,
    headers: Vec<(&'b str, &'b [u8])>,
}

impl<'b> Request<'b> {
    /// Every value of header `name` (case-insensitive).
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The value of header `name` when it appears exactly once.
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        let mut it = self.header_values(name);
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }

    /// Does any comma-separated token of header `name` equal `token` (case-insensitive)?
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// Parses a request head from the bytes read so far: `Ok(None)` while it is incomplete.
/// A head over `max_head` bytes, or with too many headers, is refused with 431.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<Request<'_>>, Rejection> {
    const TOO_LARGE: Rejection = reject(431, "request header fields too large");
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(reject(400, "malformed HTTP request")),
    };
    if head_len > max_head {
        return Err(TOO_LARGE);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let request = Request {
        head_len,
        method: req.method.unwrap_or(""),
        path,
        query,
        http11: req.version == Some(1),
        headers: req.headers.iter().map(|h| (h.name, h.value)).collect(),
    };
    if request.http11 && request.header("host").is_none() {
        return Err(reject(400, "missing or repeated Host header"));
    }
    let has_body = request.header_values("transfer-encoding").next().is_some()
        || request.header_values("content-length").any(|v| v.trim_ascii() != b"0");
    if has_body {
        return Err(reject(400, "a request body is not allowed here"));
    }
    Ok(Some(request))
}

/// What an accepted upgrade answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub accept_key: String,
    pub protocol: Option<String>,
    /// permessage-deflate, when the client offered it and the server allows it.
    pub deflate: Option<Agreed>,
}

/// Checks `req` against §4.2.1 and picks a subprotocol: the first of `supported` (the
/// server's order of preference) that the client offered. Unless `deflate` is off, an
/// acceptable permessage-deflate offer is taken (an unacceptable one is declined, not
/// refused).
pub fn validate_upgrade(req: &Request<'_>, supported: &[String], deflate: Policy) -> Result<Accept, Rejection> {
    if req.method != "GET" {
        return Err(Rejection {
            status: 405,
            message: "WebSocket upgrades use GET",
            extra_headers: "Allow: GET\r\n",
        });
    }
    if !req.http11 {
        return Err(reject(400, "WebSocket upgrades need HTTP/1.1"));
    }
    if !req.header_has_token("upgrade", "websocket") {
        return Err(Rejection {
            status: 426,
            message: "this endpoint speaks WebSocket only",
            extra_headers: "Upgrade: websocket\r\n",
        });
    }
    if !req.header_has_token("connection", "upgrade") {
        return Err(reject(400, "Connection header must contain 'Upgrade'"));
    }
    if req.header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(Rejection {
            status: 426,
            message: "only WebSocket version 13 is supported",
            extra_headers: "Sec-WebSocket-Version: 13\r\n",
        });
    }
    let key = req.header("sec-websocket-key").map(<[u8]>::trim_ascii).unwrap_or(b"");
    match BASE64.decode(key) {
        Ok(decoded) if decoded.len() == 16 => {}
        _ => {
            return Err(reject(
                400,
                "Sec-WebSocket-Key must be one base64-encoded 16-byte value",
            ))
        }
    }
    let protocol = supported
        .iter()
        .find(|p| req.header_has_token("sec-websocket-protocol", p))
        .cloned();
    let deflate = deflate::negotiate(req.header_values("sec-websocket-extensions"), deflate);
    Ok(Accept {
        accept_key: accept_key(key),
        protocol,
        deflate,
    })
}

/// `Sec-WebSocket-Accept` for a client key (§4.2.2 step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    BASE64.encode(sha.finalize())
}

/// Appends the 101 response.
pub fn write_accept(out: &mut Vec<u8>, accept: &Accept) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.accept_key.as_bytes());
    if let Some(p) = &accept.protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    if let Some(agreed) = &accept.deflate {
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        out.extend_from_slice(agreed.response().as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a short plain-text response that ends the connection.
pub fn write_response(out: &mut Vec<u8>, status: u16, message: &str, extra_headers: &str) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{message}\n",
        reason_phrase(status),
        message.len() + 1,
    );
}

/// Appends a whole response with `body` of `content_type` that ends the connection.
pub fn write_body(out: &mut Vec<u8>, status: u16, content_type: &str, extra_headers: &str, body: &[u8]) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        reason_phrase(status),
        body.len(),
    );
    out.extend_from_slice(body);
}

/// Appends the response for a refusal.
pub fn write_rejection(out: &mut Vec<u8>, r: &Rejection) {
    write_response(out, r.status, r.message, r.extra_headers);
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /echo?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn check(req: &str, protocols: &[&str]) -> Result<Accept, Rejection> {
        let supported: Vec<String> = protocols.iter().map(|s| s.to_string()).collect();
        let parsed = parse_request(req.as_bytes(), 8192)?.expect("complete request");
        validate_upgrade(&parsed, &supported, Policy::Off)
    }

    fn status(req: &str) -> u16 {
        check(req, &[]).err().map(|r| r.status).unwrap_or(101)
    }

    #[test]
    fn rfc_example_key() {
        let a = check(GOOD, &[]).unwrap();
        assert_eq!(a.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, None);
        let parsed = parse_request(GOOD.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(
            (parsed.path, parsed.query, parsed.head_len),
            ("/echo", "x=1", GOOD.len())
        );
    }

    #[test]
    fn partial_then_complete() {
        assert!(parse_request(&GOOD.as_bytes()[..GOOD.len() - 1], 8192)
            .unwrap()
            .is_none());
    }

    #[test]
    fn refusals_have_the_right_status() {
        assert_eq!(status(&GOOD.replace("GET", "POST")), 405);
        assert_eq!(status(&GOOD.replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status(&GOOD.replace("Host: example.com\r\n", "")), 400);
        assert_eq!(status(&GOOD.replace("Upgrade: WebSocket\r\n", "")), 426);
        assert_eq!(status(&GOOD.replace("Upgrade: WebSocket", "Upgrade: h2c")), 426);
        assert_eq!(status(&GOOD.replace("keep-alive, Upgrade", "keep-alive")), 400);
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&GOOD.replace("Sec-WebSocket-Version: 13\r\n", "")), 426);
        assert_eq!(status(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=")), 400);
        assert_eq!(
            status(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!notbase64!!!")),
            400
        );
        assert_eq!(
            status(&GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")),
            400
        );
        let two_keys = GOOD.replace(
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version",
        );
        assert_eq!(status(&two_keys), 400);
        assert_eq!(status(&GOOD.replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\n")), 400);
        assert_eq!(status("GARBAGE\r\n\r\n"), 400);
        let v426 = check(&GOOD.replace("Version: 13", "Version: 8"), &[]).unwrap_err();
        assert_eq!(v426.extra_headers, "Sec-WebSocket-Version: 13\r\n");
    }

    #[test]
    fn oversized_heads_are_431() {
        let big = GOOD.replace("Host:", &format!("X-Pad: {}\r\nHost:", "a".repeat(9000)));
        assert_eq!(parse_request(big.as_bytes(), 8192).unwrap_err().status, 431);
        assert_eq!(parse_request(&big.as_bytes()[..8500], 8192).unwrap_err().status, 431);
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = GOOD.replace("Host:", &format!("{many}Host:"));
        assert_eq!(parse_request(req.as_bytes(), 8192).unwrap_err().status, 431);
    }

    #[test]
    fn subprotocol_follows_server_preference() {
        let req = GOOD.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: chat.v1, chat.v2\r\n\r\n");
        assert_eq!(
            check(&req, &["chat.v2", "chat.v1"]).unwrap().protocol.as_deref(),
            Some("chat.v2")
        );
        assert_eq!(check(&req, &["other"]).unwrap().protocol, None);
        let mut out = Vec::new();
        write_accept(&mut out, &check(&req, &["chat.v1"]).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Sec-WebSocket-Protocol: chat.v1\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn deflate_is_agreed_only_when_allowed_and_offered() {
        let offered = GOOD.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: x-custom, permessage-deflate; client_max_window_bits\r\n\r\n",
        );
        let parsed = parse_request(offered.as_bytes(), 8192).unwrap().unwrap();
        let accept = validate_upgrade(&parsed, &[], Policy::NoContext).unwrap();
        assert_eq!(accept.deflate, Some(Agreed::DEFAULT));
        let mut out = Vec::new();
        write_accept(&mut out, &accept);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ));
        assert_eq!(validate_upgrade(&parsed, &[], Policy::Off).unwrap().deflate, None);
        let plain = parse_request(GOOD.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(validate_upgrade(&plain, &[], Policy::NoContext).unwrap().deflate, None);
        let mut out = Vec::new();
        write_accept(&mut out, &validate_upgrade(&plain, &[], Policy::NoContext).unwrap());
        assert!(!String::from_utf8(out).unwrap().contains("Extensions"));
    }

    #[test]
    fn rejection_response_is_well_formed() {
        let mut out = Vec::new();
        write_rejection(
            &mut out,
            &check(&GOOD.replace("Version: 13", "Version: 8"), &[]).unwrap_err(),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
