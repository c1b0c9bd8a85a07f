//! Masking (RFC 6455 §5.3), eight bytes at a time.
//!
//! The loop over `u64` words is written so that the compiler vectorises it; a byte loop
//! costs several times more on large frames.

/// XORs `buf` with `mask`, as if `buf` started `offset` bytes into the masked payload
/// (so a payload that arrives in pieces can be unmasked piece by piece).
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let rot = offset & 3;
    let m = [mask[rot], mask[(rot + 1) & 3], mask[(rot + 2) & 3], mask[(rot + 3) & 3]];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // Each 8-byte chunk is a whole number of mask periods, so the tail starts at m[0].
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mask_bytewise(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    proptest! {
        #[test]
        fn matches_bytewise(data in proptest::collection::vec(any::<u8>(), 0..300),
                            mask in any::<[u8; 4]>(), offset in 0usize..16) {
            let mut fast = data.clone();
            let mut slow = data;
            apply_mask(&mut fast, mask, offset);
            mask_bytewise(&mut slow, mask, offset);
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn piecewise_equals_whole(data in proptest::collection::vec(any::<u8>(), 0..300),
                                  mask in any::<[u8; 4]>(), split in 0usize..300) {
            let split = split.min(data.len());
            let mut whole = data.clone();
            apply_mask(&mut whole, mask, 0);
            let mut pieces = data;
            let (a, b) = pieces.split_at_mut(split);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, split);
            prop_assert_eq!(whole, pieces);
        }
    }
}
