//! The HTTP connectors against real servers and clients on loopback.
//!
//! No test measures time: each waits for a condition (a status, a count) with a generous
//! overall limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use parking_lot::Mutex;
use pulseflow::connectors::http::{
    AckMode, HttpSink, HttpSinkConfig, HttpSinkStats, HttpSource, HttpSourceConfig, Secret, body,
};
use pulseflow::policy::{BufferPolicy, CircuitBreakerPolicy, DropPolicy};
use pulseflow::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long any condition is waited for before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// A sink that keeps each item's `id`, taking an item only when the gate lets one through.
struct GatedSink {
    gate: Arc<Semaphore>,
    seen: Arc<Mutex<Vec<u64>>>,
}

impl Sink for GatedSink {
    type Item = Value;

    async fn write(&mut self, item: Envelope<Value>) -> Result<(), ItemFailure<Value>> {
        let permit = self.gate.acquire().await.expect("gate open");
        permit.forget();
        let id = item.payload["id"].as_u64().expect("id");
        self.seen.lock().push(id);
        Ok(())
    }
}

struct Ingest {
    address: SocketAddr,
    stop: CancellationToken,
    gate: Arc<Semaphore>,
    seen: Arc<Mutex<Vec<u64>>>,
    run: tokio::task::JoinHandle<PipelineResult>,
}

/// source -> gated sink, with small buffers so the pipeline fills quickly.
async fn ingest(mut config: HttpSourceConfig) -> Ingest {
    config.queue = 1;
    config.accept_timeout = Duration::from_millis(50);
    let source = HttpSource::bind(config, body::json::<Value>())
        .await
        .expect("bind");
    let address = source.local_addr().expect("bound");
    let stop = source.stopper();
    let gate = Arc::new(Semaphore::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut p = PipelineBuilder::new("ingest");
    p.source("http", source)
        .sink(
            "gated",
            GatedSink {
                gate: gate.clone(),
                seen: seen.clone(),
            },
        )
        .buffer(BufferPolicy::new(4, DropPolicy::Block));
    let pipeline = p.build().expect("valid");
    let options = ExecutionOptions::default().with_batch_size(4);
    let run = tokio::spawn(async move { ExecutionEngine::new().run(pipeline, options).await });
    Ingest {
        address,
        stop,
        gate,
        seen,
        run,
    }
}

fn lines(ids: std::ops::Range<u64>) -> String {
    ids.map(|id| format!("{{\"id\":{id}}}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_answers_503_and_clients_that_retry_lose_nothing() {
    let ingest = ingest(HttpSourceConfig::new("127.0.0.1:0".parse().expect("addr"))).await;
    let url = format!("http://{}/", ingest.address);
    let http = client();
    // With the sink stopped, requests are accepted until the buffers are full, then refused.
    let mut refused = Vec::new();
    let mut next = 0u64;
    let mut saw_retry_after = false;
    while refused.len() < 3 {
        assert!(next < 10_000, "the pipeline never pushed back");
        let ids = next..next + 5;
        next += 5;
        let answer = http
            .post(&url)
            .body(lines(ids.clone()))
            .send()
            .await
            .expect("answer");
        match answer.status().as_u16() {
            202 => assert_eq!(answer.text().await.expect("body"), "{\"accepted\":5}"),
            503 => {
                saw_retry_after |= answer.headers().get("retry-after").is_some();
                refused.push(ids);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(saw_retry_after, "a 503 says when to retry");
    // The sink runs again; the clients retry what was refused until it is accepted.
    ingest.gate.add_permits(1 << 20);
    for ids in refused {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let answer = http
                .post(&url)
                .body(lines(ids.clone()))
                .send()
                .await
                .expect("answer");
            if answer.status() == 202 {
                break;
            }
            assert_eq!(answer.status(), 503);
            assert!(tokio::time::Instant::now() < deadline, "never accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    ingest.stop.cancel();
    let result = ingest.run.await.expect("run");
    assert!(result.success, "{:?}", result.error);
    let mut seen = ingest.seen.lock().clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..next).collect::<Vec<_>>(), "every item once");
    assert!(result.accounting.reconciles());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_acks_answer_only_once_the_sink_took_the_items() {
    let mut config = HttpSourceConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.ack = AckMode::Delivered;
    let mut ingest = ingest(config).await;
    let url = format!("http://{}/", ingest.address);
    let request = tokio::spawn(client().post(url).body(lines(0..3)).send());
    // Two of the three items written; the answer must wait for the third.
    ingest.gate.add_permits(2);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ingest.seen.lock().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !request.is_finished(),
        "answered before every item was handled"
    );
    ingest.gate.add_permits(1);
    let answer = request.await.expect("task").expect("answer");
    assert_eq!(answer.status(), 200);
    let counts: Value = serde_json::from_str(&answer.text().await.expect("body")).expect("json");
    assert_eq!(
        counts,
        json!({"delivered": 3, "dropped": 0, "dead_lettered": 0, "failed": 0})
    );
    ingest.stop.cancel();
    let result = (&mut ingest.run).await.expect("run");
    assert!(result.success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_the_pipeline_goes_on() {
    let mut config = HttpSourceConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.max_body_bytes = 1024;
    config.token = Some(Secret::new("s3cret"));
    let ingest = ingest(config).await;
    ingest.gate.add_permits(1 << 20);
    let url = format!("http://{}/", ingest.address);
    let http = client();
    let post = |body: Vec<u8>, token: &str| {
        http.post(&url)
            .header("authorization", format!("Bearer {token}"))
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (b"{\"id\":1}".to_vec(), "wrong", 401, "bearer token"),
        (vec![b' '; 2048], "s3cret", 413, "larger than 1024 bytes"),
        (
            b"{\"id\":1}\n{\"id\":\"\xff\"}".to_vec(),
            "s3cret",
            400,
            "line 2: invalid UTF-8",
        ),
        (
            b"{\"id\":1}\n{\"id\":".to_vec(),
            "s3cret",
            400,
            "line 2: EOF",
        ),
        (b"[{\"id\":1},".to_vec(), "s3cret", 400, "line 1, column 10"),
    ];
    for (body, token, status, message) in cases {
        let answer = post(body, token).await.expect("answer");
        assert_eq!(answer.status().as_u16(), status);
        let text = answer.text().await.expect("body");
        assert!(text.contains(message), "{status}: {text}");
        assert!(!text.contains("s3cret"), "the token never shows");
    }
    let missing = http.post(&url).body("{}").send().await.expect("answer");
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing
            .headers()
            .get("www-authenticate")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let wrong_path = http
        .post(format!("http://{}/other", ingest.address))
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong_path.status(), 404);
    // A good request after all that is taken.
    let ok = post(lines(7..9).into_bytes(), "s3cret")
        .await
        .expect("answer");
    assert_eq!(ok.status(), 202);
    ingest.stop.cancel();
    let result = ingest.run.await.expect("run");
    assert!(result.success);
    assert_eq!(*ingest.seen.lock(), vec![7, 8]);
}

/// What the scripted server answers, by request number.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reply {
    Ok,
    Fail,
    TooMany,
    Drop,
    /// Answers 200 after a while (within the request timeout).
    Slow,
    /// Never answers in time, and records nothing.
    Hang,
}

/// A hand-rolled HTTP/1.1 server (one request per connection) that answers by script and
/// records the ids of the items of each request it answered 2xx.
struct Flaky {
    address: SocketAddr,
    accepted: Arc<Mutex<Vec<u64>>>,
    requests: Arc<AtomicU64>,
    in_flight_peak: Arc<AtomicUsize>,
}

async fn flaky(script: impl Fn(u64) -> Reply + Send + Sync + 'static) -> Flaky {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let in_flight_peak = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let server = Flaky {
        address,
        accepted: accepted.clone(),
        requests: requests.clone(),
        in_flight_peak: in_flight_peak.clone(),
    };
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = requests.fetch_add(1, SeqCst);
            let (script, accepted) = (script.clone(), accepted.clone());
            let (in_flight, peak) = (in_flight.clone(), in_flight_peak.clone());
            tokio::spawn(async move {
                let now = in_flight.fetch_add(1, SeqCst) + 1;
                peak.fetch_max(now, SeqCst);
                answer(stream, script(n), &accepted).await;
                in_flight.fetch_sub(1, SeqCst);
            });
        }
    });
    server
}

async fn answer(mut stream: TcpStream, reply: Reply, accepted: &Mutex<Vec<u64>>) {
    let Some(body) = read_request(&mut stream).await else {
        return;
    };
    let (status, extra) = match reply {
        Reply::Drop => return,
        Reply::Fail => ("500 Internal Server Error", ""),
        Reply::TooMany => ("429 Too Many Requests", "retry-after: 0\r\n"),
        Reply::Slow => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ("200 OK", "")
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
        Reply::Ok => {
            tokio::time::sleep(Duration::from_millis(2)).await;
            ("200 OK", "")
        }
    };
    if status.starts_with("200") {
        let text = String::from_utf8(body).expect("utf-8");
        let mut ids = accepted.lock();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("json line");
            ids.push(v["id"].as_u64().expect("id"));
        }
    }
    let head =
        format!("HTTP/1.1 {status}\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads one request's body (by its content-length).
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Some(data[head_end..head_end + length].to_vec())
}

fn sink_config(address: SocketAddr) -> HttpSinkConfig {
    let mut config = HttpSinkConfig::new(format!("http://{address}/").parse().expect("url"));
    config.max_items = 10;
    config.request_timeout = Duration::from_secs(1);
    config.retry.initial_backoff = Duration::from_millis(1);
    config.retry.max_backoff = Duration::from_millis(20);
    config
}

async fn send(
    config: HttpSinkConfig,
    n: u64,
    breaker: Option<CircuitBreakerPolicy>,
) -> (PipelineResult, Arc<HttpSinkStats>) {
    let sink = HttpSink::<Value>::new(config);
    let stats = sink.stats();
    let mut p = PipelineBuilder::new("send");
    let handle = p
        .source("items", sources::iter((0..n).map(|id| json!({ "id": id }))))
        .sink("post", sink)
        .error_policy(ErrorPolicy::DeadLetter);
    if let Some(policy) = breaker {
        handle.circuit_breaker(policy);
    }
    let options = ExecutionOptions::default().with_batch_size(200);
    let result = tokio::time::timeout(
        PATIENCE,
        ExecutionEngine::new().run(p.build().expect("valid"), options),
    )
    .await
    .expect("the run ends");
    (result, stats)
}

fn dead_ids(result: &PipelineResult) -> Vec<u64> {
    result
        .dead_letters
        .iter()
        .map(|d| {
            let payload = d.payload.as_ref().expect("kept payload");
            let value = payload.downcast_ref::<Value>().expect("a JSON value");
            value["id"].as_u64().expect("id")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_server_gets_every_item_once_or_it_is_dead_lettered() {
    let server = flaky(|n| match n % 13 {
        1 | 6 => Reply::Fail,
        3 => Reply::TooMany,
        8 => Reply::Drop,
        11 if n < 40 => Reply::Hang,
        12 => Reply::Slow,
        _ => Reply::Ok,
    })
    .await;
    let (result, stats) = send(sink_config(server.address), 2_000, None).await;
    assert!(result.accounting.reconciles());
    let mut delivered = server.accepted.lock().clone();
    delivered.sort_unstable();
    let before = delivered.len();
    delivered.dedup();
    assert_eq!(before, delivered.len(), "no item in two 2xx requests");
    let mut all = delivered.clone();
    all.extend(dead_ids(&result));
    all.sort_unstable();
    assert_eq!(
        all,
        (0..2_000).collect::<Vec<_>>(),
        "each item delivered or dead-lettered"
    );
    assert_eq!(result.accounting.delivered, before as u64);
    assert!(stats.retries() > 0);
    assert!(server.requests.load(SeqCst) > 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_budget_and_the_items_are_dead_lettered() {
    let server = flaky(|_| Reply::Fail).await;
    let mut config = sink_config(server.address);
    config.retry.max_attempts = 100;
    config.retry.budget_min_per_sec = 1;
    config.retry.budget_ratio = 0.1;
    let (result, stats) = send(config, 100, None).await;
    assert_eq!(result.accounting.delivered, 0);
    assert_eq!(result.accounting.dead_lettered, 100);
    assert!(stats.budget_exhausted() > 0);
    let letter = &result.dead_letters[0];
    assert!(letter.error.contains("HTTP 500"), "{}", letter.error);
    assert!(result.accounting.reconciles());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_falls_under_errors_and_climbs_back_after() {
    let phase = |n: u64| {
        if (300..340).contains(&n) {
            Reply::Fail
        } else {
            Reply::Ok
        }
    };
    let server = flaky(phase).await;
    let mut config = sink_config(server.address);
    config.max_items = 5;
    config.max_concurrency = 16;
    let (result, stats) = send(config, 6_000, None).await;
    assert!(result.accounting.reconciles());
    assert!(
        server.in_flight_peak.load(SeqCst) > 1,
        "requests went out concurrently"
    );
    assert!(stats.lowest_concurrency_limit() < 16);
    assert!(
        stats.concurrency_limit() > stats.lowest_concurrency_limit(),
        "the limit climbs back: {} vs lowest {}",
        stats.concurrency_limit(),
        stats.lowest_concurrency_limit()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_while_the_server_fails_and_closes_after() {
    let server = flaky(|n| {
        if (20..60).contains(&n) {
            Reply::Fail
        } else {
            Reply::Ok
        }
    })
    .await;
    let mut config = sink_config(server.address);
    config.retry.max_attempts = 1;
    config.max_items = 20;
    let breaker = CircuitBreakerPolicy {
        error_threshold: 0.5,
        latency_threshold: Duration::ZERO,
        window: Duration::from_secs(10),
        minimum_throughput: 2,
        cooldown: Duration::from_millis(20),
    };
    let (result, _) = send(config, 4_000, Some(breaker)).await;
    assert!(result.accounting.reconciles());
    let metrics: &BTreeMap<String, f64> = &result.stages["post"].metrics;
    assert!(metrics["breaker.closed->open"] >= 1.0, "{metrics:?}");
    assert!(metrics["breaker.half_open->closed"] >= 1.0, "{metrics:?}");
    assert_eq!(metrics["breaker.state"], 0.0, "closed at the end");
    assert!(result.accounting.delivered > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_feeds_a_source_with_gzip_and_arrays() {
    let mut config = HttpSourceConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.ack = AckMode::Delivered;
    let ingest = ingest(config).await;
    ingest.gate.add_permits(1 << 20);
    let mut sink = sink_config(ingest.address);
    sink.gzip = true;
    sink.format = pulseflow::connectors::http::RequestFormat::JsonArray;
    // `ack = delivered` answers once the ingest pipeline delivered; on a loaded machine that
    // can take longer than the usual 1 s, and a retried request would be a (legitimate)
    // duplicate: this test counts exactly.
    sink.request_timeout = Duration::from_secs(60);
    let (result, stats) = send(sink, 500, None).await;
    assert_eq!(result.accounting.delivered, 500);
    assert_eq!(stats.failed_requests(), 0);
    ingest.stop.cancel();
    let received = ingest.run.await.expect("run");
    assert_eq!(received.accounting.delivered, 500);
    let mut seen = ingest.seen.lock().clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..500).collect::<Vec<_>>());
}
