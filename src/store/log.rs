//! The embedded store's write-ahead log: each group of writes is appended to a file that
//! only the store thread touches and synced there (`fdatasync`) before any of it is
//! acknowledged; the engine (fjall) is written behind it by a thread of its own. The
//! engine's flushes and compactions hold its locks across syncs of their own, and a
//! commit that waits on them waited tens of milliseconds (docs/perf/18); this file's
//! sync waits on nothing but the device.
//!
//! The log is a series of segment files (`wal/<index>.log`, 20 decimal digits), each
//! allocated whole when it is opened, so that a record's sync does not also have to write
//! the file's new size (one device write fewer per group). A record is `[payload length
//! u32 LE][CRC-32 of the payload u32 LE][payload]`, and its payload is a batch of writes
//! (`Writes`); the zeros after the last record end the segment. A segment is removed once
//! everything in it is in the engine and the engine has synced (a checkpoint); at start,
//! the segments still there are replayed into the engine in order. Replaying is safe however much of a
//! segment the engine already holds: every write is a blind put or remove, so applying a
//! sequence again over any prefix of itself ends in the same state.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes of a segment past which the next record opens a new one. Each segment is read
/// whole at start, and kept until the engine's next checkpoint after it.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The longest payload a record may claim; anything longer is damage, not a record.
const MAX_RECORD: u32 = 1 << 30;
const HEADER: usize = 8;

const PUT: u8 = 0;
const REMOVE: u8 = 1;

/// A batch of writes to the engine's keyspaces (numbered by the caller), encoded as the
/// log stores it, after room for the record's header: a record leaves in one write.
#[derive(Debug)]
pub struct Writes {
    bytes: Vec<u8>,
}

impl Default for Writes {
    fn default() -> Self {
        Writes { bytes: vec![0; HEADER] }
    }
}

/// One write of a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Write<'a> {
    Put { space: u8, key: &'a [u8], value: &'a [u8] },
    Remove { space: u8, key: &'a [u8] },
}

impl Writes {
    pub fn put(&mut self, space: u8, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(&[space, PUT]);
        self.field(key);
        self.field(value);
    }

    pub fn remove(&mut self, space: u8, key: &[u8]) {
        self.bytes.extend_from_slice(&[space, REMOVE]);
        self.field(key);
    }

    fn field(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() == HEADER
    }

    /// The encoded writes (a record's payload).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER..]
    }

    /// A record of any payload, for the log's own tests.
    #[cfg(test)]
    fn raw(payload: &[u8]) -> Self {
        let mut writes = Writes::default();
        writes.bytes.extend_from_slice(payload);
        writes
    }
}

/// The writes of an encoded batch, in order; `None` at the first byte that is not one.
pub fn writes(mut bytes: &[u8]) -> impl Iterator<Item = Option<Write<'_>>> {
    fn field<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let value = bytes.get(4..4 + len)?;
        *bytes = &bytes[4 + len..];
        Some(value)
    }
    let mut broken = false;
    std::iter::from_fn(move || {
        if bytes.is_empty() || broken {
            return None;
        }
        let write = (|| {
            let (&space, rest) = bytes.split_first()?;
            let (&kind, rest) = rest.split_first()?;
            bytes = rest;
            let key = field(&mut bytes)?;
            match kind {
                PUT => Some(Write::Put {
                    space,
                    key,
                    value: field(&mut bytes)?,
                }),
                REMOVE => Some(Write::Remove { space, key }),
                _ => None,
            }
        })();
        broken = write.is_none();
        Some(write)
    })
}

/// The records of one segment's bytes, in order, and where they stop.
pub struct Records<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Records<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Records { bytes, at: 0 }
    }

    /// Bytes left after the last whole record: the segment's allocated space, and a
    /// record that was cut short (the process died while writing it) or damaged.
    pub fn unread(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// Whether anything but allocated space (zeros) follows the last whole record.
    pub fn ends_in_a_cut_record(&self) -> bool {
        self.bytes[self.at..].iter().any(|&b| b != 0)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let header = self.bytes.get(self.at..self.at + HEADER)?;
        let len = u32::from_le_bytes(header[..4].try_into().ok()?);
        let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
        // Zero length: the segment's allocated space after its last record.
        if len == 0 || len > MAX_RECORD {
            return None;
        }
        let start = self.at + HEADER;
        let payload = self.bytes.get(start..start + len as usize)?;
        if crc32fast::hash(payload) != crc {
            return None;
        }
        self.at = start + len as usize;
        Some(payload)
    }
}

/// The segments in `dir`, oldest first, with their indexes.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(index) = index {
            found.push((index, path));
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Allocates `bytes` of `file` (its size becomes that): writes inside it change no size.
fn allocate(file: &File, bytes: u64) -> std::io::Result<()> {
    // SAFETY: a plain system call on a descriptor the `File` owns.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Syncs a directory, so that the files created or removed in it stay so after a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being written.
pub struct Log {
    dir: PathBuf,
    file: Option<File>,
    index: u64,
    /// Bytes of the segment that hold whole records.
    len: u64,
}

/// Why an append did not become durable.
#[derive(Debug)]
pub struct AppendError {
    pub error: std::io::Error,
    /// The record may be in the segment (it was written, its sync failed), so it may be
    /// replayed: what it writes counts as done, though it was not made durable.
    pub written: bool,
}

impl Log {
    /// A log in `dir` whose next segment has index `next`; the segment is opened at the
    /// first append.
    pub fn new(dir: PathBuf, next: u64) -> Self {
        Log {
            dir,
            file: None,
            index: next,
            len: 0,
        }
    }

    fn path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:020}.log"))
    }

    /// Appends one record and, with `sync`, waits until it is on the device with every
    /// record before it. On a failure the segment is left (a later record must not follow
    /// a damaged one) and the next append opens a new one; the old one's path is in
    /// `retired`. A full segment is retired the same way.
    pub fn append(&mut self, record: &mut Writes, sync: bool, retired: &mut Vec<PathBuf>) -> Result<(), AppendError> {
        let file = match self.file.take() {
            Some(file) => self.file.insert(file),
            None => {
                let file = self
                    .open_segment()
                    .map_err(|error| AppendError { error, written: false })?;
                self.len = 0;
                self.file.insert(file)
            }
        };
        let crc = crc32fast::hash(record.payload());
        let len = record.payload().len() as u32;
        record.bytes[..4].copy_from_slice(&len.to_le_bytes());
        record.bytes[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        let written = file
            .write_all_at(&record.bytes, self.len)
            .map_err(|error| AppendError { error, written: true });
        let synced = written.and_then(|()| match sync {
            true => file.sync_data().map_err(|error| AppendError { error, written: true }),
            false => Ok(()),
        });
        match synced {
            Ok(()) => {
                self.len += record.bytes.len() as u64;
                if self.len >= SEGMENT_BYTES {
                    self.retire(retired);
                }
                Ok(())
            }
            Err(e) => {
                self.retire(retired);
                Err(e)
            }
        }
    }

    fn open_segment(&self) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(self.path(self.index))?;
        // Best effort: on a disk with less room the segment grows as it is written, and
        // each sync writes its size too.
        let _ = allocate(&file, SEGMENT_BYTES);
        // The new file's name must survive a crash before any record in it counts.
        sync_dir(&self.dir)?;
        Ok(file)
    }

    /// Closes the segment being written (if any): the next append opens a new one.
    pub fn retire(&mut self, retired: &mut Vec<PathBuf>) {
        if self.file.take().is_some() {
            retired.push(self.path(self.index));
            self.index += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shardgate-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn records_are_read_back_until_a_cut_or_damaged_one() {
        let dir = temp("records");
        let mut log = Log::new(dir.clone(), 7);
        let mut retired = Vec::new();
        for n in 0..5u8 {
            log.append(&mut Writes::raw(&[n; 100]), n % 2 == 0, &mut retired)
                .unwrap();
        }
        assert!(retired.is_empty());
        let found = segments(&dir).unwrap();
        assert_eq!(found.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![7]);
        let bytes = std::fs::read(&found[0].1).unwrap();
        // Allocated whole; the records end where the zeros begin.
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
        let mut reader = Records::new(&bytes);
        let records: Vec<&[u8]> = reader.by_ref().collect();
        assert_eq!(records.len(), 5);
        assert!(records.iter().enumerate().all(|(n, r)| *r == [n as u8; 100]));
        assert_eq!(reader.unread(), bytes.len() - 5 * 108);
        assert!(!reader.ends_in_a_cut_record());
        // The process died in the middle of the last record: the four before it are read.
        let cut = &bytes[..5 * 108 - 30];
        let mut reader = Records::new(cut);
        assert_eq!(reader.by_ref().count(), 4);
        assert_eq!(reader.unread(), 108 - 30);
        assert!(reader.ends_in_a_cut_record());
        // A flipped bit in the third record: reading stops before it.
        let mut damaged = bytes.clone();
        damaged[2 * 108 + 50] ^= 1;
        let mut reader = Records::new(&damaged);
        assert_eq!(reader.by_ref().count(), 2);
        assert!(reader.ends_in_a_cut_record());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_segment_is_retired_and_the_next_record_opens_a_new_one() {
        let dir = temp("rotate");
        let mut log = Log::new(dir.clone(), 0);
        let mut retired = Vec::new();
        let big = vec![1u8; (SEGMENT_BYTES / 2) as usize];
        log.append(&mut Writes::raw(&big), false, &mut retired).unwrap();
        log.append(&mut Writes::raw(&big), true, &mut retired).unwrap();
        assert_eq!(retired, vec![dir.join(format!("{:020}.log", 0))]);
        log.append(&mut Writes::raw(b"next"), true, &mut retired).unwrap();
        let found = segments(&dir).unwrap();
        assert_eq!(found.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 1]);
        let bytes = std::fs::read(&found[1].1).unwrap();
        assert_eq!(Records::new(&bytes).collect::<Vec<_>>(), vec![b"next".as_slice()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    proptest! {
        #[test]
        fn writes_round_trip(ops in proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..60))), 0..20)) {
            let mut batch = Writes::default();
            for (space, key, value) in &ops {
                match value {
                    Some(value) => batch.put(*space, key, value),
                    None => batch.remove(*space, key),
                }
            }
            let decoded: Vec<Option<Write>> = writes(batch.payload()).collect();
            let want: Vec<Option<Write>> = ops.iter().map(|(space, key, value)| Some(match value {
                Some(value) => Write::Put { space: *space, key, value },
                None => Write::Remove { space: *space, key },
            })).collect();
            prop_assert_eq!(decoded, want);
        }

        #[test]
        fn cut_batches_end_in_none_not_a_panic(cut in 0usize..60) {
            let mut batch = Writes::default();
            batch.put(1, b"key", b"value");
            let boundary = batch.payload().len();
            batch.remove(2, b"other key");
            let bytes = batch.payload();
            let cut = cut.min(bytes.len());
            let decoded: Vec<Option<Write>> = writes(&bytes[..cut]).collect();
            let whole: Vec<Option<Write>> = writes(bytes).take(decoded.len()).collect();
            match cut {
                0 => prop_assert!(decoded.is_empty()),
                c if c == boundary || c == bytes.len() => prop_assert_eq!(decoded, whole),
                _ => {
                    // The whole writes before the cut, then the end of what can be read.
                    prop_assert_eq!(decoded.last(), Some(&None));
                    prop_assert_eq!(&decoded[..decoded.len() - 1], &whole[..decoded.len() - 1]);
                }
            }
        }
    }
}
