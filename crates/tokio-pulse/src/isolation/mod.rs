//! The OS isolation layer (seed 003): CPU limits and priorities for a *group of threads*.
//!
//! A [`CpuIsolation`] backend manages one isolation group. [`create_isolation_context`]
//! creates the group (a cgroup when one is writable) and returns an [`IsolationContext`] that
//! threads join from inside themselves ([`IsolationContext::enter_current_thread`]); the
//! Tokio-Pulse isolation runtime does this in its thread-start hook. Limits and priorities
//! apply to the group's threads only, never to the whole process.
//!
//! | backend | CPU limit | priority | notes |
//! |---|---|---|---|
//! | Linux, cgroup v2 | `cpu.max` on a threaded cgroup | nice per thread, `SCHED_IDLE` | needs the `cpu` controller delegated |
//! | Linux, cgroup v1 | `cpu.cfs_quota_us` / `cpu.cfs_period_us`, TIDs in `tasks` | as above | |
//! | Linux, no writable cgroup | none (priorities only) | as above | |
//! | Windows, macOS, other | none | none | [`FallbackIsolation`] with honest capabilities |
//!
//! Release ([`CpuIsolation::release_isolation`], or dropping the backend, also while a panic
//! unwinds) restores each thread's previous nice value and policy, moves it back to its
//! cgroup and removes the cgroups it created. [`cleanup::install_signal_cleanup`] does the
//! same on SIGINT/SIGTERM for programs that do not handle those signals themselves.
//!
//! ```
//! use tokio_pulse::isolation::{CpuIsolation, OsAbstractionFactory, PriorityLevel};
//!
//! let isolation = OsAbstractionFactory::create_isolation();
//! let caps = isolation.capabilities();
//! let context = isolation.create_isolation_context().expect("a context, even without OS help");
//! if caps.cpu_limiting {
//!     // 50 % of the machine for the group's threads.
//!     isolation.apply_cpu_limit(50.0).expect("cgroup writable");
//! }
//! let worker = std::thread::spawn(move || {
//!     // Join from inside the thread; errors just mean "not isolated".
//!     let _ = context.enter_current_thread();
//!     let _ = context.leave_current_thread();
//! });
//! worker.join().expect("worker ran");
//! isolation.release_isolation().expect("released");
//! # let _ = PriorityLevel::Idle;
//! ```
//!
//! [`create_isolation_context`]: CpuIsolation::create_isolation_context

pub mod cleanup;
mod fallback;
#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "windows")]
mod windows;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::clock::{CpuTimer, FallbackCpuTimer};
pub use fallback::FallbackIsolation;
#[cfg(target_os = "linux")]
pub use linux::{LinuxIsolation, detect_container_environment, detect_numa_nodes};
#[cfg(target_os = "macos")]
pub use macos::MacOsIsolation;
#[cfg(target_os = "windows")]
pub use windows::WindowsIsolation;

/// Platform-agnostic CPU isolation of one group of threads.
pub trait CpuIsolation: Send + Sync {
    /// Limits the group's threads together to `percent` of the machine's CPU capacity
    /// (`0 < percent <= 100`; 100 removes the limit). Without a usable cgroup, Linux maps the
    /// percentage to a priority instead (see [`PriorityLevel::for_percent`]).
    fn apply_cpu_limit(&self, percent: f32) -> Result<(), IsolationError>;

    /// Sets the priority of every thread in the group, present and future.
    fn set_priority(&self, level: PriorityLevel) -> Result<(), IsolationError>;

    /// Creates the group (if not yet) and returns a handle threads use to join it.
    fn create_isolation_context(&self) -> Result<IsolationContext, IsolationError>;

    /// Restores the group's threads and removes what was created for the group.
    fn release_isolation(&self) -> Result<(), IsolationError>;

    /// CPU used by the group's threads since the group was created.
    fn get_cpu_usage(&self) -> Result<CpuUsage, IsolationError>;

    /// What this backend can do here.
    fn capabilities(&self) -> IsolationCapabilities;
}

/// Priority levels mapped to OS-specific values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum PriorityLevel {
    /// Highest (nice -20 on Linux; needs privileges).
    Realtime,
    /// Above normal (nice -10; needs privileges).
    High,
    /// Default (nice 0).
    #[default]
    Normal,
    /// Below normal (nice 10).
    Low,
    /// Lowest: `SCHED_IDLE` and nice 19 on Linux.
    Idle,
}

impl PriorityLevel {
    /// The priority used in place of a CPU limit when no limit can be applied.
    pub fn for_percent(percent: f32) -> PriorityLevel {
        if percent >= 100.0 {
            PriorityLevel::Normal
        } else if percent >= 50.0 {
            PriorityLevel::Low
        } else {
            PriorityLevel::Idle
        }
    }

    /// The Unix nice value of this level.
    pub fn nice(self) -> i32 {
        match self {
            PriorityLevel::Realtime => -20,
            PriorityLevel::High => -10,
            PriorityLevel::Normal => 0,
            PriorityLevel::Low => 10,
            PriorityLevel::Idle => 19,
        }
    }
}

/// CPU usage statistics of an isolation group.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CpuUsage {
    /// User-mode time (kernel tick resolution; live threads only).
    pub user_ns: u64,
    /// Kernel-mode time (kernel tick resolution; live threads only).
    pub system_ns: u64,
    /// Total CPU time, precise, including threads that left the group.
    pub total_ns: u64,
    /// Share of the machine's capacity used since the previous call (0 to 100).
    pub percent: f32,
}

/// Which cgroup interface a backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CgroupVersion {
    /// The unified hierarchy.
    V2,
    /// The legacy `cpu` controller hierarchy.
    V1,
    /// No usable cgroup.
    #[default]
    None,
}

/// What a backend can do on this machine, detected at run time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IsolationCapabilities {
    /// Hard CPU limits (a writable cgroup with the cpu controller).
    pub cpu_limiting: bool,
    /// Per-thread priorities.
    pub priority_control: bool,
    /// The NUMA topology was read.
    pub numa_aware: bool,
    /// Running inside a container was detected.
    pub container_aware: bool,
    /// The isolation in use works only because the process is privileged (for example a
    /// cgroup not delegated to this user, or restoring a nice value it lowered).
    pub requires_privileges: bool,
    /// The cgroup interface used for limits.
    pub cgroup_version: CgroupVersion,
    /// NUMA nodes seen (0 when unknown).
    pub numa_nodes: u32,
    /// The process runs as root or with `CAP_SYS_NICE`.
    pub privileged: bool,
}

/// How an [`IsolationContext`] restrains its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsolationMode {
    /// A cgroup v2 threaded cgroup plus priorities.
    CgroupV2,
    /// A cgroup v1 `cpu` cgroup plus priorities.
    CgroupV1,
    /// Thread priorities only.
    PriorityOnly,
    /// Nothing: the threads are merely separate.
    None,
}

/// Errors of the isolation layer.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// The platform or this machine cannot do it.
    #[error("not supported on this platform or machine")]
    NotSupported,
    /// The OS refused for lack of privileges.
    #[error("insufficient privileges to {operation}")]
    InsufficientPrivileges {
        /// What was attempted.
        operation: String,
    },
    /// A bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A cgroup or proc file could not be read or written.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{operation} failed: {source}")]
    Os {
        /// The call and its target.
        operation: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The group was released; create a new context.
    #[error("the isolation group was released")]
    Released,
}

/// Operations behind an [`IsolationContext`], one implementation per backend.
pub(crate) trait ContextOps: Send + Sync + fmt::Debug {
    fn enter_current_thread(&self) -> Result<(), IsolationError>;
    fn leave_current_thread(&self) -> Result<(), IsolationError>;
    fn threads(&self) -> Vec<u64>;
    fn cgroup_path(&self) -> Option<PathBuf>;
    fn mode(&self) -> IsolationMode;
}

/// A handle on an isolation group that threads use to join and leave it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IsolationContext {
    ops: Arc<dyn ContextOps>,
}

impl IsolationContext {
    pub(crate) fn new(ops: Arc<dyn ContextOps>) -> Self {
        Self { ops }
    }

    /// Puts the calling thread in the group: into its cgroup, at its priority. The thread's
    /// previous priority and policy are saved for release.
    pub fn enter_current_thread(&self) -> Result<(), IsolationError> {
        self.ops.enter_current_thread()
    }

    /// Takes the calling thread out of the group and restores what it had before.
    pub fn leave_current_thread(&self) -> Result<(), IsolationError> {
        self.ops.leave_current_thread()
    }

    /// OS ids of the threads in the group (TIDs on Linux).
    pub fn threads(&self) -> Vec<u64> {
        self.ops.threads()
    }

    /// The cgroup directory of the group, if one was created.
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        self.ops.cgroup_path()
    }

    /// How the group restrains its threads.
    pub fn mode(&self) -> IsolationMode {
        self.ops.mode()
    }
}

/// Creates the implementations that fit the current platform.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsAbstractionFactory;

impl OsAbstractionFactory {
    /// The best isolation backend for this platform, or the fallback.
    pub fn create_isolation() -> Box<dyn CpuIsolation> {
        #[cfg(target_os = "linux")]
        {
            Box::new(LinuxIsolation::new())
        }
        #[cfg(target_os = "windows")]
        {
            Box::new(WindowsIsolation::new())
        }
        #[cfg(target_os = "macos")]
        {
            Box::new(MacOsIsolation::new())
        }
        #[cfg(not(any(target_os = "linux", target_os = "windows", target_os = "macos")))]
        {
            Box::new(FallbackIsolation::new())
        }
    }

    /// The best CPU timer for this platform (calibrated).
    pub fn create_timer() -> Box<dyn CpuTimer> {
        crate::clock::create_timer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_detection() {
        let isolation = OsAbstractionFactory::create_isolation();
        let caps = isolation.capabilities();
        #[cfg(target_os = "linux")]
        {
            assert!(caps.priority_control);
            // CPU limiting is claimed exactly when a cgroup interface was found usable.
            assert_eq!(
                caps.cpu_limiting,
                caps.cgroup_version != CgroupVersion::None
            );
            let nodes = std::fs::read_dir("/sys/devices/system/node")
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| {
                            let n = e.file_name();
                            let n = n.to_string_lossy();
                            n.starts_with("node") && n[4..].parse::<u32>().is_ok()
                        })
                        .count() as u32
                })
                .unwrap_or(0);
            assert_eq!(caps.numa_nodes, nodes);
            assert_eq!(caps.numa_aware, nodes > 0);
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if !root {
                // Unprivileged: only what was delegated to us can be in use.
                assert!(!caps.requires_privileges || !caps.cpu_limiting);
            }
        }
        #[cfg(target_os = "macos")]
        assert!(!caps.cpu_limiting);
        let _ = caps;
    }

    #[test]
    fn graceful_degradation() {
        let fallback = FallbackIsolation::new();
        assert!(matches!(
            fallback.apply_cpu_limit(50.0),
            Err(IsolationError::NotSupported)
        ));
        assert!(matches!(
            fallback.set_priority(PriorityLevel::Idle),
            Err(IsolationError::NotSupported)
        ));
        assert!(matches!(
            fallback.get_cpu_usage(),
            Err(IsolationError::NotSupported)
        ));
        let caps = fallback.capabilities();
        assert!(!caps.cpu_limiting && !caps.priority_control);
        // A context still works, it just does nothing.
        let ctx = fallback
            .create_isolation_context()
            .expect("fallback context");
        assert_eq!(ctx.mode(), IsolationMode::None);
        ctx.enter_current_thread().expect("no-op enter");
        ctx.leave_current_thread().expect("no-op leave");
        assert!(ctx.threads().is_empty());
        fallback.release_isolation().expect("no-op release");
    }

    #[test]
    fn timer_precision() {
        let timer = OsAbstractionFactory::create_timer();
        let start = timer.thread_cpu_time_ns();
        let mut sum = 0u64;
        for i in 0..1_000_000u64 {
            sum = std::hint::black_box(sum.wrapping_add(i));
        }
        let end = timer.thread_cpu_time_ns();
        assert!(end > start);
        assert!(sum > 0);
        assert!(timer.measurement_overhead_ns() >= 1);
        assert!(timer.resolution_ns() >= 1);
        assert!(timer.process_cpu_time_ns() >= end - start);
    }

    #[test]
    fn priority_for_percent() {
        assert_eq!(PriorityLevel::for_percent(100.0), PriorityLevel::Normal);
        assert_eq!(PriorityLevel::for_percent(60.0), PriorityLevel::Low);
        assert_eq!(PriorityLevel::for_percent(10.0), PriorityLevel::Idle);
        assert_eq!(PriorityLevel::Idle.nice(), 19);
    }
}
