//! The RocksDB index of a vault (`VAULT/index/`): where every chunk lives,
//! how much of each segment is committed, and the catalog of items and
//! points. One RocksDB per vault; every change goes through one synced
//! [`IndexBatch`] so that a crash leaves all of it or none of it.
//!
//! Column families (keys and values are specified in `FORMAT.md`, "Index"):
//! - `chunks`: chunk id (32 bytes) → [`ChunkLocation`];
//! - `segments`: segment id (u64, big-endian for ordering) → committed length;
//! - `items`: item name → [`ItemRecord`];
//! - `points`: item name, NUL, sequence (u64 big-endian) → [`PointRecord`].

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::catalog::{CATALOG_VALUE_VERSION, ItemRecord, PointRecord};
use crate::chunk_id::ChunkId;
use crate::error::{Result, StoreError};

/// Folder of the index inside a vault.
pub const INDEX_DIR: &str = "index";
const CF_CHUNKS: &str = "chunks";
const CF_SEGMENTS: &str = "segments";
const CF_ITEMS: &str = "items";
const CF_POINTS: &str = "points";
const ALL_CFS: [&str; 4] = [CF_CHUNKS, CF_SEGMENTS, CF_ITEMS, CF_POINTS];
const LOCATION_VERSION: u8 = 1;
const LOCATION_LEN: usize = 25;
const SEGMENT_VALUE_VERSION: u8 = 1;

/// Where a chunk's record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Segment id.
    pub segment: u64,
    /// Offset of the record in the segment.
    pub offset: u64,
    /// Record length (header and payload).
    pub len: u32,
    /// Plaintext length.
    pub plain_len: u32,
}

impl ChunkLocation {
    /// Encodes as version byte + fixed little-endian fields.
    pub fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut v = [0u8; LOCATION_LEN];
        let parts: [&[u8]; 5] = [
            &[LOCATION_VERSION],
            &self.segment.to_le_bytes(),
            &self.offset.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.plain_len.to_le_bytes(),
        ];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = v.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        v
    }

    /// Decodes; `None` if the bytes are not a valid location.
    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != LOCATION_LEN || v.first() != Some(&LOCATION_VERSION) {
            return None;
        }
        Some(ChunkLocation {
            segment: u64::from_le_bytes(v.get(1..9)?.try_into().ok()?),
            offset: u64::from_le_bytes(v.get(9..17)?.try_into().ok()?),
            len: u32::from_le_bytes(v.get(17..21)?.try_into().ok()?),
            plain_len: u32::from_le_bytes(v.get(21..25)?.try_into().ok()?),
        })
    }
}

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

fn point_prefix(item: &str) -> Vec<u8> {
    let mut k = item.as_bytes().to_vec();
    k.push(0);
    k
}

fn encode_catalog<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![CATALOG_VALUE_VERSION];
    // Serialising plain records into a Vec cannot fail.
    out.extend(serde_json::to_vec(v).unwrap_or_default());
    out
}

/// A set of index changes applied atomically by [`Index::commit`].
#[derive(Default)]
pub struct IndexBatch {
    batch: WriteBatch,
    chunks: Vec<(ChunkId, ChunkLocation)>,
    segments: Vec<(u64, u64)>,
    items: Vec<ItemRecord>,
    points: Vec<PointRecord>,
    deleted_points: Vec<(String, u64)>,
}

impl IndexBatch {
    /// Records where a chunk lives.
    pub fn put_chunk(&mut self, id: ChunkId, loc: ChunkLocation) {
        self.chunks.push((id, loc));
    }
    /// Records the committed length of a segment.
    pub fn put_segment(&mut self, id: u64, committed: u64) {
        self.segments.push((id, committed));
    }
    /// Inserts or replaces an item.
    pub fn put_item(&mut self, item: ItemRecord) {
        self.items.push(item);
    }
    /// Inserts or replaces a point.
    pub fn put_point(&mut self, point: PointRecord) {
        self.points.push(point);
    }
    /// Removes a point.
    pub fn delete_point(&mut self, item: &str, seq: u64) {
        self.deleted_points.push((item.to_string(), seq));
    }
    /// Number of chunk locations in the batch.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
            && self.segments.is_empty()
            && self.items.is_empty()
            && self.points.is_empty()
            && self.deleted_points.is_empty()
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
        opts.set_keep_log_file_num(4);
        opts.set_max_log_file_size(4 << 20);
        opts.set_write_buffer_size(16 << 20);
        opts.increase_parallelism(2);
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
    /// the state committed when it was opened.
    pub fn open_read(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(false);
        let db = DB::open_cf_for_read_only(&opts, path, ALL_CFS, false).map_err(|source| {
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

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| self.corrupt("column family", format!("{name} is missing")))
    }

    /// Applies a batch atomically and durably (synced WAL).
    pub fn commit(&self, b: IndexBatch) -> Result<()> {
        let IndexBatch {
            mut batch,
            chunks,
            segments,
            items,
            points,
            deleted_points,
        } = b;
        let cf = self.cf(CF_CHUNKS)?;
        for (id, loc) in &chunks {
            batch.put_cf(cf, id.as_bytes(), loc.encode());
        }
        let cf = self.cf(CF_SEGMENTS)?;
        for (id, len) in &segments {
            let mut v = vec![SEGMENT_VALUE_VERSION];
            v.extend_from_slice(&len.to_le_bytes());
            batch.put_cf(cf, seq_key(*id), v);
        }
        let cf = self.cf(CF_ITEMS)?;
        for item in &items {
            batch.put_cf(cf, item.name.as_bytes(), encode_catalog(item));
        }
        let cf = self.cf(CF_POINTS)?;
        for p in &points {
            batch.put_cf(cf, point_key(&p.item, p.seq), encode_catalog(p));
        }
        for (item, seq) in &deleted_points {
            batch.delete_cf(cf, point_key(item, *seq));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }

    /// Where chunk `id` lives, if it is indexed.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        let v = self
            .db
            .get_pinned_cf(self.cf(CF_CHUNKS)?, id.as_bytes())
            .map_err(|e| self.err(e))?;
        match v {
            None => Ok(None),
            Some(v) => ChunkLocation::decode(&v)
                .map(Some)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}"))),
        }
    }

    /// Every indexed chunk, in id order.
    pub fn chunks(&self) -> Result<Vec<(ChunkId, ChunkLocation)>> {
        let mut out = Vec::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_CHUNKS)?, IteratorMode::Start)
        {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let id = ChunkId::from_slice(&k)
                .ok_or_else(|| self.corrupt("chunk key", hex::encode(&k)))?;
            let loc = ChunkLocation::decode(&v)
                .ok_or_else(|| self.corrupt("chunk location", format!("chunk {id}")))?;
            out.push((id, loc));
        }
        Ok(out)
    }

    /// Committed length of every segment, by segment id.
    pub fn segments(&self) -> Result<BTreeMap<u64, u64>> {
        let mut out = BTreeMap::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_SEGMENTS)?, IteratorMode::Start)
        {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let id =
                seq_from_key(&k).ok_or_else(|| self.corrupt("segment key", hex::encode(&k)))?;
            let len = match (v.first(), v.get(1..9)) {
                (Some(&SEGMENT_VALUE_VERSION), Some(b)) if v.len() == 9 => {
                    b.try_into().ok().map(u64::from_le_bytes)
                }
                _ => None,
            }
            .ok_or_else(|| self.corrupt("segment length", format!("segment {id}")))?;
            out.insert(id, len);
        }
        Ok(out)
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

    /// The item called `name`.
    pub fn item(&self, name: &str) -> Result<Option<ItemRecord>> {
        let v = self
            .db
            .get_pinned_cf(self.cf(CF_ITEMS)?, name.as_bytes())
            .map_err(|e| self.err(e))?;
        v.map(|v| self.decode_catalog("item", &v)).transpose()
    }

    /// All items, by name.
    pub fn items(&self) -> Result<Vec<ItemRecord>> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_ITEMS)?, IteratorMode::Start) {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            out.push(self.decode_catalog("item", &v)?);
        }
        Ok(out)
    }

    /// Points of `item`, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointRecord>> {
        let prefix = point_prefix(item);
        let mut out = Vec::new();
        let cf = self.cf(CF_POINTS)?;
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for kv in iter {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(self.decode_catalog("point", &v)?);
        }
        Ok(out)
    }

    /// Every point of every item.
    pub fn all_points(&self) -> Result<Vec<PointRecord>> {
        let mut out = Vec::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_POINTS)?, IteratorMode::Start)
        {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            out.push(self.decode_catalog("point", &v)?);
        }
        Ok(out)
    }

    /// Path of the index directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn location_round_trip(segment: u64, offset: u64, len: u32, plain_len: u32) {
            let loc = ChunkLocation { segment, offset, len, plain_len };
            prop_assert_eq!(ChunkLocation::decode(&loc.encode()), Some(loc));
        }
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
    }
}
