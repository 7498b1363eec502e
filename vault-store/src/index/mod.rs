//! The RocksDB index of a vault (`VAULT/index/`): where every chunk lives,
//! how much of each segment is committed, and the catalog of items and
//! points. One RocksDB per vault; every change goes through one synced
//! [`IndexBatch`] so that a crash leaves all of it or none of it.
//!
//! Column families (keys and values are specified in `FORMAT.md`, "Index"):
//! - `chunks`: chunk id (32 bytes) → [`ChunkLocation`];
//! - `segments`: segment id (u64, big-endian for ordering) → [`SegmentInfo`];
//! - `items`: item name → [`ItemRecord`];
//! - `points`: item name, NUL, sequence (u64 big-endian) → [`PointRecord`];
//! - `policies`: policy name → policy JSON (the engine owns its shape);
//! - `refs`: chunk id → [`RefEntry`] (kind and reference count);
//! - `unref`: chunk id → empty: the chunks whose count is 0, GC's work list;
//! - `segchunks`: segment id, offset (both big-endian) → chunk id, so a
//!   segment's live chunks are found without scanning the whole index;
//! - `dead`: segment id, offset → record length: ranges GC has unindexed
//!   but not yet given back to the filesystem;
//! - `meta`: small named values (index layout version).
//!
//! Here: opening the index and its low-level access; changes and their
//! commit in `batch`, reads of chunks and segments in `chunks`, reads of
//! the catalog in `catalog`, key layouts in `keys`.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

mod batch;
mod catalog;
mod chunks;
mod keys;
pub mod refs;
pub mod state;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests;

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, DB, FlushOptions, IteratorMode, Options};

use crate::error::{Result, StoreError};
pub use crate::format::index_values::{ChunkKind, ChunkLocation, RefEntry, SegmentInfo};
pub use batch::IndexBatch;

/// Folder of the index inside a vault.
pub const INDEX_DIR: &str = "index";
const CF_CHUNKS: &str = "chunks";
const CF_SEGMENTS: &str = "segments";
const CF_ITEMS: &str = "items";
const CF_POINTS: &str = "points";
const ALL_CFS: [&str; 10] = [
    CF_CHUNKS,
    CF_SEGMENTS,
    CF_ITEMS,
    CF_POINTS,
    "policies",
    "refs",
    "unref",
    "segchunks",
    "dead",
    "meta",
];
/// `meta` key of the layout version of the GC column families.
const META_GC_LAYOUT: &[u8] = b"gc-layout";
/// Prefix of the `meta` keys of pruned points.
const META_PRUNED: &[u8] = b"pruned\0";
/// Current layout of `refs`/`unref`/`segchunks`/`dead`.
pub const GC_LAYOUT_VERSION: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cf {
    Chunks,
    Segments,
    Items,
    Points,
    Policies,
    Refs,
    Unref,
    SegChunks,
    Dead,
    Meta,
}

impl Cf {
    fn name(self) -> &'static str {
        ALL_CFS.get(self as usize).copied().unwrap_or("?")
    }
}

/// An open index.
pub struct Index {
    db: DB,
    path: PathBuf,
}

impl Index {
    fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Index {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: &'static str, reason: impl Into<String>) -> StoreError {
        StoreError::CorruptIndex {
            path: self.path.clone(),
            what,
            reason: reason.into(),
        }
    }

    fn options() -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // RocksDB's info log is for RocksDB's developers; ours goes through
        // tracing. Warnings and errors only, one file.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_keep_log_file_num(1);
        opts.set_max_log_file_size(1 << 20);
        opts.set_write_buffer_size(16 << 20);
        opts.increase_parallelism(2);
        // RocksDB opens table files with 16 threads per column family by
        // default: a hundred and more thread starts on every open, for a
        // handful of small files.
        opts.set_max_file_opening_threads(1);
        opts
    }

    /// Opens (creating if needed) the index at `path` for writing. The
    /// caller must hold the vault's writer lock.
    pub fn open_write(path: &Path) -> Result<Self> {
        let cfs = ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let db = DB::open_cf_descriptors(&Self::options(), path, cfs).map_err(|source| {
            StoreError::Index {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Index {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Opens the index read-only; works while a writer is active and sees
    /// the state committed when it was opened. Column families an older
    /// vault lacks read as empty.
    pub fn open_read(path: &Path) -> Result<Self> {
        // A read-only open lists the live files, then opens them: a writer
        // in another process may switch its WAL or compact in between, and
        // the open then fails on a file that just went. That is transient:
        // try again on a fresh listing.
        let mut attempt = 0;
        loop {
            match Self::open_read_once(path) {
                Err(StoreError::Index { source, .. })
                    if attempt < 20
                        && source.kind() == rocksdb::ErrorKind::IOError
                        && source.to_string().contains("No such file") =>
                {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open_read_once(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(false);
        opts.set_max_file_opening_threads(1);
        let existing = DB::list_cf(&opts, path).map_err(|source| StoreError::Index {
            path: path.to_path_buf(),
            source,
        })?;
        let cfs: Vec<&str> = ALL_CFS
            .iter()
            .copied()
            .filter(|n| existing.iter().any(|e| e == n))
            .collect();
        let db = DB::open_cf_for_read_only(&opts, path, cfs, false).map_err(|source| {
            StoreError::Index {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Index {
            db,
            path: path.to_path_buf(),
        })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| self.corrupt("column family", format!("{} is missing", cf.name())))
    }

    /// [`Index::scan_from`] the first key with `prefix`.
    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        self.scan_from(cf, prefix, prefix, f)
    }

    /// Iterates a column family from key `from` (or the start) while keys
    /// start with `prefix`, until `f` returns false; a missing family
    /// (older vault, read-only) is empty.
    fn scan_from(
        &self,
        cf: Cf,
        from: &[u8],
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let Some(handle) = self.db.cf_handle(cf.name()) else {
            return Ok(());
        };
        let mode = if from.is_empty() {
            IteratorMode::Start
        } else {
            IteratorMode::From(from, rocksdb::Direction::Forward)
        };
        for kv in self.db.iterator_cf(handle, mode) {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(handle) = self.db.cf_handle(cf.name()) else {
            return Ok(None);
        };
        self.db
            .get_pinned_cf(handle, key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| self.err(e))
    }

    /// Writes every column family's memtable out to table files, so that
    /// the next open of the index (each backup, restore and listing opens
    /// it) replays no write-ahead log. Only an optimisation: what it
    /// flushes is durable in the log already.
    pub fn flush(&self) -> Result<()> {
        let handles: Vec<&rocksdb::ColumnFamily> = ALL_CFS
            .iter()
            .filter_map(|n| self.db.cf_handle(n))
            .collect();
        let mut opts = FlushOptions::default();
        opts.set_wait(true);
        self.db
            .flush_cfs_opt(&handles, &opts)
            .map_err(|e| self.err(e))
    }

    /// Path of the index directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
