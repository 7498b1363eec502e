//! A recovery point read back as a disk image: [`PointSource`] is an
//! [`ImageSource`] over one point of a vault, so that whatever reads
//! images (the ingest of `vault copy`, [`crate::ingest`]) can read a point
//! of another vault, whatever its block size.
//!
//! Every block goes through the vault's verified read path
//! ([`Vault::read_chunk_into`]): the record's CRCs, its authentication
//! (an encrypted vault) and BLAKE3 of the plaintext are checked, another
//! copy is tried (and the bad one repaired) when one fails. A block no
//! copy holds intact fails the window, never reads as zeros: the error,
//! naming the point, the block and the chunk, is kept for the caller
//! ([`PointSource::take_failure`]), since the [`ImageSource`] trait speaks
//! the snapshotter's errors. Zero blocks of the point are holes of the
//! window, never read.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use coffre_snapshotter::SnapError;
use coffre_snapshotter::source::{BufferPool, ImageSource, Window};
use coffre_vault_store::format::blockmap::Entry;
use coffre_vault_store::format::config::validate_block_size;
use coffre_vault_store::{ChunkBuf, ChunkId, ChunkLocation, PointRecord, StoreError, Vault};
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::reader::BlockMapReader;

/// One point of a vault, as an image.
pub struct PointSource<'v> {
    vault: &'v Vault,
    point: PointRecord,
    /// `VAULT (item I, point P)`, for messages.
    name: PathBuf,
    map: Mutex<BlockMapReader<'v>>,
    pool: &'v rayon::ThreadPool,
    buffers: BufferPool,
    chunks: PerThread<ChunkBuf>,
    /// Why the last window failed, in the engine's words.
    failure: Mutex<Option<EngineError>>,
    /// Plaintext bytes of the point's chunks read so far.
    read: AtomicU64,
}

impl<'v> PointSource<'v> {
    /// Opens `point` of `vault` (its block map's root is read and checked
    /// now); windows are decoded on `pool`.
    pub fn open(
        vault: &'v Vault,
        point: &PointRecord,
        pool: &'v rayon::ThreadPool,
    ) -> Result<Self> {
        if validate_block_size(point.block_size).is_err() {
            return Err(EngineError::DamagedBlockMap {
                item: point.item.clone(),
                point: point.id.clone(),
                reason: format!(
                    "the point records a block size of {} bytes; a vault's is a power of two from 64 KiB to 4 MiB",
                    point.block_size
                ),
            });
        }
        let map = BlockMapReader::open(vault, point)?;
        Ok(PointSource {
            vault,
            point: point.clone(),
            name: PathBuf::from(format!(
                "{} (item {}, point {})",
                vault.dir().display(),
                point.item,
                point.id
            )),
            map: Mutex::new(map),
            pool,
            // A window being read ahead and the one being used.
            buffers: BufferPool::new(2),
            chunks: PerThread::new(pool, ChunkBuf::default),
            failure: Mutex::new(None),
            read: AtomicU64::new(0),
        })
    }

    /// The engine's error behind the last failed window (a damaged block
    /// or block map), once.
    pub fn take_failure(&self) -> Option<EngineError> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Plaintext bytes of the point's chunks read so far (zero blocks are
    /// not read).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Keeps `e` for [`PointSource::take_failure`] and returns it in the
    /// snapshotter's words.
    fn fail(&self, e: EngineError) -> SnapError {
        let reason = e.to_string();
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        SnapError::Damaged {
            path: self.name.clone(),
            reason,
        }
    }

    /// Reads `offset..offset + len` into a lent buffer: the point's blocks
    /// that cover it (only those that overlap `wanted`, when given; the
    /// others read as holes), decoded in parallel.
    fn read_window(
        &self,
        offset: u64,
        len: usize,
        wanted: Option<&[Range<usize>]>,
    ) -> Result<Window<'_>> {
        let size = self.point.image_size;
        let bs = u64::from(self.point.block_size);
        let end = offset.checked_add(len as u64).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(self.damaged(format!(
                "window {offset}+{len} is past the image's {size} bytes"
            )));
        };
        if len == 0 {
            return Ok(Window::lent(
                self.buffers.take(0, &[]),
                Vec::new(),
                &self.name,
            ));
        }
        let first = offset / bs;
        let n = usize::try_from((end - 1) / bs - first + 1)
            .map_err(|_| self.damaged(format!("window {offset}+{len} is too large")))?;
        let mut entries: Vec<Entry> = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries(first, n)?;
        // Each block's part of the window (only the first and the last may
        // be partial) and where the part starts in the block.
        let parts: Vec<(u64, Range<usize>, usize)> = (0..n as u64)
            .map(|k| {
                let b = first + k;
                let (from, to) = ((b * bs).max(offset), ((b + 1) * bs).min(end));
                (
                    b,
                    (from - offset) as usize..(to - offset) as usize,
                    (from - b * bs) as usize,
                )
            })
            .collect();
        if let Some(wanted) = wanted {
            for ((_, r, _), e) in parts.iter().zip(entries.iter_mut()) {
                if !wanted.iter().any(|w| w.start < r.end && r.start < w.end) {
                    *e = None;
                }
            }
        }
        let locs = self.locations(&entries);
        self.vault
            .read_ahead(&locs.iter().flatten().copied().collect::<Vec<_>>());
        let mut data: Vec<Range<usize>> = Vec::new();
        for ((_, r, _), e) in parts.iter().zip(&entries) {
            if e.is_none() {
                continue;
            }
            match data.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => data.push(r.clone()),
            }
        }
        let mut lent = self.buffers.take(len, &data);
        let mut slots: Vec<&mut [u8]> = Vec::with_capacity(n);
        let mut rest = lent.bytes_mut();
        for (_, r, _) in &parts {
            let (slot, tail) = rest.split_at_mut(r.len());
            slots.push(slot);
            rest = tail;
        }
        self.pool.install(|| {
            slots
                .into_par_iter()
                .zip(parts.par_iter())
                .zip(entries.par_iter().zip(locs.par_iter()))
                .with_max_len(1)
                .try_for_each(|((slot, (b, _, skip)), (entry, loc))| match entry {
                    None => Ok(()),
                    Some(id) => self.block(*b, id, *loc, slot, *skip),
                })
        })?;
        Ok(Window::lent(lent, data, &self.name))
    }

    /// The chunks' locations, in one batch (a bad index entry fails the
    /// batch: each block then looks its chunk up when it is read, and the
    /// bad one is reported with its block).
    fn locations(&self, entries: &[Entry]) -> Vec<Option<ChunkLocation>> {
        let ids: Vec<ChunkId> = entries.iter().flatten().copied().collect();
        let mut found = self
            .vault
            .index()
            .chunk_locations(&ids)
            .unwrap_or_else(|_| vec![None; ids.len()])
            .into_iter();
        entries
            .iter()
            .map(|e| e.and_then(|_| found.next().flatten()))
            .collect()
    }

    /// Reads block `b` (chunk `id`) and copies its bytes from `skip` on
    /// into `slot`.
    fn block(
        &self,
        b: u64,
        id: &ChunkId,
        loc: Option<ChunkLocation>,
        slot: &mut [u8],
        skip: usize,
    ) -> Result<()> {
        let damaged = |source: StoreError| EngineError::DamagedBlock {
            item: self.point.item.clone(),
            point: self.point.id.clone(),
            block: b,
            chunk: *id,
            source: Box::new(source),
        };
        let loc = match loc {
            Some(l) => l,
            None => self
                .vault
                .index()
                .chunk(id)
                .map_err(damaged)?
                .ok_or_else(|| damaged(StoreError::ChunkMissing { id: *id }))?,
        };
        let mut buf = self.chunks.get();
        self.vault
            .read_chunk_into(id, &loc, &mut buf)
            .map_err(damaged)?;
        let plain = buf.plain();
        let bs = u64::from(self.point.block_size);
        let expected = bs.min(self.point.image_size - b * bs) as usize;
        if plain.len() != expected {
            return Err(self.damaged(format!(
                "block {b} (chunk {id}) holds {} bytes, expected {expected}",
                plain.len()
            )));
        }
        let part = plain
            .get(skip..skip + slot.len())
            .ok_or_else(|| self.damaged(format!("block {b} is shorter than the window needs")))?;
        slot.copy_from_slice(part);
        self.read.fetch_add(part.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn damaged(&self, reason: String) -> EngineError {
        EngineError::DamagedBlockMap {
            item: self.point.item.clone(),
            point: self.point.id.clone(),
            reason,
        }
    }
}

impl ImageSource for PointSource<'_> {
    fn size(&self) -> u64 {
        self.point.image_size
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn window(&self, offset: u64, len: usize) -> coffre_snapshotter::Result<Window<'_>> {
        self.read_window(offset, len, None)
            .map_err(|e| self.fail(e))
    }

    fn window_for(
        &self,
        offset: u64,
        len: usize,
        wanted: &[Range<usize>],
    ) -> coffre_snapshotter::Result<Window<'_>> {
        self.read_window(offset, len, Some(wanted))
            .map_err(|e| self.fail(e))
    }

    fn check_unchanged(&self) -> coffre_snapshotter::Result<()> {
        // A committed point never changes.
        Ok(())
    }

    fn fetches(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_at_any_offset_read_what_the_point_holds() {
        let dir = tempfile::tempdir().unwrap();
        let pool = crate::backup::thread_pool(2).unwrap();
        // Ten 64 KiB blocks and a bit: data, a zero block (4), data, and
        // a short last block.
        let bs = 64usize << 10;
        let mut image = crate::test_vault::noise(10 * bs + 1000);
        image[4 * bs..5 * bs].fill(0);
        let (vault, point) = crate::test_vault::vault_with_point(dir.path(), &image, &pool);
        let src = PointSource::open(&vault, &point, &pool).unwrap();
        assert_eq!(src.size(), image.len() as u64);
        for (offset, len) in [
            (0usize, image.len()),
            (1000, 70_000),
            (4 * bs - 10, bs + 20),
            (9 * bs + 500, bs + 500),
            (image.len(), 0),
        ] {
            let w = src.window(offset as u64, len).unwrap();
            assert_eq!(w.bytes(), &image[offset..offset + len], "{offset}+{len}");
            // The zero block is a hole, never read.
            let zero = (4 * bs).saturating_sub(offset)..(5 * bs).saturating_sub(offset);
            if zero.start < len && !zero.is_empty() {
                assert!(w.is_hole(zero.start..zero.end.min(len)), "{offset}+{len}");
            }
        }
        // Only the wanted ranges are read; the rest reads as a hole.
        let w = src
            .window_for(0, 3 * bs, std::slice::from_ref(&(bs + 10..bs + 20)))
            .unwrap();
        assert_eq!(&w.bytes()[bs..2 * bs], &image[bs..2 * bs]);
        assert!(w.bytes()[..bs].iter().all(|&b| b == 0));
        assert!(w.is_hole(0..bs) && w.is_hole(2 * bs..3 * bs));
        // Past the end: an error naming the point, never short bytes.
        let Err(err) = src.window(image.len() as u64 - 10, 20) else {
            panic!("a window past the end was read");
        };
        assert!(err.to_string().contains("past the image"), "{err}");
        assert!(src.take_failure().is_some());
    }
}
