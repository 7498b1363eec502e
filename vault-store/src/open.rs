//! Opening a vault: the entry points [`Vault::open`], [`Vault::open_wait`]
//! and [`Vault::open_with`]. They stand above the vault, the shared-vault
//! refresh and the index rebuild: a shared vault's cache is refreshed from
//! the store first, and a copy opened on its own (the primary is gone) has
//! its index rebuilt from the copy when it is missing or incomplete. Then
//! the vault opens ([`crate::vault`]).

use std::path::Path;
use std::time::Duration;

use crate::error::{Result, StoreError};
use crate::format::catalog_files::Role;
use crate::format::config::VaultConfig;
use crate::format::remote::Remote;
use crate::index::INDEX_DIR;
use crate::vault::{Access, OpenOptions, Vault, copy_role};

impl Vault {
    /// Opens an existing vault. Writers take the lock and clean up what an
    /// interrupted writer left behind.
    pub fn open(dir: &Path, access: Access) -> Result<Vault> {
        Self::open_wait(dir, access, Duration::ZERO)
    }

    /// Like [`Vault::open`], but a writer waits up to `wait` for the lock.
    pub fn open_wait(dir: &Path, access: Access, wait: Duration) -> Result<Vault> {
        Self::open_with(
            dir,
            access,
            &OpenOptions {
                wait,
                ..OpenOptions::default()
            },
        )
    }

    /// [`Vault::open`] with options.
    pub fn open_with(dir: &Path, access: Access, opts: &OpenOptions) -> Result<Vault> {
        let wait = opts.wait;
        if !dir.is_dir() {
            return Err(StoreError::NotAVault {
                path: dir.to_path_buf(),
            });
        }
        let config = VaultConfig::load_with(dir, opts.unlock.as_deref())?;
        let role = copy_role(dir, config.keys().map(|k| k.as_ref()));
        let remote = Remote::load(dir)?;
        if !opts.skip_refresh && remote.is_some() {
            crate::shared::refresh_cache(dir, wait, access, opts.unlock.clone())?;
        }
        if role != Role::Primary {
            // A replica or the secondary opened on its own (the primary is
            // gone): a vault by itself, whose index is a local cache.
            if access == Access::Write && !opts.allow_copy_write {
                return Err(StoreError::CopyNotWritable {
                    path: dir.to_path_buf(),
                    role: role.to_string(),
                });
            }
            // Its index is a cache of this copy alone: missing or
            // incomplete (an interrupted rebuild), it is rebuilt from the
            // copy, which deletes nothing before the new index is whole.
            if (!dir.join(INDEX_DIR).is_dir() || !crate::index::state::is_complete(dir))
                && !opts.allow_copy_write
            {
                drop(crate::maintenance::rebuild::rebuild_index_unlocked(
                    dir,
                    dir,
                    wait,
                    opts.unlock.clone(),
                )?);
            }
        }
        Vault::open_prepared(dir, access, opts, config, role, remote)
    }
}
