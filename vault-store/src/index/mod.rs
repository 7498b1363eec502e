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

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

pub mod refs;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamilyDescriptor, DB, FlushOptions, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, StoreError};
use crate::format::catalog::{CATALOG_VALUE_VERSION, ItemRecord, PointRecord};
use crate::format::catalog_files;
use crate::format::chunk_id::ChunkId;
pub use crate::format::index_values::{ChunkKind, ChunkLocation, RefEntry, SegmentInfo};

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

#[expect(
    clippy::big_endian_bytes,
    reason = "big-endian keys sort numerically in RocksDB"
)]
fn seq_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

#[expect(
    clippy::big_endian_bytes,
    reason = "big-endian keys sort numerically in RocksDB"
)]
fn seq_from_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

fn point_key(item: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(item.len() + 9);
    k.extend_from_slice(item.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq_key(seq));
    k
}

/// Key in `meta` of a point retention pruned: `pruned\0ITEM\0SEQ`.
fn pruned_key(item: &str, seq: u64) -> Vec<u8> {
    let mut k = META_PRUNED.to_vec();
    k.extend_from_slice(&point_key(item, seq));
    k
}

fn point_prefix(item: &str) -> Vec<u8> {
    let mut k = item.as_bytes().to_vec();
    k.push(0);
    k
}

/// Key of a (segment, offset) pair in `segchunks` and `dead`.
fn place_key(segment: u64, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    let (a, b) = k.split_at_mut(8);
    a.copy_from_slice(&seq_key(segment));
    b.copy_from_slice(&seq_key(offset));
    k
}

fn place_from_key(k: &[u8]) -> Option<(u64, u64)> {
    Some((seq_from_key(k.get(..8)?)?, seq_from_key(k.get(8..16)?)?))
}

fn encode_catalog<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![CATALOG_VALUE_VERSION];
    // Serialising plain records into a Vec cannot fail.
    out.extend(serde_json::to_vec(v).unwrap_or_default());
    out
}

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

enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

/// A set of index changes applied atomically, in order, by
/// [`Index::commit`] (a later change to a key wins).
#[derive(Default)]
pub struct IndexBatch {
    ops: Vec<Op>,
    /// The catalog files every copy gets before the batch is committed
    /// (`None`: removed), in order.
    files: Vec<(String, Option<Vec<u8>>)>,
}

impl IndexBatch {
    fn put(&mut self, cf: Cf, k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(cf, k.into(), v.into()));
    }
    fn delete(&mut self, cf: Cf, k: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(cf, k.into()));
    }
    /// Records where a chunk lives (and the reverse `segchunks` entry).
    pub fn put_chunk(&mut self, id: ChunkId, loc: ChunkLocation) {
        self.put(Cf::Chunks, id.as_bytes().to_vec(), loc.encode().to_vec());
        self.put(
            Cf::SegChunks,
            place_key(loc.segment, loc.offset).to_vec(),
            id.as_bytes().to_vec(),
        );
    }
    /// Forgets a chunk that lived at `loc` (GC).
    pub fn delete_chunk(&mut self, id: &ChunkId, loc: &ChunkLocation) {
        self.delete(Cf::Chunks, id.as_bytes().to_vec());
        self.delete_chunk_place(loc);
        self.delete_ref(id);
    }
    /// Forgets a chunk's reference count (and its place on GC's work list).
    pub fn delete_ref(&mut self, id: &ChunkId) {
        self.delete(Cf::Refs, id.as_bytes().to_vec());
        self.delete(Cf::Unref, id.as_bytes().to_vec());
    }
    /// Moves a chunk's `segchunks` entry away from its old place (GC
    /// rewrite; the new place comes with [`IndexBatch::put_chunk`]).
    pub fn delete_chunk_place(&mut self, loc: &ChunkLocation) {
        self.delete(Cf::SegChunks, place_key(loc.segment, loc.offset).to_vec());
    }
    /// Records a segment's state.
    pub fn put_segment(&mut self, id: u64, info: SegmentInfo) {
        self.put(Cf::Segments, seq_key(id).to_vec(), info.encode());
    }
    /// Inserts or replaces an item.
    pub fn put_item(&mut self, item: ItemRecord) {
        self.files.push((
            catalog_files::item_file(&item.name),
            Some(catalog_files::encode_item(&item)),
        ));
        self.put(
            Cf::Items,
            item.name.as_bytes().to_vec(),
            encode_catalog(&item),
        );
    }
    /// Removes an item.
    pub fn delete_item(&mut self, name: &str) {
        self.files.push((catalog_files::item_file(name), None));
        self.delete(Cf::Items, name.as_bytes().to_vec());
    }
    /// Inserts or replaces a point.
    pub fn put_point(&mut self, point: PointRecord) {
        self.files.push((
            catalog_files::point_file(&point.item, point.seq),
            Some(catalog_files::encode_point(&point)),
        ));
        self.put(
            Cf::Points,
            point_key(&point.item, point.seq),
            encode_catalog(&point),
        );
    }
    /// Removes a point.
    pub fn delete_point(&mut self, item: &str, seq: u64) {
        self.files
            .push((catalog_files::point_file(item, seq), None));
        self.delete(Cf::Points, point_key(item, seq));
    }
    /// Removes a point its retention let go, and remembers that it did
    /// (item, sequence and block-map root): a secondary's quarantined copy
    /// of exactly that manifest is then garbage (`crate::copies::quarantine`).
    pub fn prune_point(&mut self, item: &str, seq: u64, root: &ChunkId) {
        self.delete_point(item, seq);
        self.put(Cf::Meta, pruned_key(item, seq), root.as_bytes().to_vec());
    }
    /// Inserts or replaces a policy (any serialisable shape).
    pub fn put_policy<T: Serialize>(&mut self, name: &str, policy: &T) {
        let file = catalog_files::PolicyFile {
            name: name.to_string(),
            policy: serde_json::to_value(policy).unwrap_or_default(),
        };
        self.files.push((
            catalog_files::policy_file(name),
            Some(catalog_files::encode_policy(&file)),
        ));
        self.put(
            Cf::Policies,
            name.as_bytes().to_vec(),
            encode_catalog(policy),
        );
    }
    /// Removes a policy.
    pub fn delete_policy(&mut self, name: &str) {
        self.files.push((catalog_files::policy_file(name), None));
        self.delete(Cf::Policies, name.as_bytes().to_vec());
    }
    /// Changes a chunk's reference count from `before` (as committed;
    /// `None` for a chunk not committed yet); a count of 0 puts it on GC's
    /// work list, any other count takes it off.
    pub fn put_ref_change(&mut self, id: &ChunkId, entry: RefEntry, before: Option<RefEntry>) {
        // `unref` holds exactly the committed chunks whose count is 0: it
        // changes only when the count moves to or from 0.
        self.put(Cf::Refs, id.as_bytes().to_vec(), entry.encode().to_vec());
        let was_unref = before.is_some_and(|b| b.count == 0);
        if entry.count == 0 && !was_unref {
            self.put(Cf::Unref, id.as_bytes().to_vec(), Vec::new());
        } else if entry.count > 0 && was_unref {
            self.delete(Cf::Unref, id.as_bytes().to_vec());
        }
    }
    /// Sets a chunk's reference count, with its `unref` entry, whatever
    /// the index held before.
    pub fn put_ref(&mut self, id: &ChunkId, entry: RefEntry) {
        self.put(Cf::Refs, id.as_bytes().to_vec(), entry.encode().to_vec());
        if entry.count == 0 {
            self.put(Cf::Unref, id.as_bytes().to_vec(), Vec::new());
        } else {
            self.delete(Cf::Unref, id.as_bytes().to_vec());
        }
    }
    /// Records a dead range awaiting physical reclamation.
    pub fn put_dead(&mut self, segment: u64, offset: u64, len: u32) {
        self.put(
            Cf::Dead,
            place_key(segment, offset).to_vec(),
            len.to_le_bytes().to_vec(),
        );
    }
    /// Forgets a dead range (its space was given back).
    pub fn delete_dead(&mut self, segment: u64, offset: u64) {
        self.delete(Cf::Dead, place_key(segment, offset).to_vec());
    }
    /// Forgets a segment (a shared vault's segment another host's GC
    /// deleted; its chunks go with [`IndexBatch::delete_chunk`]).
    pub fn delete_segment(&mut self, id: u64) {
        self.delete(Cf::Segments, seq_key(id).to_vec());
    }
    /// Marks the reference counts as to be rebuilt: the next writer
    /// derives them from the points again (a shared vault's cache after
    /// importing what other hosts did).
    pub fn forget_gc_layout(&mut self) {
        self.delete(Cf::Meta, META_GC_LAYOUT.to_vec());
    }
    /// Forgets the GC layout and the counts of `ids`, as a vault written
    /// before reference counts existed (tests of the upgrade).
    #[cfg(test)]
    pub(crate) fn wipe_gc_layout(&mut self, ids: &[ChunkId]) {
        self.delete(Cf::Meta, META_GC_LAYOUT.to_vec());
        for id in ids {
            self.delete_ref(id);
        }
    }
    /// Marks the GC column families as built.
    pub fn put_gc_layout(&mut self) {
        self.put(Cf::Meta, META_GC_LAYOUT.to_vec(), vec![GC_LAYOUT_VERSION]);
    }
    /// Catalog files to write (or, `None`, remove) on every copy before
    /// the batch is committed.
    pub fn catalog_files(&self) -> &[(String, Option<Vec<u8>>)] {
        &self.files
    }
    /// Puts a policy whose JSON is already a value (index rebuild).
    pub fn put_policy_value(&mut self, name: &str, policy: &serde_json::Value) {
        self.put(
            Cf::Policies,
            name.as_bytes().to_vec(),
            encode_catalog(policy),
        );
    }
    /// Forgets the catalog files of this batch (index rebuild: they came
    /// from a copy).
    pub fn without_files(mut self) -> Self {
        self.files.clear();
        self
    }
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.files.is_empty()
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

    /// Applies a batch atomically and durably (synced WAL).
    pub fn commit(&self, b: IndexBatch) -> Result<()> {
        let mut batch = WriteBatch::default();
        for op in &b.ops {
            match op {
                Op::Put(cf, k, v) => batch.put_cf(self.cf(*cf)?, k, v),
                Op::Delete(cf, k) => batch.delete_cf(self.cf(*cf)?, k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
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

    /// Where chunk `id` lives, if it is indexed.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        match self.get(Cf::Chunks, id.as_bytes())? {
            None => Ok(None),
            Some(v) => ChunkLocation::decode(&v)
                .map(Some)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}"))),
        }
    }

    /// Where each of `ids` lives (in their order; `None` where one is not
    /// indexed), read in one batch.
    pub fn chunk_locations(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkLocation>>> {
        self.multi_get(Cf::Chunks, ids, false, |v, id| {
            ChunkLocation::decode(v)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}")))
        })
    }

    /// The values of `ids` in `cf` (in their order), read in one batch
    /// (lookups grouped by table block; `sorted` when `ids` are in key
    /// order, which spares RocksDB sorting them), each decoded by `decode`.
    fn multi_get<T: Clone>(
        &self,
        cf: Cf,
        ids: &[ChunkId],
        sorted: bool,
        decode: impl Fn(&[u8], &ChunkId) -> Result<T>,
    ) -> Result<Vec<Option<T>>> {
        let Some(handle) = self.db.cf_handle(cf.name()) else {
            return Ok(vec![None; ids.len()]);
        };
        self.db
            .batched_multi_get_cf(
                handle,
                ids.iter().map(|id| id.as_bytes().as_slice()),
                sorted,
            )
            .into_iter()
            .zip(ids)
            .map(|(v, id)| match v.map_err(|e| self.err(e))? {
                None => Ok(None),
                Some(v) => decode(&v, id).map(Some),
            })
            .collect()
    }

    /// Every indexed chunk, in id order.
    pub fn chunks(&self) -> Result<Vec<(ChunkId, ChunkLocation)>> {
        let mut out = Vec::new();
        self.scan(Cf::Chunks, &[], |k, v| {
            let id =
                ChunkId::from_slice(k).ok_or_else(|| self.corrupt("chunk key", hex::encode(k)))?;
            let loc = ChunkLocation::decode(v)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}")))?;
            out.push((id, loc));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The chunks recorded in segment `segment` (from `segchunks`), in
    /// offset order.
    pub fn segment_chunks(&self, segment: u64) -> Result<Vec<(u64, ChunkId)>> {
        let mut out = Vec::new();
        self.scan(Cf::SegChunks, &seq_key(segment), |k, v| {
            let (_, offset) =
                place_from_key(k).ok_or_else(|| self.corrupt("segchunks key", hex::encode(k)))?;
            let id = ChunkId::from_slice(v)
                .ok_or_else(|| self.corrupt("segchunks value", hex::encode(v)))?;
            out.push((offset, id));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every segment's state, by segment id.
    pub fn segment_infos(&self) -> Result<BTreeMap<u64, SegmentInfo>> {
        let mut out = BTreeMap::new();
        self.scan(Cf::Segments, &[], |k, v| {
            let id = seq_from_key(k).ok_or_else(|| self.corrupt("segment key", hex::encode(k)))?;
            let info = SegmentInfo::decode(v)
                .ok_or_else(|| self.corrupt("segment state", format!("segment {id}")))?;
            out.insert(id, info);
            Ok(true)
        })?;
        Ok(out)
    }

    /// One segment's state.
    pub fn segment_info(&self, id: u64) -> Result<Option<SegmentInfo>> {
        self.get(Cf::Segments, &seq_key(id))?
            .map(|v| {
                SegmentInfo::decode(&v)
                    .ok_or_else(|| self.corrupt("segment state", format!("segment {id}")))
            })
            .transpose()
    }

    /// Committed length of every live (not retired) segment, by segment id.
    pub fn segments(&self) -> Result<BTreeMap<u64, u64>> {
        Ok(self
            .segment_infos()?
            .into_iter()
            .filter(|(_, i)| !i.retired)
            .map(|(id, i)| (id, i.committed))
            .collect())
    }

    /// A chunk's reference count entry.
    pub fn chunk_ref(&self, id: &ChunkId) -> Result<Option<RefEntry>> {
        self.get(Cf::Refs, id.as_bytes())?
            .map(|v| {
                RefEntry::decode(&v).ok_or_else(|| self.corrupt("reference count", id.to_string()))
            })
            .transpose()
    }

    /// The reference counts of `ids` (in their order), read in one batch
    /// (lookups grouped by table block); `sorted` when `ids` are in key
    /// order, which spares RocksDB sorting them.
    pub fn chunk_refs(&self, ids: &[ChunkId], sorted: bool) -> Result<Vec<Option<RefEntry>>> {
        self.multi_get(Cf::Refs, ids, sorted, |v, id| {
            RefEntry::decode(v).ok_or_else(|| self.corrupt("reference count", id.to_string()))
        })
    }

    /// Up to `limit` chunks on GC's work list (count 0), after `after`.
    pub fn unreferenced_from(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        let from = after.map_or(&[][..], |a| a.as_bytes());
        self.scan_from(Cf::Unref, from, &[], |k, _| {
            let id =
                ChunkId::from_slice(k).ok_or_else(|| self.corrupt("unref key", hex::encode(k)))?;
            if Some(&id) != after {
                out.push(id);
            }
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Dead ranges of segment `segment` awaiting physical reclamation:
    /// (segment, offset, length).
    pub fn dead_ranges_of(&self, segment: u64) -> Result<Vec<(u64, u64, u32)>> {
        let mut out = Vec::new();
        self.scan(Cf::Dead, &seq_key(segment), |k, v| {
            let (s, o) =
                place_from_key(k).ok_or_else(|| self.corrupt("dead key", hex::encode(k)))?;
            let len = v
                .try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| self.corrupt("dead length", format!("segment {s} offset {o}")))?;
            out.push((s, o, len));
            Ok(true)
        })?;
        Ok(out)
    }

    /// True when the GC column families are built at the current layout.
    pub fn has_gc_layout(&self) -> Result<bool> {
        Ok(self.get(Cf::Meta, META_GC_LAYOUT)?.as_deref() == Some(&[GC_LAYOUT_VERSION][..]))
    }

    /// The block-map root of point `seq` of `item` if retention pruned
    /// it (a value that is not a chunk id counts as no record).
    pub fn pruned_root(&self, item: &str, seq: u64) -> Result<Option<ChunkId>> {
        Ok(self
            .get(Cf::Meta, &pruned_key(item, seq))?
            .and_then(|v| ChunkId::from_slice(&v)))
    }

    fn decode_catalog<T: DeserializeOwned>(&self, what: &'static str, v: &[u8]) -> Result<T> {
        match v.split_first() {
            Some((&CATALOG_VALUE_VERSION, body)) => {
                serde_json::from_slice(body).map_err(|e| self.corrupt(what, e.to_string()))
            }
            Some((ver, _)) => Err(self.corrupt(what, format!("unknown value version {ver}"))),
            None => Err(self.corrupt(what, "empty value")),
        }
    }

    /// Every policy as a name and its JSON value.
    pub fn policy_values(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        self.scan(Cf::Policies, &[], |k, v| {
            let name = String::from_utf8_lossy(k).into_owned();
            out.push((name, self.decode_catalog("policy", v)?));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The item called `name`.
    pub fn item(&self, name: &str) -> Result<Option<ItemRecord>> {
        self.get(Cf::Items, name.as_bytes())?
            .map(|v| self.decode_catalog("item", &v))
            .transpose()
    }

    /// All items, by name.
    pub fn items(&self) -> Result<Vec<ItemRecord>> {
        let mut out = Vec::new();
        self.scan(Cf::Items, &[], |_, v| {
            out.push(self.decode_catalog("item", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Points of `item`, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointRecord>> {
        let mut out = Vec::new();
        self.scan(Cf::Points, &point_prefix(item), |_, v| {
            out.push(self.decode_catalog("point", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every point of every item.
    pub fn all_points(&self) -> Result<Vec<PointRecord>> {
        let mut out = Vec::new();
        self.scan(Cf::Points, &[], |_, v| {
            out.push(self.decode_catalog("point", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// The policy called `name`, decoded as `T`.
    pub fn policy<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.get(Cf::Policies, name.as_bytes())?
            .map(|v| self.decode_catalog("policy", &v))
            .transpose()
    }

    /// All policies, by name.
    pub fn policies<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.scan(Cf::Policies, &[], |_, v| {
            out.push(self.decode_catalog("policy", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Path of the index directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn location_round_trip(segment: u64, offset: u64, len: u32, plain_len: u32) {
            let loc = ChunkLocation { segment, offset, len, plain_len };
            let possible = (crate::format::record::HEADER_LEN
                ..=crate::format::record::HEADER_LEN + crate::format::record::MAX_STORED_LEN)
                .contains(&(len as usize))
                && offset.checked_add(u64::from(len)).is_some();
            let want = possible.then_some(loc);
            prop_assert_eq!(ChunkLocation::decode(&loc.encode()), want);
        }
    }

    #[test]
    fn segment_info_round_trip_and_v1() {
        let i = SegmentInfo {
            committed: 77,
            dead: 5,
            retired: true,
        };
        assert_eq!(SegmentInfo::decode(&i.encode()), Some(i));
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&9u64.to_le_bytes());
        assert_eq!(
            SegmentInfo::decode(&v1),
            Some(SegmentInfo {
                committed: 9,
                ..SegmentInfo::default()
            })
        );
        assert_eq!(SegmentInfo::decode(&[2u8; 18]), None);
        let r = RefEntry {
            kind: ChunkKind::Leaf,
            count: 3,
        };
        assert_eq!(RefEntry::decode(&r.encode()), Some(r));
        assert_eq!(place_from_key(&place_key(3, 9)), Some((3, 9)));
    }

    #[test]
    fn location_rejects_bad_bytes() {
        assert_eq!(ChunkLocation::decode(&[1u8; 24]), None);
        let mut v = ChunkLocation {
            segment: 1,
            offset: 2,
            len: 3,
            plain_len: 4,
        }
        .encode();
        v[0] = 9;
        assert_eq!(ChunkLocation::decode(&v), None);
        let at = |offset: u64, len: u32| {
            ChunkLocation::decode(
                &ChunkLocation {
                    segment: 1,
                    offset,
                    len,
                    plain_len: 4,
                }
                .encode(),
            )
        };
        assert!(at(64, 100).is_some());
        // Shorter than a record header, a 4 GiB buffer, an end past u64::MAX.
        assert_eq!(at(64, 3), None);
        assert_eq!(at(64, u32::MAX), None);
        assert_eq!(at(u64::MAX - 10, 100), None);
    }
}
