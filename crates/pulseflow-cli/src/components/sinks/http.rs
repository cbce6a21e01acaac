//! The `http` sink: items POSTed to a server in batched requests, retried within a budget,
//! at a concurrency that adapts to the server.
//!
//! ```toml
//! [sinks.forward]
//! type = "http"
//! inputs = ["events"]
//! url = "http://127.0.0.1:9000/ingest"
//! gzip = true
//! max_items = 500
//! circuit_breaker = {}   # stop sending (and take no input) while the server keeps failing
//! ```

use std::sync::Arc;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::builder::SinkHandle;
use pulseflow::connectors::http::{HttpSink, HttpSinkConfig, RequestFormat};
use serde::Deserialize;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::settings::{duration, secret};
use crate::components::{ComponentType, Declare, SinkComponent};
use crate::config::{Problems, ReadContext};

/// The `http` sink type.
pub const TYPE: ComponentType<dyn SinkComponent> = ComponentType::new::<Settings>("http");

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    url: Spanned<String>,
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    gzip: bool,
    #[serde(default)]
    max_items: Option<usize>,
    #[serde(default)]
    max_bytes: Option<usize>,
    #[serde(default)]
    request_timeout: Option<Spanned<String>>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    initial_backoff: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
    #[serde(default)]
    retry_budget: Option<f32>,
    #[serde(default)]
    concurrency: Option<usize>,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_env: Option<String>,
}

/// The body's format.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Format {
    Ndjson,
    JsonArray,
}

impl Declare for Settings {
    type Component = dyn SinkComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn SinkComponent>> {
        let url = match reqwest::Url::parse(self.url.get_ref()) {
            Ok(u) if matches!(u.scheme(), "http") => u,
            Ok(u) => {
                problems.add(
                    format!(
                        "url must be an http:// address (TLS is not built in), not `{}`",
                        u.scheme()
                    ),
                    Some(cx.span.clone()),
                    "here",
                    None,
                );
                return None;
            }
            Err(e) => {
                problems.add(
                    format!("url `{}` is not a URL: {e}", self.url.get_ref()),
                    Some(cx.span.clone()),
                    "here",
                    None,
                );
                return None;
            }
        };
        let mut config = HttpSinkConfig::new(url);
        config.format = match self.format {
            Some(Format::JsonArray) => RequestFormat::JsonArray,
            Some(Format::Ndjson) | None => RequestFormat::Ndjson,
        };
        config.gzip = self.gzip;
        if let Some(n) = self.max_items {
            config.max_items = n.max(1);
        }
        if let Some(n) = self.max_bytes {
            config.max_bytes = n.max(1);
        }
        if let Some(n) = self.max_attempts {
            config.retry.max_attempts = n.max(1);
        }
        if let Some(r) = self.retry_budget {
            if !(r.is_finite() && r >= 0.0) {
                problems.add(
                    format!("retry_budget must be a share of requests such as 0.2, not {r}"),
                    Some(cx.span.clone()),
                    "here",
                    None,
                );
            }
            config.retry.budget_ratio = r.max(0.0);
        }
        config.request_timeout = duration(
            self.request_timeout.as_ref(),
            "request_timeout",
            config.request_timeout,
            problems,
        );
        config.retry.initial_backoff = duration(
            self.initial_backoff.as_ref(),
            "initial_backoff",
            config.retry.initial_backoff,
            problems,
        );
        config.retry.max_backoff = duration(
            self.max_backoff.as_ref(),
            "max_backoff",
            config.retry.max_backoff,
            problems,
        );
        match (self.concurrency, self.max_concurrency) {
            (Some(n), _) => {
                config.initial_concurrency = n.max(1);
                config.max_concurrency = n.max(1);
            }
            (None, Some(max)) => config.max_concurrency = max.max(1),
            (None, None) => {}
        }
        config.headers = self.headers.unwrap_or_default().into_iter().collect();
        config.token = secret(self.token, self.token_env, cx, problems);
        Some(Arc::new(Http(config)))
    }
}

/// A checked `http` sink.
pub struct Http(HttpSinkConfig);

impl SinkComponent for Http {
    fn build(&self, cx: &mut BuildContext<'_>, input: Stream<Val>) -> SinkHandle {
        let encoder = Arc::new(|item: &Val, out: &mut Vec<u8>| {
            crate::json::write_line(out, item);
            out.pop();
            Ok(())
        });
        input.sink(
            cx.name().to_owned(),
            HttpSink::with_encoder(self.0.clone(), encoder),
        )
    }
}
