//! Changed blocks from reflink extent sharing: a block of the new clone
//! whose physical extent (`FIEMAP`) is still the previous clone's has not
//! been written since, because copy-on-write gives every written block a
//! new extent. Works for plain raw images on XFS (reflink=1) and btrfs,
//! with no hypervisor support, across VM stops and host reboots.
//!
//! Anything uncertain counts as changed: delayed-allocation, unknown,
//! encoded or inline extents, extents whose flags differ, and an extent
//! that moved (defrag, balance) although its bytes did not. Holes in both
//! files are unchanged.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// `FS_IOC_FIEMAP` = `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Unknown, delayed-allocation, encoded, data-inline, not-aligned: the
/// physical address says nothing reliable.
const UNRELIABLE: u32 = 0x2 | 0x4 | 0x8 | 0x200 | 0x100;
/// Flags two extents must agree on to be the same (unwritten).
const COMPARED: u32 = 0x800;
const BATCH: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; BATCH],
}

/// One mapped extent of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Address on the device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// The extents of `file` (synced first, so delayed allocations are real).
pub fn extents(file: &File) -> std::io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut req = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); BATCH],
        });
        // SAFETY: the request is a properly sized, owned `struct fiemap`
        // with room for `extent_count` extents.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *req) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (req.mapped_extents as usize).min(BATCH);
        let mut last = false;
        for e in req.extents.get(..n).unwrap_or_default() {
            out.push(Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            });
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        match out.last() {
            Some(e) if !last && n > 0 => start = e.logical.saturating_add(e.length),
            _ => break,
        }
    }
    Ok(out)
}

/// Byte ranges of `0..size` where `new` and `old` may differ.
pub fn changed(new: &[Extent], old: &[Extent], size: u64) -> Vec<Range<u64>> {
    // Physical address at `x` in a sorted extent list, and where that
    // answer stops holding.
    fn at(list: &[Extent], x: u64) -> (Option<(u64, u32)>, u64) {
        let i = list.partition_point(|e| e.logical.saturating_add(e.length) <= x);
        match list.get(i) {
            Some(e) if e.logical <= x => (
                Some((e.physical + (x - e.logical), e.flags)),
                e.logical.saturating_add(e.length),
            ),
            Some(e) => (None, e.logical),
            None => (None, u64::MAX),
        }
    }
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut x = 0u64;
    while x < size {
        let (a, a_end) = at(new, x);
        let (b, b_end) = at(old, x);
        let end = a_end.min(b_end).min(size).max(x + 1);
        let same = match (a, b) {
            (None, None) => true,
            (Some((pa, fa)), Some((pb, fb))) => {
                pa == pb
                    && fa & UNRELIABLE == 0
                    && fb & UNRELIABLE == 0
                    && fa & COMPARED == fb & COMPARED
            }
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some(last) if last.end == x => last.end = end,
                _ => out.push(x..end),
            }
        }
        x = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    #[test]
    fn shared_extents_are_clean_and_the_rest_is_changed() {
        let old = [e(0, 1000, 100), e(200, 5000, 100)];
        // Bytes 50..60 were rewritten (new physical place); 100..200 is a
        // hole in both; 200..300 is shared; 300..400 was written.
        let new = [
            e(0, 1000, 50),
            e(50, 9000, 10),
            e(60, 1060, 40),
            e(200, 5000, 100),
            e(300, 7000, 100),
        ];
        assert_eq!(changed(&new, &old, 400), vec![50..60, 300..400]);
        // The same extents are clean; an unreliable one is not.
        assert_eq!(changed(&old, &old, 300), Vec::<Range<u64>>::new());
        let mut delalloc = old;
        delalloc[1].flags = 0x4;
        assert_eq!(changed(&delalloc, &old, 300), vec![200..300]);
        // A moved extent (defrag) shows as changed, which is safe.
        assert_eq!(
            changed(&[e(0, 2000, 100)], &[e(0, 1000, 100)], 100),
            vec![0..100]
        );
    }
}
