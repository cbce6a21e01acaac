//! Partitioned subjects and which instance consumes which partition.
//!
//! A keyed pipeline that runs as `N` instances reads a stream whose subjects end in a
//! partition number: `<subject>.<p>` for `p` in `0..P`, where `p` is a hash of the item's
//! key modulo `P` (see [`partition_of`]). Instance `I` of `N` consumes the partitions with
//! `p mod N = I` ([`Instance::partitions`]), so every key's state lives in one instance.
//!
//! ```
//! use pulseflow::connectors::nats::partition::{Instance, partition_of, partition_subject};
//!
//! let p = partition_of(b"\"user-7\"", 12);
//! assert!(p < 12);
//! assert_eq!(partition_subject("orders.by_user", p), format!("orders.by_user.{p}"));
//! let second: Instance = "1/3".parse().expect("valid");
//! assert_eq!(second.partitions(8), vec![1, 4, 7]);
//! ```

use std::fmt;
use std::str::FromStr;

/// The partition of a key (its bytes, e.g. its JSON text) among `partitions`: CRC-32C of the
/// bytes modulo `partitions`, the same on every machine and in every version.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    crc32c::crc32c(key) % partitions.max(1)
}

/// The subject of partition `p` of `subject`: `<subject>.<p>`.
pub fn partition_subject(subject: &str, p: u32) -> String {
    format!("{subject}.{p}")
}

/// Which of `count` instances this process is: `index` in `0..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    /// This instance, from 0.
    pub index: u32,
    /// How many instances share the work.
    pub count: u32,
}

impl Default for Instance {
    /// The only instance.
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Instance {
    /// Instance `index` of `count`; `None` unless `index < count`.
    pub fn new(index: u32, count: u32) -> Option<Self> {
        (index < count).then_some(Self { index, count })
    }

    /// The partitions among `partitions` that this instance consumes: those with
    /// `p mod count = index`.
    pub fn partitions(&self, partitions: u32) -> Vec<u32> {
        (0..partitions)
            .filter(|p| p % self.count == self.index)
            .collect()
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Why `I/N` is not an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an instance is written I/N with 0 <= I < N, as in 0/3; not `{0}`")]
pub struct InstanceError(String);

impl FromStr for Instance {
    type Err = InstanceError;

    fn from_str(s: &str) -> Result<Self, InstanceError> {
        let (i, n) = s.split_once('/').ok_or_else(|| InstanceError(s.into()))?;
        let parse = |t: &str| t.trim().parse::<u32>().map_err(|_| InstanceError(s.into()));
        Instance::new(parse(i)?, parse(n)?).ok_or_else(|| InstanceError(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_instance() {
        for count in 1..6 {
            let mut owners = vec![0; 16];
            for index in 0..count {
                let instance = Instance::new(index, count).expect("valid");
                for p in instance.partitions(16) {
                    owners[p as usize] += 1;
                }
            }
            assert!(owners.iter().all(|&n| n == 1), "{count}: {owners:?}");
        }
    }

    #[test]
    fn instances_parse_only_when_the_index_is_below_the_count() {
        assert_eq!("2/3".parse(), Ok(Instance { index: 2, count: 3 }));
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(bad.parse::<Instance>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_partition_is_stable_and_in_range() {
        assert_eq!(partition_of(b"abc", 1000), crc32c::crc32c(b"abc") % 1000);
        assert_eq!(partition_of(b"abc", 0), 0);
        assert!((0..100u32).all(|k| partition_of(&k.to_le_bytes(), 7) < 7));
    }
}
