//! The chat wire protocol: JSON text frames. Client envelopes are parsed without copying
//! their `body` (kept as raw JSON and forwarded as it arrived); server frames are written
//! by hand around it. User ids and room names are restricted to characters that never
//! need escaping in JSON; client-chosen `id`s are escaped.

use std::borrow::Cow;
use std::io::Write;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::auth::is_valid_user_id;
use crate::store::ConvId;

/// The longest client-chosen message id.
pub const MAX_ID_LEN: usize = 128;
/// Messages one `history` answer holds by default, and at most.
pub const HISTORY_DEFAULT_LIMIT: usize = 100;
pub const HISTORY_MAX_LIMIT: usize = 1000;

/// Room names follow the user id rules.
pub fn is_valid_room(room: &str) -> bool {
    is_valid_user_id(room)
}

/// A parsed client frame. Strings borrow the frame where they need no unescaping.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    Send {
        to: Cow<'a, str>,
        id: Option<Cow<'a, str>>,
        body: &'a RawValue,
    },
    Join {
        room: Cow<'a, str>,
        /// Also send the room's messages after this seq (recovering what was missed).
        since: Option<u64>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Publish {
        room: Cow<'a, str>,
        id: Option<Cow<'a, str>>,
        body: &'a RawValue,
    },
    /// Part of a stored conversation.
    History {
        conv: ConvId,
        range: HistoryRange,
        limit: usize,
        id: Option<Cow<'a, str>>,
    },
}

/// What a `history` request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRange {
    /// The oldest messages after `since` (catching up).
    Since(u64),
    /// The newest messages before `before`, or the newest of all (scrolling back).
    Before(Option<u64>),
}

/// The `code` of an error frame: what went wrong, for a program to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not a JSON object of the protocol, or a binary frame.
    BadJson,
    /// A `type` the protocol does not have.
    UnknownType,
    /// A missing or invalid field (`to`, `room`, `id`, `body`).
    BadField,
    /// Publishing to a room the user has not joined.
    NotMember,
    /// Joining a room the user's token does not grant.
    Forbidden,
    /// Over `--rate-limit` or `--rate-limit-bytes`, or a destination overloaded.
    RateLimited,
    /// Joining one room more than `--max-rooms-per-user`.
    TooManyRooms,
    /// Joining a room that has `--max-room-members` connections on the shard.
    RoomFull,
    /// In a cluster: the message may not have reached another node. With the store: it
    /// could not be written (it is not stored), or this gateway keeps no history.
    Unavailable,
    /// A conversation with nothing stored.
    NotFound,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::BadField,
        ErrorCode::NotMember,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::TooManyRooms,
        ErrorCode::RoomFull,
        ErrorCode::Unavailable,
        ErrorCode::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadField => "bad_field",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not_found",
        }
    }
}

/// An application error: answered with an error frame, the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    /// The `id` of the client frame it answers, when there was one.
    pub id: Option<String>,
}

impl AppError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        AppError {
            code,
            message: message.into(),
            id: None,
        }
    }

    pub fn with_id_str(mut self, id: Option<&str>) -> Self {
        self.id = id.map(str::to_string);
        self
    }

    fn with_id(mut self, id: &Option<Cow<'_, str>>) -> Self {
        self.id = id.as_ref().map(|s| s.to_string());
        self
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    conv: Option<Cow<'a, str>>,
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<u64>,
}

/// Parses one client text frame.
pub fn parse(frame: &[u8]) -> Result<ClientMessage<'_>, AppError> {
    let env: Envelope<'_> = serde_json::from_slice(frame).map_err(|e| {
        AppError::new(
            ErrorCode::BadJson,
            format!("not a JSON object of the chat protocol: {e}"),
        )
    })?;
    if let Some(id) = &env.id {
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(AppError::new(ErrorCode::BadField, "id must be 1-128 characters"));
        }
    }
    let kind = env
        .kind
        .as_deref()
        .ok_or_else(|| AppError::new(ErrorCode::BadField, "type is missing").with_id(&env.id))?;
    let room = |env: &Envelope<'_>| -> Result<(), AppError> {
        match env.room.as_deref() {
            Some(r) if is_valid_room(r) => Ok(()),
            _ => Err(AppError::new(ErrorCode::BadField, "room must be 1-64 of A-Z a-z 0-9 _ . @ -").with_id(&env.id)),
        }
    };
    match kind {
        "send" => {
            let body = body_of(&env)?;
            match env.to {
                Some(to) if is_valid_user_id(&to) => Ok(ClientMessage::Send { to, id: env.id, body }),
                _ => Err(AppError::new(ErrorCode::BadField, "to must be a user id").with_id(&env.id)),
            }
        }
        "join" | "leave" => {
            room(&env)?;
            let room = env.room.unwrap_or_default();
            Ok(if kind == "join" {
                ClientMessage::Join { room, since: env.since }
            } else {
                ClientMessage::Leave { room }
            })
        }
        "history" => history(env),
        "publish" => {
            room(&env)?;
            let body = body_of(&env)?;
            Ok(ClientMessage::Publish {
                room: env.room.unwrap_or_default(),
                id: env.id,
                body,
            })
        }
        other => Err(AppError::new(
            ErrorCode::UnknownType,
            format!("unknown type {:?}", truncate(other, 32)),
        )
        .with_id(&env.id)),
    }
}

fn history(env: Envelope<'_>) -> Result<ClientMessage<'_>, AppError> {
    let bad = |message: &'static str| Err(AppError::new(ErrorCode::BadField, message).with_id(&env.id));
    let conv = match env.conv.as_deref().and_then(conversation_of_client) {
        Some(conv) => conv,
        None => return bad("conv must be dm:<user>:<user> (the two ids in byte order) or room:<room>"),
    };
    let range = match (env.since, env.before) {
        (Some(_), Some(_)) => return bad("give since or before, not both"),
        (Some(since), None) => HistoryRange::Since(since),
        (None, before) => HistoryRange::Before(before),
    };
    let limit = match env.limit {
        None => HISTORY_DEFAULT_LIMIT,
        Some(n) if (1..=HISTORY_MAX_LIMIT as u64).contains(&n) => n as usize,
        Some(_) => return bad("limit must be 1-1000"),
    };
    Ok(ClientMessage::History {
        conv,
        range,
        limit,
        id: env.id,
    })
}

/// A conversation id from a client: its users or room checked as where they enter.
fn conversation_of_client(id: &str) -> Option<ConvId> {
    let conv = ConvId::from_stored(id)?;
    let valid = match (conv.direct_users(), conv.room_name()) {
        (Some((a, b)), _) => is_valid_user_id(a) && is_valid_user_id(b),
        (None, Some(room)) => is_valid_room(room),
        (None, None) => false,
    };
    valid.then_some(conv)
}

fn body_of<'a>(env: &Envelope<'a>) -> Result<&'a RawValue, AppError> {
    let body = env
        .body
        .ok_or_else(|| AppError::new(ErrorCode::BadField, "body is missing").with_id(&env.id))?;
    // The body is forwarded as it came. JSON's grammar lets a string hold half a UTF-16
    // surrogate pair (`"\ud800"`), which many decoders refuse (RFC 8259 §8.2): one
    // sender must not be able to send what its recipients cannot read.
    if has_unpaired_surrogate(body.get()) {
        return Err(
            AppError::new(ErrorCode::BadField, "body holds an unpaired UTF-16 surrogate escape").with_id(&env.id),
        );
    }
    Ok(body)
}

/// Does this (syntactically valid) JSON text escape half a surrogate pair?
fn has_unpaired_surrogate(json: &str) -> bool {
    let b = json.as_bytes();
    let hex = |at: usize| -> Option<u16> {
        let digits = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    let mut i = 0;
    while let Some(off) = b.get(i..).and_then(|rest| rest.iter().position(|&c| c == b'\\')) {
        i += off;
        if b.get(i + 1) != Some(&b'u') {
            i += 2; // `\"`, `\\`, `\n`, ...: skip the escaped character.
            continue;
        }
        let Some(unit) = hex(i + 2) else { return true };
        i += 6;
        match unit {
            0xD800..=0xDBFF => {
                let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                    .then(|| hex(i + 2))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 6;
            }
            0xDC00..=0xDFFF => return true,
            _ => {}
        }
    }
    false
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `{"type":"message","from":…,"to":…,"id":…,"ts":…,"body":…}`
pub fn write_message(out: &mut Vec<u8>, from: &str, to: &str, id: Option<&str>, ts_ms: u64, body: &RawValue) {
    out.extend_from_slice(b"{\"type\":\"message\",\"from\":\"");
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(b"\",\"to\":\"");
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(b"\"");
    write_id_ts_body(out, id, ts_ms, body);
}

/// `{"type":"room_message","room":…,"from":…,"id":…,"ts":…,"body":…}`
pub fn write_room_message(out: &mut Vec<u8>, room: &str, from: &str, id: Option<&str>, ts_ms: u64, body: &RawValue) {
    out.extend_from_slice(b"{\"type\":\"room_message\",\"room\":\"");
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(b"\",\"from\":\"");
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(b"\"");
    write_id_ts_body(out, id, ts_ms, body);
}

fn write_id_ts_body(out: &mut Vec<u8>, id: Option<&str>, ts_ms: u64, body: &RawValue) {
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, id);
    }
    let _ = write!(out, ",\"ts\":{ts_ms},\"body\":");
    out.extend_from_slice(body.get().as_bytes());
    out.push(b'}');
}

/// A stored message as its recipients see it, live or in a history page:
/// `{"type":"message","conv":…,"seq":…,"from":…,"to":…,"id":…,"ts":…,"body":…}` in a
/// direct conversation, `{"type":"room_message","conv":…,"seq":…,"room":…,"from":…,…}`
/// in a room.
pub fn write_stored_message(
    out: &mut Vec<u8>,
    conv: &ConvId,
    seq: u64,
    from: &str,
    id: Option<&str>,
    ts_ms: u64,
    body: &[u8],
) {
    let (kind, field, value) = match (conv.direct_users(), conv.room_name()) {
        (Some((a, b)), _) => ("message", "to", if from == a { b } else { a }),
        (None, room) => ("room_message", "room", room.unwrap_or_default()),
    };
    let _ = write!(
        out,
        "{{\"type\":\"{kind}\",\"conv\":\"{conv}\",\"seq\":{seq},\"from\":\"{from}\",\"{field}\":\"{value}\""
    );
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, id);
    }
    let _ = write!(out, ",\"ts\":{ts_ms},\"body\":");
    out.extend_from_slice(body);
    out.push(b'}');
}

/// `{"type":"ack","id":…,"status":"stored","conv":…,"seq":…}`: durable at that position.
pub fn write_ack_stored(out: &mut Vec<u8>, id: Option<&str>, conv: &ConvId, seq: u64) {
    out.extend_from_slice(b"{\"type\":\"ack\"");
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, id);
    }
    let _ = write!(out, ",\"status\":\"stored\",\"conv\":\"{conv}\",\"seq\":{seq}}}");
}

/// `{"type":"ready","user":…,"convs":[{"conv":…,"seq":…},…]}`: with the store, where the
/// user's most recent conversations stand.
pub fn write_ready_with_conversations(out: &mut Vec<u8>, user: &str, convs: &[(ConvId, u64)]) {
    let _ = write!(out, "{{\"type\":\"ready\",\"user\":\"{user}\",\"convs\":[");
    for (i, (conv, seq)) in convs.iter().enumerate() {
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(out, "{comma}{{\"conv\":\"{conv}\",\"seq\":{seq}}}");
    }
    out.extend_from_slice(b"]}");
}

/// The start of a history page, up to its messages:
/// `{"type":"history","id":…,"conv":…,"messages":[`. `write_history_end` closes it.
pub fn write_history_start(out: &mut Vec<u8>, id: Option<&str>, conv: &ConvId) {
    out.extend_from_slice(b"{\"type\":\"history\"");
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, id);
    }
    let _ = write!(out, ",\"conv\":\"{conv}\",\"messages\":[");
}

/// Where a history page stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEnd {
    /// The conversation's latest seq.
    pub head: u64,
    /// The first seq still held.
    pub first: u64,
    /// More messages in the asked direction than this page holds.
    pub more: bool,
    /// Nothing asked for was trimmed by retention.
    pub recovered: bool,
}

/// `],"head":…,"first":…,"more":…,"recovered":…}`
pub fn write_history_end(out: &mut Vec<u8>, end: HistoryEnd) {
    let HistoryEnd {
        head,
        first,
        more,
        recovered,
    } = end;
    let _ = write!(
        out,
        "],\"head\":{head},\"first\":{first},\"more\":{more},\"recovered\":{recovered}}}"
    );
}

/// `{"type":"ack","id":…,"status":"routed"|"offline"}`
pub fn write_ack(out: &mut Vec<u8>, id: Option<&str>, status: &str) {
    out.extend_from_slice(b"{\"type\":\"ack\"");
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, id);
    }
    let _ = write!(out, ",\"status\":\"{status}\"}}");
}

/// `{"type":"joined"|"left","room":…}`: the membership change is in effect on every shard.
pub fn write_membership(out: &mut Vec<u8>, joined: bool, room: &str) {
    let kind = if joined { "joined" } else { "left" };
    let _ = write!(out, "{{\"type\":\"{kind}\",\"room\":\"{room}\"}}");
}

/// `{"type":"ready","user":…}`: the connection's user is reachable from every shard.
pub fn write_ready(out: &mut Vec<u8>, user: &str) {
    let _ = write!(out, "{{\"type\":\"ready\",\"user\":\"{user}\"}}");
}

/// `{"type":"error","code":…,"id":…,"message":…}`
pub fn write_error(out: &mut Vec<u8>, e: &AppError) {
    let _ = write!(out, "{{\"type\":\"error\",\"code\":\"{}\"", e.code.as_str());
    if let Some(id) = &e.id {
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, id);
    }
    out.extend_from_slice(b",\"message\":");
    write_json_str(out, &e.message);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_its_own_metrics_counter() {
        let names = ErrorCode::ALL.map(ErrorCode::as_str);
        assert_eq!(names, crate::metrics::counters::ERROR_CODES);
    }

    #[test]
    fn bodies_with_half_a_surrogate_pair_are_refused() {
        for ok in [
            r#""plain""#,
            r#""\ud83d\ude00""#,
            r#"{"a":"\\ud800"}"#,
            r#""\u00e9\n\"""#,
            "1",
        ] {
            assert!(!has_unpaired_surrogate(ok), "{ok}");
        }
        for bad in [
            r#""\ud800""#,
            r#""\ude00""#,
            r#""\ud83dx""#,
            r#""\ud83d\u0041""#,
            r#"["\uDBFF"]"#,
        ] {
            assert!(has_unpaired_surrogate(bad), "{bad}");
        }
        let frame = br#"{"type":"send","to":"b","body":"\ud800"}"#;
        assert_eq!(parse(frame).unwrap_err().code, ErrorCode::BadField);
    }
    use serde_json::Value;

    #[test]
    fn parses_every_client_type() {
        let m = parse(br#"{"type":"send","to":"user-b","id":"c-17","body":{"text":"hi","n":[1,2]}}"#).unwrap();
        match m {
            ClientMessage::Send { to, id, body } => {
                assert_eq!((to.as_ref(), id.as_deref()), ("user-b", Some("c-17")));
                assert_eq!(body.get(), r#"{"text":"hi","n":[1,2]}"#, "body is kept byte for byte");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse(br#"{"type":"join","room":"general"}"#).unwrap(), ClientMessage::Join { room, since: None } if room == "general")
        );
        assert!(
            matches!(parse(br#"{"type":"leave","room":"general"}"#).unwrap(), ClientMessage::Leave { room } if room == "general")
        );
        assert!(matches!(
            parse(br#"{"type":"publish","room":"g","id":"c-18","body":"x"}"#).unwrap(),
            ClientMessage::Publish { .. }
        ));
    }

    #[test]
    fn errors_have_the_right_codes() {
        let code = |frame: &[u8]| parse(frame).unwrap_err().code;
        assert_eq!(code(b"not json"), ErrorCode::BadJson);
        assert_eq!(code(b"[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(br#"{"type":"dance","id":"c-1"}"#), ErrorCode::UnknownType);
        assert_eq!(code(br#"{"to":"b","body":1}"#), ErrorCode::BadField);
        assert_eq!(code(br#"{"type":"send","to":"b"}"#), ErrorCode::BadField);
        assert_eq!(
            code(br#"{"type":"send","to":"bad user","body":1}"#),
            ErrorCode::BadField
        );
        assert_eq!(code(br#"{"type":"join","room":""}"#), ErrorCode::BadField);
        assert_eq!(code(br#"{"type":"publish","room":"r"}"#), ErrorCode::BadField);
        let e = parse(br#"{"type":"dance","id":"c-9"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c-9"));
    }

    #[test]
    fn server_frames_are_valid_json() {
        let body = RawValue::from_string(r#"{"text":"hé \"quoted\""}"#.into()).unwrap();
        let mut out = Vec::new();
        write_message(&mut out, "a", "b", Some("weird \"id\"\n"), 1764259200123, &body);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["id"], "weird \"id\"\n");
        assert_eq!(v["ts"], 1764259200123u64);
        assert_eq!(v["body"]["text"], "hé \"quoted\"");
        out.clear();
        write_room_message(&mut out, "general", "a", None, 5, &body);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["room"].as_str(), v.get("id")),
            (Some("room_message"), Some("general"), None)
        );
        out.clear();
        write_ack(&mut out, Some("c-1"), "offline");
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["status"], "offline");
        out.clear();
        write_error(
            &mut out,
            &AppError::new(ErrorCode::BadJson, "x \"y\"").with_id(&Some("i".into())),
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str(), v["message"].as_str()),
            (Some("bad_json"), Some("i"), Some("x \"y\""))
        );
        out.clear();
        write_membership(&mut out, true, "general");
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["type"], "joined");
    }

    #[test]
    fn stored_frames_are_valid_json_with_conv_and_seq() {
        let dm = ConvId::direct("bob", "alice");
        let mut out = Vec::new();
        write_history_start(&mut out, Some("h\"1"), &dm);
        write_stored_message(&mut out, &dm, 7, "bob", Some("c\n"), 5, br#"{"t":"hi"}"#);
        out.push(b',');
        write_stored_message(&mut out, &ConvId::room("lobby"), 3, "alice", None, 6, b"1");
        let end = HistoryEnd {
            head: 9,
            first: 2,
            more: true,
            recovered: false,
        };
        write_history_end(&mut out, end);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (&v["type"], &v["id"], &v["head"], &v["more"]),
            (&"history".into(), &"h\"1".into(), &9.into(), &true.into())
        );
        let (m, r) = (&v["messages"][0], &v["messages"][1]);
        assert_eq!(
            (&m["type"], &m["conv"], &m["seq"], &m["to"], &m["id"]),
            (
                &"message".into(),
                &"dm:alice:bob".into(),
                &7.into(),
                &"alice".into(),
                &"c\n".into()
            )
        );
        assert_eq!(
            (&r["type"], &r["room"], r.get("id")),
            (&"room_message".into(), &"lobby".into(), None)
        );
        out.clear();
        write_ack_stored(&mut out, None, &dm, 7);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (&v["status"], &v["conv"], &v["seq"]),
            (&"stored".into(), &"dm:alice:bob".into(), &7.into())
        );
        out.clear();
        write_ready_with_conversations(&mut out, "alice", &[(dm.clone(), 7), (ConvId::room("lobby"), 3)]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["convs"][1]["conv"], "room:lobby");
    }

    #[test]
    fn history_requests_are_checked() {
        let parsed = parse(br#"{"type":"history","conv":"dm:a:b","since":4,"limit":10,"id":"x"}"#).unwrap();
        assert!(matches!(
            parsed,
            ClientMessage::History {
                range: HistoryRange::Since(4),
                limit: 10,
                ..
            }
        ));
        let parsed = parse(br#"{"type":"history","conv":"room:r"}"#).unwrap();
        assert!(matches!(
            parsed,
            ClientMessage::History {
                range: HistoryRange::Before(None),
                limit: HISTORY_DEFAULT_LIMIT,
                ..
            }
        ));
        for bad in [
            r#"{"type":"history","conv":"dm:b:a"}"#,
            r#"{"type":"history","conv":"dm:a:b c"}"#,
            r#"{"type":"history","conv":"room:"}"#,
            r#"{"type":"history","conv":"dm:a:b","limit":0}"#,
            r#"{"type":"history","conv":"dm:a:b","limit":1001}"#,
            r#"{"type":"history","conv":"dm:a:b","since":1,"before":2}"#,
            r#"{"type":"history"}"#,
        ] {
            assert_eq!(parse(bad.as_bytes()).unwrap_err().code, ErrorCode::BadField, "{bad}");
        }
        assert_eq!(
            parse(br#"{"type":"history","conv":"dm:a:b","since":-1}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadJson
        );
    }
}
