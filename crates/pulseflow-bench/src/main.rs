//! `pulseflow-bench`: side-by-side benchmarks of pulseflow and Tokio-Pulse against baselines
//! measured in the same process and run.
//!
//! Every scenario prints a readable table and, as its very last line, one JSON object whose
//! ratios (`vs_*`) compare pulseflow with the baselines of the same run.
//!
//! ```text
//! cargo run --release -p pulseflow-bench -- linear --quick
//! ```

mod report;
mod scenarios;

use clap::{Parser, Subcommand};

/// Command line of the benchmark binary.
#[derive(Debug, Parser)]
#[command(
    name = "pulseflow-bench",
    about = "Benchmarks pulseflow against baselines in one run"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonOpts {
    /// Run a smaller workload that finishes well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Measure only pulseflow, without the baselines (for profiling; prints no ratios).
    #[arg(long)]
    pub profile: bool,
    /// Items per batch produced by pulseflow sources (scenarios that batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Run pulseflow stages without Tokio-Pulse supervision (it is on by default).
    #[arg(long)]
    pub unsupervised: bool,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// `ndjson`: workers decoding the file source's lines (its `parallelism`; default 1).
    #[arg(long)]
    pub decode_workers: Option<usize>,
    /// `accumulate`: workers of the accumulator stage, keys partitioned by hash (its
    /// `parallelism`; default 1).
    #[arg(long)]
    pub acc_workers: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Source -> map -> filter -> sink against hand-written channel chains and a single loop.
    Linear(CommonOpts),
    /// A fast source into a slowed sink, once per backpressure strategy: in-flight peak
    /// against the bound, peak RSS, shaped rate, controller cost per item.
    Backpressure(CommonOpts),
    /// `pulseflow run` on a file of JSON lines (filter + map to a file) against a serde_json
    /// read-parse-write loop, `jq -c` and `jaq -c` (each when on the PATH).
    Ndjson(CommonOpts),
    /// The `ndjson` pipeline with and without a `data_dir` (checkpoints), and the latency of
    /// one line through a live stdin -> stdout pipeline.
    Checkpoint(CommonOpts),
    /// The HTTP source's ingest rate against a bare axum handler, and its p99 latency next to
    /// a CPU-hogging branch, supervised and not.
    Http(CommonOpts),
    /// Cost per poll of Tokio-Pulse supervision against bare, TaskMonitor and a CPU-clock wrapper.
    PulseOverhead(CommonOpts),
    /// Latency of light tasks next to CPU hogs: none, unsupervised, supervised (isolated).
    Isolation(CommonOpts),
    /// Count-and-sum per key through the accumulator stage against a HashMap loop, in memory
    /// and with a tenth of the memory (spill).
    Accumulate(CommonOpts),
    /// The accumulator's spilled states through the segment log and (with `--features
    /// store-eval`) fjall and redb: write, read in order, read at random, disk use.
    SpillStore(CommonOpts),
    /// JetStream source -> map -> JetStream sink (publish and message acks) against a
    /// hand-written async-nats consume-transform-publish-ack loop, on a local nats-server.
    Nats(CommonOpts),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.scenario {
        Scenario::Linear(opts) => scenarios::linear::run(&opts),
        Scenario::Backpressure(opts) => scenarios::backpressure::run(&opts),
        Scenario::Ndjson(opts) => scenarios::ndjson::run(&opts),
        Scenario::Checkpoint(opts) => scenarios::checkpoint::run(&opts),
        Scenario::Http(opts) => scenarios::http::run(&opts),
        Scenario::PulseOverhead(opts) => scenarios::pulse_overhead::run(&opts),
        Scenario::Isolation(opts) => scenarios::isolation::run(&opts),
        Scenario::Accumulate(opts) => scenarios::accumulate::run(&opts),
        Scenario::SpillStore(opts) => scenarios::spill_store::run(&opts),
        Scenario::Nats(opts) => scenarios::nats::run(&opts),
    };
    match outcome {
        Ok(report) => {
            report.print();
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("pulseflow-bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
