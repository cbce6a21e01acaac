//! `accumulate`: count-and-sum per key over many updates, through the accumulator stage, against
//! a plain `HashMap` loop doing the same updates in the same process; then again with the
//! memory budget at a tenth of the state's size so most keys spill; and the spill store's write
//! path against a plain sequential write of the same bytes.
//!
//! Keys arrive in a sliding window (each key gets its updates within a stretch of the input,
//! like sessions): cold keys are the ones that spill, as they would in a real stream.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pulseflow::accumulate::{
    Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult, SpillError, SpillStore,
};
use pulseflow::engine::Supervision;
use pulseflow::memory::MemoryBudget;
use pulseflow::prelude::*;
use serde_json::json;

use crate::CommonOpts;
use crate::report::{Report, peak_rss_kib, per_sec, reset_peak_rss, rss_kib};

/// The key of update `i` of `n` over `keys` keys: a window sliding over the key space.
#[inline]
fn key_of(i: u64, n: u64, keys: u64) -> u32 {
    let window = (keys / 50).max(1);
    let base = i * keys / n;
    let jitter = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    ((base + jitter % window) % keys) as u32
}

/// Count and sum per key, never complete: everything is flushed at the end of input.
struct CountSum;

impl Accumulator for CountSum {
    type In = (u32, u64);
    type Out = (u32, u64, u64);
    type Key = u32;
    type State = (u64, u64);

    fn key(&self, item: &Envelope<(u32, u64)>) -> u32 {
        item.payload.0
    }

    fn create(&mut self, _key: &u32) -> (u64, u64) {
        (0, 0)
    }

    fn update(&mut self, state: &mut (u64, u64), item: Envelope<(u32, u64)>) {
        state.0 += 1;
        state.1 = state.1.wrapping_add(item.payload.1);
    }

    fn check(
        &mut self,
        _e: &mut AccumulatorState<u32, (u64, u64)>,
    ) -> CompletenessResult<Self::Out> {
        CompletenessResult::Incomplete
    }

    fn flush(&mut self, e: AccumulatorState<u32, (u64, u64)>) -> Option<Self::Out> {
        Some((e.key, e.state.0, e.state.1))
    }
}

fn baseline(n: u64, keys: u64) -> (Duration, u64) {
    let started = Instant::now();
    let mut map: HashMap<u32, (u64, u64)> = HashMap::new();
    for i in 0..n {
        let e = map.entry(key_of(i, n, keys)).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.wrapping_add(i);
    }
    let mut check = 0u64;
    for (k, (c, s)) in map {
        check = check.wrapping_add(u64::from(k) ^ c ^ s);
    }
    (started.elapsed(), check)
}

struct Run {
    elapsed: Duration,
    check: u64,
    state_peak: u64,
    metrics: std::collections::BTreeMap<String, f64>,
    /// Highest Tokio-Pulse tier each stage's tasks reached (empty when unsupervised).
    tiers: String,
}

fn pipeline(
    n: u64,
    keys: u64,
    budget: MemoryBudget,
    spill: bool,
    opts: &CommonOpts,
) -> Result<Run, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.unwrap_or(2))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let check = Arc::new(AtomicU64::new(0));
        let sum = check.clone();
        let mut p = PipelineBuilder::new("accumulate");
        p.source(
            "updates",
            sources::iter((0..n).map(move |i| (key_of(i, n, keys), i))),
        )
        .accumulate_with(
            "count-sum",
            || CountSum,
            AccumulatorPolicy::default()
                .with_partial_flush(true)
                .with_spill(spill),
        )
        .parallelism(ParallelismHint::Fixed(opts.acc_workers.unwrap_or(1)))
        .sink(
            "out",
            sink_fn(move |(k, c, s): (u32, u64, u64)| {
                sum.fetch_add(u64::from(k) ^ c ^ s, Ordering::Relaxed);
            }),
        );
        let mut options = ExecutionOptions::default()
            .with_batch_size(opts.batch.unwrap_or(1024))
            .with_memory_budget(budget.clone());
        if opts.unsupervised {
            options = options.with_supervision(Supervision::Off);
        }
        let engine = ExecutionEngine::new();
        let started = Instant::now();
        let result = engine
            .run(p.build().map_err(|e| e.to_string())?, options)
            .await;
        let elapsed = started.elapsed();
        if !result.success || !result.accounting.reconciles() {
            return Err(format!(
                "run failed: {:?} {:?}",
                result.error, result.accounting
            ));
        }
        let metrics = result
            .stage("count-sum")
            .map(|s| s.metrics.clone())
            .unwrap_or_default();
        let tiers = ["updates", "count-sum", "out"]
            .iter()
            .filter_map(|id| Some(format!("{id}={}", result.stage(id)?.tier?)))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Run {
            tiers,
            elapsed,
            check: check.load(Ordering::Relaxed),
            state_peak: budget.stats().peak,
            metrics,
        })
    })
}

/// Encoded records: the bytes, where each record ends, how long encoding took.
pub(crate) type Encoded = (Vec<u8>, Vec<usize>, Duration);

/// `records` count-and-sum states as the stage holds them when it spills them.
fn entries(records: u64) -> Vec<AccumulatorState<u32, (u64, u64)>> {
    (0..records)
        .map(|k| AccumulatorState {
            key: k as u32,
            state: (k % 13, k * 7),
            items: k % 13,
            bytes: 0,
            first_ts: 0,
            last_ts: 0,
            last_seq: k,
            score: 0.0,
            spilled: true,
        })
        .collect()
}

/// `records` count-and-sum states encoded as the stage spills them (the accumulator's
/// default `encode`), back to back: the bytes, where each record ends, and the time encoding
/// took.
pub(crate) fn encoded_records(records: u64) -> Result<Encoded, Box<dyn std::error::Error>> {
    let entries = entries(records);
    let mut flat = Vec::with_capacity(records as usize * 32);
    let mut ends = Vec::with_capacity(records as usize);
    let started = Instant::now();
    for entry in &entries {
        CountSum.encode(entry, &mut flat)?;
        ends.push(flat.len());
    }
    Ok((flat, ends, started.elapsed()))
}

/// Wall-clock and process CPU time of one run of a path (CPU time excludes the time the
/// process waited for a core on this shared machine; it counts every thread of the process,
/// so the spill store's writer thread too: the page-cache `write` calls run on its CPU time).
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

impl Took {
    const MAX: Took = Took {
        wall: Duration::MAX,
        cpu: Duration::MAX,
    };

    fn min(self, other: Took) -> Took {
        Took {
            wall: self.wall.min(other.wall),
            cpu: self.cpu.min(other.cpu),
        }
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Took) {
    let timer = tokio_pulse::clock::create_timer();
    let cpu = timer.process_cpu_time_ns();
    let started = Instant::now();
    let out = f();
    let wall = started.elapsed();
    let cpu = Duration::from_nanos(timer.process_cpu_time_ns().saturating_sub(cpu));
    (out, Took { wall, cpu })
}

/// Runs of each write path; the fastest is kept.
const WRITE_RUNS: usize = 7;

/// What the write paths took (fastest of [`WRITE_RUNS`] runs each).
struct WritePaths {
    /// The spill store given encoded records (append, seal blocks, write).
    store: Took,
    /// The stage's spill path: each state encoded straight into the store's block, sealed,
    /// written.
    spill: Took,
    /// A plain buffered sequential write of the same bytes.
    seq: Took,
    /// Encoding alone, into one vector.
    encode: Duration,
    bytes: u64,
    stored: u64,
}

impl WritePaths {
    fn rate(&self, d: Duration) -> f64 {
        self.bytes as f64 / d.as_secs_f64()
    }
}

/// The store alone: records already encoded (back to back in `flat`, ending at `ends`).
/// Out of line so that a profile tells the paths apart.
#[inline(never)]
fn store_pre_encoded(
    store: &mut SpillStore,
    flat: &[u8],
    ends: &[usize],
) -> Result<(), SpillError> {
    let mut start = 0;
    for &end in ends {
        store.append(&flat[start..end])?;
        start = end;
    }
    store.flush()
}

/// The stage's spill path: each state encoded straight into the store's open block.
#[inline(never)]
fn store_encoding(
    store: &mut SpillStore,
    entries: &[AccumulatorState<u32, (u64, u64)>],
) -> Result<(), SpillError> {
    for entry in entries {
        store.append_with(|buf| CountSum.encode(entry, buf))?;
    }
    store.flush()
}

/// The spill store's write paths against a plain buffered sequential write of the same
/// encoded bytes: records already encoded (the store alone), and states encoded straight into
/// the store as the stage spills them (encoding counted). Each is run [`WRITE_RUNS`] times,
/// interleaved, and the fastest kept (the machine is shared: a run preempted by another
/// process says nothing about the code; on `--quick` a run takes 2-6 ms, so one preemption
/// moves it by more than the differences measured), in wall-clock and in process CPU time.
fn write_paths(records: u64) -> Result<WritePaths, Box<dyn std::error::Error>> {
    let (flat, ends, mut encode) = encoded_records(records)?;
    let entries = entries(records);
    let dir = tempfile_dir()?;
    let path = dir.join("plain.bin");
    let (mut store_took, mut spill_took, mut seq_took) = (Took::MAX, Took::MAX, Took::MAX);
    let (mut bytes, mut stored) = (0, 0);
    for _ in 0..WRITE_RUNS {
        let mut store = SpillStore::open(None)?;
        let (done, took) = timed(|| store_pre_encoded(&mut store, &flat, &ends));
        done?;
        store_took = store_took.min(took);
        bytes = store.stats().raw_bytes;
        stored = store.stats().stored_bytes;
        drop(store);

        let mut store = SpillStore::open(None)?;
        let (done, took) = timed(|| store_encoding(&mut store, &entries));
        done?;
        spill_took = spill_took.min(took);
        if store.stats().raw_bytes != bytes {
            return Err("encoding in place wrote other bytes".into());
        }
        drop(store);

        let file = std::fs::File::create(&path)?;
        let (done, took) = timed(|| -> std::io::Result<()> {
            let mut f = std::io::BufWriter::with_capacity(256 << 10, file);
            for chunk in flat.chunks(64 << 10) {
                f.write_all(chunk)?;
            }
            f.flush()
        });
        done?;
        seq_took = seq_took.min(took);
        std::fs::remove_file(&path)?;
        encode = encode.min(encoded_records(records)?.2);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(WritePaths {
        store: store_took,
        spill: spill_took,
        seq: seq_took,
        encode,
        bytes,
        stored,
    })
}

/// Only the write paths, `rounds` times (for profiling: `PULSEFLOW_BENCH_WRITE_PATHS=N`
/// skips the pipelines).
fn write_paths_only(records: u64, rounds: u32) -> Result<Report, Box<dyn std::error::Error>> {
    let mut report = Report::new(
        format!("accumulate write paths: {records} records, {rounds} rounds"),
        &[
            "round",
            "store alone",
            "with encode",
            "ns/record: seq, store, with encode, encode",
            "CPU ns/record: seq, store, with encode",
        ],
    );
    let ratio =
        |a: Duration, b: Duration| (b.as_secs_f64() / a.as_secs_f64() * 1000.0).round() / 1000.0;
    for round in 0..rounds {
        let w = write_paths(records)?;
        report.row(vec![
            round.to_string(),
            format!("{:.3}", ratio(w.store.wall, w.seq.wall)),
            format!("{:.3}", ratio(w.spill.wall, w.seq.wall)),
            [w.seq.wall, w.store.wall, w.spill.wall, w.encode]
                .map(|d| format!("{:.1}", d.as_nanos() as f64 / records as f64))
                .join(" "),
            [w.seq.cpu, w.store.cpu, w.spill.cpu]
                .map(|d| format!("{:.1}", d.as_nanos() as f64 / records as f64))
                .join(" "),
        ]);
    }
    Ok(report)
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pulseflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// In-memory runs, each paired with a baseline run just before it.
const MEM_ROUNDS: usize = 7;

pub fn run(opts: &CommonOpts) -> Result<Report, Box<dyn std::error::Error>> {
    let (n, keys) = if opts.quick {
        (2_000_000u64, 200_000u64)
    } else {
        (10_000_000, 1_000_000)
    };
    if let Some(rounds) = std::env::var("PULSEFLOW_BENCH_WRITE_PATHS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        return write_paths_only(keys, rounds);
    }
    let mut report = Report::new(
        format!("accumulate: {n} updates over {keys} keys (count and sum per key)"),
        &["run", "time", "updates/s", "vs hashmap", "notes"],
    );
    let (base_time, base_check) = baseline(n, keys);
    let base_rate = n as f64 / base_time.as_secs_f64();
    report.row(vec![
        "HashMap loop".into(),
        format!("{base_time:.2?}"),
        per_sec(base_rate),
        "1.00".into(),
        String::new(),
    ]);

    // The spill run goes first, so its peak RSS is its own and not what the allocator kept
    // from the in-memory run (glibc keeps freed memory of other threads' arenas). Its budget
    // is a tenth of the in-memory state, sized from a small run (the state per key is fixed)
    // and checked against the full in-memory run afterwards. The sample runs on one worker:
    // with several, each holds its keys until its own end of input, so the peak of a run
    // that short may miss some.
    let sample_keys = 1000;
    let one_worker = CommonOpts {
        acc_workers: None,
        ..opts.clone()
    };
    let sample = pipeline(
        sample_keys * 10,
        sample_keys,
        MemoryBudget::unlimited(),
        false,
        &one_worker,
    )?;
    let per_key = sample.state_peak / sample_keys;
    let budget = (per_key * keys / 10).max(1);
    reset_peak_rss();
    let rss_before = rss_kib() as f64 / 1024.0;
    let spill = pipeline(n, keys, MemoryBudget::new(budget), true, opts)?;
    let peak_rss = peak_rss_kib() as f64 / 1024.0;
    if spill.check != base_check {
        return Err("outputs with spill differ from the baseline".into());
    }

    // The in-memory run, each time right after a baseline run: the pair shares the
    // machine's state (the baseline's time varies 3x between runs on this VM, with the
    // memory's state), and the median of the pairs' ratios is the figure.
    let mut pairs = Vec::with_capacity(MEM_ROUNDS);
    let mut last = None;
    for _ in 0..MEM_ROUNDS {
        let (base, check) = baseline(n, keys);
        if check != base_check {
            return Err("the baseline's outputs changed between runs".into());
        }
        let mem = pipeline(n, keys, MemoryBudget::unlimited(), false, opts)?;
        if mem.check != base_check {
            return Err("in-memory outputs differ from the baseline".into());
        }
        // Exactly ten times on one worker; with several, within 5 % (their tables grow
        // apart).
        if (mem.state_peak / 10).abs_diff(budget) > budget / 20 {
            return Err(format!(
                "in-memory state {} B is not about ten times the spill budget {budget} B",
                mem.state_peak
            )
            .into());
        }
        pairs.push((base, mem.elapsed));
        last = Some(mem);
    }
    let mem = last.ok_or("no in-memory run")?;
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|(base, mem)| base.as_secs_f64() / mem.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let vs_hashmap = ratios[ratios.len() / 2];
    let (base_med, mem_med) = pairs
        .iter()
        .copied()
        .find(|(b, m)| b.as_secs_f64() / m.as_secs_f64() == vs_hashmap)
        .unwrap_or((base_time, mem.elapsed));
    let mem_rate = n as f64 / mem_med.as_secs_f64();
    let state = mem.state_peak.max(1);
    report.row(vec![
        "accumulator, in memory".into(),
        format!("{mem_med:.2?}"),
        per_sec(mem_rate),
        format!("{vs_hashmap:.2}"),
        format!(
            "median of {MEM_ROUNDS} runs, each over a HashMap run just before (this one's: {base_med:.2?}); ratios {}; state {:.1} MiB {}",
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            state as f64 / 1048576.0,
            mem.tiers
        ),
    ]);

    let spill_rate = n as f64 / spill.elapsed.as_secs_f64();
    let m = |k: &str| spill.metrics.get(k).copied().unwrap_or(0.0);
    report.row(vec![
        "accumulator, budget = state / 10".into(),
        format!("{:.2?}", spill.elapsed),
        per_sec(spill_rate),
        format!("{:.2}", spill_rate / base_rate),
        format!(
            "{} spills, {} reloads, ratio {:.2}, peak RSS {:.0} MiB (at start {:.0}), budget {:.1} MiB; run before the in-memory one {}",
            m("spill.spills"),
            m("spill.reloads"),
            m("spill.compression_ratio"),
            peak_rss,
            rss_before,
            budget as f64 / 1048576.0,
            spill.tiers
        ),
    ]);

    let w = write_paths(keys)?;
    let mib = |d: Duration| format!("{:.0}", w.rate(d) / 1048576.0);
    report.row(vec![
        "spill write, encoding in place".into(),
        String::new(),
        format!("{} MiB/s", mib(w.spill.wall)),
        String::new(),
        format!(
            "{:.1} MiB of states ({:.1} MiB stored), MiB/s wall (CPU): encoding in place {} ({}); store alone, pre-encoded {} ({}); plain sequential write of the same bytes {} ({}); encoding alone {}",
            w.bytes as f64 / 1048576.0,
            w.stored as f64 / 1048576.0,
            mib(w.spill.wall),
            mib(w.spill.cpu),
            mib(w.store.wall),
            mib(w.store.cpu),
            mib(w.seq.wall),
            mib(w.seq.cpu),
            mib(w.encode),
        ),
    ]);
    let ratio =
        |a: Duration, b: Duration| (b.as_secs_f64() / a.as_secs_f64() * 1000.0).round() / 1000.0;
    let over = peak_rss - budget as f64 / 1048576.0;
    report.note("keys arrive in a window sliding over the key space (about 10 updates per key); everything is flushed at the end of input");
    report.summary(json!({
        "scenario": "accumulate",
        "updates": n,
        "keys": keys,
        "vs_hashmap": (vs_hashmap * 1000.0).round() / 1000.0,
        "spill_vs_hashmap": (spill_rate / base_rate * 1000.0).round() / 1000.0,
        "spill_write_vs_seq_write": ratio(w.store.wall, w.seq.wall),
        "spill_write_with_encode_vs_seq_write": ratio(w.spill.wall, w.seq.wall),
        "spill_write_vs_seq_write_cpu": ratio(w.store.cpu, w.seq.cpu),
        "spill_write_with_encode_vs_seq_write_cpu": ratio(w.spill.cpu, w.seq.cpu),
        "peak_rss_over_budget_mib": (over * 10.0).round() / 10.0,
        "spill_rss_at_start_mib": (rss_before * 10.0).round() / 10.0,
        "spill_rss_growth_mib": ((peak_rss - rss_before) * 10.0).round() / 10.0,
        "spills": m("spill.spills"),
        "reloads": m("spill.reloads"),
        "compression_ratio": (m("spill.compression_ratio") * 100.0).round() / 100.0,
    }));
    Ok(report)
}
