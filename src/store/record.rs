//! One stored message as bytes (a store value): `ts_ms` (u64 LE), the sender (u8 length,
//! bytes), the client's id (u8 length, bytes; 0 for none), then the body to the end.

use super::{StoreError, Stored};

const CORRUPT: StoreError = StoreError::Corrupt("a message record is cut short or not UTF-8");

/// Appends the record of a message to `out`. Sender ids are at most 64 bytes and client
/// ids at most 128 (the protocol's limits).
pub fn encode(out: &mut Vec<u8>, ts_ms: u64, from: &str, client_id: Option<&str>, body: &[u8]) {
    let id = client_id.unwrap_or("");
    debug_assert!(from.len() <= u8::MAX as usize && id.len() <= u8::MAX as usize);
    out.extend_from_slice(&ts_ms.to_le_bytes());
    out.push(from.len() as u8);
    out.extend_from_slice(from.as_bytes());
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(body);
}

/// The message stored at `seq` as `bytes`.
pub fn decode(seq: u64, bytes: &[u8]) -> Result<Stored, StoreError> {
    let ts_ms = u64::from_le_bytes(bytes.get(..8).ok_or(CORRUPT)?.try_into().map_err(|_| CORRUPT)?);
    let mut rest = &bytes[8..];
    let mut field = || -> Result<String, StoreError> {
        let (&len, tail) = rest.split_first().ok_or(CORRUPT)?;
        let text = tail.get(..len as usize).ok_or(CORRUPT)?;
        rest = &tail[len as usize..];
        String::from_utf8(text.to_vec()).map_err(|_| CORRUPT)
    };
    let from = field()?;
    let client_id = Some(field()?).filter(|id| !id.is_empty());
    Ok(Stored {
        seq,
        from,
        client_id,
        ts_ms,
        body: rest.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip(ts in any::<u64>(), from in "[a-z0-9._@-]{1,64}", id in proptest::option::of("[ -~]{1,128}"),
                              body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut bytes = Vec::new();
            encode(&mut bytes, ts, &from, id.as_deref(), &body);
            let got = decode(7, &bytes).unwrap();
            prop_assert_eq!(got, Stored { seq: 7, from, client_id: id, ts_ms: ts, body });
        }

        #[test]
        fn cut_records_are_errors_not_panics(cut in 0usize..20) {
            let mut bytes = Vec::new();
            encode(&mut bytes, 1, "alice", Some("c-1"), b"{}");
            if cut < bytes.len() - 2 {
                prop_assert!(decode(1, &bytes[..cut]).is_err());
            }
        }
    }
}
