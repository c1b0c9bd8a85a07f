//! Shared pieces of the benchmark tools.

pub mod accounting;
pub mod epoll;
pub mod tls_client;

/// The most bytes of an HTTP response head a client reads before giving up.
pub const MAX_RESPONSE_HEAD: usize = 8192;

/// Adds `chunk`, just read, to the response head gathered so far. `Some(Some(end))` once
/// the head is whole (`end`: where what follows it starts), `Some(None)` while it is not,
/// `None` when the client should give up: the stream ended (an empty chunk) or the head is
/// over `MAX_RESPONSE_HEAD`.
pub fn gather_response_head(head: &mut Vec<u8>, chunk: &[u8]) -> Option<Option<usize>> {
    if chunk.is_empty() || head.len() > MAX_RESPONSE_HEAD {
        return None;
    }
    head.extend_from_slice(chunk);
    Some(head.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_whole_at_its_blank_line_and_given_up_when_too_long_or_ended() {
        let mut head = Vec::new();
        assert_eq!(
            gather_response_head(&mut head, b"HTTP/1.1 101 Switching\r\n"),
            Some(None)
        );
        assert_eq!(
            gather_response_head(&mut head, b"Upgrade: websocket\r\n\r\n\x81"),
            Some(Some(46))
        );
        assert_eq!(&head[46..], b"\x81", "the frame after the head is kept");
        assert_eq!(gather_response_head(&mut Vec::new(), b""), None, "the stream ended");
        let mut long = vec![b'x'; MAX_RESPONSE_HEAD + 1];
        assert_eq!(gather_response_head(&mut long, b"\r\n\r\n"), None);
    }
}
