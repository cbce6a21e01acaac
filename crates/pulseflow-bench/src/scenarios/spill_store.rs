//! `spill-store`: the same spilled states (count-and-sum records as the accumulator stage
//! encodes them) written to and read back from each candidate store: the stage's checksummed
//! segment log (with each compression mode) and, with `--features store-eval`, `fjall` (LSM
//! tree) and `redb` (B-tree). Writes come in rounds of 10 000 records, as eviction rounds
//! do; reads are all records in spill order (the end-of-input flush) and a random tenth (keys
//! reloaded while the input runs). Every read is compared with what was written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pulseflow::accumulate::{Compression, SpillStore};
use serde_json::json;

use super::accumulate::encoded_records;
use crate::CommonOpts;
use crate::report::Report;

type BoxError = Box<dyn std::error::Error>;

/// Records per write round (one eviction round of the stage).
const ROUND: usize = 10_000;

/// What one store measured.
struct Measured {
    write: Duration,
    read_in_order: Duration,
    read_random: Duration,
    disk_bytes: u64,
}

/// The records to store.
struct Records {
    flat: Vec<u8>,
    ends: Vec<usize>,
    /// Indices of a random tenth of the records, shuffled.
    sample: Vec<usize>,
}

impl Records {
    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.flat[start..self.ends[i]]
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// A reproducible shuffle (xorshift; no randomness crate needed).
fn shuffled(n: usize, take: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v.truncate(take);
    v
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn fresh_dir(name: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "pulseflow-spill-eval-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn mismatch(store: &str, i: usize) -> BoxError {
    format!("{store}: record {i} read back differs from what was written").into()
}

/// Times reading back the records `indices` with `matches`, which reads record `i` and says
/// whether it is what was written; the first mismatch is an error.
fn timed_reads(
    store: &str,
    indices: impl IntoIterator<Item = usize>,
    mut matches: impl FnMut(usize) -> Result<bool, BoxError>,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    for i in indices {
        if !matches(i)? {
            return Err(mismatch(store, i));
        }
    }
    Ok(started.elapsed())
}

fn segment_log(r: &Records, mode: Compression) -> Result<Measured, BoxError> {
    let dir = fresh_dir("log")?;
    let mut store = SpillStore::open(Some(&dir))?;
    store.set_compression(mode);
    let started = Instant::now();
    // The index is the caller's (the stage keeps key -> RecordRef in memory).
    let mut index = Vec::with_capacity(r.len());
    for round in (0..r.len()).collect::<Vec<_>>().chunks(ROUND) {
        for &i in round {
            index.push(store.append(r.get(i))?);
        }
        store.flush()?;
    }
    let write = started.elapsed();
    let disk_bytes = dir_bytes(&dir);
    let mut out = Vec::new();
    let mut read = |i: usize| -> Result<bool, BoxError> {
        store.read(index[i], &i, &mut out)?;
        Ok(out == r.get(i))
    };
    let read_in_order = timed_reads("segment log", 0..r.len(), &mut read)?;
    let read_random = timed_reads("segment log", r.sample.iter().copied(), &mut read)?;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        write,
        read_in_order,
        read_random,
        disk_bytes,
    })
}

#[cfg(feature = "store-eval")]
fn fjall_store(r: &Records) -> Result<Measured, BoxError> {
    use fjall::{Config, PartitionCreateOptions, PersistMode};
    let dir = fresh_dir("fjall")?;
    let keyspace = Config::new(&dir).manual_journal_persist(true).open()?;
    let part = keyspace.open_partition("spill", PartitionCreateOptions::default())?;
    let started = Instant::now();
    for round in (0..r.len()).collect::<Vec<_>>().chunks(ROUND) {
        for &i in round {
            part.insert((i as u32).to_be_bytes(), r.get(i))?;
        }
        // Same guarantee as the log's flush: in the OS's hands, not synced.
        keyspace.persist(PersistMode::Buffer)?;
    }
    let write = started.elapsed();
    let disk_bytes = dir_bytes(&dir);
    let read = |i: usize| -> Result<bool, BoxError> {
        let got = part.get((i as u32).to_be_bytes())?;
        Ok(got.is_some_and(|got| &*got == r.get(i)))
    };
    let read_in_order = timed_reads("fjall", 0..r.len(), read)?;
    let read_random = timed_reads("fjall", r.sample.iter().copied(), read)?;
    drop(part);
    drop(keyspace);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        write,
        read_in_order,
        read_random,
        disk_bytes,
    })
}

#[cfg(feature = "store-eval")]
fn redb_store(r: &Records) -> Result<Measured, BoxError> {
    use redb::{Database, Durability, TableDefinition};
    const SPILL: TableDefinition<u32, &[u8]> = TableDefinition::new("spill");
    let dir = fresh_dir("redb")?;
    let db = Database::create(dir.join("spill.redb"))?;
    let started = Instant::now();
    for round in (0..r.len()).collect::<Vec<_>>().chunks(ROUND) {
        let mut txn = db.begin_write()?;
        // Same guarantee as the log's flush: written, not synced.
        txn.set_durability(Durability::None);
        {
            let mut table = txn.open_table(SPILL)?;
            for &i in round {
                table.insert(i as u32, r.get(i))?;
            }
        }
        txn.commit()?;
    }
    let write = started.elapsed();
    let disk_bytes = dir_bytes(&dir);
    let txn = db.begin_read()?;
    let table = txn.open_table(SPILL)?;
    let read = |i: usize| -> Result<bool, BoxError> {
        let got = table.get(i as u32)?;
        Ok(got.is_some_and(|got| got.value() == r.get(i)))
    };
    let read_in_order = timed_reads("redb", 0..r.len(), read)?;
    let read_random = timed_reads("redb", r.sample.iter().copied(), read)?;
    drop(table);
    drop(txn);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        write,
        read_in_order,
        read_random,
        disk_bytes,
    })
}

pub fn run(opts: &CommonOpts) -> Result<Report, BoxError> {
    let n: u64 = if opts.quick { 200_000 } else { 1_000_000 };
    let (flat, ends, _) = encoded_records(n)?;
    let sample = shuffled(ends.len(), ends.len() / 10);
    let r = Records { flat, ends, sample };
    let mib = r.flat.len() as f64 / 1048576.0;
    let mut report = Report::new(
        format!(
            "spill-store: {n} spilled states ({mib:.1} MiB encoded), written in rounds of {ROUND}, read back"
        ),
        &[
            "store",
            "write MiB/s",
            "read in order, records/s",
            "read random 10%, records/s",
            "on disk MiB",
        ],
    );
    let mut stores: Vec<(&str, Measured)> = vec![
        ("segment log (auto)", segment_log(&r, Compression::Auto)?),
        ("segment log (lz4)", segment_log(&r, Compression::Always)?),
        ("segment log (raw)", segment_log(&r, Compression::Never)?),
    ];
    #[cfg(feature = "store-eval")]
    {
        stores.push(("fjall 2 (LSM)", fjall_store(&r)?));
        stores.push(("redb 2 (B-tree)", redb_store(&r)?));
    }
    #[cfg(not(feature = "store-eval"))]
    report.note("fjall and redb: build with --features store-eval");
    let mut summary = serde_json::Map::new();
    summary.insert("scenario".into(), json!("spill-store"));
    summary.insert("records".into(), json!(n));
    for (name, m) in stores.drain(..) {
        let write = mib / m.write.as_secs_f64();
        let in_order = r.len() as f64 / m.read_in_order.as_secs_f64();
        let random = r.sample.len() as f64 / m.read_random.as_secs_f64();
        let disk = m.disk_bytes as f64 / 1048576.0;
        report.row(vec![
            name.into(),
            format!("{write:.0}"),
            crate::report::per_sec(in_order),
            crate::report::per_sec(random),
            format!("{disk:.1}"),
        ]);
        summary.insert(
            name.into(),
            json!({
                "write_mib_s": write.round(),
                "read_in_order_per_s": in_order.round(),
                "read_random_per_s": random.round(),
                "disk_mib": (disk * 10.0).round() / 10.0,
            }),
        );
    }
    report.note("write = append every record, flush (or commit, persist to the OS) after each round; no fsync anywhere");
    report.summary(serde_json::Value::Object(summary));
    Ok(report)
}
