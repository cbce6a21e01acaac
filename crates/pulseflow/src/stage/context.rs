//! [`StageContext`]: what a stage knows about where it runs.

use std::sync::Arc;

/// Identity, configuration and tracing span of a running stage.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// The pipeline's id.
    pub pipeline_id: Arc<str>,
    /// The stage's id.
    pub stage_id: Arc<str>,
    /// Free-form configuration attached to the stage (`Null` when none).
    pub config: Arc<serde_json::Value>,
    /// The stage's tracing span; events inside it carry pipeline and stage ids.
    pub span: tracing::Span,
}
