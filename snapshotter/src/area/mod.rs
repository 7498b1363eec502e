//! The snapshot area: where a vault keeps its instant-restore snapshots on
//! one filesystem, next to the disks (Azure keeps VM snapshots in the
//! resource group `AzureBackupRG_<geo>_<n>`).
//!
//! - **Place.** By default, one area per vault on each filesystem that holds
//!   protected images: `<mount point>/.coffre-snapshots/<vault-name>_<n>`,
//!   `n` being the first number whose folder is free or already this
//!   vault's. Being on the image's filesystem is what lets a reflink clone
//!   work. An image that is a block device has no filesystem of its own:
//!   its area is under the vault directory. `coffre vault set
//!   --snapshot-area DIR` puts every item's snapshots in DIR instead.
//! - **Identity.** `AREA/area` (an envelope: magic, version, CRC) names the
//!   vault that owns the area, so two vaults never share one. The vault
//!   lists its areas in `VAULT/snapshot-areas`, so listing and expiry find
//!   them again without the images.
//! - **Sealed.** In an encrypted vault both files are sealed envelopes
//!   (`coffre_vault_store::format::sealed_file`, bound to the names `area`
//!   and `snapshot-areas`) with the keys this process unlocked the vault
//!   with; a plain one is refused there, a sealed one in a plain vault.
//! - **Locks.** An area whose folder (or item folder) has no owner write
//!   bit, is immutable (`chattr +i`) or is on a read-only filesystem is
//!   *locked*: a backup fails naming the lock and the folder, never skips
//!   silently (Azure fails a backup whose snapshot resource group is
//!   locked).
//! - **Space.** Before a capture the free space is checked against what the
//!   capture may need ([`Area::check_space`]).

mod checks;
mod claim;
#[cfg(test)]
mod tests;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffre_vault_store::crypto::VaultKeys;
use coffre_vault_store::format::envelope;
use coffre_vault_store::format::name::SafeName;
use coffre_vault_store::store::local::durable::write_atomic;
use coffre_vault_store::store::local::lock::NamedLock;
use coffre_vault_store::store::local::private;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SnapError};
use checks::lock_of;
use claim::{claim, default_dir};

pub use checks::{check_choice, check_real_dir, free_bytes};

/// Folder holding the areas on a filesystem.
pub const AREAS_ROOT: &str = ".coffre-snapshots";
/// Identity file of an area.
pub const AREA_FILE: &str = "area";
/// The vault's list of its areas.
pub const AREA_LIST_FILE: &str = "snapshot-areas";
/// Magic of the identity file. Frozen.
pub const AREA_MAGIC: [u8; 8] = *b"CFAREA\0\0";
/// Magic of the vault's area list. Frozen.
pub const AREA_LIST_MAGIC: [u8; 8] = *b"CFAREAS\0";
/// Version of both.
pub const AREA_VERSION: u32 = 1;
const MAX_BODY: usize = 1 << 20;

/// Who owns an area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaIdentity {
    /// The owning vault's id.
    pub vault_id: String,
    /// Its name when the area was made.
    pub vault_name: String,
}

/// A vault's snapshot area on one filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    dir: PathBuf,
}

/// The directory whose filesystem holds `path`: walks up from `path` while
/// the device stays the same.
pub fn mount_point(path: &Path) -> PathBuf {
    let start = std::fs::canonicalize(path)
        .ok()
        .or_else(|| path.parent().and_then(|p| std::fs::canonicalize(p).ok()))
        .unwrap_or_else(|| PathBuf::from("/"));
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let Some(d0) = dev(&start) else {
        return start;
    };
    let mut here = if start.is_dir() {
        start.clone()
    } else {
        start
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(start.clone())
    };
    while let Some(up) = here.parent() {
        if dev(up) != Some(d0) {
            break;
        }
        here = up.to_path_buf();
    }
    here
}

/// Keys of an encrypted vault, `None` for a plain one.
pub type Keys<'a> = Option<&'a coffre_vault_store::crypto::VaultKeys>;

/// `plain` (an envelope) as file `name` of a vault with `keys` stores it.
fn seal_file(name: &str, plain: &[u8], keys: Keys<'_>, path: &Path) -> Result<Vec<u8>> {
    coffre_vault_store::format::sealed_file::seal(name, plain, keys)
        .map(std::borrow::Cow::into_owned)
        .map_err(|e| SnapError::damaged(path, format!("cannot seal it: {e}")))
}

/// Stored file `name` of a vault with `keys` as its plain envelope.
fn open_file<'a>(
    name: &str,
    bytes: &'a [u8],
    keys: Keys<'_>,
) -> std::result::Result<std::borrow::Cow<'a, [u8]>, String> {
    coffre_vault_store::format::sealed_file::open(name, bytes, keys)
        .map_err(|e| format!("refused: {e}"))
}

/// The keys that seal the files of the vault at `vault_dir`: `given`, or
/// none for a plain vault (see
/// `coffre_vault_store::copies::state_files::file_keys`).
fn vault_keys(vault_dir: &Path, given: Option<&Arc<VaultKeys>>) -> Result<Option<Arc<VaultKeys>>> {
    coffre_vault_store::copies::state_files::file_keys(vault_dir, given)
        .map_err(|e| SnapError::damaged(vault_dir.join(AREA_LIST_FILE), e.to_string()))
}

fn identity_bytes(id: &AreaIdentity, keys: Keys<'_>, path: &Path) -> Result<Vec<u8>> {
    let plain = envelope::encode(
        &AREA_MAGIC,
        AREA_VERSION,
        &serde_json::to_vec(id).unwrap_or_default(),
    );
    seal_file(AREA_FILE, &plain, keys, path)
}

/// Reads an area's identity (`None` when the folder is no area), sealed
/// with `keys` in an encrypted vault. One that does not open with `keys`
/// (another vault's sealed identity, a plain one where the vault is
/// encrypted, a sealed one where it is not) is an identity of no vault:
/// an empty id, its name saying why, so the area is never this vault's.
pub fn read_identity(dir: &Path, keys: Keys<'_>) -> Result<Option<AreaIdentity>> {
    let path = dir.join(AREA_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapError::damaged(&path, e.to_string())),
    };
    let plain = match open_file(AREA_FILE, &bytes, keys) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Some(AreaIdentity {
                vault_id: String::new(),
                vault_name: format!(
                    "its identity {} does not open with this vault's key ({e})",
                    path.display()
                ),
            }));
        }
    };
    decode_identity(&plain)
        .map(Some)
        .map_err(|e| SnapError::damaged(&path, e))
}

/// Whose area a folder is, for messages: `it is …`.
fn owner_of(id: &AreaIdentity) -> String {
    if id.vault_id.is_empty() {
        // An identity that did not open: its name says why.
        return format!(
            "it is another vault's snapshot area, or damaged: {}",
            id.vault_name
        );
    }
    format!(
        "it is the snapshot area of vault {} ({})",
        id.vault_name, id.vault_id
    )
}

/// Decodes an area's identity file (`area`).
pub fn decode_identity(bytes: &[u8]) -> std::result::Result<AreaIdentity, String> {
    let (_, body) =
        envelope::decode(&AREA_MAGIC, AREA_VERSION, MAX_BODY, bytes).map_err(|e| e.to_string())?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Decodes a vault's list of snapshot areas (`snapshot-areas`).
pub fn decode_area_list(bytes: &[u8]) -> std::result::Result<Vec<PathBuf>, String> {
    let (_, body) = envelope::decode(&AREA_LIST_MAGIC, AREA_VERSION, MAX_BODY, bytes)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

impl Area {
    /// An area at `dir` as it is (listing, expiry).
    pub fn at(dir: impl Into<PathBuf>) -> Area {
        Area { dir: dir.into() }
    }

    /// The area's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The area the vault uses for `image`: `chosen` when the vault has one
    /// set, else the default on the image's filesystem (see the module
    /// doc), or under `root` instead of `.coffre-snapshots` when given.
    /// Creates it if needed and records it in the vault's list.
    pub fn for_image(
        vault_dir: &Path,
        vault_keys_given: Option<&Arc<VaultKeys>>,
        owner: &AreaIdentity,
        chosen: Option<&Path>,
        root: Option<&Path>,
        image: &Path,
    ) -> Result<Area> {
        let keys = vault_keys(vault_dir, vault_keys_given)?;
        let keys = keys.as_deref();
        let dir = match chosen {
            Some(dir) => {
                claim(dir, owner, keys)?;
                dir.to_path_buf()
            }
            None => {
                // A block device (or an image that is no file at all) has
                // no filesystem to keep its snapshots next to.
                let on_a_filesystem = std::fs::metadata(image).is_ok_and(|m| m.is_file());
                let base = match root {
                    Some(r) => r.to_path_buf(),
                    None if on_a_filesystem => mount_point(image).join(AREAS_ROOT),
                    None => vault_dir.join(AREAS_ROOT),
                };
                default_dir(&base, owner, keys)?
            }
        };
        remember(vault_dir, &dir, keys)?;
        Ok(Area { dir })
    }

    /// Every area the vault `vault_id` at `vault_dir` has used: those of
    /// its list (sealed with `keys` in an encrypted vault) whose `area`
    /// file still names the vault (the list is a vault file: a folder it
    /// names is used, and its items' folders removed, only when it is this
    /// vault's area).
    pub fn known_of(vault_dir: &Path, vault_id: &str, keys: Option<&Arc<VaultKeys>>) -> Vec<Area> {
        let keys = match vault_keys(vault_dir, keys) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "the vault's snapshot areas are left alone");
                return Vec::new();
            }
        };
        let keys = keys.as_deref();
        list(vault_dir, keys)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the vault's list of snapshot areas is refused; its areas are left alone");
                Vec::new()
            })
            .into_iter()
            .filter(|dir| {
                if let Err(e) = check_real_dir(dir) {
                    tracing::warn!(error = %e, "a snapshot area of the vault's list is no directory; it is left alone");
                    return false;
                }
                true
            })
            .filter(|dir| match read_identity(dir, keys) {
                Ok(Some(id)) if id.vault_id == vault_id => true,
                Ok(None) if !dir.exists() => false,
                other => {
                    tracing::warn!(area = %dir.display(), found = ?other.map(|i| i.map(|i| i.vault_id)), "the vault lists a snapshot area that is not its own; it is left alone");
                    false
                }
            })
            .map(Area::at)
            .collect()
    }

    /// The folder of `item`'s snapshots: always a direct child of the
    /// area, since the name passed the naming rule.
    pub fn item_dir(&self, item: &SafeName) -> PathBuf {
        item.under(&self.dir)
    }

    /// Fails with [`SnapError::AreaLocked`] when the area or the item's
    /// folder is locked, and creates the item's folder otherwise.
    pub fn check_unlocked(&self, item: &str) -> Result<PathBuf> {
        let item_dir = self.item_dir(&SafeName::new("item", item)?);
        // Expiry deletes in the item folder as coffre's user: a planted
        // symlink would point it elsewhere.
        for dir in [&self.dir, &item_dir] {
            check_real_dir(dir)?;
        }
        for dir in [&self.dir, &item_dir] {
            if let Some(lock) = lock_of(dir) {
                return Err(SnapError::AreaLocked {
                    dir: dir.clone(),
                    lock,
                });
            }
        }
        match private::create_dir_all(&item_dir) {
            Ok(()) => check_real_dir(&item_dir).map(|()| item_dir),
            Err(e) => match e.raw_os_error() {
                Some(libc::EROFS) => Err(SnapError::AreaLocked {
                    dir: item_dir,
                    lock: "read-only filesystem".into(),
                }),
                Some(libc::EPERM) | Some(libc::EACCES) => Err(SnapError::AreaLocked {
                    dir: item_dir,
                    lock: format!("no permission to write: {e}"),
                }),
                _ => Err(SnapError::AreaUnusable {
                    dir: item_dir,
                    source: e,
                }),
            },
        }
    }

    /// Fails with [`SnapError::AreaFull`] when fewer than `needed` bytes are
    /// free on the area's filesystem.
    pub fn check_space(&self, needed: u64, image: &Path) -> Result<()> {
        let free = free_bytes(&self.dir).map_err(|e| SnapError::AreaUnusable {
            dir: self.dir.clone(),
            source: e,
        })?;
        if free < needed {
            return Err(SnapError::AreaFull {
                dir: self.dir.clone(),
                image: image.to_path_buf(),
                free,
                needed,
            });
        }
        Ok(())
    }

    /// Bytes allocated on disk by the item's snapshot files (clones count
    /// their shared extents too: `du` semantics).
    pub fn bytes_used(&self, item: &str) -> u64 {
        let item = match SafeName::new("item", item) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an item whose name cannot be a folder");
                return 0;
            }
        };
        std::fs::read_dir(self.item_dir(&item))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }
}

fn list(vault_dir: &Path, keys: Keys<'_>) -> Result<Vec<PathBuf>> {
    let path = vault_dir.join(AREA_LIST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SnapError::damaged(&path, e.to_string())),
    };
    open_file(AREA_LIST_FILE, &bytes, keys)
        .and_then(|plain| decode_area_list(&plain))
        .map_err(|e| SnapError::damaged(&path, e))
}

/// Adds `dir` to the vault's list of areas (under a lock).
fn remember(vault_dir: &Path, dir: &Path, keys: Keys<'_>) -> Result<()> {
    if list(vault_dir, keys)?.iter().any(|d| d == dir) {
        return Ok(());
    }
    let lock_path = vault_dir
        .join(coffre_vault_store::store::local::lock::ITEM_LOCKS_DIR)
        .join("snapshot-areas.lock");
    let _lock = loop {
        match NamedLock::try_acquire(&lock_path, &std::process::id().to_string())? {
            Ok(l) => break l,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    let mut dirs = list(vault_dir, keys)?;
    if !dirs.iter().any(|d| d == dir) {
        dirs.push(dir.to_path_buf());
        let body = serde_json::to_vec_pretty(&dirs).unwrap_or_default();
        let path = vault_dir.join(AREA_LIST_FILE);
        let plain = envelope::encode(&AREA_LIST_MAGIC, AREA_VERSION, &body);
        write_atomic(&path, &seal_file(AREA_LIST_FILE, &plain, keys, &path)?)?;
    }
    Ok(())
}

/// Fuzz entry point: decodes arbitrary bytes with the production
/// decoders of an area identity file and of a vault's area list; never
/// panics. Returns which of the two decoded.
pub fn fuzz_entry(data: &[u8]) -> (bool, bool) {
    (
        decode_identity(data).is_ok(),
        decode_area_list(data).is_ok(),
    )
}
