//! The JetStream source: a durable pull consumer (one per partition for a partitioned
//! stream), read as fast as the pipeline takes items, each message acknowledged through the
//! engine's acks (see [`crate::ack`]).
//!
//! The consumer's `max_ack_pending` is the credit: the server delivers no more messages than
//! that which are not acknowledged yet, so a slow pipeline, or an accumulator holding items,
//! stops the reading. Pulls are issued as the pipeline consumes what was delivered.
//!
//! ```no_run
//! use std::time::Duration;
//! use pulseflow::connectors::nats::{Connection, partition::Instance, source};
//!
//! let mut settings = source::Settings::new(Connection::new("nats://127.0.0.1:4222"), "BY_USER", "totals");
//! // Partitions `by_user.0` .. `by_user.11`; this process is the second of three.
//! settings.subject = Some("by_user".into());
//! settings.partitions = Some(12);
//! settings.instance = Instance::new(1, 3).expect("valid");
//! settings.ack_wait = Duration::from_secs(10);
//! let source = source::JetStreamSource::new(settings);
//! let flushed = source.acks_flushed(); // await after the run: every ack sent
//! # let _ = (source, flushed);
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::SelectAll;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::partition::{Instance, partition_subject};
use super::{Connection, NatsError, SOURCE_ID_HEADER, ensure_stream};
use crate::ack::{Ack, AckOutcome, AckReport};
use crate::envelope::{Cost, Envelope, TraceContext};
use crate::error::StageError;
use crate::stage::{Source, SourceOutput, SourceStatus, StageContext};

/// What to do with a message whose items were dead-lettered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDeadLetter {
    /// Terminate it: the server never delivers it again.
    #[default]
    Term,
    /// Nak it with the nak delay: it comes back (a dead letter meant "not now").
    Nak,
    /// Acknowledge it: the dead-letter sink has it.
    Ack,
}

/// How the source consumes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server.
    pub connection: Connection,
    /// The stream read.
    pub stream: String,
    /// The durable consumer's name (`<consumer>-<p>` for partition `p`); instances with the
    /// same name share it, each message going to one of them.
    pub consumer: String,
    /// The consumer's filter subject (wildcards allowed), or with `partitions` the base of the
    /// partition subjects. When the stream does not exist it is created with this subject
    /// (`<subject>.*` when partitioned).
    pub subject: Option<String>,
    /// Read partitions `<subject>.<p>` for `p` in `0..partitions` assigned to `instance`.
    pub partitions: Option<u32>,
    /// Which instance this process is (only partitioned consumers depend on it).
    pub instance: Instance,
    /// How long the server waits for an ack before delivering a message again.
    pub ack_wait: Duration,
    /// Messages delivered and not acknowledged yet, at most (per consumer).
    pub max_ack_pending: u32,
    /// How long a nak'd message waits before it is delivered again.
    pub nak_delay: Duration,
    /// What to do with a message whose items were dead-lettered.
    pub on_dead_letter: OnDeadLetter,
}

impl Settings {
    /// Consumer `consumer` of `stream`, the whole stream, ack wait 30 s, 1,000 pending acks,
    /// nak delay 1 s, dead letters terminated.
    pub fn new(
        connection: Connection,
        stream: impl Into<String>,
        consumer: impl Into<String>,
    ) -> Self {
        Self {
            connection,
            stream: stream.into(),
            consumer: consumer.into(),
            subject: None,
            partitions: None,
            instance: Instance::default(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            nak_delay: Duration::from_secs(1),
            on_dead_letter: OnDeadLetter::Term,
        }
    }

    /// The consumers this instance reads: (durable name, filter subject).
    pub fn consumers(&self) -> Vec<(String, String)> {
        let filter = self.subject.clone().unwrap_or_default();
        match self.partitions {
            None => vec![(self.consumer.clone(), filter)],
            Some(n) => self
                .instance
                .partitions(n)
                .into_iter()
                .map(|p| {
                    (
                        format!("{}-{p}", self.consumer),
                        partition_subject(&filter, p),
                    )
                })
                .collect(),
        }
    }

    fn stream_subjects(&self) -> Vec<String> {
        match (&self.subject, self.partitions) {
            (Some(s), Some(_)) => vec![format!("{s}.*")],
            (Some(s), None) => vec![s.clone()],
            (None, _) => Vec::new(),
        }
    }

    /// What the ack of a message whose items ended as `report` says; `stopping`: the source
    /// had stopped reading when they did. Items dropped then were dropped because the run
    /// ended (an accumulator discarding the keys it still held), not by choice: their message
    /// is nak'd, so that the next run, or another instance, gets it again.
    pub fn ack_kind(&self, report: &AckReport, stopping: bool) -> AckKind {
        match report.outcome() {
            AckOutcome::Dropped if stopping => AckKind::Nak(Some(self.nak_delay)),
            AckOutcome::Delivered | AckOutcome::Dropped => AckKind::Ack,
            AckOutcome::DeadLettered => match self.on_dead_letter {
                OnDeadLetter::Term => AckKind::Term,
                OnDeadLetter::Nak => AckKind::Nak(Some(self.nak_delay)),
                OnDeadLetter::Ack => AckKind::Ack,
            },
            AckOutcome::Failed => AckKind::Nak(Some(self.nak_delay)),
        }
    }
}

/// A message read: its subject and payload. Its envelope carries its source identity
/// ([`SOURCE_ID_HEADER`]) and the trace context of its `traceparent` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The subject it was published to.
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
}

type Messages = SelectAll<pull::Stream>;

/// The JetStream source (see the [module docs](self)).
pub struct JetStreamSource {
    settings: Arc<Settings>,
    messages: Messages,
    acks: Option<mpsc::UnboundedSender<Command>>,
    /// Set once the source stopped reading (the run is ending).
    stopping: Arc<AtomicBool>,
    /// Messages in the pipeline whose ack is not resolved yet.
    unacked: Arc<AtomicUsize>,
    /// The most the server delivers unacknowledged: `max_ack_pending` per consumer.
    credit: usize,
    flushed_tx: Option<watch::Sender<bool>>,
    flushed: watch::Receiver<bool>,
}

/// Resolves once every acknowledgement of a run's messages has been sent to the server (or
/// at once if the source never connected). Await it after the run, before the process ends.
#[derive(Clone)]
pub struct AcksFlushed(watch::Receiver<bool>);

impl AcksFlushed {
    /// Waits until the acks are sent.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|done| *done).await;
    }
}

impl JetStreamSource {
    /// A source with these settings; it connects when the run starts.
    pub fn new(settings: Settings) -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            settings: Arc::new(settings),
            messages: SelectAll::new(),
            acks: None,
            stopping: Arc::new(AtomicBool::new(false)),
            unacked: Arc::new(AtomicUsize::new(0)),
            credit: usize::MAX,
            flushed_tx: Some(tx),
            flushed: rx,
        }
    }

    /// What resolves once this source's acks are all sent.
    pub fn acks_flushed(&self) -> AcksFlushed {
        AcksFlushed(self.flushed.clone())
    }

    fn push(&mut self, message: async_nats::jetstream::Message, out: &mut SourceOutput<Received>) {
        let id = message
            .info()
            .map(|i| format!("{}.{}", i.stream, i.stream_sequence))
            .ok();
        let message: async_nats::Message = message.into();
        let bytes = message.payload.len() as u32;
        let mut env = Envelope::new(Received {
            subject: message.subject.to_string(),
            payload: message.payload,
        })
        .with_cost(Cost {
            bytes,
            cpu_hint: 0.0,
        });
        if let Some(id) = id {
            env.set_header(SOURCE_ID_HEADER, id);
        }
        if let Some(trace) = message
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .and_then(|v| TraceContext::from_traceparent(v.as_str()))
        {
            env.set_trace(trace);
        }
        if let (Some(reply), Some(acks)) = (message.reply, &self.acks) {
            let reply = reply.to_string();
            let _ = acks.send(Command::Hold(reply.clone()));
            let tx = acks.clone();
            let settings = self.settings.clone();
            let unacked = self.unacked.clone();
            let stopping = self.stopping.clone();
            unacked.fetch_add(1, Ordering::Relaxed);
            env = env.with_ack(Ack::on_resolved(move |report| {
                unacked.fetch_sub(1, Ordering::Relaxed);
                let kind = settings.ack_kind(&report, stopping.load(Ordering::Acquire));
                let _ = tx.send(Command::Settle(reply, kind));
            }));
        }
        out.push_envelope(env);
    }
}

impl Source for JetStreamSource {
    type Item = Received;

    async fn init(&mut self, _ctx: &StageContext) -> Result<(), StageError> {
        let s = &self.settings;
        let client = s
            .connection
            .connect()
            .await
            .map_err(StageError::from_error)?;
        let js = async_nats::jetstream::new(client.clone());
        let stream = ensure_stream(&js, &s.stream, &s.stream_subjects())
            .await
            .map_err(StageError::from_error)?;
        let mut all = SelectAll::new();
        for (name, filter) in s.consumers() {
            let fail = |e: &dyn std::fmt::Display| {
                StageError::from_error(NatsError::Consumer {
                    stream: s.stream.clone(),
                    consumer: name.clone(),
                    reason: e.to_string(),
                })
            };
            let consumer: PullConsumer = stream
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: filter,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: s.ack_wait,
                        max_ack_pending: i64::from(s.max_ack_pending),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| fail(&e))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch((s.max_ack_pending as usize).clamp(1, 1000))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(|e| fail(&e))?;
            all.push(messages);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let done = self.flushed_tx.take();
        tokio::spawn(send_acks(client, rx, s.ack_wait / 3, done));
        self.acks = Some(tx);
        self.credit = s.consumers().len() * s.max_ack_pending as usize;
        self.messages = all;
        Ok(())
    }

    async fn produce(
        &mut self,
        out: &mut SourceOutput<Received>,
    ) -> Result<SourceStatus, StageError> {
        // Waiting on the stream the source owns is cancel-safe: a message is taken out of it
        // only when it is ready, and pushed at once.
        loop {
            match self.messages.next().await {
                Some(Ok(m)) => {
                    self.push(m, out);
                    break;
                }
                Some(Err(e)) => {
                    // Missed heartbeats and lost connections: the client pulls again by itself.
                    tracing::warn!(stream = %self.settings.stream, error = %e, "JetStream pull");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => {
                    return Err(StageError::from_error(NatsError::Consumer {
                        stream: self.settings.stream.clone(),
                        consumer: self.settings.consumer.clone(),
                        reason: "the server ended the consumer".into(),
                    }));
                }
            }
        }
        // Then as many as arrive until the batch is full or the engine's batch timeout sends
        // it on (a sink publishes a batch at once and its messages are acknowledged together:
        // larger batches mean fewer round trips per message), up to a quarter of the server's
        // credit (so that several batches are on their way at once), and not once the credit
        // is used up: no message comes before some are acknowledged.
        let most = (self.credit / 4).max(1);
        while !out.is_full()
            && out.len() < most
            && self.unacked.load(Ordering::Relaxed) < self.credit
        {
            match self.messages.next().await {
                Some(Ok(m)) => self.push(m, out),
                _ => break,
            }
        }
        Ok(SourceStatus::More)
    }

    async fn close(&mut self) -> Result<(), StageError> {
        self.stopping.store(true, Ordering::Release);
        Ok(())
    }
}

enum Command {
    /// A message entered the pipeline under this reply subject.
    Hold(String),
    /// Its items are handled: ack it this way.
    Settle(String, AckKind),
}

/// Sends the acks, and in-progress acks for messages held longer than `progress_every`, until
/// every ack is resolved and the source is gone; then flushes and says so on `done`.
async fn send_acks(
    client: async_nats::Client,
    mut commands: mpsc::UnboundedReceiver<Command>,
    progress_every: Duration,
    done: Option<watch::Sender<bool>>,
) {
    let progress_every = progress_every.max(Duration::from_millis(100));
    let mut held: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(progress_every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Hold(reply)) => {
                    held.insert(reply, Instant::now());
                }
                Some(Command::Settle(reply, kind)) => {
                    held.remove(&reply);
                    if let Err(e) = client.publish(reply, kind.into()).await {
                        tracing::warn!(error = %e, "JetStream ack not sent");
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for (reply, since) in held.iter_mut() {
                    if now.duration_since(*since) >= progress_every {
                        *since = now;
                        let _ = client.publish(reply.clone(), AckKind::Progress.into()).await;
                    }
                }
            }
        }
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "JetStream acks not flushed");
    }
    if let Some(done) = done {
        let _ = done.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(delivered: u64, dropped: u64, dead_lettered: u64, failed: u64) -> AckReport {
        AckReport {
            delivered,
            dropped,
            dead_lettered,
            failed,
            abandoned: false,
        }
    }

    #[test]
    fn each_outcome_gets_its_ack() {
        let mut s = Settings::new(Connection::new("nats://127.0.0.1:1"), "S", "c");
        let nak = AckKind::Nak(Some(s.nak_delay));
        let kind = |s: &Settings, r, stopping| format!("{:?}", s.ack_kind(&r, stopping));
        assert_eq!(
            kind(&s, report(2, 0, 0, 0), false),
            format!("{:?}", AckKind::Ack)
        );
        assert_eq!(
            kind(&s, report(1, 1, 0, 0), false),
            format!("{:?}", AckKind::Ack)
        );
        // Dropped because the run ended: offered again.
        assert_eq!(kind(&s, report(0, 1, 0, 0), true), format!("{nak:?}"));
        assert_eq!(kind(&s, report(1, 0, 0, 1), false), format!("{nak:?}"));
        assert_eq!(
            kind(&s, report(1, 0, 1, 0), false),
            format!("{:?}", AckKind::Term)
        );
        s.on_dead_letter = OnDeadLetter::Ack;
        assert_eq!(
            kind(&s, report(0, 0, 1, 0), false),
            format!("{:?}", AckKind::Ack)
        );
    }

    #[test]
    fn a_partitioned_source_reads_its_instances_partitions_through_a_consumer_each() {
        let mut s = Settings::new(Connection::new("nats://127.0.0.1:1"), "S", "totals");
        s.subject = Some("by_user".into());
        assert_eq!(s.consumers(), vec![("totals".into(), "by_user".into())]);
        s.partitions = Some(5);
        s.instance = Instance::new(1, 2).expect("valid");
        assert_eq!(
            s.consumers(),
            vec![
                ("totals-1".into(), "by_user.1".into()),
                ("totals-3".into(), "by_user.3".into())
            ]
        );
        assert_eq!(s.stream_subjects(), vec!["by_user.*".to_owned()]);
    }
}
