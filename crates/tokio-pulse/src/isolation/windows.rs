//! Windows: not built or tested in this project's CI, so it stays on the fallback.
//!
//! Job objects (`JOBOBJECT_CPU_RATE_CONTROL_INFORMATION`) limit whole processes, not threads,
//! so they cannot restrain only the isolation runtime; per-thread priorities would need code
//! nobody here can compile. Until then this backend is the fallback with honest flags.

use super::{
    CpuIsolation, CpuUsage, FallbackIsolation, IsolationCapabilities, IsolationContext,
    IsolationError, PriorityLevel,
};

/// Windows isolation: currently the fallback (no limits, no priorities).
#[derive(Debug, Clone, Default)]
pub struct WindowsIsolation {
    inner: FallbackIsolation,
}

impl WindowsIsolation {
    /// The Windows backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl CpuIsolation for WindowsIsolation {
    fn apply_cpu_limit(&self, percent: f32) -> Result<(), IsolationError> {
        self.inner.apply_cpu_limit(percent)
    }

    fn set_priority(&self, level: PriorityLevel) -> Result<(), IsolationError> {
        self.inner.set_priority(level)
    }

    fn create_isolation_context(&self) -> Result<IsolationContext, IsolationError> {
        self.inner.create_isolation_context()
    }

    fn release_isolation(&self) -> Result<(), IsolationError> {
        self.inner.release_isolation()
    }

    fn get_cpu_usage(&self) -> Result<CpuUsage, IsolationError> {
        self.inner.get_cpu_usage()
    }

    fn capabilities(&self) -> IsolationCapabilities {
        self.inner.capabilities()
    }
}
