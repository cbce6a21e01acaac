//! A process-wide registry of the cgroups this process created, so they can be removed when
//! the process is stopped by a signal (threads die with the process, cgroup directories do
//! not).
//!
//! Release and `Drop` (also during panic unwinding) remove cgroups on their own; this registry
//! covers SIGINT and SIGTERM. [`install_signal_cleanup`] is opt-in because it ends the process
//! after cleaning up: a program that handles those signals itself should call
//! [`cleanup_now`] from its own handler instead.
//!
//! ```
//! use tokio_pulse::isolation::cleanup;
//!
//! // Nothing registered: nothing to do.
//! assert_eq!(cleanup::registered().len(), 0);
//! assert_eq!(cleanup::cleanup_now(), 0);
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use parking_lot::Mutex;

use super::IsolationError;

/// One cgroup created by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The cgroup directory.
    pub(crate) dir: PathBuf,
    /// The file listing its threads (`tasks` or `cgroup.threads`).
    pub(crate) members_file: &'static str,
    /// The file of the parent to move threads back into.
    pub(crate) parent_members: PathBuf,
}

fn registry() -> &'static Mutex<Vec<Entry>> {
    static REGISTRY: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

pub(crate) fn register(entry: Entry) {
    registry().lock().push(entry);
}

pub(crate) fn unregister(dir: &Path) {
    registry().lock().retain(|e| e.dir != dir);
}

/// Cgroup directories currently registered for cleanup.
pub fn registered() -> Vec<PathBuf> {
    registry().lock().iter().map(|e| e.dir.clone()).collect()
}

/// Moves every thread out of every registered cgroup and removes the cgroups. Returns how many
/// were removed. Safe to call more than once.
pub fn cleanup_now() -> usize {
    let entries: Vec<Entry> = std::mem::take(&mut *registry().lock());
    let mut removed = 0;
    for entry in entries {
        if remove_cgroup(&entry).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Empties a cgroup into its parent and removes it.
pub(crate) fn remove_cgroup(entry: &Entry) -> std::io::Result<()> {
    if let Ok(members) = std::fs::read_to_string(entry.dir.join(entry.members_file)) {
        for tid in members.split_whitespace() {
            // A thread that exited meanwhile cannot be moved: that is fine.
            let _ = write_file(&entry.parent_members, tid);
        }
    }
    match std::fs::remove_dir(&entry.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `value` to a cgroup or proc file without truncating or creating it.
pub(crate) fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// On SIGINT or SIGTERM, removes registered cgroups, then lets the signal take its default
/// effect (the process ends). Installing twice is harmless.
///
/// Use only in programs that do not handle these signals themselves.
pub fn install_signal_cleanup() -> Result<(), IsolationError> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| {
            IsolationError::Os {
                operation: "register SIGINT/SIGTERM handlers".into(),
                source: e,
            }
        })?;
        std::thread::Builder::new()
            .name("pulse-signal-cleanup".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    cleanup_now();
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                }
            })
            .map_err(|e| IsolationError::Os {
                operation: "spawn the signal cleanup thread".into(),
                source: e,
            })?;
    }
    let _ = INSTALLED.set(());
    Ok(())
}
