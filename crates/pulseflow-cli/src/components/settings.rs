//! Keys several components read alike: durations and the `http` bearer token.

use std::time::Duration;

use pulseflow::connectors::http::Secret;
use toml::Spanned;

use crate::config::policies::parse_duration;
use crate::config::{Problems, ReadContext};

/// A positive duration key (`default` when not written), with a problem when it is not one.
pub fn duration(
    value: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    let Some(value) = value else { return default };
    match parse_duration(value.get_ref()).filter(|d| !d.is_zero()) {
        Some(d) => d,
        None => {
            problems.add(
                format!("invalid duration `{}` for `{key}`", value.get_ref()),
                Some(value.span()),
                "not a positive duration",
                Some("write a number with a unit: `us`, `ms`, `s`, `m` or `h`, e.g. `30s`".into()),
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
