//! permessage-deflate (RFC 7692), sans IO: the offer's negotiation, and messages deflated
//! and inflated one at a time.
//!
//! By default the server answers `server_no_context_takeover; client_no_context_takeover`
//! (§7.1.1: a server may impose both), so no connection keeps compression state between
//! messages: one `Deflater` and one `Inflater` per shard serve every connection, reset per
//! message, and an idle connection holds nothing for the extension. It also makes a
//! compressed frame independent of the connection: a room message is deflated once and
//! the same bytes go to every member that negotiated the extension. `Policy::Takeover`
//! keeps context where the client allows it, at a deflater and an inflater per connection.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::{encode_header, OpCode, MAX_HEADER_LEN};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";
/// What ends every message's deflate data (an empty stored block after a sync flush):
/// stripped by the sender, appended by the receiver (§7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Window sizes (bits) the RFC allows.
const MIN_WINDOW: u8 = 8;
const MAX_WINDOW: u8 = 15;
/// zlib (and zlib-rs) cannot deflate with a 256-byte window (8 bits): it uses 9. With no
/// context kept, no back-reference reaches further than the message's own start, so a
/// message of at most 256 bytes deflated with 9 bits is valid for an 8-bit window too.
const WINDOW_8_MAX_MESSAGE: usize = 256;

/// What the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// No permessage-deflate.
    Off,
    /// permessage-deflate with no context kept on either side (the server imposes it).
    NoContext,
    /// permessage-deflate, keeping context on each side whose offer does not ask
    /// otherwise: better ratios, about 340 KiB per connection that has used it (measured:
    /// bench/README.md, "Compression").
    Takeover,
}

/// What a connection agreed to. The client's messages are inflated with a 15-bit window,
/// which takes any window the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The largest window our deflate data may use for this peer (8 to 15).
    pub window_bits: u8,
    /// The peer asked for `server_max_window_bits`: the response must name it.
    window_named: bool,
    /// Our compressor keeps its context from message to message (for this connection).
    pub server_takeover: bool,
    /// The client's compressor does: our inflater for it must too.
    pub client_takeover: bool,
}

impl Agreed {
    /// The agreement of a client that offered no parameters, with no context kept.
    pub const DEFAULT: Agreed = Agreed {
        window_bits: MAX_WINDOW,
        window_named: false,
        server_takeover: false,
        client_takeover: false,
    };

    /// The `Sec-WebSocket-Extensions` value of the response.
    pub fn response(&self) -> String {
        let mut value = EXTENSION.to_string();
        if !self.server_takeover {
            value.push_str("; server_no_context_takeover");
        }
        if !self.client_takeover {
            value.push_str("; client_no_context_takeover");
        }
        if self.window_named {
            value.push_str(&format!("; server_max_window_bits={}", self.window_bits));
        }
        value
    }
}

/// One connection's side of permessage-deflate: what it agreed to and, where context is
/// kept, its own deflater and inflater (boxed: a connection without them pays a pointer).
pub struct ConnDeflate {
    pub agreed: Agreed,
    /// Our side keeps context: this connection's deflater.
    pub own_deflater: Option<Box<RefCell<Deflater>>>,
    /// The client's side keeps context: this connection's inflater.
    pub own_inflater: Option<Box<RefCell<Inflater>>>,
}

impl ConnDeflate {
    /// `level` is the zlib level of a deflater of the connection's own.
    pub fn new(agreed: Agreed, level: u32) -> Self {
        ConnDeflate {
            agreed,
            own_deflater: agreed
                .server_takeover
                .then(|| Box::new(RefCell::new(Deflater::keeping_context(level)))),
            own_inflater: agreed
                .client_takeover
                .then(|| Box::new(RefCell::new(Inflater::keeping_context()))),
        }
    }
}

/// Picks the first acceptable `permessage-deflate` offer among the values of every
/// `Sec-WebSocket-Extensions` header, in order (§5.1). An offer with an unknown parameter,
/// a parameter given twice or a value out of range is declined (the next one is tried);
/// `None` means the connection runs without the extension, which is not an error.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a [u8]>, policy: Policy) -> Option<Agreed> {
    if policy == Policy::Off {
        return None;
    }
    header_values
        .into_iter()
        .flat_map(|value| split_outside_quotes(value, b','))
        .find_map(|offer| accept_offer(offer, policy == Policy::Takeover))
}

/// Reads the client's side of a response (`Sec-WebSocket-Extensions` from a 101): whether
/// the server agreed to deflate and kept no context on either side, which is all our
/// clients can run with.
pub fn accepted_by_server(value: &[u8]) -> Option<Agreed> {
    let mut params = split_outside_quotes(value, b';');
    let name = params.next()?.trim_ascii();
    if !name.eq_ignore_ascii_case(EXTENSION.as_bytes()) {
        return None;
    }
    let mut agreed = Agreed::DEFAULT;
    let (mut server_nct, mut client_nct) = (false, false);
    for param in params {
        let (key, value) = split_param(param)?;
        match key.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" if value.is_none() => server_nct = true,
            b"client_no_context_takeover" if value.is_none() => client_nct = true,
            b"server_max_window_bits" => agreed.window_bits = window_bits(value?)?,
            b"client_max_window_bits" => {
                window_bits(value?)?;
            }
            _ => return None,
        }
    }
    (server_nct && client_nct).then_some(agreed)
}

/// `accepted_by_server` for a whole 101 response head: its `Sec-WebSocket-Extensions`.
pub fn accepted_in_response(head: &[u8]) -> Option<Agreed> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let line = line.trim_ascii();
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(b"sec-websocket-extensions")
            .then(|| accepted_by_server(&line[colon + 1..]))
            .flatten()
    })
}

fn accept_offer(offer: &[u8], takeover: bool) -> Option<Agreed> {
    let mut params = split_outside_quotes(offer, b';');
    let name = params.next()?.trim_ascii();
    if !name.eq_ignore_ascii_case(EXTENSION.as_bytes()) {
        return None;
    }
    let mut seen = [false; 4];
    let mut agreed = Agreed::DEFAULT;
    for param in params {
        let (key, value) = split_param(param)?;
        let (index, value_ok) = match key.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" => (0, value.is_none()),
            b"client_no_context_takeover" => (1, value.is_none()),
            b"server_max_window_bits" => {
                let bits = value.and_then(window_bits);
                if let Some(bits) = bits {
                    agreed.window_bits = bits;
                    agreed.window_named = true;
                }
                (2, bits.is_some())
            }
            // A hint we need not act on: our inflater takes any window. With a value it
            // must still be a valid one.
            b"client_max_window_bits" => (3, value.is_none_or(|v| window_bits(v).is_some())),
            _ => return None,
        };
        if seen[index] || !value_ok {
            return None;
        }
        seen[index] = true;
    }
    // Context is kept only where the policy allows it and the offer did not refuse it.
    agreed.server_takeover = takeover && !seen[0];
    agreed.client_takeover = takeover && !seen[1];
    Some(agreed)
}

/// `8` to `15`, as a token or a quoted string (§7.1.2: no leading zeros, no sign).
fn window_bits(value: &[u8]) -> Option<u8> {
    let value = match value {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    if value.is_empty() || value.len() > 2 || value[0] == b'0' || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let bits: u8 = std::str::from_utf8(value).ok()?.parse().ok()?;
    (MIN_WINDOW..=MAX_WINDOW).contains(&bits).then_some(bits)
}

/// `name` or `name=value`, trimmed; `None` for an empty name.
fn split_param(param: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let param = param.trim_ascii();
    let (key, value) = match param.iter().position(|&b| b == b'=') {
        Some(at) => (param[..at].trim_ascii(), Some(param[at + 1..].trim_ascii())),
        None => (param, None),
    };
    (!key.is_empty()).then_some((key, value))
}

/// Splits on `sep` outside double-quoted strings (another extension's parameter may quote
/// a comma or a semicolon).
fn split_outside_quotes(value: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let text = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, &b) in text.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                _ if b == sep && !quoted => {
                    rest = Some(&text[i + 1..]);
                    return Some(&text[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(text)
    })
}

/// Deflates whole messages, one at a time: with no context kept between them (a shard's
/// deflater, serving any connection), or with it (`keeping_context`, one connection's).
/// Holds a zlib state per window size in use, made on first use.
pub struct Deflater {
    level: Compression,
    by_window: [Option<Box<Compress>>; (MAX_WINDOW - MIN_WINDOW) as usize],
    out: Vec<u8>,
    stats: DeflateStats,
    /// One connection's deflater that keeps its context between messages.
    keep_context: bool,
}

/// What a deflater did since its stats were last taken.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeflateStats {
    /// Messages sent compressed.
    pub messages: u64,
    /// Their size before and after.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl std::ops::AddAssign for DeflateStats {
    fn add_assign(&mut self, o: DeflateStats) {
        self.messages += o.messages;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
    }
}

impl std::ops::Sub for DeflateStats {
    type Output = DeflateStats;

    /// What was done between two running totals (`self` the later).
    fn sub(self, o: DeflateStats) -> DeflateStats {
        DeflateStats {
            messages: self.messages.saturating_sub(o.messages),
            bytes_in: self.bytes_in.saturating_sub(o.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(o.bytes_out),
        }
    }
}

impl Deflater {
    /// `level`: 0 (store) to 9 (smallest); 1 costs the least CPU per byte saved.
    pub fn new(level: u32) -> Self {
        Deflater {
            level: Compression::new(level.min(9)),
            by_window: Default::default(),
            out: Vec::new(),
            stats: DeflateStats::default(),
            keep_context: false,
        }
    }

    /// One connection's deflater, keeping its context from message to message (context
    /// takeover): each message may refer back to earlier ones.
    pub fn keeping_context(level: u32) -> Self {
        Deflater {
            keep_context: true,
            ..Deflater::new(level)
        }
    }

    /// What it did since the last call.
    pub fn take_stats(&mut self) -> DeflateStats {
        std::mem::take(&mut self.stats)
    }

    /// Deflates `payload` for a peer that agreed to `window_bits`. `None` when it does not
    /// pay (the result is no smaller) or cannot be done within the window: the message
    /// then goes uncompressed, which every peer accepts (§6).
    pub fn deflate(&mut self, payload: &[u8], window_bits: u8) -> Option<&[u8]> {
        // A 9-bit stream stands in for an 8-bit window only where nothing earlier can be
        // referred to: short messages, no context kept.
        let window_8_unsafe = payload.len() > WINDOW_8_MAX_MESSAGE || self.keep_context;
        if payload.is_empty() || (window_bits == MIN_WINDOW && window_8_unsafe) {
            return None;
        }
        let bits = window_bits.clamp(MIN_WINDOW + 1, MAX_WINDOW);
        let level = self.level;
        let compress = self.by_window[usize::from(bits - MIN_WINDOW - 1)]
            .get_or_insert_with(|| Box::new(Compress::new_with_window_bits(level, false, bits)));
        if !self.keep_context {
            compress.reset();
        }
        self.out.clear();
        // Room for the worst case (zlib-rs's `deflateBound` for raw deflate, with 9-bit
        // literals at level 1, plus the sync flush): deflate must never run out of output
        // space, which zlib-rs 0.6 does not survive at level 1 (a panic in
        // `deflate_quick`, found by Autobahn's random-byte cases).
        let len = payload.len();
        self.out.reserve(len + len.div_ceil(8) + len.div_ceil(64) + 32);
        let taken_before = compress.total_in() as usize;
        let status = compress
            .compress_vec(payload, &mut self.out, FlushCompress::Sync)
            .unwrap_or(Status::BufError);
        let taken = compress.total_in() as usize - taken_before;
        let len = self.out.len().saturating_sub(TAIL.len());
        if status != Status::Ok || taken != payload.len() || !self.out.ends_with(&TAIL) || len >= payload.len() {
            // Not sent compressed: a context that holds this message would refer the
            // peer to bytes it never saw. A fresh stream is still a valid continuation
            // for the peer's inflater (it refers to nothing earlier).
            if self.keep_context {
                compress.reset();
            }
            return None;
        }
        self.stats += DeflateStats {
            messages: 1,
            bytes_in: payload.len() as u64,
            bytes_out: len as u64,
        };
        Some(&self.out[..len])
    }

    /// Releases a large output buffer (after a big message).
    pub fn trim(&mut self, keep: usize) {
        if self.out.capacity() > keep {
            self.out = Vec::new();
        }
    }
}

/// Appends one unmasked frame with RSV1 set (§6): a message deflated by `Deflater`.
pub fn write_compressed_frame(out: &mut Vec<u8>, opcode: OpCode, deflated: &[u8]) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut header, true, opcode, deflated.len() as u64, None);
    header[0] |= RSV1;
    out.reserve(n + deflated.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(deflated);
}

/// The frame header bit that marks a compressed message (§6).
pub const RSV1: u8 = 0x40;

/// The compressed twin of a whole unmasked, unfragmented data frame (as `text_frame`
/// makes), for a peer that agreed to `window_bits`; `None` for a payload under `min_size`
/// or one deflate does not shrink. Made once, it serves every peer with that window.
pub fn deflate_frame(deflater: &mut Deflater, frame: &[u8], window_bits: u8, min_size: usize) -> Option<Vec<u8>> {
    let (&first, rest) = frame.split_first()?;
    let header_len = super::frame::header_len(*rest.first()?);
    let opcode = OpCode::try_from(first & 0x0F).ok()?;
    let payload = frame.get(header_len..)?;
    if first & 0x80 == 0 || first & 0x70 != 0 || opcode.is_control() || opcode == OpCode::Continuation {
        return None;
    }
    if payload.len() < min_size.max(1) {
        return None;
    }
    let deflated = deflater.deflate(payload, window_bits)?;
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + deflated.len());
    write_compressed_frame(&mut out, opcode, deflated);
    Some(out)
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the message limit (found as soon as the limit is passed).
    TooBig,
    /// It is not deflate data.
    Corrupt,
}

/// Inflates whole messages, one at a time, with a 15-bit window (which takes the data of
/// any window the peer used).
pub struct Inflater {
    /// Made on first use.
    decompress: Option<Box<Decompress>>,
    out: Vec<u8>,
    /// One connection's inflater for a peer that keeps its context (context takeover).
    keep_context: bool,
    /// The peer ended its deflate stream (a final block): the next message starts anew.
    ended: bool,
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

/// Output room added at a time while inflating (doubling from here, up to the limit).
const INFLATE_STEP: usize = 4096;

impl Inflater {
    pub fn new() -> Self {
        Inflater {
            decompress: None,
            out: Vec::new(),
            keep_context: false,
            ended: false,
        }
    }

    /// One connection's inflater for a peer whose messages refer back to earlier ones.
    pub fn keeping_context() -> Self {
        Inflater {
            keep_context: true,
            ..Inflater::new()
        }
    }

    /// Inflates one message's payload (its deflate data without the tail). The output
    /// never grows past `limit + 1` bytes: a message that inflates beyond `limit` is
    /// refused as soon as it does.
    pub fn inflate(&mut self, deflated: &[u8], limit: usize) -> Result<&[u8], InflateError> {
        let decompress = self
            .decompress
            .get_or_insert_with(|| Box::new(Decompress::new_with_window_bits(false, MAX_WINDOW)));
        if !self.keep_context || self.ended {
            decompress.reset(false);
            self.ended = false;
        }
        self.out.clear();
        for input in [deflated, &TAIL[..]] {
            let mut at = 0;
            loop {
                if self.out.len() == self.out.capacity() {
                    let room = (self.out.capacity().max(INFLATE_STEP) * 2).min(limit.saturating_add(1));
                    if room <= self.out.len() {
                        return Err(InflateError::TooBig);
                    }
                    self.out.reserve_exact(room - self.out.len());
                }
                let (in_before, out_before) = (decompress.total_in(), self.out.len());
                let status = decompress
                    .decompress_vec(&input[at..], &mut self.out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                at += (decompress.total_in() - in_before) as usize;
                if self.out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // The sender ended the stream (a final block): anything after it,
                    // the tail included, is ignored.
                    self.ended = true;
                    return Ok(&self.out);
                }
                let progressed = decompress.total_in() > in_before || self.out.len() > out_before;
                // With room left, the inflater stopped because it wants more input.
                let room_left = self.out.len() < self.out.capacity();
                if room_left && (at == input.len() || !progressed) {
                    break;
                }
            }
        }
        Ok(&self.out)
    }

    /// Releases a large output buffer (after a big message), keeping at most `keep`.
    pub fn trim(&mut self, keep: usize) {
        if self.out.capacity() > keep {
            self.out = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer(values: &[&str]) -> Option<Agreed> {
        negotiate(values.iter().map(|v| v.as_bytes()), Policy::NoContext)
    }

    #[test]
    fn context_is_kept_only_where_allowed_and_not_refused() {
        let with = |value: &str| negotiate([value.as_bytes()], Policy::Takeover).unwrap();
        let both = with("permessage-deflate");
        assert!(both.server_takeover && both.client_takeover);
        assert_eq!(both.response(), "permessage-deflate");
        let server_only = with("permessage-deflate; client_no_context_takeover");
        assert!(server_only.server_takeover && !server_only.client_takeover);
        assert_eq!(server_only.response(), "permessage-deflate; client_no_context_takeover");
        let client_only = with("permessage-deflate; server_no_context_takeover; server_max_window_bits=10");
        assert!(!client_only.server_takeover && client_only.client_takeover);
        assert_eq!(
            client_only.response(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
        );
        assert_eq!(negotiate([&b"permessage-deflate"[..]], Policy::Off), None);
    }

    #[test]
    fn messages_refer_back_to_earlier_ones_with_context_kept() {
        let text =
            b"{\"type\":\"message\",\"from\":\"alice\",\"body\":{\"text\":\"see you at the meeting\"}}".repeat(8);
        let mut deflater = Deflater::keeping_context(1);
        let mut inflater = Inflater::keeping_context();
        let first = deflater.deflate(&text, 15).unwrap().to_vec();
        let second = deflater.deflate(&text, 15).unwrap().to_vec();
        assert!(second.len() < first.len() / 2, "{} vs {}", second.len(), first.len());
        assert_eq!(inflater.inflate(&first, 1 << 20).unwrap(), &text[..]);
        assert_eq!(inflater.inflate(&second, 1 << 20).unwrap(), &text[..]);
        // Noise is not sent compressed, and what follows it still inflates.
        let noise = incompressible(7u64, 3000);
        assert_eq!(deflater.deflate(&noise, 15), None);
        let third = deflater.deflate(&text, 15).unwrap().to_vec();
        assert_eq!(inflater.inflate(&third, 1 << 20).unwrap(), &text[..]);
        // A fresh inflater cannot read a message that refers back.
        assert!(Inflater::new().inflate(&second, 1 << 20) != Ok(&text[..]));
    }

    #[test]
    fn a_plain_offer_is_answered_with_no_context_takeover_both_ways() {
        let agreed = offer(&["permessage-deflate"]).unwrap();
        assert_eq!(agreed, Agreed::DEFAULT);
        assert_eq!(
            agreed.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        // What browsers send.
        let chrome = offer(&["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(chrome, Agreed::DEFAULT);
    }

    #[test]
    fn every_parameter_of_the_rfc_is_understood() {
        let all = offer(&[
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9",
        ])
        .unwrap();
        assert_eq!(all.window_bits, 10);
        assert!(all.response().ends_with("; server_max_window_bits=10"));
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=\"12\""])
                .unwrap()
                .window_bits,
            12
        );
        assert_eq!(
            offer(&["Permessage-Deflate ; Server_Max_Window_Bits = 8"])
                .unwrap()
                .window_bits,
            8
        );
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits=15"]),
            Some(Agreed::DEFAULT)
        );
    }

    #[test]
    fn bad_offers_are_declined_and_the_next_one_is_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=1x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; mystery",
            "permessage-deflate; =3",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(offer(&[bad]), None, "{bad:?}");
        }
        // Several offers, in one header or several: the first acceptable one wins.
        let agreed = offer(&[
            "foo; bar=\"a,b\", permessage-deflate; server_max_window_bits=20",
            "permessage-deflate; server_max_window_bits=11, permessage-deflate",
        ])
        .unwrap();
        assert_eq!(agreed.window_bits, 11);
    }

    #[test]
    fn a_client_reads_the_servers_answer() {
        let answer = Agreed::DEFAULT.response();
        assert_eq!(accepted_by_server(answer.as_bytes()), Some(Agreed::DEFAULT));
        let narrow = offer(&["permessage-deflate; server_max_window_bits=9"])
            .unwrap()
            .response();
        assert_eq!(accepted_by_server(narrow.as_bytes()).unwrap().window_bits, 9);
        // An answer that keeps context on either side is not one our clients can run.
        assert_eq!(accepted_by_server(b"permessage-deflate"), None);
        assert_eq!(
            accepted_by_server(b"permessage-deflate; server_no_context_takeover"),
            None
        );
        assert_eq!(accepted_by_server(b"other"), None);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nsec-websocket-extensions: {narrow}\r\n\r\n"
        );
        assert_eq!(accepted_in_response(head.as_bytes()).unwrap().window_bits, 9);
        assert_eq!(accepted_in_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), None);
    }

    #[test]
    fn the_rfc_example_inflates() {
        // RFC 7692 §7.2.3.1: "Hello" deflated, without the tail.
        let mut inflater = Inflater::new();
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(inflater.inflate(&hello, 100).unwrap(), b"Hello");
        // §7.2.3.3: "Hello" in a stored (uncompressed) block.
        let stored = [0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00];
        assert_eq!(inflater.inflate(&stored, 100).unwrap(), b"Hello");
        // A final block (BFINAL set), as some senders end a message.
        let last = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(inflater.inflate(&last, 100).unwrap(), b"Hello");
        assert_eq!(inflater.inflate(&[0xff, 0xff, 0xff], 100), Err(InflateError::Corrupt));
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_allocates_no_more() {
        let mut deflater = Deflater::new(9);
        let zeros = vec![0u8; 50 << 20];
        let bomb = deflater.deflate(&zeros, 15).unwrap().to_vec();
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        let mut inflater = Inflater::new();
        assert_eq!(inflater.inflate(&bomb, 1 << 20), Err(InflateError::TooBig));
        assert!(inflater.out.capacity() <= (1 << 20) + 1, "{}", inflater.out.capacity());
        // Exactly at the limit is fine.
        let exact = deflater.deflate(&zeros[..1 << 20], 15).unwrap().to_vec();
        assert_eq!(inflater.inflate(&exact, 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn random_bytes_of_every_size_are_safe_at_every_level() {
        let noise = incompressible(0x1234_5678_9abc_def1u64, 140_000);
        let mut inflater = Inflater::new();
        for level in [1, 6, 9] {
            let mut deflater = Deflater::new(level);
            for len in [16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072] {
                // Noise alone, and noise with a compressible half.
                let mut message = noise[..len].to_vec();
                assert_eq!(deflater.deflate(&message, 15), None, "level {level} len {len}");
                message[..len / 2].fill(b'a');
                if let Some(d) = deflater.deflate(&message, 15).map(<[u8]>::to_vec) {
                    assert_eq!(inflater.inflate(&d, len).unwrap(), &message[..]);
                }
            }
        }
    }

    #[test]
    fn what_does_not_shrink_is_not_deflated() {
        let mut deflater = Deflater::new(1);
        assert_eq!(deflater.deflate(b"", 15), None);
        let noise = incompressible(0x9E37_79B9_7F4A_7C15u64, 2000);
        assert_eq!(deflater.deflate(&noise, 15), None);
        // An 8-bit window only for messages no longer than it, with no context kept.
        let text = b"abcabcabc".repeat(40);
        assert!(deflater.deflate(&text[..255], 8).is_some());
        assert_eq!(deflater.deflate(&text, 8), None);
        assert_eq!(Deflater::keeping_context(1).deflate(&text[..255], 8), None);
    }

    #[test]
    fn a_frame_gets_a_compressed_twin_that_inflates_to_its_payload() {
        let json = br#"{"type":"msg","from":"alice","body":"hello hello hello hello hello"}"#.repeat(20);
        let frame = crate::ws::frame::text_frame(&json);
        let mut deflater = Deflater::new(1);
        let twin = deflate_frame(&mut deflater, &frame, 15, 512).unwrap();
        assert_eq!(twin[0], 0x80 | RSV1 | OpCode::Text as u8);
        let header_len = crate::ws::frame::header_len(twin[1]);
        assert_eq!(
            Inflater::new().inflate(&twin[header_len..], json.len()).unwrap(),
            &json[..]
        );
        // Under the threshold, or not a whole data frame: no twin.
        assert_eq!(deflate_frame(&mut deflater, &frame, 15, json.len() + 1), None);
        let mut ping = Vec::new();
        crate::ws::write_frame(&mut ping, true, OpCode::Ping, b"x", None);
        assert_eq!(deflate_frame(&mut deflater, &ping, 15, 0), None);
        assert_eq!(deflate_frame(&mut deflater, &[], 15, 0), None);
        assert_eq!(deflate_frame(&mut deflater, &twin, 15, 0), None, "already compressed");
    }

    /// `len` bytes no compressor can shrink (xorshift from `seed`).
    fn incompressible(mut x: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn json_like(seed: u64, len: usize) -> Vec<u8> {
        let words = [
            &b"\"type\":"[..],
            b"\"msg\"",
            b"\"to\":\"user-",
            b"\"body\":\"",
            b"hello ",
            b"42,",
            b"}",
        ];
        let mut out = Vec::with_capacity(len);
        let mut x = seed | 1;
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(words[(x % words.len() as u64) as usize]);
            if x.is_multiple_of(5) {
                out.push((x >> 8) as u8);
            }
        }
        out.truncate(len);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn inflate_undoes_deflate(seed in any::<u64>(), len in 1usize..40_000, bits in 8u8..=15, level in 0u32..=9) {
            let message = json_like(seed, len);
            let mut deflater = Deflater::new(level);
            let mut inflater = Inflater::new();
            if let Some(deflated) = deflater.deflate(&message, bits) {
                prop_assert!(deflated.len() < message.len());
                prop_assert_eq!(inflater.inflate(deflated, message.len()).unwrap(), &message[..]);
                // One byte under the size is refused.
                prop_assert_eq!(inflater.inflate(deflated, message.len() - 1), Err(InflateError::TooBig));
            }
        }
    }
}
