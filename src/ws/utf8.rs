//! Incremental UTF-8 validation for text messages that arrive in pieces (fragments, or
//! parts of one frame split across reads). It fails as soon as the bytes seen so far can
//! no longer be the prefix of valid UTF-8, which the Autobahn "fail fast" cases check.

/// Carries the at most three bytes of a code point that a piece ended in the middle of.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    partial: [u8; 4],
    partial_len: u8,
}

/// The input is not, and cannot become, valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any carried bytes (a new message starts).
    pub fn reset(&mut self) {
        self.partial_len = 0;
    }

    /// Validates the next piece. `last` says the message ends with this piece, so a code
    /// point left incomplete is an error.
    pub fn feed(&mut self, mut data: &[u8], last: bool) -> Result<(), InvalidUtf8> {
        if self.partial_len > 0 {
            let have = self.partial_len as usize;
            let need = sequence_len(self.partial[0]) - have;
            let take = need.min(data.len());
            self.partial[have..have + take].copy_from_slice(&data[..take]);
            let now = have + take;
            data = &data[take..];
            match simdutf8::compat::from_utf8(&self.partial[..now]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_none() && !last => {
                    // Still a valid but incomplete prefix: wait for more.
                    self.partial_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        match simdutf8::compat::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() && !last => {
                let rest = &data[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.partial_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_split(data: &[u8], cuts: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &c in cuts {
            let c = c.clamp(start, data.len());
            v.feed(&data[start..c], false)?;
            start = c;
        }
        v.feed(&data[start..], true)
    }

    #[test]
    fn accepts_split_code_points() {
        let s = "κόσμε 𝄞 €".as_bytes();
        for i in 0..=s.len() {
            for j in i..=s.len() {
                assert_eq!(feed_split(s, &[i, j]), Ok(()), "cuts {i} {j}");
            }
        }
    }

    #[test]
    fn rejects_truncated_message() {
        assert_eq!(feed_split(&[0xE2, 0x82], &[1]), Err(InvalidUtf8));
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        // 0xF4 0x90 starts a code point above U+10FFFF: invalid before the message ends.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[b'a', 0xF4], false), Ok(()));
        assert_eq!(v.feed(&[0x90], false), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xED, 0xA0, 0x80], false), Err(InvalidUtf8)); // surrogate
    }

    proptest! {
        #[test]
        fn agrees_with_std(data in proptest::collection::vec(any::<u8>(), 0..64),
                           cuts in proptest::collection::vec(0usize..64, 0..4)) {
            let mut cuts = cuts;
            cuts.sort();
            let expected = std::str::from_utf8(&data).is_ok();
            prop_assert_eq!(feed_split(&data, &cuts).is_ok(), expected);
        }
    }
}
