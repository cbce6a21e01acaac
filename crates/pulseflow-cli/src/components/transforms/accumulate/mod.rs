//! The `accumulate` transform: folds items by key into named aggregates and emits one object
//! per key (`key`, each aggregate, `complete`, `completeness`) when the key is complete, or
//! when it is flushed (limits, deadlines, end of input) with `partial_flush`.
//!
//! ```toml
//! [transforms.sessions]
//! type = "accumulate"
//! inputs = ["events"]
//! key = ".session"
//! aggregates = { events = "count", pages = "collect(.page)", fields = "merge" }
//! complete_when = { required = ["user", "start", "end"] }  # or { count = 3 }, or a jq condition
//! ttl = "30s"
//! partial_flush = true
//! ```
//!
//! Its settings are read in [`config`]; its two stages ([`aggregate::Evaluate`] in `x.eval`,
//! where its policies apply, and [`aggregate::Aggregator`] in `x`) are in [`aggregate`].

pub mod aggregate;
pub mod config;

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::stage::StageKind;

use self::aggregate::{Aggregator, Evaluate};
use self::config::{Settings, SharedSpec};
use crate::build::BuildContext;
use crate::components::{ComponentType, Declare, TransformComponent};
use crate::config::{Problems, ReadContext};

/// The `accumulate` transform type.
pub const TYPE: ComponentType<dyn TransformComponent> =
    ComponentType::new::<Settings>("accumulate");

impl Declare for Settings {
    type Component = dyn TransformComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn TransformComponent>> {
        let spec = self.check_spec(cx, problems)?;
        Some(Arc::new(Accumulate {
            spec: Arc::new(spec),
        }))
    }
}

/// A checked `accumulate`.
pub struct Accumulate {
    spec: SharedSpec,
}

impl TransformComponent for Accumulate {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> Vec<(String, Stream<Val>)> {
        let spec = &self.spec;
        let eval = spec.clone();
        // Generated items were not read from text: `max_bytes` measures their JSON text.
        let json_sizes = spec.policy.max_bytes.is_some() && cx.fed_by_unsized_source();
        let s = input.transform_with(cx.stage("eval"), move || Evaluate {
            spec: eval.clone(),
            json_sizes,
            scratch: Vec::new(),
        });
        let hint = cx.hint;
        let s = cx.with_policies(s, hint);
        let acc = spec.clone();
        let mut s = s.accumulate_with(
            cx.name().to_owned(),
            move || Aggregator { spec: acc.clone() },
            spec.policy.clone(),
        );
        if let Some(h) = hint {
            s = s.parallelism(h);
        }
        vec![("out".into(), s)]
    }

    fn stage_kind(&self) -> StageKind {
        StageKind::Accumulator
    }
}
