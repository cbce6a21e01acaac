//! The record and block format: a record is a LEB128 length and its bytes, packed into blocks
//! of about [`BLOCK`] bytes; a block is stored behind a header of its stored length, raw length
//! and CRC32C checksum. Here are the lengths' encoding, the copy of small records, the
//! checksums filled in before a write and the walk over a block's records.

/// A block is sealed once its records reach this many bytes: large enough that a header and
/// a checksum per block cost nothing and LZ4 finds repeats, small enough that reading one
/// record at random reads and checks only a few KiB.
pub(super) const BLOCK: usize = 4 << 10;
/// Block header size.
pub(super) const HEADER: usize = 12;
/// Largest record accepted (a corrupt length field must not make us allocate gigabytes).
pub(super) const MAX_RECORD: usize = 256 << 20;
/// Largest raw block (a record above [`BLOCK`] gets a block of its own).
pub(super) const MAX_BLOCK: usize = MAX_RECORD + BLOCK + 8;

/// Fills in the checksum of each block of `buffer` (sealed blocks back to back, each a header
/// and its payload): CRC32C of the raw length and the payload. Stops at a header that does
/// not fit.
pub(super) fn checksum_blocks(buffer: &mut [u8]) {
    let mut at = 0;
    while let Some(header) = buffer.get(at..at + HEADER) {
        let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let end = at + HEADER + stored;
        let Some(payload) = buffer.get(at + HEADER..end) else {
            return;
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[4..8]), payload);
        buffer[at + 8..at + HEADER].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// Records up to this size are copied by [`append_small`].
pub(super) const SMALL_RECORD: usize = 64;

/// Appends a record of at most [`SMALL_RECORD`] bytes (so its length takes one byte) and its
/// length without a `memcpy` call (a library call costs more than copying ~20 bytes): room of
/// a constant size is made, the record copied with at most two overlapping copies of a constant
/// size, the room cut to length.
#[inline(always)]
pub(super) fn append_small(buffer: &mut Vec<u8>, raw: &[u8]) {
    let len = raw.len();
    let start = buffer.len();
    buffer.extend_from_slice(&[0; 1 + SMALL_RECORD]);
    if let Some(room) = buffer
        .get_mut(start..)
        .and_then(|room| room.first_chunk_mut::<{ 1 + SMALL_RECORD }>())
    {
        room[0] = len as u8;
        let room = &mut room[1..];
        match len {
            32..=SMALL_RECORD => copy_ends::<32>(room, raw),
            16..32 => copy_ends::<16>(room, raw),
            8..16 => copy_ends::<8>(room, raw),
            _ => {
                for (to, &b) in room.iter_mut().zip(raw) {
                    *to = b;
                }
            }
        }
    }
    buffer.truncate(start + 1 + len);
}

/// Copies `raw` (`N..=2N` bytes long) to the start of `room` as its first and last `N` bytes.
#[inline(always)]
fn copy_ends<const N: usize>(room: &mut [u8], raw: &[u8]) {
    let len = raw.len();
    if let (Some(first), Some(last)) = (raw.first_chunk::<N>(), raw.last_chunk::<N>()) {
        if let Some(to) = room.first_chunk_mut::<N>() {
            *to = *first;
        }
        if let Some(to) = room
            .get_mut(len - N..)
            .and_then(|r| r.first_chunk_mut::<N>())
        {
            *to = *last;
        }
    }
}

/// Appends `n` as LEB128.
#[inline]
pub(super) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a LEB128 number at `at`: the number and the bytes it took.
#[inline]
pub(super) fn get_varint(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    for (i, b) in bytes.get(at..)?.iter().take(10).enumerate() {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

/// The records of a block read by [`SpillStore::read_block`](super::SpillStore::read_block):
/// each record's position in the block and its bytes. Stops at the first malformed length.
pub fn block_records(block: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let (len, n) = get_varint(block, at)?;
        let start = at + n;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        let bytes = block.get(start..end)?;
        let pos = u32::try_from(at).ok()?;
        at = end;
        Some((pos, bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_filled_in_for_each_block() {
        let mut buffer = Vec::new();
        let mut expected = Vec::new();
        for payload in [&b"abc"[..], &[7u8; 300][..], &[][..]] {
            let raw = (payload.len() as u32 + 1).to_le_bytes();
            buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buffer.extend_from_slice(&raw);
            buffer.extend_from_slice(&[0; 4]);
            buffer.extend_from_slice(payload);
            expected.push(crc32c::crc32c_append(crc32c::crc32c(&raw), payload));
        }
        // A truncated header at the end is left alone.
        buffer.extend_from_slice(&[1, 2, 3]);
        checksum_blocks(&mut buffer);
        let mut at = 0;
        for crc in expected {
            let stored = u32::from_le_bytes(buffer[at..at + 4].try_into().expect("4 bytes"));
            let got = u32::from_le_bytes(buffer[at + 8..at + 12].try_into().expect("4 bytes"));
            assert_eq!(got, crc);
            at += HEADER + stored as usize;
        }
        assert_eq!(&buffer[at..], &[1, 2, 3]);
    }

    #[test]
    fn varint_round_trip() {
        for n in [0u64, 1, 127, 128, 300, 1 << 20, u64::from(u32::MAX)] {
            let mut v = vec![9];
            put_varint(&mut v, n);
            assert_eq!(get_varint(&v, 1), Some((n, v.len() - 1)));
        }
        assert_eq!(get_varint(&[0x80, 0x80], 0), None);
    }
}
