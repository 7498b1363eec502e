//! Read-ahead of records a reader is about to need: merging their
//! locations into a few large runs ([`runs`]) and asking the kernel to
//! start reading a run into the page cache without waiting
//! ([`will_need`]).
//!
//! [`resident`] and [`drop_cached`] let tests see what a read-ahead did.
//!
//! A restore reads one record per block, from several threads: left to
//! itself the kernel sees small reads in no clear order and serves them
//! one by one. Told the runs of the next group first, it reads them in
//! large requests while the current group is decoded.

use std::fs::File;

/// Records at most this far apart are read in one run: the bytes between
/// them cost less than another request.
pub const RUN_GAP: u64 = 256 << 10;

/// Merges byte ranges `(file, start, end)` into runs per file: sorted,
/// with ranges at most [`RUN_GAP`] apart joined.
pub fn runs(mut ranges: Vec<(u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (file, start, end) in ranges {
        match out.last_mut() {
            Some((f, _, e)) if *f == file && start <= e.saturating_add(RUN_GAP) => {
                *e = (*e).max(end);
            }
            _ => out.push((file, start, end)),
        }
    }
    out
}

/// Asks the kernel to start reading `offset..offset+len` of `file` into
/// the page cache. Advice: a failure only costs speed.
pub fn will_need(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: an advisory call on a descriptor the caller holds open.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// Pages of `file` in the page cache that hold bytes of `range`: how a
/// test (or a diagnosis) sees what a read-ahead brought in. `None` when
/// the file cannot be mapped.
pub fn resident(file: &File, range: std::ops::Range<u64>) -> Option<usize> {
    const PAGE: u64 = 4096;
    let start = range.start / PAGE * PAGE;
    let len = usize::try_from(range.end.checked_sub(start)?).ok()?;
    if len == 0 {
        return Some(0);
    }
    // SAFETY: a read-only map, used only to ask which pages are cached;
    // its bytes are never read.
    let map = unsafe { memmap2::MmapOptions::new().offset(start).len(len).map(file) }.ok()?;
    let mut pages = vec![0u8; len.div_ceil(PAGE as usize)];
    // SAFETY: the map spans `len` bytes from a page boundary; `pages` has
    // a byte per page.
    let r = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, pages.as_mut_ptr()) };
    (r == 0).then(|| pages.iter().filter(|&&p| p & 1 == 1).count())
}

/// Drops `file`'s pages from the page cache (advice; clean pages only).
pub fn drop_cached(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: an advisory call on a descriptor the caller holds open.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_ranges_of_one_file_merge_and_files_stay_apart() {
        let got = runs(vec![
            (1, 1_000_000, 1_010_000),
            (0, 100, 200),
            (0, 200 + RUN_GAP, 300 + RUN_GAP),
            (0, 150, 180),
            (0, 301 + 2 * RUN_GAP, 400 + 2 * RUN_GAP),
            (1, 0, 10),
        ]);
        assert_eq!(
            got,
            vec![
                (0, 100, 300 + RUN_GAP),
                (0, 301 + 2 * RUN_GAP, 400 + 2 * RUN_GAP),
                (1, 0, 10),
                (1, 1_000_000, 1_010_000),
            ]
        );
        assert!(runs(Vec::new()).is_empty());
    }
}
