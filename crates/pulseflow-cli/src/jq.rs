//! jq expressions on `jaq`: compiled once per stage, run per item.
//!
//! Filters come from configuration files that may not be trusted, and `jaq` has no recursion
//! limit: a recursive filter can overflow the stack and abort the process. Unless the config
//! allows it (`allow_recursive_jq = true`), filters that define functions or use the
//! unbounded recursive builtins are rejected when compiled, and every run is capped in the
//! number of outputs it may yield per item.

use std::ops::Range;

use jaq_core::data::JustLut;
use jaq_core::load::lex::{StrPart, Tok, Token};
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, unwrap_valr};
use jaq_json::Val;
use serde_json::Value;

/// Most outputs one run of a filter may yield for one input.
pub const MAX_OUTPUTS: usize = 100_000;

/// Words that start unbounded recursion in jq.
const RECURSIVE: &[&str] = &["def", "recurse", "repeat", "while", "until"];

/// A compiled jq filter, shareable between workers.
pub struct JqProgram {
    filter: jaq_core::Filter<JustLut<Val>>,
    /// The same expression for the direct evaluator, when it handles it.
    fast: Option<crate::jq_fast::Fast>,
    /// The entries of `fast` that may move their value out of a consumed input.
    moves: Vec<bool>,
}

/// A jq expression that does not compile: what is wrong and where, as byte offsets in the
/// expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JqError {
    /// What is wrong.
    pub message: String,
    /// Where, in the expression's text.
    pub span: Range<usize>,
}

/// A jq run that failed on an item.
#[derive(Debug, thiserror::Error)]
#[error("jq: {0}")]
pub struct JqRunError(pub String);

impl JqProgram {
    /// Parses and compiles `code`; returns every problem found.
    pub fn compile(code: &str, allow_recursion: bool) -> Result<Self, Vec<JqError>> {
        let span = |part: &str| {
            let start = (part.as_ptr() as usize).saturating_sub(code.as_ptr() as usize);
            let start = start.min(code.len());
            start..(start + part.len().max(1)).min(code.len().max(start + 1))
        };
        if !allow_recursion {
            if let Ok(tokens) = jaq_core::load::lex::Lexer::new(code).lex() {
                let mut found = Vec::new();
                recursive_words(&tokens, &mut found);
                if !found.is_empty() {
                    return Err(found
                        .into_iter()
                        .map(|w| JqError {
                            message: format!(
                                "`{w}` can recurse without bound; set `allow_recursive_jq = true` at the top of the config to allow it"
                            ),
                            span: span(w),
                        })
                        .collect());
                }
            }
        }
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errors| {
                let mut out = Vec::new();
                for (_, e) in errors {
                    match e {
                        jaq_core::load::Error::Io(v) => {
                            out.extend(v.into_iter().map(|(s, m)| JqError {
                                message: m,
                                span: span(s),
                            }))
                        }
                        jaq_core::load::Error::Lex(v) => {
                            out.extend(v.into_iter().map(|(expect, s)| JqError {
                                message: format!("expected {}", expect.as_str()),
                                span: span(s),
                            }))
                        }
                        jaq_core::load::Error::Parse(v) => {
                            out.extend(v.into_iter().map(|(expect, s)| JqError {
                                message: format!(
                                    "expected {}{}",
                                    expect.as_str(),
                                    if s.is_empty() {
                                        " before the end".to_owned()
                                    } else {
                                        format!(", found `{s}`")
                                    }
                                ),
                                span: span(s),
                            }))
                        }
                    }
                }
                out
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                errors
                    .into_iter()
                    .flat_map(|(_, v)| v)
                    .map(|(s, undefined)| JqError {
                        message: format!("undefined {} `{s}`", undefined.as_str()),
                        span: span(s),
                    })
                    .collect::<Vec<_>>()
            })?;
        let fast = crate::jq_fast::Fast::compile(code);
        let moves = fast.as_ref().map(|f| f.movable()).unwrap_or_default();
        Ok(Self {
            filter,
            fast,
            moves,
        })
    }

    /// Compiles `code` to run with jaq only (to compare the direct evaluator with).
    #[cfg(test)]
    pub fn compile_without_shortcut(code: &str) -> Result<Self, Vec<JqError>> {
        Self::compile(code, true).map(|p| Self {
            fast: None,
            moves: Vec::new(),
            ..p
        })
    }

    /// The top-level fields of its input the filter reads, when that is all it reads: the
    /// direct evaluator handles the whole expression and it never uses the input as a whole
    /// (`.`). Its results then depend on those fields alone (and on whether the input is an
    /// object), so an object reduced to them gives the same results, errors included.
    pub fn fields(&self) -> Option<Vec<Val>> {
        self.fast.as_ref().and_then(crate::jq_fast::Fast::fields)
    }

    /// The value of the direct evaluator, when it handles the expression and the input.
    fn direct(&self, input: &Val) -> Option<Val> {
        self.fast.as_ref().and_then(|f| f.eval(input))
    }

    /// The value of the direct evaluator for an input that is dropped afterwards: values
    /// only copied into the output are moved out of `input` instead. `None` (input untouched)
    /// when the evaluator does not handle it: run [`JqProgram::run_jaq`] then.
    pub fn direct_consuming(&self, input: &mut Val) -> Option<Val> {
        self.fast
            .as_ref()
            .and_then(|f| f.eval_consuming(&self.moves, input))
    }

    /// Runs the filter on `input`, calling `emit` for each output; stops at the first error.
    pub fn run(&self, input: &Val, emit: impl FnMut(Val)) -> Result<(), JqRunError> {
        if let Some(v) = self.direct(input) {
            let mut emit = emit;
            emit(v);
            return Ok(());
        }
        self.run_jaq(input, emit)
    }

    /// Runs the filter with jaq itself (no direct evaluation).
    pub fn run_jaq(&self, input: &Val, mut emit: impl FnMut(Val)) -> Result<(), JqRunError> {
        let input = input.clone();
        let ctx = Ctx::<JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        for (n, out) in self
            .filter
            .id
            .run((ctx, input))
            .map(unwrap_valr)
            .enumerate()
        {
            if n >= MAX_OUTPUTS {
                return Err(JqRunError(format!(
                    "more than {MAX_OUTPUTS} outputs for one item"
                )));
            }
            match out {
                Ok(v) => emit(v),
                Err(e) => return Err(JqRunError(e.to_string())),
            }
        }
        Ok(())
    }

    /// Whether any output of the filter on `input` is truthy (neither `null` nor `false`).
    pub fn test(&self, input: &Val) -> Result<bool, JqRunError> {
        if let Some(v) = self.direct(input) {
            return Ok(!matches!(v, Val::Null | Val::Bool(false)));
        }
        let input = input.clone();
        let mut hit = false;
        let ctx = Ctx::<JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        for (n, out) in self
            .filter
            .id
            .run((ctx, input))
            .map(unwrap_valr)
            .enumerate()
        {
            if n >= MAX_OUTPUTS {
                return Err(JqRunError(format!(
                    "more than {MAX_OUTPUTS} outputs for one item"
                )));
            }
            match out {
                Ok(v) => {
                    if !matches!(v, Val::Null | Val::Bool(false)) {
                        hit = true;
                        break;
                    }
                }
                Err(e) => return Err(JqRunError(e.to_string())),
            }
        }
        Ok(hit)
    }
}

fn recursive_words<'a>(tokens: &[Token<&'a str>], found: &mut Vec<&'a str>) {
    for Token(s, tok) in tokens {
        match tok {
            Tok::Word if RECURSIVE.contains(s) => found.push(s),
            Tok::Block(inner) => recursive_words(inner, found),
            Tok::Str(parts) => {
                for part in parts {
                    if let StrPart::Term(t) = part {
                        recursive_words(std::slice::from_ref(t), found);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Converts a JSON value into a jq value.
pub fn to_val(value: &Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Val::Num(jaq_json::Num::from_integral(i))
            } else if let Some(u) = n.as_u64() {
                Val::Num(jaq_json::Num::from_integral(u))
            } else {
                Val::Num(jaq_json::Num::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Val::utf8_str(s.clone().into_bytes()),
        Value::Array(a) => a.iter().map(to_val).collect(),
        Value::Object(o) => Val::obj(
            o.iter()
                .map(|(k, v)| (Val::utf8_str(k.clone().into_bytes()), to_val(v)))
                .collect(),
        ),
    }
}

/// Converts a jq value into a JSON value (byte strings become text, lossily; non-finite
/// numbers become `null`, as jq prints them).
pub fn from_val(value: Val) -> Value {
    match value {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(b),
        Val::Num(n) => num_to_json(&n),
        Val::TStr(b) | Val::BStr(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        Val::Arr(a) => Value::Array(
            std::sync::Arc::unwrap_or_clone(a)
                .into_iter()
                .map(from_val)
                .collect(),
        ),
        Val::Obj(o) => Value::Object(
            std::sync::Arc::unwrap_or_clone(o)
                .into_iter()
                .map(|(k, v)| (key_string(k), from_val(v)))
                .collect(),
        ),
    }
}

fn key_string(k: Val) -> String {
    match k {
        Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(&b).into_owned(),
        other => other.to_string(),
    }
}

/// A jq number as the `serde_json` number it converts to (`null` when it has none).
pub fn num_to_json(n: &jaq_json::Num) -> Value {
    match n {
        jaq_json::Num::Int(i) => Value::from(*i as i64),
        jaq_json::Num::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        other => {
            let text = other.to_string();
            serde_json::from_str::<Value>(&text)
                .ok()
                .filter(Value::is_number)
                .or_else(|| {
                    text.parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map(Value::Number)
                })
                .unwrap_or(Value::Null)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &str, input: Value) -> Vec<Value> {
        let p = JqProgram::compile(code, false).expect("compiles");
        let mut out = Vec::new();
        p.run(&to_val(&input), |v| out.push(from_val(v)))
            .expect("runs");
        out
    }

    #[test]
    fn maps_and_yields_many() {
        let input = serde_json::json!({"a": [1, 2.5, "x"], "b": null});
        assert_eq!(
            run(".a[]", input.clone()),
            vec![
                serde_json::json!(1),
                serde_json::json!(2.5),
                serde_json::json!("x")
            ]
        );
        assert_eq!(
            run("{b, n: (.a | length)}", input),
            vec![serde_json::json!({"b": null, "n": 3})]
        );
    }

    #[test]
    fn errors_have_positions() {
        let errs = JqProgram::compile(".a | nosuch(1)", false)
            .err()
            .expect("fails");
        assert_eq!(errs[0].span.start, 5, "{errs:?}");
        let errs = JqProgram::compile(".a | (", false).err().expect("fails");
        assert!(!errs.is_empty());
    }

    #[test]
    fn recursion_is_refused_unless_allowed() {
        let errs = JqProgram::compile("def f: f; f", false)
            .err()
            .expect("refused");
        assert_eq!(errs[0].span, 0..3);
        assert!(JqProgram::compile("[limit(3; repeat(1))]", true).is_ok());
        assert!(JqProgram::compile("\"\\(recurse(.a))\"", false).is_err());
    }

    #[test]
    fn test_is_truthiness() {
        let p = JqProgram::compile(".n > 1", false).expect("compiles");
        assert!(p.test(&to_val(&serde_json::json!({"n": 2}))).expect("ok"));
        assert!(!p.test(&to_val(&serde_json::json!({"n": 0}))).expect("ok"));
    }
}
