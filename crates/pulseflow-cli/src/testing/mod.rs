//! `pulseflow test CONFIG...`: runs the `[[tests]]` of configs, each on its own inputs, and
//! reports like `cargo test`: a line per test, the differences of each failure, and a last
//! line `N passed, M failed` over all the configs.
//!
//! [`spec`] reads the tables, [`run`] runs one test in-process on a simulated clock with
//! [`feed`]'s source and sink in place of the config's, and [`diff`] compares.

pub mod diff;
pub mod feed;
pub mod run;
pub mod spec;

use std::io::Write;
use std::path::PathBuf;

use crate::config::{self, LoadError};

/// How a set of configs' tests went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed, and configs that could not be read.
    pub failed: usize,
}

/// Runs the tests of every config in `paths`, writing the report to `out` (problems of
/// configs that do not load go to standard error).
pub fn run_all(paths: &[PathBuf], out: &mut impl Write) -> std::io::Result<Summary> {
    let mut summary = Summary::default();
    let mut failures: Vec<(String, Vec<String>)> = Vec::new();
    for path in paths {
        let file = path.display().to_string();
        let config = match config::load(path) {
            Ok(c) => c,
            Err(LoadError::Invalid(problems)) => {
                eprint!("{}", config::diagnostic::render(&problems, false));
                writeln!(out, "test {file} ... FAILED (invalid config)")?;
                failures.push((file, vec!["the config is invalid (see above)".into()]));
                summary.failed += 1;
                continue;
            }
            Err(e) => {
                writeln!(out, "test {file} ... FAILED")?;
                failures.push((file, vec![e.to_string()]));
                summary.failed += 1;
                continue;
            }
        };
        if config.tests.is_empty() {
            writeln!(out, "{file}: no [[tests]]")?;
        }
        for test in &config.tests {
            let name = format!("{file}: {}", test.name);
            let differences = match run::run(&config, test) {
                Ok(outcome) => diff::differences(test, &outcome),
                Err(e) => vec![e.to_string()],
            };
            if differences.is_empty() {
                writeln!(out, "test {name} ... ok")?;
                summary.passed += 1;
            } else {
                writeln!(out, "test {name} ... FAILED")?;
                failures.push((name, differences));
                summary.failed += 1;
            }
        }
    }
    if !failures.is_empty() {
        writeln!(out, "\nfailures:")?;
        for (name, lines) in &failures {
            writeln!(out, "\n---- {name} ----")?;
            for line in lines {
                writeln!(out, "{line}")?;
            }
        }
        writeln!(out)?;
    }
    writeln!(out, "{} passed, {} failed", summary.passed, summary.failed)?;
    Ok(summary)
}
