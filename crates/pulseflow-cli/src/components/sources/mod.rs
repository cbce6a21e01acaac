//! Sources: `file` and `stdin` read lines (JSON, CSV or plain text) and decode them in a stage
//! of their own; `generate` makes items from a counter; `nats` reads a JetStream stream.

pub mod checkpoint;
pub mod csv;
pub mod decode;
pub mod file;
pub mod generate;
pub mod http;
pub mod lines;
pub mod nats;
pub mod reader;
pub mod stdin;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::policy::ParallelismHint;
use serde::Deserialize;

use self::decode::Decode;
use self::lines::RawLine;
use crate::build::BuildContext;
use pulseflow::stage::Source;

/// How lines of input become items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON value per line.
    Ndjson,
    /// Comma-separated values; the first line of each file names the fields.
    Csv,
    /// Each line as a JSON string.
    Lines,
}

/// Default longest line accepted (longer lines are dead-lettered).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// How a line source reads and decodes, shared by `file` and `stdin`.
#[derive(Debug, Clone, Copy)]
pub struct LineSettings {
    /// The format of its lines.
    pub format: Format,
    /// Longest line accepted.
    pub max_line_bytes: usize,
    /// Whether JSON lines may be decoded to only the fields downstream stages read.
    pub project: bool,
}

impl LineSettings {
    /// The settings as written, with defaults for what is not.
    pub fn new(format: Format, max_line_bytes: Option<usize>, project: Option<bool>) -> Self {
        Self {
            format,
            max_line_bytes: max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES),
            project: project.unwrap_or(true),
        }
    }

    /// Whether items may be decoded to the fields read downstream.
    pub fn projectable(&self) -> bool {
        self.format == Format::Ndjson && self.project
    }

    /// Adds the reading stage (`x`) and its decoding stage (`x.decode`, on `workers`, where the
    /// component's policies apply).
    pub fn build<S: Source<Item = RawLine>>(
        &self,
        cx: &mut BuildContext<'_>,
        source: S,
        workers: Option<ParallelismHint>,
    ) -> Stream<Val> {
        let format = self.format;
        let fields = cx.projected_fields();
        let s = cx
            .builder
            .source(cx.name().to_owned(), source)
            .transform_with(cx.stage("decode"), move || Decode {
                format,
                fields: fields.clone(),
            });
        cx.chain(workers);
        cx.with_policies(s, workers)
    }
}
