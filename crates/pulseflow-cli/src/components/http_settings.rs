//! What the `http` source and sink read alike: durations and the bearer token.

use std::time::Duration;

use pulseflow::connectors::http::Secret;
use toml::Spanned;

use crate::config::policies::parse_duration;
use crate::config::{Problems, ReadContext};

/// A duration key (`"500ms"`, `"2s"`), or its default; a bad one is reported.
pub fn duration(
    value: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
    cx: &ReadContext<'_>,
    problems: &mut Problems,
) -> Duration {
    let Some(text) = value else {
        return default;
    };
    match parse_duration(text.get_ref()) {
        Some(d) => d,
        None => {
            problems.add(
                format!(
                    "{key} must be a duration such as \"500ms\" or \"2s\", not `{}`",
                    text.get_ref()
                ),
                Some(cx.span.clone()),
                "here",
                None,
            );
            default
        }
    }
}

/// The bearer token: written in the config (`token`), or the name of an environment variable
/// that holds it (`token_env`). Its value never shows in messages.
pub fn secret(
    token: Option<String>,
    token_env: Option<String>,
    cx: &ReadContext<'_>,
    problems: &mut Problems,
) -> Option<Secret> {
    match (token, token_env) {
        (Some(_), Some(_)) => {
            problems.add(
                "give either token or token_env, not both",
                Some(cx.span.clone()),
                "here",
                None,
            );
            None
        }
        (Some(token), None) => Some(Secret::new(token)),
        (None, Some(var)) => match std::env::var(&var) {
            Ok(token) if !token.is_empty() => Some(Secret::new(token)),
            _ => {
                problems.add(
                    format!("the environment variable {var} (token_env) is not set"),
                    Some(cx.span.clone()),
                    "here",
                    Some(format!("export {var}=... before starting pulseflow")),
                );
                None
            }
        },
        (None, None) => None,
    }
}
