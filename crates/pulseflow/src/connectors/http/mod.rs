//! HTTP in and out (cargo feature `http`).
//!
//! - [`HttpSource`] ([`source`]): takes JSON items by `POST` (ndjson, a JSON array or one
//!   value; [`body`]). When the pipeline is full a request waits up to its accept timeout and
//!   is then answered `503` with `Retry-After`: the pressure reaches the client and nothing
//!   is dropped. It answers once the items are in the pipeline, or once they are handled
//!   ([`AckMode::Delivered`], through the engine's [acknowledgements](crate::ack)).
//! - [`HttpSink`] ([`sink`]): sends items as ndjson or JSON-array bodies (gzip optional),
//!   batched by items and bytes, with retries (backoff with jitter, `Retry-After` honoured)
//!   within a retry budget, and a concurrency limit that adapts to the server's latency and
//!   errors ([`concurrency`]). An item counts as delivered only after a `2xx`.
//! - [`serve`]: the HTTP/1 serving both the source and the command's admin server use.
//!
//! A source and a sink on loopback, end to end:
//!
//! ```
//! use pulseflow::connectors::http::{body, HttpSink, HttpSinkConfig, HttpSource, HttpSourceConfig};
//! use pulseflow::prelude::*;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = HttpSource::bind(
//!     HttpSourceConfig::new("127.0.0.1:0".parse()?),
//!     body::json::<serde_json::Value>(),
//! )
//! .await?;
//! let address = source.local_addr().expect("bound");
//! let stop = source.stopper();
//! let (sink, collected) = pulseflow::stage::sinks::collect::<serde_json::Value>();
//! let mut p = PipelineBuilder::new("relay");
//! p.source("in", source).sink("out", sink);
//! let pipeline = p.build()?;
//! let run = tokio::spawn(async move {
//!     ExecutionEngine::new().run(pipeline, ExecutionOptions::default()).await
//! });
//!
//! // A client POSTs two items with an HttpSink of its own.
//! let mut client = PipelineBuilder::new("client");
//! let events = vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 2})];
//! client
//!     .source("events", sources::iter(events))
//!     .sink("post", HttpSink::new(HttpSinkConfig::new(format!("http://{address}/").parse()?)));
//! let sent = ExecutionEngine::new().run(client.build()?, ExecutionOptions::default()).await;
//! assert_eq!(sent.accounting.delivered, 2);
//!
//! stop.cancel();
//! let result = run.await?;
//! assert_eq!(result.accounting.delivered, 2);
//! assert_eq!(collected.items().len(), 2);
//! # Ok(())
//! # }
//! ```

pub mod body;
pub mod concurrency;
pub mod serve;
pub mod sink;
pub mod source;

pub use sink::{
    BodyFormat as RequestFormat, HttpSink, HttpSinkConfig, HttpSinkStats, RetrySettings,
};
pub use source::{AckMode, HttpSource, HttpSourceConfig, HttpSourceError};

/// A secret (a bearer token) that never shows in `Debug` output, logs or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
