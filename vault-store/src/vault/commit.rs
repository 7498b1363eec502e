//! Committing a write session: sync the segment on every copy, write the
//! catalog files, commit the index batch, then (shared vaults) confirm the
//! writer's lease.

use super::*;

impl WriteSession<'_> {
    pub(super) fn commit_inner(&mut self, mut batch: IndexBatch, final_commit: bool) -> Result<()> {
        self.guard()?;
        // Healed chunks: their old, damaged records become dead bytes.
        let mut healed_now = Vec::new();
        let mut dead_add: std::collections::BTreeMap<u64, u64> = Default::default();
        for (id, old) in self.healed.drain(..) {
            batch.delete_chunk_place(&old);
            batch.put_dead(old.segment, old.offset, old.len);
            *dead_add.entry(old.segment).or_default() += u64::from(old.len);
            healed_now.push(id);
        }
        let needs_sync = !self.pending.is_empty() || self.writer_is_new;
        if let (Some(w), true) = (self.writer.as_mut(), needs_sync) {
            let r = w.sync().map(|()| (w.id(), w.len()));
            let (id, len) = self.poison_vault(r)?;
            let mut info = self.vault.index.segment_info(id)?.unwrap_or_default();
            info.committed = len;
            info.dead += dead_add.remove(&id).unwrap_or(0);
            batch.put_segment(id, info);
        }
        let adopting = self
            .adopted
            .iter()
            .any(|a| !a.committed && !a.used.is_empty())
            || final_commit && !self.adopted.is_empty();
        if adopting {
            for a in &self.adopted {
                // Its bytes are durable already (the pack was fsynced, the
                // link too); the dead ranges are known once every record
                // was placed, at the final commit.
                let mut info = SegmentInfo {
                    committed: a.len,
                    ..SegmentInfo::default()
                };
                if final_commit {
                    for (offset, len) in a.gaps() {
                        batch.put_dead(a.id, offset, len);
                        info.dead += u64::from(len);
                    }
                }
                info.dead += dead_add.remove(&a.id).unwrap_or(0);
                batch.put_segment(a.id, info);
            }
        }
        for (seg, dead) in dead_add {
            if let Some(mut i) = self.vault.index.segment_info(seg)? {
                i.dead += dead;
                batch.put_segment(seg, i);
            }
        }
        for (id, loc) in self.pending.iter() {
            batch.put_chunk(*id, *loc);
        }

        let mut counter = RefCounter::new(&self.vault.index);
        for (id, kind) in &self.kinds {
            counter.insert_new(*id, *kind);
        }
        if final_commit {
            let nodes = VaultNodes {
                vault: self.vault,
                pending: &self.pending_children,
            };
            for root in &self.add_roots {
                counter.incref(root, &nodes)?;
            }
            for root in &self.drop_roots {
                counter.decref(root, &nodes)?;
            }
        }
        counter.write_to(&mut batch);
        if batch.is_empty() {
            return Ok(());
        }
        // New and changed catalog files reach the copies before the index
        // records them, removed ones leave the copies after it forgets
        // them (invariant C2): a crash in between leaves a copy with an
        // extra file, which the next writer removes, never one without a
        // file the index has.
        if self.vault.remote.is_some() && !self.pending.is_empty() {
            // Shared vault: the list of what this commit appended, for the
            // other hosts' caches (after the parts, before the manifest).
            let r = self.put_chunk_lists();
            self.poison_vault(r)?;
        }
        let files = batch.catalog_files().to_vec();
        if let Some(l) = self.lease.as_mut() {
            // In a shared vault the manifest is the commit: never after
            // the lease ran out (a GC may have acted on it).
            let r = l.check_and_renew();
            self.poison(r)?;
        }
        let before = if self.vault.remote.is_some() {
            self.vault.catalog_before(&files)?
        } else {
            HashMap::new()
        };
        let r = self.vault.copies.put_files(&files, &before);
        self.poison_vault(r)?;
        self.confirm_lease(&files)?;
        let r = self.vault.index.commit(batch);
        if r.is_err() {
            // The index may hold the batch after all (its log reached the
            // disk): nothing this session wrote may be taken back now.
            self.index_unknown = true;
        }
        self.poison(r)?;
        if let Err(e) = self.vault.copies.delete_files(&files) {
            // Committed already; the next writer removes what is left.
            tracing::warn!(error = %e, "could not remove deleted catalog files from every copy");
        }
        if !healed_now.is_empty() {
            let mut list = self.vault.damaged_list();
            for id in &healed_now {
                list.remove(id);
                self.heal.remove(id);
            }
            tracing::info!(
                chunks = healed_now.len(),
                "healed damaged chunks with fresh copies"
            );
            if let Err(e) = self.vault.store_damaged_list(&list) {
                tracing::warn!(error = %e, "could not update the list of damaged chunks");
            }
        }
        if let Some(w) = self.writer.as_ref() {
            self.writer_committed = w.len();
        }
        if adopting {
            for a in &mut self.adopted {
                a.committed = true;
            }
        }
        self.writer_is_new = false;
        self.pending.clear();
        self.kinds.clear();
        self.pending_children.clear();
        self.pending_batch_bytes = 0;
        Ok(())
    }

    /// Commits everything appended, plus `batch` (a point and its item),
    /// in one synced index write. When this returns `Ok`, the point is
    /// durable.
    pub fn commit(mut self, batch: IndexBatch) -> Result<()> {
        self.commit_inner(batch, true)?;
        self.finished = true;
        // A point's commit is large (its block map, counts and chunks):
        // written out now, it is not replayed by every later open.
        if let Err(e) = self.vault.index.flush() {
            tracing::warn!(error = %e, "could not flush the index after a commit");
        }
        if let Some(l) = self.lease.take()
            && let Err(e) = l.release()
        {
            tracing::warn!(error = %e, "could not end the writer lease; it expires by itself");
        }
        Ok(())
    }
}
