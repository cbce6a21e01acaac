//! The `stdin` source: lines of standard input.
//!
//! ```toml
//! [sources.events]
//! type = "stdin"
//! format = "ndjson"        # or "csv", "lines"; default "ndjson"
//! max_line_bytes = 1048576 # longer lines are dead-lettered
//! project = true           # decode JSON objects to the fields read downstream
//! ```

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use jaq_json::Val;
use pulseflow::Stream;
use serde::Deserialize;

use super::lines::{Input, LineSource};
use super::{Format, LineSettings};
use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, SourceComponent};
use crate::config::{Problems, ReadContext};

/// The `stdin` source type.
pub const TYPE: ComponentType<dyn SourceComponent> = ComponentType::new::<Settings>("stdin");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    max_line_bytes: Option<usize>,
    #[serde(default)]
    project: Option<bool>,
}

impl Declare for Settings {
    type Component = dyn SourceComponent;

    fn check(self, _cx: &ReadContext<'_>, _: &mut Problems) -> Option<Arc<dyn SourceComponent>> {
        Some(Arc::new(Stdin(LineSettings::new(
            self.format.unwrap_or(Format::Ndjson),
            self.max_line_bytes,
            self.project,
        ))))
    }
}

/// A checked `stdin` source.
pub struct Stdin(LineSettings);

impl SourceComponent for Stdin {
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val> {
        let source = LineSource::new(
            vec![Input::Stdin],
            None,
            self.0.format,
            self.0.max_line_bytes,
            Arc::new(AtomicU64::new(0)),
        );
        let workers = cx.hint;
        self.0.build(cx, source, workers)
    }

    fn line_settings(&self) -> Option<LineSettings> {
        Some(self.0)
    }

    fn projectable(&self) -> bool {
        self.0.projectable()
    }
}
