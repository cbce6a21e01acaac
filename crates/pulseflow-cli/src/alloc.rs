//! The process's memory: mimalloc as the allocator, and no transparent huge pages.
//!
//! Items are many small values allocated on one worker thread and freed on another; glibc's
//! allocator spent more time on that than the jq stages spent on the items, mimalloc much less.
//!
//! Huge pages: mimalloc asks the kernel for transparent huge pages for its arenas, and the
//! kernel then zeroes 2 MiB at the first touch of each. A pipeline's allocations are spread
//! over size classes and threads, so most of each such page is touched late or never: on a
//! 40 MB file of JSON lines, zeroing huge pages was a tenth of the profile and resident memory
//! was about twice what it is with normal pages (30 MB against 50-80 MB).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing to do). Call it
/// first thing in `main`: it applies to the pages touched after it.
pub fn tune() {
    #[cfg(target_os = "linux")]
    // SAFETY: `PR_SET_THP_DISABLE` takes plain integers and only sets a flag of this process.
    // Failing (an old kernel) leaves huge pages on, which is only slower.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn huge_pages_are_off_after_tuning() {
        super::tune();
        // SAFETY: `PR_GET_THP_DISABLE` takes no pointer and reads a flag of this process.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }
}
