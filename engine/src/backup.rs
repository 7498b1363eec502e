//! The transfer phase of a backup: snapshot → new chunks → point.
//!
//! The snapshot file (see [`crate::snapshot`]) is read in block order,
//! window by window. A block whose id equals the previous point's entry
//! costs nothing; one the vault already holds is only referenced; only the
//! rest is read from the image, checked against the snapshot's id (the
//! image must not have changed since the snapshot), compressed in
//! parallel and appended. The block map is built as it goes. Finally the
//! point, the item and the reference counts are committed with the last
//! chunk locations in one synced index batch (the write order is in
//! `coffre_vault_store::vault`).
//!
//! The previous point is read *here*, under the writer lock, never taken
//! from the snapshot phase: a prune and a GC may run between the two
//! phases and remove it, and the transfer must rely only on what the vault
//! holds at that moment.

use std::path::PathBuf;
use std::time::Instant;

use coffre_vault_store::catalog::validate_item_name;
use coffre_vault_store::snapfile::SnapReader;
use coffre_vault_store::{
    ChunkId, ChunkKind, IndexBatch, ItemRecord, PointRecord, PointStats, Protection, RecordEncoder,
    StoreError, Vault, WriteSession,
};
use jiff::Timestamp;
use rayon::prelude::*;

use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::progress::{NoProgress, Progress};
use crate::reader::BlockMapReader;
use crate::snapshot::{CaptureOptions, Snapshot, WINDOW_BYTES, capture};
use crate::source::ImageSource;
use crate::throttle::Throttle;
use coffre_vault_store::blockmap::{BlockMapBuilder, Entry, block_count};
use coffre_vault_store::refs::node_refs;

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
}

/// Builds a rayon pool of `threads` workers (0 = one per core).
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("coffre-worker-{i}"))
        .build()
        .map_err(|e| EngineError::Threads(e.to_string()))
}

enum Outcome {
    Zero,
    Same(ChunkId),
    Known(ChunkId),
    /// A new chunk, with its node kind and children if its bytes are a
    /// block-map node.
    New(ChunkId, Vec<u8>, Option<(ChunkKind, Vec<ChunkId>)>),
}

/// Both phases at once, without a job record: captures a snapshot into
/// the vault's snapshot folder and transfers it (benchmarks, tests).
pub fn backup(
    vault: &Vault,
    source: &dyn ImageSource,
    opts: &BackupOptions,
    clock: &dyn Clock,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    validate_item_name(&opts.item).map_err(EngineError::InvalidItemName)?;
    let pool = thread_pool(opts.threads)?;
    let path = crate::protection::snapshot_dir(vault.dir(), &opts.item).join("direct.snap");
    let snap = capture(
        source,
        &CaptureOptions {
            block_size: vault.config().block_size,
            path: &path,
            created: clock.now(),
            pool: &pool,
            rate_limit: opts.rate_limit,
            cancelled: &|| false,
            job: "direct",
        },
        &NoProgress,
    )?;
    let out = transfer(
        vault,
        source,
        &snap,
        opts,
        &PointTerms::default(),
        &pool,
        progress,
        &|| false,
    );
    let _ = std::fs::remove_file(&path);
    out
}

/// Stores what snapshot `snap` captured of `source` as a new point of
/// `opts.item`. `stop` is polled between windows (shutdown).
#[expect(clippy::too_many_arguments, reason = "one call site per phase runner")]
pub fn transfer(
    vault: &Vault,
    source: &dyn ImageSource,
    snap: &Snapshot,
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
    let size = snap.image_size;
    if snap.block_size != cfg.block_size || size != source.size() {
        return Err(EngineError::SourceChanged {
            path: source.path().to_path_buf(),
            reason: format!(
                "the image is {} bytes now, the snapshot saw {size}",
                source.size()
            ),
        });
    }
    let blocks = block_count(size, cfg.block_size);
    let mut snap_reader = SnapReader::open(&snap.path)?;

    let existing = vault.item(&opts.item)?;
    let previous = vault.points(&opts.item)?.pop();
    let mut prev_map = match &previous {
        Some(p) if p.block_size == cfg.block_size => Some(BlockMapReader::open(vault, p)?),
        _ => None,
    };

    let encoders = PerThread::new(pool, || RecordEncoder::new(cfg.compression_level));
    let mut node_encoder = RecordEncoder::new(cfg.compression_level);
    let mut session = vault.begin_write()?;
    let mut builder = BlockMapBuilder::new();
    let mut stats = PointStats {
        blocks_total: blocks,
        ..PointStats::default()
    };
    let mut throttle = Throttle::new(opts.rate_limit);
    progress.start(size);

    let window_blocks = (WINDOW_BYTES / block_size).max(1);
    let mut first = 0u64;
    while first < blocks {
        if stop() {
            return Err(EngineError::Abandoned);
        }
        let n = window_blocks.min((blocks - first) as usize);
        let offset = first * block_size as u64;
        let len = (size - offset).min((n * block_size) as u64) as usize;
        let wanted = snap_reader.next_entries(n)?;
        if wanted.len() != n {
            return Err(StoreError::CorruptFile {
                path: snap.path.clone(),
                what: "snapshot file",
                reason: format!("{} entries where {n} were expected", wanted.len()),
            }
            .into());
        }
        let prev: Vec<Entry> = match prev_map.as_mut() {
            Some(m) => m.entries(first, n)?,
            None => vec![None; n],
        };
        let window = source.window(offset, len)?;
        let outcomes: Vec<Result<Outcome>> = pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let Some(id) = wanted.get(i).copied().flatten() else {
                        return Ok(Outcome::Zero);
                    };
                    if prev.get(i).copied().flatten() == Some(id) {
                        return Ok(Outcome::Same(id));
                    }
                    if session.contains(&id)? {
                        return Ok(Outcome::Known(id));
                    }
                    let start = i * block_size;
                    let end = (start + block_size).min(len);
                    let bytes = window.bytes().get(start..end).unwrap_or_default();
                    let block = first + i as u64;
                    if ChunkId::of(bytes) != id {
                        return Err(EngineError::SourceChanged {
                            path: source.path().to_path_buf(),
                            reason: format!("block {block} changed since the snapshot"),
                        });
                    }
                    let record = encoders.get().encode(id, bytes).map_err(|reason| {
                        StoreError::CorruptChunk {
                            id,
                            path: source.path().to_path_buf(),
                            offset: block * block_size as u64,
                            reason: Box::new(reason),
                        }
                    })?;
                    // A data block whose bytes are a valid block-map node
                    // (an image that holds a coffre vault) is the same chunk
                    // as that node, so it is counted as one: over-counting
                    // its children only delays their reclamation,
                    // under-counting could lose them.
                    Ok(Outcome::New(id, record, node_refs(bytes)))
                })
                .collect()
        });
        let new_bytes: u64 = outcomes
            .iter()
            .filter_map(|o| match o {
                Ok(Outcome::New(..)) => Some(block_size as u64),
                _ => None,
            })
            .sum();
        stats.bytes_read += new_bytes;
        window.finish()?;
        source.check_unchanged()?;

        for (i, outcome) in outcomes.into_iter().enumerate() {
            let entry = match outcome? {
                Outcome::Zero => None,
                Outcome::Same(id) | Outcome::Known(id) => Some(id),
                Outcome::New(id, record, node) => {
                    if !session.is_pending(&id) {
                        stats.new_chunks += 1;
                    }
                    match node {
                        Some((kind, kids)) => session.append_node(id, &record, kind, kids)?,
                        None => session.append(id, &record)?,
                    }
                    Some(id)
                }
            };
            if entry.is_none() {
                stats.blocks_zero += 1;
            }
            if entry != prev.get(i).copied().flatten() {
                stats.blocks_changed += 1;
            }
            if let Some(leaf) = builder.push(entry) {
                let id = store_node(&mut session, &mut node_encoder, &leaf, &mut stats)?;
                builder.leaf_stored(id);
            }
        }
        progress.advance(len as u64);
        throttle.consume(new_bytes);
        first += n as u64;
    }
    snap_reader.finish()?;
    if let Some(leaf) = builder.flush() {
        let id = store_node(&mut session, &mut node_encoder, &leaf, &mut stats)?;
        builder.leaf_stored(id);
    }
    let root = builder.root(size, cfg.block_size);
    let root_id = store_node(&mut session, &mut node_encoder, &root, &mut stats)?;
    source.check_unchanged()?;

    stats.bytes_read = snap.bytes_read;
    stats.stored_bytes = session.appended_bytes();
    stats.duration_ms = started.elapsed().as_millis() as u64 + snap.duration_ms;
    let mut item = existing.clone().unwrap_or_else(|| ItemRecord {
        name: opts.item.clone(),
        source: opts.source_path.clone(),
        created: snap.created,
        next_seq: 1,
        policy: None,
        protection: Protection::Protected,
        last_slot: None,
        identity: crate::registry::identity_of(&opts.source_path),
    });
    let seq = item.next_seq;
    item.next_seq += 1;
    item.source = opts.source_path.clone();
    let point = PointRecord {
        id: point_id(&cfg.vault_id, &opts.item, seq, &root_id),
        item: opts.item.clone(),
        seq,
        created: snap.created,
        image_size: size,
        block_size: cfg.block_size,
        block_map: root_id,
        stats,
        scheduled: terms.scheduled,
        retain_until: terms.retain_until,
        job: terms.job.clone(),
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
    })
}

fn store_node(
    session: &mut WriteSession<'_>,
    encoder: &mut RecordEncoder,
    node: &[u8],
    stats: &mut PointStats,
) -> Result<ChunkId> {
    let id = ChunkId::of(node);
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

/// A short, unique, stable point id: 12 hex digits.
fn point_id(vault_id: &str, item: &str, seq: u64, root: &ChunkId) -> String {
    let mut h = blake3::Hasher::new();
    h.update(vault_id.as_bytes());
    h.update(&[0]);
    h.update(item.as_bytes());
    h.update(&[0]);
    h.update(&seq.to_le_bytes());
    h.update(root.as_bytes());
    let mut s = h.finalize().to_hex().to_string();
    s.truncate(12);
    s
}
