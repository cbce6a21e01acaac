//! What the `nats` source and sink share: how they reach the server (`url`, `token` or
//! `credentials`, `connect_timeout`) and how their durations are read.
//!
//! ```toml
//! url = "nats://127.0.0.1:4222"   # several separated by commas
//! token = "s3cr3t"                 # or: credentials = "app.creds" (relative to the config)
//! connect_timeout = "30s"          # how long to keep trying when the run starts
//! ```
//!
//! The token, and a user and password in the URL, appear in no message and in no `/stages`.

use pulseflow::connectors::nats::{Auth, Connection};
use toml::Spanned;

use crate::components::settings::duration;
use crate::config::{Problems, ReadContext};

/// Declares the settings table of a `nats` component: the connection keys (`url`, `token`,
/// `credentials`, `connect_timeout`) first, then its own; and its `connection` method, which
/// checks them (see [`ConnectionKeys::check`]).
macro_rules! nats_settings {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            url: String,
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            credentials: Option<String>,
            #[serde(default)]
            connect_timeout: Option<toml::Spanned<String>>,
            $($own)*
        }

        impl $name {
            /// The connection its keys describe.
            fn connection(
                &mut self,
                cx: &crate::config::ReadContext<'_>,
                problems: &mut crate::config::Problems,
            ) -> pulseflow::connectors::nats::Connection {
                crate::components::nats::ConnectionKeys {
                    url: std::mem::take(&mut self.url),
                    token: self.token.take(),
                    credentials: self.credentials.take(),
                    connect_timeout: self.connect_timeout.take(),
                }
                .check(cx, problems)
            }
        }
    };
}
pub(crate) use nats_settings;

/// The connection keys of a `nats` component, as written.
pub struct ConnectionKeys {
    /// `url`.
    pub url: String,
    /// `token`.
    pub token: Option<String>,
    /// `credentials`: a credentials file.
    pub credentials: Option<String>,
    /// `connect_timeout`.
    pub connect_timeout: Option<Spanned<String>>,
}

impl ConnectionKeys {
    /// The connection, with what is wrong added to `problems`.
    pub fn check(self, cx: &ReadContext<'_>, problems: &mut Problems) -> Connection {
        let mut connection = Connection::new(self.url);
        connection.connect_timeout = duration(
            self.connect_timeout.as_ref(),
            "connect_timeout",
            connection.connect_timeout,
            problems,
        );
        connection.auth = match (self.token, self.credentials) {
            (Some(_), Some(_)) => {
                problems.add(
                    format!("{}: `token` and `credentials` exclude each other", cx.table),
                    Some(cx.span.clone()),
                    "here",
                    Some("authenticate with one of them".into()),
                );
                Auth::None
            }
            (Some(token), None) => Auth::Token(token),
            (None, Some(path)) => Auth::CredentialsFile(cx.path(&path)),
            (None, None) => Auth::None,
        };
        connection
    }
}

/// A count key that must be at least 1, with a problem when it is 0.
pub fn at_least_one(value: Option<&Spanned<u32>>, key: &str, problems: &mut Problems) {
    if let Some(n) = value.filter(|n| *n.get_ref() == 0) {
        problems.add(
            format!("`{key}` must be at least 1"),
            Some(n.span()),
            "zero",
            None,
        );
    }
}
