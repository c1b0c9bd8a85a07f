//! Close codes (RFC 6455 §7.4) and the payload of a Close frame.

/// A close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(u16);

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.0
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);

    /// May this code appear in a Close frame on the wire? 1004–1006 and 1015 are reserved
    /// and must never be sent; 1012–1014 are registered with IANA; 3000–4999 belong to
    /// libraries and applications; everything else is unassigned or invalid.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Why a Close frame from the peer is malformed: the close code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadClose {
    /// A one-byte payload, or a code that may not be sent: 1002.
    Protocol,
    /// A reason that is not UTF-8: 1007.
    Utf8,
}

/// Parses a Close payload into its code and reason (both absent for an empty payload).
pub fn parse_close_payload(payload: &[u8]) -> Result<(Option<CloseCode>, &str), BadClose> {
    match payload.len() {
        0 => Ok((None, "")),
        1 => Err(BadClose::Protocol),
        _ => {
            let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
            if !code.is_valid_on_wire() {
                return Err(BadClose::Protocol);
            }
            let reason = simdutf8::basic::from_utf8(&payload[2..]).map_err(|_| BadClose::Utf8)?;
            Ok((Some(code), reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_rules() {
        for c in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode(c).is_valid_on_wire(), "{c} should be valid");
        }
        for c in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert!(!CloseCode(c).is_valid_on_wire(), "{c} should be invalid");
        }
    }

    #[test]
    fn payload_rules() {
        assert_eq!(parse_close_payload(&[]), Ok((None, "")));
        assert_eq!(parse_close_payload(&[0x03]), Err(BadClose::Protocol));
        assert_eq!(parse_close_payload(&[0x03, 0xE8]), Ok((Some(CloseCode(1000)), "")));
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, b'o', b'k']),
            Ok((Some(CloseCode(1000)), "ok"))
        );
        assert_eq!(parse_close_payload(&[0x03, 0xED]), Err(BadClose::Protocol)); // 1005
        assert_eq!(parse_close_payload(&[0x03, 0xE8, 0xFF]), Err(BadClose::Utf8));
    }
}
