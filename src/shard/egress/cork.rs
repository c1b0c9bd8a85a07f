//! The cork: what a connection answers to one read, gathered and sent with one `sendmsg`.
//!
//! Headers, control frames and small payloads are copied into the cork's own bytes. Large
//! payloads that still sit in the input buffer (an echoed or forwarded frame that arrived
//! whole) are only referenced, so they go from the receive buffer to the socket without a
//! copy in user space. The input must stay untouched until `send` (the shard decodes and
//! sends without awaiting in between).

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use super::TlsConns;
use crate::chat::output::Reply;
use crate::sys::socket::{IoBatch, Push, IOV_BATCH};
use crate::ws::frame::{encode_header, MAX_HEADER_LEN};
use crate::ws::OpCode;

/// Payloads shorter than this are copied. Copying 2 KiB costs less than what a second
/// iovec costs: it turns a one-buffer `send` into a `sendmsg`, whose message header and
/// iovec array the kernel must copy in and check.
const BORROW_MIN: usize = 2048;
/// Owned bytes kept between rounds; a larger buffer (after a huge burst) shrinks back.
const RETAIN: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `bytes[range]`.
    Owned(Range<usize>),
    /// `input[range]`.
    Input(Range<usize>),
}

#[derive(Debug, Default)]
pub struct Cork {
    bytes: Vec<u8>,
    segments: Vec<Segment>,
    /// Address and length of this round's input, to recognise payloads that lie in it.
    input_addr: usize,
    input_len: usize,
    /// Frames and bytes queued since `take_queued` (the shard's `frames_out`, `bytes_out`).
    queued_frames: u64,
    queued_bytes: u64,
}

impl Cork {
    pub fn new() -> Self {
        Cork {
            bytes: Vec::with_capacity(64 * 1024),
            ..Default::default()
        }
    }

    /// Starts a round whose payloads may point into `input`.
    pub fn begin(&mut self, input: &[u8]) {
        self.input_addr = input.as_ptr() as usize;
        self.input_len = input.len();
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes queued in all segments.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.segments.iter().map(|s| seg_range(s).len()).sum()
    }

    /// Appends what `write` puts into the owned bytes (one frame), merged with an owned
    /// segment before it.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        write(&mut self.bytes);
        let end = self.bytes.len();
        if start == end {
            return;
        }
        self.queued_frames += 1;
        self.queued_bytes += (end - start) as u64;
        match self.segments.last_mut() {
            Some(Segment::Owned(r)) if r.end == start => r.end = end,
            _ => self.segments.push(Segment::Owned(start..end)),
        }
    }

    /// Appends one unmasked, unfragmented frame.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut header = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut header, true, opcode, payload.len() as u64, None);
        match self.input_range(payload) {
            Some(range) if payload.len() >= BORROW_MIN => {
                self.push_with(|b| b.extend_from_slice(&header[..n]));
                self.queued_bytes += range.len() as u64;
                self.segments.push(Segment::Input(range));
            }
            _ => self.push_with(|b| {
                b.extend_from_slice(&header[..n]);
                b.extend_from_slice(payload);
            }),
        }
    }

    /// Frames and bytes queued since the last call.
    pub fn take_queued(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.queued_frames),
            std::mem::take(&mut self.queued_bytes),
        )
    }

    /// Where `payload` lies in this round's input, if it does.
    fn input_range(&self, payload: &[u8]) -> Option<Range<usize>> {
        let start = (payload.as_ptr() as usize).checked_sub(self.input_addr)?;
        (start + payload.len() <= self.input_len).then(|| start..start + payload.len())
    }

    /// Sends everything with as few `sendmsg` calls as the socket allows, without blocking.
    /// Returns the part the socket did not take (copied out), and empties the cork.
    ///
    /// With `Push::WithFin` the caller closes the socket (or shuts down its sending side)
    /// next: one segment then carries the bytes and the FIN (one packet fewer for the
    /// peer to take in at every close).
    pub fn send(&mut self, tls: &TlsConns, fd: RawFd, input: &[u8], push: Push) -> io::Result<Option<Vec<u8>>> {
        debug_assert!(
            self.segments.iter().all(|s| !matches!(s, Segment::Input(_))) || input.as_ptr() as usize == self.input_addr
        );
        let result = self.send_inner(tls, fd, input, push);
        self.clear();
        if self.bytes.capacity() > RETAIN {
            self.bytes.shrink_to(RETAIN);
        }
        result
    }

    /// Everything queued, when all of it is in the cork's own bytes (nothing points into
    /// the input).
    pub fn owned_only(&self) -> Option<&[u8]> {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Owned(_)))
            .then_some(&self.bytes[..])
    }

    /// When the cork holds owned bytes followed by one payload in the input (an echoed
    /// frame that arrived whole, with its header), writes the owned bytes into the input
    /// right before the payload, so that the answer is one run of the input: one `send`
    /// instead of a two-slice `sendmsg`, and an answer the send batch can take without a
    /// copy. Returns that run. There is room: a client frame's own header (mask included)
    /// is four bytes longer than ours for the same payload, and what came before it in the
    /// input is decoded and referenced by nothing else.
    pub fn join_in_input(&mut self, input: &mut [u8]) -> Option<Range<usize>> {
        let [Segment::Owned(owned), Segment::Input(payload)] = &self.segments[..] else {
            return None;
        };
        debug_assert!(input.as_ptr() as usize == self.input_addr);
        let start = payload.start.checked_sub(owned.len())?;
        let joined = start..payload.end;
        input[joined.start..payload.start].copy_from_slice(&self.bytes[owned.clone()]);
        self.bytes.clear();
        self.segments.clear();
        self.segments.push(Segment::Input(joined.clone()));
        Some(joined)
    }

    /// Empties the cork (what it held went elsewhere).
    pub fn clear(&mut self) {
        self.input_addr = 0;
        self.input_len = 0;
        self.segments.clear();
        self.bytes.clear();
    }

    /// Everything queued, as one buffer (when it must wait behind an outbound queue).
    /// Empties the cork.
    pub fn take_all(&mut self, input: &[u8]) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.segments.iter().map(|s| seg_range(s).len()).sum());
        for seg in &self.segments {
            all.extend_from_slice(self.slice(seg, input));
        }
        self.clear();
        all
    }

    fn slice<'a>(&'a self, segment: &Segment, input: &'a [u8]) -> &'a [u8] {
        match segment {
            Segment::Owned(r) => &self.bytes[r.clone()],
            Segment::Input(r) => &input[r.clone()],
        }
    }

    fn send_inner(&self, tls: &TlsConns, fd: RawFd, input: &[u8], push: Push) -> io::Result<Option<Vec<u8>>> {
        let mut index = 0; // first segment not fully sent
        let mut offset = 0; // bytes of it already sent
        while index < self.segments.len() {
            let mut iov = IoBatch::new();
            for (i, seg) in self.segments[index..].iter().take(IOV_BATCH).enumerate() {
                iov.push(&self.slice(seg, input)[if i == 0 { offset } else { 0 }..]);
            }
            let batch_len = iov.bytes();
            let sent = tls.send(fd, &iov, push)?;
            // Advance over what was sent.
            let mut left = sent;
            while left > 0 {
                let seg_left = seg_range(&self.segments[index]).len() - offset;
                if left >= seg_left {
                    left -= seg_left;
                    index += 1;
                    offset = 0;
                } else {
                    offset += left;
                    left = 0;
                }
            }
            if sent < batch_len {
                break; // the socket is full
            }
        }
        if index == self.segments.len() {
            return Ok(None);
        }
        let mut rest = Vec::new();
        for (i, seg) in self.segments[index..].iter().enumerate() {
            rest.extend_from_slice(&self.slice(seg, input)[if i == 0 { offset } else { 0 }..]);
        }
        Ok(Some(rest))
    }
}

fn seg_range(s: &Segment) -> Range<usize> {
    match s {
        Segment::Owned(r) | Segment::Input(r) => r.clone(),
    }
}

impl Reply for Cork {
    fn text(&mut self, json: &[u8]) {
        self.frame(OpCode::Text, json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn borrows_large_payloads_from_the_input_and_copies_small_ones() {
        let input: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let mut cork = Cork::new();
        cork.begin(&input);
        cork.frame(OpCode::Binary, &input[10..3010]); // large, in the input: borrowed
        cork.frame(OpCode::Text, &input[0..5]); // small: copied
        let outside = vec![7u8; 2100];
        cork.frame(OpCode::Binary, &outside); // not in the input: copied
        assert_eq!(cork.segments.len(), 3, "{:?}", cork.segments);
        assert!(matches!(cork.segments[1], Segment::Input(ref r) if *r == (10..3010)));

        let (a, mut b) = UnixStream::pair().unwrap();
        let expected_len = cork.len();
        let rest = cork
            .send(&TlsConns::default(), a.as_raw_fd(), &input, Push::Now)
            .unwrap();
        assert!(rest.is_none());
        assert!(cork.is_empty());
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expected_len);
        let mut expected = Vec::new();
        crate::ws::write_frame(&mut expected, true, OpCode::Binary, &input[10..3010], None);
        crate::ws::write_frame(&mut expected, true, OpCode::Text, &input[0..5], None);
        crate::ws::write_frame(&mut expected, true, OpCode::Binary, &outside, None);
        assert_eq!(got, expected);
    }

    #[test]
    fn an_echoed_frame_is_joined_with_its_header_in_the_input() {
        // Two masked client frames, as they arrive: the second one's payload is echoed.
        let mut input = Vec::new();
        crate::ws::write_frame(&mut input, true, OpCode::Text, b"hi", Some([1, 2, 3, 4]));
        let payload_at = input.len() + 8; // 2 + 2 (length) + 4 (mask)
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        crate::ws::write_frame(&mut input, true, OpCode::Binary, &payload, Some([5, 6, 7, 8]));
        input[payload_at..].copy_from_slice(&payload); // as the decoder leaves it: unmasked
        let mut cork = Cork::new();
        cork.begin(&input);
        cork.frame(OpCode::Binary, &input[payload_at..]);
        let run = cork.join_in_input(&mut input).expect("header and payload are one run");
        assert_eq!(run, payload_at - 4..input.len());
        let mut expected = Vec::new();
        crate::ws::write_frame(&mut expected, true, OpCode::Binary, &payload, None);
        assert_eq!(&input[run.clone()], &expected[..]);
        assert_eq!(cork.segments, [Segment::Input(run)]);
        // The first frame, before the joined run, is untouched.
        assert_eq!(&input[..2], &[0x81, 0x82]);

        // Not joined: a payload with no room before it, or answers of more than one piece.
        let mut bare = payload.clone();
        cork.clear();
        cork.begin(&bare);
        cork.frame(OpCode::Binary, &bare);
        assert_eq!(cork.join_in_input(&mut bare), None);
        cork.clear();
        cork.begin(&input);
        cork.frame(OpCode::Binary, &input[payload_at..payload_at + 2500]);
        cork.frame(OpCode::Pong, b"");
        assert_eq!(cork.join_in_input(&mut input), None);
        assert_eq!(cork.segments.len(), 3);
    }

    /// Sends the cork into a socket that cannot take it all, checks that the rest came
    /// back, writes the rest itself and returns everything the peer read, in order.
    fn send_into_a_full_socket(cork: &mut Cork, input: &[u8]) -> Vec<u8> {
        let total = cork.len();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let rest = cork
            .send(&TlsConns::default(), a.as_raw_fd(), input, Push::Now)
            .unwrap()
            .expect("the frames are larger than a socket buffer");
        assert!(!rest.is_empty() && rest.len() < total);
        assert!(cork.is_empty());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        use std::io::Write;
        a.write_all(&rest).unwrap();
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), total);
        got
    }

    #[test]
    fn returns_what_a_full_socket_did_not_take() {
        // Large frames stay in the input: several segments, one `sendmsg`.
        let input = vec![3u8; 1 << 20];
        let mut cork = Cork::new();
        cork.begin(&input);
        for chunk in input.chunks(64 * 1024) {
            cork.frame(OpCode::Binary, chunk);
        }
        assert!(cork.segments.len() > 1);
        let mut expected = Vec::new();
        for chunk in input.chunks(64 * 1024) {
            crate::ws::write_frame(&mut expected, true, OpCode::Binary, chunk, None);
        }
        assert_eq!(send_into_a_full_socket(&mut cork, &input), expected);
    }

    #[test]
    fn small_frames_merge_into_one_buffer_and_a_full_socket_keeps_the_rest() {
        // Small frames are copied and merge into one segment: the one-slice path of
        // `IoBatch::send` (a plain `send`), including a partial send.
        let mut cork = Cork::new();
        cork.begin(&[]);
        let payloads: Vec<Vec<u8>> = (0..4096u32).map(|i| vec![i as u8; 300]).collect();
        for p in &payloads {
            cork.frame(OpCode::Binary, p);
        }
        assert_eq!(cork.segments.len(), 1);
        let mut expected = Vec::new();
        for p in &payloads {
            crate::ws::write_frame(&mut expected, true, OpCode::Binary, p, None);
        }
        assert_eq!(send_into_a_full_socket(&mut cork, &[]), expected);
    }
}
