//! The isolation group's lifecycle on this machine, whichever of cgroup v2, v1 or none is
//! usable: quota written, threads listed, priorities applied to the group's threads only,
//! and everything restored and removed on release, on drop and during panic unwinding.
#![cfg(target_os = "linux")]

use std::sync::mpsc;
use std::thread;

use tokio_pulse::isolation::{
    CgroupVersion, CpuIsolation, IsolationContext, IsolationError, IsolationMode, LinuxIsolation,
    PriorityLevel, cleanup,
};

fn tid() -> i32 {
    tokio_pulse::clock::current_tid()
}

fn sched_of(tid: i32) -> (i32, i32) {
    // SAFETY: plain queries by TID; errno reset because -1 is a valid nice value.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        let policy = libc::sched_getscheduler(tid) & !libc::SCHED_RESET_ON_FORK;
        (nice, policy)
    }
}

/// A thread that joins `ctx`, then waits until told to finish. Returns its TID, the handle,
/// and the sender that lets it finish.
fn member(ctx: &IsolationContext) -> (i32, thread::JoinHandle<()>, mpsc::Sender<()>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let ctx = ctx.clone();
    let handle = thread::spawn(move || {
        ctx.enter_current_thread().expect("thread joins the group");
        tid_tx.send(tid()).expect("report tid");
        let _ = done_rx.recv();
    });
    let member_tid = tid_rx.recv().expect("member started");
    (member_tid, handle, done_tx)
}

/// Whether this process may undo a raised nice value (root, CAP_SYS_NICE or RLIMIT_NICE).
fn can_restore(isolation: &LinuxIsolation) -> bool {
    let caps = isolation.capabilities();
    caps.privileged || !caps.requires_privileges
}

fn members_file(version: CgroupVersion) -> &'static str {
    match version {
        CgroupVersion::V2 => "cgroup.threads",
        _ => "tasks",
    }
}

#[test]
fn lifecycle_matches_detected_capabilities() {
    let me = tid();
    let my_sched = sched_of(me);
    let isolation = LinuxIsolation::new();
    let caps = isolation.capabilities();
    let ctx = isolation
        .create_isolation_context()
        .expect("a context is always available");
    let (member_tid, handle, done) = member(&ctx);
    let before = (0, libc::SCHED_OTHER);
    assert_eq!(ctx.threads(), vec![member_tid as u64]);

    isolation
        .apply_cpu_limit(50.0)
        .expect("limit applied or mapped to a priority");
    let cgroup_dir = ctx.cgroup_path();
    match caps.cgroup_version {
        CgroupVersion::None => {
            assert_eq!(ctx.mode(), IsolationMode::PriorityOnly);
            assert!(cgroup_dir.is_none());
            // Without a cgroup the limit becomes a priority (50 % -> Low, nice 10).
            assert_eq!(sched_of(member_tid).0, 10);
        }
        version => {
            let dir = cgroup_dir.clone().expect("cgroup created");
            assert!(dir.is_dir());
            assert!(cleanup::registered().contains(&dir));
            let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
            let quota = cpus * 100_000 / 2;
            if version == CgroupVersion::V2 {
                assert_eq!(ctx.mode(), IsolationMode::CgroupV2);
                let max = std::fs::read_to_string(dir.join("cpu.max")).expect("cpu.max");
                assert_eq!(max.trim(), format!("{quota} 100000"));
            } else {
                assert_eq!(ctx.mode(), IsolationMode::CgroupV1);
                let q = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).expect("quota");
                let p = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).expect("period");
                assert_eq!(q.trim(), quota.to_string());
                assert_eq!(p.trim(), "100000");
            }
            let listed = std::fs::read_to_string(dir.join(members_file(version))).expect("list");
            let listed: Vec<&str> = listed.split_whitespace().collect();
            assert_eq!(listed, vec![member_tid.to_string().as_str()]);
            // The limit itself does not touch thread priorities.
            assert_eq!(sched_of(member_tid), before);
        }
    }

    isolation
        .set_priority(PriorityLevel::Idle)
        .expect("raising nice of own threads is always allowed");
    assert_eq!(sched_of(member_tid), (19, libc::SCHED_IDLE));
    if let Some(dir) = &cgroup_dir {
        // The group as a whole is idle too, so waking normal threads preempt it at once.
        if let Ok(idle) = std::fs::read_to_string(dir.join("cpu.idle")) {
            assert_eq!(idle.trim(), "1");
        } else {
            // Older kernels: the lowest weight instead.
            let weight = std::fs::read_to_string(dir.join("cpu.shares"))
                .or_else(|_| std::fs::read_to_string(dir.join("cpu.weight")))
                .expect("group weight");
            assert!(matches!(weight.trim(), "2" | "1"), "weight {weight}");
        }
    }
    // The test's own thread is untouched.
    assert_eq!(sched_of(me), my_sched);

    let usage = isolation.get_cpu_usage().expect("usage of live threads");
    assert!(usage.percent >= 0.0);

    let released = isolation.release_isolation();
    if can_restore(&isolation) {
        released.expect("released");
        assert_eq!(
            sched_of(member_tid),
            before,
            "previous nice and policy restored"
        );
    } else {
        // Unprivileged: lowering nice or leaving SCHED_IDLE again is refused, and said so;
        // the cgroup is removed all the same.
        assert!(matches!(
            released,
            Ok(()) | Err(IsolationError::InsufficientPrivileges { .. })
        ));
    }
    if let Some(dir) = cgroup_dir {
        assert!(!dir.exists(), "cgroup removed");
        assert!(!cleanup::registered().contains(&dir));
    }
    assert!(ctx.threads().is_empty());
    assert!(
        ctx.enter_current_thread().is_err(),
        "released group refuses members"
    );
    let _ = done.send(());
    handle.join().expect("member finished");
    assert_eq!(sched_of(me), my_sched);
}

#[test]
fn leaving_restores_the_thread() {
    let isolation = LinuxIsolation::new();
    let ctx = isolation.create_isolation_context().expect("context");
    isolation
        .set_priority(PriorityLevel::Low)
        .expect("priority set");
    let dir = ctx.cgroup_path();
    let c = ctx.clone();
    let (tx, rx) = mpsc::channel();
    let restorable = can_restore(&isolation);
    thread::spawn(move || {
        c.enter_current_thread().expect("enter");
        let inside = sched_of(tid());
        let left = c.leave_current_thread();
        if restorable {
            assert!(left.is_ok(), "{left:?}");
        }
        tx.send((tid(), inside, sched_of(tid()))).expect("report");
    })
    .join()
    .expect("thread ran");
    let (member_tid, inside, after) = rx.recv().expect("report");
    assert_eq!(inside.0, 10);
    if restorable {
        assert_eq!(after, (0, libc::SCHED_OTHER));
    }
    if let Some(dir) = &dir {
        let listed = std::fs::read_to_string(dir.join("tasks"))
            .or_else(|_| std::fs::read_to_string(dir.join("cgroup.threads")))
            .unwrap_or_default();
        assert!(
            !listed
                .split_whitespace()
                .any(|t| t == member_tid.to_string())
        );
    }
    drop(isolation);
    if let Some(dir) = dir {
        assert!(!dir.exists(), "dropping the backend removes its cgroup");
    }
}

#[test]
fn panic_unwinding_removes_the_cgroup() {
    let (tx, rx) = mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let isolation = LinuxIsolation::new();
        let ctx = isolation.create_isolation_context().expect("context");
        tx.send(ctx.cgroup_path()).expect("report");
        panic!("boom while isolating");
    });
    assert!(outcome.is_err());
    if let Some(dir) = rx.recv().expect("path reported") {
        assert!(
            !dir.exists(),
            "Drop during unwinding removed {}",
            dir.display()
        );
        assert!(!cleanup::registered().contains(&dir));
    }
}

#[test]
fn invalid_limits_are_rejected() {
    let isolation = LinuxIsolation::new();
    assert!(isolation.apply_cpu_limit(0.0).is_err());
    assert!(isolation.apply_cpu_limit(150.0).is_err());
    assert!(isolation.apply_cpu_limit(f32::NAN).is_err());
}
