//! A direct evaluator for the simplest jq expressions, the ones most configs use: field
//! paths (`.a`, `.a.b`), string and number literals, arithmetic and comparisons between them,
//! and object construction (`{id, user, total: (.amount * 2)}`).
//!
//! Each of these yields exactly one value, and every primitive is jaq's own (`ValT::index`,
//! `ops::Math::run`, `ops::Cmp::run`, `ValT::from_num`), so the result is what jaq computes;
//! only jaq's interpreter (boxed iterators per term) is skipped. When a primitive fails
//! (`.a` of a number, `null * 2`, ...) the evaluator gives up and the caller runs the
//! expression with jaq, which reports the error as usual.

use jaq_core::ValT;
use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Term};
use jaq_core::load::{Lexer, Parser};
use jaq_core::ops::{Cmp, Math};
use jaq_core::path::{Opt, Part};
use jaq_json::{Map, Val};

/// An expression the evaluator handles.
#[derive(Debug, Clone)]
pub enum Fast {
    /// `.`, `.a`, `.a.b`, ... (the keys in order).
    Path(Vec<Val>),
    /// A number or string literal.
    Lit(Val),
    /// `l + r`, `l * r`, ...
    Math(Box<Fast>, Math, Box<Fast>),
    /// `l == r`, `l < r`, ...
    Cmp(Box<Fast>, Cmp, Box<Fast>),
    /// `{k: v, ...}` with literal keys, in order.
    Obj(Vec<(Val, Fast)>),
    /// `"text \(f) text"`: interpolated strings and integers (others are left to jaq).
    Interpolate(Vec<Piece>),
}

/// A part of an interpolated string.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Literal text.
    Text(String),
    /// An interpolated expression.
    Value(Fast),
}

/// A string literal without interpolation: its text.
fn literal_str<'s>(term: &Term<&'s str>) -> Option<&'s str> {
    match term {
        Term::Str(None, parts) => match parts.as_slice() {
            [StrPart::Str(s)] => Some(s),
            [] => Some(""),
            _ => None,
        },
        _ => None,
    }
}

fn key(s: &str) -> Val {
    Val::utf8_str(s.to_owned().into_bytes())
}

fn from_term(term: &Term<&str>) -> Option<Fast> {
    Some(match term {
        Term::Id => Fast::Path(Vec::new()),
        Term::Num(n) => Fast::Lit(Val::from_num(n).ok()?),
        Term::Str(None, parts) => match literal_str(term) {
            Some(text) => Fast::Lit(key(text)),
            None => Fast::Interpolate(
                parts
                    .iter()
                    .map(|part| match part {
                        StrPart::Str(s) => Some(Piece::Text((*s).to_owned())),
                        StrPart::Char(c) => Some(Piece::Text(c.to_string())),
                        StrPart::Term(t) => from_term(t).map(Piece::Value),
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
        },
        Term::Path(base, path) => {
            let Term::Id = **base else { return None };
            let keys = path
                .0
                .iter()
                .map(|(part, opt)| match (part, opt) {
                    (Part::Index(k), Opt::Essential) => literal_str(k).map(key),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            Fast::Path(keys)
        }
        Term::BinOp(l, BinaryOp::Math(op), r) => {
            Fast::Math(Box::new(from_term(l)?), *op, Box::new(from_term(r)?))
        }
        Term::BinOp(l, BinaryOp::Cmp(op), r) => {
            Fast::Cmp(Box::new(from_term(l)?), *op, Box::new(from_term(r)?))
        }
        Term::Obj(entries) => Fast::Obj(
            entries
                .iter()
                .map(|(k, v)| {
                    let name = literal_str(k)?;
                    let value = match v {
                        Some(v) => from_term(v)?,
                        // `{a}` is `{a: .a}`.
                        None => Fast::Path(vec![key(name)]),
                    };
                    Some((key(name), value))
                })
                .collect::<Option<Vec<_>>>()?,
        ),
        _ => return None,
    })
}

impl Fast {
    /// The expression of `code`, when the evaluator handles all of it.
    pub fn compile(code: &str) -> Option<Self> {
        let tokens = Lexer::new(code).lex().ok()?;
        let term = Parser::new(&tokens).parse(|p| p.term()).ok()?;
        from_term(&term)
    }

    /// The one value the expression yields for `input`, or `None` when a primitive fails (run
    /// the expression with jaq then, for its error).
    pub fn eval(&self, input: &Val) -> Option<Val> {
        match self {
            Fast::Path(keys) => {
                let mut v = input.clone();
                for k in keys {
                    v = v.index(k).ok()?;
                }
                Some(v)
            }
            Fast::Lit(v) => Some(v.clone()),
            Fast::Math(l, op, r) => op.run(l.eval(input)?, r.eval(input)?).ok(),
            Fast::Cmp(l, op, r) => Some(Val::from(op.run(&l.eval(input)?, &r.eval(input)?))),
            Fast::Obj(entries) => {
                let mut map = Map::with_capacity_and_hasher(entries.len(), Default::default());
                for (k, f) in entries {
                    map.insert(k.clone(), f.eval(input)?);
                }
                Some(Val::obj(map))
            }
            Fast::Interpolate(pieces) => {
                let mut text = Vec::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => text.extend_from_slice(t.as_bytes()),
                        // `tostring` of a string is the string, of an integer its digits.
                        Piece::Value(f) => match f.eval(input)? {
                            Val::TStr(b) => text.extend_from_slice(&b),
                            Val::Num(jaq_json::Num::Int(i)) => {
                                text.extend_from_slice(i.to_string().as_bytes())
                            }
                            _ => return None,
                        },
                    }
                }
                Some(Val::utf8_str(text))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jq::JqProgram;

    /// Every output of jaq, or its error.
    fn jaq(code: &str, input: &Val) -> Result<Vec<Val>, String> {
        let p = JqProgram::compile_without_shortcut(code).expect("compiles");
        let mut out = Vec::new();
        p.run(input, |v| out.push(v))
            .map(|()| out)
            .map_err(|e| e.to_string())
    }

    fn inputs() -> Vec<Val> {
        [
            r#"{"id":7,"user":"ann","amount":12,"ok":true,"n":{"x":1.5}}"#,
            r#"{"id":"x","amount":2.5,"ok":false,"n":null}"#,
            r#"{"amount":null,"ok":0}"#,
            r#"{"amount":"text","n":[1,2]}"#,
            r#"{"amount":9223372036854775807}"#,
            r#"[1,2,3]"#,
            "null",
            "42",
            r#""s""#,
        ]
        .iter()
        .map(|t| crate::json::parse(t).expect("json"))
        .collect()
    }

    #[test]
    fn agrees_with_jaq_or_defers_to_it() {
        let programs = [
            ".",
            ".ok",
            ".n.x",
            r#"."amount""#,
            "{id, user, amount: (.amount * 2)}",
            "{id, id: 3, \"q\": .n}",
            ".amount * 2",
            ".amount + 1.5",
            ".amount - .id",
            ".amount / 3",
            ".amount % 5",
            ".amount > 10",
            ".id == 7",
            ".user != \"ann\"",
            "2 * 3 + 1",
            "\"lit\"",
            "{}",
            r#""user\(.id % 7)""#,
            r#""a\(.id)-\(.user)\n\(.amount)""#,
            r#"{k: "\(.user)!"}"#,
            r#""""#,
        ];
        for code in programs {
            let fast = Fast::compile(code).unwrap_or_else(|| panic!("{code} not handled"));
            for input in inputs() {
                let expected = jaq(code, &input);
                match fast.eval(&input) {
                    Some(v) => assert_eq!(expected, Ok(vec![v]), "{code} on {input}"),
                    // Interpolation leaves values other than strings and integers to jaq;
                    // everything else defers only what jaq refuses.
                    None => assert!(
                        expected.is_err() || code.contains("\\("),
                        "{code} on {input}: deferred but jaq gives {expected:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn evaluates_the_usual_shapes_itself() {
        let input = &inputs()[0];
        let eval = |code: &str| Fast::compile(code).and_then(|f| f.eval(input));
        assert_eq!(eval(r#""user\(.id % 7)""#), Some(key("user0")));
        assert_eq!(eval(".ok"), Some(Val::Bool(true)));
        let shaped = eval("{id, user, amount: (.amount * 2)}").expect("evaluated");
        assert_eq!(
            shaped,
            crate::json::parse(r#"{"id":7,"user":"ann","amount":24}"#).expect("json")
        );
    }

    #[test]
    fn leaves_the_rest_to_jaq() {
        for code in [
            ".a?",
            ".[0]",
            ".a[]",
            ".a, .b",
            ".a // 1",
            ".a | .b",
            "{(.k): 1}",
            "{$x}",
            "\"\\(.a | length)\"",
            "@base64 \"\\(.a)\"",
            ".a and .b",
            "length",
            "def f: .; f",
            "-.a",
        ] {
            assert!(Fast::compile(code).is_none(), "{code}");
        }
    }
}
