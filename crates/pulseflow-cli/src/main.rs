//! `pulseflow`: run pipelines described in configuration files.
//!
//! ```text
//! pulseflow run CONFIG [--quiet] [--admin ADDR] [--supervision yield|isolate|off] [--instance I/N]
//! pulseflow validate CONFIG
//! pulseflow graph CONFIG [--format dot|mermaid|svg]
//! pulseflow top [ADDR] [--once]
//! pulseflow tap ADDR STAGE [--limit N] [--every K]
//! pulseflow test CONFIG...
//! ```
//!
//! Exit status: 0 on success, 1 when the pipeline failed, 2 for an invalid config.

mod admin;
mod alloc;
mod build;
mod components;
mod config;
mod jq;
mod jq_fast;
mod json;
mod latency;
mod page;
mod report;
mod tap;
mod testing;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pulseflow::connectors::nats::partition::Instance;
use pulseflow::prelude::*;

use crate::config::{Config, LoadError};

/// Run dataflow pipelines described in TOML files.
#[derive(Parser)]
#[command(name = "pulseflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline of a config file.
    Run {
        /// The config file (TOML).
        config: PathBuf,
        /// No progress bar and no table of stages.
        #[arg(long, short)]
        quiet: bool,
        /// Serve /metrics, /stages and /health on ADDR (a port alone means loopback).
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
        /// How Tokio-Pulse supervises the stages: `yield` (the default) times every poll and
        /// makes CPU-bound stages work in small chunks and give way; `isolate` also moves them
        /// to threads that run at idle priority (other processes then come first); `off`
        /// turns supervision off.
        #[arg(long, value_enum, default_value_t = SupervisionMode::Yield)]
        supervision: SupervisionMode,
        /// Same as `--supervision off`.
        #[arg(long, conflicts_with = "supervision")]
        unsupervised: bool,
        /// This process is instance I of N running the same config: partitioned `nats`
        /// sources read the partitions p with p mod N = I.
        #[arg(long, value_name = "I/N", default_value = "0/1")]
        instance: Instance,
    },
    /// Check a config file without running it.
    Validate {
        /// The config file (TOML).
        config: PathBuf,
    },
    /// Print the pipeline graph.
    Graph {
        /// The config file (TOML).
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Show the stages of a running `pulseflow run --admin ADDR`, refreshed every second.
    Top {
        /// Where its admin server listens.
        #[arg(default_value = "127.0.0.1:9898")]
        addr: String,
        /// Print one frame (once the pipeline shows its stages) and exit, without clearing
        /// the screen.
        #[arg(long)]
        once: bool,
    },
    /// Print the items leaving a stage of a running `pulseflow run --admin ADDR`, as JSON
    /// lines (a slow reader misses items, counted on stderr; the pipeline never waits).
    Tap {
        /// Where its admin server listens.
        addr: String,
        /// The stage (`pulseflow graph` names them).
        stage: String,
        /// Stop after this many items.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Show one item of every K.
        #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        every: u64,
    },
    /// Run the `[[tests]]` of config files: each feeds its own inputs to the pipeline
    /// (on a simulated clock) and checks outputs, dead letters and counts.
    Test {
        /// The config files (TOML).
        #[arg(required = true)]
        configs: Vec<PathBuf>,
    },
}

/// `run --supervision`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SupervisionMode {
    /// Monitor, Warn and Yield; never isolated.
    Yield,
    /// Every tier, Isolate included.
    Isolate,
    /// No supervision.
    Off,
}

impl SupervisionMode {
    fn engine(self) -> pulseflow::engine::Supervision {
        use pulseflow::engine::Supervision;
        match self {
            SupervisionMode::Yield => Supervision::NoIsolation,
            SupervisionMode::Isolate => Supervision::Default,
            SupervisionMode::Off => Supervision::Off,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
    /// The picture the `--admin` page shows.
    Svg,
}

const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    alloc::tune();
    let cli = Cli::parse();
    if let Command::Test { configs } = &cli.command {
        // Each test runs on a runtime of its own, with a simulated clock.
        return match testing::run_all(configs, &mut std::io::stdout().lock()) {
            Ok(s) if s.failed == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(EXIT_FAILED),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(16 << 20)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Validate { config } => validate(&config),
            Command::Graph { config, format } => graph(&config, format),
            Command::Run {
                config,
                quiet,
                admin,
                supervision,
                unsupervised,
                instance,
            } => {
                let supervision = if unsupervised {
                    SupervisionMode::Off
                } else {
                    supervision
                };
                run(&config, quiet, admin, supervision, instance).await
            }
            Command::Top { addr, once } => ExitCode::from(admin::top(&addr, once).await),
            Command::Tap {
                addr,
                stage,
                limit,
                every,
            } => ExitCode::from(tap::run(&addr, &stage, tap::TapRequest { limit, every }).await),
            Command::Test { .. } => ExitCode::SUCCESS,
        }
    })
}

/// Loads and builds a config, printing its problems.
fn load(path: &Path, instance: Instance) -> Result<(Config, Pipeline, build::Progress), ExitCode> {
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut config = match config::load(path) {
        Ok(c) => c,
        Err(LoadError::Invalid(problems)) => {
            eprint!("{}", config::diagnostic::render(&problems, color));
            return Err(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(EXIT_INVALID));
        }
    };
    config.instance = instance;
    match build::build(&config) {
        Ok((pipeline, progress)) => Ok((config, pipeline, progress)),
        Err(problems) => {
            eprint!("{}", config::diagnostic::render(&problems, color));
            Err(ExitCode::from(EXIT_INVALID))
        }
    }
}

fn validate(path: &Path) -> ExitCode {
    match load(path, Instance::default()) {
        Ok((config, pipeline, _)) => {
            println!(
                "{}: valid ({} components, {} stages)",
                path.display(),
                config.components.len(),
                pipeline.graph().nodes.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn graph(path: &Path, format: GraphFormat) -> ExitCode {
    match load(path, Instance::default()) {
        Ok((_, pipeline, _)) => {
            let text = match format {
                GraphFormat::Dot => pipeline.graph().to_dot(),
                GraphFormat::Mermaid => pipeline.graph().to_mermaid(),
                GraphFormat::Svg => page::svg::render(pipeline.graph()),
            };
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The engine options a config asks for (batch size, memory budget), under `supervision`.
fn execution_options(config: &Config, supervision: SupervisionMode) -> ExecutionOptions {
    let mut options = ExecutionOptions::default().with_supervision(supervision.engine());
    if let Some(t) = config.batch_timeout {
        options = options.with_batch_timeout(t);
    }
    if let Some(n) = config.batch_size {
        options = options.with_batch_size(n);
    }
    if let Some(bytes) = config.memory_budget {
        options = options.with_memory_budget(pulseflow::memory::MemoryBudget::new(bytes));
    }
    options
}

async fn run(
    path: &Path,
    quiet: bool,
    admin: Option<String>,
    supervision: SupervisionMode,
    instance: Instance,
) -> ExitCode {
    let (config, pipeline, progress) = match load(path, instance) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let terminal = std::io::stderr().is_terminal() && !quiet;
    let mut options = execution_options(&config, supervision);
    let mut dead_letters = None;
    let projected = build::projected_stages(&config);
    if let Some(target) = &config.dead_letter {
        match components::dead_letter::DeadLetterWriter::start(target, projected.clone()) {
            Ok((writer, handle)) => {
                options = options.with_dead_letter_sink(writer);
                dead_letters = Some(handle);
            }
            Err(e) => {
                eprintln!("error: cannot open the dead-letter sink: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    let engine = ExecutionEngine::new();
    let latencies = Arc::new(latency::Latencies::default());
    let mut server = None;
    let taps = tap::OpenTaps::default();
    if let Some(addr) = admin {
        let started = async {
            let addr = admin::parse_addr(&addr).await?;
            let metrics = admin::install_metrics(latencies.clone(), true)
                .map_err(std::io::Error::other)?
                .ok_or_else(|| std::io::Error::other("no Prometheus recorder"))?;
            let page = Arc::new(page::html(&config.name, pipeline.graph()));
            admin::serve(
                addr,
                engine.clone(),
                metrics,
                latencies.clone(),
                page,
                taps.clone(),
            )
            .await
        };
        match started.await {
            Ok((local, task)) => {
                eprintln!("admin: http://{local} (/, /metrics, /stages, /tap/STAGE, /health)");
                server = Some(task);
            }
            Err(e) => {
                eprintln!("error: cannot serve --admin {addr}: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    } else if terminal {
        // Batch latencies for the table of stages; without them it shows averages only.
        let _ = admin::install_metrics(latencies.clone(), false);
    }
    let signals = tokio::spawn(watch_signals(engine.clone()));
    let bar = (terminal && progress.total > 0).then(|| progress_bar(&progress));
    let result = engine.run(pipeline, options).await;
    signals.abort();
    // The acks of `nats` sources: every item is handled, so each is resolved; send them all.
    for flushed in progress.acks_flushed.iter().cloned() {
        if tokio::time::timeout(Duration::from_secs(10), flushed.wait())
            .await
            .is_err()
        {
            eprintln!(
                "warning: not every NATS ack was sent; those messages will be delivered again"
            );
        }
    }
    // The last checkpoints: where every line below is handled, now that nothing is in flight.
    let mut checkpoints_written = true;
    for checkpoints in &progress.checkpoints {
        if let Err(e) = checkpoints.write() {
            eprintln!("error: {e}");
            checkpoints_written = false;
        }
    }
    if let Some(task) = server {
        // Taps send what they still hold, and their last count of missed items.
        taps.ended(Duration::from_secs(2)).await;
        task.abort();
    }
    if let Some((bar, task)) = bar {
        task.abort();
        bar.set_position(progress.bytes.load(std::sync::atomic::Ordering::Relaxed));
        bar.finish();
    }
    let mut ok = result.success && checkpoints_written;
    if let Some(handle) = dead_letters {
        if let Err(e) = handle.finish() {
            eprintln!("error: writing dead letters failed: {e}");
            ok = false;
        }
    }
    let a = &result.accounting;
    let summary = format!(
        "{} in, {} delivered, {} filtered, {} dropped, {} dead-lettered in {:.2?}{}",
        a.items_in(),
        a.delivered,
        a.filtered,
        a.dropped,
        a.dead_lettered,
        result.duration,
        if a.reconciles() {
            ""
        } else {
            " (counts do not reconcile)"
        }
    );
    if terminal {
        let stages: Vec<serde_json::Value> = engine
            .inspect_all()
            .iter()
            .map(|s| report::stage_json(s, &latencies))
            .collect();
        eprint!("{}", report::table(&stages));
        for line in report::spill_lines(&stages) {
            eprintln!("{line}");
        }
        eprintln!("{summary}");
    } else if !quiet {
        // Scripts and logs see the outcome in one line.
        eprintln!("pulseflow: {summary}");
    }
    if config.dead_letter.is_none() && !result.dead_letters.is_empty() && !quiet {
        let n = result.dead_letters.len() as u64 + result.dead_letters_not_kept;
        eprintln!("{n} items dead-lettered (add a [dead_letter] sink to keep them); first:");
        for letter in result.dead_letters.iter().take(5) {
            eprintln!("  {}", components::dead_letter::record(letter, &projected));
        }
    }
    if let Some(e) = &result.error {
        eprintln!("error: {e}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// A bar of bytes read by file sources, of their total size, with rate and ETA.
fn progress_bar(
    progress: &build::Progress,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new(progress.total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style);
    }
    let bytes = progress.bytes.clone();
    let b = bar.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            b.set_position(bytes.load(std::sync::atomic::Ordering::Relaxed));
        }
    });
    (bar, task)
}

/// First Ctrl-C or SIGTERM: drain within 30 s; a second signal: abort.
async fn watch_signals(engine: ExecutionEngine) {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: cannot watch for signals: {e}");
            return;
        }
    };
    signals.next().await;
    eprintln!("stopping: draining the pipeline (Ctrl-C again to abort)");
    let stopper = engine.clone();
    tokio::spawn(async move { stopper.stop(Duration::from_secs(30)).await });
    signals.next().await;
    eprintln!("aborting");
    engine.abort();
}

/// Ctrl-C (SIGINT) and, on Unix, SIGTERM.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// The next signal (waits for ever if signals cannot be received).
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `text` (a config whose sink `out` writes `out.ndjson` in `dir`) and returns the
    /// result and the sorted output lines.
    async fn run_config(dir: &Path, text: &str) -> (PipelineResult, Vec<String>) {
        let config = config::parse("test.toml", Arc::new(text.to_owned()), dir)
            .unwrap_or_else(|p| panic!("config refused: {} problems", p.len()));
        let (pipeline, _) =
            build::build(&config).unwrap_or_else(|p| panic!("not built: {} problems", p.len()));
        let options = execution_options(&config, SupervisionMode::Off);
        let result = ExecutionEngine::new().run(pipeline, options).await;
        assert!(result.success, "{:?}", result.error);
        assert!(result.accounting.reconciles(), "{:?}", result.accounting);
        let text = std::fs::read_to_string(dir.join("out.ndjson")).expect("output");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        (result, lines)
    }

    /// A config: `count` items generated by `jq`, accumulated per `.user` with partial flush,
    /// the accumulator's own `settings` (TOML lines), written to `out.ndjson`.
    fn per_user(count: u64, jq: &str, settings: &str) -> String {
        format!(
            r#"
[sources.gen]
type = "generate"
count = {count}
jq = '{jq}'

[transforms.per_user]
type = "accumulate"
inputs = ["gen"]
key = ".user"
partial_flush = true
{settings}

[sinks.out]
type = "file"
inputs = ["per_user"]
path = "out.ndjson"
"#
        )
    }

    #[tokio::test]
    async fn memory_budget_makes_accumulate_spill_with_the_same_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = per_user(
            20_000,
            "{user: (. % 5000), amount: .}",
            r#"spill = true
aggregates = { n = "count", total = "sum(.amount)", ids = "collect(.amount)" }"#,
        );
        let spills = |r: &PipelineResult| {
            r.stage("per_user")
                .and_then(|s| s.metrics.get("spill.spills").copied())
                .unwrap_or(0.0)
        };
        let (unlimited, expected) = run_config(dir.path(), &body).await;
        assert_eq!(spills(&unlimited), 0.0);
        assert_eq!(expected.len(), 5000);
        let limited = format!("memory_budget = \"64 KiB\"\n{body}");
        let (spilled, got) = run_config(dir.path(), &limited).await;
        assert!(spills(&spilled) > 1000.0, "{:?}", spilled.stage("per_user"));
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn max_bytes_counts_generated_items_by_their_json_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Each item is 70 bytes of JSON with its newline: a key reaches 500 bytes at its 8th.
        let text = per_user(
            100,
            &format!("{{user: (. % 2), pad: \"{}\"}}", "x".repeat(50)),
            "max_bytes = 500\naggregates = { n = \"count\" }",
        );
        let (_, lines) = run_config(dir.path(), &text).await;
        let counts: Vec<u64> = lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                v["n"].as_u64().expect("n")
            })
            .collect();
        // 50 items per key: six flushes of 8 on the limit, 2 left for the end of input.
        assert_eq!(counts.iter().filter(|&&n| n == 8).count(), 12, "{lines:?}");
        assert_eq!(counts.iter().filter(|&&n| n == 2).count(), 2, "{lines:?}");
        assert_eq!(counts.len(), 14);
    }

    #[tokio::test]
    async fn closed_ttl_gives_one_output_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Five items per user, complete at two: closed for an hour, each user's other three
        // items are dropped; without it each user would start again (2, 2, then 1 flushed).
        let text = per_user(
            10,
            "{user: (. % 2)}",
            "aggregates = { n = \"count\" }\ncomplete_when = { count = 2 }\nclosed_ttl = \"1h\"",
        );
        let (result, lines) = run_config(dir.path(), &text).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.iter().all(|l| l.contains("\"n\":2")), "{lines:?}");
        assert_eq!(result.accounting.dropped, 6);
    }

    #[test]
    fn memory_budget_sizes() {
        let parse = |v: &str| {
            let text = format!(
                "memory_budget = {v}\n[sources.s]\ntype = \"stdin\"\n[sinks.o]\ntype = \"blackhole\"\ninputs = [\"s\"]\n"
            );
            config::parse("t.toml", Arc::new(text), ".".as_ref())
                .map(|c| c.memory_budget)
                .map_err(|p| p.len())
        };
        assert_eq!(parse("1000"), Ok(Some(1000)));
        assert_eq!(parse("\"512 MiB\""), Ok(Some(512 << 20)));
        assert_eq!(parse("\"2GB\""), Ok(Some(2_000_000_000)));
        assert_eq!(parse("\"64k\""), Ok(Some(64_000)));
        for bad in ["0", "-5", "\"lots\"", "\"12 parsecs\"", "true"] {
            assert_eq!(parse(bad), Err(1), "{bad}");
        }
    }
}
