//! The `file` source: lines of the files a path or glob names, one file after the other.
//!
//! ```toml
//! [sources.logs]
//! type = "file"
//! path = "logs/*.ndjson"   # relative to the config's folder
//! format = "ndjson"        # default from the extension: .csv csv, .txt/.log lines, else ndjson
//! max_line_bytes = 1048576 # longer lines are dead-lettered
//! project = true           # decode JSON objects to the fields read downstream
//! ```
//!
//! Decoding is CPU-bound and stateless: without a `parallelism` policy, a file source decodes
//! on one worker per core, in order, when the machine has more than one.
//!
//! With a top-level `data_dir`, the source keeps a checkpoint per file (see [`checkpoint`]):
//! a rerun resumes each file after its last line known to be handled.
//!
//! [`checkpoint`]: super::checkpoint

use std::path::PathBuf;
use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::policy::ParallelismHint;
use serde::Deserialize;

use super::checkpoint::Checkpoints;
use super::lines::{Input, LineSource};
use super::{Format, LineSettings};
use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, SourceComponent};
use crate::config::{Problems, ReadContext};

/// The `file` source type.
pub const TYPE: ComponentType<dyn SourceComponent> = ComponentType::new::<Settings>("file");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    path: String,
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    max_line_bytes: Option<usize>,
    #[serde(default)]
    project: Option<bool>,
}

impl Declare for Settings {
    type Component = dyn SourceComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn SourceComponent>> {
        let format = self.format.unwrap_or_else(|| guess_format(&self.path));
        let pattern = cx.path(&self.path).to_string_lossy().into_owned();
        let paths = match glob::glob(&pattern) {
            Ok(paths) => paths.filter_map(Result::ok).collect(),
            Err(e) => {
                problems.add(
                    format!("invalid path pattern: {e}"),
                    Some(cx.span.clone()),
                    "here",
                    None,
                );
                Vec::new()
            }
        };
        Some(Arc::new(FileSource {
            pattern,
            paths,
            lines: LineSettings::new(format, self.max_line_bytes, self.project),
        }))
    }
}

fn guess_format(path: &str) -> Format {
    if path.ends_with(".csv") {
        Format::Csv
    } else if path.ends_with(".txt") || path.ends_with(".log") {
        Format::Lines
    } else {
        Format::Ndjson
    }
}

/// A checked `file` source.
pub struct FileSource {
    /// The path or glob, resolved against the config's folder.
    pattern: String,
    /// The files it matched when the config was read.
    paths: Vec<PathBuf>,
    lines: LineSettings,
}

impl SourceComponent for FileSource {
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val> {
        let mut source = LineSource::new(
            self.paths.iter().cloned().map(Input::Path).collect(),
            Some(self.pattern.clone()),
            self.lines.format,
            self.lines.max_line_bytes,
            cx.progress_bytes(),
        );
        if let Some(data_dir) = cx.config().data_dir.clone() {
            let interval = cx.config().checkpoint_interval;
            let loaded = Checkpoints::check_dir(&data_dir)
                .and_then(|()| Checkpoints::load(&data_dir, cx.name(), &self.paths));
            match loaded {
                Ok(checkpoints) => {
                    let checkpoints = Arc::new(checkpoints);
                    cx.keep_checkpoints(checkpoints.clone());
                    source = source.with_checkpoints(checkpoints, interval);
                }
                Err(e) => cx.problem(
                    e.to_string(),
                    Some("`data_dir` holds the checkpoints of file sources".into()),
                ),
            }
        }
        let workers = cx.hint.or_else(default_decode_parallelism);
        self.lines.build(cx, source, workers)
    }

    fn line_settings(&self) -> Option<LineSettings> {
        Some(self.lines)
    }

    fn projectable(&self) -> bool {
        self.lines.projectable()
    }

    fn input_bytes(&self) -> u64 {
        self.paths
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// One decoding worker per core, when the machine has more than one.
fn default_decode_parallelism() -> Option<ParallelismHint> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores > 1).then_some(ParallelismHint::Fixed(cores))
}
