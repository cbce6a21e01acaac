//! Tokio-Pulse: CPU supervision for Tokio tasks.
