//! [`HttpSink`]: items sent to an HTTP endpoint in batched requests, retried within a
//! budget, at a concurrency that adapts to the server.
//!
//! Each batch of the pipeline is cut into requests of at most `max_items` items, a request
//! closing once its body reaches `max_bytes`; the body is ndjson or a JSON array, gzipped
//! when asked. The requests of a batch go out concurrently, as many at once as the
//! [`AdaptiveConcurrency`] limit allows. A request is retried on a `5xx`, `408`, `429`, a
//! timeout or a failed connection, after an exponential backoff with jitter (at least the
//! server's `Retry-After`), at most `max_attempts` times and only while the retry budget
//! (a share of recent requests, see tower's `TpsBudget`) allows. An item counts as delivered
//! only once its request got a `2xx`; the items of a request that failed for good go to the
//! stage's error policy with the last error (dead-lettered under the command's default). Put
//! a circuit breaker on the stage to stop sending while the server keeps failing: an open
//! breaker takes no input, so the pressure goes upstream.
//!
//! ```no_run
//! use pulseflow::connectors::http::{HttpSink, HttpSinkConfig};
//! use pulseflow::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = HttpSinkConfig::new("http://127.0.0.1:9000/events".parse()?);
//! config.gzip = true;
//! config.max_items = 200;
//! let mut p = PipelineBuilder::new("forward");
//! p.source("events", sources::iter((0..1000).map(|n| serde_json::json!({ "n": n }))))
//!     .sink("post", HttpSink::new(config))
//!     .error_policy(ErrorPolicy::DeadLetter);
//! let result = ExecutionEngine::new().run(p.build()?, ExecutionOptions::default()).await;
//! assert!(result.accounting.reconciles());
//! # Ok(())
//! # }
//! ```

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use super::Secret;
use super::concurrency::AdaptiveConcurrency;
use crate::envelope::Envelope;
use crate::error::{ItemFailure, StageError};
use crate::stage::{Sink, WriteProgress};

/// Writes the JSON text of one item (no newline); the error is a message for the item's
/// failure.
pub type Encoder<T> = Arc<dyn Fn(&T, &mut Vec<u8>) -> Result<(), String> + Send + Sync>;

/// An encoder of items that implement `Serialize`.
pub fn json<T: Serialize + 'static>() -> Encoder<T> {
    Arc::new(|item, out| serde_json::to_writer(out, item).map_err(|e| e.to_string()))
}

/// How a request body holds its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// One JSON value per line (`application/x-ndjson`).
    #[default]
    Ndjson,
    /// A JSON array (`application/json`).
    JsonArray,
}

/// When and how often a request is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Tries per request, the first included.
    pub max_attempts: u32,
    /// The first backoff (doubling, with jitter).
    pub initial_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Retries allowed as a share of recent requests (0.2: one retry per five requests)...
    pub budget_ratio: f32,
    /// ...and at least this many retries per second in any case.
    pub budget_min_per_sec: u32,
}

impl Default for RetrySettings {
    /// 5 tries, backoff from 100 ms to 10 s, retries up to 20% of requests plus 10 a second.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
        }
    }
}

/// Settings of an [`HttpSink`].
#[derive(Debug, Clone)]
pub struct HttpSinkConfig {
    /// Where requests are sent (`POST`).
    pub url: reqwest::Url,
    /// The body's format.
    pub format: BodyFormat,
    /// Gzip the body (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// Most items in a request.
    pub max_items: usize,
    /// A request closes once its body reaches this many bytes (before gzip).
    pub max_bytes: usize,
    /// Time limit of one request, answer included.
    pub request_timeout: Duration,
    /// Retries.
    pub retry: RetrySettings,
    /// Requests in flight at first (adaptive) or always (`initial == max`).
    pub initial_concurrency: usize,
    /// The most requests in flight.
    pub max_concurrency: usize,
    /// Sent as `Authorization: Bearer ...`.
    pub token: Option<Secret>,
    /// More headers for every request.
    pub headers: Vec<(String, String)>,
}

impl HttpSinkConfig {
    /// ndjson, no gzip, 500 items or 1 MiB a request, 30 s a request, default retries, 1 to
    /// 32 requests in flight.
    pub fn new(url: reqwest::Url) -> Self {
        Self {
            url,
            format: BodyFormat::Ndjson,
            gzip: false,
            max_items: 500,
            max_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            retry: RetrySettings::default(),
            initial_concurrency: 1,
            max_concurrency: 32,
            token: None,
            headers: Vec::new(),
        }
    }
}

/// What an [`HttpSink`] did, readable while it runs ([`HttpSink::stats`]).
#[derive(Debug)]
pub struct HttpSinkStats {
    requests: AtomicU64,
    retries: AtomicU64,
    failed_requests: AtomicU64,
    budget_exhausted: AtomicU64,
    limiter: Arc<AdaptiveConcurrency>,
    lowest_limit: AtomicU64,
}

impl HttpSinkStats {
    /// Requests sent, retries included.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Retries among them.
    pub fn retries(&self) -> u64 {
        self.retries.load(Relaxed)
    }

    /// Requests given up on (their items failed).
    pub fn failed_requests(&self) -> u64 {
        self.failed_requests.load(Relaxed)
    }

    /// Requests given up on because the retry budget was spent.
    pub fn budget_exhausted(&self) -> u64 {
        self.budget_exhausted.load(Relaxed)
    }

    /// The concurrency limit now.
    pub fn concurrency_limit(&self) -> usize {
        self.limiter.limit()
    }

    /// The lowest the concurrency limit has been.
    pub fn lowest_concurrency_limit(&self) -> usize {
        self.lowest_limit.load(Relaxed) as usize
    }
}

/// Why a request failed for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// The server refused the request (a status that retrying cannot change).
    #[error("HTTP {status}: {body}")]
    Refused {
        /// The status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// Every attempt failed.
    #[error("gave up after {attempts} attempts: {last}")]
    Attempts {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: String,
    },
    /// A retry would have exceeded the retry budget.
    #[error("retry budget spent after {attempts} attempts: {last}")]
    Budget {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: String,
    },
}

/// A sink that POSTs items to an HTTP endpoint. See the [module docs](self).
pub struct HttpSink<T> {
    config: Arc<HttpSinkConfig>,
    client: reqwest::Client,
    encoder: Encoder<T>,
    budget: Arc<TpsBudget>,
    stats: Arc<HttpSinkStats>,
}

impl<T: Serialize + Send + 'static> HttpSink<T> {
    /// A sink of `Serialize` items.
    pub fn new(config: HttpSinkConfig) -> Self {
        Self::with_encoder(config, json())
    }
}

impl<T: Send + 'static> HttpSink<T> {
    /// A sink whose items `encoder` writes as JSON.
    pub fn with_encoder(config: HttpSinkConfig, encoder: Encoder<T>) -> Self {
        let limiter = Arc::new(AdaptiveConcurrency::new(
            config.initial_concurrency,
            config.max_concurrency,
        ));
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.retry.budget_min_per_sec,
            config.retry.budget_ratio.clamp(0.0, 1000.0),
        );
        let client = reqwest::Client::builder()
            .no_proxy()
            .default_headers(default_headers(&config))
            .build()
            .unwrap_or_default();
        Self {
            stats: Arc::new(HttpSinkStats {
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                failed_requests: AtomicU64::new(0),
                budget_exhausted: AtomicU64::new(0),
                lowest_limit: AtomicU64::new(limiter.limit() as u64),
                limiter,
            }),
            config: Arc::new(config),
            client,
            encoder,
            budget: Arc::new(budget),
        }
    }

    /// Its counters and concurrency limit.
    pub fn stats(&self) -> Arc<HttpSinkStats> {
        self.stats.clone()
    }

    /// Cuts `items` into requests; an item that cannot be encoded fails on its own.
    fn cut(
        &self,
        items: &mut std::vec::IntoIter<Envelope<T>>,
        failed: &mut Vec<ItemFailure<T>>,
        progress: &mut WriteProgress,
    ) -> Vec<Request<T>> {
        let mut requests = Vec::new();
        let mut current = Request::new(self.config.format);
        for item in items.by_ref() {
            progress.current_seq = item.seq;
            let mark = current.body.len();
            current.separate();
            if let Err(e) = (self.encoder)(&item.payload, &mut current.body) {
                current.body.truncate(mark);
                failed.push(ItemFailure::new(
                    item,
                    StageError::msg(format!("cannot encode the item: {e}")),
                ));
                continue;
            }
            current.items.push(item);
            if current.items.len() >= self.config.max_items
                || current.body.len() >= self.config.max_bytes
            {
                let full = std::mem::replace(&mut current, Request::new(self.config.format));
                requests.push(full);
            }
        }
        if !current.items.is_empty() {
            requests.push(current);
        }
        requests
    }
}

/// One request's items and body.
struct Request<T> {
    format: BodyFormat,
    items: Vec<Envelope<T>>,
    body: Vec<u8>,
}

impl<T> Request<T> {
    fn new(format: BodyFormat) -> Self {
        Self {
            format,
            items: Vec::new(),
            body: Vec::new(),
        }
    }

    /// What goes before the next item.
    fn separate(&mut self) {
        match (self.format, self.items.is_empty()) {
            (BodyFormat::Ndjson, true) => {}
            (BodyFormat::Ndjson, false) => self.body.push(b'\n'),
            (BodyFormat::JsonArray, true) => self.body.push(b'['),
            (BodyFormat::JsonArray, false) => self.body.push(b','),
        }
    }

    /// The finished body, gzipped if asked.
    fn finish(&mut self, gzip: bool) -> std::io::Result<Bytes> {
        match self.format {
            BodyFormat::Ndjson => self.body.push(b'\n'),
            BodyFormat::JsonArray => self.body.push(b']'),
        }
        let body = std::mem::take(&mut self.body);
        if !gzip {
            return Ok(Bytes::from(body));
        }
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::fast(),
        );
        encoder.write_all(&body)?;
        Ok(Bytes::from(encoder.finish()?))
    }
}

fn default_headers(config: &HttpSinkConfig) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let content_type = match config.format {
        BodyFormat::Ndjson => "application/x-ndjson",
        BodyFormat::JsonArray => "application/json",
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if config.gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if let Some(token) = &config.token {
        if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
    }
    for (name, value) in &config.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Worth another try; `load` when it is a sign the server is overloaded.
    Retry {
        reason: String,
        after: Option<Duration>,
        load: bool,
    },
    Refused(SendError),
}

/// Everything one request needs, shared by the requests of a batch.
struct Sender<'a> {
    config: &'a HttpSinkConfig,
    client: &'a reqwest::Client,
    budget: &'a TpsBudget,
    stats: &'a HttpSinkStats,
}

impl Sender<'_> {
    async fn send(&self, body: Bytes) -> Result<(), SendError> {
        self.budget.deposit();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.config.retry.initial_backoff)
            .with_max_delay(self.config.retry.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let permit = self.stats.limiter.acquire().await;
            self.stats.requests.fetch_add(1, Relaxed);
            let started = Instant::now();
            let attempt = self.attempt(body.clone()).await;
            let latency = started.elapsed();
            let (reason, after) = match attempt {
                Attempt::Delivered => {
                    permit.success(latency);
                    return Ok(());
                }
                Attempt::Refused(e) => {
                    drop(permit);
                    return Err(e);
                }
                Attempt::Retry {
                    reason,
                    after,
                    load,
                } => {
                    if load {
                        permit.overloaded(latency);
                        let limit = self.stats.limiter.limit() as u64;
                        self.stats.lowest_limit.fetch_min(limit, Relaxed);
                    } else {
                        drop(permit);
                    }
                    (reason, after)
                }
            };
            if attempts >= self.config.retry.max_attempts {
                return Err(SendError::Attempts {
                    attempts,
                    last: reason,
                });
            }
            if !self.budget.withdraw() {
                self.stats.budget_exhausted.fetch_add(1, Relaxed);
                return Err(SendError::Budget {
                    attempts,
                    last: reason,
                });
            }
            self.stats.retries.fetch_add(1, Relaxed);
            let backoff = backoff.next().unwrap_or(self.config.retry.max_backoff);
            tokio::time::sleep(wait_before_retry(backoff, after)).await;
        }
    }

    async fn attempt(&self, body: Bytes) -> Attempt {
        let sent = self
            .client
            .post(self.config.url.clone())
            .timeout(self.config.request_timeout)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let reason = if e.is_timeout() {
                    format!("no answer within {:?}", self.config.request_timeout)
                } else {
                    format!("request failed: {}", cause(&e))
                };
                return Attempt::Retry {
                    reason,
                    after: None,
                    load: true,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            // Read the answer so the connection can carry the next request.
            let _ = response.bytes().await;
            return Attempt::Delivered;
        }
        let after = retry_after(response.headers());
        let body = snippet(response).await;
        let retryable = status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT;
        if retryable {
            Attempt::Retry {
                reason: format!("HTTP {}: {body}", status.as_u16()),
                after,
                load: true,
            }
        } else {
            Attempt::Refused(SendError::Refused {
                status: status.as_u16(),
                body,
            })
        }
    }
}

/// The wait before a retry: the backoff, or the server's `Retry-After` when that is longer.
fn wait_before_retry(backoff: Duration, retry_after: Option<Duration>) -> Duration {
    backoff.max(retry_after.unwrap_or_default())
}

/// A `Retry-After` in seconds, at most an hour (an HTTP date counts as none).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

/// The first 200 characters of an answer's body, for an error message.
async fn snippet(response: reqwest::Response) -> String {
    let bytes = response.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    text.trim().to_owned()
}

/// An error with its causes, as one line.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl<T: Send + 'static> Sink for HttpSink<T> {
    type Item = T;

    async fn write(&mut self, item: Envelope<T>) -> Result<(), ItemFailure<T>> {
        let mut failed = Vec::new();
        let mut progress = WriteProgress::default();
        self.write_batch(&mut vec![item].into_iter(), &mut failed, &mut progress)
            .await;
        match failed.pop() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<T>>,
        failed: &mut Vec<ItemFailure<T>>,
        progress: &mut WriteProgress,
    ) {
        let requests = self.cut(items, failed, progress);
        let sender = Sender {
            config: &self.config,
            client: &self.client,
            budget: &self.budget,
            stats: &self.stats,
        };
        let gzip = self.config.gzip;
        let sender = &sender;
        let mut sent = futures::stream::iter(requests)
            .map(|mut request| async move {
                let outcome = match request.finish(gzip) {
                    Ok(body) => sender.send(body).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("cannot compress the body: {e}")),
                };
                (request.items, outcome)
            })
            .buffer_unordered(self.config.max_concurrency.max(1));
        while let Some((items, outcome)) = sent.next().await {
            match outcome {
                Ok(()) => progress.delivered += items.len() as u64,
                Err(e) => {
                    self.stats.failed_requests.fetch_add(1, Relaxed);
                    failed.extend(
                        items
                            .into_iter()
                            .map(|item| ItemFailure::new(item, StageError::msg(e.clone()))),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(value).expect("value"),
        );
        h
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_bounded() {
        assert_eq!(retry_after(&headers("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&headers(" 7 ")), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(&headers("86400")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn a_retry_waits_at_least_what_the_server_asked() {
        let ms = Duration::from_millis;
        assert_eq!(wait_before_retry(ms(100), Some(ms(2000))), ms(2000));
        assert_eq!(wait_before_retry(ms(3000), Some(ms(2000))), ms(3000));
        assert_eq!(wait_before_retry(ms(100), None), ms(100));
    }

    #[test]
    fn requests_are_cut_by_items_and_bytes() {
        let mut config = HttpSinkConfig::new("http://127.0.0.1:1/".parse().expect("url"));
        config.max_items = 3;
        config.max_bytes = 10;
        let sink = HttpSink::<u64>::new(config);
        let items: Vec<_> = [1u64, 2, 3, 4, 1_000_000_000_000, 5]
            .into_iter()
            .map(Envelope::new)
            .collect();
        let (mut failed, mut progress) = (Vec::new(), WriteProgress::default());
        let requests = sink.cut(&mut items.into_iter(), &mut failed, &mut progress);
        let sizes: Vec<usize> = requests.iter().map(|r| r.items.len()).collect();
        // Three items close the first request; the long number takes the second past 10 bytes.
        assert_eq!(sizes, vec![3, 2, 1]);
        let mut first = requests.into_iter().next().expect("a request");
        assert_eq!(
            first.finish(false).expect("body"),
            Bytes::from_static(b"1\n2\n3\n")
        );
        assert!(failed.is_empty());
    }
}
