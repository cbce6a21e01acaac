//! jq transforms: `filter` keeps the items whose condition is truthy, `map` emits every value
//! its expression yields (none filters the item). A jq error hands the item to the stage's
//! error policy.

use std::sync::Arc;

use pulseflow::prelude::*;
use serde_json::Value;

use crate::jq::{JqProgram, from_val, to_val};

/// What a jq transform does with the outputs of its expression.
#[derive(Clone, Copy)]
pub enum Mode {
    /// Keep the item when any output is truthy.
    Filter,
    /// Emit every output.
    Map,
}

/// A jq expression applied to each item; one instance per worker, sharing the compiled
/// program.
#[derive(Clone)]
pub struct JqTransform {
    /// The compiled expression.
    pub program: Arc<JqProgram>,
    /// Filter or map.
    pub mode: Mode,
}

impl Transform for JqTransform {
    type In = Value;
    type Out = Value;

    fn process(
        &mut self,
        item: Envelope<Value>,
        out: &mut Vec<Envelope<Value>>,
    ) -> Result<(), ItemFailure<Value>> {
        let input = to_val(&item.payload);
        let result = match self.mode {
            Mode::Filter => self.program.test(input).map(|keep| {
                if keep {
                    out.push(item.derive(Value::Null));
                }
            }),
            Mode::Map => self
                .program
                .run(input, |v| out.push(item.derive(from_val(v)))),
        };
        match result {
            Ok(()) => {
                if let (Mode::Filter, Some(last)) = (self.mode, out.last_mut()) {
                    // Keep the original payload rather than a copy.
                    if last.payload.is_null() && last.seq == item.seq {
                        last.payload = item.payload;
                    }
                }
                Ok(())
            }
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn is_stateless(&self) -> bool {
        true
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
    type Out = Value;

    fn process(
        &mut self,
        item: Envelope<u64>,
        out: &mut Vec<Envelope<Value>>,
    ) -> Result<(), ItemFailure<u64>> {
        let Some(program) = &self.program else {
            out.push(item.derive(Value::from(item.payload)));
            return Ok(());
        };
        let index = to_val(&Value::from(item.payload));
        match program.run(index, |v| out.push(item.derive(from_val(v)))) {
            Ok(()) => Ok(()),
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
