//! `pulseflow tap ADDR STAGE [--limit N] [--every K]`: the items leaving a stage of a running
//! pipeline, as JSON lines, read from its admin server's `GET /tap/STAGE?limit=N&every=K`.
//!
//! The server attaches a tap to the stage ([`pulseflow::ExecutionEngine::tap`]) for as long as
//! the answer streams. The tap keeps one item of every `every`, writes it as JSON into a queue
//! of [`QUEUE`] lines without waiting, and counts the items that find the queue full as missed:
//! a slow reader never holds the pipeline up. The answer is a stream of JSON lines, each
//! `{"item": ...}` or `{"missed": N}` (the total missed so far, when it grows); it ends after
//! `limit` items, or when the run does (which waits up to 2 s for the answers to send what they
//! hold). A stage without taps costs the pipeline nothing but one
//! atomic load per batch.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use jaq_json::Val;
use pulseflow::ExecutionEngine;
use pulseflow::engine::{Tap, TapBatch, TapHandle};
use tokio::sync::mpsc;

/// Lines a tap may hold for its reader; items beyond are missed.
pub const QUEUE: usize = 256;

/// What a tap request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapRequest {
    /// Items to send before the answer ends (`None`: until the run ends).
    pub limit: Option<u64>,
    /// One item of every this many.
    pub every: u64,
}

/// Why a tap request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    /// A parameter that is not a positive number, or an unknown one.
    #[error("bad query: {0}")]
    Query(String),
    /// No running pipeline has the stage.
    #[error("no stage `{0}` in a running pipeline")]
    NoStage(String),
}

impl TapRequest {
    /// Reads `limit=N&every=K` (both optional).
    pub fn parse(query: Option<&str>) -> Result<Self, TapError> {
        let mut request = TapRequest {
            limit: None,
            every: 1,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| TapError::Query(format!("`{key}` must be a positive number")))?;
            match key {
                "limit" => request.limit = Some(n),
                "every" => request.every = n,
                other => return Err(TapError::Query(format!("unknown parameter `{other}`"))),
            }
        }
        Ok(request)
    }
}

/// The tap's side of the queue: samples and encodes items, never waits.
fn tap(tx: mpsc::Sender<Vec<u8>>, every: u64, missed: Arc<AtomicU64>) -> Tap {
    let offered = AtomicU64::new(0);
    Arc::new(move |batch: &TapBatch<'_>| {
        let Some(items) = batch.items::<Val>() else {
            return;
        };
        for item in items {
            if offered.fetch_add(1, Relaxed) % every != 0 {
                continue;
            }
            match tx.try_reserve() {
                Ok(permit) => {
                    let mut line = b"{\"item\":".to_vec();
                    let _ = serde_json::to_writer(&mut line, &crate::json::Json(&item.payload));
                    line.extend_from_slice(b"}\n");
                    permit.send(line);
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    missed.fetch_add(1, Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
    })
}

/// The tap answers being streamed, so that the end of a run can wait (a little) for them to
/// send what they hold and the last count of missed items.
#[derive(Clone, Default)]
pub struct OpenTaps(Arc<AtomicUsize>);

impl OpenTaps {
    /// Waits until every tap answer has ended, for at most `within`.
    pub async fn ended(&self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            while self.0.load(Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    fn open(&self) -> OpenTap {
        self.0.fetch_add(1, Relaxed);
        OpenTap(self.0.clone())
    }
}

/// Counts one answer among the [`OpenTaps`] while it lives.
struct OpenTap(Arc<AtomicUsize>);

impl Drop for OpenTap {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The reader's side: lines to send, and what it reported missed.
struct Reader {
    rx: mpsc::Receiver<Vec<u8>>,
    missed: Arc<AtomicU64>,
    reported: u64,
    left: Option<u64>,
    /// Detaches the tap when the answer ends.
    _handle: TapHandle,
    _open: OpenTap,
}

impl Reader {
    /// A `{"missed": N}` line when more were missed since the last one.
    fn missed_line(&mut self) -> Option<Bytes> {
        let missed = self.missed.load(Relaxed);
        (missed > self.reported).then(|| {
            self.reported = missed;
            Bytes::from(format!("{{\"missed\":{missed}}}\n"))
        })
    }

    async fn next(&mut self) -> Option<Bytes> {
        if self.left == Some(0) {
            return None;
        }
        if let Some(line) = self.missed_line() {
            return Some(line);
        }
        match self.rx.recv().await {
            Some(line) => {
                self.left = self.left.map(|n| n - 1);
                Some(Bytes::from(line))
            }
            None => self.missed_line(),
        }
    }
}

/// Attaches a tap to `stage` of the pipeline `engine` runs; the lines of the answer.
pub fn open(
    engine: &ExecutionEngine,
    open: &OpenTaps,
    stage: &str,
    request: TapRequest,
) -> Result<impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static, TapError>
{
    let (tx, rx) = mpsc::channel(QUEUE);
    let missed = Arc::new(AtomicU64::new(0));
    let handle = engine
        .tap(stage, tap(tx, request.every, missed.clone()))
        .ok_or_else(|| TapError::NoStage(stage.to_owned()))?;
    let reader = Reader {
        rx,
        missed,
        reported: 0,
        left: request.limit,
        _handle: handle,
        _open: open.open(),
    };
    Ok(futures_util::stream::unfold(reader, |mut r| async move {
        r.next().await.map(|line| (Ok(line), r))
    }))
}

/// `http://ADDR/tap/STAGE?every=K[&limit=N]`, the stage's name percent-encoded as one path
/// segment (a name may hold spaces or slashes).
fn tap_url(addr: std::net::SocketAddr, stage: &str, request: TapRequest) -> Option<reqwest::Url> {
    let mut url = reqwest::Url::parse(&format!("http://{addr}/")).ok()?;
    url.path_segments_mut()
        .ok()?
        .clear()
        .push("tap")
        .push(stage);
    let mut query = format!("every={}", request.every);
    if let Some(n) = request.limit {
        query.push_str(&format!("&limit={n}"));
    }
    url.set_query(Some(&query));
    Some(url)
}

/// `pulseflow tap`: prints the items of the answer to stdout, one JSON value per line, and
/// how many the tap missed to stderr. Exit status 0, or 1 when the server cannot be reached or
/// refuses.
pub async fn run(addr: &str, stage: &str, request: TapRequest) -> u8 {
    let addr = match crate::admin::parse_addr(addr).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let client = match reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let Some(url) = tap_url(addr, stage, request) else {
        eprintln!("error: no tap URL for stage `{stage}` at {addr}");
        return 2;
    };
    let mut response = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot reach {addr}: {e}");
            return 1;
        }
    };
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        eprintln!("error: {status}: {}", body.trim());
        return 1;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut missed = 0;
    let stdout = std::io::stdout();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                eprintln!("error: the tap ended: {e}");
                break;
            }
        };
        pending.extend_from_slice(&chunk);
        let mut out = stdout.lock();
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(item) = value.get("item") {
                let _ = writeln!(out, "{item}");
            } else if let Some(n) = value.get("missed").and_then(serde_json::Value::as_u64) {
                missed = n;
            }
        }
        let _ = out.flush();
    }
    if missed > 0 {
        eprintln!("tap: {missed} items missed (the tap did not keep up with the stage)");
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_name_is_one_percent_encoded_path_segment() {
        let request = TapRequest {
            limit: Some(3),
            every: 2,
        };
        let addr = "127.0.0.1:9000".parse().expect("an address");
        let url = tap_url(addr, "by user/region #1", request).expect("a URL");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9000/tap/by%20user%2Fregion%20%231?every=2&limit=3"
        );
    }

    #[test]
    fn requests_are_read_from_the_query() {
        assert_eq!(
            TapRequest::parse(None),
            Ok(TapRequest {
                limit: None,
                every: 1
            })
        );
        assert_eq!(
            TapRequest::parse(Some("limit=5&every=10")),
            Ok(TapRequest {
                limit: Some(5),
                every: 10
            })
        );
        for bad in ["every=0", "limit=x", "color=red"] {
            assert!(TapRequest::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_counts_missed_items_and_never_waits() {
        let (tx, mut rx) = mpsc::channel(2);
        let missed = Arc::new(AtomicU64::new(0));
        let tap = tap(tx, 2, missed.clone());
        let items: Vec<pulseflow::Envelope<Val>> = (0..10)
            .map(|i| pulseflow::Envelope::new(Val::from(i as isize)))
            .collect();
        // Ten offered, five sampled (0, 2, 4, 6, 8): two fit, three are missed.
        tap(&TapBatch::of_items(&items));
        assert_eq!(missed.load(Relaxed), 3);
        assert_eq!(rx.recv().await, Some(b"{\"item\":0}\n".to_vec()));
        assert_eq!(rx.recv().await, Some(b"{\"item\":2}\n".to_vec()));
    }
}
