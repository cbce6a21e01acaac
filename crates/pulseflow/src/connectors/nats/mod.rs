//! NATS JetStream: a source that consumes a stream through a durable pull consumer and
//! acknowledges each message once everything derived from it is handled, and a sink that
//! publishes with acknowledgement.
//!
//! - [`source::JetStreamSource`] acks a message when its items are delivered (or filtered, or
//!   dropped by a policy), naks it with a delay when they failed, and terms it (or naks or acks
//!   it, as configured) when they were dead-lettered. While an item is held (an accumulator
//!   waiting for its key to complete) it sends in-progress acks every third of `ack_wait`, so
//!   the server does not deliver it again.
//! - [`sink::JetStreamSink`] publishes each item with a bounded number of publishes awaiting
//!   their acknowledgement, retries with backoff, and sends the item's source identity as
//!   `Nats-Msg-Id`, so the stream's duplicate window drops what a restarted pipeline publishes
//!   a second time, and its trace context as `traceparent`.
//! - [`partition`]: `<subject>.<hash(key) mod P>` subjects and which of `N` instances consumes
//!   which partition, for keyed pipelines that scale out over several processes.
//!
//! ```no_run
//! use pulseflow::connectors::nats::{Connection, sink, source};
//! use pulseflow::prelude::*;
//!
//! # async fn run() {
//! let server = Connection::new("nats://127.0.0.1:4222");
//! let mut input = source::Settings::new(server.clone(), "ORDERS", "enrich");
//! input.subject = Some("orders.new".into());
//! let mut output = sink::Settings::new(server);
//! output.create_stream = Some(("ENRICHED".into(), vec!["orders.enriched".into()]));
//! let mut p = PipelineBuilder::new("enrich");
//! p.source("orders", source::JetStreamSource::new(input))
//!     .map("upper", |m: source::Received| sink::Publish {
//!         subject: "orders.enriched".into(),
//!         payload: m.payload.to_ascii_uppercase().into(),
//!     })
//!     .sink("enriched", sink::JetStreamSink::new(output));
//! let pipeline = p.build().expect("valid");
//! // Runs until cancelled (`ExecutionOptions::cancellation`) or stopped.
//! let result = ExecutionEngine::new().run(pipeline, ExecutionOptions::default()).await;
//! # let _ = result;
//! # }
//! ```

pub mod partition;
pub mod sink;
pub mod source;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

/// The envelope header holding an item's source identity, `<stream>.<sequence>` of the
/// JetStream message it was read from (kept by items derived from it).
pub const SOURCE_ID_HEADER: &str = "source-id";

/// Where the server is and how to authenticate. Its `Debug` never shows the token, and
/// errors show the URL without its user and password.
#[derive(Clone)]
pub struct Connection {
    /// The server, e.g. `nats://127.0.0.1:4222`; several separated by commas.
    pub url: String,
    /// How to authenticate.
    pub auth: Auth,
    /// How long to keep trying to reach the server when the run starts (afterwards the
    /// client reconnects for as long as it takes).
    pub connect_timeout: Duration,
}

/// How to authenticate.
#[derive(Clone, Default)]
pub enum Auth {
    /// Anonymously, or with the user and password in the URL.
    #[default]
    None,
    /// With a token.
    Token(String),
    /// With a credentials file (a user JWT and its NKey seed).
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::None => "none".to_owned(),
            Auth::Token(_) => "token (hidden)".to_owned(),
            Auth::CredentialsFile(p) => format!("credentials file {}", p.display()),
        };
        f.debug_struct("Connection")
            .field("url", &redact(&self.url))
            .field("auth", &auth)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Why a JetStream connector could not work.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached (or refused us) when the run started.
    #[error("cannot connect to NATS at {url} (tried for {waited:?}): {reason}")]
    Connect {
        /// The URL without credentials.
        url: String,
        /// How long it was tried.
        waited: Duration,
        /// The last attempt's error.
        reason: String,
    },
    /// The credentials file could not be read.
    #[error("cannot read the NATS credentials file {path}: {reason}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A stream could not be found or created.
    #[error("JetStream stream `{stream}`: {reason}")]
    Stream {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
    /// A consumer could not be found, created or read from.
    #[error("JetStream consumer `{consumer}` of stream `{stream}`: {reason}")]
    Consumer {
        /// The stream.
        stream: String,
        /// The durable consumer.
        consumer: String,
        /// Why.
        reason: String,
    },
    /// A publish was not acknowledged after every retry.
    #[error("publish to `{subject}` not acknowledged after {attempts} attempts: {reason}")]
    Publish {
        /// Where to.
        subject: String,
        /// How many times it was sent.
        attempts: u32,
        /// The last attempt's error.
        reason: String,
    },
}

impl Connection {
    /// The server at `url`, without authentication, tried for 30 s at start.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            auth: Auth::None,
            connect_timeout: Duration::from_secs(30),
        }
    }

    /// Connects, trying again with backoff until `connect_timeout` has passed; the client
    /// then reconnects by itself whenever the connection is lost.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let options = self.options().await?;
            match options.connect(self.url.as_str()).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    let waited = started.elapsed();
                    if waited + delay > self.connect_timeout {
                        return Err(NatsError::Connect {
                            url: redact(&self.url),
                            waited,
                            reason: e.to_string(),
                        });
                    }
                    tracing::warn!(url = %redact(&self.url), error = %e, "NATS not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn options(&self) -> Result<async_nats::ConnectOptions, NatsError> {
        let options = match &self.auth {
            Auth::None => async_nats::ConnectOptions::new(),
            Auth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            Auth::CredentialsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| NatsError::Credentials {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
        };
        Ok(options
            .name("pulseflow")
            .max_reconnects(None)
            .connection_timeout(self.connect_timeout.min(Duration::from_secs(5)))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * 2u64.saturating_pow(attempts.min(5) as u32))
            }))
    }
}

/// `url` without the user and password it may hold.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***@{}", &one[..scheme + 3], &one[at + 1..])
            }
            (None, Some(at)) => format!("***@{}", &one[at + 1..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Gets stream `name`, creating it with `subjects` (file storage, the server's default
/// duplicate window) when it does not exist.
pub(crate) async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    subjects: &[String],
) -> Result<async_nats::jetstream::stream::Stream, NatsError> {
    let fail = |e: &dyn fmt::Display| NatsError::Stream {
        stream: name.to_owned(),
        reason: e.to_string(),
    };
    if subjects.is_empty() {
        return js.get_stream(name).await.map_err(|e| fail(&e));
    }
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: subjects.to_vec(),
        ..Default::default()
    })
    .await
    .map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_kept_out_of_urls_and_debug_output() {
        assert_eq!(
            redact("nats://me:secret@host:4222,nats://other:4222"),
            "nats://***@host:4222,nats://other:4222"
        );
        assert_eq!(redact("tok@host"), "***@host");
        let mut c = Connection::new("nats://u:pw@h");
        c.auth = Auth::Token("s3cr3t".into());
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("pw"),
            "{shown}"
        );
    }
}
