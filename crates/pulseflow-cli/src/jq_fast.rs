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
use jaq_json::{Map, Rc, Val};

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
    // Interned like the keys of parsed objects, so looking a key up compares addresses first.
    Val::utf8_str(crate::json::intern(s))
}

static NULL: Val = Val::Null;

/// Whether two object keys are equal (`Val`'s equality: the bytes of two strings).
fn same_key(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::TStr(x) | Val::BStr(x), Val::TStr(y) | Val::BStr(y)) => {
            (x.as_ptr() == y.as_ptr() && x.len() == y.len()) || x[..] == y[..]
        }
        _ => a == b,
    }
}

/// Objects with at most this many keys are searched in order instead of hashing the key.
const SCAN: usize = 12;

/// `.k` of `v` without cloning: its value, `null` when missing or when `v` is `null` (as
/// `ValT::index`), `None` for the values jaq refuses to index with a string.
fn field<'a>(v: &'a Val, k: &Val) -> Option<&'a Val> {
    match v {
        Val::Obj(o) if o.len() <= SCAN => Some(
            o.iter()
                .find(|(key, _)| same_key(key, k))
                .map_or(&NULL, |(_, v)| v),
        ),
        Val::Obj(o) => Some(o.get(k).unwrap_or(&NULL)),
        Val::Null => Some(&NULL),
        _ => None,
    }
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

    /// Counts, for each key, the paths of the expression that start with it; `true` when the
    /// expression reads the whole input (`.`).
    fn reads(&self, counts: &mut Vec<(Val, usize)>) -> bool {
        match self {
            Fast::Path(keys) => match keys.first() {
                None => true,
                Some(k) => {
                    match counts.iter_mut().find(|(c, _)| c == k) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((k.clone(), 1)),
                    }
                    false
                }
            },
            Fast::Lit(_) => false,
            Fast::Math(l, _, r) | Fast::Cmp(l, _, r) => {
                // Both sides, always.
                let l = l.reads(counts);
                r.reads(counts) || l
            }
            Fast::Obj(entries) => entries
                .iter()
                .fold(false, |whole, (_, f)| f.reads(counts) || whole),
            Fast::Interpolate(pieces) => pieces.iter().fold(false, |whole, p| match p {
                Piece::Text(_) => whole,
                Piece::Value(f) => f.reads(counts) || whole,
            }),
        }
    }

    /// The top-level fields of the input the expression reads (`.a.b` reads `a`), in order of
    /// first use; `None` when it reads the input as a whole (`.`).
    pub fn fields(&self) -> Option<Vec<Val>> {
        let mut counts = Vec::new();
        if self.reads(&mut counts) {
            return None;
        }
        Some(counts.into_iter().map(|(k, _)| k).collect())
    }

    /// For an object construction, which of its entries may take their value out of the input
    /// instead of copying it ([`Fast::eval_consuming`]): entries `k: .f` where nothing else in
    /// the expression reads `.f` and the object has no repeated key. Empty otherwise.
    pub fn movable(&self) -> Vec<bool> {
        let Fast::Obj(entries) = self else {
            return Vec::new();
        };
        let mut counts = Vec::new();
        if self.reads(&mut counts) {
            return Vec::new();
        }
        let distinct = entries
            .iter()
            .enumerate()
            .all(|(i, (k, _))| entries[..i].iter().all(|(o, _)| o != k));
        if !distinct {
            return Vec::new();
        }
        let moves: Vec<bool> = entries
            .iter()
            .map(|(_, f)| match f {
                Fast::Path(keys) => match keys.as_slice() {
                    [k] => counts.iter().any(|(c, n)| c == k && *n == 1),
                    _ => false,
                },
                _ => false,
            })
            .collect();
        if moves.contains(&true) {
            moves
        } else {
            Vec::new()
        }
    }

    /// As [`Fast::eval`], but the entries `moves` marks (from [`Fast::movable`]) take their
    /// value out of `input` when nothing else holds it (leaving `null` there): for an input
    /// that is dropped right after. `input` is left as it was when `None` is returned.
    pub fn eval_consuming(&self, moves: &[bool], input: &mut Val) -> Option<Val> {
        let Fast::Obj(entries) = self else {
            return self.eval(input);
        };
        if moves.len() != entries.len() {
            return self.eval(input);
        }
        // The keys are distinct (`movable`), so entry `i` is at index `i` of `map`. A map
        // given back by a stage that dropped an object with these keys has them already
        // (values `null`): no key is allocated or hashed then.
        let mut out = crate::json::pooled(|m| {
            m.len() == entries.len() && m.keys().zip(entries).all(|(a, (b, _))| same_key(a, b))
        })
        .unwrap_or_else(|| {
            Rc::new(Map::with_capacity_and_hasher(
                entries.len(),
                Default::default(),
            ))
        });
        // Nothing else holds a pooled map, nor a new one.
        let map = Rc::get_mut(&mut out)?;
        if map.len() == entries.len() {
            for (((_, f), moved), slot) in entries.iter().zip(moves).zip(map.values_mut()) {
                if !*moved {
                    *slot = f.eval(input)?;
                }
            }
        } else {
            for ((k, f), moved) in entries.iter().zip(moves) {
                let v = if *moved { Val::Null } else { f.eval(input)? };
                map.insert(k.clone(), v);
            }
        }
        let moved_keys =
            entries
                .iter()
                .zip(moves)
                .enumerate()
                .filter_map(|(i, ((_, f), m))| match (m, f) {
                    (true, Fast::Path(keys)) => keys.first().map(|k| (i, k)),
                    _ => None,
                });
        match input {
            // Every field of `null` is `null`, already in place.
            Val::Null => {}
            Val::Obj(o) => {
                if Rc::get_mut(o).is_none() {
                    // Shared: copy, as `eval` does.
                    for (i, k) in moved_keys {
                        if let (Some(v), Some((_, slot))) = (o.get(k), map.get_index_mut(i)) {
                            *slot = v.clone();
                        }
                    }
                } else if let Some(fields) = Rc::get_mut(o) {
                    for (i, k) in moved_keys {
                        let found = if fields.len() <= SCAN {
                            fields
                                .iter_mut()
                                .find(|(key, _)| same_key(key, k))
                                .map(|(_, v)| v)
                        } else {
                            fields.get_mut(k)
                        };
                        if let (Some(v), Some((_, slot))) = (found, map.get_index_mut(i)) {
                            *slot = std::mem::take(v);
                        }
                    }
                }
            }
            _ => return None,
        }
        Some(Val::Obj(out))
    }

    /// The one value the expression yields for `input`, or `None` when a primitive fails (run
    /// the expression with jaq then, for its error).
    pub fn eval(&self, input: &Val) -> Option<Val> {
        match self {
            Fast::Path(keys) => {
                let mut v = input;
                for k in keys {
                    v = field(v, k)?;
                }
                Some(v.clone())
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
    fn consuming_agrees_with_jaq_and_leaves_refused_inputs_alone() {
        let programs = [
            "{id, user, amount: (.amount * 2)}",
            "{id, user: .user, again: .id}",
            "{a: .n, b: .n.x}",
            "{id, id: 3}",
            "{whole: ., id}",
            "{user, k: \"\\(.user)!\"}",
            "{x: .amount, y: (.amount > 1)}",
            "{n}",
            ".user",
        ];
        for code in programs {
            let fast = Fast::compile(code).unwrap_or_else(|| panic!("{code} not handled"));
            let moves = fast.movable();
            for input in inputs() {
                let expected = jaq(code, &input);
                // Owned by this test alone, so values move; and shared, so they are copied.
                let mut owned = crate::json::parse(&input.to_string()).expect("json");
                let mut shared = input.clone();
                for (what, target) in [("owned", &mut owned), ("shared", &mut shared)] {
                    match fast.eval_consuming(&moves, target) {
                        Some(v) => assert_eq!(expected, Ok(vec![v]), "{code} on {input} ({what})"),
                        None => {
                            assert_eq!(*target, input, "{code} on {input} ({what}) changed");
                            assert!(
                                expected.is_err() || code.contains("\\("),
                                "{code} on {input}: deferred but jaq gives {expected:?}"
                            );
                        }
                    }
                }
                assert_eq!(shared, input, "{code}: a shared input changed");
                // Outputs and inputs given back: the next runs may build in their maps.
                crate::json::recycle(owned);
                if let Ok([v]) = expected.as_deref() {
                    crate::json::recycle(v.clone());
                    let mut again = crate::json::parse(&input.to_string()).expect("json");
                    if let Some(out) = fast.eval_consuming(&moves, &mut again) {
                        assert_eq!(out, *v, "{code} on {input} (in a given-back map)");
                        crate::json::recycle(out);
                    }
                }
            }
        }
        let moves = |code: &str| Fast::compile(code).map(|f| f.movable());
        assert_eq!(
            moves("{id, user, amount: (.amount * 2)}"),
            Some(vec![true, true, false])
        );
        assert_eq!(moves("{id, again: .id}"), Some(vec![]));
        assert_eq!(moves("{whole: ., id}"), Some(vec![]));
        assert_eq!(moves("{id, id: 3}"), Some(vec![]));
        assert_eq!(moves("{a: .n, b: .n.x}"), Some(vec![]));
    }

    #[test]
    fn interned_keys_are_found_by_address_or_bytes() {
        let parsed = crate::json::parse(r#"{"id":1,"user":"u"}"#).expect("json");
        let copied = Val::utf8_str(b"user".to_vec());
        assert_eq!(field(&parsed, &key("user")), Some(&key("u")));
        assert_eq!(field(&parsed, &copied), Some(&key("u")));
        assert_eq!(field(&parsed, &key("none")), Some(&Val::Null));
        assert_eq!(field(&Val::Null, &key("id")), Some(&Val::Null));
        assert_eq!(field(&Val::Bool(true), &key("id")), None);
        let long = "k".repeat(200);
        assert_eq!(crate::json::intern(&long), bytes::Bytes::from(long.clone()));
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
