//! The decoding stage after a line source: a line becomes a jq value (parsed straight from
//! its JSON text), or a failure that names the file and line (dead-lettered with the raw text
//! under the default policy).
//!
//! When every stage downstream reads only some top-level fields of the items, the build
//! gives the stage those fields ([`Decode::fields`]) and JSON objects are decoded to them
//! alone ([`crate::json::parse_projected`]).

use std::sync::Arc;

use bytes::Bytes;
use jaq_json::Val;
use pulseflow::prelude::*;

use super::Format;
use super::lines::RawLine;

/// Decodes lines of one format.
#[derive(Clone)]
pub struct Decode {
    /// The format of the lines.
    pub format: Format,
    /// For JSON lines: the only top-level fields to keep, when downstream reads no others.
    pub fields: Option<Arc<[Bytes]>>,
}

fn decode(format: Format, fields: Option<&[Bytes]>, line: &RawLine) -> Result<Val, String> {
    if let Some(p) = &line.problem {
        return Err(p.clone());
    }
    match format {
        Format::Lines => Ok(Val::utf8_str(line.text.clone().into_bytes())),
        Format::Ndjson => match fields {
            Some(fields) => crate::json::parse_projected(&line.text, fields),
            None => crate::json::parse(&line.text),
        }
        .map_err(|e| format!("invalid JSON: {e}")),
        Format::Csv => {
            let fields = super::csv::split(&line.text).map_err(|e| format!("invalid CSV: {e}"))?;
            let headers = line
                .headers
                .as_ref()
                .ok_or_else(|| "CSV line before the header line".to_owned())?;
            if fields.len() != headers.len() {
                return Err(format!(
                    "invalid CSV: expected {} fields, found {}",
                    headers.len(),
                    fields.len()
                ));
            }
            Ok(Val::obj(
                headers
                    .iter()
                    .map(|h| Val::utf8_str(h.clone().into_bytes()))
                    .zip(fields.into_iter().map(|f| Val::utf8_str(f.into_bytes())))
                    .collect(),
            ))
        }
    }
}

impl Transform for Decode {
    type In = RawLine;
    type Out = Val;

    fn process(
        &mut self,
        item: Envelope<RawLine>,
        out: &mut Vec<Envelope<Val>>,
    ) -> Result<(), ItemFailure<RawLine>> {
        match decode(self.format, self.fields.as_deref(), &item.payload) {
            Ok(v) => {
                // The line's metadata moves to the value (its ack, if any, is not counted up
                // and down).
                out.push(item.map(|_| v));
                Ok(())
            }
            Err(e) => {
                let msg = format!("{}:{}: {e}", item.payload.origin, item.payload.line);
                Err(ItemFailure::new(item, StageError::msg(msg)))
            }
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
