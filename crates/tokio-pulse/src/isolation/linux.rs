//! Linux backend: cgroup v2 or v1 CPU quotas for the group's threads, nice and `SCHED_IDLE`
//! per thread (by TID), capability detection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::cleanup::{self, Entry, write_file};
use super::{
    CgroupVersion, ContextOps, CpuIsolation, CpuUsage, IsolationCapabilities, IsolationContext,
    IsolationError, IsolationMode, PriorityLevel,
};
use crate::clock::{ThreadCpuClock, current_tid};

/// CFS period used for quotas, in microseconds.
const PERIOD_US: u64 = 100_000;

/// Where cgroups can be made, found once at construction.
#[derive(Debug, Clone, Default)]
struct CgroupSetup {
    version: CgroupVersion,
    /// This process's cgroup directory in the hierarchy used: the parent of ours.
    parent: Option<PathBuf>,
    /// Whether the parent was delegated to this (non-root) user; otherwise using it needs
    /// privileges.
    delegated: bool,
}

/// Linux isolation of a group of threads.
///
/// Detects at construction which cgroup interface is usable (v2 with the `cpu` controller
/// available, else a writable v1 `cpu` hierarchy, else none), the NUMA nodes, whether it runs
/// in a container and whether it is privileged. Dropping it releases the group.
#[derive(Debug)]
pub struct LinuxIsolation {
    setup: Arc<CgroupSetup>,
    caps: IsolationCapabilities,
    group: Arc<Mutex<Group>>,
}

#[derive(Debug)]
struct Group {
    cgroup: Option<Entry>,
    mode: IsolationMode,
    priority: PriorityLevel,
    /// Weight written to the cgroup for the priority (cpu.shares / cpu.weight).
    members: HashMap<i32, Member>,
    released: bool,
    /// CPU time of threads that already left the group.
    departed_ns: u64,
    created_at: Instant,
    last_sample: Option<(Instant, u64)>,
}

#[derive(Debug)]
struct Member {
    saved: SavedSched,
    clock: Option<ThreadCpuClock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SavedSched {
    nice: i32,
    policy: i32,
    rt_priority: i32,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl LinuxIsolation {
    /// Detects what this machine allows. Creates nothing yet.
    pub fn new() -> Self {
        let setup = detect_cgroup();
        let numa_nodes = detect_numa_nodes();
        let privileged = is_privileged();
        let cpu_limiting = setup.version != CgroupVersion::None;
        // Restoring a thread's nice value after raising it needs CAP_SYS_NICE unless
        // RLIMIT_NICE allows going back to 0; a cgroup not delegated to a non-root user needs
        // root. Root satisfies both, which is exactly why it is reported.
        let caps = IsolationCapabilities {
            cpu_limiting,
            priority_control: true,
            numa_aware: numa_nodes > 0,
            container_aware: detect_container_environment(),
            requires_privileges: (cpu_limiting && !setup.delegated) || !nice_rlimit_allows(0),
            cgroup_version: setup.version,
            numa_nodes,
            privileged,
        };
        Self {
            setup: Arc::new(setup),
            caps,
            group: Arc::new(Mutex::new(Group {
                cgroup: None,
                mode: IsolationMode::PriorityOnly,
                priority: PriorityLevel::Normal,
                members: HashMap::new(),
                released: false,
                departed_ns: 0,
                created_at: Instant::now(),
                last_sample: None,
            })),
        }
    }

    /// Creates the cgroup if a version is usable and none exists yet.
    fn ensure_cgroup(&self, group: &mut Group) -> Result<(), IsolationError> {
        if group.cgroup.is_some() {
            return Ok(());
        }
        let Some(parent) = self.setup.parent.clone() else {
            group.mode = IsolationMode::PriorityOnly;
            return Ok(());
        };
        sweep_stale(&parent);
        let name = format!(
            "tokio-pulse-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(|source| IsolationError::Io {
            operation: "create cgroup",
            path: dir.clone(),
            source,
        })?;
        let entry = match self.setup.version {
            CgroupVersion::V2 => Entry {
                dir: dir.clone(),
                members_file: "cgroup.threads",
                parent_members: parent.join("cgroup.threads"),
            },
            _ => Entry {
                dir: dir.clone(),
                members_file: "tasks",
                parent_members: parent.join("tasks"),
            },
        };
        if self.setup.version == CgroupVersion::V2 {
            let setup = write_file(&dir.join("cgroup.type"), "threaded")
                .and_then(|()| write_file(&parent.join("cgroup.subtree_control"), "+cpu"));
            if let Err(source) = setup {
                let _ = std::fs::remove_dir(&dir);
                return Err(IsolationError::Io {
                    operation: "make threaded cgroup with cpu controller",
                    path: dir,
                    source,
                });
            }
        }
        cleanup::register(entry.clone());
        group.mode = match self.setup.version {
            CgroupVersion::V2 => IsolationMode::CgroupV2,
            _ => IsolationMode::CgroupV1,
        };
        group.cgroup = Some(entry);
        Ok(())
    }

    fn write_quota(&self, entry: &Entry, percent: f32) -> Result<(), IsolationError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let unlimited = percent >= 100.0;
        let quota_us = ((f64::from(percent) / 100.0) * cpus * PERIOD_US as f64).round() as u64;
        let quota_us = quota_us.max(1_000);
        match self.setup.version {
            CgroupVersion::V2 => {
                let value = if unlimited {
                    format!("max {PERIOD_US}")
                } else {
                    format!("{quota_us} {PERIOD_US}")
                };
                write_cg(&entry.dir.join("cpu.max"), &value)
            }
            _ => {
                write_cg(&entry.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let value = if unlimited {
                    "-1".to_owned()
                } else {
                    quota_us.to_string()
                };
                write_cg(&entry.dir.join("cpu.cfs_quota_us"), &value)
            }
        }
    }

    fn write_weight(&self, entry: &Entry, level: PriorityLevel) -> Result<(), IsolationError> {
        // The group competes with the rest of the process as one entity, so its weight
        // carries the priority too (a thread's own policy only matters inside the group).
        let (file, value) = match (self.setup.version, level) {
            (CgroupVersion::V2, PriorityLevel::Idle) => ("cpu.weight", 1),
            (CgroupVersion::V2, PriorityLevel::Low) => ("cpu.weight", 10),
            (CgroupVersion::V2, PriorityLevel::Normal) => ("cpu.weight", 100),
            (CgroupVersion::V2, _) => ("cpu.weight", 200),
            (_, PriorityLevel::Idle) => ("cpu.shares", 2),
            (_, PriorityLevel::Low) => ("cpu.shares", 100),
            (_, PriorityLevel::Normal) => ("cpu.shares", 1024),
            (_, _) => ("cpu.shares", 2048),
        };
        write_cg(&entry.dir.join(file), &value.to_string())?;
        // An idle group (kernel 5.15+) is preempted at once by a waking normal thread; a low
        // weight alone lets the woken thread wait for the next scheduler tick.
        let idle_file = entry.dir.join("cpu.idle");
        if idle_file.exists() {
            let idle = if level == PriorityLevel::Idle {
                "1"
            } else {
                "0"
            };
            write_cg(&idle_file, idle)?;
        }
        Ok(())
    }

    fn release_locked(group: &mut Group) -> Result<(), IsolationError> {
        let mut first_error = None;
        for (tid, member) in group.members.drain() {
            if let Err(e) = restore_sched(tid, member.saved) {
                // A thread that has exited needs no restoring.
                if !matches!(&e, IsolationError::Os { source, .. } if source.raw_os_error() == Some(libc::ESRCH))
                {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(entry) = group.cgroup.take() {
            cleanup::unregister(&entry.dir);
            if let Err(source) = cleanup::remove_cgroup(&entry) {
                first_error.get_or_insert(IsolationError::Io {
                    operation: "remove cgroup",
                    path: entry.dir.clone(),
                    source,
                });
            }
        }
        group.released = true;
        group.mode = IsolationMode::PriorityOnly;
        first_error.map_or(Ok(()), Err)
    }
}

impl Default for LinuxIsolation {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for LinuxIsolation {
    fn drop(&mut self) {
        let _ = Self::release_locked(&mut self.group.lock());
    }
}

fn write_cg(path: &Path, value: &str) -> Result<(), IsolationError> {
    write_file(path, value).map_err(|source| IsolationError::Io {
        operation: "write",
        path: path.to_owned(),
        source,
    })
}

impl CpuIsolation for LinuxIsolation {
    fn apply_cpu_limit(&self, percent: f32) -> Result<(), IsolationError> {
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(IsolationError::InvalidArgument(format!(
                "CPU limit must be in (0, 100] percent, got {percent}"
            )));
        }
        let mut group = self.group.lock();
        group.released = false;
        if self.setup.version != CgroupVersion::None {
            self.ensure_cgroup(&mut group)?;
        }
        if let Some(entry) = group.cgroup.clone() {
            return self.write_quota(&entry, percent);
        }
        drop(group);
        // No cgroup: the seed's fallback, a priority for the group's threads.
        self.set_priority(PriorityLevel::for_percent(percent))
    }

    fn set_priority(&self, level: PriorityLevel) -> Result<(), IsolationError> {
        let mut group = self.group.lock();
        group.priority = level;
        if let Some(entry) = group.cgroup.clone() {
            self.write_weight(&entry, level)?;
        }
        let tids: Vec<i32> = group.members.keys().copied().collect();
        let mut result = Ok(());
        for tid in tids {
            if let Err(e) = apply_sched(tid, level) {
                result = Err(e);
            }
        }
        result
    }

    fn create_isolation_context(&self) -> Result<IsolationContext, IsolationError> {
        let mut group = self.group.lock();
        group.released = false;
        if self.setup.version != CgroupVersion::None
            && let Err(e) = self.ensure_cgroup(&mut group)
        {
            tracing::warn!(error = %e, "tokio-pulse: no cgroup, isolating by priority only");
            group.mode = IsolationMode::PriorityOnly;
        }
        Ok(IsolationContext::new(Arc::new(LinuxContext {
            group: Arc::clone(&self.group),
        })))
    }

    fn release_isolation(&self) -> Result<(), IsolationError> {
        Self::release_locked(&mut self.group.lock())
    }

    fn get_cpu_usage(&self) -> Result<CpuUsage, IsolationError> {
        let mut group = self.group.lock();
        let mut usage = CpuUsage::default();
        let mut total = group.departed_ns;
        let ticks = clock_ticks_per_sec();
        for (tid, member) in &group.members {
            total += member.clock.and_then(|c| c.read_ns()).unwrap_or(0);
            if let Some((user, system)) = thread_times(*tid) {
                usage.user_ns += user * 1_000_000_000 / ticks;
                usage.system_ns += system * 1_000_000_000 / ticks;
            }
        }
        usage.total_ns = total;
        let now = Instant::now();
        let (since, before) = group.last_sample.unwrap_or((group.created_at, 0));
        let wall = now.duration_since(since).as_nanos() as f64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if wall > 0.0 {
            usage.percent = (total.saturating_sub(before) as f64 / (wall * cpus) * 100.0) as f32;
        }
        group.last_sample = Some((now, total));
        Ok(usage)
    }

    fn capabilities(&self) -> IsolationCapabilities {
        self.caps.clone()
    }
}

#[derive(Debug)]
struct LinuxContext {
    group: Arc<Mutex<Group>>,
}

impl ContextOps for LinuxContext {
    fn enter_current_thread(&self) -> Result<(), IsolationError> {
        let tid = current_tid();
        let mut group = self.group.lock();
        if group.released {
            return Err(IsolationError::Released);
        }
        if group.members.contains_key(&tid) {
            return Ok(());
        }
        let saved = save_sched(tid)?;
        if let Some(entry) = &group.cgroup {
            write_cg(&entry.dir.join(entry.members_file), &tid.to_string())?;
        }
        let level = group.priority;
        group.members.insert(
            tid,
            Member {
                saved,
                clock: ThreadCpuClock::current(),
            },
        );
        apply_sched(tid, level)
    }

    fn leave_current_thread(&self) -> Result<(), IsolationError> {
        let tid = current_tid();
        let mut group = self.group.lock();
        let Some(member) = group.members.remove(&tid) else {
            return Ok(());
        };
        if let Some(ns) = member.clock.and_then(|c| c.read_ns()) {
            group.departed_ns += ns;
        }
        let restored = restore_sched(tid, member.saved);
        if let Some(entry) = &group.cgroup {
            write_cg(&entry.parent_members, &tid.to_string())?;
        }
        restored
    }

    fn threads(&self) -> Vec<u64> {
        let group = self.group.lock();
        let mut tids: Vec<u64> = group
            .members
            .keys()
            .filter_map(|t| u64::try_from(*t).ok())
            .collect();
        tids.sort_unstable();
        tids
    }

    fn cgroup_path(&self) -> Option<PathBuf> {
        self.group.lock().cgroup.as_ref().map(|e| e.dir.clone())
    }

    fn mode(&self) -> IsolationMode {
        self.group.lock().mode
    }
}

fn os_error(operation: String) -> IsolationError {
    let source = std::io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            IsolationError::InsufficientPrivileges { operation }
        }
        _ => IsolationError::Os { operation, source },
    }
}

fn save_sched(tid: i32) -> Result<SavedSched, IsolationError> {
    let who = id_of(tid);
    // SAFETY: errno is thread-local; getpriority can return -1 legitimately, so it is reset
    // first and checked after.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, who)
    };
    if nice == -1 && std::io::Error::last_os_error().raw_os_error().unwrap_or(0) != 0 {
        return Err(os_error(format!("getpriority(thread {tid})")));
    }
    // SAFETY: plain query by TID.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(os_error(format!("sched_getscheduler(thread {tid})")));
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid out pointer.
    if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return Err(os_error(format!("sched_getparam(thread {tid})")));
    }
    Ok(SavedSched {
        nice,
        policy,
        rt_priority: param.sched_priority,
    })
}

fn set_policy(tid: i32, policy: i32, rt_priority: i32) -> Result<(), IsolationError> {
    let param = libc::sched_param {
        sched_priority: rt_priority,
    };
    // SAFETY: `param` is valid for the call; the TID names one thread.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(os_error(format!("sched_setscheduler(thread {tid})")));
    }
    Ok(())
}

fn set_nice(tid: i32, nice: i32) -> Result<(), IsolationError> {
    // SAFETY: with a TID, PRIO_PROCESS addresses that single thread on Linux.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, id_of(tid), nice) } != 0 {
        return Err(os_error(format!("setpriority(thread {tid}, {nice})")));
    }
    Ok(())
}

fn apply_sched(tid: i32, level: PriorityLevel) -> Result<(), IsolationError> {
    if level == PriorityLevel::Idle {
        // Reset-on-fork: threads this one spawns start normal again.
        set_policy(tid, libc::SCHED_IDLE | libc::SCHED_RESET_ON_FORK, 0)?;
    } else {
        // SAFETY: plain query by TID.
        let policy = unsafe { libc::sched_getscheduler(tid) } & !libc::SCHED_RESET_ON_FORK;
        if policy == libc::SCHED_IDLE {
            set_policy(tid, libc::SCHED_OTHER, 0)?;
        }
    }
    set_nice(tid, level.nice())
}

fn restore_sched(tid: i32, saved: SavedSched) -> Result<(), IsolationError> {
    set_policy(tid, saved.policy, saved.rt_priority)?;
    set_nice(tid, saved.nice)
}

fn id_of(tid: i32) -> libc::id_t {
    libc::id_t::try_from(tid).unwrap_or(0)
}

fn is_privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // CAP_SYS_NICE (23) in the effective set.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 23) != 0)
}

fn nice_rlimit_allows(nice: i32) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } != 0 {
        return false;
    }
    // RLIMIT_NICE r allows nice values down to 20 - r.
    lim.rlim_cur == libc::RLIM_INFINITY || 20 - (lim.rlim_cur.min(40) as i32) <= nice
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// utime and stime of a thread of this process, in clock ticks.
fn thread_times(tid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The command name may contain spaces; fields after ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// Number of NUMA nodes listed in sysfs (0 when sysfs does not say).
pub fn detect_numa_nodes() -> u32 {
    std::fs::read_dir("/sys/devices/system/node")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix("node")
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .count() as u32
        })
        .unwrap_or(0)
}

/// Whether this process runs in a container (Docker, Podman, Kubernetes, LXC, systemd-nspawn).
pub fn detect_container_environment() -> bool {
    if Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists() {
        return true;
    }
    if std::env::var_os("container").is_some() {
        return true;
    }
    std::fs::read_to_string("/proc/1/cgroup").is_ok_and(|s| {
        ["docker", "kubepods", "containerd", "lxc", "libpod"]
            .iter()
            .any(|k| s.contains(k))
    })
}

/// Finds a usable cgroup interface: v2 with `cpu` available, else a writable v1 `cpu`.
fn detect_cgroup() -> CgroupSetup {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    detect_cgroup_from(&mounts, &membership, Path::new("/"))
}

fn detect_cgroup_from(mounts: &str, membership: &str, root: &Path) -> CgroupSetup {
    let mut v2_mount = None;
    let mut v1_cpu_mount = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(point), Some(fstype), Some(options)) =
            (fields.get(1), fields.get(2), fields.get(3))
        else {
            continue;
        };
        match *fstype {
            "cgroup2" => v2_mount = Some(PathBuf::from(point)),
            "cgroup" if options.split(',').any(|o| o == "cpu") => {
                v1_cpu_mount = Some(PathBuf::from(point));
            }
            _ => {}
        }
    }
    let mut v2_path = None;
    let mut v1_path = None;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            v2_path = Some(rel.to_owned());
        } else if controllers.split(',').any(|c| c == "cpu") {
            v1_path = Some(rel.to_owned());
        }
    }
    let rooted = |p: PathBuf| {
        if root == Path::new("/") {
            p
        } else {
            root.join(p.strip_prefix("/").unwrap_or(&p))
        }
    };
    if let (Some(mount), Some(rel)) = (v2_mount, v2_path) {
        let dir = rooted(mount).join(rel);
        let has_cpu = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        if has_cpu && writable(&dir) && writable(&dir.join("cgroup.subtree_control")) {
            return CgroupSetup {
                version: CgroupVersion::V2,
                delegated: delegated(&dir),
                parent: Some(dir),
            };
        }
    }
    if let (Some(mount), Some(rel)) = (v1_cpu_mount, v1_path) {
        let dir = rooted(mount).join(rel);
        if dir.join("cpu.cfs_quota_us").exists() && writable(&dir) {
            return CgroupSetup {
                version: CgroupVersion::V1,
                delegated: delegated(&dir),
                parent: Some(dir),
            };
        }
    }
    CgroupSetup::default()
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn delegated(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    me != 0 && std::fs::metadata(path).is_ok_and(|m| m.uid() == me)
}

/// Removes cgroups left by processes of this crate that no longer exist.
fn sweep_stale(parent: &Path) {
    let Ok(dir) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in dir.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("tokio-pulse-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_only_machine() {
        let tmp = std::env::temp_dir().join(format!("pulse-cg-{}", std::process::id()));
        let cpu = tmp.join("sys/fs/cgroup/cpu/app");
        std::fs::create_dir_all(&cpu).expect("temp dir");
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1").expect("temp file");
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let membership = "1:cpu:/app\n0::/\n";
        let setup = detect_cgroup_from(mounts, membership, &tmp);
        assert_eq!(setup.version, CgroupVersion::V1);
        assert_eq!(setup.parent.as_deref(), Some(cpu.as_path()));
        std::fs::remove_dir_all(&tmp).expect("cleanup");
    }

    #[test]
    fn parses_v2_with_cpu_controller() {
        let tmp = std::env::temp_dir().join(format!("pulse-cg2-{}", std::process::id()));
        let dir = tmp.join("sys/fs/cgroup/user.slice");
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("cgroup.controllers"), "cpuset cpu io memory").expect("file");
        std::fs::write(dir.join("cgroup.subtree_control"), "").expect("file");
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        let setup = detect_cgroup_from(mounts, "0::/user.slice\n", &tmp);
        assert_eq!(setup.version, CgroupVersion::V2);
        // Without the cpu controller, v2 is not usable and nothing else is mounted.
        std::fs::write(dir.join("cgroup.controllers"), "memory pids").expect("file");
        let setup = detect_cgroup_from(mounts, "0::/user.slice\n", &tmp);
        assert_eq!(setup.version, CgroupVersion::None);
        std::fs::remove_dir_all(&tmp).expect("cleanup");
    }

    #[test]
    fn combined_cpu_cpuacct_mount_is_found() {
        let tmp = std::env::temp_dir().join(format!("pulse-cg3-{}", std::process::id()));
        let dir = tmp.join("sys/fs/cgroup/cpu,cpuacct");
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("cpu.cfs_quota_us"), "-1").expect("file");
        let mounts = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n";
        let setup = detect_cgroup_from(mounts, "4:cpu,cpuacct:/\n", &tmp);
        assert_eq!(setup.version, CgroupVersion::V1);
        std::fs::remove_dir_all(&tmp).expect("cleanup");
    }
}
