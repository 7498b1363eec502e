//! Reference counting of chunks, so that GC's work is proportional to what
//! it deletes rather than to the vault's size.
//!
//! The block maps form a DAG: a point references its root, a root its
//! leaves, a leaf its data chunks. Each chunk's count is the number of
//! references from *distinct live parents*: a new point adds one to its
//! root; only when a node goes from 0 to 1 are its children counted, and
//! only when it falls back to 0 are they released. An incremental point
//! therefore costs one increment per leaf plus one per entry of each *new*
//! leaf, and deleting a point costs the same on the way down. Chunks whose
//! count is 0 sit in the `unref` family, which is GC's work list.
//!
//! [`RefCounter`] applies changes to an in-memory overlay on top of the
//! index and writes the final counts into an [`IndexBatch`], so a point and
//! the counts it changes commit together.

use std::collections::HashMap;

use crate::error::{Result, StoreError};
use crate::format::blockmap::Node;
use crate::format::chunk_id::ChunkId;
use crate::index::{ChunkKind, Index, IndexBatch, RefEntry};

/// What a block-map node references: its kind and children (leaves of a
/// root, non-zero entries of a leaf); `None` when `bytes` are not a node.
pub fn node_refs(bytes: &[u8]) -> Option<(ChunkKind, Vec<ChunkId>)> {
    match Node::decode(bytes).ok()? {
        Node::Root { leaves, .. } => Some((ChunkKind::Root, leaves)),
        Node::Leaf { entries, .. } => {
            Some((ChunkKind::Leaf, entries.into_iter().flatten().collect()))
        }
    }
}

/// Source of a node's children (leaves of a root, non-zero entries of a
/// leaf).
pub trait NodeChildren {
    /// Children of node `id` of kind `kind`.
    fn children(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<ChunkId>>;
}

/// Most references whose counts [`RefCounter::incref`] reads in one batch.
pub const COUNT_BATCH: usize = 64 << 10;

/// Counts changes on top of the index.
pub struct RefCounter<'a> {
    index: &'a Index,
    /// Each touched chunk's count now, and as the index holds it (`None`
    /// for a chunk this session wrote).
    overlay: HashMap<ChunkId, RefEntry>,
    committed: HashMap<ChunkId, RefEntry>,
}

impl<'a> RefCounter<'a> {
    /// A counter with no changes yet.
    pub fn new(index: &'a Index) -> Self {
        RefCounter {
            index,
            overlay: HashMap::new(),
            committed: HashMap::new(),
        }
    }

    /// Registers a chunk written in this session with count 0.
    pub fn insert_new(&mut self, id: ChunkId, kind: ChunkKind) {
        self.overlay
            .entry(id)
            .or_insert(RefEntry { kind, count: 0 });
    }

    fn entry(&mut self, id: &ChunkId) -> Result<&mut RefEntry> {
        if !self.overlay.contains_key(id) {
            let e = self
                .index
                .chunk_ref(id)?
                .ok_or_else(|| StoreError::CorruptIndex {
                    path: self.index.path().to_path_buf(),
                    what: "reference count",
                    reason: format!("chunk {id} has no reference count"),
                })?;
            self.overlay.insert(*id, e);
            self.committed.insert(*id, e);
        }
        self.overlay
            .get_mut(id)
            .ok_or(StoreError::ChunkMissing { id: *id })
    }

    /// Adds one reference to `id`; a node that comes alive references its
    /// children in turn.
    ///
    /// In batches: the counts of up to [`COUNT_BATCH`] references due are
    /// read in one sorted batch, then counted (the new leaves of a day's
    /// point, tens of thousands of entries, cost one read instead of one
    /// per leaf, each going through most of the same table blocks again).
    /// A batch stops once the nodes that came alive in it added that many
    /// references, so what is held stays bounded on any image. A count
    /// only grows by one per reference, so the order changes nothing: a
    /// node comes alive at its first.
    pub fn incref(&mut self, id: &ChunkId, nodes: &dyn NodeChildren) -> Result<()> {
        let mut due = vec![*id];
        while !due.is_empty() {
            let batch = due.split_off(due.len().saturating_sub(COUNT_BATCH));
            self.prefetch(&batch)?;
            let mut batch = batch.into_iter();
            let mut added = 0;
            for id in batch.by_ref() {
                let e = self.entry(&id)?;
                e.count += 1;
                if e.count == 1 && e.kind != ChunkKind::Data {
                    let kind = e.kind;
                    let children = nodes.children(&id, kind)?;
                    added += children.len();
                    due.extend(children);
                }
                if added >= COUNT_BATCH {
                    break;
                }
            }
            // Read already; counted with the next batch.
            due.extend(batch);
        }
        Ok(())
    }

    /// Reads the counts of those of `ids` the overlay lacks, in one batch
    /// (a thousand entries cost one multi-get, not a thousand lookups).
    fn prefetch(&mut self, ids: &[ChunkId]) -> Result<()> {
        let mut missing: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !self.overlay.contains_key(*id))
            .copied()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        for (id, e) in missing.iter().zip(self.index.chunk_refs(&missing, true)?) {
            // A missing count is reported by `entry`, in order.
            if let Some(e) = e {
                self.overlay.insert(*id, e);
                self.committed.insert(*id, e);
            }
        }
        Ok(())
    }

    /// Removes one reference from `id`; a node that dies releases its
    /// children in turn.
    pub fn decref(&mut self, id: &ChunkId, nodes: &dyn NodeChildren) -> Result<()> {
        let mut stack = vec![*id];
        while let Some(id) = stack.pop() {
            let path = self.index.path().to_path_buf();
            let e = self.entry(&id)?;
            if e.count == 0 {
                return Err(StoreError::CorruptIndex {
                    path,
                    what: "reference count",
                    reason: format!("chunk {id} released more often than referenced"),
                });
            }
            e.count -= 1;
            if e.count == 0 && e.kind != ChunkKind::Data {
                let kind = e.kind;
                stack.extend(nodes.children(&id, kind)?);
            }
        }
        Ok(())
    }

    /// Chunks registered as data whose count is 0.
    pub fn unreferenced_data(&self) -> Vec<ChunkId> {
        self.overlay
            .iter()
            .filter(|(_, e)| e.count == 0 && e.kind == ChunkKind::Data)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Corrects the kind of a registered chunk.
    pub fn set_kind(&mut self, id: &ChunkId, kind: ChunkKind) {
        if let Some(e) = self.overlay.get_mut(id) {
            e.kind = kind;
        }
    }

    /// Writes every changed count into `batch`.
    pub fn write_to(self, batch: &mut IndexBatch) {
        for (id, e) in self.overlay {
            let before = self.committed.get(&id).copied();
            if before != Some(e) {
                batch.put_ref_change(&id, e, before);
            }
        }
    }
}
