//! The quarantine: where a copy keeps vault files that the index does not
//! know, instead of deleting them on the index's word alone.
//!
//! A segment no index entry names (a backup killed before its commit), a
//! manifest, item or policy file the index does not know (a point that was
//! never acknowledged, a copy that missed a prune), and a segment or
//! catalog file replication would remove from the secondary are moved to
//! `quarantine/<their name>` in the same copy (through [`Store::rename`],
//! so a local copy moves them without copying). They are deleted only by
//! [`purge`], which `coffre gc` runs on every synchronous copy and
//! `coffre replicate` on the secondary, and only when the vault's complete
//! index shows they are unreferenced:
//! - a segment, when every record in it holds a chunk the index places in
//!   another segment, or one it neither places nor counts a reference to;
//! - a point manifest, only when the index has that same point (item and
//!   sequence number), or records that retention pruned it (item, sequence
//!   and the same block-map root, [`crate::index::IndexBatch::prune_point`]):
//!   a manifest of any other point the index does not know stays,
//!   whatever the index says of its chunks (they may look unreferenced
//!   precisely because the index lacks the point);
//! - an item file, when the index has no point of that item; a policy
//!   file, always (a policy is settings, not data).
//!
//! Anything else (a file that does not decode, a segment whose records
//! cannot be read) stays. `coffre verify` reports what the quarantine
//! holds; a user who knows better can move a file back, or run
//! `vault rebuild-index`, which never reads the quarantine.

use crate::error::Result;
use crate::format::catalog_files::{self, ITEMS_DIR, POINTS_DIR, POLICIES_DIR};
use crate::format::scan::scan_segment;
use crate::format::segment::{SEGMENTS_DIR, parse_segment_file_name};
use crate::index::Index;
use crate::store::{Store, join};

/// The folder of a copy that holds quarantined files.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Moves `name` into the quarantine of `store` and returns its new name
/// (`quarantine/<name>`, or with `~N` appended when that is taken).
pub fn quarantine(store: &dyn Store, name: &str, why: &str) -> Result<String> {
    let base = join(QUARANTINE_DIR, name);
    let mut to = base.clone();
    let mut n = 0u32;
    while store.size(&to)?.is_some() {
        n += 1;
        to = format!("{base}~{n}");
    }
    store.rename(name, &to)?;
    tracing::warn!(copy = %store.location(), file = %name, to = %to, reason = why, "moved to quarantine (not deleted)");
    Ok(to)
}

/// The files in the quarantine of `store` (full names, sorted).
pub fn list(store: &dyn Store) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut dirs = vec![QUARANTINE_DIR.to_string()];
    while let Some(dir) = dirs.pop() {
        for n in store.list(&dir)? {
            match n.strip_suffix('/') {
                Some(sub) => dirs.push(join(&dir, sub)),
                None if !n.starts_with('.') => out.push(join(&dir, &n)),
                None => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The original name of a quarantined file (`quarantine/` and any `~N`
/// taken off).
pub fn original_name(q: &str) -> &str {
    let rest = q
        .strip_prefix(QUARANTINE_DIR)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(q);
    match rest.rsplit_once('~') {
        Some((base, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => base,
        _ => rest,
    }
}

/// What a purge did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    /// Files deleted (shown unreferenced).
    pub deleted: u64,
    /// Bytes they held.
    pub bytes: u64,
    /// Files kept (referenced, or not readable).
    pub kept: u64,
}

/// Deletes the files of `store`'s quarantine that `index` (which must be
/// complete) shows unreferenced; keeps the rest.
pub fn purge(
    store: &dyn Store,
    index: &Index,
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<Purged> {
    let mut out = Purged::default();
    for q in list(store)? {
        let size = store.size(&q)?.unwrap_or(0);
        if unreferenced(store, index, &q, keys)? {
            store.delete(&q)?;
            tracing::info!(copy = %store.location(), file = %q, bytes = size, "deleted a quarantined file no point needs");
            out.deleted += 1;
            out.bytes += size;
        } else {
            out.kept += 1;
        }
    }
    Ok(out)
}

/// True when `index` shows quarantined file `q` unneeded (a sealed
/// catalog file is opened under its original name).
fn unreferenced(
    store: &dyn Store,
    index: &Index,
    q: &str,
    keys: Option<&crate::crypto::VaultKeys>,
) -> Result<bool> {
    let orig = original_name(q);
    let Some((dir, file)) = orig.split_once('/') else {
        return Ok(false);
    };
    match dir {
        SEGMENTS_DIR => {
            let Some(id) = parse_segment_file_name(file) else {
                return Ok(false);
            };
            let size = store.size(q)?.unwrap_or(0);
            let mut failed = false;
            let mut read = |off: u64, buf: &mut [u8]| {
                let ok = store.read_at(q, off, buf).is_ok();
                failed |= !ok;
                ok
            };
            let scan = scan_segment(id, size, &mut read);
            if failed {
                return Ok(false);
            }
            // Bytes between records the scan could not read as records (a
            // damaged header) may hold a chunk no one can vouch for: such a
            // segment stays, unless those bytes are zeros (a hole GC
            // punched). Past the last whole record is a torn append (what a
            // killed session leaves), not hidden data.
            let header = crate::format::segment::SEGMENT_HEADER_LEN.min(size);
            let gaps = crate::format::scan::gaps(&scan.records, header, scan.end);
            if !gaps
                .iter()
                .all(|&(start, end)| crate::copies::segment::reads_as_zeros(store, q, start, end))
            {
                return Ok(false);
            }
            for r in &scan.records {
                let placed = index.chunk(&r.id)?;
                let needed = match placed {
                    // The index reads it from elsewhere.
                    Some(loc) => loc.segment == id,
                    None => index.chunk_ref(&r.id)?.is_some_and(|e| e.count > 0),
                };
                if needed {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        POINTS_DIR => {
            let Some(bytes) = store.get(q)? else {
                return Ok(false);
            };
            let Ok(p) = catalog_files::decode_point_in(orig, &bytes, keys) else {
                return Ok(false);
            };
            // Only when the index has this point is the file only stale.
            // A point the index does not know may be one a rebuild or a
            // copy missed, and this file its last manifest: whether its
            // chunks are placed says nothing (GC may have unplaced them
            // because the index lacked the point), so it stays and
            // `coffre verify` reports it.
            // A point retention pruned (the same root: not another point
            // that reused the item's name and sequence) is garbage too.
            Ok(index.points(&p.item)?.iter().any(|k| k.seq == p.seq)
                || index.pruned_root(&p.item, p.seq)? == Some(p.block_map))
        }
        ITEMS_DIR => {
            let Some(bytes) = store.get(q)? else {
                return Ok(false);
            };
            let Ok(i) = catalog_files::decode_item_in(orig, &bytes, keys) else {
                return Ok(false);
            };
            Ok(index.points(&i.name)?.is_empty())
        }
        POLICIES_DIR => Ok(true),
        _ => Ok(false),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn a_quarantined_file_keeps_its_bytes_and_its_original_name() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path());
        s.put("segments/0000000000000001.seg", b"abc").unwrap();
        let q = quarantine(&s, "segments/0000000000000001.seg", "test").unwrap();
        assert_eq!(q, "quarantine/segments/0000000000000001.seg");
        s.put("segments/0000000000000001.seg", b"def").unwrap();
        let q2 = quarantine(&s, "segments/0000000000000001.seg", "test").unwrap();
        assert_eq!(q2, "quarantine/segments/0000000000000001.seg~1");
        assert_eq!(original_name(&q2), "segments/0000000000000001.seg");
        assert_eq!(list(&s).unwrap(), vec![q.clone(), q2.clone()]);
        assert_eq!(s.get(&q).unwrap().unwrap(), b"abc");
        assert_eq!(s.get(&q2).unwrap().unwrap(), b"def");
        assert!(s.size("segments/0000000000000001.seg").unwrap().is_none());
    }
}
