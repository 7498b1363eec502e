//! Claiming a folder as a vault's area: the default numbered place under
//! a root of areas, and the identity file written into a new area.

use std::path::{Path, PathBuf};

use coffre_vault_store::store::local::durable::write_atomic;
use coffre_vault_store::store::local::private;

use super::checks::{
    check_owner_if_there, check_root_owner, current_euid, lock_of, refuse_non_empty,
};
use super::{AREA_FILE, AreaIdentity, Keys, identity_bytes, read_identity};
use crate::error::{Result, SnapError};

/// Makes `dir` an area of `owner`, or checks that it is one. The folder,
/// chosen or not, is held to the rule of the root of areas
/// ([`check_root_owner`]): a folder someone else owns or may write to
/// could be swapped for symlinks that send expiry's deletions elsewhere.
pub(super) fn claim(dir: &Path, owner: &AreaIdentity, keys: Keys<'_>) -> Result<()> {
    check_owner_if_there(dir)?;
    match read_identity(dir, keys)? {
        Some(id) if id.vault_id == owner.vault_id => Ok(()),
        Some(id) => Err(SnapError::AreaUnusable {
            dir: dir.to_path_buf(),
            source: std::io::Error::other(super::owner_of(&id)),
        }),
        None => {
            // Never take over someone's folder: only a new or empty one
            // becomes an area.
            if let Err(e) = refuse_non_empty(dir) {
                // Unless another capture of this vault just made it one.
                return match read_identity(dir, keys)? {
                    Some(id) if id.vault_id == owner.vault_id => Ok(()),
                    _ => Err(e),
                };
            }
            if let Some(lock) = lock_of(dir) {
                return Err(SnapError::AreaLocked {
                    dir: dir.to_path_buf(),
                    lock,
                });
            }
            private::create_private_dir(dir).map_err(|e| SnapError::AreaUnusable {
                dir: dir.to_path_buf(),
                source: e,
            })?;
            // Checked again: something may have appeared in between.
            check_root_owner(dir, current_euid())?;
            let path = dir.join(AREA_FILE);
            write_atomic(&path, &identity_bytes(owner, keys, &path)?)?;
            Ok(())
        }
    }
}

/// `<base>/<vault-name>_<n>`: the first `n` that is this vault's or free.
pub(super) fn default_dir(base: &Path, owner: &AreaIdentity, keys: Keys<'_>) -> Result<PathBuf> {
    if std::fs::symlink_metadata(base).is_err() {
        // The shared root may be entered by every vault's owner, but only
        // root can list other users' areas (each area is 0700).
        private::create_dir_all(base).map_err(|e| SnapError::AreaUnusable {
            dir: base.to_path_buf(),
            source: e,
        })?;
    }
    check_root_owner(base, current_euid())?;
    for n in 1..10_000 {
        let dir = base.join(format!("{}_{n}", owner.vault_name));
        match read_identity(&dir, keys)? {
            Some(id) if id.vault_id == owner.vault_id => return Ok(dir),
            Some(_) => continue,
            None if dir.exists()
                && std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) =>
            {
                continue;
            }
            None => {
                claim(&dir, owner, keys)?;
                return Ok(dir);
            }
        }
    }
    Err(SnapError::AreaUnusable {
        dir: base.to_path_buf(),
        source: std::io::Error::other("no free area name"),
    })
}
