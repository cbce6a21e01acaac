//! The `generate` source: indexes 0, 1, 2, ... (up to `count`, at most `rate` per second),
//! counted in stage `x` and turned into items in `x.build` by a jq expression of the index (or
//! the index itself).
//!
//! ```toml
//! [sources.orders]
//! type = "generate"
//! count = 1000                            # without end when left out
//! rate = 100.0                            # items per second at most
//! jq = '{id: ., user: (. % 10)}'          # the item made from index `.`
//! ```

use std::sync::Arc;
use std::time::Duration;

use jaq_json::{Num, Val};
use pulseflow::prelude::*;
use serde::Deserialize;
use tokio::time::Instant;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, SourceComponent};
use crate::config::{Jq, Problems, ReadContext};
use crate::jq::JqProgram;

/// The `generate` source type.
pub const TYPE: ComponentType<dyn SourceComponent> = ComponentType::new::<Settings>("generate");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    rate: Option<f64>,
    #[serde(default)]
    jq: Option<Spanned<String>>,
}

impl Declare for Settings {
    type Component = dyn SourceComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn SourceComponent>> {
        if let Some(r) = self.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
            problems.add(
                format!("rate must be a positive number of items per second, not {r}"),
                Some(cx.span.clone()),
                "here",
                None,
            );
        }
        let jq = match &self.jq {
            Some(code) => Some(cx.jq(code, &cx.table, problems)?),
            None => None,
        };
        Some(Arc::new(GenerateSource {
            count: self.count,
            rate: self.rate,
            jq,
        }))
    }
}

/// A checked `generate` source.
pub struct GenerateSource {
    count: Option<u64>,
    rate: Option<f64>,
    jq: Option<Jq>,
}

impl SourceComponent for GenerateSource {
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val> {
        let program = self.jq.as_ref().map(|j| j.program.clone());
        let s = cx
            .builder
            .source(cx.name().to_owned(), Generate::new(self.count, self.rate))
            .transform_with(cx.stage("build"), move || Build {
                program: program.clone(),
            });
        let hint = cx.hint;
        cx.with_policies(s, hint)
    }

    fn sized_items(&self) -> bool {
        false
    }
}

/// Produces item indexes.
pub struct Generate {
    next: u64,
    count: Option<u64>,
    rate: Option<f64>,
    started: Option<Instant>,
}

impl Generate {
    /// Indexes up to `count` (without end when `None`), `rate` per second at most.
    pub fn new(count: Option<u64>, rate: Option<f64>) -> Self {
        Self {
            next: 0,
            count,
            rate,
            started: None,
        }
    }
}

impl Source for Generate {
    type Item = u64;

    async fn produce(&mut self, out: &mut SourceOutput<u64>) -> Result<SourceStatus, StageError> {
        let end = self.count.unwrap_or(u64::MAX);
        let mut room = out.remaining() as u64;
        if let Some(rate) = self.rate {
            let started = *self.started.get_or_insert_with(Instant::now);
            loop {
                let allowed = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                let due = allowed.saturating_sub(self.next);
                if due > 0 {
                    room = room.min(due);
                    break;
                }
                let at = started + Duration::from_secs_f64(self.next as f64 / rate);
                tokio::time::sleep_until(at).await;
            }
        }
        let upto = end.min(self.next.saturating_add(room));
        let mut range = self.next..upto;
        out.extend_from(&mut range);
        self.next = upto;
        Ok(if self.next >= end {
            SourceStatus::Done
        } else {
            SourceStatus::More
        })
    }
}

/// Builds generated items from their index with a jq expression (or the index itself).
#[derive(Clone)]
pub struct Build {
    /// The expression; `None` emits the index.
    pub program: Option<Arc<JqProgram>>,
}

impl Transform for Build {
    type In = u64;
    type Out = Val;

    fn process(
        &mut self,
        item: Envelope<u64>,
        out: &mut Vec<Envelope<Val>>,
    ) -> Result<(), ItemFailure<u64>> {
        let index = Val::Num(Num::from_integral(item.payload));
        let Some(program) = &self.program else {
            out.push(item.derive(index));
            return Ok(());
        };
        match program.run(&index, |v| out.push(item.derive(v))) {
            Ok(()) => Ok(()),
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
