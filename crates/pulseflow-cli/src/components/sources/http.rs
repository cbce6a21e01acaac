//! The `http` source: JSON items POSTed by clients (ndjson, a JSON array, or one object),
//! answered `503` with `Retry-After` while the pipeline is full.
//!
//! ```toml
//! [sources.ingest]
//! type = "http"
//! address = "127.0.0.1:8080"  # the default; "0.0.0.0:8080" to take requests from elsewhere
//! path = "/events"            # default "/"
//! ack = "delivered"           # answer once the items are handled; default "accepted"
//! token_env = "INGEST_TOKEN"  # clients send `Authorization: Bearer <token>`
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jaq_json::Val;
use pulseflow::Stream;
use pulseflow::connectors::http::{AckMode, HttpSource, HttpSourceConfig, body};
use serde::Deserialize;
use toml::Spanned;

use crate::build::BuildContext;
use crate::components::settings::{duration, secret};
use crate::components::{ComponentType, Declare, SourceComponent};
use crate::config::{Problems, ReadContext};

/// The `http` source type.
pub const TYPE: ComponentType<dyn SourceComponent> = ComponentType::new::<Settings>("http");

/// Where the source listens unless told otherwise.
const DEFAULT_ADDRESS: &str = "127.0.0.1:8080";

/// Its settings table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    #[serde(default)]
    accept_timeout: Option<Spanned<String>>,
    #[serde(default)]
    retry_after: Option<Spanned<String>>,
    #[serde(default)]
    queue: Option<usize>,
    #[serde(default)]
    ack: Option<Ack>,
    #[serde(default)]
    ack_timeout: Option<Spanned<String>>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_env: Option<String>,
}

/// When a request is answered.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Ack {
    Accepted,
    Delivered,
}

impl Declare for Settings {
    type Component = dyn SourceComponent;

    fn check(
        self,
        cx: &ReadContext<'_>,
        problems: &mut Problems,
    ) -> Option<Arc<dyn SourceComponent>> {
        let text = self
            .address
            .as_ref()
            .map_or(DEFAULT_ADDRESS, |a| a.get_ref().as_str());
        let address = match text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                problems.add(
                    format!("address must be an IP address and port such as \"127.0.0.1:8080\", not `{text}`"),
                    Some(cx.span.clone()),
                    "here",
                    None,
                );
                return None;
            }
        };
        let mut config = HttpSourceConfig::new(address);
        if let Some(path) = self.path {
            if !path.starts_with('/') {
                problems.add(
                    format!("path must start with '/', not `{path}`"),
                    Some(cx.span.clone()),
                    "here",
                    None,
                );
            }
            config.path = path;
        }
        if let Some(n) = self.max_body_bytes {
            config.max_body_bytes = n;
        }
        if let Some(n) = self.queue {
            config.queue = n.max(1);
        }
        config.accept_timeout = duration(
            self.accept_timeout.as_ref(),
            "accept_timeout",
            config.accept_timeout,
            problems,
        );
        config.retry_after = duration(
            self.retry_after.as_ref(),
            "retry_after",
            config.retry_after,
            problems,
        );
        config.ack_timeout = duration(
            self.ack_timeout.as_ref(),
            "ack_timeout",
            config.ack_timeout,
            problems,
        );
        config.ack = match self.ack {
            Some(Ack::Delivered) => AckMode::Delivered,
            Some(Ack::Accepted) | None => AckMode::Accepted,
        };
        config.token = secret(self.token, self.token_env, cx, problems);
        if config.retry_after < Duration::from_secs(1) {
            config.retry_after = Duration::from_secs(1);
        }
        Some(Arc::new(Http(config)))
    }
}

/// A checked `http` source.
pub struct Http(HttpSourceConfig);

impl SourceComponent for Http {
    fn build(&self, cx: &mut BuildContext<'_>) -> Stream<Val> {
        let decoder: body::Decoder<Val> =
            Arc::new(|text| crate::json::parse(text).map_err(|e| body::describe(&e)));
        // Binds when the run starts: `validate` and `graph` take no port.
        let source = HttpSource::new(self.0.clone(), decoder);
        let s = cx.builder.source(cx.name().to_owned(), source);
        let hint = cx.hint;
        cx.with_policies(s, hint)
    }

    fn sized_items(&self) -> bool {
        false
    }
}
