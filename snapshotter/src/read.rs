//! Reading a snapshot back, window by window, for the transfer and for
//! instant restore: the block ids and records of a chunk snapshot (from
//! its manifest and packs), or the bytes of a clone.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use coffre_vault_store::ChunkId;

use crate::capture::open_clone;
use crate::error::{Result, SnapError};
use crate::manifest::{SnapEntry, SnapHeader, SnapKind, SnapMeta, SnapReader};
use crate::pack::{PackReader, RecordBuf};
use crate::source::{FileImage, ImageSource, Window};

/// An open snapshot.
pub struct SnapshotBlocks {
    manifest: PathBuf,
    header: SnapHeader,
    meta: SnapMeta,
    reader: Option<SnapReader<BufReader<File>>>,
    packs: Vec<Option<PackReader>>,
    clone: Option<FileImage>,
}

/// One window of a snapshot.
pub enum SnapWindow<'a> {
    /// Entries of a chunk snapshot and its packs.
    Chunks {
        /// The window's entries.
        entries: Vec<SnapEntry>,
        /// The snapshot's packs.
        packs: &'a [Option<PackReader>],
        /// For messages.
        manifest: &'a Path,
    },
    /// Bytes of a clone.
    Clone {
        /// The mapped window.
        window: Window<'a>,
        /// Bytes in the window.
        len: usize,
        /// Block size.
        block_size: usize,
    },
}

impl SnapshotBlocks {
    /// Opens the snapshot whose manifest is `manifest`.
    pub fn open(manifest: &Path) -> Result<Self> {
        let reader = SnapReader::open(manifest)?;
        let header = reader.header();
        let meta = reader.meta().clone();
        let dir = manifest.parent().unwrap_or(Path::new("."));
        let (reader, packs, clone) = match header.kind {
            SnapKind::Chunks => {
                let packs = meta
                    .packs
                    .iter()
                    .map(|name| {
                        let p = dir.join(name);
                        p.exists().then(|| PackReader::open(&p)).transpose()
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
            let entries = r.next_entries(n)?;
            if entries.len() != n {
                return Err(SnapError::damaged(
                    &self.manifest,
                    format!("{} entries where {n} were expected", entries.len()),
                ));
            }
            return Ok(SnapWindow::Chunks {
                entries,
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
            len,
            block_size: self.header.block_size as usize,
        })
    }

    /// Checks the manifest's end once every window was read.
    pub fn finish(self) -> Result<()> {
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
            SnapWindow::Clone { window, .. } => window.finish(),
            SnapWindow::Chunks { .. } => Ok(()),
        }
    }
}
