//! Serving an `axum` router with hyper's HTTP/1 server, connection by connection, within
//! limits on the request head and the connection's time, and stopping gracefully: the
//! listener closes, requests under way get their answers, idle connections are closed.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use pulseflow::connectors::http::serve::{serve, Limits};
//! use pulseflow::CancellationToken;
//!
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let stop = CancellationToken::new();
//! let server = serve(listener, Router::new().route("/", get(|| async { "hi" })), Limits::default(), stop.clone());
//! stop.cancel();
//! let _ = server.await; // every connection has finished
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Limits of a served connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send a request's head (also how long a kept-alive connection may
    /// sit idle between requests).
    pub header_read: Duration,
    /// Largest request head in bytes (a larger one is answered 431).
    pub max_head: usize,
    /// Whether a connection may carry more than one request.
    pub keep_alive: bool,
    /// Longest life of a connection, if any.
    pub connection: Option<Duration>,
}

impl Default for Limits {
    /// 10 s for a head of at most 16 KiB, keep-alive, no limit on a connection's life.
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            max_head: 16 * 1024,
            keep_alive: true,
            connection: None,
        }
    }
}

/// Serves each connection of `listener` in a task of its own until `stop` is cancelled; the
/// returned task then ends once the connections under way have finished.
pub fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(accept(listener, app, limits, stop))
}

async fn accept(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_header_size(limits.max_head)
        .keep_alive(limits.keep_alive);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors, or a connection reset before it was accepted: the
                // next one may do.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = graceful.watch(
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())),
        );
        let limit = limits.connection;
        tokio::spawn(async move {
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
    drop(listener);
    graceful.shutdown().await;
}
