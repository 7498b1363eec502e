//! What a writer's open does after a crash: cut uncommitted segment tails,
//! quarantine segments and catalog files the complete index does not know,
//! and write the catalog files it lacks.

use super::*;

impl Vault {
    /// Cuts every segment back to its committed length and moves segment
    /// files the index does not know to the quarantine, on every
    /// synchronous copy; only with a complete index. Returns the bytes
    /// reclaimed on the primary.
    pub(super) fn reclaim_uncommitted(&self) -> Result<u64> {
        let infos = self.index.segment_infos()?;
        let mut reclaimed = 0;
        for c in self.copies.sync_copies() {
            let primary = c.role == Role::Primary;
            for name in c.store.list(SEGMENTS_DIR)? {
                let Some(id) = parse_segment_file_name(&name) else {
                    if name.starts_with('.') && name.contains(".tmp-") {
                        let _ = c.store.delete(&crate::store::join(SEGMENTS_DIR, &name));
                    }
                    continue;
                };
                if !self.segment_namespace().contains(&id) {
                    // Another host's segment in a shared vault.
                    continue;
                }
                let full = segment_name(id);
                let len = c.store.size(&full)?.unwrap_or(0);
                match infos.get(&id) {
                    // GC retired it; it goes when no reader can still need it.
                    Some(i) if i.retired => {}
                    // A segment the (complete) index does not know: a
                    // session killed before its first commit left it. It
                    // is kept aside, not deleted (`crate::copies::quarantine`).
                    None => {
                        crate::index::state::check_complete(&self.dir)?;
                        crate::copies::quarantine::quarantine(
                            c.store.as_ref(),
                            &full,
                            "a segment the index does not know",
                        )?;
                        if primary {
                            reclaimed += len;
                        }
                    }
                    Some(&SegmentInfo { committed, .. }) if len > committed => {
                        // Bytes past the committed length of a complete
                        // index were never acknowledged.
                        crate::index::state::check_complete(&self.dir)?;
                        c.store.truncate(&full, committed)?;
                        tracing::info!(copy = %c.dir.display(), segment = %full, bytes = len - committed, "cut uncommitted tail");
                        if primary {
                            reclaimed += len - committed;
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        self.copies.forget();
        Ok(reclaimed)
    }

    /// Makes every synchronous copy's catalog files match the index: a
    /// manifest written by a session that crashed before its index commit
    /// names a point that was never acknowledged (and chunks just cut
    /// off), so it goes to the quarantine; a missing one (a vault older than the files, a
    /// copy that was down) is written. Item and policy files are rewritten
    /// when they differ.
    pub(super) fn reconcile_catalog_files(&self) -> Result<()> {
        let mut want: HashMap<String, Vec<u8>> = HashMap::new();
        for item in self.index.items()? {
            want.insert(
                catalog_files::item_file(&item.name),
                catalog_files::encode_item(&item),
            );
            for p in self.index.points(&item.name)? {
                want.insert(
                    catalog_files::point_file(&p.item, p.seq),
                    catalog_files::encode_point(&p),
                );
            }
        }
        for (name, value) in self.index.policy_values()? {
            let file = catalog_files::PolicyFile {
                name: name.clone(),
                policy: value,
            };
            want.insert(
                catalog_files::policy_file(&name),
                catalog_files::encode_policy(&file),
            );
        }
        self.copies.for_each_sync(|c| {
            let have = crate::copies::state_files::list_catalog_files(c.store.as_ref())?;
            for name in &have {
                if !want.contains_key(name) {
                    crate::index::state::check_complete(&self.dir)?;
                    crate::copies::quarantine::quarantine(
                        c.store.as_ref(),
                        name,
                        "a catalog file the index does not know",
                    )?;
                }
            }
            for (name, bytes) in &want {
                let is_point = name.starts_with(catalog_files::POINTS_DIR);
                let same = if is_point {
                    have.contains(name)
                } else {
                    c.store.get(name)?.is_some_and(|stored| {
                        crate::format::sealed_file::same_content(name, &stored, bytes, self.keys())
                    })
                };
                if !same {
                    c.store
                        .put(name, &crate::copies::seal(name, bytes, self.keys())?)?;
                }
            }
            Ok(())
        })
    }
}
