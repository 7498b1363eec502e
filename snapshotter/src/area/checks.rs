//! The checks an area folder must pass: locks, ownership and modes, real
//! directories, emptiness, and the free space left on its filesystem.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::{AREA_FILE, Keys, read_identity};
use crate::error::{Result, SnapError};

/// Why `dir` counts as locked, if it does (and exists).
pub(super) fn lock_of(dir: &Path) -> Option<String> {
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
pub(super) fn current_euid() -> u32 {
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
pub(super) fn check_root_owner(base: &Path, euid: u32) -> Result<()> {
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
pub fn check_choice(dir: &Path, vault_id: &str, keys: Keys<'_>) -> Result<()> {
    check_owner_if_there(dir)?;
    match read_identity(dir, keys)? {
        Some(id) if id.vault_id == vault_id => Ok(()),
        Some(id) => Err(SnapError::AreaUnusable {
            dir: dir.to_path_buf(),
            source: std::io::Error::other(super::owner_of(&id)),
        }),
        None => refuse_non_empty(dir),
    }
}

/// Refuses a folder that holds anything (and is no area).
pub(super) fn refuse_non_empty(dir: &Path) -> Result<()> {
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
pub(super) fn check_owner_if_there(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_ok() {
        check_root_owner(dir, current_euid())?;
    }
    Ok(())
}
