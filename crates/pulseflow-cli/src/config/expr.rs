//! jq expressions in a config: compiled once when the file is read, their errors shown at the
//! offending part of the expression.

use std::ops::Range;
use std::sync::Arc;

use toml::Spanned;

use super::Problems;
use crate::jq::JqProgram;

/// A compiled jq expression of the config.
#[derive(Clone)]
pub struct Jq {
    /// The program, shared by the stages (and workers) that run it.
    pub program: Arc<JqProgram>,
}

/// Where `inner` (a span within the expression `code`) sits in the file, when the
/// expression is written without escapes; else the whole value.
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

/// Compiles `code`; each error becomes a problem of `what` (e.g. `transforms.x`).
pub fn compile_jq(
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
