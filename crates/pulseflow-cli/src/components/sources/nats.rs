//! The `nats` source: JSON messages of a NATS JetStream stream, read through a durable pull
//! consumer, each acknowledged once every item made from it is handled (see
//! [`pulseflow::connectors::nats::source`]). A message that is not JSON is dead-lettered.
//!
//! ```toml
//! [sources.orders]
//! type = "nats"
//! url = "nats://127.0.0.1:4222"
//! stream = "ORDERS"          # created when missing, with `subject` as its subject
//! consumer = "enrich"        # durable; processes with the same name share the messages
//! subject = "orders.>"       # filter (wildcards allowed)
//! ack_wait = "30s"           # in-progress acks are sent every third of it while held
//! max_ack_pending = 1000     # messages delivered and not acknowledged, at most
//! nak_delay = "1s"           # redelivery delay of messages whose items failed
//! on_dead_letter = "term"    # term | nak | ack: messages whose items were dead-lettered
//! ```
//!
//! With `partitions = P`, it reads the partitioned subjects `<subject>.<p>` that a `nats`
//! sink with `partition_by` writes, through one durable consumer `<consumer>-<p>` per
//! partition; `pulseflow run --instance I/N` reads only the partitions with `p mod N = I`.

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::connectors::nats::source::{
    JetStreamSource, OnDeadLetter, Received, Settings as Consume,
};
use pulseflow::prelude::*;
use serde::Deserialize;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::nats::{at_least_one, nats_settings};
use crate::components::settings::duration;
use crate::components::{ComponentType, Declare, SourceComponent};
use crate::config::{Problems, ReadContext};

/// The `nats` source type.
pub const TYPE: ComponentType<dyn SourceComponent> = ComponentType::new::<Settings>("nats");

/// What to do with a message whose items were dead-lettered.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DeadLetterAck {
    Term,
    Nak,
    Ack,
}

nats_settings! {
    /// Its settings table.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Settings {
        stream: String,
        consumer: String,
        #[serde(default)]
        subject: Option<String>,
        #[serde(default)]
        partitions: Option<Spanned<u32>>,
        #[serde(default)]
        ack_wait: Option<Spanned<String>>,
        #[serde(default)]
        max_ack_pending: Option<Spanned<u32>>,
        #[serde(default)]
        nak_delay: Option<Spanned<String>>,
        #[serde(default)]
        on_dead_letter: Option<DeadLetterAck>,
    }
}

impl Declare for Settings {
    type Component = dyn SourceComponent;

    fn check(
        mut self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn SourceComponent>> {
        let connection = self.connection(cx, problems);
        let mut consume = Consume::new(connection, self.stream, self.consumer);
        at_least_one(self.partitions.as_ref(), "partitions", problems);
        at_least_one(self.max_ack_pending.as_ref(), "max_ack_pending", problems);
        if self.partitions.is_some() && self.subject.is_none() {
            problems.add(
                format!(
                    "{}: `partitions` needs `subject`, the base of the partition subjects",
                    cx.table
                ),
                Some(cx.span.clone()),
                "here",
                Some("partition p is read from `<subject>.<p>`".into()),
            );
        }
        consume.subject = self.subject;
        consume.partitions = self.partitions.map(Spanned::into_inner);
        consume.ack_wait = duration(
            self.ack_wait.as_ref(),
            "ack_wait",
            consume.ack_wait,
            problems,
        );
        consume.nak_delay = duration(
            self.nak_delay.as_ref(),
            "nak_delay",
            consume.nak_delay,
            problems,
        );
        if let Some(n) = self.max_ack_pending {
            consume.max_ack_pending = n.into_inner();
        }
        consume.on_dead_letter = match self.on_dead_letter {
            None | Some(DeadLetterAck::Term) => OnDeadLetter::Term,
            Some(DeadLetterAck::Nak) => OnDeadLetter::Nak,
            Some(DeadLetterAck::Ack) => OnDeadLetter::Ack,
        };
        Some(Arc::new(NatsSource { consume }))
    }
}

/// A checked `nats` source.
pub struct NatsSource {
    consume: Consume,
}

impl SourceComponent for NatsSource {
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val> {
        let mut consume = self.consume.clone();
        consume.instance = cx.config().instance;
        let source = JetStreamSource::new(consume);
        cx.keep_acks_flushed(source.acks_flushed());
        let s = cx
            .builder
            .source(cx.name().to_owned(), source)
            .transform_with(cx.stage("decode"), || DecodeMessage);
        let hint = cx.hint;
        cx.with_policies(s, hint)
    }
}

/// Decodes a message's JSON payload.
#[derive(Clone)]
struct DecodeMessage;

impl Transform for DecodeMessage {
    type In = Received;
    type Out = Val;

    fn process(
        &mut self,
        item: Envelope<Received>,
        out: &mut Vec<Envelope<Val>>,
    ) -> Result<(), ItemFailure<Received>> {
        let decoded = std::str::from_utf8(&item.payload.payload)
            .map_err(|e| e.to_string())
            .and_then(|text| crate::json::parse(text).map_err(|e| e.to_string()));
        match decoded {
            Ok(v) => {
                out.push(item.map(|_| v));
                Ok(())
            }
            Err(e) => {
                let msg = format!("{}: invalid JSON: {e}", item.payload.subject);
                Err(ItemFailure::new(item, StageError::msg(msg)))
            }
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
