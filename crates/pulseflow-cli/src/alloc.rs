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

//!
//! Alignment: Rust passes every allocation's alignment. mimalloc's aligned entry point serves
//! a request from its fast path only when the next free block of the size class happens to be
//! aligned; when the class has no free block, a size that is not a power of two goes to an
//! over-allocating fallback that takes its block from a larger class, so the class itself is
//! never refilled and every later request of that size takes the fallback too. On JSON
//! objects a fifth of all allocations did (hash tables of small maps ask for 16-byte
//! alignment at sizes such as 52 bytes), for about a tenth of the run's instructions. So
//! sizes are rounded up to their alignment and, up to 16 bytes of alignment, served by plain
//! `mi_malloc`: mimalloc's size classes for multiples of 8 and of 16 bytes hold blocks aligned
//! to 8 and 16. The result is checked all the same, falling back to the aligned entry point.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

#[global_allocator]
static ALLOC: Mimalloc = Mimalloc;

/// Largest alignment that plain `mi_malloc` gives blocks whose size is a multiple of it.
const NATURAL_ALIGN: usize = 16;

/// mimalloc, with sizes rounded up to their alignment.
struct Mimalloc;

fn is_aligned(p: *mut c_void, align: usize) -> bool {
    (p as usize) & (align - 1) == 0
}

/// A block of `layout` from `plain` (mimalloc's allocation without alignment) when the padded
/// size guarantees it is aligned, else from `aligned`.
///
/// # Safety
///
/// `plain` and `aligned` must be mimalloc's matching pair of allocation functions.
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let layout = layout.pad_to_align();
    // SAFETY: plain C allocation calls; a block that is not aligned is freed, unused.
    unsafe {
        if layout.align() <= NATURAL_ALIGN {
            let p = plain(layout.size());
            if is_aligned(p, layout.align()) {
                return p.cast();
            }
            mi::mi_free(p);
        }
        aligned(layout.size(), layout.align()).cast()
    }
}

// SAFETY: every block comes from mimalloc with at least the size asked for (`pad_to_align`
// only rounds up) and is returned only once checked to have the layout's alignment, or comes
// from mimalloc's aligned entry point, which guarantees it; all of them are freed by
// `mi_free`, which takes any mimalloc block.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions, any size.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` is a live block of this allocator, i.e. of mimalloc.
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // The caller guarantees that `new_size` rounded up to `align` does not overflow.
        let size = new_size.next_multiple_of(align);
        // SAFETY: `ptr` is a live block of mimalloc holding `layout.size()` bytes. It is kept
        // when it fits (as `mi_realloc` would), else its bytes move to a block of this
        // allocator and it is freed; if that allocation fails it is left as it was.
        unsafe {
            if align > NATURAL_ALIGN {
                return mi::mi_realloc_aligned(ptr.cast(), size, align).cast();
            }
            let usable = mi::mi_usable_size(ptr.cast());
            if size <= usable && size >= usable / 2 {
                return ptr;
            }
            let new = self.alloc(Layout::from_size_align_unchecked(size, align));
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                mi::mi_free(ptr.cast());
            }
            new
        }
    }
}

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

#[cfg(test)]
mod tests {
    /// Grows a vector of `T` through `sizes` and back down, checking its alignment and
    /// contents after every reallocation.
    fn grow_and_shrink<T: Copy + PartialEq + std::fmt::Debug>(make: impl Fn(usize) -> T) {
        let align = std::mem::align_of::<T>();
        let mut v: Vec<T> = Vec::new();
        for n in [1usize, 3, 4, 13, 100, 1000] {
            v.reserve_exact(n - v.len());
            v.extend((v.len()..n).map(&make));
            assert_eq!(v.as_ptr() as usize % align, 0, "{n} items of align {align}");
            assert!(v.iter().enumerate().all(|(i, x)| *x == make(i)));
        }
        for n in [500usize, 7, 1] {
            v.truncate(n);
            v.shrink_to_fit();
            assert_eq!(v.as_ptr() as usize % align, 0, "shrunk to {n}");
            assert!(v.iter().enumerate().all(|(i, x)| *x == make(i)));
        }
    }

    #[test]
    fn allocations_keep_their_alignment_and_contents() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        #[repr(align(64))]
        struct Line(u64);
        grow_and_shrink(|i| i as u8);
        grow_and_shrink(|i| [i as u32; 3]); // 12 bytes, align 4
        grow_and_shrink(|i| (i as u64, i as u32)); // 16 bytes, align 8
        grow_and_shrink(|i| i as u128); // align 16
        grow_and_shrink(|i| Line(i as u64)); // above what plain `mi_malloc` is used for
        // A small hash table: 16-byte alignment at a size that is not a multiple of 16.
        let map: std::collections::HashMap<u64, u64> = (0..3).map(|i| (i, i * 2)).collect();
        assert_eq!(map.get(&2), Some(&4));
        let zeroed = vec![0u128; 37];
        assert_eq!(zeroed.as_ptr() as usize % 16, 0);
        assert!(zeroed.iter().all(|x| *x == 0));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_after_tuning() {
        super::tune();
        // SAFETY: `PR_GET_THP_DISABLE` takes no pointer and reads a flag of this process.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }
}
