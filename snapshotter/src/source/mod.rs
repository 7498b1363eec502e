//! Disk image sources: where a backup reads blocks from.
//!
//! [`FileImage`] maps a raw image (regular file or block device) window by
//! window with `memmap2`, so peak memory is bounded by the window size, not
//! the image size. Holes are found with `SEEK_DATA`/`SEEK_HOLE` and never
//! read. A file that shrinks under the mapping is caught by the SIGBUS
//! guard ([`crate::sigbus`]) and reported as
//! [`SnapError::SourceChanged`]. A source that fetches its windows (NBD)
//! reads them into buffers a [`BufferPool`] lends and takes back
//! ([`lent`]). [`MemImage`] serves tests and benches.

mod file;
pub mod lent;
pub mod live;

use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use coffre_vault_store::store::local::direct::AlignedBuf;

use crate::error::{Result, SnapError};
use crate::sigbus;

pub use file::FileImage;
pub use lent::{BufferPool, Lent};
pub use live::{LiveSource, PointInTime, TakeRequest, Taken};

/// Something a backup can read a disk image from.
pub trait ImageSource: Sync {
    /// Image size in bytes, fixed when the source was opened.
    fn size(&self) -> u64;
    /// The path (or a name) for messages.
    fn path(&self) -> &Path;
    /// Bytes `offset..offset + len` and which parts of them hold data.
    fn window(&self, offset: u64, len: usize) -> Result<Window<'_>>;
    /// Like [`ImageSource::window`], for a caller that will only look at
    /// the `wanted` byte ranges (relative to `offset`): a source that must
    /// fetch bytes (NBD) fetches only those, and the rest reads as zeros.
    fn window_for(&self, offset: u64, len: usize, wanted: &[Range<usize>]) -> Result<Window<'_>> {
        let _ = wanted;
        self.window(offset, len)
    }
    /// Fails with [`SnapError::SourceChanged`] if the image changed size.
    fn check_unchanged(&self) -> Result<()>;
    /// True when a window's bytes are fetched (over the wire) when it is
    /// made, rather than mapped: a pass then fetches the next window while
    /// it works on this one. A source that does not fetch must make its
    /// windows cheaply (a mapping, a slice): a capture pass makes the next
    /// one while the pool works on this one, so two are held at once.
    fn fetches(&self) -> bool {
        false
    }
    /// True when `path()` is a file read through a server coffre started
    /// (a qcow2 behind `qemu-nbd`): the file is not the raw image, so it is
    /// never cloned as a snapshot, and the server's image lock on it is
    /// not somebody else using the image.
    fn served(&self) -> bool {
        false
    }
    /// When the image was last written, to detect writes during a capture
    /// (`None`: the source cannot change, or cannot tell).
    fn change_stamp(&self) -> Option<ChangeStamp> {
        None
    }
}

/// An image's modification and change times (nanoseconds since the epoch)
/// and size: any write moves at least one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeStamp {
    mtime_ns: i128,
    ctime_ns: i128,
    size: u64,
}

impl ChangeStamp {
    /// How long ago the image was last written or changed.
    pub fn age(&self) -> std::time::Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let last = self.mtime_ns.max(self.ctime_ns);
        std::time::Duration::from_nanos(u64::try_from(now - last).unwrap_or(0))
    }
}

enum Hold<'a> {
    Map(Mmap),
    Slice(&'a [u8]),
    Lent(Lent<'a>),
    Aligned(AlignedBuf),
    Empty,
}

/// A window of an image.
pub struct Window<'a> {
    // Field order matters: the guard is dropped before the mapping.
    guard: Option<sigbus::Guard>,
    hold: Hold<'a>,
    data: Vec<Range<usize>>,
    path: &'a Path,
}

impl<'a> Window<'a> {
    /// The window's bytes (holes read as zeros).
    pub fn bytes(&self) -> &[u8] {
        match &self.hold {
            Hold::Map(m) => m,
            Hold::Slice(s) => s,
            Hold::Lent(l) => l.bytes(),
            Hold::Aligned(b) => b.as_slice(),
            Hold::Empty => &[],
        }
    }

    /// A window of bytes fetched into a buffer lent by a [`BufferPool`]
    /// (it goes back when the window is dropped); `data` (sorted,
    /// disjoint, relative to the window) says where they hold data.
    pub fn lent(bytes: Lent<'a>, data: Vec<Range<usize>>, path: &'a Path) -> Self {
        Window {
            guard: None,
            hold: Hold::Lent(bytes),
            data,
            path,
        }
    }

    /// True when the window's bytes are memory of its own (fetched or
    /// read into a buffer, not mapped from the image): nothing writes
    /// them while the window is alive, so they need no copy to be stable.
    pub fn is_private(&self) -> bool {
        matches!(self.hold, Hold::Lent(_) | Hold::Aligned(_) | Hold::Empty)
    }

    /// True when `range` (relative to the window) overlaps no data.
    pub fn is_hole(&self, range: Range<usize>) -> bool {
        // `data` is sorted and disjoint.
        let i = self.data.partition_point(|d| d.end <= range.start);
        self.data.get(i).is_none_or(|d| d.start >= range.end)
    }

    /// Bytes of the window that hold data.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|r| (r.end - r.start) as u64).sum()
    }

    /// Call after the window's bytes were used: fails if the file was
    /// truncated while they were read.
    pub fn finish(self) -> Result<()> {
        if self.guard.as_ref().is_some_and(|g| g.faulted()) {
            return Err(truncated(self.path));
        }
        Ok(())
    }
}

/// The non-empty overlaps of each of `wanted` with each of `data`, in
/// order when both are sorted and disjoint: the parts of a window that are
/// both asked for and hold data.
pub(crate) fn overlaps<'a>(
    wanted: &'a [Range<usize>],
    data: &'a [Range<usize>],
) -> impl Iterator<Item = Range<usize>> + 'a {
    wanted.iter().flat_map(move |w| {
        data.iter()
            .map(move |d| w.start.max(d.start)..w.end.min(d.end))
            .filter(|r| r.start < r.end)
    })
}

/// The error of a read that found `path` shorter than when it was opened.
fn truncated(path: &Path) -> SnapError {
    SnapError::SourceChanged {
        path: path.to_path_buf(),
        reason: "the file was truncated while being read".into(),
    }
}

/// An image held in memory (tests and benchmarks).
#[derive(Debug)]
pub struct MemImage {
    name: PathBuf,
    bytes: Vec<u8>,
}

impl MemImage {
    /// Wraps `bytes`; `name` appears in messages.
    pub fn new(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Self {
        MemImage {
            name: name.into(),
            bytes,
        }
    }
}

impl ImageSource for MemImage {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn window(&self, offset: u64, len: usize) -> Result<Window<'_>> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let slice = self
            .bytes
            .get(start..start.saturating_add(len))
            .ok_or_else(|| SnapError::SourceChanged {
                path: self.name.clone(),
                reason: format!("window {offset}+{len} is past the end"),
            })?;
        Ok(Window {
            guard: None,
            hold: Hold::Slice(slice),
            data: std::iter::once(0..len).collect(),
            path: &self.name,
        })
    }

    fn check_unchanged(&self) -> Result<()> {
        Ok(())
    }
}
