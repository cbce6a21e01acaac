//! The components a config can name, one module per component type, and their registry.
//!
//! A component type is a module under [`sources`], [`transforms`] or [`sinks`] holding, side
//! by side, its settings table (a serde struct with `deny_unknown_fields`), the checks that
//! turn it into a checked component ([`Declare`]), its documentation and how it becomes engine
//! stages ([`SourceComponent`], [`TransformComponent`] or [`SinkComponent`]). The module
//! exports one [`ComponentType`] constant, and the lists below register it: adding a type
//! touches its module, one line here, `docs/config.md` and the tests.
//!
//! The settings reader ([`crate::config`]) handles what every component shares (`type`,
//! `inputs`, the policy keys, unknown keys with the valid ones listed) and hands the rest of
//! the table to the type's [`ComponentType::read`].

pub mod dead_letter;
pub mod nats;
pub mod settings;
pub mod sinks;
pub mod sources;
pub mod transforms;

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::builder::SinkHandle;
use pulseflow::stage::StageKind;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeValue;

use crate::build::BuildContext;
use crate::config::{Problems, ReadContext, Role};
use crate::jq::JqProgram;

/// The source types, in the order error messages list them.
pub const SOURCES: &[ComponentType<dyn SourceComponent>] = &[
    sources::file::TYPE,
    sources::stdin::TYPE,
    sources::generate::TYPE,
    sources::http::TYPE,
    sources::nats::TYPE,
];

/// The transform types.
pub const TRANSFORMS: &[ComponentType<dyn TransformComponent>] = &[
    transforms::filter::TYPE,
    transforms::map::TYPE,
    transforms::route::TYPE,
    transforms::accumulate::TYPE,
];

/// The sink types.
pub const SINKS: &[ComponentType<dyn SinkComponent>] = &[
    sinks::stdout::TYPE,
    sinks::file::TYPE,
    sinks::blackhole::TYPE,
    sinks::http::TYPE,
    sinks::nats::TYPE,
];

/// The type names of a role, in registry order.
pub fn type_names(role: Role) -> Vec<&'static str> {
    match role {
        Role::Source => SOURCES.iter().map(|t| t.name).collect(),
        Role::Transform => TRANSFORMS.iter().map(|t| t.name).collect(),
        Role::Sink => SINKS.iter().map(|t| t.name).collect(),
    }
}

/// The keys of type `name` of `role` besides `type`, `inputs` and the policies; `None` when
/// there is no such type.
pub fn keys_of(role: Role, name: &str) -> Option<&'static [&'static str]> {
    match role {
        Role::Source => find(SOURCES, name).map(|t| (t.keys)()),
        Role::Transform => find(TRANSFORMS, name).map(|t| (t.keys)()),
        Role::Sink => find(SINKS, name).map(|t| (t.keys)()),
    }
}

/// Reads the settings of a component of type `name` (known to be registered for `role`).
pub fn read(
    role: Role,
    name: &str,
    settings: Spanned<DeValue<'_>>,
    cx: &ReadContext<'_>,
    problems: &mut Problems,
) -> Option<Kind> {
    match role {
        Role::Source => (find(SOURCES, name)?.read)(settings, cx, problems).map(Kind::Source),
        Role::Transform => {
            (find(TRANSFORMS, name)?.read)(settings, cx, problems).map(Kind::Transform)
        }
        Role::Sink => (find(SINKS, name)?.read)(settings, cx, problems).map(Kind::Sink),
    }
}

fn find<'a, C: ?Sized>(types: &'a [ComponentType<C>], name: &str) -> Option<&'a ComponentType<C>> {
    types.iter().find(|t| t.name == name)
}

/// A registered component type: its name and how its settings are read.
pub struct ComponentType<C: ?Sized> {
    /// The name written as `type = "..."`.
    pub name: &'static str,
    /// The keys of its settings table, in declaration order (from its serde struct).
    pub keys: fn() -> &'static [&'static str],
    /// Reads and checks its settings table (without `type`, `inputs` and the policies);
    /// `None` when there were problems, which were added.
    pub read: fn(Spanned<DeValue<'_>>, &ReadContext<'_>, &mut Problems) -> Option<Arc<C>>,
}

impl<C: ?Sized> ComponentType<C> {
    /// The type `name`, whose settings table is `D`.
    pub const fn new<D: Declare<Component = C>>(name: &'static str) -> Self {
        Self {
            name,
            keys: keys::<D>,
            read: read_settings::<D>,
        }
    }
}

fn keys<D: DeserializeOwned>() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<D>()
}

fn read_settings<D: Declare>(
    settings: Spanned<DeValue<'_>>,
    cx: &ReadContext<'_>,
    problems: &mut Problems,
) -> Option<Arc<D::Component>> {
    match crate::config::de::<D>(settings) {
        Ok(d) => d.check(cx, problems),
        Err(e) => {
            problems.add_toml(&e, cx.span.clone(), &cx.table);
            None
        }
    }
}

/// A component type's settings table.
pub trait Declare: DeserializeOwned {
    /// What the checked settings become.
    type Component: ?Sized;

    /// Checks the settings, adding what is wrong to `problems`, and makes the component.
    fn check(self, cx: &ReadContext<'_>, problems: &mut Problems) -> Option<Arc<Self::Component>>;
}

/// What a checked component is, by role.
#[derive(Clone)]
pub enum Kind {
    /// Declared under `[sources]`.
    Source(Arc<dyn SourceComponent>),
    /// Declared under `[transforms]`.
    Transform(Arc<dyn TransformComponent>),
    /// Declared under `[sinks]`.
    Sink(Arc<dyn SinkComponent>),
}

impl Kind {
    /// The table it is declared in.
    pub fn role(&self) -> Role {
        match self {
            Kind::Source(_) => Role::Source,
            Kind::Transform(_) => Role::Transform,
            Kind::Sink(_) => Role::Sink,
        }
    }

    /// The engine's kind of its main stage.
    pub fn stage_kind(&self) -> StageKind {
        match self {
            Kind::Source(_) => StageKind::Source,
            Kind::Transform(t) => t.stage_kind(),
            Kind::Sink(_) => StageKind::Sink,
        }
    }

    /// Its output ports; a sink has none.
    pub fn outputs(&self) -> Vec<Port> {
        match self {
            Kind::Source(_) => vec![Port::out()],
            Kind::Transform(t) => t.outputs(),
            Kind::Sink(_) => Vec::new(),
        }
    }
}

/// An output of a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// What an input names after the dot (`out` for a single output).
    pub name: String,
    /// Whether the engine may leave it out when nothing reads it.
    pub optional: bool,
}

impl Port {
    /// The single output of most components.
    pub fn out() -> Self {
        Self::named("out")
    }

    /// A required output `name`.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            optional: false,
        }
    }
}

/// How a transform reads the items it is given, for source projection (see
/// [`crate::build::projection`]).
pub enum Reads<'a> {
    /// Items whole, or in a way not known: its sources decode items whole.
    Whole,
    /// Only what these jq programs read of each item. `forwards`: its outputs are its input
    /// items unchanged (they reach the next components as they came); otherwise its outputs
    /// are new values.
    Through {
        /// The programs applied to each item.
        programs: Vec<&'a JqProgram>,
        /// Whether items leave unchanged.
        forwards: bool,
    },
}

/// A checked source.
pub trait SourceComponent: Send + Sync {
    /// Adds its stages; returns its output.
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val>;

    /// Whether it may decode items to the top-level fields read downstream (JSON objects
    /// read from text).
    fn projectable(&self) -> bool {
        false
    }

    /// Whether its items carry the size of the text they were read from; generated items
    /// do not.
    fn sized_items(&self) -> bool {
        true
    }

    /// How it reads and decodes lines, when it reads lines (what `pulseflow test` feeds a
    /// source given `lines`).
    fn line_settings(&self) -> Option<sources::LineSettings> {
        None
    }

    /// Bytes it will read, for the progress bar (0: not known).
    fn input_bytes(&self) -> u64 {
        0
    }
}

/// A checked transform.
pub trait TransformComponent: Send + Sync {
    /// Adds its stages after `input`; returns its outputs by port.
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> Vec<(String, Stream<Val>)>;

    /// Its output ports.
    fn outputs(&self) -> Vec<Port> {
        vec![Port::out()]
    }

    /// The engine's kind of its main stage.
    fn stage_kind(&self) -> StageKind {
        StageKind::Transform
    }

    /// How it reads items.
    fn reads(&self) -> Reads<'_> {
        Reads::Whole
    }
}

/// A checked sink.
pub trait SinkComponent: Send + Sync {
    /// Adds its stages after `input`; returns the sink, for its policies.
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle;
}
