//! The `filter` transform: keeps the items whose jq condition is truthy; a jq error hands the
//! item to the component's error policy.
//!
//! ```toml
//! [transforms.adults]
//! type = "filter"
//! inputs = ["people"]
//! condition = ".age >= 18"
//! ```

use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::jq::{JqComponent, Mode};
use crate::components::{ComponentType, Declare, TransformComponent};
use crate::config::{Problems, ReadContext};

/// The `filter` transform type.
pub const TYPE: ComponentType<dyn TransformComponent> = ComponentType::new::<Settings>("filter");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    condition: Spanned<String>,
}

impl Declare for Settings {
    type Component = dyn TransformComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn TransformComponent>> {
        JqComponent::checked(cx, &self.condition, Mode::Filter, problems)
    }
}
