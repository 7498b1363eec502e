//! Whether a vault's index is *complete*: the only index anything may
//! trust before it deletes or truncates vault data.
//!
//! The index is a cache of the copies, and `vault rebuild-index` rebuilds
//! it. A rebuild:
//! 1. writes the marker [`REBUILD_MARKER`] durably (write, fsync, rename,
//!    directory fsync) before anything else;
//! 2. builds the new index in [`BUILD_DIR`] (the old one stays in place);
//! 3. renames the old index to `index.old-<pid>`, the new one to `index`,
//!    and fsyncs the vault directory;
//! 4. removes every `index.old-*` (only now: the new index is complete and
//!    in place), fsyncs the directory;
//! 5. removes the marker, last, and fsyncs the directory.
//!
//! So an index is complete exactly when the marker is absent and no
//! `index.old-*` is left: the marker covers an interrupted rebuild of this
//! version, and a leftover `index.old-*` without a marker is what an
//! interrupted rebuild of an older version (which filled `index` in
//! place) leaves. A vault written before the marker existed and never
//! rebuilt has neither, and opens as before.
//!
//! An open (read or write) of a vault whose index is incomplete fails with
//! [`StoreError::IndexIncomplete`]: nothing is read from that index,
//! nothing is deleted or cut, and the message says to run
//! `coffre vault rebuild-index` again, which finishes the job.

use std::path::Path;

use crate::error::{Result, StoreError};
use crate::index::INDEX_DIR;
use crate::store::{LocalStore, Store};

/// Present while a rebuild of the index is in progress (or was
/// interrupted). Its content is informational (what rebuilt it); only its
/// existence counts.
pub const REBUILD_MARKER: &str = "index.rebuilding";

/// Where a rebuild builds the new index before renaming it into place.
pub const BUILD_DIR: &str = "index.rebuild";

/// Prefix of an old index renamed away by a rebuild.
pub const OLD_PREFIX: &str = "index.old-";

/// Why the index of the vault at `dir` is incomplete, or `None` when it is
/// complete (it may still be missing: see [`StoreError::IndexMissing`]).
///
/// What cannot be checked (an I/O error looking for the marker or listing
/// the vault directory) counts as incomplete: nothing may delete on an
/// index it could not vouch for.
pub fn incomplete_reason(dir: &Path) -> Option<String> {
    let store = LocalStore::new(dir);
    match store.size(REBUILD_MARKER) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Some(format!(
                "{REBUILD_MARKER} is present: a rebuild of the index is running or was interrupted"
            ));
        }
        Err(e) => {
            return Some(format!(
                "cannot tell whether {REBUILD_MARKER} is present: {e}"
            ));
        }
    }
    let old = match list_old_indexes(&store) {
        Ok(old) => old,
        Err(e) => {
            return Some(format!(
                "cannot list {} to look for interrupted rebuilds: {e}",
                dir.display()
            ));
        }
    };
    if let Some(first) = old.first() {
        return Some(format!(
            "{first} is present: a rebuild of the index by an older coffre was interrupted, and {INDEX_DIR} may hold only part of the vault"
        ));
    }
    None
}

/// Fails with [`StoreError::IndexIncomplete`] unless the index of the
/// vault at `dir` is complete.
pub fn check_complete(dir: &Path) -> Result<()> {
    match incomplete_reason(dir) {
        None => Ok(()),
        Some(reason) => Err(StoreError::IndexIncomplete {
            path: dir.to_path_buf(),
            reason,
        }),
    }
}

/// True when the index of `dir` is complete.
pub fn is_complete(dir: &Path) -> bool {
    incomplete_reason(dir).is_none()
}

/// Names of the old indexes (`index.old-*`) left in `dir`.
pub fn old_indexes(dir: &Path) -> Vec<String> {
    list_old_indexes(&LocalStore::new(dir)).unwrap_or_default()
}

/// [`old_indexes`], failing when the directory cannot be listed whole (a
/// missing vault directory included).
fn list_old_indexes(store: &LocalStore) -> Result<Vec<String>> {
    if !store.root().is_dir() {
        return Err(StoreError::io(
            "read directory",
            store.root(),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let mut out: Vec<String> = store
        .list("")?
        .into_iter()
        .map(|n| n.trim_end_matches('/').to_owned())
        // A name that is not UTF-8 (listed with U+FFFD) is none a rebuild
        // ever made, and could never be removed by its listed name.
        .filter(|n| n.starts_with(OLD_PREFIX) && !n.contains('\u{FFFD}'))
        .collect();
    out.sort();
    Ok(out)
}

/// Step 1 of a rebuild: marks the index of `dir` incomplete, durably.
pub fn mark_incomplete(dir: &Path, what: &str) -> Result<()> {
    LocalStore::new(dir).put(
        REBUILD_MARKER,
        format!(
            "coffre index rebuild in progress\npid {}\n{what}\n",
            std::process::id()
        )
        .as_bytes(),
    )
}

/// Steps 3-5 of a rebuild: puts the index built in `dir/BUILD_DIR` in
/// place, removes the old ones, then the marker. Each step is durable
/// before the next starts (every rename, removal and delete of the store
/// fsyncs the vault directory).
pub fn install_rebuilt(dir: &Path) -> Result<()> {
    let store = LocalStore::new(dir);
    if store.is_dir(INDEX_DIR) {
        let old = format!("{OLD_PREFIX}{}", std::process::id());
        store.remove_tree(&old)?;
        store.rename(INDEX_DIR, &old)?;
    }
    store.rename(BUILD_DIR, INDEX_DIR)?;
    // The new index is complete and in place: only now may the old ones go.
    for old in list_old_indexes(&store).unwrap_or_default() {
        store.remove_tree(&old)?;
    }
    store.delete(REBUILD_MARKER)?;
    Ok(())
}

/// Step 2's start: an empty build directory (a previous, interrupted
/// build's leftovers are a partial cache and go).
pub fn fresh_build_dir(dir: &Path) -> Result<std::path::PathBuf> {
    let store = LocalStore::new(dir);
    store.remove_tree(BUILD_DIR)?;
    store.create_dir(BUILD_DIR)?;
    Ok(dir.join(BUILD_DIR))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_vault_directory_that_cannot_be_checked_is_not_complete() {
        let d = tempfile::tempdir().unwrap();
        // Not a directory: looking for the marker fails with ENOTDIR.
        let file = d.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let reason = incomplete_reason(&file).expect("counted as complete");
        assert!(reason.contains("cannot"), "{reason}");
    }

    #[test]
    fn a_marker_or_a_leftover_old_index_makes_the_index_incomplete() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::create_dir(dir.join(INDEX_DIR)).unwrap();
        // A vault of an older version, never rebuilt: complete.
        assert!(is_complete(dir));
        mark_incomplete(dir, "test").unwrap();
        assert!(matches!(
            check_complete(dir),
            Err(StoreError::IndexIncomplete { .. })
        ));
        let built = fresh_build_dir(dir).unwrap();
        std::fs::write(built.join("new"), b"x").unwrap();
        std::fs::write(dir.join(INDEX_DIR).join("old"), b"x").unwrap();
        // What an older coffre's interrupted rebuild left.
        std::fs::create_dir(dir.join("index.old-1")).unwrap();
        install_rebuilt(dir).unwrap();
        assert!(is_complete(dir));
        assert!(dir.join(INDEX_DIR).join("new").exists());
        assert!(old_indexes(dir).is_empty());
        assert!(!dir.join(BUILD_DIR).exists());
        // A leftover old index alone (no marker): incomplete.
        std::fs::create_dir(dir.join("index.old-77")).unwrap();
        let e = check_complete(dir).unwrap_err().to_string();
        assert!(
            e.contains("index.old-77") && e.contains("rebuild-index"),
            "{e}"
        );
    }
}
