//! End-to-end tests: the built `pulseflow` binary on sample files, outputs compared with
//! expected files, config errors snapshotted, exit codes checked.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::run_with_admin;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pulseflow"));
    c.env("NO_COLOR", "1");
    c
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies a directory tree (small sample data) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let name = entry.file_name();
        if name == "out" || name == "state" {
            continue;
        }
        if path.is_dir() {
            copy_dir(&path, &to.join(name));
        } else {
            std::fs::copy(&path, to.join(name)).expect("copy file");
        }
    }
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    bin()
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expected(name: &str) -> String {
    read(&manifest_dir().join("tests/expected").join(name))
}

/// Lines sorted, for outputs whose order depends on scheduling (dead letters from several
/// stages, merges).
fn sorted(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn formats_csv_lines_generate_and_dead_letters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&manifest_dir().join("tests/cases/formats"), tmp.path());
    let out = run_in(tmp.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o = tmp.path().join("out");
    assert_eq!(
        read(&o.join("adults.ndjson")),
        expected("formats-adults.ndjson")
    );
    assert_eq!(
        read(&o.join("words.ndjson")),
        expected("formats-words.ndjson")
    );
    assert_eq!(read(&o.join("odd.ndjson")), expected("formats-odd.ndjson"));
    assert_eq!(
        sorted(&read(&o.join("dead.ndjson"))),
        sorted(&expected("formats-dead.ndjson"))
    );
}

fn examples_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&manifest_dir().join("../../examples"), tmp.path());
    tmp
}

#[test]
fn example_restartable_resumes_where_it_left_off() {
    let tmp = examples_copy();
    let log = tmp.path().join("data/app.log.ndjson");
    let archive = tmp.path().join("out/problems.ndjson");
    let first = run_in(tmp.path(), &["run", "restartable.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let archived = read(&archive);
    assert!(!archived.is_empty());
    // Nothing new: the rerun reads nothing and the archive stays as it was.
    let again = run_in(tmp.path(), &["run", "restartable.toml"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("pulseflow: 0 in"),
        "{}",
        stderr(&again)
    );
    assert_eq!(read(&archive), archived);
    // A line appended to the log is all the next run delivers.
    let mut text = read(&log);
    text.push_str(
        "{\"ts\": \"later\", \"level\": \"error\", \"msg\": \"disk full\", \"service\": \"db\"}\n",
    );
    std::fs::write(&log, text).expect("append to the log");
    let third = run_in(tmp.path(), &["run", "restartable.toml"]);
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(
        stderr(&third).contains("pulseflow: 1 in, 1 delivered"),
        "{}",
        stderr(&third)
    );
    let now = read(&archive);
    assert!(now.starts_with(&archived));
    assert_eq!(now[archived.len()..].lines().count(), 1);
    assert!(
        now.ends_with("\"msg\":\"disk full\",\"service\":\"db\",\"ts\":\"later\"}\n"),
        "{now}"
    );
}

#[test]
fn example_tail_is_valid() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["validate", "tail.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn example_routing_errors() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["run", "routing_errors.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected("routing-stdout.ndjson")
    );
    let o = tmp.path().join("out");
    assert_eq!(
        read(&o.join("errors.ndjson")),
        expected("routing-errors.ndjson")
    );
    assert_eq!(
        read(&o.join("routing-dead.ndjson")),
        expected("routing-dead.ndjson")
    );
}

#[test]
fn every_supervision_mode_gives_the_same_output() {
    for mode in ["yield", "isolate", "off"] {
        let tmp = examples_copy();
        let out = run_in(
            tmp.path(),
            &["run", "routing_errors.toml", "--supervision", mode],
        );
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            expected("routing-stdout.ndjson"),
            "{mode}"
        );
    }
    let tmp = examples_copy();
    let out = run_in(
        tmp.path(),
        &["run", "routing_errors.toml", "--supervision", "sometimes"],
    );
    assert_eq!(out.status.code(), Some(2), "a bad value is a usage error");
    assert!(stderr(&out).contains("yield"), "{}", stderr(&out));
}

#[test]
fn example_per_user_totals() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["run", "per_user_totals.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o = tmp.path().join("out");
    assert_eq!(read(&o.join("totals.ndjson")), expected("totals.ndjson"));
    let dead = read(&o.join("totals-dead.ndjson"));
    let kinds: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(kinds.len(), 2, "{dead}");
    assert!(
        kinds
            .iter()
            .any(|k| k["kind"] == "malformed_input" && k["line"] == 6)
    );
    assert!(
        kinds.iter().any(|k| k["kind"] == "failed_item"
            && k["stage"] == "totals"
            && k["item"]["order"] == 5)
    );
}

#[test]
fn example_quickstart_validates_and_runs() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["validate", "quickstart.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The example generates a million orders; a tenth of that keeps the debug build quick.
    let config = read(&tmp.path().join("quickstart.toml")).replace("1_000_000", "100_000");
    std::fs::write(tmp.path().join("quickstart.toml"), config).expect("write");
    let out = run_in(tmp.path(), &["run", "--quiet", "quickstart.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let vip = read(&tmp.path().join("out/quickstart-vip.ndjson"));
    // ids 0, 7, 14, ... whose cents are at least 50000.
    let expected_count = (0..100_000u64)
        .filter(|i| i % 7 == 0 && (i * 7919) % 100_000 >= 50_000)
        .count();
    assert_eq!(vip.lines().count(), expected_count);
}

#[test]
fn stdin_source() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("p.toml"),
        "[sources.in]\ntype = \"stdin\"\n[transforms.m]\ntype = \"map\"\ninputs = [\"in\"]\njq = \".a + 1\"\n[sinks.out]\ntype = \"stdout\"\ninputs = [\"m\"]\n",
    )
    .expect("write");
    let mut child = bin()
        .args(["run", "p.toml"])
        .current_dir(tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"{\"a\": 1}\n{\"a\": 41}\n")
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n42\n");
}

#[test]
fn file_source_decodes_on_two_workers_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Enough lines for many batches, one malformed line in the middle.
    let mut input = String::new();
    for i in 0..20_000u32 {
        if i == 12_345 {
            input.push_str("{broken\n");
        } else {
            input.push_str(&format!("{{\"i\":{i},\"ok\":{}}}\n", i % 3 != 0));
        }
    }
    std::fs::write(tmp.path().join("in.ndjson"), input).expect("write");
    std::fs::write(
        tmp.path().join("p.toml"),
        "[dead_letter]\ntype = \"file\"\npath = \"dead.ndjson\"\n\
         [sources.in]\ntype = \"file\"\npath = \"in.ndjson\"\nparallelism = 2\n\
         [transforms.keep]\ntype = \"filter\"\ninputs = [\"in\"]\ncondition = \".ok\"\n\
         [sinks.out]\ntype = \"file\"\ninputs = [\"keep\"]\npath = \"out.ndjson\"\n",
    )
    .expect("write");
    let out = run_in(tmp.path(), &["run", "p.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let expected: String = (0..20_000u32)
        .filter(|i| *i != 12_345 && i % 3 != 0)
        .map(|i| format!("{{\"i\":{i},\"ok\":true}}\n"))
        .collect();
    assert_eq!(read(&tmp.path().join("out.ndjson")), expected);
    let dead: serde_json::Value =
        serde_json::from_str(read(&tmp.path().join("dead.ndjson")).trim()).expect("one record");
    assert_eq!(dead["kind"], "malformed_input");
    assert_eq!(dead["stage"], "in.decode");
    assert_eq!(dead["line"], 12_346);
    assert_eq!(dead["raw"], "{broken");
}

#[test]
fn failing_pipeline_exits_1() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("in.ndjson"), "{}\nnot json\n").expect("write");
    std::fs::write(
        tmp.path().join("p.toml"),
        "[sources.in]\ntype = \"file\"\npath = \"in.ndjson\"\nerror_policy = \"fail\"\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"in\"]\n",
    )
    .expect("write");
    let out = run_in(tmp.path(), &["run", "p.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("in.ndjson:2"), "{}", stderr(&out));

    std::fs::write(
        tmp.path().join("missing.toml"),
        "[sources.in]\ntype = \"file\"\npath = \"nothing-*.ndjson\"\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"in\"]\n",
    )
    .expect("write");
    let out = run_in(tmp.path(), &["run", "missing.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no file matches"), "{}", stderr(&out));
}

#[test]
fn graph_formats() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["graph", "routing_errors.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.contains("digraph"), "{dot}");
    assert!(dot.contains("logs.decode"), "{dot}");
    let out = run_in(
        tmp.path(),
        &["graph", "--format", "mermaid", "routing_errors.toml"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("flowchart"));
    let out = run_in(
        tmp.path(),
        &["graph", "--format", "svg", "routing_errors.toml"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let svg = String::from_utf8_lossy(&out.stdout);
    assert!(
        svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
        "{svg}"
    );
    for stage in [
        "logs",
        "logs.decode",
        "level",
        "error_summary",
        "errors.encode",
        "rest",
    ] {
        assert!(
            svg.contains(&format!("data-stage=\"{stage}\"")),
            "{stage}: {svg}"
        );
    }
    // The route's outputs label their arrows.
    assert!(
        svg.contains(">errors</text>") && svg.contains(">_unmatched</text>"),
        "{svg}"
    );
}

/// A route's policies belong to its branch stage, not to the stage feeding it.
#[test]
fn route_policies_apply_to_the_route() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = r#"
[sources.gen]
type = "generate"
count = 10
jq = "{id: .}"

[transforms.split]
type = "route"
inputs = ["gen"]
error_policy = "ignore"
buffer = { capacity = 77 }
routes = { even = ".id % 2 == 0" }

[sinks.out]
type = "blackhole"
inputs = ["split.even", "split._unmatched"]
"#;
    std::fs::write(tmp.path().join("route.toml"), config).expect("write");
    let out = run_in(tmp.path(), &["graph", "route.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(
        dot.contains(r#""split" [label="split\nbranch\nignore"]"#),
        "{dot}"
    );
    assert!(
        dot.contains(r#""gen.build" -> "split" [label="77"]"#),
        "{dot}"
    );
    assert!(
        dot.contains(r#""gen.build" [label="gen.build\ntransform"]"#),
        "the feeding stage keeps its own policies: {dot}"
    );
}

/// Runs `validate` on `config` and returns its exit code and error output.
fn validate(config: &str) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("pipeline.toml"), config).expect("write");
    let out = run_in(tmp.path(), &["validate", "pipeline.toml"]);
    (out.status.code(), stderr(&out))
}

#[test]
fn config_errors_unknown_keys_types_and_jq() {
    let (code, err) = validate(
        r#"[sources.logs]
type = "file"
path = "a.ndjson"
fromat = "csv"

[transforms.big]
type = "filtr"
inputs = ["logs"]

[transforms.m]
type = "map"
inputs = ["logs"]
jq = '{a: .b | nosuch}'
buffer = { capacity = "x" }

[sinks.out]
type = "stdout"
inputs = ["m"]
colour = "red"
"#,
    );
    assert_eq!(code, Some(2));
    insta::assert_snapshot!(err);
}

#[test]
fn config_errors_breaker_threshold_and_stderr_dead_letters() {
    let base = r#"[sources.gen]
type = "generate"
count = 3

[sinks.out]
type = "blackhole"
inputs = ["gen"]
"#;
    for threshold in ["0.0", "1.5", "-1", "nan"] {
        let (code, err) = validate(&format!(
            "{base}circuit_breaker = {{ error_threshold = {threshold} }}\n"
        ));
        assert_eq!(code, Some(2), "{threshold}: {err}");
        assert!(err.contains("is not a fraction"), "{threshold}: {err}");
    }
    let (code, err) = validate(&format!(
        "{base}circuit_breaker = {{ error_threshold = 0.25 }}\n"
    ));
    assert_eq!(code, Some(0), "{err}");
    for extra in ["path = \"dead.ndjson\"", "append = true"] {
        let (code, err) = validate(&format!(
            "{base}\n[dead_letter]\ntype = \"stderr\"\n{extra}\n"
        ));
        assert_eq!(code, Some(2), "{extra}: {err}");
        assert!(
            err.contains("takes no `path` or `append`"),
            "{extra}: {err}"
        );
    }
    let (code, err) = validate(&format!("{base}\n[dead_letter]\ntype = \"stderr\"\n"));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn config_errors_from_the_engine() {
    let (code, err) = validate(
        r#"[sources.logs]
type = "file"
path = "a.ndjson"

[transforms.a]
type = "filter"
inputs = ["b", "logs"]
condition = "true"

[transforms.b]
type = "map"
inputs = ["a", "nope"]
jq = "."
buffer = { capacity = 0 }

[transforms.r]
type = "route"
inputs = ["logs"]
routes = { big = ".n > 10" }

[sinks.out]
type = "stdout"
inputs = ["b", "r.small"]
error_policy = "missing"
"#,
    );
    assert_eq!(code, Some(2));
    insta::assert_snapshot!(err);
}

#[test]
fn config_errors_syntax_and_recursion() {
    let (code, err) = validate("[sources.x\ntype = \"file\"\n");
    assert_eq!(code, Some(2));
    insta::assert_snapshot!("syntax", err);
    let (code, err) = validate(
        "[sources.g]\ntype = \"generate\"\njq = 'def f: f; f'\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"g\"]\n",
    );
    assert_eq!(code, Some(2));
    insta::assert_snapshot!("recursion", err);
}

/// GETs `path` from `addr` with a plain HTTP/1.1 request.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn admin_serves_health_stages_and_metrics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("p.toml"),
        "[sources.g]\ntype = \"generate\"\ncount = 60\nrate = 20.0\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"g\"]\n",
    )
    .expect("write");
    let (mut child, addr) = run_with_admin(tmp.path(), "p.toml");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(http_get(&addr, "/health").ends_with("ok\n"));
    // The server starts just before the run does: poll until the stages show.
    let mut json = serde_json::Value::Null;
    for _ in 0..50 {
        let stages = http_get(&addr, "/stages");
        let body = stages.split("\r\n\r\n").nth(1).expect("body");
        json = serde_json::from_str(body).expect("json");
        if json.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let names: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    assert!(names.contains(&"g") && names.contains(&"out"), "{names:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let metrics = http_get(&addr, "/metrics");
    assert!(metrics.contains("pulseflow_items_in_total"), "{metrics}");
    for state in ["busy", "backpressured", "idle"] {
        let gauge =
            format!("pulseflow_stage_time_ratio{{pipeline=\"p\",stage=\"out\",state=\"{state}\"}}");
        assert!(metrics.contains(&gauge), "no {gauge} in {metrics}");
    }
    assert!(http_get(&addr, "/nope").starts_with("HTTP/1.1 404"));
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn admin_marks_the_stage_that_holds_the_pipeline_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // `heavy` does far more work per item than any other stage.
    std::fs::write(
        tmp.path().join("p.toml"),
        "[sources.g]\ntype = \"generate\"\ncount = 2000000\n\
         [transforms.light]\ntype = \"filter\"\ninputs = [\"g\"]\ncondition = \"true\"\n\
         [transforms.heavy]\ntype = \"map\"\ninputs = [\"light\"]\njq = \"[range(300)] | add\"\n\
         [sinks.out]\ntype = \"blackhole\"\ninputs = [\"heavy\"]\n",
    )
    .expect("write");
    let (mut child, addr) = run_with_admin(tmp.path(), "p.toml");
    let mut marked = Vec::new();
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let answer = http_get(&addr, "/stages");
        let body = answer.split("\r\n\r\n").nth(1).expect("body");
        last = serde_json::from_str(body).expect("json");
        marked = last
            .as_array()
            .expect("array")
            .iter()
            .filter(|s| s["bottleneck"] == true)
            .filter_map(|s| s["stage"].as_str().map(str::to_owned))
            .collect();
        if !marked.is_empty() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(marked, ["heavy"], "{last:#}");
    let heavy = last
        .as_array()
        .and_then(|a| a.iter().find(|s| s["stage"] == "heavy"))
        .expect("heavy");
    let share = |key: &str| {
        heavy[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {heavy}"))
    };
    assert!((share("busy") + share("backpressured") + share("idle") - 1.0).abs() < 1e-9);
}

#[test]
fn tap_prints_sampled_items_leaving_a_stage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("p.toml"),
        "[sources.g]\ntype = \"generate\"\ncount = 100\nrate = 50.0\njq = \"{n: .}\"\n\
         [transforms.double]\ntype = \"map\"\ninputs = [\"g\"]\njq = \"{n: (.n * 2)}\"\n\
         [sinks.out]\ntype = \"blackhole\"\ninputs = [\"double\"]\n",
    )
    .expect("write");
    let (mut child, addr) = run_with_admin(tmp.path(), "p.toml");
    let tap = |args: &[&str]| {
        bin()
            .args(["tap", &addr])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tap runs")
    };
    let mut out = tap(&["double", "--limit", "4", "--every", "3"]);
    for _ in 0..50 {
        // The pipeline starts just after its admin server.
        if out.status.code() == Some(0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = tap(&["double", "--limit", "4", "--every", "3"]);
    }
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let values: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["n"].as_u64().expect("n")
        })
        .collect();
    assert_eq!(values.len(), 4, "{values:?}");
    // Doubled, and one of every three: consecutive ones 6 apart.
    assert!(values.iter().all(|n| n % 2 == 0), "{values:?}");
    assert!(values.windows(2).all(|w| w[1] - w[0] == 6), "{values:?}");
    let missing = tap(&["nowhere"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("no stage `nowhere`"),
        "{}",
        stderr(&missing)
    );
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

#[test]
fn a_tap_that_is_not_read_misses_items_and_never_holds_the_pipeline() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().expect("tempdir");
    // Items of about 400 bytes for 3 s: far more than the tap's queue and the socket's
    // buffers hold once the tap is attached.
    let config = format!(
        "[sources.g]\ntype = \"generate\"\ncount = 150000\nrate = 50000.0\n\
         jq = '{{n: ., pad: \"{}\"}}'\n\
         [sinks.out]\ntype = \"blackhole\"\ninputs = [\"g\"]\n",
        "x".repeat(380)
    );
    std::fs::write(tmp.path().join("p.toml"), config).expect("write");
    let (mut child, addr) = run_with_admin(tmp.path(), "p.toml");
    // Attach, then read nothing until the run is over.
    let mut tapped = None;
    for _ in 0..100 {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        write!(s, "GET /tap/g.build HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("status line");
        if head.starts_with(b"HTTP/1.1 200") {
            tapped = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut s = tapped.expect("the tap attached");
    // Read nothing for a while, then everything until the run is over (its end closes the
    // connection): the tap has missed items, and says so once its reader catches up.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let status = child.wait().expect("wait");
    // The run ended normally: every item accounted for, none waited on the tap.
    assert_eq!(status.code(), Some(0));
    let lines: Vec<serde_json::Value> = answer
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect();
    let missed = lines.iter().filter_map(|v| v["missed"].as_u64()).max();
    let items = lines.iter().filter(|v| v.get("item").is_some()).count() as u64;
    assert!(
        missed.is_some_and(|n| n > 0),
        "nothing missed: {items} items read"
    );
    assert!(items + missed.unwrap_or(0) <= 150_000);
}

#[test]
fn top_once_prints_a_frame_naming_the_stages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 20 items a second for 3 s: running while `top` looks, and doing batches.
    std::fs::write(
        tmp.path().join("p.toml"),
        "[sources.ticks]\ntype = \"generate\"\ncount = 60\nrate = 20.0\n\
         [transforms.evens]\ntype = \"filter\"\ninputs = [\"ticks\"]\ncondition = \". % 2 == 0\"\n\
         [sinks.drain]\ntype = \"blackhole\"\ninputs = [\"evens\"]\n",
    )
    .expect("write");
    let (mut child, addr) = run_with_admin(tmp.path(), "p.toml");
    let top = bin()
        .args(["top", "--once", &addr])
        .stdin(Stdio::null())
        .output()
        .expect("top runs");
    assert_eq!(top.status.code(), Some(0), "{}", stderr(&top));
    let frame = String::from_utf8_lossy(&top.stdout).into_owned();
    assert!(
        frame.starts_with(&format!("pulseflow top: {addr}\n")),
        "{frame}"
    );
    assert!(
        !frame.contains('\x1b'),
        "no screen control in one frame: {frame:?}"
    );
    let lines: Vec<&str> = frame.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.starts_with("stage"))
        .unwrap_or_else(|| panic!("no header: {frame}"));
    for column in [
        "in",
        "out",
        "filtered",
        "avg batch",
        "p50 batch",
        "p99 batch",
        "busy",
        "backpressured",
        "idle",
    ] {
        assert!(header.contains(column), "{column}: {header}");
    }
    let rows: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for stage in ["ticks", "ticks.build", "evens", "drain"] {
        assert!(rows.contains(&stage), "{stage} missing: {frame}");
    }
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    // Nothing listens once the run is over.
    let gone = bin()
        .args(["top", "--once", &addr])
        .stdin(Stdio::null())
        .output()
        .expect("top runs");
    assert_eq!(gone.status.code(), Some(1), "{}", stderr(&gone));
}

#[test]
fn accumulate_count_jq_and_dead_letters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&manifest_dir().join("tests/cases/accumulate"), tmp.path());
    let out = run_in(tmp.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o = tmp.path().join("out");
    // Complete keys first (as they complete), then partial ones flushed at the end.
    assert_eq!(
        read(&o.join("counted.ndjson")),
        expected("accumulate-counted.ndjson")
    );
    // Without partial_flush, keys that never pass the condition are discarded.
    assert_eq!(
        read(&o.join("big.ndjson")),
        expected("accumulate-big.ndjson")
    );
    assert_eq!(
        read(&o.join("dead.ndjson")),
        expected("accumulate-dead.ndjson")
    );
}

#[test]
fn example_sessions_complete_and_partial() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["run", "sessions.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o = tmp.path().join("out");
    let got = read(&o.join("sessions.ndjson"));
    assert_eq!(got, expected("sessions.ndjson"));
    let rows: Vec<serde_json::Value> = got
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let complete: Vec<&str> = rows
        .iter()
        .filter(|r| r["complete"] == true)
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert_eq!(complete, ["s1", "s3"]);
    assert!(rows.iter().filter(|r| r["complete"] == false).all(|r| {
        r["completeness"]
            .as_f64()
            .is_some_and(|c| c > 0.0 && c < 1.0)
    }));
    assert!(read(&o.join("sessions-dead.ndjson")).contains("\"line\":10"));
}

#[test]
fn example_per_user_totals_accumulated() {
    let tmp = examples_copy();
    let out = run_in(tmp.path(), &["run", "per_user_totals.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        read(&tmp.path().join("out/user-totals.ndjson")),
        expected("user-totals.ndjson")
    );
}

#[test]
fn config_errors_accumulate() {
    let (code, err) = validate(
        r#"[sources.logs]
type = "file"
path = "a.ndjson"

[transforms.acc]
type = "accumulate"
inputs = ["logs"]
key = ".user"
aggregates = { n = "count", spent = "total(.amount)", top = "max(.amount | nosuch)", avg = "avg" }
complete_when = { count = 0 }
ttl = "soon"

[sinks.out]
type = "stdout"
inputs = ["acc"]
"#,
    );
    assert_eq!(code, Some(2));
    insta::assert_snapshot!(err);
}

/// A file source whose items only meet a filter and a map reading some fields decodes only
/// those: the output is the same as with whole items (`project = false`), and an item
/// dead-lettered by the map holds the fields read and says so.
#[test]
fn projection_gives_the_same_output_and_marks_dead_letters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut input = String::new();
    for i in 0..3_000u32 {
        let amount = if i == 1_234 {
            "\"lots\"".to_owned()
        } else {
            (i % 97).to_string()
        };
        input.push_str(&format!(
            "{{\"id\":{i},\"tags\":[\"a\",{{\"b\":null}}],\"amount\":{amount},\"ok\":{},\
             \"note\":\"esc \\\" \\u00e9\",\"user\":{{\"name\":\"u{}\"}}}}\n",
            i % 3 != 0,
            i % 10
        ));
    }
    std::fs::write(tmp.path().join("in.ndjson"), input).expect("write");
    let config = |project: bool| {
        format!(
            "[dead_letter]\ntype = \"file\"\npath = \"dead-{project}.ndjson\"\n\
             [sources.in]\ntype = \"file\"\npath = \"in.ndjson\"\nproject = {project}\n\
             [transforms.keep]\ntype = \"filter\"\ninputs = [\"in\"]\ncondition = \".ok\"\n\
             [transforms.shape]\ntype = \"map\"\ninputs = [\"keep\"]\n\
             jq = \"{{id, name: .user.name, less: (.amount - 1)}}\"\n\
             [sinks.out]\ntype = \"file\"\ninputs = [\"shape\"]\npath = \"out-{project}.ndjson\"\n"
        )
    };
    for project in [true, false] {
        let name = format!("p-{project}.toml");
        std::fs::write(tmp.path().join(&name), config(project)).expect("write");
        let out = run_in(tmp.path(), &["run", "--quiet", &name]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let projected = read(&tmp.path().join("out-true.ndjson"));
    assert_eq!(projected, read(&tmp.path().join("out-false.ndjson")));
    assert_eq!(projected.lines().count(), 1_999);
    assert_eq!(
        projected.lines().nth(1),
        Some(r#"{"id":2,"less":1,"name":"u2"}"#)
    );
    let dead = |project: bool| -> serde_json::Value {
        let text = read(&tmp.path().join(format!("dead-{project}.ndjson")));
        serde_json::from_str(text.trim()).expect("one record")
    };
    let (reduced, whole) = (dead(true), dead(false));
    assert_eq!(reduced["stage"], "shape");
    assert_eq!(reduced["error"], whole["error"]);
    assert_eq!(reduced["projected"], true);
    assert_eq!(
        reduced["item"],
        serde_json::json!({"id": 1234, "ok": true, "amount": "lots", "user": {"name": "u4"}})
    );
    assert!(whole.get("projected").is_none());
    assert_eq!(whole["item"]["note"], "esc \" é");
}
