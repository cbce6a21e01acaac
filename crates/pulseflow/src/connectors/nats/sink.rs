//! The JetStream sink: publishes each item, with up to `max_in_flight` publishes awaiting
//! their acknowledgement at once. A publish not acknowledged in `ack_timeout` (the server
//! restarting, say) is sent again after a backoff, up to `retries` times, with the same
//! `Nats-Msg-Id`: the stream keeps it once.
//!
//! An item counts as delivered once the stream acknowledged it, and only then do its
//! acknowledgements learn so (a JetStream source acknowledges its message only once its output
//! is stored). The sink does not wait for that before taking the next batch: it
//! [defers](crate::stage::Confirmations) each item it sent and confirms it in the background,
//! so the publishes of one batch overlap those of the next, up to `max_in_flight`. A publish
//! that fails after every retry goes to the stage's error policy (a dead letter, by default).
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

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Connection, NatsError, SOURCE_ID_HEADER, ensure_stream};
use crate::envelope::Envelope;
use crate::error::{ItemFailure, StageError};
use crate::stage::{Confirmations, Sink, StageContext, Unconfirmed, WriteProgress};

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
    background: Option<Background>,
    confirmations: Option<Confirmations<Publish>>,
}

impl JetStreamSink {
    /// A sink with these settings; it connects when the run starts.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            js: None,
            background: None,
            confirmations: None,
        }
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

/// A message on its way: what to send again if its acknowledgement does not come.
struct Outgoing {
    subject: String,
    payload: Bytes,
    headers: HeaderMap,
}

impl Outgoing {
    fn of(item: &Envelope<Publish>) -> Self {
        Self {
            subject: item.payload.subject.clone(),
            payload: item.payload.payload.clone(),
            headers: headers(item),
        }
    }

    async fn send(&self, js: &jetstream::Context) -> Result<PublishAckFuture, PublishError> {
        let message = PublishMessage::build()
            .payload(self.payload.clone())
            .headers(self.headers.clone());
        js.send_publish(self.subject.clone(), message).await
    }

    /// Awaits the acknowledgement of `first` (an attempt already sent, if any), sending the
    /// message again with backoff while it does not come, up to `settings.retries` times.
    async fn confirm(
        &self,
        js: &jetstream::Context,
        settings: &Settings,
        mut first: Option<PublishAckFuture>,
    ) -> Result<(), NatsError> {
        let mut delay = settings.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let sent = match first.take() {
                Some(ack) => ack.await,
                None => match self.send(js).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                },
            };
            let error = match sent {
                Ok(_) => return Ok(()),
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
                return Err(NatsError::Publish {
                    subject: self.subject.clone(),
                    attempts,
                    reason: error.to_string(),
                });
            }
            tracing::warn!(subject = %self.subject, error = %error, "JetStream publish, retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// A publish sent, confirmed in the background: its item is delivered once the stream
/// acknowledged it, and goes to the error policy if it never does.
struct Confirming {
    outgoing: Outgoing,
    first: Option<PublishAckFuture>,
    unconfirmed: Unconfirmed<Publish>,
    _permit: OwnedSemaphorePermit,
}

/// Confirms the publishes handed to it, all at once, until the sink is closed.
async fn confirm_in_background(
    js: jetstream::Context,
    settings: Arc<Settings>,
    mut publishes: mpsc::UnboundedReceiver<Confirming>,
) {
    let mut pending = FuturesUnordered::new();
    let confirm = |c: Confirming| {
        let (js, settings) = (js.clone(), settings.clone());
        async move {
            match c.outgoing.confirm(&js, &settings, c.first).await {
                Ok(()) => c.unconfirmed.delivered(),
                Err(e) => c.unconfirmed.failed(StageError::from_error(e)),
            }
        }
    };
    loop {
        tokio::select! {
            next = publishes.recv() => match next {
                Some(c) => pending.push(confirm(c)),
                None => break,
            },
            Some(()) = pending.next(), if !pending.is_empty() => {}
        }
    }
    while pending.next().await.is_some() {}
}

/// The background confirmation of a connected sink.
struct Background {
    publishes: mpsc::UnboundedSender<Confirming>,
    permits: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(confirm_in_background(
            js.clone(),
            Arc::new(self.settings.clone()),
            rx,
        ));
        self.background = Some(Background {
            publishes: tx,
            permits: Arc::new(Semaphore::new(self.settings.max_in_flight.max(1))),
            task,
        });
        self.js = Some(js);
        Ok(())
    }

    async fn write(&mut self, item: Envelope<Publish>) -> Result<(), ItemFailure<Publish>> {
        let Some(js) = self.js.clone() else {
            return Err(not_connected(item));
        };
        let outgoing = Outgoing::of(&item);
        match outgoing.confirm(&js, &self.settings, None).await {
            Ok(()) => Ok(()),
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn confirm_later(&mut self, confirmations: Confirmations<Publish>) {
        self.confirmations = Some(confirmations);
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Publish>>,
        failed: &mut Vec<ItemFailure<Publish>>,
        progress: &mut WriteProgress,
    ) {
        let Some(js) = self.js.clone() else {
            failed.extend(items.map(not_connected));
            return;
        };
        let (Some(background), Some(confirmations)) = (&self.background, &self.confirmations)
        else {
            // Outside an engine (no confirmations offered): each publish confirmed in turn.
            for item in items {
                progress.current_seq = item.seq;
                match self.write(item).await {
                    Ok(()) => progress.delivered += 1,
                    Err(failure) => failed.push(failure),
                }
            }
            return;
        };
        for item in items {
            progress.current_seq = item.seq;
            let Ok(permit) = background.permits.clone().acquire_owned().await else {
                failed.push(not_connected(item));
                continue;
            };
            let outgoing = Outgoing::of(&item);
            // A send that fails (the connection down, say) is sent again in the background.
            let first = outgoing.send(&js).await.ok();
            let confirming = Confirming {
                outgoing,
                first,
                unconfirmed: confirmations.defer(item, progress),
                _permit: permit,
            };
            if let Err(mpsc::error::SendError(c)) = background.publishes.send(confirming) {
                c.unconfirmed
                    .failed(StageError::msg("the JetStream sink is closed"));
            }
        }
    }

    async fn close(&mut self) -> Result<(), StageError> {
        // Every publish confirmed (or its source messages told it failed) before the run ends.
        if let Some(background) = self.background.take() {
            drop(background.publishes);
            let _ = background.task.await;
        }
        Ok(())
    }
}

fn not_connected(item: Envelope<Publish>) -> ItemFailure<Publish> {
    ItemFailure::new(item, StageError::msg("the JetStream sink is not connected"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::TraceContext;

    #[test]
    fn the_source_identity_and_trace_context_become_headers() {
        let publish = |payload: &'static str| Publish {
            subject: "out".into(),
            payload: Bytes::from_static(payload.as_bytes()),
        };
        let mut item = Envelope::new(publish("{\"a\":1}"));
        assert!(
            headers(&item).is_empty(),
            "no identity, no trace: no headers"
        );
        item.set_header(SOURCE_ID_HEADER, "IN.42");
        item.set_trace(TraceContext::new([7; 16], [9; 8], 1));
        let h = headers(&item);
        let id = h.get("Nats-Msg-Id").map(|v| v.as_str().to_owned());
        assert_eq!(id, Some(message_id("IN.42", b"{\"a\":1}")));
        assert!(id.is_some_and(|id| id.starts_with("IN.42:")));
        assert_eq!(
            h.get("traceparent").map(|v| v.as_str().to_owned()),
            Some(format!("00-{}-{}-01", "07".repeat(16), "09".repeat(8)))
        );
        // Another output of the same source message has another id; the same output, the same.
        let other = item.derive(publish("{\"a\":2}"));
        assert_ne!(headers(&other).get("Nats-Msg-Id"), h.get("Nats-Msg-Id"));
        assert_eq!(
            headers(&item.clone()).get("Nats-Msg-Id"),
            h.get("Nats-Msg-Id")
        );
    }
}
