//! The `map` transform: emits every value its jq expression yields for an item (none filters
//! the item); a jq error hands the item to the component's error policy.
//!
//! ```toml
//! [transforms.shape]
//! type = "map"
//! inputs = ["orders"]
//! jq = "{id, total: (.price * .quantity)}"
//! ```

use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::jq::{JqComponent, Mode};
use crate::components::{ComponentType, Declare, TransformComponent};
use crate::config::{Problems, ReadContext};

/// The `map` transform type.
pub const TYPE: ComponentType<dyn TransformComponent> = ComponentType::new::<Settings>("map");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    jq: Spanned<String>,
}

impl Declare for Settings {
    type Component = dyn TransformComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn TransformComponent>> {
        JqComponent::checked(cx, &self.jq, Mode::Map, problems)
    }
}
