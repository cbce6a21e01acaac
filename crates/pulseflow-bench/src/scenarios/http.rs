//! `http`: the HTTP source under load, and its latency next to a CPU hog.
//!
//! - **Ingest throughput.** Clients POST ndjson bodies of 100 items over 8 kept-alive
//!   connections to `http source -> blackhole`, and to a bare axum handler on the same
//!   serving code that decodes the same bodies with the same decoder and pushes the items into
//!   a channel read by a counting task. Interleaved rounds, medians: `vs_bare_axum` is
//!   pulseflow's items/s over the bare handler's.
//! - **Latency next to a hog.** One client POSTs one item at a time (answered once accepted)
//!   to a pipeline that also runs, as independent branches, one transform per runtime worker
//!   spinning the CPU for 200 µs per item on 1024-item batches. `hog_p99_ratio` is the p99 request latency with the
//!   hog and supervision on (the default) over the p99 of the same pipeline without the hog
//!   branch; `unsupervised_hog_p99_ratio` is the same with supervision off. Each variant first
//!   sends requests for a second, unmeasured (the supervisor escalates a hog after a run of
//!   long polls); three interleaved rounds without and with the hogs, medians. The clients run on
//!   a runtime of their own thread, so a starved runtime shows in the server's answers only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use pulseflow::CancellationToken;
use pulseflow::connectors::http::serve::{Limits, serve};
use pulseflow::connectors::http::{HttpSource, HttpSourceConfig, body};
use pulseflow::engine::Supervision;
use pulseflow::prelude::*;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::ndjson::BoxError;
use crate::CommonOpts;
use crate::report::{Report, median, per_sec};

/// Items per request body.
const ITEMS_PER_BODY: usize = 100;
/// Concurrent client connections.
const CONNECTIONS: usize = 8;
/// How long clients send before latencies are measured.
const WARM_UP: Duration = Duration::from_secs(3);
/// CPU time the hog spends per item.
const HOG_PER_ITEM: Duration = Duration::from_micros(200);

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.unwrap_or(2))
        .enable_all()
        .build()?;
    let requests = if opts.quick { 2_000 } else { 10_000 };
    let rounds = 5;
    let body = Bytes::from(
        (0..ITEMS_PER_BODY)
            .map(|i| {
                json!({"id": i, "user": format!("user{}", i % 17), "amount": i * 3, "ok": true})
                    .to_string()
                    + "\n"
            })
            .collect::<String>(),
    );
    let items = (requests * ITEMS_PER_BODY) as f64;
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(runtime.block_on(pulseflow_ingest(requests, body.clone()))?);
        bare.push(runtime.block_on(bare_ingest(requests, body.clone()))?);
    }
    let (ours_d, bare_d) = (median(ours.clone()), median(bare.clone()));
    let (ours_rate, bare_rate) = (items / ours_d.as_secs_f64(), items / bare_d.as_secs_f64());

    let samples = if opts.quick { 400 } else { 2_000 };
    let workers = opts.workers.unwrap_or(2);
    // Interleaved rounds without and with the hogs; the medians of their figures.
    let (mut calm, mut supervised) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        calm.push(runtime.block_on(latencies(samples, workers, None))?);
        supervised.push(runtime.block_on(latencies(
            samples,
            workers,
            Some(Supervision::Default),
        ))?);
    }
    let (calm, supervised) = (Latency::median(&calm), Latency::median(&supervised));
    // Unsupervised, a request takes about a second: fewer of them.
    let unsupervised = runtime.block_on(latencies(samples / 5, workers, Some(Supervision::Off)))?;

    let mut report = Report::new(
        format!(
            "http: {requests} POSTs of {ITEMS_PER_BODY} ndjson items over {CONNECTIONS} \
             connections, median of {rounds} interleaved rounds"
        ),
        &["ingest", "items/s", "seconds (median)", "all rounds (s)"],
    );
    let rounds_text = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    report.row(vec![
        "http source -> blackhole".into(),
        per_sec(ours_rate),
        format!("{:.3}", ours_d.as_secs_f64()),
        rounds_text(&ours),
    ]);
    report.row(vec![
        "bare axum handler -> channel".into(),
        per_sec(bare_rate),
        format!("{:.3}", bare_d.as_secs_f64()),
        rounds_text(&bare),
    ]);
    report.note(format!(
        "latency of one-item POSTs ({samples} in a row, median of 3 interleaved rounds): p50 / p99 without the hog {:.0} / {:.0} µs; \
         with the hog, supervised {:.0} / {:.0} µs, unsupervised ({} requests) {:.0} / {:.0} µs",
        calm.p50,
        calm.p99,
        supervised.p50,
        supervised.p99,
        samples / 5,
        unsupervised.p50,
        unsupervised.p99
    ));
    report.summary(json!({
        "scenario": "http",
        "requests": requests,
        "items_per_sec": ours_rate,
        "bare_axum_items_per_sec": bare_rate,
        "vs_bare_axum": ours_rate / bare_rate,
        "p99_us": calm.p99,
        "hog_p99_us": supervised.p99,
        "unsupervised_hog_p99_us": unsupervised.p99,
        "hog_p99_ratio": supervised.p99 / calm.p99,
        "unsupervised_hog_p99_ratio": unsupervised.p99 / calm.p99,
    }));
    Ok(report)
}

/// Sends `requests` bodies over [`CONNECTIONS`] connections from a runtime of their own;
/// returns the time until the last was answered 2xx.
async fn drive(address: SocketAddr, requests: usize, body: Bytes) -> Result<Duration, BoxError> {
    let url = format!("http://{address}/");
    let started = Instant::now();
    on_client_thread(move |client| async move {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let (client, url, body, next) =
                (client.clone(), url.clone(), body.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < requests as u64 {
                    loop {
                        let answer = client
                            .post(&url)
                            .header("content-type", "application/x-ndjson")
                            .body(body.clone())
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        let status = answer.status();
                        let _ = answer.bytes().await;
                        if status.is_success() {
                            break;
                        }
                        if status != StatusCode::SERVICE_UNAVAILABLE {
                            return Err(format!("status {status}"));
                        }
                    }
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    })
    .await?;
    Ok(started.elapsed())
}

/// Runs `work` with a fresh HTTP client on a current-thread runtime of its own (a blocking
/// thread), so that a starved server runtime shows in the answers and not in the client.
async fn on_client_thread<T, F, Fut>(work: F) -> Result<T, BoxError>
where
    T: Send + 'static,
    F: FnOnce(reqwest::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let outcome = tokio::task::spawn_blocking(move || -> Result<T, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(work(client))
    })
    .await?;
    Ok(outcome?)
}

async fn pulseflow_ingest(requests: usize, body: Bytes) -> Result<Duration, BoxError> {
    let source = HttpSource::bind(
        HttpSourceConfig::new("127.0.0.1:0".parse()?),
        body::json::<Value>(),
    )
    .await?;
    let address = source.local_addr().ok_or("not bound")?;
    let stop = source.stopper();
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    let mut p = PipelineBuilder::new("ingest");
    p.source("http", source).sink(
        "blackhole",
        sink_fn(move |_: Value| {
            seen.fetch_add(1, Ordering::Relaxed);
        }),
    );
    let pipeline = p.build()?;
    let run = tokio::spawn(async move {
        ExecutionEngine::new()
            .run(pipeline, ExecutionOptions::default())
            .await
    });
    let elapsed = drive(address, requests, body).await?;
    stop.cancel();
    let result = run.await?;
    let expected = (requests * ITEMS_PER_BODY) as u64;
    if !result.accounting.reconciles() || count.load(Ordering::Relaxed) != expected {
        return Err(format!(
            "pulseflow received {} items of {expected}",
            count.load(Ordering::Relaxed)
        )
        .into());
    }
    Ok(elapsed)
}

struct Bare {
    tx: mpsc::Sender<Vec<Value>>,
    decoder: body::Decoder<Value>,
}

async fn bare_handler(State(bare): State<Arc<Bare>>, body: Bytes) -> StatusCode {
    match body::decode(&body, Some("application/x-ndjson"), &bare.decoder) {
        Ok(items) => match bare.tx.send(items).await {
            Ok(()) => StatusCode::ACCEPTED,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        },
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

async fn bare_ingest(requests: usize, body: Bytes) -> Result<Duration, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (tx, mut rx) = mpsc::channel::<Vec<Value>>(16);
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(items) = rx.recv().await {
            n += items.len() as u64;
        }
        n
    });
    let app = Router::new()
        .route("/", post(bare_handler))
        .with_state(Arc::new(Bare {
            tx,
            decoder: body::json(),
        }));
    let stop = CancellationToken::new();
    let server = serve(listener, app, Limits::default(), stop.clone());
    let elapsed = drive(address, requests, body).await?;
    stop.cancel();
    server.await?;
    let n = counter.await?;
    if n != (requests * ITEMS_PER_BODY) as u64 {
        return Err(format!("the bare handler received {n} items").into());
    }
    Ok(elapsed)
}

#[derive(Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
}

impl Latency {
    /// The median p50 and the median p99 of several rounds.
    fn median(rounds: &[Latency]) -> Latency {
        let mid = |f: fn(&Latency) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Latency {
            p50: mid(|l| l.p50),
            p99: mid(|l| l.p99),
        }
    }
}

/// Spins the CPU for `d`.
fn spin(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// p50 and p99 (µs) of one-item POSTs, one after another; with a hog branch under
/// `hog` supervision, or without one.
async fn latencies(
    samples: usize,
    workers: usize,
    hog: Option<Supervision>,
) -> Result<Latency, BoxError> {
    let source = HttpSource::bind(
        HttpSourceConfig::new("127.0.0.1:0".parse()?),
        body::json::<Value>(),
    )
    .await?;
    let address = source.local_addr().ok_or("not bound")?;
    let stop = CancellationToken::new();
    let mut p = PipelineBuilder::new("latency");
    p.source("http", source)
        .sink("blackhole", sink_fn(|_: Value| {}));
    if hog.is_some() {
        // One hog per runtime worker: unsupervised, they can take every worker at once.
        for i in 0..workers {
            p.source(format!("work{i}"), sources::iter(0u64..))
                .map(format!("hog{i}"), |n: u64| {
                    spin(HOG_PER_ITEM);
                    n
                })
                .sink(format!("done{i}"), sink_fn(|_: u64| {}));
        }
    }
    let pipeline = p.build()?;
    let options = ExecutionOptions::default()
        .with_cancellation(stop.clone())
        .with_supervision(hog.unwrap_or(Supervision::Default));
    let run = tokio::spawn(async move { ExecutionEngine::new().run(pipeline, options).await });
    let url = format!("http://{address}/");
    let times = on_client_thread(move |client| async move {
        let mut times = Vec::with_capacity(samples);
        // Warm up for a second, the same in every variant: the connection, and the
        // supervisor's escalation of the hogs (it needs a run of long polls).
        let warm = Instant::now();
        let mut i = 0u64;
        while warm.elapsed() < WARM_UP {
            let _ = client
                .post(&url)
                .body(format!("{{\"w\":{i}}}"))
                .send()
                .await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for i in 0..samples {
            let started = Instant::now();
            let answer = client
                .post(&url)
                .body(format!("{{\"i\":{i}}}"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let _ = answer.bytes().await;
            times.push(started.elapsed().as_micros() as u64);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(times)
    })
    .await?;
    stop.cancel();
    let _ = run.await?;
    let mut sorted = times;
    sorted.sort_unstable();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64;
    Ok(Latency {
        p50: at(0.50),
        p99: at(0.99),
    })
}
