//! Delivery guarantees of the real binary: a run killed with SIGKILL and rerun with the same
//! `data_dir` delivers every line at least once, with few duplicates; a sink whose writes fail
//! never counts its items delivered; SIGTERM drains; a corrupt checkpoint is an error.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Lines in the input of the restart tests.
const LINES: u64 = 2_000_000;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pulseflow"));
    c.env("NO_COLOR", "1");
    c
}

fn run(dir: &Path, config: &str) -> Output {
    bin()
        .args(["run", config])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

/// `{"n": i, "k": i / 3}` for every line.
fn write_input(path: &Path) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    for i in 0..LINES {
        writeln!(out, "{{\"n\":{i},\"k\":{}}}", i / 3).expect("write input");
    }
    out.flush().expect("flush input");
}

/// A fraction between 0.1 and 0.8 that differs from run to run: the moment of the kill.
fn random_fraction() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    0.1 + 0.7 * f64::from(nanos % 1000) / 1000.0
}

/// What a killed run left: the complete lines of its output, and the input line its source's
/// last checkpoint says every line before is handled (where a rerun resumes).
struct Killed {
    written: u64,
    checkpoint_line: u64,
}

/// The `handled` line of source `lines` in `state/lines.checkpoint.json` (0 without one).
fn checkpoint_line(dir: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(dir.join("state/lines.checkpoint.json")) else {
        return 0;
    };
    let saved: serde_json::Value = serde_json::from_str(&text).expect("checkpoint is JSON");
    saved["files"][0]["handled"]["line"]
        .as_u64()
        .unwrap_or_else(|| panic!("no handled line in {saved}"))
}

/// Starts `config`, kills it with SIGKILL once `out` holds `fraction` of `expected_bytes`,
/// then reruns it to the end. Returns the output's lines, and what the killed run left.
fn kill_and_rerun(
    dir: &Path,
    config: &str,
    out: &str,
    expected_bytes: u64,
) -> (Vec<String>, Killed) {
    let fraction = random_fraction();
    let mut child = bin()
        .args(["run", config, "--quiet"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    let started = Instant::now();
    let target = (expected_bytes as f64 * fraction) as u64;
    loop {
        let size = std::fs::metadata(dir.join(out)).map_or(0, |m| m.len());
        if size >= target {
            break;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("the run ended ({status}) before it was killed at {fraction:.2}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no progress before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let text = std::fs::read_to_string(dir.join(out)).expect("output");
    let killed = Killed {
        // A last line cut short is not complete.
        written: text.bytes().filter(|b| *b == b'\n').count() as u64,
        checkpoint_line: checkpoint_line(dir),
    };
    eprintln!(
        "killed at {fraction:.2} of the output: {} lines written, checkpoint at line {}",
        killed.written, killed.checkpoint_line
    );
    let rerun = run(dir, config);
    assert!(
        rerun.status.success(),
        "rerun failed: {}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let lines = std::fs::read_to_string(dir.join(out))
        .expect("output")
        .lines()
        .map(str::to_owned)
        .collect();
    (lines, killed)
}

/// Writes the input (`in.ndjson`) and config `name`: a file source `lines` with checkpoints
/// every 50 ms, the transforms `middle`, and a file sink appending what `from` gives to
/// `out.ndjson`.
fn restartable(dir: &Path, name: &str, middle: &str, from: &str) {
    write_input(&dir.join("in.ndjson"));
    std::fs::write(
        dir.join(name),
        format!(
            r#"
data_dir = "state"
checkpoint_interval = "50ms"

[sources.lines]
type = "file"
path = "in.ndjson"
{middle}
[sinks.out]
type = "file"
inputs = ["{from}"]
path = "out.ndjson"
append = true
"#
        ),
    )
    .expect("config");
}

/// The JSON values of `lines`; at most one may be broken (the line being written when the
/// process was killed may be cut short).
fn values(lines: &[String]) -> Vec<serde_json::Value> {
    let values: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let broken = lines.len() - values.len();
    assert!(broken <= 1, "{broken} broken lines");
    values
}

#[test]
fn a_run_killed_with_sigkill_and_rerun_delivers_every_line_at_least_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    restartable(dir.path(), "copy.toml", "", "lines");
    let size = std::fs::metadata(dir.path().join("in.ndjson"))
        .expect("input")
        .len();
    let (lines, killed) = kill_and_rerun(dir.path(), "copy.toml", "out.ndjson", size);
    let values = values(&lines);
    let mut seen = vec![0u32; LINES as usize];
    for v in &values {
        seen[v["n"].as_u64().expect("n") as usize] += 1;
    }
    let missing = seen.iter().filter(|c| **c == 0).count();
    assert_eq!(missing, 0, "lines never delivered");
    let duplicates = values.len() as u64 - LINES;
    eprintln!("{duplicates} duplicates");
    // The rerun resumed at the checkpoint: only lines written after it come again.
    assert!(killed.checkpoint_line <= killed.written);
    let bound = killed.written - killed.checkpoint_line;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, but only {bound} lines were written after the checkpoint"
    );
}

#[test]
fn an_accumulating_run_killed_and_rerun_emits_every_complete_key_correctly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let triples = r#"
[transforms.triples]
type = "accumulate"
inputs = ["lines"]
key = ".k"
aggregates = { items = "count", ns = "collect(.n)" }
complete_when = { count = 3 }
"#;
    restartable(dir.path(), "keys.toml", triples, "triples");
    let keys = LINES.div_ceil(3);
    // About 50 bytes per output line.
    let (lines, killed) = kill_and_rerun(dir.path(), "keys.toml", "out.ndjson", keys * 50);
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for v in values(&lines) {
        let k = v["key"].as_u64().expect("a key");
        let ns: Vec<u64> = v["ns"]
            .as_array()
            .expect("ns")
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        assert_eq!(v["complete"], serde_json::Value::Bool(true), "{v}");
        assert_eq!(
            ns,
            [3 * k, 3 * k + 1, 3 * k + 2],
            "key {k} with wrong contents"
        );
        *seen.entry(k).or_default() += 1;
    }
    // The last key has fewer than three items: it never completes.
    let complete = LINES / 3;
    let missing = (0..complete).filter(|k| !seen.contains_key(k)).count();
    assert_eq!(missing, 0, "complete keys never emitted");
    let duplicates: u64 = seen.values().map(|c| u64::from(c - 1)).sum();
    eprintln!("{duplicates} duplicate keys");
    // The rerun resumed at the checkpoint: a key comes again only if its output was written
    // and one of its lines lies at or after the checkpoint's line.
    let resumed_key = killed.checkpoint_line / 3;
    let bound = killed.written.saturating_sub(resumed_key);
    assert!(
        duplicates <= bound,
        "{duplicates} duplicate keys, but only {bound} were written from the checkpoint's key on"
    );
}

#[test]
fn a_sink_whose_writes_fail_counts_nothing_delivered() {
    let dir = tempfile::tempdir().expect("temp dir");
    // /dev/full refuses every write: no space left on the device.
    for (policy, dead_lettered) in [("dead_letter", true), ("fail", false)] {
        std::fs::write(
            dir.path().join("full.toml"),
            format!(
                r#"
[sources.numbers]
type = "generate"
count = 100

[sinks.full]
type = "file"
inputs = ["numbers"]
path = "/dev/full"
append = true
error_policy = "{policy}"

[dead_letter]
type = "file"
path = "dead.ndjson"
"#
            ),
        )
        .expect("config");
        let out = run(dir.path(), "full.toml");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let summary = stderr
            .lines()
            .find(|l| l.starts_with("pulseflow: "))
            .unwrap_or_else(|| panic!("no summary line: {stderr}"));
        assert!(summary.contains(" 0 delivered"), "{policy}: {summary}");
        let dead = std::fs::read_to_string(dir.path().join("dead.ndjson")).unwrap_or_default();
        if dead_lettered {
            assert!(out.status.success(), "{stderr}");
            assert!(summary.contains("100 dead-lettered"), "{summary}");
            assert_eq!(dead.lines().count(), 100);
            assert!(dead.contains("No space left on device"), "{dead}");
        } else {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("No space left on device"), "{stderr}");
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn sigterm_drains_the_pipeline_and_ends_with_a_summary() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("endless.toml"),
        r#"
[sources.ticks]
type = "generate"
rate = 1000.0

[sinks.out]
type = "file"
inputs = ["ticks"]
path = "out.ndjson"
"#,
    )
    .expect("config");
    let child = bin()
        .args(["run", "endless.toml"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let out = dir.path().join("out.ndjson");
    let started = Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) == 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "no output");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: sends a signal to the child just started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().expect("exits");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("stopping: draining"), "{stderr}");
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("pulseflow: "))
        .unwrap_or_else(|| panic!("no summary line: {stderr}"));
    let written = std::fs::read_to_string(&out)
        .expect("output")
        .lines()
        .count();
    assert!(
        summary.contains(&format!(" {written} delivered")),
        "{summary} but {written} lines written"
    );
}

#[test]
fn a_corrupt_checkpoint_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("in.ndjson"), "{\"n\":1}\n").expect("input");
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    std::fs::write(dir.path().join("state/lines.checkpoint.json"), "{ torn").expect("corrupt");
    std::fs::write(
        dir.path().join("cp.toml"),
        r#"
data_dir = "state"

[sources.lines]
type = "file"
path = "in.ndjson"

[sinks.out]
type = "blackhole"
inputs = ["lines"]
"#,
    )
    .expect("config");
    for command in ["validate", "run"] {
        let out = bin()
            .args([command, "cp.toml"])
            .current_dir(dir.path())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("lines.checkpoint.json"), "{stderr}");
        assert!(stderr.contains("corrupt"), "{stderr}");
    }
}
