//! The transfer phase of a backup: snapshot → new chunks → point.
//!
//! The transfer reads the **snapshot** the snapshot phase captured, never
//! the live image: once the snapshot phase has completed, the image may be
//! rewritten, resized or deleted and the transfer still records exactly the
//! snapshot's point. Window by window, a block whose id equals the previous
//! point's entry costs nothing, one the vault already holds is only
//! referenced, and only the rest is stored:
//! - from a **chunk snapshot** (the fallback capture), the snapshot's own
//!   pack becomes a vault segment (a hard link, when the vault can share
//!   the file) and its record is indexed where it is; a record of an older
//!   pack, or of a pack the vault cannot share, is copied into the vault as
//!   it is (its CRC checked; no recompression, no rehash: the capture
//!   hashed and compressed it);
//! - from a **clone snapshot**, the clone is read through memory maps,
//!   hashed and compressed, in parallel.
//!
//! The block map is built as it goes. Finally the point, the item and the
//! reference counts are committed with the last chunk locations in one
//! synced index batch (the write order is in `coffre_vault_store::vault`).
//!
//! The previous point is read *here*, under the writer lock, never taken
//! from the snapshot phase: a prune and a GC may run between the two
//! phases and remove it, and the transfer must rely only on what the vault
//! holds at that moment.

use std::path::{Path, PathBuf};
use std::time::Instant;

use coffre_snapshotter::area::{Area, AreaIdentity};
use coffre_snapshotter::capture::{CaptureRequest, Captured, WINDOW_BYTES, capture, is_zero};
use coffre_snapshotter::cbt::{
    CbtRecord, Hint, Parent, Sampling, fallback_warning, sample_mismatch,
};
use coffre_snapshotter::fetch::Fetcher;
use coffre_snapshotter::manifest::FLAG_NODE;
use coffre_snapshotter::pack::RecordBuf;
use coffre_snapshotter::read::{SnapWindow, SnapshotBlocks};
use coffre_snapshotter::{Hooks, SnapError};
use coffre_vault_store::format::catalog::validate_item_name;
use coffre_vault_store::{
    ChunkId, ChunkKind, ChunkLocation, IndexBatch, ItemRecord, PointRecord, PointStats, Protection,
    RecordEncoder, StoreError, Vault, VaultConfig, WriteSession,
};
use jiff::Timestamp;
use rayon::prelude::*;

use crate::clock::Clock;
use crate::data::transfer_window;
use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::progress::{NoProgress, Progress};
use crate::reader::BlockMapReader;
use crate::source::ImageSource;
use crate::throttle::Throttle;
use coffre_vault_store::format::blockmap::{BlockMapBuilder, Entry, block_count};
use coffre_vault_store::index::refs::node_refs;

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Item name.
    pub item: String,
    /// Path recorded for the item (the image's absolute path).
    pub source_path: PathBuf,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Bandwidth limit in bytes per second.
    pub rate_limit: Option<u64>,
    /// The item's pre- and post-snapshot hooks.
    pub hooks: Hooks,
    /// Try a reflink clone before the fallback copy.
    pub allow_clone: bool,
    /// Where default snapshot areas go instead of `.coffre-snapshots` at
    /// the root of the image's filesystem.
    pub snapshot_root: Option<PathBuf>,
    /// A changed-block hint (a given list or a dirty bitmap); clone
    /// snapshots also get one from reflink extent sharing.
    pub hint: Option<Hint>,
    /// How many clean blocks a hint is checked on.
    pub sampling: Sampling,
    /// Warnings found before the job ran (hooks of the catalog this host
    /// does not run), recorded with the job's.
    pub notes: Vec<String>,
}

impl BackupOptions {
    /// Options for `item` read from `source_path`: all cores, no limit,
    /// no hooks, clones allowed.
    pub fn new(item: impl Into<String>, source_path: impl Into<PathBuf>) -> Self {
        BackupOptions {
            item: item.into(),
            source_path: source_path.into(),
            threads: 0,
            rate_limit: None,
            hooks: Hooks::default(),
            allow_clone: true,
            snapshot_root: None,
            hint: None,
            sampling: Sampling::default(),
            notes: Vec::new(),
        }
    }
}

/// How the point a transfer records is kept.
#[derive(Debug, Clone, Default)]
pub struct PointTerms {
    /// Taken on the policy's schedule (policy retention applies).
    pub scheduled: bool,
    /// On-demand: kept until then.
    pub retain_until: Option<Timestamp>,
    /// The job recording it.
    pub job: Option<String>,
}

/// The result of a backup.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The new point.
    pub point: PointRecord,
    /// True when this backup created the item.
    pub new_item: bool,
    /// What the transfer did less than perfectly (a changed-block hint it
    /// could not trust).
    pub warnings: Vec<String>,
}

/// Builds a rayon pool of `threads` workers (0 = one per core).
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("coffre-worker-{i}"))
        .build()
        .map_err(|e| EngineError::Threads(e.to_string()))
}

pub(crate) enum Outcome {
    Zero,
    Same(ChunkId),
    Known(ChunkId),
    /// Neither zero, the same, nor stored yet: its record must be made.
    Needed(ChunkId),
    /// A new chunk, with its node kind and children if its bytes are a
    /// block-map node.
    New(ChunkId, Vec<u8>, Option<(ChunkKind, Vec<ChunkId>)>),
    /// A new data chunk whose record stays where it is, in the snapshot's
    /// own pack, which the vault adopted as a segment.
    Adopted(ChunkId, ChunkLocation),
}

/// The snapshot's own pack, adopted as a vault segment: its index among
/// the snapshot's packs and the segment id it got.
#[derive(Clone, Copy)]
struct Adoption {
    pack: u16,
    segment: u64,
}

/// Everything the snapshot phase needs besides the image.
pub struct SnapshotOptions<'a> {
    /// Job id (names the snapshot files).
    pub job: &'a str,
    /// The capture instant.
    pub created: Timestamp,
    /// Worker pool.
    pub pool: &'a rayon::ThreadPool,
    /// Polled between windows; `true` cancels.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// The item's latest vault point (a hint must be relative to it).
    pub parent_point: Option<&'a str>,
    /// The point in time was taken before the capture (a live source).
    pub taken: Option<&'a coffre_snapshotter::source::PointInTime>,
}

/// The snapshot phase: captures `source` into the vault's snapshot area
/// for its filesystem (see `coffre_snapshotter::area`).
pub fn take_snapshot(
    vault_dir: &Path,
    cfg: &VaultConfig,
    source: &dyn ImageSource,
    opts: &BackupOptions,
    snap: &SnapshotOptions<'_>,
    progress: &dyn Progress,
) -> Result<Captured> {
    validate_item_name(&opts.item).map_err(EngineError::InvalidItemName)?;
    let owner = AreaIdentity {
        vault_id: cfg.vault_id.clone(),
        vault_name: cfg.name.clone(),
    };
    let area = Area::for_image(
        vault_dir,
        cfg.keys(),
        &owner,
        cfg.snapshot_area.as_deref(),
        opts.snapshot_root.as_deref(),
        source.path(),
    )?;
    let point = point_id(&cfg.vault_id, &opts.item, snap.job);
    Ok(capture(
        &CaptureRequest {
            source,
            area: &area,
            item: &opts.item,
            job: snap.job,
            point: &point,
            block_size: cfg.block_size,
            compression_level: cfg.compression_level,
            keys: cfg.keys().cloned(),
            created: snap.created,
            pool: snap.pool,
            rate_limit: opts.rate_limit,
            cancelled: snap.cancelled,
            hooks: &opts.hooks,
            vault_dir,
            allow_clone: opts.allow_clone,
            hint: opts.hint.as_ref(),
            sampling: opts.sampling,
            parent_point: snap.parent_point,
            taken: snap.taken,
        },
        progress,
    )?)
}

/// Both phases at once, without a job record (benchmarks, tests). The
/// snapshot stays in the area, as after a job.
pub fn backup(
    vault: &Vault,
    source: &dyn ImageSource,
    opts: &BackupOptions,
    clock: &dyn Clock,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    let pool = thread_pool(opts.threads)?;
    let created = clock.now();
    let job = format!("direct{:x}", created.as_nanosecond());
    let parent = vault.points(&opts.item)?.pop().map(|p| p.id);
    let snap = take_snapshot(
        vault.dir(),
        vault.config(),
        source,
        opts,
        &SnapshotOptions {
            job: &job,
            created,
            pool: &pool,
            cancelled: &|| false,
            parent_point: parent.as_deref(),
            taken: None,
        },
        &NoProgress,
    )?;
    transfer(
        vault,
        &snap,
        opts,
        &PointTerms::default(),
        &pool,
        progress,
        &|| false,
    )
}

/// Stores what snapshot `snap` captured as a new point of `opts.item`.
/// `stop` is polled between windows (shutdown).
pub fn transfer(
    vault: &Vault,
    snap: &Captured,
    opts: &BackupOptions,
    terms: &PointTerms,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    stop: &dyn Fn() -> bool,
) -> Result<BackupOutcome> {
    validate_item_name(&opts.item).map_err(EngineError::InvalidItemName)?;
    let started = Instant::now();
    let cfg = vault.config().clone();
    let block_size = cfg.block_size as usize;
    let size = snap.header.image_size;
    if snap.header.block_size != cfg.block_size {
        return Err(SnapError::Damaged {
            path: snap.manifest.clone(),
            reason: format!(
                "its block size {} is not the vault's {}",
                snap.header.block_size, cfg.block_size
            ),
        }
        .into());
    }
    let blocks = block_count(size, cfg.block_size);
    let mut snapshot = SnapshotBlocks::open(&snap.manifest, cfg.keys())?;

    let existing = vault.item(&opts.item)?;
    let previous = vault.points(&opts.item)?.pop();
    let mut prev_map = match &previous {
        Some(p) if p.block_size == cfg.block_size => Some(BlockMapReader::open(vault, p)?),
        _ => None,
    };

    let transfer_read = std::sync::atomic::AtomicU64::new(0);
    let (hint, cbt, warnings) = transfer_hint(
        snap,
        previous.as_ref(),
        prev_map.as_mut(),
        &snapshot,
        &cfg,
        &opts.sampling,
        &transfer_read,
    )?;

    let encoders = PerThread::new(pool, || cfg.encoder());
    let records = PerThread::new(pool, RecordBuf::default);
    let mut node_encoder = cfg.encoder();
    let mut session = vault.begin_write()?;
    // One write per byte: a fallback capture's pack becomes a segment as
    // it is (hard-linked), when the vault can share the file.
    let adoption = match snapshot.own_pack() {
        Some((pack, path)) => session
            .adopt_pack(&path)?
            .map(|segment| Adoption { pack, segment }),
        None => None,
    };
    let mut builder = BlockMapBuilder::new();
    let mut stats = PointStats {
        blocks_total: blocks,
        ..PointStats::default()
    };
    let mut throttle = Throttle::new(opts.rate_limit);
    progress.start(size);

    let window_blocks = (WINDOW_BYTES / block_size).max(1);
    // While the pool reads (or compresses) the new blocks of window N, one
    // thread appends window N-1 to the segment and builds the block map.
    let mut ready: Option<(Vec<Result<Outcome>>, Vec<Entry>)> = None;
    let mut map = MapState {
        builder: &mut builder,
        node_encoder: &mut node_encoder,
        stats: &mut stats,
    };
    // A hinted clone's windows are read (direct, waiting for the device)
    // on a thread of their own, one window ahead of the pool.
    let ahead_image = match hint {
        Some(_) => snapshot.reopen_clone()?,
        None => None,
    };
    let shape = transfer_window::Shape {
        blocks,
        size,
        block_size,
        window_blocks,
        hint,
    };
    std::thread::scope(|scope| -> Result<()> {
        let fetcher = ahead_image
            .as_ref()
            .map(|image| Fetcher::start(scope, image))
            .transpose()?;
        let mut next = Some(transfer_window::plan(
            &shape,
            0,
            prev_map.as_mut(),
            &session,
        )?);
        if let (Some(f), Some(p)) = (&fetcher, &next) {
            transfer_window::request(f, p)?;
        }
        while let Some(transfer_window::Plan {
            first,
            n,
            offset,
            len,
            prev,
            dirty,
            wanted,
        }) = next.take()
        {
            if stop() {
                return Err(EngineError::Abandoned);
            }
            let window = match (&fetcher, &ahead_image) {
                (Some(f), Some(image)) => snapshot.clone_window(image, f.receive()?, len),
                _ => snapshot.window_for(first, n, offset, len, wanted.as_deref())?,
            };
            let after = first + n as u64;
            if after < blocks {
                let p = transfer_window::plan(&shape, after, prev_map.as_mut(), &session)?;
                if let Some(f) = &fetcher {
                    transfer_window::request(f, &p)?;
                }
                next = Some(p);
            }
            // Which blocks are zero, the same as before, or already stored. A
            // chunk snapshot knows every id (nothing to read or hash): that is
            // too little work to hand to the pool.
            let knows_ids = matches!(window, SnapWindow::Chunks { .. });
            let classify = |i: usize| -> Result<Outcome> {
                // A checked hint's clean blocks are the parent's, unread
                // (unless the parent's chunk is damaged: reading heals it).
                if dirty.as_ref().is_some_and(|d| d.get(i) == Some(&false)) {
                    match prev.get(i).copied().flatten() {
                        None => return Ok(Outcome::Zero),
                        Some(id) if !session.is_damaged(&id) => return Ok(Outcome::Same(id)),
                        Some(_) => {}
                    }
                }
                let block = window.block(i);
                if let Some((None, Some(bytes))) = block {
                    transfer_read
                        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                // Chunk snapshots know each block's id already; clones
                // are hashed here.
                let id = match block {
                    None | Some((None, None)) => return Ok(Outcome::Zero),
                    Some((Some(id), _)) => id,
                    Some((None, Some(bytes))) if is_zero(bytes) => return Ok(Outcome::Zero),
                    Some((None, Some(bytes))) => cfg.chunk_id(bytes),
                };
                if prev.get(i).copied().flatten() == Some(id) && !session.is_damaged(&id) {
                    return Ok(Outcome::Same(id));
                }
                if session.contains(&id)? {
                    return Ok(Outcome::Known(id));
                }
                Ok(Outcome::Needed(id))
            };
            let classes: Vec<Result<Outcome>> = if knows_ids {
                (0..n).map(classify).collect()
            } else {
                // Block by block: a clone's dirty blocks may all sit in a few.
                pool.install(|| {
                    (0..n)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(classify)
                        .collect()
                })
            };
            let previous = ready.take();
            let record = |(i, class): (usize, Result<Outcome>)| match class? {
                Outcome::Needed(id) => new_record(
                    &window,
                    i,
                    id,
                    first + i as u64,
                    block_size,
                    snap,
                    &encoders,
                    &records,
                    adoption,
                ),
                other => Ok(other),
            };
            // An adopted pack's records are indexed where they lie, unread:
            // again too little work for the pool.
            let light = knows_ids && adoption.is_some()
                || !classes.iter().any(|c| matches!(c, Ok(Outcome::Needed(_))));
            let (outcomes, appended) = if light {
                let appended = match previous {
                    Some((outcomes, prev)) => map.append(&mut session, outcomes, &prev),
                    None => Ok(()),
                };
                let outcomes: Vec<_> = classes.into_iter().enumerate().map(record).collect();
                (outcomes, appended)
            } else {
                // The previous window goes to the segment on a thread of
                // its own: its writes wait for the device, and a pool
                // worker waiting there would leave a core idle.
                map.append_beside(&mut session, previous, pool, classes, record)?
            };
            appended?;
            window.finish()?;
            ready = Some((outcomes, prev));
            progress.advance(len as u64);
            throttle.consume(len as u64);
        }
        Ok(())
    })?;
    if let Some((outcomes, prev)) = ready.take() {
        map.append(&mut session, outcomes, &prev)?;
    }
    snapshot.finish()?;
    if let Some(leaf) = builder.flush() {
        let id = store_node(&mut session, &mut node_encoder, &leaf, &mut stats)?;
        builder.leaf_stored(id);
    }
    let root = builder.root(size, cfg.block_size);
    let root_id = store_node(&mut session, &mut node_encoder, &root, &mut stats)?;

    let created = snap_created(snap);
    stats.bytes_read = snap.bytes_read + transfer_read.into_inner();
    stats.stored_bytes = session.appended_bytes();
    stats.duration_ms = started.elapsed().as_millis() as u64 + snap.duration_ms;
    let mut item = existing.clone().unwrap_or_else(|| ItemRecord {
        name: opts.item.clone(),
        source: opts.source_path.clone(),
        created,
        next_seq: 1,
        policy: None,
        protection: Protection::Protected,
        last_slot: None,
        identity: crate::registry::identity_of(&opts.source_path),
        hooks: opts.hooks.clone(),
    });
    let seq = item.next_seq;
    item.next_seq += 1;
    item.source = opts.source_path.clone();
    let point = PointRecord {
        id: snap.meta.point.clone(),
        item: opts.item.clone(),
        seq,
        created,
        image_size: size,
        block_size: cfg.block_size,
        block_map: root_id,
        stats,
        scheduled: terms.scheduled,
        retain_until: terms.retain_until,
        job: terms.job.clone(),
        level: Some(snap.meta.level),
        cbt,
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

/// The hint the transfer of a clone snapshot may use, once checked
/// against the parent point and sampled, with what is recorded of it and
/// the warnings a fallback makes. Chunk snapshots used theirs at capture
/// time: their record is passed on.
fn transfer_hint<'s>(
    snap: &'s Captured,
    previous: Option<&PointRecord>,
    prev_map: Option<&mut BlockMapReader<'_>>,
    snapshot: &SnapshotBlocks,
    cfg: &VaultConfig,
    sampling: &Sampling,
    bytes_read: &std::sync::atomic::AtomicU64,
) -> Result<(Option<&'s Hint>, Option<CbtRecord>, Vec<String>)> {
    let block_size = cfg.block_size;
    let size = snap.header.image_size;
    let bs = u64::from(block_size);
    let blocks = block_count(size, block_size);
    let Some(hint) = snap.transfer_hint.as_ref() else {
        // A clone with nothing to compare with starts the reflink chain.
        let cbt = snap.meta.cbt.clone().or_else(|| {
            snap.meta.clone.as_ref().map(|name| CbtRecord {
                source: "reflink".into(),
                generation: Some(name.clone()),
                fallback: Some("no previous clone snapshot to compare extents with".into()),
                ..CbtRecord::default()
            })
        });
        return Ok((None, cbt, Vec::new()));
    };
    let mut record = hint.record(bs, blocks, None);
    let parent = previous.map(|p| Parent::of(p.image_size, p.cbt.as_ref()));
    let mut why = match (prev_map.as_ref(), snapshot.clone_image()) {
        (None, _) => Some("there is no parent point with this block size".to_string()),
        (_, None) => Some("the snapshot has no clone to read".to_string()),
        _ => hint.check(parent.as_ref(), size),
    };
    if why.is_none()
        && let (Some(map), Some(image)) = (prev_map, snapshot.clone_image())
    {
        let samples = hint.sample(bs, blocks, *sampling, &snap.meta.job);
        record.sampled = samples.len() as u64;
        let mut first = None;
        for &b in &samples {
            let offset = b * bs;
            let len = (size - offset).min(bs) as usize;
            let window = image.part(offset, len)?;
            let data = (!window.is_hole(0..len)).then(|| window.bytes());
            if data.is_some() {
                bytes_read.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let id = data
                .filter(|bytes| !is_zero(bytes))
                .map(|b| cfg.chunk_id(b));
            window.finish()?;
            if map.entries(b, 1)?.first().copied().flatten() != id {
                record.mismatches += 1;
                first.get_or_insert(b);
            }
        }
        if record.mismatches > 0 {
            why = Some(sample_mismatch(
                record.mismatches,
                record.sampled,
                first.unwrap_or_default(),
            ));
        }
    }
    match why {
        None => Ok((Some(hint), Some(record), Vec::new())),
        Some(why) => {
            let warning = fallback_warning(hint.source.name(), &why, record.mismatches > 0);
            record.used = false;
            record.fallback = Some(why);
            // An item's first point has nothing to build on: not a warning.
            let warnings = if previous.is_some() {
                vec![warning]
            } else {
                Vec::new()
            };
            Ok((None, Some(record), warnings))
        }
    }
}

/// The record of a block the vault lacks: copied from the snapshot's pack
/// (CRC checked; decoded only if it is a block-map node), or compressed
/// from the clone's bytes.
#[expect(
    clippy::too_many_arguments,
    reason = "the per-block inputs of one window"
)]
fn new_record(
    window: &SnapWindow<'_>,
    i: usize,
    id: ChunkId,
    block: u64,
    block_size: usize,
    snap: &Captured,
    encoders: &PerThread<RecordEncoder>,
    records: &PerThread<RecordBuf>,
    adoption: Option<Adoption>,
) -> Result<Outcome> {
    if let Some((_, Some(bytes))) = window.block(i) {
        let record =
            encoders
                .get()
                .encode(id, bytes)
                .map_err(|reason| StoreError::CorruptChunk {
                    id,
                    path: snap.manifest.clone(),
                    offset: block * block_size as u64,
                    reason: Box::new(reason),
                })?;
        // A data block whose bytes are a valid block-map node (an image that
        // holds a coffre vault) is the same chunk as that node, so it is
        // counted as one: over-counting its children only delays their
        // reclamation, under-counting could lose them.
        return Ok(Outcome::New(id, record, node_refs(bytes)));
    }
    if let (Some(a), Some(loc)) = (adoption, window.loc(i))
        && loc.pack == a.pack
        && loc.flags & FLAG_NODE == 0
    {
        // A record of this job's own pack, which the capture encoded,
        // wrote and fsynced moments ago, in this process: it stays where
        // it is, unread (the pack bypassed the page cache, so reading it
        // back would cost a disk read per record). The manifest's frames
        // are CRC-checked; `verify` checks each record's header against
        // the index and `verify --read-data` its bytes. A data block's
        // plaintext is the block.
        let plain_len = (snap.header.image_size - block * block_size as u64).min(block_size as u64);
        return Ok(Outcome::Adopted(
            id,
            ChunkLocation {
                segment: a.segment,
                offset: loc.offset,
                len: loc.len,
                plain_len: plain_len as u32,
            },
        ));
    }
    let mut buf = records.get();
    let flags = window.read_record(i, &id, &mut buf)?;
    let refs = if flags & FLAG_NODE != 0 {
        window.decode_record(i, &id, &mut buf)?;
        node_refs(buf.plain())
    } else {
        None
    };
    Ok(Outcome::New(id, buf.take_record(), refs))
}

/// What appending builds: the block map and the point's statistics.
pub(crate) struct MapState<'a> {
    pub(crate) builder: &'a mut BlockMapBuilder,
    pub(crate) node_encoder: &'a mut RecordEncoder,
    pub(crate) stats: &'a mut PointStats,
}

impl MapState<'_> {
    /// Appends `previous` (a window's outcomes and its parent's entries)
    /// on a thread of its own while `encode` runs over `classes` on
    /// `pool`, in block order: the device's writes overlap the cores'
    /// encoding. Returns this window's outcomes and the append's result.
    pub(crate) fn append_beside<C: Send>(
        &mut self,
        session: &mut WriteSession<'_>,
        previous: Option<(Vec<Result<Outcome>>, Vec<Entry>)>,
        pool: &rayon::ThreadPool,
        classes: Vec<C>,
        encode: impl Fn((usize, C)) -> Result<Outcome> + Sync + Send,
    ) -> Result<(Vec<Result<Outcome>>, Result<()>)> {
        std::thread::scope(|s| {
            let writer = std::thread::Builder::new()
                .name("coffre-segment".into())
                .spawn_scoped(s, || match previous {
                    Some((outcomes, prev)) => self.append(session, outcomes, &prev),
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
                    .map(encode)
                    .collect::<Vec<_>>()
            });
            let appended = writer.join().unwrap_or_else(|_| {
                Err(EngineError::Threads(
                    "the segment writer thread panicked".into(),
                ))
            });
            Ok((outcomes, appended))
        })
    }

    /// Appends a window's new records in block order and pushes its entries
    /// into the block map (storing full leaves), then starts the segment's
    /// writeback.
    pub(crate) fn append(
        &mut self,
        session: &mut WriteSession<'_>,
        outcomes: Vec<Result<Outcome>>,
        prev: &[Entry],
    ) -> Result<()> {
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let entry = match outcome? {
                Outcome::Zero => None,
                Outcome::Same(id) | Outcome::Known(id) | Outcome::Needed(id) => Some(id),
                Outcome::Adopted(id, at) => {
                    if !session.is_pending(&id) {
                        self.stats.new_chunks += 1;
                    }
                    session.adopt(id, at)?;
                    Some(id)
                }
                Outcome::New(id, record, node) => {
                    if !session.is_pending(&id) {
                        self.stats.new_chunks += 1;
                    }
                    match node {
                        Some((kind, kids)) => session.append_node(id, &record, kind, kids)?,
                        None => session.append(id, &record)?,
                    }
                    Some(id)
                }
            };
            if entry.is_none() {
                self.stats.blocks_zero += 1;
            }
            if entry != prev.get(i).copied().flatten() {
                self.stats.blocks_changed += 1;
            }
            if let Some(leaf) = self.builder.push(entry) {
                let id = store_node(session, self.node_encoder, &leaf, self.stats)?;
                self.builder.leaf_stored(id);
            }
        }
        session.start_writeback()?;
        Ok(())
    }
}

/// The capture instant of a snapshot.
pub fn snap_created(snap: &Captured) -> Timestamp {
    Timestamp::new(snap.header.created_s, snap.header.created_ns as i32)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

pub(crate) fn store_node(
    session: &mut WriteSession<'_>,
    encoder: &mut RecordEncoder,
    node: &[u8],
    stats: &mut PointStats,
) -> Result<ChunkId> {
    let id = encoder.chunk_id(node);
    if !session.contains(&id)? {
        let record = encoder
            .encode(id, node)
            .map_err(|reason| StoreError::CorruptChunk {
                id,
                path: PathBuf::from("<block map>"),
                offset: 0,
                reason: Box::new(reason),
            })?;
        let (kind, children) = node_refs(node).ok_or_else(|| EngineError::DamagedBlockMap {
            item: String::new(),
            point: String::new(),
            reason: "a node just built does not decode".into(),
        })?;
        session.append_node(id, &record, kind, children)?;
        stats.new_chunks += 1;
    }
    Ok(id)
}

/// A short, unique, stable point id: 12 hex digits, fixed when the
/// snapshot is taken (the job id is unique), so a point keeps its id from
/// the snapshot tier to the vault.
pub fn point_id(vault_id: &str, item: &str, job: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(vault_id.as_bytes());
    h.update(&[0]);
    h.update(item.as_bytes());
    h.update(&[0]);
    h.update(job.as_bytes());
    let mut s = h.finalize().to_hex().to_string();
    s.truncate(12);
    s
}
