//! A copy's identity file (which vault, which role) and the vault config
//! written to every copy.

use super::*;

impl Vault {
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
            cfg.clone().without_host_settings().0.encode()
        } else {
            cfg.encode()
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
    std::fs::read(dir.join(COPY_FILE))
        .ok()
        .and_then(|b| catalog_files::decode_copy(&b).ok())
        .map_or(Role::Primary, |c| c.role)
}

/// Writes the identity file of a copy at `dir`.
pub(super) fn write_identity(dir: &Path, config: &VaultConfig, role: Role) -> Result<()> {
    crate::store::local::durable::write_atomic(
        &dir.join(COPY_FILE),
        &catalog_files::encode_copy(&CopyIdentity {
            vault_id: config.vault_id.clone(),
            vault_name: config.name.clone(),
            role,
        }),
    )
}
