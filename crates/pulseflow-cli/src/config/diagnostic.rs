//! Config problems as `miette` diagnostics: file, line and column, the offending text
//! underlined, and what would have been valid.

use std::ops::Range;
use std::sync::Arc;

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme, NamedSource, SourceSpan};

/// One problem in a config file.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct Problem {
    message: String,
    #[source_code]
    src: NamedSource<Arc<String>>,
    #[label("{label}")]
    span: Option<SourceSpan>,
    label: String,
    #[help]
    help: Option<String>,
}

/// Problems found in one file, built up as the file is read.
pub struct Problems {
    src: NamedSource<Arc<String>>,
    list: Vec<Problem>,
}

impl Problems {
    /// Problems of the file `name` with contents `text`.
    pub fn new(name: &str, text: Arc<String>) -> Self {
        Self {
            src: NamedSource::new(name, text).with_language("toml"),
            list: Vec::new(),
        }
    }

    /// Adds a problem at `span` (byte offsets in the file).
    pub fn add(
        &mut self,
        message: impl Into<String>,
        span: Option<Range<usize>>,
        label: impl Into<String>,
        help: Option<String>,
    ) {
        self.list.push(Problem {
            message: message.into(),
            src: self.src.clone(),
            span: span.map(|r| SourceSpan::from(r.start..r.end.max(r.start))),
            label: label.into(),
            help,
        });
    }

    /// Adds a TOML or serde error, at its span or else at `fallback`.
    pub fn add_toml(&mut self, error: &toml::de::Error, fallback: Range<usize>, context: &str) {
        let message = error.message().trim().to_owned();
        let message = if context.is_empty() {
            message
        } else {
            format!("{context}: {message}")
        };
        let span = error.span().unwrap_or(fallback);
        self.add(message, Some(span), "here", None);
    }

    /// Number of problems found so far.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The problems found.
    pub fn into_vec(self) -> Vec<Problem> {
        self.list
    }
}

/// Renders problems for a terminal (colours) or for a pipe or file (plain text).
pub fn render(problems: &[Problem], color: bool) -> String {
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_width(100)
        .with_links(false);
    let mut out = String::new();
    for p in problems {
        if handler.render_report(&mut out, p).is_err() {
            out.push_str(&format!("error: {p}\n"));
        }
    }
    let n = problems.len();
    out.push_str(&format!(
        "{n} problem{} found\n",
        if n == 1 { "" } else { "s" }
    ));
    out
}
