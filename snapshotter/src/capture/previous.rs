//! The item's earlier snapshots a capture builds on: the newest manifest
//! of a kind in the item folder.

use std::path::{Path, PathBuf};

use crate::manifest::SnapKind;

/// The newest complete chunk manifest of the item, other than `job`'s.
pub fn previous_manifest(
    item_dir: &Path,
    job: &str,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> Option<PathBuf> {
    previous_of_kind(item_dir, job, SnapKind::Chunks, keys)
}

pub(super) fn previous_of_kind(
    item_dir: &Path,
    job: &str,
    kind: SnapKind,
    keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
) -> Option<PathBuf> {
    let mut best: Option<(i64, u32, PathBuf)> = None;
    for e in std::fs::read_dir(item_dir).ok()?.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".snap") || name.starts_with(job) {
            continue;
        }
        let Ok((h, _, _)) = crate::manifest::summary(&path, keys) else {
            continue;
        };
        if h.kind != kind {
            continue;
        }
        let key = (h.created_s, h.created_ns);
        if best.as_ref().is_none_or(|b| (b.0, b.1) < key) {
            best = Some((key.0, key.1, path));
        }
    }
    best.map(|b| b.2)
}
