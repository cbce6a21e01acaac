//! Appending records to the open block, and sealing the block (compressed when that pays) once
//! it is full: the path every spilled state takes.

use std::time::Instant;

use super::compression::{CostModel, MIN_COMPRESS};
use super::record::{BLOCK, HEADER, MAX_RECORD, SMALL_RECORD, append_small, put_varint};
use super::writer::WRITE_BUFFER;
use super::{Compression, RecordRef, SpillError, SpillStore, too_many_blocks};

impl SpillStore {
    /// Appends a record written by `encode` straight into the open block (no intermediate
    /// buffer): `encode` appends the record's bytes to the vector it is given. On an error the
    /// partial record is removed.
    #[inline]
    pub fn append_with(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), SpillError>,
    ) -> Result<RecordRef, SpillError> {
        let block = self.next_block;
        let mark = self.buffer.len();
        if mark == self.open_start {
            self.buffer.extend_from_slice(&[0; HEADER]);
        }
        let start = self.buffer.len();
        // One byte for the length: enough for records under 128 bytes (the common case),
        // widened otherwise.
        self.buffer.push(0);
        if let Err(e) = encode(&mut self.buffer) {
            self.buffer.truncate(mark);
            return Err(e);
        }
        let len = self.buffer.len() - start - 1;
        match self.buffer.get_mut(start) {
            Some(prefix) if len < 0x80 => *prefix = len as u8,
            _ => self.widen_length(mark, start, len)?,
        }
        self.count_record(len);
        let data = self.open_start + HEADER;
        let at = RecordRef {
            block,
            pos: (start - data) as u32,
        };
        if self.buffer.len() - data >= BLOCK {
            self.seal()?;
        }
        Ok(at)
    }

    /// A record of 128 bytes or more written by [`SpillStore::append_with`] behind a
    /// one-byte length: moved up to make room for its full length (or removed when too large).
    #[cold]
    #[inline(never)]
    fn widen_length(&mut self, mark: usize, start: usize, len: usize) -> Result<(), SpillError> {
        if len > MAX_RECORD {
            self.buffer.truncate(mark);
            return Err(SpillError::Encode(format!(
                "state of {len} bytes exceeds the {MAX_RECORD}-byte record limit"
            )));
        }
        let mut prefix = Vec::with_capacity(10);
        put_varint(&mut prefix, len as u64);
        let extra = prefix.len() - 1;
        self.buffer.resize(self.buffer.len() + extra, 0);
        self.buffer
            .copy_within(start + 1..start + 1 + len, start + prefix.len());
        self.buffer[start..start + prefix.len()].copy_from_slice(&prefix);
        Ok(())
    }

    /// Appends a record to the open block and says where it is.
    #[inline]
    pub fn append(&mut self, raw: &[u8]) -> Result<RecordRef, SpillError> {
        if raw.len() > MAX_RECORD {
            return Err(SpillError::Encode(format!(
                "state of {} bytes exceeds the {MAX_RECORD}-byte record limit",
                raw.len()
            )));
        }
        let block = self.next_block;
        if self.buffer.len() == self.open_start {
            // A new block: room for its header.
            self.buffer.extend_from_slice(&[0; HEADER]);
        }
        let data = self.open_start + HEADER;
        let at = RecordRef {
            block,
            pos: (self.buffer.len() - data) as u32,
        };
        if raw.len() <= SMALL_RECORD {
            append_small(&mut self.buffer, raw);
        } else {
            put_varint(&mut self.buffer, raw.len() as u64);
            self.buffer.extend_from_slice(raw);
        }
        self.count_record(raw.len());
        if self.buffer.len() - data >= BLOCK {
            self.seal()?;
        }
        Ok(at)
    }

    /// Counts a record appended to the open block (live, in the current segment).
    #[inline(always)]
    fn count_record(&mut self, len: usize) {
        self.stats.records += 1;
        self.stats.live_records += 1;
        self.stats.raw_bytes += len as u64;
        self.current.records += 1;
        self.current.live += 1;
    }

    /// Closes the open block: compresses it in place when that is worth it, fills in its
    /// header.
    #[inline(never)]
    pub(super) fn seal(&mut self) -> Result<(), SpillError> {
        if self.buffer.len() == self.open_start {
            return Ok(());
        }
        let data = self.open_start + HEADER;
        let raw_len = self.buffer.len() - data;
        let compress = raw_len >= MIN_COMPRESS
            && match self.compression {
                Compression::Always => true,
                Compression::Never => false,
                Compression::Auto => self.costs.should_compress(),
            };
        if compress {
            let raw = &self.buffer[data..];
            self.scratch
                .resize(lz4_flex::block::get_maximum_output_size(raw_len), 0);
            let started = Instant::now();
            let packed = lz4_flex::block::compress_into(raw, &mut self.scratch);
            let took = started.elapsed().as_nanos() as f64 / raw_len as f64;
            self.costs.lz4_ns = Some(CostModel::blend(self.costs.lz4_ns, took));
            if let Ok(n) = packed {
                let saved = 1.0 - (n as f64 / raw_len as f64).min(1.0);
                self.costs.saved = 0.75 * self.costs.saved + 0.25 * saved;
                if self.compression == Compression::Auto {
                    self.costs.probed();
                }
                if n < raw_len {
                    self.buffer.truncate(data);
                    self.buffer.extend_from_slice(&self.scratch[..n]);
                }
            }
        }
        let stored = self.buffer.len() - data;
        // The checksum is filled in by whoever writes the buffer out ([`checksum_blocks`]):
        // off this thread when the writer thread runs.
        let header = &mut self.buffer[self.open_start..data];
        header[0..4].copy_from_slice(&(stored as u32).to_le_bytes());
        header[4..8].copy_from_slice(&(raw_len as u32).to_le_bytes());
        let len = (HEADER + stored) as u32;
        self.next_block = self.next_block.checked_add(1).ok_or_else(too_many_blocks)?;
        self.current
            .blocks
            .push((self.flushed + self.open_start as u64, len));
        self.current.bytes += u64::from(len);
        self.open_start = self.buffer.len();
        self.stats.blocks += 1;
        self.stats.stored_bytes += u64::from(len);
        self.stats.disk_bytes += u64::from(len);
        if self.flushed + self.buffer.len() as u64 >= self.segment_bytes {
            self.roll()?;
        } else if self.buffer.len() >= WRITE_BUFFER {
            self.write_out()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_small_records_share_blocks() {
        for mode in [Compression::Always, Compression::Never, Compression::Auto] {
            small_records(mode);
        }
    }

    fn small_records(mode: Compression) {
        let mut store = SpillStore::open(None).expect("open");
        store.set_compression(mode);
        let refs: Vec<_> = (0..10_000u32)
            .map(|i| {
                let rec = format!("state-{i}");
                store.append(rec.as_bytes()).expect("append")
            })
            .collect();
        store.flush().expect("flush");
        let stats = store.stats();
        assert!(stats.blocks * 100 < stats.records, "{stats:?}");
        match mode {
            Compression::Always => assert!(stats.compression_ratio() > 1.5, "{stats:?}"),
            Compression::Never => assert!(stats.compression_ratio() < 1.0, "{stats:?}"),
            Compression::Auto => {}
        }
        let mut out = Vec::new();
        for i in [9_999u32, 0, 5_000, 5_001, 1] {
            store.read(refs[i as usize], &i, &mut out).expect("read");
            assert_eq!(out, format!("state-{i}").as_bytes());
        }
        let big = vec![3u8; 100_000];
        let at = store.append(&big).expect("append big");
        store
            .read(at, &"big", &mut out)
            .expect("from the open block");
        assert_eq!(out, big);
        store.flush().expect("flush");
        store.read(at, &"big", &mut out).expect("from the file");
        assert_eq!(out, big);
    }

    #[test]
    fn records_encoded_in_place() {
        let mut store = SpillStore::open(None).expect("open");
        let mut refs = Vec::new();
        for len in [0usize, 5, 127, 128, 300, 20_000, 3] {
            let at = store
                .append_with(|buf| {
                    buf.extend((0..len).map(|i| (i % 251) as u8));
                    Ok(())
                })
                .expect("append");
            refs.push((at, len));
        }
        let failed = store.append_with(|buf| {
            buf.extend_from_slice(&[1; 50]);
            Err(SpillError::Encode("no".into()))
        });
        assert!(failed.is_err());
        let last = store
            .append_with(|buf| {
                buf.extend_from_slice(b"after");
                Ok(())
            })
            .expect("append");
        let mut out = Vec::new();
        for (i, &(at, len)) in refs.iter().enumerate() {
            store.read(at, &i, &mut out).expect("read");
            assert_eq!(out, (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        }
        store.flush().expect("flush");
        store.read(last, &"last", &mut out).expect("read");
        assert_eq!(out, b"after");
        for (i, &(at, len)) in refs.iter().enumerate() {
            store.read(at, &i, &mut out).expect("read");
            assert_eq!(out.len(), len);
        }
        assert_eq!(store.stats().records, 8);
    }

    #[test]
    fn records_of_every_small_length() {
        let mut store = SpillStore::open(None).expect("open");
        let record = |len: usize| (0..len).map(|i| (i * 7 + len) as u8).collect::<Vec<u8>>();
        let refs: Vec<_> = (0..=200)
            .map(|len| (len, store.append(&record(len)).expect("append")))
            .collect();
        let mut out = Vec::new();
        for &(len, at) in &refs {
            store.read(at, &len, &mut out).expect("from the buffer");
            assert_eq!(out, record(len), "length {len}");
        }
        store.flush().expect("flush");
        for &(len, at) in &refs {
            store.read(at, &len, &mut out).expect("from the file");
            assert_eq!(out, record(len), "length {len}");
        }
    }
}
