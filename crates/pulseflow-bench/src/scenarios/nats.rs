//! `nats`: messages through a JetStream source -> map -> JetStream sink (publish acks, the
//! source message acked once its output is acknowledged) against a hand-written async-nats
//! loop doing the same consume-transform-publish-ack work, in the same run against the same
//! `nats-server -js` (started here on a free loopback port with a temporary store; it must
//! be on PATH).
//!
//! The input stream is filled once; each round reads all of it through a fresh durable
//! consumer and publishes to an output stream of its own, with `Nats-Msg-Id` from the source
//! message, and ends once every output is acknowledged by that stream. Rounds alternate the contenders.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use pulseflow::CancellationToken;
use pulseflow::connectors::nats::sink::{JetStreamSink, Publish, Settings as Produce};
use pulseflow::connectors::nats::source::{JetStreamSource, Received, Settings as Consume};
use pulseflow::connectors::nats::{Connection, sink::message_id};
use pulseflow::engine::Supervision;
use pulseflow::prelude::*;
use serde_json::json;

use crate::CommonOpts;
use crate::report::{Report, median, per_sec};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Publishes awaiting their acknowledgement, at most, for both contenders.
const IN_FLIGHT: usize = 256;
/// Messages delivered and not acknowledged, at most, for both contenders.
const MAX_ACK_PENDING: u32 = 1000;

/// The transform both contenders apply to a payload.
fn transform(payload: &[u8]) -> Bytes {
    Bytes::from(payload.to_ascii_uppercase())
}

/// `nats-server -js` on a free port, killed when dropped.
struct Server {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl Server {
    fn start() -> Result<Self, BoxError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let binary: PathBuf = std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
            .ok_or("nats-server not found on PATH (install the nats-server package)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let store = tempfile::tempdir()?;
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("nats-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn create_stream(js: &jetstream::Context, name: &str, subject: &str) -> Result<(), BoxError> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Fills `IN` with `n` small JSON messages.
async fn fill(js: &jetstream::Context, n: u64) -> Result<(), BoxError> {
    create_stream(js, "IN", "bench.in").await?;
    let mut acks = FuturesOrdered::new();
    for i in 0..n {
        let payload = Bytes::from(
            json!({"id": i, "user": format!("u{}", i % 1000), "amount": i % 97}).to_string(),
        );
        acks.push_back(js.publish("bench.in", payload).await?.into_future());
        if acks.len() >= 1000 {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(())
}

/// Waits until stream `name` holds `n` messages.
async fn until_full(js: &jetstream::Context, name: &str, n: u64) -> Result<(), BoxError> {
    loop {
        if js.get_stream(name).await?.info().await?.state.messages >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// pulseflow: source -> map -> sink, until its sink delivered `n` messages (each acknowledged
/// by the stream) and `PF_<round>` holds them.
async fn pulseflow_round(
    url: &str,
    js: &jetstream::Context,
    n: u64,
    round: usize,
    opts: &CommonOpts,
) -> Result<Duration, BoxError> {
    let out = format!("PF_{round}");
    let subject = format!("bench.pf.{round}");
    create_stream(js, &out, &subject).await?;
    let mut consume = Consume::new(Connection::new(url), "IN", format!("pf-{round}"));
    consume.max_ack_pending = MAX_ACK_PENDING;
    let mut produce = Produce::new(Connection::new(url));
    produce.max_in_flight = IN_FLIGHT;
    let source = JetStreamSource::new(consume);
    let flushed = source.acks_flushed();
    let mut p = PipelineBuilder::new("nats");
    let to = subject.clone();
    p.source("in", source)
        .map("upper", move |m: Received| Publish {
            subject: to.clone(),
            payload: transform(&m.payload),
        })
        .sink("out", JetStreamSink::new(produce));
    let pipeline = p.build().map_err(|e| e.to_string())?;
    let cancel = CancellationToken::new();
    // As `pulseflow run` does by default: supervised, never isolated (an isolated stage runs
    // at idle priority, and its network round trips wait behind any busy process).
    let supervision = if opts.unsupervised {
        Supervision::Off
    } else {
        Supervision::NoIsolation
    };
    let mut options = ExecutionOptions::default()
        .with_cancellation(cancel.clone())
        .with_supervision(supervision);
    if let Some(b) = opts.batch {
        options = options.with_batch_size(b);
    }
    let engine = std::sync::Arc::new(ExecutionEngine::new());
    let started = Instant::now();
    let run = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run(pipeline, options).await }
    });
    // The sink counts an item delivered once the stream acknowledged it: watched in the
    // process (as the raw loop knows its acks), then the stream checked once, as the raw loop
    // does; polling the server all along would load it while pulseflow runs.
    while engine.inspect("out").map_or(0, |s| s.counts.delivered) < n {
        if run.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    until_full(js, &out, n).await?;
    let elapsed = started.elapsed();
    cancel.cancel();
    let result = run.await?;
    flushed.wait().await;
    if !result.success || !result.accounting.reconciles() {
        return Err(format!("pulseflow run: {:?} {:?}", result.error, result.accounting).into());
    }
    Ok(elapsed)
}

/// The hand-written loop: pull, transform, publish with `Nats-Msg-Id`, await the publish ack,
/// ack the source message; up to `IN_FLIGHT` publishes pending.
async fn raw_round(js: &jetstream::Context, n: u64, round: usize) -> Result<Duration, BoxError> {
    let out = format!("RAW_{round}");
    let subject = format!("bench.raw.{round}");
    create_stream(js, &out, &subject).await?;
    let name = format!("raw-{round}");
    let started = Instant::now();
    let consumer: PullConsumer = js
        .get_stream("IN")
        .await?
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: i64::from(MAX_ACK_PENDING),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(MAX_ACK_PENDING as usize)
        .messages()
        .await?;
    let mut pending = FuturesOrdered::new();
    let mut read = 0;
    while read < n {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        read += 1;
        let id = {
            let info = message.info()?;
            message_id(
                &format!("{}.{}", info.stream, info.stream_sequence),
                &transform(&message.payload),
            )
        };
        let publish = PublishMessage::build()
            .payload(transform(&message.payload))
            .message_id(id);
        let ack = js.send_publish(subject.clone(), publish).await?;
        pending.push_back(async move {
            ack.await?;
            message
                .ack()
                .await
                .map_err(|e| -> BoxError { e.to_string().into() })
        });
        if pending.len() >= IN_FLIGHT {
            if let Some(r) = pending.next().await {
                r?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    until_full(js, &out, n).await?;
    Ok(started.elapsed())
}

/// Runs the scenario.
pub fn run(opts: &CommonOpts) -> Result<Report, Box<dyn std::error::Error>> {
    let (n, rounds) = if opts.quick {
        (50_000u64, 3)
    } else {
        (200_000, 5)
    };
    let server = Server::start().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.unwrap_or(2))
        .enable_all()
        .build()?;
    let (pf, raw) = rt
        .block_on(async {
            let js = jetstream::new(async_nats::connect(&server.url).await?);
            fill(&js, n).await?;
            let (mut pf, mut raw) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                if !opts.profile {
                    raw.push(raw_round(&js, n, round).await?);
                }
                pf.push(pulseflow_round(&server.url, &js, n, round, opts).await?);
            }
            Ok::<_, BoxError>((pf, raw))
        })
        .map_err(|e| e.to_string())?;
    let pf = median(pf);
    let pf_rate = n as f64 / pf.as_secs_f64();
    let mut report = Report::new(
        format!(
            "nats: {n} messages, JetStream source -> map -> JetStream sink (median of {rounds})"
        ),
        &["contender", "time", "messages/s", "vs raw loop"],
    );
    let mut summary = json!({"scenario": "nats", "messages": n, "msgs_per_sec": pf_rate.round()});
    if !raw.is_empty() {
        let raw = median(raw);
        let raw_rate = n as f64 / raw.as_secs_f64();
        let ratio = pf_rate / raw_rate;
        report.row(vec![
            "async-nats loop".into(),
            format!("{raw:.2?}"),
            per_sec(raw_rate),
            "1.00".into(),
        ]);
        report.row(vec![
            "pulseflow".into(),
            format!("{pf:.2?}"),
            per_sec(pf_rate),
            format!("{ratio:.2}"),
        ]);
        summary["raw_msgs_per_sec"] = json!(raw_rate.round());
        summary["vs_raw_loop"] = json!((ratio * 100.0).round() / 100.0);
    } else {
        report.row(vec![
            "pulseflow".into(),
            format!("{pf:.2?}"),
            per_sec(pf_rate),
            String::new(),
        ]);
    }
    report.note(format!("server: nats-server -js on loopback; {IN_FLIGHT} publishes in flight, max_ack_pending {MAX_ACK_PENDING}"));
    report.summary(summary);
    Ok(report)
}
