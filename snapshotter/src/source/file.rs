//! [`FileImage`]: a raw image file or block device, read window by window
//! through memory mappings or, for parts, with direct reads.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, MmapOptions};

use coffre_vault_store::store::local::direct::{AlignedBuf, DIRECT_ALIGN, open_direct_read};
use coffre_vault_store::store::local::read_ahead;

use super::{ChangeStamp, Hold, ImageSource, Window, overlaps, truncated};
use crate::error::{Result, SnapError};
use crate::sigbus;

/// A raw disk image file or block device, read through memory mappings.
#[derive(Debug)]
pub struct FileImage {
    path: PathBuf,
    file: File,
    size: u64,
    is_block_device: bool,
    /// The file opened again with `O_DIRECT`, for reading parts of it
    /// (see [`FileImage::with_direct_reads`]).
    direct: Option<File>,
}

impl FileImage {
    /// Opens `path`, with a clear error for each way it can be unusable.
    pub fn open(path: &Path) -> Result<FileImage> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SnapError::SourceNotFound {
                path: path.to_path_buf(),
            },
            _ => SnapError::SourceUnreadable {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        if meta.is_dir() {
            return Err(SnapError::SourceIsDirectory {
                path: path.to_path_buf(),
            });
        }
        let is_block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !is_block_device {
            return Err(SnapError::SourceNotRegular {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(|e| SnapError::SourceUnreadable {
            path: path.to_path_buf(),
            source: e,
        })?;
        let size = current_size(&file, path)?;
        Ok(FileImage {
            path: path.to_path_buf(),
            file,
            size,
            is_block_device,
            direct: None,
        })
    }

    /// Reads the parts a caller asks for (changed blocks, samples) with
    /// `O_DIRECT`, in large requests, into a buffer of its own, where the
    /// filesystem allows it; whole windows are still mapped. For a
    /// snapshot's clone, whose pages nobody else reads.
    pub fn with_direct_reads(mut self) -> FileImage {
        self.direct = open_direct_read(&self.path);
        self
    }

    /// `offset..offset+len` with only `wanted` ∩ `data` read, direct;
    /// `None` when a direct read is refused (the caller maps instead).
    fn read_direct(
        &self,
        direct: &File,
        offset: u64,
        len: usize,
        wanted: &[Range<usize>],
        data: &[Range<usize>],
    ) -> Result<Option<AlignedBuf>> {
        use std::os::unix::fs::FileExt;
        let a = DIRECT_ALIGN;
        if !offset.is_multiple_of(a as u64) {
            return Ok(None);
        }
        let cap = len.div_ceil(a) * a;
        // Only the pieces read are touched, so only they take memory:
        // small pages (a huge page is zeroed whole at its first touch).
        let mut buf = AlignedBuf::small_pages();
        buf.reserve(cap);
        let mut pieces: Vec<Range<usize>> = Vec::new();
        for p in overlaps(wanted, data) {
            let r = p.start / a * a..(p.end.div_ceil(a) * a).min(cap);
            match pieces.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => pieces.push(r),
            }
        }
        for r in pieces {
            let mut at = r.start;
            while at < r.end {
                let Some(dst) = buf.as_mut_slice().get_mut(at..r.end) else {
                    break;
                };
                match direct.read_at(dst, offset + at as u64) {
                    // The end of the file where it ended when opened: the
                    // rest of the last page reads as zeros.
                    Ok(0) if offset + at as u64 >= self.size => break,
                    // Before it: the file shrank. A mapping would fault;
                    // zeros would be stored as the image's bytes.
                    Ok(0) => {
                        return Err(truncated(&self.path));
                    }
                    Ok(n) => at += n,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(SnapError::SourceUnreadable {
                            path: self.path.clone(),
                            source: e,
                        });
                    }
                }
            }
        }
        // A mapped window faults on pages the file lost; a direct read
        // sees holes or an early end instead, so the size is checked.
        if current_size(&self.file, &self.path)? < self.size {
            return Err(truncated(&self.path));
        }
        buf.truncate(len);
        Ok(Some(buf))
    }

    /// Maps `offset..offset+len`. A caller that reads all of it (`wanted`
    /// is `None`) gets the next window read ahead and sequential access;
    /// one that reads parts only (changed blocks) gets exactly those parts
    /// read ahead, and no read-ahead beyond them: sequential read-ahead
    /// would read the clean parts too (a whole 2 GiB clone, through a loop
    /// device, for 130 MiB of change).
    fn map_window(
        &self,
        offset: u64,
        len: usize,
        wanted: Option<&[Range<usize>]>,
    ) -> Result<Window<'_>> {
        let data = self.data_ranges(offset, len);
        if let (Some(wanted), Some(direct)) = (wanted, self.direct.as_ref())
            && !data.is_empty()
            && let Some(buf) = self.read_direct(direct, offset, len, wanted, &data)?
        {
            return Ok(Window {
                guard: None,
                hold: Hold::Aligned(buf),
                data,
                path: &self.path,
            });
        }
        match wanted {
            None if offset + (len as u64) < self.size => {
                // Only the next window's data: reading ahead a hole makes the
                // kernel allocate and zero page-cache pages for it.
                let next = offset + len as u64;
                let next_len = (self.size - next).min(len as u64) as usize;
                for r in self.data_ranges(next, next_len) {
                    self.will_need(next, r);
                }
            }
            None => {}
            Some(wanted) => {
                for r in overlaps(wanted, &data) {
                    self.will_need(offset, r);
                }
            }
        }
        if data.is_empty() || len == 0 {
            return Ok(Window {
                guard: None,
                hold: Hold::Empty,
                data,
                path: &self.path,
            });
        }
        // SAFETY: the mapping is read-only and private to this window. The
        // file may change under it; a shrink is caught by the SIGBUS guard
        // and a change of size by `check_unchanged`.
        let map =
            unsafe { MmapOptions::new().offset(offset).len(len).map(&self.file) }.map_err(|e| {
                SnapError::SourceUnreadable {
                    path: self.path.clone(),
                    source: e,
                }
            })?;
        if wanted.is_none() {
            let _ = map.advise(Advice::Sequential);
        }
        let guard = sigbus::Guard::new(map.as_ptr(), map.len());
        Ok(Window {
            guard: Some(guard),
            hold: Hold::Map(map),
            data,
            path: &self.path,
        })
    }

    /// `offset..offset+len` for a caller that reads just that (a sampled
    /// block): nothing around it is read ahead.
    pub fn part(&self, offset: u64, len: usize) -> Result<Window<'_>> {
        let all: Range<usize> = 0..len;
        self.map_window(offset, len, Some(std::slice::from_ref(&all)))
    }

    /// Asks the kernel to start reading `range` (relative to `base`).
    fn will_need(&self, base: u64, range: Range<usize>) {
        read_ahead::will_need(
            &self.file,
            base + range.start as u64,
            (range.end - range.start) as u64,
        );
    }

    /// Data ranges of `offset..offset+len`, relative to `offset`.
    fn data_ranges(&self, offset: u64, len: usize) -> Vec<Range<usize>> {
        let end = offset + len as u64;
        if self.is_block_device {
            return std::iter::once(0..len).collect();
        }
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            // SAFETY: lseek on a file descriptor we own.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // only a hole remains
                }
                // SEEK_DATA unsupported: treat everything as data.
                return std::iter::once(0..len).collect();
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            out.push((data - offset) as usize..(hole - offset) as usize);
            if hole <= data {
                break;
            }
            pos = hole;
        }
        out
    }
}

fn current_size(file: &File, path: &Path) -> Result<u64> {
    let meta = file.metadata().map_err(|e| SnapError::SourceUnreadable {
        path: path.to_path_buf(),
        source: e,
    })?;
    if meta.file_type().is_block_device() {
        // SAFETY: lseek on a descriptor we own; the position is not used.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(SnapError::SourceUnreadable {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(end as u64)
    } else {
        Ok(meta.len())
    }
}

impl ImageSource for FileImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn window(&self, offset: u64, len: usize) -> Result<Window<'_>> {
        self.map_window(offset, len, None)
    }

    fn window_for(&self, offset: u64, len: usize, wanted: &[Range<usize>]) -> Result<Window<'_>> {
        let whole =
            wanted.len() == 1 && wanted.first().is_some_and(|w| w.start == 0 && w.end >= len);
        self.map_window(offset, len, (!whole).then_some(wanted))
    }

    fn change_stamp(&self) -> Option<ChangeStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(ChangeStamp {
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            size: current_size(&self.file, &self.path).ok()?,
        })
    }

    fn check_unchanged(&self) -> Result<()> {
        let now = current_size(&self.file, &self.path)?;
        if now != self.size {
            return Err(SnapError::SourceChanged {
                path: self.path.clone(),
                reason: format!("its size went from {} to {} bytes", self.size, now),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{cut, drop_cached, resident};
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_part_read_reads_nothing_ahead_and_a_window_reads_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; 48 << 20]).unwrap();
        f.sync_all().unwrap();
        if !drop_cached(&p) {
            coffre_vault_store::skip::skip(&format!(
                "the page cache keeps {} (tmpfs?)",
                p.display()
            ));
            return;
        }
        let img = FileImage::open(&p).unwrap();
        let w = img.part(1 << 20, 65536).unwrap();
        assert!(w.bytes().iter().all(|&b| b == 7));
        w.finish().unwrap();
        // Nothing past the block: a sampled block pulls in no window.
        assert_eq!(resident(&p, ((1 << 20) + 65536)..(48 << 20)), 0);
        drop_cached(&p);
        // A whole window asks for the next one.
        let w = img.window(0, 16 << 20).unwrap();
        w.finish().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(resident(&p, (16 << 20)..(32 << 20)) > 0);
    }

    #[test]
    fn direct_reads_of_parts_give_the_mapped_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        // 3 MiB and a ragged tail, a hole from 1 to 2 MiB.
        let len = (3 << 20) + 1000;
        let mut bytes: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        bytes[1 << 20..2 << 20].fill(0);
        std::fs::write(&p, &bytes).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        // SAFETY: a hole punched in our own test file.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                1 << 20,
                1 << 20,
            )
        };
        assert_eq!(r, 0);
        let mapped = FileImage::open(&p).unwrap();
        let direct = FileImage::open(&p).unwrap().with_direct_reads();
        let wanted = [
            0..65536,
            (1 << 20) - 4096..(1 << 20) + 4096,
            (2 << 20) + 100..(2 << 20) + 70_000,
            (3 << 20)..len,
        ];
        let a = mapped.window_for(0, len, &wanted).unwrap();
        let b = direct.window_for(0, len, &wanted).unwrap();
        assert_eq!(a.bytes().len(), len);
        assert_eq!(b.bytes().len(), len);
        for w in &wanted {
            assert_eq!(a.bytes()[w.clone()], b.bytes()[w.clone()], "{w:?}");
            assert_eq!(b.bytes()[w.clone()], bytes[w.clone()], "{w:?}");
        }
        assert!(b.is_hole((1 << 20) + 4096..2 << 20));
        if direct.direct.is_some() {
            assert!(matches!(b.hold, Hold::Aligned(_)), "read direct");
            assert!(matches!(a.hold, Hold::Map(_)));
        } else {
            coffre_vault_store::skip::skip(&format!(
                "direct part: {} refuses O_DIRECT",
                p.display()
            ));
        }
        // A window that starts later, and a sampled block.
        let part: Range<usize> = 4096..8192;
        let c = direct
            .window_for(2 << 20, 1 << 20, std::slice::from_ref(&part))
            .unwrap();
        assert_eq!(
            c.bytes()[4096..8192],
            bytes[(2 << 20) + 4096..(2 << 20) + 8192]
        );
        let d = direct.part(65536, 65536).unwrap();
        assert_eq!(d.bytes(), &bytes[65536..131072]);
    }

    #[test]
    fn holes_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[1u8; 65536]).unwrap();
        f.sync_all().unwrap();
        let img = FileImage::open(&p).unwrap();
        let w = img.window(0, 8 << 20).unwrap();
        assert!(w.is_hole(0..65536));
        assert!(!w.is_hole((4 << 20)..(4 << 20) + 65536));
        assert!(w.is_hole((6 << 20)..(7 << 20)));
        assert_eq!(w.bytes()[(4 << 20) + 10], 1);
        w.finish().unwrap();
    }

    #[test]
    fn truncation_under_the_mapping_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shrinks.img");
        std::fs::write(&p, vec![0xabu8; 1 << 20]).unwrap();
        let img = FileImage::open(&p).unwrap();
        let w = img.window(0, 1 << 20).unwrap();
        assert_eq!(w.bytes()[0], 0xab);
        // Shrink the file under the live mapping, then touch the lost pages:
        // without the guard this is a SIGBUS that kills the test process.
        cut(&p, 4096);
        let sum: u64 = w.bytes().iter().map(|&b| u64::from(b)).sum();
        assert!(sum < 0xab * (1 << 20), "lost pages must read as zeros");
        assert!(matches!(w.finish(), Err(SnapError::SourceChanged { .. })));
        assert!(matches!(
            img.check_unchanged(),
            Err(SnapError::SourceChanged { .. })
        ));
    }

    #[test]
    fn truncation_under_a_direct_read_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shrinks.img");
        std::fs::write(&p, vec![0xabu8; 1 << 20]).unwrap();
        let img = FileImage::open(&p).unwrap().with_direct_reads();
        if img.direct.is_none() {
            coffre_vault_store::skip::skip(&format!("{} refuses O_DIRECT", p.display()));
            return;
        }
        let wanted = [0..4096, (512 << 10)..(576 << 10)];
        let w = img.window_for(0, 1 << 20, &wanted).unwrap();
        assert!(matches!(w.hold, Hold::Aligned(_)), "read direct");
        assert_eq!(w.bytes()[(512 << 10) + 7], 0xab);
        w.finish().unwrap();
        cut(&p, 4096);
        // The second part now lies past the end: an error, not zeros.
        match img.window_for(0, 1 << 20, &wanted) {
            Err(SnapError::SourceChanged { path, reason }) => {
                assert_eq!(path, p);
                assert!(reason.contains("truncated"), "{reason}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a shrunk file read as zeros"),
        }
    }

    #[test]
    fn bad_sources_have_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileImage::open(&dir.path().join("missing.img")),
            Err(SnapError::SourceNotFound { .. })
        ));
        assert!(matches!(
            FileImage::open(dir.path()),
            Err(SnapError::SourceIsDirectory { .. })
        ));
    }
}
