//! A snapshot read at any block, in any order, from many threads: what
//! an export or a mount of the instant-restore tier needs (a restore
//! reads windows in order instead, [`crate::read`]).
//!
//! A chunk snapshot's entries are read from its manifest once, at open,
//! and checked to the manifest's end (an entry is 48 bytes of memory:
//! 1.5 MiB for a 2 GiB image in 64 KiB blocks, 768 MiB for 1 TiB). Every
//! record read is checked like a restore's: its place against the
//! manifest, its CRCs, its authentication, and the plaintext against the
//! block's id. A clone is read with `pread` (no mapping: any number of
//! readers at once, and a clone cut short is an error, not a SIGBUS), its
//! size checked after every read.

use std::path::Path;

use coffre_vault_store::ChunkId;

use crate::error::{Result, SnapError};
use crate::manifest::{SnapEntry, SnapHeader};
use crate::pack::{PackReader, RecordBuf};
use crate::read::{Parts, SnapshotBlocks};
use crate::source::ImageSource;

/// What a block of the snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAt {
    /// Zeros: nothing stored.
    Zero,
    /// A stored chunk with this id.
    Chunk(ChunkId),
    /// Bytes of the clone (not known to be zero).
    Clone,
}

/// An open snapshot, readable at any block.
pub struct SnapshotAt {
    manifest: std::path::PathBuf,
    header: SnapHeader,
    data: Data,
}

enum Data {
    Chunks {
        entries: Vec<SnapEntry>,
        packs: Vec<Option<PackReader>>,
    },
    Clone(std::fs::File, std::path::PathBuf),
}

impl SnapshotAt {
    /// Opens the snapshot whose manifest is `manifest` (`keys`: an
    /// encrypted vault's).
    pub fn open(
        manifest: &Path,
        keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    ) -> Result<Self> {
        Ok(match SnapshotBlocks::open(manifest, keys)?.into_parts()? {
            Parts::Chunks {
                manifest,
                header,
                entries,
                packs,
            } => SnapshotAt {
                manifest,
                header,
                data: Data::Chunks { entries, packs },
            },
            Parts::Clone {
                manifest,
                header,
                clone,
            } => {
                let path = clone.path().to_path_buf();
                let file = std::fs::File::open(&path)
                    .map_err(|e| SnapError::damaged(&path, e.to_string()))?;
                SnapshotAt {
                    manifest,
                    header,
                    data: Data::Clone(file, path),
                }
            }
        })
    }

    /// The header (image size, block size).
    pub fn header(&self) -> SnapHeader {
        self.header
    }

    /// The manifest's path, for messages.
    pub fn manifest(&self) -> &Path {
        &self.manifest
    }

    fn bytes_of(&self, b: u64) -> Option<(u64, usize)> {
        let bs = u64::from(self.header.block_size);
        let start = b.checked_mul(bs)?;
        (start < self.header.image_size)
            .then(|| (start, bs.min(self.header.image_size - start) as usize))
    }

    /// What block `b` is; `None` past the end.
    pub fn block(&self, b: u64) -> Option<BlockAt> {
        self.bytes_of(b)?;
        match &self.data {
            Data::Chunks { entries, .. } => {
                let e = entries.get(usize::try_from(b).ok()?)?;
                Some(e.id.map_or(BlockAt::Zero, BlockAt::Chunk))
            }
            Data::Clone(..) => Some(BlockAt::Clone),
        }
    }

    /// Reads block `b` into `out` (its whole length, the last block maybe
    /// short); `buf` is a decoder's scratch space. Zero blocks are zeros.
    pub fn read_block(&self, b: u64, buf: &mut RecordBuf, out: &mut Vec<u8>) -> Result<()> {
        let (start, len) = self.bytes_of(b).ok_or_else(|| {
            SnapError::damaged(&self.manifest, format!("block {b} is past the image"))
        })?;
        out.clear();
        match &self.data {
            Data::Chunks { entries, packs } => {
                let e = usize::try_from(b)
                    .ok()
                    .and_then(|i| entries.get(i))
                    .copied()
                    .ok_or_else(|| {
                        SnapError::damaged(&self.manifest, format!("no entry for block {b}"))
                    })?;
                let Some(id) = e.id else {
                    out.resize(len, 0);
                    return Ok(());
                };
                let pack = packs
                    .get(usize::from(e.loc.pack))
                    .and_then(Option::as_ref)
                    .ok_or_else(|| {
                        SnapError::damaged(
                            &self.manifest,
                            format!("pack {} of block {b} is missing", e.loc.pack),
                        )
                    })?;
                pack.read_plain(&id, e.loc.offset, e.loc.len, buf)?;
                if buf.plain().len() != len {
                    return Err(SnapError::damaged(
                        &self.manifest,
                        format!(
                            "block {b} decodes to {} bytes, expected {len}",
                            buf.plain().len()
                        ),
                    ));
                }
                out.extend_from_slice(buf.plain());
            }
            Data::Clone(file, path) => {
                use std::os::unix::fs::FileExt;
                out.resize(len, 0);
                let cut = |e: std::io::Error| {
                    SnapError::damaged(path, format!("reading block {b} of the clone: {e}"))
                };
                file.read_exact_at(out, start).map_err(cut)?;
                let now = file.metadata().map_err(cut)?.len();
                if now != self.header.image_size {
                    return Err(SnapError::damaged(
                        path,
                        format!(
                            "the clone is {now} bytes, the snapshot says {}",
                            self.header.image_size
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
