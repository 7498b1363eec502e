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

use coffre_vault_store::blockmap::Entry;
use coffre_vault_store::durable::fsync_dir;
use coffre_vault_store::{ChunkBuf, PointRecord, StoreError, Vault};
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
    let group_blocks = (GROUP_BYTES / bs).max(1) as usize;
    let out = Output {
        file: &file,
        path: &tmp.path,
        image_size: point.image_size,
        block_size: bs,
    };
    progress.start(point.image_size);
    let mut written = 0u64;
    // Double buffering: while one group of decoded blocks is written by a
    // single thread (parallel writers to one file only contend on its
    // inode lock), the next group is read and decoded by the others.
    let mut ready: Option<Group> = None;
    let mut spare: Vec<u8> = Vec::new();
    for k in 0..map.leaf_count() {
        let leaf = map.leaf(k)?.to_vec();
        let leaf_first = (k * coffre_vault_store::blockmap::LEAF_ENTRIES) as u64;
        for (g, entries) in leaf.chunks(group_blocks).enumerate() {
            let mut group = Group {
                first: leaf_first + (g * group_blocks) as u64,
                entries: entries.to_vec(),
                data: std::mem::take(&mut spare),
            };
            let previous = ready.take();
            let (decoded, wrote) = pool.install(|| {
                rayon::join(
                    || decode_group(vault, point, &mut group, bs, &buffers),
                    || previous.map(|p| out.write(p)).transpose(),
                )
            });
            decoded?;
            if let Some((bytes, span, data)) = wrote? {
                written += bytes;
                progress.advance(span);
                spare = data;
            }
            ready = Some(group);
        }
    }
    if let Some(last) = ready.take() {
        let (bytes, span, _) = out.write(last)?;
        written += bytes;
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
    sync_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE);
}

/// Waits until `offset..offset+len` is on disk and drops it from the page
/// cache. Best effort: failure only costs memory.
fn release_written(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    sync_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    );
    // SAFETY: an advisory system call on a descriptor we own.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// `sync_file_range` with `flags`. Failure is harmless: the fsync at the
/// end of the restore covers everything.
fn sync_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a descriptor we own; it only schedules or
    // waits for I/O.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            flags,
        );
    }
}

/// Bytes of decoded blocks held per group (two groups are in flight).
const GROUP_BYTES: u64 = 16 << 20;

/// Consecutive blocks, decoded into one buffer (`block_size` bytes each).
struct Group {
    first: u64,
    entries: Vec<Entry>,
    data: Vec<u8>,
}

/// Reads, checks and decodes a group's blocks in parallel into its buffer.
fn decode_group(
    vault: &Vault,
    point: &PointRecord,
    group: &mut Group,
    bs: u64,
    buffers: &PerThread<ChunkBuf>,
) -> Result<()> {
    let need = group.entries.len() * bs as usize;
    if group.data.len() < need {
        group.data.resize(need, 0);
    }
    let first = group.first;
    group
        .data
        .par_chunks_mut(bs as usize)
        .zip(group.entries.par_iter())
        .enumerate()
        .try_for_each(|(i, (slot, entry))| {
            let Some(id) = entry else { return Ok(()) };
            let index = first + i as u64;
            let damaged = |source| EngineError::DamagedBlock {
                item: point.item.clone(),
                point: point.id.clone(),
                block: index,
                chunk: *id,
                source: Box::new(source),
            };
            let loc = vault
                .index()
                .chunk(id)
                .map_err(damaged)?
                .ok_or_else(|| damaged(StoreError::ChunkMissing { id: *id }))?;
            let mut buf = buffers.get();
            vault.read_chunk_into(id, &loc, &mut buf).map_err(damaged)?;
            let data = buf.plain();
            let expected = bs.min(point.image_size - index * bs) as usize;
            match slot.get_mut(..data.len()) {
                Some(dst) if data.len() == expected => {
                    dst.copy_from_slice(data);
                    Ok(())
                }
                _ => Err(EngineError::DamagedBlockMap {
                    item: point.item.clone(),
                    point: point.id.clone(),
                    reason: format!(
                        "block {index} maps to chunk {id} of {} bytes, expected {expected}",
                        data.len()
                    ),
                }),
            }
        })
}

/// The file being restored.
struct Output<'a> {
    file: &'a File,
    path: &'a Path,
    image_size: u64,
    block_size: u64,
}

impl Output<'_> {
    /// Writes a decoded group, one write per run of non-zero blocks (zero
    /// blocks stay holes), and starts its writeback. Returns the data bytes
    /// written, the image span covered and the buffer for reuse.
    fn write(&self, group: Group) -> Result<(u64, u64, Vec<u8>)> {
        let bs = self.block_size;
        let start = group.first * bs;
        let end = ((group.first + group.entries.len() as u64) * bs).min(self.image_size);
        let mut written = 0;
        let mut i = 0;
        while i < group.entries.len() {
            if group.entries.get(i).is_some_and(Option::is_none) {
                i += 1;
                continue;
            }
            let run_start = i;
            while group.entries.get(i).is_some_and(Option::is_some) {
                i += 1;
            }
            let from = start + run_start as u64 * bs;
            let to = (start + i as u64 * bs).min(end);
            let bytes = group
                .data
                .get((from - start) as usize..(to - start) as usize)
                .unwrap_or_default();
            self.file
                .write_all_at(bytes, from)
                .map_err(|e| unwritable(self.path, e))?;
            written += to - from;
        }
        start_writeback(self.file, start, end - start);
        // Let the page cache of a range written two groups ago go once it is
        // on disk: a restore then streams through a few groups' worth of
        // cache instead of forcing the kernel to reclaim other pages.
        let behind = 2 * GROUP_BYTES;
        if start >= behind {
            release_written(self.file, start - behind, GROUP_BYTES);
        }
        Ok((written, end - start, group.data))
    }
}
