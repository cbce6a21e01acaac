//! The `file` sink: items as JSON lines in a file, truncated when the run starts unless
//! `append = true` (what a pipeline that restarts from a checkpoint uses). Missing folders are
//! created. An item is delivered once its line is written to the OS; with `fsync = true`, once
//! it is on the disk (each batch's write is followed by an `fsync`, which costs throughput).
//!
//! ```toml
//! [sinks.archive]
//! type = "file"
//! inputs = ["events"]
//! path = "out/events.ndjson" # relative to the config's folder
//! append = false
//! fsync = false
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::builder::SinkHandle;
use serde::Deserialize;

use super::ndjson::{NdjsonSink, encoded};
use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, SinkComponent};
use crate::config::{Problems, ReadContext};

/// The `file` sink type.
pub const TYPE: ComponentType<dyn SinkComponent> = ComponentType::new::<Settings>("file");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    path: String,
    #[serde(default)]
    append: bool,
    #[serde(default)]
    fsync: bool,
}

impl Declare for Settings {
    type Component = dyn SinkComponent;

    fn check(self, cx: &ReadContext<'_>, _: &mut Problems) -> Option<Arc<dyn SinkComponent>> {
        Some(Arc::new(FileSink {
            path: cx.path(&self.path),
            append: self.append,
            fsync: self.fsync,
        }))
    }
}

/// A checked `file` sink.
pub struct FileSink {
    path: PathBuf,
    append: bool,
    fsync: bool,
}

impl SinkComponent for FileSink {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle {
        encoded(
            cx,
            input,
            NdjsonSink::file(self.path.clone(), self.append, self.fsync),
        )
    }
}
