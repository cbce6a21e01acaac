//! Reading records and whole blocks back: a block is fetched from its segment file (or from the
//! buffer while it is not written yet), checked against its checksum, decompressed and cached.

use std::fmt::Debug;
use std::fs::File;
use std::path::Path;

use super::record::{HEADER, MAX_BLOCK, get_varint};
use super::{RecordRef, SpillError, SpillStore};

impl SpillStore {
    /// Reads a record back into `out` (replacing its contents), checking its block's checksum.
    /// `key` names the record in errors.
    pub fn read(
        &mut self,
        at: RecordRef,
        key: &dyn Debug,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        let offset = self.offset_of(at);
        let corrupt = |path: &Path, reason: String| SpillError::Corrupt {
            key: format!("{key:?}"),
            path: path.to_owned(),
            offset,
            reason,
        };
        let block: &[u8] = if at.block == self.next_block {
            self.buffer
                .get(self.open_start + HEADER..)
                .unwrap_or_default()
        } else {
            if self.cached != Some(at.block) {
                self.cached = None;
                self.load_block(at.block).map_err(|e| match e {
                    Err(reason) => corrupt(self.path_of(at), reason),
                    Ok(io) => io,
                })?;
                self.cached = Some(at.block);
            }
            &self.cache
        };
        let pos = at.pos as usize;
        let (len, n) = get_varint(block, pos).ok_or_else(|| {
            corrupt(
                self.path_of(at),
                format!("no record at position {pos} of its block"),
            )
        })?;
        let start = pos + n;
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|len| block.get(start..start.checked_add(len)?))
            .ok_or_else(|| {
                corrupt(
                    self.path_of(at),
                    format!("record of {len} bytes beyond its block"),
                )
            })?;
        out.clear();
        out.extend_from_slice(bytes);
        self.stats.reads += 1;
        Ok(())
    }

    /// Reads a sealed block (checked and decompressed) into `out`, replacing its contents:
    /// records back to back, each a LEB128 length and its bytes (walk them with
    /// [`block_records`](super::block_records)). For reading the whole log in order.
    pub fn read_block(&mut self, block: u32, out: &mut Vec<u8>) -> Result<(), SpillError> {
        if self.cached != Some(block) {
            self.cached = None;
            let at = RecordRef { block, pos: 0 };
            let offset = self.offset_of(at);
            self.load_block(block).map_err(|e| match e {
                Err(reason) => SpillError::Corrupt {
                    key: format!("(block {block})"),
                    path: self.path_of(at).to_owned(),
                    offset,
                    reason,
                },
                Ok(io) => io,
            })?;
            self.cached = Some(block);
        }
        out.clear();
        out.extend_from_slice(&self.cache);
        Ok(())
    }

    /// Reads, checks and decompresses a sealed block into the cache. `Err(Err(reason))` is a
    /// corrupt block, `Err(Ok(error))` an I/O error.
    fn load_block(&mut self, block: u32) -> Result<(), Result<SpillError, String>> {
        let Some((offset, len)) = self.segment(block).and_then(|s| s.block(block)) else {
            return Err(Err(format!("no block {block} in the log")));
        };
        // Only the current segment has blocks not yet in its file.
        let current = block >= self.current.first;
        let len = len as usize;
        if len < HEADER {
            return Err(Err(format!("block length {len} below header size")));
        }
        let mut record = std::mem::take(&mut self.scratch);
        record.resize(len, 0);
        if current && offset < self.flushed && offset + len as u64 > self.written {
            // The block is still being written.
            self.sync().map_err(Ok)?;
        }
        // A block still in the buffer has no checksum yet (and never left memory).
        let in_memory = current && offset >= self.flushed;
        let fetched = if in_memory {
            let start = (offset - self.flushed) as usize;
            match self.buffer.get(start..start + len) {
                Some(bytes) => {
                    record.copy_from_slice(bytes);
                    Ok(())
                }
                None => Err(Err("block beyond the end of the log".into())),
            }
        } else {
            let segment = self.segment(block).unwrap_or(&self.current);
            read_at(&segment.file, &mut record, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Err("block truncated".into())
                } else {
                    Ok(SpillError::Io {
                        path: segment.path.clone(),
                        source: e,
                    })
                }
            })
        };
        let result = fetched.and_then(|()| {
            let word = |i: usize| {
                u32::from_le_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]])
            };
            let (stored, raw_len, crc) = (word(0) as usize, word(4) as usize, word(8));
            if stored + HEADER != len {
                Err(Err(format!(
                    "stored length {stored} does not match the index ({})",
                    len - HEADER
                )))
            } else if !in_memory
                && crc32c::crc32c_append(crc32c::crc32c(&record[4..8]), &record[HEADER..]) != crc
            {
                Err(Err("checksum mismatch".into()))
            } else if raw_len > MAX_BLOCK || stored > raw_len {
                Err(Err(format!("implausible raw length {raw_len}")))
            } else if stored == raw_len {
                self.cache.clear();
                self.cache.extend_from_slice(&record[HEADER..]);
                Ok(())
            } else {
                self.cache.clear();
                self.cache.resize(raw_len, 0);
                match lz4_flex::block::decompress_into(&record[HEADER..], &mut self.cache) {
                    Ok(n) if n == raw_len => Ok(()),
                    Ok(n) => Err(Err(format!("decompressed {n} bytes, expected {raw_len}"))),
                    Err(e) => Err(Err(format!("lz4: {e}"))),
                }
            }
        });
        self.scratch = record;
        result
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accumulate::spill::block_records;

    #[test]
    fn round_trip_from_buffer_and_file() {
        let mut store = SpillStore::open(None).expect("open");
        let a = store.append(b"tiny").expect("append");
        let b = store.append(&[1u8; 5000]).expect("append");
        let mut out = Vec::new();
        store.read(a, &1, &mut out).expect("buffered");
        assert_eq!(out, b"tiny");
        store.flush().expect("flush");
        store.read(b, &2, &mut out).expect("from file");
        assert_eq!(out, vec![1u8; 5000]);
        let dir = store.dir().to_owned();
        assert!(dir.exists());
        drop(store);
        assert!(!dir.exists(), "temporary spill directory removed on close");
    }

    #[test]
    fn corruption_names_key_and_file() {
        let mut store = SpillStore::open(None).expect("open");
        let at = store.append(&[9u8; 300]).expect("append");
        store.flush().expect("flush");
        let mut bytes = std::fs::read(store.path()).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(store.path(), &bytes).expect("write");
        let err = store
            .read(at, &"user-7", &mut Vec::new())
            .expect_err("corrupt");
        assert!(matches!(err, SpillError::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("\"user-7\""), "{text}");
        assert!(text.contains("segment-"), "{text}");
        assert!(text.contains("checksum"), "{text}");
    }

    #[test]
    fn blocks_read_in_order() {
        let mut store = SpillStore::open(None).expect("open");
        let refs: Vec<_> = (0..2000u32)
            .map(|i| store.append(format!("r{i}").as_bytes()).expect("append"))
            .collect();
        store.flush().expect("flush");
        let mut seen = Vec::new();
        let mut block = Vec::new();
        for b in 0..store.stats().blocks as u32 {
            store.read_block(b, &mut block).expect("block");
            for (pos, bytes) in block_records(&block) {
                seen.push((RecordRef::new(b, pos), bytes.to_vec()));
            }
        }
        assert_eq!(seen.len(), 2000);
        for (i, (at, bytes)) in seen.iter().enumerate() {
            assert_eq!(*at, refs[i]);
            assert_eq!(bytes, format!("r{i}").as_bytes());
        }
    }

    #[test]
    fn corrupt_record_in_an_older_segment_names_its_file() {
        let mut store = SpillStore::open(None).expect("open");
        store.set_segment_bytes(8 << 10);
        let first = store.append(&[5u8; 300]).expect("append");
        for i in 0..1_000u32 {
            store
                .append(format!("filler-{i}").as_bytes())
                .expect("append");
        }
        store.flush().expect("flush");
        let old = store.path_of(first).to_owned();
        assert_ne!(old, store.path());
        let mut bytes = std::fs::read(&old).expect("read");
        bytes[HEADER + 10] ^= 0xff;
        std::fs::write(&old, &bytes).expect("write");
        let err = store
            .read(first, &"user-1", &mut Vec::new())
            .expect_err("corrupt");
        let text = err.to_string();
        assert!(text.contains(&*old.to_string_lossy()), "{text}");
        assert!(text.contains("\"user-1\""), "{text}");
    }
}
