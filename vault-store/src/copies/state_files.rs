//! A copy's small state files, read and written through its [`Store`]:
//! the vault config, the copy's identity, the damaged list, a shared
//! vault's pointer (`remote`) and the replication state. Their byte
//! layouts are in [`crate::format`]; here is only where they live and what
//! a missing or damaged one means.

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::{Result, StoreError};
use crate::format::catalog_files::{self, COPY_FILE, CopyIdentity, Role};
use crate::format::chunk_id::ChunkId;
use crate::format::config::{CONFIG_FILE, VaultConfig};
use crate::format::damaged::{self, DAMAGED_FILE};
use crate::format::envelope;
use crate::format::remote::{REMOTE_FILE, Remote};
use crate::format::repl_state::{ReplicationState, STATE_FILE};
use crate::store::{LocalStore, Store};

/// `name` decoded, or `None` when it is missing, unreadable or does not
/// decode: for the state files whose absence has a safe meaning.
fn read_lenient<T>(
    store: &dyn Store,
    name: &str,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    store.get(name).ok().flatten().and_then(|b| decode(&b))
}

/// Reads the config of the copy in `store`; `dir` names the vault in
/// errors. A copy without one is not a vault; an encrypted one's is
/// [`StoreError::KeyNeeded`].
pub fn load_config(store: &dyn Store, dir: &Path) -> Result<VaultConfig> {
    load_config_with(store, dir, None)
}

/// [`load_config`], an encrypted vault's unlocked with `unlock`.
pub fn load_config_with(
    store: &dyn Store,
    dir: &Path,
    unlock: Option<&dyn crate::crypto::Unlock>,
) -> Result<VaultConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = match store.get(CONFIG_FILE) {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Err(StoreError::NotAVault {
                path: dir.to_path_buf(),
            });
        }
        Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(StoreError::NotAVault {
                path: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(e),
    };
    let stored = VaultConfig::read(&bytes, &path)?;
    let keys = match (stored.encryption(), unlock) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(StoreError::KeyNeeded {
                path: dir.to_path_buf(),
            });
        }
        (Some(enc), Some(unlock)) => {
            let crypto = |error| StoreError::Crypto {
                path: dir.to_path_buf(),
                error,
            };
            let master = unlock.master_key(dir, &enc.slots).map_err(crypto)?;
            Some(std::sync::Arc::new(crate::crypto::VaultKeys::derive(
                &master, enc.cipher,
            )))
        }
    };
    stored.open(keys)
}

/// The format version the copy's config is stored at (0 if unreadable).
pub fn stored_config_version(store: &dyn Store) -> u32 {
    read_lenient(store, CONFIG_FILE, envelope::claimed_version).unwrap_or(0)
}

/// Replaces the copy's config durably.
pub fn store_config(store: &dyn Store, config: &VaultConfig) -> Result<()> {
    store.put(CONFIG_FILE, &config.encode()?)
}

/// The role the copy says it has (a vault from before copies existed has
/// no identity: it is a primary).
pub fn copy_role(store: &dyn Store) -> Role {
    read_lenient(store, COPY_FILE, |b| catalog_files::decode_copy(b).ok())
        .map_or(Role::Primary, |c| c.role)
}

/// Writes the copy's identity file.
pub fn write_identity(store: &dyn Store, config: &VaultConfig, role: Role) -> Result<()> {
    store.put(
        COPY_FILE,
        &catalog_files::encode_copy(&CopyIdentity {
            vault_id: config.vault_id.clone(),
            vault_name: config.name.clone(),
            role,
        }),
    )
}

/// The damaged chunks the copy lists (none when the file is missing or
/// unreadable: healing is an optimisation, never a condition).
pub fn load_damaged(store: &dyn Store) -> BTreeSet<ChunkId> {
    read_lenient(store, DAMAGED_FILE, |b| damaged::decode(b).ok()).unwrap_or_default()
}

/// Replaces the damaged list (removes the file when it is empty).
pub fn store_damaged(store: &dyn Store, ids: &BTreeSet<ChunkId>) -> Result<()> {
    if ids.is_empty() {
        store.delete(DAMAGED_FILE).map(drop)
    } else {
        store.put(DAMAGED_FILE, &damaged::encode(ids))
    }
}

/// The shared-vault pointer of the cache in `store`, if it is one; `dir`
/// names the file in errors.
pub fn load_remote(store: &dyn Store, dir: &Path) -> Result<Option<Remote>> {
    match store.get(REMOTE_FILE)? {
        Some(b) => Remote::decode(&b, &dir.join(REMOTE_FILE)).map(Some),
        None => Ok(None),
    }
}

/// Writes the shared-vault pointer durably.
pub fn store_remote(store: &dyn Store, remote: &Remote) -> Result<()> {
    store.put(REMOTE_FILE, &remote.encode())
}

/// The replication state the copy holds (empty when it has none or it is
/// damaged: replication then starts over, which is always safe).
pub fn load_replication_state(store: &dyn Store) -> ReplicationState {
    read_lenient(store, STATE_FILE, |b| ReplicationState::decode(b).ok()).unwrap_or_default()
}

/// Replaces the replication state durably.
pub fn store_replication_state(store: &dyn Store, state: &ReplicationState) -> Result<()> {
    store.put(STATE_FILE, &state.encode())
}

/// Every catalog file name in a copy (points, items, policies).
pub fn list_catalog_files(store: &dyn Store) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in [catalog_files::ITEMS_DIR, catalog_files::POLICIES_DIR] {
        for n in store.list(dir)? {
            if !n.ends_with('/') && !n.starts_with('.') {
                names.push(format!("{dir}/{n}"));
            }
        }
    }
    for item in store.list(catalog_files::POINTS_DIR)? {
        let Some(item) = item.strip_suffix('/') else {
            continue;
        };
        let sub = format!("{}/{item}", catalog_files::POINTS_DIR);
        for n in store.list(&sub)? {
            if n.ends_with(".point") {
                names.push(format!("{sub}/{n}"));
            }
        }
    }
    Ok(names)
}

impl VaultConfig {
    /// Reads `VAULT/config` (through a [`LocalStore`] of `vault_dir`).
    pub fn load(vault_dir: &Path) -> Result<Self> {
        load_config(&LocalStore::new(vault_dir), vault_dir)
    }

    /// Reads `VAULT/config`; an encrypted vault's is unlocked with
    /// `unlock` (without one, it is [`StoreError::KeyNeeded`]).
    pub fn load_with(vault_dir: &Path, unlock: Option<&dyn crate::crypto::Unlock>) -> Result<Self> {
        load_config_with(&LocalStore::new(vault_dir), vault_dir, unlock)
    }

    /// The format version `VAULT/config` is stored at (0 if unreadable).
    pub fn stored_version(vault_dir: &Path) -> u32 {
        stored_config_version(&LocalStore::new(vault_dir))
    }

    /// Writes `VAULT/config` atomically.
    pub fn store(&self, vault_dir: &Path) -> Result<()> {
        store_config(&LocalStore::new(vault_dir), self)
    }
}

impl Remote {
    /// The pointer of the cache at `dir`, if it is one.
    pub fn load(dir: &Path) -> Result<Option<Remote>> {
        load_remote(&LocalStore::new(dir), dir)
    }

    /// Writes it atomically.
    pub fn store(&self, dir: &Path) -> Result<()> {
        store_remote(&LocalStore::new(dir), self)
    }
}
