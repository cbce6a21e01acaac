//! `pulseflow test`: the built binary runs the `[[tests]]` of configs (those of `examples/`
//! and some written here) and reports like `cargo test`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// `pulseflow ARGS` in `dir`.
fn pulseflow(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pulseflow"))
        .env("NO_COLOR", "1")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn test_configs(dir: &Path, configs: &[&str]) -> Output {
    let args: Vec<&str> = std::iter::once("test")
        .chain(configs.iter().copied())
        .collect();
    pulseflow(dir, &args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A pipeline: `events` from stdin, `big` keeps `.n > 10`, `double` maps `{n: .n * 2}`, sink
/// `out`; then `tests`.
fn pipeline(tests: &str) -> String {
    format!(
        r#"
[sources.events]
type = "stdin"

[transforms.big]
type = "filter"
inputs = ["events"]
condition = ".n > 10"

[transforms.double]
type = "map"
inputs = ["big"]
jq = "{{n: (.n * 2)}}"

[sinks.out]
type = "stdout"
inputs = ["double"]
{tests}"#
    )
}

#[test]
fn the_examples_pass_their_tests() {
    let mut configs: Vec<String> = std::fs::read_dir(examples())
        .expect("examples")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(".toml").then_some(name)
        })
        .collect();
    configs.sort();
    let args: Vec<&str> = configs.iter().map(String::as_str).collect();
    let out = test_configs(&examples(), &args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let tests = lines.iter().filter(|l| l.starts_with("test ")).count();
    assert!(
        tests >= configs.len(),
        "a test per example at least:\n{text}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.starts_with("test "))
            .all(|l| l.ends_with(" ... ok"))
    );
    assert_eq!(
        lines.last(),
        Some(&format!("{tests} passed, 0 failed").as_str())
    );
}

#[test]
fn failures_show_their_differences_and_the_count_covers_every_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let passing = pipeline(
        r#"
[[tests]]
name = "big ones are doubled"
[[tests.inputs]]
into = "events"
lines = ['{"n": 20}', '{"n": 3}']
[[tests.outputs]]
from = "out"
items = [{ n = 40 }]
[tests.counts]
filtered = { big = 1 }
"#,
    );
    let failing = pipeline(
        r#"
[[tests]]
name = "wrong on purpose"
[[tests.inputs]]
into = "events"
lines = ['{"n": 20}', 'oops', '{"n": 30}']
[[tests.outputs]]
from = "double"
items = [{ n = 40 }, { n = 61 }]
[tests.counts]
filtered = 2
"#,
    );
    std::fs::write(tmp.path().join("a.toml"), passing).expect("write");
    std::fs::write(tmp.path().join("b.toml"), failing).expect("write");
    let out = test_configs(tmp.path(), &["a.toml", "b.toml"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "test a.toml: big ones are doubled ... ok");
    assert_eq!(lines[1], "test b.toml: wrong on purpose ... FAILED");
    for expected in [
        "---- b.toml: wrong on purpose ----",
        "outputs at `double`: expected 2 items, got 2",
        "  - {\"n\":61}",
        "  + {\"n\":60}",
        "dead letters: expected 0, got 1",
        "  + events.decode: test input:2: invalid JSON: expected value at line 1 column 1",
        "filtered: expected 2, got 0",
    ] {
        assert!(
            lines.contains(&expected),
            "no line {expected:?} in:\n{text}"
        );
    }
    assert_eq!(lines.last(), Some(&"1 passed, 1 failed"));
}

#[test]
fn time_is_simulated_so_deadlines_of_hours_pass_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = r#"
[sources.events]
type = "stdin"

[transforms.per_key]
type = "accumulate"
inputs = ["events"]
key = ".k"
aggregates = { n = "count" }
max_latency = "1h"
partial_flush = true

[sinks.out]
type = "stdout"
inputs = ["per_key"]

[[tests]]
name = "a key is flushed an hour after its first item, and the next starts again"
until = "5h"
[[tests.inputs]]
into = "per_key"
items = [{ k = "a" }, { k = "a" }]
[[tests.inputs]]
into = "per_key"
at = "30m"
items = [{ k = "a" }]
[[tests.inputs]]
into = "per_key"
at = "3h"
items = [{ k = "a" }]
[[tests.outputs]]
from = "out"
ordered = true
items = [
    { key = "a", n = 3, complete = false, completeness = 0 },
    { key = "a", n = 1, complete = false, completeness = 0 },
]
[tests.counts]
absorbed = 0
"#;
    // `absorbed` is not a counter a test may name.
    std::fs::write(tmp.path().join("t.toml"), config).expect("write");
    let out = test_configs(tmp.path(), &["t.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown key `absorbed` in `tests.counts`"),
        "{err}"
    );
    assert!(
        err.contains("valid keys: `filtered`, `dropped`, `dead_lettered`, `delivered`"),
        "{err}"
    );
    assert!(stdout(&out).ends_with("0 passed, 1 failed\n"));

    let config = config.replace("[tests.counts]\nabsorbed = 0\n", "");
    std::fs::write(tmp.path().join("t.toml"), config).expect("write");
    let out = test_configs(tmp.path(), &["t.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn drops_are_counted_by_stage_and_in_all() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Complete at two items, then closed for an hour: each key's third item is dropped.
    let config = r#"
[sources.events]
type = "stdin"

[transforms.per_key]
type = "accumulate"
inputs = ["events"]
key = ".k"
aggregates = { n = "count" }
complete_when = { count = 2 }
closed_ttl = "1h"

[sinks.out]
type = "stdout"
inputs = ["per_key"]

[[tests]]
name = "late items of a closed key are dropped"
[[tests.inputs]]
into = "events"
items = [{ k = "a" }, { k = "b" }, { k = "a" }, { k = "b" }, { k = "a" }, { k = "b" }]
[[tests.outputs]]
from = "out"
items = [{ key = "a", n = 2, complete = true, completeness = 1 }, { key = "b", n = 2, complete = true, completeness = 1 }]
[tests.counts]
dropped = { per_key = 2 }
delivered = 2
"#;
    std::fs::write(tmp.path().join("t.toml"), config).expect("write");
    let out = test_configs(tmp.path(), &["t.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    std::fs::write(
        tmp.path().join("t.toml"),
        config.replace("dropped = { per_key = 2 }", "dropped = 3"),
    )
    .expect("write");
    let out = test_configs(tmp.path(), &["t.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("dropped: expected 3, got 2"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn tests_name_components_that_exist() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = pipeline(
        r#"
[[tests]]
name = "bad references"
[[tests.inputs]]
into = "nowhere"
items = [1]
[[tests.inputs]]
into = "big"
lines = ["{}"]
[[tests.outputs]]
from = "double.other"
items = []
"#,
    );
    std::fs::write(tmp.path().join("t.toml"), config).expect("write");
    let out = pulseflow(tmp.path(), &["validate", "t.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "no component is named `nowhere`",
        "`big` is a transform: give it `items` (only sources read `lines`)",
        "`double` has no output `other`",
    ] {
        assert!(err.contains(expected), "no {expected:?} in:\n{err}");
    }
}
