//! The stage of the jq transforms: `filter` keeps the items whose condition is truthy, `map`
//! emits every value its expression yields (none filters the item). A jq error hands the item
//! to the stage's error policy.

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::prelude::*;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::{Reads, TransformComponent};
use crate::config::{Jq, Problems, ReadContext};
use crate::jq::JqProgram;

/// A checked `filter` or `map` component: one jq expression and what is done with its
/// outputs.
pub struct JqComponent {
    /// The condition or expression.
    pub jq: Jq,
    /// Filter or map.
    pub mode: Mode,
}

impl JqComponent {
    /// The checked `filter` or `map` of the expression `code`.
    pub fn checked(
        cx: &ReadContext<'_>,
        code: &Spanned<String>,
        mode: Mode,
        problems: &mut Problems,
    ) -> Option<Arc<dyn TransformComponent>> {
        let jq = cx.jq(code, &cx.table, problems)?;
        Some(Arc::new(JqComponent { jq, mode }))
    }
}

impl TransformComponent for JqComponent {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> Vec<(String, Stream<Val>)> {
        vec![(
            "out".into(),
            JqTransform::add(cx, input, &self.jq, self.mode),
        )]
    }

    fn reads(&self) -> Reads<'_> {
        Reads::Through {
            programs: vec![&self.jq.program],
            // A filter passes its items on unchanged; a map's outputs are new values, built
            // from the fields it reads.
            forwards: matches!(self.mode, Mode::Filter),
        }
    }
}

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

impl JqTransform {
    /// Adds the stage of a `filter` or `map` component after `input`. Without a
    /// `parallelism` of its own, it runs on the workers of its input when those are several:
    /// the engine then chains it behind each of them (see [`BuildContext::chain`]).
    pub fn add(cx: &mut BuildContext<'_>, input: Stream<Val>, jq: &Jq, mode: Mode) -> Stream<Val> {
        let program = jq.program.clone();
        let s = input.transform_with(cx.name().to_owned(), move || JqTransform {
            program: program.clone(),
            mode,
        });
        let workers = cx.hint.or(cx.input_workers);
        cx.chain(workers);
        cx.with_policies(s, workers)
    }
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
                Ok(false) => {
                    // Its map may serve the next object read on this worker.
                    let (payload, rest) = item.into_parts();
                    crate::json::recycle(payload);
                    drop(rest);
                }
                Err(e) => return Err(ItemFailure::new(item, StageError::from_error(e))),
            },
            Mode::Map => {
                let mut item = item;
                // The item is dropped after this stage: its values may move into the output.
                if let Some(v) = self.program.direct_consuming(&mut item.payload) {
                    out.push(item.map(|input| {
                        crate::json::recycle(input);
                        v
                    }));
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
