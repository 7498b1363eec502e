//! The snapshot phase of a backup: captures the point in time.
//!
//! Until the snapshotter tier exists this is the minimal honest capture:
//! one pass over the image that fixes the BLAKE3 id of every block (zero
//! for holes and all-zero blocks) in a snapshot file. The transfer phase
//! then stores exactly these blocks, re-reading only those the vault lacks
//! and checking each against its id, so a point is always the image as the
//! snapshot saw it, or nothing. A reflink or block-delta snapshotter will
//! replace [`capture`] behind the same [`Snapshot`] result.

use std::path::{Path, PathBuf};
use std::time::Instant;

use coffre_vault_store::ChunkId;
use coffre_vault_store::blockmap::block_count;
use coffre_vault_store::snapfile::{SnapHeader, SnapWriter};
use jiff::Timestamp;
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::progress::Progress;
use crate::source::ImageSource;
use crate::throttle::Throttle;

/// Bytes mapped at a time (rounded to whole blocks).
pub const WINDOW_BYTES: usize = 32 << 20;

/// What the snapshot phase produced.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The snapshot file.
    pub path: PathBuf,
    /// When the point in time was captured.
    pub created: Timestamp,
    /// Image size.
    pub image_size: u64,
    /// Block size of the entries.
    pub block_size: u32,
    /// Bytes read (holes are not read).
    pub bytes_read: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// True when every byte is zero (a 64-byte OR-fold vectorises well).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// Everything [`capture`] needs besides the image.
pub struct CaptureOptions<'a> {
    /// Block size.
    pub block_size: u32,
    /// Snapshot file to write.
    pub path: &'a Path,
    /// The capture instant.
    pub created: Timestamp,
    /// Worker pool.
    pub pool: &'a rayon::ThreadPool,
    /// Read rate limit.
    pub rate_limit: Option<u64>,
    /// Polled between windows; `true` cancels.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Job id, for the cancellation error.
    pub job: &'a str,
}

/// Hashes every block of `source` into a snapshot file.
pub fn capture(
    source: &dyn ImageSource,
    opts: &CaptureOptions<'_>,
    progress: &dyn Progress,
) -> Result<Snapshot> {
    let started = Instant::now();
    let block_size = opts.block_size as usize;
    let size = source.size();
    let blocks = block_count(size, opts.block_size);
    let mut out = SnapWriter::create(
        opts.path,
        SnapHeader {
            block_size: opts.block_size,
            image_size: size,
            blocks,
            created: opts.created.as_second(),
        },
    )?;
    let mut throttle = Throttle::new(opts.rate_limit);
    let mut bytes_read = 0;
    progress.start(size);
    let window_blocks = (WINDOW_BYTES / block_size).max(1);
    let mut first = 0u64;
    while first < blocks {
        if (opts.cancelled)() {
            return Err(EngineError::Cancelled {
                id: opts.job.into(),
            });
        }
        let n = window_blocks.min((blocks - first) as usize);
        let offset = first * block_size as u64;
        let len = (size - offset).min((n * block_size) as u64) as usize;
        let window = source.window(offset, len)?;
        let ids: Vec<Option<ChunkId>> = opts.pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let start = i * block_size;
                    let end = (start + block_size).min(len);
                    if window.is_hole(start..end) {
                        return None;
                    }
                    let bytes = window.bytes().get(start..end).unwrap_or_default();
                    (!is_zero(bytes)).then(|| ChunkId::of(bytes))
                })
                .collect()
        });
        bytes_read += window.data_len();
        window.finish()?;
        source.check_unchanged()?;
        for id in ids {
            out.push(id)?;
        }
        progress.advance(len as u64);
        throttle.consume(len as u64);
        first += n as u64;
    }
    let path = out.finish()?;
    progress.finish();
    Ok(Snapshot {
        path,
        created: opts.created,
        image_size: size,
        block_size: opts.block_size,
        bytes_read,
        duration_ms: started.elapsed().as_millis() as u64,
    })
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
