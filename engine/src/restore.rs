//! Restore: a recovery point → a sparse, byte-identical image file.
//!
//! The image is written to a temporary file beside the target, sized first
//! (so zero blocks stay holes), filled leaf by leaf with blocks read and
//! checked in parallel (crc32, length, BLAKE3), fsynced, and only then
//! renamed over the target. A failed restore leaves no partial file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use coffre_vault_store::durable::fsync_dir;
use coffre_vault_store::{ChunkBuf, ChunkId, PointRecord, StoreError, Vault};
use rayon::prelude::*;

use crate::backup::thread_pool;
use crate::error::{EngineError, Result};
use crate::per_thread::PerThread;
use crate::progress::Progress;
use crate::reader::BlockMapReader;

/// Restore options.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where to write the image.
    pub target: PathBuf,
    /// Replace an existing file.
    pub force: bool,
    /// Worker threads (0 = all cores).
    pub threads: usize,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    /// Bytes of data written (holes excluded).
    pub bytes_written: u64,
    /// Image size.
    pub image_size: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn unwritable(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::TargetUnwritable {
        path: path.to_path_buf(),
        source,
    }
}

/// Restores `point` to `opts.target`.
pub fn restore(
    vault: &Vault,
    point: &PointRecord,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let target = &opts.target;
    if target.is_dir() {
        return Err(unwritable(
            target,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    if target.exists() && !opts.force {
        return Err(EngineError::TargetExists {
            path: target.clone(),
        });
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let mut tmp = TempFile {
        path: dir.join(format!(".{name}.coffre-partial-{}", std::process::id())),
        keep: false,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp.path)
        .map_err(|e| unwritable(&tmp.path, e))?;
    file.set_len(point.image_size)
        .map_err(|e| unwritable(&tmp.path, e))?;

    let mut map = BlockMapReader::open(vault, point)?;
    let pool = thread_pool(opts.threads)?;
    let buffers = PerThread::new(&pool, ChunkBuf::default);
    let bs = u64::from(point.block_size);
    progress.start(point.image_size);
    let mut written = 0u64;
    for k in 0..map.leaf_count() {
        let entries = map.leaf(k)?.to_vec();
        let first = (k * coffre_vault_store::blockmap::LEAF_ENTRIES) as u64;
        let sizes: Result<Vec<u64>> = pool.install(|| {
            entries
                .par_iter()
                .enumerate()
                .map(|(i, entry)| {
                    let Some(id) = entry else { return Ok(0) };
                    let block = Block {
                        index: first + i as u64,
                        size: bs,
                        id: *id,
                    };
                    write_block(vault, point, &file, &tmp.path, &block, &mut buffers.get())
                })
                .collect()
        });
        let sizes = sizes?;
        written += sizes.iter().sum::<u64>();
        let span = (entries.len() as u64 * bs).min(point.image_size.saturating_sub(first * bs));
        start_writeback(&file, first * bs, span);
        progress.advance(span);
    }
    file.sync_all().map_err(|e| unwritable(&tmp.path, e))?;
    drop(file);
    std::fs::rename(&tmp.path, target).map_err(|e| unwritable(target, e))?;
    tmp.keep = true;
    fsync_dir(&dir)?;
    progress.finish();
    Ok(RestoreSummary {
        bytes_written: written,
        image_size: point.image_size,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Starts writing a finished range back to disk without waiting, so the
/// final fsync overlaps with the rest of the restore instead of following it.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a descriptor we own; it only schedules I/O.
    // Failure is harmless: the fsync at the end covers everything.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// One block to restore.
struct Block {
    index: u64,
    size: u64,
    id: ChunkId,
}

fn write_block(
    vault: &Vault,
    point: &PointRecord,
    file: &File,
    path: &Path,
    block: &Block,
    buf: &mut ChunkBuf,
) -> Result<u64> {
    let offset = block.index * block.size;
    let expected = block.size.min(point.image_size - offset);
    let damaged = |source| EngineError::DamagedBlock {
        item: point.item.clone(),
        point: point.id.clone(),
        block: block.index,
        chunk: block.id,
        source: Box::new(source),
    };
    let loc = vault
        .index()
        .chunk(&block.id)
        .map_err(damaged)?
        .ok_or_else(|| damaged(StoreError::ChunkMissing { id: block.id }))?;
    vault
        .read_chunk_into(&block.id, &loc, buf)
        .map_err(damaged)?;
    let data = buf.plain();
    if data.len() as u64 != expected {
        return Err(EngineError::DamagedBlockMap {
            item: point.item.clone(),
            point: point.id.clone(),
            reason: format!(
                "block {} maps to chunk {} of {} bytes, expected {expected}",
                block.index,
                block.id,
                data.len()
            ),
        });
    }
    file.write_all_at(data, offset)
        .map_err(|e| unwritable(path, e))?;
    Ok(expected)
}
