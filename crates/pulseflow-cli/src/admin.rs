//! `--admin ADDR`: a small HTTP/1.1 server on loopback (unless ADDR says otherwise) serving
//! `GET /` (the live page of [`crate::page`]), `GET /metrics` (Prometheus text from the
//! `metrics` facade), `GET /stages` (JSON from
//! `ExecutionEngine::inspect_all`), `GET /tap/STAGE` (items leaving a stage, see
//! [`crate::tap`]) and `GET /health`; and `pulseflow top`, its reader.
//!
//! The routes are an `axum` router, served connection by connection by hyper's HTTP/1 server.
//! Another path is 404, another method on these paths 405 (`HEAD` is answered as `GET`).
//! Each connection carries one request and is closed after its answer. A client has 5 s to
//! send its request head, which may be 8 KiB at most (else 431), and 10 s for the whole
//! exchange (a tap's answer excepted: it streams until its reader or the run ends); then the
//! connection is dropped. The endpoints read no body: a body is never
//! buffered, and `DefaultBodyLimit` caps it at 4 KiB for any extractor that would.
//!
//! `top` reads `/stages` with `reqwest` (plain HTTP, no proxy), 5 s at most a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pulseflow::ExecutionEngine;
use tokio::net::TcpListener;

use crate::latency::{Latencies, Recorder};

/// Resolves `9898`, `:9898` (loopback) or `host:port`.
pub async fn parse_addr(text: &str) -> std::io::Result<SocketAddr> {
    let t = text.trim();
    let port_only = t.strip_prefix(':').unwrap_or(t);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    tokio::net::lookup_host(t)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {t}")))
}

/// Installs the process's `metrics` recorder: batch latencies per stage go to `latencies`,
/// and with `prometheus`, every metric also goes to a Prometheus recorder (batch-time buckets
/// from 10 µs to 10 s) whose upkeep runs every few seconds; its handle is returned.
pub fn install_metrics(
    latencies: Arc<Latencies>,
    prometheus: bool,
) -> Result<Option<PrometheusHandle>, String> {
    let (recorder, handle) = if prometheus {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0, 10.0,
            ])
            .map_err(|e| e.to_string())?
            .build_recorder();
        let handle = recorder.handle();
        (Some(recorder), Some(handle))
    } else {
        (None, None)
    };
    metrics::set_global_recorder(Recorder::new(latencies, recorder)).map_err(|e| e.to_string())?;
    if let Some(upkeep) = handle.clone() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
    }
    Ok(handle)
}

/// How long a client has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last, its one request and answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 8 << 10;
/// Largest request body an extractor would buffer; the endpoints read none.
const MAX_BODY: usize = 4 << 10;
/// How long `top` waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the handlers read.
#[derive(Clone)]
struct Admin {
    engine: ExecutionEngine,
    metrics: PrometheusHandle,
    latencies: Arc<Latencies>,
    /// The live page served on `/`.
    page: Arc<String>,
    /// Tap answers being streamed.
    taps: crate::tap::OpenTaps,
}

/// The time limits of a connection.
#[derive(Clone, Copy)]
struct Limits {
    header_read: Duration,
    connection: Duration,
}

/// The limits `serve` applies.
const LIMITS: Limits = Limits {
    header_read: HEADER_READ_TIMEOUT,
    connection: CONNECTION_TIMEOUT,
};

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .route("/stages", get(stages))
        .route("/tap/{stage}", get(tap))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(admin)
}

async fn page(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/html; charset=utf-8")],
        admin.page.as_str().to_owned(),
    )
}

async fn health() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain")], "ok\n")
}

async fn prometheus(State(admin): State<Admin>) -> impl IntoResponse {
    // Inspecting the stages brings their shares of time (`pulseflow_stage_time_ratio`) up
    // to date.
    admin.engine.inspect_all();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
}

async fn stages(State(admin): State<Admin>) -> impl IntoResponse {
    let stages: Vec<serde_json::Value> = admin
        .engine
        .inspect_all()
        .iter()
        .map(|s| crate::report::stage_json(s, &admin.latencies))
        .collect();
    (
        [(CONTENT_TYPE, "application/json")],
        serde_json::Value::Array(stages).to_string(),
    )
}

/// `GET /tap/STAGE?limit=N&every=K`: the items leaving the stage, streamed as JSON lines
/// (see [`crate::tap`]).
async fn tap(
    State(admin): State<Admin>,
    axum::extract::Path(stage): axum::extract::Path<String>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let opened = crate::tap::TapRequest::parse(uri.query())
        .and_then(|request| crate::tap::open(&admin.engine, &admin.taps, &stage, request));
    match opened {
        Ok(lines) => (
            [(CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(lines),
        )
            .into_response(),
        Err(e) => {
            let status = match e {
                crate::tap::TapError::Query(_) => StatusCode::BAD_REQUEST,
                crate::tap::TapError::NoStage(_) => StatusCode::NOT_FOUND,
            };
            (status, [(CONTENT_TYPE, "text/plain")], format!("{e}\n")).into_response()
        }
    }
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [(CONTENT_TYPE, "text/plain")],
        "not found\n",
    )
}

/// Binds `addr` and serves until the returned task is aborted. That closes the listener; a
/// request under way still gets its answer (within the connection's time limit) as long as
/// the runtime runs.
pub async fn serve(
    addr: SocketAddr,
    engine: ExecutionEngine,
    metrics: PrometheusHandle,
    latencies: Arc<Latencies>,
    page: Arc<String>,
    taps: crate::tap::OpenTaps,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(Admin {
        engine,
        metrics,
        latencies,
        page,
        taps,
    });
    Ok((local, tokio::spawn(accept(listener, app, LIMITS))))
}

/// Serves each connection of `listener` in a task of its own.
async fn accept(listener: TcpListener, app: Router, limits: Limits) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_header_size(MAX_HEAD)
        .keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors, or a connection reset before it was accepted: the
            // next one may do.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let http = http.clone();
        tokio::spawn(async move {
            // A tap streams for as long as its reader wants: it alone has no time limit past
            // its request head.
            let limit = if requests_tap(&stream, limits.header_read).await {
                None
            } else {
                Some(limits.connection)
            };
            let connection =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            match limit {
                Some(limit) => {
                    let _ = tokio::time::timeout(limit, connection).await;
                }
                None => {
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Whether the request on `stream` (looked at, not read) starts with `GET /tap/`, waiting
/// at most `wait` for its first bytes.
async fn requests_tap(stream: &tokio::net::TcpStream, wait: Duration) -> bool {
    const PREFIX: &[u8] = b"GET /tap/";
    let look = async {
        let mut buf = [0u8; PREFIX.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n == PREFIX.len() || n == 0 => return buf[..n] == *PREFIX,
                Ok(n) if buf[..n] != PREFIX[..n] => return false,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(wait, look).await.unwrap_or(false)
}

/// The client `top` reads with: no proxy (the admin server is on this machine, or one the
/// user names), and a time limit for each request.
fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
}

/// GETs `path` from `addr` and returns the body. A failure is told by its innermost cause
/// (`Connection refused (os error 111)`, `operation timed out`), or by the status line of
/// an answer other than 200.
async fn fetch(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Result<String, String> {
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .map_err(|e| cause(&e))?;
    if response.status() != StatusCode::OK {
        return Err(format!("{:?} {}", response.version(), response.status()));
    }
    response.text().await.map_err(|e| cause(&e))
}

/// The innermost cause of `e`.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// `pulseflow top`: polls `/stages` every second and redraws the table; with `once`, prints
/// one frame and returns.
pub async fn top(addr: &str, once: bool) -> u8 {
    let addr = match parse_addr(addr).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let client = match client(CLIENT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", cause(&e));
            return 2;
        }
    };
    if once {
        return top_once(&client, addr).await;
    }
    let mut seen = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return 0,
        }
        match fetch(&client, addr, "/stages").await {
            Ok(body) => {
                seen = true;
                let stages: Vec<serde_json::Value> =
                    serde_json::from_str(&body).unwrap_or_default();
                print!(
                    "\x1b[2J\x1b[Hpulseflow top: {addr}\n\n{}",
                    crate::report::table(&stages)
                );
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
            Err(e) if seen => {
                println!("\nthe pipeline at {addr} is gone ({e})");
                return 0;
            }
            Err(e) => {
                eprintln!("error: cannot reach {addr}: {e}");
                return 1;
            }
        }
    }
}

/// One frame of `pulseflow top`, once the pipeline lists its stages (it starts just after
/// its admin server does; after 5 s, whatever it lists).
async fn top_once(client: &reqwest::Client, addr: SocketAddr) -> u8 {
    let mut stages: Vec<serde_json::Value> = Vec::new();
    for _ in 0..50 {
        match fetch(client, addr, "/stages").await {
            Ok(body) => {
                stages = serde_json::from_str(&body).unwrap_or_default();
                if !stages.is_empty() {
                    break;
                }
            }
            Err(e) => {
                eprintln!("error: cannot reach {addr}: {e}");
                return 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    print!("pulseflow top: {addr}\n\n{}", crate::report::table(&stages));
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Short limits, so that the tests of them are quick.
    const TEST_LIMITS: Limits = Limits {
        header_read: Duration::from_millis(300),
        connection: Duration::from_secs(2),
    };

    /// An admin server of an engine with no pipeline, on a free loopback port.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let app = router(Admin {
            engine: ExecutionEngine::new(),
            metrics: PrometheusBuilder::new().build_recorder().handle(),
            latencies: Arc::default(),
            page: Arc::new("<!doctype html>".into()),
            taps: Default::default(),
        });
        tokio::spawn(accept(listener, app, TEST_LIMITS));
        addr
    }

    fn test_client() -> reqwest::Client {
        client(Duration::from_secs(5)).expect("client")
    }

    /// Sends `request` as it is and returns all that comes back until the server closes
    /// the connection, which it must do within 5 s.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn content_type(addr: SocketAddr, path: &str) -> String {
        let response = test_client()
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.headers()[CONTENT_TYPE]
            .to_str()
            .expect("ASCII")
            .to_owned()
    }

    #[tokio::test]
    async fn health_is_ok() {
        let addr = server().await;
        assert_eq!(
            fetch(&test_client(), addr, "/health").await,
            Ok("ok\n".into())
        );
        assert_eq!(content_type(addr, "/health").await, "text/plain");
    }

    #[tokio::test]
    async fn stages_are_a_json_array_and_metrics_prometheus_text() {
        let addr = server().await;
        let body = fetch(&test_client(), addr, "/stages")
            .await
            .expect("stages");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(json.is_array(), "{json}");
        assert_eq!(content_type(addr, "/stages").await, "application/json");
        assert_eq!(
            content_type(addr, "/metrics").await,
            "text/plain; version=0.0.4"
        );
    }

    #[tokio::test]
    async fn an_unknown_path_is_404() {
        let addr = server().await;
        assert_eq!(
            fetch(&test_client(), addr, "/nope").await,
            Err("HTTP/1.1 404 Not Found".into())
        );
    }

    #[tokio::test]
    async fn post_is_405() {
        let addr = server().await;
        let response = test_client()
            .post(format!("http://{addr}/stages"))
            .body("{}")
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn a_head_never_finished_is_cut_off() {
        let addr = server().await;
        let started = std::time::Instant::now();
        let answer = raw(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
        assert!(!answer.contains("200 OK"), "{answer}");
        assert!(started.elapsed() >= TEST_LIMITS.header_read);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let addr = server().await;
        let mut request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        request.resize(request.len() + 2 * MAX_HEAD, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        let answer = raw(addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    }

    #[tokio::test]
    async fn a_body_is_not_waited_for() {
        let addr = server().await;
        // A megabyte announced, three bytes sent: answered, and the connection closed.
        let answer = raw(
            addr,
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    }

    #[tokio::test]
    async fn a_silent_server_times_the_client_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        // Accepts, reads nothing, answers nothing.
        let _held = tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                streams.push(stream);
            }
        });
        let client = client(Duration::from_millis(200)).expect("client");
        let error = fetch(&client, addr, "/stages")
            .await
            .expect_err("no answer");
        assert!(error.contains("timed out"), "{error}");
    }
}
