//! `--admin ADDR`: a small HTTP server on loopback (unless ADDR says otherwise) serving
//! `/metrics` (Prometheus text from the `metrics` facade), `/stages` (JSON from
//! `ExecutionEngine::inspect_all`) and `/health`; and `pulseflow top`, its reader.
//!
//! The server answers one GET per connection and closes it; requests are capped at 8 KiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pulseflow::ExecutionEngine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::latency::{Latencies, Recorder};

/// Largest request read.
const MAX_REQUEST: usize = 8 << 10;

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

/// Binds `addr` and serves until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    engine: ExecutionEngine,
    metrics: PrometheusHandle,
    latencies: Arc<Latencies>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let engine = engine.clone();
            let metrics = metrics.clone();
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &engine, &metrics, &latencies).await;
            });
        }
    });
    Ok((local, task))
}

async fn answer(
    mut stream: TcpStream,
    engine: &ExecutionEngine,
    metrics: &PrometheusHandle,
    latencies: &Latencies,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::other("timeout"))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path) {
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/stages") => {
            let stages: Vec<serde_json::Value> = engine
                .inspect_all()
                .iter()
                .map(|s| crate::report::stage_json(s, latencies))
                .collect();
            (
                "200 OK",
                "application/json",
                serde_json::Value::Array(stages).to_string(),
            )
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// GETs `path` from `addr` and returns the body.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or("").to_owned(),
        ));
    }
    Ok(body.to_owned())
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
    if once {
        return top_once(addr).await;
    }
    let mut seen = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return 0,
        }
        match get(addr, "/stages").await {
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
async fn top_once(addr: SocketAddr) -> u8 {
    let mut stages: Vec<serde_json::Value> = Vec::new();
    for _ in 0..50 {
        match get(addr, "/stages").await {
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
