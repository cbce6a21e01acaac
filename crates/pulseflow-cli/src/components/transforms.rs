//! jq transforms: `filter` keeps the items whose condition is truthy, `map` emits every value
//! its expression yields (none filters the item). A jq error hands the item to the stage's
//! error policy.

use std::sync::Arc;

use jaq_json::{Num, Val};
use pulseflow::prelude::*;

use crate::jq::JqProgram;

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
    type In = Val;
    type Out = Val;

    fn process(
        &mut self,
        item: Envelope<Val>,
        out: &mut Vec<Envelope<Val>>,
    ) -> Result<(), ItemFailure<Val>> {
        match self.mode {
            Mode::Filter => match self.program.test(&item.payload) {
                Ok(true) => out.push(item),
                Ok(false) => {}
                Err(e) => return Err(ItemFailure::new(item, StageError::from_error(e))),
            },
            Mode::Map => {
                let mut item = item;
                // The item is dropped after this stage: its values may move into the output.
                if let Some(v) = self.program.direct_consuming(&mut item.payload) {
                    out.push(item.derive(v));
                    return Ok(());
                }
                if let Err(e) = self
                    .program
                    .run_jaq(&item.payload, |v| out.push(item.derive(v)))
                {
                    return Err(ItemFailure::new(item, StageError::from_error(e)));
                }
            }
        }
        Ok(())
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
    type Out = Val;

    fn process(
        &mut self,
        item: Envelope<u64>,
        out: &mut Vec<Envelope<Val>>,
    ) -> Result<(), ItemFailure<u64>> {
        let index = Val::Num(Num::from_integral(item.payload));
        let Some(program) = &self.program else {
            out.push(item.derive(index));
            return Ok(());
        };
        match program.run(&index, |v| out.push(item.derive(v))) {
            Ok(()) => Ok(()),
            Err(e) => Err(ItemFailure::new(item, StageError::from_error(e))),
        }
    }

    fn is_stateless(&self) -> bool {
        true
    }
}
