//! Policy settings of a component, inline or by name from `[policies]`.

use std::time::Duration;

use pulseflow::policy::{
    BackpressureStrategy, BufferPolicy, CircuitBreakerPolicy, DropPolicy, ErrorPolicy,
    ParallelismHint, PolicyRef,
};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeValue, ValueDeserializer};

use super::diagnostic::Problems;

/// The policy keys every component accepts.
pub const POLICY_KEYS: &[&str] = &[
    "buffer",
    "backpressure",
    "error_policy",
    "circuit_breaker",
    "parallelism",
];

/// Error policies that are written by their name.
const BUILTIN_ERROR_POLICIES: &[&str] = &["dead_letter", "fail", "ignore"];
/// Parallelism hints that are written by their name.
const BUILTIN_PARALLELISM: &[&str] = &["sequential", "cpu_bound", "io_bound"];

/// A component's policies; `None` keeps the engine's default.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub buffer: Option<PolicyRef<BufferPolicy>>,
    pub backpressure: Option<PolicyRef<BackpressureStrategy>>,
    pub error_policy: Option<PolicyRef<ErrorPolicy>>,
    pub circuit_breaker: Option<PolicyRef<CircuitBreakerPolicy>>,
    pub parallelism: Option<ParallelismSetting>,
}

/// Parallelism, inline or by the name of a `[policies]` entry (the engine's registry has no
/// parallelism, so the CLI resolves these names itself).
#[derive(Debug, Clone)]
pub enum ParallelismSetting {
    Inline(ParallelismHint),
    Named(String, std::ops::Range<usize>),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WhenFull {
    Block,
    DropOldest,
    DropNewest,
}

impl From<WhenFull> for DropPolicy {
    fn from(w: WhenFull) -> Self {
        match w {
            WhenFull::Block => DropPolicy::Block,
            WhenFull::DropOldest => DropPolicy::DropOldest,
            WhenFull::DropNewest => DropPolicy::DropNewest,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BufferCfg {
    capacity: usize,
    #[serde(default)]
    when_full: Option<WhenFull>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum BackpressureCfg {
    Bounded {
        capacity: usize,
        #[serde(default)]
        when_full: Option<WhenFull>,
    },
    Credit {
        initial: usize,
        replenish_threshold: usize,
    },
    Rate {
        rate: u32,
        burst: u32,
    },
    Adaptive {
        min_batch: usize,
        max_batch: usize,
    },
    Pull {
        window: usize,
    },
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ErrorPolicyCfg {
    Retry {
        max_retries: u32,
        #[serde(default)]
        backoff: Option<String>,
    },
    DeadLetter,
    Fail,
    Ignore,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerCfg {
    #[serde(default)]
    error_threshold: Option<f64>,
    #[serde(default)]
    latency_threshold: Option<String>,
    #[serde(default)]
    window: Option<String>,
    #[serde(default)]
    minimum_throughput: Option<u32>,
    #[serde(default)]
    cooldown: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IoBoundCfg {
    min: usize,
    max: usize,
}

/// Parses a duration such as `250ms`, `2s`, `1.5m`, `500us` or `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn de<T: for<'de> Deserialize<'de>>(value: &Spanned<DeValue<'_>>) -> Result<T, toml::de::Error> {
    let owned = {
        let mut v = value.get_ref().clone();
        v.make_owned();
        Spanned::new(value.span(), v)
    };
    T::deserialize(ValueDeserializer::from(owned))
}

fn duration_or(
    text: Option<String>,
    default: Duration,
    what: &str,
    span: std::ops::Range<usize>,
    problems: &mut Problems,
) -> Duration {
    match text {
        None => default,
        Some(t) => parse_duration(&t).unwrap_or_else(|| {
            problems.add(
                format!("invalid duration `{t}` for `{what}`"),
                Some(span),
                "not a duration",
                Some(
                    "write a number with a unit: `us`, `ms`, `s`, `m` or `h`, e.g. `250ms`".into(),
                ),
            );
            default
        }),
    }
}

/// Reads one policy key of a component (or of a named policy when `allow_names` is false).
pub fn read_policy(
    key: &str,
    value: &Spanned<DeValue<'_>>,
    allow_names: bool,
    into: &mut Policies,
    problems: &mut Problems,
) {
    let span = value.span();
    let named = |problems: &mut Problems| -> Option<String> {
        let name = value.get_ref().as_str()?.to_owned();
        if !allow_names {
            problems.add(
                format!("a named policy cannot refer to another (`{name}`)"),
                Some(span.clone()),
                "write the policy inline",
                None,
            );
            return None;
        }
        Some(name)
    };
    match key {
        "buffer" => {
            if value.get_ref().is_str() {
                into.buffer = named(problems).map(PolicyRef::Named);
            } else {
                match de::<BufferCfg>(value) {
                    Ok(b) => {
                        into.buffer = Some(PolicyRef::Inline(BufferPolicy::new(
                            b.capacity,
                            b.when_full.map_or(DropPolicy::Block, Into::into),
                        )))
                    }
                    Err(e) => problems.add_toml(&e, span, "buffer"),
                }
            }
        }
        "backpressure" => {
            if value.get_ref().is_str() {
                into.backpressure = named(problems).map(PolicyRef::Named);
            } else {
                match de::<BackpressureCfg>(value) {
                    Ok(b) => {
                        into.backpressure = Some(PolicyRef::Inline(match b {
                            BackpressureCfg::Bounded {
                                capacity,
                                when_full,
                            } => BackpressureStrategy::Bounded {
                                capacity,
                                drop_policy: when_full.map_or(DropPolicy::Block, Into::into),
                            },
                            BackpressureCfg::Credit {
                                initial,
                                replenish_threshold,
                            } => BackpressureStrategy::CreditBased {
                                initial,
                                replenish_threshold,
                            },
                            BackpressureCfg::Rate { rate, burst } => {
                                BackpressureStrategy::RateShaping { rate, burst }
                            }
                            BackpressureCfg::Adaptive {
                                min_batch,
                                max_batch,
                            } => BackpressureStrategy::Adaptive {
                                min_batch,
                                max_batch,
                            },
                            BackpressureCfg::Pull { window } => {
                                BackpressureStrategy::ReactivePull { window }
                            }
                        }))
                    }
                    Err(e) => problems.add_toml(
                        &e,
                        span,
                        "backpressure (type = bounded | credit | rate | adaptive | pull)",
                    ),
                }
            }
        }
        "error_policy" => match value.get_ref().as_str() {
            Some("dead_letter") => into.error_policy = Some(ErrorPolicy::DeadLetter.into()),
            Some("fail") => into.error_policy = Some(ErrorPolicy::Fail.into()),
            Some("ignore") => into.error_policy = Some(ErrorPolicy::Ignore.into()),
            Some(_) => into.error_policy = named(problems).map(PolicyRef::Named),
            None => match de::<ErrorPolicyCfg>(value) {
                Ok(ErrorPolicyCfg::Retry {
                    max_retries,
                    backoff,
                }) => {
                    let backoff = duration_or(
                        backoff,
                        Duration::from_millis(100),
                        "backoff",
                        span,
                        problems,
                    );
                    into.error_policy = Some(ErrorPolicy::retry(max_retries, backoff).into());
                }
                Ok(ErrorPolicyCfg::DeadLetter) => {
                    into.error_policy = Some(ErrorPolicy::DeadLetter.into())
                }
                Ok(ErrorPolicyCfg::Fail) => into.error_policy = Some(ErrorPolicy::Fail.into()),
                Ok(ErrorPolicyCfg::Ignore) => {
                    into.error_policy = Some(ErrorPolicy::Ignore.into())
                }
                Err(e) => problems.add_toml(
                    &e,
                    span,
                    "error_policy (\"dead_letter\", \"fail\", \"ignore\", a policy name or { type = \"retry\", max_retries, backoff })",
                ),
            },
        },
        "circuit_breaker" => {
            if value.get_ref().is_str() {
                into.circuit_breaker = named(problems).map(PolicyRef::Named);
            } else {
                match de::<BreakerCfg>(value) {
                    Ok(b) => {
                        if let Some(t) = b.error_threshold.filter(|t| !(*t > 0.0 && *t <= 1.0)) {
                            problems.add(
                                format!("circuit_breaker.error_threshold {t} is not a fraction"),
                                Some(span.clone()),
                                "out of range",
                                Some(
                                    "the share of failed items in the window that opens the \
                                     breaker: more than 0, at most 1 (0.5 = half)"
                                        .into(),
                                ),
                            );
                        }
                        let d = |t, default, what, problems: &mut Problems| {
                            duration_or(t, default, what, span.clone(), problems)
                        };
                        let policy = CircuitBreakerPolicy {
                            error_threshold: b.error_threshold.unwrap_or(0.5),
                            latency_threshold: d(
                                b.latency_threshold,
                                Duration::from_secs(10),
                                "latency_threshold",
                                problems,
                            ),
                            window: d(b.window, Duration::from_secs(10), "window", problems),
                            minimum_throughput: b.minimum_throughput.unwrap_or(20),
                            cooldown: d(b.cooldown, Duration::from_secs(5), "cooldown", problems),
                        };
                        into.circuit_breaker = Some(PolicyRef::Inline(policy));
                    }
                    Err(e) => problems.add_toml(&e, span, "circuit_breaker"),
                }
            }
        }
        "parallelism" => match value.get_ref() {
            DeValue::String(s) => {
                let s: &str = s;
                into.parallelism = match s {
                    "sequential" => Some(ParallelismSetting::Inline(ParallelismHint::Sequential)),
                    "cpu_bound" => Some(ParallelismSetting::Inline(
                        ParallelismHint::DynamicCpuBound,
                    )),
                    "io_bound" => Some(ParallelismSetting::Inline(ParallelismHint::io_bound())),
                    other => named(problems)
                        .map(|_| ParallelismSetting::Named(other.to_owned(), span.clone())),
                };
            }
            DeValue::Integer(_) => match de::<usize>(value) {
                Ok(n) => {
                    into.parallelism = Some(ParallelismSetting::Inline(ParallelismHint::Fixed(n)))
                }
                Err(e) => problems.add_toml(&e, span, "parallelism"),
            },
            DeValue::Table(_) => match de::<IoBoundCfg>(value) {
                Ok(c) => {
                    into.parallelism = Some(ParallelismSetting::Inline(
                        ParallelismHint::DynamicIoBound {
                            min: c.min,
                            max: c.max,
                        },
                    ))
                }
                Err(e) => problems.add_toml(&e, span, "parallelism (io-bound bounds)"),
            },
            other => problems.add(
                format!("invalid parallelism: found {}", other.type_str()),
                Some(span),
                "expected a worker count, a name or { min, max }",
                Some(format!(
                    "valid: a number of workers, {}, {{ min = 1, max = 8 }} or a name from [policies]",
                    BUILTIN_PARALLELISM
                        .iter()
                        .map(|s| format!("\"{s}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ),
        },
        _ => {}
    }
}

/// Whether `name` may be used for a named policy.
pub fn reserved_name(name: &str) -> bool {
    BUILTIN_ERROR_POLICIES.contains(&name) || BUILTIN_PARALLELISM.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("3 parsecs"), None);
    }
}
