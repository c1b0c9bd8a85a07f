//! The receiving half of a WebSocket connection, sans IO: bytes in, events out.
//!
//! Input is consumed as it arrives: a header split across reads is carried in a 14-byte
//! array, payload is unmasked in place, text is validated piece by piece, and a frame
//! whose whole payload sits in the input is handed out as a slice of that input (no copy).
//! Only messages that span reads or fragments are assembled in a buffer of the
//! connection's own, which is released afterwards, so an idle connection holds none.

use super::close::{parse_close_payload, BadClose, CloseCode};
use super::deflate::{InflateError, Inflater};
use super::frame::{header_len, parse_header, OpCode, RawHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use super::mask::apply_mask;
use super::utf8::Utf8Validator;

/// Which end of the connection we are: servers require masked frames, clients unmasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// What the peer sent. Slices borrow the input or the decoder and live until the callback
/// returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole data message; for `OpCode::Text` the payload is valid UTF-8.
    Message {
        opcode: OpCode,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer started or answered the closing handshake. Nothing after it is decoded.
    Close {
        code: Option<CloseCode>,
        reason: &'a str,
    },
}

/// The peer broke the protocol: close with this code and reason, then drop the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code})")]
pub struct ProtocolError {
    code: CloseCode,
    reason: &'static str,
}

impl ProtocolError {
    /// The close code to answer with (1002, 1007 or 1009).
    pub fn code(&self) -> CloseCode {
        self.code
    }

    /// Why, in words for the Close frame.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

const fn fail(code: CloseCode, reason: &'static str) -> ProtocolError {
    ProtocolError { code, reason }
}

impl ProtocolError {
    /// An error the connection's owner decides on (e.g. a resource limit of its own).
    pub const fn new(code: CloseCode, reason: &'static str) -> Self {
        fail(code, reason)
    }
}

/// RSV1 as `RawHeader::rsv` holds it (the three bits, RSV1 first).
const RSV1_BIT: u8 = 0b100;

const INVALID_UTF8: ProtocolError = fail(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message");

/// Inflates a whole compressed message (the limit applies to what it inflates to) and
/// checks a text message's UTF-8.
fn inflate<'i>(
    inflater: Option<&'i mut Inflater>,
    deflated: &[u8],
    opcode: OpCode,
    max_message: u64,
) -> Result<&'i [u8], ProtocolError> {
    // Unreachable: RSV1 is accepted only when an inflater was given. Were it not, 1011.
    let inflater = inflater.ok_or(fail(CloseCode::INTERNAL_ERROR, "compressed message not expected"))?;
    let limit = usize::try_from(max_message).unwrap_or(usize::MAX);
    let payload = inflater.inflate(deflated, limit).map_err(|e| match e {
        InflateError::TooBig => fail(CloseCode::MESSAGE_TOO_BIG, "message exceeds the size limit"),
        InflateError::Corrupt => fail(CloseCode::INVALID_PAYLOAD, "invalid compressed data"),
    })?;
    if opcode == OpCode::Text && simdutf8::basic::from_utf8(payload).is_err() {
        return Err(INVALID_UTF8);
    }
    Ok(payload)
}

/// An assembled-message buffer up to this capacity is kept for the next message; a larger
/// one is released so that one big message does not pin memory on an idle connection.
const RETAIN_MESSAGE_BUFFER: usize = 512;

#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: OpCode,
    fin: bool,
    len: u64,
    done: u64,
    mask: Option<[u8; 4]>,
}

#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_message: u64,
    header: [u8; MAX_HEADER_LEN],
    header_have: u8,
    frame: Option<Frame>,
    /// The opcode (Text or Binary) of the data message in progress, and its length so far.
    message: Option<OpCode>,
    message_len: u64,
    message_buf: Vec<u8>,
    control_buf: Vec<u8>,
    utf8: Utf8Validator,
    /// The data message in progress is compressed: it is inflated once it is whole.
    compressed: bool,
    /// Set after a Close frame or a protocol error: later input is ignored.
    finished: bool,
}

impl Decoder {
    pub fn new(role: Role, max_message: usize) -> Self {
        Decoder {
            role,
            max_message: max_message as u64,
            header: [0; MAX_HEADER_LEN],
            header_have: 0,
            frame: None,
            message: None,
            message_len: 0,
            message_buf: Vec::new(),
            control_buf: Vec::new(),
            utf8: Utf8Validator::new(),
            compressed: false,
            finished: false,
        }
    }

    /// Bytes of memory the decoder holds for messages and control frames spread over
    /// reads or fragments (0 between messages that arrive whole).
    pub fn held(&self) -> usize {
        self.message_buf.capacity() + self.control_buf.capacity()
    }

    /// Decodes all of `input` (unmasking it in place), calling `on_event` for each complete
    /// message or control frame. Incomplete trailing data is carried over to the next call.
    pub fn feed<F>(&mut self, input: &mut [u8], on_event: &mut F) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>),
    {
        self.feed_with(input, None, on_event)
    }

    /// As `feed`, for a connection that agreed to permessage-deflate (RFC 7692): messages
    /// with RSV1 set are accepted and inflated with `inflater` (whose output the message
    /// events borrow), never past the message limit. `feed` refuses RSV1 (1002).
    pub fn feed_inflating<F>(
        &mut self,
        input: &mut [u8],
        inflater: &mut Inflater,
        on_event: &mut F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>),
    {
        self.feed_with(input, Some(inflater), on_event)
    }

    fn feed_with<F>(
        &mut self,
        input: &mut [u8],
        inflater: Option<&mut Inflater>,
        on_event: &mut F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>),
    {
        let result = self.feed_inner(input, inflater, on_event);
        if result.is_err() {
            self.finished = true;
        }
        result
    }

    fn feed_inner<F>(
        &mut self,
        input: &mut [u8],
        mut inflater: Option<&mut Inflater>,
        on_event: &mut F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>),
    {
        let mut pos = 0;
        loop {
            if self.finished {
                return Ok(());
            }
            let mut frame = match self.frame {
                Some(f) => f,
                None => match self.take_header(input, &mut pos)? {
                    Some(h) => self.begin_frame(h, inflater.is_some())?,
                    None => return Ok(()),
                },
            };
            let remaining = frame.len - frame.done;
            let take = remaining.min((input.len() - pos) as u64) as usize;
            if take == 0 && remaining > 0 {
                self.frame = Some(frame);
                return Ok(());
            }
            let chunk = &mut input[pos..pos + take];
            pos += take;
            if let Some(m) = frame.mask {
                apply_mask(chunk, m, (frame.done & 3) as usize);
            }
            let whole = frame.done == 0 && take as u64 == frame.len;
            frame.done += take as u64;
            let frame_done = frame.done == frame.len;
            self.frame = if frame_done { None } else { Some(frame) };

            if frame.opcode.is_control() {
                if !frame_done {
                    self.control_buf.extend_from_slice(chunk);
                    continue;
                }
                if whole {
                    self.control(frame.opcode, chunk, on_event)?;
                } else {
                    self.control_buf.extend_from_slice(chunk);
                    let payload = std::mem::take(&mut self.control_buf);
                    self.control(frame.opcode, &payload, on_event)?;
                }
                continue;
            }

            let opcode = self.message.unwrap_or(OpCode::Binary);
            let last = frame_done && frame.fin;
            // A compressed text message is validated once inflated.
            if opcode == OpCode::Text && !self.compressed && self.utf8.feed(chunk, last).is_err() {
                return Err(INVALID_UTF8);
            }
            if whole && frame.fin && frame.opcode != OpCode::Continuation {
                if self.compressed {
                    let payload = inflate(inflater.as_deref_mut(), chunk, opcode, self.max_message)?;
                    on_event(Event::Message { opcode, payload });
                } else {
                    on_event(Event::Message { opcode, payload: chunk });
                }
            } else {
                if frame.done == take as u64 {
                    // A frame's first bytes: room for all of it at once (its length is
                    // within the limit), so that what a message will hold shows in
                    // `held` from its start, and the buffer never doubles past it.
                    self.message_buf.reserve_exact(frame.len as usize);
                }
                self.message_buf.extend_from_slice(chunk);
                if last && self.compressed {
                    let payload = inflate(inflater.as_deref_mut(), &self.message_buf, opcode, self.max_message)?;
                    on_event(Event::Message { opcode, payload });
                } else if last {
                    on_event(Event::Message {
                        opcode,
                        payload: &self.message_buf,
                    });
                }
            }
            if last {
                self.end_message();
            }
        }
    }

    /// Takes the next header out of the input, or carries a partial one over.
    fn take_header(&mut self, input: &[u8], pos: &mut usize) -> Result<Option<RawHeader>, ProtocolError> {
        const BAD_LENGTH: ProtocolError = fail(CloseCode::PROTOCOL_ERROR, "64-bit length with the top bit set");
        let avail = &input[*pos..];
        if self.header_have == 0 && avail.len() >= 2 && avail.len() >= header_len(avail[1]) {
            let total = header_len(avail[1]);
            *pos += total;
            return parse_header(&avail[..total]).map(Some).ok_or(BAD_LENGTH);
        }
        let mut have = self.header_have as usize;
        let mut from = *pos;
        while from < input.len() {
            let total = if have >= 2 { header_len(self.header[1]) } else { 2 };
            if have == total {
                break;
            }
            let n = (total - have).min(input.len() - from);
            self.header[have..have + n].copy_from_slice(&input[from..from + n]);
            have += n;
            from += n;
            if have >= 2 && have == header_len(self.header[1]) {
                break;
            }
        }
        *pos = from;
        if have >= 2 && have == header_len(self.header[1]) {
            self.header_have = 0;
            parse_header(&self.header[..have]).map(Some).ok_or(BAD_LENGTH)
        } else {
            self.header_have = have as u8;
            Ok(None)
        }
    }

    /// `deflate`: permessage-deflate was agreed (the caller gave an inflater).
    fn begin_frame(&mut self, h: RawHeader, deflate: bool) -> Result<Frame, ProtocolError> {
        let opcode = OpCode::try_from(h.opcode).map_err(|_| fail(CloseCode::PROTOCOL_ERROR, "unknown opcode"))?;
        // RSV1 marks a compressed message: only with permessage-deflate agreed, and only
        // on a message's first frame, never on a control frame (RFC 7692 §6.1).
        let rsv1 = h.rsv == RSV1_BIT;
        let starts_message = matches!(opcode, OpCode::Text | OpCode::Binary);
        if h.rsv != 0 && !(rsv1 && deflate && starts_message) {
            return Err(fail(
                CloseCode::PROTOCOL_ERROR,
                "reserved bits set without an extension",
            ));
        }
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(fail(CloseCode::PROTOCOL_ERROR, "client frames must be masked")),
            (Role::Client, true) => return Err(fail(CloseCode::PROTOCOL_ERROR, "server frames must not be masked")),
            _ => {}
        }
        if opcode.is_control() {
            if !h.fin {
                return Err(fail(CloseCode::PROTOCOL_ERROR, "fragmented control frame"));
            }
            if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(fail(CloseCode::PROTOCOL_ERROR, "control frame longer than 125 bytes"));
            }
        } else {
            match (opcode, self.message) {
                (OpCode::Continuation, None) => {
                    return Err(fail(CloseCode::PROTOCOL_ERROR, "continuation frame without a message"))
                }
                (OpCode::Text | OpCode::Binary, Some(_)) => {
                    return Err(fail(
                        CloseCode::PROTOCOL_ERROR,
                        "new message inside a fragmented message",
                    ))
                }
                (OpCode::Text | OpCode::Binary, None) => {
                    self.message = Some(opcode);
                    self.compressed = rsv1;
                }
                _ => {}
            }
            self.message_len += h.payload_len;
            if self.message_len > self.max_message {
                return Err(fail(CloseCode::MESSAGE_TOO_BIG, "message exceeds the size limit"));
            }
        }
        Ok(Frame {
            opcode,
            fin: h.fin,
            len: h.payload_len,
            done: 0,
            mask: h.mask,
        })
    }

    fn control<F>(&mut self, opcode: OpCode, payload: &[u8], on_event: &mut F) -> Result<(), ProtocolError>
    where
        F: FnMut(Event<'_>),
    {
        match opcode {
            OpCode::Ping => on_event(Event::Ping(payload)),
            OpCode::Pong => on_event(Event::Pong(payload)),
            _ => match parse_close_payload(payload) {
                Ok((code, reason)) => {
                    self.finished = true;
                    on_event(Event::Close { code, reason });
                }
                Err(BadClose::Protocol) => return Err(fail(CloseCode::PROTOCOL_ERROR, "invalid close frame")),
                Err(BadClose::Utf8) => return Err(fail(CloseCode::INVALID_PAYLOAD, "close reason is not UTF-8")),
            },
        }
        Ok(())
    }

    fn end_message(&mut self) {
        self.message = None;
        self.compressed = false;
        self.message_len = 0;
        self.utf8.reset();
        if self.message_buf.capacity() > RETAIN_MESSAGE_BUFFER {
            self.message_buf = Vec::new();
        } else {
            self.message_buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{write_close, write_frame};
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Msg(OpCode, Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
    }

    const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

    /// Feeds `wire` in pieces cut at `cuts`, collecting events until the first error.
    fn decode_split(wire: &[u8], cuts: &[usize], max: usize) -> (Vec<Owned>, Option<ProtocolError>) {
        decode_with(wire, cuts, max, false)
    }

    /// `decode_split`, with permessage-deflate agreed when `deflate` is set.
    fn decode_with(wire: &[u8], cuts: &[usize], max: usize, deflate: bool) -> (Vec<Owned>, Option<ProtocolError>) {
        let mut d = Decoder::new(Role::Server, max);
        let mut inflater = Inflater::new();
        let mut wire = wire.to_vec();
        let mut events = Vec::new();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(wire.len())).collect();
        bounds.sort();
        bounds.push(wire.len());
        for end in bounds {
            let end = end.max(start);
            let mut on_event = |e: Event<'_>| {
                events.push(match e {
                    Event::Message { opcode, payload } => Owned::Msg(opcode, payload.to_vec()),
                    Event::Ping(p) => Owned::Ping(p.to_vec()),
                    Event::Pong(p) => Owned::Pong(p.to_vec()),
                    Event::Close { code, reason } => Owned::Close(code.map(u16::from), reason.to_string()),
                })
            };
            let res = if deflate {
                d.feed_inflating(&mut wire[start..end], &mut inflater, &mut on_event)
            } else {
                d.feed(&mut wire[start..end], &mut on_event)
            };
            if let Err(e) = res {
                return (events, Some(e));
            }
            start = end;
        }
        (events, None)
    }

    fn decode(wire: &[u8]) -> (Vec<Owned>, Option<ProtocolError>) {
        decode_split(wire, &[], 1 << 20)
    }

    fn error_code(wire: &[u8]) -> Option<u16> {
        decode(wire).1.map(|e| u16::from(e.code))
    }

    fn fragmented_text_with_ping() -> (Vec<u8>, Vec<Owned>) {
        let mut wire = Vec::new();
        write_frame(&mut wire, false, OpCode::Text, "héllo ".as_bytes(), MASK);
        write_frame(&mut wire, true, OpCode::Ping, b"are you there", MASK);
        write_frame(&mut wire, false, OpCode::Continuation, "wörld".as_bytes(), MASK);
        write_frame(&mut wire, true, OpCode::Continuation, &[0xF0, 0x9D, 0x84, 0x9E], MASK);
        write_frame(&mut wire, true, OpCode::Binary, &[0u8; 300], MASK);
        write_frame(&mut wire, true, OpCode::Binary, &[], MASK);
        write_frame(&mut wire, true, OpCode::Pong, b"", MASK);
        write_frame(&mut wire, true, OpCode::Binary, &vec![7u8; 70_000], MASK);
        write_close(&mut wire, CloseCode::NORMAL, "bye", MASK);
        write_frame(&mut wire, true, OpCode::Text, b"after close", MASK);
        let expected = vec![
            Owned::Ping(b"are you there".to_vec()),
            Owned::Msg(OpCode::Text, "héllo wörld𝄞".as_bytes().to_vec()),
            Owned::Msg(OpCode::Binary, vec![0u8; 300]),
            Owned::Msg(OpCode::Binary, vec![]),
            Owned::Pong(vec![]),
            Owned::Msg(OpCode::Binary, vec![7u8; 70_000]),
            Owned::Close(Some(1000), "bye".into()),
        ];
        (wire, expected)
    }

    #[test]
    fn every_single_split_gives_the_same_events() {
        let (wire, expected) = fragmented_text_with_ping();
        // Every cut among the small frames and around the 70 KB one; a stride inside its bulk.
        let big_start = wire.len() - 70_000 - 200;
        let cuts = (0..=wire.len()).filter(|&c| c < big_start + 300 || c > wire.len() - 300 || c % 97 == 0);
        for cut in cuts {
            assert_eq!(
                decode_split(&wire, &[cut], 1 << 20),
                (expected.clone(), None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn many_small_pieces_give_the_same_events() {
        let (wire, expected) = fragmented_text_with_ping();
        let cuts: Vec<usize> = (0..wire.len()).filter(|c| c % 13 == 0 || *c < 600).collect();
        assert_eq!(decode_split(&wire, &cuts, 1 << 20), (expected, None));
    }

    #[test]
    fn unmasked_client_frame_is_1002() {
        let mut wire = Vec::new();
        write_frame(&mut wire, true, OpCode::Text, b"hi", None);
        assert_eq!(error_code(&wire), Some(1002));
    }

    #[test]
    fn masked_server_frame_is_refused_by_client() {
        let mut wire = Vec::new();
        write_frame(&mut wire, true, OpCode::Text, b"hi", MASK);
        let mut d = Decoder::new(Role::Client, 100);
        assert_eq!(d.feed(&mut wire, &mut |_| {}).map_err(|e| u16::from(e.code)), Err(1002));
    }

    #[test]
    fn reserved_bits_are_1002() {
        for rsv in [0x40u8, 0x20, 0x10] {
            let mut wire = Vec::new();
            write_frame(&mut wire, true, OpCode::Text, b"hi", MASK);
            wire[0] |= rsv;
            assert_eq!(error_code(&wire), Some(1002));
        }
    }

    #[test]
    fn unknown_opcodes_are_1002() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let wire = [0x80 | op, 0x80, 1, 2, 3, 4];
            assert_eq!(error_code(&wire), Some(1002), "opcode {op}");
        }
    }

    #[test]
    fn control_frame_rules() {
        let mut wire = Vec::new();
        write_frame(&mut wire, false, OpCode::Ping, b"x", MASK);
        assert_eq!(error_code(&wire), Some(1002));
        let mut wire = Vec::new();
        write_frame(&mut wire, true, OpCode::Ping, &[0u8; 126], MASK);
        assert_eq!(error_code(&wire), Some(1002));
        let mut wire = Vec::new();
        write_frame(&mut wire, true, OpCode::Ping, &[9u8; 125], MASK);
        assert_eq!(decode(&wire), (vec![Owned::Ping(vec![9u8; 125])], None));
    }

    #[test]
    fn fragment_sequencing_is_enforced() {
        let mut wire = Vec::new();
        write_frame(&mut wire, true, OpCode::Continuation, b"x", MASK);
        assert_eq!(error_code(&wire), Some(1002));
        let mut wire = Vec::new();
        write_frame(&mut wire, false, OpCode::Text, b"x", MASK);
        write_frame(&mut wire, true, OpCode::Text, b"y", MASK);
        assert_eq!(error_code(&wire), Some(1002));
    }

    #[test]
    fn oversized_message_is_1009_before_its_payload_arrives() {
        let mut wire = Vec::new();
        write_frame(&mut wire, false, OpCode::Binary, &[0u8; 60], MASK);
        write_frame(&mut wire, true, OpCode::Continuation, &[0u8; 60], MASK);
        let (events, err) = decode_split(&wire, &[], 100);
        assert!(events.is_empty());
        assert_eq!(err.map(|e| u16::from(e.code)), Some(1009));
        // Only the header of the second frame is needed to refuse it.
        let (_, err) = decode_split(&wire[..60 + 6 + 6], &[], 100);
        assert_eq!(err.map(|e| u16::from(e.code)), Some(1009));
    }

    #[test]
    fn top_bit_length_is_1002() {
        let wire = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(error_code(&wire), Some(1002));
    }

    #[test]
    fn invalid_utf8_fails_fast_across_fragments() {
        let mut wire = Vec::new();
        write_frame(&mut wire, false, OpCode::Text, "κόσμε".as_bytes(), MASK);
        write_frame(&mut wire, false, OpCode::Continuation, &[0xF4, 0x90, 0x80, 0x80], MASK);
        let first_two = wire.len();
        write_frame(&mut wire, true, OpCode::Continuation, b"edited", MASK);
        let (_, err) = decode_split(&wire[..first_two], &[], 1 << 20);
        assert_eq!(err.map(|e| u16::from(e.code)), Some(1007));
    }

    #[test]
    fn invalid_utf8_fails_fast_inside_one_frame() {
        let mut wire = Vec::new();
        let mut payload = b"hello".to_vec();
        payload.extend_from_slice(&[0xED, 0xA0, 0x80]);
        payload.extend_from_slice(&[b'z'; 100]);
        write_frame(&mut wire, true, OpCode::Text, &payload, MASK);
        // Only part of the frame has arrived, and it already cannot be valid.
        let (_, err) = decode_split(&wire[..6 + 2 + 8], &[], 1 << 20);
        assert_eq!(err.map(|e| u16::from(e.code)), Some(1007));
    }

    #[test]
    fn close_frame_rules() {
        let close = |payload: &[u8]| {
            let mut wire = Vec::new();
            write_frame(&mut wire, true, OpCode::Close, payload, MASK);
            decode(&wire)
        };
        assert_eq!(close(&[]), (vec![Owned::Close(None, String::new())], None));
        assert_eq!(close(&[0x03]).1.map(|e| u16::from(e.code)), Some(1002));
        assert_eq!(close(&[0x03, 0xEE]).1.map(|e| u16::from(e.code)), Some(1002)); // 1006
        assert_eq!(close(&[0x03, 0xE8, 0xC0]).1.map(|e| u16::from(e.code)), Some(1007));
        assert_eq!(
            close(&[0x0F, 0xA0, b'x']),
            (vec![Owned::Close(Some(4000), "x".into())], None)
        );
    }

    #[test]
    fn nothing_is_decoded_after_an_error() {
        let mut d = Decoder::new(Role::Server, 100);
        let mut bad = vec![0x81, 0x02, b'h', b'i'];
        assert!(d.feed(&mut bad, &mut |_| {}).is_err());
        let mut good = Vec::new();
        write_frame(&mut good, true, OpCode::Text, b"ok", MASK);
        let mut seen = 0;
        assert!(d.feed(&mut good, &mut |_| seen += 1).is_ok());
        assert_eq!(seen, 0);
    }

    /// A message deflated and cut into `pieces` frames, RSV1 on the first (client-masked).
    fn write_deflated(wire: &mut Vec<u8>, opcode: OpCode, message: &[u8], pieces: usize) {
        let mut deflater = crate::ws::deflate::Deflater::new(6);
        let deflated = deflater.deflate(message, 15).expect("compressible").to_vec();
        let step = deflated.len() / pieces + 1;
        let parts: Vec<&[u8]> = deflated.chunks(step).collect();
        for (i, part) in parts.iter().enumerate() {
            let op = if i == 0 { opcode } else { OpCode::Continuation };
            let at = wire.len();
            write_frame(wire, i + 1 == parts.len(), op, part, MASK);
            if i == 0 {
                wire[at] |= 0x40;
            }
        }
    }

    #[test]
    fn compressed_messages_inflate_whole_or_in_fragments() {
        let text = "héllo wörld, ".repeat(50);
        let mut wire = Vec::new();
        write_deflated(&mut wire, OpCode::Text, text.as_bytes(), 1);
        write_frame(&mut wire, true, OpCode::Binary, b"plain", MASK);
        write_deflated(&mut wire, OpCode::Binary, text.as_bytes(), 3);
        let expected = vec![
            Owned::Msg(OpCode::Text, text.clone().into_bytes()),
            Owned::Msg(OpCode::Binary, b"plain".to_vec()),
            Owned::Msg(OpCode::Binary, text.clone().into_bytes()),
        ];
        for cut in 0..wire.len() {
            assert_eq!(
                decode_with(&wire, &[cut], 1 << 20, true),
                (expected.clone(), None),
                "cut {cut}"
            );
        }
        // Without the extension agreed, RSV1 is a protocol error.
        assert_eq!(decode(&wire).1.map(|e| u16::from(e.code)), Some(1002));
    }

    #[test]
    fn rsv1_only_on_the_first_frame_of_a_data_message() {
        let mut on_continuation = Vec::new();
        write_frame(&mut on_continuation, false, OpCode::Text, b"a", MASK);
        let at = on_continuation.len();
        write_frame(&mut on_continuation, true, OpCode::Continuation, b"b", MASK);
        on_continuation[at] |= 0x40;
        let mut on_ping = Vec::new();
        write_frame(&mut on_ping, true, OpCode::Ping, b"", MASK);
        on_ping[0] |= 0x40;
        let mut rsv2 = Vec::new();
        write_deflated(&mut rsv2, OpCode::Text, &b"x".repeat(100), 1);
        rsv2[0] |= 0x20;
        for wire in [on_continuation, on_ping, rsv2] {
            let code = decode_with(&wire, &[], 1 << 20, true).1.map(|e| u16::from(e.code));
            assert_eq!(code, Some(1002));
        }
    }

    #[test]
    fn compressed_messages_that_break_the_rules_close_with_the_right_code() {
        let code = |wire: &[u8], max: usize| decode_with(wire, &[], max, true).1.map(|e| u16::from(e.code));
        // Inflates past the limit: 1009, though the wire bytes are well under it.
        let mut bomb = Vec::new();
        write_deflated(&mut bomb, OpCode::Binary, &vec![0u8; 1 << 20], 1);
        assert!(bomb.len() < 4096);
        assert_eq!(code(&bomb, 64 * 1024), Some(1009));
        // Not deflate data: 1007.
        let mut garbage = Vec::new();
        write_frame(&mut garbage, true, OpCode::Binary, &[0xff; 20], MASK);
        garbage[0] |= 0x40;
        assert_eq!(code(&garbage, 1 << 20), Some(1007));
        // Text that inflates to invalid UTF-8: 1007.
        let mut bad_text = Vec::new();
        write_deflated(&mut bad_text, OpCode::Text, &[0xC0u8; 300], 2);
        assert_eq!(code(&bad_text, 1 << 20), Some(1007));
    }

    fn arb_message() -> impl Strategy<Value = (bool, Vec<u8>, usize)> {
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..400), 1usize..4)
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512),
                                    cuts in proptest::collection::vec(0usize..512, 0..6)) {
            let _ = decode_split(&data, &cuts, 256);
        }

        #[test]
        fn random_compressed_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                                len in 0usize..600, mask in any::<[u8; 4]>()) {
            // A frame with RSV1 and random bytes as its "deflate data".
            let mut wire = Vec::new();
            write_frame(&mut wire, true, OpCode::Binary, &data[..len.min(data.len())], Some(mask));
            wire[0] |= 0x40;
            let (_, error) = decode_with(&wire, &[], 1 << 16, true);
            if let Some(e) = error {
                prop_assert!(matches!(u16::from(e.code), 1007 | 1009), "{e:?}");
            }
        }

        #[test]
        fn encode_then_decode_round_trips(msgs in proptest::collection::vec(arb_message(), 1..6),
                                          cuts in proptest::collection::vec(0usize..4000, 0..8),
                                          mask in any::<[u8; 4]>()) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for (is_text, bytes, pieces) in msgs {
                let (opcode, payload) = if is_text {
                    (OpCode::Text, String::from_utf8_lossy(&bytes).into_owned().into_bytes())
                } else {
                    (OpCode::Binary, bytes)
                };
                let step = payload.len() / pieces + 1;
                let parts: Vec<&[u8]> = if payload.is_empty() { vec![&payload[..]] } else { payload.chunks(step).collect() };
                for (i, part) in parts.iter().enumerate() {
                    let op = if i == 0 { opcode } else { OpCode::Continuation };
                    write_frame(&mut wire, i + 1 == parts.len(), op, part, Some(mask));
                }
                expected.push(Owned::Msg(opcode, payload));
            }
            prop_assert_eq!(decode_split(&wire, &cuts, 1 << 20), (expected, None));
        }

        #[test]
        fn deflated_messages_round_trip_in_any_fragmentation(
            msgs in proptest::collection::vec((any::<bool>(), 1usize..3000, any::<u8>(), 1usize..5, any::<bool>()), 1..5),
            cuts in proptest::collection::vec(0usize..8000, 0..8),
        ) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for (is_text, len, seed, pieces, compress) in msgs {
                // Valid UTF-8 either way; past 100 bytes, a cycle of at most 28 repeats
                // often enough that deflate always shrinks it.
                let message: Vec<u8> = (0..len).map(|i| b'a' + ((i / (usize::from(seed % 7) + 1)) % 4) as u8).collect();
                let opcode = if is_text { OpCode::Text } else { OpCode::Binary };
                if compress && len > 100 {
                    write_deflated(&mut wire, opcode, &message, pieces);
                } else {
                    write_frame(&mut wire, true, opcode, &message, MASK);
                }
                expected.push(Owned::Msg(opcode, message));
            }
            prop_assert_eq!(decode_with(&wire, &cuts, 1 << 20, true), (expected, None));
        }
    }
}
