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

use coffre_snapshotter::capture::{WINDOW_BYTES, is_zero};
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
    /// Read at most this many bytes per second of the source.
    pub rate_limit: Option<u64>,
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
    progress.start(size);
    let mut map = MapState {
        builder: &mut builder,
        node_encoder: &mut node_encoder,
        stats: &mut stats,
    };
    let mut bytes_read = 0u64;
    std::thread::scope(|scope| -> Result<()> {
        let fetcher = Fetcher::start(scope, source)?;
        let request = |first: u64| -> Result<()> {
            let (_, offset, len) = span(first);
            Ok(fetcher.request(offset, len, std::iter::once(0..len).collect())?)
        };
        if blocks > 0 {
            request(0)?;
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
            bytes_read += window.data_len();
            let after = first + n as u64;
            if after < blocks {
                request(after)?;
            }
            let prev: Vec<Entry> = match prev_map.as_mut() {
                Some(m) => m.entries(first, n)?,
                None => vec![None; n],
            };
            let classes = classify(&window, n, len, block_size, &prev, &session, &cfg, pool);
            let previous = ready.take();
            let (outcomes, appended) = std::thread::scope(|s| {
                let writer = std::thread::Builder::new()
                    .name("coffre-segment".into())
                    .spawn_scoped(s, || match previous {
                        Some((outcomes, prev)) => map.append(&mut session, outcomes, &prev),
                        None => Ok(()),
                    })
                    .map_err(|e| {
                        EngineError::Threads(format!("cannot start the segment writer: {e}"))
                    })?;
                let outcomes = pool.install(|| {
                    classes
                        .into_par_iter()
                        .with_max_len(1)
                        .enumerate()
                        .map(|(i, class)| {
                            seal_block(&window, i, class, len, block_size, &encoders, source)
                        })
                        .collect::<Vec<_>>()
                });
                let appended = writer.join().unwrap_or_else(|_| {
                    Err(EngineError::Threads(
                        "the segment writer thread panicked".into(),
                    ))
                });
                Ok::<_, EngineError>((outcomes, appended))
            })?;
            appended?;
            window.finish()?;
            ready = Some((outcomes, prev));
            progress.advance(len as u64);
            throttle.consume(len as u64);
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
        warnings: Vec::new(),
    })
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
#[expect(
    clippy::too_many_arguments,
    reason = "the per-window inputs of one pass"
)]
fn classify(
    window: &Window<'_>,
    n: usize,
    len: usize,
    bs: usize,
    prev: &[Entry],
    session: &WriteSession<'_>,
    cfg: &coffre_vault_store::VaultConfig,
    pool: &rayon::ThreadPool,
) -> Vec<Result<Outcome>> {
    let one = |i: usize| -> Result<Outcome> {
        let Some(bytes) = block_bytes(window, i, len, bs) else {
            return Ok(Outcome::Zero);
        };
        if is_zero(bytes) {
            return Ok(Outcome::Zero);
        }
        let id = cfg.chunk_id(bytes);
        if prev.get(i).copied().flatten() == Some(id) && !session.is_damaged(&id) {
            return Ok(Outcome::Same(id));
        }
        if session.contains(&id)? {
            return Ok(Outcome::Known(id));
        }
        Ok(Outcome::Needed(id))
    };
    pool.install(|| (0..n).into_par_iter().with_max_len(1).map(one).collect())
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
