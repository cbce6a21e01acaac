//! The isolation runtime: a separate multi-thread Tokio runtime whose threads join an
//! isolation group (cgroup quota and/or low priority) as they start.

use std::future::Future;

use crate::isolation::{
    CpuIsolation, CpuUsage, IsolationCapabilities, IsolationContext, OsAbstractionFactory,
};

use super::{SupervisorConfig, SupervisorError};

pub(crate) struct IsolationRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    backend: Box<dyn CpuIsolation>,
    context: IsolationContext,
}

impl std::fmt::Debug for IsolationRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolationRuntime")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl IsolationRuntime {
    pub(crate) fn start(config: &SupervisorConfig) -> Result<Self, SupervisorError> {
        let backend = OsAbstractionFactory::create_isolation();
        let caps = backend.capabilities();
        let context = backend.create_isolation_context()?;
        if caps.cpu_limiting
            && let Err(e) = backend.apply_cpu_limit(config.isolation_cpu_percent)
        {
            tracing::warn!(error = %e, "tokio-pulse: CPU limit not applied to the isolation runtime");
        }
        if let Err(e) = backend.set_priority(config.isolation_priority) {
            tracing::warn!(error = %e, "tokio-pulse: priority not applied to the isolation runtime");
        }
        let start_ctx = context.clone();
        let stop_ctx = context.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.isolation_threads.max(1))
            .thread_name("pulse-isolated")
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = start_ctx.enter_current_thread() {
                    tracing::warn!(error = %e, "tokio-pulse: isolation thread not restrained");
                }
            })
            .on_thread_stop(move || {
                let _ = stop_ctx.leave_current_thread();
            })
            .build()
            .map_err(SupervisorError::Runtime)?;
        tracing::info!(
            mode = ?context.mode(),
            cgroup = ?context.cgroup_path(),
            capabilities = ?caps,
            "tokio-pulse: isolation runtime started"
        );
        Ok(Self {
            runtime: Some(runtime),
            backend,
            context,
        })
    }

    pub(crate) fn spawn<F>(&self, future: F) -> Option<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().map(|rt| rt.spawn(future))
    }

    pub(crate) fn context(&self) -> &IsolationContext {
        &self.context
    }

    pub(crate) fn capabilities(&self) -> IsolationCapabilities {
        self.backend.capabilities()
    }

    pub(crate) fn cpu_usage(&self) -> Option<CpuUsage> {
        self.backend.get_cpu_usage().ok()
    }
}

impl Drop for IsolationRuntime {
    fn drop(&mut self) {
        // Restore the threads and remove the cgroup now, synchronously; the threads stop in
        // the background (a runtime cannot be shut down from inside itself).
        if let Err(e) = self.backend.release_isolation() {
            tracing::warn!(error = %e, "tokio-pulse: isolation release incomplete");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
