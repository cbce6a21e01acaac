//! The `nats` source and sink against a real `nats-server -js` (started per test, see
//! `support/nats_server.rs`; without it on PATH the tests are skipped, except in CI), with
//! the real binary where processes are killed: a run killed with SIGKILL and restarted
//! processes every message at least once and publishes each result once; held items are not
//! delivered again while held, and are offered again when the run stops; a dead-lettered
//! message is terminated; a publish the stream never acknowledges is not delivered; three instances give the totals one gives, also when one is killed; a
//! server that is down at the start or restarted in the middle loses nothing.
//!
//! Nothing here asserts a duration: the tests wait for conditions, with generous limits.

#[path = "support/nats_server.rs"]
mod nats_server;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use nats_server::NatsServer;
use serde_json::{Value, json};

/// How long any condition may take to come true before the test fails.
const PATIENCE: Duration = Duration::from_secs(120);

/// A `pulseflow run` in the background, its stderr in a file.
struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    fn start(dir: &Path, config: &str, instance: &str) -> Run {
        let log = dir.join(format!("{config}.{}.log", instance.replace('/', "-")));
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pulseflow"))
            .args(["run", config, "--instance", instance])
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("binary runs");
        Run { child, log }
    }

    /// SIGKILL.
    fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then its stderr once it exited (successfully).
    fn stop(mut self) -> String {
        let pid = i32::try_from(self.child.id()).expect("pid");
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.child.wait().expect("wait");
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "{status}: {stderr}");
        stderr
    }
}

impl Drop for Run {
    /// A test that failed before stopping its runs leaves none behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The items a run read, from its summary line.
fn items_in(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("pulseflow: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary in {stderr}"))
}

async fn connect(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.expect("connect"))
}

async fn create_stream(js: &jetstream::Context, name: &str, subject: &str) {
    js.get_or_create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        ..Default::default()
    })
    .await
    .expect("stream");
}

/// Publishes `values` as JSON, each until acknowledged (the server may be restarting).
async fn publish(js: &jetstream::Context, subject: &str, values: impl IntoIterator<Item = Value>) {
    for v in values {
        let payload = bytes::Bytes::from(v.to_string());
        for attempt in 0.. {
            let sent = match js.publish(subject.to_owned(), payload.clone()).await {
                Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => break,
                Err(e) if attempt < 600 => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("publish to {subject}: {e}"),
            }
        }
    }
}

/// The JSON payloads stored in `name` (none when it does not exist yet).
async fn payloads(js: &jetstream::Context, name: &str) -> Vec<Value> {
    let Ok(mut s) = js.get_stream(name).await else {
        return Vec::new();
    };
    let Ok(info) = s.info().await else {
        return Vec::new();
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    for seq in first.max(1)..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(serde_json::from_slice(&m.payload).expect("JSON payload"));
        }
    }
    out
}

async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Option<consumer::Info> {
    let s = js.get_stream(stream).await.ok()?;
    let mut c: consumer::PullConsumer = s.get_consumer(name).await.ok()?;
    c.info().await.ok().cloned()
}

/// Polls `condition` every 50 ms until it holds; fails the test after [`PATIENCE`].
async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the consumer `input` of stream `IN` has no message pending or unacknowledged.
async fn until_settled(js: &jetstream::Context) {
    wait_for("every message settled", || async {
        consumer_info(js, "IN", "input")
            .await
            .is_some_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .await;
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write config");
}

/// A `nats` source table: `[sources.<name>]` reading `subject` of `stream` through
/// `consumer`, with `extra` keys.
fn nats_source(name: &str, url: &str, stream: &str, subject: &str, extra: &str) -> String {
    format!(
        "[sources.{name}]\ntype = \"nats\"\nurl = \"{url}\"\nstream = \"{stream}\"\n\
         consumer = \"{name}\"\nsubject = \"{subject}\"\n{extra}\n"
    )
}

/// `[transforms.per_user]`: per `.user` of `input`, complete at `count` items, with their
/// number `n` and `total` amount.
fn per_user(input: &str, count: u32) -> String {
    format!(
        r#"
[transforms.per_user]
type = "accumulate"
inputs = ["{input}"]
key = ".user"
complete_when = {{ count = {count} }}
aggregates = {{ n = "count", total = "sum(.amount)" }}
"#
    )
}

/// A config reading `in.orders` (stream IN), doubling, publishing to `out.orders` (stream OUT).
fn doubling(url: &str, extra_source_keys: &str) -> String {
    let source = nats_source(
        "input",
        url,
        "IN",
        "in.orders",
        &format!("ack_wait = \"2s\"\nmax_ack_pending = 100\n{extra_source_keys}"),
    );
    format!(
        r#"{source}
[transforms.double]
type = "map"
inputs = ["input"]
jq = '{{id: .id, double: (.id * 2)}}'

[sinks.out]
type = "nats"
inputs = ["double"]
url = "{url}"
subject = "out.orders"
stream = "OUT"
"#
    )
}

/// Every id in `0..n` is in `outputs` exactly once, doubled.
fn assert_each_once(outputs: &[Value], n: u64) {
    let ids: BTreeSet<u64> = outputs.iter().filter_map(|v| v["id"].as_u64()).collect();
    assert_eq!(outputs.len() as u64, n, "one output per message");
    assert_eq!(ids, (0..n).collect(), "every message");
    assert!(
        outputs
            .iter()
            .all(|v| v["double"] == json!(v["id"].as_u64().unwrap_or(0) * 2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_restarted_processes_every_message_and_publishes_each_result_once() {
    let Some(server) = NatsServer::start("kill_and_restart") else {
        return;
    };
    const N: u64 = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "double.toml", &doubling(&server.url(), ""));
    let js = connect(&server).await;
    create_stream(&js, "IN", "in.orders").await;
    let feeder = {
        let js = js.clone();
        tokio::spawn(async move {
            for chunk in 0..N / 100 {
                publish(
                    &js,
                    "in.orders",
                    (chunk * 100..(chunk + 1) * 100).map(|id| json!({"id": id})),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let first = Run::start(dir.path(), "double.toml", "0/1");
    wait_for("a fifth of the outputs", || async {
        payloads(&js, "OUT").await.len() as u64 >= N / 5
    })
    .await;
    first.kill();
    feeder.await.expect("feeder");
    let info = consumer_info(&js, "IN", "input").await.expect("consumer");
    // The messages not acknowledged when the process died: at most the consumer's credit.
    assert!(info.num_ack_pending <= 100, "{info:?}");
    let unacked = info.num_pending + info.num_ack_pending as u64;
    let second = Run::start(dir.path(), "double.toml", "0/1");
    wait_for("every output", || async {
        payloads(&js, "OUT").await.len() as u64 >= N
    })
    .await;
    let stderr = second.stop();
    // The restarted run read what was not acknowledged, no more: the duplicates are bounded
    // by the in-flight window.
    assert!(
        items_in(&stderr) <= unacked,
        "{stderr} vs {unacked} unacknowledged"
    );
    assert_each_once(&payloads(&js, "OUT").await, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_held_longer_than_ack_wait_are_not_delivered_again_until_the_run_stops() {
    let Some(server) = NatsServer::start("held_items") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = server.url();
    write(
        dir.path(),
        "hold.toml",
        &format!(
            r#"{}{}
[sinks.out]
type = "file"
inputs = ["per_user"]
path = "totals.ndjson"
"#,
            nats_source("totals", &url, "ORDERS", "orders", "ack_wait = \"1s\""),
            per_user("totals", 3)
        ),
    );
    let js = connect(&server).await;
    create_stream(&js, "ORDERS", "orders").await;
    let order = |i: u64| json!({"user": i % 4, "amount": i});
    publish(&js, "orders", (0..8).map(order)).await;
    let run = Run::start(dir.path(), "hold.toml", "0/1");
    wait_for("the first orders held", || async {
        consumer_info(&js, "ORDERS", "totals")
            .await
            .is_some_and(|i| i.num_ack_pending == 8)
    })
    .await;
    // Three ack waits while the accumulator holds the first two orders of each user.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let info = consumer_info(&js, "ORDERS", "totals")
        .await
        .expect("consumer");
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    // Stopped while it holds them: they are not acknowledged, so the next run gets them.
    let stderr = run.stop();
    assert!(stderr.contains("pulseflow: 8 in, 0 delivered"), "{stderr}");
    let run = Run::start(dir.path(), "hold.toml", "0/1");
    publish(&js, "orders", (8..12).map(order)).await;
    let out = dir.path().join("totals.ndjson");
    wait_for("every user's total", || async {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() == 4)
    })
    .await;
    let stderr = run.stop();
    assert_eq!(
        items_in(&stderr),
        12,
        "the held orders again, nothing else: {stderr}"
    );
    let totals: BTreeMap<u64, (u64, u64)> = std::fs::read_to_string(&out)
        .expect("output")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON");
            let n = |k: &str| v[k].as_f64().map_or(u64::MAX, |x| x as u64);
            (n("key"), (n("n"), n("total")))
        })
        .collect();
    let expected: BTreeMap<u64, (u64, u64)> =
        (0..4).map(|u| (u, (3, u + (u + 4) + (u + 8)))).collect();
    assert_eq!(totals, expected);
    wait_for("every order acknowledged", || async {
        consumer_info(&js, "ORDERS", "totals")
            .await
            .is_some_and(|i| i.num_ack_pending == 0)
    })
    .await;
}

/// Runs a config reading stream `IN` (ack wait 1 s) into `sink` (a `[sinks.out]` table for
/// the server's URL), with dead letters to a file, over `payloads`, until every message is
/// settled and two ack waits more (a message not terminated would come back in them). Returns
/// the run's stderr, its dead letters and the consumer's state.
async fn run_with_dead_letters(
    server: &NatsServer,
    sink: impl Fn(&str) -> String,
    payloads: &[&'static str],
) -> (String, String, consumer::Info) {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = nats_source(
        "input",
        &server.url(),
        "IN",
        "in.orders",
        "ack_wait = \"1s\"",
    );
    let config = format!(
        "{source}\n{}\n[dead_letter]\ntype = \"file\"\npath = \"dead.ndjson\"\n",
        sink(&server.url())
    );
    write(dir.path(), "dead.toml", &config);
    let js = connect(server).await;
    create_stream(&js, "IN", "in.orders").await;
    for payload in payloads {
        js.publish("in.orders", bytes::Bytes::from_static(payload.as_bytes()))
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let run = Run::start(dir.path(), "dead.toml", "0/1");
    until_settled(&js).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stderr = run.stop();
    let dead = std::fs::read_to_string(dir.path().join("dead.ndjson")).expect("dead letters");
    let info = consumer_info(&js, "IN", "input").await.expect("consumer");
    (stderr, dead, info)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_message_is_terminated_and_not_delivered_again() {
    let Some(server) = NatsServer::start("dead_letter_term") else {
        return;
    };
    let file_sink = |_: &str| {
        "[sinks.out]\ntype = \"file\"\ninputs = [\"input\"]\npath = \"out.ndjson\"\n".to_owned()
    };
    let (stderr, dead, info) = run_with_dead_letters(
        &server,
        file_sink,
        &["{\"id\": 1}", "not JSON", "{\"id\": 2}"],
    )
    .await;
    assert!(
        stderr.contains("pulseflow: 3 in, 2 delivered, 0 filtered, 0 dropped, 1 dead-lettered"),
        "{stderr}"
    );
    assert!(dead.contains("\"raw\":\"not JSON\""), "{dead}");
    assert_eq!(info.num_redelivered, 0, "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_stream_never_acknowledges_is_dead_lettered_not_delivered() {
    let Some(server) = NatsServer::start("unstored_publish") else {
        return;
    };
    // No stream takes `nowhere.orders`: every publish fails, however often it is sent.
    let nats_sink = |url: &str| {
        format!(
            "[sinks.out]\ntype = \"nats\"\ninputs = [\"input\"]\nurl = \"{url}\"\n\
             subject = \"nowhere.orders\"\nretries = 1\n"
        )
    };
    let payloads = [
        "{\"id\": 0}",
        "{\"id\": 1}",
        "{\"id\": 2}",
        "{\"id\": 3}",
        "{\"id\": 4}",
    ];
    let (stderr, dead, info) = run_with_dead_letters(&server, nats_sink, &payloads).await;
    assert!(
        stderr.contains("pulseflow: 5 in, 0 delivered, 0 filtered, 0 dropped, 5 dead-lettered"),
        "{stderr}"
    );
    assert_eq!(dead.lines().count(), 5, "{dead}");
    // Dead-lettered, so terminated: none came back.
    assert_eq!(info.num_redelivered, 0, "{info:?}");
}

/// `tag`'s repartitioning config: `<tag>.raw` to `<tag>.by_user.<p>`, 6 partitions.
fn repartition(url: &str, tag: &str) -> String {
    let source = nats_source(
        "repartition",
        url,
        &format!("{tag}_RAW"),
        &format!("{tag}.raw"),
        "",
    );
    format!(
        r#"{source}
[sinks.by_user]
type = "nats"
inputs = ["repartition"]
url = "{url}"
subject = "{tag}.by_user"
partition_by = ".user"
partitions = 6
stream = "{tag}_BY_USER"
"#
    )
}

/// `tag`'s keyed config: totals per user of 5 orders, published to `<tag>.totals`.
fn keyed(url: &str, tag: &str) -> String {
    let source = nats_source(
        "totals",
        url,
        &format!("{tag}_BY_USER"),
        &format!("{tag}.by_user"),
        "partitions = 6\nack_wait = \"2s\"",
    );
    let per_user = per_user("totals", 5);
    format!(
        r#"{source}{per_user}
[sinks.published]
type = "nats"
inputs = ["per_user"]
url = "{url}"
subject = "{tag}.totals"
stream = "{tag}_TOTALS"
"#
    )
}

const USERS: u64 = 40;

/// The orders: 5 per user, user `i % USERS`, amount `i`.
fn orders(range: std::ops::Range<u64>) -> impl Iterator<Item = Value> {
    range.map(|i| json!({"user": format!("u{}", i % USERS), "amount": i}))
}

/// The totals published under `tag`, by user; a user published twice must have the same
/// total each time.
async fn totals(js: &jetstream::Context, tag: &str) -> BTreeMap<String, (u64, u64)> {
    let mut by_user = BTreeMap::new();
    for v in payloads(js, &format!("{tag}_TOTALS")).await {
        let user = v["key"].as_str().expect("key").to_owned();
        let t = (
            v["n"].as_u64().expect("n"),
            v["total"].as_f64().expect("total") as u64,
        );
        if let Some(before) = by_user.insert(user.clone(), t) {
            assert_eq!(before, t, "{user} published twice with different totals");
        }
    }
    by_user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_give_the_keyed_totals_of_one_also_when_one_is_killed() {
    let Some(server) = NatsServer::start("three_instances") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = server.url();
    let js = connect(&server).await;
    let expected: BTreeMap<String, (u64, u64)> = (0..USERS)
        .map(|u| (format!("u{u}"), (5, (0..5).map(|k| u + k * USERS).sum())))
        .collect();
    for tag in ["ONE", "THREE"] {
        write(
            dir.path(),
            &format!("{tag}-repartition.toml"),
            &repartition(&url, tag),
        );
        write(dir.path(), &format!("{tag}-keyed.toml"), &keyed(&url, tag));
        create_stream(&js, &format!("{tag}_RAW"), &format!("{tag}.raw")).await;
    }

    // One instance.
    publish(&js, "ONE.raw", orders(0..5 * USERS)).await;
    let rp = Run::start(dir.path(), "ONE-repartition.toml", "0/1");
    let one = Run::start(dir.path(), "ONE-keyed.toml", "0/1");
    wait_for("one instance's totals", || async {
        totals(&js, "ONE").await.len() as u64 == USERS
    })
    .await;
    one.stop();
    rp.stop();
    assert_eq!(totals(&js, "ONE").await, expected);

    // Three, the second killed while it holds orders, and restarted.
    let rp = Run::start(dir.path(), "THREE-repartition.toml", "0/1");
    let mut instances: Vec<Option<Run>> = (0..3)
        .map(|i| {
            Some(Run::start(
                dir.path(),
                "THREE-keyed.toml",
                &format!("{i}/3"),
            ))
        })
        .collect();
    publish(&js, "THREE.raw", orders(0..3 * USERS)).await;
    wait_for("instance 1 holding orders", || async {
        consumer_info(&js, "THREE_BY_USER", "totals-1")
            .await
            .is_some_and(|i| i.num_ack_pending > 0)
    })
    .await;
    if let Some(run) = instances[1].take() {
        run.kill();
    }
    publish(&js, "THREE.raw", orders(3 * USERS..5 * USERS)).await;
    instances[1] = Some(Run::start(dir.path(), "THREE-keyed.toml", "1/3"));
    wait_for("three instances' totals", || async {
        totals(&js, "THREE").await.len() as u64 == USERS
    })
    .await;
    for run in instances.into_iter().flatten() {
        run.stop();
    }
    rp.stop();
    assert_eq!(totals(&js, "THREE").await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_at_start_or_restarted_mid_run_loses_nothing() {
    let Some(mut server) = NatsServer::new("server_down") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = server.url();

    // Down for longer than `connect_timeout`: a clear error, and no token shown.
    write(
        dir.path(),
        "gives-up.toml",
        &doubling(&url, "connect_timeout = \"1s\"\ntoken = \"s3cr3t-t0ken\""),
    );
    let output = Command::new(env!("CARGO_BIN_EXE_pulseflow"))
        .args(["run", "gives-up.toml"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot connect to NATS at {url}")),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cr3t-t0ken"), "{stderr}");

    // Down at the start, up later: the run connects when it can.
    const N: u64 = 2000;
    write(
        dir.path(),
        "double.toml",
        &doubling(&url, "connect_timeout = \"2m\""),
    );
    let run = Run::start(dir.path(), "double.toml", "0/1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.up();
    let js = connect(&server).await;
    wait_for("the run to create its streams", || async {
        js.get_stream("IN").await.is_ok() && js.get_stream("OUT").await.is_ok()
    })
    .await;
    publish(&js, "in.orders", (0..N / 2).map(|id| json!({"id": id}))).await;
    wait_for("a quarter of the outputs", || async {
        payloads(&js, "OUT").await.len() as u64 >= N / 4
    })
    .await;

    // Restarted in the middle of the run: both the run and this client reconnect.
    server.down();
    server.up();
    publish(&js, "in.orders", (N / 2..N).map(|id| json!({"id": id}))).await;
    wait_for("every output", || async {
        payloads(&js, "OUT").await.len() as u64 >= N
    })
    .await;
    run.stop();
    assert_each_once(&payloads(&js, "OUT").await, N);
}

#[test]
fn the_nats_example_configs_validate() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for config in [
        "nats_orders.toml",
        "nats_repartition.toml",
        "nats_totals.toml",
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_pulseflow"))
            .args(["validate", config])
            .current_dir(&examples)
            .env("NO_COLOR", "1")
            .output()
            .expect("binary runs");
        assert!(
            output.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
