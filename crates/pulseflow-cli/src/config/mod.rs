//! The config file: Vector-style tables of components (`[sources.x]`, `[transforms.y]`,
//! `[sinks.z]`, each with `type` and, except sources, `inputs`), named `[policies]` and a
//! `[dead_letter]` sink.
//!
//! Every problem is collected (unknown keys and types with the valid ones listed, wrong value
//! types, jq expressions that do not compile, unknown route outputs) and reported at once, with
//! the file, line and column of the offending text.

pub mod component;
pub mod diagnostic;
pub mod expr;
pub mod policies;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pulseflow::policy::PolicyRegistry;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::components::dead_letter::{self, DeadLetterTarget};
pub use component::{Component, ReadContext, Role, check_references};
pub use diagnostic::{Problem, Problems};
pub use expr::{Jq, compile_jq};
pub use policies::{ParallelismSetting, Policies};

const TOP_KEYS: &[&str] = &[
    "name",
    "allow_recursive_jq",
    "batch_size",
    "batch_timeout",
    "memory_budget",
    "data_dir",
    "checkpoint_interval",
    "sources",
    "transforms",
    "sinks",
    "policies",
    "dead_letter",
    "tests",
];

/// A parsed, checked config.
#[derive(Clone)]
pub struct Config {
    pub name: String,
    pub file: String,
    pub text: Arc<String>,
    pub batch_size: Option<usize>,
    /// How long a source may hold a partial batch (`None`: the engine's default, 10 ms).
    pub batch_timeout: Option<std::time::Duration>,
    /// Where `file` sources keep their checkpoints (`None`: no checkpoints).
    pub data_dir: Option<PathBuf>,
    /// How often checkpoints are written while they move.
    pub checkpoint_interval: std::time::Duration,
    /// Bytes the pipeline's stateful stages may hold in memory (`None`: unlimited).
    pub memory_budget: Option<u64>,
    pub components: Vec<Component>,
    pub registry: PolicyRegistry,
    pub parallelism: BTreeMap<String, pulseflow::policy::ParallelismHint>,
    pub dead_letter: Option<DeadLetterTarget>,
    /// Its `[[tests]]` (run by `pulseflow test`, ignored by `run`).
    pub tests: Vec<crate::testing::spec::TestSpec>,
    /// Which of several processes running this config this one is (`run --instance I/N`):
    /// partitioned `nats` sources read the partitions assigned to it.
    pub instance: pulseflow::connectors::nats::partition::Instance,
}

impl Config {
    /// The component named `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

/// `a`, `b`, `c`: keys or names as messages list them.
pub fn quoted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deserializes a value of the file (serde errors keep their spans).
pub fn de<T: for<'de> Deserialize<'de>>(value: Spanned<DeValue<'_>>) -> Result<T, toml::de::Error> {
    let span = value.span();
    let mut v = value.into_inner();
    v.make_owned();
    T::deserialize(ValueDeserializer::from(Spanned::new(span, v)))
}

/// The top-level `memory_budget`: a number of bytes, or a size with a unit (`"512 MiB"`,
/// `"2GB"`, `"64k"`: decimal and binary units, as `bytesize` reads them); at least one byte.
fn memory_budget(value: Spanned<DeValue<'_>>) -> Result<u64, String> {
    let bytes = match value.get_ref() {
        DeValue::Integer(_) => de::<i64>(value)
            .map_err(|e| e.message().to_owned())
            .and_then(|n| u64::try_from(n).map_err(|_| "must not be negative".to_owned()))?,
        DeValue::String(s) => s
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|e| format!("is not a size: {e}"))?
            .as_u64(),
        other => {
            return Err(format!(
                "must be a number of bytes or a size, not {}",
                other.type_str()
            ));
        }
    };
    if bytes == 0 {
        return Err("must be at least one byte".into());
    }
    Ok(bytes)
}

/// How often checkpoints are written by default.
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A top-level duration: a string such as `"10ms"` (see [`policies::parse_duration`]),
/// greater than zero.
fn duration(value: &Spanned<DeValue<'_>>) -> Result<std::time::Duration, String> {
    let Some(text) = value.get_ref().as_str() else {
        return Err(format!(
            "must be a duration such as \"10ms\", not {}",
            value.get_ref().type_str()
        ));
    };
    match policies::parse_duration(text) {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err("must be greater than zero".into()),
        None => Err(format!("`{text}` is not a duration")),
    }
}

/// Reads and checks the config at `path`. The error is either the file's problems or a
/// message (unreadable file).
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    parse(&path.display().to_string(), Arc::new(text), &dir).map_err(LoadError::Invalid)
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The file has problems.
    #[error("invalid config ({} problem{})", .0.len(), if .0.len() == 1 { "" } else { "s" })]
    Invalid(Vec<Problem>),
}

/// Parses a config; relative paths are resolved against `dir`.
pub fn parse(name: &str, text: Arc<String>, dir: &Path) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems::new(name, text.clone());
    let root = match DeTable::parse(&text) {
        Ok(t) => t,
        Err(e) => {
            problems.add_toml(&e, 0..0, "");
            return Err(problems.into_vec());
        }
    };
    let mut config = Config {
        name: Path::new(name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into()),
        file: name.to_owned(),
        text: text.clone(),
        batch_size: None,
        batch_timeout: None,
        data_dir: None,
        checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        memory_budget: None,
        components: Vec::new(),
        registry: PolicyRegistry::default(),
        parallelism: BTreeMap::new(),
        dead_letter: None,
        tests: Vec::new(),
        instance: Default::default(),
    };
    let mut tests = Vec::new();
    let mut allow_recursion = false;
    let root = root.into_inner();
    // First pass: settings that affect how the rest is read.
    if let Some((_, v)) = root
        .iter()
        .find(|(k, _)| &**k.get_ref() == "allow_recursive_jq")
    {
        match de::<bool>(v.clone()) {
            Ok(b) => allow_recursion = b,
            Err(e) => problems.add_toml(&e, v.span(), "allow_recursive_jq"),
        }
    }
    let mut seen_names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    for (key, value) in root.iter() {
        let k = &**key.get_ref();
        match k {
            "allow_recursive_jq" => {}
            "name" => match de::<String>(value.clone()) {
                Ok(n) => config.name = n,
                Err(e) => problems.add_toml(&e, value.span(), "name"),
            },
            "batch_size" => match de::<usize>(value.clone()) {
                Ok(0) => problems.add(
                    "batch_size must be at least 1",
                    Some(value.span()),
                    "zero",
                    None,
                ),
                Ok(n) => config.batch_size = Some(n),
                Err(e) => problems.add_toml(&e, value.span(), "batch_size"),
            },
            "batch_timeout" | "checkpoint_interval" => match duration(value) {
                Ok(d) if k == "batch_timeout" => config.batch_timeout = Some(d),
                Ok(d) => config.checkpoint_interval = d,
                Err(why) => problems.add(
                    format!("`{k}` {why}"),
                    Some(value.span()),
                    "here",
                    Some(
                        "write a number with a unit: `us`, `ms`, `s`, `m` or `h`, e.g. `10ms`"
                            .into(),
                    ),
                ),
            },
            "data_dir" => match de::<String>(value.clone()) {
                Ok(d) if d.trim().is_empty() => problems.add(
                    "`data_dir` is empty",
                    Some(value.span()),
                    "here",
                    Some("name a directory, e.g. `data_dir = \"state\"`".into()),
                ),
                Ok(d) => config.data_dir = Some(dir.join(d)),
                Err(e) => problems.add_toml(&e, value.span(), "data_dir"),
            },
            "memory_budget" => match memory_budget(value.clone()) {
                Ok(n) => config.memory_budget = Some(n),
                Err(why) => problems.add(
                    format!("`memory_budget` {why}"),
                    Some(value.span()),
                    "here",
                    Some("write a number of bytes or a size such as \"512 MiB\" or \"2GB\"".into()),
                ),
            },
            "sources" | "transforms" | "sinks" => {
                let role = match k {
                    "sources" => Role::Source,
                    "transforms" => Role::Transform,
                    _ => Role::Sink,
                };
                let Some(table) = value.get_ref().as_table() else {
                    problems.add(
                        format!("`{k}` must be a table of components"),
                        Some(value.span()),
                        format!("found {}", value.get_ref().type_str()),
                        Some(format!("write `[{k}.NAME]` tables")),
                    );
                    continue;
                };
                for (name, body) in table.iter() {
                    let n: String = name.get_ref().to_string();
                    if seen_names.contains_key(&n) {
                        problems.add(
                            format!("component name `{n}` is used twice"),
                            Some(name.span()),
                            "second use",
                            Some("names are shared by sources, transforms and sinks".into()),
                        );
                        continue;
                    }
                    if n.contains('.') {
                        problems.add(
                            format!("component name `{n}` contains a dot"),
                            Some(name.span()),
                            "dots separate a component from its output",
                            None,
                        );
                    }
                    seen_names.insert(n.clone(), name.span());
                    let cx = ReadContext {
                        table: format!("{k}.{n}"),
                        span: body.span(),
                        dir,
                        allow_recursion,
                        text: &text,
                    };
                    if let Some(c) = component::read(role, n, name.span(), body, cx, &mut problems)
                    {
                        config.components.push(c);
                    }
                }
            }
            "policies" => read_named_policies(value, &mut config, &mut problems),
            "dead_letter" => {
                config.dead_letter = dead_letter::read_target(value, dir, &mut problems)
            }
            "tests" => tests = crate::testing::spec::read(value, &mut problems),
            other => problems.add(
                format!("unknown top-level key `{other}`"),
                Some(key.span()),
                "unknown key",
                Some(format!("valid keys: {}", quoted(TOP_KEYS))),
            ),
        }
    }
    if config.components.is_empty() && problems.is_empty() {
        problems.add(
            "the config declares no components",
            Some(0..0),
            "empty",
            Some("add `[sources.NAME]`, `[transforms.NAME]` and `[sinks.NAME]` tables".into()),
        );
    }
    crate::testing::spec::check_references(&config, &tests, &mut problems);
    config.tests = tests.into_iter().map(|(t, _)| t).collect();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems.into_vec())
    }
}

fn read_named_policies(value: &Spanned<DeValue<'_>>, config: &mut Config, problems: &mut Problems) {
    let Some(table) = value.get_ref().as_table() else {
        problems.add(
            "`policies` must be a table of named policies",
            Some(value.span()),
            "not a table",
            None,
        );
        return;
    };
    for (name, body) in table.iter() {
        let n = &**name.get_ref();
        if policies::reserved_name(n) {
            problems.add(
                format!("`{n}` is a built-in policy name"),
                Some(name.span()),
                "reserved",
                Some("choose another name".into()),
            );
            continue;
        }
        let Some(body) = body.get_ref().as_table() else {
            problems.add(
                format!("policy `{n}` must be a table"),
                Some(body.span()),
                "not a table",
                Some(format!("valid keys: {}", quoted(policies::POLICY_KEYS))),
            );
            continue;
        };
        let mut p = Policies::default();
        for (k, v) in body.iter() {
            let key = &**k.get_ref();
            if policies::POLICY_KEYS.contains(&key) {
                policies::read_policy(key, v, false, &mut p, problems);
            } else {
                problems.add(
                    format!("unknown key `{key}` in policy `{n}`"),
                    Some(k.span()),
                    "unknown key",
                    Some(format!("valid keys: {}", quoted(policies::POLICY_KEYS))),
                );
            }
        }
        use pulseflow::policy::PolicyRef::Inline;
        if let Some(Inline(b)) = p.buffer {
            config.registry.add_buffer(n, b);
        }
        if let Some(Inline(b)) = p.backpressure {
            config.registry.add_backpressure(n, b);
        }
        if let Some(Inline(e)) = p.error_policy {
            config.registry.add_error_policy(n, e);
        }
        if let Some(Inline(c)) = p.circuit_breaker {
            config.registry.add_circuit_breaker(n, c);
        }
        if let Some(ParallelismSetting::Inline(h)) = p.parallelism {
            config.parallelism.insert(n.to_owned(), h);
        }
    }
}
