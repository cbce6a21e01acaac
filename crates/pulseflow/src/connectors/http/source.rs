//! [`HttpSource`]: JSON items received by `POST`, pushed back on the client when the pipeline
//! is full.
//!
//! A request's body is decoded whole ([`body`](super::body)) and queued for the pipeline as
//! one piece. The answer depends on [`AckMode`]:
//!
//! - `Accepted` (the default): `202 {"accepted": N}` once the source has taken every item of
//!   the request into the pipeline (from then on the engine accounts for them).
//! - `Delivered`: `200 {"delivered": D, "dropped": P, "dead_lettered": L, "failed": 0}` once
//!   every item derived from the request's items is handled (see [`crate::ack`]); `500` with
//!   the same counts when some were lost to a failure, `504` when that takes longer than
//!   `ack_timeout`.
//!
//! When the pipeline is full the request waits up to `accept_timeout`; then it is answered
//! `503` with `Retry-After`, and none of its items entered the pipeline, so a client that
//! retries loses and duplicates nothing. Other refusals: `401` (missing or wrong bearer
//! token, compared in constant time), `413` (body over `max_body_bytes`, also after gzip),
//! `415` (a `Content-Encoding` other than gzip), `400` (invalid UTF-8 or JSON, naming the
//! line), `404`/`405` (another path or method).
//!
//! Stopping: cancelling [`HttpSource::stopper`] closes the listener; requests under way are
//! answered, the queued ones enter the pipeline, then the source is done. When the engine stops
//! the run instead, requests not yet taken are answered `503`. A request's items enter the
//! pipeline together, never in part.
//!
//! ```no_run
//! use pulseflow::connectors::http::{body, HttpSource, HttpSourceConfig};
//! use pulseflow::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = HttpSourceConfig::new("127.0.0.1:8080".parse()?);
//! let source = HttpSource::bind(config, body::json::<serde_json::Value>()).await?;
//! println!("listening on {:?}", source.local_addr());
//! let mut p = PipelineBuilder::new("ingest");
//! p.source("http", source).sink("print", sink_fn(|v: serde_json::Value| println!("{v}")));
//! ExecutionEngine::new().run(p.build()?, ExecutionOptions::default()).await;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Secret;
use super::body::{self, Decoder};
use super::serve::{Limits, serve};
use crate::ack::{Ack, AckOutcome, AckReceipt, AckReport};
use crate::error::StageError;
use crate::stage::{Source, SourceOutput, SourceStatus, StageContext};

/// When a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Once its items are in the pipeline.
    #[default]
    Accepted,
    /// Once every item derived from them is handled, with the counts.
    Delivered,
}

/// Settings of an [`HttpSource`].
#[derive(Debug, Clone)]
pub struct HttpSourceConfig {
    /// Where to listen (port 0: any free port, see [`HttpSource::local_addr`]).
    pub address: SocketAddr,
    /// The path that takes `POST`s.
    pub path: String,
    /// Largest body in bytes, after gzip decompression.
    pub max_body_bytes: usize,
    /// How long a request waits for room in the pipeline before it is answered 503.
    pub accept_timeout: Duration,
    /// The `Retry-After` of a 503 (whole seconds, at least 1).
    pub retry_after: Duration,
    /// Requests decoded and waiting for the pipeline, at most.
    pub queue: usize,
    /// A bearer token clients must send (`Authorization: Bearer ...`).
    pub token: Option<Secret>,
    /// When a request is answered.
    pub ack: AckMode,
    /// With [`AckMode::Delivered`]: how long a request waits for its items to be handled.
    pub ack_timeout: Duration,
    /// Limits of a connection.
    pub limits: Limits,
}

impl HttpSourceConfig {
    /// Listens on `address` at `/`: 10 MiB bodies, 1 s to find room, `Retry-After: 1`, 16
    /// requests queued, no token, answers once accepted.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            path: "/".into(),
            max_body_bytes: 10 * 1024 * 1024,
            accept_timeout: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            queue: 16,
            token: None,
            ack: AckMode::Accepted,
            ack_timeout: Duration::from_secs(60),
            limits: Limits::default(),
        }
    }
}

/// Why an [`HttpSource`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpSourceError {
    /// The address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The path does not start with `/`.
    #[error("the path {0:?} does not start with '/'")]
    Path(String),
}

/// A source of the items POSTed to an HTTP endpoint. See the [module docs](self).
pub struct HttpSource<T> {
    /// What [`Source::init`] binds, for a source made by [`HttpSource::new`].
    unbound: Option<(HttpSourceConfig, Decoder<T>)>,
    rx: Option<mpsc::Receiver<Piece<T>>>,
    /// A piece received but not taken yet: it did not fit in the batch under way.
    held: Option<Piece<T>>,
    local: Option<SocketAddr>,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl<T: Send + 'static> HttpSource<T> {
    /// A source that binds its address when the run starts (a failure to bind stops the run
    /// before any item flows).
    pub fn new(config: HttpSourceConfig, decoder: Decoder<T>) -> Self {
        Self {
            unbound: Some((config, decoder)),
            rx: None,
            held: None,
            local: None,
            stop: CancellationToken::new(),
            server: None,
        }
    }

    /// Binds the address and starts serving now; requests are queued until the run starts.
    pub async fn bind(
        config: HttpSourceConfig,
        decoder: Decoder<T>,
    ) -> Result<Self, HttpSourceError> {
        let mut source = Self::new(config, decoder);
        source.start().await?;
        Ok(source)
    }

    async fn start(&mut self) -> Result<(), HttpSourceError> {
        let Some((config, decoder)) = self.unbound.take() else {
            return Ok(());
        };
        if !config.path.starts_with('/') {
            return Err(HttpSourceError::Path(config.path));
        }
        let bind_error = |source| HttpSourceError::Bind {
            address: config.address,
            source,
        };
        let listener = TcpListener::bind(config.address)
            .await
            .map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let shared = Arc::new(Shared {
            tx,
            decoder,
            max_body_bytes: config.max_body_bytes,
            accept_timeout: config.accept_timeout,
            retry_after: config.retry_after.as_secs().max(1),
            token: config.token,
            ack: config.ack,
            ack_timeout: config.ack_timeout,
        });
        let app = Router::new()
            .route(&config.path, post(ingest::<T>))
            .fallback(not_found)
            .with_state(shared);
        self.server = Some(serve(listener, app, config.limits, self.stop.clone()));
        self.rx = Some(rx);
        self.local = Some(local);
        Ok(())
    }
}

impl<T> HttpSource<T> {
    /// The address it listens on, once bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Cancelling this token stops the source gracefully: no new connections, requests under
    /// way answered, queued ones taken into the pipeline, then the source is done.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Refuses every request still queued (their clients get 503) and stops the server.
    fn refuse_queued(&mut self) {
        self.stop.cancel();
        self.held = None;
        if let Some(rx) = &mut self.rx {
            rx.close();
            while let Ok(piece) = rx.try_recv() {
                drop(piece);
            }
        }
    }
}

impl<T> Drop for HttpSource<T> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl<T: Send + 'static> Source for HttpSource<T> {
    type Item = T;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        self.start().await.map_err(StageError::from_error)
    }

    async fn produce(&mut self, out: &mut SourceOutput<T>) -> Result<SourceStatus, StageError> {
        loop {
            if let Some(piece) = self.held.take() {
                // A request's items enter the pipeline together: in the batch under way if
                // they fit, else at the start of the next (which they may overfill).
                if !out.is_empty() && piece.items.len() > out.remaining() {
                    self.held = Some(piece);
                    return Ok(SourceStatus::More);
                }
                piece.take_into(out);
                if out.is_full() {
                    return Ok(SourceStatus::More);
                }
            }
            let Some(rx) = &mut self.rx else {
                return Ok(SourceStatus::Done);
            };
            // Waiting here is cancel-safe: a piece is either still in the channel or held.
            match rx.recv().await {
                Some(piece) => self.held = Some(piece),
                None => return Ok(SourceStatus::Done),
            }
        }
    }

    async fn close(&mut self) -> Result<(), StageError> {
        self.refuse_queued();
        if let Some(server) = self.server.take() {
            // Connections finish on their own; the run does not wait for slow clients.
            drop(server);
        }
        Ok(())
    }
}

/// Whether a queued piece was taken by the source or withdrawn by its request (which timed
/// out first): exactly one of them wins.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

/// One request's items, queued for the source.
struct Piece<T> {
    items: Vec<T>,
    ack: Option<Ack>,
    claim: Arc<AtomicU8>,
    taken: oneshot::Sender<()>,
}

impl<T> Piece<T> {
    /// Pushes every item into the pipeline and tells the request, unless the request gave up
    /// on the piece first.
    fn take_into(self, out: &mut SourceOutput<T>) {
        let claimed = self
            .claim
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !claimed {
            return;
        }
        match self.ack {
            Some(ack) => {
                for item in self.items {
                    out.push_acked(item, ack.clone());
                }
                // The ack now lives in the items alone.
                drop(ack);
            }
            None => {
                for item in self.items {
                    out.push(item);
                }
            }
        }
        let _ = self.taken.send(());
    }
}

struct Shared<T> {
    tx: mpsc::Sender<Piece<T>>,
    decoder: Decoder<T>,
    max_body_bytes: usize,
    accept_timeout: Duration,
    retry_after: u64,
    token: Option<Secret>,
    ack: AckMode,
    ack_timeout: Duration,
}

async fn ingest<T: Send + 'static>(
    State(shared): State<Arc<Shared<T>>>,
    request: Request,
) -> Response {
    let answer = handle(&shared, request).await;
    metrics::counter!("pulseflow_http_source_responses_total", "status" => answer.status().as_str().to_owned())
        .increment(1);
    answer
}

async fn handle<T: Send + 'static>(shared: &Shared<T>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Some(token) = &shared.token {
        if !authorized(&parts.headers, token) {
            let mut answer = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            answer
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return answer;
        }
    }
    let bytes = match read_body(&parts.headers, body, shared.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(refusal) => return refusal,
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let items = match body::decode(&bytes, content_type, &shared.decoder) {
        Ok(items) => items,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let n = items.len();
    let (ack, receipt) = match shared.ack {
        AckMode::Delivered if n > 0 => {
            let (ack, receipt) = Ack::new();
            (Some(ack), Some(receipt))
        }
        _ => (None, None),
    };
    if n > 0 {
        if let Err(refusal) = enqueue(shared, items, ack).await {
            return refusal;
        }
    }
    match receipt {
        None if shared.ack == AckMode::Delivered => counts(StatusCode::OK, &AckReport::default()),
        None => json(StatusCode::ACCEPTED, format!("{{\"accepted\":{n}}}")),
        Some(receipt) => delivered(receipt, shared.ack_timeout).await,
    }
}

/// Queues the items and waits until the source took them, within the accept timeout.
async fn enqueue<T>(shared: &Shared<T>, items: Vec<T>, ack: Option<Ack>) -> Result<(), Response> {
    let deadline = Instant::now() + shared.accept_timeout;
    let claim = Arc::new(AtomicU8::new(QUEUED));
    let (taken, mut taken_rx) = oneshot::channel();
    let piece = Piece {
        items,
        ack,
        claim: claim.clone(),
        taken,
    };
    match tokio::time::timeout_at(deadline, shared.tx.send(piece)).await {
        Err(_) => return Err(busy(shared.retry_after)),
        Ok(Err(_)) => return Err(stopping(shared.retry_after)),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout_at(deadline, &mut taken_rx).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(stopping(shared.retry_after)),
        Err(_) => {
            if claim
                .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Err(busy(shared.retry_after));
            }
            // The source is pushing it into the pipeline right now: it is accepted.
            taken_rx.await.map_err(|_| stopping(shared.retry_after))
        }
    }
}

async fn delivered(receipt: AckReceipt, timeout: Duration) -> Response {
    match tokio::time::timeout(timeout, receipt).await {
        Ok(report) if report.outcome() == AckOutcome::Failed => {
            counts(StatusCode::INTERNAL_SERVER_ERROR, &report)
        }
        Ok(report) => counts(StatusCode::OK, &report),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "accepted, but not handled in time; the items may still be delivered",
        ),
    }
}

fn counts(status: StatusCode, report: &AckReport) -> Response {
    let failed = report.failed + u64::from(report.abandoned && report.failed == 0);
    json(
        status,
        format!(
            "{{\"delivered\":{},\"dropped\":{},\"dead_lettered\":{},\"failed\":{failed}}}",
            report.delivered, report.dropped, report.dead_lettered
        ),
    )
}

/// Reads the body within the limit, gunzipping it when it says so.
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, Response> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => false,
        Some(Ok(e)) if e.eq_ignore_ascii_case("identity") => false,
        Some(Ok(e)) if e.eq_ignore_ascii_case("gzip") => true,
        Some(_) => {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported Content-Encoding (gzip and identity are accepted)",
            ));
        }
    };
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    let raw = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("the body could not be read: {e}"),
            ));
        }
    };
    if !gzip {
        return Ok(raw);
    }
    let mut text = Vec::new();
    let decoder = flate2::read::GzDecoder::new(&raw[..]);
    match std::io::Read::read_to_end(&mut std::io::Read::take(decoder, max as u64 + 1), &mut text) {
        Ok(_) if text.len() > max => Err(too_large()),
        Ok(_) => Ok(Bytes::from(text)),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("the gzip body could not be decompressed: {e}"),
        )),
    }
}

fn authorized(headers: &HeaderMap, token: &Secret) -> bool {
    let Some(sent) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    bool::from(sent.ct_eq(token.expose().as_bytes()))
}

fn busy(retry_after: u64) -> Response {
    unavailable(retry_after, "the pipeline is full; retry later")
}

fn stopping(retry_after: u64) -> Response {
    unavailable(retry_after, "the pipeline is stopping")
}

fn unavailable(retry_after: u64, message: &str) -> Response {
    let mut answer = error(StatusCode::SERVICE_UNAVAILABLE, message);
    answer
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    answer
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }).to_string())
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}
