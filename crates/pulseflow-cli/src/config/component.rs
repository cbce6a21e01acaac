//! One `[sources.NAME]`, `[transforms.NAME]` or `[sinks.NAME]` table: what every component
//! shares (`type`, `inputs`, the policy keys) is read here; the rest of the table goes to the
//! component type's own reader, found in the registry ([`crate::components`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::policies::{self, ParallelismSetting, Policies};
use super::{Config, Jq, Problems, compile_jq, quoted};
use crate::components::{self, Kind};

/// Which table a component is declared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Transform,
    Sink,
}

impl Role {
    /// The table's name: `sources`, `transforms` or `sinks`.
    pub fn table(self) -> &'static str {
        match self {
            Role::Source => "sources",
            Role::Transform => "transforms",
            Role::Sink => "sinks",
        }
    }

    /// One of the role: `source`, `transform` or `sink`.
    fn singular(self) -> &'static str {
        let table = self.table();
        &table[..table.len() - 1]
    }
}

/// An input reference: `component` or `component.output`.
#[derive(Debug, Clone)]
pub struct InputRef {
    pub span: Range<usize>,
    pub component: String,
    pub port: Option<String>,
}

/// One component of the config.
#[derive(Clone)]
pub struct Component {
    pub name: String,
    pub span: Range<usize>,
    /// Its `type`.
    pub ty: &'static str,
    pub kind: Kind,
    pub inputs: Vec<InputRef>,
    pub policies: Policies,
}

impl Component {
    /// The table it is declared in.
    pub fn role(&self) -> Role {
        self.kind.role()
    }

    /// The names of its outputs; a sink has none.
    pub fn output_names(&self) -> Vec<String> {
        self.kind.outputs().into_iter().map(|p| p.name).collect()
    }
}

/// What a component type's reader is given besides its settings.
pub struct ReadContext<'a> {
    /// The component's table, as messages name it (`transforms.x`).
    pub table: String,
    /// Where the component's table is in the file.
    pub span: Range<usize>,
    /// The config's folder: relative paths are resolved against it.
    pub dir: &'a Path,
    /// Whether jq expressions may recurse.
    pub allow_recursion: bool,
    /// The config's text, for the spans of jq errors.
    pub text: &'a str,
}

impl ReadContext<'_> {
    /// Compiles a jq expression of the component; `what` names it in messages.
    pub fn jq(&self, code: &Spanned<String>, what: &str, problems: &mut Problems) -> Option<Jq> {
        compile_jq(code, self.allow_recursion, self.text, what, problems)
    }

    /// `path` resolved against the config's folder.
    pub fn path(&self, path: &str) -> PathBuf {
        self.dir.join(path)
    }
}

/// Reads the table of component `name`; `None` (with problems added) when it has problems.
pub(super) fn read(
    role: Role,
    name: String,
    name_span: Range<usize>,
    body: &Spanned<DeValue<'_>>,
    cx: ReadContext<'_>,
    problems: &mut Problems,
) -> Option<Component> {
    let table_name = role.table();
    let Some(table) = body.get_ref().as_table() else {
        problems.add(
            format!("`{table_name}.{name}` must be a table"),
            Some(body.span()),
            format!("found {}", body.get_ref().type_str()),
            None,
        );
        return None;
    };
    let valid_types = components::type_names(role);
    let ty = table.iter().find(|(k, _)| &**k.get_ref() == "type");
    let Some((_, ty_value)) = ty else {
        problems.add(
            format!("`{table_name}.{name}` has no `type`"),
            Some(name_span),
            "missing `type`",
            Some(format!("valid types: {}", quoted(&valid_types))),
        );
        return None;
    };
    let Some(ty) = ty_value.get_ref().as_str() else {
        problems.add(
            "`type` must be a string",
            Some(ty_value.span()),
            "not a string",
            Some(format!("valid types: {}", quoted(&valid_types))),
        );
        return None;
    };
    let (Some(ty), Some(specific)) = (
        valid_types.iter().copied().find(|t| *t == ty),
        components::keys_of(role, ty),
    ) else {
        problems.add(
            format!("unknown {} type `{ty}`", role.singular()),
            Some(ty_value.span()),
            "unknown type",
            Some(format!("valid types: {}", quoted(&valid_types))),
        );
        return None;
    };
    let mut valid: Vec<&str> = vec!["type"];
    if role != Role::Source {
        valid.push("inputs");
    }
    valid.extend_from_slice(policies::POLICY_KEYS);
    valid.extend_from_slice(specific);
    let mut rest = DeTable::default();
    let mut inputs = Vec::new();
    let mut pols = Policies::default();
    let mut has_inputs = false;
    let before = problems.len();
    for (k, v) in table.iter() {
        let key = &**k.get_ref();
        if key == "type" {
            continue;
        }
        if !valid.contains(&key) {
            problems.add(
                format!("unknown key `{key}` for a `{ty}` {}", role.singular()),
                Some(k.span()),
                "unknown key",
                Some(format!("valid keys: {}", quoted(&valid))),
            );
            continue;
        }
        if key == "inputs" {
            has_inputs = true;
            read_inputs(v, &mut inputs, problems);
        } else if policies::POLICY_KEYS.contains(&key) {
            policies::read_policy(key, v, true, &mut pols, problems);
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    if role != Role::Source && !has_inputs {
        problems.add(
            format!("`{table_name}.{name}` has no `inputs`"),
            Some(name_span.clone()),
            "missing `inputs`",
            Some("list the components it reads from, e.g. `inputs = [\"logs\"]`".into()),
        );
    }
    let rest = Spanned::new(body.span(), DeValue::Table(rest));
    let kind = components::read(role, ty, rest, &cx, problems)?;
    if problems.len() != before {
        return None;
    }
    Some(Component {
        name,
        span: name_span,
        ty,
        kind,
        inputs,
        policies: pols,
    })
}

fn read_inputs(value: &Spanned<DeValue<'_>>, inputs: &mut Vec<InputRef>, problems: &mut Problems) {
    match super::de::<Vec<Spanned<String>>>(value.clone()) {
        Ok(list) => {
            if list.is_empty() {
                problems.add("`inputs` is empty", Some(value.span()), "no inputs", None);
            }
            for i in list {
                let span = i.span();
                let text = i.into_inner();
                let (component, port) = match text.split_once('.') {
                    Some((c, p)) => (c.to_owned(), Some(p.to_owned())),
                    None => (text.clone(), None),
                };
                inputs.push(InputRef {
                    span,
                    component,
                    port,
                });
            }
        }
        Err(e) => problems.add_toml(&e, value.span(), "inputs (a list of component names)"),
    }
}

/// Checks what the engine cannot: references to a component's outputs that it does not have,
/// sinks used as inputs, and parallelism names.
pub fn check_references(config: &Config, problems: &mut Problems) {
    for c in &config.components {
        for input in &c.inputs {
            let Some(target) = config.component(&input.component) else {
                continue; // unknown names: reported by the engine's validation
            };
            check_reference(target, input, problems);
        }
        if let Some(ParallelismSetting::Named(n, span)) = &c.policies.parallelism {
            if !config.parallelism.contains_key(n) {
                problems.add(
                    format!("unknown parallelism policy `{n}`"),
                    Some(span.clone()),
                    "not in [policies]",
                    Some(format!(
                        "valid: a number of workers, `sequential`, `cpu_bound`, `io_bound`{}",
                        config
                            .parallelism
                            .keys()
                            .map(|k| format!(", `{k}`"))
                            .collect::<String>()
                    )),
                );
            }
        }
    }
}

/// Checks that `input` names an output `target` has.
fn check_reference(target: &Component, input: &InputRef, problems: &mut Problems) {
    let outputs = target.output_names();
    let span = Some(input.span.clone());
    let valid = || {
        let names: Vec<String> = outputs
            .iter()
            .map(|o| format!("`{}.{o}`", target.name))
            .collect();
        Some(format!("valid: {}", names.join(", ")))
    };
    let single = outputs.len() == 1 && outputs[0] == "out";
    match &input.port {
        _ if outputs.is_empty() => problems.add(
            format!("`{}` is a sink and has no output", target.name),
            span,
            "a sink",
            None,
        ),
        None if !single => problems.add(
            format!(
                "`{}` is a {}: name one of its outputs",
                target.name, target.ty
            ),
            span,
            "which output?",
            valid(),
        ),
        Some(port) if !single && !outputs.contains(port) => problems.add(
            format!("{} `{}` has no output `{port}`", target.ty, target.name),
            span,
            "unknown output",
            valid(),
        ),
        Some(port) if single => problems.add(
            format!(
                "`{}` has a single output; `.{port}` names none",
                target.name
            ),
            span,
            "unknown output",
            Some(format!("write `{}`", target.name)),
        ),
        _ => {}
    }
}
