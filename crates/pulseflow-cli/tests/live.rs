//! The real binary on live input: lines written to a `stdin` source come out while the input
//! stays open (the batch timeout), on stdout and in a file.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[sources.events]
type = "stdin"

[transforms.shape]
type = "map"
inputs = ["events"]
jq = "{a: .a, seen: true}"

[sinks.console]
type = "stdout"
inputs = ["shape"]

[sinks.archive]
type = "file"
inputs = ["shape"]
path = "out.ndjson"
"#;

/// Far longer than the batch timeout (10 ms): only a line held back until the input ends
/// waits this long, and that is the failure this test is about.
const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn a_line_on_stdin_reaches_stdout_and_a_file_while_the_input_stays_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("live.toml"), CONFIG).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pulseflow"))
        .args(["run", "live.toml", "--quiet"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    for n in 1..=3 {
        let written = Instant::now();
        writeln!(stdin, "{{\"a\":{n}}}").expect("write a line");
        stdin.flush().expect("flush");
        let line = lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("line {n} not on stdout while stdin is open: {e}"));
        assert_eq!(line, format!("{{\"a\":{n},\"seen\":true}}"));
        let file = dir.path().join("out.ndjson");
        let in_file = loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if text.lines().count() >= n || written.elapsed() > PATIENCE {
                break text;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(
            in_file.lines().nth(n - 1),
            Some(line.as_str()),
            "line {n} not in the file while stdin is open"
        );
        eprintln!("line {n}: out after {:?}", written.elapsed());
    }
    drop(stdin);
    let status = child.wait().expect("exits");
    assert!(status.success());
}
