//! The `nats` sink: items as JSON messages published to NATS JetStream, each delivered once
//! the stream acknowledged it (see [`pulseflow::connectors::nats::sink`]). Items read by a
//! `nats` source carry its identity: republished after a restart, they have the same
//! `Nats-Msg-Id` and the stream's duplicate window keeps one copy.
//!
//! ```toml
//! [sinks.by_user]
//! type = "nats"
//! inputs = ["orders"]
//! url = "nats://127.0.0.1:4222"
//! subject = "orders.by_user"    # or: subject_jq = '"orders." + .region'
//! partition_by = ".user"        # with partitions: publish to <subject>.<hash(key) mod P>
//! partitions = 12
//! stream = "BY_USER"            # created when missing, with <subject> (<subject>.* partitioned)
//! max_in_flight = 256           # publishes awaiting their acknowledgement, at most
//! ack_timeout = "5s"            # a publish not acknowledged by then is sent again
//! retries = 5                   # how many times, with a doubling backoff
//! ```

use std::sync::Arc;

use bytes::Bytes;
use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::builder::SinkHandle;
use pulseflow::connectors::nats::partition::{partition_of, partition_subject};
use pulseflow::connectors::nats::sink::{JetStreamSink, Publish, Settings as Produce};
use pulseflow::prelude::*;
use serde::Deserialize;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::nats::{at_least_one, nats_settings};
use crate::components::settings::duration;
use crate::components::{ComponentType, Declare, SinkComponent};
use crate::config::{Jq, Problems, ReadContext};
use crate::jq::JqProgram;

/// The `nats` sink type.
pub const TYPE: ComponentType<dyn SinkComponent> = ComponentType::new::<Settings>("nats");

nats_settings! {
    /// Its settings table.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Settings {
        #[serde(default)]
        subject: Option<String>,
        #[serde(default)]
        subject_jq: Option<Spanned<String>>,
        #[serde(default)]
        partition_by: Option<Spanned<String>>,
        #[serde(default)]
        partitions: Option<Spanned<u32>>,
        #[serde(default)]
        stream: Option<String>,
        #[serde(default)]
        max_in_flight: Option<Spanned<u32>>,
        #[serde(default)]
        ack_timeout: Option<Spanned<String>>,
        #[serde(default)]
        retries: Option<u32>,
    }
}

impl Declare for Settings {
    type Component = dyn SinkComponent;

    fn check(
        mut self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn SinkComponent>> {
        let connection = self.connection(cx, problems);
        let mut produce = Produce::new(connection);
        at_least_one(self.partitions.as_ref(), "partitions", problems);
        at_least_one(self.max_in_flight.as_ref(), "max_in_flight", problems);
        let refuse = |problems: &mut Problems, message: &str, help: &str| {
            problems.add(
                format!("{}: {message}", cx.table),
                Some(cx.span.clone()),
                "here",
                Some(help.into()),
            )
        };
        let subject = match (self.subject, &self.subject_jq) {
            (Some(s), None) => Some(Subject::Fixed(s)),
            (None, Some(code)) => Some(Subject::Jq(cx.jq(code, &cx.table, problems)?)),
            _ => {
                refuse(
                    problems,
                    "give exactly one of `subject` and `subject_jq`",
                    "`subject` is fixed, `subject_jq` computes it from each item",
                );
                None
            }
        };
        let partition = match (&self.partition_by, &self.partitions) {
            (Some(code), Some(n)) => Some((cx.jq(code, &cx.table, problems)?, *n.get_ref())),
            (None, None) => None,
            _ => {
                refuse(
                    problems,
                    "`partition_by` and `partitions` go together",
                    "the key `partition_by` picks partition hash(key) mod `partitions`",
                );
                None
            }
        };
        if let Some(stream) = self.stream {
            match &subject {
                Some(Subject::Fixed(s)) => {
                    let subjects = if partition.is_some() {
                        format!("{s}.*")
                    } else {
                        s.clone()
                    };
                    produce.create_stream = Some((stream, vec![subjects]));
                }
                _ => refuse(
                    problems,
                    "`stream` needs a fixed `subject`",
                    "the stream is created with the subject the sink publishes to",
                ),
            }
        }
        if let Some(n) = self.max_in_flight {
            produce.max_in_flight = n.into_inner() as usize;
        }
        if let Some(n) = self.retries {
            produce.retries = n;
        }
        produce.ack_timeout = duration(
            self.ack_timeout.as_ref(),
            "ack_timeout",
            produce.ack_timeout,
            problems,
        );
        Some(Arc::new(NatsSink {
            produce,
            encode: Encode {
                subject: subject?,
                partition: partition.map(|(jq, n)| (jq.program, n)),
            },
        }))
    }
}

/// Where an item is published.
#[derive(Clone)]
enum Subject {
    Fixed(String),
    Jq(Jq),
}

/// A checked `nats` sink.
pub struct NatsSink {
    produce: Produce,
    encode: Encode,
}

impl SinkComponent for NatsSink {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle {
        let encode = self.encode.clone();
        let s = input.transform_with(cx.stage("encode"), move || encode.clone());
        let s = match cx.input_workers {
            Some(h) => s.parallelism(h).ordered(),
            None => s,
        };
        s.sink(
            cx.name().to_owned(),
            JetStreamSink::new(self.produce.clone()),
        )
    }
}

/// Makes an item's message: its subject and JSON text.
#[derive(Clone)]
struct Encode {
    subject: Subject,
    partition: Option<(Arc<JqProgram>, u32)>,
}

impl Encode {
    fn message(&self, item: &Val) -> Result<Publish, String> {
        let mut subject = match &self.subject {
            Subject::Fixed(s) => s.clone(),
            Subject::Jq(jq) => match first(&jq.program, item)? {
                Val::TStr(s) | Val::BStr(s) => String::from_utf8_lossy(&s).into_owned(),
                other => return Err(format!("`subject_jq` gave {other}, not a string")),
            },
        };
        if let Some((key, partitions)) = &self.partition {
            let key = first(key, item)?;
            let mut text = Vec::new();
            crate::json::write_line(&mut text, &key);
            text.pop();
            subject = partition_subject(&subject, partition_of(&text, *partitions));
        }
        let mut payload = Vec::new();
        crate::json::write_line(&mut payload, item);
        payload.pop();
        Ok(Publish {
            subject,
            payload: Bytes::from(payload),
        })
    }
}

/// The first value `program` gives for `item`.
fn first(program: &JqProgram, item: &Val) -> Result<Val, String> {
    let mut found = None;
    program
        .run(item, |v| {
            found.get_or_insert(v);
        })
        .map_err(|e| e.0)?;
    found.ok_or_else(|| "the expression gave no value".to_owned())
}

impl Transform for Encode {
    type In = Val;
    type Out = Publish;

    fn process(
        &mut self,
        item: Envelope<Val>,
        out: &mut Vec<Envelope<Publish>>,
    ) -> Result<(), ItemFailure<Val>> {
        match self.message(&item.payload) {
            Ok(message) => {
                out.push(item.map(|_| message));
                Ok(())
            }
            Err(e) => Err(ItemFailure::new(item, StageError::msg(e))),
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
