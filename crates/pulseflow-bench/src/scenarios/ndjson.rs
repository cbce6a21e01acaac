//! `ndjson`: the `pulseflow` command on a file of JSON lines (a jq filter and a jq map, written
//! to a file) against a plain serde_json read-parse-write loop doing the same (the parser's own
//! limit), and `jq -c` and `jaq -c` with the same program and file, each when it is on the PATH.
//!
//! The `pulseflow` binary is taken from beside this one: build it first with
//! `cargo build --release -p pulseflow-cli`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::CommonOpts;
use crate::report::{Report, median};

const FILTER: &str = ".ok";
const MAP: &str = "{id, user, amount: (.amount * 2)}";

pub(crate) type BoxError = Box<dyn std::error::Error>;

/// Writes JSON lines until the file holds `bytes` bytes; returns the line count.
pub(crate) fn generate(path: &Path, bytes: u64) -> Result<u64, BoxError> {
    let mut out = BufWriter::new(File::create(path)?);
    let (mut written, mut lines) = (0u64, 0u64);
    while written < bytes {
        let line = json!({
            "id": lines,
            "user": format!("user{}", lines % 1000),
            "amount": lines % 997,
            "ok": lines % 3 != 0,
            "tags": ["alpha", "beta"],
            "note": "the quick brown fox jumps over the lazy dog",
        })
        .to_string();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        written += line.len() as u64 + 1;
        lines += 1;
    }
    out.flush()?;
    Ok(lines)
}

pub(crate) fn pulseflow_binary() -> Result<PathBuf, BoxError> {
    let bin = std::env::current_exe()?
        .parent()
        .ok_or("no directory for this executable")?
        .join("pulseflow");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it first with `cargo build --release -p pulseflow-cli`",
            bin.display()
        )
        .into())
    }
}

/// Runs the scenario's pipeline (`settings`: more top-level keys of its config).
pub(crate) fn run_pulseflow(
    dir: &Path,
    input: &Path,
    output: &Path,
    unsupervised: bool,
    decode_workers: usize,
    settings: &str,
) -> Result<Duration, BoxError> {
    let config = dir.join("bench.toml");
    let parallelism = if decode_workers > 1 {
        format!("parallelism = {decode_workers}\n")
    } else {
        String::new()
    };
    std::fs::write(
        &config,
        format!(
            "name = \"ndjson-bench\"\n{settings}\n\
             [sources.lines]\ntype = \"file\"\npath = {input:?}\n{parallelism}\n\
             [transforms.keep]\ntype = \"filter\"\ninputs = [\"lines\"]\ncondition = {FILTER:?}\n\n\
             [transforms.shape]\ntype = \"map\"\ninputs = [\"keep\"]\njq = {MAP:?}\n\n\
             [sinks.out]\ntype = \"file\"\ninputs = [\"shape\"]\npath = {output:?}\n"
        ),
    )?;
    let started = Instant::now();
    let mut command = Command::new(pulseflow_binary()?);
    command.args(["run", "--quiet"]).arg(&config);
    if unsupervised {
        command.arg("--unsupervised");
    }
    let status = command.stdout(Stdio::null()).status()?;
    let elapsed = started.elapsed();
    if !status.success() {
        return Err(format!("pulseflow run exited with {status}").into());
    }
    Ok(elapsed)
}

/// The same work with serde_json alone: read, parse, keep `.ok`, build the object, write.
fn run_parse_loop(input: &Path, output: &Path) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let reader = BufReader::new(File::open(input)?);
    let mut out = BufWriter::new(File::create(output)?);
    for line in reader.lines() {
        let v: Value = serde_json::from_str(&line?)?;
        if v.get("ok").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let amount = v.get("amount").and_then(Value::as_i64).unwrap_or(0);
        let shaped = json!({"id": v.get("id"), "user": v.get("user"), "amount": amount * 2});
        serde_json::to_writer(&mut out, &shaped)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(started.elapsed())
}

/// A jq-like command the scenario compares with: its name on the PATH, and what the report
/// calls it.
#[derive(Clone, Copy)]
struct Contender {
    command: &'static str,
    label: &'static str,
}

const JQ: Contender = Contender {
    command: "jq",
    label: "jq -c",
};
const JAQ: Contender = Contender {
    command: "jaq",
    label: "jaq -c",
};

impl Contender {
    /// Its `--version` output, `None` when it is not on the PATH (or does not run).
    fn version(self) -> Option<String> {
        let probe = Command::new(self.command).arg("--version").output().ok()?;
        probe
            .status
            .success()
            .then(|| String::from_utf8_lossy(&probe.stdout).trim().to_owned())
    }

    /// Runs it as a user would: `jq -c PROGRAM FILE > output`.
    fn run(self, input: &Path, output: &Path) -> Result<Duration, BoxError> {
        let started = Instant::now();
        let status = Command::new(self.command)
            .arg("-c")
            .arg(format!("select({FILTER}) | {MAP}"))
            .arg(input)
            .stdout(File::create(output)?)
            .status()?;
        if !status.success() {
            return Err(format!("{} exited with {status}", self.command).into());
        }
        Ok(started.elapsed())
    }
}

fn line_count(path: &Path) -> Result<u64, BoxError> {
    Ok(BufReader::new(File::open(path)?).lines().count() as u64)
}

/// Every contender wrote the same lines; pulseflow and the parse loop the same bytes.
fn check_outputs(
    pf_out: &Path,
    loop_out: &Path,
    others: &[(Contender, PathBuf)],
) -> Result<(), BoxError> {
    let expected = line_count(loop_out)?;
    let got = line_count(pf_out)?;
    if got != expected {
        return Err(format!("pulseflow wrote {got} lines, the parse loop {expected}").into());
    }
    // Both print keys sorted, as serde_json does: the outputs are the same bytes.
    if std::fs::read(pf_out)? != std::fs::read(loop_out)? {
        return Err("pulseflow's output differs from the parse loop's".into());
    }
    for (contender, out) in others {
        let theirs = line_count(out)?;
        if theirs != expected {
            return Err(format!(
                "{} wrote {theirs} lines, the parse loop {expected}",
                contender.command
            )
            .into());
        }
    }
    Ok(())
}

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, BoxError> {
    let megabytes: u64 = if opts.quick { 40 } else { 200 };
    let dir = std::env::temp_dir().join(format!("pulseflow-ndjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(&dir, megabytes, opts);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(dir: &Path, megabytes: u64, opts: &CommonOpts) -> Result<Report, BoxError> {
    let decode_workers = opts.decode_workers.unwrap_or(1).max(1);
    let input = dir.join("input.ndjson");
    let lines = generate(&input, megabytes << 20)?;
    let bytes = std::fs::metadata(&input)?.len() as f64;
    let mb = bytes / (1 << 20) as f64;

    let pf_out = dir.join("pulseflow.ndjson");
    let loop_out = dir.join("loop.ndjson");
    // jq and jaq when on the PATH, with their versions.
    let others: Vec<(Contender, String, PathBuf)> = [JQ, JAQ]
        .into_iter()
        .filter_map(|c| {
            let version = c.version()?;
            Some((c, version, dir.join(format!("{}.ndjson", c.command))))
        })
        .collect();
    // Interleaved rounds, medians: single runs of the same binary vary by up to 2x here.
    let rounds = if opts.quick { 5 } else { 3 };
    let (mut ours, mut loops) = (Vec::new(), Vec::new());
    let mut theirs: Vec<Vec<Duration>> = vec![Vec::new(); others.len()];
    for round in 0..rounds {
        ours.push(run_pulseflow(
            dir,
            &input,
            &pf_out,
            opts.unsupervised,
            decode_workers,
            "",
        )?);
        loops.push(run_parse_loop(&input, &loop_out)?);
        for ((contender, _, out), times) in others.iter().zip(&mut theirs) {
            times.push(contender.run(&input, out)?);
        }
        if round == 0 {
            let outs: Vec<(Contender, PathBuf)> =
                others.iter().map(|(c, _, out)| (*c, out.clone())).collect();
            check_outputs(&pf_out, &loop_out, &outs)?;
        }
    }
    let pulseflow = median(ours.clone());
    let parse_loop = median(loops.clone());
    // The median of each contender found, by command name.
    let median_of = |command: &str| {
        others
            .iter()
            .zip(&theirs)
            .find(|((c, _, _), _)| c.command == command)
            .map(|(_, times)| median(times.clone()))
    };
    let jq = median_of(JQ.command);
    let jaq = median_of(JAQ.command);

    let rate = |d: Duration| mb / d.as_secs_f64();
    let mut report = Report::new(
        format!(
            "ndjson: {mb:.0} MB, {lines} lines, filter {FILTER} | map {MAP} -> file, \
             median of {rounds} interleaved rounds"
        ),
        &["contender", "MB/s", "seconds", "pulseflow ÷ this (speed)"],
    );
    let mut row = |name: &str, d: Duration| {
        report.row(vec![
            name.to_owned(),
            format!("{:.1}", rate(d)),
            format!("{:.2}", d.as_secs_f64()),
            format!("{:.2}", d.as_secs_f64() / pulseflow.as_secs_f64()),
        ]);
    };
    row("pulseflow run (binary, jq via jaq)", pulseflow);
    row("serde_json read-parse-write loop", parse_loop);
    let mut missing = Vec::new();
    for contender in [JQ, JAQ] {
        let found = others
            .iter()
            .find(|(c, _, _)| c.command == contender.command);
        match (found, median_of(contender.command)) {
            (Some((_, version, _)), Some(d)) => {
                row(&format!("{} ({version})", contender.label), d);
            }
            _ => missing.push(contender.command),
        }
    }
    for command in missing {
        report.note(format!("{command} not on the PATH: vs_{command} is null"));
    }
    let seconds = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut rounds_note = format!(
        "rounds (s): pulseflow {}; parse loop {}",
        seconds(&ours),
        seconds(&loops)
    );
    for ((contender, _, _), times) in others.iter().zip(&theirs) {
        rounds_note.push_str(&format!("; {} {}", contender.command, seconds(times)));
    }
    report.note(rounds_note);
    let vs = |d: Duration| ((d.as_secs_f64() / pulseflow.as_secs_f64()) * 100.0).round() / 100.0;
    report.summary(json!({
        "scenario": "ndjson",
        "megabytes": mb.round(),
        "lines": lines,
        "mb_per_sec": (rate(pulseflow) * 10.0).round() / 10.0,
        "vs_parse_loop": vs(parse_loop),
        "vs_jq": jq.map(vs),
        "vs_jaq": jaq.map(vs),
        "cores": pulseflow::policy::cores(),
        "unsupervised": opts.unsupervised,
        "decode_workers": decode_workers,
        "rounds": rounds,
    }));
    Ok(report)
}
