//! Frame headers (RFC 6455 §5.2): parsing and encoding. No payload handling here.

use super::close::CloseCode;
use super::mask::apply_mask;

/// Frame opcodes. Unknown opcodes never become an `OpCode`: the decoder refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// An opcode RFC 6455 does not define (§5.2: the connection must fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownOpCode(pub u8);

impl TryFrom<u8> for OpCode {
    type Error = UnknownOpCode;

    fn try_from(v: u8) -> Result<OpCode, UnknownOpCode> {
        Ok(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return Err(UnknownOpCode(v)),
        })
    }
}

impl OpCode {
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// The longest header: 2 bytes, a 64-bit length and a mask key.
pub const MAX_HEADER_LEN: usize = 14;
/// Control frames carry at most 125 bytes (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A parsed header, before any validation against the connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    pub header_len: usize,
}

/// How many header bytes follow from the first two.
pub fn header_len(second_byte: u8) -> usize {
    let ext = match second_byte & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if second_byte & 0x80 != 0 { 4 } else { 0 }
}

/// Parses a header from `buf`, which must hold at least `header_len(buf[1])` bytes.
/// Returns `None` for a 64-bit length with the top bit set (§5.2 forbids it).
pub fn parse_header(buf: &[u8]) -> Option<RawHeader> {
    let b0 = buf[0];
    let b1 = buf[1];
    let mut at = 2;
    let payload_len = match b1 & 0x7F {
        126 => {
            at += 2;
            u64::from(u16::from_be_bytes([buf[2], buf[3]]))
        }
        127 => {
            at += 8;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return None;
            }
            len
        }
        n => u64::from(n),
    };
    let mask = if b1 & 0x80 != 0 {
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Some(RawHeader {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        payload_len,
        header_len: at,
    })
}

/// Encodes a header into `out`, returning its length. Lengths use the shortest form (§5.2).
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut at = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[at..at + 4].copy_from_slice(&m);
        at += 4;
    }
    at
}

/// Appends one whole frame to `out`. With a mask (client role) the payload is masked as
/// it is copied.
pub fn write_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, fin, opcode, payload.len() as u64, mask);
    out.reserve(n + payload.len());
    out.extend_from_slice(&hdr[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// One whole unmasked text frame carrying `json`, ready to share among recipients.
pub fn text_frame(json: &[u8]) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(MAX_HEADER_LEN + json.len());
    write_frame(&mut frame, true, OpCode::Text, json, None);
    bytes::Bytes::from(frame)
}

/// Appends a Close frame with `code` and `reason` (the reason is cut to fit 125 bytes at a
/// character boundary).
pub fn write_close(out: &mut Vec<u8>, code: CloseCode, reason: &str, mask: Option<[u8; 4]>) {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&u16::from(code).to_be_bytes());
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    write_frame(out, true, OpCode::Close, &payload[..2 + cut], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_shortest_form() {
        let mut h = [0u8; MAX_HEADER_LEN];
        assert_eq!(encode_header(&mut h, true, OpCode::Text, 125, None), 2);
        assert_eq!(encode_header(&mut h, true, OpCode::Text, 126, None), 4);
        assert_eq!(encode_header(&mut h, true, OpCode::Text, 65535, None), 4);
        assert_eq!(encode_header(&mut h, true, OpCode::Text, 65536, None), 10);
        assert_eq!(encode_header(&mut h, true, OpCode::Text, 65536, Some([1, 2, 3, 4])), 14);
        let parsed = parse_header(&h).unwrap();
        assert_eq!(parsed.payload_len, 65536);
        assert_eq!(parsed.mask, Some([1, 2, 3, 4]));
        assert_eq!(parsed.header_len, 14);
        assert_eq!(header_len(h[1]), 14);
    }

    #[test]
    fn top_bit_of_64bit_length_is_refused() {
        let mut buf = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        assert!(parse_header(&buf).is_none());
        buf[2] = 0x7F;
        assert!(parse_header(&buf).is_some());
    }

    #[test]
    fn close_reason_is_cut_at_char_boundary() {
        let mut out = Vec::new();
        let reason = "é".repeat(100);
        write_close(&mut out, CloseCode::GOING_AWAY, &reason, None);
        let len = (out[1] & 0x7F) as usize;
        assert!(len <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&out[4..2 + len]).is_ok());
    }
}
