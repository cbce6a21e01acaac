//! The config file: Vector-style tables of components (`[sources.x]`, `[transforms.y]`,
//! `[sinks.z]`, each with `type` and, except sources, `inputs`), named `[policies]` and a
//! `[dead_letter]` sink.
//!
//! Every problem is collected (unknown keys and types with the valid ones listed, wrong value
//! types, jq expressions that do not compile, unknown route outputs) and reported at once, with
//! the file, line and column of the offending text.

pub mod accumulate;
pub mod diagnostic;
pub mod policies;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pulseflow::policy::PolicyRegistry;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::jq::JqProgram;
pub use diagnostic::{Problem, Problems};
pub use policies::{ParallelismSetting, Policies};

const TOP_KEYS: &[&str] = &[
    "name",
    "allow_recursive_jq",
    "batch_size",
    "memory_budget",
    "sources",
    "transforms",
    "sinks",
    "policies",
    "dead_letter",
];

/// Which table a component is declared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Transform,
    Sink,
}

impl Role {
    fn table(self) -> &'static str {
        match self {
            Role::Source => "sources",
            Role::Transform => "transforms",
            Role::Sink => "sinks",
        }
    }

    fn types(self) -> &'static [&'static str] {
        match self {
            Role::Source => &["file", "stdin", "generate"],
            Role::Transform => &["filter", "map", "route", "accumulate"],
            Role::Sink => &["stdout", "file", "blackhole"],
        }
    }
}

/// How lines of input become items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON value per line.
    Ndjson,
    /// Comma-separated values; the first line of each file names the fields.
    Csv,
    /// Each line as a JSON string.
    Lines,
}

/// Default longest line accepted (longer lines are dead-lettered).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// A jq expression with where it sits in the config.
#[derive(Clone)]
pub struct Jq {
    pub program: Arc<JqProgram>,
}

/// What a component does.
#[derive(Clone)]
pub enum Kind {
    FileSource {
        pattern: String,
        paths: Vec<PathBuf>,
        format: Format,
        max_line_bytes: usize,
        /// Whether JSON lines may be decoded to only the fields downstream stages read.
        project: bool,
    },
    Stdin {
        format: Format,
        max_line_bytes: usize,
        /// As for `FileSource`.
        project: bool,
    },
    Generate {
        count: Option<u64>,
        rate: Option<f64>,
        jq: Option<Jq>,
    },
    Filter {
        condition: Jq,
    },
    Map {
        jq: Jq,
    },
    Route {
        routes: Vec<(String, Jq)>,
    },
    Accumulate(accumulate::SharedSpec),
    StdoutSink,
    FileSink {
        path: PathBuf,
        append: bool,
    },
    Blackhole,
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
    pub role: Role,
    pub kind: Kind,
    pub inputs: Vec<InputRef>,
    pub policies: Policies,
}

/// Where dead letters go.
#[derive(Debug, Clone)]
pub enum DeadLetterTarget {
    File { path: PathBuf, append: bool },
    Stderr,
}

/// A parsed, checked config.
#[derive(Clone)]
pub struct Config {
    pub name: String,
    pub file: String,
    pub text: Arc<String>,
    pub batch_size: Option<usize>,
    /// Bytes the pipeline's stateful stages may hold in memory (`None`: unlimited).
    pub memory_budget: Option<u64>,
    pub components: Vec<Component>,
    pub registry: PolicyRegistry,
    pub parallelism: BTreeMap<String, pulseflow::policy::ParallelismHint>,
    pub dead_letter: Option<DeadLetterTarget>,
}

impl Config {
    /// The component named `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSourceCfg {
    path: String,
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    max_line_bytes: Option<usize>,
    #[serde(default)]
    project: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinCfg {
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    max_line_bytes: Option<usize>,
    #[serde(default)]
    project: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateCfg {
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    rate: Option<f64>,
    #[serde(default)]
    jq: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterCfg {
    condition: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapCfg {
    jq: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteCfg {
    routes: BTreeMap<Spanned<String>, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdoutCfg {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSinkCfg {
    path: String,
    #[serde(default)]
    append: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterCfg {
    r#type: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    append: Option<bool>,
}

/// The keys each component type accepts besides `type`, `inputs` and the policies.
fn specific_keys(role: Role, ty: &str) -> &'static [&'static str] {
    match (role, ty) {
        (Role::Source, "file") => &["path", "format", "max_line_bytes", "project"],
        (Role::Source, "stdin") => &["format", "max_line_bytes", "project"],
        (Role::Source, "generate") => &["count", "rate", "jq"],
        (Role::Transform, "filter") => &["condition"],
        (Role::Transform, "map") => &["jq"],
        (Role::Transform, "route") => &["routes"],
        (Role::Transform, "accumulate") => accumulate::KEYS,
        (Role::Sink, "file") => &["path", "append"],
        _ => &[],
    }
}

fn quoted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn de<T: for<'de> Deserialize<'de>>(value: Spanned<DeValue<'_>>) -> Result<T, toml::de::Error> {
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
    #[error("invalid config ({} problems)", .0.len())]
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
        memory_budget: None,
        components: Vec::new(),
        registry: PolicyRegistry::default(),
        parallelism: BTreeMap::new(),
        dead_letter: None,
    };
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
                    if let Some(c) = read_component(
                        role,
                        n,
                        name.span(),
                        body,
                        dir,
                        allow_recursion,
                        &text,
                        &mut problems,
                    ) {
                        config.components.push(c);
                    }
                }
            }
            "policies" => read_named_policies(value, &mut config, &mut problems),
            "dead_letter" => match de::<DeadLetterCfg>(value.clone()) {
                Ok(d) => match (d.r#type.as_str(), d.path) {
                    ("file", Some(p)) => {
                        config.dead_letter = Some(DeadLetterTarget::File {
                            path: dir.join(p),
                            append: d.append.unwrap_or(false),
                        })
                    }
                    ("file", None) => problems.add(
                        "a `file` dead-letter sink needs a `path`",
                        Some(value.span()),
                        "no path",
                        None,
                    ),
                    ("stderr", path) if path.is_some() || d.append.is_some() => problems.add(
                        "a `stderr` dead-letter sink takes no `path` or `append`",
                        Some(value.span()),
                        "here",
                        Some("use `type = \"file\"` to write dead letters to a file".into()),
                    ),
                    ("stderr", _) => config.dead_letter = Some(DeadLetterTarget::Stderr),
                    (other, _) => problems.add(
                        format!("unknown dead-letter sink type `{other}`"),
                        Some(value.span()),
                        "here",
                        Some("valid types: `file`, `stderr`".into()),
                    ),
                },
                Err(e) => problems.add_toml(&e, value.span(), "dead_letter"),
            },
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

fn jq_span(
    text: &str,
    value_span: &Range<usize>,
    code: &str,
    inner: &Range<usize>,
) -> Range<usize> {
    // The expression sits in the file after its opening quote(s) when written without escapes.
    for quote in [3usize, 1] {
        let start = value_span.start + quote;
        if text.get(start..start + code.len()) == Some(code) {
            return start + inner.start..start + inner.end;
        }
    }
    value_span.clone()
}

fn compile_jq(
    code: &Spanned<String>,
    allow_recursion: bool,
    text: &str,
    what: &str,
    problems: &mut Problems,
) -> Option<Jq> {
    match JqProgram::compile(code.get_ref(), allow_recursion) {
        Ok(p) => Some(Jq {
            program: Arc::new(p),
        }),
        Err(errors) => {
            for e in errors {
                problems.add(
                    format!("{what}: jq expression does not compile: {}", e.message),
                    Some(jq_span(text, &code.span(), code.get_ref(), &e.span)),
                    e.message.clone(),
                    None,
                );
            }
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn read_component(
    role: Role,
    name: String,
    name_span: Range<usize>,
    body: &Spanned<DeValue<'_>>,
    dir: &Path,
    allow_recursion: bool,
    text: &str,
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
    let valid_types = role.types();
    let ty = table.iter().find(|(k, _)| &**k.get_ref() == "type");
    let Some((_, ty_value)) = ty else {
        problems.add(
            format!("`{table_name}.{name}` has no `type`"),
            Some(name_span),
            "missing `type`",
            Some(format!("valid types: {}", quoted(valid_types))),
        );
        return None;
    };
    let Some(ty) = ty_value.get_ref().as_str().map(str::to_owned) else {
        problems.add(
            "`type` must be a string",
            Some(ty_value.span()),
            "not a string",
            Some(format!("valid types: {}", quoted(valid_types))),
        );
        return None;
    };
    if !valid_types.contains(&ty.as_str()) {
        problems.add(
            format!(
                "unknown {} type `{ty}`",
                &table_name[..table_name.len() - 1]
            ),
            Some(ty_value.span()),
            "unknown type",
            Some(format!("valid types: {}", quoted(valid_types))),
        );
        return None;
    }
    let specific = specific_keys(role, &ty);
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
    let before = problems_len(problems);
    for (k, v) in table.iter() {
        let key = &**k.get_ref();
        if key == "type" {
            continue;
        }
        if !valid.contains(&key) {
            problems.add(
                format!(
                    "unknown key `{key}` for a `{ty}` {}",
                    &table_name[..table_name.len() - 1]
                ),
                Some(k.span()),
                "unknown key",
                Some(format!("valid keys: {}", quoted(&valid))),
            );
            continue;
        }
        if key == "inputs" {
            has_inputs = true;
            match de::<Vec<Spanned<String>>>(v.clone()) {
                Ok(list) => {
                    if list.is_empty() {
                        problems.add("`inputs` is empty", Some(v.span()), "no inputs", None);
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
                Err(e) => problems.add_toml(&e, v.span(), "inputs (a list of component names)"),
            }
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
    let ctx = format!("{table_name}.{name}");
    let fail = |e: toml::de::Error, problems: &mut Problems| {
        problems.add_toml(&e, body.span(), &ctx);
        None
    };
    let kind = match (role, ty.as_str()) {
        (Role::Source, "file") => match de::<FileSourceCfg>(rest) {
            Ok(c) => {
                let format = c.format.unwrap_or_else(|| guess_format(&c.path));
                let pattern = dir.join(&c.path).to_string_lossy().into_owned();
                let paths = match glob::glob(&pattern) {
                    Ok(paths) => paths.filter_map(Result::ok).collect(),
                    Err(e) => {
                        problems.add(
                            format!("invalid path pattern: {e}"),
                            Some(body.span()),
                            "here",
                            None,
                        );
                        Vec::new()
                    }
                };
                Some(Kind::FileSource {
                    pattern,
                    paths,
                    format,
                    max_line_bytes: c.max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES),
                    project: c.project.unwrap_or(true),
                })
            }
            Err(e) => fail(e, problems),
        },
        (Role::Source, "stdin") => match de::<StdinCfg>(rest) {
            Ok(c) => Some(Kind::Stdin {
                format: c.format.unwrap_or(Format::Ndjson),
                max_line_bytes: c.max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES),
                project: c.project.unwrap_or(true),
            }),
            Err(e) => fail(e, problems),
        },
        (Role::Source, "generate") => match de::<GenerateCfg>(rest) {
            Ok(c) => {
                if let Some(r) = c.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
                    problems.add(
                        format!("rate must be a positive number of items per second, not {r}"),
                        Some(body.span()),
                        "here",
                        None,
                    );
                }
                let jq = match &c.jq {
                    Some(code) => compile_jq(code, allow_recursion, text, &ctx, problems).map(Some),
                    None => Some(None),
                };
                jq.map(|jq| Kind::Generate {
                    count: c.count,
                    rate: c.rate,
                    jq,
                })
            }
            Err(e) => fail(e, problems),
        },
        (Role::Transform, "filter") => match de::<FilterCfg>(rest) {
            Ok(c) => compile_jq(&c.condition, allow_recursion, text, &ctx, problems)
                .map(|condition| Kind::Filter { condition }),
            Err(e) => fail(e, problems),
        },
        (Role::Transform, "map") => match de::<MapCfg>(rest) {
            Ok(c) => {
                compile_jq(&c.jq, allow_recursion, text, &ctx, problems).map(|jq| Kind::Map { jq })
            }
            Err(e) => fail(e, problems),
        },
        (Role::Transform, "route") => match de::<RouteCfg>(rest) {
            Ok(c) => {
                let mut routes = Vec::new();
                let mut ok = true;
                if c.routes.is_empty() {
                    problems.add("`routes` is empty", Some(body.span()), "no routes", None);
                }
                for (route, code) in &c.routes {
                    let r = route.get_ref();
                    if r == "_unmatched" || r.contains('.') || r.is_empty() {
                        problems.add(
                            format!("`{r}` cannot name a route"),
                            Some(route.span()),
                            "reserved or invalid",
                            Some("`_unmatched` is the output of items no route accepts".into()),
                        );
                        ok = false;
                        continue;
                    }
                    match compile_jq(
                        code,
                        allow_recursion,
                        text,
                        &format!("{ctx}.routes.{r}"),
                        problems,
                    ) {
                        Some(jq) => routes.push((r.clone(), jq)),
                        None => ok = false,
                    }
                }
                ok.then_some(Kind::Route { routes })
            }
            Err(e) => fail(e, problems),
        },
        (Role::Transform, "accumulate") => {
            accumulate::read(rest, &ctx, allow_recursion, text, problems)
                .map(|spec| Kind::Accumulate(Arc::new(spec)))
        }
        (Role::Sink, "stdout") => match de::<StdoutCfg>(rest) {
            Ok(_) => Some(Kind::StdoutSink),
            Err(e) => fail(e, problems),
        },
        (Role::Sink, "file") => match de::<FileSinkCfg>(rest) {
            Ok(c) => Some(Kind::FileSink {
                path: dir.join(c.path),
                append: c.append,
            }),
            Err(e) => fail(e, problems),
        },
        (Role::Sink, "blackhole") => match de::<StdoutCfg>(rest) {
            Ok(_) => Some(Kind::Blackhole),
            Err(e) => fail(e, problems),
        },
        _ => None,
    }?;
    if problems_len(problems) != before {
        return None;
    }
    Some(Component {
        name,
        span: name_span,
        role,
        kind,
        inputs,
        policies: pols,
    })
}

fn problems_len(p: &Problems) -> usize {
    p.len()
}

fn guess_format(path: &str) -> Format {
    if path.ends_with(".csv") {
        Format::Csv
    } else if path.ends_with(".txt") || path.ends_with(".log") {
        Format::Lines
    } else {
        Format::Ndjson
    }
}

/// Output ports a component offers to its consumers.
pub fn outputs_of(c: &Component) -> Vec<String> {
    match &c.kind {
        Kind::Route { routes } => routes
            .iter()
            .map(|(r, _)| r.clone())
            .chain(std::iter::once("_unmatched".to_owned()))
            .collect(),
        _ if c.role == Role::Sink => Vec::new(),
        _ => vec!["out".to_owned()],
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
            match (&target.kind, &input.port) {
                (_, _) if target.role == Role::Sink => problems.add(
                    format!("`{}` is a sink and has no output", target.name),
                    Some(input.span.clone()),
                    "a sink",
                    None,
                ),
                (Kind::Route { .. }, None) => problems.add(
                    format!("`{}` is a route: name one of its outputs", target.name),
                    Some(input.span.clone()),
                    "which output?",
                    Some(format!(
                        "valid: {}",
                        outputs_of(target)
                            .iter()
                            .map(|o| format!("`{}.{o}`", target.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                ),
                (Kind::Route { .. }, Some(port)) if !outputs_of(target).contains(port) => problems
                    .add(
                        format!("route `{}` has no output `{port}`", target.name),
                        Some(input.span.clone()),
                        "unknown output",
                        Some(format!(
                            "valid: {}",
                            outputs_of(target)
                                .iter()
                                .map(|o| format!("`{}.{o}`", target.name))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    ),
                (Kind::Route { .. }, Some(_)) => {}
                (_, Some(port)) => problems.add(
                    format!(
                        "`{}` has a single output; `.{port}` names none",
                        target.name
                    ),
                    Some(input.span.clone()),
                    "unknown output",
                    Some(format!("write `{}`", target.name)),
                ),
                (_, None) => {}
            }
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
