//! [`IndexBatch`], a set of index changes with the catalog files they
//! write, and [`Index::commit`], which applies one atomically.

use rocksdb::{WriteBatch, WriteOptions};
use serde::Serialize;

use super::catalog::encode_catalog;
use super::keys::{place_key, point_key, pruned_key, seq_key};
use super::{Cf, ChunkLocation, GC_LAYOUT_VERSION, Index, META_GC_LAYOUT, RefEntry, SegmentInfo};
use crate::error::Result;
use crate::format::catalog::{ItemRecord, PointRecord};
use crate::format::catalog_files;
use crate::format::chunk_id::ChunkId;

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
    pub(super) fn put(&mut self, cf: Cf, k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) {
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

impl Index {
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
}
