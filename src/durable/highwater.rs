//! The high-water record: an independent, tiny, fsynced account of what the journal made
//! durable, kept outside sled's log so that sled losing acknowledged data is detected.
//!
//! The bug it pins: one flipped byte in the middle of sled's log opens with exit 0 and part of
//! the acknowledged spend gone, because sled truncates its log at the first message whose
//! checksum fails. sled cannot tell a torn tail (the last, never acknowledged batch: fine) from
//! a damaged middle (acknowledged batches: not fine). This record can.
//!
//! Every journal batch stores a sequence number in sled (in the same atomic batch as the
//! totals), flushes, then writes here `(seq, entries, sum of own totals)` and fsyncs, and only
//! then acknowledges its waiters. On open, sled must be at or ahead of this record: a lower
//! sequence, or the same sequence with other totals, means acknowledged batches are missing
//! ([`StoreError::Corrupt`](crate::StoreError::Corrupt) of tree `high-water`), and `provider-budgets repair` is the way out.
//!
//! The file `provider-budgets.hw` in the data dir holds two fixed 64-byte slots written
//! alternately (by sequence parity), each with a CRC-32, so a torn write of the record itself
//! leaves the other slot readable. Both slots are allocated when the file is created, so
//! rewriting them needs no free space: the record keeps working on a full disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// File name inside the data dir.
pub(crate) const FILE_NAME: &str = "provider-budgets.hw";
const MAGIC: &[u8; 4] = b"PBHW";
const VERSION: u8 = 1;
const SLOT: usize = 64;

/// What was durable after a journal batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mark {
    /// Journal batch sequence (also stored in sled with the batch).
    pub seq: u64,
    /// Number of own windows stored.
    pub entries: u64,
    /// Sum of every stored own total, nano-dollars.
    pub sum: u128,
}

impl Mark {
    fn encode(&self) -> [u8; SLOT] {
        let mut b = [0u8; SLOT];
        b[0..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.entries.to_le_bytes());
        b[24..40].copy_from_slice(&self.sum.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes one slot; `Err` says why it is unusable. Never panics, whatever the bytes.
    pub(crate) fn decode(b: &[u8]) -> Result<Mark, &'static str> {
        if b.len() != SLOT {
            return Err("wrong slot size");
        }
        if b.iter().all(|&x| x == 0) {
            return Err("empty slot");
        }
        if &b[0..4] != MAGIC {
            return Err("bad magic");
        }
        let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if crc32fast::hash(&b[..60]) != crc {
            return Err("checksum mismatch");
        }
        if b[4] != VERSION {
            return Err("unknown version");
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let mut s = [0u8; 16];
        s.copy_from_slice(&b[24..40]);
        Ok(Mark {
            seq: u64_at(8),
            entries: u64_at(16),
            sum: u128::from_le_bytes(s),
        })
    }
}

/// The open record file.
#[derive(Debug)]
pub(crate) struct HighWater {
    path: PathBuf,
    file: File,
}

/// What reading the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// No file yet: a new data dir, or one written before this record existed.
    Absent,
    /// The newest valid slot.
    Mark(Mark),
    /// The file exists but neither slot is valid.
    Unreadable(String),
}

impl HighWater {
    /// Reads the record of `dir` without creating anything.
    pub fn read(dir: &Path) -> io::Result<Found> {
        let path = dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Absent),
            Err(e) => return Err(e),
        };
        Ok(decode_file(&bytes))
    }

    /// Opens (creating and pre-allocating if needed) the record file of `dir`.
    pub fn open(dir: &Path) -> io::Result<HighWater> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if file.metadata()?.len() < (2 * SLOT) as u64 {
            write_all_at(&file, &[0u8; 2 * SLOT], 0)?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                // The new file's directory entry must be durable too.
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(HighWater { path, file })
    }

    /// Writes `mark` into its slot and fsyncs. Needs no free space (the slots exist).
    pub fn write(&self, mark: &Mark) -> io::Result<()> {
        let offset = (mark.seq % 2) * SLOT as u64;
        write_all_at(&self.file, &mark.encode(), offset)?;
        self.file.sync_data()
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The newest valid slot of a whole file's bytes.
pub(crate) fn decode_file(bytes: &[u8]) -> Found {
    if bytes.len() < 2 * SLOT {
        return if bytes.iter().all(|&b| b == 0) {
            Found::Absent
        } else {
            Found::Unreadable(format!("{} bytes, expected {}", bytes.len(), 2 * SLOT))
        };
    }
    let a = Mark::decode(&bytes[..SLOT]);
    let b = Mark::decode(&bytes[SLOT..2 * SLOT]);
    match (a, b) {
        (Ok(a), Ok(b)) => Found::Mark(if a.seq >= b.seq { a } else { b }),
        (Ok(m), Err(_)) | (Err(_), Ok(m)) => Found::Mark(m),
        (Err("empty slot"), Err("empty slot")) => Found::Absent,
        (Err(x), Err(y)) => Found::Unreadable(format!("slot 0: {x}, slot 1: {y}")),
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(not(unix))]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HighWater::read(dir.path()).unwrap(), Found::Absent);
        let hw = HighWater::open(dir.path()).unwrap();
        assert_eq!(HighWater::read(dir.path()).unwrap(), Found::Absent);
        let m = |seq| Mark {
            seq,
            entries: seq * 2,
            sum: u128::from(seq) << 70,
        };
        hw.write(&m(1)).unwrap();
        hw.write(&m(2)).unwrap();
        assert_eq!(HighWater::read(dir.path()).unwrap(), Found::Mark(m(2)));
        // Tear slot 0 (seq 2): slot 1 (seq 1) is what is known for sure.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(HighWater::read(dir.path()).unwrap(), Found::Mark(m(1)));
        bytes[SLOT + 10] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            HighWater::read(dir.path()).unwrap(),
            Found::Unreadable(_)
        ));
    }

    #[test]
    fn decoding_garbage_never_panics() {
        for len in [0, 1, 63, 64, 127, 128, 129, 300] {
            for fill in [0u8, 0xff, 0x50] {
                let _ = decode_file(&vec![fill; len]);
                let _ = Mark::decode(&vec![fill; len]);
            }
        }
    }
}
