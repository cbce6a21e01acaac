//! Request bodies of JSON items: newline-delimited JSON, a JSON array, or one JSON value.
//!
//! The format follows the `Content-Type`: `application/x-ndjson` (or `application/jsonl`)
//! is one value per line; `application/json` is an array of items or a single item. Without
//! either, a body that starts with `[` is an array and any other is read as lines (a single
//! object on one line is then one item). A body is decoded whole before any of its items
//! enters the pipeline: a bad line refuses the request, naming the line.
//!
//! ```
//! use pulseflow::connectors::http::body::{self, json};
//!
//! let decoder = json::<serde_json::Value>();
//! let items = body::decode(b"{\"a\":1}\n{\"a\":2}\n", None, &decoder).expect("valid");
//! assert_eq!(items.len(), 2);
//!
//! let err = body::decode(b"{\"a\":1}\n{\"a\":\n", None, &decoder).expect_err("refused");
//! assert!(err.to_string().starts_with("line 2:"), "{err}");
//! ```

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// Turns the JSON text of one item into an item; the error is a message for the client.
pub type Decoder<T> = Arc<dyn Fn(&str) -> Result<T, String> + Send + Sync>;

/// A decoder of items that implement `Deserialize` (`serde_json::Value` for any JSON).
pub fn json<T: DeserializeOwned + 'static>() -> Decoder<T> {
    Arc::new(|text| serde_json::from_str(text).map_err(|e| describe(&e)))
}

/// A serde_json error of one item's text as a message: where in the item it is (its column,
/// and its line when the item spans several), without serde_json's "at line 1".
pub fn describe(e: &serde_json::Error) -> String {
    let message = strip_position(e);
    match (e.line(), e.column()) {
        (0, _) => message,
        (1, column) => format!("{message} (column {column})"),
        (line, column) => format!("{message} (line {line} of the item, column {column})"),
    }
}

/// How a body holds its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON value per line; blank lines are skipped.
    Ndjson,
    /// A JSON array whose elements are the items.
    Array,
    /// One JSON value, one item.
    Single,
}

/// Why a body was refused; its text names the line or element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is not UTF-8.
    #[error("line {line}: invalid UTF-8 at byte {offset} of the body")]
    Utf8 {
        /// 1-based line of the first invalid byte.
        line: usize,
        /// Offset of the first invalid byte in the body.
        offset: usize,
    },
    /// A line of an ndjson body is not a valid item.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The body is not valid JSON (an array or single value).
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong there.
        message: String,
    },
    /// An element of an array body is not a valid item.
    #[error("item {index} of the array: {message}")]
    Element {
        /// 0-based index in the array.
        index: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// The format a body is read in, from its content type and first byte.
pub fn format_of(content_type: Option<&str>, body: &[u8]) -> BodyFormat {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let essence = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/x-ndjson" | "application/jsonl" | "application/x-jsonlines") => {
            BodyFormat::Ndjson
        }
        Some("application/json") if first == Some(&b'[') => BodyFormat::Array,
        Some("application/json") => BodyFormat::Single,
        _ if first == Some(&b'[') => BodyFormat::Array,
        _ => BodyFormat::Ndjson,
    }
}

/// Decodes every item of `body`, or refuses it whole.
pub fn decode<T>(
    body: &[u8],
    content_type: Option<&str>,
    decoder: &Decoder<T>,
) -> Result<Vec<T>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let offset = e.valid_up_to();
        BodyError::Utf8 {
            line: line_at(body, offset),
            offset,
        }
    })?;
    match format_of(content_type, body) {
        BodyFormat::Ndjson => ndjson(text, decoder),
        BodyFormat::Single => {
            let trimmed = text.trim();
            if trimmed.is_empty() {
                return Ok(Vec::new());
            }
            decoder(trimmed).map(|item| vec![item]).map_err(|message| {
                // Point at the value's syntax error where serde_json can tell.
                match serde_json::from_str::<&RawValue>(text) {
                    Err(e) if e.line() > 0 => syntax(&e),
                    _ => BodyError::Line { line: 1, message },
                }
            })
        }
        BodyFormat::Array => {
            let elements: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| syntax(&e))?;
            elements
                .into_iter()
                .enumerate()
                .map(|(index, raw)| {
                    decoder(raw.get()).map_err(|message| BodyError::Element { index, message })
                })
                .collect()
        }
    }
}

fn ndjson<T>(text: &str, decoder: &Decoder<T>) -> Result<Vec<T>, BodyError> {
    let mut items = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let item = decoder(line).map_err(|message| BodyError::Line {
            line: i + 1,
            message,
        })?;
        items.push(item);
    }
    Ok(items)
}

fn syntax(e: &serde_json::Error) -> BodyError {
    BodyError::Syntax {
        line: e.line(),
        column: e.column(),
        message: strip_position(e),
    }
}

/// serde_json's message without its " at line L column C" suffix (the error says where).
fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// The 1-based line holding byte `offset`.
fn line_at(body: &[u8], offset: usize) -> usize {
    body[..offset.min(body.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(body: &[u8], ct: Option<&str>) -> Result<Vec<serde_json::Value>, BodyError> {
        decode(body, ct, &json())
    }

    #[test]
    fn formats_follow_content_type_then_first_byte() {
        assert_eq!(format_of(None, b" [1]"), BodyFormat::Array);
        assert_eq!(format_of(None, b"{}\n{}"), BodyFormat::Ndjson);
        assert_eq!(
            format_of(Some("application/json; charset=utf-8"), b"{\n}"),
            BodyFormat::Single
        );
        assert_eq!(
            format_of(Some("application/x-ndjson"), b"[1]\n[2]"),
            BodyFormat::Ndjson
        );
    }

    #[test]
    fn ndjson_skips_blank_lines_and_names_the_bad_one() {
        let ok = values(b"{\"a\":1}\r\n\n{\"a\":2}\n", None).expect("valid");
        assert_eq!(ok.len(), 2);
        let err = values(b"{\"a\":1}\n\n{\"a\" 2}\n", None).expect_err("refused");
        assert!(matches!(err, BodyError::Line { line: 3, .. }), "{err:?}");
        assert!(err.to_string().starts_with("line 3: expected `:`"), "{err}");
    }

    #[test]
    fn arrays_and_single_values() {
        assert_eq!(
            values(b"[{\"a\":1}, 2, \"x\"]", None).expect("array").len(),
            3
        );
        let one = values(b"{\n  \"a\": 1\n}\n", Some("application/json")).expect("one");
        assert_eq!(one, vec![serde_json::json!({"a": 1})]);
        let truncated = values(b"[{\"a\":1},\n{\"a\":", None).expect_err("refused");
        assert!(
            matches!(truncated, BodyError::Syntax { line: 2, .. }),
            "{truncated:?}"
        );
    }

    #[test]
    fn element_decoding_errors_name_the_index() {
        let numbers: Decoder<u64> = json();
        let err = decode(b"[1, 2, \"three\"]", None, &numbers).expect_err("refused");
        assert!(
            matches!(err, BodyError::Element { index: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_utf8_names_its_line_and_byte() {
        let err = values(b"{\"a\":1}\n{\"a\":\"\xff\"}\n", None).expect_err("refused");
        assert_eq!(
            err,
            BodyError::Utf8 {
                line: 2,
                offset: 14
            }
        );
    }

    #[test]
    fn an_empty_body_has_no_items() {
        assert!(values(b"", None).expect("empty").is_empty());
        assert!(
            values(b"  \n", Some("application/json"))
                .expect("empty")
                .is_empty()
        );
    }
}
