//! The write session: appending chunks to a segment, deduplication
//! against pending and committed chunks, checkpoints, and what a dropped
//! session gives back.

use super::*;

/// Commit a checkpoint once this much new data is pending, to bound memory
/// and the work a crash can lose.
const CHECKPOINT_BYTES: u64 = 512 << 20;
const CHECKPOINT_CHUNKS: usize = 65_536;

impl Vault {
    /// Starts a write session. Requires [`Access::Write`].
    pub fn begin_write(&self) -> Result<WriteSession<'_>> {
        if self.lock.is_none() {
            return Err(StoreError::ReadOnly {
                path: self.dir.clone(),
            });
        }
        if self.is_poisoned() {
            return Err(StoreError::Poisoned {
                path: self.dir.clone(),
            });
        }
        // A shared vault: a lease first, and what GC condemned is stored
        // again rather than deduplicated against (like damaged chunks).
        let mut heal: std::collections::HashSet<ChunkId> = self
            .damaged_list()
            .into_iter()
            .filter(|id| self.index.chunk(id).ok().flatten().is_some())
            .collect();
        let lease = self.take_writer_lease(&mut heal)?;
        Ok(WriteSession {
            lease,
            vault: self,
            writer: None,
            writer_is_new: false,
            writer_committed: 0,
            // In a shared vault every session writes a segment of its own,
            // so nothing uploaded is ever cut (see `Vault::open_with`).
            fresh_segment: self.remote.is_some(),
            pending: HashMap::new(),
            kinds: HashMap::new(),
            pending_children: HashMap::new(),
            add_roots: Vec::new(),
            drop_roots: Vec::new(),
            pending_batch_bytes: 0,
            appended_bytes: 0,
            poisoned: false,
            finished: false,
            index_unknown: false,
            heal,
            healed: Vec::new(),
            adopted: Vec::new(),
        })
    }

    /// Applies catalog changes (items, policies, deleted points), with the
    /// reference changes they imply: each of `released_roots` (roots of
    /// deleted points) loses one reference. Requires [`Access::Write`].
    /// New points come through a [`WriteSession`] instead.
    pub fn commit_catalog(&self, batch: IndexBatch, released_roots: &[ChunkId]) -> Result<()> {
        let mut s = self.begin_write()?;
        s.drop_roots.extend_from_slice(released_roots);
        s.commit(batch)
    }
}

impl WriteSession<'_> {
    /// True when `id` is committed or pending in this session (a damaged
    /// chunk counts as absent, so that it is stored again).
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.pending.contains_key(id) {
            return Ok(true);
        }
        if self.heal.contains(id) {
            return Ok(false);
        }
        self.vault.contains_chunk(id)
    }

    /// True when `id` is a damaged chunk this session has not stored again
    /// yet (a backup must not keep it as "same as before").
    pub fn is_damaged(&self, id: &ChunkId) -> bool {
        self.heal.contains(id) && !self.pending.contains_key(id)
    }

    /// True when `id` is pending in this session (not yet committed).
    pub fn is_pending(&self, id: &ChunkId) -> bool {
        self.pending.contains_key(id)
    }

    /// Bytes appended by this session so far.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    pub(super) fn guard(&self) -> Result<()> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.vault.dir.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn poison<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Like [`WriteSession::poison`], and a failed sync poisons the vault
    /// handle too (fsyncgate: the dirty pages may be gone for good).
    pub(super) fn poison_vault<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.vault.poisoned.store(true, Ordering::Relaxed);
        }
        self.poison(r)
    }

    /// Makes this session write to a new segment rather than append to
    /// the newest one (GC, which may be rewriting that one).
    pub fn use_fresh_segment(&mut self) {
        self.fresh_segment = true;
    }

    pub(super) fn open_writer(&mut self) -> Result<()> {
        let mut infos = self.vault.index.segment_infos()?;
        let space = self.vault.segment_namespace();
        infos.retain(|id, _| space.contains(id));
        let copies = &self.vault.copies;
        if let Some((&id, info)) = infos.iter().next_back()
            && !info.retired
            && !self.fresh_segment
            && (SEGMENT_HEADER_LEN..SEGMENT_TARGET_LEN).contains(&info.committed)
            && !self.is_adopted_segment(id)?
        {
            let len = info.committed;
            self.writer = Some(SegmentWriter::append_to(copies, id, len)?);
            self.writer_is_new = false;
            self.writer_committed = len;
            return Ok(());
        }
        let next = self.next_segment_id(&infos)?;
        self.fresh_segment = false;
        self.writer = Some(SegmentWriter::create(copies, next)?);
        self.writer_is_new = true;
        self.writer_committed = 0;
        Ok(())
    }

    /// The id a new segment of this session gets: past every segment the
    /// index knows, this session's own (the writer's, adopted ones) and,
    /// in a shared vault, every part listed in the store.
    pub(super) fn next_segment_id(
        &self,
        infos: &std::collections::BTreeMap<u64, SegmentInfo>,
    ) -> Result<u64> {
        let space = self.vault.segment_namespace();
        let copies = &self.vault.copies;
        let mut next = infos
            .keys()
            .next_back()
            .map_or(space.start.max(1), |id| id + 1);
        let own = self
            .adopted
            .iter()
            .map(|a| a.id)
            .chain(self.writer.as_ref().map(SegmentWriter::id));
        for id in own {
            next = next.max(id + 1);
        }
        if self.vault.remote.is_some() {
            // A session of ours that died before its commit left parts the
            // index never recorded; their id stays taken (they are GC's).
            let listed = copies.primary().store.list(SEGMENTS_DIR)?;
            if let Some(max) = listed
                .iter()
                .filter_map(|n| parse_segment_file_name(n))
                .filter(|id| space.contains(id))
                .max()
            {
                next = next.max(max + 1);
            }
        }
        Ok(next)
    }

    /// Appends an encoded record for data chunk `id`. Duplicates of a
    /// pending chunk are ignored. May checkpoint or roll to a new segment.
    pub fn append(&mut self, id: ChunkId, record: &[u8]) -> Result<()> {
        self.append_kind(id, record, Some(ChunkKind::Data))
    }

    /// Appends a block-map node with its children (non-zero entries of a
    /// leaf, leaves of a root).
    pub fn append_node(
        &mut self,
        id: ChunkId,
        record: &[u8],
        kind: ChunkKind,
        children: Vec<ChunkId>,
    ) -> Result<()> {
        if !self.pending.contains_key(&id) {
            self.pending_children.insert(id, children);
        }
        self.append_kind(id, record, Some(kind))
    }

    /// Appends a copy of an existing chunk's record (GC rewrite): the chunk
    /// gets a new location and keeps its reference count.
    pub fn append_moved(&mut self, id: ChunkId, record: &[u8]) -> Result<()> {
        self.append_kind(id, record, None)
    }

    /// Adds a reference to `root` when the session commits (a new point).
    pub fn reference_root(&mut self, root: ChunkId) {
        self.add_roots.push(root);
    }

    pub(super) fn append_kind(
        &mut self,
        id: ChunkId,
        record: &[u8],
        kind: Option<ChunkKind>,
    ) -> Result<()> {
        self.guard()?;
        if self.pending.contains_key(&id) {
            return Ok(());
        }
        let header = RecordHeader::parse(record).map_err(|reason| StoreError::CorruptChunk {
            id,
            path: self.vault.dir.clone(),
            offset: 0,
            reason: Box::new(reason),
        })?;
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.len() >= SEGMENT_TARGET_LEN)
        {
            self.checkpoint()?;
            self.writer = None;
        }
        if self.writer.is_none() {
            let r = self.open_writer();
            self.poison(r)?;
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(StoreError::Poisoned {
                path: self.vault.dir.clone(),
            });
        };
        let r = w.append(record).map(|off| (w.id(), off));
        let (segment, offset) = self.poison(r)?;
        let loc = ChunkLocation {
            segment,
            offset,
            len: record.len() as u32,
            plain_len: header.plain_len,
        };
        self.place(id, loc, kind)
    }

    /// Records where chunk `id` now is (appended or adopted), then
    /// checkpoints when enough is pending.
    pub(super) fn place(
        &mut self,
        id: ChunkId,
        loc: ChunkLocation,
        mut kind: Option<ChunkKind>,
    ) -> Result<()> {
        if self.heal.contains(&id)
            && let Some(old) = self.vault.index.chunk(&id)?
        {
            // A fresh copy of a damaged chunk: it moves (its reference
            // count stays) and the old record becomes dead bytes.
            kind = None;
            self.healed.push((id, old));
        }
        if let Some(k) = kind {
            self.kinds.insert(id, k);
        }
        self.pending.insert(id, loc);
        self.pending_batch_bytes += u64::from(loc.len);
        self.appended_bytes += u64::from(loc.len);
        if self.pending_batch_bytes >= CHECKPOINT_BYTES || self.pending.len() >= CHECKPOINT_CHUNKS {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Starts writing what was appended so far back to disk without
    /// waiting, so the fsync of the commit overlaps with the work between.
    pub fn start_writeback(&mut self) -> Result<()> {
        self.guard()?;
        match self.writer.as_mut() {
            Some(w) => {
                let r = w.start_writeback();
                self.poison(r)
            }
            None => Ok(()),
        }
    }

    /// Makes everything appended so far durable and indexed, without
    /// recording a point. Chunks committed this way are unreferenced until
    /// a point uses them; a later session deduplicates against them.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.commit_inner(IndexBatch::default(), false)
    }
}

impl Drop for WriteSession<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Reclaim the uncommitted tail at once (a full disk wants its space
        // back); the next writer would do it anyway. Not after an index
        // commit that failed: the index may hold what it names.
        if self.vault.remote.is_some() || self.index_unknown {
            return;
        }
        for a in self.adopted.iter().filter(|a| !a.committed) {
            // Only the link goes: the pack stays the snapshot's.
            let _ = self
                .vault
                .copies
                .primary()
                .store
                .delete(&segment_name(a.id));
        }
        if let Some(w) = self.writer.take() {
            let keep = if self.writer_is_new {
                0
            } else {
                self.writer_committed
            };
            let result = w.discard(&self.vault.copies, keep);
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not discard uncommitted segment bytes; the next writer will");
            }
        }
    }
}
