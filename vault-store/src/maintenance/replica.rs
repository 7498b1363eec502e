//! Adding an LRS replica to an open vault: the copy is made (or an
//! earlier one of this vault reused), every committed segment is filled
//! from the good copies, and only then does the config name it (the new
//! copy first, so a copy the config names always holds a config).

use std::path::Path;
use std::sync::Arc;

use crate::copies::segment::refill;
use crate::copies::{Copy, init_copy};
use crate::error::Result;
use crate::format::catalog_files::Role;
use crate::format::segment::segment_name;
use crate::store::LocalStore;
use crate::vault::Vault;

/// Adds (or re-adds) the replica at `dir` (absolute) and fills its
/// segments; returns the bytes copied. The catalog files follow when the
/// vault is next opened for writing.
pub fn add_replica(vault: &Vault, dir: &Path) -> Result<u64> {
    let mut cfg = vault.config().clone();
    init_copy(dir, &cfg, Role::Replica)?;
    let copy = Copy {
        role: Role::Replica,
        dir: dir.to_path_buf(),
        store: Arc::new(LocalStore::new(dir)),
    };
    let mut copied = 0;
    for (id, info) in vault.index().segment_infos()? {
        if info.retired {
            continue;
        }
        let name = segment_name(id);
        let have = copy.store.size(&name)?.unwrap_or(0);
        if have < info.committed {
            refill(vault.copies(), &copy, &name, info.committed)?;
            copied += info.committed - have;
        }
    }
    if !cfg.replicas.iter().any(|r| r == dir) {
        cfg.replicas.push(dir.to_path_buf());
    }
    vault.store_config_joining(&cfg, Some(&copy))?;
    Ok(copied)
}
