//! What a write session does differently in a vault in object storage,
//! beside the local case: the writer's lease and the segments GC condemned
//! (taken before the session writes), the chunk lists each commit uploads,
//! the catalog as the index held it (replaced only if the store still
//! holds the same), and the fence after the manifests.

use super::*;

impl Vault {
    /// Takes a shared vault's writer lease (`None` for a local vault) and
    /// adds to `heal` the chunks of segments GC condemned or that left the
    /// store: they are stored again rather than deduplicated against (like
    /// damaged chunks).
    pub(super) fn take_writer_lease(
        &self,
        heal: &mut std::collections::HashSet<ChunkId>,
    ) -> Result<Option<crate::lease::WriterLease>> {
        Ok(match &self.remote {
            Some(r) => {
                let (lease, condemned, present) = crate::lease::WriterLease::take(
                    self.copies.primary().store.clone(),
                    r.host_tag,
                    self.lease_ttl,
                    self.clock.clone(),
                )?;
                let gone = self
                    .index
                    .segment_infos()?
                    .into_keys()
                    .filter(|s| !present.contains(s));
                for seg in condemned.into_iter().chain(gone) {
                    heal.extend(
                        self.index
                            .segment_chunks(seg)?
                            .into_iter()
                            .map(|(_, id)| id),
                    );
                }
                Some(lease)
            }
            None => None,
        })
    }

    /// What the index holds now for the item and policy files among
    /// `files` (those it has), encoded as their files are: a shared vault
    /// replaces them only if the store still holds the same.
    pub(super) fn catalog_before(
        &self,
        files: &[(String, Option<Vec<u8>>)],
    ) -> Result<HashMap<String, Vec<u8>>> {
        let wanted: std::collections::HashSet<&str> =
            files.iter().map(|(n, _)| n.as_str()).collect();
        let mut out = HashMap::new();
        for item in self.index.items()? {
            let name = catalog_files::item_file(&item.name);
            if wanted.contains(name.as_str()) {
                out.insert(name, catalog_files::encode_item(&item));
            }
        }
        for (name, policy) in self.index.policy_values()? {
            let file = catalog_files::policy_file(&name);
            if wanted.contains(file.as_str()) {
                out.insert(
                    file,
                    catalog_files::encode_policy(&catalog_files::PolicyFile { name, policy }),
                );
            }
        }
        Ok(out)
    }
}

impl WriteSession<'_> {
    /// The fence: once the manifests are in the store, one conditional
    /// renewal of the lease proves no GC removed it (and deleted what they
    /// count on) before they were there for its mark. A writer that
    /// stalled past its lease fails here, unacknowledged, and takes back
    /// the manifests of points it just added. Nothing for a local vault.
    pub(super) fn confirm_lease(&mut self, files: &[(String, Option<Vec<u8>>)]) -> Result<()> {
        if let Some(l) = self.lease.as_ref() {
            // The fence: the manifests are in the store; one conditional
            // renewal now proves no GC removed the lease (and deleted what
            // they count on) before they were there for its mark. A writer
            // that stalled past its lease fails here, unacknowledged, and
            // takes back the manifests of points it just added.
            let r = l.confirm_held();
            if r.is_err() {
                let added = self.points_added(files);
                if let Err(e) = self.vault.copies.delete_files(&added) {
                    tracing::warn!(error = %e, "could not take back the manifests of an unconfirmed commit; `coffre verify` reports them");
                }
            }
            self.poison(r)?;
        }
        Ok(())
    }

    /// The manifests among `files` of points the index does not have yet
    /// (added by this commit), as deletions; a manifest rewritten for a
    /// point already committed is never among them.
    pub(super) fn points_added(
        &self,
        files: &[(String, Option<Vec<u8>>)],
    ) -> Vec<(String, Option<Vec<u8>>)> {
        files
            .iter()
            .filter(|(name, _)| name.starts_with(catalog_files::POINTS_DIR))
            .filter_map(|(name, bytes)| {
                let p = catalog_files::decode_point(bytes.as_deref()?).ok()?;
                let known = self
                    .vault
                    .index
                    .points(&p.item)
                    .map_or(true, |ps| ps.iter().any(|k| k.seq == p.seq));
                (!known).then(|| (name.clone(), None))
            })
            .collect()
    }

    /// Uploads one chunk list per segment this commit appended to.
    pub(super) fn put_chunk_lists(&self) -> Result<()> {
        let mut by_segment: std::collections::BTreeMap<
            u64,
            Vec<crate::format::chunk_list::ListedChunk>,
        > = Default::default();
        for (id, loc) in &self.pending {
            by_segment.entry(loc.segment).or_default().push(
                crate::format::chunk_list::ListedChunk {
                    id: *id,
                    offset: loc.offset,
                    len: loc.len,
                    plain_len: loc.plain_len,
                },
            );
        }
        let store = &self.vault.copies.primary().store;
        for (segment, entries) in by_segment {
            let start = entries.iter().map(|e| e.offset).min().unwrap_or(0);
            store.put(
                &crate::format::chunk_list::list_name(segment, start),
                &crate::format::chunk_list::encode(&entries),
            )?;
        }
        Ok(())
    }
}
