//! Whether sealed blocks are compressed: the [`Compression`] setting and, under
//! [`Compression::Auto`], the running estimates that weigh LZ4's time against the write time
//! it saves.

/// Blocks smaller than this are stored raw: LZ4 cannot win on them.
pub(super) const MIN_COMPRESS: usize = 256;
/// Under [`Compression::Auto`], every this many blocks one is compressed to refresh the
/// estimate of what compression costs and saves; while compression does not pay, the
/// interval doubles after each probe, up to [`PROBE_MAX`] blocks (4 MiB). The decision itself
/// is taken at every block from the latest estimates, so a disk turning slow flips it at
/// once (write time is measured at every write).
const PROBE_EVERY: u32 = 32;
const PROBE_MAX: u32 = 1024;

/// Whether the spill store compresses its blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Compress a block when that is expected to save more write time than it costs: the
    /// store keeps running estimates of LZ4's time and savings per byte and of the file's
    /// write time per byte (LZ4's from a probe block now and then, less often while it does
    /// not pay; the write time from every write). On a page cache or a fast disk LZ4 does not
    /// pay; on a slow disk (or one the kernel throttles) it does. Blocks before the first
    /// write (the first 256 KiB or more) are stored raw, but for the probes.
    #[default]
    Auto,
    /// Compress every block (kept raw only when LZ4 does not make it smaller).
    Always,
    /// Never compress.
    Never,
}

/// Running estimates behind [`Compression::Auto`], in nanoseconds per byte.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CostModel {
    pub(super) write_ns: Option<f64>,
    pub(super) lz4_ns: Option<f64>,
    /// Fraction of the bytes LZ4 saves.
    pub(super) saved: f64,
    since_probe: u32,
    /// Blocks between probes (0 until the first probe: [`PROBE_EVERY`]).
    interval: u32,
}

impl CostModel {
    #[inline]
    pub(super) fn blend(old: Option<f64>, new: f64) -> f64 {
        old.map_or(new, |o| 0.75 * o + 0.25 * new)
    }

    /// Whether to compress the next block: a probe every so many blocks (and the first
    /// block), otherwise what the estimates say.
    #[inline]
    pub(super) fn should_compress(&mut self) -> bool {
        self.since_probe += 1;
        if self.lz4_ns.is_none() || self.since_probe >= self.interval.max(PROBE_EVERY) {
            self.since_probe = 0;
            return true;
        }
        self.pays()
    }

    /// Whether compressing saves more write time than it costs, by the latest estimates.
    /// Until the first write has measured the write time, blocks go raw (except the probes).
    #[inline]
    fn pays(&self) -> bool {
        match (self.write_ns, self.lz4_ns) {
            (Some(w), Some(c)) => c < w * self.saved,
            _ => false,
        }
    }

    /// After a probe: probes come less often while compression does not pay (or cannot be
    /// judged yet: before the first write is timed, blocks go raw whatever LZ4 costs, and the
    /// first timed write is weighed against the latest probe at once).
    #[inline]
    pub(super) fn probed(&mut self) {
        self.interval = if self.pays() {
            PROBE_EVERY
        } else {
            (self.interval.max(PROBE_EVERY / 2) * 2).min(PROBE_MAX)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_probes_back_off_while_compression_does_not_pay() {
        // Writes at 0.3 ns/byte, LZ4 at 4 ns/byte saving half: compression does not pay.
        let mut m = CostModel::default();
        let mut probes = 0;
        for block in 0..10_000 {
            if m.should_compress() {
                probes += 1;
                m.lz4_ns = Some(4.0);
                m.saved = 0.5;
                m.probed();
            }
            if block == 64 {
                m.write_ns = Some(0.3);
            }
        }
        // 32 blocks apart at first, then 64, 128, ... 1024: a few dozen, not 10 000 / 32.
        assert!((10..=40).contains(&probes), "{probes} probes");
        // The disk turns slow (20 ns/byte): the very next block is compressed.
        m.write_ns = Some(20.0);
        assert!(m.should_compress());
        m.probed();
        assert_eq!(m.interval, PROBE_EVERY);
    }
}
