//! The `blackhole` sink: counts items and drops them (for measuring, or to consume an output
//! that is not needed).
//!
//! ```toml
//! [sinks.nowhere]
//! type = "blackhole"
//! inputs = ["events"]
//! ```

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::builder::SinkHandle;
use pulseflow::prelude::*;
use pulseflow::stage::WriteProgress;
use serde::Deserialize;

use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, SinkComponent};
use crate::config::{Problems, ReadContext};

/// The `blackhole` sink type.
pub const TYPE: ComponentType<dyn SinkComponent> = ComponentType::new::<Settings>("blackhole");

/// Its settings table (no keys of its own).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

impl Declare for Settings {
    type Component = dyn SinkComponent;

    fn check(self, _: &ReadContext<'_>, _: &mut Problems) -> Option<Arc<dyn SinkComponent>> {
        Some(Arc::new(BlackholeSink))
    }
}

/// A checked `blackhole`.
pub struct BlackholeSink;

impl SinkComponent for BlackholeSink {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle {
        input.sink(cx.name().to_owned(), Blackhole)
    }
}

/// Counts items and drops them.
pub struct Blackhole;

impl Sink for Blackhole {
    type Item = Val;

    async fn write(&mut self, _item: Envelope<Val>) -> Result<(), ItemFailure<Val>> {
        Ok(())
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<Val>>,
        _failed: &mut Vec<ItemFailure<Val>>,
        progress: &mut WriteProgress,
    ) {
        for item in items {
            progress.current_seq = item.seq;
            progress.delivered += 1;
        }
    }
}
