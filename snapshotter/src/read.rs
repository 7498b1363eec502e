//! Reading a snapshot back, window by window, for the transfer and for
//! instant restore: the block ids and records of a chunk snapshot (from
//! its manifest and packs), or the bytes of a clone.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use coffre_vault_store::ChunkId;
use coffre_vault_store::format::name::SafeName;
use coffre_vault_store::store::local::read_ahead;

use crate::capture::open_clone;
use crate::error::{Result, SnapError};
use crate::manifest::{FrameSource, SnapEntry, SnapHeader, SnapKind, SnapMeta, SnapReader};
use crate::pack::{PackReader, RecordBuf};
use crate::source::{FileImage, ImageSource, Window};

/// An open snapshot.
pub struct SnapshotBlocks {
    manifest: PathBuf,
    header: SnapHeader,
    meta: SnapMeta,
    reader: Option<SnapReader<BufReader<File>>>,
    /// Entries read ahead of the windows handed out.
    ahead: Vec<SnapEntry>,
    packs: Vec<Option<PackReader>>,
    clone: Option<FileImage>,
}

/// A snapshot taken apart for reading at any block.
pub(crate) enum Parts {
    /// A chunk snapshot: its manifest's frames (read at any block), and
    /// the packs.
    Chunks {
        manifest: PathBuf,
        header: SnapHeader,
        frames: FrameSource,
        packs: Vec<Option<PackReader>>,
    },
    /// A clone.
    Clone {
        manifest: PathBuf,
        header: SnapHeader,
        clone: FileImage,
    },
}

/// One window of a snapshot.
pub enum SnapWindow<'a> {
    /// Entries of a chunk snapshot and its packs.
    Chunks {
        /// The window's entries.
        entries: Vec<SnapEntry>,
        /// The next window's entries, already read from the manifest.
        ahead: &'a [SnapEntry],
        /// The snapshot's packs.
        packs: &'a [Option<PackReader>],
        /// For messages.
        manifest: &'a Path,
    },
    /// Bytes of a clone.
    Clone {
        /// The mapped window.
        window: Window<'a>,
        /// The clone it maps.
        image: &'a FileImage,
        /// Bytes in the window.
        len: usize,
        /// Block size.
        block_size: usize,
    },
}

impl SnapshotBlocks {
    /// Opens the snapshot whose manifest is `manifest`; `keys`: an
    /// encrypted vault's.
    pub fn open(
        manifest: &Path,
        keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    ) -> Result<Self> {
        let reader = SnapReader::open(manifest, keys)?;
        let header = reader.header();
        let meta = reader.meta().clone();
        let dir = manifest.parent().unwrap_or(Path::new("."));
        let (reader, packs, clone) = match header.kind {
            SnapKind::Chunks => {
                let packs = meta
                    .packs
                    .iter()
                    .map(|name| {
                        let p = SafeName::new("pack", name)?.under(dir);
                        p.exists().then(|| PackReader::open(&p, keys)).transpose()
                    })
                    .collect::<Result<Vec<_>>>()?;
                (Some(reader), packs, None)
            }
            SnapKind::Clone => {
                let clone = open_clone(dir, &meta)?;
                if clone.size() != header.image_size {
                    return Err(SnapError::damaged(
                        manifest,
                        format!(
                            "its clone is {} bytes, the snapshot says {}",
                            clone.size(),
                            header.image_size
                        ),
                    ));
                }
                (None, Vec::new(), Some(clone))
            }
        };
        Ok(SnapshotBlocks {
            manifest: manifest.to_path_buf(),
            header,
            meta,
            reader,
            ahead: Vec::new(),
            packs,
            clone,
        })
    }

    /// The header.
    pub fn header(&self) -> SnapHeader {
        self.header
    }

    /// The metadata.
    pub fn meta(&self) -> &SnapMeta {
        &self.meta
    }

    /// The pack this snapshot's own capture wrote (`JOB.pack`, the last
    /// of its packs): its index in the metadata's `packs` and its path.
    /// `None` for a clone, or when the pack is gone.
    pub fn own_pack(&self) -> Option<(u16, PathBuf)> {
        let name = format!("{}.pack", self.meta.job);
        let index = self.meta.packs.iter().rposition(|p| *p == name)?;
        self.packs.get(index)?.as_ref()?;
        let dir = self.manifest.parent().unwrap_or(Path::new("."));
        Some((u16::try_from(index).ok()?, dir.join(name)))
    }

    /// The clone opened once more, on its own (owned, for a thread that
    /// reads windows ahead); `None` for a chunk snapshot.
    pub fn reopen_clone(&self) -> Result<Option<FileImage>> {
        if self.clone.is_none() {
            return Ok(None);
        }
        let dir = self.manifest.parent().unwrap_or(Path::new("."));
        open_clone(dir, &self.meta).map(Some)
    }

    /// A window of a clone (see [`SnapshotBlocks::reopen_clone`]) as a
    /// window of this snapshot.
    pub fn clone_window<'a>(
        &self,
        image: &'a FileImage,
        window: Window<'a>,
        len: usize,
    ) -> SnapWindow<'a> {
        SnapWindow::Clone {
            window,
            image,
            len,
            block_size: self.header.block_size as usize,
        }
    }

    /// The open files of the snapshot's packs, by their index in the
    /// metadata (`None` for a pack that is gone); empty for a clone. A
    /// reader that fetches records its own way (direct reads) reopens them.
    pub fn pack_files(&self) -> Vec<Option<&File>> {
        crate::pack::files_of(&self.packs)
    }

    /// The clone image, for a clone snapshot.
    pub fn clone_image(&self) -> Option<&FileImage> {
        self.clone.as_ref()
    }

    /// Blocks `first..first + n` (bytes `offset..offset + len`); windows
    /// must come in order.
    pub fn window(
        &mut self,
        first: u64,
        n: usize,
        offset: u64,
        len: usize,
    ) -> Result<SnapWindow<'_>> {
        self.window_for(first, n, offset, len, None)
    }

    /// Like [`SnapshotBlocks::window`], for a caller that reads only the
    /// `wanted` byte ranges of a clone (no read-ahead of the rest).
    pub fn window_for(
        &mut self,
        first: u64,
        n: usize,
        offset: u64,
        len: usize,
        wanted: Option<&[std::ops::Range<usize>]>,
    ) -> Result<SnapWindow<'_>> {
        let _ = first;
        if let Some(r) = self.reader.as_mut() {
            let mut entries = std::mem::take(&mut self.ahead);
            if entries.len() > n {
                self.ahead = entries.split_off(n);
            } else {
                entries.extend(r.next_entries(n - entries.len())?);
            }
            if entries.len() != n {
                return Err(SnapError::damaged(
                    &self.manifest,
                    format!("{} entries where {n} were expected", entries.len()),
                ));
            }
            // The next window's entries, read now so their records can be
            // fetched while this window is used (fewer at the end).
            let more = r.next_entries(n.saturating_sub(self.ahead.len()))?;
            self.ahead.extend(more);
            return Ok(SnapWindow::Chunks {
                entries,
                ahead: &self.ahead,
                packs: &self.packs,
                manifest: &self.manifest,
            });
        }
        let clone = self
            .clone
            .as_ref()
            .ok_or_else(|| SnapError::damaged(&self.manifest, "no data"))?;
        let window = match wanted {
            Some(w) => clone.window_for(offset, len, w)?,
            None => clone.window(offset, len)?,
        };
        Ok(SnapWindow::Clone {
            window,
            image: clone,
            len,
            block_size: self.header.block_size as usize,
        })
    }

    /// A chunk snapshot's manifest read whole and checked now, kept as
    /// where its frames lie (for [`crate::read_at::SnapshotAt`]); the clone
    /// of a clone snapshot.
    pub(crate) fn into_parts(mut self) -> Result<Parts> {
        match self.reader.take() {
            Some(r) => Ok(Parts::Chunks {
                manifest: self.manifest,
                header: self.header,
                frames: r.into_frames()?,
                packs: self.packs,
            }),
            None => {
                let clone = self
                    .clone
                    .take()
                    .ok_or_else(|| SnapError::damaged(&self.manifest, "no data"))?;
                Ok(Parts::Clone {
                    manifest: self.manifest,
                    header: self.header,
                    clone,
                })
            }
        }
    }

    /// Checks the manifest's end once every window was read.
    pub fn finish(self) -> Result<()> {
        if !self.ahead.is_empty() {
            return Err(SnapError::damaged(&self.manifest, "entries left unread"));
        }
        match self.reader {
            Some(r) => r.finish().map(|_| ()),
            None => Ok(()),
        }
    }
}

impl SnapWindow<'_> {
    /// Block `i` of the window: `None` for a zero block; else its id when
    /// the snapshot knows it, and its bytes when they are at hand (clones).
    pub fn block(&self, i: usize) -> Option<(Option<ChunkId>, Option<&[u8]>)> {
        match self {
            SnapWindow::Chunks { entries, .. } => {
                let id = entries.get(i)?.id?;
                Some((Some(id), None))
            }
            SnapWindow::Clone {
                window,
                len,
                block_size,
                ..
            } => {
                let start = i * block_size;
                let end = (start + block_size).min(*len);
                if window.is_hole(start..end) {
                    return None;
                }
                Some((None, window.bytes().get(start..end)))
            }
        }
    }

    fn pack(&self, i: usize) -> Result<(&PackReader, SnapEntry)> {
        let SnapWindow::Chunks {
            entries,
            packs,
            manifest,
            ..
        } = self
        else {
            return Err(SnapError::damaged("clone", "a clone has no records"));
        };
        let e = entries
            .get(i)
            .copied()
            .ok_or_else(|| SnapError::damaged(*manifest, "entry out of range"))?;
        let pack = packs
            .get(usize::from(e.loc.pack))
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                SnapError::damaged(
                    *manifest,
                    format!("pack {} of a block is missing", e.loc.pack),
                )
            })?;
        Ok((pack, e))
    }

    /// Starts reading the records of this window and of the next into
    /// the page cache: one request per run of records that lie close
    /// together in a pack, so the decoders find them there instead of each
    /// waiting for a small read of its own. A clone window does its own
    /// read-ahead.
    pub fn prefetch(&self) {
        let SnapWindow::Chunks {
            entries,
            ahead,
            packs,
            ..
        } = self
        else {
            return;
        };
        let ranges = entries
            .iter()
            .chain(ahead.iter())
            .filter(|e| e.id.is_some())
            .map(|e| (u64::from(e.loc.pack), e.loc.offset, e.loc.end()))
            .collect();
        for (pack, start, end) in read_ahead::runs(ranges) {
            if let Some(Some(p)) = packs.get(pack as usize) {
                p.will_need(start, end - start);
            }
        }
    }

    /// The entries of the window after this one that were already read
    /// (all of them but near the end): what a reader may fetch ahead.
    /// Empty for a clone.
    pub fn ahead(&self) -> &[SnapEntry] {
        match self {
            SnapWindow::Chunks { ahead, .. } => ahead,
            SnapWindow::Clone { .. } => &[],
        }
    }

    /// Where block `i`'s record is, for a chunk snapshot.
    pub fn loc(&self, i: usize) -> Option<crate::manifest::PackLoc> {
        match self {
            SnapWindow::Chunks { entries, .. } => entries.get(i).map(|e| e.loc),
            SnapWindow::Clone { .. } => None,
        }
    }

    /// Reads block `i`'s record into `buf.record()` (CRC checked); returns
    /// the entry's flags.
    pub fn read_record(&self, i: usize, id: &ChunkId, buf: &mut RecordBuf) -> Result<u16> {
        let (pack, e) = self.pack(i)?;
        pack.read_raw(id, e.loc.offset, e.loc.len, buf)?;
        Ok(e.loc.flags)
    }

    /// Reads and decodes block `i` into `buf.plain()`.
    pub fn decode_record(&self, i: usize, id: &ChunkId, buf: &mut RecordBuf) -> Result<()> {
        let (pack, e) = self.pack(i)?;
        pack.read_plain(id, e.loc.offset, e.loc.len, buf)
    }

    /// Call once the window's blocks were used (a clone that shrank under
    /// its mapping is an error).
    pub fn finish(self) -> Result<()> {
        match self {
            // A clone cut short before its window was made reads as holes:
            // its size is checked too.
            SnapWindow::Clone { window, image, .. } => {
                window.finish()?;
                image.check_unchanged()
            }
            SnapWindow::Chunks { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{BS, area_in, cut, drop_cached, noise, resident, take_snapshot};
    use std::ops::Range;

    /// A chunk snapshot of `image` in a new area under `dir`.
    fn snapshot(dir: &Path, image: &[u8]) -> PathBuf {
        let (vault, area) = area_in(dir);
        take_snapshot(&area, &vault, "j1", image, 1_000)
    }

    /// Byte ranges of the records of blocks `blocks` in the snapshot's
    /// pack.
    fn record_ranges(manifest: &Path, blocks: Range<usize>) -> Vec<Range<usize>> {
        let mut b = SnapshotBlocks::open(manifest, None).unwrap();
        let n = b.header().blocks as usize;
        let size = b.header().image_size as usize;
        let w = b.window(0, n, 0, size).unwrap();
        blocks
            .filter_map(|i| w.loc(i).filter(|_| w.block(i).is_some()))
            .map(|l| l.offset as usize..(l.offset + u64::from(l.len)) as usize)
            .collect()
    }

    #[test]
    fn windows_of_any_size_give_the_image_back_and_an_early_finish_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let mut image = noise(3, 64 * BS);
        image[10 * BS..14 * BS].fill(0);
        let manifest = snapshot(t.path(), &image);
        let mut b = SnapshotBlocks::open(&manifest, None).unwrap();
        let mut buf = RecordBuf::default();
        let mut first = 0usize;
        // Smaller and larger than the window before: the read-ahead
        // entries are split and topped up.
        for n in [5, 20, 1, 30, 8] {
            let w = b
                .window(first as u64, n, (first * BS) as u64, n * BS)
                .unwrap();
            w.prefetch();
            for i in 0..n {
                let at = (first + i) * BS;
                match w.block(i) {
                    None => assert!(image[at..at + BS].iter().all(|&x| x == 0)),
                    Some((Some(id), _)) => {
                        w.decode_record(i, &id, &mut buf).unwrap();
                        assert_eq!(buf.plain(), &image[at..at + BS], "block {}", first + i);
                    }
                    Some((None, _)) => panic!("a chunk snapshot knows every id"),
                }
            }
            w.finish().unwrap();
            first += n;
        }
        assert_eq!(first, 64);
        b.finish().unwrap();

        let mut b = SnapshotBlocks::open(&manifest, None).unwrap();
        b.window(0, 10, 0, 10 * BS).unwrap();
        let e = b.finish().unwrap_err().to_string();
        assert!(e.contains("entries left unread"), "{e}");
    }

    #[test]
    fn a_clone_cut_short_fails_its_window_instead_of_reading_as_holes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("clone.img");
        std::fs::write(&p, noise(9, 8 * BS)).unwrap();
        let image = FileImage::open(&p).unwrap();
        let window = || SnapWindow::Clone {
            window: image.window(0, 8 * BS).unwrap(),
            image: &image,
            len: 8 * BS,
            block_size: BS,
        };
        let whole = window();
        assert!(whole.block(7).is_some());
        whole.finish().unwrap();
        cut(&p, 2 * BS as u64);
        let short = window();
        // The lost blocks look like holes...
        assert!(short.block(7).is_none());
        // ...and the window says the clone changed.
        match short.finish() {
            Err(SnapError::SourceChanged { path, .. }) => assert_eq!(path, p),
            other => panic!("expected SourceChanged, got {other:?}", other = other.err()),
        }
    }

    #[test]
    fn prefetch_reads_this_window_and_the_next_into_the_cache_and_no_further() {
        let t = tempfile::tempdir().unwrap();
        let manifest = snapshot(t.path(), &noise(5, 96 * BS));
        let mut b = SnapshotBlocks::open(&manifest, None).unwrap();
        let (_, pack) = b.own_pack().unwrap();
        if !drop_cached(&pack) {
            coffre_vault_store::skip::skip(&format!(
                "the page cache keeps {} (tmpfs?)",
                pack.display()
            ));
            return;
        }
        let count = |ranges: &[Range<usize>]| -> usize {
            ranges.iter().map(|r| resident(&pack, r.clone())).sum()
        };
        let wanted = record_ranges(&manifest, 0..64);
        let beyond = record_ranges(&manifest, 66..96);
        let pages: usize = wanted
            .iter()
            .map(|r| r.end.div_ceil(4096) - r.start / 4096)
            .sum();
        drop_cached(&pack);
        let w = b.window(0, 32, 0, 32 * BS).unwrap();
        assert_eq!(count(&wanted), 0);
        w.prefetch();
        // The advice starts reads; give them time to land.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while count(&wanted) < pages && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            count(&wanted) >= pages,
            "the two windows' records were read ahead"
        );
        assert_eq!(count(&beyond), 0, "nothing past the next window was read");
    }
}
