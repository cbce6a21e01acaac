//! The fallback backend: no OS help at all, and it says so.

use std::path::PathBuf;
use std::sync::Arc;

use super::{
    ContextOps, CpuIsolation, CpuUsage, IsolationCapabilities, IsolationContext, IsolationError,
    IsolationMode, PriorityLevel,
};

/// Isolation for platforms where no limit or priority can be applied.
///
/// Limits and priorities answer [`IsolationError::NotSupported`]; contexts work but do
/// nothing, so an isolation runtime built on them still runs its tasks on separate threads.
///
/// ```
/// use tokio_pulse::isolation::{CpuIsolation, FallbackIsolation, IsolationError};
///
/// let fallback = FallbackIsolation::new();
/// assert!(matches!(fallback.apply_cpu_limit(50.0), Err(IsolationError::NotSupported)));
/// assert!(!fallback.capabilities().cpu_limiting);
/// ```
#[derive(Debug, Clone, Default)]
pub struct FallbackIsolation {
    _private: (),
}

impl FallbackIsolation {
    /// The fallback backend.
    pub fn new() -> Self {
        Self { _private: () }
    }
}

#[derive(Debug)]
struct NoopContext;

impl ContextOps for NoopContext {
    fn enter_current_thread(&self) -> Result<(), IsolationError> {
        Ok(())
    }

    fn leave_current_thread(&self) -> Result<(), IsolationError> {
        Ok(())
    }

    fn threads(&self) -> Vec<u64> {
        Vec::new()
    }

    fn cgroup_path(&self) -> Option<PathBuf> {
        None
    }

    fn mode(&self) -> IsolationMode {
        IsolationMode::None
    }
}

impl CpuIsolation for FallbackIsolation {
    fn apply_cpu_limit(&self, _percent: f32) -> Result<(), IsolationError> {
        Err(IsolationError::NotSupported)
    }

    fn set_priority(&self, _level: PriorityLevel) -> Result<(), IsolationError> {
        Err(IsolationError::NotSupported)
    }

    fn create_isolation_context(&self) -> Result<IsolationContext, IsolationError> {
        Ok(IsolationContext::new(Arc::new(NoopContext)))
    }

    fn release_isolation(&self) -> Result<(), IsolationError> {
        Ok(())
    }

    fn get_cpu_usage(&self) -> Result<CpuUsage, IsolationError> {
        // Wall-clock time is no measure of CPU use; better to say nothing.
        Err(IsolationError::NotSupported)
    }

    fn capabilities(&self) -> IsolationCapabilities {
        IsolationCapabilities::default()
    }
}
