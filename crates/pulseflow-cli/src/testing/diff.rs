//! What a test expected against what its run did: one line per difference, items as JSON
//! text (`-` expected but missing, `+` produced but not expected).

use std::collections::BTreeMap;

use serde_json::Value;

use super::run::Outcome;
use super::spec::{Count, TestSpec};

/// `value` with every whole number written as an integer (`600.0` and `600` compare equal).
fn normalize(value: &Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => value.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
        }
        other => other.clone(),
    }
}

fn texts(items: &[Value]) -> Vec<String> {
    items.iter().map(|v| normalize(v).to_string()).collect()
}

/// Lines `-` (in `expected` only) and `+` (in `actual` only), as multisets.
fn unordered(expected: &[String], actual: &[String]) -> Vec<String> {
    let mut left: BTreeMap<&str, i64> = BTreeMap::new();
    for e in expected {
        *left.entry(e).or_default() += 1;
    }
    for a in actual {
        *left.entry(a).or_default() -= 1;
    }
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    for (text, n) in left {
        let (sign, lines) = if n > 0 {
            ('-', &mut missing)
        } else {
            ('+', &mut extra)
        };
        for _ in 0..n.unsigned_abs() {
            lines.push(format!("  {sign} {text}"));
        }
    }
    missing.extend(extra);
    missing
}

/// The differences between what `test` expects and `outcome`; empty when it passes.
pub fn differences(test: &TestSpec, outcome: &Outcome) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &outcome.error {
        out.push(format!("the pipeline failed: {e}"));
    }
    for o in &test.outputs {
        let expected = texts(&o.items);
        let actual = texts(outcome.outputs.get(&o.from).map_or(&[][..], Vec::as_slice));
        let diff = unordered(&expected, &actual);
        if !diff.is_empty() {
            out.push(format!(
                "outputs at `{}`: expected {} items, got {}",
                o.from,
                expected.len(),
                actual.len()
            ));
            out.extend(diff);
        } else if o.ordered && expected != actual {
            out.push(format!(
                "outputs at `{}`: the same items in another order",
                o.from
            ));
            out.extend(expected.iter().map(|e| format!("  - {e}")));
            out.extend(actual.iter().map(|a| format!("  + {a}")));
        }
    }
    out.extend(dead_letters(test, outcome));
    for (counter, count) in &test.counts {
        match count {
            Count::Total(n) => {
                let got = outcome.total(counter);
                if got != *n {
                    out.push(format!("{counter}: expected {n}, got {got}"));
                }
            }
            Count::ByStage(stages) => {
                for (stage, n) in stages {
                    match outcome.stage_counts.get(stage) {
                        None => out.push(format!("{counter} at `{stage}`: there is no such stage")),
                        Some(c) => {
                            let got = c.get(*counter).copied().unwrap_or(0);
                            if got != *n {
                                out.push(format!(
                                    "{counter} at `{stage}`: expected {n}, got {got}"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Each dead letter must match an expectation (stage equal, error containing its text), and
/// each expectation its count of them.
fn dead_letters(test: &TestSpec, outcome: &Outcome) -> Vec<String> {
    let mut matched = vec![0u64; test.dead_letters.len()];
    let mut unexpected = Vec::new();
    for (stage, error) in &outcome.dead_letters {
        let found = test.dead_letters.iter().enumerate().position(|(i, d)| {
            d.stage == *stage && error.contains(&d.error) && matched[i] < d.count
        });
        match found {
            Some(i) => matched[i] += 1,
            None => unexpected.push(format!("  + {stage}: {error}")),
        }
    }
    let mut out = Vec::new();
    let missing: Vec<String> = test
        .dead_letters
        .iter()
        .zip(&matched)
        .filter(|(d, n)| **n < d.count)
        .map(|(d, n)| {
            format!(
                "  - {} more at {} with an error containing {:?}",
                d.count - n,
                d.stage,
                d.error
            )
        })
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        out.push(format!(
            "dead letters: expected {}, got {}",
            test.dead_letters.iter().map(|d| d.count).sum::<u64>(),
            outcome.dead_letters.len()
        ));
        out.extend(missing);
        out.extend(unexpected);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_floats_equal_integers_and_order_is_ignored_by_default() {
        let expected = texts(&[json!({"a": 600}), json!([1, 2.5])]);
        let actual = texts(&[json!([1.0, 2.5]), json!({"a": 600.0})]);
        assert!(unordered(&expected, &actual).is_empty());
    }

    #[test]
    fn missing_and_unexpected_items_are_marked() {
        let expected = texts(&[json!(1), json!(2), json!(2)]);
        let actual = texts(&[json!(2), json!(3)]);
        assert_eq!(unordered(&expected, &actual), ["  - 1", "  - 2", "  + 3"]);
    }
}
