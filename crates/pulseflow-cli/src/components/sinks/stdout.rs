//! The `stdout` sink: items as JSON lines on standard output.
//!
//! ```toml
//! [sinks.console]
//! type = "stdout"
//! inputs = ["events"]
//! ```

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::builder::SinkHandle;
use serde::Deserialize;

use super::ndjson::{NdjsonSink, encoded};
use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, SinkComponent};
use crate::config::{Problems, ReadContext};

/// The `stdout` sink type.
pub const TYPE: ComponentType<dyn SinkComponent> = ComponentType::new::<Settings>("stdout");

/// Its settings table (no keys of its own).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

impl Declare for Settings {
    type Component = dyn SinkComponent;

    fn check(self, _: &ReadContext<'_>, _: &mut Problems) -> Option<Arc<dyn SinkComponent>> {
        Some(Arc::new(StdoutSink))
    }
}

/// A checked `stdout` sink.
pub struct StdoutSink;

impl SinkComponent for StdoutSink {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle {
        encoded(cx, input, NdjsonSink::stdout())
    }
}
