//! The JetStream sink: publishes each item and counts it delivered once the stream has
//! acknowledged it.
//!
//! Up to `max_in_flight` publishes await their acknowledgement at once. A publish that is not
//! acknowledged in `ack_timeout` (the server restarting, say) is sent again after a backoff,
//! up to `retries` times, with the same `Nats-Msg-Id`: the stream keeps it once. An item whose
//! publishes all failed goes to the stage's error policy.
//!
//! `Nats-Msg-Id` is the item's source identity ([`SOURCE_ID_HEADER`]) and a checksum of the
//! payload, so the several outputs of one source message have distinct ids while the same
//! output published again after a restart has the same one. Items without a source identity
//! are published without it (and are not deduplicated).
//!
//! ```no_run
//! use pulseflow::connectors::nats::{Connection, sink};
//!
//! let mut settings = sink::Settings::new(Connection::new("nats://127.0.0.1:4222"));
//! settings.max_in_flight = 512;
//! let sink = sink::JetStreamSink::new(settings);
//! # let _ = sink;
//! ```

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use super::{Connection, NatsError, SOURCE_ID_HEADER, ensure_stream};
use crate::envelope::Envelope;
use crate::error::{ItemFailure, StageError};
use crate::stage::{Sink, StageContext, WriteProgress};

/// How the sink publishes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server.
    pub connection: Connection,
    /// A stream to create when it does not exist: its name and subjects.
    pub create_stream: Option<(String, Vec<String>)>,
    /// Publishes awaiting their acknowledgement, at most.
    pub max_in_flight: usize,
    /// How long to wait for a publish's acknowledgement.
    pub ack_timeout: Duration,
    /// How many times a publish is sent again when it is not acknowledged.
    pub retries: u32,
    /// The wait before the first retry; it doubles with each retry.
    pub backoff: Duration,
}

impl Settings {
    /// Publishing to the streams that exist, 256 in flight, 5 s ack timeout, 5 retries from
    /// 100 ms.
    pub fn new(connection: Connection) -> Self {
        Self {
            connection,
            create_stream: None,
            max_in_flight: 256,
            ack_timeout: Duration::from_secs(5),
            retries: 5,
            backoff: Duration::from_millis(100),
        }
    }
}

/// An item to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Where to.
    pub subject: String,
    /// What.
    pub payload: Bytes,
}

/// The JetStream sink (see the [module docs](self)).
pub struct JetStreamSink {
    settings: Settings,
    js: Option<jetstream::Context>,
}

impl JetStreamSink {
    /// A sink with these settings; it connects when the run starts.
    pub fn new(settings: Settings) -> Self {
        Self { settings, js: None }
    }
}

/// The `Nats-Msg-Id` of a payload derived from source message `source_id`.
pub fn message_id(source_id: &str, payload: &[u8]) -> String {
    format!("{source_id}:{:08x}", crc32c::crc32c(payload))
}

fn headers(item: &Envelope<Publish>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(id) = item.header(SOURCE_ID_HEADER) {
        headers.insert(
            "Nats-Msg-Id",
            message_id(id, &item.payload.payload).as_str(),
        );
    }
    if let Some(trace) = item.trace() {
        headers.insert("traceparent", trace.to_string().as_str());
    }
    headers
}

/// Publishes one item until it is acknowledged or the retries are spent.
async fn publish(
    js: jetstream::Context,
    settings: &Settings,
    item: Envelope<Publish>,
) -> Result<(), ItemFailure<Publish>> {
    let headers = headers(&item);
    let mut delay = settings.backoff;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let message = PublishMessage::build()
            .payload(item.payload.payload.clone())
            .headers(headers.clone());
        let sent = match js.send_publish(item.payload.subject.clone(), message).await {
            Ok(ack) => ack.await.map(drop),
            Err(e) => Err(e),
        };
        let error = match sent {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let retryable = matches!(
            error.kind(),
            PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::StreamNotFound
                | PublishErrorKind::Other
        );
        if !retryable || attempts > settings.retries {
            let error = NatsError::Publish {
                subject: item.payload.subject.clone(),
                attempts,
                reason: error.to_string(),
            };
            return Err(ItemFailure::new(item, StageError::from_error(error)));
        }
        tracing::warn!(subject = %item.payload.subject, error = %error, "JetStream publish, retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

impl Sink for JetStreamSink {
    type Item = Publish;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        let client = self
            .settings
            .connection
            .connect()
            .await
            .map_err(StageError::from_error)?;
        let js = jetstream::ContextBuilder::new()
            .ack_timeout(self.settings.ack_timeout)
            .build(client);
        if let Some((name, subjects)) = &self.settings.create_stream {
            ensure_stream(&js, name, subjects)
                .await
                .map_err(StageError::from_error)?;
        }
        self.js = Some(js);
        Ok(())
    }

    async fn write(&mut self, item: Envelope<Publish>) -> Result<(), ItemFailure<Publish>> {
        let Some(js) = self.js.clone() else {
            return Err(ItemFailure::new(
                item,
                StageError::msg("the sink is not connected"),
            ));
        };
        publish(js, &self.settings, item).await
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Publish>>,
        failed: &mut Vec<ItemFailure<Publish>>,
        progress: &mut WriteProgress,
    ) {
        let Some(js) = self.js.clone() else {
            for item in items {
                failed.push(ItemFailure::new(
                    item,
                    StageError::msg("the sink is not connected"),
                ));
            }
            return;
        };
        let settings = &self.settings;
        let mut in_flight = FuturesOrdered::new();
        let mut settle = |result: Result<(), ItemFailure<Publish>>,
                          progress: &mut WriteProgress| match result {
            Ok(()) => progress.delivered += 1,
            Err(failure) => failed.push(failure),
        };
        for item in items {
            progress.current_seq = item.seq;
            in_flight.push_back(publish(js.clone(), settings, item));
            if in_flight.len() >= settings.max_in_flight.max(1) {
                if let Some(result) = in_flight.next().await {
                    settle(result, progress);
                }
            }
        }
        while let Some(result) = in_flight.next().await {
            settle(result, progress);
        }
    }
}
