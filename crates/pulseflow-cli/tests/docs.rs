//! Keeps `docs/config.md` honest: every complete ```toml example in it must pass
//! `pulseflow validate` (and `pulseflow test`, when it has `[[tests]]`), and every component
//! type, key (of `[[tests]]` too), aggregate function and dead-letter type that the parser
//! accepts must be documented.
//!
//! Fences: ```toml is a complete pipeline (validated); ```toml fragment is a piece of one
//! (skipped). Any other info string starting with `toml` is refused, so a typo cannot skip an
//! example silently.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pulseflow"));
    c.env("NO_COLOR", "1");
    c
}

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md")
}

fn doc() -> String {
    let path = doc_path();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fenced TOML block: the line of its opening fence (from 1), whether it is a fragment,
/// and its text.
struct Block {
    line: usize,
    fragment: bool,
    text: String,
}

fn toml_blocks(doc: &str) -> Vec<Block> {
    enum State {
        Outside,
        /// In a fence of another language.
        Other,
        Toml(Block),
    }
    let mut blocks = Vec::new();
    let mut state = State::Outside;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim();
        state = match state {
            State::Toml(block) if trimmed == "```" => {
                blocks.push(block);
                State::Outside
            }
            State::Toml(mut block) => {
                block.text.push_str(line);
                block.text.push('\n');
                State::Toml(block)
            }
            State::Other if trimmed == "```" => State::Outside,
            State::Other => State::Other,
            State::Outside => match trimmed.strip_prefix("```") {
                None => State::Outside,
                Some(info) => match info.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["toml"] => State::Toml(Block {
                        line: i + 1,
                        fragment: false,
                        text: String::new(),
                    }),
                    ["toml", "fragment"] => State::Toml(Block {
                        line: i + 1,
                        fragment: true,
                        text: String::new(),
                    }),
                    [first, ..] if first.starts_with("toml") => panic!(
                        "docs/config.md:{}: unknown fence `{trimmed}` (write ```toml or ```toml fragment)",
                        i + 1
                    ),
                    _ => State::Other,
                },
            },
        };
    }
    assert!(
        matches!(state, State::Outside),
        "docs/config.md: a fenced block is not closed"
    );
    blocks
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn validate(dir: &Path, file: &str, text: &str) -> Output {
    std::fs::write(dir.join(file), text).expect("write config");
    bin()
        .args(["validate", file])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

#[test]
fn every_complete_toml_example_validates() {
    let doc = doc();
    let blocks = toml_blocks(&doc);
    let full: Vec<&Block> = blocks.iter().filter(|b| !b.fragment).collect();
    let fragments = blocks.len() - full.len();
    assert!(full.len() >= 10, "only {} complete examples", full.len());
    assert!(
        fragments <= full.len() / 3,
        "{fragments} fragments for {} complete examples: keep fragments few",
        full.len()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for block in full {
        let file = format!("example-line-{}.toml", block.line);
        let out = validate(tmp.path(), &file, &block.text);
        if out.status.code() != Some(0) {
            failures.push(format!(
                "docs/config.md:{}: the example does not validate (exit {:?}):\n{}",
                block.line,
                out.status.code(),
                stderr(&out)
            ));
        } else if block.text.contains("[[tests]]") {
            let out = bin()
                .args(["test", &file])
                .current_dir(tmp.path())
                .stdin(Stdio::null())
                .output()
                .expect("binary runs");
            if out.status.code() != Some(0) {
                failures.push(format!(
                    "docs/config.md:{}: the example's tests do not pass:\n{}",
                    block.line,
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The backquoted words of every help line of `report` that starts with `help: {what}:`,
/// continuation lines included.
fn listed(report: &str, what: &str) -> Vec<BTreeSet<String>> {
    let prefix = format!("help: {what}:");
    let mut lists = Vec::new();
    let mut lines = report.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix(&prefix) else {
            continue;
        };
        let mut text = rest.to_owned();
        while let Some(next) = lines.peek() {
            if !next.trim_start().starts_with('`') {
                break;
            }
            text.push(' ');
            text.push_str(next.trim());
            lines.next();
        }
        let words = text
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        lists.push(words);
    }
    lists
}

/// Runs `validate` on a config that must be refused and returns its report.
fn refused(text: &str) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = validate(tmp.path(), "probe.toml", text);
    assert_eq!(out.status.code(), Some(2), "probe accepted:\n{text}");
    stderr(&out)
}

fn assert_documented(doc: &str, what: &str, words: &BTreeSet<String>) {
    let missing: Vec<&String> = words
        .iter()
        .filter(|w| !doc.contains(&format!("`{w}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "{what} accepted by the parser but not in docs/config.md: {missing:?}"
    );
}

const PROBE_KEY: &str = "zz_docs_probe";

#[test]
fn every_type_and_key_the_parser_accepts_is_documented() {
    let doc = doc();
    // Component types, as the parser lists them for an unknown type.
    let report = refused(
        "[sources.s]\ntype = \"?\"\n\
         [transforms.t]\ntype = \"?\"\ninputs = [\"s\"]\n\
         [sinks.k]\ntype = \"?\"\ninputs = [\"t\"]\n\
         [dead_letter]\ntype = \"?\"\n",
    );
    let types = listed(&report, "valid types");
    assert_eq!(types.len(), 4, "{report}");
    let roles = ["sources", "transforms", "sinks"];
    // Each report names the role in its message; match the lists to their roles by content.
    let of_role = |role: &str| -> BTreeSet<String> {
        let marker = match role {
            "sources" => "generate",
            "transforms" => "filter",
            "sinks" => "blackhole",
            _ => "stderr",
        };
        types
            .iter()
            .find(|t| t.contains(marker))
            .cloned()
            .unwrap_or_else(|| panic!("no list of {role} types in:\n{report}"))
    };

    // Every (role, type) has a complete example declaring it.
    let mut examples: BTreeSet<(String, String)> = BTreeSet::new();
    for block in toml_blocks(&doc).iter().filter(|b| !b.fragment) {
        let table: toml::Table = block
            .text
            .parse()
            .unwrap_or_else(|e| panic!("docs/config.md:{}: {e}", block.line));
        for role in roles {
            let Some(components) = table.get(role).and_then(toml::Value::as_table) else {
                continue;
            };
            for body in components.values() {
                if let Some(ty) = body.get("type").and_then(toml::Value::as_str) {
                    examples.insert((role.to_owned(), ty.to_owned()));
                }
            }
        }
        if let Some(ty) = table
            .get("dead_letter")
            .and_then(|d| d.get("type"))
            .and_then(toml::Value::as_str)
        {
            examples.insert(("dead_letter".to_owned(), ty.to_owned()));
        }
    }
    let mut all_types = Vec::new();
    for role in roles.iter().chain(&["dead_letter"]) {
        for ty in of_role(role) {
            all_types.push((role.to_string(), ty));
        }
    }
    let missing: Vec<_> = all_types
        .iter()
        .filter(|t| !examples.contains(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "types without a complete example in docs/config.md: {missing:?}"
    );

    // Keys of each component type, as the parser lists them for an unknown key.
    let mut probe = String::new();
    let mut expected_lists = 0;
    for (role, ty) in all_types.iter().filter(|(r, _)| r != "dead_letter") {
        let inputs = if role == "sources" {
            ""
        } else {
            "inputs = [\"x\"]\n"
        };
        probe.push_str(&format!(
            "[{role}.probe_{expected_lists}]\ntype = \"{ty}\"\n{inputs}{PROBE_KEY} = 1\n"
        ));
        expected_lists += 1;
    }
    // And the top-level keys (before any table).
    let report = refused(&format!("{PROBE_KEY}_top = 1\n{probe}"));
    let keys = listed(&report, "valid keys");
    assert!(keys.len() > expected_lists, "{report}");
    let keys: BTreeSet<String> = keys.into_iter().flatten().collect();
    assert!(keys.contains("name") && keys.contains("complete_when"));
    assert_documented(&doc, "keys", &keys);

    // Keys of `[[tests]]` and of the tables in it.
    let report = refused(&format!(
        "[sources.s]\ntype = \"stdin\"\n\
         [sinks.k]\ntype = \"blackhole\"\ninputs = [\"s\"]\n\
         [[tests]]\nname = \"t\"\n{PROBE_KEY} = 1\n\
         counts = {{ {PROBE_KEY} = 1 }}\n\
         inputs = [{{ into = \"s\", {PROBE_KEY} = 1 }}]\n\
         outputs = [{{ from = \"s\", {PROBE_KEY} = 1 }}]\n\
         dead_letters = [{{ stage = \"s\", {PROBE_KEY} = 1 }}]\n"
    ));
    let test_keys = listed(&report, "valid keys");
    assert_eq!(test_keys.len(), 5, "{report}");
    let test_keys: BTreeSet<String> = test_keys.into_iter().flatten().collect();
    assert!(test_keys.contains("until") && test_keys.contains("ordered"));
    assert_documented(&doc, "keys of [[tests]]", &test_keys);

    // Aggregate functions.
    let report = refused(
        "[sources.s]\ntype = \"stdin\"\n\
         [transforms.a]\ntype = \"accumulate\"\ninputs = [\"s\"]\nkey = \".k\"\n\
         partial_flush = true\naggregates = { x = \"nosuch\" }\n\
         [sinks.k]\ntype = \"blackhole\"\ninputs = [\"a\"]\n",
    );
    let functions: BTreeSet<String> = listed(&report, "valid aggregates")
        .into_iter()
        .flatten()
        .collect();
    assert!(functions.contains("count"), "{report}");
    assert_documented(&doc, "aggregate functions", &functions);
}
