//! Records read ahead in runs: what a restore's groups and a point read
//! in place (`access`: the export's and the mount's read-ahead) fetch
//! before they decode.
//!
//! The records of the blocks wanted next are read in a few large runs
//! into one aligned buffer, so the decoders find them in memory: no small
//! read per block. Packs and segments are written with `O_DIRECT` and are
//! not in the page cache after a backup; read buffered, one record at a
//! time, they cost the first restore after a backup about 0.65 s of
//! system time for 0.5 GB of records (`strace -c`: 18,700 `pread64` at
//! 55 µs), against almost none for the same bytes read directly in runs.
//!
//! Each run is read in pieces, several at once ([`READERS`]): with one
//! read in flight at a time, the device idles between requests while the
//! restore's own writes compete with them (a cold restore of the 2 GiB
//! bench image took 1.22–1.41 s with one read at a time, 1.03–1.23 s with
//! four). A piece the page cache holds (`cachestat`, which reads nothing)
//! is copied from it instead, a disk read would compete with the
//! restore's writes, where the cache held the 4 MiB around it whole when
//! the file was opened; elsewhere it is read directly ([`RecordFile`]
//! says why). A file that refuses `O_DIRECT` (tmpfs) is read buffered.
//!
//! Nothing here is trusted: a fetched record is only bytes the decoder
//! checks (header, id, length, CRC, BLAKE3: [`decode_fetched`]) like any
//! other, and a record that could not be fetched, or whose bytes do not
//! check, is read the ordinary way by the caller (which reports damage
//! and repairs copies).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use coffre_vault_store::ChunkId;
use coffre_vault_store::format::record::{HEADER_LEN, RecordDecoder, RecordHeader};

use coffre_vault_store::store::local::direct::{AlignedBuf, DIRECT_ALIGN};

/// Where one block's record lies: a file (a pack's index or a segment's
/// id), an offset and a length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    pub file: u64,
    pub offset: u64,
    pub len: u32,
}

impl Place {
    /// A vault chunk's place: its segment.
    pub fn in_segment(l: &coffre_vault_store::index::ChunkLocation) -> Place {
        Place {
            file: l.segment,
            offset: l.offset,
            len: l.len,
        }
    }

    /// A snapshot record's place: its pack, by number.
    pub fn in_pack(l: &coffre_snapshotter::manifest::PackLoc) -> Place {
        Place {
            file: u64::from(l.pack),
            offset: l.offset,
            len: l.len,
        }
    }
}

/// Records at most this far apart are read in one run: the bytes between
/// them cost less than another request.
const GAP: u64 = 64 << 10;

/// Runs are read in pieces of this size (a multiple of
/// [`DIRECT_ALIGN`]), [`READERS`] at a time, each one request to the disk
/// (the fetch buffer is in huge pages, so a piece is a few segments).
/// Fewer, larger requests cost less on a virtual disk. Measured, cold
/// restores alternated: 0.94–1.07 s with 2 MiB pieces against 1.06–1.18 s
/// with 512 KiB, and 5 % faster than a fetch shared out in four pieces of
/// 0.5–2 MiB; an export's load (about 1 MiB of records, then one piece)
/// converted no slower (1.45–1.59 s against 1.55–1.64 s).
const PIECE: usize = coffre_vault_store::store::local::direct::HUGE_PAGE;
/// Reads in flight at once: the fetcher's thread and three helpers.
const READERS: usize = 4;

/// A piece of a run: where it is read from and into.
struct Piece<'a> {
    run: usize,
    file: &'a RecordFile,
    offset: u64,
    dst: &'a mut [u8],
}

/// Reads `pieces` (in run order, each run's in file order) with up to
/// [`READERS`] threads; returns per run the bytes read from its start
/// before its first short piece. The pieces of a helper thread that
/// panicked count as short.
fn read_pieces(pieces: Vec<Piece<'_>>, runs: usize) -> Vec<u64> {
    let shape: Vec<(usize, usize)> = pieces.iter().map(|p| (p.run, p.dst.len())).collect();
    let n = pieces.len();
    let queue = std::sync::Mutex::new(pieces.into_iter().enumerate());
    let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).next();
    // (piece, bytes read) for each piece a thread read.
    let work = || {
        let mut out = Vec::new();
        while let Some((i, p)) = next() {
            out.push((i, p.file.read(p.dst, p.offset)));
        }
        out
    };
    let done = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..READERS.min(n))
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("coffre-fetch".into())
                    .spawn_scoped(scope, work)
                    .ok()
            })
            .collect();
        let mut all = work();
        for h in helpers {
            all.extend(h.join().unwrap_or_default());
        }
        all
    });
    let mut read = vec![0usize; n];
    for (i, got) in done {
        if let Some(slot) = read.get_mut(i) {
            *slot = got;
        }
    }
    run_prefixes(&shape, &read, runs)
}

/// Per run, the bytes read from its start up to its first short piece:
/// `shape` is each piece's run and length (in run order, each run's in
/// file order), `read` the bytes each piece got.
fn run_prefixes(shape: &[(usize, usize)], read: &[usize], runs: usize) -> Vec<u64> {
    let mut got = vec![0u64; runs];
    let mut short = vec![false; runs];
    for (&(run, want), &read) in shape.iter().zip(read) {
        if let (Some(g), Some(s)) = (got.get_mut(run), short.get_mut(run))
            && !*s
        {
            *g += read.min(want) as u64;
            *s = read < want;
        }
    }
    got
}

/// The records of one group, read ahead.
#[derive(Default)]
pub(crate) struct Fetched {
    buf: AlignedBuf,
    /// Per block of the group: where its record is in `buf`.
    at: Vec<Option<(usize, usize)>>,
}

impl Fetched {
    /// Block `i`'s record bytes, when they were fetched.
    pub fn record(&self, i: usize) -> Option<&[u8]> {
        let (start, len) = (*self.at.get(i)?)?;
        self.buf.as_slice().get(start..start + len)
    }
}

/// The page cache's hold on a record file is taken per this many bytes
/// (aligned) when the file is opened.
const WARM_GRID: u64 = 4 << 20;

/// A file of records, opened twice: buffered, and with `O_DIRECT` where
/// the filesystem allows it.
pub(crate) struct RecordFile {
    cached: File,
    direct: Option<File>,
    /// Per [`WARM_GRID`] bytes of the file: whether the page cache held
    /// them whole when the file was opened. Only there is a piece the
    /// cache holds copied from it; elsewhere every piece is read directly,
    /// cached or not. A buffered read of a cached piece may meet the
    /// kernel's read-ahead mark, and the read-ahead it starts (8 MiB on
    /// some disks; advice does not stop that kind) makes the next pieces
    /// look cached too: read buffered in turn, they carried the read-ahead
    /// through a whole pack whose first 6 MiB alone were cached (the first
    /// restore after a backup: 1.65 s with 1.0-1.1 s of system time,
    /// against 1.26-1.38 s and 0.13-0.19 s read directly). Pieces cached
    /// since the file was opened are such read-ahead, and read directly.
    warm: Vec<bool>,
}

impl RecordFile {
    /// A file read through `cached` where the page cache holds it, else
    /// directly through `direct` (`None`: buffered, as on tmpfs). `cached`
    /// should be a descriptor of its own: it is advised not to read ahead.
    pub fn new(cached: File, direct: Option<File>) -> RecordFile {
        let mut warm = Vec::new();
        if direct.is_some() {
            use std::os::fd::AsRawFd;
            let len = cached.metadata().map_or(0, |m| m.len());
            warm = (0..len.div_ceil(WARM_GRID))
                .map(|k| {
                    let at = k * WARM_GRID;
                    in_page_cache(&cached, at, WARM_GRID.min(len - at))
                })
                .collect();
            // No synchronous read-ahead on the buffered reads' behalf.
            // SAFETY: advice on a descriptor we own.
            unsafe { libc::posix_fadvise(cached.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        }
        RecordFile {
            cached,
            direct,
            warm,
        }
    }

    /// The file at `path`, opened twice (buffered, and with `O_DIRECT`
    /// where the filesystem allows it); `None` when it cannot be opened.
    pub fn open(path: &Path) -> Option<RecordFile> {
        Some(RecordFile::new(
            File::open(path).ok()?,
            coffre_vault_store::store::local::direct::open_direct_read(path),
        ))
    }

    /// The same file, its descriptors duplicated.
    pub fn try_clone(&self) -> Option<RecordFile> {
        Some(RecordFile {
            cached: self.cached.try_clone().ok()?,
            direct: match &self.direct {
                Some(d) => Some(d.try_clone().ok()?),
                None => None,
            },
            warm: self.warm.clone(),
        })
    }

    /// True when `len` bytes at `offset` are copied from the page cache
    /// rather than read directly: it holds them now, and held their
    /// neighbourhood whole when the file was opened.
    fn copies_cached(&self, offset: u64, len: u64) -> bool {
        if self.direct.is_none() {
            return true;
        }
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let mut grid = offset / WARM_GRID..end.div_ceil(WARM_GRID);
        let was = |k: u64| {
            usize::try_from(k)
                .ok()
                .and_then(|k| self.warm.get(k).copied())
        };
        len > 0 && grid.all(|k| was(k) == Some(true)) && in_page_cache(&self.cached, offset, len)
    }

    /// Reads into `dst` at `offset` (both aligned to [`DIRECT_ALIGN`]):
    /// from the page cache where [`RecordFile::copies_cached`], else
    /// directly (buffered without `O_DIRECT`). Returns the bytes read.
    fn read(&self, dst: &mut [u8], offset: u64) -> usize {
        match &self.direct {
            Some(direct) if !self.copies_cached(offset, dst.len() as u64) => {
                read_full(direct, dst, offset)
            }
            _ => read_full(&self.cached, dst, offset),
        }
    }
}

/// Reads groups' records from the files `open` gives (`None` where a file
/// cannot be opened: its records are left to the caller).
pub(crate) struct Fetcher<'a> {
    open: Box<dyn Fn(u64) -> Option<RecordFile> + Send + 'a>,
    files: HashMap<u64, Option<RecordFile>>,
    /// Most files kept open (two descriptors each).
    files_kept: usize,
    /// Most bytes held for one group.
    cap: usize,
}

impl<'a> Fetcher<'a> {
    /// A fetcher holding at most `cap` bytes per group.
    pub fn new(cap: usize, open: impl Fn(u64) -> Option<RecordFile> + Send + 'a) -> Self {
        Fetcher {
            open: Box::new(open),
            files: HashMap::new(),
            files_kept: usize::MAX,
            cap,
        }
    }

    /// The same fetcher, keeping at most `n` files open: past them, the
    /// files are closed and opened again as needed. (A restore keeps every
    /// file it reads open; a fetcher an export keeps for hours may read
    /// any segment of a large vault.)
    pub fn keeping_files(mut self, n: usize) -> Self {
        self.files_kept = n.max(1);
        self
    }

    /// Reads the records at `places` (one per block of a group; `None` for
    /// blocks without a record) into `into`'s buffer, reused, and returns
    /// it. Records beyond the cap, in files that cannot be opened, or whose
    /// read failed are left out.
    pub fn fetch(&mut self, places: &[Option<Place>], mut into: Fetched) -> Fetched {
        into.at.clear();
        into.at.resize(places.len(), None);
        // (A place whose aligned end would pass 2^64 is left out.)
        let align = DIRECT_ALIGN as u64;
        let mut order: Vec<(u64, u64, u64, usize)> = places
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let p = (*p)?;
                let end = p.offset.checked_add(u64::from(p.len))?;
                end.checked_next_multiple_of(align)?;
                Some((p.file, p.offset, end, i))
            })
            .collect();
        order.sort_unstable();
        // Runs of records in one file, at most GAP apart, in aligned
        // bounds: (file, aligned start, aligned end, first, last) over
        // `order`.
        let mut runs: Vec<(u64, u64, u64, usize, usize)> = Vec::new();
        let mut total = 0u64;
        for (k, &(file, start, end, _)) in order.iter().enumerate() {
            let (a, b) = (start / align * align, end.div_ceil(align) * align);
            match runs.last_mut() {
                Some(r) if r.0 == file && a <= r.2.saturating_add(GAP) => {
                    let grown = b.max(r.2);
                    if total + (grown - r.2) > self.cap as u64 {
                        break;
                    }
                    total += grown - r.2;
                    r.2 = grown;
                    r.4 = k;
                }
                _ => {
                    if total + (b - a) > self.cap as u64 {
                        break;
                    }
                    total += b - a;
                    runs.push((file, a, b, k, k));
                }
            }
        }
        into.buf.reserve(total as usize);
        // (Runs come in file order: one file's runs are adjacent.)
        let mut new: Vec<u64> = runs
            .iter()
            .map(|r| r.0)
            .filter(|f| !self.files.contains_key(f))
            .collect();
        new.dedup();
        if self.files.len() + new.len() > self.files_kept {
            self.files.clear();
        }
        for &(file, ..) in &runs {
            self.file(file);
        }
        // Each run in pieces, into its place in the buffer.
        let files = &self.files;
        let mut pieces: Vec<Piece<'_>> = Vec::new();
        let mut rest = into.buf.as_mut_slice();
        for (r, &(file, a, b, ..)) in runs.iter().enumerate() {
            let Some((run, tail)) = rest.split_at_mut_checked((b - a) as usize) else {
                break;
            };
            rest = tail;
            let Some(f) = files.get(&file).and_then(Option::as_ref) else {
                continue;
            };
            for (k, dst) in run.chunks_mut(PIECE).enumerate() {
                pieces.push(Piece {
                    run: r,
                    file: f,
                    offset: a + (k * PIECE) as u64,
                    dst,
                });
            }
        }
        let got = read_pieces(pieces, runs.len());
        let mut at = 0usize;
        for (r, &(_, a, b, first, last)) in runs.iter().enumerate() {
            let got = got.get(r).copied().unwrap_or(0);
            for &(_, start, end, i) in order.get(first..=last).unwrap_or_default() {
                if end <= a + got
                    && let Some(slot) = into.at.get_mut(i)
                {
                    *slot = Some((at + (start - a) as usize, (end - start) as usize));
                }
            }
            at += (b - a) as usize;
        }
        into
    }

    /// A fetcher of a snapshot's packs (`packs`: its open pack files by
    /// number, `None` where one is missing), each opened again through
    /// `/proc/self/fd` with descriptors of its own (the fetch's advice
    /// stays off the snapshot reader's); `None` when none opens.
    pub fn of_packs(cap: usize, packs: Vec<Option<&File>>) -> Option<Fetcher<'static>> {
        let packs: Vec<Option<RecordFile>> = packs
            .into_iter()
            .map(|f| RecordFile::open(&fd_path(f?)))
            .collect();
        packs.iter().any(Option::is_some).then(|| {
            Fetcher::new(cap, move |i| {
                packs.get(usize::try_from(i).ok()?)?.as_ref()?.try_clone()
            })
        })
    }

    /// A fetcher of `vault`'s segments.
    pub fn of_segments(cap: usize, vault: &'a coffre_vault_store::Vault) -> Fetcher<'a> {
        Fetcher::new(cap, move |segment| {
            RecordFile::open(&vault.segment_path(segment))
        })
    }

    fn file(&mut self, id: u64) -> Option<&RecordFile> {
        let open = &self.open;
        self.files.entry(id).or_insert_with(|| open(id)).as_ref()
    }
}

/// A fetched record's header, when it names chunk `id` and its own length
/// is the record's.
fn fetched_header(record: &[u8], id: &ChunkId) -> Option<RecordHeader> {
    let header = RecordHeader::parse(record).ok()?;
    (header.id == *id && header.record_len() == record.len() as u64).then_some(header)
}

/// Decodes a fetched record of chunk `id` straight into `slot` (exactly
/// the block's length): the record's header must name `id` and its own
/// length, and its payload passes every check of the decoder.
pub(crate) fn decode_fetched(
    record: &[u8],
    id: &ChunkId,
    decoder: &mut RecordDecoder,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    slot: &mut [u8],
) -> bool {
    let Some(header) = fetched_header(record, id) else {
        return false;
    };
    decoder.use_keys(keys);
    decoder
        .decode_payload_into_slice(&header, record.get(HEADER_LEN..).unwrap_or_default(), slot)
        .is_ok()
}

/// [`decode_fetched`] into a vector of its own, of exactly `len` bytes
/// (a block handed to a cache whole); `None` when anything does not check.
pub(crate) fn decode_fetched_owned(
    record: &[u8],
    id: &ChunkId,
    decoder: &mut RecordDecoder,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    len: usize,
) -> Option<Vec<u8>> {
    let header = fetched_header(record, id).filter(|h| h.plain_len as usize == len)?;
    decoder.use_keys(keys);
    let mut out = Vec::with_capacity(len);
    decoder
        .decode_payload_into(
            &header,
            record.get(HEADER_LEN..).unwrap_or_default(),
            &mut out,
        )
        .ok()?;
    (out.len() == len).then_some(out)
}

/// The path that opens `file` again, the very file whatever its name is
/// now (`/proc/self/fd/N`).
fn fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// `cachestat(2)` (Linux 6.5): how many pages of a range the page cache
/// holds, without reading anything. Its number on the architectures whose
/// table numbers it 451 (libc does not name it there yet).
const SYS_CACHESTAT: Option<libc::c_long> = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "s390x",
    target_arch = "powerpc64"
)) {
    Some(451)
} else {
    None
};

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// True when the page cache holds every page of `len` bytes at `offset`
/// of `file`; false where it does not, or the kernel cannot tell (before
/// Linux 6.5, another architecture, a filter that refuses the call).
fn in_page_cache(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Some(nr) = SYS_CACHESTAT else {
        return false;
    };
    if len == 0 {
        return true;
    }
    // SAFETY: a query of a constant.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => return false,
    };
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: the kernel reads `range` and writes `stat`, both ours and
    // alive for the call, on a descriptor we own; it reads no file data.
    let r = unsafe {
        libc::syscall(
            nr,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    let Some(end) = offset.checked_add(len) else {
        return false;
    };
    let pages = end.div_ceil(page) - offset / page;
    r == 0 && stat.nr_cache >= pages
}

/// Reads into `dst` at `offset` until it is full, the file ends or a read
/// fails; returns the bytes read.
fn read_full(file: &File, dst: &mut [u8], offset: u64) -> usize {
    let mut got = 0;
    while let Some(rest) = dst.get_mut(got..).filter(|r| !r.is_empty()) {
        match file.read_at(rest, offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::AsRawFd;

    /// Drops `len` bytes at `offset` of `file` from the page cache.
    fn uncache(file: &File, offset: i64, len: i64) {
        file.sync_all().unwrap();
        // SAFETY: advice on a descriptor we own.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    }

    #[test]
    fn records_are_read_in_runs_and_those_beyond_the_cap_or_the_file_are_left_out() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let place = |file, offset, len| Some(Place { file, offset, len });
        let places = [
            place(7, 5_000, 1_000),
            None,
            place(7, 100, 200),
            place(7, 250_000, 60_000), // past the end of the file
            place(8, 0, 10),           // a file that cannot be opened
            place(7, 200_000, 3_000),
        ];
        // Wholly in the page cache, out of it, and without O_DIRECT at
        // all: the same records.
        let whole = File::open(&p).unwrap();
        for case in ["cached", "uncached", "buffered"] {
            if case == "uncached" {
                uncache(&whole, 0, 0);
            }
            let path = p.clone();
            let open = move |id: u64| {
                (id == 7).then(|| {
                    RecordFile::new(
                        File::open(&path).unwrap(),
                        (case != "buffered")
                            .then(|| {
                                coffre_vault_store::store::local::direct::open_direct_read(&path)
                            })
                            .flatten(),
                    )
                })
            };
            let mut f = Fetcher::new(1 << 20, open);
            let got = f.fetch(&places, Fetched::default());
            assert_eq!(got.record(0), Some(&data[5_000..6_000]), "{case}");
            assert_eq!(got.record(1), None, "{case}");
            assert_eq!(got.record(2), Some(&data[100..300]), "{case}");
            assert_eq!(got.record(3), None, "{case}");
            assert_eq!(got.record(4), None, "{case}");
            assert_eq!(got.record(5), Some(&data[200_000..203_000]), "{case}");
        }
        // A fetcher keeping one file open closes the first before it
        // opens the second, and reads both right.
        let path = p.clone();
        let mut f = Fetcher::new(1 << 20, move |_| {
            Some(RecordFile::new(File::open(&path).unwrap(), None))
        })
        .keeping_files(1);
        for file in [7, 9, 7] {
            let got = f.fetch(&[place(file, 100, 200)], Fetched::default());
            assert_eq!(got.record(0), Some(&data[100..300]), "file {file}");
            assert_eq!(f.files.keys().copied().collect::<Vec<_>>(), vec![file]);
        }
        // A cap of one page keeps only the first run.
        let path = p.clone();
        let mut f = Fetcher::new(8192, move |_| {
            Some(RecordFile::new(File::open(&path).unwrap(), None))
        });
        let got = f.fetch(&places, Fetched::default());
        assert_eq!(got.record(2), Some(&data[100..300]));
        assert_eq!(got.record(0), Some(&data[5_000..6_000]));
        assert_eq!(got.record(5), None);
    }

    #[test]
    fn a_run_counts_its_pieces_up_to_the_first_short_or_missing_one() {
        let p = PIECE;
        // Run 0: four pieces, the second short: the two after it do not
        // count even though they were read whole. Run 1: two whole
        // pieces. Run 2: its first piece missing (a reader that failed
        // reads 0). Run 3: one short piece at the file's end.
        let shape = [
            (0, p),
            (0, p),
            (0, p),
            (0, 100),
            (1, p),
            (1, 4096),
            (2, p),
            (2, p),
            (3, 8192),
        ];
        let read = [p, 4096, p, 100, p, 4096, 0, p, 5000];
        assert_eq!(
            run_prefixes(&shape, &read, 4),
            vec![(p + 4096) as u64, (p + 4096) as u64, 0, 5000]
        );
        // A read longer than its piece (it cannot be) counts as the piece.
        assert_eq!(run_prefixes(&[(0, 10)], &[20], 1), vec![10]);
    }

    #[test]
    fn a_run_of_many_pieces_read_at_once_keeps_its_records_up_to_a_short_piece() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        // Three pieces and a bit: a run of records every 60 KB spans four
        // pieces, the last of them short (the file ends in it).
        let len = (3 * PIECE + 100) as u32;
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(7) >> 2) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let whole_records = (3 * PIECE - 5_017) as u64 / 60_000 + 1;
        let mut places: Vec<Option<Place>> = (0..whole_records)
            .map(|k| {
                Some(Place {
                    file: 1,
                    offset: k * 60_000 + 17,
                    len: 5_000,
                })
            })
            .collect();
        // One ends past the file, one lies wholly past it.
        places.push(Some(Place {
            file: 1,
            offset: u64::from(len) - 50,
            len: 100,
        }));
        places.push(Some(Place {
            file: 1,
            offset: u64::from(len) + 10_000,
            len: 100,
        }));
        for case in ["cached", "uncached", "buffered"] {
            let whole = File::open(&p).unwrap();
            if case == "uncached" {
                uncache(&whole, 0, 0);
            } else {
                let _ = std::fs::read(&p).unwrap();
            }
            let path = p.clone();
            let mut f = Fetcher::new(4 * PIECE, move |_| {
                Some(RecordFile::new(
                    File::open(&path).unwrap(),
                    (case != "buffered")
                        .then(|| coffre_vault_store::store::local::direct::open_direct_read(&path))
                        .flatten(),
                ))
            });
            let got = f.fetch(&places, Fetched::default());
            for (i, place) in places.iter().enumerate() {
                let Place { offset, len: l, .. } = place.unwrap();
                let (o, l) = (offset as usize, l as usize);
                let want = data.get(o..o + l);
                assert_eq!(got.record(i), want, "{case}: record {i} at {o}");
            }
            // The last whole record lies in the run's third piece, and
            // the fourth (the file's last 100 bytes) came back short.
            let last = whole_records as usize - 1;
            assert!(last * 60_000 + 17 >= 2 * PIECE);
            assert!(got.record(last).is_some(), "{case}");
            assert!(got.record(last + 1).is_none(), "{case}");
        }
    }

    #[test]
    fn the_page_cache_is_asked_without_reading_and_either_way_the_bytes_are_right() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        // Two grid cells and a bit of a third.
        let len = 2 * WARM_GRID + (1 << 20);
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(31) >> 3) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let file = File::open(&p).unwrap();
        let _ = std::fs::read(&p).unwrap();
        let open = || RecordFile::open(&p).unwrap();
        let f = open();
        if !in_page_cache(&file, 0, 4096) {
            coffre_vault_store::skip::skip(
                "this kernel cannot tell what the page cache holds (cachestat, Linux 6.5)",
            );
            return;
        }
        assert!(in_page_cache(&file, 0, len));
        // Opened wholly cached: a cached piece is copied from the cache,
        // even one across two cells.
        assert_eq!(f.warm, vec![true, true, true]);
        assert!(f.copies_cached(WARM_GRID - 4096, 8192));
        let whole = |f: &RecordFile| {
            let mut buf = AlignedBuf::default();
            buf.reserve(data.len());
            assert_eq!(f.read(buf.as_mut_slice(), 0), data.len());
            assert_eq!(buf.as_slice(), &data[..]);
        };
        whole(&f);
        if f.direct.is_none() {
            return; // tmpfs: its pages are the file; nothing to drop
        }
        // Only the first cell cached (all dropped, then that cell read
        // without read-ahead): asking reads nothing in.
        uncache(&file, 0, 0);
        // SAFETY: advice on a descriptor we own.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let mut cell = vec![0u8; WARM_GRID as usize];
        file.read_exact_at(&mut cell, 0).unwrap();
        assert!(in_page_cache(&file, 0, WARM_GRID));
        assert!(!in_page_cache(&file, 0, len));
        assert!(!in_page_cache(&file, WARM_GRID, 4096));
        // The first opening copies what the cache still holds, and reads
        // the rest directly, leaving it out of the cache.
        assert!(f.copies_cached(0, 512 << 10));
        assert!(!f.copies_cached(WARM_GRID, 512 << 10));
        whole(&f);
        assert!(!in_page_cache(&file, WARM_GRID, 4096));
        // Opened now: the first cell is warm, the others are not. A piece
        // of the second cell cached since (as the kernel's read-ahead
        // behind a buffered read would) is still read directly, and one
        // that straddles into it too.
        let part = open();
        assert_eq!(part.warm, vec![true, false, false]);
        assert!(part.copies_cached(0, 512 << 10));
        file.read_exact_at(&mut cell[..512 << 10], WARM_GRID)
            .unwrap();
        assert!(in_page_cache(&file, WARM_GRID, 512 << 10));
        assert!(!part.copies_cached(WARM_GRID, 512 << 10));
        assert!(!part.copies_cached(WARM_GRID - 4096, 8192));
        assert!(!part.copies_cached(u64::MAX - 4095, 4096), "past 2^64");
        whole(&part);
        let cloned = part.try_clone().unwrap();
        assert_eq!(cloned.warm, part.warm);
        assert!(cloned.direct.is_some());
    }
}
