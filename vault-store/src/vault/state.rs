//! The vault's small state files, through the copies' stores: a copy's
//! identity (which vault, which role), the config written to every copy,
//! and the damaged list.

use super::*;
use crate::copies::state_files;
use crate::store::{LocalStore, SharedStore};

impl Vault {
    /// The store of the vault directory: the primary copy of a local
    /// vault (wrapped as the copies are), a shared vault's local cache.
    pub(super) fn dir_store(&self) -> SharedStore {
        match self.remote {
            None => self.copies.primary().store.clone(),
            Some(_) => std::sync::Arc::new(LocalStore::new(&self.dir)),
        }
    }

    /// The chunks `verify` found damaged on every copy (none when the list
    /// is missing or unreadable: healing is an optimisation).
    pub fn damaged_list(&self) -> std::collections::BTreeSet<ChunkId> {
        state_files::load_damaged(self.dir_store().as_ref())
    }

    /// Replaces the damaged list (removed when empty).
    pub fn store_damaged_list(&self, ids: &std::collections::BTreeSet<ChunkId>) -> Result<()> {
        state_files::store_damaged(self.dir_store().as_ref(), ids)
    }

    /// Replaces the vault config on every synchronous copy.
    /// In a shared vault the store gets the config without the host-local
    /// settings ([`VaultConfig::without_host_settings`]), which go to this
    /// host's cache alone.
    pub fn store_config(&self, cfg: &VaultConfig) -> Result<()> {
        self.store_config_joining(cfg, None)
    }

    /// [`Vault::store_config`] for a config that adds the copy `joining`:
    /// the new copy gets the config first, so a copy that the vault's
    /// config names always holds a config of its own (an `init_copy`
    /// reused after a kill may have left it without one).
    pub fn store_config_joining(
        &self,
        cfg: &VaultConfig,
        joining: Option<&crate::copies::Copy>,
    ) -> Result<()> {
        cfg.validate()?;
        let bytes = if self.remote.is_some() {
            cfg.clone().without_host_settings().0.encode()?
        } else {
            cfg.encode()?
        };
        if let Some(copy) = joining {
            copy.store.put(crate::format::config::CONFIG_FILE, &bytes)?;
        }
        self.copies
            .for_each_sync(|c| c.store.put(crate::format::config::CONFIG_FILE, &bytes))?;
        if self.remote.is_some() {
            return cfg.store(&self.dir);
        }
        Ok(())
    }
}

/// The role the copy at `dir` says it has (a vault from before copies
/// existed has no identity: it is a primary).
pub fn copy_role(dir: &Path) -> Role {
    state_files::copy_role(&LocalStore::new(dir))
}
