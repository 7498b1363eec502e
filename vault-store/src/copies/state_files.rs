//! A copy's small state files, read and written through its [`Store`]:
//! the vault config, the copy's identity, the damaged list, a shared
//! vault's pointer (`remote`) and the replication state. Their byte
//! layouts are in [`crate::format`]; here is only where they live and what
//! a missing or damaged one means. In an encrypted vault the identity,
//! the damaged list and the replication state are sealed
//! ([`crate::format::sealed_file`]) with the keys the callers pass (`None`
//! for a plain vault); one that does not open counts as damaged.

use std::collections::BTreeSet;
use std::path::Path;

use crate::crypto::VaultKeys;
use crate::error::{Result, StoreError};
use crate::format::catalog_files::{self, COPY_FILE, CopyIdentity, Role};
use crate::format::chunk_id::ChunkId;
use crate::format::config::{CONFIG_FILE, VaultConfig};
use crate::format::damaged::{self, DAMAGED_FILE};
use crate::format::envelope;
use crate::format::remote::{REMOTE_FILE, Remote};
use crate::format::repl_state::{ReplicationState, STATE_FILE};
use crate::format::sealed_file;
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

/// [`read_lenient`] of a file sealed in an encrypted vault (`keys`): one
/// that does not open is warned about and counts as missing.
fn read_sealed_lenient<T>(
    store: &dyn Store,
    name: &str,
    keys: Option<&VaultKeys>,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    read_lenient(store, name, |b| match sealed_file::open(name, b, keys) {
        Ok(plain) => decode(&plain),
        Err(e) => {
            tracing::warn!(copy = %store.location(), file = %name, error = %e, "refused a state file (not used)");
            None
        }
    })
}

/// Writes state file `name` (its plain envelope `plain`), sealed in an
/// encrypted vault.
pub fn put_sealed(
    store: &dyn Store,
    name: &str,
    plain: &[u8],
    keys: Option<&VaultKeys>,
) -> Result<()> {
    let bytes = sealed_file::seal(name, plain, keys).map_err(|e| StoreError::CorruptFile {
        path: std::path::PathBuf::from(store.location()).join(name),
        what: "sealed file",
        reason: e.to_string(),
    })?;
    store.put(name, &bytes)
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
        (None, Some(unlock)) => {
            if let Some(memory) = unlock.remembers_encrypted(dir) {
                return Err(StoreError::CorruptFile {
                    path,
                    what: "vault config",
                    reason: format!(
                        "this host opened the vault here encrypted before, and its config is now a plain one: refused (whoever can write the storage could have put it there, and new data would be written in clear); if the vault was re-created without encryption on purpose, remove {}",
                        memory.display()
                    ),
                });
            }
            None
        }
        (None, None) => None,
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
            let cipher = enc.cipher;
            let keys = std::sync::Arc::new(crate::crypto::VaultKeys::derive(&master, cipher));
            // The vault's id is sealed: opened first, it names the host's
            // memory of this copy (a vault replaced by another at the same
            // path starts a new memory).
            let vault_id = stored.open(Some(keys))?.vault_id;
            let keys = crate::crypto::VaultKeys::derive(&master, cipher)
                .with_generations(unlock.generations(dir, &vault_id));
            return VaultConfig::read(&bytes, &path)?.open(Some(std::sync::Arc::new(keys)));
        }
    };
    stored.open(keys)
}

/// The sealed state files of the encrypted vault at `dir` (job records,
/// the replication state, the damaged list, the list of snapshot areas)
/// that do not open with `keys`: each name and why. `verify` reports them;
/// every reader already refuses them.
pub fn refused_state_files(dir: &Path, keys: &VaultKeys) -> Vec<(String, String)> {
    let store = LocalStore::new(dir);
    let mut names: Vec<String> = store
        .list(crate::format::job::JOBS_DIR)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.ends_with(".job") && !n.starts_with('.'))
        .map(|n| format!("{}/{n}", crate::format::job::JOBS_DIR))
        .collect();
    names.sort();
    names.extend([STATE_FILE, DAMAGED_FILE, "snapshot-areas"].map(String::from));
    let mut out = Vec::new();
    for name in names {
        let Ok(Some(bytes)) = store.get(&name) else {
            continue;
        };
        if let Err(e) = sealed_file::open(&name, &bytes, Some(keys)) {
            out.push((name, e.to_string()));
        }
    }
    out
}

/// The keys that seal the state files of the vault at `dir` (job records,
/// the snapshot area's files): `given`, the keys the caller unlocked the
/// vault with, when it has them. Without them, a plain vault's files need
/// none (`None`) and an encrypted vault's are [`StoreError::KeyNeeded`]:
/// a caller that forgot the keys never writes a plain file into an
/// encrypted vault.
pub fn file_keys(
    dir: &Path,
    given: Option<&std::sync::Arc<VaultKeys>>,
) -> Result<Option<std::sync::Arc<VaultKeys>>> {
    if let Some(k) = given {
        return Ok(Some(k.clone()));
    }
    let store = LocalStore::new(dir);
    let version = stored_config_version(&store);
    // A config that is there but cannot be read may be an encrypted one:
    // never taken for a plain vault's.
    let unreadable = version == 0 && !matches!(store.size(CONFIG_FILE), Ok(None));
    if version >= crate::format::config::FORMAT_VERSION_SEALED || unreadable {
        return Err(StoreError::KeyNeeded {
            path: dir.to_path_buf(),
        });
    }
    Ok(None)
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
pub fn copy_role(store: &dyn Store, keys: Option<&VaultKeys>) -> Role {
    read_sealed_lenient(store, COPY_FILE, keys, |b| {
        catalog_files::decode_copy(b).ok()
    })
    .map_or(Role::Primary, |c| c.role)
}

/// Writes the copy's identity file (sealed with `config`'s keys in an
/// encrypted vault).
pub fn write_identity(store: &dyn Store, config: &VaultConfig, role: Role) -> Result<()> {
    put_sealed(
        store,
        COPY_FILE,
        &catalog_files::encode_copy(&CopyIdentity {
            vault_id: config.vault_id.clone(),
            vault_name: config.name.clone(),
            role,
        }),
        config.keys().map(|k| k.as_ref()),
    )
}

/// The damaged chunks the copy lists (none when the file is missing or
/// unreadable: healing is an optimisation, never a condition).
pub fn load_damaged(store: &dyn Store, keys: Option<&VaultKeys>) -> BTreeSet<ChunkId> {
    read_sealed_lenient(store, DAMAGED_FILE, keys, |b| damaged::decode(b).ok()).unwrap_or_default()
}

/// Replaces the damaged list (removes the file when it is empty).
pub fn store_damaged(
    store: &dyn Store,
    ids: &BTreeSet<ChunkId>,
    keys: Option<&VaultKeys>,
) -> Result<()> {
    if ids.is_empty() {
        store.delete(DAMAGED_FILE).map(drop)
    } else {
        put_sealed(store, DAMAGED_FILE, &damaged::encode(ids), keys)
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
pub fn load_replication_state(store: &dyn Store, keys: Option<&VaultKeys>) -> ReplicationState {
    read_sealed_lenient(store, STATE_FILE, keys, |b| {
        ReplicationState::decode(b).ok()
    })
    .unwrap_or_default()
}

/// Replaces the replication state durably.
pub fn store_replication_state(
    store: &dyn Store,
    state: &ReplicationState,
    keys: Option<&VaultKeys>,
) -> Result<()> {
    put_sealed(store, STATE_FILE, &state.encode(), keys)
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
