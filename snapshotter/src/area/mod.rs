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
//! - **Locks.** An area whose folder (or item folder) has no owner write
//!   bit, is immutable (`chattr +i`) or is on a read-only filesystem is
//!   *locked*: a backup fails naming the lock and the folder, never skips
//!   silently (Azure fails a backup whose snapshot resource group is
//!   locked).
//! - **Space.** Before a capture the free space is checked against what the
//!   capture may need ([`Area::check_space`]).

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use coffre_vault_store::durable::write_atomic;
use coffre_vault_store::envelope;
use coffre_vault_store::lock::NamedLock;
use coffre_vault_store::name::SafeName;
use coffre_vault_store::private;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SnapError};

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

fn identity_bytes(id: &AreaIdentity) -> Vec<u8> {
    envelope::encode(
        &AREA_MAGIC,
        AREA_VERSION,
        &serde_json::to_vec(id).unwrap_or_default(),
    )
}

/// Reads an area's identity (`None` when the folder is no area).
pub fn read_identity(dir: &Path) -> Result<Option<AreaIdentity>> {
    let path = dir.join(AREA_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapError::damaged(&path, e.to_string())),
    };
    decode_identity(&bytes)
        .map(Some)
        .map_err(|e| SnapError::damaged(&path, e))
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
        owner: &AreaIdentity,
        chosen: Option<&Path>,
        root: Option<&Path>,
        image: &Path,
    ) -> Result<Area> {
        let dir = match chosen {
            Some(dir) => {
                claim(dir, owner)?;
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
                default_dir(&base, owner)?
            }
        };
        remember(vault_dir, &dir)?;
        Ok(Area { dir })
    }

    /// Every area the vault has used: those of its list whose `area` file
    /// still names the vault (the list is a vault file: a folder it names
    /// is used, and its items' folders removed, only when it is this
    /// vault's area).
    pub fn known(vault_dir: &Path) -> Vec<Area> {
        match coffre_vault_store::config::VaultConfig::load(vault_dir) {
            Ok(cfg) => Area::known_of(vault_dir, &cfg.vault_id),
            Err(e) => {
                tracing::warn!(vault = %vault_dir.display(), error = %e, "cannot read the vault config; its snapshot areas are left alone");
                Vec::new()
            }
        }
    }

    /// [`Area::known`] for the vault whose id is `vault_id`.
    pub fn known_of(vault_dir: &Path, vault_id: &str) -> Vec<Area> {
        list(vault_dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|dir| {
                if let Err(e) = check_real_dir(dir) {
                    tracing::warn!(error = %e, "a snapshot area of the vault's list is no directory; it is left alone");
                    return false;
                }
                true
            })
            .filter(|dir| match read_identity(dir) {
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

/// Why `dir` counts as locked, if it does (and exists).
fn lock_of(dir: &Path) -> Option<String> {
    let meta = std::fs::metadata(dir).ok()?;
    if meta.permissions().mode() & 0o200 == 0 {
        return Some(format!(
            "read-only directory, mode {:03o}",
            meta.permissions().mode() & 0o777
        ));
    }
    if is_immutable(dir) {
        return Some("immutable attribute (chattr +i)".into());
    }
    None
}

/// True when `path` carries the immutable or append-only inode flag.
fn is_immutable(path: &Path) -> bool {
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
    const FS_IMMUTABLE_FL: libc::c_long = 0x10;
    const FS_APPEND_FL: libc::c_long = 0x20;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long into `flags`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS as _, &mut flags) };
    r == 0 && flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) != 0
}

/// Free bytes for unprivileged writers on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills `s` for a NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// coffre's effective user id.
fn current_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses `dir` (an area or an item folder) when something is there that
/// is not a real directory: a symlink (even to a directory) or a file. A
/// missing `dir` passes (it is created as a directory).
pub fn check_real_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(m) => Err(SnapError::AreaRefused {
            dir: dir.to_path_buf(),
            reason: format!(
                "it is not a directory but a {}; coffre never follows it",
                if m.file_type().is_symlink() {
                    "symlink"
                } else {
                    "file"
                }
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapError::AreaUnusable {
            dir: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Refuses a folder of areas (`<mount>/.coffre-snapshots`), or an area
/// folder, that another user could have planted or may change: it must be
/// a real directory (not a symlink), owned by `euid`, and not writable by
/// group or others.
fn check_root_owner(base: &Path, euid: u32) -> Result<()> {
    let refuse = |reason: String| SnapError::AreaRefused {
        dir: base.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(base).map_err(|e| SnapError::AreaUnusable {
        dir: base.to_path_buf(),
        source: e,
    })?;
    if !meta.file_type().is_dir() {
        return Err(refuse("it is not a directory (a symlink or a file)".into()));
    }
    if meta.uid() != euid {
        return Err(refuse(format!(
            "it is owned by uid {}, not by coffre's user (uid {euid})",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "group or others may write to it (mode {mode:03o}); `chmod go-w` it if it is yours"
        )));
    }
    Ok(())
}

/// Checks that `dir` may become the chosen area of the vault `vault_id`
/// (`vault create/set --snapshot-area`): it is absent, empty, or already
/// that vault's area. Nothing is written.
pub fn check_choice(dir: &Path, vault_id: &str) -> Result<()> {
    check_owner_if_there(dir)?;
    match read_identity(dir)? {
        Some(id) if id.vault_id == vault_id => Ok(()),
        Some(id) => Err(SnapError::AreaUnusable {
            dir: dir.to_path_buf(),
            source: std::io::Error::other(format!(
                "it is the snapshot area of vault {} ({})",
                id.vault_name, id.vault_id
            )),
        }),
        None => refuse_non_empty(dir),
    }
}

/// Refuses a folder that holds anything (and is no area).
fn refuse_non_empty(dir: &Path) -> Result<()> {
    // Another capture of the same vault claiming the folder at this moment
    // leaves only its identity file's temporary copy in it.
    let in_flight = format!(".{AREA_FILE}.tmp-");
    if std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with(&in_flight))
    }) {
        return Err(SnapError::AreaRefused {
            dir: dir.to_path_buf(),
            reason: "it is a non-empty folder that is not a coffre snapshot area (it has no `area` file); give an empty or new folder".into(),
        });
    }
    Ok(())
}

/// [`check_root_owner`] for `dir` when something is there (a missing
/// folder is created by coffre, private).
fn check_owner_if_there(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_ok() {
        check_root_owner(dir, current_euid())?;
    }
    Ok(())
}

/// Makes `dir` an area of `owner`, or checks that it is one. The folder,
/// chosen or not, is held to the rule of the root of areas
/// ([`check_root_owner`]): a folder someone else owns or may write to
/// could be swapped for symlinks that send expiry's deletions elsewhere.
fn claim(dir: &Path, owner: &AreaIdentity) -> Result<()> {
    check_owner_if_there(dir)?;
    match read_identity(dir)? {
        Some(id) if id.vault_id == owner.vault_id => Ok(()),
        Some(id) => Err(SnapError::AreaUnusable {
            dir: dir.to_path_buf(),
            source: std::io::Error::other(format!(
                "it is the snapshot area of vault {} ({})",
                id.vault_name, id.vault_id
            )),
        }),
        None => {
            // Never take over someone's folder: only a new or empty one
            // becomes an area.
            if let Err(e) = refuse_non_empty(dir) {
                // Unless another capture of this vault just made it one.
                return match read_identity(dir)? {
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
            write_atomic(&dir.join(AREA_FILE), &identity_bytes(owner))?;
            Ok(())
        }
    }
}

/// `<base>/<vault-name>_<n>`: the first `n` that is this vault's or free.
fn default_dir(base: &Path, owner: &AreaIdentity) -> Result<PathBuf> {
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
        match read_identity(&dir)? {
            Some(id) if id.vault_id == owner.vault_id => return Ok(dir),
            Some(_) => continue,
            None if dir.exists()
                && std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) =>
            {
                continue;
            }
            None => {
                claim(&dir, owner)?;
                return Ok(dir);
            }
        }
    }
    Err(SnapError::AreaUnusable {
        dir: base.to_path_buf(),
        source: std::io::Error::other("no free area name"),
    })
}

fn list(vault_dir: &Path) -> Result<Vec<PathBuf>> {
    let path = vault_dir.join(AREA_LIST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SnapError::damaged(&path, e.to_string())),
    };
    decode_area_list(&bytes).map_err(|e| SnapError::damaged(&path, e))
}

/// Adds `dir` to the vault's list of areas (under a lock).
fn remember(vault_dir: &Path, dir: &Path) -> Result<()> {
    if list(vault_dir)?.iter().any(|d| d == dir) {
        return Ok(());
    }
    let lock_path = vault_dir
        .join(coffre_vault_store::lock::ITEM_LOCKS_DIR)
        .join("snapshot-areas.lock");
    let _lock = loop {
        match NamedLock::try_acquire(&lock_path, &std::process::id().to_string())? {
            Ok(l) => break l,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    let mut dirs = list(vault_dir)?;
    if !dirs.iter().any(|d| d == dir) {
        dirs.push(dir.to_path_buf());
        let body = serde_json::to_vec_pretty(&dirs).unwrap_or_default();
        write_atomic(
            &vault_dir.join(AREA_LIST_FILE),
            &envelope::encode(&AREA_LIST_MAGIC, AREA_VERSION, &body),
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> AreaIdentity {
        AreaIdentity {
            vault_id: id.into(),
            vault_name: "prod".into(),
        }
    }

    #[test]
    fn areas_are_numbered_per_vault_and_remembered() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join(AREAS_ROOT);
        let a = default_dir(&base, &owner("A")).unwrap();
        let b = default_dir(&base, &owner("B")).unwrap();
        assert_eq!(a, base.join("prod_1"));
        assert_eq!(b, base.join("prod_2"));
        assert_eq!(default_dir(&base, &owner("A")).unwrap(), a);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let vault = t.path().join("vault");
        std::fs::create_dir(&vault).unwrap();
        remember(&vault, &a).unwrap();
        remember(&vault, &a).unwrap();
        assert_eq!(Area::known_of(&vault, "A"), vec![Area::at(&a)]);
        // A listed folder that is not the vault's area is left alone.
        let planted = t.path().join("home");
        std::fs::create_dir(&planted).unwrap();
        remember(&vault, &planted).unwrap();
        remember(&vault, &b).unwrap();
        assert_eq!(Area::known_of(&vault, "A"), vec![Area::at(&a)]);
        assert_eq!(Area::known_of(&vault, "B"), vec![Area::at(&b)]);
        let id = std::fs::read(a.join(AREA_FILE)).unwrap();
        let list = std::fs::read(vault.join(AREA_LIST_FILE)).unwrap();
        assert_eq!(fuzz_entry(&id), (true, false));
        assert_eq!(fuzz_entry(&list), (false, true));
        assert_eq!(fuzz_entry(&id[..id.len() - 1]), (false, false));
    }

    #[test]
    fn a_chosen_area_of_another_vault_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("area");
        claim(&dir, &owner("A")).unwrap();
        let err = claim(&dir, &owner("B")).unwrap_err().to_string();
        assert!(err.contains("snapshot area of vault prod (A)"), "{err}");
    }

    #[test]
    fn a_non_empty_folder_is_not_taken_over() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("home");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("thesis.tex"), b"years of work").unwrap();
        assert!(check_choice(&dir, "A").is_err());
        let err = claim(&dir, &owner("A")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SnapError::AreaRefused { .. }), "{msg}");
        assert!(msg.contains(s(&dir)) && msg.contains("non-empty"), "{msg}");
        assert!(!dir.join(AREA_FILE).exists());
        // An empty folder is claimed, and is an area from then on.
        let empty = t.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        claim(&empty, &owner("A")).unwrap();
        std::fs::write(empty.join("vm"), b"").unwrap();
        claim(&empty, &owner("A")).unwrap();
    }

    #[test]
    fn a_root_of_areas_others_could_change_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join(AREAS_ROOT);
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = default_dir(&base, &owner("A")).unwrap_err().to_string();
        assert!(err.contains(s(&base)) && err.contains("mode 777"), "{err}");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = current_euid();
        check_root_owner(&base, me).unwrap();
        let err = check_root_owner(&base, me.wrapping_add(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("owned by uid") && err.contains(s(&base)),
            "{err}"
        );
        // A planted symlink is no root of areas.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        let err = default_dir(&link, &owner("A")).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        default_dir(&base, &owner("A")).unwrap();
    }

    #[test]
    fn a_chosen_area_others_own_or_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let vault = t.path().join("vault");
        std::fs::create_dir(&vault).unwrap();
        let chosen =
            |dir: &Path| Area::for_image(&vault, &owner("A"), Some(dir), None, Path::new("/img"));
        // Mode 0777: anyone could swap its item folders for symlinks.
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = chosen(&open).unwrap_err();
        assert!(matches!(err, SnapError::AreaRefused { .. }), "{err}");
        assert!(err.to_string().contains("mode 777") && err.to_string().contains(s(&open)));
        assert!(check_choice(&open, "A").is_err());
        assert_eq!(
            std::fs::metadata(&open).unwrap().permissions().mode() & 0o777,
            0o777,
            "the folder was changed"
        );
        // Owned by another user.
        if current_euid() == 0 {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = chosen(&theirs).unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
            assert!(!theirs.join(AREA_FILE).exists());
        }
        // A symlink to a good folder is refused, and its target untouched.
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = chosen(&link).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        assert!(!target.join(AREA_FILE).exists());
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // A new folder, and a private one, are fine.
        chosen(&t.path().join("new")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        chosen(&open).unwrap();
        assert!(Area::known_of(&vault, "A").len() == 2);
    }

    #[test]
    fn an_item_folder_that_is_a_symlink_or_a_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let area = Area::at(t.path().join("area"));
        claim(area.dir(), &owner("A")).unwrap();
        let elsewhere = t.path().join("etc");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, area.dir().join("vm")).unwrap();
        let err = area.check_unlocked("vm").unwrap_err();
        assert!(matches!(err, SnapError::AreaRefused { .. }), "{err}");
        std::fs::write(area.dir().join("db"), b"").unwrap();
        let err = area.check_unlocked("db").unwrap_err().to_string();
        assert!(err.contains("file"), "{err}");
        area.check_unlocked("ok").unwrap();
    }

    #[test]
    fn an_item_name_that_leaves_the_area_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let area = Area::at(t.path().join("area"));
        claim(area.dir(), &owner("A")).unwrap();
        for bad in ["../x", "/tmp/x", "a/b"] {
            let err = area.check_unlocked(bad).unwrap_err();
            assert!(matches!(err, SnapError::BadName(_)), "{err}");
            assert_eq!(area.bytes_used(bad), 0);
        }
        assert!(!t.path().join("x").exists());
    }

    #[test]
    fn a_read_only_area_is_locked() {
        let t = tempfile::tempdir().unwrap();
        let area = Area::at(t.path().join("area"));
        claim(area.dir(), &owner("A")).unwrap();
        area.check_unlocked("vm").unwrap();
        std::fs::set_permissions(area.dir(), std::fs::Permissions::from_mode(0o500)).unwrap();
        let err = area.check_unlocked("vm").unwrap_err();
        std::fs::set_permissions(area.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let msg = err.to_string();
        assert!(matches!(err, SnapError::AreaLocked { .. }), "{msg}");
        assert!(
            msg.contains("read-only directory") && msg.contains(s(area.dir())),
            "{msg}"
        );
    }

    #[test]
    fn the_space_check_names_the_numbers() {
        let t = tempfile::tempdir().unwrap();
        let area = Area::at(t.path());
        area.check_space(1, Path::new("/img")).unwrap();
        let err = area.check_space(u64::MAX, Path::new("/img")).unwrap_err();
        assert!(err.is_no_space());
        assert!(err.to_string().contains("/img"), "{err}");
    }

    #[test]
    fn the_mount_point_is_an_ancestor_on_the_same_device() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("img");
        std::fs::write(&f, b"x").unwrap();
        let m = mount_point(&f);
        assert!(f.starts_with(&m) || std::fs::canonicalize(&f).unwrap().starts_with(&m));
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        assert_eq!(dev(&m), dev(&f));
        if let Some(up) = m.parent() {
            assert_ne!(dev(up), dev(&m));
        }
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }
}
