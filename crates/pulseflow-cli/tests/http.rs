//! The real binary with `http` sources and sinks, against real clients and servers on
//! loopback. No test measures time: each waits for a condition within a generous limit.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(60);

/// A port free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn start(dir: &Path, config: &str) -> Child {
    std::fs::write(dir.join("pipeline.toml"), config).expect("config");
    Command::new(env!("CARGO_BIN_EXE_pulseflow"))
        .args(["run", "pipeline.toml"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts")
}

/// Stops the binary as an operator would (SIGTERM) and returns its exit code and stderr.
fn stop(mut child: Child) -> (Option<i32>, String) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("exits");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (status.code(), stderr)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// POSTs `body`, retrying while the binary is not listening yet.
async fn post(url: &str, body: &str) -> reqwest::Response {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match client().post(url).body(body.to_owned()).send().await {
            Ok(answer) => return answer,
            Err(e) if e.is_connect() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no answer from {url}: {e}"),
        }
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn delivered_acks_answer_after_the_file_sink_wrote_the_items() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let child = start(
        dir.path(),
        &format!(
            r#"
[sources.ingest]
type = "http"
address = "127.0.0.1:{port}"
path = "/events"
ack = "delivered"

[transforms.big]
type = "filter"
inputs = ["ingest"]
condition = ".n > 1"

[sinks.archive]
type = "file"
inputs = ["big"]
path = "out.ndjson"
"#
        ),
    );
    let url = format!("http://127.0.0.1:{port}/events");
    let answer = post(&url, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n").await;
    assert_eq!(answer.status(), 200);
    let counts: serde_json::Value =
        serde_json::from_str(&answer.text().await.expect("body")).expect("json");
    assert_eq!(
        counts,
        serde_json::json!({"delivered": 2, "dropped": 0, "dead_lettered": 0, "failed": 0})
    );
    // The answer came after the write: the lines are in the file now.
    assert_eq!(
        lines(&dir.path().join("out.ndjson")),
        ["{\"n\":2}", "{\"n\":3}"]
    );

    let bad = post(&url, "{\"n\":4}\n{\"n\":").await;
    assert_eq!(bad.status(), 400);
    let text = bad.text().await.expect("body");
    assert!(
        text.contains("line 2: EOF while parsing a value (column 5)"),
        "{text}"
    );
    let after = post(&url, "{\"n\":5}").await;
    assert_eq!(after.status(), 200, "the pipeline keeps running");

    let (code, stderr) = stop(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines(&dir.path().join("out.ndjson")).len(), 3);
}

#[tokio::test]
async fn a_stuck_http_sink_behind_a_route_does_not_stall_its_sibling() {
    // A server that accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr: SocketAddr = silent.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let child = start(
        dir.path(),
        &format!(
            r#"
[sources.numbers]
type = "generate"
count = 20000
jq = "{{n: ., local: (. % 2 == 0)}}"

[transforms.split]
type = "route"
inputs = ["numbers"]
routes = {{ local = ".local", remote = ".local | not" }}

[sinks.archive]
type = "file"
inputs = ["split.local"]
path = "local.ndjson"

[sinks.remote]
type = "http"
inputs = ["split.remote"]
url = "http://{silent_addr}/"
request_timeout = "10m"
buffer = {{ capacity = 64, when_full = "drop_newest" }}
"#
        ),
    );
    let out = dir.path().join("local.ndjson");
    let deadline = Instant::now() + PATIENCE;
    while lines(&out).len() < 10_000 {
        assert!(
            Instant::now() < deadline,
            "the local branch stalled at {} items",
            lines(&out).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines(&out).len(), 10_000);
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
}
