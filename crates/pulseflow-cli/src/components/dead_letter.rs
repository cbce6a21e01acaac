//! The `[dead_letter]` sink: one JSON object per dead letter, written by a thread of its own
//! so the engine's tasks never wait on the disk.
//!
//! A malformed input line: `{"kind": "malformed_input", "stage", "file", "line", "error",
//! "raw", "attempts"}`. A failed item: `{"kind": "failed_item", "stage", "error", "attempts",
//! "seq", "item"}`, plus `"projected": true` when the item was decoded to only the fields the
//! pipeline reads (see [`crate::build`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use pulseflow::DeadLetter;
use pulseflow::connectors::nats::sink::Publish;
use pulseflow::connectors::nats::source::Received;
use serde::Deserialize;
use serde_json::{Value, json};
use toml::Spanned;
use toml::de::DeValue;

use super::sinks::ndjson::Line;
use super::sources::lines::RawLine;
use crate::config::Problems;

/// Where dead letters go.
#[derive(Debug, Clone)]
pub enum DeadLetterTarget {
    /// A file (truncated unless `append`).
    File { path: PathBuf, append: bool },
    /// Standard error.
    Stderr,
}

/// The `[dead_letter]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    r#type: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    append: Option<bool>,
}

/// Reads the `[dead_letter]` table; relative paths are resolved against `dir`.
pub fn read_target(
    value: &Spanned<DeValue<'_>>,
    dir: &Path,
    problems: &mut Problems,
) -> Option<DeadLetterTarget> {
    let d = match crate::config::de::<Settings>(value.clone()) {
        Ok(d) => d,
        Err(e) => {
            problems.add_toml(&e, value.span(), "dead_letter");
            return None;
        }
    };
    match (d.r#type.as_str(), d.path) {
        ("file", Some(p)) => {
            return Some(DeadLetterTarget::File {
                path: dir.join(p),
                append: d.append.unwrap_or(false),
            });
        }
        ("file", None) => problems.add(
            "a `file` dead-letter sink needs a `path`",
            Some(value.span()),
            "no path",
            None,
        ),
        ("stderr", path) if path.is_some() || d.append.is_some() => problems.add(
            "a `stderr` dead-letter sink takes no `path` or `append`",
            Some(value.span()),
            "here",
            Some("use `type = \"file\"` to write dead letters to a file".into()),
        ),
        ("stderr", _) => return Some(DeadLetterTarget::Stderr),
        (other, _) => problems.add(
            format!("unknown dead-letter sink type `{other}`"),
            Some(value.span()),
            "here",
            Some("valid types: `file`, `stderr`".into()),
        ),
    }
    None
}

enum Msg {
    Line(Vec<u8>),
    Close,
}

/// Sends dead letters to their writer thread.
pub struct DeadLetterWriter {
    tx: Mutex<mpsc::Sender<Msg>>,
    /// The stages whose items are projected.
    projected: Vec<String>,
}

/// Waits for the writer thread to finish.
pub struct DeadLetterHandle {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<std::io::Result<u64>>>,
}

/// The record written for a dead letter; `projected` are the stages whose items were decoded
/// to some of their fields.
pub fn record(letter: &DeadLetter, projected: &[String]) -> Value {
    if let Some(line) = letter.payload::<RawLine>() {
        json!({
            "kind": "malformed_input",
            "stage": letter.stage,
            "file": line.origin,
            "line": line.line,
            "error": letter.error,
            "raw": line.text,
            "attempts": letter.attempts,
        })
    } else if let Some(message) = letter.payload::<Received>() {
        json!({
            "kind": "malformed_input",
            "stage": letter.stage,
            "subject": message.subject,
            "error": letter.error,
            "raw": String::from_utf8_lossy(&message.payload),
            "attempts": letter.attempts,
        })
    } else {
        let item = letter
            .payload::<jaq_json::Val>()
            .map(|v| crate::jq::from_val(v.clone()))
            .or_else(|| letter.payload::<u64>().map(|i| Value::from(*i)))
            .or_else(|| {
                let line = letter.payload::<Line>()?;
                serde_json::from_slice(&line.0).ok()
            })
            .or_else(|| {
                let publish = letter.payload::<Publish>()?;
                serde_json::from_slice(&publish.payload).ok()
            })
            .unwrap_or(Value::Null);
        let mut record = json!({
            "kind": "failed_item",
            "stage": letter.stage,
            "error": letter.error,
            "attempts": letter.attempts,
            "seq": letter.seq,
            "item": item,
        });
        if projected.contains(&letter.stage) {
            record["projected"] = Value::Bool(true);
        }
        record
    }
}

impl DeadLetterWriter {
    /// Opens the target and starts the writer thread; `projected` as for [`record`].
    pub fn start(
        target: &DeadLetterTarget,
        projected: Vec<String>,
    ) -> std::io::Result<(Self, DeadLetterHandle)> {
        let mut out: Box<dyn Write + Send> = match target {
            DeadLetterTarget::File { path, append } => Box::new({
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(*append)
                    .truncate(!*append)
                    .open(path)?
            }),
            DeadLetterTarget::Stderr => Box::new(std::io::stderr()),
        };
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("dead-letters".into())
            .spawn(move || -> std::io::Result<u64> {
                let mut w = std::io::BufWriter::new(&mut out);
                let mut n = 0;
                while let Ok(Msg::Line(line)) = rx.recv() {
                    w.write_all(&line)?;
                    n += 1;
                }
                w.flush()?;
                Ok(n)
            })?;
        Ok((
            Self {
                tx: Mutex::new(tx.clone()),
                projected,
            },
            DeadLetterHandle {
                tx,
                thread: Some(thread),
            },
        ))
    }
}

impl pulseflow::engine::DeadLetterSink for DeadLetterWriter {
    fn accept(&self, letter: DeadLetter) {
        let mut line = serde_json::to_vec(&record(&letter, &self.projected)).unwrap_or_default();
        line.push(b'\n');
        let _ = self.tx.lock().send(Msg::Line(line));
    }
}

impl DeadLetterHandle {
    /// Writes what is queued, closes the target and returns the number of records written.
    pub fn finish(mut self) -> std::io::Result<u64> {
        let _ = self.tx.send(Msg::Close);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("dead-letter writer panicked")),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::components::sinks::ndjson::Line;

    fn letter(payload: Box<dyn std::any::Any + Send>) -> DeadLetter {
        DeadLetter {
            stage: "out".into(),
            seq: 7,
            error: "disk full".into(),
            attempts: 2,
            payload: Some(payload),
        }
    }

    #[test]
    fn an_encoded_line_is_recorded_as_the_json_it_holds() {
        let line = Line(b"{\"a\":1,\"b\":[true]}\n".to_vec());
        let record = record(&letter(Box::new(line)), &[]);
        assert_eq!(record["kind"], "failed_item");
        assert_eq!(record["item"], json!({"a": 1, "b": [true]}));
        assert_eq!(
            (record["seq"].as_u64(), record["attempts"].as_u64()),
            (Some(7), Some(2))
        );
        assert!(record.get("projected").is_none());
    }

    #[test]
    fn an_item_of_a_projected_stage_says_so() {
        let record = record(&letter(Box::new(3u64)), &["out".to_owned()]);
        assert_eq!(record["item"], json!(3));
        assert_eq!(record["projected"], json!(true));
    }
}
