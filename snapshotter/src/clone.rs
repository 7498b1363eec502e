//! Reflink clones (`FICLONE`): a copy that shares the source's extents and
//! takes constant time whatever the size, on XFS (reflink=1), btrfs and
//! other filesystems that can clone. Writes to either file after the clone
//! get new extents (copy on write), so the clone is a point in time.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use coffre_vault_store::store::local::private;

use crate::error::SnapError;

/// `FICLONE` = `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Why a clone could not be made.
#[derive(Debug)]
pub enum CloneError {
    /// The filesystem (or the pair of files) cannot clone: use the copy.
    Unsupported(std::io::Error),
    /// A real failure (no space, I/O error).
    Failed(SnapError),
}

/// Clones `src` into the new file `dst` (created owner-only). The clone is
/// fsynced with its directory. On failure `dst` is removed.
pub fn clone_file(src: &File, dst: &Path) -> std::result::Result<(), CloneError> {
    let out = private::open_options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| CloneError::Failed(SnapError::write(dst, e)))?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open and owned by us.
    let r = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        drop(out);
        let _ = std::fs::remove_file(dst);
        return Err(match err.raw_os_error() {
            Some(libc::EOPNOTSUPP)
            | Some(libc::ENOTTY)
            | Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::ENOSYS) => CloneError::Unsupported(err),
            _ => CloneError::Failed(SnapError::write(dst, err)),
        });
    }
    let synced = out.sync_all().map_err(|e| SnapError::write(dst, e));
    let synced = synced.and_then(|()| {
        coffre_vault_store::store::local::durable::fsync_dir(dst.parent().unwrap_or(Path::new(".")))
            .map_err(SnapError::from)
    });
    if let Err(e) = synced {
        let _ = std::fs::remove_file(dst);
        return Err(CloneError::Failed(e));
    }
    Ok(())
}

/// Clones all of `src` into the open file `dst` (which is emptied
/// first). `Ok(false)`: the filesystem cannot clone these two files.
pub fn clone_into(src: &File, dst: &File) -> std::io::Result<bool> {
    dst.set_len(0)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP)
        | Some(libc::ENOTTY)
        | Some(libc::EXDEV)
        | Some(libc::EINVAL)
        | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}

/// True when `dir`'s filesystem can clone files into itself (probed with
/// two tiny files).
pub fn can_clone_in(dir: &Path) -> bool {
    let a = dir.join(format!(".coffre-clone-probe-{}", std::process::id()));
    let b = a.with_extension("b");
    let ok = (|| -> std::io::Result<bool> {
        std::fs::write(&a, [0u8; 4096])?;
        let src = File::open(&a)?;
        Ok(clone_file(&src, &b).is_ok())
    })()
    .unwrap_or(false);
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_filesystem_says_so_and_leaves_nothing() {
        // tmpfs and ext4 cannot clone; XFS and btrfs are tested for real by
        // the integration tests (loop-mounted XFS, as root).
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("a");
        std::fs::write(&src, b"hello").unwrap();
        let dst = t.path().join("b");
        match clone_file(&File::open(&src).unwrap(), &dst) {
            Ok(()) => assert_eq!(std::fs::read(&dst).unwrap(), b"hello"),
            Err(CloneError::Unsupported(_)) => assert!(!dst.exists()),
            Err(CloneError::Failed(e)) => panic!("unexpected failure: {e}"),
        }
    }
}
