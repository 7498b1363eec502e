//! Ingest: an image read straight into a new point, with no snapshot
//! tier in between. `vault copy` reads each point of the source vault
//! through a [`crate::point_source::PointSource`] and ingests it into the
//! destination; any [`ImageSource`] will do.
//!
//! It is the transfer of a backup ([`crate::backup`]) over the windows of
//! a source instead of a snapshot: window by window (read ahead by a
//! `Fetcher` thread), each block is hashed with the vault's chunk id
//! (keyed BLAKE3 in an encrypted vault), compared with the parent point's
//! entry, deduplicated against the vault, and only the rest is compressed
//! and sealed, in parallel, while one thread appends the window before
//! and builds the block map ([`crate::backup`]'s own `MapState`). The
//! point and its item are committed in one synced index batch at the end:
//! an interrupted ingest leaves no point, and what it appended is reused
//! by the next session or reclaimed, as for a killed backup.

use std::time::Instant;

use coffre_snapshotter::capture::{WINDOW_BYTES, is_zero, wanted_ranges};
use coffre_snapshotter::fetch::Fetcher;
use coffre_snapshotter::source::Window;
use coffre_vault_store::format::blockmap::{BlockMapBuilder, Entry, block_count};
use coffre_vault_store::format::catalog::{CbtRecord, validate_item_name};
use coffre_vault_store::format::level::Level;
use coffre_vault_store::index::refs::node_refs;
use coffre_vault_store::{
    ChunkId, IndexBatch, ItemRecord, PointRecord, PointStats, StoreError, Vault, WriteSession,
};
use jiff::Timestamp;
use rayon::prelude::*;

use crate::backup::{BackupOutcome, MapState, Outcome, PointTerms, store_node};
use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::progress::Progress;
use crate::reader::BlockMapReader;
use crate::source::ImageSource;
use crate::throttle::Throttle;

/// The point an ingest records, besides its blocks.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    /// The item, as it is created when the vault lacks it (`next_seq` is
    /// ignored); an existing item keeps its record.
    pub item: ItemRecord,
    /// The new point's id.
    pub point_id: String,
    /// When the point was taken.
    pub created: Timestamp,
    /// Its consistency level, when known.
    pub level: Option<Level>,
    /// How a changed-block source was used when it was taken.
    pub cbt: Option<CbtRecord>,
    /// Scheduled or on-demand, and the job.
    pub terms: PointTerms,
    /// The point of the item to compare with (unchanged blocks cost an
    /// entry); a point of another block size is not used.
    pub parent: Option<PointRecord>,
    /// The blocks known to be `parent`'s, left unread (checked on a
    /// sample first: one that is not drops the hint, with a warning).
    pub clean: Option<CleanBlocks>,
    /// Read at most this many bytes per second of the source.
    pub rate_limit: Option<u64>,
}

/// Clean blocks read and compared before a [`CleanBlocks`] hint is used.
const CLEAN_SAMPLE: u64 = 64;

/// Which blocks of a new point are known to hold what the same blocks of
/// its parent hold (one bit a block).
#[derive(Debug, Clone)]
pub struct CleanBlocks {
    words: Vec<u64>,
    blocks: u64,
}

impl CleanBlocks {
    /// `blocks` blocks, all clean.
    pub fn all_clean(blocks: u64) -> Self {
        CleanBlocks {
            words: vec![u64::MAX; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    /// Marks blocks `range` dirty (clamped to the image).
    pub fn dirty(&mut self, range: std::ops::Range<u64>) {
        for b in range.start..range.end.min(self.blocks) {
            if let Some(w) = self.words.get_mut((b / 64) as usize) {
                *w &= !(1u64 << (b % 64));
            }
        }
    }

    /// True when block `b` is clean.
    pub fn is_clean(&self, b: u64) -> bool {
        b < self.blocks
            && self
                .words
                .get((b / 64) as usize)
                .is_some_and(|w| w & (1u64 << (b % 64)) != 0)
    }

    /// How many blocks are clean.
    pub fn clean_count(&self) -> u64 {
        (0..self.blocks).filter(|&b| self.is_clean(b)).count() as u64
    }
}

/// Reads `source` into a new point of `req.item` in `vault`. `stop` is
/// polled between windows.
pub fn ingest(
    vault: &Vault,
    source: &dyn ImageSource,
    req: &IngestRequest,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    stop: &dyn Fn() -> bool,
) -> Result<BackupOutcome> {
    let name = &req.item.name;
    validate_item_name(name).map_err(EngineError::InvalidItemName)?;
    let started = Instant::now();
    let cfg = vault.config().clone();
    let block_size = cfg.block_size as usize;
    let size = source.size();
    let blocks = block_count(size, cfg.block_size);
    let existing = vault.item(name)?;
    let mut prev_map = match &req.parent {
        Some(p) if p.block_size == cfg.block_size && p.item == *name => {
            Some(BlockMapReader::open(vault, p)?)
        }
        _ => None,
    };
    let mut warnings = Vec::new();
    let clean = match (&req.clean, prev_map.as_mut()) {
        (Some(c), Some(m)) if c.blocks == blocks => match sample_clean(c, m, source, &cfg, size)? {
            None => Some(c),
            Some(why) => {
                warnings.push(format!(
                        "the blocks known to be unchanged since the parent point were not: {why}; every block was read"
                    ));
                None
            }
        },
        _ => None,
    };
    let encoders = PerThread::new(pool, || cfg.encoder());
    let mut node_encoder = cfg.encoder();
    let mut session = vault.begin_write()?;
    let mut builder = BlockMapBuilder::new();
    let mut stats = PointStats {
        blocks_total: blocks,
        ..PointStats::default()
    };
    let mut throttle = Throttle::new(req.rate_limit);
    let window_blocks = (WINDOW_BYTES / block_size).max(1);
    let span = |first: u64| {
        let n = (window_blocks as u64).min(blocks - first) as usize;
        let offset = first * block_size as u64;
        let len = (size - offset).min((n * block_size) as u64) as usize;
        (n, offset, len)
    };
    // A window's plan: the parent's entries, which blocks are clean
    // (unread unless the parent's chunk is damaged) and the byte ranges
    // to read.
    let plan = |first: u64,
                prev_map: Option<&mut BlockMapReader<'_>>,
                clean: Option<&CleanBlocks>,
                session: &WriteSession<'_>|
     -> Result<WindowPlan> {
        let (n, _, len) = span(first);
        let prev: Vec<Entry> = match prev_map {
            Some(m) => m.entries(first, n)?,
            None => vec![None; n],
        };
        let unread: Vec<bool> = (0..n)
            .map(|i| {
                clean.is_some_and(|c| c.is_clean(first + i as u64))
                    && prev
                        .get(i)
                        .copied()
                        .flatten()
                        .is_none_or(|id| !session.is_damaged(&id))
            })
            .collect();
        let wanted = wanted_ranges(n, block_size, len, &|i| {
            !unread.get(i).copied().unwrap_or(false)
        });
        Ok(WindowPlan {
            prev,
            unread,
            wanted,
        })
    };
    progress.start(size);
    let mut map = MapState {
        builder: &mut builder,
        node_encoder: &mut node_encoder,
        stats: &mut stats,
    };
    let mut bytes_read = 0u64;
    std::thread::scope(|scope| -> Result<()> {
        let fetcher = Fetcher::start(scope, source)?;
        let request = |first: u64, plan: &WindowPlan| -> Result<()> {
            let (_, offset, len) = span(first);
            Ok(fetcher.request(offset, len, plan.wanted.clone())?)
        };
        let mut next = None;
        if blocks > 0 {
            let p = plan(0, prev_map.as_mut(), clean, &session)?;
            request(0, &p)?;
            next = Some(p);
        }
        // While the pool hashes and seals window N, one thread appends
        // window N-1 to the segment and builds the block map.
        let mut ready: Option<(Vec<Result<Outcome>>, Vec<Entry>)> = None;
        let mut first = 0u64;
        while first < blocks {
            if stop() {
                return Err(EngineError::Abandoned);
            }
            let (n, _, len) = span(first);
            let WindowPlan { prev, unread, .. } = next
                .take()
                .ok_or_else(|| EngineError::Threads("a window was not planned".into()))?;
            let window = fetcher.receive()?;
            if window.bytes().len() != len {
                return Err(EngineError::Snap(coffre_snapshotter::SnapError::Damaged {
                    path: source.path().to_path_buf(),
                    reason: format!(
                        "a window of {len} bytes came back with {}",
                        window.bytes().len()
                    ),
                }));
            }
            let read = window.data_len();
            bytes_read += read;
            let after = first + n as u64;
            if after < blocks {
                let p = plan(after, prev_map.as_mut(), clean, &session)?;
                request(after, &p)?;
                next = Some(p);
            }
            let shape = Shape {
                n,
                len,
                bs: block_size,
                prev: &prev,
                unread: &unread,
            };
            let classes = classify(&window, &shape, &session, &cfg, pool);
            let previous = ready.take();
            let (outcomes, appended) =
                map.append_beside(&mut session, previous, pool, classes, |(i, class)| {
                    seal_block(&window, i, class, len, block_size, &encoders, source)
                })?;
            appended?;
            window.finish()?;
            ready = Some((outcomes, prev));
            progress.advance(len as u64);
            throttle.consume(read);
            first = after;
        }
        if let Some((outcomes, prev)) = ready.take() {
            map.append(&mut session, outcomes, &prev)?;
        }
        Ok(())
    })?;
    if let Some(leaf) = builder.flush() {
        let id = store_node(&mut session, &mut node_encoder, &leaf, &mut stats)?;
        builder.leaf_stored(id);
    }
    let root = builder.root(size, cfg.block_size);
    let root_id = store_node(&mut session, &mut node_encoder, &root, &mut stats)?;
    stats.bytes_read = bytes_read;
    stats.stored_bytes = session.appended_bytes();
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let mut item = existing.clone().unwrap_or_else(|| ItemRecord {
        next_seq: 1,
        ..req.item.clone()
    });
    let seq = item.next_seq;
    item.next_seq += 1;
    let point = PointRecord {
        id: req.point_id.clone(),
        item: name.clone(),
        seq,
        created: req.created,
        image_size: size,
        block_size: cfg.block_size,
        block_map: root_id,
        stats,
        scheduled: req.terms.scheduled,
        retain_until: req.terms.retain_until,
        job: req.terms.job.clone(),
        level: req.level,
        cbt: req.cbt.clone(),
    };
    let mut batch = IndexBatch::default();
    batch.put_item(item);
    batch.put_point(point.clone());
    session.reference_root(root_id);
    session.commit(batch)?;
    progress.finish();
    Ok(BackupOutcome {
        point,
        new_item: existing.is_none(),
        warnings,
    })
}

/// A window, planned.
struct WindowPlan {
    /// The parent's entries.
    prev: Vec<Entry>,
    /// The blocks taken from the parent, unread.
    unread: Vec<bool>,
    /// The byte ranges to read.
    wanted: Vec<std::ops::Range<usize>>,
}

/// What classifying a window needs to know of it.
struct Shape<'a> {
    /// Its blocks.
    n: usize,
    /// Its bytes.
    len: usize,
    /// Block size.
    bs: usize,
    /// The parent's entries.
    prev: &'a [Entry],
    /// The blocks taken from the parent, unread.
    unread: &'a [bool],
}

/// Reads a spread sample of the clean blocks (up to [`CLEAN_SAMPLE`])
/// and compares them with the parent's: why the hint is wrong, if it is.
fn sample_clean(
    clean: &CleanBlocks,
    parent: &mut BlockMapReader<'_>,
    source: &dyn ImageSource,
    cfg: &coffre_vault_store::VaultConfig,
    size: u64,
) -> Result<Option<String>> {
    let count = clean.clean_count();
    if count == 0 {
        return Ok(None);
    }
    let step = count.div_ceil(CLEAN_SAMPLE).max(1);
    let bs = u64::from(cfg.block_size);
    let mut seen = 0u64;
    for b in 0..clean.blocks {
        if !clean.is_clean(b) {
            continue;
        }
        seen += 1;
        if !(seen - 1).is_multiple_of(step) {
            continue;
        }
        let offset = b * bs;
        let len = (size - offset).min(bs) as usize;
        let window = source.window(offset, len)?;
        let id = (!window.is_hole(0..len))
            .then(|| window.bytes())
            .filter(|bytes| !is_zero(bytes))
            .map(|bytes| cfg.chunk_id(bytes));
        window.finish()?;
        if parent.entries(b, 1)?.first().copied().flatten() != id {
            return Ok(Some(format!("block {b} differs from the parent's")));
        }
    }
    Ok(None)
}

/// The bytes of block `i` of a window of `len` bytes (`None`: a hole).
fn block_bytes<'w>(window: &'w Window<'_>, i: usize, len: usize, bs: usize) -> Option<&'w [u8]> {
    let start = i * bs;
    let end = (start + bs).min(len);
    if window.is_hole(start..end) {
        return None;
    }
    window.bytes().get(start..end)
}

/// Which blocks of the window are zero, the same as the parent's, or
/// stored already; the others are `Needed`. Hashing is done on the pool.
fn classify(
    window: &Window<'_>,
    shape: &Shape<'_>,
    session: &WriteSession<'_>,
    cfg: &coffre_vault_store::VaultConfig,
    pool: &rayon::ThreadPool,
) -> Vec<Result<Outcome>> {
    let one = |i: usize| -> Result<Outcome> {
        let prev = shape.prev.get(i).copied().flatten();
        if shape.unread.get(i).copied().unwrap_or(false) {
            return Ok(prev.map_or(Outcome::Zero, Outcome::Same));
        }
        let Some(bytes) = block_bytes(window, i, shape.len, shape.bs) else {
            return Ok(Outcome::Zero);
        };
        if is_zero(bytes) {
            return Ok(Outcome::Zero);
        }
        let id = cfg.chunk_id(bytes);
        if prev == Some(id) && !session.is_damaged(&id) {
            return Ok(Outcome::Same(id));
        }
        if session.contains(&id)? {
            return Ok(Outcome::Known(id));
        }
        Ok(Outcome::Needed(id))
    };
    pool.install(|| {
        (0..shape.n)
            .into_par_iter()
            .with_max_len(1)
            .map(one)
            .collect()
    })
}

/// A `Needed` block compressed and sealed into its record; other
/// outcomes pass through.
fn seal_block(
    window: &Window<'_>,
    i: usize,
    class: Result<Outcome>,
    len: usize,
    bs: usize,
    encoders: &PerThread<coffre_vault_store::RecordEncoder>,
    source: &dyn ImageSource,
) -> Result<Outcome> {
    let id: ChunkId = match class? {
        Outcome::Needed(id) => id,
        other => return Ok(other),
    };
    let bytes = block_bytes(window, i, len, bs).unwrap_or_default();
    let record = encoders
        .get()
        .encode(id, bytes)
        .map_err(|reason| StoreError::CorruptChunk {
            id,
            path: source.path().to_path_buf(),
            offset: (i * bs) as u64,
            reason: Box::new(reason),
        })?;
    // A block whose bytes are a valid block-map node (an image that holds
    // a coffre vault) is counted as that node (see `crate::backup`).
    Ok(Outcome::New(id, record, node_refs(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::point_source::PointSource;
    use crate::progress::NoProgress;
    use crate::test_vault::request;

    const BS: usize = 64 << 10;

    const BLOCKS: u64 = 256;

    /// An image source that serves only the ranges asked for, and counts
    /// the bytes it served.
    struct Counted {
        bytes: Vec<u8>,
        buffers: coffre_snapshotter::source::BufferPool,
        served: std::sync::atomic::AtomicU64,
    }

    impl Counted {
        fn new(bytes: Vec<u8>) -> Self {
            Counted {
                bytes,
                buffers: coffre_snapshotter::source::BufferPool::new(2),
                served: std::sync::atomic::AtomicU64::new(0),
            }
        }
    }

    impl ImageSource for Counted {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn path(&self) -> &std::path::Path {
            std::path::Path::new("counted")
        }
        fn window(&self, offset: u64, len: usize) -> coffre_snapshotter::Result<Window<'_>> {
            self.window_for(offset, len, std::slice::from_ref(&(0..len)))
        }
        fn window_for(
            &self,
            offset: u64,
            len: usize,
            wanted: &[std::ops::Range<usize>],
        ) -> coffre_snapshotter::Result<Window<'_>> {
            let mut lent = self.buffers.take(len, wanted);
            for r in wanted {
                let at = offset as usize;
                lent.bytes_mut()[r.clone()].copy_from_slice(&self.bytes[at + r.start..at + r.end]);
                self.served
                    .fetch_add(r.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Window::lent(lent, wanted.to_vec(), self.path()))
        }
        fn check_unchanged(&self) -> coffre_snapshotter::Result<()> {
            Ok(())
        }
    }

    /// Distinct blocks (`salt` changes blocks 5 and 111).
    fn image(salt: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCKS as usize * BS);
        for b in 0..BLOCKS as u32 {
            let s = if b == 5 || b == 111 { salt } else { 0 };
            out.extend(
                (0..BS as u32)
                    .map(|i| (i.wrapping_mul(31) ^ b.wrapping_mul(7) ^ u32::from(s)) as u8),
            );
        }
        out
    }

    fn read_back(vault: &Vault, point: &PointRecord, pool: &rayon::ThreadPool) -> Vec<u8> {
        let src = PointSource::open(vault, point, pool).unwrap();
        let w = src.window(0, point.image_size as usize).unwrap();
        w.bytes().to_vec()
    }

    #[test]
    fn a_clean_hint_is_used_when_right_and_dropped_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new("2027-01-01T00:00:00Z".parse().unwrap());
        let vault = crate::vault_ops::create_vault(
            &dir.path().join("v"),
            &crate::vault_ops::CreateOptions::default(),
            &clock,
        )
        .unwrap();
        let pool = crate::backup::thread_pool(2).unwrap();
        let stop = || false;
        let one = ingest(
            &vault,
            &Counted::new(image(0)),
            &request("p1", "2027-01-01T00:00:00Z", None),
            &pool,
            &NoProgress,
            &stop,
        )
        .unwrap()
        .point;
        assert_eq!(read_back(&vault, &one, &pool), image(0));

        // Right: blocks 5 and 111 changed, the rest is left unread.
        let mut hint = CleanBlocks::all_clean(BLOCKS);
        hint.dirty(5..6);
        hint.dirty(111..112);
        assert_eq!(hint.clean_count(), BLOCKS - 2);
        let mut req = request("p2", "2027-01-02T00:00:00Z", Some(one.clone()));
        req.clean = Some(hint);
        let source = Counted::new(image(1));
        let two = ingest(&vault, &source, &req, &pool, &NoProgress, &stop).unwrap();
        assert!(two.warnings.is_empty(), "{:?}", two.warnings);
        assert_eq!(read_back(&vault, &two.point, &pool), image(1));
        // The two dirty blocks and the sample of the clean ones.
        let served = source.served.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(served, (2 + CLEAN_SAMPLE) * BS as u64);
        assert_eq!(two.point.stats.blocks_changed, 2);

        // Wrong: everything called clean, but every fourth block differs
        // (a sample of a few blocks cannot find a change of one: the hint
        // must come from what is known, `vault_copy`'s block maps). The
        // sample finds it, every block is read, the point is right.
        let mut req = request("p3", "2027-01-03T00:00:00Z", Some(one));
        req.clean = Some(CleanBlocks::all_clean(BLOCKS));
        let mut wrong = image(0);
        for b in (0..BLOCKS as usize).step_by(4) {
            wrong[b * BS] ^= 0x55;
        }
        let three = ingest(
            &vault,
            &Counted::new(wrong.clone()),
            &req,
            &pool,
            &NoProgress,
            &stop,
        )
        .unwrap();
        assert_eq!(three.warnings.len(), 1, "{:?}", three.warnings);
        assert!(
            three.warnings[0].contains("block 0 "),
            "{:?}",
            three.warnings
        );
        assert_eq!(read_back(&vault, &three.point, &pool), wrong);
    }
}
