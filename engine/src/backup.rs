//! The backup pipeline: image → blocks → hashes → new chunks → point.
//!
//! The image is read window by window. In each window the blocks are
//! hashed in parallel (BLAKE3), compared with the previous point's block
//! map, looked up in the vault's index, and only chunks the vault does not
//! hold are compressed (in parallel) and appended. The block map is built
//! as it goes and stored as leaves plus a root. Finally the point and the
//! item are committed with the last chunk locations in one synced index
//! batch (the write order is in `coffre_vault_store::vault`).

use std::path::PathBuf;
use std::time::Instant;

use coffre_vault_store::catalog::validate_item_name;
use coffre_vault_store::{
    ChunkId, IndexBatch, ItemRecord, PointRecord, PointStats, RecordEncoder, StoreError, Vault,
    WriteSession,
};
use rayon::prelude::*;

use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::progress::Progress;
use crate::reader::BlockMapReader;
use crate::source::ImageSource;
use crate::throttle::Throttle;
use coffre_vault_store::blockmap::{BlockMapBuilder, Entry, block_count};

/// Bytes mapped at a time (rounded to whole blocks).
pub const WINDOW_BYTES: usize = 32 << 20;

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
    New(ChunkId, Vec<u8>),
}

/// True when every byte is zero (a 64-byte OR-fold vectorises well).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// Backs `source` up into `vault` as a new point of `opts.item`.
pub fn backup(
    vault: &Vault,
    source: &dyn ImageSource,
    opts: &BackupOptions,
    clock: &dyn Clock,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    validate_item_name(&opts.item).map_err(EngineError::InvalidItemName)?;
    let started = Instant::now();
    let created = clock.now();
    let cfg = vault.config().clone();
    let block_size = cfg.block_size as usize;
    let size = source.size();
    let blocks = block_count(size, cfg.block_size);

    let existing = vault.item(&opts.item)?;
    let previous = vault.points(&opts.item)?.pop();
    let mut prev_map = match &previous {
        Some(p) if p.block_size == cfg.block_size => Some(BlockMapReader::open(vault, p)?),
        _ => None,
    };

    let pool = thread_pool(opts.threads)?;
    let encoders = PerThread::new(&pool, || RecordEncoder::new(cfg.compression_level));
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
        let n = window_blocks.min((blocks - first) as usize);
        let offset = first * block_size as u64;
        let len = (size - offset).min((n * block_size) as u64) as usize;
        let window = source.window(offset, len)?;
        let prev: Vec<Entry> = match prev_map.as_mut() {
            Some(m) => m.entries(first, n)?,
            None => vec![None; n],
        };
        let outcomes: Vec<Result<Outcome>> = pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let start = i * block_size;
                    let end = (start + block_size).min(len);
                    if window.is_hole(start..end) {
                        return Ok(Outcome::Zero);
                    }
                    let bytes = window.bytes().get(start..end).unwrap_or_default();
                    if is_zero(bytes) {
                        return Ok(Outcome::Zero);
                    }
                    let id = ChunkId::of(bytes);
                    if prev.get(i).copied().flatten() == Some(id) {
                        return Ok(Outcome::Same(id));
                    }
                    if session.contains(&id)? {
                        return Ok(Outcome::Known(id));
                    }
                    let record = encoders.get().encode(id, bytes).map_err(|reason| {
                        StoreError::CorruptChunk {
                            id,
                            path: source.path().to_path_buf(),
                            offset: (first + i as u64) * block_size as u64,
                            reason: Box::new(reason),
                        }
                    })?;
                    Ok(Outcome::New(id, record))
                })
                .collect()
        });
        stats.bytes_read += window.data_len();
        // Every byte was used: a truncation during the reads shows now.
        window.finish()?;
        source.check_unchanged()?;

        for (i, outcome) in outcomes.into_iter().enumerate() {
            let entry = match outcome? {
                Outcome::Zero => None,
                Outcome::Same(id) | Outcome::Known(id) => Some(id),
                Outcome::New(id, record) => {
                    if !session.is_pending(&id) {
                        stats.new_chunks += 1;
                    }
                    session.append(id, &record)?;
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
        throttle.consume(len as u64);
        first += n as u64;
    }
    if let Some(leaf) = builder.flush() {
        let id = store_node(&mut session, &mut node_encoder, &leaf, &mut stats)?;
        builder.leaf_stored(id);
    }
    let root = builder.root(size, cfg.block_size);
    let root_id = store_node(&mut session, &mut node_encoder, &root, &mut stats)?;
    source.check_unchanged()?;

    stats.stored_bytes = session.appended_bytes();
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let mut item = existing.clone().unwrap_or_else(|| ItemRecord {
        name: opts.item.clone(),
        source: opts.source_path.clone(),
        created,
        next_seq: 1,
    });
    let seq = item.next_seq;
    item.next_seq += 1;
    item.source = opts.source_path.clone();
    let point = PointRecord {
        id: point_id(&cfg.vault_id, &opts.item, seq, &root_id),
        item: opts.item.clone(),
        seq,
        created,
        image_size: size,
        block_size: cfg.block_size,
        block_map: root_id,
        stats,
    };
    let mut batch = IndexBatch::default();
    batch.put_item(item);
    batch.put_point(point.clone());
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
        session.append(id, &record)?;
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

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[]));
        let mut b = vec![0u8; 65537];
        b[65536] = 1;
        assert!(!is_zero(&b));
        b[65536] = 0;
        b[7] = 1;
        assert!(!is_zero(&b));
    }
}
