//! Direct I/O (`O_DIRECT`): buffers aligned for it, and an appender that
//! writes a file's new bytes straight to the device (packs, segments).
//!
//! A page-cache write costs a copy into a freshly allocated page, and on a
//! virtual machine whose memory is full of cache that allocation is the
//! expensive part (measured: 0.4–5 GB/s for the same `dd`, against a
//! steady 2.3 GB/s direct). Files that are written once and read later,
//! if ever (snapshot packs, restored images), skip the cache. Whole
//! aligned pieces go direct; the unaligned tail goes through the ordinary
//! descriptor when the caller flushes. A filesystem that refuses
//! `O_DIRECT` (tmpfs) gets ordinary writes, with the same results.
//!
//! A direct request's memory is its scatter list, one entry per page, and
//! a virtio disk takes at most `max_segments` entries a request (254 on
//! our test machine): from 4 KiB pages each 1 MiB of a write goes out as
//! 1016 KiB and 8 KiB, a 6 MiB write as 12 requests. Buffers of
//! [`HUGE_PAGE`] or more therefore live in an anonymous mapping aligned
//! to it and advised to use transparent huge pages (`MADV_HUGEPAGE`), so
//! the same write goes out as a 4 MiB and a 2 MiB request (measured: a
//! warm restore of 1.13 GiB from 0.98–1.13 s to 0.70–0.78 s, its write
//! requests from 4,424 to 378). Where the kernel has no huge pages to
//! give, the buffer is ordinary memory and the writes are as before. A
//! buffer read in sparse pieces keeps small pages
//! ([`AlignedBuf::small_pages`]): a huge page is zeroed whole at its
//! first touch.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Alignment of direct writes: offsets, lengths and buffers.
pub const DIRECT_ALIGN: usize = 4096;

/// Size of a transparent huge page on x86-64 (and arm64 with 4 KiB
/// pages): the alignment of large buffers, and the size from which a
/// buffer is given huge pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// A byte buffer whose start is [`DIRECT_ALIGN`]-aligned. One of
/// [`HUGE_PAGE`] bytes or more is [`HUGE_PAGE`]-aligned and advised to
/// use huge pages (see the module's words), unless it was made with
/// [`AlignedBuf::small_pages`] or the kernel refused the mapping. Its
/// memory reads as zeros until written (anonymous memory, as `calloc`'s).
#[derive(Default)]
pub struct AlignedBuf {
    memory: Memory,
    start: usize,
    len: usize,
    /// Never a mapping: made with [`AlignedBuf::small_pages`], or a
    /// mapping failed once (then ordinary memory, reused).
    no_map: bool,
}

/// Where an [`AlignedBuf`]'s bytes live.
enum Memory {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
}

impl Default for Memory {
    fn default() -> Memory {
        Memory::Heap(Vec::new())
    }
}

impl Memory {
    fn bytes(&self) -> &[u8] {
        match self {
            Memory::Heap(v) => v,
            Memory::Mapped(m) => m,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Memory::Heap(v) => v,
            Memory::Mapped(m) => m,
        }
    }

    /// Bytes from `start` the buffer may use: to the end of ordinary
    /// memory; in a mapping, the huge pages advised ([`Memory::huge`]
    /// maps one huge page more than it advises).
    fn room(&self, start: usize) -> usize {
        match self {
            Memory::Heap(v) => v.len().saturating_sub(start),
            Memory::Mapped(m) => m.len().saturating_sub(HUGE_PAGE),
        }
    }

    /// Ordinary memory with room for `len` bytes from a [`DIRECT_ALIGN`]
    /// boundary, and the boundary's offset. No room at all for a length
    /// past the address space.
    fn heap(len: usize) -> (Memory, usize) {
        let Some(size) = len.checked_add(DIRECT_ALIGN) else {
            return (Memory::default(), 0);
        };
        let v = vec![0u8; size];
        let start = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        (Memory::Heap(v), start)
    }

    /// An anonymous mapping with room for `len` bytes (rounded up to
    /// whole huge pages) from a [`HUGE_PAGE`] boundary, all advised to
    /// use huge pages, and the boundary's offset. `None` where the
    /// mapping fails.
    fn huge(len: usize) -> Option<(Memory, usize)> {
        let span = len.checked_next_multiple_of(HUGE_PAGE)?;
        let map = memmap2::MmapMut::map_anon(span.checked_add(HUGE_PAGE)?).ok()?;
        let start = map.as_ptr().align_offset(HUGE_PAGE);
        // Advice only: a kernel without transparent huge pages keeps
        // small ones, and the buffer works the same.
        let _ = map.advise_range(memmap2::Advice::HugePage, start, span);
        Some((Memory::Mapped(map), start))
    }
}

impl AlignedBuf {
    /// An empty buffer that never takes huge pages: for a buffer read in
    /// sparse pieces (a huge page is faulted in and zeroed whole at its
    /// first touch), and for a stand-in for `dd`, whose direct requests
    /// are split at small pages.
    pub fn small_pages() -> AlignedBuf {
        AlignedBuf {
            no_map: true,
            ..AlignedBuf::default()
        }
    }

    /// Makes room for `len` bytes (contents unspecified). A length past
    /// the address space gets an empty buffer.
    pub fn reserve(&mut self, len: usize) {
        let huge = len >= HUGE_PAGE && !self.no_map;
        let fits = len <= self.memory.room(self.start)
            && match self.memory {
                Memory::Mapped(_) => true,
                // A large buffer moves to huge pages, once.
                Memory::Heap(_) => !huge,
            };
        if !fits {
            let mapped = if huge { Memory::huge(len) } else { None };
            self.no_map |= huge && mapped.is_none();
            (self.memory, self.start) = match mapped {
                Some(m) => m,
                None => Memory::heap(len),
            };
        }
        self.len = len;
    }

    /// True when the bytes are in their own mapping (huge pages asked).
    #[cfg(test)]
    fn is_mapped(&self) -> bool {
        matches!(self.memory, Memory::Mapped(_))
    }

    /// Keeps the first `len` bytes (at most those reserved), as they are.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The `len` bytes of the last [`AlignedBuf::reserve`].
    pub fn as_slice(&self) -> &[u8] {
        self.memory
            .bytes()
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }

    /// The same, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        self.memory
            .bytes_mut()
            .get_mut(start..start + len)
            .unwrap_or_default()
    }
}

/// Opens `path` a second time with `O_DIRECT`, for writing; `None` where
/// the filesystem refuses it.
pub fn open_direct(path: &Path) -> Option<File> {
    open_direct_as(path, std::fs::OpenOptions::new().write(true))
}

/// Opens `path` a second time with `O_DIRECT`, for reading; `None` where
/// the filesystem refuses it.
pub fn open_direct_read(path: &Path) -> Option<File> {
    open_direct_as(path, std::fs::OpenOptions::new().read(true))
}

fn open_direct_as(path: &Path, opts: &mut std::fs::OpenOptions) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_DIRECT).open(path).ok()
}

/// How much an appender buffers before it writes.
const APPEND_BUFFER: usize = 4 << 20;

/// Appends to a file it alone writes: whole aligned pieces with
/// `O_DIRECT` as the buffer fills, the rest on [`DirectAppender::flush`].
pub struct DirectAppender {
    file: File,
    direct: Option<File>,
    buf: AlignedBuf,
    /// File offset of the buffer's first byte (aligned while direct).
    buf_at: u64,
    /// Bytes in the buffer.
    filled: usize,
}

impl DirectAppender {
    /// Appends to `file` (at `path`, empty), direct where possible.
    pub fn new(file: File, path: &Path) -> DirectAppender {
        let mut buf = AlignedBuf::default();
        buf.reserve(APPEND_BUFFER + DIRECT_ALIGN);
        DirectAppender {
            direct: open_direct(path),
            file,
            buf,
            buf_at: 0,
            filled: 0,
        }
    }

    /// Appends to `file` (at `path`, opened for reading and writing) from
    /// its byte `len` on: the partial block before `len` is read back into
    /// the buffer, so that direct writes stay aligned.
    pub fn resume(file: File, path: &Path, len: u64) -> std::io::Result<DirectAppender> {
        let mut a = DirectAppender::new(file, path);
        let start = len / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let head = (len - start) as usize;
        let dst = a
            .buf
            .as_mut_slice()
            .get_mut(..head)
            .ok_or_else(|| std::io::Error::other("append buffer overrun"))?;
        a.file.read_exact_at(dst, start)?;
        a.buf_at = start;
        a.filled = head;
        Ok(a)
    }

    /// The ordinary descriptor (for syncs).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.buf_at + self.filled as u64
    }

    /// True when nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `bytes`.
    pub fn append(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let room = APPEND_BUFFER.saturating_sub(self.filled);
            if room == 0 {
                self.drain()?;
                continue;
            }
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buf
                .as_mut_slice()
                .get_mut(self.filled..self.filled + now.len())
                .ok_or_else(|| std::io::Error::other("append buffer overrun"))?
                .copy_from_slice(now);
            self.filled += now.len();
            bytes = rest;
        }
        Ok(())
    }

    /// Writes the buffer's whole aligned pieces (all of it when not
    /// direct) and keeps the rest at its front.
    fn drain(&mut self) -> std::io::Result<()> {
        let whole = if self.direct.is_some() {
            self.filled / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            self.filled
        };
        if whole == 0 {
            return Ok(());
        }
        let piece = self
            .buf
            .as_slice()
            .get(..whole)
            .ok_or_else(|| std::io::Error::other("append buffer overrun"))?;
        let direct = match self.direct.as_ref() {
            Some(d) => d.write_all_at(piece, self.buf_at),
            None => self.file.write_all_at(piece, self.buf_at),
        };
        if let Err(e) = direct {
            if self.direct.is_none() || e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            // The filesystem took the descriptor but not the write.
            self.direct = None;
            return self.drain();
        }
        self.buf.as_mut_slice().copy_within(whole..self.filled, 0);
        self.filled -= whole;
        self.buf_at += whole as u64;
        Ok(())
    }

    /// Hands everything appended to the kernel: whole pieces direct, the
    /// unaligned tail through the page cache (it stays buffered too, and
    /// is written again, direct, as part of the next whole piece).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.drain()?;
        if self.filled > 0 {
            let tail = self
                .buf
                .as_slice()
                .get(..self.filled)
                .ok_or_else(|| std::io::Error::other("append buffer overrun"))?;
            self.file.write_all_at(tail, self.buf_at)?;
        }
        Ok(())
    }

    /// Starts writing back what went through the page cache (ordinary
    /// writes), so that the final fsync has little left to do.
    pub fn start_writeback(&mut self) -> std::io::Result<()> {
        if self.direct.is_some() {
            return self.drain();
        }
        let from = self.buf_at;
        self.drain()?;
        crate::store::local::durable::start_writeback(&self.file, from, self.buf_at - from);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn roundtrip(dir: &Path) {
        let path = dir.join("f");
        let file = File::create(&path).unwrap();
        let mut a = DirectAppender::new(file, &path);
        let mut want = Vec::new();
        for i in 0..300u32 {
            let piece: Vec<u8> = (0..(i * 977 % 70_001)).map(|j| (j ^ i) as u8).collect();
            a.append(&piece).unwrap();
            want.extend_from_slice(&piece);
            if i % 97 == 0 {
                // A flush mid-way leaves a buffered tail that the next
                // direct piece writes over.
                a.flush().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), want);
            }
            if i % 13 == 0 {
                a.start_writeback().unwrap();
            }
        }
        a.flush().unwrap();
        assert_eq!(a.len(), want.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    fn resumed(dir: &Path) {
        let path = dir.join("r");
        let mut want: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &want).unwrap();
        for round in 0..3u32 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut a = DirectAppender::resume(file, &path, want.len() as u64).unwrap();
            assert_eq!(a.len(), want.len() as u64);
            let piece: Vec<u8> = (0..(5_000_000 + round * 3))
                .map(|j| (j * 7 + round) as u8)
                .collect();
            a.append(&piece).unwrap();
            want.extend_from_slice(&piece);
            a.flush().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), want, "round {round}");
        }
    }

    #[test]
    fn appends_land_byte_exact_with_and_without_direct_io() {
        // The build directory is on a disk (direct); /dev/shm is tmpfs,
        // which refuses O_DIRECT (ordinary writes).
        let disk = tempfile_dir(std::env::temp_dir());
        roundtrip(&disk);
        resumed(&disk);
        let _ = std::fs::remove_dir_all(&disk);
        if Path::new("/dev/shm").is_dir() {
            let shm = tempfile_dir(PathBuf::from("/dev/shm"));
            roundtrip(&shm);
            resumed(&shm);
            let _ = std::fs::remove_dir_all(&shm);
        }
    }

    /// Fills the buffer's bytes with a pattern and reads it back whole.
    fn writable(buf: &mut AlignedBuf, seed: u8) {
        let n = buf.as_slice().len();
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        assert!(
            buf.as_slice()
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i as u8).wrapping_mul(31).wrapping_add(seed)),
            "{n} bytes read back"
        );
    }

    #[test]
    fn small_buffers_stay_on_the_heap_and_large_ones_start_on_a_huge_page() {
        let mut small = AlignedBuf::default();
        small.reserve(HUGE_PAGE - DIRECT_ALIGN);
        assert!(!small.is_mapped());
        assert_eq!(small.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        writable(&mut small, 1);

        // Growing past a huge page moves the buffer; shrinking keeps it.
        for (len, seed) in [(HUGE_PAGE, 2), (3 * HUGE_PAGE + 4096, 3), (4096, 4)] {
            small.reserve(len);
            assert!(small.is_mapped(), "{len} bytes");
            assert_eq!(small.as_slice().len(), len);
            assert_eq!(
                small.as_slice().as_ptr() as usize % HUGE_PAGE,
                0,
                "{len} bytes"
            );
            writable(&mut small, seed);
        }

        // A stand-in for `dd` keeps small pages, whatever its size.
        let mut dd = AlignedBuf::small_pages();
        dd.reserve(3 * HUGE_PAGE);
        assert!(!dd.is_mapped());
        assert_eq!(dd.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        writable(&mut dd, 5);
    }

    /// The kernel's transparent huge page mode, `None` where it has none.
    fn thp_mode() -> Option<String> {
        let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
        let mode = s.split('[').nth(1)?.split(']').next()?.to_string();
        Some(mode)
    }

    /// The `THPeligible` line of the mapping in `/proc/self/smaps` that
    /// holds `addr`.
    fn thp_eligible(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or_default();
            if let Some((a, b)) = head.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(v) = line.strip_prefix("THPeligible:") {
                return Some(v.trim() == "1");
            }
        }
        None
    }

    #[test]
    fn a_large_buffer_is_advised_to_use_huge_pages() {
        let mut buf = AlignedBuf::default();
        buf.reserve(3 * HUGE_PAGE);
        writable(&mut buf, 6);
        match thp_mode().as_deref() {
            Some("always") | Some("madvise") => {}
            other => {
                return crate::skip::skip(&format!(
                    "the kernel gives no transparent huge pages (mode {other:?})"
                ));
            }
        }
        // With the mode at `madvise`, only the advice makes it eligible:
        // from the buffer's first byte to its last.
        let at = buf.as_slice().as_ptr() as usize;
        assert_eq!(thp_eligible(at), Some(true));
        assert_eq!(thp_eligible(at + 3 * HUGE_PAGE - 1), Some(true));
        // Grown past its advised room, it is advised to its end too.
        buf.reserve(3 * HUGE_PAGE + 4096);
        writable(&mut buf, 7);
        let at = buf.as_slice().as_ptr() as usize;
        assert_eq!(thp_eligible(at + 3 * HUGE_PAGE + 4095), Some(true));
    }

    fn tempfile_dir(base: PathBuf) -> PathBuf {
        let d = base.join(format!(
            "coffre-direct-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
