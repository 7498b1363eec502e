//! A point read in place, at any offset, by many readers at once: what
//! `coffre export` (NBD) and `coffre mount` (FUSE) serve.
//!
//! [`PointImage`] reads whole blocks from either tier ([`blocks`]), keeps
//! the decoded ones in a bounded cache ([`cache`]), and reads ahead of a
//! reader that goes through the image in order: a read that starts near
//! the furthest point read so far queues the next [`AccessOptions::read_ahead`]
//! bytes for the read-ahead threads the caller runs
//! ([`PointImage::read_ahead_worker`]). The read-ahead, and a read of
//! several blocks the cache lacks, load them together: their records are
//! read in runs (`data::record_fetch`, as a restore reads them: a few large
//! reads, with `O_DIRECT` where the page cache does not hold them) rather
//! than one buffered read per block. Memory: the cache (64 MiB by
//! default), the read-ahead queue, the records of the loads under way
//! (1.25 × 2 MiB at most each in 64 KiB blocks, one block and a quarter
//! in blocks larger than 2 MiB; a few buffers kept between loads), and for a
//! snapshot the manifest's entries (48 bytes per block).
//!
//! Every block is verified as a restore verifies it. A damaged block is
//! an error for the read that needs it (logged with the point and the
//! block), never zeros; the vault's copies repair it where one is good.

pub mod blocks;
pub mod cache;
mod kept;
pub mod live;
pub mod live_runs;
pub mod serve;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use coffre_snapshotter::nbd::wire::{Descriptor, ExportData, ReadParts, STATE_HOLE, STATE_ZERO};
use coffre_vault_store::Vault;
use coffre_vault_store::format::record::RecordDecoder;

use blocks::{Blocks, Scratch};
pub use blocks::{Kind, Served};
use cache::BlockCache;
use kept::Kept;

use crate::data::record_fetch::{Fetched, Fetcher};
use crate::error::Result;
use crate::points::PointEntry;

/// Default cache size.
pub const DEFAULT_CACHE: u64 = 64 << 20;
/// Default read-ahead.
pub const DEFAULT_READ_AHEAD: u64 = 8 << 20;

/// Decoders' scratch spaces kept between decodes.
const SCRATCH_KEPT: usize = 8;

/// Bytes of image one load fetches the records of at once.
const FETCH_BATCH: u64 = 2 << 20;

/// Reads that load their uncached blocks together at once (the
/// read-ahead threads' loads aside); each holds the records of up to
/// [`FETCH_BATCH`] bytes of image, and a quarter more.
const READ_LOADS: usize = 4;

/// Record fetchers kept between loads.
const LOADERS_KEPT: usize = 4;

/// Most blocks one block-status answer looks at.
const STATUS_BLOCKS: u64 = 1 << 16;

/// How a point is read in place.
#[derive(Clone, Copy, Debug)]
pub struct AccessOptions {
    /// Bytes of decoded blocks kept (at least a block).
    pub cache_bytes: u64,
    /// Bytes read ahead of a sequential reader (0: none).
    pub read_ahead: u64,
    /// The tier to read; `None`: the snapshot while the point has one.
    pub from: Option<Served>,
}

impl Default for AccessOptions {
    fn default() -> Self {
        AccessOptions {
            cache_bytes: DEFAULT_CACHE,
            read_ahead: DEFAULT_READ_AHEAD,
            from: None,
        }
    }
}

/// Counters of one image.
#[derive(Debug, Default)]
pub struct AccessStats {
    /// Blocks decoded (cache misses and read-ahead).
    pub decoded: AtomicU64,
    /// Of those, blocks decoded from records read in runs.
    pub from_runs: AtomicU64,
    /// Block reads the cache answered.
    pub hits: AtomicU64,
    /// Reads that failed on a damaged block.
    pub damaged: AtomicU64,
}

/// A point, readable in place.
pub struct PointImage<'v> {
    blocks: Blocks<'v>,
    cache: BlockCache,
    scratch: Kept<Scratch>,
    /// Record fetchers kept between reads.
    loaders: Kept<Loader<'v>>,
    /// Reads loading their blocks now (at most [`READ_LOADS`] do).
    read_loads: AtomicUsize,
    /// Blocks whose records one fetch reads ([`FETCH_BATCH`] bytes).
    batch: usize,
    /// Most blocks one read loads before it copies them: half the cache,
    /// unless it holds the whole image.
    load_most: usize,
    read_ahead_blocks: u64,
    /// The furthest block end a read reached, and how far read-ahead was
    /// queued.
    furthest: AtomicU64,
    queued_to: AtomicU64,
    queue: Mutex<VecDeque<u64>>,
    queued: Condvar,
    stats: AccessStats,
}

impl<'v> PointImage<'v> {
    /// Opens `point` of `vault` for reading in place.
    pub fn open(vault: &'v Vault, point: &PointEntry, opts: &AccessOptions) -> Result<Self> {
        let blocks = Blocks::open(vault, point, opts.from)?;
        let bs = u64::from(point.block_size);
        let read_ahead_blocks = opts.read_ahead.div_ceil(bs);
        // The cache holds at least the read-ahead window twice over, and
        // never more blocks than the image has.
        let cache_blocks = (opts.cache_bytes / bs)
            .max(2 * read_ahead_blocks)
            .max(4)
            .min(blocks.count().max(1));
        let load_most = if cache_blocks >= blocks.count() {
            usize::MAX
        } else {
            usize::try_from(cache_blocks / 2).unwrap_or(usize::MAX)
        };
        Ok(PointImage {
            blocks,
            cache: BlockCache::new(usize::try_from(cache_blocks).unwrap_or(usize::MAX)),
            load_most,
            scratch: Kept::new(SCRATCH_KEPT),
            loaders: Kept::new(LOADERS_KEPT),
            read_loads: AtomicUsize::new(0),
            batch: usize::try_from((FETCH_BATCH / bs).max(1)).unwrap_or(1),
            read_ahead_blocks,
            furthest: AtomicU64::new(0),
            queued_to: AtomicU64::new(0),
            queue: Mutex::default(),
            queued: Condvar::new(),
            stats: AccessStats::default(),
        })
    }

    /// The point.
    pub fn point(&self) -> &PointEntry {
        self.blocks.point()
    }

    /// The tier that serves.
    pub fn served(&self) -> Served {
        self.blocks.served()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.point().image_size
    }

    /// Counters.
    pub fn stats(&self) -> &AccessStats {
        &self.stats
    }

    fn block_size(&self) -> u64 {
        u64::from(self.point().block_size)
    }

    /// Block `b` decoded, from the cache or the tier.
    fn block(&self, b: u64) -> Result<Arc<Vec<u8>>> {
        let (bytes, hit) = self.cache.get_or_load(b, || self.decode(b).map(Arc::new))?;
        let counter = if hit {
            &self.stats.hits
        } else {
            &self.stats.decoded
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Block `b` decoded from the tier, the ordinary way (one record read,
    /// damage reported and repaired), with a scratch space from the pool.
    fn decode(&self, b: u64) -> Result<Vec<u8>> {
        let mut scratch = self.scratch.take_or(Scratch::default);
        let mut out = Vec::new();
        let r = self.blocks.decode(b, &mut scratch, &mut out);
        self.scratch.give(scratch);
        r.map(|()| out)
    }

    /// Reads `buf.len()` bytes at `offset` (inside the image). Zero
    /// blocks read as zeros without being decoded; a damaged block fails
    /// the read, naming the point and the block.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut at = 0usize;
        self.walk(offset, buf.len(), |n, piece| {
            let dst = &mut buf[at..at + n];
            at += n;
            match piece {
                None => dst.fill(0),
                Some((bytes, range)) => dst.copy_from_slice(&bytes[range]),
            }
        })
    }

    /// The `len` bytes at `offset` (inside the image) as parts: slices of
    /// the decoded blocks themselves, and zero runs, no copy (what an NBD
    /// reply sends). As [`PointImage::read_at`] otherwise.
    pub fn read_parts_at(&self, offset: u64, len: usize) -> Result<ReadParts> {
        let mut parts = ReadParts::default();
        let mut pushed = Ok(());
        self.walk(offset, len, |n, piece| match piece {
            None => parts.push_zeros(n),
            Some((bytes, range)) => {
                if let Err(e) = parts.push_shared(bytes, range) {
                    pushed = Err(e);
                }
            }
        })?;
        pushed.map_err(|reason| crate::EngineError::DamagedBlockMap {
            item: self.point().item.clone(),
            point: self.point().id.clone(),
            reason,
        })?;
        Ok(parts)
    }

    /// Hands `each` the bytes at `offset..offset + len` (inside the image)
    /// in order, a block's piece at a time: `(n, None)` for `n` zeros (a
    /// zero block, not decoded), `(n, Some((block, range)))` for `range`
    /// (`n` bytes, inside it) of a decoded block. The blocks the cache
    /// lacks are loaded first; a damaged block fails the walk, naming the
    /// point and the block.
    fn walk(
        &self,
        offset: u64,
        len: usize,
        mut each: impl FnMut(usize, Option<(Arc<Vec<u8>>, std::ops::Range<usize>)>),
    ) -> Result<()> {
        let size = self.size();
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= size)
            .ok_or_else(|| crate::EngineError::DamagedBlockMap {
                item: self.point().item.clone(),
                point: self.point().id.clone(),
                reason: format!("a read of {offset}+{len} is past the image's {size} bytes"),
            })?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size();
        let (first, last) = (offset / bs, (end - 1) / bs);
        self.note_read(first, last + 1);
        // A read of several blocks that are not cached reads their
        // records in runs first, like the read-ahead (a reader with many
        // requests in flight gets ahead of it).
        // At most half the cache is loaded ahead of the copy below (the
        // rest would be dropped before it is copied, and decoded again),
        // and at most [`READ_LOADS`] reads load at once (each holds its
        // records): past them, blocks are read one by one.
        let mut missing: Vec<u64> = (first..=last)
            .filter(|&b| !self.cache.contains(b))
            .collect();
        missing.truncate(self.load_most);
        if missing.len() > 1
            && let Some(_slot) = LoadSlot::take(&self.read_loads)
        {
            let mut loader = self.loader();
            for batch in missing.chunks(self.batch) {
                self.load(batch, &mut loader);
            }
            self.loaders.give(loader);
        }
        for b in first..=last {
            let from = (b * bs).max(offset);
            let to = ((b + 1) * bs).min(end);
            let n = (to - from) as usize;
            let skip = (from - b * bs) as usize;
            if self.blocks.kind(b)? == Kind::Zero {
                each(n, None);
                continue;
            }
            let bytes = self.block(b).inspect_err(|e| {
                self.stats.damaged.fetch_add(1, Ordering::Relaxed);
                tracing::error!(item = %self.point().item, point = %self.point().id, block = b, error = %e,
                    "a block of the point cannot be read: the read fails (no zeros are served)");
            })?;
            if skip + n > bytes.len() {
                return Err(crate::EngineError::DamagedBlockMap {
                    item: self.point().item.clone(),
                    point: self.point().id.clone(),
                    reason: format!("block {b} is shorter than the image says"),
                });
            }
            each(n, Some((bytes, skip..skip + n)));
        }
        Ok(())
    }

    /// Runs of zero and data blocks covering `offset..offset + len`
    /// (inside the image): `(bytes, kind)`, adjacent runs of one kind
    /// merged. Only the block map is consulted, nothing is decoded.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, Kind)>> {
        let end = offset.saturating_add(len).min(self.size());
        let bs = self.block_size();
        let mut out: Vec<(u64, Kind)> = Vec::new();
        let mut at = offset;
        while at < end {
            let b = at / bs;
            let to = ((b + 1) * bs).min(end);
            let kind = self.blocks.kind(b)?;
            match out.last_mut() {
                Some((n, k)) if *k == kind => *n += to - at,
                _ => out.push((to - at, kind)),
            }
            at = to;
        }
        Ok(out)
    }

    /// Notes a read of blocks `first..end`; one that starts near the
    /// furthest read so far queues the next window for read-ahead.
    fn note_read(&self, first: u64, end: u64) {
        if self.read_ahead_blocks == 0 {
            return;
        }
        let furthest = self.furthest.fetch_max(end, Ordering::Relaxed).max(end);
        // Near: within a window behind the furthest read (readers with
        // many requests in flight read a little out of order).
        if first + 2 * self.read_ahead_blocks < furthest {
            return;
        }
        let want_to = (furthest + self.read_ahead_blocks).min(self.blocks.count());
        let from = self
            .queued_to
            .fetch_max(want_to, Ordering::Relaxed)
            .max(furthest);
        if from >= want_to {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for b in from..want_to {
            q.push_back(b);
        }
        // A reader that jumped leaves old blocks queued: keep the newest.
        let cap = 4 * self.read_ahead_blocks as usize;
        while q.len() > cap {
            q.pop_front();
        }
        drop(q);
        self.queued.notify_all();
    }

    /// Decodes queued read-ahead blocks into the cache until `stop` is
    /// set, [`FETCH_BATCH`] bytes of them a turn, their records read in
    /// runs ([`PointImage::load`]); run it on one or more threads of the
    /// caller's.
    pub fn read_ahead_worker(&self, stop: &AtomicBool) {
        let mut loader = self.loader();
        while !stop.load(Ordering::Relaxed) {
            let next: Vec<u64> = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.is_empty() {
                    q = self
                        .queued
                        .wait_timeout(q, Duration::from_millis(100))
                        .map(|(q, _)| q)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                let n = q.len().min(self.batch);
                q.drain(..n).collect()
            };
            self.load(&next, &mut loader);
        }
    }

    /// A record fetcher, from the pool or new.
    fn loader(&self) -> Loader<'v> {
        self.loaders.take_or(|| {
            let bs = self.block_size();
            let batch = self.batch as u64;
            let cap = usize::try_from(batch * bs + batch * bs / 4).unwrap_or(usize::MAX);
            Loader {
                fetcher: self.blocks.fetcher(cap),
                fetched: Fetched::default(),
                decoder: RecordDecoder::default(),
            }
        })
    }

    /// Decodes into the cache the data blocks of `blocks` (at most a
    /// batch) that no one holds or loads: it claims them (their readers
    /// wait for this load instead of reading them twice), reads their
    /// records in runs (`record_fetch`: a few large reads, with `O_DIRECT`
    /// where the page cache does not hold them, instead of a buffered
    /// read per block), and decodes them. A record that could not be
    /// fetched is read the ordinary way; one that was fetched but does
    /// not check, or fails the ordinary read, is left to the block's
    /// reader, whose ordinary read reports the damage and repairs a copy.
    fn load(&self, blocks: &[u64], loader: &mut Loader<'v>) {
        let mut claims = Vec::with_capacity(blocks.len());
        let mut places = Vec::with_capacity(blocks.len());
        for &b in blocks {
            if !matches!(self.blocks.kind(b), Ok(Kind::Data)) {
                continue;
            }
            let Some(claim) = self.cache.claim(b) else {
                continue;
            };
            let place = self.blocks.place(b).ok().flatten();
            claims.push((claim, place.map(|(id, _)| id)));
            places.push(place.map(|(_, p)| p));
        }
        let Loader {
            fetcher,
            fetched,
            decoder,
        } = loader;
        let fetched_now = match fetcher.as_mut() {
            Some(f) if places.iter().any(Option::is_some) => {
                *fetched = f.fetch(&places, std::mem::take(fetched));
                true
            }
            _ => false,
        };
        for (k, (claim, id)) in claims.into_iter().enumerate() {
            let b = claim.block();
            let record = id.zip(fetched.record(k).filter(|_| fetched_now));
            let bytes = match record {
                Some((id, r)) => match self.blocks.decode_fetched(b, &id, r, decoder) {
                    Some(bytes) => {
                        self.stats.from_runs.fetch_add(1, Ordering::Relaxed);
                        bytes
                    }
                    // Fetched but not intact: the claim is dropped, and
                    // the block's reader reads it the ordinary way, which
                    // reports the damage (once) and repairs a copy.
                    None => continue,
                },
                // Not fetched (past the cap, a file that does not open
                // again): read the ordinary way now; a failure there is
                // left to the reader too.
                None => match self.decode(b) {
                    Ok(bytes) => bytes,
                    Err(_) => continue,
                },
            };
            claim.fill(Arc::new(bytes));
            self.stats.decoded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wakes the read-ahead workers (after `stop` was set).
    pub fn wake(&self) {
        self.queued.notify_all();
    }
}

/// One of the [`READ_LOADS`] reads that may load at once, given back
/// when dropped (a panic too).
struct LoadSlot<'a>(&'a AtomicUsize);

impl<'a> LoadSlot<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Self> {
        let slot = LoadSlot(count);
        (count.fetch_add(1, Ordering::AcqRel) < READ_LOADS).then_some(slot)
    }
}

impl Drop for LoadSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one thread keeps to read records in runs: a fetcher of the
/// serving tier's files, its buffer, and a decoder.
struct Loader<'v> {
    fetcher: Option<Fetcher<'v>>,
    fetched: Fetched,
    decoder: RecordDecoder,
}

impl ExportData for PointImage<'_> {
    fn size(&self) -> u64 {
        PointImage::size(self)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        self.read_at(offset, buf).map_err(|e| e.to_string())
    }

    fn read_parts(&self, offset: u64, len: usize) -> std::result::Result<ReadParts, String> {
        self.read_parts_at(offset, len).map_err(|e| e.to_string())
    }

    fn allocation(&self, offset: u64, len: u32) -> std::result::Result<Vec<Descriptor>, String> {
        // A prefix is a valid answer: a long request is answered for its
        // first blocks, and the client asks again from there.
        let most = STATUS_BLOCKS * self.block_size();
        let extents = self
            .extents(offset, u64::from(len).min(most))
            .map_err(|e| e.to_string())?;
        Ok(extents
            .into_iter()
            .map(|(n, kind)| Descriptor {
                // `n` is at most `len`, a u32.
                length: u32::try_from(n).unwrap_or(u32::MAX),
                flags: match kind {
                    Kind::Zero => STATE_HOLE | STATE_ZERO,
                    Kind::Data => 0,
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
