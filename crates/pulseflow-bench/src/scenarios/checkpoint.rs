//! `checkpoint`: what delivery guarantees cost. The `ndjson` scenario's pipeline (a file of JSON
//! lines, a jq filter and map, written to a file) runs with and without a `data_dir` in
//! interleaved rounds: with it, every batch of lines carries an ack and the file's handled
//! offset is written every `checkpoint_interval` (the default, 1 s). Then the latency of one
//! line through a live pipeline: written to a `stdin` source, read back from `stdout` (the
//! batch timeout at its default, 10 ms).
//!
//! The `pulseflow` binary is taken from beside this one: build it first with
//! `cargo build --release -p pulseflow-cli`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::ndjson::{BoxError, generate, pulseflow_binary, run_pulseflow};
use crate::CommonOpts;
use crate::report::{Report, median};

/// Lines timed through the live pipeline (after one that warms it up).
const LATENCY_SAMPLES: usize = 20;

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, BoxError> {
    let megabytes: u64 = if opts.quick { 40 } else { 200 };
    let dir = std::env::temp_dir().join(format!("pulseflow-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(&dir, megabytes, opts);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(dir: &Path, megabytes: u64, opts: &CommonOpts) -> Result<Report, BoxError> {
    let input = dir.join("input.ndjson");
    let lines = generate(&input, megabytes << 20)?;
    let mb = std::fs::metadata(&input)?.len() as f64 / (1 << 20) as f64;
    let output = dir.join("out.ndjson");
    let state = dir.join("state");
    let settings = format!("data_dir = {state:?}");
    let rounds = if opts.quick { 5 } else { 3 };
    let (mut plain, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(run_pulseflow(
            dir,
            &input,
            &output,
            opts.unsupervised,
            1,
            "",
        )?);
        // A fresh data_dir each time: with the last run's checkpoint there would be nothing
        // left to read.
        let _ = std::fs::remove_dir_all(&state);
        with.push(run_pulseflow(
            dir,
            &input,
            &output,
            opts.unsupervised,
            1,
            &settings,
        )?);
    }
    let checkpoint = std::fs::read_to_string(state.join("lines.checkpoint.json"))?;
    let size = std::fs::metadata(&input)?.len();
    if !checkpoint.contains(&format!("\"offset\": {size}")) {
        return Err(format!("the checkpoint does not say the whole file: {checkpoint}").into());
    }
    let (plain_d, with_d) = (median(plain.clone()), median(with.clone()));
    let latencies = first_item_latency(dir)?;
    let latency = median(latencies.clone());

    let rate = |d: Duration| mb / d.as_secs_f64();
    let mut report = Report::new(
        format!(
            "checkpoint: {mb:.0} MB, {lines} lines (the ndjson pipeline), with and without \
             data_dir, median of {rounds} interleaved rounds"
        ),
        &["run", "MB/s", "seconds"],
    );
    for (name, d) in [("without data_dir", plain_d), ("with data_dir", with_d)] {
        report.row(vec![
            name.to_owned(),
            format!("{:.1}", rate(d)),
            format!("{:.2}", d.as_secs_f64()),
        ]);
    }
    let ms = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    report.note(format!(
        "one line through stdin -> stdout: median {} ms of {} (all: {})",
        ms(&latency),
        latencies.len(),
        latencies.iter().map(ms).collect::<Vec<_>>().join(" ")
    ));
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    report.summary(json!({
        "scenario": "checkpoint",
        "megabytes": mb.round(),
        "lines": lines,
        "mb_per_sec": (rate(with_d) * 10.0).round() / 10.0,
        "mb_per_sec_without": (rate(plain_d) * 10.0).round() / 10.0,
        "checkpoint_cost_ratio": round2(with_d.as_secs_f64() / plain_d.as_secs_f64()),
        "first_item_latency_ms": round2(latency.as_secs_f64() * 1e3),
        "rounds": rounds,
        "cores": pulseflow::policy::cores(),
    }));
    Ok(report)
}

/// Times single lines through `pulseflow run` reading stdin and writing stdout: from the
/// write of a line to its output. A first line warms the pipeline up (the process starts).
fn first_item_latency(dir: &Path) -> Result<Vec<Duration>, BoxError> {
    let config = dir.join("live.toml");
    std::fs::write(
        &config,
        "[sources.events]\ntype = \"stdin\"\n\n\
         [transforms.shape]\ntype = \"map\"\ninputs = [\"events\"]\njq = \"{id, seen: true}\"\n\n\
         [sinks.out]\ntype = \"stdout\"\ninputs = [\"shape\"]\n",
    )?;
    let mut child = Command::new(pulseflow_binary()?)
        .args(["run", "--quiet"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut times = Vec::new();
    let mut line = String::new();
    for i in 0..=LATENCY_SAMPLES {
        let written = Instant::now();
        writeln!(stdin, "{{\"id\":{i}}}")?;
        stdin.flush()?;
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            return Err("the live pipeline ended early".into());
        }
        if i > 0 {
            times.push(written.elapsed());
        }
        // Lines arrive one at a time, as on a quiet live stream.
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    child.wait()?;
    Ok(times)
}
